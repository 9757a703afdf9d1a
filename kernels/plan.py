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
from .certificate import (BOUND_REL_SLACK, LOG2E, UNCERTIFIABLE_MAX_LOG2, num_blocks, plan_visits,
                          sort_index_bits, stop_threshold_log2, use_box_bound)
from .launch import bounds_config, cdiv, default_blocks, eager_constant, is_static, mask_as_4d, \
    next_pow2, pad_pow2, traceable


@triton.jit
def _logaddexp(a, b):
    m = tl.maximum(a, b)
    inf = (m == -float("inf")) | (m == float("inf"))  # exp(a - m) would be NaN
    safe = tl.where(inf, 0.0, m)
    return tl.where(inf, m, safe + tl.log(tl.exp(a - safe) + tl.exp(b - safe)))


@triton.jit
def _ordered_bits(x):
    """float32 -> int32 with the same order (negative floats' magnitude bits flipped)."""
    bits = x.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _plan_kernel(
    Bounds, Order, TailLog2, NLive,
    L, S, n_qt, n_kb,
    IS_CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NKB_PAD: tl.constexpr, IDX_BITS: tl.constexpr,
):
    """certificate.plan_visits for one (batch, head, query tile) row of Bounds, in registers: the
    same order (descending bound to 32 - IDX_BITS bits, ties by block index, the causal priority
    block first), the suffix log-sum-exp of bounded mass in log2 units, and the live count."""
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
    # Sort (key desc, index asc) as one int32: the order-preserving float bits with their low
    # IDX_BITS cleared above, the inverted index below, so that a plain descending sort breaks
    # ties by the lower block index (certificate.sort_keys). Half the sort's int64 shuffles and
    # registers; the order is best-first to 2^(IDX_BITS - 23) of each bound, and the tail sums
    # below follow the order as it is, so the certificate does not depend on it.
    packed = (_ordered_bits(key) >> IDX_BITS << IDX_BITS) | (NKB_PAD - 1 - o_j)
    packed = tl.sort(packed, descending=True)
    idx = NKB_PAD - 1 - (packed & (NKB_PAD - 1))
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
    if not settings.fused_plan() or not is_static(nkb) \
            or nkb > FUSED_PLAN_MAX_BLOCKS or nkb == 0:
        return None
    order = torch.empty(B, H, nqt, nkb, device=bounds.device, dtype=torch.int32)
    tail = torch.empty(B, H, nqt, nkb, device=bounds.device, dtype=torch.float32)
    n_live = torch.empty(B, H, nqt, device=bounds.device, dtype=torch.int32)
    nkb_pad = max(16, next_pow2(nkb))
    traceable(_plan_kernel)[(B * H * nqt,)](
        bounds, order, tail, n_live, L, S, nqt, nkb,
        IS_CAUSAL=is_causal, BLOCK_M=block_m, BLOCK_N=block_n, NKB_PAD=nkb_pad,
        IDX_BITS=sort_index_bits(nkb),
        **({"num_warps": 4 if nkb_pad <= 1024 else 8} if bounds.device.type == "cuda" else {}))
    return order, tail, n_live


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
    B, H, L, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    D = int(D)
    dev = query.device
    nqt, nkb = num_blocks(L, block_m), num_blocks(S, block_n)
    d_pad = pad_pow2(D)
    geo16 = torch.empty(B * Hkv * nkb, 3, d_pad, device=dev, dtype=torch.float16)
    geo_norm = torch.empty(B * Hkv * nkb, 4, device=dev, dtype=torch.float32)
    traceable(_geometry_kernel)[(B * Hkv * nkb,)](
        key, geo16, geo_norm, *key.stride(), S, D, nkb, Hkv,
        BLOCK_N=block_n, D_PAD=d_pad)

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
        USE_BOX=use_box_bound(),
        BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad,
        **bounds_config(d_pad, dev.type, use_box_bound()))
    return bounds, mask4, mask_not_causal


def plan_blocks(query, value, block_m=None, block_n=None) -> tuple[int, int]:
    """The tiles ``plan_attention`` uses: those given, else its device's defaults for the head
    dims."""
    d_block_m, d_block_n = default_blocks(max(int(query.shape[-1]), int(value.shape[-1])),
                                          query.device.type)
    return block_m or d_block_m, block_n or d_block_n


def plan_attention(query, key, value, attn_mask=None, is_causal=False, scale=None,
                   block_m=None, block_n=None, mask_stats=None) -> VisitPlan:
    """Stages 1-4: key geometry, mask statistics, bounds, best-first order. No host sync."""
    B, H, L, D = query.shape
    Hkv, S, DV = key.shape[1], key.shape[2], value.shape[-1]
    D, DV = int(D), int(DV)  # head dims pick constexpr tiles: specialise them under dynamic shapes
    block_m, block_n = plan_blocks(query, value, block_m, block_n)
    scale = D ** -0.5 if scale is None else float(scale)
    bounds, mask4, mask_not_causal = tile_bounds(query, key, attn_mask, is_causal, scale, block_m,
                                                 block_n, mask_stats)

    planned = plan_visits_fused(bounds, S, block_m, block_n, is_causal, L)
    order, tail_log2, n_live = planned or plan_visits(bounds, S, block_m, block_n, is_causal, L)
    return VisitPlan(B, H, L, S, D, DV, H // Hkv, scale, block_m, block_n, is_causal, mask4,
                     order, tail_log2, n_live, mask_not_causal)


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


def all_live_blocks(L, S, block_m, block_n, is_causal, B, H, device) -> torch.Tensor:
    """kept map of dense attention without a mask: every block, or the top-left causal ones."""
    nqt, nkb = num_blocks(L, block_m), num_blocks(S, block_n)
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
