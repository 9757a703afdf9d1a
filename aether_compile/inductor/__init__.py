"""The Inductor integration: what aether_compile changes in Inductor for its own kernels, all of
it compile time, none of it numerics. ``install(kernels, writes)`` is the one call that applies it
(``aether_compile.ops`` makes it once, at import, for the kernels of ``kernels.registry``):

* ``access``: Inductor's analysis of what a traced user kernel writes is answered from each
  kernel's declared writes instead of generating its TTIR on the main thread. Off:
  ``AETHER_ACCESS_MEMO=0``.
* ``early_compile``: Inductor compiles our traced kernels when it generates them, as it does its
  own, not when it loads the finished module. Off: ``AETHER_EARLY_COMPILE=0``.
* ``precompile``: tracing the opaque ``aether::prepare_pass`` starts compiling its Triton kernels
  on Inductor's compile workers, so the graph's first call finds them built. Off:
  ``AETHER_PRECOMPILE=0``. (Started from the op's fake, not from ``install``.)

Each wraps an Inductor internal whose shape was checked on the torch versions below; on another
version ``install`` leaves Inductor as it is and logs why (nothing here is needed for correct
results). ``AETHER_TRITON_OP=0`` (opaque ops, nothing traced) needs none of it.
"""

from __future__ import annotations

import logging

from aether_compile import _compat, settings

log = logging.getLogger("aether_compile")

# (major, minor) of the torch versions whose Inductor internals these wrappers were checked on:
# 2.11 on the GPU machine, 2.13 in CI, 2.14 (what pip resolves unpinned) on CPU, where
# tests/aether_compile/test_compile_cost.py compares the declared writes with Torch's own analysis
# for every launch and checks the early compile.
SUPPORTED_TORCH = ((2, 11), (2, 13), (2, 14))


def install(kernels, writes: dict) -> None:
    """Apply the integration for ``kernels`` (their declared ``writes`` by kernel name), as the
    settings allow. Idempotent."""
    if _compat.TORCH_VERSION not in SUPPORTED_TORCH:
        log.info("aether: Inductor integration not installed on torch %s (checked on %s)",
                 ".".join(map(str, _compat.TORCH_VERSION)), SUPPORTED_TORCH)
        return
    from . import access, early_compile

    if settings.access_memo():
        access.memoise_kernel_access_analysis(kernels, writes)
    if settings.early_compile():
        early_compile.compile_user_kernels_early(kernels)
