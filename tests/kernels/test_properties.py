"""Hypothesis property tests: the op and the Triton kernels against a float64 oracle restricted to
their own kept blocks, and the certificate (every row's dropped mass <= eps), over random shapes,
dtypes, masks (bool/float, every broadcast form), causal, scale and eps. Cases and checks live in
``property_cases.py`` (shared with ``benchmarks/run_reliability.py``, which counts instead of
asserting and records benchmarks/results/reliability_cpu.json, or reliability_<card>.json with
``--device cuda``).

Profiles (``AETHER_HYPOTHESIS_PROFILE``, cases per path in ``property_cases.PROFILE_CASES``):
  ci     (default) 200 op cases, 20 per Triton mode, derandomized (the same cases every run);
         under a minute on 2 cores with TRITON_INTERPRET=1.
  large  10,000 op cases and 1,000 per Triton mode, random; the tests are marked slow and skipped
         unless this profile is selected:
           AETHER_HYPOTHESIS_PROFILE=large TRITON_INTERPRET=1 python -m pytest -m slow \\
               tests/kernels/test_properties.py

What runs where (``AETHER_TEST_DEVICE``, default cpu, also on a GPU machine):
  cpu   "op" is the plain-torch reference behind the op; "twopass" / "stop" run the Triton kernels
        through the interpreter and are skipped without TRITON_INTERPRET=1.
  cuda  every case's inputs are moved to the GPU: "op" is the op as users call it (Triton with
        its dense dispatch; the reference for float64 and odd head dims), "twopass" / "stop" the
        compiled Triton kernels (run with TRITON_INTERPRET unset):
           AETHER_TEST_DEVICE=cuda python -m pytest -q tests/kernels/test_properties.py
The checks and tolerances (``helpers.REL_TOL`` per dtype) are the same on both devices.
"""

import os

import pytest
from hypothesis import HealthCheck, given, settings

from tests.property_cases import PROFILE_CASES, cases, check_case, device_from_env, triton_runs_on

for _name, _n in PROFILE_CASES.items():
    settings.register_profile(
        _name, max_examples=_n["op"], derandomize=_name == "ci", deadline=None, database=None,
        print_blob=True, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
PROFILE = os.environ.get("AETHER_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in PROFILE_CASES:
    raise ValueError(f"AETHER_HYPOTHESIS_PROFILE must be one of {sorted(PROFILE_CASES)}, "
                     f"got {PROFILE!r}")
settings.load_profile(PROFILE)
DEVICE = device_from_env("cpu")

needs_triton = pytest.mark.skipif(
    not triton_runs_on(DEVICE),
    reason="Triton on CPU needs TRITON_INTERPRET=1 (or AETHER_TEST_DEVICE=cuda on a GPU)")
large_only = pytest.mark.skipif(PROFILE != "large", reason="set AETHER_HYPOTHESIS_PROFILE=large")


def check(path: str, n: int) -> None:
    """Run n hypothesis cases of one path; the first failing (then shrunk) case fails the test."""

    @settings(max_examples=n)
    @given(case=cases(path))
    def prop(case):
        res = check_case(case, path, DEVICE)
        assert res.crash is None, f"{path} on {DEVICE} crashed on {case.id()}: {res.crash}"
        assert not res.violations, f"{path} on {DEVICE}, {case.id()}: {res.violations}"

    prop()


def test_op_matches_oracle_and_certifies():
    """aether_compile.attention: on CPU the plain-torch reference behind the registered op, on
    CUDA the op's Triton path and dense dispatch."""
    check("op", PROFILE_CASES["ci"]["op"])


@needs_triton
@pytest.mark.parametrize("mode", ["twopass", "stop"])
def test_triton_matches_oracle_and_certifies(mode):
    """The Triton kernels (interpreter on CPU, compiled on CUDA), 16x16 tiles, both modes."""
    check(mode, PROFILE_CASES["ci"][mode])


@pytest.mark.slow
@large_only
@pytest.mark.parametrize("path", ["op", pytest.param("twopass", marks=needs_triton),
                                  pytest.param("stop", marks=needs_triton)])
def test_large_profile(path):
    check(path, PROFILE_CASES["large"][path])
