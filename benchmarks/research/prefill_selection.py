"""Where does prefill's kept fraction on W2 come from: the bound, the tile, or the certificate?
Kept fractions of key blocks per query tile on issue 6's clustered workload (W2), for the op's
selection and for tighter ones, against the oracle.

    python benchmarks/research/prefill_selection.py \
        --out benchmarks/results/prefill_selection_cpu.json

W2 exactly as the GPU suite draws it (``clustered_qkv(1, 16, N, 128, seed=0)``, fp16), scored in
float32 on a sample of query tiles (``--tiles`` evenly spaced 128-row tiles per head, ``--heads``
heads), against every key (no mask, not causal), 64-key blocks, eps as the suite's (1e-3 for fp16).
Each selection visits blocks best-first by its bound and stops at the first prefix p whose
remaining bounded mass is at most EPS_MARGIN * eps times the exactly computed normaliser of the
first p blocks, for every row of the tile (the certificate of ``kernels/certificate.py`` with the
in-kernel stop rule, as ``reference._simulate_stop``). Kept = p over the tile's blocks.

  oracle_row    max over the tile's rows of the fewest blocks (by that row's own mass) holding
                >= 1 - eps of the row: a floor for any tile-level selection, no certificate.
  oracle_tile   blocks in descending max-over-rows share of mass until every row keeps >= 1 - eps:
                what knowing the scores would keep, no certificate.
  ideal_tile    the exact tile-block max as the bound (not realisable: it needs the scores), the
                certificate with one bound per (tile, block), as the kernels plan.
  ideal_rows    the same order, but each row's tail summed from its own exact block maxima.
  ball          the op's bound (q.mu + |q| r + slack per row, max over the tile): its selection.
  ball_rows     the op's order, each row's tail from its own ball bounds (the bounds kernel has
                them before it takes the tile max).
  ball_sub32    the ball on 32-key halves of each block; a block's bounded mass is the sum of its
                halves' (32 exp(u)), tile-level.
  ball_m64      plan tiles of 64 rows: each half of a 128-row tile selected on its own; kept is
                the union of the halves' blocks (what a 128-row compute tile reads).
  ballbox       the smaller of the ball and the box bound (AETHER_BOX_BOUND=1).
  tile_summary  bounds from each tile's queries summarised (their centre and radius, and their
                per-channel range), not from every row: 1/128 of the bounds kernel's work.
  refine64/256  tile_summary, with the op's per-row ball on each tile's 64 (256) best blocks by
                it (at 128K, 1/32 (1/8) of the bounds kernel's product).

``certified_over_oracle`` = ball / oracle_tile. Float32 scores on CPU; the GPU's fp16 bounds and
fp32 accumulations move a tile's count by a block or two at most.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from provenance import env_record, write_json  # noqa: E402

from aether_compile.kernels.certificate import BOUND_REL_SLACK, EPS_MARGIN  # noqa: E402
from aether_compile.kernels.reference import block_geometry  # noqa: E402
from aether_compile.workloads import clustered_qkv  # noqa: E402

BLOCK_M, BLOCK_N, D, H = 128, 64, 128, 16
REFINE_BUDGETS = (64, 256)  # blocks per tile given the per-row ball after the tile summary


def certified_count(order, log_bound_mass, block_lse, eps):
    """Blocks visited per tile under the stop rule. order [T, nkb] (best first); log_bound_mass
    [T, R, nkb] per row (or [T, 1, nkb] per tile): log of the bounded mass of each block;
    block_lse [T, R, nkb]: each row's exact log mass per block."""
    T, R, nkb = block_lse.shape
    idx = order.unsqueeze(1).expand(T, R, nkb)
    lbm = torch.gather(log_bound_mass.expand(T, R, nkb), -1, idx)
    lse = torch.gather(block_lse, -1, idx)
    tail = torch.logcumsumexp(lbm.flip(-1), -1).flip(-1)  # tail[p]: positions p.. unvisited
    z = torch.logcumsumexp(lse, -1)  # z[p]: positions 0..p visited
    thr = math.log(EPS_MARGIN * eps)
    ok = tail[..., 1:] <= thr + z[..., :-1]  # stop before position p (1..nkb-1)
    ok = ok.all(1)  # every row
    pos = torch.arange(1, nkb)
    first = torch.where(ok, pos, torch.full_like(pos, nkb)).amin(-1)
    return first, order


