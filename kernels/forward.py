"""The attention kernel and its launch: online-softmax attention over each query tile's key
blocks in best-first order, stopping once the remaining bounded mass is <= eps * the normaliser
so far for every row of the tile, either in-kernel ("stop") or at a count certified on device
from an exact probe of the best blocks ("twopass"). Also the output layout the op returns.
The same semantics in plain torch live in ``reference.py``; tests compare the two.
"""

from __future__ import annotations

import enum

import torch
import triton
import triton.language as tl

from aether_compile import settings

from .certificate import (BOUND_REL_SLACK, LOG2E, MASK_FLOOR, ROW_ANCHOR_BLOCKS, ROW_ANCHOR_LOG2,
                          ROW_BOUND_BF16_SLACK, UNCERTIFIABLE_MAX_LOG2, num_blocks,
                          stop_threshold_log2)
from .jit_common import scores_log2
from .launch import (INTERPRET, is_static, key_step, launch_config, pad_pow2, read_only_flag,
                     traceable, tracing_now)
from .plan import VisitPlan, _log2_mass, _relative_mass, certified_visit_count

# Globals read inside @triton.jit must be constexpr.
_MASK_FLOOR = tl.constexpr(MASK_FLOOR)
_UNCERTIFIABLE_MAX_LOG2 = tl.constexpr(UNCERTIFIABLE_MAX_LOG2)


_SCAN_BLOCKS = tl.constexpr(256)  # tail entries per step of VISIT_CERTIFY's search
_BOUND_REL_SLACK = tl.constexpr(BOUND_REL_SLACK)


class Skip(enum.IntEnum):
    """The attention kernel's int32[1] Skip flag: what a dense/sparse choice tells the pass."""

    PASS = 0  # run the pass (every launch without a dense choice)
    DENSE = 1  # a dense kernel already wrote Out and Lse: return at once
    COUNT_ONLY = 2  # probe and write the certified count (VISIT_CERTIFY's NVisit), nothing else


# How the attention kernel walks a tile's order (its VISIT constexpr).
VISIT_STOP = 0  # check the certificate after every block, stop in-kernel (a while loop)
VISIT_FIXED = 1  # exactly NVisit[tile] blocks (a pipelined loop; the count computed outside)
VISIT_CERTIFY = 2  # a probe of PROBE_BLOCKS, the certified count from it, then the rest


