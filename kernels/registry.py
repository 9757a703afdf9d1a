"""Every Triton kernel the op launches through ``wrap_triton``, and the pointer arguments each
writes: ``aether_compile.ops`` hands them to the Inductor integration (the access analysis, the
early compile)."""

from __future__ import annotations

from .backward import _dkv_kernel, _dq_kernel
from .bounds import _bool_mask_stats_kernel, _bounds_kernel, _geometry_kernel, _mask_stats_kernel
from .forward import VISIT_CERTIFY, VISIT_STOP, _attention_kernel
from .plan import _plan_kernel


JIT_KERNELS = (_geometry_kernel, _mask_stats_kernel, _bool_mask_stats_kernel, _bounds_kernel, _plan_kernel,
               _attention_kernel, _dq_kernel, _dkv_kernel)


# The pointer arguments each kernel writes (tl.store, atomics), given a launch's arguments by name.
# Inductor would otherwise find them by generating each traced launch's TTIR: 0.4-0.5 s of the
# compile's main thread per kernel variant on the H100's host (inductor/access.py).
# tests/aether_compile/test_compile_cost.py checks them against that analysis for every launch the
# op makes.
KERNEL_WRITES = {
    "_geometry_kernel": lambda args: ("Geo16", "GeoNorm"),
    "_mask_stats_kernel": lambda args: ("MaskMax", "NotCausal"),
    "_bool_mask_stats_kernel": lambda args: ("MaskMax", "NotCausal"),
    "_bounds_kernel": lambda args: ("Bounds",),
    "_attention_kernel": lambda args: (
        ("Out", "Lse") + (("NVisit",) if args["VISIT"] == VISIT_CERTIFY else ())
        + (("Kept",) if args["VISIT"] == VISIT_STOP else ())),
    "_plan_kernel": lambda args: ("Order", "TailLog2", "NLive"),
    "_dq_kernel": lambda args: ("DQ",),
    "_dkv_kernel": lambda args: ("DK", "DV_"),
}
