"""The Triton forward as the op runs it: eager (``triton_attention``: plan, the dense choices of
``dense_policy``, the pass), and split in two for compiled graphs: ``prepare_pass`` (everything
before the pass, the body of the opaque op ``aether::prepare_pass``) and
``attention_after_prepare`` (the one traced Triton launch of a compiled site). Kernels and plan
live in ``aether_compile.kernels``; what to run, in ``dense_policy``."""

from __future__ import annotations

import torch

from aether_compile import dense_policy
from aether_compile.kernels import dense as kernel_dense
from aether_compile.kernels import plan as kernel_plan
from aether_compile.kernels.certificate import num_blocks
from aether_compile.kernels.forward import Skip, forward_mode, launch_attention, new_out
from aether_compile.kernels.launch import eager_constant, mask_as_4d, pad_pow2
from aether_compile.kernels.plan import KeyGeometry, VisitPlan, all_live_blocks, kept_map


def prepare_pass(query, key, value, attn_mask, is_causal: bool, scale: float, eps: float,
                 block_m: int, block_n: int, fraction, sample: bool, gate: bool,
                 site: int = -1):
    """Everything of the twopass forward before its attention pass, run eagerly: the body of the
    opaque op ``aether::prepare_pass`` that compiled graphs call, so that Inductor compiles one
    Triton launch per attention site (the pass, ``attention_after_prepare``) where it compiled
    five to six (compile time, issue 5); the kernels here launch directly when the graph runs.

    sample (no mask, ``dense_eligible``): the lagged dense choice of
    ``dense_policy.sampled_dense_choice`` first; dense leaves an empty plan (identity order,
    nothing live) and skip = 1. gate (``dense_policy.gate_applies``, no sample): plan, probe
    and ``dense_gate``; n_visit is the certified count, or every live block where the gate went
    dense. A gated call whose mask turns out exactly top-left causal takes the sampled choice
    instead, as is_causal (``_prepare_as_causal``). Otherwise: the plan.
    Returns (out, lse, order, tail_log2, n_live, n_visit, *geometry, skip int32[1]), all new
    tensors; out and lse hold the dense answer where skip is 1, else the pass fills them.
    ``geometry`` (``prepared_geometry``) is what the pass's row tails read: the plan's key
    geometry and the mask's maxima, unwritten where nothing will read them."""
    B, H, L, _ = query.shape
    dev = query.device
    nqt, nkb = num_blocks(L, block_m), num_blocks(key.shape[-2], block_n)
    n_visit = None
    if sample:
        out, lse, dense = dense_policy.sampled_dense_choice(query, key, value, is_causal, scale,
                                                            eps, block_m, block_n, fraction, site)
        skip = torch.full((1,), int(Skip.DENSE if dense else Skip.PASS), device=dev,
                          dtype=torch.int32)
        if dense:
            # The pass returns at once and its kept map is every live block (``torch.where`` in
            # ``attention_after_prepare``); only the order is read, by the map of the branch not
            # taken, so it must be valid. The rest stays unwritten (no kernels).
            order = torch.empty(B, H, nqt, nkb, device=dev, dtype=torch.int32)
            order.copy_(eager_constant(("arange", nkb, dev), lambda: torch.arange(
                nkb, device=dev, dtype=torch.int32)))
            tiles = torch.empty(B, H, nqt, device=dev, dtype=torch.int32)
            return (out, lse, order, torch.empty(order.shape, device=dev), tiles,
                    torch.empty_like(tiles), *prepared_geometry(query, key, attn_mask, block_m,
                                                                block_n), skip)
        plan = kernel_plan.plan_attention(query, key, value, None, is_causal, scale, block_m,
                                          block_n)
    else:
        mask_stats = None
        if gate and causal_mask_may_skip_the_plan(query, key, value, attn_mask):
            # A mask exactly top-left causal (a static cache's prefill) is is_causal without it:
            # the sampled choice decides before any plan, as for an unmasked causal call.
            found_causal, mask_stats = mask_found_causal(query, key, attn_mask, block_m, block_n)
            if found_causal:
                return _prepare_as_causal(query, key, value, attn_mask, scale, eps, block_m,
                                          block_n, fraction, site, mask_stats[0])
        plan = kernel_plan.plan_attention(query, key, value, attn_mask, is_causal, scale, block_m,
                                          block_n, mask_stats=mask_stats)
        if gate:
            out, lse, n_visit, skip = dense_policy.probe_and_gate(query, key, value, plan, eps,
                                                                  fraction)
        else:
            out, lse, _ = dense_policy.dense_choice_buffers(query, value)
            skip = dense_policy.new_skip_flag(query)
    if n_visit is None:
        n_visit = torch.zeros(B, H, nqt, device=dev, dtype=torch.int32)
    return (out, lse, plan.order, plan.tail_log2, plan.n_live, n_visit,
            *prepared_geometry(query, key, attn_mask, block_m, block_n, plan.geometry), skip)


