"""``aether_compile.attention``: a drop-in for ``F.scaled_dot_product_attention``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops as _ops

log = logging.getLogger("aether_compile")


@dataclass(frozen=True)
class AttentionStats:
    """Which blocks the op computed, enough to recompute every row's dropped mass exactly.

    kept_blocks: bool [B, H, ceil(L / block_m), ceil(S / block_n)], True = computed. Query tile t
    holds rows [t*block_m, (t+1)*block_m), key block j keys [j*block_n, (j+1)*block_n).
    lse: float32 [B, H, L], natural-log normaliser of each row over the kept blocks.
    """

    kept_blocks: Tensor
    lse: Tensor
    block_m: int
    block_n: int
    eps: float

    @property
    def kept_fraction(self) -> float:
        """Fraction of all (tile, block) pairs computed. Reading it synchronises with the device."""
        n = self.kept_blocks.numel()
        return float(self.kept_blocks.sum().item()) / n if n else 1.0


def _check_inputs(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                  dropout_p: float, scale, enable_gqa: bool) -> None:
    """SDPA's input contract, with errors that name the offending value."""
    for name, t in (("query", query), ("key", key), ("value", value)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, seq, head_dim]; got shape "
                             f"{tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key and value must share a dtype; got {query.dtype}, {key.dtype}, "
                        f"{value.dtype}")
    if not (query.device == key.device == value.device):
        raise ValueError(f"query, key and value must be on one device; got {query.device}, "
                         f"{key.device}, {value.device}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query head dim {query.shape[-1]} != key head dim {key.shape[-1]}")
    if query.shape[-1] == 0:  # the default scale E ** -0.5 is undefined
        raise ValueError(f"query/key head dim must be > 0, got shape {tuple(query.shape)}")
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"key length {key.shape[-2]} != value length {value.shape[-2]}")
    if key.shape[:2] != value.shape[:2]:
        raise ValueError(f"key shape {tuple(key.shape)} and value shape {tuple(value.shape)} "
                         "differ in batch or heads")
    if query.shape[0] != key.shape[0]:
        raise ValueError(f"query batch {query.shape[0]} != key batch {key.shape[0]}")
    H, Hkv = query.shape[1], key.shape[1]
    if H != Hkv:
        if not enable_gqa:
            raise ValueError(f"query has {H} heads but key/value have {Hkv}; pass enable_gqa=True "
                             "for grouped-query attention")
        if Hkv == 0 or H % Hkv:
            raise ValueError(f"enable_gqa needs query heads ({H}) divisible by key/value heads "
                             f"({Hkv})")
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise TypeError(f"attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise TypeError(f"attn_mask must be bool or floating point, got {attn_mask.dtype}")
        if attn_mask.device != query.device:
            raise ValueError(f"attn_mask is on {attn_mask.device}, query on {query.device}")
        target = (query.shape[0], H, query.shape[2], key.shape[2])
        try:
            torch.broadcast_shapes(tuple(attn_mask.shape), target)
            ok = attn_mask.dim() <= 4 and all(
                m in (1, t) for m, t in zip(reversed(attn_mask.shape), reversed(target)))
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"[batch, heads, L, S] = {list(target)}")


def attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
              enable_gqa: bool = False, *, eps: Optional[float] = None, return_stats: bool = False):
    """Certified block-sparse attention with SDPA's signature and semantics.

    query [B, H, L, E], key [B, Hkv, S, E], value [B, Hkv, S, Ev]; Hkv == H unless ``enable_gqa``
    (query head h reads kv head h // (H // Hkv), as SDPA). ``attn_mask`` broadcasts to
    [B, H, L, S]: bool keeps where True, float is added to the scores. ``is_causal`` keeps key j
    for query i when j <= i (top-left aligned when L != S, exactly as SDPA) and may be combined
    with a mask. Rows with no unmasked key give 0 (SDPA's math backend).

    Each row's softmax mass on skipped key blocks is <= ``eps`` of its total (certified).
    ``eps=None`` takes the dtype default (``aether_compile.ops.DEFAULT_EPS``); ``eps=0`` is dense.

    ``dropout_p > 0`` falls back to SDPA (logged): the certificate is defined for the softmax
    itself. With ``return_stats`` returns ``(out, AttentionStats)``.
    """
    _check_inputs(query, key, value, attn_mask, dropout_p, scale, enable_gqa)
    if eps is not None and not (eps >= 0.0):  # also rejects NaN
        raise ValueError(f"eps must be >= 0, got {eps}")
    if dropout_p > 0.0:
        if return_stats:
            raise ValueError("return_stats is not available with dropout_p > 0 (dense fallback)")
        log.info("aether_compile.attention: dropout_p=%s > 0, using dense SDPA", dropout_p)
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                              scale=scale, enable_gqa=enable_gqa)
    scale = None if scale is None else float(scale)
    if not return_stats:
        return torch.ops.aether.attention(query, key, value, attn_mask, is_causal, scale,
                                          enable_gqa, eps)
    block_m, block_n = _ops.resolve_blocks(query, value, None, None)
    out, lse, kept = torch.ops.aether.attention_with_stats(
        query, key, value, attn_mask, is_causal, scale, enable_gqa, eps, block_m, block_n)
    resolved = _ops.default_eps(query.dtype) if eps is None else float(eps)
    return out, AttentionStats(kept, lse, block_m, block_n, resolved)
