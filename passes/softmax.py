"""softmax(q @ kᵀ · s + mask) @ v, in every spelling -> ``aether.attention``.

Anchored on the softmax: walks back through scale / mask / cast ops to a matmul, bmm, einsum or
baddbmm of q and kᵀ, and forward through casts and dropout to the matmul with v.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch.fx import Node

from . import checks
from .common import AttentionMatch, Operand, peel_scale, unrepeat_pair
from .site import Decline
from .spellings import (add_args, baddbmm_args, constant_tensor_value, dropout_args, einsum_args,
                        ev, is_tensor_node, masked_fill_args, matmul_args, passthrough_input,
                        plan_einsum, scale_args, softmax_args, swaps_last_two, tensor_scale_args,
                        where_args)

PATTERN = "softmax-matmul"
_MAX_CHAIN = 16


@dataclass
class Scores:
    """q @ kᵀ and the elementwise ops between it and the softmax (innermost first)."""

    q: Operand
    k: Operand
    form: str  # matmul / einsum / baddbmm
    shape: tuple
    scale: float = 1.0
    ops: list = field(default_factory=list)  # ("scale", c) | ("add", node) | ("drop", bool, where)
    nodes: list = field(default_factory=list)
    problems: list = field(default_factory=list)


def _peel_upcast(node: Node) -> Node:
    """x for x.float() of a half/bfloat16 x used once: products of half values are exact in
    float32, so q.float() @ k.float() equals the op's fp32-accumulated product."""
    x = passthrough_input(node) if len(node.users) == 1 else None
    if x is not None and ev(x).dtype in (torch.float16, torch.bfloat16) and \
            ev(node).dtype == torch.float32:
        return x
    return node


def _qk(a: Node, b: Node, form: str, node: Node, k_perm=None) -> Optional[Scores]:
    """Scores for a @ b where b is kᵀ (k_perm None) or b permuted by k_perm is k."""
    if ev(a).dim() not in (3, 4) or ev(a).dim() != ev(b).dim():
        return None
    a, fa = peel_scale(_peel_upcast(a))
    b, fb = peel_scale(_peel_upcast(b))
    if k_perm is not None:
        k = Operand(b, k_perm)
    else:
        x = swaps_last_two(b) if len(b.users) == 1 else None
        if x is not None:
            x, fx = peel_scale(x)
            fb *= fx
            k = Operand(x)
        else:
            k = Operand(b, transpose=True)
    return Scores(Operand(a), k, form, tuple(ev(node).shape), scale=fa * fb, nodes=[node])


def _leaf(node: Node) -> Optional[Scores]:
    mm = matmul_args(node)
    if mm is not None:
        bmm = node.target in (torch.bmm, "bmm", torch.Tensor.bmm)
        return _qk(mm[0], mm[1], "bmm" if bmm else "matmul", node)
    es = einsum_args(node)
    if es is not None:
        eq, (a, b) = es
        plan = plan_einsum(eq)
        if plan is None or plan.nbatch not in (1, 2) or list(plan.out_perm) != sorted(plan.out_perm):
            return None
        s = _qk(a, b, "einsum", node, k_perm=plan.perm_b[:-2] + plan.perm_b[-1:] + plan.perm_b[-2:-1])
        if s is not None and list(plan.perm_a) != sorted(plan.perm_a):
            s.q = Operand(s.q.node, plan.perm_a)
        return s
    bd = baddbmm_args(node)
    if bd is not None and is_tensor_node(bd.b1) and is_tensor_node(bd.b2):
        s = _qk(bd.b1, bd.b2, "baddbmm", node)
        if s is None:
            return None
        alpha = checks.constant_scale(bd.alpha)
        beta = checks.constant_scale(bd.beta)
        if alpha is None or beta is None:
            s.problems.append(Decline("scale", f"non-constant baddbmm alpha/beta {bd.alpha}, {bd.beta}"))
        else:
            s.scale *= alpha
            if beta == 1.0 and is_tensor_node(bd.input):
                s.ops.append(("add", bd.input))
            elif beta != 0.0:
                s.problems.append(Decline("mask", f"baddbmm with beta={beta:g}"))
        return s
    return None


def _fill_value_problem(value) -> Optional[Decline]:
    if checks.fill_masks_out(value) or checks.fill_masks_out(constant_tensor_value(value)):
        return None
    return Decline("mask", f"mask fill value {value!r} does not mask keys out (-inf or <= -1e4 "
                           "expected)")


def _bool_mask_problem(mask) -> Optional[Decline]:
    if not is_tensor_node(mask) or ev(mask).dtype != torch.bool:
        return Decline("mask", f"mask {mask} is not a bool tensor")
    return None


