"""The tables of docs/results.md and docs/results-history.md, generated from the result files they
cite.

A table in the page sits between two markers naming its kind and file:

    <!-- table: issue6 issue6_NVIDIA_H200.json -->
    ...generated rows...
    <!-- end table -->

    python benchmarks/results_page.py          # rewrite every marked table from its file
    python benchmarks/results_page.py --check  # exit 1 where a table and its file disagree (CI)

Kinds: ``summary`` (a results file's summary keys), ``issue6`` (the attention suite's rows),
``decode`` (the decode step's rows at one eps, default 1e-2), ``decode_layers`` (its learned rows'
kept fraction per layer), ``decode_sweep`` (its kernels' meta-parameter sweep),
``prefill_selection`` (W2's kept fractions per selection against the oracle), ``decode_dense``
(the decode op's masked dense paths, sweep_decode_dense.py), ``prefill_pass`` (the prefill pass's
launch variants and Flex on the same blocks, sweep_prefill_kernels.py), ``row_tails`` (what the
pass's kernels keep with row tails and without, research/row_tails_kept.py), ``row_tails_sweep``
(the pass's time at each row-tail setting, sweep_prefill_kernels.py), ``decode_dense_probe``
(the decode op's dense route against cuDNN's, profile_decode_dense.py), ``generate``
(bench_generate's rows: tokens/s, prefill and step apart). The prose around
the tables is written by hand; the numbers in the tables are not.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = [os.path.join(ROOT, "docs", name) for name in ("results.md", "results-history.md")]
RESULTS = os.path.join(ROOT, "benchmarks", "results")
MARKED = re.compile(r"(<!-- table: (\w+) ([\w.\-]+)(?: (\S+))? -->\n)(.*?)(<!-- end table -->)",
                    re.S)


def _fmt(x, digits=4) -> str:
    if x is None:
        return "—"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def summary_table(record: dict, _arg=None) -> list[str]:
    env = record["env"]
    rows = [f"{env['card']}, torch {env['torch']}, Triton {env.get('triton')}, commit "
            f"{env.get('commit')}", "", "| summary key | value |", "|---|---|"]
    rows += [f"| `{k}` | {_fmt(v)} |" for k, v in record["summary"].items()
             if not isinstance(v, (dict, list))]
    return rows


def issue6_table(record: dict, _arg=None) -> list[str]:
    env = record["env"]
    rows = [f"{env['card']}, torch {env['torch']}, Triton {env.get('triton')}, commit "
            f"{env.get('commit')}; speed = the fastest dense SDPA of the same run over ours", "",
            "| workload | N | dtype | causal | D | kept | ours ms | fastest dense ms | speed |",
            "|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        if "error" in r:
            rows.append(f"| {r['workload']} | {r['N']} | | | | error: {r['error'][:60]} | | | |")
            continue
        rows.append(f"| {r['workload']} | {r['N']} | {r['dtype']} | {r['causal']} | {r['D']} | "
                    f"{r['kept_fraction']:.3f} | {r['t_aether_ms']:.3f} | "
                    f"{r['fastest_dense_ms']:.3f} | {r['speedup_vs_fastest_dense']:.2f}× |")
    return rows


def decode_table(record: dict, eps=None) -> list[str]:
    eps = float(eps) if eps else 1e-2
    env = record["env"]
    rows = [f"{env['card']}, torch {env['torch']}, Triton {env.get('triton')}, commit "
            f"{env.get('commit')}; ε {eps:g}; µs of CUDA-graph replays; kept per KV head "
            "(ideal per-block bound, oracle)", "",
            "| data | KV | batch | kept (ideal, oracle) | dense | bounds | selection | attention "
            "| step → speed | op → speed | op, masked (SDPA, masked) | break-even kept |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        if "error" in r:
            rows.append(f"| {r['kind']} | {r['kv'] // 1024}K | {r['batch']} | "
                        f"{r['error'][:50]} | | | | | | | | |")
            continue
        if r["eps"] != eps:
            continue
        rows.append(
            f"| {r['kind']} | {r['kv'] // 1024}K | {r['batch']} | {r['kept_kv']:.3f} "
            f"({r['ideal_kept_kv']:.3f}, {r['oracle_kept_kv']:.3f}) | "
            f"{r['fastest_dense_us']:.0f} | {r['bounds_us']:.0f} | "
            f"{r.get('select_us', float('nan')):.0f} | {r.get('attend_us', float('nan')):.0f} | "
            f"{r['ours_us']:.0f} → {r['speedup']:.2f}× | {r['op_us']:.0f} → "
            f"{r['op_speedup']:.2f}× | {_masked(r)} | {_fmt(r.get('break_even_kept_kv'), 2)} |")
    return rows


def _masked(r: dict) -> str:
    """The op called with transformers' all-true bool mask, and SDPA with that mask (µs)."""
    if "op_masked_us" not in r:
        return "—"
    return f"{r['op_masked_us']:.0f} ({r['sdpa_masked_us']:.0f})"


