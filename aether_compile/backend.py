"""The ``aether`` torch.compile backend: rewrite attention in Dynamo's graph, then Inductor.

``torch.compile(model, backend="aether")`` works without importing this package: pyproject declares
the entry point ``aether = aether_compile.backend:aether_backend`` in ``torch_dynamo_backends``,
and Dynamo registers it on first lookup. The rewrite runs on the torch-IR graph before AOT
autograd, so training graphs trace through the op's autograd.

Caches: Inductor's FX graph cache and the AOTAutograd cache key the rewritten graph (the op and its
arguments, eps included), plus a ``context.CacheSalt`` installed for the compile whose uuid covers
the options, the sources and the switches of ``settings.KEYED``; a second process compiling the
same model with the same options hits, one with other options, code or knobs misses.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Optional

import torch

from . import _compat
from .context import AetherPass, CacheSalt
from .options import AetherOptions

log = logging.getLogger("aether_compile")


def split_options(options: Any) -> tuple[AetherOptions, dict]:
    """(AetherOptions, inductor config) from ``options=``: an AetherOptions, or a dict mixing our
    fields (or an ``"aether"`` entry holding them) with Inductor config keys."""
    if options is None:
        return AetherOptions(), {}
    if isinstance(options, AetherOptions):
        return options, {}
    if not isinstance(options, Mapping):
        raise TypeError("options must be a dict or an AetherOptions, got "
                        f"{type(options).__name__}")
    options = dict(options)
    ours = options.pop("aether", None)
    fields = {k: options.pop(k) for k in list(options) if k in AetherOptions.field_names()}
    unknown = sorted(k for k in options if not _compat.is_inductor_option(k))
    if unknown:
        raise TypeError(
            f"unknown option(s) {unknown}: aether's options are "
            f"{sorted(AetherOptions.field_names())}; any other key must name an Inductor config "
            "entry (e.g. 'max_autotune', 'triton.cudagraphs'), which is passed through to Inductor")
    aether = AetherOptions.coerce(ours, **fields)
    return aether, options


def aether_backend(gm, example_inputs, *, mode: Optional[str] = None, options: Any = None,
                   on_rewritten: Optional[Callable] = None):
    """Dynamo backend. ``mode`` as torch.compile's (Inductor modes); ``options`` see
    ``split_options``. ``on_rewritten(graph_module, example_inputs)`` gets a copy of the rewritten
    graph before it is compiled (``explain()`` replays it)."""
    from aether_compile import ops  # noqa: F401  (registers torch.ops.aether.*)
    from aether_compile.passes.rewrite import rewrite_attention

    aether, inductor_options = split_options(options)
    original_graph = _compat.copy_graph(gm.graph)  # the graph only: parameters stay shared
    sites = rewrite_attention(gm, aether)
    if on_rewritten is not None:
        on_rewritten(torch.fx.GraphModule(gm, _compat.copy_graph(gm.graph)), example_inputs)
    if aether.compiler == "eager":
        return gm.forward
    if aether.compiler == "aot_eager":
        return _compat.aot_eager(gm, example_inputs)
    patches = {**_compat.mode_options(mode), **inductor_options}
    # Compiled inside enable(): its pre-grad pass would run the rewrite on this graph again (and
    # count its sites twice); keep only the pass it chains.
    pre = patches.get("pre_grad_custom_pass", _compat.get_pre_grad_pass())
    if isinstance(pre, AetherPass):
        patches["pre_grad_custom_pass"] = pre.chained
    # The rewritten graph names aether::attention but not the code and knobs behind it: the salt
    # puts them (and the options) into the FX graph / AOTAutograd cache keys. It chains a post-grad
    # pass passed in options= or already set (e.g. by enable()).
    chained = patches.get(_compat.POST_GRAD_POST_PASS, _compat.get_post_grad_post_pass())
    patches[_compat.POST_GRAD_POST_PASS] = CacheSalt(aether, chained=chained)
    rewritten = [site for site in sites if site.rewritten]
    try:
        return _compat.compile_fx(gm, example_inputs, patches)
    except Exception as exc:
        if not rewritten or _compat.is_dynamo_restart(exc):
            raise
        # Our op must never cost the user their compile: compile the graph as captured instead.
        log.warning("aether: Inductor failed on the rewritten graph (%s: %s); compiling it "
                    "without the rewrite", type(exc).__name__, str(exc).splitlines()[0][:200])
        _mark_dense(rewritten, f"Inductor failed on the op: {type(exc).__name__}")
        gm.graph = original_graph
        gm.recompile()
        return _compat.compile_fx(gm, example_inputs, patches)


def _mark_dense(sites, reason: str) -> None:
    """Sites rewritten but compiled dense after all: counters and explain() reports follow."""
    from torch._dynamo.utils import counters

    from aether_compile.passes.site import DENSE

    for site in sites:
        counters["aether"]["rewritten"] -= 1
        counters["aether"]["compile_failed"] += 1
        site.decision, site.code, site.reason = DENSE, "compile_failed", reason


def register() -> None:
    """Register ``aether`` with Dynamo unless already registered (idempotent)."""
    _compat.register_backend_once("aether", aether_backend)
