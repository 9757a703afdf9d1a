"""Certified decode against a KV cache: the key summaries kept beside caches, and the two ops a
rewritten generation step calls.

* ``aether::key_cache_index_copy_(cache, dim, index, source)`` — the cache write
  (``cache.index_copy_(dim, index, source)``, as transformers' static cache writes at
  ``cache_position``), which also re-summarises the groups the new keys land in.
* ``aether::key_cache_cat(past, new)`` — the concatenation of a cache that grows each step
  (transformers' default dynamic cache), handing ``past``'s summary on to the result.
* ``aether::decode_attention(query, key, value, attn_mask, scale, eps)`` — SDPA on a few query
  rows against the cache, reading only the key blocks the summary cannot rule out
  (``kernels/decode.py``); dense SDPA where the call is not one it serves.
* ``aether::exact_decode_attention(query, key, value, attn_mask, is_causal, scale)`` — the
  same, exact (eps = 0, or a cache too small for skipping to pay), on the cache itself (no
  ``repeat_kv`` copies), with no summary kept for it and no state between calls, so CUDA graphs
  capture it. On CUDA the pass prefers SDPA itself on the cache where a fused kernel takes it.

**Trusting a summary.** A summary describes its cache as of a version: ``Tensor._version``,
which every in-place write bumps (``index_copy_``, ``zero_``, ``copy_``: a new prompt in the
same buffers, beam reordering). The write op updates the summary only when the cache is still at
the version it recorded, and records the new one; the decode op re-summarises from scratch (one
read of K) whenever the versions differ. So a cache written behind our back costs one full read,
never a wrong certificate. The first three ops carry torch's ``cudagraph_unsafe`` tag: under
Inductor's CUDA graphs (``mode="reduce-overhead"``) they run, Python and all, between two
graphs' replays, so the checks hold there too.
"""

from __future__ import annotations

import collections
import math
import weakref
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from aether_compile import _compat, settings
from aether_compile.kernels import decode as kernel_decode
from aether_compile.kernels import dense as kernel_dense
from aether_compile.kernels import decode_reference
from aether_compile.kernels.launch import INTERPRET, unsupported_reason

# Query rows per sequence the decode path serves: one generation step, or a few (speculative
# decoding, short continuations). Longer calls are prefill: aether::attention's business.
MAX_DECODE_ROWS = 16
MAX_SUMMARIES = 256  # caches with a live summary (a model has one per layer)


@dataclass
class _Entry:
    summary: kernel_decode.KeySummary
    version: int
    # the cache itself: a freed cache's memory can come back as a new tensor of the same shape
    # and version (a second prompt through a concatenating cache), which must not inherit it
    cache: Optional[weakref.ref] = None

    def describes(self, cache: Tensor, version: Optional[int]) -> bool:
        return (version is not None and self.version == version
                and (self.cache is None or self.cache() is cache))


_SUMMARIES: "collections.OrderedDict[tuple, _Entry]" = collections.OrderedDict()
STATS = collections.Counter()  # "rebuilt", "updated", "extended", "dropped": summaries' cost
# what decode calls did (benchmarks): "certified", "dense", and which dense kernel ran unmasked
CALLS = collections.Counter()


def _ident(cache: Tensor) -> tuple:
    return (cache.untyped_storage().data_ptr(), cache.storage_offset(), tuple(cache.shape),
            cache.stride(), cache.dtype, cache.device)


def summary_for(cache: Tensor, pending_bumps: int = 0) -> kernel_decode.KeySummary:
    """The summary of ``cache`` as it is now: the one kept beside it when its version still
    matches, else a fresh one (one read of the cache). ``pending_bumps``: version bumps still
    to come from the op we are inside of (its dispatcher's, after the body returns)."""
    ident = _ident(cache)
    entry = _SUMMARIES.get(ident)
    version = _version(cache)
    if entry is None or version is None or not entry.describes(cache, version + pending_bumps):
        entry = _remember(cache, kernel_decode.summarize_keys(cache),
                          None if version is None else version + pending_bumps)
        STATS["rebuilt"] += 1
    _SUMMARIES.move_to_end(ident)
    return entry.summary


