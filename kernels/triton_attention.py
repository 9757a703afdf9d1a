"""Triton kernels of certified block-sparse attention (forward).

Pipeline, all on device with no host synchronisation:
  1. ``_geometry_kernel``: per key block, centroid mu, radius r, box centre c and half-width h,
     stored as fp16 unit vectors plus fp32 norms (so the bound matmuls run on tensor cores).
  2. ``_mask_stats_kernel`` (masks only): per (query tile, key block), the mask's maximum
     (-inf: all masked, so the block is skipped outright).
  3. ``_bounds_kernel``: per query tile and key block, max over rows of the ball bound (min with
     the box bound under AETHER_BOX_BOUND=1) + slack, plus the mask maximum; causal blocks past
     the diagonal get -inf.
  4. ``certificate.plan_visits`` (torch ops): best-first order and the suffix bound mass.
  5. ``_attention_kernel``: online-softmax attention over blocks in that order, stopping once the
     remaining bounded mass is <= eps * the normaliser so far for every row of the tile — either
     in-kernel ("stop" mode) or at a count fixed on device from a short exact probe ("twopass").

The same semantics in plain torch live in ``reference.py``; tests compare the two.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import dense_choice
from .certificate import (
    BOUND_REL_SLACK,
    LOG2E,
    MASK_FLOOR,
    RADIUS_INFLATE,
    UNCERTIFIABLE_MAX_LOG2,
    num_blocks,
    plan_visits,
    stop_threshold_log2,
    use_box_bound,
)

# Globals read inside @triton.jit must be constexpr.
_MASK_FLOOR = tl.constexpr(MASK_FLOOR)
_RADIUS_INFLATE = tl.constexpr(RADIUS_INFLATE)
_UNCERTIFIABLE_MAX_LOG2 = tl.constexpr(UNCERTIFIABLE_MAX_LOG2)

_SCAN_BLOCKS = tl.constexpr(256)  # tail entries per step of VISIT_CERTIFY's search

# How the attention kernel walks a tile's order (its VISIT constexpr).
VISIT_STOP = 0  # check the certificate after every block, stop in-kernel (a while loop)
VISIT_FIXED = 1  # exactly NVisit[tile] blocks (a pipelined loop; the count computed outside)
VISIT_CERTIFY = 2  # a probe of PROBE_BLOCKS, the certified count from it, then the rest

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def traceable(kernel):
    """The kernel as torch.compile can trace it: while tracing, ``wrap_triton`` makes each launch
    a node that Inductor lowers to this very kernel (its source lands in the generated code).
    Otherwise the plain kernel: an eager launch through wrap_triton's higher-order op costs about
    0.2 ms of host time on an H100 (Torch skips it only inside a triton_op's own eager call, not
    in the runtime dense choice's custom op; benchmarks/profile_host.py). The interpreter's
    kernels cannot be traced, only launched. Under ``launches_to`` each launch goes to its hook."""
    hook = getattr(_LAUNCH_HOOK, "fn", None)
    if hook is not None:
        return _HookedLauncher(kernel, hook)
    if INTERPRET or not _tracing_now():
        return kernel
    return torch.library.wrap_triton(kernel)


_LAUNCH_HOOK = threading.local()


@contextlib.contextmanager
def launches_to(hook):
    """In this thread, ``traceable(kernel)[grid](*args, **kwargs)`` calls
    ``hook(kernel, grid, args, kwargs)`` instead of launching (kernels/precompile.py compiles
    each launch of a replay on fake tensors; tests record launches)."""
    previous = getattr(_LAUNCH_HOOK, "fn", None)
    _LAUNCH_HOOK.fn = hook
    try:
        yield
    finally:
        _LAUNCH_HOOK.fn = previous


class _HookedLauncher:
    def __init__(self, kernel, hook):
        self._kernel, self._hook = kernel, hook

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self._hook(self._kernel, grid, args, kwargs)


def _tracing_now() -> bool:
    """Dynamo is tracing, or a dispatch mode (fake, functional, proxy: AOTAutograd, make_fx) is
    active; eager calls on real tensors have neither."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None


SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256


def unsupported_reason(query, key, value) -> str | None:
    """Why the Triton path cannot run these inputs, or None."""
    if query.dtype not in SUPPORTED_DTYPES:
        return f"dtype {query.dtype} not in {SUPPORTED_DTYPES}"
    for name, t in (("query/key", query), ("value", value)):
        d = t.shape[-1]
        if not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
            return f"{name} head dim {d} outside [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}]"
    if query.device.type != "cuda" and not INTERPRET:
        return f"device {query.device.type} (Triton runs on CUDA, or on CPU with TRITON_INTERPRET=1)"
    return None


# ----------------------------------------------------------------------------------------------
# 1. Key-block geometry
# ----------------------------------------------------------------------------------------------
@triton.jit
def _geometry_kernel(
    K, Geo16, GeoNorm,
    stride_kb, stride_kh, stride_kn, stride_kd,
    S, D, n_kb, H_KV,
    BLOCK_N: tl.constexpr, D_PAD: tl.constexpr,
):
    # One program per (batch, kv head, key block). Geo16: [B*Hkv*nKB, 3, D_PAD] fp16 unit vectors
    # (mu, c, h); GeoNorm: [B*Hkv*nKB, 4] fp32 (|mu|, r, |c|, |h|).
    pid = tl.program_id(0).to(tl.int64)
    j = pid % n_kb
    bh = pid // n_kb
    b = bh // H_KV
    h = bh % H_KV
    o_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, D_PAD)
    m_n = o_n < S
    m_d = o_d < D
    p_k = K + b * stride_kb + h * stride_kh + o_n[:, None] * stride_kn + o_d[None, :] * stride_kd
    b_k = tl.load(p_k, mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float32)  # [BN, D]
    count = tl.sum(m_n.to(tl.float32), 0)
    b_mu = tl.sum(b_k, 0) / count  # [D]
    diff = tl.where(m_n[:, None] & m_d[None, :], b_k - b_mu[None, :], 0.0)
    radius = tl.sqrt(tl.max(tl.sum(diff * diff, 1), 0)) * (1.0 + _RADIUS_INFLATE)
    lo = tl.min(tl.where(m_n[:, None], b_k, float("inf")), 0)
    hi = tl.max(tl.where(m_n[:, None], b_k, -float("inf")), 0)
    b_c = tl.where(m_d, (lo + hi) * 0.5, 0.0)
    b_h = tl.where(m_d, (hi - lo) * 0.5, 0.0)
    n_mu = tl.sqrt(tl.sum(b_mu * b_mu, 0))
    n_c = tl.sqrt(tl.sum(b_c * b_c, 0))
    n_h = tl.sqrt(tl.sum(b_h * b_h, 0))
    p_g = Geo16 + pid * 3 * D_PAD + o_d
    tl.store(p_g, (b_mu / tl.where(n_mu > 0, n_mu, 1.0)).to(tl.float16))
    tl.store(p_g + D_PAD, (b_c / tl.where(n_c > 0, n_c, 1.0)).to(tl.float16))
    tl.store(p_g + 2 * D_PAD, (b_h / tl.where(n_h > 0, n_h, 1.0)).to(tl.float16))
    p_n = GeoNorm + pid * 4
    tl.store(p_n, n_mu)
    tl.store(p_n + 1, radius)
    tl.store(p_n + 2, n_c)
    tl.store(p_n + 3, n_h)


