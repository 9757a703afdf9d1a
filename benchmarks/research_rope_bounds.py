"""Research (issue 6, W3): tighter, provably valid bounds on max_{k in block} q.k for RoPE-rotated
key blocks, and what they buy at the certificate. CPU, plain torch, float64 bound math.

    python benchmarks/research_rope_bounds.py --out benchmarks/results

For selected query heads of ``workloads.llm_like_qkv`` (B=1, 32 q / 8 kv heads, D=128, RoPE theta
500000, causal) it computes, per query row i and key block j, the exact block log-sum-exp and block
maximum in float64, a row bound u_ij for each candidate below, the tile bound
U_tj = max_{i in tile} u_ij (-inf where the block is fully masked for the row), and the
certificate's best-first visit (``certificate.plan_visits`` and the stop rule of
``reference._simulate_stop``: stop before position p once every row of the tile has
tail[p] <= log2(0.98 eps) + log2 Z_visited). Reported: kept blocks / causally live blocks (also
per head class and as the W3 mix 5/8 local + 3/8 retrieval), the max per-row dropped mass against
exact float64 attention (must be <= eps), and the min of u_ij - (exact block max) over live
(row, block) pairs (must be >= 0). Also: the GQA union over complete kv groups, a W3 calibration
(sink mass, keys holding 95/99/99.6/99.9% of the mass, top-3% mass, local vs non-local heads), and
an ablation with less i.i.d. key content noise (``w3_variant``). Results: results/rope_bounds.md.

Candidates (row bounds, q' = scale q):
  ball, box, A          q'.mu + |q'| r; Quest's box; A = min(ball, box): the current bound
  G{n}                  RoPE pairs (d, d + D/2) split into n contiguous frequency groups; per group
                        min(ball_g, box_g) with the group's own centroid / radius / box; summed
  sub{s}                A on sub-blocks of s keys, max over the block's sub-blocks
  derot_lin, derot_arc  rotary-aware: keys de-rotated by the angle of their index,
                        k'_j = R(-j w) k_j; block centroid mu' and content radius
                        r' = max |k'_j - mu'| taken there; then
                        q'.k_j = q'.R(j w) mu' + q'.R(j w)(k'_j - mu')
                               <= sum_p max_{t in arc_p} q'_p.R(t) m_p + |q'| r',
                        with m = R(c w) mu' the centroid rotated to the block middle c and
                        arc_p = [-h_p, h_p], h_p = min(pi, w_p (n - 1) / 2). "arc" takes the exact
                        max over each pair's arc (CUDA-core work per pair); "lin" relaxes slow
                        pairs (h_p <= pi/2) to cos h_p (q'_p.m_p) + sin h_p |q'_p||m_p| and fast
                        pairs to |q'_p||m_p|: two GEMMs (D and D/2 wide). Valid for ANY
                        frequencies / pairing: a wrong theta only loosens it (derot_lin_t1e4 uses
                        theta = 1e4 on theta = 5e5 data)
  X&A                   min of two valid bounds
  exact                 the true block max (over unmasked keys): the floor of any per-block bound
  exact_mass            n exp(u) = the block's exact mass: the floor of any certificate of this form
  <cand>+rowtail        same tile order, but the stop test uses each row's own tail
                        sum_{q >= p} n exp(u_i,order[q]) instead of the tile's: still a certificate
  row:<cand>            each row stops on its own (tile of 1 row): what tile granularity costs
  oracle_row/tile       no certificate: per row the fewest highest-mass blocks leaving <= eps (row);
                        per tile blocks by max row mass until every row is <= eps (tile, greedy)
Sizes in --full-n get every candidate; others the cheaper ones; sizes in --lite-n only A, exact,
exact_mass and the oracles.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run from a source checkout without an install
    sys.path.insert(0, ROOT)

from aether_compile.kernels import reference  # noqa: E402
from aether_compile.kernels.certificate import (  # noqa: E402
    LOG2E,
    UNCERTIFIABLE_MAX_LOG2,
    plan_visits,
    stop_threshold_log2,
)
from aether_compile.workloads import llm_like_qkv  # noqa: E402

F64 = torch.float64
EPS_LIST = (1e-3, 4e-3, 1e-2)
THETA = 500000.0
KV_HEADS = 8
H = 32
D = 128
NONLOCAL_FRAC = 0.375  # llm_like_qkv default: kv groups >= 5 of 8 are retrieval heads
SINK = 4


# ----------------------------------------------------------------------------------------------
# Exact per-(row, block) statistics, causal, float64
# ----------------------------------------------------------------------------------------------
def exact_block_stats(q, k, bn, chunk=1024):
    """q [N, D] (scaled), k [N, D] float64. Returns the block lse and block max [N, nKB] (-inf
    where the block has no unmasked key for the row) and the row lse [N]: exact causal attention
    statistics in float64, in row chunks."""
    N = q.shape[0]
    nkb = N // bn
    blse = torch.full((N, nkb), -math.inf, dtype=F64)
    bmax = torch.full((N, nkb), -math.inf, dtype=F64)
    lse = torch.empty(N, dtype=F64)
    for r0 in range(0, N, chunk):
        r1 = min(N, r0 + chunk)
        nb_end = (r1 + bn - 1) // bn  # causal: later blocks are masked for every row of the chunk
        s = q[r0:r1] @ k[: nb_end * bn].T
        s = s.masked_fill(torch.arange(nb_end * bn)[None, :] > torch.arange(r0, r1)[:, None],
                          -math.inf)
        sb = s.view(r1 - r0, nb_end, bn)
        blse[r0:r1, :nb_end] = torch.logsumexp(sb, -1)
        bmax[r0:r1, :nb_end] = sb.amax(-1)
        lse[r0:r1] = torch.logsumexp(blse[r0:r1, :nb_end], -1)
    return blse, bmax, lse


def calibrate_head(q, k, n_rows=96, window=256):
    """W3 calibration on rows sampled evenly from [N/4, N): share of mass on the sink tokens and
    on sinks + the last ``window`` keys, fraction of the live keys that holds 95% of the mass, and
    the mass of the top 3% of live keys (exact float64 softmax)."""
    N = q.shape[0]
    rows = torch.linspace(N // 4, N - 1, n_rows).round().long().unique()
    s = q[rows] @ k.T
    cols = torch.arange(N)[None, :]
    s = s.masked_fill(cols > rows[:, None], -math.inf)
    p = torch.softmax(s, -1)
    sink = p[:, :SINK].sum(-1)
    near = (p * ((cols > rows[:, None] - window) | (cols < SINK))).sum(-1)
    near4 = (p * ((cols > rows[:, None] - 4 * window) | (cols < SINK))).sum(-1)
    k95, top3 = [], []
    kq = {q: [] for q in (0.99, 0.996, 0.999)}
    for r, i in enumerate(rows.tolist()):
        pi = p[r, : i + 1].sort(descending=True).values
        c = pi.cumsum(0)
        k95.append(float(((c < 0.95).sum() + 1) / (i + 1)))
        for q_, lst in kq.items():
            lst.append(float(((c < q_).sum() + 1) / (i + 1)))
        top3.append(float(pi[: max(1, math.ceil(0.03 * (i + 1)))].sum()))
    return {"sink_share": float(sink.mean()), "sink_plus_local256_share": float(near.mean()),
            "sink_plus_local1024_share": float(near4.mean()),
            "frac_keys_for_95pct_mean": sum(k95) / len(k95), "frac_keys_for_95pct_max": max(k95),
            "top3pct_keys_mass_mean": sum(top3) / len(top3),
            "top3pct_keys_mass_min": min(top3),
            **{f"frac_keys_for_{q_}_mean": sum(v) / len(v) for q_, v in kq.items()}}


# ----------------------------------------------------------------------------------------------
# Block summaries and row bounds
# ----------------------------------------------------------------------------------------------
def pair_groups(n_groups: int):
    """Dims of n contiguous frequency groups of RoPE pairs (d, d + D/2), fastest first."""
    P = D // 2
    per = P // n_groups
    out = []
    for g in range(n_groups):
        p = torch.arange(g * per, (g + 1) * per)
        out.append(torch.cat([p, p + P]))
    return out


def ball_box_geo(k, size):
    """Centroid, radius, box centre and half-width of contiguous blocks of ``size`` keys."""
    kb = k.view(-1, size, k.shape[-1])
    mu = kb.mean(1)
    r = (kb - mu[:, None]).norm(dim=-1).amax(1)
    lo, hi = kb.amin(1), kb.amax(1)
    return mu, r, (lo + hi) * 0.5, (hi - lo) * 0.5


def bound_ball_box(q, geo, which="min"):
    mu, r, c, h = geo
    ball = q @ mu.T + q.norm(dim=-1, keepdim=True) * r[None]
    if which == "ball":
        return ball
    box = q @ c.T + q.abs() @ h.T
    if which == "box":
        return box
    return torch.minimum(ball, box)


def max_over_sub(rowb_sub, bn, sub, causal_rows=True):
    """[N, nKB*bn/sub] sub-block bounds -> [N, nKB]: max over each block's sub-blocks, fully
    masked (future) sub-blocks excluded."""
    N = rowb_sub.shape[0]
    if causal_rows:
        start = torch.arange(rowb_sub.shape[1]) * sub
        rowb_sub = rowb_sub.masked_fill(start[None, :] > torch.arange(N)[:, None], -math.inf)
    return rowb_sub.view(N, -1, bn // sub).amax(-1)


def rot(x, ang):
    """Rotate RoPE pairs (d, d + D/2) of x [..., D] by ang [..., D/2] (workloads.rope's layout)."""
    P = x.shape[-1] // 2
    x1, x2 = x[..., :P], x[..., P:]
    c, s = torch.cos(ang), torch.sin(ang)
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)


