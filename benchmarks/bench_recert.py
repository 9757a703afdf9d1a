"""VISIT_CERTIFY's re-certification on and off, on W2 (issue 6), in one run:

    AETHER_COMMIT=<sha> python benchmarks/bench_recert.py --out benchmarks/results

For W2 clustered (B 1, H 16, D 128, fp16, non-causal, the op's default eps) at 16K-128K: the
eager op's time, the attention pass alone on one plan, the kept fraction, and the largest
dropped mass (float64) over three whole query tiles (first, middle, last), each with
AETHER_RECERT_BLOCKS=0 (the count fixed from the probe) and =8 (re-certified, at every length);
cuDNN's time beside them. Writes recert_<card>.json. The default re-certifies from 64K keys on
(``RECERT_MIN_KEY_BLOCKS``), where this measured it faster.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

import aether_compile
from aether_compile.kernels import triton_attention as tam
from aether_compile.kernels.reference import dropped_mass
from aether_compile.ops import default_eps
from aether_compile.workloads import WORKLOADS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import bench_ms, env_record  # noqa: E402

SETTINGS = {"fixed": "0", "recert": str(tam.RECERT_BLOCKS)}  # for every length, as measured


def cudnn_ms(q, k, v) -> float:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return bench_ms(lambda: F.scaled_dot_product_attention(q, k, v))


def tile_dropped_mass(q, k, kept, block_m, block_n) -> float:
    """Largest per-row dropped mass over the first, middle and last query tiles (non-causal:
    a tile's rows see every key, so the rows and their kept row of tiles stand alone)."""
    nqt = kept.shape[-2]
    worst = 0.0
    for t in sorted({0, nqt // 2, nqt - 1}):
        rows = q[:, :, t * block_m:(t + 1) * block_m]
        worst = max(worst, float(dropped_mass(rows, k, kept[:, :, t:t + 1], block_m,
                                              block_n).max()))
    return worst


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--sizes", default="16384,32768,65536,131072")
    args = ap.parse_args(argv)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        q, k, v = WORKLOADS["clustered"](1, 16, n, 128, dtype=torch.float16, device="cuda", seed=0)
        eps = default_eps(q.dtype)
        row = {"workload": "clustered", "N": n, "eps": eps, "t_cudnn_ms": cudnn_ms(q, k, v)}
        plan = tam.plan_attention(q, k, v)
        for name, step in SETTINGS.items():
            os.environ["AETHER_RECERT_BLOCKS"] = step
            row[f"t_op_{name}_ms"] = bench_ms(lambda: aether_compile.attention(q, k, v, eps=eps))
            row[f"t_pass_{name}_ms"] = bench_ms(lambda: tam.run_attention(q, k, v, plan, eps))
            _, _, kept = tam.run_attention(q, k, v, plan, eps)
            row[f"kept_{name}"] = float(kept.float().mean())
            row[f"max_dropped_{name}"] = tile_dropped_mass(q, k, kept, plan.block_m, plan.block_n)
            row[f"speedup_{name}"] = row["t_cudnn_ms"] / row[f"t_op_{name}_ms"]
        os.environ.pop("AETHER_RECERT_BLOCKS")
        print(json.dumps(row), flush=True)
        rows.append(row)
    card = torch.cuda.get_device_name().replace(" ", "_")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"recert_{card}.json")
    with open(path, "w") as f:
        json.dump({"env": env_record(), "rows": rows}, f, indent=1)
    print("wrote", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
