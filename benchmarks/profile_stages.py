"""Where the op's time goes: per-kernel GPU time of one ``aether_compile.attention`` call.

    python benchmarks/profile_stages.py --out benchmarks/results

For each case: the op's wall time and cuDNN's (do_bench, same run), then a torch.profiler trace
of a few calls, summed per kernel name (geometry, bounds, plan, attention probe + main pass,
the dense kernel the gate picked, and torch's small ops), plus the host gap: wall time not
covered by GPU work (launches, the gate's one device-to-host read). ``run_dense_choice`` splits
an eager call on data with nothing to skip (issue 22's "do no harm"): the dense kernel with and
without its log-sum-exp, the row sample's GPU time, the sample with its host read, and the
kernels of one call in order with the idle time before each. The last case is a static
cache's prefill (``STATIC_CACHE_PREFILL``), against SDPA with the same mask and SDPA's causal
kernel. ``--only clustered run_static_cache_prefill`` runs the cases so named. Writes
profile_stages_<card>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
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
# Eager calls on uniform data, which go dense after a sample of their rows: (N, H, D, causal)
DENSE_CHOICE_CASES = [(16384, 16, 64, False), (16384, 16, 128, False), (16384, 16, 128, True),
                      (4096, 16, 128, False), (32768, 16, 128, False)]
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


def kernel_timeline(fn) -> list:
    """[(kernel name, idle µs before it, its µs)] of one call after a warm one, in GPU order; the
    idle time before the first kernel is measured from the previous call's last kernel."""
    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(2):
            fn()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    second = len(kernels) // 2
    out, end = [], kernels[second - 1].time_range.end if second else None
    for e in kernels[second:]:
        start = e.time_range.start
        out.append((e.name[:60], round(start - end, 1) if end is not None else None,
                    round(e.time_range.end - start, 1)))
        end = e.time_range.end
    return out


def run_dense_choice(N, H, D, causal) -> dict:
    """Where an eager call that goes dense spends its time beyond the dense kernel's."""
    from aether_compile import dense_policy
    from aether_compile.kernels import dense as kernel_dense
    from aether_compile.ops import default_eps, resolve_blocks

    q, k, v = WORKLOADS["uniform"](1, H, N, D, dtype=torch.float16, device="cuda", seed=0)
    scale = D ** -0.5
    eps = default_eps(q.dtype)
    bm, bn = resolve_blocks(q, v, None, None, k)

    def op():
        return aether_compile.attention(q, k, v, is_causal=causal)

    def sample():
        return dense_policy.sample_visit_counts(q, k, v, causal, scale, eps, bm, bn)

    times = {
        "op": bench_ms(op),
        "dense_with_lse": bench_ms(lambda: kernel_dense.dense_sdpa_with_lse(q, k, v, causal,
                                                                            scale)),
        "sample_gpu": bench_ms(sample),
        "sample_and_read": bench_ms(lambda: dense_policy.sampled_visit_fraction(
            q, k, v, causal, scale, eps, bm, bn)),
        **{f"sdpa_{name}": t for name, t in sdpa_anchors(q, k, v, causal).items()},
    }
    host = []
    for _ in range(20):  # host time of one call with the GPU idle before it
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        op()
        host.append((time.perf_counter() - t0) * 1e3)
    fastest = min(t for name, t in times.items() if name.startswith("sdpa_") and t)
    return {"workload": "dense_choice", "N": N, "H": H, "D": D, "causal": causal,
            "times_ms": times, "ratio_vs_fastest_dense": fastest / times["op"],
            "host_ms_gpu_idle": sorted(host)[len(host) // 2], "timeline_us": kernel_timeline(op),
            "t_op_ms": times["op"], "host_gap_ms": None, "kernels_ms": {}}


# W2 with coarser key blocks for the plan and the pass (issue 22's plan cost): (N, block_n)
BLOCK_N_CASES = [(32768, 64), (32768, 128), (131072, 64), (131072, 128), (131072, 256)]


def run_block_n(N, block_n) -> dict:
    """W2 at N with key blocks of ``block_n`` in the plan and the pass: the call, its kernels and
    its kept fraction (the plan's products and sort shrink with the number of key blocks)."""
    q, k, v = WORKLOADS["clustered"](1, 16, N, 128, dtype=torch.float16, device="cuda", seed=0)

    def op():
        return torch.ops.aether.attention_with_stats(q, k, v, None, False, None, False, None,
                                                     128, block_n)

    row = {"workload": "clustered_block_n", "N": N, "block_n": block_n}
    try:
        kept = op()[2]
        row["kept_fraction"] = kept.float().mean().item()
        row["t_op_ms"] = bench_ms(op)
        row["kernels_ms"] = kernel_times(op)
    except Exception as e:  # a tile the kernel cannot compile is an answer too
        row.update(error=f"{type(e).__name__}: {str(e)[:200]}", t_op_ms=float("nan"),
                   kernels_ms={})
    row.update(ratio_vs_fastest_dense=float("nan"), host_gap_ms=None)
    return row


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


def _ms(x) -> str:
    return "-" if x is None else f"{x:.3f}"


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
    cases += [(run_dense_choice, case) for case in DENSE_CHOICE_CASES]
    cases += [(run_block_n, case) for case in BLOCK_N_CASES]
    if args.only:
        cases = [c for c in cases if any(w in (c[0].__name__, *map(str, c[1])) for w in args.only)]
    for i, (run, case) in enumerate(cases):
        print(f"[{i + 1}/{len(cases)}] {case}", flush=True)
        rows.append(run(**case) if isinstance(case, dict) else run(*case))
        r = rows[-1]
        print(f"    op {r['t_op_ms']:.3f} ms, {r['ratio_vs_fastest_dense']:.3f}x fastest dense, "
              f"host gap {_ms(r['host_gap_ms'])} ms", flush=True)
        for key in ("times_ms", "host_ms_gpu_idle", "timeline_us", "kept_fraction", "error"):
            if key in r:
                print(f"      {key}: {r[key]}", flush=True)
        for name, ms in list(r["kernels_ms"].items())[:8]:
            print(f"      {ms:8.3f} ms  {name}", flush=True)
        # after every case: a cut-short run keeps what finished
        write_json(path, {"env": record, "rows": rows})
        torch.cuda.empty_cache()
    print(f"-> {path}")


if __name__ == "__main__":
    main()
