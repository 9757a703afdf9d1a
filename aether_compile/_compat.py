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
* Which SDPA backend takes a mask with ``enable_gqa`` differs by release: ``sdpa_fused_takes``
  asks SDPA's own checks.
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


# Tags of an op whose Python must run at every call: the key summary's version checks (a cache
# written behind our back is noticed only there) and the decode path's lagged choice. A CUDA
# graph would replay the kernels its capture launched and skip that Python, so Inductor leaves
# such an op out of its CUDA graphs: with graph partitions (Inductor's default) the op runs
# between two partitions' replays, without them the graph runs without CUDA graphs.
HOST_EVERY_CALL_TAGS = ((torch.Tag.cudagraph_unsafe,) if hasattr(torch.Tag, "cudagraph_unsafe")
                        else ())


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


def is_dynamo_restart(exc: BaseException) -> bool:
    """Dynamo's own control flow raised through a backend (e.g. TensorifyScalarRestartAnalysis
    under dynamic=True): it must reach Dynamo, which traces again; it is not a failure."""
    restart = getattr(getattr(torch._dynamo, "exc", None), "RestartAnalysis", None)
    return restart is not None and isinstance(exc, restart)


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


def sdpa_fused_takes(query, key, value, attn_mask, enable_gqa: bool) -> bool:
    """Whether SDPA would run one of its fused CUDA kernels (flash, efficient, cuDNN: each
    enabled and taking these inputs) rather than math, without running it. Releases differ in
    which backend takes a mask together with ``enable_gqa`` (math alone on some; a fused one on the
    device's 2.11), so it is asked, not assumed. False where the probe itself is missing."""
    backends = torch.backends.cuda
    try:
        params = backends.SDPAParams(query, key, value, attn_mask, 0.0, False, enable_gqa)
        return ((backends.cudnn_sdp_enabled() and backends.can_use_cudnn_attention(params))
                or (backends.mem_efficient_sdp_enabled()
                    and backends.can_use_efficient_attention(params))
                or (backends.flash_sdp_enabled() and backends.can_use_flash_attention(params)))
    except (AttributeError, TypeError, RuntimeError):
        return False
