"""``aether_compile.attention``: a drop-in for ``F.scaled_dot_product_attention``."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops as _ops
from .validation import check_inputs

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
    check_inputs(query, key, value, attn_mask, dropout_p, scale, enable_gqa, eps)
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
