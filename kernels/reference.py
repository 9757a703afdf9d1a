"""Plain-torch reference of certified block-sparse attention.

Same semantics, geometry and certificate as the Triton kernels (``plan.py``, ``forward.py``),
written for clarity: it materialises the [L, S] score matrix, so it is for tests (in float64 it is
the oracle) and for the op's CPU implementation at modest sizes. The visit plan comes from
``certificate.plan_visits``, shared with the Triton path.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .certificate import (
    BOUND_REL_SLACK,
    LOG2E,
    MASK_FLOOR,
    RADIUS_INFLATE,
    UNCERTIFIABLE_MAX_LOG2,
    num_blocks,
    plan_visits,
    stop_threshold_log2,
    use_box_bound,
)


class BlockGeometry(NamedTuple):
    """Summaries of each key block, shape [B, Hkv, nKB, ...]."""

    mu: torch.Tensor  # centroid [.., D]
    radius: torch.Tensor  # max ||k - mu|| [..]
    center: torch.Tensor  # box centre (lo + hi) / 2 [.., D]
    half: torch.Tensor  # box half-width (hi - lo) / 2 [.., D]


def _pad_dim(x: torch.Tensor, dim: int, multiple: int, value: float) -> torch.Tensor:
    n = x.shape[dim]
    pad = num_blocks(n, multiple) * multiple - n
    if pad == 0:
        return x
    shape = list(x.shape)
    shape[dim] = pad
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def block_geometry(k: torch.Tensor, block_n: int) -> BlockGeometry:
    """k: [B, Hkv, S, D] in the compute dtype. Padding keys of the last block are excluded."""
    B, Hkv, S, D = k.shape
    nkb = num_blocks(S, block_n)
    valid = _pad_dim(torch.ones(S, dtype=torch.bool, device=k.device), 0, block_n, False)
    valid = valid.view(nkb, block_n, 1)
    kb = _pad_dim(k, 2, block_n, 0.0).view(B, Hkv, nkb, block_n, D)
    count = valid.sum(1).to(k.dtype)  # [nKB, 1]
    mu = kb.sum(3) / count
    dist = torch.linalg.vector_norm(kb - mu.unsqueeze(3), dim=-1)  # [B, Hkv, nKB, BN]
    dist = dist.masked_fill(~valid.view(nkb, block_n), 0.0)
    radius = dist.amax(-1) * (1.0 + RADIUS_INFLATE)
    lo = kb.masked_fill(~valid, math.inf).amin(3)
    hi = kb.masked_fill(~valid, -math.inf).amax(3)
    return BlockGeometry(mu, radius, (lo + hi) * 0.5, (hi - lo) * 0.5)


def row_bounds(q_scaled: torch.Tensor, geo: BlockGeometry) -> torch.Tensor:
    """Upper bound of max_{k in block} q'.k for every query row and key block: [B, H, L, nKB].

    q_scaled: [B, H, L, D]; geo on [B, H, nKB, ...] (kv heads already expanded for GQA)."""
    qn = torch.linalg.vector_norm(q_scaled, dim=-1, keepdim=True)  # [B, H, L, 1]
    mu_n = torch.linalg.vector_norm(geo.mu, dim=-1).unsqueeze(-2)  # [B, H, 1, nKB]
    r = geo.radius.unsqueeze(-2)
    ball = q_scaled @ geo.mu.transpose(-1, -2) + qn * r
    ball = ball + BOUND_REL_SLACK * qn * (mu_n + r)
    if not use_box_bound():
        return ball
    c_n = torch.linalg.vector_norm(geo.center, dim=-1).unsqueeze(-2)
    h_n = torch.linalg.vector_norm(geo.half, dim=-1).unsqueeze(-2)
    box = q_scaled @ geo.center.transpose(-1, -2) + q_scaled.abs() @ geo.half.transpose(-1, -2)
    box = box + BOUND_REL_SLACK * qn * (c_n + h_n)
    return torch.minimum(ball, box)


def tile_max(x: torch.Tensor, block_m: int, dim: int = -2) -> torch.Tensor:
    """Max over groups of block_m rows along ``dim`` (padding rows are -inf)."""
    dim = dim % x.dim()
    x = _pad_dim(x, dim, block_m, -math.inf)
    shape = list(x.shape)
    shape[dim : dim + 1] = [shape[dim] // block_m, block_m]
    return x.reshape(shape).amax(dim + 1)


def additive_bias(attn_mask, is_causal: bool, L: int, S: int, dtype, device) -> torch.Tensor | None:
    """The SDPA mask as an additive bias broadcastable to [B, H, L, S] (bool: True keeps).
    Causal is top-left aligned, as SDPA does when L != S, and combines with a mask."""
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=dtype, device=device)
            bias = bias.masked_fill(~attn_mask.to(device), -math.inf)
        else:
            bias = attn_mask.to(device=device, dtype=dtype)
            bias = torch.where(bias == -math.inf, bias, bias.clamp_min(MASK_FLOOR))
        while bias.dim() < 4:
            bias = bias.unsqueeze(0)
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=device).tril()
        causal = torch.zeros(L, S, dtype=dtype, device=device).masked_fill(~keep, -math.inf)
        bias = causal.view(1, 1, L, S) if bias is None else bias + causal
    return bias


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def reference_attention(query, key, value, attn_mask=None, is_causal=False, scale=None,
                        enable_gqa=False, eps=0.0, block_m=64, block_n=64):
    """Certified block-sparse attention in plain torch.

    Shapes as SDPA: query [B, H, L, E], key [B, Hkv, S, E], value [B, Hkv, S, Ev].
    Returns (out [B, H, L, Ev] in query.dtype, lse [B, H, L] float32 natural-log normaliser,
    kept [B, H, nQT, nKB] bool).
    """
    B, H, L, E = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    cdt = compute_dtype_for(query.dtype)
    dev = query.device
    scale = E ** -0.5 if scale is None else scale
    q = query.to(cdt) * scale
    k = key.to(cdt)
    v = value.to(cdt)
    nkb = num_blocks(S, block_n)

    geo = block_geometry(k, block_n)
    if Hkv != H:
        rep = H // Hkv
        geo = BlockGeometry(*(g.repeat_interleave(rep, dim=1) for g in geo))
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)

    scores = q @ k.transpose(-1, -2)  # [B, H, L, S]
    bias = additive_bias(attn_mask, is_causal, L, S, cdt, dev)
    rowb = row_bounds(q, geo)  # [B, H, L, nKB]
    if bias is not None:
        scores = scores + bias
        # Per row and block, the mask adds at most its maximum over the block (-inf: fully masked).
        bias_block_max = _pad_dim(bias.expand(*bias.shape[:2], L, S), -1, block_n, -math.inf)
        bias_block_max = bias_block_max.reshape(*bias.shape[:2], L, nkb, block_n).amax(-1)
        rowb = rowb + bias_block_max
    bounds = tile_max(rowb, block_m).to(torch.float32)  # [B, H, nQT, nKB]

    order, tail_log2, n_live = plan_visits(bounds, S, block_m, block_n, is_causal, L)
    kept = _simulate_stop(scores, order, tail_log2, n_live, eps, block_m, block_n)

    keep_keys = kept.repeat_interleave(block_m, dim=2)[:, :, :L]
    keep_keys = keep_keys.repeat_interleave(block_n, dim=3)[..., :S]
    scores = scores.masked_fill(~keep_keys, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # -inf for rows with nothing kept
    # softmax normalises by the sum itself: exp(s - lse) would lose log(S) when every score of a
    # row sits near the -1e30 mask floor (fp32), turning a uniform average into a sum
    row_empty = (scores == -math.inf).all(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(row_empty, 0.0), -1).masked_fill(row_empty, 0.0)
    out = probs @ v
    return out.to(query.dtype), lse.to(torch.float32), kept


def _simulate_stop(scores, order, tail_log2, n_live, eps, block_m, block_n):
    """Which blocks the best-first visit computes, with the kernel's stop rule.

    The normaliser after visiting the first p sorted blocks does not depend on visiting order
    within them, so the rule vectorises: for each tile, stop at the first p >= 1 where every row
    has tail[p] <= log2(margin * eps) + log2(Z after p blocks)."""
    B, H, L, S = scores.shape
    nqt, nkb = order.shape[-2], order.shape[-1]
    padded = _pad_dim(_pad_dim(scores, -1, block_n, -math.inf), -2, block_m, -math.inf)
    block_lse = torch.logsumexp(padded.reshape(B, H, nqt * block_m, nkb, block_n), -1)
    block_lse = block_lse.reshape(B, H, nqt, block_m, nkb)
    sorted_lse = torch.gather(block_lse, -1, order.long().unsqueeze(3).expand_as(block_lse))
    z_prefix = torch.logcumsumexp(sorted_lse, -1) * LOG2E  # Z after visiting 0..p (natural->log2)
    thr = stop_threshold_log2(eps)
    # ok[..., p] (p >= 1): may stop before position p, with Z over positions 0..p-1.
    z_visited = z_prefix[..., :-1]
    ok = (tail_log2[:, :, :, None, 1:] <= thr + z_visited) & (z_visited > UNCERTIFIABLE_MAX_LOG2)
    row_valid = (torch.arange(nqt * block_m, device=scores.device) < L).view(nqt, block_m, 1)
    ok = (ok | ~row_valid).all(3)  # [B, H, nQT, nKB - 1]
    pos = torch.arange(1, nkb, device=scores.device)
    ok = ok & (pos < n_live.unsqueeze(-1))
    first_stop = torch.where(ok, pos, torch.full_like(pos, nkb)).amin(-1) if nkb > 1 else None
    stop = n_live.long() if first_stop is None else torch.minimum(first_stop, n_live.long())
    visited = torch.arange(nkb, device=scores.device) < stop.unsqueeze(-1)  # sorted positions
    kept = torch.zeros(B, H, nqt, nkb, dtype=torch.bool, device=scores.device)
    return kept.scatter(-1, order.long(), visited)


def dropped_mass(query, key, kept, block_m, block_n, attn_mask=None, is_causal=False, scale=None,
                 row_chunk=512):
    """Each row's softmax mass on the blocks ``kept`` marks as skipped, as a fraction of the row's
    total, recomputed exactly in float64 (in row chunks, so it runs at 32K). [B, H, L] float64;
    rows with no unmasked key give 0. This is what the certificate bounds by eps."""
    B, H, L, E = query.shape
    S = key.shape[-2]
    scale = E ** -0.5 if scale is None else scale
    k = key.double()
    if k.shape[1] != H:
        k = k.repeat_interleave(H // k.shape[1], dim=1)
    key_block = torch.arange(S, device=query.device) // block_n
    bias = additive_bias(attn_mask, is_causal, L, S, torch.float64, query.device)
    out = torch.empty(B, H, L, dtype=torch.float64, device=query.device)
    for r0 in range(0, L, row_chunk):
        rows = torch.arange(r0, min(L, r0 + row_chunk), device=query.device)
        s = (query[:, :, rows].double() * scale) @ k.transpose(-1, -2)
        if bias is not None:
            b = bias.expand(*bias.shape[:2], L, S)[:, :, rows]
            s = s + b
        row_empty = (s == -math.inf).all(-1, keepdim=True)
        p = torch.softmax(s.masked_fill(row_empty, 0.0), -1).masked_fill(row_empty, 0.0)
        skipped = ~kept[:, :, rows // block_m][..., key_block]
        out[:, :, rows] = (p * skipped).sum(-1)
    return out


def _restricted_probs(q, k, attn_mask, is_causal, scale, kept, block_m, block_n):
    """Softmax probabilities [B, H, L, S] over the kept blocks (kv heads already expanded)."""
    B, H, L, E = q.shape
    S = k.shape[-2]
    s = (q * scale) @ k.transpose(-1, -2)
    bias = additive_bias(attn_mask, is_causal, L, S, s.dtype, s.device)
    if bias is not None:
        s = s + bias
    keep = kept.repeat_interleave(block_m, 2)[:, :, :L].repeat_interleave(block_n, 3)[..., :S]
    s = s.masked_fill(~keep, -math.inf)
    row_empty = (s == -math.inf).all(-1, keepdim=True)
    return torch.softmax(s.masked_fill(row_empty, 0.0), -1).masked_fill(row_empty, 0.0)


def _expand_kv(t, H):
    return t if t.shape[1] == H else t.repeat_interleave(H // t.shape[1], dim=1)


def restricted_attention(q, k, v, attn_mask, is_causal, scale, kept, block_m, block_n):
    """Differentiable plain-torch attention over the ``kept`` blocks only: the function the op
    computes for a given block selection. Rows with no unmasked kept key give 0, as SDPA."""
    H, E = q.shape[1], q.shape[-1]
    scale = E ** -0.5 if scale is None else scale
    p = _restricted_probs(q, _expand_kv(k, H), attn_mask, is_causal, scale, kept, block_m, block_n)
    return p @ _expand_kv(v, H)


def restricted_attention_backward(grad_out, q, k, v, attn_mask, is_causal, scale, kept, block_m,
                                  block_n):
    """(dq, dk, dv) of ``restricted_attention`` by the explicit softmax-attention formulas (usable
    where autograd is off, e.g. inside an op's implementation). GQA sums over each kv group."""
    B, H, L, E = q.shape
    Hkv = k.shape[1]
    scale = E ** -0.5 if scale is None else scale
    ke, ve = _expand_kv(k, H), _expand_kv(v, H)
    p = _restricted_probs(q, ke, attn_mask, is_causal, scale, kept, block_m, block_n)
    dv = p.transpose(-1, -2) @ grad_out
    dp = grad_out @ ve.transpose(-1, -2)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    dq = (ds @ ke) * scale
    dk = (ds.transpose(-1, -2) @ q) * scale
    if Hkv != H:
        dk = dk.view(B, Hkv, H // Hkv, *dk.shape[2:]).sum(2)
        dv = dv.view(B, Hkv, H // Hkv, *dv.shape[2:]).sum(2)
    return dq, dk, dv


def chunked_attention_fp64(q, k, v, attn_mask=None, is_causal=False, kept=None, block_m=None,
                           block_n=None, scale=None, row_chunk=1024):
    """Float64 attention (restricted to ``kept`` blocks when given) in row chunks, so an oracle
    fits in memory at 32K tokens. Rows with no unmasked key give 0."""
    B, H, L, E = q.shape
    S = k.shape[-2]
    scale = E ** -0.5 if scale is None else scale
    kd, vd = _expand_kv(k.double(), H), _expand_kv(v.double(), H)
    bias = additive_bias(attn_mask, is_causal, L, S, torch.float64, q.device)
    out = torch.empty(B, H, L, v.shape[-1], dtype=torch.float64, device=q.device)
    key_block = torch.arange(S, device=q.device) // (block_n or 1)
    for r0 in range(0, L, row_chunk):
        rows = torch.arange(r0, min(L, r0 + row_chunk), device=q.device)
        s = (q[:, :, rows].double() * scale) @ kd.transpose(-1, -2)
        if bias is not None:
            s = s + bias.expand(*bias.shape[:2], L, S)[:, :, rows]
        if kept is not None:
            s = s.masked_fill(~kept[:, :, rows // block_m][..., key_block], -math.inf)
        row_empty = (s == -math.inf).all(-1, keepdim=True)
        p = torch.softmax(s.masked_fill(row_empty, 0.0), -1).masked_fill(row_empty, 0.0)
        out[:, :, rows] = p @ vd
    return out
