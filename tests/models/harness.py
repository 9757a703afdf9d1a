"""Compile a zoo case with the aether backend, run it, compare with eager."""

from __future__ import annotations

import collections
import json
import os

import torch

import aether_compile

# One row per zoo model run (sites, decisions, error), written to the file named by
# AETHER_ZOO_RECORD at the end of the session: the per-model table of the rewrite's closing note.
ZOO_RECORD: list[dict] = []


def record(model: str, device: str, sites, err: float, err_kind: str) -> None:
    decisions = collections.Counter(f"{s.decision}: {s.pattern}, {s.reason}" for s in sites)
    ZOO_RECORD.append({"model": model, "device": device, "sites": len(sites),
                       "rewritten": sum(s.rewritten for s in sites), "decisions": dict(decisions),
                       "max_err": err, "err_kind": err_kind})


def write_record() -> None:
    path = os.environ.get("AETHER_ZOO_RECORD")
    if path and ZOO_RECORD:
        with open(path, "w") as f:
            json.dump({"torch": torch.__version__, "rows": ZOO_RECORD}, f, indent=1)

def max_err(outs, refs) -> float:
    return max(float((a.detach().double() - b.detach().double()).abs().max())
               for a, b in zip(outs, refs))


def max_rel_err(outs, refs) -> float:
    """Largest relative Frobenius error over the compared outputs."""
    errs = []
    for a, b in zip(outs, refs):
        a, b = a.detach().double(), b.detach().double()
        errs.append(float((a - b).norm() / b.norm().clamp_min(1e-30)))
    return max(errs)


def run_case(case, options, grad=False, rel=False):
    """(report, max abs error vs eager — or max relative error with ``rel``) for a zoo Case;
    eval/no_grad unless ``grad``."""
    with torch.set_grad_enabled(grad):
        ref = case.out(case.model(*case.args, **case.kwargs))
        report = aether_compile.explain(case.model, *case.args, options=options, **case.kwargs)
    outs = case.out(report.output)
    return report, (max_rel_err(outs, ref) if rel else max_err(outs, ref))


def assert_all_rewritten(report, expected_sites):
    assert len(report.sites) == expected_sites, str(report)
    assert report.rewritten == expected_sites, str(report)