def prepared_geometry(query, key, attn_mask, block_m: int, block_n: int, geometry=None,
                      mask_max=None, blocks=None):
    """``prepare_pass``'s (unit centroids, norms, mask maxima) for the pass's row tails, shaped
    alike on every route (the op's fake cannot know the route): the plan's ``KeyGeometry`` where
    there is one, the given ``mask_max`` (the mask's statistics where the plan was made without
    the mask), else new unwritten tensors; the mask maxima are [Bm, Hm, nQT, nKB] with a mask,
    an empty [0] without. ``blocks``: (query tiles, key blocks) as ``new_prepared`` takes them."""
    B, H, L, D = query.shape
    Hkv, S = key.shape[1], key.shape[-2]
    nqt, nkb = blocks if blocks is not None else (num_blocks(L, block_m), num_blocks(S, block_n))
    if geometry is not None:
        unit, norms = geometry.unit, geometry.norms
        mask_max = geometry.mask_max if geometry.mask_max is not None else mask_max
    else:
        unit = query.new_empty(B * Hkv * nkb, 3, pad_pow2(int(D)), dtype=torch.float16)
        norms = query.new_empty(B * Hkv * nkb, 4, dtype=torch.float32)
    if mask_max is None:
        shape = (0,) if attn_mask is None else (*mask_as_4d(attn_mask, B, H, L, S).shape[:2],
                                                nqt, nkb)
        mask_max = query.new_empty(shape, dtype=torch.float32)
    return unit, norms, mask_max


def causal_mask_may_skip_the_plan(query, key, value, attn_mask) -> bool:
    """Whether the forward first checks if the mask is exactly top-left causal (one host read of
    its statistics, which the plan needs anyway): a prefill-sized call that a dense causal
    kernel computes, on CUDA tensors (not while tracing), not while a CUDA graph is captured."""
    from torch._subclasses.fake_tensor import is_fake

    return (attn_mask is not None and query.device.type == "cuda" and not is_fake(query)
            and not torch.compiler.is_compiling()
            and query.shape[-2] >= dense_policy.CAUSAL_MASK_MIN_ROWS
            and not torch.cuda.is_current_stream_capturing()
            and kernel_dense.dense_kernel_fits(query, key, value, True))


def mask_found_causal(query, key, attn_mask, block_m: int, block_n: int):
    """(whether the mask is exactly top-left causal, its ``mask_statistics``): one host read."""
    B, H, L, _ = query.shape
    S = key.shape[-2]
    stats = kernel_plan.mask_statistics(mask_as_4d(attn_mask, B, H, L, S), L, S, block_m, block_n)
    return not int(stats[1].sum()), stats


