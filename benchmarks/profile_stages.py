"""Where the op's time goes: per-kernel GPU time of one ``aether_compile.attention`` call.

    python benchmarks/profile_stages.py --out benchmarks/results

For each case: the op's wall time and cuDNN's (do_bench, same run), then a torch.profiler trace
of a few calls, summed per kernel name (geometry, bounds, plan, attention probe + main pass,
the dense kernel the gate picked, and torch's small ops), plus the host gap: wall time not
covered by GPU work (launches, the gate's one device-to-host read). The last case is a static
cache's prefill (``STATIC_CACHE_PREFILL``), against SDPA with the same mask and SDPA's causal
kernel. ``--only clustered run_static_cache_prefill`` runs the cases so named. Writes
profile_stages_<card>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict

import torch
import triton

import aether_compile
from aether_compile.workloads import WORKLOADS

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import card_tag, env_record, write_json  # noqa: E402
from bench_attention import bench_ms, sdpa_anchors  # noqa: E402

CASES = [  # (workload, N, H, Hkv, D, causal)
    ("uniform", 16384, 16, 16, 128, False),
    ("uniform", 32768, 16, 16, 128, False),
    ("uniform", 32768, 16, 16, 128, True),
    ("uniform", 32768, 8, 8, 64, True),  # the stdlib LM's attention shape
    ("clustered", 32768, 16, 16, 128, False),
    ("clustered", 131072, 16, 16, 128, False),
]
CALLS = 5
# A static cache's prefill as transformers' generate calls it (the long LM's shape: 8 query and 2
# KV heads, D 64, bf16, batch 4): a 32K prompt against a cache of 32K + 256 slots, with the bool
# mask materialised over the whole cache (top-left causal, the empty slots masked).
STATIC_CACHE_PREFILL = dict(B=4, H=8, Hkv=2, L=32768, S=32768 + 256, D=64)


def kernel_times(fn) -> dict:
    """GPU milliseconds per call, by kernel name, over CALLS profiled calls."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            fn()
        torch.cuda.synchronize()
    per_name = defaultdict(float)
    for evt in prof.events():
        if evt.device_type == torch.autograd.DeviceType.CUDA:
            per_name[evt.name[:80]] += evt.device_time_total / 1000.0 / CALLS
    return dict(sorted(per_name.items(), key=lambda kv: -kv[1]))


def run_case(workload, N, H, Hkv, D, causal) -> dict:
    kw = {"kv_heads": Hkv} if Hkv != H else {}
    q, k, v = WORKLOADS[workload](1, H, N, D, dtype=torch.float16, device="cuda", seed=0, **kw)

    def op():
        return aether_compile.attention(q, k, v, is_causal=causal, enable_gqa=Hkv != H)

    _, stats = aether_compile.attention(q, k, v, is_causal=causal, enable_gqa=Hkv != H,
                                        return_stats=True)
    t_op = float(triton.testing.do_bench(op, warmup=25, rep=200, return_mode="median"))
    anchors = sdpa_anchors(q, k, v, causal)
    fastest = min(t for t in anchors.values() if t)
    kernels = kernel_times(op)
    gpu_total = sum(kernels.values())
    return {"workload": workload, "N": N, "H": H, "Hkv": Hkv, "D": D, "causal": causal,
            "kept_fraction": stats.kept_fraction, "t_op_ms": t_op, "anchors_ms": anchors,
            "ratio_vs_fastest_dense": fastest / t_op, "gpu_ms_per_call": gpu_total,
            "host_gap_ms": t_op - gpu_total, "kernels_ms": kernels}


def run_static_cache_prefill(B, H, Hkv, L, S, D) -> dict:
    """The op on a static cache's prefill mask against SDPA given the same mask (what the default
    compile runs) and SDPA's causal kernel on the first L keys (the same attention)."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(B, H, L, D, device="cuda", generator=gen, dtype=torch.bfloat16)
    k, v = (torch.randn(B, Hkv, S, D, device="cuda", generator=gen, dtype=torch.bfloat16)
            for _ in range(2))
    rows, cols = torch.arange(L, device="cuda"), torch.arange(S, device="cuda")
    mask = (cols[None, :] <= rows[:, None]).expand(B, 1, L, S).contiguous()

    def op():
        return aether_compile.attention(q, k, v, attn_mask=mask, enable_gqa=True)

    t_op = bench_ms(op)
    anchors = {
        "sdpa_with_mask": bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=True)),
        "sdpa_causal_first_keys": bench_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k[:, :, :L], v[:, :, :L], is_causal=True, enable_gqa=True)),
    }
    kernels = kernel_times(op)
    gpu_total = sum(kernels.values())
    return {"workload": "static_cache_prefill", "B": B, "N": L, "S": S, "H": H, "Hkv": Hkv,
            "D": D, "causal": "mask", "t_op_ms": t_op, "anchors_ms": anchors,
            "ratio_vs_fastest_dense": min(anchors.values()) / t_op,
            "ratio_vs_sdpa_with_mask": anchors["sdpa_with_mask"] / t_op,
            "gpu_ms_per_call": gpu_total, "host_gap_ms": t_op - gpu_total, "kernels_ms": kernels}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", nargs="*", help="cases whose workload (or run_static_cache_prefill) "
                    "is named, e.g. clustered run_static_cache_prefill")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("profiling needs a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    record = env_record()
    path = os.path.join(args.out, f"profile_stages_{card_tag(record)}.json")
    rows = []
    cases = [(run_case, case) for case in CASES]
    cases.append((run_static_cache_prefill, STATIC_CACHE_PREFILL))
    if args.only:
        cases = [c for c in cases if any(w in (c[0].__name__, *map(str, c[1])) for w in args.only)]
    for i, (run, case) in enumerate(cases):
        print(f"[{i + 1}/{len(cases)}] {case}", flush=True)
        rows.append(run(**case) if isinstance(case, dict) else run(*case))
        r = rows[-1]
        print(f"    op {r['t_op_ms']:.3f} ms, {r['ratio_vs_fastest_dense']:.3f}x fastest dense, "
              f"host gap {r['host_gap_ms']:.3f} ms", flush=True)
        for name, ms in list(r["kernels_ms"].items())[:8]:
            print(f"      {ms:8.3f} ms  {name}", flush=True)
        # after every case: a cut-short run keeps what finished
        write_json(path, {"env": record, "rows": rows})
        torch.cuda.empty_cache()
    print(f"-> {path}")


if __name__ == "__main__":
    main()
