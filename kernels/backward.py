"""Triton backward of certified block-sparse attention.

The gradient is the exact gradient of the function the forward computed: softmax attention
restricted to the forward's kept blocks (the selection is piecewise constant in the inputs, so it
contributes no gradient). Inputs from the forward: the per-row log-sum-exp ``lse`` and the bool map
``kept`` [B, H, nQT, nKB] — block-level metadata, no [L, S] buffer anywhere.

* ``_dq_kernel``: one program per (batch, head, query tile), over that tile's kept key blocks.
* ``_dkv_kernel``: one program per (batch, kv head, key block), over the query tiles that kept the
  block (the transposed lists), for every query head of its GQA group — so dK and dV of a kv head
  are summed in registers, without atomics.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .certificate import num_blocks
from .jit_common import scores_log2
from .launch import INTERPRET, default_blocks, mask_as_4d, pad_pow2, traceable


@triton.jit
def _dq_kernel(
    Q, K, V, Mask, DO, Lse, Delta, DQ, Idx, Cnt,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    sm_scale, L, S, D, DV, n_qt, n_kb, H, GROUP,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    sm_scale = tl.cast(sm_scale, tl.float32)  # Inductor may pass floats as fp64 or constants
    pid = tl.program_id(0).to(tl.int64)
    t = pid % n_qt
    bh = pid // n_qt
    b = bh // H
    h = bh % H
    hk = h // GROUP
    o_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, D_PAD)
    o_dv = tl.arange(0, DV_PAD)
    o_n0 = tl.arange(0, BLOCK_N)
    m_m = o_m < L
    b_q = tl.load(Q + b * stride_qb + h * stride_qh + o_m[:, None] * stride_qm
                  + o_d[None, :] * stride_qd, mask=m_m[:, None] & (o_d[None, :] < D), other=0.0)
    b_do = tl.load(DO + b * stride_ob + h * stride_oh + o_m[:, None] * stride_om
                   + o_dv[None, :] * stride_od, mask=m_m[:, None] & (o_dv[None, :] < DV),
                   other=0.0)
    if DOT_UPCAST:
        b_q = b_q.to(tl.float32)
        b_do = b_do.to(tl.float32)
    lse2 = tl.load(Lse + bh * L + o_m, mask=m_m, other=-float("inf")) * 1.4426950408889634
    lse2 = tl.where(lse2 == -float("inf"), float("inf"), lse2)  # empty rows: every p is 0
    delta = tl.load(Delta + bh * L + o_m, mask=m_m, other=0.0)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_ptr = Mask + b * stride_mb + h * stride_mh
    sm_scale_log2 = sm_scale * 1.4426950408889634
    b_dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    n_visit = tl.load(Cnt + pid)
    for p in range(0, n_visit):
        j = tl.load(Idx + pid * n_kb + p).to(tl.int64)
        o_n = j * BLOCK_N + o_n0
        m_n = o_n < S
        b_kt = tl.load(k_base + o_n[None, :] * stride_kn + o_d[:, None] * stride_kd,
                       mask=m_n[None, :] & (o_d[:, None] < D), other=0.0)  # [D, BN]
        b_vt = tl.load(v_base + o_n[None, :] * stride_vn + o_dv[:, None] * stride_vd,
                       mask=m_n[None, :] & (o_dv[:, None] < DV), other=0.0)  # [DV, BN]
        if DOT_UPCAST:
            b_kt = b_kt.to(tl.float32)
            b_vt = b_vt.to(tl.float32)
        s = scores_log2(b_q, b_kt, o_m, o_n, m_m, m_n, m_ptr, stride_mm, stride_mn,
                         sm_scale_log2, HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, DOT_PRECISION)
        b_p = tl.exp2(s - lse2[:, None])  # [BM, BN]
        b_dp = tl.dot(b_do, b_vt, input_precision=DOT_PRECISION)
        b_ds = b_p * (b_dp - delta[:, None])
        b_dq += tl.dot(b_ds.to(b_kt.dtype), tl.trans(b_kt), input_precision=DOT_PRECISION)
    b_dq = b_dq * sm_scale
    tl.store(DQ + b * stride_qb + h * stride_qh + o_m[:, None] * stride_qm
             + o_d[None, :] * stride_qd, b_dq.to(DQ.dtype.element_ty),
             mask=m_m[:, None] & (o_d[None, :] < D))


@triton.jit
def _dkv_kernel(
    Q, K, V, Mask, DO, Lse, Delta, DK, DV_, IdxT, CntT,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    sm_scale, L, S, D, DV, n_qt, n_kb, H, GROUP,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    # DK, DV_ are contiguous [B, Hkv, S, D] / [B, Hkv, S, DV].
    sm_scale = tl.cast(sm_scale, tl.float32)  # Inductor may pass floats as fp64 or constants
    pid = tl.program_id(0).to(tl.int64)
    j = pid % n_kb
    bhk = pid // n_kb
    H_KV = H // GROUP
    b = bhk // H_KV
    hk = bhk % H_KV
    o_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, D_PAD)
    o_dv = tl.arange(0, DV_PAD)
    o_m0 = tl.arange(0, BLOCK_M)
    m_n = o_n < S
    b_k = tl.load(K + b * stride_kb + hk * stride_kh + o_n[:, None] * stride_kn
                  + o_d[None, :] * stride_kd, mask=m_n[:, None] & (o_d[None, :] < D), other=0.0)
    b_v = tl.load(V + b * stride_vb + hk * stride_vh + o_n[:, None] * stride_vn
                  + o_dv[None, :] * stride_vd, mask=m_n[:, None] & (o_dv[None, :] < DV),
                  other=0.0)
    if DOT_UPCAST:
        b_k = b_k.to(tl.float32)
        b_v = b_v.to(tl.float32)
    sm_scale_log2 = sm_scale * 1.4426950408889634
    b_dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    b_dv = tl.zeros([BLOCK_N, DV_PAD], tl.float32)
    for g in range(0, GROUP):
        h = hk * GROUP + g
        bh = b * H + h
        lists = (bh * n_kb + j)
        cnt = tl.load(CntT + lists)
        m_ptr = Mask + b * stride_mb + h * stride_mh
        for p in range(0, cnt):
            t = tl.load(IdxT + lists * n_qt + p).to(tl.int64)
            o_m = t * BLOCK_M + o_m0
            m_m = o_m < L
            b_q = tl.load(Q + b * stride_qb + h * stride_qh + o_m[:, None] * stride_qm
                          + o_d[None, :] * stride_qd, mask=m_m[:, None] & (o_d[None, :] < D),
                          other=0.0)  # [BM, D]
            b_do = tl.load(DO + b * stride_ob + h * stride_oh + o_m[:, None] * stride_om
                           + o_dv[None, :] * stride_od, mask=m_m[:, None] & (o_dv[None, :] < DV),
                           other=0.0)  # [BM, DV]
            if DOT_UPCAST:
                b_q = b_q.to(tl.float32)
                b_do = b_do.to(tl.float32)
            lse2 = tl.load(Lse + bh * L + o_m, mask=m_m, other=-float("inf")) * 1.4426950408889634
            lse2 = tl.where(lse2 == -float("inf"), float("inf"), lse2)
            delta = tl.load(Delta + bh * L + o_m, mask=m_m, other=0.0)
            s = scores_log2(b_q, tl.trans(b_k), o_m, o_n, m_m, m_n, m_ptr, stride_mm, stride_mn,
                             sm_scale_log2, HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, DOT_PRECISION)
            b_p = tl.exp2(s - lse2[:, None])  # [BM, BN]
            b_dv += tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do, input_precision=DOT_PRECISION)
            b_dp = tl.dot(b_do, tl.trans(b_v), input_precision=DOT_PRECISION)  # [BM, BN]
            b_ds = b_p * (b_dp - delta[:, None])
            b_dk += tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q, input_precision=DOT_PRECISION)
    b_dk = b_dk * sm_scale
    base = (b * H_KV + hk) * S
    tl.store(DK + (base + o_n[:, None]) * D + o_d[None, :], b_dk.to(DK.dtype.element_ty),
             mask=m_n[:, None] & (o_d[None, :] < D))
    tl.store(DV_ + (base + o_n[:, None]) * DV + o_dv[None, :], b_dv.to(DV_.dtype.element_ty),
             mask=m_n[:, None] & (o_dv[None, :] < DV))




def _block_lists(kept: torch.Tensor):
    """Kept blocks first along the last dim (stable), and their count: a BCSR-like list."""
    kept_i8 = kept.to(torch.int8)
    idx = torch.argsort(-kept_i8, dim=-1, stable=True).to(torch.int32).contiguous()
    return idx, kept_i8.sum(-1, dtype=torch.int32).contiguous()


def _bwd_config(block_m, d_pad, dv_pad, device_type):
    if device_type != "cuda":
        return {}
    return {"num_warps": 8 if block_m >= 128 else 4,
            "num_stages": 2 if max(d_pad, dv_pad) <= 128 else 1}


def triton_attention_backward(grad_out, query, key, value, out, lse, kept, attn_mask=None,
                              is_causal=False, scale=None, block_m=None, block_n=None):
    """(dq, dk, dv) of attention restricted to ``kept`` blocks; O(L + S) memory beyond inputs."""
    B, H, L, D = query.shape
    Hkv, S, DV = key.shape[1], key.shape[2], value.shape[-1]
    dev = query.device
    dm, dn = default_blocks(max(D, DV), dev.type)
    block_m, block_n = block_m or dm, block_n or dn
    if block_m == dm and block_n > dn and block_n % dn == 0:
        # A forward on longer key blocks (launch.LONG_KEYS): its kept map on the backward's own
        # grid, each kept block as the shorter blocks it covers (the same keys, exactly).
        kept = kept.repeat_interleave(block_n // dn, -1)[..., :num_blocks(S, dn)]
        block_n = dn
    scale = D ** -0.5 if scale is None else float(scale)
    nqt, nkb = num_blocks(L, block_m), num_blocks(S, block_n)
    d_pad, dv_pad = pad_pow2(D), pad_pow2(DV)
    # Contiguous copies (usually no-ops) so that dq can share query's strides in the kernel.
    query, key, value, grad_out = (t.contiguous() for t in (query, key, value, grad_out))
    delta = (grad_out.float() * out.float()).sum(-1).contiguous()  # [B, H, L]
    lse = lse.contiguous()
    has_mask = attn_mask is not None
    mask4 = mask_as_4d(attn_mask, B, H, L, S) if has_mask else query
    mask_strides = ([st if sz > 1 else 0 for st, sz in zip(mask4.stride(), mask4.shape)]
                    if has_mask else [0, 0, 0, 0])
    common = dict(HAS_MASK=has_mask, MASK_IS_BOOL=has_mask and mask4.dtype == torch.bool,
                  IS_CAUSAL=is_causal, BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad,
                  DV_PAD=dv_pad,
                  DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
                  DOT_UPCAST=INTERPRET and query.dtype == torch.bfloat16,
                  **_bwd_config(block_m, d_pad, dv_pad, dev.type))
    strides = (*query.stride(), *key.stride(), *value.stride(), *mask_strides, *grad_out.stride())

    dq = torch.empty_like(query)
    idx, cnt = _block_lists(kept)
    traceable(_dq_kernel)[(B * H * nqt,)](
        query, key, value, mask4, grad_out, lse, delta, dq, idx, cnt, *strides,
        scale, L, S, D, DV, nqt, nkb, H, H // Hkv, **common)

    dk = torch.empty(B, Hkv, S, D, device=dev, dtype=key.dtype)
    dv = torch.empty(B, Hkv, S, DV, device=dev, dtype=value.dtype)
    idx_t, cnt_t = _block_lists(kept.transpose(-1, -2))
    traceable(_dkv_kernel)[(B * Hkv * nkb,)](
        query, key, value, mask4, grad_out, lse, delta, dk, dv, idx_t, cnt_t, *strides,
        scale, L, S, D, DV, nqt, nkb, H, H // Hkv, **common)
    return dq, dk, dv