def derot_geo(k, size, theta):
    """Rotary-aware summaries of blocks of ``size`` keys: m = centroid of the de-rotated keys
    rotated to the block middle [nb, D], content radius r' [nb], arc half-widths h [D/2]."""
    N, Dk = k.shape
    w = theta ** (-torch.arange(0, Dk, 2, dtype=F64) / Dk)  # [D/2]
    pos = torch.arange(N, dtype=F64)
    kd = rot(k, -pos[:, None] * w[None])
    kb = kd.view(-1, size, Dk)
    mu = kb.mean(1)
    r = (kb - mu[:, None]).norm(dim=-1).amax(1)
    mid = torch.arange(kb.shape[0], dtype=F64) * size + (size - 1) / 2
    m = rot(mu, mid[:, None] * w[None])
    h = (w * (size - 1) / 2).clamp(max=math.pi)
    return m, r, h


def bound_derot(q, geo, mode="arc", pair_chunk=8):
    m, r, h = geo
    P = q.shape[-1] // 2
    q1, q2, m1, m2 = q[:, :P], q[:, P:], m[:, :P], m[:, P:]
    qn = torch.sqrt(q1 * q1 + q2 * q2)  # [N, P]
    mn = torch.sqrt(m1 * m1 + m2 * m2)  # [nb, P]
    out = q.norm(dim=-1, keepdim=True) * r[None]
    if mode == "lin":
        slow = h <= math.pi / 2
        C = torch.where(slow, torch.cos(h), torch.zeros_like(h))
        S = torch.where(slow, torch.sin(h), torch.ones_like(h))
        mC = torch.cat([m1 * C, m2 * C], -1)
        return out + q @ mC.T + qn @ (mn * S).T
    full = h >= math.pi  # whole circle: the pair contributes |q_p||m_p|
    out = out + qn[:, full] @ mn[:, full].T
    idx = torch.nonzero(~full).flatten()
    for c0 in range(0, idx.numel(), pair_chunk):
        p = idx[c0: c0 + pair_chunk]
        a1, a2 = q1[:, None, p], q2[:, None, p]  # [N, 1, c]
        b1, b2 = m1[None, :, p], m2[None, :, p]  # [1, nb, c]
        dot = a1 * b1 + a2 * b2
        crs = a1 * b2 - a2 * b1
        nn = qn[:, None, p] * mn[None, :, p]
        ch, sh = torch.cos(h[p]), torch.sin(h[p])
        term = torch.where(dot >= nn * ch, nn, dot * ch + crs.abs() * sh)
        out = out + term.sum(-1)
    return out


