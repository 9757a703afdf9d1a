"""Plain-torch reference of certified decode (``decode.py``): the same summary, bounds, selection
and restricted attention, materialising the [rows, S] scores. In float64 it is the tests'
oracle; in the compute dtype it is the op's implementation off CUDA.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from . import decode


def live_bias(B: int, Lq: int, S: int, S_pad: int, bias=None, lengths=None, device="cpu"):
    """float64 [B, Lq, S_pad]: 0 where a key is live for a query position, else -inf (keys past
    S or ``lengths[b]``), plus ``bias`` [B, Lq, S] (an additive mask)."""
    out = torch.zeros(B, Lq, S_pad, dtype=torch.float64, device=device)
    out[..., S:] = -math.inf
    if bias is not None:
        out[..., :S] += bias.double()
    if lengths is not None:
        pos = torch.arange(S_pad, device=device)
        out = out.masked_fill(pos[None, None, :] >= lengths.long()[:, None, None], -math.inf)
    return out


def _rows_bias(live: torch.Tensor, hkv: int, R: int) -> torch.Tensor:
    """[B, Lq, S] -> [B, Hkv, R, S] with row r at position r % Lq."""
    Lq = live.shape[1]
    return live[:, torch.arange(R, device=live.device) % Lq].unsqueeze(1).expand(-1, hkv, -1, -1)


def exact_scores(query, key, scale: float, S_pad: int, bias=None, lengths=None) -> torch.Tensor:
    """float64 [B, Hkv, R, S_pad]: scale q·k plus the live bias, rows as ``decode.rows_of``."""
    B, Hkv, S, D = key.shape
    rows = decode.rows_of(query, Hkv).double()
    k = F.pad(key.double(), (0, 0, 0, S_pad - S))
    s = rows @ k.transpose(-1, -2) * scale
    live = live_bias(B, query.shape[2], S, S_pad, bias, lengths, query.device)
    return s + _rows_bias(live, Hkv, rows.shape[2])


def block_log_mass(scores: torch.Tensor, block: int = decode.BLOCK) -> torch.Tensor:
    """log Σ exp over each block of ``block`` keys: [..., S_pad] -> [..., S_pad / block]."""
    return torch.logsumexp(scores.unflatten(-1, (-1, block)), -1)


def summary_bounds(query, summary: decode.KeySummary, S: int, scale: float, bias=None,
                   lengths=None):
    """(log_upper, log_lower) float64 [B, Hkv, R, NB]: ``decode.decode_bounds`` without rounding
    (every term in float64)."""
    B, Hkv, S_pad, D = summary.codes.shape
    g = summary.group
    rows = decode.rows_of(query, Hkv).double()  # [B, Hkv, R, D]
    center = summary.center.double().repeat_interleave(g, 2)  # [B, Hkv, S_pad, D]
    step = summary.step.double().repeat_interleave(g, 2)
    recon = center + step * summary.codes.double()
    err = 0.5 * summary.step.double()  # [B, Hkv, NG, D]
    slack = (rows.abs().unsqueeze(3) * err.unsqueeze(2)).sum(-1)  # [B, Hkv, R, NG]
    slack = slack.repeat_interleave(g, -1)
    base = rows @ recon.transpose(-1, -2)
    live = _rows_bias(live_bias(B, query.shape[2], S, S_pad, bias, lengths, query.device), Hkv,
                      rows.shape[2])
    upper = (base + slack) * scale + live
    lower = (base - slack) * scale + live
    return block_log_mass(upper), block_log_mass(lower)


def restricted_decode(query, key, value, keep: torch.Tensor, scale: float, bias=None,
                      lengths=None, dtype=torch.float64):
    """(out [B, Hq, Lq, DV], lse [B, Hq, Lq]): attention over the blocks ``keep`` [B, Hkv, NB]
    marks, in ``dtype``; rows with nothing kept get zeros and lse -inf."""
    B, Hq, Lq, D = query.shape
    Hkv, S = key.shape[1], key.shape[2]
    NB = keep.shape[-1]
    s = exact_scores(query, key, scale, NB * decode.BLOCK, bias, lengths)
    s = s.masked_fill(~keep.repeat_interleave(decode.BLOCK, -1).unsqueeze(2), -math.inf)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse).unsqueeze(-1))
    v = F.pad(value.double(), (0, 0, 0, NB * decode.BLOCK - S))
    out = (p @ v).to(dtype)
    DV = value.shape[-1]
    return out.reshape(B, Hq, Lq, DV), lse.reshape(B, Hq, Lq).float()


def dropped_mass(query, key, keep: torch.Tensor, scale: float, bias=None, lengths=None):
    """float64 [B, Hkv, R]: each row's exact softmax mass in the blocks ``keep`` [B, Hkv, NB]
    leaves out (the certificate says <= eps)."""
    NB = keep.shape[-1]
    s = exact_scores(query, key, scale, NB * decode.BLOCK, bias, lengths)
    lse = torch.logsumexp(s, -1, keepdim=True)
    p = torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse))
    return (p * (~keep).repeat_interleave(decode.BLOCK, -1).unsqueeze(2)).sum(-1)


def reference_decode_attention(query, key, value, summary: decode.KeySummary, eps: float,
                               scale: float, bias=None, lengths=None):
    """(out, lse, keep_rows) as ``decode.decode_attention``, in plain torch."""
    upper, lower = summary_bounds(query, summary, key.shape[2], scale, bias, lengths)
    _, _, keep_rows = decode.select_blocks_sorted(upper, lower, eps)
    out, lse = restricted_decode(query, key, value, keep_rows.any(2), scale, bias, lengths,
                                 dtype=query.dtype)
    return out, lse, keep_rows
