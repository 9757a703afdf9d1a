"""``F.scaled_dot_product_attention`` (every argument) -> ``aether.attention``."""

from __future__ import annotations

from typing import Optional

from torch.fx import Node

from . import checks
from .common import AttentionMatch, Operand, unrepeat_pair
from .site import Decline
from .spellings import ev, is_sdpa, is_tensor_node, sdpa_args

PATTERN = "sdpa"


def match(node: Node) -> Optional[AttentionMatch]:
    if not is_sdpa(node):
        return None
    a = sdpa_args(node)
    q, k, v = Operand(a["query"]), Operand(a["key"]), Operand(a["value"])
    problems = []
    r = checks.dropout(a["dropout_p"], True)
    if r is not None:
        problems.append(Decline("dropout", f"SDPA {r.message.replace(' in training', '')} "
                                           "(training)") if r.code == "dropout" else r)
    scale, scale_nodes = a["scale"], []
    if checks.symbolic_scalar(scale):
        scale, scale_nodes = None, [(a["scale"], False)]
    elif scale is not None:
        scale = checks.constant_scale(scale)
        if scale is None:
            problems.append(Decline("scale", f"non-constant scale {a['scale']}"))
    for flag in ("is_causal", "enable_gqa"):
        if not isinstance(a[flag], bool):
            problems.append(Decline("pattern", f"non-constant {flag}={a[flag]}"))
    gqa = a["enable_gqa"] is True
    if not gqa and all(is_tensor_node(t.node) for t in (q, k, v)):
        k, v, gqa = unrepeat_pair(k, v, ev(q.node).shape[-3])
        qv, kv, vv = ev(q.node), ev(k.node), ev(v.node)
        if not gqa and qv.dim() == kv.dim() == vv.dim() == 4 and kv.shape[1] == vv.shape[1] == 1 \
                and qv.shape[1] != 1:
            gqa = True  # multi-query attention by broadcasting (Falcon): one kv head for all
    mask = a["attn_mask"]
    mask_values, kind = [], "none"
    if mask is not None:
        if not is_tensor_node(mask):
            problems.append(Decline("mask", f"attn_mask {mask!r} is not a tensor"))
        else:
            mask_values = [ev(mask)]
            kind = "bool" if ev(mask).dtype.is_floating_point is False else "additive"
    if a["is_causal"] is True:
        kind = "causal" if kind == "none" else f"causal+{kind}"
    return AttentionMatch(
        pattern=PATTERN, anchor=node, replace=node, q=q, k=k, v=v, scale=scale,
        is_causal=a["is_causal"] is True, enable_gqa=gqa,
        mask=(lambda b: mask) if mask_values else (lambda b: None),
        mask_values=mask_values, mask_kind=kind, problems=problems, scale_nodes=scale_nodes,
        visited=[a["key"], a["value"]] if gqa and a["enable_gqa"] is not True else [])
