"""Which C-launcher signatures a cold aether compile builds in this process, against the ones
the precompile jobs built: a launcher is keyed by its C source, which follows the signature.

    python benchmarks/probe_launcher_signature.py      # CUDA, Triton with per-kernel launchers
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F


def main() -> None:
    import triton.backends.nvidia.driver as nvd
    from torch._inductor.utils import fresh_cache

    import aether_compile  # noqa: F401
    from aether_compile import _compat
    from aether_compile.kernels import precompile

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v).sin()

    with fresh_cache():  # the first compile: in-process
        torch.compile(attend)(*[torch.randn(1, 2, 64, 16, device="cuda") for _ in range(3)])
    deadline = time.monotonic() + 120
    while _compat.inductor_compile_pool() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    torch._dynamo.reset()
    built, asked = [], []
    make = nvd.make_launcher
    nvd.make_launcher = lambda constants, signature, meta: built.append(
        (dict(constants), dict(signature))) or make(constants, signature, meta)
    requests = precompile.compile_requests
    precompile.compile_requests = lambda *a: (lambda r: asked.extend(r) or r)(requests(*a))
    import os
    os.environ["AETHER_STATIC_DENSE"] = "0"
    q, k, v = (torch.randn(2, 4, 1024, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    with fresh_cache():
        torch.compile(lambda q, k, v: attend(q, k, v), backend="aether")(q, k, v)
        torch.cuda.synchronize()
    for r in asked:
        print("ASKED", r.name, "launcher_only" if r.launcher_only else "",
              list(r.signature.values()))
        print("   constexprs", r.constexprs)
    for constants, signature in built:
        print("BUILT HERE", list(signature.values()))
        print("   constants", constants)


if __name__ == "__main__":
    main()