def _remember(cache: Tensor, summary: kernel_decode.KeySummary, version: Optional[int]) -> _Entry:
    entry = _Entry(summary, version, weakref.ref(cache))
    _SUMMARIES[_ident(cache)] = entry
    while len(_SUMMARIES) > MAX_SUMMARIES:
        _SUMMARIES.popitem(last=False)
    return entry


def forget_summaries() -> None:
    """Drop every kept summary (tests; freeing their memory)."""
    _SUMMARIES.clear()


def _version(t: Tensor) -> Optional[int]:
    """t's version counter, or None for an inference-mode tensor (it has none)."""
    return None if t.is_inference() else t._version


# The decode ops run at every layer of every decode step, and outside CUDA graphs the step waits
# on their Python. torch.library.custom_op wraps a kernel in Python layers (autograd, the
# in-place/view bookkeeping of a mutating op, its defaults' filling, dynamo's disable): more
# than half a cache write's host time (CPU, launches hooked: benchmarks/decode_host_time.py).
# So they are defined through the low-level API instead: one Python kernel for every device, and
# a small autograd kernel that refuses what it cannot differentiate (so that a training graph's
# trace fails and the backend compiles it without the rewrite, as it did before) and otherwise
# goes straight below autograd.
_LIB = torch.library.Library("aether", "FRAGMENT")


def _host_op(schema: str, tags=_compat.HOST_EVERY_CALL_TAGS):
    """Define ``aether::<schema>`` with the decorated function as its kernel on every device.
    The op is inference-only: called where autograd would record it, it raises."""
    name = schema.split("(", 1)[0]

    def define(fn):
        _LIB.define(schema, tags=tags)
        _LIB.impl(name, fn, "CompositeExplicitAutograd")
        op = getattr(torch.ops.aether, name).default

        def no_grad_only(*args):
            if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad
                                               for a in args):
                raise RuntimeError(f"aether::{name} has no backward: it serves inference "
                                   "(decode under torch.no_grad); an input requires grad")
            with torch._C._AutoDispatchBelowAutograd():
                return op(*args)

        _LIB.impl(name, no_grad_only, "Autograd")
        fn.register_fake = lambda fake: torch.library.register_fake(f"aether::{name}", fake,
                                                                    lib=_LIB)
        return fn

    return define


@_host_op("key_cache_index_copy_(Tensor(a!) cache, int dim, Tensor index, Tensor source, "
          "int graph_bumps=0) -> ()")
def key_cache_index_copy_(cache: Tensor, dim: int, index: Tensor, source: Tensor,
                          graph_bumps: int = 0) -> None:
    """``cache.index_copy_(dim, index, source)``, keeping ``cache``'s summary up to date: a
    cache seen for the first time is summarised whole (once); one still at the version its
    summary recorded gets the touched groups re-summarised.

    Between two writes the version moves by the dispatcher's bumps around this op
    (``_DISPATCH_BUMPS``) and ``graph_bumps`` times by the compiled graph calling it
    (AOTAutograd bumps each input the graph mutates once per call: the pass passes 1 for the
    first write of a cache in a graph). Any other difference is a write we did not see."""
    if _CALIBRATING:
        _CALIBRATING.append(cache._version)
        return
    dim = dim % cache.dim()
    if dim != 2 or cache.dim() != 4:  # not a [B, H, S, D] cache write at sequence positions
        cache.index_copy_(dim, index, source)
        return
    ident = _ident(cache)
    entry = _SUMMARIES.get(ident)
    version = _version(cache)
    pre, post = _DISPATCH_BUMPS
    current = (entry is not None and version is not None and entry.version is not None
               and entry.describes(cache, version - graph_bumps - pre))
    if current and kernel_decode.write_keys(entry.summary, cache, index, source):
        # one launch wrote the keys and re-summarised their groups; bump the version as
        # index_copy_ would (autograd's saved-tensor checks read it too)
        torch.autograd.graph.increment_version(cache)
        entry.version = cache._version + post
        STATS["updated"] += 1
        return
    cache.index_copy_(dim, index, source)
    if current:
        kernel_decode.update_summary(entry.summary, cache, index)
        entry.version = cache._version + post
        STATS["updated"] += 1
    else:  # first sight, or written behind our back: summarise what is there now
        if entry is not None:
            STATS["dropped"] += 1
        summary_for(cache, pending_bumps=post)


