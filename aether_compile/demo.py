"""Demo: ``python -m aether_compile.demo``.

Runs certified block-sparse attention on clustered data (the shape of attention in which whole key
blocks are provably negligible) and prints the kept fraction, the certified bound, the measured
dropped mass and output error against float64, and the time against SDPA.
On CUDA: 32K tokens, Triton kernels, SDPA flash and cuDNN. On CPU: a small size, the reference.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import aether_compile
from aether_compile.kernels.reference import chunked_attention_fp64, dropped_mass
from aether_compile.workloads import clustered_qkv


def _time(fn, reps: int) -> float:
    """Median wall time in ms (device-synchronised)."""
    fn()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def run_op_demo(n: int, heads: int, dim: int, dtype: torch.dtype, device: str) -> None:
    q, k, v = clustered_qkv(1, heads, n, dim, dtype=dtype, device=device, seed=0)
    out, stats = aether_compile.attention(q, k, v, return_stats=True)
    ref = chunked_attention_fp64(q, k, v)
    err = float((out.double() - ref).norm() / ref.norm())
    sdpa_err = float((F.scaled_dot_product_attention(q, k, v).double() - ref).norm() / ref.norm())
    dropped = float(dropped_mass(q, k, stats.kept_blocks, stats.block_m, stats.block_n).max())
    print(f"clustered attention: B=1 H={heads} N={n} D={dim} {dtype} on {device}")
    print(f"  kept blocks      {stats.kept_fraction:.1%}  (tiles {stats.block_m}x{stats.block_n})")
    print(f"  certified bound  every row's dropped mass <= eps = {stats.eps:g}")
    print(f"  measured         max dropped mass {dropped:.2e}; output error vs float64 {err:.2e} "
          f"(SDPA in {dtype}: {sdpa_err:.2e})")
    reps = 10 if device == "cuda" else 3
    t_ours = _time(lambda: aether_compile.attention(q, k, v), reps)
    line = f"  time             aether {t_ours:.2f} ms"
    if device == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                              ("cuDNN", SDPBackend.CUDNN_ATTENTION)):
            try:
                with sdpa_kernel(backend):
                    t = _time(lambda: F.scaled_dot_product_attention(q, k, v), reps)
                line += f" | SDPA {name} {t:.2f} ms ({t / t_ours:.2f}x)"
            except RuntimeError as e:  # backend unavailable for these inputs
                line += f" | SDPA {name} n/a ({str(e).splitlines()[0][:40]})"
    else:
        t = _time(lambda: F.scaled_dot_product_attention(q, k, v), reps)
        line += f" | SDPA (CPU) {t:.2f} ms  [CPU runs the plain-torch reference]"
    print(line)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=None, help="sequence length")
    args = ap.parse_args(argv)
    if torch.cuda.is_available():
        run_op_demo(args.n or 32768, 16, 128, torch.float16, "cuda")
    else:
        run_op_demo(args.n or 2048, 2, 64, torch.float32, "cpu")


if __name__ == "__main__":
    main()
