"""Every environment variable aether_compile reads, in one place: debugging and measuring
switches, not user options (those are ``AetherOptions``). Each is read when the function is
called: the ones marked *trace* when a graph is traced, *run* on every call, *import* once when
``aether_compile`` loads. ``KEYED`` lists those that change generated code, which the compile
cache key covers (``context.code_fingerprint``).

| variable | when | effect |
|---|---|---|
| ``TRITON_INTERPRET=1`` | import | Triton's kernels run on CPU through its interpreter (CI) |
| ``AETHER_DENSE_FRACTION`` | trace | the dense choice's crossover (default 0.6); ``off``: none |
| ``AETHER_STATIC_DENSE=0`` | trace | no static dense choice by size (the pass's and the op's) |
| ``AETHER_DENSE_SAMPLE=0`` | trace | no row sample before the plan (the gate after it decides) |
| ``AETHER_DENSE_LAG=0`` | run | a compiled site samples and reads its dense choice every call |
| ``AETHER_DENSE_RESAMPLE`` | run | a compiled site samples every n-th call (default 16) |
| ``AETHER_FORWARD_MODE`` | trace | ``twopass`` (default) or ``stop`` (one pass, in-kernel stop) |
| ``AETHER_BOX_BOUND=1`` | trace | bounds take the min of the ball and the box (default: the ball) |
| ``AETHER_RECERT_BLOCKS`` | trace | the pass's re-certification step for every length (0: off) |
| ``AETHER_ROW_TAILS=1`` | trace | re-certification also tests each row's own tail (off: slower) |
| ``AETHER_PLAN=torch`` | trace | plan with torch ops instead of the fused plan kernel |
| ``AETHER_PLAN_SORTED`` | trace | blocks the plan kernel sorts per row (a power of two; 0: all) |
| ``AETHER_TRITON_OP=0`` | import | register the op's bodies as opaque custom ops, not triton_ops |
| ``AETHER_ACCESS_MEMO=0`` | import | Inductor analyses our kernels' TTIR, not declared writes |
| ``AETHER_EARLY_COMPILE=0`` | import | Inductor compiles our kernels when it loads its module |
| ``AETHER_PRECOMPILE`` | trace | ``0``: no background compiles; ``threads``: on this process's |
"""

from __future__ import annotations

import os
from typing import Optional

# The variables that can change what a compile generates: the compile cache key covers exactly
# these (the run-time and compile-time-only switches, and a harness's own AETHER_* variables,
# do not split the cache).
KEYED = ("TRITON_INTERPRET", "AETHER_DENSE_FRACTION", "AETHER_STATIC_DENSE",
         "AETHER_DENSE_SAMPLE", "AETHER_FORWARD_MODE", "AETHER_BOX_BOUND", "AETHER_RECERT_BLOCKS",
         "AETHER_ROW_TAILS", "AETHER_PLAN", "AETHER_PLAN_SORTED", "AETHER_TRITON_OP")

FORWARD_MODES = ("twopass", "stop")


def _get(name: str, default: str) -> str:
    return os.environ.get(name, default)


def _switch(name: str, on_by_default: bool = True):
    """A reader of an on/off switch: on unless set to 0 (``on_by_default``), else on only at 1."""
    if on_by_default:
        return lambda: _get(name, "1") != "0"
    return lambda: _get(name, "0") == "1"


interpret = _switch("TRITON_INTERPRET", on_by_default=False)
static_dense = _switch("AETHER_STATIC_DENSE")
dense_sample = _switch("AETHER_DENSE_SAMPLE")
dense_lag = _switch("AETHER_DENSE_LAG")
box_bound = _switch("AETHER_BOX_BOUND", on_by_default=False)
row_tails = _switch("AETHER_ROW_TAILS", on_by_default=False)
triton_op = _switch("AETHER_TRITON_OP")
access_memo = _switch("AETHER_ACCESS_MEMO")
early_compile = _switch("AETHER_EARLY_COMPILE")


def dense_fraction(default: float) -> Optional[float]:
    """The dense choice's crossover (visited over live blocks above which a call runs dense):
    ``default`` unless set, None where it is off."""
    env = os.environ.get("AETHER_DENSE_FRACTION")
    if env is None:
        return default
    return None if env.lower() in ("off", "none", "") else float(env)


def dense_fraction_set() -> bool:
    """Whether the dense choice's crossover was set by hand (AETHER_DENSE_FRACTION, "off"
    included): then the run time's choice decides, not the static size rules."""
    return os.environ.get("AETHER_DENSE_FRACTION") is not None


def dense_resample_every() -> int:
    return max(1, int(_get("AETHER_DENSE_RESAMPLE", "16")))


def forward_mode(mode: Optional[str] = None) -> str:
    """``mode``, else AETHER_FORWARD_MODE, else "twopass"."""
    mode = mode or _get("AETHER_FORWARD_MODE", "twopass")
    if mode not in FORWARD_MODES:
        raise ValueError(f"AETHER_FORWARD_MODE must be one of {FORWARD_MODES}, got {mode!r}")
    return mode


def recert_blocks_override() -> Optional[int]:
    env = os.environ.get("AETHER_RECERT_BLOCKS")
    return None if env is None else int(env)


def plan_sorted_override() -> Optional[int]:
    """AETHER_PLAN_SORTED: how many blocks of a row the plan kernel sorts (0: all); None: unset."""
    env = os.environ.get("AETHER_PLAN_SORTED")
    if env is None:
        return None
    top = int(env)
    if top < 0 or top & (top - 1):
        raise ValueError(f"AETHER_PLAN_SORTED must be 0 or a power of two, got {env!r}")
    return top


def fused_plan() -> bool:
    return _get("AETHER_PLAN", "fused") != "torch"


def precompile_mode() -> str:
    """"workers" (default: Inductor's compile workers), "threads", or "off"."""
    return {"0": "off", "threads": "threads"}.get(_get("AETHER_PRECOMPILE", "1"), "workers")


def keyed() -> tuple[tuple[str, str], ...]:
    """(name, value) of each ``KEYED`` variable that is set: the cache key's part."""
    return tuple((k, os.environ[k]) for k in KEYED if k in os.environ)
