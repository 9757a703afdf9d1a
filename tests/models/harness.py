"""Compile a zoo case with the aether backend, run it, compare with eager."""

from __future__ import annotations

import torch

import aether_compile

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
