"""Decode step attention (one query row per head against a KV cache): certified decode
(aether_compile.kernels.decode) against the fastest dense SDPA backend and FlexAttention, on
uniform, clustered and learned data. Issue 21's attention-step rows.

GPU (one command; the device copy has no .git, so name the commit):

    AETHER_COMMIT=<sha> python benchmarks/bench_decode.py --ckpt CKPT --out benchmarks/results

CKPT: the GQA byte LM (``train_stdlib_lm.py --kv-heads 2``, parts accepted); without it the
learned rows are left out. CPU smoke run (interpreter, tiny sizes): ``--smoke``.

Data:
  * uniform: Gaussian q, k, v (nothing to skip: the op must cost no more than dense);
  * clustered: uniform plus, per KV head, 1/500 of the keys moved towards the group's queries;
  * learned: q (the last position), k, v of every layer of the LM over validation windows,
    layers stacked as KV heads (6 layers x 2 KV heads = 12 KV heads, 48 query heads, D 64).

Per row: the step's time (bounds + selection + attention + combine; the summary is kept beside
the cache, its per-token update timed apart as ``update_us``), the fastest dense SDPA backend's,
speed = dense / ours; kept fraction per row and per KV head (what is read); the ideal per-block
bound's kept fraction (exact block max, n * exp(max), exact normaliser); the oracle's (fewest
blocks holding 1 - eps); the measured worst dropped mass per row (must be <= eps) and the output
error against float32 SDPA.
"""

from __future__ import annotations

import argparse
import collections
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import card_tag, env_record, write_json  # noqa: E402

from aether_compile.kernels import decode  # noqa: E402


def _bench(fn, warmup=5, rep=30) -> float:
    """Median microseconds of fn replayed from a CUDA graph (a decode step runs that way under
    mode="reduce-overhead": no host time in it); the interpreter: wall time of one call."""
    if not torch.cuda.is_available():
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e6
    import triton
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=warmup, rep=rep,
                                   return_mode="median") * 1e3