def decode_layers_table(record: dict, eps=None) -> list[str]:
    """The learned rows' kept fraction per layer: ours, the ideal per-block bound's, the
    oracle's."""
    eps = float(eps) if eps else 1e-2
    rows = ["| KV | batch | layer | ours | ideal | oracle |", "|---|---|---|---|---|---|"]
    for r in record["rows"]:
        if r.get("kind") != "learned" or r.get("eps") != eps or "kept_kv_per_layer" not in r:
            continue
        for i, (ours, ideal, oracle) in enumerate(zip(r["kept_kv_per_layer"],
                                                      r["ideal_kept_kv_per_layer"],
                                                      r["oracle_kept_kv_per_layer"])):
            rows.append(f"| {r['kv'] // 1024}K | {r['batch']} | {i} | {ours:.3f} | {ideal:.3f} | "
                        f"{oracle:.3f} |")
    return rows


def decode_sweep_table(record: dict, kind=None) -> list[str]:
    """The bounds and attention kernels' meta-parameter sweep (µs, fastest first)."""
    kind = kind or "learned"
    rows = []
    for part in ("bounds", "select", "attend"):
        timed = [r for r in record.get("sweeps", {}).get(kind, {}).get(part, [])
                 if isinstance(r["us"], (int, float))]
        if not timed:
            continue
        keys = [k for k in timed[0] if k != "us"]
        rows += [f"{part}:", "", "| " + " | ".join(keys) + " | µs |",
                 "|" + "---|" * (len(keys) + 1)]
        rows += ["| " + " | ".join(str(r[k]) for k in keys) + f" | {r['us']:.1f} |"
                 for r in sorted(timed, key=lambda r: r["us"])]
        rows.append("")
    return rows[:-1] if rows else ["(no sweep in this file)"]


PREFILL_SELECTIONS = ("oracle_tile", "ideal_tile", "ideal_rows", "ball", "ball_rows",
                      "ball_sub32", "ball_m64", "ballbox", "tile_summary", "refine256")


def prefill_selection_table(record: dict, _arg=None) -> list[str]:
    env = record["env"]
    r0 = record["rows"][0]
    rows = [f"commit {env.get('commit')}, torch {env['torch']} on the CPU; W2, eps {r0['eps']}, "
            f"{r0['heads']} heads x {r0['tiles_per_head']} query tiles of {r0['block_m']} rows, "
            f"key blocks of {r0['block_n']}; kept = blocks visited / blocks", "",
            "| N | " + " | ".join(PREFILL_SELECTIONS) + " | ball / oracle |",
            "|---|" + "---|" * (len(PREFILL_SELECTIONS) + 1)]
    for r in record["rows"]:
        rows.append(f"| {r['N']} | " + " | ".join(f"{r[k]:.4f}" for k in PREFILL_SELECTIONS)
                    + f" | {r['certified_over_oracle']:.2f} |")
    return rows


def row_tails_table(record: dict, _arg=None) -> list[str]:
    """research/row_tails_kept.py: what the op's kernels keep with row tails and without."""
    env, cfg = record["env"], record["config"]
    names = list(dict.fromkeys(n for r in record["rows"] for n in r["kept_fraction"]))
    rows = [f"commit {env.get('commit')}, torch {env['torch']}, Triton {env.get('triton')} "
            f"(interpreter) on the CPU; {cfg['workload']}, eps {cfg['eps']}, heads "
            f"{', '.join(map(str, cfg['heads']))} x {cfg['tiles']} query tiles of {cfg['block_m']} "
            "rows; kept = blocks visited / blocks; worst tile = the most blocks one tile kept", "",
            "| N | key block | " + " | ".join(names) + " | worst tile: " + " / ".join(names)
            + " | max dropped / eps |", "|---|---|" + "---|" * (len(names) + 2)]
    for r in record["rows"]:
        kept = r["kept_fraction"]
        worst = " / ".join(str(max(r["kept_per_tile"][n])) if n in kept else "—" for n in names)
        dropped = ", ".join(f"{n} {v:.3f}" for n, v in r["max_dropped_over_eps"].items())
        rows.append(f"| {r['N'] // 1024}K | {r['block_n']} | "
                    + " | ".join(f"{kept[n]:.4f}" if n in kept else "—" for n in names)
                    + f" | {worst} | {dropped} |")
    return rows