def best_first(bound_tile):
    """Descending bound, ties by block index (the kernels' order)."""
    return torch.sort(bound_tile, dim=-1, descending=True, stable=True).indices


def oracle_row(block_lse, row_lse, eps):
    share = (block_lse - row_lse.unsqueeze(-1)).exp()
    srt = share.sort(-1, descending=True).values
    dropped = 1.0 - srt.cumsum(-1)  # after keeping 1..nkb blocks
    need = (dropped > eps).sum(-1) + 1  # fewest blocks whose mass reaches 1 - eps, per row
    return need.clamp(max=block_lse.shape[-1]).amax(-1)


def oracle_tile(block_lse, row_lse, eps):
    share = (block_lse - row_lse.unsqueeze(-1)).exp()  # [T, R, nkb]
    order = best_first(share.amax(1))
    kept_share = torch.gather(share, -1, order.unsqueeze(1).expand_as(share)).cumsum(-1)
    ok = (1.0 - kept_share <= eps).all(1)  # after 1..nkb blocks
    pos = torch.arange(1, share.shape[-1] + 1)
    return torch.where(ok, pos, torch.full_like(pos, share.shape[-1])).amin(-1)


def ball_rows(q, geo_mu, geo_r):
    qn = q.norm(dim=-1, keepdim=True)
    mu_n = geo_mu.norm(dim=-1)
    return q @ geo_mu.T + qn * geo_r + BOUND_REL_SLACK * qn * (mu_n + geo_r)


def box_rows(q, center, half):
    qn = q.norm(dim=-1, keepdim=True)
    return q @ center.T + q.abs() @ half.T + BOUND_REL_SLACK * qn * (center.norm(dim=-1)
                                                                     + half.norm(dim=-1))


