"""The visit plan: stages 1-4 of the forward (geometry, mask statistics, bounds, best-first
order with the suffix bound mass), what the certificate makes of a probe's normalisers, and the
kept maps of visits. No host synchronisation anywhere.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from aether_compile import settings

from .bounds import _bool_mask_stats_kernel, _bounds_kernel, _geometry_kernel, _mask_stats_kernel
from .certificate import (BOUND_REL_SLACK, LOG2E, SMALLEST_NORMAL, UNCERTIFIABLE_MAX_LOG2,
                          num_blocks, plan_visits, sort_index_bits, stop_threshold_log2,
                          use_box_bound)
from .launch import bounds_config, cdiv, default_blocks, eager_constant, is_static, mask_as_4d, \
    next_pow2, pad_pow2, traceable


_SMALLEST_NORMAL = tl.constexpr(SMALLEST_NORMAL)


@triton.jit
def _ordered_bits(x):
    """float32 -> int32 with the same order (negative floats' magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _log2_mass(bound, idx, n_kb, S, BLOCK_N: tl.constexpr):
    """log2 of each block's bounded mass, n_j * exp(bound): -inf for dead blocks and slots past
    the row, +inf for blocks that must be visited (NaN bounds included)."""
    bound = tl.where(bound != bound, float("inf"), bound)
    keys = tl.where(idx == n_kb - 1, S - (n_kb - 1) * BLOCK_N, BLOCK_N).to(tl.float32)
    return tl.where(idx < n_kb, bound * 1.4426950408889634 + tl.log2(keys), -float("inf"))


@triton.jit
def _relative_mass(log2_mass, top):
    """2^(log2_mass - top), a live block's never below the smallest normal float (exp2 may flush
    below it, and a tail must never undercount); +inf stays +inf, -inf gives 0."""
    finite = (log2_mass > -float("inf")) & (log2_mass < float("inf"))
    return tl.where(finite, tl.maximum(tl.exp2(log2_mass - top), _SMALLEST_NORMAL),
                    tl.where(log2_mass > 0, float("inf"), 0.0))


@triton.jit
def _plan_kernel(
    Bounds, Order, TailLog2, NLive,
    L, S, n_qt, n_kb,
    IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NKB_PAD: tl.constexpr, IDX_BITS: tl.constexpr, TOP: tl.constexpr,
):
    """certificate.plan_visits for one (batch, head, query tile) row of Bounds, in registers: the
    same order, the suffix sums of bounded mass in log2 units, and the live count. With
    TOP >= NKB_PAD every block is sorted (descending bound to 32 - IDX_BITS bits, ties by block
    index, the causal priority block first). With a smaller TOP only the best blocks are: those
    whose key's upper 16 bits reach the smallest threshold that at most TOP blocks reach; the
    other live blocks follow in block order, then the dead ones. The tails follow whatever order
    results, so the certificate holds either way; only blocks past the sorted ones are visited
    in worse than best-first order."""
    pid = tl.program_id(0).to(tl.int64)
    t = pid % n_qt
    row = pid * n_kb
    o_j = tl.arange(0, NKB_PAD)
    in_row = o_j < n_kb
    bound = tl.load(Bounds + row + o_j, mask=in_row, other=-float("inf"))
    bound = tl.where(bound != bound, float("inf"), bound)  # NaN: must be visited
    live = bound > -float("inf")
    key = bound
    if IS_CAUSAL:  # the block holding key t * BLOCK_M, the tile's first row's own position
        first_row = t * BLOCK_M
        prio = (o_j == first_row // BLOCK_N) & (first_row < S) & live
        key = tl.where(prio, float("inf"), key)
    # Sort (key desc, index asc) as one int32: the order-preserving float bits with their low
    # IDX_BITS cleared above, the inverted index below, so that a plain descending sort breaks
    # ties by the lower block index (certificate.sort_keys). Half the sort's int64 shuffles and
    # registers; the order is best-first to 2^(IDX_BITS - 23) of each bound.
    packed = (_ordered_bits(key) >> IDX_BITS << IDX_BITS) | (NKB_PAD - 1 - o_j)
    # Suffix sums of each block's mass relative to the row's largest finite one: one exp2 and one
    # log2 an entry and a scan of adds (a log-add-exp scan took 62% of this kernel's sm_90
    # instructions at 2048 blocks).
    log2_mass = _log2_mass(bound, o_j, n_kb, S, BLOCK_N)
    finite = live & (log2_mass < float("inf"))
    top = tl.max(tl.where(finite, log2_mass, -float("inf")), 0)
    top = tl.where(top > -float("inf"), top, 0.0)
    if TOP >= NKB_PAD:
        packed = tl.sort(packed, descending=True)
        idx = NKB_PAD - 1 - (packed & (NKB_PAD - 1))
        sorted_bound = tl.load(Bounds + row + idx, mask=idx < n_kb, other=-float("inf"))
        rel = _relative_mass(_log2_mass(sorted_bound, idx, n_kb, S, BLOCK_N), top)
        tail = top + tl.log2(tl.cumsum(rel, 0, reverse=True))
        tl.store(Order + row + o_j, idx, mask=in_row)
        tl.store(TailLog2 + row + o_j, tail, mask=in_row)
    else:
        # The threshold: the smallest T with at most TOP keys' upper 16 bits >= T (a binary
        # search of 16 counts; at least TOP + 1 blocks are in the row, as NKB_PAD > TOP).
        high = packed >> 16
        lo = tl.full([], -32768, tl.int32)  # more than TOP reach lo, at most TOP reach hi
        hi = tl.full([], 32768, tl.int32)
        for _ in range(16):
            mid = (lo + hi) >> 1
            above = tl.sum(((high >= mid) & in_row).to(tl.int32), 0)
            lo = tl.where(above > TOP, mid, lo)
            hi = tl.where(above > TOP, hi, mid)
        hot = (high >= hi) & in_row
        cold = live & ~hot
        # Positions: the sorted ones first, then the other live blocks and the dead ones, each in
        # block order (one scan counts both kinds before each block: hot low, cold high bits).
        before = tl.cumsum(hot.to(tl.int32) + (cold.to(tl.int32) << 16), 0)
        hot_before = (before & 0xFFFF) - hot.to(tl.int32)
        cold_before = (before >> 16) - cold.to(tl.int32)
        n_hot = tl.sum(hot.to(tl.int32), 0)
        n_cold = tl.sum(cold.to(tl.int32), 0)
        pos = tl.where(hot, hot_before, tl.where(cold, n_hot + cold_before,
                                                 n_hot + n_cold + o_j - hot_before - cold_before))
        cold_rel = tl.where(cold, _relative_mass(log2_mass, top), 0.0)
        cold_tail = tl.cumsum(cold_rel, 0, reverse=True)
        tl.store(Order + row + pos, o_j, mask=in_row & ~hot)
        tl.store(TailLog2 + row + pos, tl.where(cold, top + tl.log2(cold_tail), -float("inf")),
                 mask=in_row & ~hot)
        # The sorted blocks pass through Order (their slots, rewritten below) to one TOP-long
        # register row; barriers because other threads of the program read what one stored.
        tl.store(Order + row + pos, packed, mask=hot)
        tl.debug_barrier()
        o_t = tl.arange(0, TOP)
        in_top = o_t < n_hot
        top_keys = tl.load(Order + row + o_t, mask=in_top, other=-2147483648)
        tl.debug_barrier()
        top_keys = tl.sort(top_keys, descending=True)
        idx = NKB_PAD - 1 - (top_keys & (NKB_PAD - 1))
        sorted_bound = tl.load(Bounds + row + idx, mask=in_top, other=-float("inf"))
        rel = _relative_mass(_log2_mass(sorted_bound, tl.where(in_top, idx, n_kb), n_kb, S,
                                        BLOCK_N), top)
        tail = top + tl.log2(tl.cumsum(rel, 0, reverse=True) + tl.sum(cold_rel, 0))
        tl.store(Order + row + o_t, idx, mask=in_top)
        tl.store(TailLog2 + row + o_t, tail, mask=in_top)
    tl.store(NLive + pid, tl.sum(live.to(tl.int32), 0))


# Rows up to this many key blocks are planned by _plan_kernel (register sort); longer rows use
# the torch ops of certificate.plan_visits. AETHER_PLAN=torch forces the torch ops throughout.
FUSED_PLAN_MAX_BLOCKS = 4096


# Rows of at least this many (padded) key blocks sort only their best half; the rest follow in
# block order (_plan_kernel's TOP). Shorter rows sort every block. On W2 at 128K (H100, 14e944f,
# benchmarks/sweep_prefill_kernels.py) sorting 1024 of 2048 blocks took the plan kernel from
# 1.62 to 1.06 ms and the call from 15.64 to 15.14 ms (kept 2.47% -> 2.49%); sorting 512 took
# 0.77 ms but kept 2.85% (16.68 ms), 256 kept 3.43% (18.84 ms): tiles whose certified count
# passes the sorted head visit the rest in block order.
PARTIAL_SORT_MIN_BLOCKS = 1024


def sorted_blocks(n_kb: int) -> int:
    """How many of a row's ``n_kb`` blocks the plan sorts (its TOP): all of them (the padded row)
    below PARTIAL_SORT_MIN_BLOCKS, else half the padded row. AETHER_PLAN_SORTED overrides it (a
    power of two; 0: all)."""
    nkb_pad = max(16, next_pow2(n_kb))
    override = settings.plan_sorted_override()
    if override is not None:
        top = override or nkb_pad
    else:
        top = nkb_pad if nkb_pad < PARTIAL_SORT_MIN_BLOCKS else nkb_pad // 2
    return nkb_pad if top >= n_kb else top


def plan_warps(nkb_pad: int) -> int:
    """The plan kernel's warps for a padded row of ``nkb_pad`` blocks."""
    return 4 if nkb_pad <= 1024 else 8


def plan_visits_fused(bounds, S, block_m, block_n, is_causal, L, top=None):
    """``certificate.plan_visits`` as one Triton kernel; None where it does not apply. ``top``:
    how many blocks to sort (a power of two; by default ``sorted_blocks``)."""
    B, H, nqt, nkb = bounds.shape
    if not settings.fused_plan() or not is_static(nkb) \
            or nkb > FUSED_PLAN_MAX_BLOCKS or nkb == 0:
        return None
    order = torch.empty(B, H, nqt, nkb, device=bounds.device, dtype=torch.int32)
    tail = torch.empty(B, H, nqt, nkb, device=bounds.device, dtype=torch.float32)
    n_live = torch.empty(B, H, nqt, device=bounds.device, dtype=torch.int32)
    nkb_pad = max(16, next_pow2(nkb))
    top = sorted_blocks(nkb) if top is None else nkb_pad if top >= nkb else top
    traceable(_plan_kernel)[(B * H * nqt,)](
        bounds, order, tail, n_live, L, S, nqt, nkb,
        IS_CAUSAL=is_causal, BLOCK_M=block_m, BLOCK_N=block_n, NKB_PAD=nkb_pad,
        IDX_BITS=sort_index_bits(nkb), TOP=top,
        **({"num_warps": plan_warps(nkb_pad)} if bounds.device.type == "cuda" else {}))
    return order, tail, n_live


class KeyGeometry(NamedTuple):
    """What the bounds kernel read, kept for the attention kernel's per-row bounds (row tails):
    the key blocks' fp16 unit centroids and fp32 norms (``_geometry_kernel``'s Geo16, GeoNorm)
    and the mask's per-(tile, block) maximum with its (batch, head) strides, or None."""

    unit: torch.Tensor  # fp16 [B * Hkv * nKB, 3, D_PAD]
    norms: torch.Tensor  # fp32 [B * Hkv * nKB, 4]
    mask_max: torch.Tensor | None  # fp32 [Bm, Hm, nQT, nKB]
    mask_strides: tuple  # mask_max's (batch, head) strides, 0 where broadcast


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
    geometry: KeyGeometry | None = None  # where the plan was made here: row tails can use it


# The geometry kernel's warps: one 64 x 128 block a program, whose reductions cross fewer warps
# with fewer (H100, 15aa5cf, W2 at 128K: 0.24 ms with 2 warps, 0.31 with 1, 0.54 with Triton's
# default of 4, 1.01 with 8; at 32K 0.069 against 0.142 with 4).
GEOMETRY_WARPS = 2

# Key blocks per program of the mask-statistics kernels, and the rows per load of the bool one.
# The bool kernel's: the sweep's steadiest (H100, 7f11e03: 2.0 ms for a 4.3 GB mask whether the
# launch knew its lengths to be multiples of 16 or not; 8 rows and 16 blocks took 2.0 and 2.7).
MASK_STATS_BLOCKS = 16
BOOL_MASK_BLOCKS = 8
BOOL_MASK_ROWS = 4


def mask_statistics(mask4, L, S, block_m, block_n):
    """A [Bm, Hm, L, S] mask's maximum per (query tile, key block) (float32 [Bm, Hm, nQT, nKB];
    0 or -inf for a bool mask) and per tile the count of entries unlike top-left causal
    (int32 [Bm*Hm*nQT])."""
    Bm, Hm = mask4.shape[:2]
    nqt, nkb = num_blocks(L, block_m), num_blocks(S, block_n)
    mask_max = torch.empty(Bm, Hm, nqt, nkb, device=mask4.device, dtype=torch.float32)
    not_causal = torch.zeros(Bm * Hm * nqt, device=mask4.device, dtype=torch.int32)
    if mask4.dtype == torch.bool:
        traceable(_bool_mask_stats_kernel)[(Bm * Hm * nqt, cdiv(nkb, BOOL_MASK_BLOCKS))](
            mask4, mask_max, not_causal, *mask4.stride(), L, S, nqt, nkb, Hm,
            ROWS=min(BOOL_MASK_ROWS, block_m), KB=BOOL_MASK_BLOCKS,
            BLOCK_M=block_m, BLOCK_N=block_n)
    else:
        traceable(_mask_stats_kernel)[(Bm * Hm * nqt, cdiv(nkb, MASK_STATS_BLOCKS))](
            mask4, mask_max, not_causal, *mask4.stride(), L, S, nqt, nkb, Hm,
            MASK_STATS_BLOCKS, BLOCK_M=block_m, BLOCK_N=block_n)
    return mask_max, not_causal


def tile_bounds(query, key, attn_mask, is_causal: bool, scale: float, block_m: int, block_n: int,
                mask_stats=None):
    """Stages 1-3: per (batch, head, query tile, key block) an upper bound on every score of the
    tile's rows against the block's keys, mask included (float32 [B, H, nQT, nKB], natural log
    units; -inf: nothing live, +inf: must be visited). Returns (bounds, the mask as a 4-D view
    or None, its per-tile count of entries unlike causal or None). ``mask_stats``: the mask's
    ``mask_statistics`` where the caller has them already."""
    return tile_bounds_and_geometry(query, key, attn_mask, is_causal, scale, block_m, block_n,
                                    mask_stats)[:3]


def tile_bounds_and_geometry(query, key, attn_mask, is_causal: bool, scale: float, block_m: int,
                             block_n: int, mask_stats=None):
    """``tile_bounds``' three results and the ``KeyGeometry`` they were computed from."""
    B, H, L, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    D = int(D)
    dev = query.device
    nqt, nkb = num_blocks(L, block_m), num_blocks(S, block_n)
    d_pad = pad_pow2(D)
    with_box = use_box_bound()  # read once: the geometry and the bounds kernel must agree
    geo16 = torch.empty(B * Hkv * nkb, 3, d_pad, device=dev, dtype=torch.float16)
    geo_norm = torch.empty(B * Hkv * nkb, 4, device=dev, dtype=torch.float32)
    traceable(_geometry_kernel)[(B * Hkv * nkb,)](
        key, geo16, geo_norm, *key.stride(), S, D, nkb, Hkv,
        BLOCK_N=block_n, D_PAD=d_pad, WITH_BOX=with_box,
        **({"num_warps": GEOMETRY_WARPS} if dev.type == "cuda" else {}))

    mask4 = mask_not_causal = None
    mask_max, mask_strides = query, (0, 0)  # placeholders when there is no mask
    if attn_mask is not None:
        mask4 = mask_as_4d(attn_mask, B, H, L, S)
        mask_max, mask_not_causal = mask_stats or mask_statistics(mask4, L, S, block_m, block_n)
        Bm, Hm = mask4.shape[:2]
        mask_strides = (mask_max.stride(0) if Bm > 1 else 0, mask_max.stride(1) if Hm > 1 else 0)

    bounds = torch.empty(B, H, nqt, nkb, device=dev, dtype=torch.float32)
    traceable(_bounds_kernel)[(B * H * nqt,)](
        query, geo16, geo_norm, mask_max, bounds, *query.stride(), *mask_strides,
        scale, L, S, D, nqt, nkb, H, H // Hkv,
        HAS_MASK=mask4 is not None, IS_CAUSAL=is_causal, SLACK=BOUND_REL_SLACK,
        USE_BOX=with_box, BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad,
        **bounds_config(d_pad, dev.type, with_box))
    geometry = KeyGeometry(geo16, geo_norm, None if mask4 is None else mask_max, mask_strides)
    return bounds, mask4, mask_not_causal, geometry


def plan_blocks(query, key, value, attn_mask=None, block_m=None, block_n=None) -> tuple[int, int]:
    """The tiles ``plan_attention`` uses: those given, else its device's defaults for the head
    dims and the key length."""
    d_block_m, d_block_n = default_blocks(max(int(query.shape[-1]), int(value.shape[-1])),
                                          query.device.type, key.shape[-2], attn_mask is not None)
    return block_m or d_block_m, block_n or d_block_n


def plan_attention(query, key, value, attn_mask=None, is_causal=False, scale=None,
                   block_m=None, block_n=None, mask_stats=None) -> VisitPlan:
    """Stages 1-4: key geometry, mask statistics, bounds, best-first order. No host sync."""
    B, H, L, D = query.shape
    Hkv, S, DV = key.shape[1], key.shape[2], value.shape[-1]
    D, DV = int(D), int(DV)  # head dims pick constexpr tiles: specialise them under dynamic shapes
    block_m, block_n = plan_blocks(query, key, value, attn_mask, block_m, block_n)
    scale = D ** -0.5 if scale is None else float(scale)
    bounds, mask4, mask_not_causal, geometry = tile_bounds_and_geometry(
        query, key, attn_mask, is_causal, scale, block_m, block_n, mask_stats)

    planned = plan_visits_fused(bounds, S, block_m, block_n, is_causal, L)
    order, tail_log2, n_live = planned or plan_visits(bounds, S, block_m, block_n, is_causal, L)
    return VisitPlan(B, H, L, S, D, DV, H // Hkv, scale, block_m, block_n, is_causal, mask4,
                     order, tail_log2, n_live, mask_not_causal, geometry)


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


def kept_map(plan: VisitPlan, n_visit: torch.Tensor) -> torch.Tensor:
    """[B, H, nQT, nKB] bool: the first n_visit blocks of each tile's order."""
    nqt, nkb = plan.order.shape[-2], plan.order.shape[-1]
    visited = torch.arange(nkb, device=n_visit.device) < n_visit.unsqueeze(-1)
    kept = torch.zeros(plan.B, plan.H, nqt, nkb, device=n_visit.device, dtype=torch.bool)
    return kept.scatter(-1, plan.order.long(), visited)


def causal_block_map(L, nqt: int, nkb: int, block_m: int, block_n: int, device) -> torch.Tensor:
    """[nqt, nkb] bool: the key blocks a top-left causal query tile reaches (a key at or before
    its last row)."""
    last_row = torch.clamp((torch.arange(nqt, device=device) + 1) * block_m, max=L) - 1
    return (torch.arange(nkb, device=device) * block_n)[None, :] <= last_row[:, None]


def all_live_blocks(L, S, block_m, block_n, is_causal, B, H, device, blocks=None) -> torch.Tensor:
    """kept map of dense attention without a mask: every block, or the top-left causal ones.
    ``blocks``: the map's (query tiles, key blocks) where a traced caller has them as sizes of
    its own (unbacked, ``ops._fake_block_count``), else they follow from L and S."""
    nqt, nkb = blocks if blocks is not None else (num_blocks(L, block_m), num_blocks(S, block_n))
    if not is_causal:
        return torch.ones(B, H, nqt, nkb, dtype=torch.bool, device=device)
    live = cached_causal_block_map(L, nqt, nkb, block_m, block_n, device)
    return live.expand(B, H, nqt, nkb).clone(memory_format=torch.contiguous_format)


def cached_causal_block_map(L, nqt, nkb, block_m, block_n, device) -> torch.Tensor:
    """``causal_block_map``, shared by eager calls of one shape (``eager_constant``). Building it
    is six tiny kernels, and W1's 4K causal call, which cuDNN runs in 0.16 ms on an H100, took
    0.18 ms through the op's static dense path. Callers must not write to it."""
    if not isinstance(L, int):
        return causal_block_map(L, nqt, nkb, block_m, block_n, device)
    return eager_constant(("causal", L, nqt, nkb, block_m, block_n, torch.device(device)),
                           lambda: causal_block_map(L, nqt, nkb, block_m, block_n, device))
