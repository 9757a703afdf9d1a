"""SDPA's input contract with errors that name the offending value; shared by the public
``aether_compile.attention`` and the ``aether::*`` ops, so direct ``torch.ops.aether`` calls get the
same errors. Shape and dtype metadata only: safe while tracing."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def check_inputs(query: Tensor, key: Tensor, value: Tensor, attn_mask: Optional[Tensor],
                 dropout_p: float, scale, enable_gqa: bool, eps=None) -> None:
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
    check_arguments(attn_mask, dropout_p, scale)
    if attn_mask is not None:
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
    if eps is not None and not (eps >= 0.0):  # also rejects NaN
        raise ValueError(f"eps must be >= 0, got {eps}")


def check_arguments(attn_mask, dropout_p, scale) -> None:
    """The checks that need no shapes (cheap): the public function runs them before the op, which
    runs ``check_inputs`` itself."""
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    if scale is not None and not isinstance(scale, (int, float, torch.SymInt, torch.SymFloat)):
        raise TypeError(f"scale must be a Python float or None, got {type(scale).__name__}")
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        raise TypeError(f"attn_mask must be a Tensor or None, got {type(attn_mask).__name__}")
