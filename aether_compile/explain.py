"""``aether_compile.explain``: which attention sites a model has and what the rewrite did with each.

    report = aether_compile.explain(model, input_ids, options={"allow_cpu": True})
    print(report)                  # the table
    report.sites[0].decision       # "sparse" | "dense"
    report.counters                # {"rewritten": 12, "device": 0, ...}
"""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _compat
from .options import AetherOptions


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
        head = ("#", "module", "pattern", "decision", "reason", "source")
        rows = [(str(i), s.module or s.module_type or "<top>", s.pattern, s.decision, s.reason,
                 s.source) for i, s in enumerate(self.sites)]
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


def explain(model, *args, options: Any = None, **kwargs) -> ExplainReport:
    """Compile ``model`` with the aether backend, run it once on the inputs, report every site.

    ``options``: AetherOptions or a dict of its fields (``compiler="eager"`` skips Inductor and
    only rewrites, which is quick)."""
    from aether_compile.backend import aether_backend, split_options
    from aether_compile.passes.rewrite import add_listener, remove_listener

    opts, inductor = split_options(options)
    report = ExplainReport()
    backend = functools.partial(aether_backend, options={"aether": opts, **inductor})
    add_listener(report.sites.append)
    try:
        report.compiled = torch.compile(model, backend=backend)
        with _compat.recompile_limit_patch(64):
            report.output = report.compiled(*args, **kwargs)
    finally:
        remove_listener(report.sites.append)
    return report
