"""Registration of the ``aether`` torch ops (done once, at import of ``aether_compile``).

* ``aether::attention`` — certified block-sparse attention, SDPA's argument order, returns out.
  CompositeImplicitAutograd over ``attention_with_stats``.
* ``aether::attention_with_stats`` — returns (out, per-row log-sum-exp, bool map of computed
  blocks); has the fake implementation and the autograd formula.
* ``aether::attention_backward`` — gradients of the function the forward computed (attention
  restricted to the kept blocks), from the forward's lse and kept map: Triton on CUDA.

Implementation choice per call: the Triton kernels on CUDA (or under TRITON_INTERPRET=1 when a
caller asks for them directly), otherwise the plain-torch reference, which has the same semantics.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import weakref
from typing import Optional

import torch
from torch import Tensor

from aether_compile import _compat, dense_policy, inductor, settings, triton_forward
from aether_compile.kernels import backward as _bwd
from aether_compile.kernels import dense as kernel_dense
from aether_compile.kernels import forward as kernel_forward
from aether_compile.kernels import launch
from aether_compile.kernels import plan as kernel_plan
from aether_compile.kernels import reference as _ref
from aether_compile.kernels import registry
from aether_compile.inductor import precompile as _precompile
from aether_compile.kernels.certificate import num_blocks
from aether_compile.validation import check_inputs

# Default eps per dtype: the largest eps whose output error stays inside that dtype's own
# rounding noise (SDPA in the dtype vs float64); measured by `benchmarks/bench_attention.py
# --suite calibrate` (results/calibrate_NVIDIA_H200.json, docs/certificate.md). float64 is the
# oracle dtype and defaults to exact (dense) attention.
DEFAULT_EPS = {
    torch.float16: 1e-3,
    torch.bfloat16: 4e-3,
    torch.float32: 1e-5,
    torch.float64: 0.0,
}


def default_eps(dtype: torch.dtype) -> float:
    return DEFAULT_EPS.get(dtype, 0.0)


def resolve_blocks(query: Tensor, value: Tensor, block_m: Optional[int], block_n: Optional[int],
                   key: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None):
    """Tile sizes a call will use; the fake implementation and both backends agree on them. Long
    calls without a mask take longer key blocks (``launch.LONG_KEYS``): pass ``key`` and
    ``attn_mask`` wherever the call's kept map is read."""
    dm, dn = launch.default_blocks(max(query.shape[-1], value.shape[-1]), "cuda",
                                   None if key is None else key.shape[-2], attn_mask is not None)
    return block_m or dm, block_n or dn


def use_triton(query: Tensor, key: Tensor, value: Tensor) -> bool:
    if query.device.type == "cuda":
        return launch.unsupported_reason(query, key, value) is None
    return False


def _tracing(t: Tensor) -> bool:
    from torch._subclasses.fake_tensor import is_fake

    return is_fake(t)


