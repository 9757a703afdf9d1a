"""The rewrite pass under fuzz: random attention-like modules (tests/fuzz_modules.py: spellings,
casts, scales, masks, GQA, extra users of the scores/weights, dropout) compiled with
backend="aether" (explain, allow_cpu, eps=0, compiler="eager"). Every module: no crash; every site
either rewritten with outputs matching eager (relative error < 1e-4) or declined with a reason
(never "internal_error"); every module's attention is found as a site.

CI runs 40 modules (fixed seed); AETHER_HYPOTHESIS_PROFILE=large runs 500 (marked slow). Counts,
with declines by reason code, go to benchmarks/results/reliability_cpu.json via
``python benchmarks/run_reliability.py --paths fuzz``.
"""

import collections
import logging
import os
import random

import pytest

from tests.fuzz_modules import check_spec, random_spec
from tests.property_cases import PROFILE_CASES

PROFILE = os.environ.get("AETHER_HYPOTHESIS_PROFILE", "ci")


def fuzz(n: int, seed: int):
    rng = random.Random(seed)
    logging.getLogger("aether_compile").setLevel(logging.ERROR)  # declines log warnings
    results = [check_spec(random_spec(rng)) for _ in range(n)]
    outcomes = collections.Counter(r.outcome for r in results)
    bad = [(r.outcome, r.spec.id(), r.codes, r.detail) for r in results
           if r.outcome not in ("rewritten", "declined")]
    assert not bad, f"{outcomes}: {bad[:5]}"
    assert outcomes["rewritten"] > n // 5, outcomes  # the fuzzer reaches the rewrite
    assert outcomes["declined"] > 0, outcomes
    return outcomes


def test_pass_fuzz_ci():
    fuzz(PROFILE_CASES["ci"]["fuzz"], seed=0)


@pytest.mark.slow
@pytest.mark.skipif(PROFILE != "large", reason="set AETHER_HYPOTHESIS_PROFILE=large")
def test_pass_fuzz_large():
    fuzz(PROFILE_CASES["large"]["fuzz"], seed=1)