@_host_op("key_cache_cat(Tensor past, Tensor new) -> Tensor")
def key_cache_cat(past: Tensor, new: Tensor) -> Tensor:
    """``torch.cat([past, new], dim=-2)`` for a cache that grows by concatenation (transformers'
    default dynamic cache), carrying ``past``'s summary over to the result when it still
    describes ``past``: the groups ``past`` held whole are copied and the ones the new keys land
    in summarised (a read of those groups, not of the cache). Otherwise the result is summarised
    when it is first attended."""
    out = torch.cat([past, new], dim=-2)
    if out.dim() != 4 or past.dim() != 4 or past.shape[2] == 0:
        return out
    entry = _SUMMARIES.get(_ident(past))
    if entry is not None and entry.describes(past, _version(past)):
        version = _version(out)
        if version is not None:
            _remember(out, kernel_decode.extend_summary(entry.summary, out, past.shape[2]),
                      version)
            STATS["extended"] += 1
    return out


@key_cache_cat.register_fake
def _(past, new):
    return torch.cat([past, new], dim=-2)


_CALIBRATING: list = []
def _measure_dispatch_bumps() -> tuple[int, int]:
    """(before, after): how many times calling a mutating custom op bumps its argument's
    version before its body runs and after it returns. Torch releases differ, so it is
    measured, once, at import: a call made from inside another op's body would see the
    dispatcher's inner state instead. A wrong count could only cost re-summarising."""
    with torch.inference_mode(False):
        probe = torch.zeros(1)
        before = probe._version
        _CALIBRATING.append(None)
        try:
            torch.ops.aether.key_cache_index_copy_(probe, 0, torch.zeros(1, dtype=torch.long),
                                                   probe)
        finally:
            seen = _CALIBRATING.pop()
            _CALIBRATING.clear()
    return seen - before, probe._version - seen


@key_cache_index_copy_.register_fake
def _(cache, dim, index, source, graph_bumps=0):
    return None


_DISPATCH_BUMPS = _measure_dispatch_bumps()


def _mask_rows(attn_mask: Tensor, B: int, Lq: int, S: int) -> Tensor:
    """An SDPA mask that is the same for every head as a [B, Lq, S] view (broadcast dims at
    stride 0: no copy)."""
    m = attn_mask
    while m.dim() < 4:
        m = m.unsqueeze(0)
    return m[:, 0].expand(B, Lq, S)


def _bias(attn_mask: Optional[Tensor], B: int, Lq: int, S: int, is_causal: bool, device):
    """float32 [B, Lq, S] additive bias from an SDPA mask that is the same for every head (and
    from is_causal, SDPA's top-left alignment: row i sees keys 0..i), or None for neither."""
    bias = torch.zeros(B, Lq, S, device=device, dtype=torch.float32)
    if attn_mask is not None:
        m = _mask_rows(attn_mask, B, Lq, S)
        bias = bias.masked_fill(~m, -math.inf) if m.dtype == torch.bool else bias + m.float()
    if is_causal:
        causal = torch.ones(Lq, S, dtype=torch.bool, device=device).tril()
        bias = bias.masked_fill(~causal, -math.inf)
    return bias if attn_mask is not None or is_causal else None


def _kernel_bias(attn_mask: Optional[Tensor], B: int, Lq: int, S: int, is_causal: bool, device):
    """The decode kernels' Bias operand: the mask itself (``_mask_rows``, bool or float: no copy,
    no kernel), or ``_bias``'s float bias under is_causal."""
    if is_causal or attn_mask is None:
        return _bias(attn_mask, B, Lq, S, is_causal, device)
    return _mask_rows(attn_mask, B, Lq, S)


def decode_dense_reason(query: Tensor, key: Tensor, value: Tensor, attn_mask) -> Optional[str]:
    """Why this call is not served by certified decode (then it is dense SDPA), or None."""
    B, Hq, Lq, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    if Lq > MAX_DECODE_ROWS:
        return f"{Lq} query rows > {MAX_DECODE_ROWS} (prefill)"
    if Hq % Hkv:
        return f"{Hq} query heads not a multiple of {Hkv} key heads"
    if value.shape[2] != S or key.shape[0] != B:
        return "key and value caches disagree"
    if _per_head(attn_mask):
        return "per-head mask"
    if S < kernel_decode.BLOCK * 4:
        return f"{S} keys: too few blocks to skip"
    return None


