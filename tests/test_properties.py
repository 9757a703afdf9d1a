"""Hypothesis property tests: the op and the Triton kernels against a float64 oracle restricted to
their own kept blocks, and the certificate (every row's dropped mass <= eps), over random shapes,
dtypes, masks (bool/float, every broadcast form), causal, scale and eps. Cases and checks live in
``property_cases.py`` (shared with ``benchmarks/run_reliability.py``).

Profiles (``AETHER_HYPOTHESIS_PROFILE``):
  ci     (default) few examples, derandomized; the file runs in ~1-2 min on 2 cores with
         TRITON_INTERPRET=1.
  large  >= 10,000 op cases plus 1,000 per Triton mode; the tests are marked slow, and skipped
         unless this profile is selected:
         AETHER_HYPOTHESIS_PROFILE=large TRITON_INTERPRET=1 python -m pytest -m slow \
             tests/test_properties.py
"""

import os

import pytest
from hypothesis import HealthCheck, given, settings

from conftest import TRITON_INTERPRET
from property_cases import cases, check_case

_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# max_examples per path: (op, each Triton mode)
PROFILES = {"ci": (150, 25), "large": (10_000, 1_000)}
for _name, (_n_op, _) in PROFILES.items():
    settings.register_profile(_name, max_examples=_n_op, derandomize=_name == "ci", **_COMMON)
PROFILE = os.environ.get("AETHER_HYPOTHESIS_PROFILE", "ci")
if PROFILE not in PROFILES:
    raise ValueError(f"AETHER_HYPOTHESIS_PROFILE must be one of {sorted(PROFILES)}, got {PROFILE!r}")
settings.load_profile(PROFILE)
N_OP, N_TRITON = PROFILES[PROFILE]

needs_interpreter = pytest.mark.skipif(not TRITON_INTERPRET, reason="Triton on CPU needs "
                                       "TRITON_INTERPRET=1")
large_only = pytest.mark.skipif(PROFILE != "large", reason="set AETHER_HYPOTHESIS_PROFILE=large")


def _assert_ok(case, path):
    res = check_case(case, path)
    assert res.crash is None, f"{path} crashed on {case.id()}: {res.crash}"
    assert not res.violations, f"{path} on {case.id()}: {res.violations}"


def _op_property(case):
    _assert_ok(case, "op")


def _triton_property(path):
    def prop(case):
        _assert_ok(case, path)
    return prop


# -- CI profile -----------------------------------------------------------------------------------
@settings(max_examples=PROFILES["ci"][0])
@given(case=cases("op"))
def test_op_matches_oracle_and_certifies(case):
    """aether_compile.attention on CPU (the plain-torch reference, via the registered op)."""
    _op_property(case)


@needs_interpreter
@pytest.mark.parametrize("mode", ["twopass", "stop"])
def test_triton_matches_oracle_and_certifies(mode):
    """The Triton kernels (interpreter on CPU) with 16x16 tiles, both forward modes."""
    settings(max_examples=PROFILES["ci"][1])(
        given(case=cases(mode))(_triton_property(mode)))()


# -- large profile ---------------------------------------------------------------------------------
@pytest.mark.slow
@large_only
def test_large_op():
    settings(max_examples=N_OP)(given(case=cases("op"))(_op_property))()


@pytest.mark.slow
@needs_interpreter
@large_only
@pytest.mark.parametrize("mode", ["twopass", "stop"])
def test_large_triton(mode):
    settings(max_examples=N_TRITON)(given(case=cases(mode))(_triton_property(mode)))()
