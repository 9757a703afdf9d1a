"""Benchmark the aether op against dense anchors on one GPU; writes JSON (and prints a table).

    python benchmarks/bench_attention.py --suite issue2 --out benchmarks/results

Suites:
  issue2     clustered W2 at 32K (and 16K) plus uniform W1 at 32K, B=1 H=16 D=128, fp16 and bf16:
             kept fraction, certified eps, measured max dropped mass, error, time against SDPA
             flash / cuDNN / efficient, FlexAttention dense and Flex given our kept blocks.
  backward   backward time against SDPA flash / cuDNN backward (clustered, 8K-32K), and peak
             memory of forward + backward at 128K against flash.
  calibrate  output error against float64 for a grid of eps per dtype and workload, next to
             SDPA's own rounding error in that dtype: the data behind DEFAULT_EPS.
Every row records card, torch and triton versions, and the git commit.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
import triton

import aether_compile
from aether_compile.kernels.reference import dropped_mass
from aether_compile.kernels.plan import plan_attention
from aether_compile.triton_forward import run_attention
from aether_compile.ops import default_eps
from aether_compile.workloads import WORKLOADS

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from helpers import chunked_oracle, rel_err  # noqa: E402
from provenance import card_tag, env_record, write_json  # noqa: E402


def bench_ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median"))


def sdpa_anchors(q, k, v, is_causal) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    times = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel(backend):
                times[name] = bench_ms(lambda: F.scaled_dot_product_attention(
                    q, k, v, is_causal=is_causal))
        except RuntimeError:
            times[name] = None
    return times


_flex_compiled = None


def flex_anchors(q, k, v, kept, block_m, block_n) -> dict:
    """FlexAttention dense, and Flex given exactly our kept blocks (kernel quality apart from
    block selection)."""
    global _flex_compiled
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention
    except ImportError:
        return {"flex_dense": None, "flex_same_blocks": None}
    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    out = {}
    try:
        out["flex_dense"] = bench_ms(lambda: _flex_compiled(q, k, v))
    except Exception as e:  # noqa: BLE001  (report, keep benchmarking)
        out["flex_dense"] = None
        out["flex_error"] = repr(e)[:200]
    try:
        kept_i = kept.to(torch.int32)
        num = kept_i.sum(-1, dtype=torch.int32)
        idx = torch.argsort(-kept_i, dim=-1, stable=True).to(torch.int32)
        bm = BlockMask.from_kv_blocks(torch.zeros_like(num), idx, num, idx,
                                      BLOCK_SIZE=(block_m, block_n))
        out["flex_same_blocks"] = bench_ms(lambda: _flex_compiled(q, k, v, block_mask=bm))
    except Exception as e:  # noqa: BLE001
        out["flex_same_blocks"] = None
        out["flex_blocks_error"] = repr(e)[:200]
    return out


ORACLE_HEADS, ORACLE_TILES = 4, 16  # the oracle's sample: heads x evenly spaced query tiles


def oracle_kept(q, k, stats, eps) -> dict:
    """The oracle's kept fraction on a sample of query tiles (``oracle_tile`` of
    benchmarks/research/prefill_selection.py: blocks by their largest exact share over the tile's
    rows until every row keeps 1 - eps; it knows the scores, so no certificate) and the op's own
    kept fraction on the same tiles. Scores in float32, one tile at a time."""
    from research.prefill_selection import oracle_tile

    B, H, N, D = q.shape
    bm, bn = stats.block_m, stats.block_n
    n_tiles, nkb = N // bm, N // bn
    heads = torch.linspace(0, H - 1, min(ORACLE_HEADS, H)).long().tolist()
    tiles = torch.linspace(0, n_tiles - 1, min(ORACLE_TILES, n_tiles)).long().tolist()
    scale = D ** -0.5
    oracle, ours = [], []
    for h in heads:
        kf = k[0, h].float()
        for t in tiles:
            s = (q[0, h, t * bm:(t + 1) * bm].float() * scale) @ kf.T  # [bm, N]
            block_lse = torch.logsumexp(s.view(bm, nkb, bn), -1)
            row_lse = torch.logsumexp(block_lse, -1)
            oracle.append(int(oracle_tile(block_lse[None].cpu(), row_lse[None].cpu(), eps)[0]))
            ours.append(int(stats.kept_blocks[0, h, t].sum()))
    return {"oracle_kept_fraction_sample": sum(oracle) / (len(oracle) * nkb),
            "kept_fraction_sample": sum(ours) / (len(ours) * nkb),
            "certified_over_oracle": sum(ours) / max(1, sum(oracle)),
            "oracle_sample": f"{len(heads)} heads x {len(tiles)} tiles of {bm} rows"}


def _expand_kv(q, k, v):
    """SDPA anchors get the kv heads repeated for GQA (what a dense model without GQA kernels
    does); the repeat is outside the timed region."""
    rep = q.shape[1] // k.shape[1]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, 1).contiguous(), v.repeat_interleave(rep, 1).contiguous()


def run_case(workload, N, dtype, is_causal, H=16, D=128, eps=None, check=True, flex=False,
             kv_heads=None, fwd_bwd=False):
    kw = {"kv_heads": kv_heads} if kv_heads else {}
    q, k, v = WORKLOADS[workload](1, H, N, D, dtype=dtype, device="cuda", seed=0, **kw)
    gqa = k.shape[1] != q.shape[1]
    eps = default_eps(dtype) if eps is None else eps
    out, stats = aether_compile.attention(q, k, v, is_causal=is_causal, eps=eps, enable_gqa=gqa,
                                          return_stats=True)
    row = {"workload": workload, "N": N, "H": H, "Hkv": k.shape[1], "D": D,
           "dtype": str(dtype).split(".")[-1], "causal": is_causal, "eps": eps,
           "block_m": stats.block_m, "block_n": stats.block_n,
           "kept_fraction": stats.kept_fraction}
    if workload == "clustered" and not is_causal and not gqa:
        row.update(oracle_kept(q, k, stats, eps))
    if check:
        row["max_dropped_mass"] = float(dropped_mass(q, k, stats.kept_blocks, stats.block_m,
                                                     stats.block_n, is_causal=is_causal).max())
        dense = chunked_oracle(q, k, v, None, is_causal)
        row["rel_err_vs_fp64"] = rel_err(out, dense)
        ke, ve = _expand_kv(q, k, v)
        row["sdpa_rel_err_vs_fp64"] = rel_err(F.scaled_dot_product_attention(
            q, ke, ve, is_causal=is_causal), dense)
        del dense
    del out
    row["t_aether_ms"] = bench_ms(lambda: aether_compile.attention(
        q, k, v, is_causal=is_causal, eps=eps, enable_gqa=gqa))
    row["t_plan_ms"] = bench_ms(lambda: plan_attention(q, k, v, None, is_causal))
    plan = plan_attention(q, k, v, None, is_causal)
    # the sparse kernel alone (no dense dispatch), two-pass and in-kernel stop; the two-pass as
    # an eager inference call runs it, without the kept map (Flex on the same blocks builds none)
    row["t_attention_kernel_ms"] = bench_ms(lambda: run_attention(q, k, v, plan, eps,
                                                                  with_kept=False))
    row["t_attention_kernel_stop_ms"] = bench_ms(lambda: run_attention(q, k, v, plan, eps, "stop"))
    row["kept_fraction_stop"] = float(run_attention(q, k, v, plan, eps, "stop")[2].float().mean())
    row["sparse_ms"] = row["t_plan_ms"] + row["t_attention_kernel_ms"]
    del plan
    ke, ve = _expand_kv(q, k, v)
    row.update({f"t_sdpa_{n}_ms": t for n, t in sdpa_anchors(q, ke, ve, is_causal).items()})
    if flex:
        row.update({f"t_{n}_ms" if n.startswith("flex_") and "error" not in n else n: t
                    for n, t in flex_anchors(q, ke, ve, stats.kept_blocks, stats.block_m,
                                             stats.block_n).items()})
    dense_times = [row[f"t_sdpa_{n}_ms"] for n in ("flash", "cudnn", "efficient")
                   if row.get(f"t_sdpa_{n}_ms")]
    row["fastest_dense_ms"] = min(dense_times)
    row["speedup_vs_fastest_dense"] = row["fastest_dense_ms"] / row["t_aether_ms"]
    row["plan_frac_of_dense"] = row["t_plan_ms"] / row["fastest_dense_ms"]
    if fwd_bwd:
        row.update(fwd_bwd_times(q, k, v, is_causal, gqa))
    return row


def fwd_bwd_times(q, k, v, is_causal, gqa):
    """Forward + backward, ours against SDPA flash (GQA expanded); OOM recorded, not raised."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    res = {}
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    do = torch.randn_like(q)

    def ours():
        o = aether_compile.attention(*leaves, is_causal=is_causal, enable_gqa=gqa)
        torch.autograd.grad(o, leaves, do)

    def flash():
        ke, ve = (t.repeat_interleave(q.shape[1] // k.shape[1], 1) for t in leaves[1:])
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            o = F.scaled_dot_product_attention(leaves[0], ke, ve, is_causal=is_causal)
        torch.autograd.grad(o, leaves, do)

    for name, fn in (("aether", ours), ("sdpa_flash", flash)):
        try:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            res[f"t_fwd_bwd_{name}_ms"] = float(triton.testing.do_bench(fn, warmup=1, rep=1,
                                                                        return_mode="median"))
            res[f"peak_extra_GiB_{name}"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
        except torch.OutOfMemoryError:
            res[f"t_fwd_bwd_{name}_ms"] = "OOM"
        torch.cuda.empty_cache()
    return res


def suite_issue2(progress):
    rows = []
    cases = [("clustered", 32768, torch.float16, False, True),
             ("clustered", 32768, torch.bfloat16, False, True),
             ("clustered", 16384, torch.float16, False, False),
             ("uniform", 32768, torch.float16, False, False),
             ("uniform", 32768, torch.float16, True, False)]
    for i, (w, n, dt, causal, flex) in enumerate(cases):
        progress(f"[{i + 1}/{len(cases)}] {w} N={n} {dt} causal={causal}")
        rows.append(run_case(w, n, dt, causal, flex=flex))
    return rows


# --only: run just these workloads of a suite (the issue-6 suite does not fit one 10-minute device
# call with W4 in it).
ONLY_WORKLOADS: tuple = ()
ONLY_SIZES: tuple = ()


def suite_issue6(progress):
    """Workloads W1-W4 of the performance issue (B = 1, H = 16, D = 128 unless said)."""
    cases = []
    for n in (4096, 16384, 32768):  # W1 uniform: nothing to prune
        for causal in (False, True):
            cases.append(dict(workload="uniform", N=n, dtype=torch.float16, is_causal=causal,
                              check=n <= 16384))
    cases.append(dict(workload="uniform", N=32768, dtype=torch.bfloat16, is_causal=False,
                      check=False))
    cases.append(dict(workload="uniform", N=16384, dtype=torch.float16, is_causal=False, D=64,
                      check=False))
    for n in (16384, 32768, 65536, 131072):  # W2 clustered
        cases.append(dict(workload="clustered", N=n, dtype=torch.float16, is_causal=False,
                          check=n <= 32768, flex=n in (32768, 131072)))
    cases.append(dict(workload="clustered", N=32768, dtype=torch.bfloat16, is_causal=False,
                      check=False, flex=True))
    for n in (32768, 131072):  # W3 LLM-like, GQA 32/8, causal
        cases.append(dict(workload="llm_like", N=n, dtype=torch.float16, is_causal=True, H=32,
                          kv_heads=8, check=False))
    # W4: 1M tokens, one kv head group (4 query heads over 1 kv head), clustered, causal
    cases.append(dict(workload="clustered_gqa", N=1 << 20, dtype=torch.float16, is_causal=True,
                      H=4, kv_heads=1, check=False, fwd_bwd=True))
    if ONLY_WORKLOADS:
        cases = [c for c in cases if c["workload"] in ONLY_WORKLOADS]
    if ONLY_SIZES:
        cases = [c for c in cases if c["N"] in ONLY_SIZES]
    rows = []
    for i, c in enumerate(cases):
        progress(f"[{i + 1}/{len(cases)}] {c}")
        try:
            rows.append(run_case(**c))
        except torch.OutOfMemoryError as e:
            rows.append({**{k: str(v) for k, v in c.items()}, "error": f"OOM: {e}"[:300]})
        torch.cuda.empty_cache()
        progress(f"    -> {rows[-1].get('speedup_vs_fastest_dense')}x, "
                 f"kept {rows[-1].get('kept_fraction')}")
        partial = os.environ.get("AETHER_BENCH_PARTIAL")
        if partial:  # keep what finished if the run is cut short
            write_json(partial, rows)
    return rows


def summarize_issue6(rows) -> dict:
    def pick(**kw):
        return [r for r in rows if all(r.get(k) == v for k, v in kw.items()) and "error" not in r]

    w1 = pick(workload="uniform")
    w2_32 = pick(workload="clustered", N=32768, dtype="float16")
    w2_128 = pick(workload="clustered", N=131072)
    w3 = pick(workload="llm_like", N=131072)
    w4 = [r for r in rows if r.get("workload") == "clustered_gqa"]
    flex = [r for r in rows if r.get("t_flex_same_blocks_ms")]
    return {
        "w1_min_ratio_vs_fastest_dense": min((r["speedup_vs_fastest_dense"] for r in w1),
                                             default=None),
        "w2_32k_speedup": w2_32[0]["speedup_vs_fastest_dense"] if w2_32 else None,
        "w2_128k_speedup": w2_128[0]["speedup_vs_fastest_dense"] if w2_128 else None,
        "kernel_vs_flex_same_blocks": min((r["t_flex_same_blocks_ms"] / r["t_attention_kernel_ms"]
                                           for r in flex), default=None),
        "overhead_frac_32k": w2_32[0]["plan_frac_of_dense"] if w2_32 else None,
        # the plan's time over the whole call (W2, 128K), and the op's kept blocks over the
        # oracle's on the same sample of tiles (W2, 32K)
        "plan_frac_128k": (w2_128[0]["t_plan_ms"] / w2_128[0]["t_aether_ms"]
                           if w2_128 else None),
        "certified_over_oracle_32k": (w2_32[0].get("certified_over_oracle") if w2_32 else None),
        "w3_128k_speedup_vs_flash_causal": (w3[0]["t_sdpa_flash_ms"] / w3[0]["t_aether_ms"]
                                            if w3 else None),
        "w4_runs": (("error" not in w4[0] and w4[0].get("t_fwd_bwd_aether_ms") not in (None, "OOM"))
                    if w4 else None),  # null where W4 was not run (--only)
        "e2e_dense_ratio": None,
        "e2e_sparse_speedup": None,
        "e2e_sparse_eps": None,
    }


def suite_calibrate(progress):
    rows = []
    grid = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2]
    for dt in (torch.float16, torch.bfloat16):
        for w, causal in (("clustered", False), ("uniform", False), ("sink_local", True)):
            q, k, v = WORKLOADS[w](1, 4, 8192, 128, dtype=dt, device="cuda", seed=1)
            dense = chunked_oracle(q, k, v, None, causal)
            noise = rel_err(F.scaled_dot_product_attention(q, k, v, is_causal=causal), dense)
            for eps in grid:
                out, st = aether_compile.attention(q, k, v, is_causal=causal, eps=eps,
                                                   return_stats=True)
                rows.append({"dtype": str(dt).split(".")[-1], "workload": w, "causal": causal,
                             "eps": eps, "rel_err": rel_err(out, dense), "sdpa_noise": noise,
                             "kept_fraction": st.kept_fraction})
            progress(f"calibrate {dt} {w}: noise {noise:.2e}")
    return rows


def suite_backward(progress):
    """Backward time against SDPA backward (flash, cuDNN) on clustered data, and peak memory of
    forward + backward at 128K against flash."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows = []
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}
    for N in (8192, 16384, 32768):
        q, k, v = (t.requires_grad_() for t in WORKLOADS["clustered"](
            1, 16, N, 128, dtype=torch.float16, device="cuda", seed=0))
        do = torch.randn_like(q)
        row = {"N": N, "dtype": "float16", "H": 16, "D": 128, "workload": "clustered"}
        out, st = aether_compile.attention(q, k, v, return_stats=True)  # differentiable too
        row["kept_fraction"] = st.kept_fraction
        row["t_aether_bwd_ms"] = bench_ms(lambda: torch.autograd.grad(out, (q, k, v), do,
                                                                      retain_graph=True))
        for name, be in backends.items():
            try:
                with sdpa_kernel(be):
                    o = F.scaled_dot_product_attention(q, k, v)
                    row[f"t_sdpa_{name}_bwd_ms"] = bench_ms(
                        lambda: torch.autograd.grad(o, (q, k, v), do, retain_graph=True))
            except RuntimeError:
                row[f"t_sdpa_{name}_bwd_ms"] = None
        dense = [row[f"t_sdpa_{n}_bwd_ms"] for n in backends if row[f"t_sdpa_{n}_bwd_ms"]]
        row["bwd_speedup_vs_fastest_dense"] = min(dense) / row["t_aether_bwd_ms"]
        rows.append(row)
        progress(f"backward N={N}: {row}")
        del q, k, v, do, out
    # peak memory of forward + backward at 128K
    N = 131072
    q, k, v = (t.requires_grad_() for t in WORKLOADS["clustered"](
        1, 16, N, 128, dtype=torch.float16, device="cuda", seed=0))
    do = torch.randn_like(q)
    mem = {"N": N, "workload": "clustered", "measure": "peak_memory_fwd_bwd"}
    for name, fn in (("aether", lambda: aether_compile.attention(q, k, v)),
                     ("sdpa_flash", lambda: F.scaled_dot_product_attention(q, k, v))):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            t0 = torch.cuda.Event(enable_timing=True)
            t1 = torch.cuda.Event(enable_timing=True)
            t0.record()
            torch.autograd.grad(fn(), (q, k, v), do)
            t1.record()
        torch.cuda.synchronize()
        mem[f"{name}_peak_extra_GiB"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 30
        mem[f"{name}_fwd_bwd_ms_single_run"] = t0.elapsed_time(t1)
    rows.append(mem)
    progress(f"memory 128K: {mem}")
    return rows


def plot_issue6(rows, out_dir):
    """time_vs_n.png (per workload, ours and the fastest dense) and speedup_vs_kept.png."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ok = [r for r in rows if "error" not in r and isinstance(r.get("t_aether_ms"), float)]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for wl in sorted({r["workload"] for r in ok}):
        for causal in (False, True):
            rs = sorted((r for r in ok if r["workload"] == wl and r["causal"] == causal
                         and r["dtype"] == "float16" and r["D"] == 128), key=lambda r: r["N"])
            if not rs:
                continue
            label = f"{wl}{' causal' if causal else ''}"
            ax.plot([r["N"] for r in rs], [r["t_aether_ms"] for r in rs], "o-", label=f"aether {label}")
            ax.plot([r["N"] for r in rs], [r["fastest_dense_ms"] for r in rs], "x--",
                    label=f"fastest dense {label}")
    ax.set(xscale="log", yscale="log", xlabel="tokens N", ylabel="ms", title="time against N")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "time_vs_n.png"), dpi=120)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r["kept_fraction"] for r in ok], [r["speedup_vs_fastest_dense"] for r in ok])
    ax.axhline(1.0, color="gray", lw=0.5)
    ax.set(xlabel="kept fraction of blocks", ylabel="speedup vs fastest dense", xscale="log",
           yscale="log", title="speedup against kept fraction")
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "speedup_vs_kept.png"), dpi=120)


