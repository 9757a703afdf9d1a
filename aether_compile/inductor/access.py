"""Inductor's access analysis of our Triton kernels, answered from what each declares it writes.

Installed by ``aether_compile.inductor.install`` (``AETHER_ACCESS_MEMO=0`` leaves Inductor's own
analysis in place). Wraps ``torch._higher_order_ops.triton_kernel_wrap``'s analysis function, which
differs by torch version (``_compat`` documents both).
"""

from __future__ import annotations

import copy
from typing import Callable, Optional

import torch

# Inductor finds which arguments a wrap_triton kernel writes by generating the kernel's TTIR
# (Triton's frontend, on the main thread) for every launch at every stage that asks: AOT's
# functionalisation (metadata pass and trace), graph lowering and the scheduler. The function is
# ``identify_accessed_tensors`` on 2.13 (returns TensorAccesses), ``identify_mutated_tensors``
# on older builds (returns names). An H100 profile of a cold 2-layer GPT-2 compile showed hundreds
# of Triton code generations on the main thread. The answer depends only on the kernel and on what
# TTIR generation sees of each argument (a tensor's dtype, a symbolic size's placeholder, a plain
# value), so for our own kernels it is computed once per such key.
# Better still, our kernels declare what they write (``writes``): the answer is then built from
# that declaration, as each version's analysis returns it, and no TTIR is generated at all (0.4-0.5
# s of the main thread per kernel variant in a process's first compile on the H100's host).
ACCESS_ANALYSIS_FNS = ("identify_accessed_tensors", "identify_mutated_tensors")
_memoised_kernels: set = set()
_declared_writes: dict = {}  # id(JITFunction's function) -> launch arguments -> names written
access_analysis_stats = {"hits": 0, "misses": 0, "not_memoised": 0, "declared": 0}
# Argument types that kept a call out of the memo, and how often: what to name next
not_memoised_types: dict = {}


def _access_key(kernel, kwargs: dict, tma_descriptor_metadata) -> Optional[tuple]:
    """What TTIR generation sees of ``kwargs`` (see ``generate_ttir``), or None where it sees more
    than this knows how to name (then the call is not memoised)."""
    import sympy
    from torch._subclasses.fake_tensor import FakeTensor

    fn = getattr(kernel, "fn", kernel)  # an Autotuner wraps the JITFunction
    if id(fn) not in _memoised_kernels or tma_descriptor_metadata:
        return None
    try:
        from torch._inductor.ir import IRNode, TensorBox
    except ImportError:  # pragma: no cover
        IRNode = TensorBox = ()
    parts = []
    for name in sorted(kwargs):
        a = kwargs[name]
        if isinstance(a, (torch.SymInt, torch.SymFloat, torch.SymBool, sympy.Expr)):
            parts.append((name, "sym"))
        elif isinstance(a, FakeTensor):
            parts.append((name, "tensor", a.dtype))
        elif TensorBox and isinstance(a, TensorBox):
            parts.append((name, "tensor", a.get_dtype()))
        elif IRNode and isinstance(a, IRNode):
            # Other IR nodes reach TTIR generation as they are: keyed by their type, so the
            # first of each kind runs the real analysis and later ones get its answer
            parts.append((name, type(a).__qualname__, a.get_dtype()))
        elif a is None or type(a) in (bool, int, float, str):
            parts.append((name, type(a).__name__, a))
        else:  # real tensors (alignment matters), constexpr wrappers, anything unforeseen
            kind = type(a).__qualname__
            not_memoised_types[kind] = not_memoised_types.get(kind, 0) + 1
            return None
    return (id(fn), tuple(parts))


def memoise_kernel_access_analysis(kernels, writes: Optional[dict] = None) -> None:
    """Memoise Inductor's access analysis for ``kernels`` (our @triton.jit functions), and answer
    it from ``writes`` (kernel name -> arguments by name -> names written) where given.
    Idempotent; a torch without the function is left alone."""
    from torch._higher_order_ops import triton_kernel_wrap as tkw

    for k in kernels:
        fn = getattr(k, "fn", k)
        _memoised_kernels.add(id(fn))
        if writes and fn.__name__ in writes:
            _declared_writes[id(fn)] = writes[fn.__name__]
    for name in ACCESS_ANALYSIS_FNS:
        original = getattr(tkw, name, None)
        if original is None or getattr(original, "_aether_memoised", False):
            continue
        tkw.__dict__[name] = _memoised(original, name)


def declared_access(kernel, kwargs: dict, analysis_name: str):
    """What ``analysis_name`` would return for a launch of ``kernel`` with ``kwargs`` (every
    argument by name), built from the kernel's declared writes; None where it declares none.
    ``identify_mutated_tensors`` (2.11): the names written, in argument order.
    ``identify_accessed_tensors`` (2.13): every tensor argument read (a superset is safe: a read
    only orders the schedule), the written ones written, no epilogue fusion into our kernel."""
    declared = _declared_writes.get(id(getattr(kernel, "fn", kernel)))
    if declared is None:
        return None
    written = set(declared(kwargs))
    if analysis_name == "identify_mutated_tensors":
        return [name for name in kwargs if name in written]
    from torch._higher_order_ops.triton_kernel_wrap import TensorAccesses
    from torch._inductor.dependencies import ReadWrites, StarDep
    from torch._inductor.ir import IRNode
    from torch.utils._ordered_set import OrderedSet

    touched = [n for n, a in kwargs.items()
               if n in written or isinstance(a, (torch.Tensor, IRNode))]
    return TensorAccesses(
        ReadWrites(reads=OrderedSet(StarDep(n) for n in touched),
                   writes=OrderedSet(StarDep(n) for n in touched if n in written),
                   index_exprs=OrderedSet()),
        can_fuse_epilogue=False)


def _memoised(original: Callable, name: str) -> Callable:
    cache: dict = {}

    def analysis(kernel, kwargs, tma_descriptor_metadata, *args, **kw):
        if not tma_descriptor_metadata and not args and not kw:
            try:
                declared = declared_access(kernel, kwargs, name)
            except Exception:  # noqa: BLE001  (never in the way of Inductor: analyse as usual)
                declared = None
            if declared is not None:
                access_analysis_stats["declared"] += 1
                return declared
        try:
            key = _access_key(kernel, kwargs, tma_descriptor_metadata)
        except Exception:  # noqa: BLE001  (never in the way of Inductor: analyse as usual)
            key = None
        if key is None or args or kw:
            if id(getattr(kernel, "fn", kernel)) in _memoised_kernels:
                access_analysis_stats["not_memoised"] += 1
            return original(kernel, kwargs, tma_descriptor_metadata, *args, **kw)
        if key not in cache:
            access_analysis_stats["misses"] += 1
            cache[key] = original(kernel, kwargs, tma_descriptor_metadata)
        else:
            access_analysis_stats["hits"] += 1
        return copy.deepcopy(cache[key])  # callers may keep and change what they get

    analysis._aether_memoised = True
    analysis.__wrapped__ = original
    analysis.cache = cache
    return analysis


