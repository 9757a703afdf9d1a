"""End-to-end prefill of a transformers Llama (random weights, bf16, batch 1):
``torch.compile(model, backend="aether")`` against the default ``torch.compile(model)``
(Inductor), issue 6 row ``e2e_dense_ratio`` = inductor_time / aether_time (target >= 0.97).

GPU (one command, about 2-3 minutes on an H100; the device copy has no .git, so
name the commit it was copied from):

    AETHER_COMMIT=<sha> python benchmarks/e2e_llama.py \
        --out benchmarks/results

CPU smoke run (tiny model, a few seconds of compile, what tests/test_benchmark_scripts.py runs):

    python benchmarks/e2e_llama.py --smoke --out /tmp/e2e_smoke

Model: LlamaForCausalLM, hidden 1024, 8 layers, 16 query heads over 4 kv heads (head dim 64),
MLP 2816, vocab 32000, random init (seed 0): attention is close to uniform, so there is little
to skip and the row measures the cost of the rewrite on dense-like attention. Sequence 16K.

Attention variants (``--attn``):
  sdpa         stock ``attn_implementation="sdpa"``. Under torch.compile, transformers 5.x on
               torch < 2.14 never skips its causal mask, so SDPA gets a materialised bool
               [1, 1, L, L] mask plus repeat_kv'd keys (the rewrite sees ``mask=bool, gqa``).
  sdpa_nomask  the same SDPA function registered under another name whose mask function returns
               None: SDPA gets ``is_causal=True, enable_gqa=True`` (what eager transformers does,
               and what compiled transformers does on torch >= 2.14).
  eager        ``attn_implementation="eager"`` (softmax(q k^T) v, fp32 softmax): the softmax
               matcher's path. Not in the default list (materialises [H, L, L] scores).

Per row: eager (uncompiled) time, inductor and aether compile seconds and times (CUDA events,
median of ``--iters`` after ``--warmup``), aether/inductor ratio, counters["aether"], every site
the rewrite saw, max-abs / relative logits difference to inductor (and inductor vs eager, the
compile's own noise), top-1 agreement, and the top CUDA kernels of one call of each (profiler).
Each row fails soft: an error (OOM included) is recorded in the row and the run goes on. The JSON
is rewritten after every row, so a cut-off run keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a source checkout without an install
    sys.path.insert(0, ROOT)

import aether_compile  # noqa: E402  (registers torch.ops.aether.* and the backend)
from provenance import card_tag, env_record, write_json  # noqa: E402,F401  (re-exported)
from aether_compile.passes.rewrite import add_listener, remove_listener  # noqa: E402


# -- shared helpers (train_stdlib_lm.py imports these) ---------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: str, warmup: int, iters: int) -> dict:
    """Median (and min, all) wall time of fn() in ms: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(iters):
        if device == "cuda":
            t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0.record()
            fn()
            t1.record()
            torch.cuda.synchronize()
            times.append(t0.elapsed_time(t1))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"median": statistics.median(times), "min": min(times), "all": times}


