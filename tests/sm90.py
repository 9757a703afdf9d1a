"""An H100 as Triton sees it, on a machine without one: Triton's binder answers for an sm_90
target and the compile needs only that target (no driver, no device). For
``benchmarks/kernel_compile_time.py`` and the precompile pool test's subprocess; it replaces module
state and ``torch.cuda.device`` for the rest of the process, so it is not for a test process."""

from __future__ import annotations

import collections
import contextlib

import torch


def pretend_sm90():
    """Make our kernels bind and compile for sm_90 here; returns the ``GPUTarget``."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    from aether_compile.inductor import precompile
    from aether_compile.kernels import registry

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    for k in registry.JIT_KERNELS:
        k.device_caches = collections.defaultdict(lambda k=k: (
            {}, {}, target, backend,
            create_function_from_signature(k.signature, k.params, backend)))
    precompile._current_device = lambda: 0
    torch.cuda.device = lambda d: contextlib.nullcontext()
    return target