# ----------------------------------------------------------------------------------------------
# 2. Mask block statistics
# ----------------------------------------------------------------------------------------------
@triton.jit
def _mask_stats_kernel(
    Mask, MaskMax, NotCausal,
    stride_mb, stride_mh, stride_mm, stride_mn,
    L, S, n_qt, n_kb, H_M, kb_per_prog,
    IS_BOOL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (mask batch, mask head, query tile) and run of kb_per_prog key blocks (a
    # whole row of blocks per program left too few programs to keep the GPU busy on one shared
    # [L, S] mask). NotCausal (zeroed) accumulates the tile's count of entries that differ from a
    # top-left causal mask (keep j <= i): a zero total lets the dense dispatch run the mask as
    # is_causal (HF materialises causal masks).
    pid = tl.program_id(0).to(tl.int64)
    j_lo = tl.program_id(1) * kb_per_prog
    j_hi = tl.minimum(j_lo + kb_per_prog, n_kb)
    t = pid % n_qt
    bh = pid // n_qt
    b = bh // H_M
    h = bh % H_M
    o_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < L
    base = Mask + b * stride_mb + h * stride_mh + o_m[:, None] * stride_mm
    not_causal = tl.zeros([BLOCK_M], tl.int32)
    for j in range(j_lo, j_hi):
        o_n = j * BLOCK_N + tl.arange(0, BLOCK_N)
        valid = m_m[:, None] & (o_n[None, :] < S)
        causal_keep = o_n[None, :] <= o_m[:, None]
        if IS_BOOL:
            keep = tl.load(base + o_n[None, :] * stride_mn, mask=valid, other=0)
            any_keep = tl.max(tl.max((keep != 0).to(tl.int32), 1), 0)
            mx = tl.where(any_keep > 0, 0.0, -float("inf"))
            differs = (keep != 0) != causal_keep
        else:
            add = tl.load(base + o_n[None, :] * stride_mn, mask=valid, other=-float("inf"))
            add = add.to(tl.float32)
            floored = tl.maximum(add, _MASK_FLOOR, propagate_nan=tl.PropagateNan.ALL)  # NaN stays
            # causal as HF writes it: 0 where kept, at most fp16's finfo.min where masked
            differs = tl.where(causal_keep, add != 0.0, ~(add <= -65504.0))
            add = tl.where(add == -float("inf"), add, floored)
            mx = tl.max(tl.max(add, 1), 0)
            # a NaN entry must reach its row (SDPA gives NaN there): never prune its block.
            # Explicit, since whether tl.max propagates NaN differs between backends.
            has_nan = tl.sum(tl.sum((add != add).to(tl.int32), 1), 0) > 0
            mx = tl.where(has_nan, float("inf"), mx)
        not_causal += tl.sum((differs & valid).to(tl.int32), 1)
        tl.store(MaskMax + pid * n_kb + j, mx)
    tl.atomic_add(NotCausal + pid, tl.sum(not_causal, 0))


# ----------------------------------------------------------------------------------------------
# 3. Bounds of each (query tile, key block)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bounds_kernel(
    Q, Geo16, GeoNorm, MaskMax, Bounds,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_xb, stride_xh,  # MaskMax strides over (batch, head); 0 where broadcast
    sm_scale, L, S, D, n_qt, n_kb, H, GROUP,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, SLACK: tl.constexpr, USE_BOX: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_J: tl.constexpr, D_PAD: tl.constexpr,
):
    sm_scale = tl.cast(sm_scale, tl.float32)  # Inductor may pass floats as fp64 or constants
    pid = tl.program_id(0).to(tl.int64)
    t = pid % n_qt
    bh = pid // n_qt
    b = bh // H
    h = bh % H
    g = b * (H // GROUP) + h // GROUP  # flat (batch, kv head)
    o_m = t * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, D_PAD)
    m_m = o_m < L
    p_q = Q + b * stride_qb + h * stride_qh + o_m[:, None] * stride_qm + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_m[:, None] & (o_d[None, :] < D), other=0.0).to(tl.float32)
    b_q = b_q * sm_scale  # q' = scale * q: the bound is then on the score itself, any sign of scale
    qn = tl.sqrt(tl.sum(b_q * b_q, 1))  # [BM]
    q_unit = b_q / tl.where(qn > 0, qn, 1.0)[:, None]
    if USE_BOX:
        qa_unit = tl.abs(q_unit).to(tl.float16)
    q_unit = q_unit.to(tl.float16)
    last_row = tl.minimum(t * BLOCK_M + BLOCK_M, L) - 1
    # Key blocks on the matmul's M side, query rows on its N side: the max over the tile's rows
    # is then along N, which each warp group reduces in registers (a max over M crosses warps
    # through shared memory).
    q_unit_t = tl.trans(q_unit)  # [D_PAD, BM]
    if USE_BOX:
        qa_unit_t = tl.trans(qa_unit)
    for j0 in range(0, n_kb, BLOCK_J):
        o_j = j0 + tl.arange(0, BLOCK_J)
        m_j = o_j < n_kb
        p_g = Geo16 + (g * n_kb + o_j)[:, None] * (3 * D_PAD) + o_d[None, :]
        g_mu = tl.load(p_g, mask=m_j[:, None], other=0.0)
        p_n = GeoNorm + (g * n_kb + o_j) * 4
        n_mu = tl.load(p_n, mask=m_j, other=0.0)
        rad = tl.load(p_n + 1, mask=m_j, other=0.0)
        dot_mu = tl.dot(g_mu, q_unit_t)  # [BJ, BM], fp16 in, fp32 accumulate
        bound = n_mu[:, None] * dot_mu + (rad + SLACK * (n_mu + rad))[:, None]  # the ball
        if USE_BOX:
            g_c = tl.load(p_g + D_PAD, mask=m_j[:, None], other=0.0)
            g_h = tl.load(p_g + 2 * D_PAD, mask=m_j[:, None], other=0.0)
            n_c = tl.load(p_n + 2, mask=m_j, other=0.0)
            n_h = tl.load(p_n + 3, mask=m_j, other=0.0)
            dot_c = tl.dot(g_c, q_unit_t)
            dot_h = tl.dot(g_h, qa_unit_t)
            box = n_c[:, None] * dot_c + n_h[:, None] * dot_h + SLACK * (n_c + n_h)[:, None]
            bound = tl.minimum(bound, box, propagate_nan=tl.PropagateNan.ALL)
        rb = qn[None, :] * bound
        # NaN in q or k: the block must be visited so the NaN reaches the output, as in SDPA;
        # +inf here makes the max say so (one reduction, whatever tl.max does with NaN).
        rb = tl.where(rb != rb, float("inf"), rb)
        rb = tl.where(m_m[None, :], rb, -float("inf"))
        u = tl.max(rb, 1)  # [BJ]
        if HAS_MASK:
            mmax = tl.load(MaskMax + b * stride_xb + h * stride_xh + t * n_kb + o_j, mask=m_j,
                           other=-float("inf"))
            u = u + mmax
        if IS_CAUSAL:
            u = tl.where(o_j * BLOCK_N > last_row, -float("inf"), u)
        tl.store(Bounds + pid * n_kb + o_j, u, mask=m_j)


# ----------------------------------------------------------------------------------------------
# 5. Best-first attention with the certificate's stop
# ----------------------------------------------------------------------------------------------
@triton.jit
def _scores_log2(b_q, b_kt, o_m, o_n, m_m, m_n, m_ptr, stride_mm, stride_mn, sm_scale_log2,
                 HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """Scores of a [BM, BN] tile in log2 units, -inf where masked (causal, mask, padding rows
    and keys). Shared by the forward and both backward kernels, so they see one function."""
    s = tl.dot(b_q, b_kt, input_precision=DOT_PRECISION) * sm_scale_log2
    keep = m_m[:, None] & m_n[None, :]
    if IS_CAUSAL:
        keep = keep & (o_n[None, :] <= o_m[:, None])
    if HAS_MASK:
        p_msk = m_ptr + o_m[:, None] * stride_mm + o_n[None, :] * stride_mn
        if MASK_IS_BOOL:
            keep = keep & (tl.load(p_msk, mask=m_m[:, None] & m_n[None, :], other=0) != 0)
        else:
            add = tl.load(p_msk, mask=m_m[:, None] & m_n[None, :], other=0.0).to(tl.float32)
            floored = tl.maximum(add, _MASK_FLOOR, propagate_nan=tl.PropagateNan.ALL)  # NaN stays
            add = tl.where(add == -float("inf"), add, floored)
            s = s + add * 1.4426950408889634
    return tl.where(keep, s, -float("inf"))


@triton.jit
def _visit_block(
    m_i, l_i, acc, b_q, j, o_m, m_m, o_n0, o_d, o_dv, k_base, v_base, m_base,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, sm_scale_log2, S, D, DV,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
):
    """One key block of online softmax: returns the updated (m_i, l_i, acc); log2 units."""
    o_n = j * o_n0.shape[0] + o_n0
    m_n = o_n < S
    p_k = k_base + o_n[None, :] * stride_kn + o_d[:, None] * stride_kd
    b_kt = tl.load(p_k, mask=m_n[None, :] & (o_d[:, None] < D), other=0.0)  # [D, BN]
    if DOT_UPCAST:
        b_kt = b_kt.to(tl.float32)
    s = _scores_log2(b_q, b_kt, o_m, o_n, m_m, m_n, m_base, stride_mm, stride_mn, sm_scale_log2,
                     HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, DOT_PRECISION)  # [BM, BN]
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    b_p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    p_v = v_base + o_n[:, None] * stride_vn + o_dv[None, :] * stride_vd
    b_v = tl.load(p_v, mask=m_n[:, None] & (o_dv[None, :] < DV), other=0.0)  # [BN, DV]
    if DOT_UPCAST:
        b_v = b_v.to(tl.float32)
    acc = acc * alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _tile_min_log2_norm(m_i, l_i, m_m):
    """The tile's smallest row normaliser log2(Z) so far, rounded through the natural lse as
    ``certified_visit_count`` sees it; rows seeing only floored keys, or NaN, certify nothing."""
    has = l_i > 0
    z = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634,
                 -float("inf")) * 1.4426950408889634
    z = tl.where((z != z) | (z <= _UNCERTIFIABLE_MAX_LOG2), -float("inf"), z)
    return tl.min(tl.where(m_m, z, float("inf")), 0)