def parse_scores(node: Node, depth: int = 0) -> Optional[Scores]:
    """Scores whose last op is ``node``, or None when node is not built from q @ kᵀ."""
    if depth > _MAX_CHAIN or not is_tensor_node(node):
        return None
    s = _leaf(node)
    if s is not None:
        return s
    nxt = depth + 1

    def extend(s: Optional[Scores], op=None, problem=None) -> Optional[Scores]:
        if s is not None:
            if op is not None:
                s.ops.append(op)
            if problem is not None:
                s.problems.append(problem)
            s.nodes.append(node)
        return s

    r = scale_args(node)
    if r is not None:
        x, c, div = r
        s = parse_scores(x, nxt)
        if checks.symbolic_scalar(c):
            return extend(s, op=("symscale", c, div))
        cs = checks.constant_scale(c)
        if cs is None or cs == 0.0:
            return extend(s, problem=Decline("scale", f"non-constant scale {c}"))
        return extend(s, op=("scale", 1.0 / cs if div else cs))
    r = tensor_scale_args(node)
    if r is not None:
        s = parse_scores(r[0], nxt)
        c = constant_tensor_value(r[1])  # torch.full([], sqrt(d)) (transformers 4.x GPT-2)
        if c is not None and c != 0:
            div = node.target in (operator.truediv, torch.div, "div", "__truediv__")
            return extend(s, op=("scale", 1.0 / c if div else float(c)))
        return extend(s, problem=Decline("scale", f"non-constant scale (tensor {r[1]})"))
    r = add_args(node)
    if r is not None:
        for x, m in (r, r[::-1]):
            s = parse_scores(x, nxt) if is_tensor_node(x) else None
            if s is None:
                continue
            if is_tensor_node(m) and ev(m).dtype == torch.bool:
                return extend(s, problem=Decline("mask", "a bool tensor is added to the scores"))
            if is_tensor_node(m):
                return extend(s, op=("add", m))
            if checks.constant_scale(m) is not None:  # a row-constant shift: softmax ignores it
                return extend(s)
            return extend(s, problem=Decline("mask", f"non-constant additive term {m}"))
        return None
    r = masked_fill_args(node)
    if r is not None:
        x, mask, value = r
        s = parse_scores(x, nxt)
        problem = _bool_mask_problem(mask) or _fill_value_problem(value)
        return extend(s, op=None if problem else ("drop", mask, True), problem=problem)
    r = where_args(node)
    if r is not None:
        cond, a, b = r
        for x, other, drop_where in ((a, b, False), (b, a, True)):
            s = parse_scores(x, nxt) if is_tensor_node(x) else None
            if s is None:
                continue
            problem = _bool_mask_problem(cond) or _fill_value_problem(other)
            return extend(s, op=None if problem else ("drop", cond, drop_where), problem=problem)
        return None
    x = passthrough_input(node)
    if x is not None:
        return extend(parse_scores(x, nxt))
    return _split_heads(node, nxt)


def _split_heads(node: Node, depth: int) -> Optional[Scores]:
    """[B*H, L, S] scores viewed as [B, H, L, S] (GPT-2's baddbmm path), before any mask."""
    if not (node.op == "call_method" and node.target in ("view", "reshape")
            or node.op == "call_function" and node.target is torch.reshape):
        return None
    x = node.args[0] if node.args else None
    out = ev(node)
    s = parse_scores(x, depth) if is_tensor_node(x) else None
    if s is None or len(s.shape) != 3 or out.dim() != 4 or s.q.heads or \
            any(op[0] not in ("scale", "symscale") for op in s.ops):
        return None
    H = out.shape[1]
    if not isinstance(H, int) or tuple(out.shape[2:]) != tuple(s.shape[1:]):
        return None
    s.q = Operand(s.q.node, s.q.perm, s.q.transpose, H)
    s.k = Operand(s.k.node, s.k.perm, s.k.transpose, H)
    s.shape = tuple(out.shape)
    s.nodes.append(node)
    return s


def mask_builder(ops):
    """Combine the chain's masks into one SDPA-style attn_mask, as graph nodes."""

    def build(b):
        additive = keep = None
        for op in ops:
            if op[0] == "scale" and additive is not None:
                additive = b.fn(operator.mul, additive, op[1])
            elif op[0] == "symscale" and additive is not None:
                additive = b.fn(operator.truediv if op[2] else operator.mul, additive, op[1])
            elif op[0] == "add":
                additive = op[1] if additive is None else b.fn(operator.add, additive, op[1])
            elif op[0] == "drop":
                k = b.fn(operator.invert, op[1]) if op[2] else op[1]
                keep = k if keep is None else b.fn(operator.and_, keep, k)
        if keep is None:
            return additive
        if additive is None:
            return keep
        return b.fn(torch.where, keep, additive, -math.inf)

    return build


@dataclass
class ProbsUse:
    pv: Node
    v: Operand
    out_perm: Optional[tuple]
    nodes: list
    problems: list


def _feeds_matmul(node: Node, depth: int = 4) -> bool:
    """Whether node reaches the left operand of a matmul / einsum within a few ops."""
    for u in node.users:
        mm = matmul_args(u)
        es = einsum_args(u)
        if (mm is not None and mm[0] is node) or (es is not None and es[1][0] is node):
            return True
        if depth > 0 and u.op in ("call_function", "call_method") and _feeds_matmul(u, depth - 1):
            return True
    return False