@_host_op("decode_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
          "bool is_causal, float? scale, float? eps) -> Tensor")
def decode_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                     is_causal: bool, scale: Optional[float], eps: Optional[float]) -> Tensor:
    """SDPA(query, key, value, attn_mask, is_causal, scale, enable_gqa=True) for a few query
    rows against a key/value cache, certified to drop at most ``eps`` of each row's softmax mass
    (None: the dtype's default, as aether::attention)."""
    if eps is None:
        from aether_compile.ops import default_eps

        eps = default_eps(query.dtype)
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    kernels = _kernels_serve(query, key, value)
    if eps > 0 and decode_dense_reason(query, key, value, attn_mask) is None:
        B, Hq, Lq, D = query.shape
        # the bias and the summary only where a certified step (or its sample) runs: a call the
        # lagged choice sends dense costs what dense costs
        inputs = {}

        def bias_and_summary():
            if not inputs:
                make = _kernel_bias if kernels else _bias
                inputs["bias"] = make(attn_mask, B, Lq, key.shape[2], is_causal, query.device)
                inputs["summary"] = summary_for(key)
            return inputs["bias"], inputs["summary"]

        if not kernels:
            bias, summary = bias_and_summary()
            out, _, _ = decode_reference.reference_decode_attention(query, key, value, summary,
                                                                    eps, scale, bias)
            return out.contiguous()
        out = _certified_or_dense(query, key, value, bias_and_summary, eps, scale)
        if out is not None:
            return out.contiguous()
    return dense_decode(query, key, value, attn_mask, is_causal, scale, kernels).contiguous()


def _decode_output(query: Tensor, value: Tensor) -> Tensor:
    """The decode ops' output as their fake implementations give it: [B, Hq, Lq, value dim]."""
    return query.new_empty(*query.shape[:-1], value.shape[-1])


@_host_op("exact_decode_attention(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, "
          "bool is_causal, float? scale) -> Tensor", tags=())
def exact_decode_attention(query: Tensor, key: Tensor, value: Tensor,
                           attn_mask: Optional[Tensor], is_causal: bool,
                           scale: Optional[float]) -> Tensor:
    """SDPA(query, key, value, attn_mask, is_causal, scale, enable_gqa=True), exact: a decode
    site compiled exact (``passes/decode.exact_reason``), where no summary is kept or read. It
    reads the cache itself (no repeat_kv copies) and keeps no state between calls, so CUDA
    graphs capture it."""
    scale = query.shape[-1] ** -0.5 if scale is None else float(scale)
    return dense_decode(query, key, value, attn_mask, is_causal, scale).contiguous()


@exact_decode_attention.register_fake
def _(query, key, value, attn_mask, is_causal, scale):
    return _decode_output(query, value)