def study_head(q, k, tiles, eps):
    """Kept counts per selection for the sampled tiles of one head. q, k: [N, D] float32."""
    N = k.shape[0]
    nkb = N // BLOCK_N
    scale = D ** -0.5
    rows = torch.cat([torch.arange(t * BLOCK_M, (t + 1) * BLOCK_M) for t in tiles])
    qs = q[rows] * scale  # [T*R, D]
    T = len(tiles)
    s = qs @ k.T  # [T*R, N]
    blocks = s.view(T, BLOCK_M, nkb, BLOCK_N)
    block_lse = torch.logsumexp(blocks, -1)  # [T, R, nkb]
    block_max = blocks.amax(-1)
    del s, blocks
    row_lse = torch.logsumexp(block_lse, -1)
    log_n = math.log(BLOCK_N)
    out = {"oracle_row": oracle_row(block_lse, row_lse, eps),
           "oracle_tile": oracle_tile(block_lse, row_lse, eps)}

    ideal_tile = block_max.amax(1)  # [T, nkb]
    order = best_first(ideal_tile)
    out["ideal_tile"] = certified_count(order, (ideal_tile + log_n).unsqueeze(1), block_lse, eps)[0]
    out["ideal_rows"] = certified_count(order, block_max + log_n, block_lse, eps)[0]

    geo = block_geometry(k.view(1, 1, N, D), BLOCK_N)
    mu, r = geo.mu[0, 0], geo.radius[0, 0]
    ball = ball_rows(qs, mu, r).view(T, BLOCK_M, nkb)
    ball_tile = ball.amax(1)
    order = best_first(ball_tile)
    out["ball"] = certified_count(order, (ball_tile + log_n).unsqueeze(1), block_lse, eps)[0]
    out["ball_rows"] = certified_count(order, ball + log_n, block_lse, eps)[0]

    box = box_rows(qs, geo.center[0, 0], geo.half[0, 0]).view(T, BLOCK_M, nkb)
    both = torch.minimum(ball, box).amax(1)
    order = best_first(both)
    out["ballbox"] = certified_count(order, (both + log_n).unsqueeze(1), block_lse, eps)[0]

    half = block_geometry(k.view(1, 1, N, D), BLOCK_N // 2)
    sub = ball_rows(qs, half.mu[0, 0], half.radius[0, 0]).view(T, BLOCK_M, nkb, 2).amax(1)
    sub_mass = torch.logsumexp(sub + math.log(BLOCK_N // 2), -1)  # [T, nkb]
    order = best_first(sub_mass)
    out["ball_sub32"] = certified_count(order, sub_mass.unsqueeze(1), block_lse, eps)[0]

    # Bounds from each tile's query summary instead of every row (1/128 of the bounds kernel's
    # product): q_i = c + d_i with |d_i| <= rho, so q_i.mu <= c.mu + rho |mu|; or per channel,
    # q_i.mu <= sum_d max(lo_d mu_d, hi_d mu_d); either plus max_i |q_i| r. "refine64": those
    # cheap bounds, with the op's per-row ball on each tile's 64 best blocks by them.
    qt = qs.view(T, BLOCK_M, D)
    centre = qt.mean(1)
    rho = (qt - centre[:, None]).norm(dim=-1).amax(1)
    qmax = qt.norm(dim=-1).amax(1)
    mu_n = mu.norm(dim=-1)
    ball_t = centre @ mu.T + rho[:, None] * mu_n + qmax[:, None] * r
    lo, hi = qt.amin(1), qt.amax(1)
    box_t = torch.maximum(lo[:, None, :] * mu, hi[:, None, :] * mu).sum(-1) + qmax[:, None] * r
    cheap = torch.minimum(ball_t, box_t) + BOUND_REL_SLACK * qmax[:, None] * (mu_n + r)
    order = best_first(cheap)
    out["tile_summary"] = certified_count(order, (cheap + log_n).unsqueeze(1), block_lse, eps)[0]
    for budget in REFINE_BUDGETS:
        top = cheap.topk(min(budget, nkb), -1).indices
        refined = cheap.scatter(-1, top, torch.minimum(cheap.gather(-1, top),
                                                       ball_tile.gather(-1, top)))
        order = best_first(refined)
        out[f"refine{budget}"] = certified_count(order, (refined + log_n).unsqueeze(1), block_lse,
                                                 eps)[0]

    union = torch.zeros(T, nkb, dtype=torch.bool)
    for h in range(2):
        part = slice(h * 64, (h + 1) * 64)
        tile = ball[:, part].amax(1)
        order = best_first(tile)
        count, _ = certified_count(order, (tile + log_n).unsqueeze(1), block_lse[:, part], eps)
        visited = torch.arange(nkb) < count.unsqueeze(-1)
        union |= torch.zeros(T, nkb, dtype=torch.bool).scatter(-1, order, visited)
    out["ball_m64"] = union.sum(-1)
    return {name: counts.float() / nkb for name, counts in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="*", default=[16384, 32768, 65536, 131072])
    ap.add_argument("--heads", type=int, default=H)
    ap.add_argument("--tiles", type=int, default=32)
    ap.add_argument("--eps", type=float, default=1e-3)
    ap.add_argument("--out", default="benchmarks/results/prefill_selection_cpu.json")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    rows = []
    for N in args.lengths:
        t0 = time.time()
        q, k, _ = clustered_qkv(1, H, N, D, dtype=torch.float16, seed=0)
        n_tiles = N // BLOCK_M
        tiles = [int(t) for t in torch.linspace(0, n_tiles - 1, args.tiles).round()]
        per_head = [study_head(q[0, h].float(), k[0, h].float(), tiles, args.eps)
                    for h in range(args.heads)]
        del q, k
        row = {"workload": "clustered", "N": N, "eps": args.eps, "heads": args.heads,
               "tiles_per_head": args.tiles, "block_m": BLOCK_M, "block_n": BLOCK_N}
        for name in per_head[0]:
            row[name] = float(torch.cat([h[name] for h in per_head]).mean())
        row["certified_over_oracle"] = row["ball"] / row["oracle_tile"]
        rows.append(row)
        print(f"N={N} ({time.time() - t0:.0f} s): " + ", ".join(
            f"{k} {v:.4f}" for k, v in row.items() if isinstance(v, float) and k != "eps"),
            flush=True)
    summary = {"certified_over_oracle_32k": next(
        (r["certified_over_oracle"] for r in rows if r["N"] == 32768), None)}
    write_json(args.out, {"env": env_record(), "rows": rows, "summary": summary})
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