def decode_dense_table(record: dict, _arg=None) -> list[str]:
    """sweep_decode_dense: the decode op's masked dense paths against cuDNN without the mask."""
    env = record["env"]
    heads = record.get("heads") or {"query": 32, "kv": 8, "dim": 128}
    repeat = any("sdpa_repeat_kv_us" in r for r in record["shapes"])
    rows = [f"{env['card']}, torch {env['torch']}, Triton {env.get('triton')}, commit "
            f"{env.get('commit')}; uniform keys, GQA {heads['query']}/{heads['kv']}, "
            f"D {heads['dim']}, bf16, transformers' all-true bool mask; µs of CUDA-graph "
            "replays, and each over cuDNN without the mask", "",
            "| batch | KV | cuDNN, no mask | SDPA, mask | attend_all, default | attend_all, best "
            "| best: keys a step, warps, stages, least keys a split, programs per SM |"
            + (" repeat_kv + SDPA (the default compile's) |" if repeat else ""),
            "|---|---|---|---|---|---|---|" + ("---|" if repeat else "")]
    for r in record["shapes"]:
        base, best = r["cudnn_unmasked_us"], r["best"]
        split = best.get("min_steps", 0) * best.get("keys", 0)

        def cell(us):
            return f"{us:.1f} ({us / base:.3f})" if isinstance(us, float) else str(us)
        rows.append(f"| {r['batch']} | {r['kv'] // 1024}K | {base:.1f} | "
                    f"{cell(r['sdpa_masked_us'])} | {cell(r['default_us'])} | "
                    f"{cell(best['us'])} | {best.get('keys')}, {best.get('num_warps')}, "
                    f"{best.get('stages')}, {split}, {best.get('programs_per_sm')} |"
                    + (f" {cell(r.get('sdpa_repeat_kv_us'))} |" if repeat else ""))
    return rows


def prefill_pass_table(record: dict, _arg=None) -> list[str]:
    """sweep_prefill_kernels' attention part: the pass on W2's plan in each variant timed in the
    run (the fastest in bold), the probe and re-certification pairs, and FlexAttention on the
    same blocks."""
    env = record["env"]
    rows = [f"{env['card']}, torch {env['torch']}, Triton {env.get('triton')}, commit "
            f"{env.get('commit')}; W2 clustered, fp16, H 16, D 128, eps 1e-3; ms of the pass "
            "alone (VISIT_CERTIFY) on the op's plan. Variants: kK_wW_sS, K keys a step, W warps, "
            "S stages"
            + ("; `default_masked`, the run's default without its unmasked variant"
               if any("default_masked" in r["attention_ms"] for r in record.get("attention") or [])
               else ""), "",
            "| N | key block | kept | pass variants, ms | probe, recert: ms (kept) "
            "| Flex, same blocks | Flex / fastest | on 128-key blocks: kept, 64- / 128-key steps |",
            "|---|---|---|---|---|---|---|---|"]

    def ms(x):
        return f"{x:.2f}" if isinstance(x, float) else "—"
    for r in record.get("attention") or []:
        times = {n: t for n, t in r["attention_ms"].items() if isinstance(t, float)}
        fastest = min(times, key=times.get)
        variants = ", ".join((f"**{n} {ms(t)}**" if n == fastest else f"{n} {ms(t)}")
                             for n, t in sorted(times.items(), key=lambda kv: kv[1]))
        recert = ", ".join(f"{n.replace('probe', 'p').replace('_recert', '/')} {ms(v['ms'])} "
                           f"({v['kept']:.4f})" for n, v in (r.get("probe_recert") or {}).items()
                           if isinstance(v.get("ms"), float)) or "—"
        flex = r.get("flex_same_blocks_ms")
        b128 = r.get("blocks_128")
        rows.append(
            f"| {r['N'] // 1024}K | {r.get('block_n', '—')} | "
            + (f"{r['kept']:.4f}" if r.get("kept") is not None else "—")
            + f" | {variants} | {recert} | {ms(flex)} | "
            + (f"{flex / times[fastest]:.3f}" if isinstance(flex, float) else "—") + " | "
            + (f"{b128['kept']:.4f}, {ms(b128.get('k64_ms'))} / {ms(b128.get('k128_ms'))}"
               if b128 else "—") + " |")
    return rows


