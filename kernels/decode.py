"""Certified decode: a few query rows per sequence (a generation step) against a long key/value
cache, reading only the key blocks whose softmax mass could matter.

**The key summary** (``KeySummary``, kept beside the cache and updated where new keys land): the
keys quantised to int8 per channel and per group of ``QUANT_GROUP`` positions (an affine code:
center c and step s per group and channel). Every key's exact score is then bracketed,

    q·k ∈ q·c + (q⊙s)·code ± Σ_c |q_c| e_c,    e_c = s_c / 2 + rounding slack,

so one read of the codes (a quarter of the bytes of K and V in 16 bits) bounds every key's score
from above and below. A bound per key beats any bound per block: a block's skipped mass is
bounded key by key, Σ_j exp(U_j), not as n · exp(block max).

**A step** (no host reads, so it can be captured in a CUDA graph):

1. ``decode_bounds`` (Triton): per query row and block of ``BLOCK`` keys, log Σ_j exp(U_j) (an
   upper bound on the block's mass) and log Σ_j exp(L_j) (a lower bound).
2. ``select_blocks`` (Triton: each row's threshold in its own program, then the union over a KV
   head's rows; a sort in torch where the kernels do not run): a row's normaliser Z is at least
   Z_low = Σ_j exp(L_j) over every live key; blocks are skipped smallest bound first while their
   bounded masses sum to at most eps · Z_low, so the dropped mass is at most eps · Z_low / Z ≤
   eps. A KV head reads a block when any of its rows (query heads of the group, query positions)
   keeps it.
3. ``attend_kept`` (Triton): exact attention over the kept blocks, split over many programs per
   KV head (FlashDecoding), each with its own online softmax; a combine merges the splits.

docs/certificate.md proves the bounds, rounding included.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .launch import INTERPRET, cdiv, next_pow2, pad_pow2, traceable

BLOCK = 16  # keys per skippable block: a 16 x 128 x 2-byte tile of K is 4 KB
ATTEND_KEYS = 64  # keys per step of the attention loop: four kept blocks, gathered
GROUPS_PER_PROGRAM = 4  # quantisation groups one bounds program covers (256 keys)
QUANT_GROUP = 64  # keys sharing one (center, step) per channel: 8 bytes per channel per group
CODE_MAX = 127
_CODE_MAX = tl.constexpr(CODE_MAX)  # globals read inside @triton.jit must be constexpr


@dataclass
class KeySummary:
    """int8 codes of a key cache [B, Hkv, S_pad, D] (S_pad: S rounded up to QUANT_GROUP) and each
    group's center and step [B, Hkv, S_pad / QUANT_GROUP, D] in float32."""
    codes: torch.Tensor
    center: torch.Tensor
    step: torch.Tensor

    @property
    def group(self) -> int:
        return self.codes.shape[2] // self.center.shape[2]


def _quantize(keys: torch.Tensor):
    """(codes int8, center, step) of key groups [..., QUANT_GROUP, D]. |k - (c + s code)| <=
    s / 2 up to float32 rounding (the bound's slack covers it): c is the channel's midrange,
    s = range / 254, so |k - c| / s <= 127 before rounding."""
    kf = keys.float()
    lo, hi = kf.amin(-2), kf.amax(-2)
    center = (lo + hi) * 0.5
    step = (hi - lo) / (2 * CODE_MAX)
    # a constant channel keeps step 0 (its codes are 0 and c is exact); divide by 1 there
    divisor = torch.where(step > 0, step, torch.ones_like(step))
    codes = torch.floor((kf - center.unsqueeze(-2)) / divisor.unsqueeze(-2) + 0.5)
    return codes.clamp_(-CODE_MAX, CODE_MAX).to(torch.int8), center, step


def _groups_of(key: torch.Tensor, groups: torch.Tensor, group: int) -> torch.Tensor:
    """The keys of ``groups`` [n] as [B, Hkv, n, group, D]; positions past the cache repeat its
    last key (they are never attended, only quantised)."""
    S = key.shape[2]
    pos = (groups[:, None] * group + torch.arange(group, device=key.device)).clamp_(max=S - 1)
    B, H, _, D = key.shape
    return key.index_select(2, pos.flatten()).view(B, H, groups.numel(), group, D)


def summarize_keys(key: torch.Tensor, group: int = QUANT_GROUP) -> KeySummary:
    """The summary of a whole key cache [B, Hkv, S, D] (one read of K)."""
    B, H, S, D = key.shape
    n = max(1, cdiv(S, group))
    groups = torch.arange(n, device=key.device)
    if _use_kernel(key):
        summary = KeySummary(
            torch.empty(B, H, n * group, D, device=key.device, dtype=torch.int8),
            torch.empty(B, H, n, D, device=key.device, dtype=torch.float32),
            torch.empty(B, H, n, D, device=key.device, dtype=torch.float32))
        _quantize_groups(summary, key, groups)
        return summary
    codes, center, step = _quantize(_groups_of(key, groups, group))
    return KeySummary(codes.view(B, H, n * group, D), center, step)


