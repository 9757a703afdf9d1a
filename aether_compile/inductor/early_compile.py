"""Inductor's compile of our traced kernels, started when Inductor generates them.

Installed by ``aether_compile.inductor.install`` (``AETHER_EARLY_COMPILE=0`` leaves it to Inductor,
which starts a user-defined kernel only when it loads the finished module).
"""

from __future__ import annotations

from typing import Callable

# Inductor hands each kernel of its own to its worker pool the moment it generates it
# (``TritonScheduling._emit_kernel_to_wrapper``: "the process pool is warm, we can shell out to
# workers right away"), but a user-defined kernel only when the finished module is loaded. Ours,
# the longest compile of a graph (about 0.5 s on the H100's host against 0.1-0.3 s for Inductor's
# fused kernels), then started last and was the tail of ``async_compile.wait``. This starts it
# where Inductor starts its own: the module's ``async_compile.triton(name, source)`` call, made
# early with the same arguments, leaves a future in ``CompiledTritonKernels`` (keyed by the
# source) that the module's own call then finds. Same code on 2.11 and 2.13.
_early_kernels: set = set()
early_compile_stats = {"started": 0, "skipped": 0}


def compile_user_kernels_early(kernels) -> None:
    """Start Inductor's compile of ``kernels`` (our @triton.jit functions, traced through
    wrap_triton) when it generates them rather than when it loads its module. Idempotent."""
    from torch._inductor.codegen.wrapper import PythonWrapperCodegen

    _early_kernels.update(id(getattr(k, "fn", k)) for k in kernels)
    original = PythonWrapperCodegen.define_user_defined_triton_kernel
    if getattr(original, "_aether_early", False):
        return

    PythonWrapperCodegen.define_user_defined_triton_kernel = _starting_early(original)


def _starting_early(original: Callable) -> Callable:
    """``define_user_defined_triton_kernel`` that, for our kernels, starts compiling each kernel
    definition it writes (``_start_compile``)."""
    def define_user_defined_triton_kernel(self, kernel, *args, **kwargs):
        if id(getattr(kernel, "fn", kernel)) not in _early_kernels:
            return original(self, kernel, *args, **kwargs)
        bodies, define_kernel = [], self.define_kernel

        def recording(name, body, *a, **kw):
            bodies.append(body)
            return define_kernel(name, body, *a, **kw)

        self.define_kernel = recording  # this call only (an instance attribute over the method)
        try:
            result = original(self, kernel, *args, **kwargs)
        finally:
            del self.define_kernel
        for body in bodies:  # none where an earlier launch defined the same kernel
            _start_compile(body)
        return result

    define_user_defined_triton_kernel._aether_early = True
    define_user_defined_triton_kernel.__wrapped__ = original
    return define_user_defined_triton_kernel


def _start_compile(body: str) -> None:
    """Make the ``async_compile.triton(name, source, device_str=...)`` call that ``body`` (a kernel
    definition of Inductor's Python wrapper) holds, now, where Inductor compiles on its workers;
    anything unforeseen leaves the call to the module, as before."""
    import ast

    try:
        import torch._inductor.config as icfg
        from torch._inductor.async_compile import AsyncCompile

        if icfg.cpp_wrapper or not AsyncCompile.use_process_pool():
            early_compile_stats["skipped"] += 1
            return
        call = ast.parse(body.strip(), mode="eval").body
        if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Attribute)
                and call.func.attr == "triton" and len(call.args) == 2):
            early_compile_stats["skipped"] += 1
            return
        name, source = (ast.literal_eval(a) for a in call.args)
        options = {k.arg: ast.literal_eval(k.value) for k in call.keywords}
        AsyncCompile().triton(name, source, **options)
        early_compile_stats["started"] += 1
    except Exception:  # noqa: BLE001  (a speed-up only: the module compiles it as before)
        early_compile_stats["skipped"] += 1