def row_tails_sweep_table(record: dict, _arg=None) -> list[str]:
    """sweep_prefill_kernels' row_tails part: the pass at each row-tail setting, fastest first,
    against the tile's tail alone (``tile``)."""
    env = record["env"]
    rows = [f"{env['card']}, torch {env['torch']}, Triton {env.get('triton')}, commit "
            f"{env.get('commit')}; W2 clustered, fp16, H 16, D 128, eps 1e-3; the pass alone on "
            "the op's plan. Variants: aA_lL_sS[_mM]: rows anchored A positions past the tile's count, "
            "where its tail is 2^-L of the threshold; S positions bounded a step; only tiles whose "
            "probe certified at least M blocks search; "
            "`tile`, the tile's tail alone; `probe_only`, no re-certification", "",
            "| N | key block | variant | ms | over tile | kept | kept over tile |",
            "|---|---|---|---|---|---|---|"]
    for r in record.get("row_tails") or []:
        runs = {n: v for n, v in r["row_tails"].items() if isinstance(v.get("ms"), float)}
        tile = runs.get("tile")
        for n, v in sorted(runs.items(), key=lambda kv: kv[1]["ms"]):
            rows.append(f"| {r['N'] // 1024}K | {r['block_n']} | {n} | {v['ms']:.2f} | "
                        + (f"{v['ms'] / tile['ms']:.3f}" if tile else "—")
                        + f" | {v['kept']:.4f} | "
                        + (f"{v['kept'] / tile['kept']:.3f}" if tile else "—") + " |")
    return rows


def decode_dense_probe_table(record: dict, _arg=None) -> list[str]:
    """profile_decode_dense: the decode op's dense route against cuDNN (with and without the
    log-sum-exp) and SDPA's cuDNN backend, on uniform and clustered keys, in run order."""
    env, cfg = record["env"], record["config"]
    rows = [f"{env['card']}, torch {env['torch']}, Triton {env.get('triton')}, commit "
            f"{env.get('commit')}; batch {cfg['batch']}, {cfg['keys'] // 1024}K keys, GQA 32/8, "
            "D 128, bf16, no mask; µs of CUDA-graph replays, in the order run", "",
            "| keys | op | op again | dense_decode | cuDNN (lse) | cuDNN (no lse) | no lse: max diff "
            "| SDPA cuDNN | op's paths |", "|---|---|---|---|---|---|---|---|---|"]

    def us(x):
        return f"{x:.1f}" if isinstance(x, float) else str(x)
    for r in record["rows"]:
        paths = ", ".join(f"{k} {v}" for k, v in (r.get("op_paths") or {}).items())
        rows.append(f"| {r['kind']} | {us(r['op_us'])} | {us(r['op_again_us'])} | "
                    f"{us(r['dense_decode_us'])} | {us(r['cudnn_unmasked_us'])} | "
                    f"{us(r['cudnn_no_lse_us'])} | {_fmt(r.get('cudnn_no_lse_max_diff'), 3)} | "
                    f"{us(r['sdpa_cudnn_us'])} | {paths} |")
    return rows


