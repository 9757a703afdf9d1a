"""The dense/sparse decision: every place a call chooses between the sparse pass and a dense
kernel (both correct: dense is exact, sparse certified; the choice is about speed only).

1. **Static sizes** (``static_dense_reason``), before any kernel: at most PROBE_BLOCKS key blocks,
   or too little work for skipping to repay the plan. The pass leaves such a site as written
   (code ``short``); the op called directly makes the same choice.
2. **A sample of the rows** (``sample_visit_counts``), before the full plan, for calls without a
   mask that a dense kernel computes exactly (``sample_applies``): every 16th tile, or a
   causal prefix, is planned and probed, and the call goes dense when the sample's certified visit
   exceeds ``DENSE_FRACTION`` of its live blocks. Eager calls read it at once
   (``sampled_visit_fraction``); compiled sites take an earlier call's sample, read without a
   sync (the lagged choice, ``choose_dense``, through ``sampled_dense_choice``).
3. **The gate** (``dense_gate``), after the plan and probe, for masked calls and eager calls too
   short to sample: one host read of the certified visit count.

The public function's eager calls without a mask make choices 1 and 2 before the op
(``eager_dense_call``): a call that goes dense then costs one dense kernel launched right after
the sample's read, with no op dispatch and no log-sum-exp that nothing will read.

``Skip`` is what a choice tells the attention kernel. Environment switches come from
``aether_compile.settings``.
"""

from __future__ import annotations

import contextvars
import functools
from dataclasses import dataclass, field
from typing import Optional

import torch

from aether_compile import settings
from aether_compile.kernels import dense as kernel_dense
from aether_compile.kernels import forward as kernel_forward
from aether_compile.kernels import plan as kernel_plan
from aether_compile.kernels.certificate import num_blocks
from aether_compile.kernels.forward import Skip, certified_counts, new_out
from aether_compile.kernels.launch import cdiv, is_static
from aether_compile.kernels.plan import VisitPlan, causal_block_map

# Below this much attention work (B * H * L * S * D) the dense kernel takes well under half a
# millisecond on an H100 (4K tokens x 16 heads x 128 dims: 0.23 ms in cuDNN), less than the sparse
# path's fixed cost (bounds, plan, probe: ~0.3 ms at 4K, benchmarks/results), so no data could
# make the sparse path pay.
STATIC_DENSE_WORK = 2 ** 36


def static_dense_reason(B, H, L, S, D, DV, block_n: int, exact_dense: bool) -> Optional[str]:
    """Why static sizes alone make the sparse path pointless, or None. The shape rule both the op
    and the pass use: at most PROBE_BLOCKS key blocks (the probe alone would visit every live
    block), or, where a dense kernel computes the call exactly (``exact_dense``), too little work
    (B * H * L * S * D <= STATIC_DENSE_WORK) for skipping to repay the sparse path's fixed cost.
    Symbolic sizes never take it (decided at run time instead). AETHER_STATIC_DENSE=0 (read when
    tracing) turns it off."""
    if not settings.static_dense() or not is_static(B, H, L, S, D, DV):
        return None
    if num_blocks(S, block_n) <= kernel_forward.PROBE_BLOCKS:
        return f"{S} keys fill at most {kernel_forward.PROBE_BLOCKS} key blocks of {block_n}"
    work = B * H * L * S * D
    if exact_dense and work <= STATIC_DENSE_WORK:
        return f"attention work B*H*L*S*D = {work} <= 2**{STATIC_DENSE_WORK.bit_length() - 1}"
    return None


# A decode step reads the whole KV cache once; below this many bytes of K and V that read takes
# a few microseconds on an H200 (4.25 TB/s), less than the certified path's extra launches
# (bounds, selection, attention, combine), so no data could make skipping pay.
DECODE_MIN_CACHE_BYTES = 2 ** 25


