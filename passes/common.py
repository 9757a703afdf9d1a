"""What every matcher produces (``AttentionMatch``) and the one routine that rewrites it."""

from __future__ import annotations

from dataclasses import dataclass, field
import operator
from typing import Any, Callable, Optional

import torch
from torch.fx import GraphModule, Node

from . import checks
from .build import Builder, check_replacement, erase_dead, rolled_back_on_failure
from .site import Decline
from .spellings import ev, scale_args, unrepeat_kv


@dataclass
class Operand:
    """A tensor the op reads: ``node`` permuted by ``perm`` (if any), then the last two dims
    swapped when ``transpose``, then dim 0 split into (-1, ``heads``) when ``heads``."""

    node: Node
    perm: Optional[tuple[int, ...]] = None
    transpose: bool = False
    heads: Optional[int] = None

    def value(self) -> torch.Tensor:
        t = ev(self.node)
        if self.perm is not None:
            t = t.permute(*self.perm)
        if self.transpose:
            t = t.transpose(-2, -1)
        return t.unflatten(0, (-1, self.heads)) if self.heads else t

    def build(self, b: Builder) -> Node:
        n = self.node
        if self.perm is not None and list(self.perm) != list(range(len(self.perm))):
            n = b.method("permute", n, *self.perm)
        if self.transpose:
            n = b.method("transpose", n, -2, -1)
        if self.heads:
            n = b.method("unflatten", n, 0, (-1, self.heads))
        return n


MaskBuilder = Callable[[Builder], Optional[Node]]


@dataclass
class AttentionMatch:
    pattern: str
    anchor: Node  # where the site "is" (module path, source line)
    replace: Node  # whose uses take the op's output
    q: Operand
    k: Operand
    v: Operand
    scale: Optional[float]  # constant part (None: SDPA's default 1/sqrt(E))
    is_causal: bool = False
    enable_gqa: bool = False
    mask: MaskBuilder = lambda b: None
    mask_values: list = field(default_factory=list)  # fake masks, for shape checks
    mask_kind: str = "none"
    out_perm: Optional[tuple[int, ...]] = None
    problems: list[Decline] = field(default_factory=list)
    visited: list[Node] = field(default_factory=list)  # matched nodes, erased once dead
    scale_nodes: list = field(default_factory=list)  # (symbolic scalar node, divide) factors


def build_scale(b: Builder, const: Optional[float], factors) -> Any:
    """The op's scale argument: a float, or a node multiplying symbolic factors by the constant."""
    if not factors:
        return None if const is None else float(const)
    out = None
    for node, div in factors:
        f = b.fn(operator.truediv, 1.0, node) if div else node
        out = f if out is None else b.fn(operator.mul, out, f)
    if const is not None and const != 1.0:
        out = b.fn(operator.mul, out, float(const))
    return out


def peel_scale(node: Node) -> tuple[Node, float]:
    """Strip constant mul/div from a single-use q or k: (inner node, factor)."""
    factor = 1.0
    while len(node.users) == 1:
        r = scale_args(node)
        if r is None:
            break
        inner, c, div = r
        c = checks.constant_scale(c)
        if c is None or c == 0.0:
            break
        factor *= 1.0 / c if div else c
        node = inner
    return node, factor


def unrepeat_pair(k: Operand, v: Operand, n_heads) -> tuple[Operand, Operand, bool]:
    """Undo repeat_kv / repeat_interleave on both k and v (same factor) -> enable_gqa."""
    if k.perm is not None or v.perm is not None or k.transpose or v.transpose:
        return k, v, False
    rk, rv = unrepeat_kv(k.node), unrepeat_kv(v.node)
    if rk is None or rv is None or rk[1] != rv[1]:
        return k, v, False
    return Operand(rk[0]), Operand(rv[0]), True


def check_common(m: AttentionMatch, options, module: str, module_type: str,
                 decode: bool = False) -> Optional[Decline]:
    """Structural problems first (they hold on any device), then options and hardware. A
    ``decode`` site (a few rows against a KV cache) has its own size rule."""
    if m.problems:
        return m.problems[0]
    q, k, v = m.q.value(), m.k.value(), m.v.value()
    if not (q.dim() == k.dim() == v.dim() and q.dim() in (3, 4)):
        return Decline("shape", f"query/key/value ranks {q.dim()}, {k.dim()}, {v.dim()} "
                                "(3-D or 4-D expected)")
    if q.dim() == 4:
        B, H = q.shape[:2]
        ok = k.shape[0] == B and v.shape[0] == B and k.shape[1] == v.shape[1] and (
            k.shape[1] == H or (m.enable_gqa and H % k.shape[1] == 0))
    else:
        ok = k.shape[0] == q.shape[0] == v.shape[0]
    if not ok or k.shape[-1] != q.shape[-1] or k.shape[-2] != v.shape[-2]:
        return Decline("shape", f"shapes q{tuple(q.shape)} k{tuple(k.shape)} v{tuple(v.shape)} "
                                "are not [B, H, L, E] / [B, Hkv, S, E] / [B, Hkv, S, Ev]")
    out = ev(m.replace)
    if isinstance(out, torch.Tensor) and out.dtype != q.dtype:
        return Decline("dtype", f"attention output is {out.dtype} but query is {q.dtype}")
    scores = (*q.shape[:-1], k.shape[-2])
    for mv in m.mask_values:
        r = checks.mask_shape(mv, scores) or checks.mask_grad(mv)
        if r is not None:
            return r
    return (checks.excluded(module, module_type, options.exclude)
            or checks.dtypes(q, k, v)
            or checks.head_dims(q, v)
            or checks.device(q, options.allow_cpu)
            or checks.seq_len(k, options.min_seq_len)
            or (checks.short_decode(q, k, v) if decode else checks.short_attention(q, k, v)))


def apply(gm: GraphModule, m: AttentionMatch, options) -> None:
    """Insert ``aether.attention`` for the match, reroute users, erase what died. On any failure the
    graph is restored and a Decline raised."""
    graph = gm.graph
    q_val = m.q.value()
    three_d = q_val.dim() == 3
    b = Builder(graph, m.replace, m.anchor, [q_val, ev(m.replace)])
    with rolled_back_on_failure(b, "rewrite"):
        q, k, v = m.q.build(b), m.k.build(b), m.v.build(b)
        if three_d:  # [B*H, L, E] -> [1, B*H, L, E]; a 3-D mask broadcasts over the new batch dim
            q, k, v = (b.method("unsqueeze", t, 0) for t in (q, k, v))
        mask = m.mask(b)
        scale = build_scale(b, m.scale, m.scale_nodes)
        out = b.fn(torch.ops.aether.attention.default, q, k, v, mask, bool(m.is_causal), scale,
                   bool(m.enable_gqa), options.eps)
        if three_d:
            out = b.method("squeeze", out, 0)
        if m.out_perm is not None and list(m.out_perm) != list(range(len(m.out_perm))):
            out = b.method("permute", out, *m.out_perm)
        check_replacement(ev(m.replace), ev(out))
    m.replace.replace_all_uses_with(out)
    erase_dead(graph, [m.replace, *reversed(m.visited)])