def _prepare_as_causal(query, key, value, attn_mask, scale, eps, block_m, block_n, fraction, site,
                       mask_max):
    """``prepare_pass``'s outputs for a call whose mask is exactly top-left causal: the sampled
    dense choice with is_causal, then either the dense answer (the pass returns at once; the
    kept map is the causal blocks: identity order, n_visit the causal count) or the causal plan
    without the mask, its probe and gate. The pass still applies the mask, which equals what
    the causal plan assumed, so its visit order and tail sums hold; its row tails read the mask's
    own maxima (``mask_max``, from the statistics that found it causal)."""
    B, H, L, _ = query.shape
    S, dev = key.shape[-2], query.device
    nqt, nkb = num_blocks(L, block_m), num_blocks(S, block_n)
    out, lse, dense = dense_policy.sampled_dense_choice(query, key, value, True, scale, eps,
                                                        block_m, block_n, fraction, site)
    if dense:
        order = torch.empty(B, H, nqt, nkb, device=dev, dtype=torch.int32)
        order.copy_(eager_constant(("arange", nkb, dev), lambda: torch.arange(
            nkb, device=dev, dtype=torch.int32)))
        causal = kernel_plan.cached_causal_block_map(L, nqt, nkb, block_m, block_n, dev)
        n_visit = causal.sum(-1, dtype=torch.int32).expand(B, H, nqt).contiguous()
        skip = torch.full((1,), int(Skip.DENSE), device=dev, dtype=torch.int32)
        return (out, lse, order, torch.empty(order.shape, device=dev), n_visit.clone(), n_visit,
                *prepared_geometry(query, key, attn_mask, block_m, block_n, mask_max=mask_max),
                skip)
    plan = kernel_plan.plan_attention(query, key, value, None, True, scale, block_m, block_n)
    out, lse, n_visit, skip = dense_policy.probe_and_gate(query, key, value, plan, eps, fraction)
    return (out, lse, plan.order, plan.tail_log2, plan.n_live, n_visit,
            *prepared_geometry(query, key, attn_mask, block_m, block_n, plan.geometry, mask_max),
            skip)


def new_prepared(query, key, value, attn_mask, block_m: int, block_n: int, out_interleaved: bool,
                 blocks=None):
    """New buffers shaped as ``prepare_pass``'s outputs (the op's fake; the precompile replay).
    ``blocks``: (query tiles, key blocks) to shape them with (the fake's, unbacked where the
    lengths are symbolic), else from the lengths."""
    B, H, L, _ = query.shape
    nqt, nkb = blocks if blocks is not None else (num_blocks(L, block_m),
                                                  num_blocks(key.shape[-2], block_n))
    tiles = query.new_empty(B, H, nqt, dtype=torch.int32)
    return (new_out(query, value.shape[-1], out_interleaved),
            query.new_empty(B, H, L, dtype=torch.float32),
            query.new_empty(B, H, nqt, nkb, dtype=torch.int32),
            query.new_empty(B, H, nqt, nkb, dtype=torch.float32),
            tiles, torch.empty_like(tiles),
            *prepared_geometry(query, key, attn_mask, block_m, block_n, blocks=(nqt, nkb)),
            query.new_empty(1, dtype=torch.int32))


def attention_after_prepare(query, key, value, attn_mask, is_causal: bool, scale: float,
                            eps: float, block_m: int, block_n: int, prepared, sample: bool,
                            gate: bool):
    """The pass after ``prepare_pass`` (traced: the one Triton launch of a compiled site):
    (out, lse, kept). Gated: a fixed-count pass over n_visit; otherwise one launch that probes,
    certifies and finishes (VISIT_CERTIFY). Either returns at once where skip is 1."""
    out, lse, order, tail_log2, n_live, n_visit, unit, norms, mask_max, skip = prepared
    B, H, L, D = query.shape
    Hkv, S, DV = key.shape[1], key.shape[2], value.shape[-1]
    mask4 = None if attn_mask is None else mask_as_4d(attn_mask, B, H, L, S)
    geometry = KeyGeometry(unit, norms, None, (0, 0))
    if mask4 is not None:
        geometry = KeyGeometry(unit, norms, mask_max, tuple(
            st if n > 1 else 0 for st, n in zip(mask_max.stride()[:2], mask_max.shape[:2])))
    plan = VisitPlan(B, H, L, S, int(D), int(DV), H // Hkv, scale, block_m, block_n, is_causal,
                     mask4, order, tail_log2, n_live, None, geometry)
    out, lse = launch_attention(query, key, value, plan, eps, n_visit, None, out, lse, skip,
                                 certify=not gate)
    kept = kept_map(plan, n_visit)
    if sample:
        # on the kept map's own block counts: traced with symbolic lengths they are sizes of
        # prepare_pass's outputs (unbacked), not ceil(L / block_m) (backed: guards)
        live = all_live_blocks(L, S, block_m, block_n, is_causal, B, H, query.device,
                               blocks=order.shape[-2:])
        kept = torch.where(skip.bool(), live, kept)
    return out, lse, kept