def synthetic(kind, B, Hq, Hkv, S, D, dtype, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(B, Hq, 1, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(B, Hkv, S, D, device=device, dtype=dtype, generator=g)
    if kind == "clustered":
        direction = q.view(B, Hkv, Hq // Hkv, D).float().mean(2)
        direction = direction / direction.norm(dim=-1, keepdim=True)
        picks = torch.randint(0, S, (max(1, S // 500),), device=device, generator=g)
        k[:, :, picks] += (2 * D ** 0.5 * direction[:, :, None]).to(dtype)  # score ~ +2 |q|
    return q, k, v


def learned(ckpt: str, S: int, B: int, device, dtype=torch.bfloat16):
    """q (last position), k, v of every layer of the byte LM over B validation windows of S
    bytes, layers stacked as heads: q [B, layers*H, 1, D], k, v [B, layers*Hkv, S, D]; and the
    number of layers."""
    import learned_qkv

    model, _ = learned_qkv.load_model(ckpt, device, dtype)
    ids = learned_qkv.validation_windows(S, B, seed=0)
    with torch.no_grad():
        seen = learned_qkv.capture_qkv(model, ids, q_last=1)
    del model
    return (*(torch.cat([seen[layer][i] for layer in sorted(seen)], 1) for i in range(3)),
            len(seen))


def dense_times(q, k, v) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    times = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION),
                          ("cudnn", SDPBackend.CUDNN_ATTENTION),
                          ("efficient", SDPBackend.EFFICIENT_ATTENTION)):
        try:
            with sdpa_kernel([backend]):
                F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
                times[name] = _bench(lambda: F.scaled_dot_product_attention(
                    q, k, v, enable_gqa=True))
        except RuntimeError as e:  # backend refuses the shape
            times[name] = None
            times[name + "_error"] = str(e).splitlines()[0][:120]
    return times


_FLEX = {}


def flex_time(q, k, v):
    """FlexAttention compiled for this shape, no mask (dense decoding), or None."""
    try:
        from torch.nn.attention.flex_attention import flex_attention
        fn = _FLEX.setdefault("fn", torch.compile(flex_attention, dynamic=False))
        fn(q, k, v, enable_gqa=True)
        return _bench(lambda: fn(q, k, v, enable_gqa=True))
    except Exception as e:  # noqa: BLE001
        return f"error: {str(e).splitlines()[0][:120]}"


def per_layer(keep_kv: torch.Tensor, layers: int) -> list:
    """Kept fraction per layer of [B, layers * Hkv, NB] (learned rows stack layers as heads)."""
    B, H, NB = keep_kv.shape
    return [round(x, 4) for x in keep_kv.view(B, layers, H // layers, NB).float()
            .mean((0, 2, 3)).tolist()]


def ideal_and_oracle(q, k, eps: float, layers: int = 0) -> dict:
    """Kept fractions (per row, per KV head; per layer where ``layers``) of the ideal per-block
    bound and of the oracle."""
    B, Hkv, S, D = k.shape
    rows = decode.rows_of(q, Hkv).float()
    s = (rows @ k.float().transpose(-1, -2)) * D ** -0.5  # [B, Hkv, R, S]
    NB = S // decode.BLOCK
    blocks = s[..., :NB * decode.BLOCK].unflatten(-1, (NB, decode.BLOCK))
    lse = torch.logsumexp(s, -1, keepdim=True)
    mass = torch.exp(torch.logsumexp(blocks, -1) - lse)  # exact share per block
    ideal = torch.exp(blocks.amax(-1) + math.log(decode.BLOCK) - lse)  # n * exp(max) / Z
    out = {}
    for name, key in (("ideal", ideal), ("oracle", mass)):
        srt, order = key.sort(-1)
        drop = srt.cumsum(-1) <= eps  # smallest first, while their sum stays <= eps
        keep = torch.ones_like(drop).scatter_(-1, order, ~drop)
        out[f"{name}_kept_row"] = keep.float().mean().item()
        out[f"{name}_kept_kv"] = keep.any(2).float().mean().item()
        if layers:
            out[f"{name}_kept_kv_per_layer"] = per_layer(keep.any(2), layers)
    return out


BOUNDS_SWEEP = ([dict(int8_dot=True, one_lse=True, groups_per_program=g, stages=st, num_warps=w,
                      rows_kernel=False, real_rows=True)
                 for g in (4, 8, 16) for st in (2, 3) for w in (1, 2, 4)]
                + [dict(int8_dot=True, one_lse=True, groups_per_program=8, stages=2,
                        num_warps=2, rows_kernel=False, real_rows=False),
                   dict(int8_dot=False, one_lse=True, groups_per_program=8, stages=2,
                        num_warps=4, rows_kernel=False, real_rows=True),
                   dict(int8_dot=False, one_lse=True, groups_per_program=8, stages=2,
                        num_warps=2, rows_kernel=True, real_rows=True)])
ATTEND_SWEEP = [dict(programs_per_sm=p, stages=st, num_warps=w) for p in (8, 16, 32)
                for st in (2, 3, 4) for w in (4, 8)]
SELECT_SWEEP = [dict(per_row=True)] + [dict(per_row=False, sections=k) for k in (1, 4, 8)]


def sweep(q, k, v, summary, eps: float, scale: float) -> dict:
    """GPU time of the bounds and attention kernels under each meta-parameter set (the defaults
    in kernels/decode.py come from these)."""
    S = k.shape[2]
    out = {"bounds": [], "attend": []}
    for cfg in BOUNDS_SWEEP:
        try:
            us = _bench(lambda: decode.decode_bounds(q, summary, S, scale, config=cfg))
        except Exception as e:  # noqa: BLE001 (a config the compiler refuses: out of resources)
            us = f"error: {str(e).splitlines()[0][:80]}"
        out["bounds"].append({**cfg, "us": us})
    log_upper, log_lower = decode.decode_bounds(q, summary, S, scale)
    out["select"] = []
    for cfg in SELECT_SWEEP:
        us = _bench(lambda: decode.select_blocks(log_upper, log_lower, eps, cfg))
        out["select"].append({**cfg, "us": us})
    kept_order, n_kept, _ = decode.select_blocks(log_upper, log_lower, eps)
    for cfg in ATTEND_SWEEP:
        try:
            us = _bench(lambda: decode.attend_kept(q, k, v, kept_order, n_kept, scale,
                                                   config=cfg))
        except Exception as e:  # noqa: BLE001
            us = f"error: {str(e).splitlines()[0][:80]}"
        out["attend"].append({**cfg, "us": us})
    for part, default in (("bounds", decode.BOUNDS_CONFIG), ("select", decode.SELECT_CONFIG),
                          ("attend", decode.ATTEND_CONFIG)):
        timed = [r for r in out[part] if isinstance(r["us"], float)]
        best = min(timed, key=lambda r: r["us"], default=None)
        mine = [r for r in timed if all(r.get(n, x) == x for n, x in default.items())]
        print(f"  {part} sweep: best {best}; default {mine[0] if mine else default}", flush=True)
    return out


def op_time(op) -> tuple[float, dict]:
    """``_bench`` of a decode op call on a fresh cache (summaries forgotten) after two warm-up
    calls (the first summarises the cache and samples the site's choice), and the paths its
    timed warm-up and captured calls took (``kv_cache.CALLS``: dense_cudnn, dense_sdpa,
    certified)."""
    from aether_compile import kv_cache

    kv_cache.forget_summaries()
    for _ in range(2):
        op()
    before = collections.Counter(kv_cache.CALLS)
    us = _bench(op)
    return us, dict(kv_cache.CALLS - before)


def measure(q, k, v, eps: float, scale: float, layers: int = 0) -> dict:
    summary = decode.summarize_keys(k)
    out, lse, keep_rows = decode.decode_attention(q, k, v, summary, eps, scale)
    torch.cuda.synchronize() if q.is_cuda else None
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    B, Hkv, S, D = k.shape
    rows = decode.rows_of(q, Hkv).float()
    s = (rows @ k.float().transpose(-1, -2)) * scale
    p = torch.softmax(s, -1)
    keep = keep_rows.any(2).repeat_interleave(decode.BLOCK, -1)[..., :S]
    dropped = (p * ~keep.unsqueeze(2)).sum(-1)
    rec = {"kept_row": keep_rows.float().mean().item(),
           "kept_kv": keep_rows.any(2).float().mean().item(),
           **({"kept_kv_per_layer": per_layer(keep_rows.any(2), layers)} if layers else {}),
           "max_dropped_mass": dropped.max().item(),
           "max_abs_err_vs_fp32": (out.float() - ref).abs().max().item()}
    rec["ours_us"] = _bench(lambda: decode.decode_attention(q, k, v, summary, eps, scale))
    # the op as a compiled model calls it: certified, or dense where its lagged choice says so
    rec["op_us"], rec["op_paths"] = op_time(
        lambda: torch.ops.aether.decode_attention(q, k, v, None, False, scale, eps))
    if layers:
        rec.update(per_layer_op(q, k, v, eps, scale, layers))
    # with the all-true bool mask transformers passes at each decode step: SDPA then has no
    # fused kernel for GQA (math), and the op's dense path is its own split kernel
    mask = torch.ones(B, 1, q.shape[2], S, dtype=torch.bool, device=k.device)
    op_masked = lambda: torch.ops.aether.decode_attention(q, k, v, mask, False, scale, eps)  # noqa: E731
    for _ in range(2):
        op_masked()
    rec["op_masked_us"] = _bench(op_masked)
    rec["sdpa_masked_us"] = _bench(lambda: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=scale, enable_gqa=True))
    rec["dense_kernel_us"] = _bench(lambda: decode.attend_all(q, k, v, scale))
    # the step's three parts apart: where its time goes
    rec["bounds_us"] = _bench(lambda: decode.decode_bounds(q, summary, S, scale))
    log_upper, log_lower = decode.decode_bounds(q, summary, S, scale)
    rec["select_us"] = _bench(lambda: decode.select_blocks(log_upper, log_lower, eps))
    rec["select_sorted_us"] = _bench(
        lambda: decode.select_blocks_sorted(log_upper, log_lower, eps))  # the torch version
    kept_order, n_kept, _ = decode.select_blocks(log_upper, log_lower, eps)
    rec["attend_us"] = _bench(lambda: decode.attend_kept(q, k, v, kept_order, n_kept, scale))
    # a token's cache write and summary update: one fused launch, and the unfused pair
    pos = torch.tensor([S - 1], device=k.device)
    new = k[:, :, S - 1:].clone()
    rec["update_us"] = _bench(lambda: decode.write_keys(summary, k, pos, new))
    rec["update_unfused_us"] = _bench(
        lambda: (k.index_copy_(2, pos, new), decode.update_summary(summary, k, pos)))
    rec.update(ideal_and_oracle(q, k, eps, layers))
    return rec


def per_layer_op(q, k, v, eps: float, scale: float, layers: int) -> dict:
    """The op as a model calls it: once per layer, each layer a site with its own dense choice
    (from its own kept fraction, DECODE_DENSE_FRACTIONS by size), all layers in one CUDA graph;
    against cuDNN per layer in one graph. Learned rows stack the layers as heads in one call,
    where one site's choice covers every layer."""
    from aether_compile import kv_cache
    from aether_compile.kernels import dense

    hq, hkv = q.shape[1] // layers, k.shape[1] // layers
    parts = [(q[:, i * hq:(i + 1) * hq].contiguous(), k[:, i * hkv:(i + 1) * hkv].contiguous(),
              v[:, i * hkv:(i + 1) * hkv].contiguous()) for i in range(layers)]
    kv_cache.forget_summaries()
    paths = []
    for ql, kl, vl in parts:  # each site's first call samples its choice
        before = collections.Counter(kv_cache.CALLS)
        torch.ops.aether.decode_attention(ql, kl, vl, None, False, scale, eps)
        paths.append("certified" if (kv_cache.CALLS - before)["certified"] else "dense")

    def op_layers():
        for ql, kl, vl in parts:
            torch.ops.aether.decode_attention(ql, kl, vl, None, False, scale, eps)

    def dense_layers():
        for ql, kl, vl in parts:
            dense.cudnn_unmasked(ql, kl, vl, scale)

    out = {"op_layers_us": _bench(op_layers), "dense_layers_us": _bench(dense_layers),
           "op_layers_paths": paths,
           "dense_fraction_per_layer": kv_cache.decode_dense_fraction(
               q.shape[0], hkv, k.shape[2])}
    out["op_layers_speedup"] = out["dense_layers_us"] / out["op_layers_us"]
    del parts
    return out


def break_even_kept(rec: dict, fastest) -> float | None:
    """The kept fraction (per KV head) below which this step would beat the fastest dense one,
    with the attention's time taken as proportional to what it reads: (dense - bounds -
    selection) / (attention time per unit kept). kv_cache.DECODE_DENSE_FRACTIONS stays under it
    (a test checks the committed grid)."""
    if not fastest or rec["kept_kv"] <= 0:
        return None
    return (fastest - rec["bounds_us"] - rec["select_us"]) / (rec["attend_us"] / rec["kept_kv"])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--ckpt", default=None)
    ap.add_argument("--kv", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1],
                    help="eps values for the learned rows")
    ap.add_argument("--synthetic-eps", type=float, nargs="+", default=[1e-2],
                    help="eps values for the uniform and clustered rows")
    ap.add_argument("--sweep", action="store_true",
                    help="time the kernels' meta-parameter sets at 32K keys, batch 1 and 8")
    ap.add_argument("--kinds", nargs="+", default=["uniform", "clustered", "learned"])
    ap.add_argument("--flex", action="store_true", help="also time FlexAttention (compiles)")
    ap.add_argument("--deadline-min", type=float, default=9.0)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.smoke:
        args.kv, args.batch, args.kinds = [256], [2], ["uniform", "clustered"]
    env = env_record()
    path = os.path.join(args.out, f"decode{'_smoke' if args.smoke else ''}_{card_tag(env)}.json")
    record = {"env": env, "config": vars(args), "rows": [], "summary": None}
    t0 = time.perf_counter()
    Hq, Hkv, D = (4, 2, 32) if args.smoke else (32, 8, 128)
    dtype = torch.bfloat16
    for kind in args.kinds:
        if kind == "learned" and not args.ckpt:
            continue
        for S in args.kv:
            for B in args.batch:
                if time.perf_counter() - t0 > 60 * args.deadline_min:
                    break
                if kind == "learned":
                    if B > 8 or S > 32768:
                        continue  # the LM saw 16K; its validation text holds a few 32K windows
                    q, k, v, layers = learned(args.ckpt, S, B, device)
                else:
                    q, k, v = synthetic(kind, B, Hq, Hkv, S, D, dtype, device)
                    layers = 0
                scale = q.shape[-1] ** -0.5
                base = {"kind": kind, "kv": S, "batch": B, "hq": q.shape[1], "hkv": k.shape[1],
                        "d": q.shape[-1], "dtype": str(dtype)}
                try:
                    dense = dense_times(q, k, v) if device == "cuda" else {}
                    fastest = min((t for n, t in dense.items()
                                   if isinstance(t, float)), default=None)
                    if args.flex and S == 32768 and device == "cuda":
                        dense["flex"] = flex_time(q, k, v)
                    if (args.sweep and device == "cuda" and S == 32768
                            and B in (1, 8)):  # each kind's, at batch 1 and 8
                        record.setdefault("sweeps", {})[f"{kind}_b{B}"] = sweep(
                            q, k, v, decode.summarize_keys(k), 1e-2, scale)
                    for eps in (args.eps if kind == "learned" else args.synthetic_eps):
                        rec = {**base, "eps": eps, "dense_us": dense, "fastest_dense_us": fastest,
                               **measure(q, k, v, eps, scale, layers)}
                        rec["speedup"] = fastest / rec["ours_us"] if fastest else None
                        rec["op_speedup"] = fastest / rec["op_us"] if fastest else None
                        rec["op_masked_speedup"] = (fastest / rec["op_masked_us"] if fastest
                                                    else None)
                        rec["break_even_kept_kv"] = break_even_kept(rec, fastest)
                        record["rows"].append(rec)
                        print(f"{kind:9s} kv {S:6d} B {B:2d} eps {eps:.0e}: kept row "
                              f"{rec['kept_row']:.3f} kv {rec['kept_kv']:.3f} (ideal "
                              f"{rec['ideal_kept_kv']:.3f}, oracle {rec['oracle_kept_kv']:.3f}) "
                              f"dropped {rec['max_dropped_mass']:.1e} | ours {rec['ours_us']:.1f}"
                              f" us (bounds {rec['bounds_us']:.1f} select "
                              f"{rec['select_us']:.1f} attend {rec['attend_us']:.1f}; op "
                              f"{rec['op_us']:.1f}, masked {rec['op_masked_us']:.1f}, dense "
                              f"kernel {rec['dense_kernel_us']:.1f}) dense {_f(fastest)} "
                              f"(masked SDPA {rec['sdpa_masked_us']:.1f}) -> "
                              f"{_f(rec['speedup'], 3)} (op {_f(rec['op_speedup'], 3)}, "
                              f"masked {_f(rec['op_masked_speedup'], 3)})",
                              flush=True)
                        if layers:
                            print(f"  op per layer: {rec['op_layers_us']:.1f} us against cuDNN "
                                  f"{rec['dense_layers_us']:.1f} ({rec['op_layers_paths']})",
                                  flush=True)
                            print(f"  kept per layer: ours {rec['kept_kv_per_layer']}, ideal "
                                  f"{rec['ideal_kept_kv_per_layer']}, oracle "
                                  f"{rec['oracle_kept_kv_per_layer']}", flush=True)
                except torch.cuda.OutOfMemoryError as e:
                    record["rows"].append({**base, "error": str(e)[:200]})
                del q, k, v
                torch.cuda.empty_cache() if device == "cuda" else None
                record["summary"] = summarize(record["rows"])
                write_json(path, record)
    record["summary"] = summarize(record["rows"])
    record["wall_s"] = time.perf_counter() - t0
    write_json(path, record)
    if not args.smoke:  # the generate keys, where bench_generate.py wrote its file beside this
        import bench_generate
        record["summary"] = (bench_generate.attach_to_decode_summary(args.out, card_tag(env))
                             or record["summary"])
    print(record["summary"])
    print(f"-> {path}")


def _f(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def summarize(rows) -> dict:
    ok = [r for r in rows if "error" not in r and r.get("speedup")]

    def pick(kind, kv, batch):
        rs = [r for r in ok if (r["kind"], r["kv"], r["batch"]) == (kind, kv, batch)]
        return max(rs, key=lambda r: r["speedup"]) if rs else None

    learned = pick("learned", 32768, 8)
    return {
        "decode_speedup_32k_learned": learned and learned["speedup"],
        "decode_speedup_32k_learned_eps": learned and learned["eps"],
        "decode_kept_over_ideal_32k": learned and (learned["kept_kv"]
                                                   / max(learned["ideal_kept_kv"], 1e-9)),
        "decode_uniform_min_ratio": min((r["op_speedup"] for r in ok if r["kind"] == "uniform"),
                                        default=None),
        # the op as transformers calls it, with a mask (its dense path is the split kernel)
        "decode_uniform_min_ratio_masked": min((r["op_masked_speedup"] for r in ok
                                                if r["kind"] == "uniform"
                                                and r.get("op_masked_speedup")), default=None),
        "decode_op_speedup_32k_learned": learned and learned["op_speedup"],
        # the op called per layer (each layer its own site and dense choice), best eps
        "decode_op_layers_speedup_32k_learned": max(
            (r["op_layers_speedup"] for r in ok if (r["kind"], r["kv"], r["batch"])
             == ("learned", 32768, 8) and r.get("op_layers_speedup")), default=None),
        "decode_clustered_speedup_32k_b8": (pick("clustered", 32768, 8) or {}).get("speedup"),
        "decode_max_dropped_over_eps": max((r["max_dropped_mass"] / r["eps"] for r in ok),
                                           default=None),
        # where certified decode starts to pay, per KV head's kept fraction (the least over rows)
        "decode_break_even_kept_min": min((r["break_even_kept_kv"] for r in ok
                                           if r.get("break_even_kept_kv") is not None),
                                          default=None),
    }


if __name__ == "__main__":
    main()