@triton.jit
def _first_certified(TailLog2, plan, lo, hi, thr):
    """The first position p in [lo, hi) of the tile's order whose bounded tail mass
    TailLog2[p] <= thr (stopping there is certified), else hi."""
    n = hi
    for c0 in range(lo, hi, _SCAN_BLOCKS):
        o_c = c0 + tl.arange(0, _SCAN_BLOCKS)
        tail = tl.load(TailLog2 + plan + o_c, mask=o_c < hi, other=float("inf"))
        n = tl.minimum(n, tl.min(tl.where((tail <= thr) & (o_c < hi), o_c, hi), 0))
    return n


@triton.jit
def _attention_kernel(
    Q, K, V, Mask, Out, Lse, Kept, Order, TailLog2, NLive, NVisit, Skip,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    sm_scale_log2, stop_log2, EXACT, L, S, D, DV, n_qt, n_kb, H, GROUP,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, DV_PAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, VISIT: tl.constexpr,
    PROBE: tl.constexpr, RECERT: tl.constexpr,
):
    """VISIT_FIXED (1): visit exactly NVisit[tile] blocks of the order (a plain loop that Triton
    can pipeline; the count comes from the certificate, see ``run_attention``). VISIT_STOP (0):
    visit best-first and stop in-kernel once the certificate holds, recording visited blocks in
    Kept. VISIT_CERTIFY (2): visit the first PROBE blocks, derive the certified count from their
    normalisers exactly as ``certified_visit_count`` does (stop_log2 is then log2(margin * eps),
    or EXACT for eps == 0), store it in NVisit and visit the rest: the two-pass result without
    recomputing the probe's blocks. With RECERT > 0 the count is certified again as the visit
    goes on, with the grown normalisers (fewer blocks, never more), and NVisit ends as the count
    visited.
    Skip[0] == 1 means a dense kernel already wrote Out and Lse; return at once. Skip[0] == 2
    (VISIT_CERTIFY): count only, returning once NVisit is stored (the row sample of the runtime
    dense choice). Every launch passes Skip (zero where there is no dense choice), so the probe and
    the pass are one Triton variant: one compile fewer per model."""
    skip = tl.load(Skip)
    if skip == 1:
        return
    sm_scale_log2 = tl.cast(sm_scale_log2, tl.float32)  # Inductor: fp64 or constant floats
    stop_log2 = tl.cast(stop_log2, tl.float32)
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
    p_q = Q + b * stride_qb + h * stride_qh + o_m[:, None] * stride_qm + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_m[:, None] & (o_d[None, :] < D), other=0.0)  # [BM, D]
    if DOT_UPCAST:
        b_q = b_q.to(tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    m_base = Mask + b * stride_mb + h * stride_mh

    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)  # running max, log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    plan = pid * n_kb
    if VISIT != 0:  # a counted loop from `first` to n_visit; VISIT_CERTIFY probes and counts it
        first = 0
        if VISIT == 1:
            n_visit = tl.load(NVisit + pid)
        else:
            n_live = tl.load(NLive + pid)
            n_probe = tl.minimum(n_live, PROBE)
            for p in range(0, n_probe):
                j = tl.load(Order + plan + p).to(tl.int64)
                m_i, l_i, acc = _visit_block(
                    m_i, l_i, acc, b_q, j, o_m, m_m, o_n0, o_d, o_dv, k_base, v_base, m_base,
                    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                    sm_scale_log2, S, D, DV,
                    HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, DOT_PRECISION, DOT_UPCAST)
            thr = tl.where(EXACT != 0, -float("inf"), stop_log2 + _tile_min_log2_norm(m_i, l_i, m_m))
            n_visit = tl.minimum(_first_certified(TailLog2, plan, n_probe, n_kb, thr), n_live)
            tl.store(NVisit + pid, n_visit)
            if skip == 2:
                return
            first = n_probe
        if (VISIT == 2) & (RECERT > 0):
            # Re-certify as the normalisers grow (Z only grows, so the count only shrinks): visit
            # half of what is left (at least RECERT blocks) as one pipelined loop, then search
            # the tail again from there. The probe's blocks hold a small share of a row's mass
            # where it is spread over many blocks (long clustered sequences): a count fixed from
            # them alone visits up to half again as many blocks as the in-kernel stop.
            p0 = first
            while p0 < n_visit:
                p1 = tl.minimum(n_visit, p0 + tl.maximum(RECERT, (n_visit - p0) // 2))
                for p in range(p0, p1):
                    j = tl.load(Order + plan + p).to(tl.int64)
                    m_i, l_i, acc = _visit_block(
                        m_i, l_i, acc, b_q, j, o_m, m_m, o_n0, o_d, o_dv, k_base, v_base, m_base,
                        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                        sm_scale_log2, S, D, DV,
                        HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, DOT_PRECISION, DOT_UPCAST)
                p0 = p1
                thr = tl.where(EXACT != 0, -float("inf"),
                               stop_log2 + _tile_min_log2_norm(m_i, l_i, m_m))
                n_visit = tl.minimum(n_visit, _first_certified(TailLog2, plan, p0, n_visit, thr))
            tl.store(NVisit + pid, n_visit)
        else:
            for p in range(first, n_visit):
                j = tl.load(Order + plan + p).to(tl.int64)
                m_i, l_i, acc = _visit_block(
                    m_i, l_i, acc, b_q, j, o_m, m_m, o_n0, o_d, o_dv, k_base, v_base, m_base,
                    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                    sm_scale_log2, S, D, DV,
                    HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, DOT_PRECISION, DOT_UPCAST)
    else:
        n_live = tl.load(NLive + pid)
        p = n_live * 0
        go = n_live > 0
        while go:
            j = tl.load(Order + plan + p).to(tl.int64)
            m_i, l_i, acc = _visit_block(
                m_i, l_i, acc, b_q, j, o_m, m_m, o_n0, o_d, o_dv, k_base, v_base, m_base,
                stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, sm_scale_log2,
                S, D, DV,
                HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, DOT_PRECISION, DOT_UPCAST)
            tl.store(Kept + plan + j, 1)
            p += 1
            # Stop once every row's remaining bounded mass is <= margin * eps * its normaliser.
            tail = tl.load(TailLog2 + plan + p, mask=p < n_live, other=-float("inf"))
            ok = ((tail <= stop_log2 + m_i + tl.log2(l_i)) & (m_i > _UNCERTIFIABLE_MAX_LOG2)) \
                | (o_m >= L)
            go = (p < n_live) & (tl.min(ok.to(tl.int32), 0) == 0)

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]  # rows with no unmasked key give 0, as SDPA's math
    p_o = Out + b * stride_ob + h * stride_oh + o_m[:, None] * stride_om + o_dv[None, :] * stride_od
    tl.store(p_o, out.to(Out.dtype.element_ty), mask=m_m[:, None] & (o_dv[None, :] < DV))
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634,
                   -float("inf"))
    tl.store(Lse + bh * L + o_m, lse, mask=m_m)


# ----------------------------------------------------------------------------------------------
# 4. Visit plan in one kernel (sort + suffix log-sum-exp + live count)
# ----------------------------------------------------------------------------------------------
@triton.jit
def _logaddexp(a, b):
    m = tl.maximum(a, b)
    inf = (m == -float("inf")) | (m == float("inf"))  # exp(a - m) would be NaN
    safe = tl.where(inf, 0.0, m)
    return tl.where(inf, m, safe + tl.log(tl.exp(a - safe) + tl.exp(b - safe)))


