"""``aether_compile.explain``: which attention sites a model has and what the rewrite did with each.

    report = aether_compile.explain(model, input_ids, options={"allow_cpu": True})
    print(report)                  # the table
    report.sites[0].decision       # "sparse" | "dense": what the pass did
    report.sites[0].kept_fraction  # what the op did on these inputs (1.0: dense)
    report.counters                # {"rewritten": 12, "device": 0, ...}
"""

from __future__ import annotations

import inspect
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from . import _compat

log = logging.getLogger("aether_compile")


@dataclass
class ExplainReport:
    sites: list = field(default_factory=list)  # aether_compile.passes.Site
    output: Any = None  # what the compiled model returned
    compiled: Any = None  # the torch.compile'd model (call it again without recompiling)

    @property
    def counters(self) -> Counter:
        """Sites per outcome code: "rewritten" and each fallback reason code."""
        return Counter(s.code for s in self.sites)

    @property
    def rewritten(self) -> int:
        return sum(s.rewritten for s in self.sites)

    @property
    def fallbacks(self) -> Counter:
        return Counter(s.code for s in self.sites if not s.rewritten)

    def __str__(self) -> str:
        head = ("#", "module", "pattern", "decision", "run time", "reason", "source")
        rows = [(str(i), s.module or s.module_type or "<top>", s.pattern, s.decision,
                 _run_time(s), s.reason, s.source) for i, s in enumerate(self.sites)]
        widths = [min(60, max([len(h)] + [len(r[c]) for r in rows])) for c, h in enumerate(head)]

        def fmt(r):
            cells = [(x if len(x) <= w or c == len(r) - 1 else x[: w - 1] + "…").ljust(w)
                     for c, (x, w) in enumerate(zip(r, widths))]
            return "  ".join(cells).rstrip()

        lines = [fmt(head), fmt(tuple("-" * w for w in widths))] + [fmt(r) for r in rows]
        fb = ", ".join(f"{k}={v}" for k, v in sorted(self.fallbacks.items())) or "none"
        lines.append(f"{len(self.sites)} attention site(s): {self.rewritten} rewritten "
                     f"(sparse), {len(self.sites) - self.rewritten} dense; fallbacks: {fb}")
        return "\n".join(lines)

    __repr__ = __str__


def _run_time(site) -> str:
    """What the op did at the site on explain()'s inputs."""
    if site.kept_fraction is None:
        return "-"
    if site.kept_fraction >= 1.0:
        return "dense"
    return f"kept {site.kept_fraction:.0%}"


def explain(model, *args, options: Any = None, replay: bool = True, **kwargs) -> ExplainReport:
    """Compile ``model`` with the aether backend, run it once on the inputs, report every site.

    Inputs as the model takes them: ``explain(model, x)``, ``explain(model, input_ids=ids)``, or a
    dict of keyword arguments as a tokenizer returns it, ``explain(model, inputs)``, which is
    unpacked when its keys name the model's parameters.

    ``options``: AetherOptions or a dict of its fields (``compiler="eager"`` skips Inductor and
    only rewrites, which is quick). With ``replay`` (the default) each rewritten graph then runs
    once more eagerly on the same inputs, and every rewritten site reports what the op did there
    (``Site.kept_fraction``: blocks computed over causally live blocks; 1.0 is dense)."""
    from aether_compile.backend import aether_backend, split_options
    from aether_compile.passes.rewrite import add_listener, remove_listener

    args, kwargs = _call_arguments(model, args, kwargs)
    opts, inductor = split_options(options)
    report = ExplainReport()
    graphs = []  # (rewritten graph module, example inputs, the sites found in it)

    def backend(gm, example_inputs, **backend_kwargs):
        first = len(report.sites)
        return aether_backend(
            gm, example_inputs, options={"aether": opts, **inductor},
            on_rewritten=lambda g, inputs: graphs.append((g, inputs, report.sites[first:])),
            **backend_kwargs)

    add_listener(report.sites.append)
    try:
        report.compiled = torch.compile(model, backend=backend)
        with _compat.recompile_limit_patch(64):
            report.output = report.compiled(*args, **kwargs)
    finally:
        remove_listener(report.sites.append)
    if replay:
        for gm, inputs, sites in graphs:
            _replay(gm, inputs, [s for s in sites if s.rewritten])
    return report


def _call_arguments(model, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """``(args, kwargs)`` to call ``model`` with: a lone mapping argument (a tokenizer's
    ``BatchEncoding``, a dict) becomes keyword arguments when its keys name the model's
    parameters and cover the required ones; anything else is passed as given."""
    if kwargs or len(args) != 1 or not isinstance(args[0], Mapping):
        return args, kwargs
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return args, kwargs
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params)
    required = {p.name for p in params if p.default is p.empty
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    keys = set(args[0])
    if all(isinstance(k, str) for k in keys) and (keys <= names or takes_any) and required <= keys:
        return (), dict(args[0])
    return args, kwargs


def _replay(gm, example_inputs, sites: list) -> None:
    """Run a rewritten graph eagerly and give each rewritten site (graph order) the kept fraction
    of its ``aether::attention_with_stats`` call. Diagnostic only: a failure leaves them None."""
    from torch.utils._python_dispatch import TorchDispatchMode

    calls = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aether.attention_with_stats.default:
                calls.append(_kept_over_live(func, args, kwargs or {}, out))
            return out

    try:
        with torch.no_grad(), Record():
            gm(*example_inputs)
    except Exception as exc:  # noqa: BLE001  (the compiled run already succeeded)
        log.warning("aether explain: replaying a rewritten graph failed (%s: %s); no run-time "
                    "figures for its sites", type(exc).__name__, exc)
        return
    if len(calls) != len(sites):
        log.warning("aether explain: %d attention calls for %d rewritten sites; no run-time "
                    "figures for them", len(calls), len(sites))
        return
    for site, fraction in zip(sites, calls):
        site.kept_fraction = fraction


def _kept_over_live(func, args, kwargs, out) -> float:
    """Computed blocks over the blocks holding at least one key the mask and causality let
    through: 1.0 where the op ran dense."""
    from aether_compile.kernels.plan import all_live_blocks
    from aether_compile.ops import resolve_blocks

    names = [a.name for a in func._schema.arguments]
    bound = {**dict(zip(names, args)), **kwargs}
    query, key, value = bound["query"], bound["key"], bound["value"]
    block_m, block_n = resolve_blocks(query, value, bound.get("block_m"), bound.get("block_n"),
                                      key, bound.get("attn_mask"))
    kept = out[2]
    L, S = query.shape[-2], key.shape[-2]
    is_causal, mask = bool(bound.get("is_causal")), bound.get("attn_mask")
    if mask is None:  # block level, as the op counts them: no [L, S] buffer at long lengths
        live = all_live_blocks(L, S, block_m, block_n, is_causal, 1, 1, kept.device)
    else:  # the mask is [L, S] already: pool which blocks it leaves a key in
        # bool keeps where True; an additive mask drops -inf and HF's finfo.min alike
        keep = mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2
        keep = keep.reshape((1,) * (4 - keep.dim()) + tuple(keep.shape))
        if is_causal:
            keep = keep & torch.ones(L, S, dtype=torch.bool, device=kept.device).tril()
        keep = torch.nn.functional.pad(keep, (0, -S % block_n, 0, -L % block_m), value=False)
        b, h = keep.shape[:2]
        live = keep.reshape(b, h, -1, block_m, keep.shape[-1] // block_n, block_n).any(-1).any(3)
    live = live.expand_as(kept)
    total = float(live.sum())
    return float((kept & live).sum()) / total if total else 1.0