def dense_decode(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                 is_causal: bool, scale: float, kernels: Optional[bool] = None) -> Tensor:
    """SDPA(query, key, value, attn_mask, is_causal, scale, enable_gqa=True), exact, by the
    fastest path for a few query rows against a long cache:

    * no mask: cuDNN on CUDA where it takes GQA natively (``kernels.dense.cudnn_unmasked``),
      else SDPA itself (flash takes GQA natively too: no copy of the cache). SDPA's dispatcher
      picks flash, and cuDNN was as fast or faster at every decode shape measured (H100,
      15aa5cf's grid: 1393 against 1651 us at batch 32 and 32K keys, 64 against 71 at batch 1;
      with cuDNN put first in SDPA's priority order the dispatcher still ran flash at batch 32);
      a user who turned cuDNN's SDPA off keeps that;
    * a mask (transformers passes one at every decode step) or is_causal, where the decode
      kernels run: ``attend_all``, the split-K kernel over every block, reading the mask as it is;
      from SDPA_MASKED_MIN_KEYS keys times batch, SDPA itself where one of its fused kernels
      takes the mask with GQA. On some releases none does (math then runs: a copy of K and V per
      call), and the one that takes a mask there (efficient) runs a program per (sequence, head)
      with no split over the keys: at a few heads, a few SMs reading the whole cache;
    * elsewhere (CPU; a per-head mask): SDPA with the GQA group folded into the query rows
      ([B, Hkv, G * Lq, D]), so that it sees equal head counts and copies nothing."""
    B, Hq, Lq, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    sdpa = torch.nn.functional.scaled_dot_product_attention
    if attn_mask is None and not is_causal:
        out = kernel_dense.cudnn_unmasked(query, key, value, scale) \
            if torch.backends.cuda.cudnn_sdp_enabled() else None
        CALLS["dense_cudnn" if out is not None else "dense_sdpa"] += 1
        return out if out is not None else sdpa(query, key, value, scale=scale,
                                                 enable_gqa=Hq != Hkv)
    if (Hq % Hkv or query.shape[0] != key.shape[0] or value.shape[2] != S
            or (is_causal and attn_mask is not None)):  # the last: SDPA's own error
        return sdpa(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale,
                    enable_gqa=Hq != Hkv)
    if kernels is None:  # whether the decode kernels run here (_kernels_serve), if known
        kernels = _kernels_serve(query, key, value)
    if kernels and not _per_head(attn_mask):
        if (attn_mask is not None and not is_causal and B * S >= SDPA_MASKED_MIN_KEYS
                and _sdpa_fused_takes_mask(query, key, value, attn_mask)):
            CALLS["dense_sdpa_masked"] += 1
            return sdpa(query, key, value, attn_mask=attn_mask, scale=scale, enable_gqa=Hq != Hkv)
        CALLS["dense_split"] += 1
        bias = _kernel_bias(attn_mask, B, Lq, S, is_causal, query.device)
        return kernel_decode.attend_all(query, key, value, scale, bias)[0]
    if Hq == Hkv:
        return sdpa(query, key, value, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    G = Hq // Hkv
    mask = attn_mask
    if is_causal:  # SDPA's top-left alignment: row i sees keys 0..i
        mask = torch.ones(Lq, S, dtype=torch.bool, device=query.device).tril()
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    if mask.shape[1] == 1:
        mask = (mask.expand(B, 1, Lq, S).unsqueeze(2).expand(B, 1, G, Lq, S)
                .reshape(B, 1, G * Lq, S))
    else:
        mask = mask.expand(B, Hq, Lq, S).reshape(B, Hkv, G * Lq, S)
    if mask.is_floating_point() and mask.dtype != query.dtype:
        # SDPA's math path (what enable_gqa with a mask runs) adds a float32 mask in float32;
        # the fused kernel the fold reaches misreads one of another dtype (NaN rows on CUDA)
        mask = mask.to(query.dtype)
    rows = query.reshape(B, Hkv, G * Lq, D)
    out = sdpa(rows, key, value, attn_mask=mask, scale=scale)
    return out.reshape(B, Hq, Lq, value.shape[-1])  # a fused kernel's output may be strided


# From this many keys times batch, a masked dense decode call runs SDPA where one of its fused
# kernels takes the mask with GQA (one does on the device's torch 2.11), below it ``attend_all``.
# H100, sweep_decode_dense at 2368903, uniform keys, GQA 32/8, D 128, the all-true bool mask
# transformers passes, against cuDNN without it: SDPA 1.04x at batch 1 and 128K keys (attend_all
# at its best 1.07x), 1.02x at batch 8 and 32K, 1.01x at batch 32; attend_all 0.94x at batch 1
# and 8K (SDPA 1.25x), 1.03x at batch 1 and 32K (SDPA 1.11x), 1.02x at batch 8 and 8K (1.07x).
SDPA_MASKED_MIN_KEYS = 128 * 1024
_SDPA_TAKES: dict = {}


def _sdpa_fused_takes_mask(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor) -> bool:
    """``_compat.sdpa_fused_takes``, remembered per kind of call (dtypes, head counts and dims,
    the mask's broadcast pattern, alignment): one probe per kind, not per decode step."""
    from aether_compile import _compat

    kind = (query.device, query.dtype, attn_mask.dtype, tuple(query.shape[1:]), key.shape[1],
            value.shape[-1], key.shape[2] % 16, attn_mask.dim(),
            tuple(n == 1 for n in attn_mask.shape), tuple(st == 0 for st in attn_mask.stride()))
    if kind not in _SDPA_TAKES:
        _SDPA_TAKES[kind] = _compat.sdpa_fused_takes(query, key, value, attn_mask,
                                                     query.shape[1] != key.shape[1])
    return _SDPA_TAKES[kind]


def _per_head(attn_mask: Optional[Tensor]) -> bool:
    """A mask that differs between heads: the decode kernels' bias is one per sequence."""
    return attn_mask is not None and attn_mask.dim() == 4 and attn_mask.shape[1] != 1


def _kernels_serve(query: Tensor, key: Tensor, value: Tensor) -> bool:
    """Whether the decode kernels run on these tensors: CUDA in a dtype and layout they take, or
    the CPU under Triton's interpreter (tests)."""
    return (query.device.type == "cuda" or INTERPRET) and unsupported_reason(
        query, key, value) is None


# Above its kept fraction (of the live key blocks) a certified step costs more than dense SDPA's
# one read of everything. It depends on the call's size: the bounds read a quarter of K and V's
# bytes, and the selection's scan is latency-bound (13-74 us) however short the call. Measured as
# bench_decode's break_even_kept_kv on an H100 (7e1656c, every row of its grid: (dense - bounds -
# selection) / attention time per unit kept), by cached key rows per call (batch x KV heads x
# keys): below 256K rows, never (-0.2 to -0.05); 256K-512K (batch 1, 32K keys), 0.15-0.25;
# 512K-2M, 0.22-0.43 (batch 1 at 128K keys is the low end: its selection alone takes 65 us);
# 2M and up, 0.52-0.64. Each threshold below sits under the least measured in its range, so that
# decode=True does not cost a model its dense speed where the estimate is off.
DECODE_DENSE_FRACTIONS = ((256 * 1024, 0.0), (512 * 1024, 0.10), (2 * 1024 * 1024, 0.20),
                          (None, 0.45))


def decode_dense_fraction(batch: int, kv_heads: int, keys: int) -> float:
    """The kept fraction above which a decode call of this size runs dense
    (DECODE_DENSE_FRACTIONS): 0 where a certified step never pays."""
    rows = batch * kv_heads * keys
    for below, fraction in DECODE_DENSE_FRACTIONS:
        if below is None or rows < below:
            return fraction
    raise AssertionError("unreachable: the table ends with None")


def _certified_or_dense(query, key, value, bias_and_summary, eps: float, scale: float):
    """Certified decode's output, or None where this site's lagged choice (dense_policy.
    choose_dense: a site samples its first call and every 16th, read without a wait) says dense
    SDPA is faster: on data with nothing to skip the step then costs what dense costs.
    ``bias_and_summary()``: the step's bias and key summary, made on first use."""
    from aether_compile import dense_policy

    fraction = settings.dense_fraction(
        decode_dense_fraction(query.shape[0], key.shape[1], key.shape[2]))
    if fraction == 0.0 and query.device.type == "cuda":
        # a certified step never pays at this size: dense without the sample's bounds and
        # selection (the CPU, where the interpreter runs the kernels for tests, keeps them)
        CALLS["dense"] += 1
        return None
    selection = {}

    def select():
        bias, summary = bias_and_summary()
        upper, lower = kernel_decode.decode_bounds(query, summary, key.shape[2], scale, bias)
        selection["upper"] = upper
        selection["kept"] = kernel_decode.select_blocks(upper, lower, eps)

    def sample():
        # The counts the choice reads: five small ops, issued only on the calls it samples
        # (its first, then every 16th), not on every certified step.
        select()
        live = (selection["upper"] > -math.inf).any(2)  # blocks with a live key in some row
        return torch.stack([selection["kept"][1].sum(dtype=torch.int64),
                            live.sum(dtype=torch.int64)])

    can_read = query.device.type == "cuda" and not torch.cuda.is_current_stream_capturing()
    site = ("decode", _ident(key), tuple(query.shape), query.dtype, eps)
    if fraction is not None and dense_policy.choose_dense(
            site, sample if can_read else None, fraction, lagged=settings.dense_lag()):
        CALLS["dense"] += 1
        return None
    CALLS["certified"] += 1
    if "kept" not in selection:
        select()
    kept_order, n_kept, _ = selection["kept"]
    out, _ = kernel_decode.attend_kept(query, key, value, kept_order, n_kept, scale,
                                       bias_and_summary()[0])
    return out


@decode_attention.register_fake
def _(query, key, value, attn_mask, is_causal, scale, eps):
    return _decode_output(query, value)
