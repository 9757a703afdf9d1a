"""First-call cost of the dense SDPA kernels the op's dense choice runs, in a fresh process.

A cold compile's first call runs every kernel for the first time. cuDNN's attention builds (and may
compile) an execution plan per new shape, flash does not; this measures both, per shape, so that a
compile-time excess after every Triton compile has finished can be put on (or taken off) it.

    python benchmarks/probe_first_call.py --out DIR      # CUDA only; prints rows, writes JSON
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compile_time import env_record, write_json  # noqa: E402

# (B, H, L, D, causal): the compile-time zoo's attention at 1024 tokens (head dim 16; ViT has a
# class token), then a new length and a realistic head dim
SHAPES = [(2, 4, 1024, 16, False), (2, 4, 1024, 16, False), (2, 4, 1024, 16, True),
          (2, 4, 1025, 16, False), (2, 4, 1536, 16, False), (1, 16, 4096, 128, True),
          (1, 16, 4096, 128, True)]


def timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_first_call: CUDA only")
        return 0
    torch.zeros(1, device="cuda")  # the context is not what is measured
    kernels = {
        "flash": lambda q, k, v, c: torch.ops.aten._scaled_dot_product_flash_attention(
            q, k, v, 0.0, c, False, scale=q.shape[-1] ** -0.5),
        "cudnn": lambda q, k, v, c: torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, c, False, scale=q.shape[-1] ** -0.5),
    }
    rows = []
    for name, run in kernels.items():  # flash first: cuDNN's library load is then its own cost
        for B, H, L, D, causal in SHAPES:
            q, k, v = (torch.randn(B, H, L, D, device="cuda", dtype=torch.float16)
                       for _ in range(3))
            try:
                first = timed(lambda: run(q, k, v, causal))
                again = timed(lambda: run(q, k, v, causal))
                row = {"kernel": name, "shape": [B, H, L, D], "causal": causal,
                       "first_s": first, "again_s": again}
            except RuntimeError as e:
                row = {"kernel": name, "shape": [B, H, L, D], "causal": causal,
                       "error": str(e)[:200]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    record = {"benchmark": "probe_first_call", "env": env_record("cuda"), "rows": rows}
    tag = torch.cuda.get_device_name().replace(" ", "_")
    write_json(os.path.join(args.out, f"probe_first_call_{tag}.json"), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
