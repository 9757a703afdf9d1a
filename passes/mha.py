"""``nn.MultiheadAttention``: Dynamo keeps ``F.multi_head_attention_forward`` (or, on MHA's
inference fast path, ``torch._native_multi_head_attention``) as one opaque call.

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
from .build import Builder, check_replacement, erase_dead, rolled_back_on_failure
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
    native: bool = False  # torch._native_multi_head_attention (batch-first fast path)

    def check(self, options, module: str, module_type: str) -> Optional[Decline]:
        if self.problems:
            return self.problems[0]
        a = self.args
        q, k = ev(a["query"]), ev(a["key"])
        if self.native and k.dim() == 3:
            k = k.transpose(0, 1)  # [N, S, E] -> [S, N, E] like the functional form
        E, H = q.shape[-1], a["num_heads"]
        if not isinstance(H, int) or E % H:
            return Decline("shape", f"embed dim {E} not divisible by num_heads {H}")
        D = E // H
        qh = q.new_empty(1, H, 1, D)
        kh = k.new_empty(1, H, k.shape[0], D)
        if q.dim() == 3:  # [L, N, E], or [N, L, E] on the batch-first native path
            N, L = (q.shape[0], q.shape[1]) if self.native else (q.shape[1], q.shape[0])
        else:
            N, L = 1, q.shape[0]
        return (checks.excluded(module, module_type, options.exclude)
                or checks.dtypes(q, k, ev(a["value"]))
                or checks.head_dims(qh, qh)
                or checks.device(q, options.allow_cpu)
                or checks.seq_len(kh, options.min_seq_len)
                or checks.short_attention(q.new_empty(N, H, L, D), kh, kh))

    def apply(self, gm, options) -> None:
        a = self.args
        b = Builder(gm.graph, self.node, self.node, [ev(a["query"])])
        with rolled_back_on_failure(b, "rewrite"):
            if self.native:
                new = b.fn(native_mha_forward, a["query"], a["key"], a["value"], a["num_heads"],
                           a["in_proj_weight"], a["in_proj_bias"], a["out_proj_weight"],
                           a["out_proj_bias"], a["mask"], a["mask_type"], options.eps)
            else:
                new = b.fn(mha_forward, a["query"], a["key"], a["value"], a["num_heads"],
                           a["in_proj_weight"], a["in_proj_bias"], a["out_proj_weight"],
                           a["out_proj_bias"], a["key_padding_mask"], a["attn_mask"],
                           a["q_proj_weight"], a["k_proj_weight"], a["v_proj_weight"],
                           options.eps)
            check_replacement(ev(self.node)[0], ev(new)[0])
        self.node.replace_all_uses_with(new)
        erase_dead(gm.graph, [self.node])


_NATIVE_PARAMS = ("query", "key", "value", "embed_dim", "num_head", "qkv_weight", "qkv_bias",
                  "proj_weight", "proj_bias", "mask", "need_weights", "average_attn_weights",
                  "mask_type")


def native_mha_forward(query, key, value, num_heads: int, qkv_weight, qkv_bias, proj_weight,
                       proj_bias, mask, mask_type, eps):
    """torch._native_multi_head_attention (MHA's inference fast path; batch-first) on the op.
    mask (bool, True = masked out): mask_type 0 -> [L, S], 1 -> key padding [N, S], 2 -> merged
    [N, H, L, S]."""
    attn_mask = key_padding_mask = None
    if mask is not None:
        if mask_type == 1:
            key_padding_mask = mask
        else:
            attn_mask = mask
    q, k, v = (t.transpose(0, 1) if t.dim() == 3 else t for t in (query, key, value))
    out, _ = mha_forward(q, k, v, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias,
                         key_padding_mask, attn_mask, None, None, None, eps)
    return (out.transpose(0, 1) if out.dim() == 3 else out), None


def _native_match(node: Node) -> Optional[MhaMatch]:
    a = {"need_weights": True, "average_attn_weights": True, "mask_type": None, "mask": None}
    a.update(zip(_NATIVE_PARAMS, node.args))
    a.update(node.kwargs)
    problems = []
    if any(u.op == "call_function" and len(u.args) > 1 and u.args[1] == 1 and u.users
           for u in node.users) and a["need_weights"] is not False:
        problems.append(Decline("weights_used", "attention weights are returned (need_weights)"))
    m = a["mask"]
    if m is not None:
        v = ev(m)
        if not isinstance(v, torch.Tensor) or not (v.dtype == torch.bool or v.is_floating_point()) \
                or \
                a["mask_type"] not in (0, 1, 2) or (a["mask_type"] == 2 and v.dim() != 4):
            problems.append(Decline("mask", f"native MHA mask {getattr(v, 'dtype', v)} "
                                            f"type {a['mask_type']}"))
    if not isinstance(ev(a["query"]), torch.Tensor) or ev(a["query"]).dim() != 3:
        problems.append(Decline("shape", "query is not [N, L, E]"))
    args = dict(query=a["query"], key=a["key"], value=a["value"], num_heads=a["num_head"],
                in_proj_weight=a["qkv_weight"], in_proj_bias=a["qkv_bias"],
                out_proj_weight=a["proj_weight"], out_proj_bias=a["proj_bias"], mask=a["mask"],
                mask_type=a["mask_type"])
    return MhaMatch(node, args, problems, mask_kind="native" if m is not None else "none",
                    native=True)


def match(node: Node) -> Optional[MhaMatch]:
    if node.op == "call_function" and node.target is torch._native_multi_head_attention:
        return _native_match(node)
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
