"""Predicates shared by the matchers. Each returns None (fine) or a ``Decline`` with a reason."""

from __future__ import annotations

import fnmatch
import math
import numbers
from typing import Optional

import torch

from aether_compile._compat import size_hint

from .site import Decline

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIM_RANGE = (16, 256)
# A fill value at or below this acts as "masked out": exp(-1e4 - max) is 0 in every float dtype.
MASKED_FILL_MAX = -1e4


def device(q, allow_cpu: bool) -> Optional[Decline]:
    if q.device.type == "cuda":
        return None
    if q.device.type == "cpu" and allow_cpu:
        return None
    if q.device.type == "cpu":
        return Decline("device", "device cpu is not CUDA (allow_cpu=False)")
    return Decline("device", f"device {q.device.type} is not supported")


def dtypes(q, k, v) -> Optional[Decline]:
    if not (q.dtype == k.dtype == v.dtype):
        return Decline("dtype", f"query/key/value dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if q.dtype not in SUPPORTED_DTYPES:
        return Decline("dtype", f"dtype {q.dtype} unsupported (fp16, bf16, fp32)")
    return None


def head_dims(q, v) -> Optional[Decline]:
    lo, hi = HEAD_DIM_RANGE
    for name, t in (("head dim", q), ("value head dim", v)):
        d = size_hint(t.shape[-1])
        if d is None or not lo <= d <= hi:
            return Decline("head_dim", f"{name} {t.shape[-1]} outside {lo}..{hi}")
    return None


def seq_len(k, min_seq_len: int) -> Optional[Decline]:
    if min_seq_len <= 0 or not isinstance(k.shape[-2], int):
        # a symbolic length serves every length: rewrite, and let the op dispatch at run time
        return None
    s = size_hint(k.shape[-2])
    if s is not None and s < min_seq_len:
        return Decline("min_seq_len", f"key length {s} < min_seq_len={min_seq_len}")
    return None


def short_attention(q, k, v) -> Optional[Decline]:
    """CUDA sites whose static sizes make the sparse path pointless (``dense_policy.static_dense_reason``:
    few key blocks, or little work) stay as written: the dense attention they already are, with
    its mask if any, compiles and runs exactly as in Inductor's default compile. Symbolic sizes
    are rewritten (the op decides at run time); on CPU the op is its reference either way."""
    if q.device.type != "cuda":
        return None
    from aether_compile import dense_policy, ops

    q4 = tuple(q.shape) if q.dim() == 4 else (1, *q.shape)
    B, H, L, D = q4
    S, DV = k.shape[-2], v.shape[-1]
    block_n = ops.resolve_blocks(q, v, None, None, k)[1]
    reason = dense_policy.static_dense_reason(B, H, L, S, D, DV, block_n, exact_dense=True)
    return None if reason is None else Decline("short", f"dense is faster: {reason}")


def short_decode(q, k, v) -> Optional[Decline]:
    """CUDA decode sites whose cache is too small for skipping to repay the bounds' read and
    the extra launches (``dense_policy.decode_dense_reason``) stay as written."""
    if q.device.type != "cuda":
        return None
    from aether_compile import dense_policy

    reason = dense_policy.decode_dense_reason(k.shape[0], k.shape[1], k.shape[2], k.shape[3],
                                              v.shape[3], k.element_size())
    return None if reason is None else Decline("short", f"dense is faster: {reason}")


def excluded(module: str, module_type: str, patterns) -> Optional[Decline]:
    for pat in patterns:
        if (module == pat or module.startswith(pat + ".") or fnmatch.fnmatchcase(module, pat)
                or (module_type and module_type == pat)):
            return Decline("excluded", f"module {module or module_type!r} excluded by {pat!r}")
    return None


def constant_scale(value) -> Optional[float]:
    """The Python number a scale argument holds, else None (tensor, SymFloat, node)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def symbolic_scalar(value) -> bool:
    """A graph node holding a traced Python number (SymFloat/SymInt), e.g. a float module attribute
    Dynamo lifted to an input under dynamic shapes (``scaling.item()``). Passed through as is."""
    from torch.fx import Node

    if not isinstance(value, Node):
        return False
    v = value.meta.get("example_value", value.meta.get("val"))
    return isinstance(v, (torch.SymFloat, torch.SymInt))


def fill_masks_out(value) -> bool:
    """True when masked_fill/where writes a value that removes the key (-inf, finfo.min, -1e4...)."""
    v = constant_scale(value)
    return v is not None and (v == -math.inf or v <= MASKED_FILL_MAX)


def dropout(p, training) -> Optional[Decline]:
    """Dropout is identity when p == 0 or not training; otherwise the site stays dense."""
    if training is False:
        return None
    pv = constant_scale(p)
    if pv is None:
        return Decline("dropout", f"dropout probability {p!r} is not a constant")
    if pv == 0.0:
        return None
    if training is True:
        return Decline("dropout", f"dropout p={pv:g} in training")
    return Decline("dropout", f"dropout p={pv:g} with non-constant training flag")


def mask_shape(mask, scores_shape) -> Optional[Decline]:
    """A mask must broadcast to the scores without growing them, and be bool or floating."""
    if mask.dtype != torch.bool and not mask.is_floating_point():
        return Decline("mask", f"mask dtype {mask.dtype} (bool or floating point expected)")
    if mask.dim() > len(scores_shape):
        return Decline("mask", f"mask of shape {tuple(mask.shape)} has more dims than the scores")
    try:
        out = torch.broadcast_shapes(tuple(mask.shape), tuple(scores_shape))
    except RuntimeError:
        return Decline("mask", f"mask of shape {tuple(mask.shape)} does not broadcast to scores "
                               f"{tuple(scores_shape)}")
    if len(out) != len(scores_shape) or any(
            size_hint(a) != size_hint(b) for a, b in zip(out, scores_shape)):
        return Decline("mask", f"mask of shape {tuple(mask.shape)} broadcasts scores beyond "
                               f"{tuple(scores_shape)}")
    return None


def mask_grad(mask) -> Optional[Decline]:
    """The op has no gradient for attn_mask: a bias that trains (T5's position bias) stays dense.
    Dynamo compiles under the caller's grad mode (and guards on it), so no_grad graphs are fine."""
    if mask.requires_grad and torch.is_grad_enabled():
        return Decline("mask", "additive bias requires grad (learned bias); the op has no mask "
                               "gradient")
    return None
