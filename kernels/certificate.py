"""The pruning certificate: constants and the visit plan, shared by the reference and the Triton path.

For query row i let Z_i = sum_k exp(s_ik). If every skipped key block j has an upper bound
u_j >= max_{k in j} s_ik and n_j keys, the skipped mass is at most sum_{j skipped} n_j exp(u_j).
Blocks are visited best-first (descending u); the visit stops as soon as, for every row of the tile,

    sum_{j not yet visited} n_j exp(u_j)  <=  EPS_MARGIN * eps * Z_i^visited.

Because Z_i^visited <= Z_i, each row's dropped mass is <= eps of its total: a guarantee, not an
estimate. eps = 0 never stops early, so it is dense attention.

Bounds (per query row q' = scale * q, per key block with centroid mu, radius r, box centre c and
half-width h; see ``reference.block_geometry``):

    ball = q'.mu + |q'| r          (Cauchy-Schwarz)
    box  = q'.c + |q'|.h           (= sum_d max(q'_d lo_d, q'_d hi_d), Quest's bound)
    u    = ball + slack, or min(ball, box) + slack with the box bound on (``use_box_bound``)

The Triton kernel evaluates the dot products on fp16 tensor cores over unit-normalised vectors;
``BOUND_REL_SLACK`` covers that rounding (2 * 2^-11 input rounding + fp32 accumulation, with room),
scaled by the magnitudes |q'| (|mu| + r) and |q'| (|c| + |h|). The reference adds the same slack so
that both implement one function.
"""

from __future__ import annotations

import math

import torch


def use_box_bound() -> bool:
    """Whether bounds take the min with the box bound (AETHER_BOX_BOUND=1; off by default).

    Both bounds are valid, so the min only tightens; but on the benchmark workloads the box never
    changed a decision (clustered W2 at 8K and 16K: the ball is the smaller bound for 100% of
    row-block pairs; LLM-like W3: neither prunes anything beyond causality), while it costs two of
    the bounds kernel's three matmuls, the largest overhead measured on the H100 (benchmarks/
    results/profile_stages_*). Read per call, by the reference and the Triton path alike."""
    from aether_compile import settings

    return settings.box_bound()


# Relative slack added to every bound, in units of |q'| * (norms of the block's summaries).
BOUND_REL_SLACK = 1.5e-3
# The stop test compares against EPS_MARGIN * eps: room for fp32 rounding of the running
# normaliser and of the scores themselves.
EPS_MARGIN = 0.98
# Radii are inflated by this relative amount to absorb fp32 rounding in ||k - mu||.
RADIUS_INFLATE = 1e-5
# The attention kernel's per-row bounds (re-certification with row tails) take the dot product
# of the raw query with the block's fp16 unit centroid, so BOUND_REL_SLACK covers them as it does
# the bounds kernel's (one input rounded, not two). A bf16 query meets the centroid in bf16: its
# rounding, at most 2^-9 of the unit vector, is added at twice that, in units of |q'| |mu|.
ROW_BOUND_BF16_SLACK = 2.0 ** -8
# Row tails start from an anchor past the tile's certified count: the first position whose tile
# tail is below 2^-ROW_ANCHOR_LOG2 of the tile's threshold (room left for each row's own sums),
# at most ROW_ANCHOR_BLOCKS positions on. Every position between is bounded row by row once.
ROW_ANCHOR_LOG2 = 3.0
ROW_ANCHOR_BLOCKS = 256

LOG2E = 1.4426950408889634
# float32's smallest normal: the floor of a live block's mass relative to its row's largest in the
# plan's suffix sums (below it exp2 may flush to zero, and a tail must never undercount).
SMALLEST_NORMAL = 2.0 ** -126
# Finite additive-mask values are clamped from below to this (−inf stays −inf): HF's
# finfo(float32).min would overflow to −inf once scaled by log2(e) in the kernel and turn a row
# that SDPA averages uniformly into an empty one. Below it every key weight is 0 anyway.
MASK_FLOOR = -1e30
# A row whose running max is this low has seen only floored (masked) keys: fp32 cannot resolve
# log(n) or log(eps) next to 1e30, so such a row never certifies a stop (it is visited fully,
# which averages it uniformly, as SDPA does). log2 units, as the kernels keep their running max.
UNCERTIFIABLE_MAX_LOG2 = 0.5 * MASK_FLOOR * LOG2E


def num_blocks(n: int, block: int) -> int:
    return (n + block - 1) // block


def keys_per_block(S: int, block_n: int, device) -> torch.Tensor:
    """Number of real keys in each key block (the last one may be partial). float32 [nKB]."""
    nkb = num_blocks(S, block_n)
    counts = torch.full((nkb,), float(block_n), device=device, dtype=torch.float32)
    if nkb:
        counts[-1] = S - (nkb - 1) * block_n
    return counts


def causal_priority_block(L: int, S: int, block_m: int, block_n: int, device) -> torch.Tensor:
    """For each query tile, the key block holding key index t * block_m: with SDPA's top-left
    causal alignment every row of the tile attends that key, so visiting it first gives every row a
    positive normaliser at once. -1 where the tile starts past the last key. int64 [nQT]."""
    nqt = num_blocks(L, block_m)
    first_row = torch.arange(nqt, device=device, dtype=torch.int64) * block_m
    blk = torch.div(first_row, block_n, rounding_mode="floor")
    return torch.where(first_row < S, blk, torch.full_like(blk, -1))