@triton.jit
def _visit_block(
    m_i, l_i, acc, b_q, j, o_m, m_m, o_n0, o_d, o_dv, k_base, v_base, m_base,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, sm_scale_log2, S, D, DV,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, BLOCK_N: tl.constexpr,
    TMA: tl.constexpr,
):
    """Key block ``j`` (BLOCK_N keys) of online softmax, in steps of o_n0's length: returns the
    updated (m_i, l_i, acc); log2 units. With TMA, k_base and v_base are tensor descriptors."""
    for step in tl.static_range(BLOCK_N // o_n0.shape[0]):
        n0 = j * BLOCK_N + step * o_n0.shape[0]
        m_i, l_i, acc = _visit_keys(
            m_i, l_i, acc, b_q, n0, n0 + o_n0, o_m, m_m, o_d, o_dv,
            k_base, v_base, m_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm,
            stride_mn, sm_scale_log2, S, D, DV,
            HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, DOT_PRECISION, DOT_UPCAST, TMA)
    return m_i, l_i, acc


@triton.jit
def _visit_keys(
    m_i, l_i, acc, b_q, n0, o_n, o_m, m_m, o_d, o_dv, k_base, v_base, m_base,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, sm_scale_log2, S, D, DV,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr, TMA: tl.constexpr,
):
    """Keys ``o_n`` (= n0 + 0, 1, ...) of online softmax: returns the updated (m_i, l_i, acc);
    log2 units. With TMA, K and V come through tensor descriptors (k_base, v_base), which fill
    keys past S and channels past D with zeros; the scores mask those keys all the same."""
    m_n = o_n < S
    if TMA:
        b_kt = k_base.load([n0.to(tl.int32), 0]).T  # [D, BN]
    else:
        p_k = k_base + o_n[None, :] * stride_kn + o_d[:, None] * stride_kd
        b_kt = tl.load(p_k, mask=m_n[None, :] & (o_d[:, None] < D), other=0.0)  # [D, BN]
    if DOT_UPCAST:
        b_kt = b_kt.to(tl.float32)
    s = scores_log2(b_q, b_kt, o_m, o_n, m_m, m_n, m_base, stride_mm, stride_mn, sm_scale_log2,
                     HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, DOT_PRECISION)  # [BM, BN]
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == -float("inf"), 0.0, m_new)
    b_p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(b_p, 1)
    if TMA:
        b_v = v_base.load([n0.to(tl.int32), 0])  # [BN, DV]
    else:
        p_v = v_base + o_n[:, None] * stride_vn + o_dv[None, :] * stride_vd
        b_v = tl.load(p_v, mask=m_n[:, None] & (o_dv[None, :] < DV), other=0.0)  # [BN, DV]
    if DOT_UPCAST:
        b_v = b_v.to(tl.float32)
    # the rescaled accumulator as the product's own accumulator (one MMA chain, as Flex and
    # FlashAttention write it) rather than a product added to it afterwards
    acc = tl.dot(b_p.to(b_v.dtype), b_v, acc * alpha[:, None], input_precision=DOT_PRECISION)
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
def _row_log2_norms(m_i, l_i):
    """Each row's log2(Z) so far; -inf for rows that saw only floored keys, none, or NaN."""
    has = l_i > 0
    z = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), -float("inf"))
    return tl.where((z != z) | (m_i <= _UNCERTIFIABLE_MAX_LOG2), -float("inf"), z)