@triton.jit
def _plan_kernel(
    Bounds, Order, TailLog2, NLive,
    L, S, n_qt, n_kb,
    IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NKB_PAD: tl.constexpr,
):
    """certificate.plan_visits for one (batch, head, query tile) row of Bounds, in registers: the
    same order (descending bound, ties by block index, the causal priority block first), the
    suffix log-sum-exp of bounded mass in log2 units, and the live count."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid % n_qt
    o_j = tl.arange(0, NKB_PAD)
    in_row = o_j < n_kb
    bound = tl.load(Bounds + pid * n_kb + o_j, mask=in_row, other=-float("inf"))
    bound = tl.where(bound != bound, float("inf"), bound)  # NaN: must be visited
    key = bound
    if IS_CAUSAL:  # the block holding key t * BLOCK_M, the tile's first row's own position
        first_row = t * BLOCK_M
        prio = (o_j == first_row // BLOCK_N) & (first_row < S) & (bound > -float("inf"))
        key = tl.where(prio, float("inf"), key)
    # Sort (key desc, index asc) as one int64: order-preserving float bits above, the inverted
    # index below, so that a plain descending sort breaks ties by the lower block index.
    bits = key.to(tl.int32, bitcast=True)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    packed = (bits.to(tl.int64) << 32) | (NKB_PAD - 1 - o_j).to(tl.int64)
    packed = tl.sort(packed, descending=True)
    idx = (NKB_PAD - 1 - (packed & 0xFFFFFFFF)).to(tl.int32)
    live_slot = idx < n_kb
    sorted_bound = tl.load(Bounds + pid * n_kb + idx, mask=live_slot, other=-float("inf"))
    sorted_bound = tl.where(sorted_bound != sorted_bound, float("inf"), sorted_bound)
    keys = tl.where(idx == n_kb - 1, S - (n_kb - 1) * BLOCK_N, BLOCK_N).to(tl.float32)
    log_mass = tl.where(live_slot, sorted_bound + tl.log(keys), -float("inf"))
    tail = tl.associative_scan(log_mass, 0, _logaddexp, reverse=True)
    o_p = tl.arange(0, NKB_PAD)
    tl.store(Order + pid * n_kb + o_p, idx, mask=o_p < n_kb)
    tl.store(TailLog2 + pid * n_kb + o_p, tail * 1.4426950408889634, mask=o_p < n_kb)
    tl.store(NLive + pid, tl.sum((bound > -float("inf")).to(tl.int32), 0))


# Rows up to this many key blocks are planned by _plan_kernel (register sort); longer rows use
# the torch ops of certificate.plan_visits. AETHER_PLAN=torch forces the torch ops throughout.
FUSED_PLAN_MAX_BLOCKS = 4096


def plan_visits_fused(bounds, S, block_m, block_n, is_causal, L):
    """``certificate.plan_visits`` as one Triton kernel; None where it does not apply."""
    B, H, nqt, nkb = bounds.shape
    if os.environ.get("AETHER_PLAN", "fused") == "torch" or not is_static(nkb) \
            or nkb > FUSED_PLAN_MAX_BLOCKS or nkb == 0:
        return None
    order = torch.empty(B, H, nqt, nkb, device=bounds.device, dtype=torch.int32)
    tail = torch.empty(B, H, nqt, nkb, device=bounds.device, dtype=torch.float32)
    n_live = torch.empty(B, H, nqt, device=bounds.device, dtype=torch.int32)
    nkb_pad = max(16, triton.next_power_of_2(nkb))
    traceable(_plan_kernel)[(B * H * nqt,)](
        bounds, order, tail, n_live, L, S, nqt, nkb,
        IS_CAUSAL=is_causal, BLOCK_M=block_m, BLOCK_N=block_n, NKB_PAD=nkb_pad,
        **({"num_warps": 4 if nkb_pad <= 1024 else 8} if bounds.device.type == "cuda" else {}))
    return order, tail, n_live


# Every kernel this module launches through wrap_triton (ops.py hands them to _compat for
# Inductor: the access analysis, the early compile).
JIT_KERNELS = (_geometry_kernel, _mask_stats_kernel, _bounds_kernel, _attention_kernel,
               _plan_kernel)
# The pointer arguments each kernel writes (tl.store, atomics), given a launch's arguments by name.
# Inductor would otherwise find them by generating each traced launch's TTIR: 0.4-0.5 s of the
# compile's main thread per kernel variant on the H100's host (_compat.memoise_kernel_access_
# analysis). tests/test_compile_cost.py checks them against that analysis for every launch the op
# makes.
KERNEL_WRITES = {
    "_geometry_kernel": lambda args: ("Geo16", "GeoNorm"),
    "_mask_stats_kernel": lambda args: ("MaskMax", "NotCausal"),
    "_bounds_kernel": lambda args: ("Bounds",),
    "_attention_kernel": lambda args: (
        ("Out", "Lse") + (("NVisit",) if args["VISIT"] == VISIT_CERTIFY else ())
        + (("Kept",) if args["VISIT"] == VISIT_STOP else ())),
    "_plan_kernel": lambda args: ("Order", "TailLog2", "NLive"),
}


_EAGER_CONSTANTS: dict = {}


def _eager_constant(key: tuple, make):
    """``make()``, a device tensor its callers only read, shared by eager calls with the same key
    (the last entry, the device): a few shapes and values recur, and making one is tiny kernels
    and host time on every call. Traced code builds it in the graph, and so does a CUDA-graph
    capture (kernels captured there would run only at replay)."""
    device = key[-1]
    if _tracing_now() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        return make()
    value = _EAGER_CONSTANTS.get(key)
    if value is None:
        if len(_EAGER_CONSTANTS) >= 64:  # do not grow without bound
            _EAGER_CONSTANTS.clear()
        with torch.inference_mode(False):  # shared later outside inference mode too
            value = _EAGER_CONSTANTS[key] = make()
    return value


def read_only_flag(value: int, device) -> torch.Tensor:
    """int32[1] holding ``value``, for kernels that only read it (a Skip flag); shared by eager
    calls (``_eager_constant``) instead of allocated and filled per launch: the runtime dense
    choice's sample is issued from Python."""
    device = torch.device(device)
    return _eager_constant(("flag", value, device),
                           lambda: torch.full((1,), value, device=device, dtype=torch.int32))


def is_static(*sizes) -> bool:
    """True when every size is a plain int (not a SymInt of a dynamic-shape trace)."""
    return all(isinstance(n, int) for n in sizes)