def forward_impl(query, key, value, attn_mask, is_causal, scale, enable_gqa, eps,
                 block_m=None, block_n=None, with_kept: bool = True):
    """(out, lse, kept) with eps resolved; the body of aether::attention_with_stats. Traceable:
    torch ops, wrap_triton launches and opaque aether ops only (no host reads). with_kept=False
    (eager calls only, ``_eager_inference``): kept may be None."""
    check_inputs(query, key, value, attn_mask, 0.0, scale, enable_gqa, eps)
    eps = default_eps(query.dtype) if eps is None else float(eps)
    block_m, block_n = resolve_blocks(query, value, block_m, block_n, key, attn_mask)
    B, H, L, _ = query.shape
    S = key.shape[-2]
    if L == 0 or S == 0 or B == 0 or H == 0:  # empty, or no keys: zeros, as SDPA
        out = (kernel_forward.new_out(query, value.shape[-1]) if use_triton(query, key, value)
               else query.new_empty(B, H, L, value.shape[-1])).zero_()
        lse = torch.full((B, H, L), -math.inf, device=query.device, dtype=torch.float32)
        kept = torch.zeros(B, H, num_blocks(L, block_m), num_blocks(S, block_n),
                           dtype=torch.bool, device=query.device)
        return out, lse, kept
    if not use_triton(query, key, value):
        return torch.ops.aether.reference_attention_with_stats(
            query, key, value, attn_mask, is_causal, scale, enable_gqa, eps, block_m, block_n)
    scale_f = query.shape[-1] ** -0.5 if scale is None else float(scale)

    def with_all_blocks_kept(dense):
        if not with_kept:
            return (*dense, None)
        if not launch.is_static(L, S):  # traced: block counts as unbacked sizes (live_blocks)
            return (*dense, torch.ops.aether.live_blocks(query, key, is_causal, block_m, block_n))
        return (*dense, kernel_plan.all_live_blocks(L, S, block_m, block_n, is_causal, B, H,
                                                    query.device))

    tracing = _tracing(query)
    twopass = tracing and kernel_forward.forward_mode() == "twopass"
    route = dense_policy.route(query, key, value, attn_mask, is_causal, block_n, twopass)
    fraction = route.fraction
    if route.static_dense:
        dense = None
        if kernel_dense.dense_eligible(query, key, value, attn_mask, is_causal):
            # cuDNN where a failure can still be caught (eager); in traced graphs cuDNN only
            # where SDPA's dispatcher picks it (as Inductor's default compile does), else flash
            dense = kernel_dense.dense_sdpa_with_lse(query, key, value, is_causal, scale_f,
                                                     try_cudnn="if_sdpa_picks" if tracing else True)
        if dense is not None:
            return with_all_blocks_kept(dense)
        eps = 0.0  # exact, on our kernel (a general mask)
    elif route.sample and not tracing and not torch.cuda.is_current_stream_capturing():
        # Eager (a host read): a sample of the rows decides before the full plan, unless the
        # public function's sample just did (dense_policy.eager_dense_call)
        dense = False if dense_policy.decided_sparse() else dense_policy.eager_choice(
            query, key, value, is_causal, scale, eps, block_m, block_n, fraction)
        if dense:
            out = kernel_dense.dense_sdpa_with_lse(query, key, value, is_causal, scale_f)
            if out is not None:
                return with_all_blocks_kept(out)
        if dense is not None:
            fraction = None  # decided: the pass runs in one launch (VISIT_CERTIFY), no gate
    if twopass:
        # Compiled graphs: everything before the pass (the dense choice from a sample of an
        # earlier call, the plan, the probe and gate) is one opaque op that runs when the graph
        # runs; Inductor compiles the pass alone.
        prepared = torch.ops.aether.prepare_pass(
            query, key, value, attn_mask, is_causal, scale_f, eps, block_m, block_n, fraction,
            route.sample, route.gate, kernel_forward.heads_interleaved(query),
            _traced_site_id(query))
        return triton_forward.attention_after_prepare(query, key, value, attn_mask, is_causal,
                                                      scale_f, eps, block_m, block_n, prepared,
                                                      route.sample, route.gate)
    return triton_forward.triton_attention(query, key, value, attn_mask, is_causal, scale,
                                           enable_gqa, eps, block_m, block_n,
                                           dense_fraction=fraction, with_kept=with_kept)


_SITE_COUNTERS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _traced_site_id(query: Tensor) -> int:
    """A number for this attention site in the graph being traced: its order among the sites
    traced under the same fake mode (one per compile). The same model compiles to the same
    numbers in every process, so the FX graph cache still hits; the runtime dense choice keys on
    it (kernels/dense_choice.py) so that layers of equal shape keep their own choices."""
    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([query])
    if mode is None:
        return -1
    counter = _SITE_COUNTERS.setdefault(mode, itertools.count())
    return next(counter)


def _fake_outputs(query, key, value, attn_mask, block_m=None, block_n=None, kernel_layout=False):
    """Fake (out, lse, kept); out strided as the Triton path writes it where ``kernel_layout``,
    else contiguous (the reference)."""
    B, H, L, _ = query.shape
    S = key.shape[-2]
    block_m, block_n = resolve_blocks(query, value, block_m, block_n, key, attn_mask)
    out = (kernel_forward.new_out(query, value.shape[-1]) if kernel_layout
           else query.new_empty(B, H, L, value.shape[-1]))
    lse = query.new_empty(B, H, L, dtype=torch.float32)
    kept = query.new_empty(B, H, _fake_block_count(L, block_m), _fake_block_count(S, block_n),
                           dtype=torch.bool)
    return out, lse, kept


