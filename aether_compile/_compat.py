"""Every torch-version difference the rewrite depends on (2.11 and 2.13), in one place.

* ``pre_grad_custom_pass`` holds one callable on 2.11; on 2.13 it may also hold a list/tuple, and a
  pass with ``uuid()`` runs "late" (after the AOT cache lookup) instead of "early".
* ``registry.set_default_backend`` exists on 2.13 only (unused here, noted for completeness).
* Dynamo's ``nn_module_stack`` paths look like ``L['self'].encoder.layer[0]`` (2.13) or
  ``L__self___encoder_layer_0`` style names (older); ``module_path`` normalises both.
* Inductor config overrides (``config.patch`` and plain assignment) are per thread on 2.13 (a
  ``ContextVar`` per entry: a new thread starts from the defaults) and process-global on 2.11;
  ``CONFIG_IS_THREAD_LOCAL`` tells which, by looking, not by version number.
* Cache keys: on 2.11 the pre-grad pass runs before the AOT/FX cache lookups (its graph is what
  gets hashed; the pass's ``uuid`` is not part of any key); on 2.13 a pass with a ``uuid`` runs
  after the lookup and the ``uuid`` is hashed instead. ``post_grad_custom_post_pass``'s ``uuid``
  is in the FX and AOTAutograd keys on both, which is where ``context.CacheSalt`` goes.
* Inductor's analysis of what a user Triton kernel writes: ``identify_mutated_tensors`` returns
  names on 2.11, ``identify_accessed_tensors`` a ``TensorAccesses`` on 2.13 (``declared_access``
  builds either). ``define_user_defined_triton_kernel`` and ``AsyncCompile.triton`` are the same.
"""

from __future__ import annotations

import copy
import re
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

TORCH_VERSION = tuple(int(x) for x in re.findall(r"\d+", torch.__version__.split("+")[0])[:2])
PRE_GRAD_PASS_MAY_BE_LIST = TORCH_VERSION >= (2, 13)

from torch._inductor.custom_graph_pass import CustomGraphPass  # noqa: E402  (both versions)

try:  # 2.13 (and 2.11)
    from torch._inductor.custom_graph_pass import get_hash_for_files
except ImportError:  # pragma: no cover - older torch
    import hashlib

    def get_hash_for_files(paths: tuple[str, ...], extra: str = "") -> bytes:
        hasher = hashlib.sha256()
        hasher.update(extra.encode("utf-8"))
        for path in paths:
            with open(path, "rb") as f:
                hasher.update(f.read())
        return hasher.digest()


def custom_passes(value: Any) -> list[Callable]:
    """The passes a ``pre_grad_custom_pass`` config value stands for (None, callable or list)."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [p for p in value if p is not None]
    return [value]


def sdpa_targets() -> tuple:
    """Callables that spell SDPA in a Dynamo torch-IR graph."""
    return tuple({F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention})


def mha_forward_targets() -> tuple:
    """Dynamo keeps ``F.multi_head_attention_forward`` as one opaque call (both versions)."""
    return (F.multi_head_attention_forward,)


def register_backend_once(name: str, fn: Callable) -> None:
    """Register a Dynamo backend unless the name is taken (registry asserts on duplicates)."""
    from torch._dynamo.backends import registry

    if name in registry._COMPILER_FNS:
        return
    try:
        registry.register_backend(compiler_fn=fn, name=name)
    except AssertionError:  # raced with the entry-point loader
        pass


def mode_options(mode: Optional[str], dynamic: Optional[bool] = None) -> dict:
    """Inductor config implied by ``torch.compile(mode=...)``."""
    if mode is None or mode == "default":
        return {}
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode, dynamic))


def is_inductor_option(key: str) -> bool:
    """Whether ``key`` names an entry of Inductor's config (what ``torch.compile(options=...)``
    accepts for the inductor backend)."""
    from torch._inductor import config

    return key in config._config


def compile_fx(gm, example_inputs, config_patches: dict):
    from torch._inductor.compile_fx import compile_fx as _compile_fx

    return _compile_fx(gm, example_inputs, config_patches=config_patches or None)


def aot_eager(gm, example_inputs):
    from torch._dynamo.backends.debugging import aot_eager as _aot_eager

    return _aot_eager(gm, example_inputs)


def size_hint(x) -> Optional[int]:
    """An int for an int or a backed SymInt (its hint), else None; never adds a guard."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        try:
            return int(x.node.hint) if x.node.hint is not None else None
        except Exception:  # unbacked
            return None
    return None