# ----------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------
def _pad_pow2(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def default_blocks(head_dim: int, device_type: str) -> tuple[int, int]:
    """(block_m, block_n) tiles for the attention kernel; geometry uses block_n keys."""
    if device_type != "cuda":  # interpreter: small tiles keep CPU tests quick yet multi-block
        return 16, 16
    if head_dim <= 128:
        return 128, 64
    return 64, 32


def _launch_config(block_m: int, d_pad: int, dv_pad: int, device_type: str):
    if device_type != "cuda":
        return {}
    warps = 8 if block_m >= 128 else 4
    stages = 3 if max(d_pad, dv_pad) <= 128 else 2
    return {"num_warps": warps, "num_stages": stages}


def _bounds_config(d_pad: int, device_type: str, use_box: bool) -> dict:
    """Key blocks per bounds-kernel step and launch shape, chosen from sm_90 compiles (ptxas: no
    register spills, shared memory within 227 KB; the box bound at head dim 256 spills least at
    this shape). With 8 warps the key-block side needs 128 rows for both warp groups to split it,
    which keeps the max over query rows inside each warp group."""
    if device_type != "cuda":
        return {"BLOCK_J": 16}
    if d_pad > 128:
        return {"BLOCK_J": 64, "num_warps": 8 if use_box else 4, "num_stages": 1}
    return {"BLOCK_J": 64 if use_box else 128, "num_warps": 8, "num_stages": 2}


def mask_as_4d(attn_mask: torch.Tensor, B: int, H: int, L: int, S: int) -> torch.Tensor:
    """A broadcastable SDPA mask as a 4-D view [Bm, Hm, L, S] (Bm in {1, B}, Hm in {1, H});
    broadcast row/key dims become stride-0 views, nothing is copied."""
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    Bm = B if m.shape[0] != 1 else 1
    Hm = H if m.shape[1] != 1 else 1
    # Bool masks go to Triton as they are (it loads i1 through a byte pointer); a uint8 view
    # would be free in eager, but Inductor on torch 2.11 cannot lower a bool bitcast.
    return m.expand(Bm, Hm, L, S)


class VisitPlan(NamedTuple):
    """Everything the attention kernel needs besides q, k, v: shapes, tiles and the visit order."""

    B: int
    H: int
    L: int
    S: int
    D: int
    DV: int
    group: int
    scale: float
    block_m: int
    block_n: int
    is_causal: bool
    mask4: torch.Tensor | None  # the mask as a 4-D (broadcast) view
    order: torch.Tensor  # int32 [B, H, nQT, nKB]
    tail_log2: torch.Tensor  # float32 [B, H, nQT, nKB]
    n_live: torch.Tensor  # int32 [B, H, nQT]
    mask_not_causal: torch.Tensor | None = None  # int32 [Bm*Hm*nQT]: entries unlike causal


def plan_attention(query, key, value, attn_mask=None, is_causal=False, scale=None,
                   block_m=None, block_n=None) -> VisitPlan:
    """Stages 1-4: key geometry, mask statistics, bounds, best-first order. No host sync."""
    B, H, L, D = query.shape
    Hkv, S, DV = key.shape[1], key.shape[2], value.shape[-1]
    D, DV = int(D), int(DV)  # head dims pick constexpr tiles: specialise them under dynamic shapes
    dev = query.device
    d_block_m, d_block_n = default_blocks(max(D, DV), dev.type)
    block_m = block_m or d_block_m
    block_n = block_n or d_block_n
    scale = D ** -0.5 if scale is None else float(scale)
    nqt, nkb = num_blocks(L, block_m), num_blocks(S, block_n)
    d_pad = _pad_pow2(D)

    geo16 = torch.empty(B * Hkv * nkb, 3, d_pad, device=dev, dtype=torch.float16)
    geo_norm = torch.empty(B * Hkv * nkb, 4, device=dev, dtype=torch.float32)
    traceable(_geometry_kernel)[(B * Hkv * nkb,)](
        key, geo16, geo_norm, *key.stride(), S, D, nkb, Hkv,
        BLOCK_N=block_n, D_PAD=d_pad)

    mask4 = mask_not_causal = None
    mask_max, mask_strides = query, (0, 0)  # placeholders when there is no mask
    if attn_mask is not None:
        mask4 = mask_as_4d(attn_mask, B, H, L, S)
        Bm, Hm = mask4.shape[:2]
        mask_max = torch.empty(Bm, Hm, nqt, nkb, device=dev, dtype=torch.float32)
        mask_not_causal = torch.zeros(Bm * Hm * nqt, device=dev, dtype=torch.int32)
        traceable(_mask_stats_kernel)[(Bm * Hm * nqt, triton.cdiv(nkb, MASK_STATS_BLOCKS))](
            mask4, mask_max, mask_not_causal, *mask4.stride(), L, S, nqt, nkb, Hm,
            MASK_STATS_BLOCKS,
            IS_BOOL=mask4.dtype == torch.bool, BLOCK_M=block_m, BLOCK_N=block_n)
        mask_strides = (mask_max.stride(0) if Bm > 1 else 0, mask_max.stride(1) if Hm > 1 else 0)

    bounds = torch.empty(B, H, nqt, nkb, device=dev, dtype=torch.float32)
    traceable(_bounds_kernel)[(B * H * nqt,)](
        query, geo16, geo_norm, mask_max, bounds, *query.stride(), *mask_strides,
        scale, L, S, D, nqt, nkb, H, H // Hkv,
        HAS_MASK=mask4 is not None, IS_CAUSAL=is_causal, SLACK=BOUND_REL_SLACK,
        USE_BOX=use_box_bound(),
        BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad,
        **_bounds_config(d_pad, dev.type, use_box_bound()))

    planned = plan_visits_fused(bounds, S, block_m, block_n, is_causal, L)
    order, tail_log2, n_live = planned or plan_visits(bounds, S, block_m, block_n, is_causal, L)
    return VisitPlan(B, H, L, S, D, DV, H // Hkv, scale, block_m, block_n, is_causal, mask4,
                     order, tail_log2, n_live, mask_not_causal)


# Key blocks per program of the mask-statistics kernel.
MASK_STATS_BLOCKS = 16

# Blocks the two-pass forward computes exactly before fixing each tile's visit count.
PROBE_BLOCKS = 8
FORWARD_MODES = ("twopass", "stop")
# VISIT_CERTIFY re-certifies after visiting half of what is left, at least this many blocks,
# where a row of tiles has at least RECERT_MIN_KEY_BLOCKS key blocks. On the H100 (W2 clustered,
# benchmarks/bench_recert.py at 1cc4367) the pass took 20% less time at 128K (kept 3.3% -> 2.5%)
# and 5% less at 64K, but 2.6% more at 32K and the same at 16K, where the probe's blocks already
# hold most of each row's mass and the extra loop boundaries cost more than they save.
RECERT_BLOCKS = 8
RECERT_MIN_KEY_BLOCKS = 1024


def recert_blocks(n_key_blocks=None) -> int:
    """VISIT_CERTIFY's re-certification step for a row of ``n_key_blocks`` key blocks: 0 (the
    count fixed from the probe alone) below RECERT_MIN_KEY_BLOCKS or where the count is symbolic,
    else ``RECERT_BLOCKS``. AETHER_RECERT_BLOCKS sets the step (0: off) for every length. Read when
    a launch is issued or traced."""
    env = os.environ.get("AETHER_RECERT_BLOCKS")
    if env is not None:
        return int(env)
    if n_key_blocks is None or not is_static(n_key_blocks) or n_key_blocks < RECERT_MIN_KEY_BLOCKS:
        return 0
    return RECERT_BLOCKS


def heads_interleaved(query) -> bool:
    """Whether the query is a per-head view of [B, L, H, D] memory (a projection split into heads
    and transposed, as HF and nanoGPT write it): its head stride is below its row stride."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return query.shape[1] > 1 and statically_known_true(query.stride(1) < query.stride(2))


def out_strides(query, dv: int, interleaved: bool | None = None) -> tuple:
    """Strides of the op's [B, H, L, dv] output: the memory order SDPA's fused kernels give this
    query, [B, L, H, dv] seen through a transpose where the heads are interleaved
    (``interleaved``, by default ``heads_interleaved(query)``), else contiguous. The model's
    reshape back to [B, L, H * dv] is then free, and a dense kernel's output needs no copy."""
    B, H, L, _ = query.shape
    if heads_interleaved(query) if interleaved is None else interleaved:
        return (L * H * dv, dv, H * dv, 1)
    return (H * L * dv, L * dv, dv, 1)


def new_out(query, dv: int, interleaved: bool | None = None) -> torch.Tensor:
    """An uninitialised output of the op, strided as ``out_strides``."""
    B, H, L, _ = query.shape
    return query.new_empty_strided((B, H, L, dv), out_strides(query, dv, interleaved))


def as_out_layout(out, query, interleaved: bool | None = None) -> torch.Tensor:
    """``out`` itself where its layout is ``out_strides``' (size-1 dims aside), else a copy that
    has it."""
    want = out_strides(query, out.shape[-1], interleaved)
    if any(n > 1 and st != w for n, st, w in zip(out.shape, out.stride(), want)):
        return new_out(query, out.shape[-1], interleaved).copy_(out)
    return out


def _launch_attention(query, key, value, plan: VisitPlan, eps: float, n_visit, kept,
                      out=None, lse=None, skip=None, certify=False):
    """One attention pass; writes into ``out``/``lse`` when given (skipped entirely where
    ``skip[0]`` is set), else into new buffers. n_visit: the per-tile counts to visit
    (VISIT_FIXED), None to stop in-kernel (VISIT_STOP), or with ``certify`` the int32 [B, H, nQT]
    buffer that receives the certified counts (VISIT_CERTIFY)."""
    B, H, L, S, D, DV = plan.B, plan.H, plan.L, plan.S, plan.D, plan.DV
    dev = query.device
    nqt, nkb = plan.order.shape[-2], plan.order.shape[-1]
    d_pad, dv_pad = _pad_pow2(D), _pad_pow2(DV)
    mask4 = plan.mask4
    has_mask = mask4 is not None
    mask_elem_strides = ([st if sz > 1 else 0 for st, sz in zip(mask4.stride(), mask4.shape)]
                         if has_mask else [0, 0, 0, 0])
    if out is None:
        out = new_out(query, DV)
        lse = torch.empty(B, H, L, device=dev, dtype=torch.float32)
    if skip is None:  # no dense choice: the pass always runs
        skip = read_only_flag(0, dev)
    # A finite stand-in for -inf (eps == 0): scalars reach Inductor's generated code as literals.
    # VISIT_CERTIFY reads eps == 0 from EXACT instead.
    stop_log2 = max(stop_threshold_log2(eps), MASK_FLOOR)
    visit = VISIT_CERTIFY if certify else VISIT_FIXED if n_visit is not None else VISIT_STOP
    traceable(_attention_kernel)[(B * H * nqt,)](
        query, key, value, mask4 if has_mask else query, out, lse, kept if kept is not None else lse,
        plan.order, plan.tail_log2, plan.n_live, n_visit if n_visit is not None else plan.n_live,
        skip,
        *query.stride(), *key.stride(), *value.stride(), *mask_elem_strides, *out.stride(),
        plan.scale * LOG2E, stop_log2, int(eps <= 0.0), L, S, D, DV, nqt, nkb, H, plan.group,
        HAS_MASK=has_mask, MASK_IS_BOOL=has_mask and mask4.dtype == torch.bool,
        IS_CAUSAL=plan.is_causal, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, D_PAD=d_pad,
        DV_PAD=dv_pad, DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        # Triton's interpreter computes bf16 tl.dot wrongly; upcast there (CPU tests only).
        DOT_UPCAST=INTERPRET and query.dtype == torch.bfloat16, VISIT=visit, PROBE=PROBE_BLOCKS,
        RECERT=recert_blocks(nkb) if certify else 0,
        **_launch_config(plan.block_m, d_pad, dv_pad, dev.type))
    return out, lse


def certified_visit_count(plan: VisitPlan, probe_lse: torch.Tensor, probe: torch.Tensor, eps):
    """Per tile, how many blocks of the order to visit, from normalisers measured on the probe.

    The probe computed the first ``probe`` blocks exactly: Z_probe <= Z of any superset, so
    stopping at the first position p >= probe with tail[p] <= log2(margin * eps * min_rows
    Z_probe) certifies every row. Tensor ops only (no host sync)."""
    nqt, nkb = plan.order.shape[-2], plan.order.shape[-1]
    z = (probe_lse * LOG2E).masked_fill(torch.isnan(probe_lse), -float("inf"))
    z = z.masked_fill(z <= UNCERTIFIABLE_MAX_LOG2, -float("inf"))  # rows that saw only floored keys
    # Per-tile minimum over its rows; a scatter rather than padding to whole tiles, so symbolic
    # lengths (dynamic shapes) add no guard on L % block_m.
    tile = (torch.arange(plan.L, device=z.device) // plan.block_m).expand_as(z)
    z_min = torch.full((plan.B, plan.H, nqt), float("inf"), device=z.device).scatter_reduce(
        -1, tile, z, reduce="amin")
    thr = stop_threshold_log2(eps) + z_min  # [B, H, nQT]
    can_stop = plan.tail_log2 <= thr.unsqueeze(-1)
    can_stop &= torch.arange(nkb, device=z.device) >= probe.unsqueeze(-1)
    first = torch.where(can_stop.any(-1), can_stop.to(torch.int8).argmax(-1),
                        torch.full_like(plan.n_live, nkb, dtype=torch.int64))
    return torch.minimum(first, plan.n_live.long()).to(torch.int32)


# Above this fraction of its live blocks a call is cheaper on the fastest dense kernel: measured
# on an H100, the sparse kernel costs ~1.5x cuDNN's time per block (benchmarks/results), so it
# pays below ~0.65 of the blocks. Deciding needs a device-to-host read, never made during CUDA-graph
# capture: there the gate runs the sparse path and the precheck keeps its site's earlier choice.
DENSE_FRACTION = 0.6


def dense_eligible(query, key, value, attn_mask, is_causal: bool) -> bool:
    """Whether a dense SDPA kernel computes exactly this call: fp16/bf16 on CUDA, no mask, causal
    only for L == S (where every backend's alignment agrees), flash-compatible head dims. GQA is
    served natively where the kernel checks out, else from expanded k and v
    (``dense_sdpa_with_lse``).
    Static metadata only, so it is safe to ask while tracing."""
    return attn_mask is None and _dense_kernel_fits(query, key, value, is_causal)


def _dense_kernel_fits(query, key, value, is_causal: bool) -> bool:
    L, S = query.shape[-2], key.shape[-2]
    D, DV = query.shape[-1], value.shape[-1]
    return (query.device.type == "cuda" and query.dtype in (torch.float16, torch.bfloat16)
            and D == DV and D % 8 == 0 and D <= 256 and (not is_causal or L == S))


def _sdpa_picks_cudnn(query, key, value, is_causal: bool, scale: float) -> bool:
    """Whether SDPA's own dispatcher would run cuDNN here: the choice Inductor's default compile
    bakes into a traced graph. SDPA asks its CUDA selector directly (from tensor metadata), so this
    does too: through the dispatcher, traced (functional, fake) tensors reach the meta kernel, which
    answers "math". False if it cannot say."""
    from torch.nn.attention import SDPBackend

    op = torch.ops.aten._fused_sdp_choice.default
    args = (query, key, value, None, 0.0, is_causal)
    for call in (lambda: op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args,
                                       scale=scale),
                 lambda: op(*args, scale=scale)):
        try:
            return int(call()) == int(SDPBackend.CUDNN_ATTENTION)
        except Exception:  # noqa: BLE001  (an old build, symbolic sizes: try the next, else flash)
            continue
    return False


def _flash_sdpa(query, key, value, is_causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention(
        query, key, value, 0.0, is_causal, False, scale=scale)


def _cudnn_sdpa(query, key, value, is_causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, key, value, None, True, 0.0, is_causal, False, scale=scale)


def dense_sdpa_with_lse(query, key, value, is_causal: bool, scale: float, try_cudnn=True):
    """Dense attention and its natural-log log-sum-exp from the fastest SDPA kernel available
    (cuDNN, then flash), for inputs where ``dense_eligible`` holds; None if neither runs.

    try_cudnn: True tries cuDNN and falls back on a RuntimeError (eager, where the error can be
    caught); "if_sdpa_picks" (traced graphs, where it cannot) uses cuDNN only where SDPA's own
    dispatcher would, else flash. GQA (fewer kv heads): the kernel reads k and v as they are where
    ``_native_gqa`` has checked that it can, else they are expanded first (a copy)."""
    B, H, L, _ = query.shape
    group = H // key.shape[1]
    expanded = None
    if try_cudnn == "if_sdpa_picks":  # asked as the default compile asks: with k, v expanded
        if group > 1:
            expanded = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        try_cudnn = _sdpa_picks_cudnn(query, *(expanded or (key, value)), is_causal, scale)
    for run in ((_cudnn_sdpa, _flash_sdpa) if try_cudnn else (_flash_sdpa,)):
        kv = (key, value)
        if group > 1 and not _native_gqa(run, query, group):
            if expanded is None:  # query head h reads kv head h // group, as SDPA's enable_gqa
                expanded = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
            kv = expanded
        try:
            res = run(query, *kv, is_causal, scale)
        except RuntimeError:  # backend unavailable for these inputs / this build
            continue
        return as_out_layout(res[0], query), res[1].reshape(B, H, L).float().contiguous()
    return None


_NATIVE_GQA: dict = {}


def _native_gqa(run, query, group: int) -> bool:
    """Whether SDPA kernel ``run`` computes GQA from unexpanded k and v here. Checked once per
    kernel, device, dtype, head dim and group on a small problem against the expanded call, since
    a backend without a head-count check could read the wrong heads silently. Never while
    tracing or capturing a CUDA graph (then: expand)."""
    from torch._subclasses.fake_tensor import is_fake

    D = query.shape[-1]
    key = (run.__name__, query.device, query.dtype, D, group)
    if key not in _NATIVE_GQA:
        if is_fake(query) or torch.cuda.is_current_stream_capturing():
            return False
        gen = torch.Generator(device=query.device).manual_seed(0)
        q = torch.randn(1, 2 * group, 256, D, generator=gen, device=query.device).to(query.dtype)
        k, v = (torch.randn(1, 2, 256, D, generator=gen, device=query.device).to(query.dtype)
                for _ in range(2))
        try:
            native = run(q, k, v, False, D ** -0.5)
            expanded = run(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), False,
                           D ** -0.5)
            ok = all(torch.allclose(a.float(), b.float(), atol=1e-3, rtol=1e-3)
                     for a, b in zip(native[:2], expanded[:2]))
        except RuntimeError:
            ok = False
        _NATIVE_GQA[key] = ok
    return _NATIVE_GQA[key]


def _dense_choice_buffers(query, value):
    """(out, lse) for a dense choice to fill, and whether it may read the device now: on CUDA and
    not while a CUDA graph is being captured."""
    B, H, L, _ = query.shape
    out = new_out(query, value.shape[-1])
    lse = torch.empty(B, H, L, device=query.device, dtype=torch.float32)
    can_read = query.device.type == "cuda" and not torch.cuda.is_current_stream_capturing()
    return out, lse, can_read


def _new_flag(query) -> torch.Tensor:
    """A fresh int32[1] Skip flag holding 0, for a dense choice to set."""
    return torch.zeros(1, device=query.device, dtype=torch.int32)


def dense_gate(query, key, value, n_visit, n_live, is_causal: bool, scale: float,
               fraction: float, mask_not_causal=None):
    """The runtime sparse/dense choice: (out, lse, use_dense int32[1]).

    Reads the certified visit count on the host (the one sync of the forward); when it exceeds
    ``fraction`` of the live blocks, runs dense SDPA into (out, lse) and sets use_dense, and the
    sparse pass that follows returns at once. With a mask (``mask_not_causal``: per-tile counts of
    entries unlike a causal mask, read in the same sync) the dense kernel runs only where the mask
    is exactly causal, as is_causal. During CUDA-graph capture no read is possible: use_dense
    stays 0, so the sparse path runs and replays stay correct."""
    out, lse, can_read = _dense_choice_buffers(query, value)
    use_dense = _new_flag(query)
    if not can_read:
        return out, lse, use_dense
    stats = [n_visit.sum(), n_live.sum()]
    if mask_not_causal is not None:
        stats.append(mask_not_causal.sum())
    visit, live, *not_causal = torch.stack(stats).tolist()
    if visit > fraction * live and not any(not_causal):
        causal = is_causal or mask_not_causal is not None  # the mask is exactly causal
        dense = dense_sdpa_with_lse(query, key, value, causal, scale)
        if dense is not None:
            out, lse = dense
            use_dense.fill_(1)
    return out, lse, use_dense


def _live_for_gate(plan: VisitPlan) -> torch.Tensor:
    """Live blocks per tile as the dense choice should count them. A causal mask materialised
    with finfo.min (HF) leaves the blocks above the diagonal live (finite, negligible bounds), so
    with a mask the count is of the causal blocks: the work a dense causal kernel does, and the
    only case where the mask runs dense (see ``dense_gate``)."""
    if plan.mask_not_causal is None:
        return plan.n_live
    nqt, nkb = plan.order.shape[-2], plan.order.shape[-1]
    causal = causal_block_map(plan.L, nqt, nkb, plan.block_m, plan.block_n, plan.n_live.device)
    return causal.sum(-1).to(plan.n_live.dtype).expand_as(plan.n_live)


def causal_block_map(L, nqt: int, nkb: int, block_m: int, block_n: int, device) -> torch.Tensor:
    """[nqt, nkb] bool: the key blocks a top-left causal query tile reaches (a key at or before
    its last row)."""
    last_row = torch.clamp((torch.arange(nqt, device=device) + 1) * block_m, max=L) - 1
    return (torch.arange(nkb, device=device) * block_n)[None, :] <= last_row[:, None]


def _probe_visit_count(query, key, value, plan: VisitPlan, eps: float) -> torch.Tensor:
    """Two-pass's first pass: an exact probe over each tile's best blocks, turned on device into
    the certified visit count per tile."""
    probe = torch.clamp(plan.n_live, max=PROBE_BLOCKS)
    _, probe_lse = _launch_attention(query, key, value, plan, eps, probe, None)
    return certified_visit_count(plan, probe_lse, probe, eps)


# Eager calls without a mask first plan a sample of their query rows: on data with nothing to
# skip that decides "dense" for a small part of the bounds and probe work of the full plan
# (issue 6's W1). Non-causal rows see every key wherever they sit, so every 16th tile (at least
# 4 tiles) is a fair sample. A causal sample must be a prefix (top-left alignment), which sees
# only its own keys, and with few blocks per tile the probe alone covers most of them: it takes
# 1/8 of the rows and at least 32 key blocks, and leans towards dense on short prefixes, which
# costs at most the dense time.
SAMPLE_ROW_FRACTION = 16
SAMPLE_MIN_TILES = 4
SAMPLE_CAUSAL_ROW_FRACTION = 8
SAMPLE_CAUSAL_MIN_BLOCKS = 32


def _row_sample(query, key, value, is_causal: bool, block_m: int, block_n: int):
    """(q, k, v) of a sample of this call's query rows, or None where the sample would not be
    much smaller than the call. The sampled rows are exactly rows of this call: non-causal,
    whole tiles spread over the sequence, seeing every key; causal (top-left, L == S), a prefix
    and the keys up to its end. No mask."""
    B, H, L, D = query.shape
    if is_causal:
        rows = triton.cdiv(max(L // SAMPLE_CAUSAL_ROW_FRACTION, SAMPLE_CAUSAL_MIN_BLOCKS * block_n),
                           block_m) * block_m
        if 2 * rows > L:
            return None
        return query[:, :, :rows], key[:, :, :rows], value[:, :, :rows]
    tiles = L // block_m  # every SAMPLE_ROW_FRACTION-th whole tile, spread over the sequence
    step = max(1, tiles // max(SAMPLE_MIN_TILES, tiles // SAMPLE_ROW_FRACTION))
    if 2 * triton.cdiv(tiles, step) > tiles:
        return None
    q = query[:, :, :tiles * block_m].reshape(B, H, tiles, block_m, D)[:, :, ::step]
    return q.reshape(B, H, -1, D), key, value


def sample_visit_counts(query, key, value, is_causal: bool, scale, eps: float, block_m: int,
                        block_n: int, whole_if_no_sample: bool = False) -> torch.Tensor | None:
    """int64[2] on the device, (certified visits, live blocks) of a sample of the rows, from its
    plan and probe; no host read. Where no smaller sample exists: the whole call's counts if
    ``whole_if_no_sample``, else None."""
    sample = _row_sample(query, key, value, is_causal, block_m, block_n)
    if sample is None:
        if not whole_if_no_sample:
            return None
        sample = (query, key, value)
    plan = plan_attention(*sample, None, is_causal, scale, block_m, block_n)
    per_tile = torch.stack([certified_counts(*sample, plan, eps), plan.n_live])
    return per_tile.sum((1, 2, 3), dtype=torch.int64)


def certified_counts(query, key, value, plan: VisitPlan, eps: float) -> torch.Tensor:
    """int32 [B, H, nQT]: each tile's certified visit count, as ``_probe_visit_count`` computes it,
    from one count-only launch of the attention kernel (VISIT_CERTIFY, Skip 2): the probe and the
    count on device, nothing after. A handful of host calls where the probe and
    ``certified_visit_count`` take about thirty; the row sample is issued from Python every call."""
    n_visit = torch.empty(plan.B, plan.H, plan.order.shape[-2], device=query.device,
                          dtype=torch.int32)
    count_only = read_only_flag(2, query.device)
    _launch_attention(query, key, value, plan, eps, n_visit, None, skip=count_only, certify=True)
    return n_visit


def sampled_visit_fraction(query, key, value, is_causal: bool, scale, eps: float,
                           block_m: int, block_n: int) -> float | None:
    """The certified visit fraction (visited / live blocks) of a sample of this call's rows
    (``sample_visit_counts``), or None where no smaller sample exists or nothing is live. One
    host read; the choice it informs is about speed only."""
    counts = sample_visit_counts(query, key, value, is_causal, scale, eps, block_m, block_n)
    if counts is None:
        return None
    visit, live = counts.tolist()
    return visit / live if live else None


def precheck_choice(query, key, value, is_causal: bool, scale: float, eps: float, block_m: int,
                    block_n: int, fraction: float, site: int = -1):
    """Compiled graphs' dense choice, made before planning: (out, lse, dense). Where the certified
    visit of a sample of the rows (``sample_visit_counts``; the whole call where no smaller sample
    exists) exceeds ``fraction`` of its live blocks, runs the fastest dense SDPA kernel into out and
    lse. The sample is of an earlier call of this ``site`` (``dense_choice``: its first call, then
    every 16th, read without a sync). During CUDA-graph capture nothing is sampled or read: the
    site's choice so far is captured (sparse if none). No mask; ``dense_eligible`` inputs."""
    out, lse, can_read = _dense_choice_buffers(query, value)
    if query.device.type != "cuda":
        return out, lse, False
    sample = functools.partial(sample_visit_counts, query, key, value, is_causal, scale, eps,
                               block_m, block_n, whole_if_no_sample=True)
    site_key = (site, is_causal, eps, fraction, *dense_choice.shape_bucket(query, key))
    if dense_choice.choose_dense(site_key, sample if can_read else None, fraction,
                                 lagged=dense_choice.lag_enabled()):
        # While capturing, a failed cuDNN attempt could not be caught: ask SDPA's selector.
        dense = dense_sdpa_with_lse(query, key, value, is_causal, scale,
                                    try_cudnn=True if can_read else "if_sdpa_picks")
        if dense is not None:
            return *dense, True
    return out, lse, False


def gate_applies(query, key, value, attn_mask, is_causal: bool, dense_fraction) -> bool:
    """Whether the twopass forward puts the dense gate between its probe and its pass: a dense
    crossover is set and a dense kernel computes the call exactly, or the mask may turn out to be
    exactly causal (L == S; ``dense_gate`` then runs the dense causal kernel)."""
    return dense_fraction is not None and (
        dense_eligible(query, key, value, attn_mask, is_causal)
        or (attn_mask is not None and query.shape[-2] == key.shape[-2]
            and _dense_kernel_fits(query, key, value, True)))


def prepare_pass(query, key, value, attn_mask, is_causal: bool, scale: float, eps: float,
                 block_m: int, block_n: int, fraction, precheck: bool, gated: bool,
                 site: int = -1):
    """Everything of the twopass forward before its attention pass, run eagerly: the body of the
    opaque op ``aether::prepare_pass`` that compiled graphs call, so that Inductor compiles one
    Triton launch per attention site (the pass, ``attention_after_prepare``) where it compiled
    five to six (compile time, issue 5); the kernels here launch directly when the graph runs.

    precheck (no mask, ``dense_eligible``): the lagged dense choice of ``precheck_choice`` first;
    dense leaves an empty plan (identity order, nothing live) and skip = 1. gated
    (``gate_applies``, no precheck): plan, probe and ``dense_gate``; n_visit is the certified count,
    or every live block where the gate went dense. Otherwise: the plan.
    Returns (out, lse, order, tail_log2, n_live, n_visit, skip int32[1]), all new tensors; out and
    lse hold the dense answer where skip is 1, else the pass fills them."""
    B, H, L, _ = query.shape
    dev = query.device
    nqt, nkb = num_blocks(L, block_m), num_blocks(key.shape[-2], block_n)
    n_visit = None
    if precheck:
        out, lse, dense = precheck_choice(query, key, value, is_causal, scale, eps, block_m,
                                          block_n, fraction, site)
        skip = torch.full((1,), int(dense), device=dev, dtype=torch.int32)
        if dense:
            # The pass returns at once and its kept map is every live block (``torch.where`` in
            # ``attention_after_prepare``); only the order is read, by the map of the branch not
            # taken, so it must be valid. The rest stays unwritten (no kernels).
            order = torch.empty(B, H, nqt, nkb, device=dev, dtype=torch.int32)
            order.copy_(_eager_constant(("arange", nkb, dev), lambda: torch.arange(
                nkb, device=dev, dtype=torch.int32)))
            tiles = torch.empty(B, H, nqt, device=dev, dtype=torch.int32)
            return (out, lse, order, torch.empty(order.shape, device=dev), tiles,
                    torch.empty_like(tiles), skip)
        plan = plan_attention(query, key, value, None, is_causal, scale, block_m, block_n)
    else:
        plan = plan_attention(query, key, value, attn_mask, is_causal, scale, block_m, block_n)
        if gated:
            out, lse, n_visit, skip = _probe_and_gate(query, key, value, plan, eps, fraction)
        else:
            out, lse, _ = _dense_choice_buffers(query, value)
            skip = _new_flag(query)
    if n_visit is None:
        n_visit = torch.zeros(B, H, nqt, device=dev, dtype=torch.int32)
    return out, lse, plan.order, plan.tail_log2, plan.n_live, n_visit, skip


def new_prepared(query, key, value, block_m: int, block_n: int, out_interleaved: bool):
    """New buffers shaped as ``prepare_pass``'s outputs (the op's fake; the precompile replay)."""
    B, H, L, _ = query.shape
    nqt, nkb = num_blocks(L, block_m), num_blocks(key.shape[-2], block_n)
    tiles = query.new_empty(B, H, nqt, dtype=torch.int32)
    return (new_out(query, value.shape[-1], out_interleaved),
            query.new_empty(B, H, L, dtype=torch.float32),
            query.new_empty(B, H, nqt, nkb, dtype=torch.int32),
            query.new_empty(B, H, nqt, nkb, dtype=torch.float32),
            tiles, torch.empty_like(tiles), query.new_empty(1, dtype=torch.int32))


def attention_after_prepare(query, key, value, attn_mask, is_causal: bool, scale: float,
                            eps: float, block_m: int, block_n: int, prepared, precheck: bool,
                            gated: bool):
    """The pass after ``prepare_pass`` (traced: the one Triton launch of a compiled site):
    (out, lse, kept). Gated: a fixed-count pass over n_visit; otherwise one launch that probes,
    certifies and finishes (VISIT_CERTIFY). Either returns at once where skip is 1."""
    out, lse, order, tail_log2, n_live, n_visit, skip = prepared
    B, H, L, D = query.shape
    Hkv, S, DV = key.shape[1], key.shape[2], value.shape[-1]
    mask4 = None if attn_mask is None else mask_as_4d(attn_mask, B, H, L, S)
    plan = VisitPlan(B, H, L, S, int(D), int(DV), H // Hkv, scale, block_m, block_n, is_causal,
                     mask4, order, tail_log2, n_live, None)
    out, lse = _launch_attention(query, key, value, plan, eps, n_visit, None, out, lse, skip,
                                 certify=not gated)
    kept = _kept_map(plan, n_visit)
    if precheck:
        live = all_live_blocks(L, S, block_m, block_n, is_causal, B, H, query.device)
        kept = torch.where(skip.bool(), live, kept)
    return out, lse, kept


def run_attention(query, key, value, plan: VisitPlan, eps: float, mode: str | None = None,
                  dense_fraction: float | None = None):
    """Stage 5: certified best-first attention. Returns (out, lse, kept).

    mode "twopass" (default): a probe computes the first PROBE_BLOCKS blocks of every tile, the
    visit count follows from the certificate on device, then a pipelined fixed-count loop visits
    the rest. Without a dense gate that is one launch (VISIT_CERTIFY); with one, the gate sits
    between a probe launch and a fixed-count pass that recomputes the probe's blocks.
    mode "stop": one pass whose loop stops in-kernel as soon as the certificate holds (visits the
    fewest blocks, but the data-dependent loop is not software-pipelined).
    dense_fraction: if the certified visit would cover more than this fraction of the live
    blocks, run the fastest dense SDPA kernel instead (twopass, ``gate_applies``); ``kept`` then
    marks every live block."""
    mode = forward_mode(mode)
    nqt, nkb = plan.order.shape[-2], plan.order.shape[-1]
    if mode == "stop":
        kept = torch.zeros(plan.B, plan.H, nqt, nkb, device=query.device, dtype=torch.uint8)
        out, lse = _launch_attention(query, key, value, plan, eps, None, kept)
        return out, lse, kept != 0  # a compare, not a bool view: Inductor 2.11 cannot bitcast to bool
    if not gate_applies(query, key, value, plan.mask4, plan.is_causal, dense_fraction):
        # probe, certified count and the rest in one launch
        n_visit = torch.zeros(plan.B, plan.H, nqt, device=query.device, dtype=torch.int32)
        out, lse = _launch_attention(query, key, value, plan, eps, n_visit, None, certify=True)
        return out, lse, _kept_map(plan, n_visit)
    # The dense gate needs the certified count before the pass: probe, gate, fixed-count pass.
    out, lse, n_visit, use_dense = _probe_and_gate(query, key, value, plan, eps, dense_fraction)
    out, lse = _launch_attention(query, key, value, plan, eps, n_visit, None, out, lse, use_dense)
    return out, lse, _kept_map(plan, n_visit)


def _probe_and_gate(query, key, value, plan: VisitPlan, eps: float, fraction: float):
    """The gated forward up to its pass: probe, certified count, ``dense_gate``. Returns (out,
    lse, n_visit, use_dense int32[1]); n_visit counts every live block where the gate went dense
    (the pass then returns at once and the kept map is the dense one)."""
    n_visit = _probe_visit_count(query, key, value, plan, eps)
    out, lse, use_dense = dense_gate(query, key, value, n_visit, _live_for_gate(plan),
                                     plan.is_causal, plan.scale, fraction, plan.mask_not_causal)
    return out, lse, torch.where(use_dense.bool(), plan.n_live, n_visit), use_dense


def forward_mode(mode: str | None = None) -> str:
    """The forward's mode: ``mode``, else AETHER_FORWARD_MODE, else "twopass"."""
    mode = mode or os.environ.get("AETHER_FORWARD_MODE", "twopass")
    if mode not in FORWARD_MODES:
        raise ValueError(f"AETHER_FORWARD_MODE must be one of {FORWARD_MODES}, got {mode!r}")
    return mode


def _kept_map(plan: VisitPlan, n_visit: torch.Tensor) -> torch.Tensor:
    """[B, H, nQT, nKB] bool: the first n_visit blocks of each tile's order."""
    nqt, nkb = plan.order.shape[-2], plan.order.shape[-1]
    visited = torch.arange(nkb, device=n_visit.device) < n_visit.unsqueeze(-1)
    kept = torch.zeros(plan.B, plan.H, nqt, nkb, device=n_visit.device, dtype=torch.bool)
    return kept.scatter(-1, plan.order.long(), visited)


def all_live_blocks(L, S, block_m, block_n, is_causal, B, H, device) -> torch.Tensor:
    """kept map of dense attention without a mask: every block, or the causal ones (L == S)."""
    nqt, nkb = num_blocks(L, block_m), num_blocks(S, block_n)
    if not is_causal:
        return torch.ones(B, H, nqt, nkb, dtype=torch.bool, device=device)
    live = _cached_causal_block_map(L, nqt, nkb, block_m, block_n, device)
    return live.expand(B, H, nqt, nkb).clone(memory_format=torch.contiguous_format)


def _cached_causal_block_map(L, nqt, nkb, block_m, block_n, device) -> torch.Tensor:
    """``causal_block_map``, shared by eager calls of one shape (``_eager_constant``). Building it
    is six tiny kernels, and W1's 4K causal call, which cuDNN runs in 0.16 ms on an H100, took
    0.18 ms through the op's static dense path. Callers must not write to it."""
    if not isinstance(L, int):
        return causal_block_map(L, nqt, nkb, block_m, block_n, device)
    return _eager_constant(("causal", L, nqt, nkb, block_m, block_n, torch.device(device)),
                           lambda: causal_block_map(L, nqt, nkb, block_m, block_n, device))


def triton_attention(query, key, value, attn_mask=None, is_causal=False, scale=None,
                     enable_gqa=False, eps=0.0, block_m=None, block_n=None, mode=None,
                     dense_fraction=None):
    """Certified block-sparse attention on the Triton path, eager (compiled graphs split it into
    ``prepare_pass`` and ``attention_after_prepare``).

    Same contract as ``reference.reference_attention``: returns (out, lse, kept)."""
    plan = plan_attention(query, key, value, attn_mask, is_causal, scale, block_m, block_n)
    return run_attention(query, key, value, plan, eps, mode, dense_fraction)