def _fake_block_count(length, block: int):
    """A block count for a fake output: the count itself where the length is static; a new
    unbacked size where it is symbolic. ceil(L/128) can be 1, and tracing records every tensor's
    contiguity, which asks size == 1 of each dim: on a backed symbol that question is a guard, so
    lengths up to one block and past it would compile apart. Unbacked, it is no guard; the size is
    bound from the real output when the graph runs."""
    count = num_blocks(length, block)
    if launch.is_static(count):
        return count
    # the shape env's own unbacked size: the library's ctx.new_dynamic_size() refuses unless
    # Dynamo captures data-dependent output shapes, a setting for ops whose sizes depend on data
    return count.node.shape_env.create_unbacked_symint()


# -- opaque helpers the traceable bodies call ----------------------------------------------------
@torch.library.custom_op("aether::live_blocks", mutates_args=())
def live_blocks(query: Tensor, key: Tensor, is_causal: bool, block_m: int, block_n: int
                ) -> Tensor:
    """The kept map of a call that went dense (``kernel_plan.all_live_blocks``), opaque where
    the lengths are symbolic, so that its block counts are unbacked sizes
    (``_fake_block_count``)."""
    B, H, L, _ = query.shape
    return kernel_plan.all_live_blocks(L, key.shape[-2], block_m, block_n, is_causal, B, H,
                                       query.device)  # a new tensor: ones, or a causal copy


@live_blocks.register_fake
def _(query, key, is_causal, block_m, block_n):
    B, H, L, _ = query.shape
    return query.new_empty(B, H, _fake_block_count(L, block_m),
                           _fake_block_count(key.shape[-2], block_n), dtype=torch.bool)


@torch.library.custom_op("aether::reference_attention_with_stats", mutates_args=())
def reference_attention_with_stats(query: Tensor, key: Tensor, value: Tensor,
                                   attn_mask: Optional[Tensor], is_causal: bool,
                                   scale: Optional[float], enable_gqa: bool, eps: float,
                                   block_m: int, block_n: int) -> tuple[Tensor, Tensor, Tensor]:
    """The plain-torch implementation (CPU and unsupported inputs), opaque to the compiler."""
    out, lse, kept = _ref.reference_attention(query, key, value, attn_mask, is_causal, scale,
                                              enable_gqa, eps, block_m, block_n)
    return out.contiguous(), lse.contiguous(), kept.contiguous()


@reference_attention_with_stats.register_fake
def _(query, key, value, attn_mask, is_causal, scale, enable_gqa, eps, block_m, block_n):
    return _fake_outputs(query, key, value, attn_mask, block_m, block_n)


@torch.library.custom_op("aether::prepare_pass", mutates_args=())
def prepare_pass(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                 is_causal: bool, scale: float, eps: float, block_m: int, block_n: int,
                 fraction: Optional[float], sample: bool, gate: bool, out_interleaved: bool,
                 site: int = -1) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor,
                                          Tensor, Tensor, Tensor]:
    """Compiled graphs' stages before the attention pass (triton_forward.prepare_pass):
    opaque, so that the dense choice's sample and host read happen when the graph runs, and
    Inductor compiles one Triton launch per site instead of six. The output's layout is fixed when
    the graph is traced (``out_interleaved``), where the fake decides it: the two always agree."""
    _precompile.wait()  # kernels this graph's trace started compiling (its first call)
    out, *rest = triton_forward.prepare_pass(query, key, value, attn_mask, is_causal, scale, eps,
                                             block_m, block_n, fraction, sample, gate, site)
    return (kernel_forward.as_out_layout(out, query, out_interleaved), *rest)


@prepare_pass.register_fake
def _(query, key, value, attn_mask, is_causal, scale, eps, block_m, block_n, fraction, sample,
      gate, out_interleaved, site=-1):
    # Tracing sees the real shapes: start JIT-compiling the kernels the first call will launch.
    _precompile.start_for_prepare(query, key, value, attn_mask, is_causal, scale, eps, block_m,
                                  block_n, fraction, sample, gate)
    return triton_forward.new_prepared(
        query, key, value, attn_mask, block_m, block_n, out_interleaved,
        blocks=(_fake_block_count(query.shape[-2], block_m),
                _fake_block_count(key.shape[-2], block_n)))