def module_path(node: torch.fx.Node) -> tuple[str, str]:
    """(dotted module path, module class name) of the innermost module a node came from."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return "", ""
    path, cls = list(stack.values())[-1]
    cls_name = getattr(cls, "__name__", None) or str(cls).rsplit(".", 1)[-1].strip("'>")
    # the compiled object itself: L['self'], or L['args'][0] under a (self, *args) wrapper
    path = re.sub(r"^L\['(self|args)'\](\[0\])?", "", str(path))
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\[['\"]([^'\"]+)['\"]\]", r".\1", path)
    path = re.sub(r"\._modules\.|\._modules\[", ".", path)
    return path.strip("."), cls_name


def source_line(node: torch.fx.Node) -> str:
    """``file:line  code`` of the innermost user frame in the node's stack trace."""
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)', trace)
    if not frames:
        return ""
    file, line, code = frames[-1]
    return f"{file.rsplit('/', 2)[-2:][0] + '/' if '/' in file else ''}{file.rsplit('/', 1)[-1]}:{line}  {code.strip()}"


def run_and_get_code(fn, *args, **kwargs):
    from torch._inductor.utils import run_and_get_code as _run

    return _run(fn, *args, **kwargs)


def recompile_limit_patch(limit: int):
    """Dynamo config patch raising the per-code recompile limit (renamed from cache_size_limit)."""
    import torch._dynamo.config as dcfg

    name = "recompile_limit" if hasattr(dcfg, "recompile_limit") else "cache_size_limit"
    return dcfg.patch(**{name: max(limit, getattr(dcfg, name))})


def graph_module_of(graph_or_gm):
    """Custom passes get an ``fx.Graph`` (both versions); older code passed the GraphModule."""
    if isinstance(graph_or_gm, torch.fx.GraphModule):
        return graph_or_gm
    return graph_or_gm.owning_module


def _config_is_thread_local() -> bool:
    import contextvars

    import torch._inductor.config as icfg

    entry = getattr(icfg, "_config", {}).get("pre_grad_custom_pass")
    return isinstance(getattr(entry, "user_override", None), contextvars.ContextVar)


CONFIG_IS_THREAD_LOCAL = _config_is_thread_local()

POST_GRAD_POST_PASS = "post_grad_custom_post_pass"  # the config entry CacheSalt occupies


def get_post_grad_post_pass():
    import torch._inductor.config as icfg

    return getattr(icfg, POST_GRAD_POST_PASS)


def set_post_grad_post_pass(value) -> None:
    import torch._inductor.config as icfg

    setattr(icfg, POST_GRAD_POST_PASS, value)


def set_pre_grad_pass(value) -> None:
    import torch._inductor.config as icfg

    icfg.pre_grad_custom_pass = value


def get_pre_grad_pass():
    import torch._inductor.config as icfg

    return icfg.pre_grad_custom_pass


def copy_graph(graph: "torch.fx.Graph") -> "torch.fx.Graph":
    """A deep copy of an FX graph that keeps the extra attributes Dynamo sets on nodes (e.g.
    placeholders' ``_dynamo_source``, which AOTAutograd looks up); ``Graph.__deepcopy__`` keeps
    only the standard ones. Node meta is copied shallowly (fake values stay shared)."""
    new = copy.deepcopy(graph)
    for old, fresh in zip(graph.nodes, new.nodes):
        for name, value in vars(old).items():
            if name not in vars(fresh):
                setattr(fresh, name, value)
    return new


# -- Inductor's access analysis of user-defined Triton kernels -----------------------------------
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


# -- Inductor's compile of our traced kernels, started as soon as it is generated ----------------
# Inductor hands each kernel of its own to its worker pool the moment it generates it
# (``TritonScheduling._emit_kernel_to_wrapper``: "the process pool is warm, we can shell out to
# workers right away"), but a user-defined kernel only when the finished module is loaded. Ours,
# the longest compile of a graph (about 0.5 s on the H100's host against 0.1-0.3 s for Inductor's
# fused kernels), then started last and was the tail of ``async_compile.wait``. This starts it
# where Inductor starts its own: the module's ``async_compile.triton(name, source)`` call, made
# early with the same arguments, leaves a future in ``CompiledTritonKernels`` (keyed by the
# source) that the module's own call then finds. Same code on 2.11 and 2.13.
_early_kernels: set = set()
early_compile_stats = {"started": 0, "skipped": 0}


