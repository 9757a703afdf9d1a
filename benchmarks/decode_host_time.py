"""Host (Python) time of one ``aether::decode_attention`` call, launches excluded: what a decode
step costs the CPU before the GPU sees a kernel. A compiled ``generate`` outside CUDA graphs
waits on it every layer and step (profile_generate: 0.83 ms of host time a call on the H100).

    TRITON_INTERPRET=1 python benchmarks/decode_host_time.py --out benchmarks/results

Every Triton launch goes to a hook that records it and returns (``launches_to``), so nothing
runs: the time is the op's own Python and torch's allocations and small ops, on CPU tensors of
the long LM's decode shape (batch 4, 8 query / 2 KV heads, D 64, 32K + 256 cache, bf16, the
all-true bool mask transformers passes). Routes: ``dense`` (the lagged choice says dense, the
split kernel over every block), ``certified`` (bounds, selection, attention, combine); the key
write, ``write`` (aether::key_cache_index_copy_) beside ``index_copy_`` (the default compile's). On a GPU
each launch adds Triton's own launcher time on top, and each torch op its dispatch. Best of
``--repeats`` runs of ``--calls`` calls (the box's other work only adds). Writes decode_host_time_cpu.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import env_record, write_json  # noqa: E402

B, HQ, HKV, S, D = 4, 8, 2, 32768 + 256, 64


def _time_calls(route: str, call, calls: int, repeats: int) -> dict:
    """``call``'s host time with every Triton launch hooked: five calls first (the key summary,
    the site's entry), then the best of ``repeats`` runs of ``calls``; summaries dropped after."""
    from aether_compile import kv_cache
    from aether_compile.kernels import launch

    launches = []
    try:
        with launch.launches_to(lambda kernel, grid, args, kwargs: launches.append(kernel)):
            for _ in range(5):
                call()
            runs = []
            for _ in range(repeats):
                launches.clear()
                t0 = time.perf_counter()
                for _ in range(calls):
                    call()
                runs.append((time.perf_counter() - t0) / calls * 1e6)
        stats = dict(kv_cache.STATS)
    finally:
        kv_cache.forget_summaries()
        kv_cache.STATS.clear()
    return {"route": route, "host_us_per_call": min(runs), "runs_us": runs,
            "launches_per_call": len(launches) / calls, "summaries": stats}


def time_route(route: str, calls: int, repeats: int) -> dict:
    from aether_compile import dense_policy

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(B, HQ, 1, D, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(B, HKV, S, D, generator=gen).to(torch.bfloat16) for _ in range(2))
    mask = torch.ones(B, 1, 1, S, dtype=torch.bool)
    real_choice = dense_policy.choose_dense
    dense_policy.choose_dense = lambda *a, **kw: route == "dense"
    try:
        return _time_calls(route, lambda: torch.ops.aether.decode_attention(
            q, k, v, mask, False, None, 1e-2), calls, repeats)
    finally:
        dense_policy.choose_dense = real_choice


def time_write(route: str, calls: int, repeats: int) -> dict:
    """The key write of a decode step: ``write`` (aether::key_cache_index_copy_, its summary
    current: one fused launch) or ``index_copy_`` (what the default compile's graph calls)."""
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(B, HKV, S, D, generator=gen).to(torch.bfloat16)
    new = torch.randn(B, HKV, 1, D, generator=gen).to(torch.bfloat16)
    position = torch.tensor([S // 2])
    if route == "write":
        def call():
            torch.ops.aether.key_cache_index_copy_(cache, 2, position, new, 0)
    else:
        def call():
            cache.index_copy_(2, position, new)
    return _time_calls(route, call, calls, repeats)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    from aether_compile.kernels import launch

    if not launch.INTERPRET:
        sys.exit("run with TRITON_INTERPRET=1: the decode kernels' host path then runs on the CPU")
    import aether_compile.ops  # noqa: F401  (registers torch.ops.aether.*)

    rows = [time_route(route, args.calls, args.repeats) for route in ("dense", "certified")]
    rows += [time_write(route, args.calls, args.repeats) for route in ("write", "index_copy_")]
    for r in rows:
        print(f"{r['route']}: {r['host_us_per_call']:.0f} us a call, "
              f"{r['launches_per_call']:.0f} launches", flush=True)
    write_json(os.path.join(args.out, "decode_host_time_cpu.json"),
               {"env": env_record(device="cpu"), "shape": dict(B=B, Hq=HQ, Hkv=HKV, S=S, D=D),
                "rows": rows})


if __name__ == "__main__":
    main()