def decode_dense_reason(B, Hkv, S, D, DV, element_size: int) -> Optional[str]:
    """Why a decode site's static sizes make certified decode pointless, or None. Symbolic sizes
    never take it."""
    if not settings.static_dense() or not is_static(B, Hkv, S, D, DV):
        return None
    cache_bytes = B * Hkv * S * (D + DV) * element_size
    if cache_bytes < DECODE_MIN_CACHE_BYTES:
        return (f"a KV cache of {cache_bytes} bytes < 2**{DECODE_MIN_CACHE_BYTES.bit_length() - 1}"
                " is read faster than the bounds and extra launches cost")
    return None


# A certified decode site's ops run their Python at every layer of every step, in every compile
# mode (their checks of the cache keep them outside CUDA graphs), and a decode step waits on the
# larger of its host and GPU time. On an H100 host they added 0.47 ms a layer to the default
# compile's step, the exact op 0.35 (profile_generate at fe46cc8, the long LM at batch 8 and 32K,
# 6 layers: 4.83 ms a step, 7.64 with certified sites, 6.95 with the exact op). Skipping can
# only save part of the cache's one dense read, so below the bytes that read takes about that
# long (1.5 GiB of K and V: 0.48 ms at an H100's 3.35 TB/s, 0.33 at an H200's 4.8) a certified
# site can only make the step slower, whatever the data.
DECODE_HOST_BOUND_BYTES = 3 * 2 ** 29
_HOST_BOUND = ("read faster than a certified site's host work (about 0.5 ms a layer) costs the "
               "step")


def decode_exact_reason(B, Hkv, S, row_bytes: int) -> Optional[str]:
    """Why a CUDA decode site's sizes make a certified site slower than an exact one, whatever
    the data, so that it is better compiled exact (SDPA on the cache, or the exact op), or None:
    every certified call would run dense anyway (``kv_cache.decode_dense_fraction`` is 0 at
    B x Hkv x S cached key rows: no measured call of that size had a certified step beat dense),
    or the cache's K and V (``row_bytes`` a cached key row of both) read in less time than the
    certified ops' host work adds to a step (DECODE_HOST_BOUND_BYTES). A cache that grows (a
    symbolic length: transformers' dynamic cache) takes the second rule as a guard on its bytes,
    so that its graph recompiles certified once the cache grows past the bound (the first rule
    is inside the second at any head dim up to 6 KiB a row). AETHER_STATIC_DENSE=0 or a dense
    fraction set by hand (AETHER_DENSE_FRACTION) leaves the choice to the run time."""
    if not settings.static_dense() or settings.dense_fraction_set():
        return None
    cache_bytes = B * Hkv * S * row_bytes
    if not is_static(B, Hkv, S, row_bytes):
        # guards the graph on the comparison (a step where it flips recompiles); an unbacked
        # size gives False, adding no guard
        from torch.fx.experimental.symbolic_shapes import guard_or_false

        if not guard_or_false(cache_bytes < DECODE_HOST_BOUND_BYTES):
            return None
        return (f"the step waits on host time: the cache's K and V stay under "
                f"{DECODE_HOST_BOUND_BYTES // 2 ** 20} MiB (a guard: a longer cache recompiles "
                f"certified), {_HOST_BOUND}")
    from aether_compile.kv_cache import decode_dense_fraction

    if decode_dense_fraction(B, Hkv, S) == 0.0:
        return (f"a certified step never pays at {B * Hkv * S} cached key rows "
                "(batch x KV heads x keys)")
    if cache_bytes < DECODE_HOST_BOUND_BYTES:
        return (f"the step waits on host time: the cache's {cache_bytes / 2 ** 20:.0f} MiB of K "
                f"and V {_HOST_BOUND}")
    return None


@dataclass(frozen=True)
class Route:
    """How one call of the op chooses between dense and sparse (``route``).

    static_dense: dense before any kernel runs (the shape rule, ``static_dense``).
    fraction: the crossover in force (None: no choice at run time, the sparse pass runs).
    sample: a sample of the rows decides before the full plan (eager: at once, ``eager_choice``;
        compiled: the site's lagged choice, ``sampled_dense_choice``).
    gate: compiled graphs only: the gate after the plan and probe decides (``dense_gate``)."""
    static_dense: bool
    fraction: Optional[float] = None
    sample: bool = False
    gate: bool = False


