"""``aether_compile.attention``: a drop-in for ``F.scaled_dot_product_attention``."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from . import dense_policy
from . import ops as _ops
from .kernels import launch
from .validation import check_arguments, check_inputs

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

    Like SDPA, other ranks work: [..., H, L, E] with any number of leading batch dimensions
    (broadcast between query, key and value, and the mask), rank 3 as [H, L, E] and rank 2 as
    [L, E]; the leading dimensions are flattened into one batch for the op, and the output and the
    stats' per-row tensors take them back ([..., H, L, Ev], [..., H, L]).
    """
    if not _is_4d_batch_aligned(query, key, value):
        return _flattened(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                          eps, return_stats)
    # The op checks shapes itself: once is enough (host time matters at 4K). Here, only what the
    # dispatcher would otherwise refuse with its own message, and the dropout path's inputs.
    check_arguments(attn_mask, dropout_p, scale)
    if dropout_p > 0.0:
        check_inputs(query, key, value, attn_mask, dropout_p, scale, enable_gqa, eps)
        if return_stats:
            raise ValueError("return_stats is not available with dropout_p > 0 (dense fallback)")
        log.info("aether_compile.attention: dropout_p=%s > 0, using dense SDPA", dropout_p)
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, is_causal,
                                              scale=scale, enable_gqa=enable_gqa)
    scale = None if scale is None else float(scale)
    if not return_stats:
        if attn_mask is None and _eager_on_cuda(query, key, value):
            # the dense choice before the op: a call that goes dense skips the op's dispatch
            check_inputs(query, key, value, None, 0.0, scale, enable_gqa, eps)
            if _ops.use_triton(query, key, value):
                resolved = _ops.default_eps(query.dtype) if eps is None else float(eps)
                block_m, block_n = _ops.resolve_blocks(query, value, None, None, key)
                out, sparse = dense_policy.eager_dense_call(
                    query, key, value, is_causal, query.shape[-1] ** -0.5 if scale is None
                    else scale, resolved, block_m, block_n)
                if out is not None:
                    return out
                if sparse:
                    with dense_policy.sparse_decided():
                        return torch.ops.aether.attention(query, key, value, None, is_causal,
                                                          scale, enable_gqa, eps)
        return torch.ops.aether.attention(query, key, value, attn_mask, is_causal, scale,
                                          enable_gqa, eps)
    block_m, block_n = _ops.resolve_blocks(query, value, None, None, key, attn_mask)
    out, lse, kept = torch.ops.aether.attention_with_stats(
        query, key, value, attn_mask, is_causal, scale, enable_gqa, eps, block_m, block_n)
    resolved = _ops.default_eps(query.dtype) if eps is None else float(eps)
    return out, AttentionStats(kept, lse, block_m, block_n, resolved)


def _eager_on_cuda(query, key, value) -> bool:
    """Plain CUDA tensors outside any trace or functorch transform: the public function may
    choose dense itself (one host read) and call the dense kernel without the op."""
    return query.device.type == "cuda" and launch.plain_eager(query, key, value)


def _is_4d_batch_aligned(query, key, value) -> bool:
    """The op's own layout: three 4-D tensors with one batch size (no flattening needed)."""
    return (all(isinstance(t, Tensor) and t.dim() == 4 for t in (query, key, value))
            and query.shape[0] == key.shape[0] == value.shape[0])


def _flattened(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, eps,
               return_stats):
    """SDPA's other layouts through the 4-D op: [..., H, L, E] with broadcast leading dimensions
    becomes [prod(...), H, L, E] (heads stay the third-last dimension, as SDPA's enable_gqa reads
    them), and the output is reshaped back."""
    tensors = (("query", query), ("key", key), ("value", value))
    for name, t in tensors:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have at least 2 dimensions [..., seq, head_dim]; got "
                             f"shape {tuple(t.shape)}")
    rank = max(t.dim() for _, t in tensors)
    padded = [t.reshape((1,) * (max(rank, 3) - t.dim()) + tuple(t.shape)) for _, t in tensors]
    try:
        lead = torch.broadcast_shapes(*(tuple(t.shape[:-3]) for t in padded))
        if not enable_gqa:
            heads = torch.broadcast_shapes(*((t.shape[-3],) for t in padded))
            padded = [t.expand(*lead, *heads, *t.shape[-2:]) for t in padded]
        else:  # query heads may be a multiple of key/value heads: broadcast the batch alone
            padded = [t.expand(*lead, *t.shape[-3:]) for t in padded]
    except RuntimeError as e:
        raise ValueError("query, key and value batch dimensions do not broadcast: "
                         f"{tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}") from e
    batch = math.prod(lead)
    q, k, v = (t.reshape(batch, *t.shape[-3:]) for t in padded)
    mask = attn_mask
    if isinstance(mask, Tensor) and mask.dim() > 3:
        if mask.dim() > len(lead) + 3:
            target = [*lead, q.shape[1], q.shape[2], k.shape[2]]
            raise ValueError(f"attn_mask of shape {tuple(mask.shape)} has more dimensions than "
                             f"the attention [..., H, L, S] = {target}")
        mask = mask.reshape((1,) * (len(lead) + 3 - mask.dim()) + tuple(mask.shape))
        try:
            mask = mask.expand(*lead, *mask.shape[-3:]).reshape(batch, *mask.shape[-3:])
        except RuntimeError as e:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast "
                             f"to the batch dimensions {list(lead)}") from e
    result = attention(q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, eps=eps,
                       return_stats=return_stats)
    out, stats = result if return_stats else (result, None)
    out_shape = (*lead, *out.shape[1:])[-rank:] if rank < 3 else (*lead, *out.shape[1:])
    out = out.reshape(out_shape)
    if stats is None:
        return out
    kept = stats.kept_blocks.reshape(*lead, *stats.kept_blocks.shape[1:])
    lse = stats.lse.reshape(*lead, *stats.lse.shape[1:])
    return out, AttentionStats(kept, lse, stats.block_m, stats.block_n, stats.eps)