@triton.jit
def _row_certified(
    b_q, q_norm, o_m, m_m, Order, plan, lo, hi, carry, room,
    Geo16, GeoNorm, geo_row0, MaskMax, mask_row0, ref, sm_scale, S, n_kb,
    HAS_MASK: tl.constexpr, IS_CAUSAL: tl.constexpr, EXTRA_SLACK: tl.constexpr,
    BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, ROW_SCAN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Row tails: the first position n in [lo, hi] of the tile's order at which every row's own
    bounded mass of the blocks from n on, sum_j n_j exp(b_ij), is within its ``room``.

    ``carry`` [BM] bounds each row's mass of the positions from ``hi`` on; everything is in units
    of 2^ref (log2), so ``room`` is 2^(threshold_i - ref). Positions are bounded row by row
    (b_ij: the ball of ``_bounds_kernel``, evaluated on this row's raw query) from hi down, ROW_SCAN
    at a time, stopping at the first chunk where some row runs out of room. Returns (n, the
    carry at n). The search never needs to look past its stop again: the next one starts at n
    with its carry, and a normaliser that has grown only adds room."""
    o_d = tl.arange(0, D_PAD)
    o_s = tl.arange(0, ROW_SCAN)
    n = hi
    go = hi > lo
    while go:
        o_p = n - ROW_SCAN + o_s
        valid = o_p >= lo
        j = tl.load(Order + plan + o_p, mask=valid, other=0).to(tl.int64)
        g = geo_row0 + j
        g_mu = tl.load(Geo16 + g[None, :] * (3 * D_PAD) + o_d[:, None], mask=valid[None, :],
                       other=0.0)  # [D_PAD, RS] unit centroids
        n_mu = tl.load(GeoNorm + g * 4, mask=valid, other=0.0)
        rad = tl.load(GeoNorm + g * 4 + 1, mask=valid, other=0.0)
        dot = tl.dot(b_q, g_mu.to(b_q.dtype), input_precision=DOT_PRECISION)  # [BM, RS]
        # q'.mu + |q'| (r + slack): the bounds kernel's ball for each row instead of their max
        bound = (sm_scale * n_mu)[None, :] * dot + q_norm[:, None] * (
            rad + _BOUND_REL_SLACK * (n_mu + rad) + EXTRA_SLACK * n_mu)[None, :]
        bound = tl.where(((n_mu < float("inf")) & (rad < float("inf")))[None, :], bound,
                         float("inf"))
        if HAS_MASK:
            bound = bound + tl.load(MaskMax + mask_row0 + j, mask=valid, other=0.0)[None, :]
        if IS_CAUSAL:  # a block wholly after the row holds none of its keys
            bound = tl.where(j[None, :] * BLOCK_N > o_m[:, None], -float("inf"), bound)
        # n_j exp(b_ij) relative to 2^ref, as the plan's suffix sums take each block's: NaN (from
        # NaN or inf in q) +inf, never below the smallest normal where live
        mass = _relative_mass(_log2_mass(bound, j[None, :], n_kb, S, BLOCK_N), ref)
        mass = tl.where(valid[None, :] & m_m[:, None], mass, 0.0)
        tail = tl.cumsum(mass, 1, reverse=True) + carry[:, None]  # [BM, RS]: from each position
        fits = (tail <= room[:, None]) | ~m_m[:, None]
        all_fit = tl.min(fits.to(tl.int32), 0)  # [RS]
        last_short = tl.max(tl.where(valid & (all_fit == 0), o_p, -1), 0)
        failed = last_short >= 0
        n_new = tl.where(failed, last_short + 1, tl.maximum(lo, n - ROW_SCAN))
        at = tl.sum(tl.where(o_p[None, :] == n_new, tail, 0.0), 1)
        carry = tl.where(n_new < n, at, carry)
        go = (last_short < 0) & (n_new > lo)
        n = n_new
    return n, carry


@triton.jit
def _attention_kernel(
    Q, K, V, Mask, Out, Lse, Kept, Order, TailLog2, NLive, NVisit, Skip, Geo16, GeoNorm, MaskMax,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_xb, stride_xh,  # MaskMax's (batch, head) strides, 0 where broadcast
    sm_scale, sm_scale_log2, stop_log2, EXACT, L, S, D, DV, n_qt, n_kb, H, GROUP,
    HAS_MASK: tl.constexpr, MASK_IS_BOOL: tl.constexpr, IS_CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KEY_STEP: tl.constexpr, D_PAD: tl.constexpr,
    DV_PAD: tl.constexpr, DOT_PRECISION: tl.constexpr, DOT_UPCAST: tl.constexpr,
    VISIT: tl.constexpr,
    PROBE: tl.constexpr, RECERT: tl.constexpr, ROW_TAILS: tl.constexpr,
    EXTRA_SLACK: tl.constexpr, ROW_SCAN: tl.constexpr, ROW_ANCHOR: tl.constexpr,
    ROW_ANCHOR_LOG2: tl.constexpr, ROW_MIN_VISIT: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr, TMA: tl.constexpr,
):
    """VISIT_FIXED (1): visit exactly NVisit[tile] blocks of the order (a plain loop that Triton
    can pipeline; the count comes from the certificate, see ``run_attention``). VISIT_STOP (0):
    visit best-first and stop in-kernel once the certificate holds, recording visited blocks in
    Kept. VISIT_CERTIFY (2): visit the first PROBE blocks, derive the certified count from their
    normalisers exactly as ``certified_visit_count`` does (stop_log2 is then log2(margin * eps),
    or EXACT for eps == 0), store it in NVisit and visit the rest: the two-pass result without
    recomputing the probe's blocks. With RECERT > 0 the count is certified again as the visit
    goes on, with the grown normalisers (fewer blocks, never more), and NVisit ends as the count
    visited. With ROW_TAILS each re-certification also tests every row against its own bounded
    tail (``_row_certified``: per-row balls from Geo16/GeoNorm, MaskMax), not only the tile's.
    Skip[0] == 1 means a dense kernel already wrote Out and Lse; return at once. Skip[0] == 2
    (VISIT_CERTIFY): count only, returning once NVisit is stored (the row sample of the runtime
    dense choice). Every launch passes Skip (zero where there is no dense choice), so the probe and
    the pass are one Triton variant: one compile fewer per model."""
    skip = tl.load(Skip)
    if skip == 1:
        return
    sm_scale = tl.cast(sm_scale, tl.float32)  # Inductor: fp64 or constant floats
    sm_scale_log2 = tl.cast(sm_scale_log2, tl.float32)
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
    o_n0 = tl.arange(0, KEY_STEP)  # keys per online-softmax step: BLOCK_N or a part of it
    m_m = o_m < L
    p_q = Q + b * stride_qb + h * stride_qh + o_m[:, None] * stride_qm + o_d[None, :] * stride_qd
    b_q = tl.load(p_q, mask=m_m[:, None] & (o_d[None, :] < D), other=0.0)  # [BM, D]
    if DOT_UPCAST:
        b_q = b_q.to(tl.float32)
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    if TMA:  # the host checked: last dims contiguous, bases and strides 16-byte aligned
        k_base = tl.make_tensor_descriptor(k_base, shape=[S, D], strides=[stride_kn, 1],
                                           block_shape=[KEY_STEP, D_PAD])
        v_base = tl.make_tensor_descriptor(v_base, shape=[S, DV], strides=[stride_vn, 1],
                                           block_shape=[KEY_STEP, DV_PAD])
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
                    HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, DOT_PRECISION, DOT_UPCAST, BLOCK_N, TMA)
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
            if ROW_TAILS:
                # Row tails (docs/certificate.md): each row's own bounds and normaliser, in units
                # of the probe's tile threshold ``ref``. They start at an anchor past the tile's
                # count whose tile tail leaves every row room, and are searched now and after
                # every step of the loop below.
                ref = thr
                # only tiles whose probe-certified count is at least ROW_MIN_VISIT blocks: the
                # search is latency every searching tile pays, its savings sit in a few tiles
                rows_on = (ref > -float("inf")) & (ref < float("inf")) \
                    & (n_visit >= ROW_MIN_VISIT)
                ref = tl.where(rows_on, ref, 0.0)
                b_qf = b_q.to(tl.float32)
                q_norm = tl.abs(sm_scale) * tl.sqrt(tl.sum(b_qf * b_qf, 1))
                geo_row0 = (b * (H // GROUP) + hk) * n_kb
                mask_row0 = b * stride_xb + h * stride_xh + t * n_kb
                row_n = _first_certified(TailLog2, plan, n_visit,
                                         tl.minimum(n_live, n_visit + ROW_ANCHOR),
                                         ref - ROW_ANCHOR_LOG2)
                anchor = tl.load(TailLog2 + plan + row_n, mask=row_n < n_live,
                                 other=-float("inf"))
                carry = tl.zeros([BLOCK_M], tl.float32) + tl.exp2(anchor - ref)
                if rows_on:
                    room = tl.exp2(stop_log2 + _row_log2_norms(m_i, l_i) - ref)
                    row_n, carry = _row_certified(
                        b_q, q_norm, o_m, m_m, Order, plan, p0, row_n, carry, room,
                        Geo16, GeoNorm, geo_row0, MaskMax, mask_row0, ref, sm_scale, S, n_kb,
                        HAS_MASK, IS_CAUSAL, EXTRA_SLACK, BLOCK_N, D_PAD, ROW_SCAN, DOT_PRECISION)
                    n_visit = tl.minimum(n_visit, row_n)
            while p0 < n_visit:
                p1 = tl.minimum(n_visit, p0 + tl.maximum(RECERT, (n_visit - p0) // 2))
                for p in tl.range(p0, p1, warp_specialize=WARP_SPECIALIZE):
                    j = tl.load(Order + plan + p).to(tl.int64)
                    m_i, l_i, acc = _visit_block(
                        m_i, l_i, acc, b_q, j, o_m, m_m, o_n0, o_d, o_dv, k_base, v_base, m_base,
                        stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                        sm_scale_log2, S, D, DV,
                        HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, DOT_PRECISION, DOT_UPCAST, BLOCK_N, TMA)
                p0 = p1
                thr = tl.where(EXACT != 0, -float("inf"),
                               stop_log2 + _tile_min_log2_norm(m_i, l_i, m_m))
                n_visit = tl.minimum(n_visit, _first_certified(TailLog2, plan, p0, n_visit, thr))
                if ROW_TAILS:
                    if rows_on & (row_n > p0) & (p0 < n_visit):
                        room = tl.exp2(stop_log2 + _row_log2_norms(m_i, l_i) - ref)
                        row_n, carry = _row_certified(
                            b_q, q_norm, o_m, m_m, Order, plan, p0, row_n, carry, room,
                            Geo16, GeoNorm, geo_row0, MaskMax, mask_row0, ref, sm_scale, S, n_kb,
                            HAS_MASK, IS_CAUSAL, EXTRA_SLACK, BLOCK_N, D_PAD, ROW_SCAN,
                            DOT_PRECISION)
                        n_visit = tl.minimum(n_visit, row_n)
            tl.store(NVisit + pid, n_visit)
        else:
            for p in tl.range(first, n_visit, warp_specialize=WARP_SPECIALIZE):
                j = tl.load(Order + plan + p).to(tl.int64)
                m_i, l_i, acc = _visit_block(
                    m_i, l_i, acc, b_q, j, o_m, m_m, o_n0, o_d, o_dv, k_base, v_base, m_base,
                    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                    sm_scale_log2, S, D, DV,
                    HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, DOT_PRECISION, DOT_UPCAST, BLOCK_N, TMA)
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
                HAS_MASK, MASK_IS_BOOL, IS_CAUSAL, DOT_PRECISION, DOT_UPCAST, BLOCK_N, TMA)
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


# Blocks the two-pass forward computes exactly before fixing each tile's visit count.
PROBE_BLOCKS = 8
FORWARD_MODES = settings.FORWARD_MODES


# VISIT_CERTIFY re-certifies after visiting half of what is left, at least this many blocks,
# where a row of tiles has at least RECERT_MIN_KEY_BLOCKS key blocks. On the H100 (W2 clustered,
# the retired benchmarks/bench_recert.py at 1cc4367) the pass took 20% less time at 128K (kept
# 3.3% -> 2.5%) and 5% less at 64K, but 2.6% more at 32K and the same at 16K, where the probe's
# blocks already hold most of each row's mass and the extra loop boundaries cost more than they
# save. At d751ef9 (sweep_prefill_kernels, 128-key blocks at 128K, 64-key at 32K): 9.91 against
# 10.68 ms at 128K, 3.78 against 3.82 at 32K (forced).
RECERT_BLOCKS = 8
RECERT_MIN_KEY_BLOCKS = 1024
# Positions of a tile's order that the row-tail search bounds at a time (one [BLOCK_M, D] x
# [D, ROW_SCAN] product): about 1/256 of a visited block's multiply-adds per position.
ROW_SCAN_BLOCKS = 32
# Row tails search only tiles whose count certified from the probe is at least this many blocks
# (0: every tile). On W2 at 128K most tiles certify 10-24 blocks, and row tails change none of
# them; the blocks they save are in tiles of 30-50 (research/row_tails_kept.py). H100, 5e9efcc,
# the pass at 128K against the tile's tail alone: ungated 1.199x the time for 0.787x the blocks,
# 32: 1.036x for 0.790x, 48: 1.016x for 0.797x (sweep_prefill_kernels' row_tails part).
ROW_MIN_VISIT_BLOCKS = 48
# The visit loops as Triton warp-specialized loops (``tl.range(..., warp_specialize=True)``:
# loads in producer warps, the dots and softmax in consumer warps). Off until measured on the
# GPU against the plain pipelined loops and Flex on the same blocks (sweep_prefill_kernels'
# attention part times both); issue 22 needs the pass nearer cuDNN's throughput per block.
WARP_SPECIALIZE = False
# K and V read through tensor descriptors (TMA on Hopper) rather than pointer loads, where their
# layout allows it (``_tma_loads_serve``); Triton's Hopper warp specialization wants them. Off
# until the same sweep measures it.
TMA_LOADS = False


def _tma_loads_serve(key: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether K and V can be read through tensor descriptors: last dim contiguous, every other
    stride and the base 16-byte aligned (the per-head bases the kernel offsets to are then
    aligned too). Sets Triton's scratch allocator for the descriptors a kernel builds, where
    none is set. Eager launches only for now: traced tensors have no address to check."""
    if tracing_now():
        return False
    for t in (key, value):
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(
                (st * size) % 16 for st in t.stride()[:-1]):
            return False
    _ensure_allocator()
    return True


def _ensure_allocator() -> None:
    try:  # where this Triton keeps it (3.6-3.9); otherwise set ours
        from triton.runtime import _allocation

        current = getattr(_allocation, "_allocator", None)
        current = current.get() if hasattr(current, "get") else current
    except ImportError:
        current = None
    if current is None or type(current).__name__ == "NullAllocator":
        triton.set_allocator(lambda size, align, stream: torch.empty(
            size, dtype=torch.int8, device="cuda" if torch.cuda.is_available() else "cpu"))


def recert_blocks(n_key_blocks=None) -> int:
    """VISIT_CERTIFY's re-certification step for a row of ``n_key_blocks`` key blocks: 0 (the
    count fixed from the probe alone) below RECERT_MIN_KEY_BLOCKS or where the count is symbolic,
    else ``RECERT_BLOCKS``. AETHER_RECERT_BLOCKS sets the step (0: off) for every length. Read when
    a launch is issued or traced."""
    override = settings.recert_blocks_override()
    if override is not None:
        return override
    if n_key_blocks is None or not is_static(n_key_blocks) or n_key_blocks < RECERT_MIN_KEY_BLOCKS:
        return 0
    return RECERT_BLOCKS


def forward_mode(mode: str | None = None) -> str:
    """The forward's mode: ``mode``, else AETHER_FORWARD_MODE, else "twopass"."""
    return settings.forward_mode(mode)


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


def launch_attention(query, key, value, plan: VisitPlan, eps: float, n_visit, kept,
                      out=None, lse=None, skip=None, certify=False):
    """One attention pass; writes into ``out``/``lse`` when given (skipped entirely where
    ``skip[0]`` is set), else into new buffers. n_visit: the per-tile counts to visit
    (VISIT_FIXED), None to stop in-kernel (VISIT_STOP), or with ``certify`` the int32 [B, H, nQT]
    buffer that receives the certified counts (VISIT_CERTIFY)."""
    B, H, L, S, D, DV = plan.B, plan.H, plan.L, plan.S, plan.D, plan.DV
    dev = query.device
    # from the lengths, not plan.order's shape: traced, the order's dims may be unbacked sizes
    # (ops._fake_block_count), which the grid and the host's choices of RECERT should not read
    nqt, nkb = num_blocks(L, plan.block_m), num_blocks(S, plan.block_n)
    d_pad, dv_pad = pad_pow2(D), pad_pow2(DV)
    mask4 = plan.mask4
    has_mask = mask4 is not None
    mask_elem_strides = ([st if sz > 1 else 0 for st, sz in zip(mask4.stride(), mask4.shape)]
                         if has_mask else [0, 0, 0, 0])
    if out is None:
        out = new_out(query, DV)
        lse = torch.empty(B, H, L, device=dev, dtype=torch.float32)
    if skip is None:  # no dense choice: the pass always runs
        skip = read_only_flag(Skip.PASS, dev)
    # A finite stand-in for -inf (eps == 0): scalars reach Inductor's generated code as literals.
    # VISIT_CERTIFY reads eps == 0 from EXACT instead.
    stop_log2 = max(stop_threshold_log2(eps), MASK_FLOOR)
    visit = VISIT_CERTIFY if certify else VISIT_FIXED if n_visit is not None else VISIT_STOP
    recert = recert_blocks(nkb) if certify else 0
    geometry = plan.geometry if recert > 0 and settings.row_tails() else None
    mask_max = geometry.mask_max if geometry is not None else None
    if has_mask and mask_max is None:  # no maxima of this mask: the tile's tail alone
        geometry = None
    traceable(_attention_kernel)[(B * H * nqt,)](
        query, key, value, mask4 if has_mask else query, out, lse, kept if kept is not None else lse,
        plan.order, plan.tail_log2, plan.n_live, n_visit if n_visit is not None else plan.n_live,
        skip, *(geometry[:2] if geometry is not None else (query, query)),
        mask_max if mask_max is not None else query,
        *query.stride(), *key.stride(), *value.stride(), *mask_elem_strides, *out.stride(),
        *(geometry.mask_strides if mask_max is not None else (0, 0)),
        plan.scale, plan.scale * LOG2E, stop_log2, int(eps <= 0.0), L, S, D, DV, nqt, nkb, H,
        plan.group,
        HAS_MASK=has_mask, MASK_IS_BOOL=has_mask and mask4.dtype == torch.bool,
        IS_CAUSAL=plan.is_causal, BLOCK_M=plan.block_m, BLOCK_N=plan.block_n,
        KEY_STEP=key_step(plan.block_n, dev.type), D_PAD=d_pad,
        DV_PAD=dv_pad, DOT_PRECISION="ieee" if query.dtype == torch.float32 else "tf32",
        # Triton's interpreter computes bf16 tl.dot wrongly; upcast there (CPU tests only).
        DOT_UPCAST=INTERPRET and query.dtype == torch.bfloat16, VISIT=visit, PROBE=PROBE_BLOCKS,
        RECERT=recert, ROW_TAILS=geometry is not None,
        EXTRA_SLACK=ROW_BOUND_BF16_SLACK if query.dtype == torch.bfloat16 else 0.0,
        ROW_SCAN=ROW_SCAN_BLOCKS, ROW_ANCHOR=ROW_ANCHOR_BLOCKS, ROW_ANCHOR_LOG2=ROW_ANCHOR_LOG2,
        ROW_MIN_VISIT=ROW_MIN_VISIT_BLOCKS, WARP_SPECIALIZE=WARP_SPECIALIZE,
        TMA=TMA_LOADS and _tma_loads_serve(key, value),
        **launch_config(plan.block_m, d_pad, dv_pad, dev.type))
    return out, lse


def probe_visit_count(query, key, value, plan: VisitPlan, eps: float) -> torch.Tensor:
    """Two-pass's first pass: an exact probe over each tile's best blocks, turned on device into
    the certified visit count per tile."""
    probe = torch.clamp(plan.n_live, max=PROBE_BLOCKS)
    _, probe_lse = launch_attention(query, key, value, plan, eps, probe, None)
    return certified_visit_count(plan, probe_lse, probe, eps)


def certified_counts(query, key, value, plan: VisitPlan, eps: float) -> torch.Tensor:
    """int32 [B, H, nQT]: each tile's certified visit count, as ``probe_visit_count`` computes it,
    from one count-only launch of the attention kernel (VISIT_CERTIFY, Skip 2): the probe and the
    count on device, nothing after. A handful of host calls where the probe and
    ``certified_visit_count`` take about thirty; the row sample is issued from Python every call."""
    n_visit = torch.empty(plan.B, plan.H, plan.order.shape[-2], device=query.device,
                          dtype=torch.int32)
    count_only = read_only_flag(Skip.COUNT_ONLY, query.device)
    launch_attention(query, key, value, plan, eps, n_visit, None, skip=count_only, certify=True)
    return n_visit