def compare(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> dict:
    """max |a - b|, ||a - b|| / ||b|| (Frobenius, float64 accumulation) and top-1 agreement over
    the last dim, computed in chunks of rows (logits can be GBs)."""
    a = a.reshape(-1, a.shape[-1])
    b = b.reshape(-1, b.shape[-1])
    max_abs, num, den, agree = 0.0, 0.0, 0.0, 0
    for i in range(0, a.shape[0], chunk):
        x, y = a[i:i + chunk].double(), b[i:i + chunk].double()
        d = x - y
        max_abs = max(max_abs, float(d.abs().max()))
        num += float(d.square().sum())
        den += float(y.square().sum())
        agree += int((x.argmax(-1) == y.argmax(-1)).sum())
    return {"max_abs": max_abs, "rel": (num ** 0.5) / (den ** 0.5) if den > 0 else num ** 0.5,
            "ref_max_abs": float(b.abs().max()), "top1_agree": agree / max(1, a.shape[0])}


def top_kernels(fn, device: str, n: int = 8) -> list | None:
    """The n device kernels taking most time in one call of fn (None off CUDA or on error)."""
    if device != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        rows = []
        for e in prof.key_averages():
            t = getattr(e, "self_device_time_total", None)
            if t is None:
                t = getattr(e, "self_cuda_time_total", 0)
            if t:
                rows.append((t, e.key, e.count))
        rows.sort(reverse=True)
        total = sum(r[0] for r in rows)
        return [{"kernel": k[:120], "ms": t / 1e3, "frac": t / total if total else None,
                 "count": c} for t, k, c in rows[:n]]
    except Exception as e:  # noqa: BLE001  (diagnostics only)
        return [{"error": repr(e)[:200]}]


class SiteLog:
    """Collect the rewrite's sites during a compile (the listener explain() uses)."""

    def __init__(self):
        self.sites = []

    def __enter__(self):
        add_listener(self.sites.append)
        return self

    def __exit__(self, *exc):
        remove_listener(self.sites.append)
        return False

    def summary(self) -> list:
        seen = {}
        for s in self.sites:
            key = (s.pattern, s.decision, s.code, s.reason)
            seen[key] = seen.get(key, 0) + 1
        return [{"pattern": p, "decision": d, "code": c, "reason": r, "count": n}
                for (p, d, c, r), n in seen.items()]


def aether_counters() -> dict:
    from torch._dynamo.utils import counters

    return dict(counters["aether"])


def reset_compile_state() -> None:
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()


def recompile_limit(limit: int):
    """Dynamo config patch raising the per-code recompile limit (renamed from cache_size_limit):
    each torch.compile of one model with another backend or options adds a cache entry."""
    import torch._dynamo.config as dcfg

    name = "recompile_limit" if hasattr(dcfg, "recompile_limit") else "cache_size_limit"
    return dcfg.patch(**{name: max(limit, getattr(dcfg, name))})


def free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def error_record(e: BaseException) -> dict:
    oom = isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()
    return {"error": f"{'OOM: ' if oom else ''}{type(e).__name__}: {e}"[:600],
            "traceback": traceback.format_exc()[-2000:]}


# -- the Llama rows --------------------------------------------------------------------------------
def register_nomask() -> None:
    """``sdpa_nomask``: transformers' SDPA attention with a mask function that returns None, so
    SDPA runs with is_causal=True (and enable_gqa) also under torch.compile."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    try:
        from transformers import AttentionMaskInterface
    except ImportError:
        from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register("sdpa_nomask", sdpa_attention_forward)
    AttentionMaskInterface.register("sdpa_nomask", lambda *args, **kwargs: None)


def build_model(args, attn: str, device: str, dtype: torch.dtype):
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim,
        max_position_embeddings=max(max(args.seqs), 4096), use_cache=False,
        attention_dropout=0.0, tie_word_embeddings=False, attn_implementation=attn)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(dtype).eval(), cfg


def run_row(model, ids, args, device: str, attn: str, seq: int) -> dict:
    row = {"attn": attn, "seq": seq}
    fwd_eager = lambda: model(input_ids=ids)  # noqa: E731

    # eager (uncompiled): a reference point, and the logits the compile's own noise is judged by
    t = time_ms(fwd_eager, device, 1, max(1, args.iters // 2))
    row["t_eager_ms"] = t["median"]
    logits_eager = fwd_eager().logits
    print(f"  eager {row['t_eager_ms']:.2f} ms", flush=True)

    reset_compile_state()
    inductor = torch.compile(model)
    t0 = time.perf_counter()
    logits_ind = inductor(input_ids=ids).logits
    sync(device)
    row["compile_s_inductor"] = time.perf_counter() - t0
    t = time_ms(lambda: inductor(input_ids=ids), device, args.warmup, args.iters)
    row["t_inductor_separate_ms"] = t["median"]
    row["inductor_vs_eager"] = compare(logits_ind, logits_eager)
    del logits_eager
    print(f"  inductor {t['median']:.2f} ms (compile {row['compile_s_inductor']:.0f} s)",
          flush=True)

    # the aether compile sits beside the inductor one (Dynamo keeps one cache entry per backend),
    # so the two can be timed interleaved below
    from torch._dynamo.utils import counters
    counters.clear()
    options = dict(args.aether_options)
    aether = torch.compile(model, backend="aether", options=options)
    with SiteLog() as log:
        t0 = time.perf_counter()
        logits_ae = aether(input_ids=ids).logits
        sync(device)
        row["compile_s_aether"] = time.perf_counter() - t0
    row["aether_options"] = options
    row["counters_aether"] = aether_counters()
    row["sites"] = log.summary()
    t = time_ms(lambda: aether(input_ids=ids), device, args.warmup, args.iters)
    row["t_aether_separate_ms"] = t["median"]
    row["aether_vs_inductor"] = compare(logits_ae, logits_ind)
    row["max_abs_logits_diff_vs_inductor"] = row["aether_vs_inductor"]["max_abs"]
    print(f"  aether {t['median']:.2f} ms (compile {row['compile_s_aether']:.0f} s); counters "
          f"{row['counters_aether']}; max|dlogits| {row['max_abs_logits_diff_vs_inductor']:.3g} "
          f"(inductor vs eager {row['inductor_vs_eager']['max_abs']:.3g})", flush=True)

    # interleaved timing (drift cancels). Valid when each wrapper still runs its own graph: both
    # reproduce their first logits bit for bit (and those differ, so they tell the graphs apart).
    same_ind = bool(torch.equal(inductor(input_ids=ids).logits, logits_ind))
    same_ae = bool(torch.equal(aether(input_ids=ids).logits, logits_ae))
    row["interleave_check"] = {"inductor_reproduces": same_ind, "aether_reproduces": same_ae,
                               "graphs_distinguishable": row["max_abs_logits_diff_vs_inductor"] > 0}
    del logits_ae, logits_ind
    t_ind, t_ae = [], []
    for _ in range(args.warmup):
        inductor(input_ids=ids)
        aether(input_ids=ids)
    for _ in range(args.iters):
        t_ind.append(time_ms(lambda: inductor(input_ids=ids), device, 0, 1)["median"])
        t_ae.append(time_ms(lambda: aether(input_ids=ids), device, 0, 1)["median"])
    row["t_inductor_interleaved_all_ms"], row["t_aether_interleaved_all_ms"] = t_ind, t_ae
    row["t_inductor_interleaved_ms"] = statistics.median(t_ind)
    row["t_aether_interleaved_ms"] = statistics.median(t_ae)
    interleaved_ok = same_ind and same_ae
    src = "interleaved" if interleaved_ok else "separate"
    row["timing"] = src
    row["t_inductor_ms"] = row[f"t_inductor_{src}_ms"]
    row["t_aether_ms"] = row[f"t_aether_{src}_ms"]
    row["ratio_aether_over_inductor"] = row["t_aether_ms"] / row["t_inductor_ms"]
    row["e2e_dense_ratio"] = row["t_inductor_ms"] / row["t_aether_ms"]
    print(f"  {src}: inductor {row['t_inductor_ms']:.2f} ms, aether {row['t_aether_ms']:.2f} ms "
          f"-> inductor/aether {row['e2e_dense_ratio']:.3f}x  {row['interleave_check']}",
          flush=True)
    if args.profile:
        row["top_kernels_inductor"] = top_kernels(lambda: inductor(input_ids=ids), device)
        row["top_kernels_aether"] = top_kernels(lambda: aether(input_ids=ids), device)
    return row


def summarize(rows: list, primary_seq: int) -> dict:
    ok = [r for r in rows if "error" not in r]

    def ratio(attn):
        rs = [r for r in ok if r["attn"] == attn]
        at = [r for r in rs if r["seq"] == primary_seq] or rs
        return at[0]["e2e_dense_ratio"] if at else None

    attns = sorted({r["attn"] for r in rows})
    return {
        # the row: stock transformers SDPA (first variant run when sdpa was not)
        "e2e_dense_ratio": ratio("sdpa") if ratio("sdpa") is not None else
        next((ratio(a) for a in attns if ratio(a) is not None), None),
        "e2e_dense_ratio_by_attn": {a: ratio(a) for a in attns},
        "e2e_seq": primary_seq,
        "target": 0.97,
        "rows_ok": len(ok), "rows_failed": len(rows) - len(ok),
    }


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--smoke", action="store_true",
                    help="tiny model on CPU (allow_cpu), a few seconds: the CI check")
    ap.add_argument("--seqs", type=int, nargs="+", default=None, help="default 16384")
    ap.add_argument("--attn", nargs="+", default=None,
                    choices=["sdpa", "sdpa_nomask", "eager"], help="default sdpa sdpa_nomask")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                    help="default bfloat16 (float32 with --smoke)")
    ap.add_argument("--eps", type=float, default=None, help="aether eps (default: dtype default)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--no-profile", dest="profile", action="store_false")
    ap.add_argument("--deadline-min", type=float, default=9.0,
                    help="skip rows not started by this many minutes after start (the device "
                         "allows 10 min a command)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.layers, args.hidden, args.heads, args.kv_heads, args.head_dim = 2, 64, 4, 2, 16
        args.intermediate, args.vocab = 128, 256
        args.seqs = args.seqs or [128]
        args.warmup, args.iters = 0, 1
        args.dtype = args.dtype or "float32"
    args.seqs = args.seqs or [16384]
    args.attn = args.attn or ["sdpa", "sdpa_nomask"]
    args.dtype = args.dtype or "bfloat16"
    return args


def main(argv=None):
    args = parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.smoke:
        print("no CUDA device: running anyway on CPU (pass --smoke for tiny sizes)", flush=True)
    dtype = getattr(torch, args.dtype)
    args.aether_options = {}
    if device == "cpu":
        args.aether_options["allow_cpu"] = True
    if args.eps is not None:
        args.aether_options["eps"] = args.eps
    env = env_record()
    name = "e2e_llama_smoke" if args.smoke else "e2e_llama"
    path = os.path.join(args.out, f"{name}_{card_tag(env)}.json")
    config = {k: v for k, v in vars(args).items()}
    record = {"env": env, "config": config, "rows": [], "summary": None}
    print(f"e2e_llama on {env['card']} (torch {env['torch']}, transformers {env['transformers']}, "
          f"commit {env['commit']}) -> {path}", flush=True)
    if "sdpa_nomask" in args.attn:
        register_nomask()
    t_start = time.perf_counter()
    for attn in args.attn:
        try:
            model, cfg = build_model(args, attn, device, dtype)
            record["model"] = {"params": sum(p.numel() for p in model.parameters()),
                               "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                               "kv_heads": args.kv_heads, "head_dim": args.head_dim,
                               "intermediate": args.intermediate, "vocab": args.vocab,
                               "dtype": args.dtype}
        except Exception as e:  # noqa: BLE001
            record["rows"].append({"attn": attn, **error_record(e)})
            continue
        for seq in args.seqs:
            if time.perf_counter() - t_start > 60 * args.deadline_min:
                record["rows"].append({"attn": attn, "seq": seq,
                                       "error": "skipped: --deadline-min reached"})
                continue
            print(f"[{attn} seq={seq}]", flush=True)
            g = torch.Generator().manual_seed(1)
            ids = torch.randint(0, args.vocab, (1, seq), generator=g).to(device)
            try:
                with torch.no_grad(), recompile_limit(16):
                    row = run_row(model, ids, args, device, attn, seq)
            except Exception as e:  # noqa: BLE001  (OOM or anything else: record, go on)
                row = {"attn": attn, "seq": seq, **error_record(e)}
                print(f"  FAILED: {row['error']}", flush=True)
            record["rows"].append(row)
            reset_compile_state()
            free(device)
            record["summary"] = summarize(record["rows"], 16384 if 16384 in args.seqs
                                          else max(args.seqs))
            record["wall_s"] = time.perf_counter() - t_start
            write_json(path, record)
        del model
        free(device)
    print(json.dumps(record["summary"], indent=1))
    print(f"-> {path} ({record['wall_s']:.0f} s)" if "wall_s" in record else f"-> {path}")
    write_json(path, record)
    return record


if __name__ == "__main__":
    main()