def _tokens(n: int) -> str:
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def generate_table(record: dict, _arg=None) -> list[str]:
    """bench_generate: each aether row's generate against the default compile (tokens/s of the
    timed calls' median, against the faster of the two default-compile runs bracketing the
    aether rows), and one more call of each split into the prompt's prefill and the mean step."""
    env, cfg = record["env"], record["config"]
    brackets = "; ".join(
        f"default compile at {_tokens(int(S))} {b['before_tokens_per_s']:.0f} and "
        + (f"{b['after_tokens_per_s']:.0f}" if b.get("after_tokens_per_s") else "—")
        + " tok/s (before and after the aether rows)"
        for S, b in (record.get("dense_bracket") or {}).items())
    rows = [f"{env['card']}, torch {env['torch']}, Triton {env.get('triton')}, transformers "
            f"{env.get('transformers')}, commit {env.get('commit')}; batch {cfg['batch']}, "
            f"{cfg['new_tokens']} new tokens; {brackets}", "",
            "| prompt | mode | ε | tok/s | ratio | prefill s (default, ours) | step ms (default, "
            "ours) | decode calls certified / all | tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for r in record["rows"]:
        ours, dense = r["aether"], r["dense"]
        if "ratio" not in r:
            rows.append(f"| {_tokens(r['prompt'])} | {r['mode']} | {_eps_sites(r)} | "
                        f"{ours.get('error', '—')} | | | | | |")
            continue
        calls = ours.get("decode_calls") or {}
        # a call the lagged choice sent dense is counted twice ("dense" and the dense kernel
        # that ran); a call dense from the start (eps 0) only by its kernel
        n_calls = calls.get("certified", 0) + calls.get("dense", 0) or sum(calls.values())
        tokens = ("match" if r["tokens_match"] else
                  f"differ from token {r['first_mismatch']}"
                  + (" (near-tie)" if r.get("near_tie") else ""))

        def pair(key):
            a, b = dense.get(key), ours.get(key)
            return "—" if a is None or b is None else f"{a:.3g}, {b:.3g}"
        rows.append(f"| {_tokens(r['prompt'])} | {r['mode']} | {_eps_sites(r)} | "
                    f"{ours['tokens_per_s']:.0f} | {r['ratio']:.3f} | {pair('prefill_s')} | "
                    f"{pair('step_ms')} | {calls.get('certified', 0)} / {n_calls} | {tokens} |")
    return rows


def _eps_sites(row: dict) -> str:
    """A generate row's eps, and "every site certified" where bench_generate forced that (rows
    without the key ran under the default rules)."""
    forced = row.get("sites") == "certified"
    return f"{row['eps']:g}" + (", every site certified" if forced else "")


SPLIT_BACKENDS = {"inductor": "the default compile", "aether_prefill": "aether, decode off",
                  "aether": "aether, decode=True", "aether_exact": "aether, decode=True at ε 0",
                  "aether_certified": "aether, decode=True, every site certified"}


def _split_label(name: str) -> str:
    """profile_generate's backend as the table names it; "_cudagraphs": the same under CUDA
    graphs."""
    base = name.removesuffix("_cudagraphs")
    label = SPLIT_BACKENDS.get(base, base)
    return label + ", CUDA graphs" if base != name else label


def generate_split_table(record: dict, _arg=None) -> list[str]:
    """profile_generate: one generate per backend split into the prompt's prefill and the mean
    decode step, and what the decode op's calls did."""
    env, cfg = record["env"], record["config"]
    weights = "initial weights" if cfg["ckpt"] == "untrained" else "trained weights"
    rows = [f"{env['card']}, torch {env['torch']}, Triton {env.get('triton')}, transformers "
            f"{env.get('transformers')}, commit {env.get('commit')}; the long LM ({weights}), "
            f"batch {cfg['batch']}, {_tokens(cfg['length'])}-token prompt, {cfg['steps']} steps, "
            f"ε {cfg['eps']:g} unless stated", "",
            "| backend | prefill s | step ms | step over the default compile's | decode calls |",
            "|---|---|---|---|---|"]
    base = record["rows"].get("inductor", {}).get("step_ms")
    for name, r in record["rows"].items():
        calls = ", ".join(f"{k} {v}" for k, v in sorted((r.get("decode_calls") or {}).items()))
        ratio = f"{r['step_ms'] / base:.3f}" if base else "—"
        rows.append(f"| {_split_label(name)} | {r['prefill_s']:.3f} | "
                    f"{r['step_ms']:.2f} | {ratio} | {calls or '—'} |")
    return rows


KINDS = {"summary": summary_table, "issue6": issue6_table, "decode": decode_table,
         "decode_layers": decode_layers_table, "decode_sweep": decode_sweep_table,
         "prefill_selection": prefill_selection_table, "decode_dense": decode_dense_table,
         "prefill_pass": prefill_pass_table, "row_tails": row_tails_table,
         "row_tails_sweep": row_tails_sweep_table, "decode_dense_probe": decode_dense_probe_table,
         "generate": generate_table, "generate_split": generate_split_table}


def render(page: str) -> str:
    def table(m):
        kind, name, arg = m.group(2), m.group(3), m.group(4)
        if kind not in KINDS:
            raise SystemExit(f"unknown table kind {kind!r}; known: {sorted(KINDS)}")
        with open(os.path.join(RESULTS, name)) as f:
            record = json.load(f)
        body = "\n".join(KINDS[kind](record, arg))
        return f"{m.group(1)}{body}\n{m.group(6)}"

    return MARKED.sub(table, page)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail where a page is out of date")
    args = ap.parse_args(argv)
    stale = []
    for path in PAGES:
        with open(path) as f:
            page = f.read()
        fresh = render(page)
        if fresh != page:
            stale.append(path)
            if not args.check:
                with open(path, "w") as f:
                    f.write(fresh)
        print(f"{len(MARKED.findall(page))} tables -> {path}")
    if args.check and stale:
        print(f"{', '.join(stale)}: tables differ from their result files; run "
              "python benchmarks/results_page.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
