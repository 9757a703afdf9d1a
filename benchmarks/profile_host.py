"""Host cost of the runtime dense choice: how long the CPU takes to issue each step of
``prepare_pass`` (the opaque op compiled graphs call before the pass), and the GPU time of each.

    AETHER_COMMIT=<sha> python benchmarks/profile_host.py --out benchmarks/results

A compiled model issues its layers back to back; where the host needs longer to issue a layer
than the GPU takes to run it, the GPU idles. Per step: microseconds of host time to issue it
(the queue emptied first, so no launch waits on the GPU) and of GPU time (CUDA events), the mean
over ITERS calls. Shapes: the e2e Llama's attention (16 heads, 4 kv heads, D 64, 16K, bf16,
causal) and W1's (16 heads, D 128, 16K, fp16). Writes profile_host_<card>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import aether_compile  # noqa: F401  (registers the ops)
from aether_compile.kernels import dense_choice
from aether_compile.kernels import triton_attention as tri
from aether_compile.workloads import WORKLOADS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_attention import env_record  # noqa: E402

CASES = [  # (name, workload, N, H, Hkv, D, dtype, causal)
    ("e2e_llama_layer", "uniform", 16384, 16, 4, 64, torch.bfloat16, True),
    ("w1_16k", "uniform", 16384, 16, 16, 128, torch.float16, False),
]
ITERS = 30


def timed(fn) -> dict:
    """Mean host microseconds to issue fn (queue empty before each call) and GPU microseconds."""
    fn()
    torch.cuda.synchronize()
    host, gpu = [], []
    for _ in range(ITERS):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        t0 = time.perf_counter()
        fn()
        host.append(time.perf_counter() - t0)
        end.record()
        torch.cuda.synchronize()
        gpu.append(start.elapsed_time(end) / 1e3)
    return {"host_us": round(1e6 * sum(host) / ITERS, 1),
            "gpu_us": round(1e6 * sum(gpu) / ITERS, 1)}


def run_case(name, workload, N, H, Hkv, D, dtype, causal) -> dict:
    kw = {"kv_heads": Hkv} if Hkv != H else {}
    q, k, v = WORKLOADS[workload](1, H, N, D, dtype=dtype, device="cuda", seed=0, **kw)
    scale, eps = D ** -0.5, 1e-3
    bm, bn = tri.default_blocks(D, "cuda")
    sample = tri._row_sample(q, k, v, causal, bm, bn) or (q, k, v)
    plan = tri.plan_attention(*sample, None, causal, scale, bm, bn)
    counts = tri.sample_visit_counts(q, k, v, causal, scale, eps, bm, bn, True)
    steps = {
        "prepare_pass (lagged)": lambda: torch.ops.aether.prepare_pass(
            q, k, v, None, causal, scale, eps, bm, bn, tri.DENSE_FRACTION, True, False,
            tri.heads_interleaved(q), 0),
        "precheck_choice (read every call)": lambda: tri.precheck_choice(
            q, k, v, causal, scale, eps, bm, bn, tri.DENSE_FRACTION, 1),
        "sample_visit_counts": lambda: tri.sample_visit_counts(q, k, v, causal, scale, eps, bm,
                                                               bn, True),
        "plan_attention (sample)": lambda: tri.plan_attention(*sample, None, causal, scale, bm, bn),
        "certified_counts (sample)": lambda: tri.certified_counts(*sample, plan, eps),
        "_probe_visit_count (sample)": lambda: tri._probe_visit_count(*sample, plan, eps),
        "choose_dense (no sample due)": lambda: dense_choice.choose_dense(("p",), lambda: counts,
                                                                          0.6),
        "dense_sdpa_with_lse": lambda: tri.dense_sdpa_with_lse(q, k, v, causal, scale),
        "aether_compile.attention (eager)": lambda: aether_compile.attention(
            q, k, v, is_causal=causal, enable_gqa=Hkv != H),
    }
    os.environ["AETHER_DENSE_LAG"] = "1"
    rows = {}
    for step, fn in steps.items():
        if step == "precheck_choice (read every call)":
            os.environ["AETHER_DENSE_LAG"] = "0"
        rows[step] = timed(fn)
        os.environ["AETHER_DENSE_LAG"] = "1"
        print(f"  {name:<16} {step:<34} host {rows[step]['host_us']:8.1f} us   "
              f"gpu {rows[step]['gpu_us']:8.1f} us", flush=True)
    return {"case": name, "N": N, "H": H, "Hkv": Hkv, "D": D, "dtype": str(dtype),
            "causal": causal, "steps": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    env = env_record()
    record = {"benchmark": "profile_host", "env": env, "iters": ITERS,
              "rows": [run_case(*case) for case in CASES]}
    os.makedirs(args.out, exist_ok=True)
    card = env.get("card", "cpu").replace(" ", "_")
    path = os.path.join(args.out, f"profile_host_{card}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    print("->", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
