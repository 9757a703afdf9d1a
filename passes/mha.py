"""``nn.MultiheadAttention``: Dynamo keeps ``F.multi_head_attention_forward`` as one opaque call.

The call is replaced by ``mha_forward`` (in-projection, ``aether.attention``, out-projection),
which AOT autograd traces through like any Python. Supported: the common self/cross-attention
configuration (no bias_k/bias_v, no add_zero_attn, no static k/v, weights not returned).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.fx import Node

from aether_compile._compat import mha_forward_targets

from . import checks
from .build import Builder, erase_dead
from .site import Decline
from .spellings import ev

PATTERN = "mha"

_PARAMS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight",
           "in_proj_bias", "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight",
           "out_proj_bias", "training", "key_padding_mask", "need_weights", "attn_mask",
           "use_separate_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
           "static_k", "static_v", "average_attn_weights", "is_causal")
_DEFAULTS = dict(training=True, key_padding_mask=None, need_weights=True, attn_mask=None,
                 use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None,
                 v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
                 is_causal=False)


def mha_forward(query, key, value, num_heads: int, in_proj_weight, in_proj_bias, out_proj_weight,
                out_proj_bias, key_padding_mask, attn_mask, q_proj_weight, k_proj_weight,
                v_proj_weight, eps):
    """F.multi_head_attention_forward (sequence-first layout) with aether.attention inside.
    Returns (out, None) like the original with need_weights=False."""
    unbatched = query.dim() == 2
    if unbatched:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    L, N, E = query.shape
    S = key.shape[0]
    H = num_heads
    D = E // H
    if q_proj_weight is not None:
        wq, wk, wv = q_proj_weight, k_proj_weight, v_proj_weight
    else:
        wq, wk, wv = in_proj_weight.chunk(3)
    bq, bk, bv = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
    q = F.linear(query, wq, bq).view(L, N, H, D).permute(1, 2, 0, 3)
    k = F.linear(key, wk, bk).view(S, N, H, D).permute(1, 2, 0, 3)
    v = F.linear(value, wv, bv).view(S, N, H, D).permute(1, 2, 0, 3)
    mask = None
    if attn_mask is not None:  # MHA's bool masks are True = masked out (SDPA's are True = keep)
        m = attn_mask if attn_mask.dim() == 2 else attn_mask.view(N, H, L, S)
        mask = ~m if m.dtype == torch.bool else m
    if key_padding_mask is not None:
        kpm = key_padding_mask.view(N, 1, 1, S)
        if kpm.dtype == torch.bool:
            keep = ~kpm
            if mask is None:
                mask = keep
            elif mask.dtype == torch.bool:
                mask = mask & keep
            else:
                mask = mask.masked_fill(kpm, -math.inf)
        elif mask is None:
            mask = kpm
        elif mask.dtype == torch.bool:
            mask = torch.where(mask, kpm, -math.inf)
        else:
            mask = mask + kpm
    out = torch.ops.aether.attention.default(q, k, v, mask, False, None, False, eps)
    out = F.linear(out.permute(2, 0, 1, 3).reshape(L, N, E), out_proj_weight, out_proj_bias)
    return (out.squeeze(1) if unbatched else out), None


@dataclass
class MhaMatch:
    node: Node
    args: dict
    problems: list
    pattern: str = PATTERN
    mask_kind: str = "none"
    enable_gqa: bool = False
    scale: Optional[float] = None

    def check(self, options, module: str, module_type: str) -> Optional[Decline]:
        if self.problems:
            return self.problems[0]
        a = self.args
        q, k = ev(a["query"]), ev(a["key"])
        E, H = q.shape[-1], a["num_heads"]
        if not isinstance(H, int) or E % H:
            return Decline("shape", f"embed dim {E} not divisible by num_heads {H}")
        D = E // H
        qh = q.new_empty(1, H, 1, D)
        kh = k.new_empty(1, H, k.shape[0], D)
        return (checks.excluded(module, module_type, options.exclude)
                or checks.dtypes(q, k, ev(a["value"]))
                or checks.head_dims(qh, qh)
                or checks.device(q, options.allow_cpu)
                or checks.seq_len(kh, options.min_seq_len))

    def apply(self, gm, options) -> None:
        a = self.args
        b = Builder(gm.graph, self.node, self.node, [ev(a["query"])])
        try:
            new = b.fn(mha_forward, a["query"], a["key"], a["value"], a["num_heads"],
                       a["in_proj_weight"], a["in_proj_bias"], a["out_proj_weight"],
                       a["out_proj_bias"], a["key_padding_mask"], a["attn_mask"],
                       a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"], options.eps)
            want, got = ev(self.node)[0], ev(new)[0]
            if tuple(want.shape) != tuple(got.shape) or want.dtype != got.dtype:
                raise Decline("internal_error", f"replacement gives {tuple(got.shape)}, site "
                                                f"{tuple(want.shape)}")
        except Decline:
            b.rollback()
            raise
        except Exception as e:
            b.rollback()
            raise Decline("internal_error", f"rewrite failed: {type(e).__name__}: {e}") from e
        self.node.replace_all_uses_with(new)
        erase_dead(gm.graph, [self.node])


def match(node: Node) -> Optional[MhaMatch]:
    if not (node.op == "call_function" and node.target in mha_forward_targets()):
        return None
    a = dict(_DEFAULTS)
    a.update(zip(_PARAMS, node.args))
    a.update(node.kwargs)
    problems = []
    for name in ("bias_k", "bias_v", "static_k", "static_v"):
        if a[name] is not None:
            problems.append(Decline("pattern", f"MultiheadAttention with {name}"))
    if a["add_zero_attn"]:
        problems.append(Decline("pattern", "MultiheadAttention with add_zero_attn"))
    r = checks.dropout(a["dropout_p"], a["training"])
    if r is not None:
        problems.append(r)
    weights_used = any(u.op == "call_function" and len(u.args) > 1 and u.args[1] == 1 and u.users
                       for u in node.users)
    if a["need_weights"] is not False and weights_used:
        problems.append(Decline("weights_used", "attention weights are returned (need_weights)"))
    if any(not (u.op == "call_function" and u.target.__name__ == "getitem") for u in node.users):
        problems.append(Decline("pattern", "MultiheadAttention output used as a tuple"))
    kinds = []
    for name in ("attn_mask", "key_padding_mask"):
        m = a[name]
        if m is not None:
            v = ev(m)
            if not isinstance(v, torch.Tensor) or not (v.dtype == torch.bool or v.is_floating_point()):
                problems.append(Decline("mask", f"{name} of dtype {getattr(v, 'dtype', v)}"))
            elif checks.mask_grad(v) is not None:
                problems.append(checks.mask_grad(v))
            kinds.append(name)
    if not isinstance(ev(a["query"]), torch.Tensor) or ev(a["query"]).dim() not in (2, 3):
        problems.append(Decline("shape", "query is not [L, N, E] or [L, E]"))
    return MhaMatch(node, a, problems, mask_kind="+".join(kinds) or "none")
