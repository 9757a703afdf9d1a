"""Which certified upper bound on attention scores should decode use? Kept fractions of key blocks
on the stdlib byte LM's own queries and keys (every layer, validation text), per bound, and a
bytes-read cost model that turns them into a decode speedup ceiling.

    python benchmarks/research/decode_bounds.py --ckpt .ckpt/long_lm.pt \
        --out benchmarks/results/decode_bounds_cpu.json

The rule certified, per query row q (scores s_j = scale q.k_j over its causal prefix): key blocks
are skipped only while the sum of their bounded masses (upper bounds on sum_{j in b} exp(s_j)) is
at most eps * Z_low, Z_low a lower bound on Z = sum_j exp(s_j), so the dropped softmax mass is at
most eps. Selection, for every bound alike: blocks in descending bounded mass are kept until the
bounded mass of the rest is <= eps * Z_low(kept), where Z_low(kept) = the exact mass of the kept
blocks (read anyway), and for per-key bounds also at least sum_j exp(L_j) over all live keys.
Per-key bounds also report ``zl_only``: Z_low = sum_j exp(L_j) alone, what a one-pass kernel that
selects before it reads can use (kernels/decode.py).

Bounds (scores in nats, scale = D^-0.5; K float32 from the fp32 model, bounds in float64):
  oracle_bN   fewest blocks of N keys holding >= 1 - eps of the exact mass: the floor, no
              certificate.
  ideal_bN    exact block max m_b, bounded mass n_b exp(m_b): the floor of any per-block max bound
              (not realisable: knowing m_b means reading the block).
  ball, box, ballbox   per block of 16: centroid mu and radius r (q.mu + |q| r); per-channel
              min/max (q.mid + |q|.half_range); the smaller of the two.
  int{8,4}_g{G}  keys quantised per group of G positions and per channel, affine over the group's
              [min, max] with 2^bits levels (|k - k_hat| <= step / 2 per channel), so
              s_j in scale (q.k_hat_j +- 0.5 sum_c |q_c| step_c).
  int{8,4}_tok   the same with one (min, step) per key over its channels (per-token scales).
  lr{r}       per KV head, the prompt's (first half of the window's keys) mean mu and top-r
              principal directions P: q.k = q.mu + (Pq).(P(k-mu)) + q_perp.(k-mu)_perp, the last
              term within +- |q_perp| |(k-mu)_perp|.
Every bound is checked sound on every live key / block (U >= s - 1e-4, L <= s + 1e-4) and every
row's dropped mass measured (<= eps); a failure raises.

Rows: the last ``--rows`` query positions of each window (decode steps, each causal over its own
prefix), all query heads. kept_row: kept / causally live blocks, mean over rows and heads;
kept_union: the same for the union over a GQA group's query heads (what the KV read is).
Cost model (bytes read per live key over reading K and V once in bf16, 4 D bytes):
meta_bytes_per_key / (4 D) + kept_union, meta: int8 codes D, int4 D / 2, group params 2 D * 2 per
group, per-token params 4 per key, low rank 2 r + 2, ball (D + 1) * 2 per block, box 2 D * 2 per
block; oracle and ideal 0 (not realisable). speedup_bound = 1 / cost.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)
import learned_qkv  # noqa: E402  (benchmarks/ on sys.path; it imports train_stdlib_lm)
from e2e_llama import env_record, write_json  # noqa: E402

SOUND_TOL = 1e-4  # nats: float64 bounds against float64 scores


# -- scores and block statistics ------------------------------------------------------------------
def grouped_dot(q_rows: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """q_rows [H, R, D] . keys [Hkv, L, D] -> [H, R, L], query head h on KV head h // group."""
    H, R, D = q_rows.shape
    hkv = keys.shape[0]
    out = q_rows.view(hkv, (H // hkv) * R, D) @ keys.transpose(-1, -2)
    return out.view(H, R, -1)


def grouped_per_group(q_abs: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """|q| [H, R, D] . per-group params [Hkv, NG, D] -> [H, R, NG]."""
    return grouped_dot(q_abs, params)


class RowSet:
    """The exact side of one (window, layer): scores of the decode rows, causal liveness, exact
    block masses, all in float64 relative to each row's max score m (exp(s - m) <= 1)."""

    def __init__(self, q_rows: torch.Tensor, keys: torch.Tensor, first_row: int, scale: float):
        self.q = q_rows.double()  # [H, R, D]
        self.k = keys.double()  # [Hkv, L, D]
        self.scale = scale
        H, R, _ = self.q.shape
        self.L = self.k.shape[1]
        pos = first_row + torch.arange(R)
        self.live = torch.arange(self.L)[None, :] <= pos[:, None]  # [R, L]
        self.s = (scale * grouped_dot(self.q, self.k)).masked_fill(~self.live, -math.inf)
        self.m = self.s.amax(-1, keepdim=True)  # [H, R, 1]
        self.p = torch.exp(self.s - self.m)  # [H, R, L], 0 where dead
        self.Z = self.p.sum(-1)  # [H, R]
        self.pos = pos

    def live_counts(self, block: int) -> torch.Tensor:
        """[R, NB] live keys per block."""
        return self.live.view(self.live.shape[0], -1, block).sum(-1)

    def block_mass(self, block: int) -> torch.Tensor:
        return self.p.view(*self.p.shape[:2], -1, block).sum(-1)  # [H, R, NB]

    def check_key_bounds(self, name: str, upper: torch.Tensor, lower: torch.Tensor) -> dict:
        live = self.live.expand_as(self.s)
        slack_up = (upper - self.s)[live]
        slack_lo = (self.s - lower)[live]
        if slack_up.min() < -SOUND_TOL or slack_lo.min() < -SOUND_TOL:
            raise AssertionError(f"{name}: unsound per-key bound (min U - s {slack_up.min():.3e}, "
                                 f"min s - L {slack_lo.min():.3e})")
        return {"mean_upper_slack": float(slack_up.mean()), "mean_lower_slack":
                float(slack_lo.mean())}

    def masses_from_keys(self, upper: torch.Tensor, lower: torch.Tensor, block: int):
        """(bounded mass per block [H, R, NB], sum_j exp(L_j) over live keys [H, R])."""
        eu = torch.exp(upper - self.m).masked_fill(~self.live, 0.0)
        el = torch.exp(lower - self.m).masked_fill(~self.live, 0.0)
        return eu.view(*eu.shape[:2], -1, block).sum(-1), el.sum(-1)

    def masses_from_block_max(self, name: str, upper_max: torch.Tensor, block: int):
        """upper_max [H, R, NB] bounds every live score of its block: bounded mass n_b exp(u)."""
        exact_max = self.s.view(*self.s.shape[:2], -1, block).amax(-1)
        live_b = self.live_counts(block) > 0
        slack = (upper_max - exact_max)[live_b.expand_as(exact_max)]
        if slack.min() < -SOUND_TOL:
            raise AssertionError(f"{name}: unsound block bound (min u - max {slack.min():.3e})")
        n = self.live_counts(block).double()
        bound = n * torch.exp(upper_max - self.m)
        return bound.masked_fill(~live_b, 0.0), float(slack.mean())


# -- the selection rule ---------------------------------------------------------------------------
def keep_best_first(bound, exact, eps: float, z_floor=None):
    """Keep blocks in descending ``bound`` until the bounded mass of the rest is <= eps *
    max(exact mass kept so far, z_floor). bound, exact [..., NB] (0 on dead blocks), z_floor
    [...] or None. Returns the kept mask [..., NB]."""
    bound_sorted, order = bound.sort(-1, descending=True)
    exact_sorted = exact.gather(-1, order)
    zero = torch.zeros_like(bound_sorted[..., :1])
    # rest[k]: bounded mass left after keeping the first k; kept[k]: exact mass of those k
    rest = torch.cat([bound_sorted.flip(-1).cumsum(-1).flip(-1), zero], -1)
    kept = torch.cat([zero, exact_sorted.cumsum(-1)], -1)
    z_low = kept if z_floor is None else torch.maximum(kept, z_floor[..., None])
    ok = rest <= eps * z_low  # true at k = NB at the latest (rest 0)
    n_keep = ok.to(torch.int8).argmax(-1)  # first k that certifies
    keep_sorted = torch.arange(bound.shape[-1]) < n_keep[..., None]
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted) & (bound > 0)


def summarize_keep(keep, rows: RowSet, block: int, eps: float, hkv: int, label: str) -> dict:
    exact = rows.block_mass(block)
    dropped = (exact * ~keep).sum(-1) / rows.Z  # [H, R]
    worst = float(dropped.max())
    if worst > eps * (1 + 1e-9):
        raise AssertionError(f"{label}: a row dropped {worst:.3e} > eps {eps:g}")
    live_b = (rows.live_counts(block) > 0).double().sum(-1)  # [R]
    H, R, NB = keep.shape
    union = keep.view(hkv, H // hkv, R, NB).any(1)
    per_head = keep.double().sum(-1) / live_b  # [H, R]
    return {"kept_row": float(per_head.mean()),
            "kept_union": float((union.double().sum(-1) / live_b).mean()),
            "kept_row_by_head": per_head.mean(-1).tolist(),
            "dropped_over_eps": worst / eps}


# -- the bounds -----------------------------------------------------------------------------------
def quantized_bounds(rows: RowSet, bits: int, group: int | None):
    """Per-key (U, L) from K quantised with 2^bits affine levels: per channel over ``group``
    positions, or per key over its channels when group is None."""
    k, q, levels = rows.k, rows.q, 2 ** bits - 1
    if group is None:
        lo = k.amin(-1, keepdim=True)
        step = (k.amax(-1, keepdim=True) - lo) / levels  # [Hkv, L, 1]
    else:
        kg = k.view(k.shape[0], -1, group, k.shape[-1])
        lo = kg.amin(2, keepdim=True)
        step = (kg.amax(2, keepdim=True) - lo) / levels  # [Hkv, NG, 1, D]
        kg_lo, kg_step = lo, step
        k = kg
    codes = torch.round((k - lo) / torch.where(step > 0, step, 1.0)).clamp_(0, levels)
    k_hat = (lo + step * codes).reshape(rows.k.shape)
    centre = grouped_dot(q, k_hat)
    if group is None:
        per_head = step.squeeze(-1).repeat_interleave(q.shape[0] // k.shape[0], 0)  # [H, L]
        err = 0.5 * q.abs().sum(-1, keepdim=True) * per_head[:, None, :]  # [H, R, L]
    else:
        err = 0.5 * grouped_per_group(q.abs(), kg_step.squeeze(2))  # [H, R, NG]
        err = err.repeat_interleave(group, -1)
    return rows.scale * (centre + err), rows.scale * (centre - err)


def lowrank_bounds(rows: RowSet, rank: int):
    """Per-key (U, L) from the prompt's mean and top-``rank`` principal directions per KV head."""
    k, q = rows.k, rows.q
    prompt = k[:, :rows.L // 2]
    mu = prompt.mean(1, keepdim=True)  # [Hkv, 1, D]
    _, _, vh = torch.linalg.svd(prompt - mu, full_matrices=False)
    P = vh[:, :rank]  # [Hkv, r, D], orthonormal rows
    kc = k - mu
    k_code = kc @ P.transpose(-1, -2)  # [Hkv, L, r]
    k_res = (kc - k_code @ P).norm(dim=-1)  # [Hkv, L]
    H, R, D = q.shape
    hkv = k.shape[0]
    qg = q.view(hkv, -1, D)
    q_code = qg @ P.transpose(-1, -2)  # [Hkv, G R, r]
    q_res = (qg - q_code @ P).norm(dim=-1)  # [Hkv, G R]
    centre = (qg @ mu.transpose(-1, -2)) + q_code @ k_code.transpose(-1, -2)
    err = q_res[..., None] * k_res[:, None, :]
    centre, err = centre.view(H, R, -1), err.view(H, R, -1)
    return rows.scale * (centre + err), rows.scale * (centre - err)


def block_geometry_bounds(rows: RowSet, block: int) -> dict:
    """Per-block upper bounds on the max score [H, R, NB]: ball, box and their minimum."""
    k, q = rows.k, rows.q
    kb = k.view(k.shape[0], -1, block, k.shape[-1])  # [Hkv, NB, n, D]
    mu = kb.mean(2)
    radius = (kb - mu[:, :, None]).norm(dim=-1).amax(-1)  # [Hkv, NB]
    q_norm = q.norm(dim=-1, keepdim=True)  # [H, R, 1]
    H, R, _ = q.shape
    hkv = k.shape[0]
    ball = grouped_dot(q, mu) + q_norm * radius.repeat_interleave(H // hkv, 0)[:, None, :]
    lo, hi = kb.amin(2), kb.amax(2)
    box = grouped_dot(q, (lo + hi) / 2) + grouped_dot(q.abs(), (hi - lo) / 2)
    ball, box = rows.scale * ball, rows.scale * box
    return {"ball": ball, "box": box, "ballbox": torch.minimum(ball, box)}


def meta_bytes_per_key(name: str, D: int, block: int) -> float:
    """Summary bytes read per live key (bf16 parameters), the cost model's numerator."""
    if name.startswith(("oracle", "ideal")):
        return 0.0
    if name in ("ball", "box", "ballbox"):
        ball, box = (D + 1) * 2 / block, 2 * D * 2 / block
        return {"ball": ball, "box": box, "ballbox": ball + box}[name]
    if name.startswith("int"):
        bits, scheme = name[3:].split("_")
        codes = D * int(bits) / 8
        if scheme == "tok":
            return codes + 4
        return codes + 2 * D * 2 / int(scheme[1:])
    if name.startswith("lr"):
        return 2 * int(name[2:]) + 2
    raise ValueError(f"no cost model for bound {name!r}")


# -- one (window, layer) --------------------------------------------------------------------------
def analyse(q_rows, keys, first_row, args, hkv) -> list[dict]:
    """Every bound x eps on the decode rows of one layer of one window: list of records."""
    D = keys.shape[-1]
    rows = RowSet(q_rows, keys, first_row, D ** -0.5)
    out = []

    def record(name, block, keep_fn, extra):
        for eps in args.eps:
            rec = {"bound": name, "block": block, "eps": eps,
                   "meta_bytes_per_key": meta_bytes_per_key(name, D, block), **extra}
            rec.update(summarize_keep(keep_fn(eps, False), rows, block, eps, hkv, name))
            if "zl_only" in extra:
                alt = summarize_keep(keep_fn(eps, True), rows, block, eps, hkv, name + "/zl")
                rec["zl_only"] = {k: alt[k] for k in ("kept_row", "kept_union")}
            rec["cost"] = rec["meta_bytes_per_key"] / (4 * D) + rec["kept_union"]
            rec["speedup_bound"] = 1 / rec["cost"]
            out.append(rec)

    for block in args.blocks:
        exact = rows.block_mass(block)
        record(f"oracle_b{block}", block,
               lambda eps, _, e=exact: keep_best_first(e, e, eps, rows.Z), {})
        exact_max = rows.s.view(*rows.s.shape[:2], -1, block).amax(-1)
        bound, _ = rows.masses_from_block_max(f"ideal_b{block}", exact_max, block)
        record(f"ideal_b{block}", block,
               lambda eps, _, b=bound, e=exact: keep_best_first(b, e, eps), {})
    block = args.block
    exact = rows.block_mass(block)
    for name, upper_max in block_geometry_bounds(rows, block).items():
        bound, slack = rows.masses_from_block_max(name, upper_max, block)
        record(name, block, lambda eps, _, b=bound: keep_best_first(b, exact, eps),
               {"mean_block_slack": slack})
    per_key = [(f"int{b}_g{g}", lambda b=b, g=g: quantized_bounds(rows, b, g))
               for b in args.bits for g in args.groups]
    per_key += [(f"int{b}_tok", lambda b=b: quantized_bounds(rows, b, None)) for b in args.bits]
    per_key += [(f"lr{r}", lambda r=r: lowrank_bounds(rows, r)) for r in args.ranks]
    for name, make in per_key:
        upper, lower = make()
        slack = rows.check_key_bounds(name, upper, lower)
        bound, z_keys = rows.masses_from_keys(upper, lower, block)
        del upper, lower

        def keep_fn(eps, zl_only, b=bound, z=z_keys):
            if zl_only:  # Z_low = sum exp(L_j) alone: the rule is then smallest-first
                return keep_best_first(b, torch.zeros_like(b), eps, z)
            return keep_best_first(b, exact, eps, z)
        record(name, block, keep_fn, {**slack, "zl_only": None})
    return out


# -- driver ---------------------------------------------------------------------------------------
def aggregate(records: list[dict], keys=("L", "bound", "eps")) -> list[dict]:
    groups = {}
    for r in records:
        groups.setdefault(tuple(r[k] for k in keys), []).append(r)
    out = []
    for key, rs in groups.items():
        row = dict(zip(keys, key))
        row["meta_bytes_per_key"] = rs[0]["meta_bytes_per_key"]
        for f in ("kept_row", "kept_union", "cost"):
            row[f] = sum(r[f] for r in rs) / len(rs)
        row["speedup_bound"] = 1 / row["cost"]
        row["dropped_over_eps_max"] = max(r["dropped_over_eps"] for r in rs)
        if rs[0].get("zl_only"):
            for f in ("kept_row", "kept_union"):
                row[f"zl_only_{f}"] = sum(r["zl_only"][f] for r in rs) / len(rs)
        row["n"] = len(rs)
        out.append(row)
    return out


def print_tables(summary: list[dict], lengths, eps_list, D: int) -> None:
    for eps in eps_list:
        print(f"\neps {eps:g}: kept row / GQA union (mean over layers, windows), speedup bound "
              f"1 / (meta / {4 * D} B + union)")
        head = f"{'bound':12s} {'meta B':>6s}" + "".join(f" | {f'{L // 1024}K':^20s}"
                                                         for L in lengths)
        print(head)
        names = list(dict.fromkeys(r["bound"] for r in summary))
        for name in names:
            line = ""
            for L in lengths:
                r = next((r for r in summary if (r["bound"], r["L"], r["eps"]) == (name, L, eps)),
                         None)
                meta = r["meta_bytes_per_key"] if r else float("nan")
                line += (f" | {r['kept_row']:.3f} {r['kept_union']:.3f} {r['speedup_bound']:5.2f}x"
                         if r else f" | {'-':^20s}")
            print(f"{name:12s} {meta:6.1f}{line}")


def print_per_layer(per_layer: list[dict], L: int, eps: float, bounds) -> None:
    print(f"\nper layer at {L // 1024}K, eps {eps:g}: kept row / union (speedup bound)")
    layers = sorted({r["layer"] for r in per_layer})
    print(f"{'bound':12s}" + "".join(f" | {f'layer {i}':^20s}" for i in layers))
    for name in bounds:
        line = ""
        for i in layers:
            r = next((r for r in per_layer if (r["bound"], r["L"], r["eps"], r["layer"])
                      == (name, L, eps, i)), None)
            line += (f" | {r['kept_row']:.3f} {r['kept_union']:.3f} {r['speedup_bound']:5.2f}x"
                     if r else f" | {'-':^20s}")
        print(f"{name:12s}{line}")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ckpt", default=os.path.join(os.path.dirname(BENCH), ".ckpt", "long_lm.pt"))
    ap.add_argument("--out", default=os.path.join(BENCH, "results", "decode_bounds_cpu.json"))
    ap.add_argument("--lengths", type=int, nargs="+", default=[8192, 16384, 32768])
    ap.add_argument("--windows", type=int, default=2, help="validation windows per length")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", type=int, default=64, help="decode rows: the last positions")
    ap.add_argument("--layers", type=int, nargs="+", default=None, help="default: all")
    ap.add_argument("--eps", type=float, nargs="+", default=[1e-3, 1e-2, 1e-1])
    ap.add_argument("--block", type=int, default=16, help="block of the realisable bounds")
    ap.add_argument("--blocks", type=int, nargs="+", default=[16, 32, 64],
                    help="blocks of the oracle and the ideal bound")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--groups", type=int, nargs="+", default=[16, 64, 128])
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--threads", type=int, default=None)
    return ap.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    model, extras = learned_qkv.load_model(args.ckpt)
    cfg = model.cfg
    hkv = cfg.n_kv_head or cfg.n_head
    D = cfg.d_model // cfg.n_head
    for L in args.lengths:
        if L % max(args.blocks + [args.block] + args.groups) or L < 2 * args.rows:
            raise ValueError(f"length {L} must be a multiple of every block and group size")
    record = {"env": env_record(), "args": vars(args), "model_config": vars(cfg),
              "checkpoint": {k: extras.get(k) for k in ("train", "corpus", "env")},
              "corpus_here": learned_qkv.corpus_info(), "windows": {}, "records": []}
    print(f"decode_bounds: {args.ckpt} ({cfg.n_layer} layers, {cfg.n_head}/{hkv} heads of {D}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads", flush=True)
    for L in args.lengths:
        seed = args.seed + L  # windows of each length drawn apart
        starts = learned_qkv.window_starts(L, args.windows, seed)
        record["windows"][str(L)] = starts
        ids = learned_qkv.validation_windows(L, args.windows, seed)
        for w in range(args.windows):
            t0 = time.perf_counter()
            qkv = learned_qkv.capture_qkv(model, ids[w:w + 1], args.layers, q_last=args.rows)
            t_fwd = time.perf_counter() - t0
            for layer, (q, k, _) in qkv.items():
                recs = analyse(q[0], k[0], L - args.rows, args, hkv)
                for r in recs:
                    r.update(L=L, window=w, start=starts[w], layer=layer)
                record["records"] += recs
            del qkv
            print(f"  {L // 1024}K window {w} (start {starts[w]}): forward {t_fwd:.0f} s, "
                  f"bounds {time.perf_counter() - t0 - t_fwd:.0f} s", flush=True)
            record["wall_s"] = time.perf_counter() - t_start
            write_json(args.out, record)
    record["summary"] = aggregate(record["records"])
    record["per_layer"] = aggregate(record["records"], ("L", "bound", "eps", "layer"))
    record["wall_s"] = time.perf_counter() - t_start
    write_json(args.out, record)
    print_tables(record["summary"], args.lengths, args.eps, D)
    # the two realisable bounds with the best speedup ceiling at the longest length, eps 1e-2
    L_max = max(args.lengths)
    eps_mid = min(args.eps, key=lambda e: abs(math.log(e / 1e-2)))
    ranked = sorted((r for r in record["summary"] if r["L"] == L_max and r["eps"] == eps_mid
                     and not r["bound"].startswith(("oracle", "ideal"))),
                    key=lambda r: -r["speedup_bound"])
    best = [r["bound"] for r in ranked[:2]]
    print_per_layer(record["per_layer"], L_max, eps_mid,
                    [f"oracle_b{args.block}", f"ideal_b{args.block}"] + best)
    print(f"\n-> {args.out} ({record['wall_s']:.0f} s)")
    return record


if __name__ == "__main__":
    main()