@torch.library.custom_op("aether::reference_attention_backward", mutates_args=())
def reference_attention_backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor,
                                 kept: Tensor, attn_mask: Optional[Tensor], is_causal: bool,
                                 scale: Optional[float], block_m: int, block_n: int
                                 ) -> tuple[Tensor, Tensor, Tensor]:
    cdt = _ref.compute_dtype_for(query.dtype)
    dq, dk, dv = _ref.restricted_attention_backward(
        grad_out.to(cdt), query.to(cdt), key.to(cdt), value.to(cdt), attn_mask, is_causal, scale,
        kept, block_m, block_n)
    return (dq.to(query.dtype).contiguous(), dk.to(key.dtype).contiguous(),
            dv.to(value.dtype).contiguous())


@reference_attention_backward.register_fake
def _(grad_out, query, key, value, kept, attn_mask, is_causal, scale, block_m, block_n):
    return (query.new_empty(query.shape), key.new_empty(key.shape),
            value.new_empty(value.shape))


# On CUDA the op bodies launch Triton kernels through wrap_triton, so torch.compile traces into
# them and Inductor emits the kernels in its own generated code (triton_op). AETHER_TRITON_OP=0
# (read at import) registers the same bodies as opaque custom ops instead: a switch for
# torch/Triton combinations whose tracing of user kernels misbehaves.
USE_TRITON_OP = settings.triton_op()
_define = ((lambda name: torch.library.triton_op(name, mutates_args=())) if USE_TRITON_OP
           else (lambda name: torch.library.custom_op(name, mutates_args=())))
# Inductor's handling of our traced kernels, for compile time: their declared writes answer its
# access analysis, and their compiles start when it generates them (aether_compile/inductor).
if USE_TRITON_OP:
    inductor.install(registry.JIT_KERNELS, registry.KERNEL_WRITES)


# -- aether::attention_with_stats -----------------------------------------------------------------
@_define("aether::attention_with_stats")
def attention_with_stats(query: Tensor, key: Tensor, value: Tensor,
                         attn_mask: Optional[Tensor] = None, is_causal: bool = False,
                         scale: Optional[float] = None, enable_gqa: bool = False,
                         eps: Optional[float] = None, block_m: Optional[int] = None,
                         block_n: Optional[int] = None) -> tuple[Tensor, Tensor, Tensor]:
    return forward_impl(query, key, value, attn_mask, is_causal, scale, enable_gqa, eps,
                        block_m, block_n)


if not USE_TRITON_OP:  # triton_op registers its body as the fake
    @attention_with_stats.register_fake
    def _(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
          eps=None, block_m=None, block_n=None):
        return _fake_outputs(query, key, value, attn_mask, block_m, block_n,
                             kernel_layout=use_triton(query, key, value))