def print_table(rows):
    if not rows:
        return
    keys = [k for k in rows[0] if not k.endswith("error")]
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join(f"{r.get(k):.4g}" if isinstance(r.get(k), float) else str(r.get(k))
                         for k in keys))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=["issue2", "issue6", "calibrate", "backward"], nargs="+",
                    default=["issue2"])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--only", default="", help="comma-separated workloads of the issue-6 suite "
                    "(uniform, clustered, llm_like, clustered_gqa); default all")
    ap.add_argument("--tag", default="", help="suffix of the output file name")
    ap.add_argument("--sizes", default="", help="comma-separated N of the issue-6 suite to run "
                    "(all when empty)")
    args = ap.parse_args(argv)
    global ONLY_WORKLOADS, ONLY_SIZES
    ONLY_WORKLOADS = tuple(w for w in args.only.split(",") if w)
    ONLY_SIZES = tuple(int(n) for n in args.sizes.split(",") if n)
    if not torch.cuda.is_available():
        sys.exit("benchmarks need a CUDA GPU")
    os.makedirs(args.out, exist_ok=True)
    record = env_record()
    for suite in args.suite:
        rows = {"issue2": suite_issue2, "issue6": suite_issue6, "calibrate": suite_calibrate,
                "backward": suite_backward}[suite](
            lambda msg: print(msg, flush=True))
        path = os.path.join(args.out,
                            f"{suite}_{card_tag(record)}{args.tag}.json")
        result = {"env": record, "rows": rows}
        if suite == "issue6":
            result["summary"] = summarize_issue6(rows)
            print(json.dumps(result["summary"], indent=1))
            plot_issue6(rows, args.out)
        write_json(path, result)
        print(f"\n== {suite} -> {path}")
        print_table(rows)


if __name__ == "__main__":
    main()