def update_summary(summary: KeySummary, key: torch.Tensor, positions: torch.Tensor) -> None:
    """Re-summarise, in place, the groups holding ``positions`` (int [n], cache positions just
    written, shared by the batch as a cache's ``cache_position``): reads only those groups of K.
    A position listed twice re-summarises its group twice, with the same result."""
    g = summary.group
    groups = torch.div(positions.reshape(-1).long(), g, rounding_mode="floor")
    if _use_kernel(key):
        _quantize_groups(summary, key, groups)
        return
    codes, center, step = _quantize(_groups_of(key, groups, g))
    B, H, S_pad, D = summary.codes.shape
    summary.codes.view(B, H, S_pad // g, g, D).index_copy_(2, groups, codes)
    summary.center.index_copy_(2, groups, center)
    summary.step.index_copy_(2, groups, step)


def extend_summary(summary: KeySummary, key: torch.Tensor, start: int) -> KeySummary:
    """The summary of ``key`` [B, Hkv, S, D] whose first ``start`` positions ``summary``
    describes (a cache grown by concatenation): the groups complete before ``start`` are copied,
    the rest summarised from ``key`` (a read of the new groups only)."""
    g = summary.group
    B, H, S, D = key.shape
    n = max(1, cdiv(S, g))
    full = min(start // g, summary.center.shape[2], n)
    out = KeySummary(torch.empty(B, H, n * g, D, device=key.device, dtype=torch.int8),
                     torch.empty(B, H, n, D, device=key.device, dtype=torch.float32),
                     torch.empty(B, H, n, D, device=key.device, dtype=torch.float32))
    out.codes[:, :, :full * g] = summary.codes[:, :, :full * g]
    out.center[:, :, :full] = summary.center[:, :, :full]
    out.step[:, :, :full] = summary.step[:, :, :full]
    groups = torch.arange(full, n, device=key.device)
    if groups.numel():
        if _use_kernel(key):
            _quantize_groups(out, key, groups)
        else:
            codes, center, step = _quantize(_groups_of(key, groups, g))
            out.codes.view(B, H, n, g, D)[:, :, full:] = codes
            out.center[:, :, full:] = center
            out.step[:, :, full:] = step
    return out


def _use_kernel(key: torch.Tensor) -> bool:
    return (key.device.type == "cuda" or INTERPRET) and key.stride(-1) == 1


@triton.jit
def _quantize_group(K, Codes, Center, Step, g, pid_bh, b, h, S, NG, stride_kb, stride_kh,
                    stride_ks, D: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr):
    """Group g of one (sequence, KV head): ``_quantize``'s arithmetic, fused."""
    o_k = tl.arange(0, GROUP)
    o_d = tl.arange(0, D_PAD)
    m_d = o_d < D
    pos = tl.minimum(g * GROUP + o_k, S - 1)
    k = tl.load(K + b * stride_kb + h * stride_kh + pos[:, None] * stride_ks + o_d[None, :],
                mask=m_d[None, :], other=0.0).to(tl.float32)
    lo = tl.min(k, 0)
    hi = tl.max(k, 0)
    center = (lo + hi) * 0.5
    step = (hi - lo) / (2 * _CODE_MAX)
    divisor = tl.where(step > 0, step, 1.0)
    codes = tl.floor((k - center[None, :]) / divisor[None, :] + 0.5)
    codes = tl.minimum(tl.maximum(codes, -_CODE_MAX), _CODE_MAX).to(tl.int8)
    row = pid_bh * NG + g
    tl.store(Codes + (row * GROUP + o_k[:, None]) * D + o_d[None, :], codes, mask=m_d[None, :])
    tl.store(Center + row * D + o_d, center, mask=m_d)
    tl.store(Step + row * D + o_d, step, mask=m_d)


@triton.jit
def _quantize_kernel(K, Codes, Center, Step, Groups, S, NG, HKV, stride_kb, stride_kh, stride_ks,
                     D: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr):
    """One program: one listed group of one (sequence, KV head)."""
    pid_bh = tl.program_id(1).to(tl.int64)
    _quantize_group(K, Codes, Center, Step, tl.load(Groups + tl.program_id(0)), pid_bh,
                    pid_bh // HKV, pid_bh % HKV, S, NG, stride_kb, stride_kh, stride_ks, D, D_PAD,
                    GROUP)


@triton.jit
def _write_and_quantize_kernel(K, Source, Positions, Codes, Center, Step, N, S, NG, HKV,
                               stride_kb, stride_kh, stride_ks, stride_sb, stride_sh, stride_sn,
                               D: tl.constexpr, D_PAD: tl.constexpr, GROUP: tl.constexpr):
    """One program: one (sequence, KV head). Writes the N new keys into the cache at their
    positions, then re-summarises each one's group (a group listed twice is done twice, with the
    same result): the cache write and the summary's update in one launch."""
    pid_bh = tl.program_id(0).to(tl.int64)
    b = pid_bh // HKV
    h = pid_bh % HKV
    o_d = tl.arange(0, D_PAD)
    m_d = o_d < D
    for i in range(N):
        pos = tl.load(Positions + i).to(tl.int64)
        key = tl.load(Source + b * stride_sb + h * stride_sh + i * stride_sn + o_d, mask=m_d)
        # a position outside the cache writes nothing (index_copy_ would raise; the caller
        # checks positions where it can without a host read)
        width = tl.where((pos >= 0) & (pos < S), D, 0)
        tl.store(K + b * stride_kb + h * stride_kh + pos * stride_ks + o_d, key, mask=o_d < width)
    tl.debug_barrier()  # the program's own writes are visible to all its threads after this
    for i in range(N):
        g = tl.minimum(tl.maximum(tl.load(Positions + i).to(tl.int64), 0), S - 1) // GROUP
        _quantize_group(K, Codes, Center, Step, g, pid_bh, b, h, S, NG, stride_kb, stride_kh,
                        stride_ks, D, D_PAD, GROUP)


WRITE_FUSED_MAX = 16  # new keys per write the fused write-and-summarise kernel takes (decode)


def write_keys(summary: KeySummary, key: torch.Tensor, positions: torch.Tensor,
               source: torch.Tensor) -> bool:
    """``key.index_copy_(2, positions, source)`` and ``update_summary`` in one launch, where
    the fused kernel serves the write (a few new keys, same dtype, last dim contiguous): True.
    Otherwise nothing is written and the caller does both apart: False. Does not bump ``key``'s
    version (the caller's business)."""
    n = positions.numel()
    if not (_use_kernel(key) and source.dtype == key.dtype and source.dim() == 4
            and 0 < n <= WRITE_FUSED_MAX and source.shape[2] == n and source.stride(-1) == 1
            and source.shape[:2] == key.shape[:2] and source.shape[-1] == key.shape[-1]
            and positions.device == key.device):
        return False
    B, H, S, D = key.shape
    traceable(_write_and_quantize_kernel)[(B * H,)](
        key, source, positions.reshape(-1), summary.codes, summary.center, summary.step, n, S,
        summary.center.shape[2], H, key.stride(0), key.stride(1), key.stride(2),
        source.stride(0), source.stride(1), source.stride(2), D=D, D_PAD=pad_pow2(D),
        GROUP=summary.group)
    return True


def _quantize_groups(summary: KeySummary, key: torch.Tensor, groups: torch.Tensor) -> None:
    B, H, S, D = key.shape
    traceable(_quantize_kernel)[(groups.numel(), B * H)](
        key, summary.codes, summary.center, summary.step, groups, S, summary.center.shape[2], H,
        key.stride(0), key.stride(1), key.stride(2), D=D, D_PAD=pad_pow2(D),
        GROUP=summary.group)


# -- 1. bounds ------------------------------------------------------------------------------------
# What the kernels' Bias operand holds (their BIAS_KIND): nothing, a float bias added to the
# scores, or a bool mask (True keeps), read as the caller passed it: transformers' decode mask,
# expanded to [B, Lq, S] without a copy, so a step builds no bias of its own.
BIAS_NONE, BIAS_ADD, BIAS_KEEP = 0, 1, 2


def bias_kind(bias) -> int:
    if bias is None:
        return BIAS_NONE
    return BIAS_KEEP if bias.dtype == torch.bool else BIAS_ADD


@triton.jit
def _load_bias(ptr, mask, BIAS_KIND: tl.constexpr):
    """float32 additions to the scores at ``ptr`` (-inf where ``mask`` is off): a bool mask's
    entries as 0 (kept) or -inf, a float bias as it is."""
    if BIAS_KIND == 2:  # BIAS_KEEP
        keep = tl.load(ptr, mask=mask, other=0)
        return tl.where(keep != 0, 0.0, float("-inf"))
    return tl.load(ptr, mask=mask, other=float("-inf")).to(tl.float32)


@triton.jit
def _decode_bounds_kernel(Q, Codes, Center, Step, Bias, Lengths, LogUpper, LogLower,
                          S, R, LQ, HKV, NB, NG, scale, slack_gamma,
                          stride_bb, stride_bl, stride_bs,
                          D: tl.constexpr, D_PAD: tl.constexpr, R_PAD: tl.constexpr,
                          R_EPI: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                          BIAS_KIND: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                          GROUPS_PER_PROGRAM: tl.constexpr, INT8_DOT: tl.constexpr,
                          ONE_LSE: tl.constexpr, STAGES: tl.constexpr):
    """One program: GROUPS_PER_PROGRAM quantisation groups of one (sequence, KV head), every
    row of the head (the query rows load once).
    Writes log Σ exp(U) and log Σ exp(L) per row and block (natural log, scaled scores).

    The codes' dot products run on tensor cores (int8 dots on the codes as stored, or float16
    dots on codes converted in registers): q ⊙ s is scaled per row by a power of two (exact)
    and split into a head and a tail whose products with the codes are exact; the split's
    residue and the float32 roundings go into the slack.

    A tensor-core dot needs 16 rows; a GQA group at one position has a few (R_EPI, a power of
    two). Only the dots run on R_PAD >= 16 rows (the real rows, zeros below); everything else
    (the split of q ⊙ s, the slack, the exponentials) runs on the R_EPI real ones."""
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HKV
    o_e = tl.arange(0, R_EPI)
    o_d = tl.arange(0, D_PAD)
    m_e = o_e < R
    m_d = o_d < D
    q = tl.load(Q + (pid_bh * R + o_e[:, None]) * D + o_d[None, :],
                mask=m_e[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    limit = S
    if HAS_LENGTHS:
        limit = tl.minimum(limit, tl.load(Lengths + b))
    g_end = tl.minimum((pid_p + 1) * GROUPS_PER_PROGRAM, NG)
    for pid_g in tl.range(pid_p * GROUPS_PER_PROGRAM, g_end, num_stages=STAGES):
        _bounds_of_group(q, pid_g, pid_bh, b, o_e, o_d, m_e, m_d, Codes, Center, Step,
                         Bias, LogUpper, LogLower, limit, R, LQ, NB, NG, scale, slack_gamma,
                         stride_bb, stride_bl, stride_bs, D, R_PAD, R_EPI, GROUP, BLOCK_N,
                         BIAS_KIND, INT8_DOT, ONE_LSE)


# The slack's own float32 evaluation (sums of up to D_PAD positive terms, each a product of a
# few roundings): relative error below (D_PAD + 4) * 2^-24; scaling the slack by 1 + 2^-14 covers
# it up to D_PAD = 1020.
SLACK_ROUNDING = tl.constexpr(2.0 ** -14)


@triton.jit
def _bounds_of_group(q, pid_g, pid_bh, b, o_e, o_d, m_e, m_d, Codes, Center, Step, Bias,
                     LogUpper, LogLower, limit, R, LQ, NB, ng, scale, slack_gamma,
                     stride_bb, stride_bl, stride_bs, D: tl.constexpr, R_PAD: tl.constexpr,
                     R_EPI: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                     BIAS_KIND: tl.constexpr, INT8_DOT: tl.constexpr, ONE_LSE: tl.constexpr):
    """One group's bounds: q [R_EPI, D_PAD] (the real rows), the score centers' dots on R_PAD."""
    p_off = (pid_bh * ng + pid_g) * D + o_d
    center = tl.load(Center + p_off, mask=m_d, other=0.0)
    step = tl.load(Step + p_off, mask=m_d, other=0.0)
    qs = q * step[None, :]
    base = tl.sum(q * center[None, :], 1)
    # per row, 2^-e with e = floor(log2 max|q s|) built from exponent bits (exact scaling)
    row_max = tl.maximum(tl.max(tl.abs(qs), 1), 1e-30)
    e = tl.minimum(tl.maximum(tl.floor(tl.log2(row_max)), -100.0), 100.0).to(tl.int32)
    down = ((127 - e) << 23).to(tl.float32, bitcast=True)
    up = ((127 + e) << 23).to(tl.float32, bitcast=True)
    qs_n = qs * down[:, None]  # |qs_n| < 2
    # Every slack term is a sum over the channels, so one reduction takes them all: e_c = s_c/2
    # plus the reconstruction's rounding; q * s's own rounding; the base's accumulation (gamma).
    err = 0.5 * step + 2.0 ** -20 * (tl.abs(center) + (_CODE_MAX + 1) * step)
    terms = (tl.abs(q) * err[None, :] + slack_gamma * tl.abs(q * center[None, :])
             + _CODE_MAX * 2.0 ** -22 * tl.abs(qs))
    o_g = tl.arange(0, GROUP)
    keys = pid_g * GROUP + o_g
    codes = tl.load(Codes + (pid_bh * ng * GROUP + keys[:, None]) * D + o_d[None, :],
                    mask=m_d[None, :], other=0)
    if INT8_DOT:
        # 63 qs_n = head + (tail + rho) / 254 (+ float32 rounding): two int8 dots with the codes,
        # exact in int32, combined exactly as 254 d_head + d_tail (|.| < 2^28); |rho| <= 1/2 is
        # measured per channel; the one conversion to float32 and the scaling by unit / 254 round
        # within 2^-21 of 127 (254 Σ|head| + Σ|tail|) steps of the tail
        a = qs_n * 63.0
        head_f = tl.floor(a + 0.5)
        r1 = (a - head_f) * 254.0
        tail_f = tl.floor(r1 + 0.5)
        rho = tl.abs(r1 - tail_f)
        unit = up / 63.0  # one step of head: 2^e / 63
        codes_t = tl.trans(codes)
        d1 = tl.dot(_pad_rows(head_f.to(tl.int8), R_EPI, R_PAD), codes_t, out_dtype=tl.int32)
        d2 = tl.dot(_pad_rows(tail_f.to(tl.int8), R_EPI, R_PAD), codes_t, out_dtype=tl.int32)
        d = _first_rows(d1 * 254 + d2, R_PAD, R_EPI, GROUP)
        dots = d.to(tl.float32) * (unit * (1.0 / 254.0))[:, None]
        terms += (unit * (_CODE_MAX / 254.0))[:, None] * (
            rho + 2.0 ** -21 * (254.0 * tl.abs(head_f) + tl.abs(tail_f)))
        const = unit * (_CODE_MAX * D * 0.005 / 254.0)
    else:
        # q * s split into a float16 head and tail: their products with the codes (integers up
        # to 127, exact in float16) are exact in float32 on tensor cores; the float32
        # accumulation (gamma), the split's residue and the final scaling's rounding go into
        # the slack
        head = qs_n.to(tl.float16)
        tail = (qs_n - head.to(tl.float32)).to(tl.float16)
        codes_h = tl.trans(codes.to(tl.float16))
        dd = (tl.dot(_pad_rows(head, R_EPI, R_PAD), codes_h)
              + tl.dot(_pad_rows(tail, R_EPI, R_PAD), codes_h))
        dots = _first_rows(dd, R_PAD, R_EPI, GROUP) * up[:, None]
        terms += slack_gamma * 2 * _CODE_MAX * tl.abs(qs)
        const = _CODE_MAX * D * 2.0 ** -25 * up
    slack = (tl.sum(terms, 1) + const) * (1.0 + SLACK_ROUNDING)
    _store_block_bounds(dots, base, slack, keys, limit, pid_g, pid_bh, b, o_e, m_e, Bias,
                        LogUpper, LogLower, R, LQ, NB, scale, stride_bb, stride_bl, stride_bs,
                        R_EPI, GROUP, BLOCK_N, BIAS_KIND, ONE_LSE)


@triton.jit
def _pad_rows(x, P: tl.constexpr, R_PAD: tl.constexpr):
    """[P, N] -> [R_PAD, N]: x in the first P rows, zeros below (a tensor-core dot's 16 rows)."""
    if P == R_PAD:
        return x
    first = (tl.arange(0, R_PAD // P) == 0).to(x.dtype)
    return tl.reshape(x[None, :, :] * first[:, None, None], (R_PAD, x.shape[1]))


@triton.jit
def _first_rows(x, R_PAD: tl.constexpr, R_EPI: tl.constexpr, N: tl.constexpr):
    """[R_PAD, N] -> its first R_EPI rows [R_EPI, N], where every other row is zero: a sum
    over the R_PAD / R_EPI slabs (Triton has no slicing)."""
    if R_EPI == R_PAD:
        return x
    return tl.sum(tl.reshape(x, (R_PAD // R_EPI, R_EPI, N)), 0)


@triton.jit
def _store_block_bounds(dots, base, slack, keys, limit, pid_g, pid_bh, b, o_r, m_r, Bias,
                        LogUpper, LogLower, R, LQ, NB, scale, stride_bb, stride_bl, stride_bs,
                        R_PAD: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                        BIAS_KIND: tl.constexpr, ONE_LSE: tl.constexpr):
    """From one group's score centers (dots + base, [R_PAD, GROUP]) and each row's slack: the
    log of an upper and of a lower bound on each block's mass, stored per row and block."""
    NBG: tl.constexpr = GROUP // BLOCK_N
    live = keys < limit
    extra = tl.where(live, 0.0, float("-inf"))[None, :] + tl.zeros((R_PAD, GROUP), tl.float32)
    if BIAS_KIND != 0:
        extra += _load_bias(Bias + b * stride_bb + (o_r % LQ)[:, None] * stride_bl
                            + keys[None, :] * stride_bs, m_r[:, None] & live[None, :], BIAS_KIND)
    if ONE_LSE:
        # Every key's score is within ±slack of its center c_j = dots_j + base, the same slack
        # for the whole row: one log-sum-exp of the centers V gives both bounds, V ± slack
        # (half the exponentials). The float32 rounding of c_j, of the bias's addition and of
        # the log-sum-exp is at most a few ulps of the block's largest |c_j + bias_j|, of |V|
        # and of the slack: 2^-20 of their sum covers it.
        x = tl.reshape((dots + base[:, None]) * scale + extra, (R_PAD, NBG, BLOCK_N))
        big = tl.max(tl.where(x > float("-inf"), tl.abs(x), 0.0), 2)
        v = _block_logsumexp(x, 0.0)
        sig = slack * scale
        finite_v = tl.where(v > float("-inf"), tl.abs(v), 0.0)
        margin = 2.0 ** -20 * (big + finite_v + sig[:, None]) + 1e-5
        log_hi = v + (sig[:, None] + margin)
        log_lo = v - (sig[:, None] + margin)
    else:
        hi = (dots + (base + slack)[:, None]) * scale
        lo = (dots + (base - slack)[:, None]) * scale
        hi = hi + tl.abs(hi) * 2.0 ** -22
        lo = lo - tl.abs(lo) * 2.0 ** -22
        log_hi = _block_logsumexp(tl.reshape(hi + extra, (R_PAD, NBG, BLOCK_N)), 1e-5)
        log_lo = _block_logsumexp(tl.reshape(lo + extra, (R_PAD, NBG, BLOCK_N)), -1e-5)
    blk = pid_g * NBG + tl.arange(0, NBG)
    out = (pid_bh * R + o_r[:, None]) * NB + blk[None, :]
    m_out = m_r[:, None] & (blk < NB)[None, :]
    tl.store(LogUpper + out, log_hi, mask=m_out)
    tl.store(LogLower + out, log_lo, mask=m_out)


@triton.jit
def _decode_bounds_rows_kernel(Q, Codes, Center, Step, Bias, Lengths, LogUpper, LogLower,
                               S, R, LQ, HKV, NB, NG, scale, slack_gamma,
                               stride_bb, stride_bl, stride_bs,
                               D: tl.constexpr, D_PAD: tl.constexpr, DC: tl.constexpr,
                               R_PAD: tl.constexpr, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                               BIAS_KIND: tl.constexpr, HAS_LENGTHS: tl.constexpr,
                               GROUPS_PER_PROGRAM: tl.constexpr, ONE_LSE: tl.constexpr,
                               STAGES: tl.constexpr):
    """``_decode_bounds_kernel`` for a few rows (R <= 8: a GQA group at one query position):
    the dots on CUDA cores over DC channels at a time, so the work is R_PAD rows (not the 16 a
    tensor-core tile needs). Float32 products of q ⊙ s with the codes and their sums round: the
    slack takes gamma_D Σ|q_c s_c code| <= gamma_D · 127 Σ|q_c s_c|."""
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HKV
    o_r = tl.arange(0, R_PAD)
    o_c = tl.arange(0, DC)
    m_r = o_r < R
    o_g = tl.arange(0, GROUP)
    limit = S
    if HAS_LENGTHS:
        limit = tl.minimum(limit, tl.load(Lengths + b))
    g_end = tl.minimum((pid_p + 1) * GROUPS_PER_PROGRAM, NG)
    for pid_g in tl.range(pid_p * GROUPS_PER_PROGRAM, g_end, num_stages=STAGES):
        keys = pid_g * GROUP + o_g
        dots = tl.zeros((R_PAD, GROUP), tl.float32)
        base = tl.zeros((R_PAD,), tl.float32)
        slack = tl.zeros((R_PAD,), tl.float32)
        sum_abs_qs = tl.zeros((R_PAD,), tl.float32)
        sum_abs_qc = tl.zeros((R_PAD,), tl.float32)
        for dc in tl.static_range(0, D_PAD, DC):
            o_d = dc + o_c
            m_d = o_d < D
            q = tl.load(Q + (pid_bh * R + o_r[:, None]) * D + o_d[None, :],
                        mask=m_r[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            p_off = (pid_bh * NG + pid_g) * D + o_d
            center = tl.load(Center + p_off, mask=m_d, other=0.0)
            step = tl.load(Step + p_off, mask=m_d, other=0.0)
            qs = q * step[None, :]
            base += tl.sum(q * center[None, :], 1)
            err = 0.5 * step + 2.0 ** -20 * (tl.abs(center) + (_CODE_MAX + 1) * step)
            slack += tl.sum(tl.abs(q) * err[None, :], 1)
            sum_abs_qs += tl.sum(tl.abs(qs), 1)
            sum_abs_qc += tl.sum(tl.abs(q * center[None, :]), 1)
            codes = tl.load(Codes + (pid_bh * NG * GROUP + keys[:, None]) * D + o_d[None, :],
                            mask=m_d[None, :], other=0).to(tl.float32)
            dots += tl.sum(qs[:, None, :] * codes[None, :, :], 2)
        # q * s's rounding, the dots' and the base's float32 accumulation
        slack += (_CODE_MAX * 2.0 ** -22 * sum_abs_qs
                  + slack_gamma * (_CODE_MAX * sum_abs_qs + sum_abs_qc))
        _store_block_bounds(dots, base, slack, keys, limit, pid_g, pid_bh, b, o_r, m_r, Bias,
                            LogUpper, LogLower, R, LQ, NB, scale, stride_bb, stride_bl,
                            stride_bs, R_PAD, GROUP, BLOCK_N, BIAS_KIND, ONE_LSE)


@triton.jit
def _block_logsumexp(x, rounding):
    """log Σ exp over the last axis of [R, blocks, keys]; -inf for an all -inf block. rounding:
    the log-sum-exp's own float32 error, a relative 1e-5 (added above, taken off below)."""
    m = tl.max(x, 2)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    out = m_safe + tl.log(tl.sum(tl.exp(x - m_safe[:, :, None]), 2))
    return tl.where(m == float("-inf"), float("-inf"), out + rounding)


def rows_of(query: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, Lq, D] -> [B, Hkv, G * Lq, D]: the rows that share a KV head's read (row r is
    query head g = r // Lq of the group at position l = r % Lq)."""
    B, Hq, Lq, D = query.shape
    return query.reshape(B, hkv, (Hq // hkv) * Lq, D).contiguous()


# How the bounds kernel runs (GPU meta-parameters; benchmarks/bench_decode.py --sweep times the
# alternatives): int8 tensor-core dots on the codes as stored, or float16 dots on codes converted
# in registers; one log-sum-exp of the score centers for both bounds, or one per bound;
# quantisation groups per program; pipeline stages; warps.
BOUNDS_CONFIG = {"int8_dot": True, "one_lse": True, "groups_per_program": GROUPS_PER_PROGRAM,
                 "stages": 3, "num_warps": 1, "rows_kernel": False, "real_rows": True}
# groups 4, stages 3, one warp (the sweep at c13b9cd, H100, 32K keys; learned D 64 / uniform
# D 128): batch 8 98 / 124 us against two warps' 154 / 169, batch 1 21.9 / 27.1 against 30.4 /
# 33.8. Once the work after the dots ran on the real rows alone, more programs a SM (each with
# its loads in flight) beat more threads a program.
# real_rows: all but the dots (the split of q ⊙ s, the slack, the exponentials, the stores) on
# the real rows only, not on the 16 a tensor-core dot pads a GQA group's few rows to: 98 us
# where the padded tile took 212 (the sweep above, learned, batch 8).
# rows_kernel: for at most ROWS_KERNEL_MAX_ROWS rows per KV head, _decode_bounds_rows_kernel
# (CUDA-core dots over the real rows only): 3x slower than the tensor-core kernel (H100, 32K
# keys, batch 8, 4 rows per KV head: 665 against 225 us), kept for the sweep
ROWS_KERNEL_MAX_ROWS = 8


def decode_bounds(query, summary: KeySummary, S: int, scale: float, bias=None, lengths=None,
                  config: dict | None = None):
    """(log_upper, log_lower) [B, Hkv, R, NB] float32: per row and block of BLOCK keys, log of an
    upper and of a lower bound on Σ exp(scale q·k + bias) over the block's live keys (keys past S,
    past ``lengths[b]`` or with bias -inf are not live: -inf). ``bias``: [B, Lq, S], float (added
    to the scores) or bool (True keeps; ``BIAS_KIND``), any strides.
    ``config``: overrides of BOUNDS_CONFIG (the benchmark's sweep)."""
    cfg = {**BOUNDS_CONFIG, **(config or {})}
    B, Hkv, S_pad, D = summary.codes.shape
    rows = rows_of(query, Hkv)
    R = rows.shape[2]
    NB = S_pad // BLOCK
    log_upper = torch.empty(B, Hkv, R, NB, device=query.device, dtype=torch.float32)
    log_lower = torch.empty_like(log_upper)
    gamma = (D + 8) * 2.0 ** -23  # |fl(a·b) - a·b| <= gamma * Σ|a_i b_i| for float32 dots
    dummy = log_upper
    ng = S_pad // summary.group
    per = cfg["groups_per_program"]
    if cfg["rows_kernel"] and R <= ROWS_KERNEL_MAX_ROWS:
        r_pad = max(2, next_pow2(R))
        traceable(_decode_bounds_rows_kernel)[(cdiv(ng, per), B * Hkv)](
            rows, summary.codes, summary.center, summary.step,
            bias if bias is not None else dummy, lengths if lengths is not None else dummy,
            log_upper, log_lower, S, R, query.shape[2], Hkv, NB, ng, float(scale), gamma,
            *(bias.stride() if bias is not None else (0, 0, 0)),
            D=D, D_PAD=max(16, pad_pow2(D)), DC=16 if r_pad <= 4 else 8, R_PAD=r_pad,
            GROUP=summary.group, BLOCK_N=BLOCK, BIAS_KIND=bias_kind(bias),
            HAS_LENGTHS=lengths is not None, GROUPS_PER_PROGRAM=per, ONE_LSE=cfg["one_lse"],
            STAGES=cfg["stages"], num_warps=cfg["num_warps"])
        return log_upper, log_lower
    traceable(_decode_bounds_kernel)[(cdiv(ng, per), B * Hkv)](
        rows, summary.codes, summary.center, summary.step,
        bias if bias is not None else dummy, lengths if lengths is not None else dummy,
        log_upper, log_lower, S, R, query.shape[2], Hkv, NB, ng, float(scale), gamma,
        *(bias.stride() if bias is not None else (0, 0, 0)),
        D=D, D_PAD=pad_pow2(D), R_PAD=max(16, pad_pow2(R)),
        R_EPI=max(2, next_pow2(R)) if cfg["real_rows"] else max(16, pad_pow2(R)),
        GROUP=summary.group, BLOCK_N=BLOCK,
        BIAS_KIND=bias_kind(bias), HAS_LENGTHS=lengths is not None, GROUPS_PER_PROGRAM=per,
        INT8_DOT=cfg["int8_dot"] and pad_pow2(D) >= 32, ONE_LSE=cfg["one_lse"],
        STAGES=cfg["stages"], num_warps=cfg["num_warps"])
    return log_upper, log_lower


# -- 2. selection ----------------------------------------------------------------------------------
SELECT_CHUNK = 512  # blocks per step of the selection kernel's passes over a row
SELECT_ITERS = 14  # bisection steps on the skip threshold: the interval shrinks to log(NB) / 2^14
# The selection's own float32 rounding (sums of up to NB terms, log-sum-exp): the budget is taken
# this much (in log space) below eps * Z_low, far more than those errors reach.
SELECT_MARGIN = 1e-4


def select_blocks(log_upper: torch.Tensor, log_lower: torch.Tensor, eps: float,
                  config: dict | None = None):
    """(kept_order int32 [B, Hkv, NB], n_kept int32 [B, Hkv], keep_rows bool [B, Hkv, R, NB]).
    A row skips blocks whose bounded masses sum to at most eps * Z_low (Z_low = Σ exp(log_lower),
    a lower bound on its normaliser), so its dropped mass is at most eps; a KV head reads a block
    any of its rows keeps. kept_order lists the kept blocks first, in ascending order, then the
    skipped ones. On CUDA (and the interpreter) without a sort: one program per row finds its
    threshold (``_decode_threshold_kernel``), one per KV head takes the union
    (``_decode_select_kernel``; ``SELECT_CONFIG``); elsewhere ``select_blocks_sorted``."""
    if log_upper.device.type == "cuda" or INTERPRET:
        return _select_blocks_kernel(log_upper, log_lower, eps, config)
    return select_blocks_sorted(log_upper, log_lower, eps)


def select_blocks_sorted(log_upper: torch.Tensor, log_lower: torch.Tensor, eps: float):
    """``select_blocks`` by sorting: each row skips its blocks smallest bound first while their
    bounded masses sum to at most eps * Z_low (the most a row can skip by this rule)."""
    log_z_low = torch.logsumexp(log_lower, -1, keepdim=True)
    budget = log_z_low + (math.log(eps) if eps > 0 else -math.inf)
    sorted_upper, order = log_upper.sort(-1)
    n_skip = (torch.logcumsumexp(sorted_upper, -1) <= budget).sum(-1, keepdim=True)
    rank = torch.empty_like(order).scatter_(
        -1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    keep_rows = rank >= n_skip
    keep = keep_rows.any(2)
    # blocks with no live key in any row have an upper bound of -inf: skipped by every row
    kept_order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return kept_order, keep.sum(-1, dtype=torch.int32), keep_rows


@triton.jit
def _decode_select_kernel(LogUpper, LogLower, Threshold, KeepRows, Order, NKept, R, NB, log_nb,
                          log_eps, margin, R_PAD: tl.constexpr, CHUNK: tl.constexpr,
                          ITERS: tl.constexpr, SECTIONS: tl.constexpr,
                          THRESHOLD_GIVEN: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """One program: one (sequence, KV head), all its rows. A row skips every block whose upper
    bound U_j is at most a threshold t with Σ_{U_j <= t} exp(U_j) <= eps * Z_low: t starts at
    budget - log(NB) (NB blocks below it hold at most the budget) and a bisection raises it while
    the sum stays within the budget. Then the union over rows, compacted by a prefix sum.
    THRESHOLD_GIVEN: each row's threshold comes from ``_decode_threshold_kernel`` (one program
    per row); this program does the union alone."""
    pid = tl.program_id(0).to(tl.int64)
    o_r = tl.arange(0, R_PAD)
    o_c = tl.arange(0, CHUNK)
    m_r = o_r < R
    rows = pid * R * NB + o_r[:, None] * NB
    if THRESHOLD_GIVEN:
        lo_t = tl.load(Threshold + pid * R + o_r, mask=m_r, other=0.0)
    else:
        lo_t = _threshold_of_rows(LogUpper, LogLower, rows, m_r, NB, log_nb, log_eps, margin,
                                  R_PAD, CHUNK, ITERS, SECTIONS)
    _union_of_rows(LogUpper, KeepRows, Order, NKept, pid, rows, m_r, lo_t, NB, CHUNK, ONE_CHUNK)


@triton.jit
def _threshold_of_rows(LogUpper, LogLower, rows, m_r, NB, log_nb, log_eps, margin,
                       R_PAD: tl.constexpr, CHUNK: tl.constexpr, ITERS: tl.constexpr,
                       SECTIONS: tl.constexpr):
    o_c = tl.arange(0, CHUNK)
    # 1. per row: log Z_low (online log-sum-exp of the lower bounds) and the largest upper bound
    m_lo = tl.full((R_PAD,), float("-inf"), tl.float32)
    s_lo = tl.zeros((R_PAD,), tl.float32)
    m_up = tl.full((R_PAD,), float("-inf"), tl.float32)
    for c in range(0, NB, CHUNK):
        m = m_r[:, None] & ((c + o_c) < NB)[None, :]
        lo = tl.load(LogLower + rows + c + o_c[None, :], mask=m, other=float("-inf"))
        up = tl.load(LogUpper + rows + c + o_c[None, :], mask=m, other=float("-inf"))
        m_new = tl.maximum(m_lo, tl.max(lo, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_lo = s_lo * tl.exp(m_lo - m_safe) + tl.sum(tl.exp(lo - m_safe[:, None]), 1)
        m_lo = m_new
        m_up = tl.maximum(m_up, tl.max(up, 1))
    log_z = tl.where(s_lo > 0, m_lo + tl.log(s_lo), float("-inf"))
    budget = log_z + log_eps - margin
    # 2. the skip threshold per row, between a certified start and the budget: bisection
    # (SECTIONS 1), or SECTIONS thresholds tried per pass over the bounds (fewer passes, each
    # doing more arithmetic: the pass count is what a single program per KV head waits on). The
    # threshold only ever moves to a tried value whose skipped mass fits the budget.
    lo_t = budget - log_nb
    hi_t = tl.maximum(tl.minimum(budget, m_up), lo_t)
    if SECTIONS == 1:
        for _ in range(ITERS):
            mid = (lo_t + hi_t) * 0.5
            mass = tl.zeros((R_PAD,), tl.float32)
            for c in range(0, NB, CHUNK):
                m = m_r[:, None] & ((c + o_c) < NB)[None, :]
                up = tl.load(LogUpper + rows + c + o_c[None, :], mask=m, other=float("-inf"))
                take = (up <= mid[:, None]) & (up > float("-inf"))
                mass += tl.sum(tl.where(take, tl.exp(up - budget[:, None]), 0.0), 1)
            fits = mass <= 1.0
            lo_t = tl.where(fits, mid, lo_t)
            hi_t = tl.where(fits, hi_t, mid)
    else:
        o_k = tl.arange(0, SECTIONS)
        cuts = ((o_k + 1).to(tl.float32) / (SECTIONS + 1))[None, :]
        for _ in range(ITERS):
            width = tl.where(hi_t > lo_t, hi_t - lo_t, 0.0)  # eps 0: both -inf
            tries = lo_t[:, None] + width[:, None] * cuts  # [R_PAD, SECTIONS]
            mass = tl.zeros((R_PAD, SECTIONS), tl.float32)
            for c in range(0, NB, CHUNK):
                m = m_r[:, None] & ((c + o_c) < NB)[None, :]
                up = tl.load(LogUpper + rows + c + o_c[None, :], mask=m, other=float("-inf"))
                e = tl.where(up > float("-inf"), tl.exp(up - budget[:, None]), 0.0)
                for k in tl.static_range(SECTIONS):
                    t_k = tl.sum(tl.where(o_k[None, :] == k, tries, 0.0), 1)
                    s_k = tl.sum(tl.where(up <= t_k[:, None], e, 0.0), 1)
                    mass += tl.where(o_k[None, :] == k, s_k[:, None], 0.0)
            # the leading tries that fit (the mass grows with the threshold; counting leading
            # ones keeps the invariant even where rounding broke that order)
            first_miss = tl.min(tl.where(mass <= 1.0, SECTIONS, o_k[None, :]), 1)
            best = tl.sum(tl.where(o_k[None, :] == first_miss[:, None] - 1, tries, 0.0), 1)
            above = tl.sum(tl.where(o_k[None, :] == first_miss[:, None], tries, 0.0), 1)
            lo_new = tl.where(first_miss > 0, best, lo_t)
            hi_t = tl.where(first_miss < SECTIONS, above, hi_t)
            lo_t = lo_new
    return lo_t


@triton.jit
def _union_of_rows(LogUpper, KeepRows, Order, NKept, pid, rows, m_r, lo_t, NB,
                   CHUNK: tl.constexpr, ONE_CHUNK: tl.constexpr):
    """3. keep what exceeds each row's threshold; the KV head reads the union, kept blocks
    first (ascending), then the rest. ONE_CHUNK (CHUNK >= NB): one read, one scan and one
    store of the order (a skipped block's slot: the kept count, then the skipped before it)."""
    o_c = tl.arange(0, CHUNK)
    if ONE_CHUNK:
        in_row = o_c < NB
        m = m_r[:, None] & in_row[None, :]
        up = tl.load(LogUpper + rows + o_c[None, :], mask=m, other=float("-inf"))
        keep_rows = (up > lo_t[:, None]) & m
        tl.store(KeepRows + rows + o_c[None, :], keep_rows.to(tl.int8), mask=m)
        keep = (tl.max(keep_rows.to(tl.int32), 0) > 0).to(tl.int32)
        kept_before = tl.cumsum(keep, 0) - keep
        n_all = tl.sum(keep, 0)
        slot = tl.where(keep > 0, kept_before, n_all + o_c - kept_before)
        tl.store(Order + pid * NB + slot, o_c.to(tl.int32), mask=in_row)
        tl.store(NKept + pid, n_all)
        return
    n_kept = tl.sum(tl.zeros((CHUNK,), tl.int32), 0)
    for c in range(0, NB, CHUNK):
        in_row = (c + o_c) < NB
        m = m_r[:, None] & in_row[None, :]
        up = tl.load(LogUpper + rows + c + o_c[None, :], mask=m, other=float("-inf"))
        keep_rows = (up > lo_t[:, None]) & m
        tl.store(KeepRows + rows + c + o_c[None, :], keep_rows.to(tl.int8), mask=m)
        keep = (tl.max(keep_rows.to(tl.int32), 0) > 0).to(tl.int32)
        slot = n_kept + tl.cumsum(keep, 0) - keep
        tl.store(Order + pid * NB + slot, (c + o_c).to(tl.int32), mask=(keep > 0) & in_row)
        n_kept += tl.sum(keep, 0)
    tl.store(NKept + pid, n_kept)
    n_skipped = tl.sum(tl.zeros((CHUNK,), tl.int32), 0)
    for c in range(0, NB, CHUNK):
        in_row = (c + o_c) < NB
        m = m_r[:, None] & in_row[None, :]
        up = tl.load(LogUpper + rows + c + o_c[None, :], mask=m, other=float("-inf"))
        skip = ((tl.max(((up > lo_t[:, None]) & m).to(tl.int32), 0) == 0) & in_row).to(tl.int32)
        slot = n_kept + n_skipped + tl.cumsum(skip, 0) - skip
        tl.store(Order + pid * NB + slot, (c + o_c).to(tl.int32), mask=skip > 0)
        n_skipped += tl.sum(skip, 0)


@triton.jit
def _decode_threshold_kernel(LogUpper, LogLower, Threshold, NB, log_nb, log_eps, margin,
                             NB_PAD: tl.constexpr, ITERS: tl.constexpr):
    """One program: one row, its NB bounds held in registers (read once). The skip threshold of
    ``_decode_select_kernel``'s steps 1-2: log Z_low, then a bisection of t between budget -
    log(NB) and the budget, raised while Σ_{U_j <= t} exp(U_j) stays within eps · Z_low.
    One program per (sequence, KV head) waited on ten passes over all its rows' bounds (43 us
    at 32K keys, batch 1, H100, where the dense step takes 52): this spreads the rows over
    programs and reads them once."""
    row = tl.program_id(0).to(tl.int64)
    o = tl.arange(0, NB_PAD)
    m = o < NB
    up = tl.load(LogUpper + row * NB + o, mask=m, other=float("-inf"))
    lo = tl.load(LogLower + row * NB + o, mask=m, other=float("-inf"))
    m_lo = tl.max(lo, 0)
    m_safe = tl.where(m_lo == float("-inf"), 0.0, m_lo)
    s_lo = tl.sum(tl.exp(lo - m_safe), 0)
    log_z = tl.where(s_lo > 0, m_safe + tl.log(s_lo), float("-inf"))
    budget = log_z + log_eps - margin
    lo_t = budget - log_nb
    hi_t = tl.maximum(tl.minimum(budget, tl.max(up, 0)), lo_t)
    live = up > float("-inf")
    mass_of = tl.where(live, tl.exp(up - budget), 0.0)  # each block's share of the budget
    for _ in range(ITERS):
        mid = (lo_t + hi_t) * 0.5
        fits = tl.sum(tl.where(live & (up <= mid), mass_of, 0.0), 0) <= 1.0
        lo_t = tl.where(fits, mid, lo_t)
        hi_t = tl.where(fits, hi_t, mid)
    tl.store(Threshold + row, lo_t)


# The selection kernel's thresholds per pass: 1 is bisection (SELECT_ITERS passes); 8 narrows
# the interval ninefold a pass (5 passes to bisection's resolution). benchmarks/bench_decode.py
# --sweep times them. per_row: the thresholds from _decode_threshold_kernel (one program per
# row, its bounds in registers) where a row has at most SELECT_ROW_MAX blocks, then the union
# in _decode_select_kernel; else that kernel does all of it.
SELECT_CONFIG = {"sections": 4, "per_row": True}  # sections 4: 44.7 us against bisection's 49.3
# (H100, 32K, batch 8, one program per KV head)
SELECT_ROW_MAX = 8192  # blocks of a row held in registers: 128K keys (32 a thread, 8 warps)


def _select_blocks_kernel(log_upper, log_lower, eps: float, config: dict | None = None):
    cfg = {**SELECT_CONFIG, **(config or {})}
    sections = cfg["sections"]
    # passes to reach bisection's resolution: (sections + 1) ** passes >= 2 ** SELECT_ITERS
    iters = (SELECT_ITERS if sections == 1
             else math.ceil(SELECT_ITERS * math.log(2) / math.log(sections + 1)))
    B, Hkv, R, NB = log_upper.shape
    kept_order = torch.empty(B, Hkv, NB, device=log_upper.device, dtype=torch.int32)
    n_kept = torch.empty(B, Hkv, device=log_upper.device, dtype=torch.int32)
    keep_rows = torch.empty(B, Hkv, R, NB, device=log_upper.device, dtype=torch.int8)
    r_pad = max(2, next_pow2(R))
    # a step holds r_pad x chunk bounds in registers: at most 2048 (many rows: shorter steps)
    chunk = min(SELECT_CHUNK, max(16, 2048 // r_pad), max(16, next_pow2(NB)))
    assert sections == 1 or sections == next_pow2(sections), sections
    log_upper, log_lower = log_upper.contiguous(), log_lower.contiguous()
    log_eps = math.log(eps) if eps > 0 else -math.inf
    per_row = cfg["per_row"] and next_pow2(NB) <= SELECT_ROW_MAX
    threshold = kept_order  # a dummy unless per_row
    warps = 4
    if per_row:
        # the union alone: a KV head's rows in one chunk where they fit in registers (8192
        # bounds over eight warps), so one read and one scan
        chunk = min(max(16, next_pow2(NB)), max(16, SELECT_ROW_MAX // r_pad))
        warps = 8 if chunk * r_pad > 2048 else 4
        threshold = torch.empty(B * Hkv * R, device=log_upper.device, dtype=torch.float32)
        nb_pad = max(16, next_pow2(NB))
        traceable(_decode_threshold_kernel)[(B * Hkv * R,)](
            log_upper, log_lower, threshold, NB, math.log(NB), log_eps, SELECT_MARGIN,
            NB_PAD=nb_pad, ITERS=SELECT_ITERS, num_warps=4 if nb_pad <= 2048 else 8)
    traceable(_decode_select_kernel)[(B * Hkv,)](
        log_upper, log_lower, threshold, keep_rows, kept_order, n_kept, R, NB, math.log(NB),
        log_eps, SELECT_MARGIN, R_PAD=r_pad, CHUNK=chunk, ITERS=iters, SECTIONS=sections,
        THRESHOLD_GIVEN=per_row, ONE_CHUNK=chunk >= NB, num_warps=warps)
    return kept_order, n_kept, keep_rows.view(torch.bool)


# -- 3. attention over the kept blocks ------------------------------------------------------------
@triton.jit
def _decode_attend_kernel(Q, K, V, Bias, Lengths, Order, NKept, PartM, PartL, PartAcc,
                          S, R, LQ, HKV, NB, scale,
                          stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
                          stride_bb, stride_bl, stride_bs,
                          D: tl.constexpr, DV: tl.constexpr, D_PAD: tl.constexpr,
                          DV_PAD: tl.constexpr, R_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
                          KEYS: tl.constexpr, SPLITS: tl.constexpr, BIAS_KIND: tl.constexpr,
                          HAS_LENGTHS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          DOT_UPCAST: tl.constexpr, STAGES: tl.constexpr,
                          ALL_BLOCKS: tl.constexpr):
    """One program: one share of a (sequence, KV head)'s kept blocks, every row of the head;
    writes its running max, sum and unnormalised output per row. ALL_BLOCKS: every block, in
    order (dense decode: no list to read, contiguous loads)."""
    pid_s = tl.program_id(0)
    pid_bh = tl.program_id(1).to(tl.int64)
    b = pid_bh // HKV
    h = pid_bh % HKV
    o_r = tl.arange(0, R_PAD)
    o_d = tl.arange(0, D_PAD)
    o_v = tl.arange(0, DV_PAD)
    m_r = o_r < R
    q = tl.load(Q + (pid_bh * R + o_r[:, None]) * D + o_d[None, :],
                mask=m_r[:, None] & (o_d[None, :] < D), other=0.0)
    if DOT_UPCAST:  # the interpreter's dots mishandle bfloat16
        q = q.to(tl.float32)
    if ALL_BLOCKS:
        n = NB
    else:
        n = tl.load(NKept + pid_bh)
    per = tl.cdiv(n, SPLITS)
    start = pid_s * per
    end = tl.minimum(start + per, n)
    limit = S
    if HAS_LENGTHS:
        limit = tl.minimum(limit, tl.load(Lengths + b))
    m_i = tl.full((R_PAD,), float("-inf"), tl.float32)
    l_i = tl.zeros((R_PAD,), tl.float32)
    acc = tl.zeros((R_PAD, DV_PAD), tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    o_k = tl.arange(0, KEYS)
    for i in tl.range(start, end, KEYS // BLOCK_N, num_stages=STAGES):  # 4 kept blocks a step
        pos = i + o_k // BLOCK_N
        if ALL_BLOCKS:
            blk = pos
        else:
            blk = tl.load(Order + pid_bh * NB + pos, mask=pos < end, other=0)
        keys = blk * BLOCK_N + o_k % BLOCK_N
        live = (pos < end) & (keys < limit)
        k = tl.load(k_base + keys[:, None] * stride_ks + o_d[None, :],
                    mask=live[:, None] & (o_d[None, :] < D), other=0.0)
        if DOT_UPCAST:
            k = k.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale
        s = s + tl.where(live, 0.0, float("-inf"))[None, :]
        if BIAS_KIND != 0:
            s += _load_bias(Bias + b * stride_bb + (o_r % LQ)[:, None] * stride_bl
                            + keys[None, :] * stride_bs, m_r[:, None] & live[None, :], BIAS_KIND)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp(s - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        v = tl.load(v_base + keys[:, None] * stride_vs + o_v[None, :],
                    mask=live[:, None] & (o_v[None, :] < DV), other=0.0)
        if DOT_UPCAST:
            v = v.to(tl.float32)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new
    part = (pid_bh * SPLITS + pid_s) * R + o_r
    tl.store(PartM + part, m_i, mask=m_r)
    tl.store(PartL + part, l_i, mask=m_r)
    tl.store(PartAcc + part[:, None] * DV + o_v[None, :], acc,
             mask=m_r[:, None] & (o_v[None, :] < DV))


# How the attention kernel runs (benchmarks/bench_decode.py --sweep times the alternatives):
# programs per SM in all, pipeline stages of the gathered loads, warps per program.
# Programs per SM (H100, learned keys, 32K, batch 8, 55 % kept): 8: 185 us, 16: 181, 32: 176;
# but 32 made the dense pass at batch 1 slower (58 -> 70 us: splits of two loop steps, and a
# longer combine), hence 16 with at least four steps a split (default_splits)
# "keys": keys per loop step (ATTEND_KEYS); "min_steps": loop steps a split has at least.
ATTEND_CONFIG = {"programs_per_sm": 16, "stages": 3, "num_warps": 4, "keys": ATTEND_KEYS,
                 "min_steps": 4}
# attend_all's (every block in order, contiguous loads: the op's dense path with a mask): 128
# keys a step, two stages, at least 1024 keys a split. H100, sweep_decode_dense at 2368903
# (uniform keys, GQA 32/8, D 128, the all-true mask; time over cuDNN without the mask): at batch
# 1 and 32K keys 1.03x against 1.18x with ATTEND_CONFIG's (64 keys a step, three stages, 256 keys
# a split: 128 splits of a short loop each, where 32 of a longer one read faster); at batch 8 and
# 8K keys 1.02x against 1.05x. Larger calls take SDPA (kv_cache.SDPA_MASKED_MIN_KEYS).
# "fill_steps": where splits of min_steps would leave fewer programs than SMs, splits of this
# many steps: at batch 1 and 8K keys, 1024-key splits are 64 programs, 0.75x (5c1f3a2), and
# 512-key splits measured 0.96x (2368903's sweep; 1.06x with three stages).
ATTEND_ALL_CONFIG = {**ATTEND_CONFIG, "keys": 128, "stages": 2, "min_steps": 8, "fill_steps": 4}


def default_splits(B: int, hkv: int, nb: int, device, config: dict = ATTEND_CONFIG) -> int:
    """Programs per (sequence, KV head): ``config``'s programs per SM in all (the loop waits on
    gathered loads; many programs hide it), at least its ``min_steps`` steps of the attention
    loop each (shorter splits cost their setup and the combine more than they gain), or its
    ``fill_steps`` where min_steps would leave SMs without a program."""
    if INTERPRET or device.type != "cuda":
        return max(1, min(4, nb // 4))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    min_blocks = config["min_steps"] * (config["keys"] // BLOCK)
    if "fill_steps" in config and B * hkv * max(1, nb // min_blocks) < sms:
        min_blocks = config["fill_steps"] * (config["keys"] // BLOCK)
    return max(1, min(cdiv(config["programs_per_sm"] * sms, B * hkv), max(1, nb // min_blocks),
                      256))


def attend_kept(query, key, value, kept_order, n_kept, scale: float, bias=None, lengths=None,
                splits: int | None = None, config: dict | None = None):
    """(out [B, Hq, Lq, DV] in query's dtype, lse [B, Hq, Lq] float32): attention over the kept
    blocks only (exact there). Rows with nothing kept get zeros and lse -inf. ``config``:
    overrides of ATTEND_CONFIG (the benchmark's sweep)."""
    return _attend(query, key, value, kept_order, n_kept, scale, bias, lengths, splits, config)


def attend_all(query, key, value, scale: float, bias=None, lengths=None,
               splits: int | None = None, config: dict | None = None):
    """``attend_kept`` with every block kept: exact split-K decode attention (dense). SDPA has
    no fused kernel for a few query rows that takes both GQA and a mask (it falls back to
    math, which copies K and V per group), and its kernels that take a mask run one program
    per (sequence, head) with no split over the keys: this one reads K and V once, spread
    over every SM."""
    return _attend(query, key, value, None, None, scale, bias, lengths, splits,
                   {**ATTEND_ALL_CONFIG, **(config or {})})


def _attend(query, key, value, kept_order, n_kept, scale, bias, lengths, splits, config):
    cfg = {**ATTEND_CONFIG, **(config or {})}
    B, Hq, Lq, D = query.shape
    Hkv, S, DV = key.shape[1], key.shape[2], value.shape[-1]
    rows = rows_of(query, Hkv)
    R = rows.shape[2]
    everything = kept_order is None
    NB = cdiv(S, BLOCK) if everything else kept_order.shape[-1]
    splits = splits or default_splits(B, Hkv, NB, query.device, cfg)
    part_m = torch.empty(B * Hkv, splits, R, device=query.device, dtype=torch.float32)
    part_l = torch.empty_like(part_m)
    part_acc = torch.empty(B * Hkv, splits, R, DV, device=query.device, dtype=torch.float32)
    dummy = part_m
    traceable(_decode_attend_kernel)[(splits, B * Hkv)](
        rows, key, value, bias if bias is not None else dummy,
        lengths if lengths is not None else dummy, dummy if everything else kept_order,
        dummy if everything else n_kept, part_m, part_l, part_acc,
        S, R, Lq, Hkv, NB, float(scale), key.stride(0), key.stride(1), key.stride(2),
        value.stride(0), value.stride(1), value.stride(2),
        *(bias.stride() if bias is not None else (0, 0, 0)),
        D=D, DV=DV, D_PAD=pad_pow2(D), DV_PAD=pad_pow2(DV), R_PAD=max(16, pad_pow2(R)),
        BLOCK_N=BLOCK, KEYS=cfg["keys"], SPLITS=splits, BIAS_KIND=bias_kind(bias),
        HAS_LENGTHS=lengths is not None,
        DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        DOT_UPCAST=INTERPRET and query.dtype == torch.bfloat16, STAGES=cfg["stages"],
        num_warps=cfg["num_warps"], ALL_BLOCKS=everything)
    if _use_kernel(query):
        out = torch.empty(B, Hq, Lq, DV, device=query.device, dtype=query.dtype)
        lse = torch.empty(B, Hq, Lq, device=query.device, dtype=torch.float32)
        traceable(_combine_kernel)[(B * Hkv, R)](
            part_m, part_l, part_acc, out, lse, splits, R, DV=DV, DV_PAD=pad_pow2(DV),
            CHUNK=min(16, next_pow2(splits)), num_warps=4)
        return out, lse
    return combine_splits(part_m, part_l, part_acc, B, Hq, Lq, query.dtype)


@triton.jit
def _combine_kernel(PartM, PartL, PartAcc, Out, Lse, SPLITS, R, DV: tl.constexpr,
                    DV_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """One program: one row of one (sequence, KV head). Merges the splits' online-softmax
    states (``combine_splits`` in one launch); the output [B, Hkv, R, DV] is [B, Hq, Lq, DV]."""
    pid_bh = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1)
    o_s = tl.arange(0, CHUNK)
    o_v = tl.arange(0, DV_PAD)
    m_v = o_v < DV
    m_run = tl.full((), float("-inf"), tl.float32)
    l_run = tl.zeros((), tl.float32)
    acc = tl.zeros((DV_PAD,), tl.float32)
    for c in range(0, SPLITS, CHUNK):
        m_s = (c + o_s) < SPLITS
        part = (pid_bh * SPLITS + c + o_s) * R + r
        m = tl.load(PartM + part, mask=m_s, other=float("-inf"))
        m_new = tl.maximum(m_run, tl.max(m, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp(m - m_safe)  # exp(-inf) = 0 for empty splits
        alpha = tl.exp(m_run - m_safe)
        l_run = l_run * alpha + tl.sum(w * tl.load(PartL + part, mask=m_s, other=0.0), 0)
        a = tl.load(PartAcc + part[:, None] * DV + o_v[None, :], mask=m_s[:, None] & m_v[None, :],
                    other=0.0)
        acc = acc * alpha + tl.sum(w[:, None] * a, 0)
        m_run = m_new
    out = tl.where(l_run > 0, acc / tl.where(l_run > 0, l_run, 1.0), 0.0)
    row = pid_bh * R + r
    tl.store(Out + row * DV + o_v, out.to(Out.dtype.element_ty), mask=m_v)
    m_fin = tl.where(m_run == float("-inf"), 0.0, m_run)
    tl.store(Lse + row, m_fin + tl.log(l_run))


def combine_splits(part_m, part_l, part_acc, B, Hq, Lq, dtype):
    """Merge the splits' online-softmax states: (out, lse) per row (plain torch; the kernel
    above does it in one launch)."""
    m = part_m.amax(1, keepdim=True)
    m_safe = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    w = torch.exp(part_m - m_safe)  # exp(-inf) = 0 for empty splits
    total = (w * part_l).sum(1)
    acc = (w.unsqueeze(-1) * part_acc).sum(1)
    out = torch.where(total.unsqueeze(-1) > 0, acc / total.unsqueeze(-1), torch.zeros_like(acc))
    lse = m_safe.squeeze(1) + torch.log(total)
    DV = part_acc.shape[-1]
    return out.to(dtype).view(B, Hq, Lq, DV), lse.view(B, Hq, Lq)


def decode_attention(query, key, value, summary: KeySummary, eps: float, scale: float,
                     bias=None, lengths=None, splits: int | None = None):
    """(out, lse, keep_rows): certified decode attention with ``summary`` describing ``key``
    exactly as it is now (the caller's duty: see aether_compile/kv_cache.py). keep_rows [B, Hkv,
    R, NB] is what each row itself needed (the union over its KV head is what was read)."""
    S = key.shape[2]
    log_upper, log_lower = decode_bounds(query, summary, S, scale, bias, lengths)
    kept_order, n_kept, keep_rows = select_blocks(log_upper, log_lower, eps)
    out, lse = attend_kept(query, key, value, kept_order, n_kept, scale, bias, lengths, splits)
    return out, lse, keep_rows
