"""The op inside compiled graphs against the eager op and dense SDPA, in one run (issue 5).

    python benchmarks/bench_compiled.py --out benchmarks/results

For each workload: the eager op (``aether_compile.attention``), ``torch.compile(backend="aether")``
of a module calling SDPA (the op's kernels traced into Inductor's code), the same with
``mode="reduce-overhead"`` (CUDA graphs: the dense gate cannot read the host and stays off), and
cuDNN SDPA. Writes compiled_<card>.json with card, versions, commit and date.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

import aether_compile
from aether_compile.workloads import WORKLOADS

sys.path.insert(0, os.path.dirname(__file__))
from provenance import card_tag, env_record, write_json  # noqa: E402
from bench_attention import bench_ms, sdpa_anchors  # noqa: E402

CASES = [  # (workload, N, causal)
    ("clustered", 32768, False),
    ("clustered", 16384, False),
    ("uniform", 16384, False),
    ("uniform", 16384, True),
    ("uniform", 4096, True),
]


class Attention(torch.nn.Module):
    def __init__(self, is_causal):
        super().__init__()
        self.is_causal = is_causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal)


def run_case(workload, N, causal, dtype=torch.float16):
    q, k, v = WORKLOADS[workload](1, 16, N, 128, dtype=dtype, device="cuda", seed=0)
    row = {"workload": workload, "N": N, "causal": causal, "dtype": str(dtype).split(".")[-1]}
    row["t_eager_op_ms"] = bench_ms(lambda: aether_compile.attention(q, k, v, is_causal=causal))
    for mode in (None, "reduce-overhead"):
        torch._dynamo.reset()
        fn = torch.compile(Attention(causal), backend="aether", mode=mode)
        for _ in range(3):  # compile, cudagraph warmup and record
            fn(q, k, v)
        key = "t_compiled_ms" if mode is None else "t_compiled_cudagraphs_ms"
        row[key] = bench_ms(lambda: fn(q, k, v))
        ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(),
                                             is_causal=causal) if N <= 16384 else None
        if ref is not None:
            out = fn(q, k, v).double()
            row[key.replace("t_", "rel_err_").replace("_ms", "")] = float(
                (out - ref).norm() / ref.norm())
    anchors = sdpa_anchors(q, k, v, causal)
    row.update({f"t_sdpa_{k}_ms": t for k, t in anchors.items()})
    fastest = min(t for t in anchors.values() if t is not None)
    for key in ("t_eager_op_ms", "t_compiled_ms", "t_compiled_cudagraphs_ms"):
        row[key.replace("t_", "speedup_").replace("_ms", "")] = fastest / row[key]
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    record = env_record()
    rows = []
    for i, case in enumerate(CASES):
        print(f"[{i + 1}/{len(CASES)}] {case}", flush=True)
        try:
            rows.append(run_case(*case))
        except Exception as e:  # keep going; the row says what failed
            rows.append({"case": list(case), "error": f"{type(e).__name__}: {e}"[:500]})
        print(json.dumps(rows[-1]), flush=True)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"compiled_{card_tag(record)}.json")
    write_json(path, {"env": record, "rows": rows})
    print("->", path)


if __name__ == "__main__":
    main()