def run_attention(query, key, value, plan: VisitPlan, eps: float, mode: str | None = None,
                  dense_fraction: float | None = None, with_kept: bool = True):
    """Stage 5: certified best-first attention. Returns (out, lse, kept).

    mode "twopass" (default): a probe computes the first PROBE_BLOCKS blocks of every tile, the
    visit count follows from the certificate on device, then a pipelined fixed-count loop visits
    the rest. Without a dense gate that is one launch (VISIT_CERTIFY); with one, the gate sits
    between a probe launch and a fixed-count pass that recomputes the probe's blocks.
    mode "stop": one pass whose loop stops in-kernel as soon as the certificate holds (visits the
    fewest blocks, but the data-dependent loop is not software-pipelined).
    dense_fraction: if the certified visit would cover more than this fraction of the live
    blocks, run the fastest dense SDPA kernel instead (twopass, ``dense_policy.gate_applies``);
    ``kept`` then marks every live block.
    with_kept=False: ``kept`` is None (an eager call nobody differentiates or asks stats of: the
    map is a scatter over every block, 0.46 ms of W2's 10.5 ms pass at 128K on an H100)."""
    mode = forward_mode(mode)
    nqt, nkb = plan.order.shape[-2], plan.order.shape[-1]
    if mode == "stop":
        kept = torch.zeros(plan.B, plan.H, nqt, nkb, device=query.device, dtype=torch.uint8)
        out, lse = launch_attention(query, key, value, plan, eps, None, kept)
        # a compare, not a bool view: Inductor 2.11 cannot bitcast to bool
        return out, lse, kept != 0
    if not dense_policy.gate_applies(query, key, value, plan.mask4, plan.is_causal, dense_fraction):
        # probe, certified count and the rest in one launch
        n_visit = torch.zeros(plan.B, plan.H, nqt, device=query.device, dtype=torch.int32)
        out, lse = launch_attention(query, key, value, plan, eps, n_visit, None, certify=True)
        return out, lse, kept_map(plan, n_visit) if with_kept else None
    # The dense gate needs the certified count before the pass: probe, gate, fixed-count pass.
    out, lse, n_visit, use_dense = dense_policy.probe_and_gate(query, key, value, plan, eps,
                                                               dense_fraction)
    out, lse = launch_attention(query, key, value, plan, eps, n_visit, None, out, lse, use_dense)
    return out, lse, kept_map(plan, n_visit) if with_kept else None


def triton_attention(query, key, value, attn_mask=None, is_causal=False, scale=None,
                     enable_gqa=False, eps=0.0, block_m=None, block_n=None, mode=None,
                     dense_fraction=None, with_kept: bool = True):
    """Certified block-sparse attention on the Triton path, eager (compiled graphs split it into
    ``prepare_pass`` and ``attention_after_prepare``).

    Same contract as ``reference.reference_attention``: returns (out, lse, kept). With a dense
    crossover, a mask that turns out exactly top-left causal is run as is_causal without it
    (``prepare_pass`` does the same for compiled graphs). with_kept=False: kept is None where
    building it costs anything (``run_attention``)."""
    mask_stats = None
    if dense_fraction is not None and causal_mask_may_skip_the_plan(query, key, value, attn_mask):
        B, H, L, D = query.shape
        S = key.shape[-2]
        block_m, block_n = kernel_plan.plan_blocks(query, key, value, attn_mask, block_m, block_n)
        found_causal, mask_stats = mask_found_causal(query, key, attn_mask, block_m, block_n)
        if found_causal:
            scale = D ** -0.5 if scale is None else float(scale)
            dense = dense_policy.eager_choice(query, key, value, True, scale, eps, block_m,
                                              block_n, dense_fraction)
            if dense:
                out = kernel_dense.dense_sdpa_with_lse(query, key, value, True, scale)
                if out is not None:
                    return (*out, all_live_blocks(L, S, block_m, block_n, True, B, H,
                                                  query.device) if with_kept else None)
            plan = kernel_plan.plan_attention(query, key, value, None, True, scale, block_m,
                                              block_n)
            return run_attention(query, key, value, plan, eps, mode,
                                 None if dense is not None else dense_fraction, with_kept)
    plan = kernel_plan.plan_attention(query, key, value, attn_mask, is_causal, scale, block_m,
                                      block_n, mask_stats=mask_stats)
    return run_attention(query, key, value, plan, eps, mode, dense_fraction, with_kept)