def sort_index_bits(n_kb: int) -> int:
    """Bits of a packed sort key that hold the block index (the plan kernel sorts a row padded
    to a power of two, at least 16)."""
    return max(16, 1 << max(int(n_kb) - 1, 0).bit_length()).bit_length() - 1


def sort_keys(bounds: torch.Tensor) -> torch.Tensor:
    """The visit order's sort key: the bounds' order-preserving int32 bits with the low
    ``sort_index_bits`` cleared, as the plan kernel packs them (it keeps the block index there).
    A descending stable sort on it is best-first to 2^(bits - 23) of each bound, ties by block
    index. Any order certifies: the tail sums follow it."""
    bits = bounds.float().contiguous().view(torch.int32)
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    n_kb = bounds.shape[-1]
    # A symbolic count (dynamic shapes) never reaches the plan kernel: keep every bit there.
    return bits >> sort_index_bits(n_kb) if isinstance(n_kb, int) else bits


def plan_visits(bounds: torch.Tensor, S: int, block_m: int, block_n: int, is_causal: bool,
                L: int, top: int | None = None):
    """Best-first visit order for every query tile.

    bounds: [B, H, nQT, nKB] float32 upper bounds (natural-log units, scale and mask included;
    -inf for blocks that cannot hold an unmasked key).

    ``top``: sort only the best blocks, as the plan kernel does with its TOP (``partial_order``).

    Returns (order int32 [B, H, nQT, nKB], tail_log2 float32 [B, H, nQT, nKB], n_live int32
    [B, H, nQT]): ``tail_log2[..., p]`` is log2 of the bounded mass of the blocks order[p:], and
    only the first ``n_live`` entries of ``order`` name live blocks. Pure tensor ops: no host sync.
    """
    B, H, nqt, nkb = bounds.shape
    device = bounds.device
    # A NaN bound (NaN in q or k) must be visited, never skipped: treat it as +inf.
    bounds = torch.nan_to_num(bounds, nan=math.inf, posinf=math.inf, neginf=-math.inf)
    sort_key = bounds
    if is_causal and nkb:
        prio = causal_priority_block(L, S, block_m, block_n, device)  # [nQT]
        is_prio = torch.arange(nkb, device=device)[None, :] == prio[:, None]  # [nQT, nKB]
        is_prio = is_prio & (bounds > -math.inf)
        sort_key = torch.where(is_prio, torch.full_like(bounds, math.inf), bounds)
    keys = sort_keys(sort_key)
    if top is not None and top < nkb:
        order = partial_order(keys, sort_key, bounds > -math.inf, top)
    else:
        _, order = torch.sort(keys, dim=-1, descending=True, stable=True)
    sorted_bounds = torch.gather(bounds, -1, order)
    log2_mass = sorted_bounds * LOG2E + torch.log2(keys_per_block(S, block_n, device))[order]
    n_live = (bounds > -math.inf).sum(-1, dtype=torch.int32)
    return order.to(torch.int32).contiguous(), suffix_mass_log2(log2_mass), n_live.contiguous()


def partial_order(keys: torch.Tensor, sort_key: torch.Tensor, live: torch.Tensor, top: int):
    """The plan kernel's order when it sorts only ``top`` blocks of each row: the blocks whose
    key's upper 16 bits reach the smallest threshold that at most ``top`` of the row reach,
    best-first (ties by block index); then the other live blocks, then the dead ones, each in
    block order. ``keys``: ``sort_keys`` of ``sort_key``."""
    bits = sort_key.float().contiguous().view(torch.int32)
    high = (bits ^ ((bits >> 31) & 0x7FFFFFFF)) >> 16
    threshold = high.sort(-1, descending=True).values[..., top:top + 1] + 1
    hot = high >= threshold
    kind = torch.where(hot, 0, torch.where(live, 1, 2)).long()
    block = torch.arange(keys.shape[-1], device=keys.device)
    within = torch.where(hot, (1 << 31) - keys.long(), block)  # hot: descending key
    return torch.sort(kind * (1 << 33) + within, dim=-1, stable=True).indices


def suffix_mass_log2(log2_mass: torch.Tensor) -> torch.Tensor:
    """tail[..., p] = log2 sum_{q >= p} 2^log2_mass[..., q], as the plan kernel computes it:
    each term relative to the row's largest finite one, floored at float32's smallest normal
    (SMALLEST_NORMAL) so that no live term rounds to 0 and every tail stays an upper bound; -inf
    terms add nothing, +inf ones make every tail up to them +inf."""
    finite = torch.isfinite(log2_mass)
    top = torch.where(finite, log2_mass, -math.inf).amax(-1, keepdim=True)
    top = torch.where(top > -math.inf, top, torch.zeros_like(top))
    rel = torch.where(finite, torch.exp2(log2_mass - top).clamp_min(SMALLEST_NORMAL),
                      torch.where(log2_mass > 0, math.inf, 0.0))
    return (top + torch.log2(rel.flip(-1).cumsum(-1).flip(-1))).contiguous()


def stop_threshold_log2(eps: float) -> float:
    """log2(EPS_MARGIN * eps); -inf for eps == 0 (never stop early: dense)."""
    if eps <= 0.0:
        return -math.inf
    return math.log2(EPS_MARGIN * eps)