def parse_probs(sm: Node) -> Optional[ProbsUse]:
    """Follow the softmax through casts and dropout to the matmul with v. None when the
    probabilities never meet a matmul (not attention); Decline when they do, but not only."""
    if not _feeds_matmul(sm):
        return None
    cur, nodes, problems = sm, [], []
    for _ in range(_MAX_CHAIN):
        users = list(cur.users)
        if len(users) != 1:
            raise Decline("weights_used", "attention weights are used elsewhere "
                                          "(output_attentions?)")
        u = users[0]
        d = dropout_args(u)
        if d is not None and d.input is cur:
            r = checks.dropout(d.p, d.training)
            if r is not None:
                problems.append(r)
            nodes.append(u)
            cur = u
            continue
        if passthrough_input(u) is cur:
            nodes.append(u)
            cur = u
            continue
        mm = matmul_args(u)
        if mm is not None and mm[0] is cur and mm[1] is not cur:
            return ProbsUse(u, Operand(mm[1]), None, nodes, problems)
        es = einsum_args(u)
        if es is not None and es[1][0] is cur and es[1][1] is not cur:
            plan = plan_einsum(es[0])
            if plan is not None and list(plan.perm_a) == sorted(plan.perm_a):
                return ProbsUse(u, Operand(es[1][1], plan.perm_b), plan.out_perm, nodes, problems)
        raise Decline("pattern", f"softmax output feeds {u.op} {getattr(u.target, '__name__', u.target)}")
    raise Decline("pattern", "softmax output chain too long")


def _unparsed_qk(x: Node, depth: int = 8) -> Optional[Node]:
    """When the scores could not be parsed but do come from q @ kᵀ a few ops back (e.g. Gemma-2's
    tanh soft-capping): the first op on the way that the matcher does not know."""
    blocker = None
    for _ in range(depth):
        if not is_tensor_node(x):
            return None
        if _leaf(x) is not None:
            return blocker
        known = (scale_args(x) or tensor_scale_args(x) or add_args(x) or masked_fill_args(x)
                 or where_args(x) or passthrough_input(x))
        if not known and blocker is None:
            blocker = x
        tensors = [a for a in x.all_input_nodes if is_tensor_node(a)]
        if not tensors:
            return None
        x = max(tensors, key=lambda a: ev(a).numel())  # follow the scores, not the mask
    return None


def _value_users(node: Node) -> list:
    """The users of ``node`` that read its values: ``x.type_as(node)`` reads only its dtype (the
    fp32 softmax cast back, ``scores.float().softmax(-1).type_as(scores)``), so it does not count."""
    return [u for u in node.users
            if not (u.op == "call_method" and u.target == "type_as" and len(u.args) == 2
                    and u.args[1] is node and u.args[0] is not node)]


def match(node: Node) -> Optional[AttentionMatch]:
    sm = softmax_args(node)
    if sm is None or not is_tensor_node(sm.input):
        return None
    s = parse_scores(sm.input)
    if s is None:
        blocker = _unparsed_qk(sm.input)
        if blocker is not None and _feeds_matmul(node):
            name = blocker.target if isinstance(blocker.target, str) else \
                getattr(blocker.target, "__name__", str(blocker.target))
            raise Decline("pattern", f"scores pass through {name} (not a scale or a mask)")
        return None
    nd = len(s.shape)
    if not isinstance(sm.dim, int) or sm.dim % nd != nd - 1:
        return None  # not a softmax over keys
    problems = list(s.problems)
    if any(len(_value_users(n)) != 1 for n in s.nodes):
        problems.append(Decline("weights_used", "attention scores are used elsewhere"))
    use = parse_probs(node)
    if use is None:
        return None
    problems += use.problems
    q = s.q
    v = use.v
    if s.q.heads:  # scores were split into heads: v must already be [B, H, S, Ev]
        if ev(v.node).dim() != 4:
            raise Decline("shape", "scores split into heads but v is not 4-D")
    k, v, gqa = unrepeat_pair(s.k, v, None) if nd == 4 else (s.k, v, False)
    if nd == 4 and not gqa and k.value().shape[1] == 1 and v.value().shape[1] == 1 and \
            q.value().shape[1] != 1:
        gqa = True  # multi-query attention written with broadcasting: one kv head for all heads
    scale = s.scale
    for op in s.ops:
        if op[0] == "scale":
            scale *= op[1]
    masks = [op[1] for op in s.ops if op[0] in ("add", "drop")]
    kinds = sorted({"additive" if op[0] == "add" else "bool" for op in s.ops
                    if op[0] in ("add", "drop")})
    return AttentionMatch(
        pattern=f"{PATTERN}({s.form})", anchor=node, replace=use.pv, q=q, k=k, v=v, scale=scale,
        enable_gqa=gqa, mask=mask_builder(s.ops), mask_values=[ev(m) for m in masks],
        scale_nodes=[(op[1], op[2]) for op in s.ops if op[0] == "symscale"],
        mask_kind="+".join(kinds) or "none", out_perm=use.out_perm, problems=problems,
        visited=[use.pv, *use.nodes, node, *s.nodes])
