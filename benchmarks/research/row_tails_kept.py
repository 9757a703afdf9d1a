"""How many key blocks the op's pass keeps with row tails and without, on W2 at 64K and 128K: the
op's own kernels (plan, probe, re-certification) run through Triton's interpreter on the CPU, on a
sample of query tiles, with the GPU's tiles (128 rows, 128-key blocks from 64K). A count of what
the kernels keep, not a timing.

    python benchmarks/research/row_tails_kept.py --out benchmarks/results/row_tails_kept_cpu.json

W2 as the GPU suite draws it (``clustered_qkv(1, 16, N, 128, seed=0)``, fp16, eps 1e-3); for each
sampled head, ``--tiles`` evenly spaced 128-row query tiles against every key of the head. The
kept fraction of a tile depends on its own rows alone, so the sampled tiles keep what they keep in
the full call. Variants (``AETHER_RECERT_BLOCKS``, ``AETHER_ROW_TAILS``):

  probe_only    no re-certification: the count fixed from the probe's 8 blocks
  tile          re-certification every 8 blocks (the op's from 1024 key blocks; at d751ef9,
                which wrote the committed counts, from 64K keys) with the tile's tail alone
  rows          the same with row tails (AETHER_ROW_TAILS=1; off by default)
  rows_m32      row tails searched only in tiles whose probe certified 32 blocks or more
                (forward.ROW_MIN_VISIT_BLOCKS)

Each row's dropped mass under ``rows`` is recomputed in float64 (``reference.dropped_mass``) and
reported as its maximum over eps.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from provenance import env_record, write_json  # noqa: E402

from aether_compile.kernels import forward as kernel_forward  # noqa: E402
from aether_compile.kernels import launch  # noqa: E402
from aether_compile.kernels.reference import dropped_mass  # noqa: E402
from aether_compile.triton_forward import triton_attention  # noqa: E402
from aether_compile.workloads import WORKLOADS  # noqa: E402

EPS = 1e-3  # the suite's for fp16
BLOCK_M = 128


# name -> (AETHER_RECERT_BLOCKS, None for the op's default; AETHER_ROW_TAILS;
# forward.ROW_MIN_VISIT_BLOCKS)
VARIANTS = {"probe_only": ("0", "0", 0), "tile": (None, "0", 0), "rows": (None, "1", 0),
            "rows_m32": (None, "1", 32)}


def sample_rows(N: int, tiles: int) -> torch.Tensor:
    starts = torch.linspace(0, N // BLOCK_M - 1, tiles).long() * BLOCK_M
    return (starts[:, None] + torch.arange(BLOCK_M)).flatten()


def run_length(N: int, heads: list[int], tiles: int) -> dict:
    q, k, v = WORKLOADS["clustered"](1, 16, N, 128, dtype=torch.float16, seed=0)
    _, block_n = launch.default_blocks(128, "cuda", N)
    n_kb = N // block_n
    rows = sample_rows(N, tiles)
    kept = {name: [] for name in VARIANTS}
    worst = {}
    for h in heads:
        qs = q[:, h:h + 1, rows].contiguous()
        ks, vs = k[:, h:h + 1].contiguous(), v[:, h:h + 1].contiguous()
        for name, (recert, row_tails, min_visit) in VARIANTS.items():
            os.environ["AETHER_ROW_TAILS"] = row_tails
            kernel_forward.ROW_MIN_VISIT_BLOCKS = min_visit
            if recert is None:
                os.environ.pop("AETHER_RECERT_BLOCKS", None)
            else:
                os.environ["AETHER_RECERT_BLOCKS"] = recert
            _, _, kept_map = triton_attention(qs, ks, vs, None, False, None, False, EPS, BLOCK_M,
                                              block_n)
            kept[name] += kept_map[0, 0].sum(-1).tolist()  # blocks kept per sampled tile
            if name.startswith("rows"):
                dropped = dropped_mass(qs, ks, kept_map, BLOCK_M, block_n)
                worst[name] = max(worst.get(name, 0.0), float(dropped.max()) / EPS)
        print(f"N {N} head {h}: " + ", ".join(f"{n} {sum(c) / (len(c) * n_kb):.4f}"
                                             for n, c in kept.items()), flush=True)
    os.environ.pop("AETHER_ROW_TAILS", None)
    os.environ.pop("AETHER_RECERT_BLOCKS", None)
    return {"N": N, "block_n": block_n, "key_blocks": n_kb,
            "kept_fraction": {n: sum(c) / (len(c) * n_kb) for n, c in kept.items()},
            "kept_per_tile": kept, "max_dropped_over_eps": worst}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/row_tails_kept_cpu.json")
    ap.add_argument("--lengths", type=int, nargs="+", default=[131072, 65536])
    ap.add_argument("--heads", type=int, nargs="+", default=[0, 5, 10, 15])
    ap.add_argument("--tiles", type=int, default=4, help="query tiles per head")
    args = ap.parse_args(argv)
    record = {"env": env_record(), "config": {**vars(args), "eps": EPS, "block_m": BLOCK_M,
                                              "workload": "clustered (W2), fp16, seed 0"},
              "rows": []}
    t0 = time.time()
    for N in args.lengths:
        record["rows"].append(run_length(N, args.heads, args.tiles))
        record["seconds"] = round(time.time() - t0, 1)
        write_json(args.out, record)
    print(f"-> {args.out} ({record['seconds']} s)")


if __name__ == "__main__":
    main()