def route(query, key, value, attn_mask, is_causal: bool, block_n: int, twopass: bool) -> Route:
    """The op's route for this call, from metadata only (traceable). ``twopass``: the call is
    being traced for a compiled graph whose stages before the pass are one opaque op."""
    if static_dense(query, key, value, attn_mask, is_causal, block_n):
        return Route(static_dense=True)
    fraction = dense_fraction()
    sample = fraction is not None and sample_applies(query, key, value, attn_mask, is_causal)
    gate = twopass and not sample and gate_applies(query, key, value, attn_mask, is_causal,
                                                   fraction)
    return Route(False, fraction, sample, gate)


def eager_choice(query, key, value, is_causal: bool, scale, eps: float, block_m: int,
                 block_n: int, fraction: float) -> Optional[bool]:
    """An eager call's choice from a sample of its rows (one host read): True for dense, False
    for sparse (final: no gate after the plan), None where no smaller sample exists."""
    sampled = sampled_visit_fraction(query, key, value, is_causal, scale, eps, block_m, block_n)
    return None if sampled is None else sampled > fraction


def static_dense(query, key, value, attn_mask, is_causal: bool,
                 block_n: int) -> bool:
    """The op's shape-based choice, made before any kernel runs (at compile time under
    torch.compile): ``static_dense_reason``, with "exact" where a dense SDPA kernel computes this
    call exactly (no general mask)."""
    B, H, L, D = query.shape
    exact = kernel_dense.dense_eligible(query, key, value, attn_mask, is_causal)  # metadata only
    return static_dense_reason(B, H, L, key.shape[-2], D, value.shape[-1], block_n,
                               exact_dense=exact) is not None



# Set while the public function calls the op for an eager call its sample sent to the sparse
# path: the op then plans the whole call without sampling it again.
_DECIDED_SPARSE = contextvars.ContextVar("aether_decided_sparse", default=False)


def decided_sparse() -> bool:
    """Whether the public function's sample already chose the sparse path for this call."""
    return _DECIDED_SPARSE.get()


def eager_dense_call(query, key, value, is_causal: bool, scale, eps: float, block_m: int,
                     block_n: int):
    """The public function's eager calls without a mask, before the op: (out, decided_sparse).
    out: the dense kernel's output where the static sizes (``static_dense``) or a sample of the
    rows (``eager_choice``) choose dense, else None; decided_sparse: the sample chose sparse (the
    caller runs the op under ``sparse_decided()``). The caller checked the inputs and that the
    Triton op serves them; no mask. Output equals SDPA's; gradients flow through the kernel's."""
    chosen = route(query, key, value, None, is_causal, block_n, twopass=False)
    if chosen.static_dense:
        if not kernel_dense.dense_eligible(query, key, value, None, is_causal):
            return None, False
        return _dense_output(query, key, value, is_causal, scale), False
    if not chosen.sample or torch.cuda.is_current_stream_capturing():
        return None, False
    dense = eager_choice(query, key, value, is_causal, scale, eps, block_m, block_n,
                         chosen.fraction)
    if dense:
        return _dense_output(query, key, value, is_causal, scale), False
    return None, dense is not None


def _dense_output(query, key, value, is_causal: bool, scale: float):
    needs_lse = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    return kernel_dense.dense_sdpa(query, key, value, is_causal, scale, with_lse=needs_lse)


class sparse_decided:
    """Context for the op call of an eager call whose sample chose the sparse path."""

    def __enter__(self):
        self._token = _DECIDED_SPARSE.set(True)

    def __exit__(self, *exc):
        _DECIDED_SPARSE.reset(self._token)