# -- aether::attention_backward ------------------------------------------------------------------
@_define("aether::attention_backward")
def attention_backward(grad_out: Tensor, query: Tensor, key: Tensor, value: Tensor, out: Tensor,
                       lse: Tensor, kept: Tensor, attn_mask: Optional[Tensor] = None,
                       is_causal: bool = False, scale: Optional[float] = None,
                       block_m: Optional[int] = None, block_n: Optional[int] = None
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of attention restricted to the forward's kept blocks (exact for that function)."""
    if query.shape[-2] == 0 or key.shape[-2] == 0 or query.shape[0] * query.shape[1] == 0:
        return torch.zeros_like(query), torch.zeros_like(key), torch.zeros_like(value)
    # the forward's tiles, which the kept map is on
    block_m, block_n = resolve_blocks(query, value, block_m, block_n, key, attn_mask)
    if use_triton(query, key, value):
        return _bwd.triton_attention_backward(grad_out, query, key, value, out, lse, kept,
                                              attn_mask, is_causal, scale, block_m, block_n)
    return torch.ops.aether.reference_attention_backward(
        grad_out, query, key, value, kept, attn_mask, is_causal, scale, block_m, block_n)


if not USE_TRITON_OP:
    @attention_backward.register_fake
    def _(grad_out, query, key, value, out, lse, kept, attn_mask=None, is_causal=False,
          scale=None, block_m=None, block_n=None):
        return (query.new_empty(query.shape), key.new_empty(key.shape),
                value.new_empty(value.shape))


def _setup_context(ctx, inputs, output):
    query, key, value, attn_mask, is_causal, scale, enable_gqa, eps, block_m, block_n = inputs
    out, lse, kept = output
    # O(L + S) activations plus block-level metadata: no [L, S] buffer is kept for backward.
    ctx.save_for_backward(query, key, value, attn_mask, out, lse, kept)
    ctx.params = (is_causal, scale, block_m, block_n)
    ctx.mask_needs_grad = attn_mask is not None and attn_mask.requires_grad


def _backward(ctx, grad_out, _grad_lse, _grad_kept):
    # lse and kept are statistics: the selection is piecewise constant (no gradient) and lse is
    # not treated as differentiable.
    query, key, value, attn_mask, out, lse, kept = ctx.saved_tensors
    if ctx.mask_needs_grad:
        raise RuntimeError(
            "aether.attention does not compute the gradient of attn_mask; pass a mask that does "
            "not require grad (detach it) or use torch.nn.functional.scaled_dot_product_attention")
    is_causal, scale, block_m, block_n = ctx.params
    dq, dk, dv = torch.ops.aether.attention_backward(
        grad_out.contiguous(), query, key, value, out, lse, kept, attn_mask, is_causal, scale,
        block_m, block_n)
    return dq, dk, dv, None, None, None, None, None, None, None


attention_with_stats.register_autograd(_backward, setup_context=_setup_context)


# -- aether::attention ---------------------------------------------------------------------------
# The drop-in op that rewritten graphs call. CompositeImplicitAutograd: it is a view on
# attention_with_stats (which carries the fake, the kernels and autograd), so AOTAutograd traces
# it into attention_with_stats + attention_backward and the forward's lse and kept blocks reach
# the backward without recomputation.
torch.library.define(
    "aether::attention",
    "(Tensor query, Tensor key, Tensor value, Tensor? attn_mask=None, bool is_causal=False, "
    "float? scale=None, bool enable_gqa=False, float? eps=None) -> Tensor")


@torch.library.impl("aether::attention", "CompositeImplicitAutograd")
def attention_op(query, key, value, attn_mask=None, is_causal=False, scale=None, enable_gqa=False,
                 eps=None):
    if _eager_inference(query, key, value, attn_mask):
        # nothing reads the kept map: not built (attention_with_stats' body, without its map)
        return forward_impl(query, key, value, attn_mask, is_causal, scale, enable_gqa, eps,
                            with_kept=False)[0]
    with _discarding_unbacked_sizes(query):
        return torch.ops.aether.attention_with_stats(query, key, value, attn_mask, is_causal,
                                                     scale, enable_gqa, eps)[0]


def _eager_inference(query, key, value, attn_mask) -> bool:
    """An eager call on the Triton path whose output nobody differentiates: plain tensors
    outside any trace, dispatch mode or functorch transform, and no input that autograd would
    follow. There ``aether::attention`` returns out alone, so the kept map (a scatter over every
    block) is not built; traced graphs drop it themselves where only out is used."""
    tensors = (query, key, value) if attn_mask is None else (query, key, value, attn_mask)
    if not launch.plain_eager(*tensors) or launch.tracing_now():  # tracing_now: dispatch modes
        return False
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return False
    return use_triton(query, key, value)


def _discarding_unbacked_sizes(query):
    """Where fake tensors are propagated outside graph tracing (Dynamo's example values, the
    pass's new nodes), the kept map's unbacked block counts (``_fake_block_count``) never leave
    this op, which returns ``out`` alone: they are discarded, not left pending (Dynamo would
    fail the call: "pending unbacked symbols not in returned outputs"). Under AOT's tracing (a
    proxy mode) they stay, and bind to attention_with_stats' kept output."""
    shape_env = getattr(getattr(query, "fake_mode", None), "shape_env", None)
    if shape_env is None:  # real tensors (every eager call): nothing more to ask
        return contextlib.nullcontext()
    from torch.fx.experimental.proxy_tensor import get_proxy_mode

    if get_proxy_mode() is not None:
        return contextlib.nullcontext()
    return shape_env.ignore_fresh_unbacked_symbols()