def compile_user_kernels_early(kernels) -> None:
    """Start Inductor's compile of ``kernels`` (our @triton.jit functions, traced through
    wrap_triton) when it generates them rather than when it loads its module. Idempotent."""
    from torch._inductor.codegen.wrapper import PythonWrapperCodegen

    _early_kernels.update(id(getattr(k, "fn", k)) for k in kernels)
    original = PythonWrapperCodegen.define_user_defined_triton_kernel
    if getattr(original, "_aether_early", False):
        return

    PythonWrapperCodegen.define_user_defined_triton_kernel = _starting_early(original)


def _starting_early(original: Callable) -> Callable:
    """``define_user_defined_triton_kernel`` that, for our kernels, starts compiling each kernel
    definition it writes (``_start_compile``)."""
    def define_user_defined_triton_kernel(self, kernel, *args, **kwargs):
        if id(getattr(kernel, "fn", kernel)) not in _early_kernels:
            return original(self, kernel, *args, **kwargs)
        bodies, define_kernel = [], self.define_kernel

        def recording(name, body, *a, **kw):
            bodies.append(body)
            return define_kernel(name, body, *a, **kw)

        self.define_kernel = recording  # this call only (an instance attribute over the method)
        try:
            result = original(self, kernel, *args, **kwargs)
        finally:
            del self.define_kernel
        for body in bodies:  # none where an earlier launch defined the same kernel
            _start_compile(body)
        return result

    define_user_defined_triton_kernel._aether_early = True
    define_user_defined_triton_kernel.__wrapped__ = original
    return define_user_defined_triton_kernel


def _start_compile(body: str) -> None:
    """Make the ``async_compile.triton(name, source, device_str=...)`` call that ``body`` (a kernel
    definition of Inductor's Python wrapper) holds, now, where Inductor compiles on its workers;
    anything unforeseen leaves the call to the module, as before."""
    import ast

    try:
        import torch._inductor.config as icfg
        from torch._inductor.async_compile import AsyncCompile

        if icfg.cpp_wrapper or not AsyncCompile.use_process_pool():
            early_compile_stats["skipped"] += 1
            return
        call = ast.parse(body.strip(), mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and call.func.attr == "triton" and len(call.args) == 2):
            early_compile_stats["skipped"] += 1
            return
        name, source = (ast.literal_eval(a) for a in call.args)
        options = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        AsyncCompile().triton(name, source, **options)
        early_compile_stats["started"] += 1
    except Exception:  # noqa: BLE001  (a speed-up only: the module compiles it as before)
        early_compile_stats["skipped"] += 1


def inductor_launch_signature(signature: dict) -> dict:
    """The signature Inductor gives a launch of a user-defined Triton kernel, from Triton's own
    for the same arguments (a C launcher is keyed by it): Inductor types Python floats fp64 where
    ``_use_fp64_for_unbacked_floats`` is on (2.11 and 2.13; CUDA supports fp64), Triton fp32.
    Ints, bools, pointers and constexprs (ints equal to 1 included) agree."""
    import torch._inductor.config as icfg

    if not getattr(icfg, "_use_fp64_for_unbacked_floats", False):
        return dict(signature)
    return {k: "fp64" if ty == "fp32" else ty for k, ty in signature.items()}


def inductor_compile_pool():
    """Inductor's pool of compile worker processes (persistent, torch already imported), and the
    environment a job must set (cache directories may change after the workers started), or None
    where Inductor would compile in-process now: one compile thread, a daemonic process, a pool
    still starting (a process's first compile), or internals that differ. Same calls on 2.11 and
    2.13: ``AsyncCompile.use_process_pool`` / ``process_pool`` and the variables
    ``AsyncCompile.triton`` passes to its own jobs."""
    import os

    try:
        from torch._inductor import async_compile as ac

        allowed = getattr(ac, "_process_pool_allowed", lambda: True)
        if ac.get_compile_threads() <= 1 or not allowed():
            return None
        if not ac.AsyncCompile.use_process_pool():  # not ready: Inductor compiles in-process too
            return None
        pool = ac.AsyncCompile.process_pool()
    except Exception:
        return None
    names = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TRITON_LIBDEVICE_PATH")
    return pool, {n: os.environ[n] for n in names if n in os.environ}