def sample_applies(query, key, value, attn_mask, is_causal) -> bool:
    """Whether a sample of the rows may decide "dense" before the full plan: no mask, a call a
    dense kernel computes exactly. Eager calls sample at once (not while capturing a CUDA graph);
    traced graphs through ``aether::prepare_pass``. AETHER_DENSE_SAMPLE=0 turns it off (then
    the gate after the full plan decides, as for masked calls)."""
    return (settings.dense_sample() and attn_mask is None
            and kernel_dense.dense_eligible(query, key, value, None, is_causal))


def dense_fraction() -> float | None:
    """The sparse/dense crossover for runtime dispatch; AETHER_DENSE_FRACTION=off disables it
    (benchmarks use that to time the sparse kernel alone). Read when a graph is traced."""
    return settings.dense_fraction(DENSE_FRACTION)


# Above this fraction of its live blocks a call is cheaper on the fastest dense kernel: measured
# on an H100, the sparse kernel costs ~1.5x cuDNN's time per block (benchmarks/results), so it
# pays below ~0.65 of the blocks. Deciding needs a device-to-host read, never made during CUDA-graph
# capture: there the gate runs the sparse path and the sample keeps its site's earlier choice.
DENSE_FRACTION = 0.6


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


def row_sample(query, key, value, is_causal: bool, block_m: int, block_n: int):
    """(q, k, v) of a sample of this call's query rows, or None where the sample would not be
    much smaller than the call. The sampled rows are exactly rows of this call: non-causal,
    whole tiles spread over the sequence, seeing every key; causal (top-left, L <= S), a prefix
    and the keys up to its end. No mask."""
    B, H, L, D = query.shape
    if is_causal:
        rows = cdiv(max(L // SAMPLE_CAUSAL_ROW_FRACTION, SAMPLE_CAUSAL_MIN_BLOCKS * block_n),
                    block_m) * block_m
        if 2 * rows > L:
            return None
        return query[:, :, :rows], key[:, :, :rows], value[:, :, :rows]
    tiles = L // block_m  # every SAMPLE_ROW_FRACTION-th whole tile, spread over the sequence
    step = max(1, tiles // max(SAMPLE_MIN_TILES, tiles // SAMPLE_ROW_FRACTION))
    if 2 * cdiv(tiles, step) > tiles:
        return None
    q = query[:, :, :tiles * block_m].reshape(B, H, tiles, block_m, D)[:, :, ::step]
    return q.reshape(B, H, -1, D), key, value


def sample_visit_counts(query, key, value, is_causal: bool, scale, eps: float, block_m: int,
                        block_n: int, whole_if_no_sample: bool = False) -> torch.Tensor | None:
    """int64[2] on the device, (certified visits, live blocks) of a sample of the rows, from its
    plan and probe; no host read. Where no smaller sample exists: the whole call's counts if
    ``whole_if_no_sample``, else None."""
    sample = row_sample(query, key, value, is_causal, block_m, block_n)
    if sample is None:
        if not whole_if_no_sample:
            return None
        sample = (query, key, value)
    plan = kernel_plan.plan_attention(*sample, None, is_causal, scale, block_m, block_n)
    per_tile = torch.stack([certified_counts(*sample, plan, eps), plan.n_live])
    return per_tile.sum((1, 2, 3), dtype=torch.int64)


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


def sampled_dense_choice(query, key, value, is_causal: bool, scale: float, eps: float, block_m: int,
                    block_n: int, fraction: float, site: int = -1):
    """Compiled graphs' dense choice, made before planning: (out, lse, dense). Where the certified
    visit of a sample of the rows (``sample_visit_counts``; the whole call where no smaller sample
    exists) exceeds ``fraction`` of its live blocks, runs the fastest dense SDPA kernel into out and
    lse. The sample is of an earlier call of this ``site`` (``dense_choice``: its first call, then
    every 16th, read without a sync). During CUDA-graph capture nothing is sampled or read: the
    site's choice so far is captured (sparse if none). No mask; ``dense_eligible`` inputs."""
    out, lse, can_read = dense_choice_buffers(query, value)
    if query.device.type != "cuda":
        return out, lse, False
    sample = functools.partial(sample_visit_counts, query, key, value, is_causal, scale, eps,
                               block_m, block_n, whole_if_no_sample=True)
    site_key = (site, is_causal, eps, fraction, *shape_bucket(query, key))
    if choose_dense(site_key, sample if can_read else None, fraction,
                                 lagged=settings.dense_lag()):
        # While capturing, a failed cuDNN attempt could not be caught: ask SDPA's selector.
        dense = kernel_dense.dense_sdpa_with_lse(query, key, value, is_causal, scale,
                                    try_cudnn=True if can_read else "if_sdpa_picks")
        if dense is not None:
            return *dense, True
    return out, lse, False


# A mask may turn out to be exactly top-left causal only in a prefill (transformers materialises
# one; with a static cache, over every slot of the cache). A few query rows against a long cache
# are decode steps or drafts, whose rows see the whole prefix: the gate spends no host read there.
CAUSAL_MASK_MIN_ROWS = 17


def gate_applies(query, key, value, attn_mask, is_causal: bool, dense_fraction) -> bool:
    """Whether the twopass forward puts the dense gate between its probe and its pass: a dense
    crossover is set and a dense kernel computes the call exactly, or the mask may turn out to be
    exactly top-left causal (CAUSAL_MASK_MIN_ROWS <= L <= S; ``dense_gate`` then runs the dense
    causal kernel). L < S is a static cache's prefill."""
    L = query.shape[-2]
    return dense_fraction is not None and (
        kernel_dense.dense_eligible(query, key, value, attn_mask, is_causal)
        or (attn_mask is not None and L >= CAUSAL_MASK_MIN_ROWS
            and kernel_dense.dense_kernel_fits(query, key, value, True)))


def dense_choice_buffers(query, value):
    """(out, lse) for a dense choice to fill, and whether it may read the device now: on CUDA and
    not while a CUDA graph is being captured."""
    B, H, L, _ = query.shape
    out = new_out(query, value.shape[-1])
    lse = torch.empty(B, H, L, device=query.device, dtype=torch.float32)
    can_read = query.device.type == "cuda" and not torch.cuda.is_current_stream_capturing()
    return out, lse, can_read


def new_skip_flag(query) -> torch.Tensor:
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
    out, lse, can_read = dense_choice_buffers(query, value)
    use_dense = new_skip_flag(query)
    if not can_read:
        return out, lse, use_dense
    stats = [n_visit.sum(), n_live.sum()]
    if mask_not_causal is not None:
        stats.append(mask_not_causal.sum())
    visit, live, *not_causal = torch.stack(stats).tolist()
    if visit > fraction * live and not any(not_causal):
        causal = is_causal or mask_not_causal is not None  # the mask is exactly causal
        dense = kernel_dense.dense_sdpa_with_lse(query, key, value, causal, scale)
        if dense is not None:
            out, lse = dense
            use_dense.fill_(int(Skip.DENSE))
    return out, lse, use_dense


def live_blocks_for_gate(plan: VisitPlan) -> torch.Tensor:
    """Live blocks per tile as the dense choice should count them. A causal mask materialised
    with finfo.min (HF) leaves the blocks above the diagonal live (finite, negligible bounds), so
    with a mask the count is of the causal blocks: the work a dense causal kernel does, and the
    only case where the mask runs dense (see ``dense_gate``)."""
    if plan.mask_not_causal is None:
        return plan.n_live
    nqt, nkb = plan.order.shape[-2], plan.order.shape[-1]
    causal = causal_block_map(plan.L, nqt, nkb, plan.block_m, plan.block_n, plan.n_live.device)
    return causal.sum(-1).to(plan.n_live.dtype).expand_as(plan.n_live)


def probe_and_gate(query, key, value, plan: VisitPlan, eps: float, fraction: float):
    """The forward with a gate, up to its pass: probe, certified count, ``dense_gate``.
    Returns (out, lse, n_visit, use_dense int32[1]); n_visit counts every live block where the
    gate went dense (the pass then returns at once and the kept map is the dense one)."""
    n_visit = kernel_forward.probe_visit_count(query, key, value, plan, eps)
    out, lse, use_dense = dense_gate(query, key, value, n_visit, live_blocks_for_gate(plan),
                                     plan.is_causal, plan.scale, fraction, plan.mask_not_causal)
    return out, lse, torch.where(use_dense.bool(), plan.n_live, n_visit), use_dense


# -- the lagged choice of compiled sites ---------------------------------------------------------
# A compiled model calls each attention site once per layer and step. Sampling and reading on
# every call cost too much on an H100 (benchmarks/results/logs/host_e2e_lag_*.txt): the read
# drains the GPU queue once per layer, and issuing the sample's plan and count from Python takes
# about 0.5 ms of host time (2.3 ms before eager launches skipped wrap_triton's op), against 1.2 ms
# for cuDNN at 16K tokens. Llama with 8 layers at 16K and no mask ran at 0.87x Inductor that way
# and 0.95x with the lagged choice. So a site samples on its first call and then every 16th call
# (AETHER_DENSE_RESAMPLE); the counts travel to the host without a wait and decide the calls after
# they arrive. Only a site's first call reads at once; AETHER_DENSE_LAG=0 reads every call.
MAX_SITES = 4096  # distinct (site, shape bucket) keys kept; a few recur in practice


@dataclass
class _Site:
    dense: bool | None = None  # the choice in force; None until the first counts arrive
    calls: int = 0  # calls since the first
    pending: list = field(default_factory=list)  # [(ready() -> bool, host counts)], oldest first


_SITES: dict = {}


def shape_bucket(query, key) -> tuple:
    """Calls whose choice may be shared: same site, head layout and dtype, and sequence lengths
    in the same power-of-two bucket (under dynamic shapes every length would be a new key)."""
    B, H, L, D = query.shape
    S = key.shape[-2]
    return (B, H, key.shape[1], D, 1 << max(L - 1, 0).bit_length(),
            1 << max(S - 1, 0).bit_length(), query.dtype, query.device)


def choose_dense(site_key, sample, fraction: float, lagged: bool = True) -> bool:
    """Whether this call runs dense. sample: ``() -> int64[2]`` (certified visits, live blocks)
    of a sample of this call's rows on its device, issued without a host read; None where the
    device cannot be read (CUDA-graph capture: the choice in force is kept, else sparse).

    Not lagged, or the first call of ``site_key``: samples and reads at once. Otherwise samples
    every AETHER_DENSE_RESAMPLE-th call (16), copies the counts to the host without waiting, and
    uses the newest counts that have arrived."""
    site = _SITES.get(site_key)
    if sample is None:
        return bool(site is not None and site.dense)
    if site is None:
        if len(_SITES) >= MAX_SITES:
            _SITES.clear()
        site = _SITES[site_key] = _Site()
    if not lagged or site.dense is None:
        site.pending.clear()
        site.dense = _exceeds(sample().tolist(), fraction)
        return site.dense
    while site.pending and site.pending[0][0]():
        _, host = site.pending.pop(0)
        site.dense = _exceeds(host.tolist(), fraction)
    site.calls += 1
    if site.calls % settings.dense_resample_every() == 0:
        site.pending.append(_copy_to_host(sample()))
        del site.pending[:-4]  # never more than a few in flight; older ones are superseded anyway
    return site.dense


def _exceeds(counts, fraction: float) -> bool:
    visit, live = counts
    return live > 0 and visit > fraction * live


def _copy_to_host(counts: torch.Tensor):
    """(ready, host): a non-blocking device-to-host copy and whether it has landed."""
    if counts.device.type != "cuda":
        return (lambda: True), counts.clone()
    host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
    host.copy_(counts, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return done.query, host


def forget_lagged_choices() -> None:
    """Drop every site's state (tests; a model whose attention changed character)."""
    _SITES.clear()