def bound_grouped_all(q, k, size, n_groups, kv_cache):
    """G{n}: per frequency group min(ball_g, box_g), summed; all groups in one batched product."""
    key = ("grp", size, n_groups)
    dims = torch.stack(pair_groups(n_groups))  # [n, 2 * per]
    if key not in kv_cache:
        kb = k[:, dims].permute(1, 0, 2).reshape(n_groups, -1, size, dims.shape[1])
        mu = kb.mean(2)
        r = (kb - mu[:, :, None]).norm(dim=-1).amax(2)
        lo, hi = kb.amin(2), kb.amax(2)
        kv_cache[key] = (mu, r, (lo + hi) * 0.5, (hi - lo) * 0.5)
    mu, r, c, h = kv_cache[key]
    qg = q[:, dims].permute(1, 0, 2)  # [n, N, 2 * per]
    ball = torch.bmm(qg, mu.transpose(1, 2)) + qg.norm(dim=-1, keepdim=True) * r[:, None]
    box = torch.bmm(qg, c.transpose(1, 2)) + torch.bmm(qg.abs(), h.transpose(1, 2))
    return torch.minimum(ball, box).sum(0)


def row_bounds_for(q, k, bn, kv_cache, level="full"):
    """Candidate row bounds [N, nKB] (before causal masking) for one query head. Key-side
    summaries are cached per kv head in ``kv_cache``. level "core": A (and ball, box), A on
    sub-blocks of bn/4, derot_lin&A (also on sub-blocks); "mid" adds G2-G8, sub{bn/2},
    derot_lin alone and with theta = 1e4; "full" adds G16-G64 and the exact-arc forms."""
    def geo(key, fn):
        if key not in kv_cache:
            kv_cache[key] = fn()
        return kv_cache[key]

    full, mid = level == "full", level in ("full", "mid")
    out = {}
    g1 = geo(("bb", bn), lambda: ball_box_geo(k, bn))
    if level == "lite":
        return {"A": bound_ball_box(q, g1)}
    out["ball"] = bound_ball_box(q, g1, "ball")
    out["box"] = bound_ball_box(q, g1, "box")
    out["A"] = torch.minimum(out["ball"], out["box"])
    if mid:
        for n in (2, 4, 8, 16, 32, 64) if full else (2, 4, 8):
            out[f"G{n}"] = bound_grouped_all(q, k, bn, n, kv_cache)
    for sub in (bn // 2, bn // 4) if mid else (bn // 4,):
        gs = geo(("bb", sub), lambda: ball_box_geo(k, sub))
        out[f"sub{sub}"] = max_over_sub(bound_ball_box(q, gs), bn, sub)
    gd = geo(("derot", bn, THETA), lambda: derot_geo(k, bn, THETA))
    derot_lin = bound_derot(q, gd, "lin")
    if mid:
        out["derot_lin"] = derot_lin
    out["derot_lin&A"] = torch.minimum(derot_lin, out["A"])
    if full:
        out["derot_arc"] = bound_derot(q, gd, "arc")
        out["derot_arc&A"] = torch.minimum(out["derot_arc"], out["A"])
    sub = bn // 4
    gds = geo(("derot", sub, THETA), lambda: derot_geo(k, sub, THETA))
    gs = geo(("bb", sub), lambda: ball_box_geo(k, sub))
    out[f"derot_lin&A_sub{sub}"] = max_over_sub(
        torch.minimum(bound_derot(q, gds, "lin"), bound_ball_box(q, gs)), bn, sub)
    if mid:
        gdw = geo(("derot", bn, 1e4), lambda: derot_geo(k, bn, 1e4))
        out["derot_lin_t1e4"] = bound_derot(q, gdw, "lin")
    return out


def coarsen(blse, bmax, factor):
    """Block statistics of blocks ``factor`` times larger (exact: lse of lse, max of max)."""
    N, nkb = blse.shape
    return (torch.logsumexp(blse.view(N, nkb // factor, factor), -1),
            bmax.view(N, nkb // factor, factor).amax(-1))


# ----------------------------------------------------------------------------------------------
# The certificate's visit, simulated from exact block statistics
# ----------------------------------------------------------------------------------------------
def certified_kept(rowb, blse, bm, bn, eps_list, row_tail=False):
    """rowb [N, nKB] row bounds with -inf on fully masked (row, block); blse [N, nKB] exact block
    lse. Best-first visit by tile bound with the kernel's stop rule (as reference._simulate_stop):
    stop before sorted position p once every row has tail[p] <= log2(0.98 eps) + log2 Z_visited.
    ``row_tail``: the tail is each row's own bounded mass sum_{q >= p} n exp(u_i,order[q]) instead
    of the tile's (same order); still a certificate, tighter. Returns {eps: kept [nQT, nKB]}."""
    N, nkb = rowb.shape
    nqt = N // bm
    bounds = rowb.view(nqt, bm, nkb).amax(1)
    order, tail_log2, n_live = plan_visits(bounds[None, None], N, bm, bn, True, N)
    order, tail_log2, n_live = order[0, 0].long(), tail_log2[0, 0], n_live[0, 0].long()
    idx = order[:, None, :].expand(nqt, bm, nkb)
    sorted_lse = torch.gather(blse.view(nqt, bm, nkb), -1, idx)
    z_vis = (torch.logcumsumexp(sorted_lse, -1) * LOG2E)[..., :-1]  # log2 Z after 0..p-1
    if row_tail:
        lm = torch.gather(rowb.view(nqt, bm, nkb), -1, idx) + math.log(bn)
        tail_rows = torch.logcumsumexp(lm.flip(-1), -1).flip(-1)[..., 1:] * LOG2E
        # margin[t, p] = min_i (log2 Z_i,visited - tail_i[p]); rows with no live key ignored
        margin = z_vis - tail_rows
        margin = margin.masked_fill(tail_rows == -math.inf, math.inf)
        margin = margin.masked_fill(z_vis <= UNCERTIFIABLE_MAX_LOG2, -math.inf).amin(1)
    else:
        zmin = z_vis.amin(1)
        margin = (zmin - tail_log2[:, 1:]).masked_fill(zmin <= UNCERTIFIABLE_MAX_LOG2, -math.inf)
    pos = torch.arange(1, nkb)
    usable = pos[None] < n_live[:, None]
    out = {}
    for eps in eps_list:
        ok = (margin >= -stop_threshold_log2(eps)) & usable
        first = torch.where(ok, pos[None], torch.full_like(pos[None], nkb)).amin(-1)
        stop = torch.minimum(first, n_live)
        visited = torch.arange(nkb)[None] < stop[:, None]
        out[eps] = torch.zeros(nqt, nkb, dtype=torch.bool).scatter(-1, order, visited)
    return out


def oracle_kept(pmass, bm, eps_list, live):
    """No certificate: keep blocks by (max over the tile's rows of) exact block mass until every
    row's remaining mass is <= eps. pmass [N, nKB] block mass fractions. bm = 1 gives the exact
    per-row minimum."""
    N, nkb = pmass.shape
    nqt = N // bm
    pm = pmass.view(nqt, bm, nkb)
    key = pm.amax(1)
    order = key.argsort(-1, descending=True)
    sp = torch.gather(pm, -1, order[:, None, :].expand(nqt, bm, nkb))
    rem = sp.flip(-1).cumsum(-1).flip(-1)  # rem[..., p] = mass of sorted positions >= p
    rem = torch.cat([rem[..., 1:], torch.zeros(nqt, bm, 1, dtype=F64)], -1)  # after keeping 0..p
    out = {}
    for eps in eps_list:
        ok = (rem <= eps).all(1)  # [nqt, nkb]: keeping 0..p suffices
        n_keep = torch.where(ok, torch.arange(1, nkb + 1)[None],
                             torch.full((1, nkb), nkb + 1)).amin(-1)
        kept = torch.arange(nkb)[None] < n_keep[:, None]
        kept = torch.zeros(nqt, nkb, dtype=torch.bool).scatter(-1, order, kept)
        out[eps] = kept & live.view(nqt, bm, nkb).any(1)
    return out


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------
class Acc:
    """Running totals for one (N, bm, bn, eps, candidate)."""

    def __init__(self):
        self.kept = {"all": 0, "local": 0, "retrieval": 0}
        self.live = {"all": 0, "local": 0, "retrieval": 0}
        self.max_dropped = 0.0
        self.violating_rows = 0
        self.min_bound_slack = math.inf

    def row(self):
        loc = self.kept["local"] / max(1, self.live["local"])
        ret = self.kept["retrieval"] / max(1, self.live["retrieval"])
        mix = (1 - NONLOCAL_FRAC) * loc + NONLOCAL_FRAC * ret if self.live["local"] and \
            self.live["retrieval"] else None
        return {"kept_live_frac": self.kept["all"] / self.live["all"],
                "kept_live_frac_w3_mix": mix,
                "kept_live_frac_local_heads": self.kept["local"] / max(1, self.live["local"]),
                "kept_live_frac_retrieval_heads": ret,
                "max_dropped_mass": self.max_dropped, "violating_rows": self.violating_rows,
                "min_bound_minus_exact_max": (None if self.min_bound_slack == math.inf
                                              else self.min_bound_slack)}


def run_size(N, heads, shapes, eps_list, progress, check_reference, full=True, noise=None,
             calibrate=True, lite=False):
    t0 = time.time()
    if noise is None:
        q, k, _ = llm_like_qkv(1, H, N, D, kv_heads=KV_HEADS, theta=THETA)
    else:
        q, k = w3_variant(N, noise)
    scale = D ** -0.5
    n_local_kv = KV_HEADS - int(round(NONLOCAL_FRAC * KV_HEADS))
    group = H // KV_HEADS
    accs: dict = {}
    union_maps: dict = {}
    per_head_kept: dict = {}  # same (eps, candidate, kv head), summed over the group's heads
    calib_rows = []
    if calibrate:  # every query head (cheap: sampled rows)
        for h in range(H):
            kvh = h // group
            calib_rows.append({"N": N, "head": h, "kv_head": kvh,
                               "generator_class": "local" if kvh < n_local_kv else "retrieval",
                               **calibrate_head(q[0, h].to(F64) * scale, k[0, kvh].to(F64))})
        progress(f"N={N} calibrated ({time.time() - t0:.0f}s)")
    bns = sorted({bn for _, bn in shapes}, reverse=True)
    kv_caches: dict = {}
    for h in heads:
        th = time.time()
        kvh = h // group
        cls = "local" if kvh < n_local_kv else "retrieval"
        qh = q[0, h].to(F64) * scale
        kh = k[0, kvh].to(F64)
        kv_cache = kv_caches.setdefault(kvh, {})
        for key in [kk for kk in kv_caches if kk != kvh]:
            del kv_caches[key]  # heads come grouped by kv head
        blse0, bmax0, lse = exact_block_stats(qh, kh, bns[-1])
        for bn in bns:
            blse, bmax = coarsen(blse0, bmax0, bn // bns[-1])
            live = bmax > -math.inf
            pmass = torch.exp(blse - lse[:, None])
            if lite:
                level = "lite"
            elif bn == shapes[0][1]:
                level = "full" if full else "mid"
            else:
                level = "core"
            rbs = row_bounds_for(qh, kh, bn, kv_cache, level)
            rbs["exact"] = bmax.clone()
            slack = {}
            for name, rb in rbs.items():
                rb = rb.masked_fill(~live, -math.inf)
                rbs[name] = rb
                slack[name] = float((rb - bmax)[live].min())
            # not a bound on the max: n exp(u) = the block's exact mass, the floor of any
            # certificate of this form (tile order and tile stop rule unchanged)
            rbs["exact_mass"] = blse - math.log(bn)
            core = ("A", f"sub{bn // 4}", "derot_lin&A", f"derot_lin&A_sub{bn // 4}", "exact",
                    "exact_mass")
            for bm in sorted({bm for bm, b in shapes if b == bn}, reverse=True):
                plans = {name: certified_kept(rb, blse, bm, bn, eps_list)
                         for name, rb in rbs.items() if (bm, bn) == shapes[0] or name in core}
                plans["oracle_tile"] = oracle_kept(pmass, bm, eps_list, live)
                if bm == max(b for b, bb in shapes if bb == bn):  # per-row stop, once per bn
                    for name in ("A", "exact"):
                        plans[f"row:{name}"] = certified_kept(rbs[name], blse, 1, bn, eps_list)
                for name in ("A", f"sub{bn // 4}", "exact", "exact_mass"):
                    if name not in rbs:
                        continue
                    plans[f"{name}+rowtail"] = certified_kept(rbs[name], blse, bm, bn, eps_list,
                                                              row_tail=True)
                    plans["oracle_row"] = oracle_kept(pmass, 1, eps_list, live)
                live_by_rows = {r: live.view(N // r, r, -1).any(1) for r in (1, bm)}
                live_count = {r: int(t.sum()) for r, t in live_by_rows.items()}
                for name, per_eps in plans.items():
                    tile_rows = 1 if (name.startswith("row:") or name == "oracle_row") else bm
                    live_t = live_by_rows[tile_rows]
                    for eps, kept in per_eps.items():
                        a = accs.setdefault((N, tile_rows, bn, eps, name), Acc())
                        kk, ll = int((kept & live_t).sum()), live_count[tile_rows]
                        a.kept["all"] += kk
                        a.kept[cls] += kk
                        a.live["all"] += ll
                        a.live[cls] += ll
                        dropped = (pmass.view(-1, tile_rows, pmass.shape[1])
                                   * ~kept[:, None, :]).sum(-1)
                        a.max_dropped = max(a.max_dropped, float(dropped.max()))
                        a.violating_rows += int((dropped > eps).sum())
                        base = name[4:] if name.startswith("row:") else name.split("+")[0]
                        if base in slack:
                            a.min_bound_slack = min(a.min_bound_slack, slack[base])
                        if (bm, bn) == shapes[0] and tile_rows == bm:
                            um = union_maps.setdefault((eps, name, kvh), torch.zeros_like(kept))
                            union_maps[(eps, name, kvh)] = um | kept
                            per_head_kept[(eps, name, kvh)] = (
                                per_head_kept.get((eps, name, kvh), 0) + int((kept & live_t).sum()))
            if check_reference and h == heads[0] and bn == shapes[0][1]:
                check_against_reference(q, k, h, kvh, shapes[0][0], bn, eps_list[1], rbs, blse, lse)
        progress(f"N={N}{'' if noise is None else f' noise={noise}'} head {h} ({cls}) "
                 f"{time.time() - th:.1f}s")
    tag = {} if noise is None else {"workload": f"w3_noise{noise}"}
    rows = []
    for (n, bm, bn, eps, name), a in accs.items():
        rows.append({"N": n, "block_m": bm, "block_n": bn, "eps": eps, "candidate": name,
                     "heads": len(heads), **tag, **a.row()})
    # GQA: a kv block is loaded for a tile if any query head of the group keeps it
    bm0, bn0 = shapes[0]
    nqt, nkb = N // bm0, N // bn0
    tiles = torch.arange(nqt)[:, None] * bm0 + bm0 - 1
    live0 = (torch.arange(nkb)[None] * bn0 <= tiles)
    union_rows = {}
    complete = {kv for kv in range(KV_HEADS)
                if all(h in heads for h in range(kv * group, (kv + 1) * group))}
    for (eps, name, kvh), um in union_maps.items():
        if kvh not in complete:  # only kv groups whose every query head was run
            continue
        u = union_rows.setdefault((eps, name), [0, 0, 0])
        u[0] += int((um & live0).sum())
        u[1] += int(live0.sum())
        u[2] += per_head_kept[(eps, name, kvh)]
    for (eps, name), (kk, ll, kh) in union_rows.items():
        rows.append({"N": N, "block_m": bm0, "block_n": bn0, "eps": eps, "candidate": name,
                     "gqa_union": True, **tag, "kv_heads": sorted(complete),
                     "kept_live_frac": kk / ll,
                     "per_head_kept_live_frac_same_heads": kh / (ll * group)})
    progress(f"N={N} done in {time.time() - t0:.0f}s")
    return rows, calib_rows


def w3_variant(N, noise, seed=0):
    """W3 (workloads.llm_like_qkv) with the weight of its i.i.d. per-key content noise (0.6 by
    default) changed; the random stream is the same. Returns q [1, H, N, D], k [1, KV_HEADS, N, D]."""
    q, k, _ = llm_like_qkv(1, H, N, D, kv_heads=KV_HEADS, theta=THETA, seed=seed,
                           nonlocal_frac=NONLOCAL_FRAC, key_noise=noise)
    return q, k


def check_against_reference(q, k, h, kvh, bm, bn, eps, rbs, blse, lse):
    """Harness check on one head: reference.reference_attention's kept map (fp32, its own bounds
    with slack) against this harness fed the reference's row_bounds, and reference.dropped_mass
    against ours."""
    N = q.shape[2]
    qs, ks = q[:, h: h + 1], k[:, kvh: kvh + 1]
    _, _, kept_ref = reference.reference_attention(qs, ks, ks, is_causal=True, eps=eps,
                                                   block_m=bm, block_n=bn)
    kept_ref = kept_ref[0, 0]
    scale = D ** -0.5
    geo = reference.block_geometry(ks.float(), bn)
    rb = reference.row_bounds(qs.float() * scale, geo)[0, 0].to(F64)
    live = rbs["exact"] > -math.inf
    ours = certified_kept(rb.masked_fill(~live, -math.inf), blse, bm, bn, [eps])[eps]
    ours_A = certified_kept(rbs["A"], blse, bm, bn, [eps])[eps]
    dm_ref = reference.dropped_mass(qs, ks, kept_ref[None, None], bm, bn, is_causal=True)[0, 0]
    pmass = torch.exp(blse - lse[:, None])
    dm_ours = (pmass * ~kept_ref.repeat_interleave(bm, 0)).sum(-1)
    CHECK.update({
        "N": N, "head": h, "block_m": bm, "block_n": bn, "eps": eps,
        "reference_kept_live_frac": float(kept_ref.sum() / live.view(N // bm, bm, -1).any(1).sum()),
        "harness_with_reference_row_bounds_kept_equal": int((ours == kept_ref).sum()),
        "harness_with_reference_row_bounds_kept_differ": int((ours != kept_ref).sum()),
        "harness_A_fp64_noslack_kept_differ": int((ours_A != kept_ref).sum()),
        "dropped_mass_max_abs_diff_vs_reference": float((dm_ref - dm_ours).abs().max()),
        "reference_max_dropped_mass": float(dm_ref.max()),
    })


CHECK: dict = {}


def env_info():
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=os.path.dirname(__file__)).stdout.strip()
    except OSError:
        commit = "unknown"
    return {"card": "cpu", "torch": torch.__version__, "python": sys.version.split()[0],
            "threads": torch.get_num_threads(), "commit": os.environ.get("AETHER_COMMIT", commit),
            "date": datetime.datetime.now().isoformat(timespec="seconds")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[4096, 8192, 16384, 32768],
                    help="sizes; the defaults took 6.5 min on 2 CPU cores (16.5 min while other "
                         "jobs shared them)")
    ap.add_argument("--heads", default="4096:0/1/2/3/8/20/21/22/23/28,8192:0/8/20/28,"
                                       "16384:0/8/20/28,32768:0/20",
                    help="per N: a stride s (every s-th query head; 1 = all 32) or a list "
                         "h1/h2/...; kv groups 0-4 are local, 5-7 retrieval. Other N: 4")
    ap.add_argument("--full-n", type=int, nargs="*", default=[4096],
                    help="sizes that also get G16-G64 and the exact-arc rotary bound")
    ap.add_argument("--shapes", default="128x64,64x64,32x64,128x32,64x32,32x32",
                    help="block_m x block_n; the first is the GPU default (GQA union, check)")
    ap.add_argument("--shapes-large", default="128x64,64x64,32x64,64x32",
                    help="shapes for N >= 16384")
    ap.add_argument("--lite-n", type=int, nargs="*", default=[32768],
                    help="sizes that get only A, exact, exact_mass and the oracles at 128x64, "
                         "64x64 (to see the trend towards 128K)")
    ap.add_argument("--noise", type=float, nargs="*", default=[0.2, 0.05],
                    help="ablation: W3 with this weight of i.i.d. key content noise (W3: 0.6)")
    ap.add_argument("--noise-n", type=int, default=4096)
    ap.add_argument("--noise-heads", default="0/8/20/28")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--no-check", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    def parse_shapes(spec):
        return [tuple(int(x) for x in sh.split("x")) for sh in spec.split(",")]

    head_spec = dict(t.split(":") for t in args.heads.split(","))

    def pick(N):
        spec = head_spec.get(str(N), "4")
        return [int(x) for x in spec.split("/")] if "/" in spec else list(range(0, H, int(spec)))

    def progress(msg):
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    t_start = time.time()
    rows, calib = [], []
    for i, N in enumerate(args.n):
        heads = pick(N)
        lite = N in args.lite_n
        shapes = parse_shapes("128x64,64x64" if lite else args.shapes if N < 16384
                              else args.shapes_large)
        r, c = run_size(N, heads, shapes, EPS_LIST, progress,
                        check_reference=(i == 0 and not args.no_check), full=N in args.full_n,
                        lite=lite)
        rows += r
        calib += c
    for noise in args.noise:
        r, c = run_size(args.noise_n, [int(x) for x in args.noise_heads.split("/")],
                        parse_shapes("128x64,64x32"), EPS_LIST, progress, False, full=True,
                        noise=noise, calibrate=True)
        rows += r
        calib += [{**x, "workload": f"w3_noise{noise}"} for x in c]
    summary_calib = {}
    for key in [str(N) for N in args.n] + [f"w3_noise{x}_{args.noise_n}" for x in args.noise]:
        cr = [c for c in calib if (str(c["N"]) == key and "workload" not in c)
              or f"{c.get('workload')}_{c['N']}" == key]
        nonlocal_rule = [c["sink_plus_local1024_share"] < 0.9 for c in cr]

        def cls_mean(field, cls):
            sel = [c[field] for c in cr if c["generator_class"] == cls]
            return sum(sel) / len(sel)
        summary_calib[key] = {
            "heads": len(cr),
            **{f"{f}_{cls}_heads": cls_mean(f, cls) for cls in ("local", "retrieval")
               for f in ("sink_share", "sink_plus_local256_share", "sink_plus_local1024_share",
                         "frac_keys_for_95pct_mean", "frac_keys_for_0.99_mean",
                         "frac_keys_for_0.996_mean", "frac_keys_for_0.999_mean",
                         "top3pct_keys_mass_mean")},
            "sink_share_mean": sum(c["sink_share"] for c in cr) / len(cr),
            "sink_share_min": min(c["sink_share"] for c in cr),
            "sink_share_max": max(c["sink_share"] for c in cr),
            "frac_keys_for_95pct_mean": sum(c["frac_keys_for_95pct_mean"] for c in cr) / len(cr),
            "frac_keys_for_95pct_worst_row": max(c["frac_keys_for_95pct_max"] for c in cr),
            "top3pct_keys_mass_mean": sum(c["top3pct_keys_mass_mean"] for c in cr) / len(cr),
            "top3pct_keys_mass_min_row": min(c["top3pct_keys_mass_min"] for c in cr),
            "nonlocal_head_frac": sum(nonlocal_rule) / len(cr),
            "nonlocal_rule": "mean over sampled rows of mass on sinks + last 1024 keys < 0.9",
            "generator_retrieval_head_frac":
                sum(c["generator_class"] == "retrieval" for c in cr) / len(cr),
        }
    rec = {"env": env_info(), "args": vars(args), "runtime_s": round(time.time() - t_start, 1),
           "harness_check": CHECK, "calibration_summary": summary_calib, "calibration": calib,
           "rows": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "rope_bounds_cpu.json")
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)
    progress(f"wrote {path} ({time.time() - t_start:.0f}s)")
    print_table(rows)


def print_table(rows):
    main = [r for r in rows if not r.get("gqa_union")]
    for wl, N in sorted({(r.get("workload", "w3"), r["N"]) for r in main}):
        for bn in sorted({r["block_n"] for r in main}, reverse=True):
            sel = [r for r in main if r["N"] == N and r["block_n"] == bn
                   and r.get("workload", "w3") == wl]
            if not sel:
                continue
            cands = list(dict.fromkeys(r["candidate"] for r in sel))
            cols = sorted({(r["block_m"], r["eps"]) for r in sel}, key=lambda x: (-x[0], x[1]))
            print(f"\n{wl} N={N} block_n={bn}: kept / live blocks ('!': a row dropped > eps)")
            print(f"{'candidate':24s}" + "".join(f"{f'{bm}:{eps:g}':>12s}" for bm, eps in cols))
            for c in cands:
                line = f"{c:24s}"
                for bm, eps in cols:
                    r = next((r for r in sel if r["candidate"] == c and r["block_m"] == bm
                              and r["eps"] == eps), None)
                    line += f"{'' if r is None else format(r['kept_live_frac'], '.3f'):>12s}"
                    if r is not None and r["violating_rows"]:
                        line += "!"
                print(line)


if __name__ == "__main__":
    main()
