"""Normalise function / method / operator spellings of the ops attention is written with.

Each recogniser takes an ``fx.Node`` and returns its arguments in one canonical form, or None when
the node is not that op. Nothing here looks further than the node itself.
"""

from __future__ import annotations

import operator
from typing import Any, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch.fx import Node

from aether_compile._compat import sdpa_targets


def _fn(node: Node, *targets) -> bool:
    return node.op == "call_function" and node.target in targets


def _method(node: Node, *names) -> bool:
    return node.op == "call_method" and node.target in names


def _get(node: Node, idx: int, name: str, default: Any = None) -> Any:
    if len(node.args) > idx:
        return node.args[idx]
    return node.kwargs.get(name, default)


def ev(x) -> Any:
    """The FakeTensor (or SymInt, constant) a node argument stands for."""
    if isinstance(x, Node):
        return x.meta.get("example_value", x.meta.get("val"))
    return x


def is_tensor_node(x) -> bool:
    return isinstance(x, Node) and isinstance(ev(x), torch.Tensor)


# -- matmul family -------------------------------------------------------------------------------
def matmul_args(node: Node) -> Optional[tuple[Node, Node]]:
    """(a, b) for a @ b spelled matmul / @ / bmm (function, method or operator)."""
    if _fn(node, torch.matmul, operator.matmul, torch.bmm, torch.Tensor.matmul, torch.Tensor.bmm) \
            or _method(node, "matmul", "bmm", "__matmul__"):
        a = _get(node, 0, "input")
        b = _get(node, 1, "other", node.kwargs.get("mat2"))
    else:
        return None
    if not (is_tensor_node(a) and is_tensor_node(b)):
        return None
    return a, b


class Baddbmm(NamedTuple):
    input: Any
    b1: Node
    b2: Node
    beta: Any
    alpha: Any


def baddbmm_args(node: Node) -> Optional[Baddbmm]:
    """beta * input + alpha * (batch1 @ batch2)."""
    if not (_fn(node, torch.baddbmm, torch.Tensor.baddbmm) or _method(node, "baddbmm")):
        return None
    return Baddbmm(_get(node, 0, "input"), _get(node, 1, "batch1"), _get(node, 2, "batch2"),
                   node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1))


def einsum_args(node: Node) -> Optional[tuple[str, list]]:
    if not _fn(node, torch.einsum, torch.functional.einsum):
        return None
    if not node.args:
        return None
    eq, *ops = node.args
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = list(ops[0])
    if not isinstance(eq, str) or len(ops) != 2 or not all(is_tensor_node(o) for o in ops):
        return None
    return eq.replace(" ", ""), ops


class EinsumPlan(NamedTuple):
    """a @ b as einsum: operand a permuted by perm_a is [batch.., i, d], b by perm_b
    is [batch.., d, j]; the einsum result is the [batch.., i, j] product permuted by out_perm."""

    nbatch: int
    perm_a: tuple[int, ...]
    perm_b: tuple[int, ...]
    out_perm: tuple[int, ...]


def plan_einsum(eq: str) -> Optional[EinsumPlan]:
    """Two-operand einsum that is a batched matrix product with one contracted index."""
    if "->" not in eq or "." in eq:
        return None
    lhs, out = eq.split("->")
    parts = lhs.split(",")
    if len(parts) != 2:
        return None
    a, b = parts
    if any(len(set(s)) != len(s) for s in (a, b, out)):
        return None
    batch = [c for c in a if c in b and c in out]
    d = [c for c in a if c in b and c not in out]
    i = [c for c in a if c not in b and c in out]
    j = [c for c in b if c not in a and c in out]
    if len(d) != 1 or len(i) != 1 or len(j) != 1:
        return None
    if set(a) != set(batch + i + d) or set(b) != set(batch + j + d) or set(out) != set(batch + i + j):
        return None
    lay_a, lay_b, lay_o = batch + i + d, batch + d + j, batch + i + j
    return EinsumPlan(len(batch), tuple(a.index(c) for c in lay_a), tuple(b.index(c) for c in lay_b),
                      tuple(lay_o.index(c) for c in out))


# -- softmax, casts, dropout ---------------------------------------------------------------------
class Softmax(NamedTuple):
    input: Node
    dim: Any
    dtype: Any


def softmax_args(node: Node) -> Optional[Softmax]:
    """F.softmax(x, dim, _stacklevel, dtype) / torch.softmax(x, dim, dtype) / x.softmax(dim, dtype)."""
    if _fn(node, F.softmax):
        return Softmax(_get(node, 0, "input"), _get(node, 1, "dim"), _get(node, 3, "dtype"))
    if _fn(node, torch.softmax, torch.special.softmax, torch.Tensor.softmax) or \
            _method(node, "softmax"):
        return Softmax(_get(node, 0, "input"), _get(node, 1, "dim"), _get(node, 2, "dtype"))
    return None


_CAST_METHODS = ("to", "type", "type_as", "float", "half", "bfloat16", "double", "contiguous",
                 "clone")


def passthrough_input(node: Node) -> Optional[Node]:
    """The input of a dtype cast / contiguous / clone: same values up to rounding, same shape and
    device (``.to(other_device)`` is not one)."""
    if _method(node, *_CAST_METHODS) or _fn(node, torch.clone, torch.Tensor.contiguous):
        x = node.args[0] if node.args else None
        if not is_tensor_node(x) or not isinstance(ev(node), torch.Tensor):
            return None
        a, b = ev(x), ev(node)
        if a.device != b.device or tuple(a.shape) != tuple(b.shape):
            return None
        return x
    return None


class Dropout(NamedTuple):
    input: Node
    p: Any
    training: Any


def dropout_args(node: Node) -> Optional[Dropout]:
    if _fn(node, F.dropout, torch.nn.functional.dropout):
        return Dropout(_get(node, 0, "input"), _get(node, 1, "p", 0.5), _get(node, 2, "training", True))
    if _fn(node, torch.dropout, torch.nn.functional.dropout1d):
        return Dropout(_get(node, 0, "input"), _get(node, 1, "p"), _get(node, 2, "train"))
    return None


# -- scale, masks --------------------------------------------------------------------------------
def scale_args(node: Node) -> Optional[tuple[Node, Any, bool]]:
    """(tensor, factor, divide) for x * c, c * x, x / c in any spelling."""
    if _fn(node, operator.mul, operator.imul, torch.mul, torch.Tensor.mul) or \
            _method(node, "mul", "__mul__", "mul_", "__rmul__"):
        a, b = _get(node, 0, "input"), _get(node, 1, "other")
        if is_tensor_node(a) and not is_tensor_node(b):
            return a, b, False
        if is_tensor_node(b) and not is_tensor_node(a):
            return b, a, False
        return None
    if _fn(node, operator.truediv, operator.itruediv, torch.div, torch.true_divide,
           torch.Tensor.div) or _method(node, "div", "__truediv__", "div_", "true_divide"):
        if node.kwargs.get("rounding_mode") is not None:
            return None
        a, b = _get(node, 0, "input"), _get(node, 1, "other")
        if is_tensor_node(a) and not is_tensor_node(b):
            return a, b, True
    return None


def tensor_scale_args(node: Node) -> Optional[tuple[Node, Node]]:
    """(tensor, factor-tensor) for x * t / x / t with a 0-d or 1-element tensor factor."""
    if _fn(node, operator.mul, operator.truediv, torch.mul, torch.div) or \
            _method(node, "mul", "div", "__mul__", "__truediv__"):
        a, b = _get(node, 0, "input"), _get(node, 1, "other")
        if is_tensor_node(a) and is_tensor_node(b) and ev(b).numel() == 1:
            return a, b
        if is_tensor_node(a) and is_tensor_node(b) and ev(a).numel() == 1 and \
                node.target in (operator.mul, torch.mul, "mul", "__mul__"):
            return b, a
    return None


def add_args(node: Node) -> Optional[tuple[Any, Any]]:
    if _fn(node, operator.add, operator.iadd, torch.add, torch.Tensor.add) or \
            _method(node, "add", "__add__", "add_", "__radd__"):
        if node.kwargs.get("alpha", 1) != 1:
            return None
        return _get(node, 0, "input"), _get(node, 1, "other")
    return None


def masked_fill_args(node: Node) -> Optional[tuple[Node, Any, Any]]:
    """(x, mask, value) for x.masked_fill(mask, value) / torch.masked_fill."""
    if _fn(node, torch.masked_fill, torch.Tensor.masked_fill) or \
            _method(node, "masked_fill", "masked_fill_"):
        return _get(node, 0, "input"), _get(node, 1, "mask"), _get(node, 2, "value")
    return None


def where_args(node: Node) -> Optional[tuple[Any, Any, Any]]:
    if _fn(node, torch.where) and len(node.args) + len(node.kwargs) == 3:
        return _get(node, 0, "condition"), _get(node, 1, "input"), _get(node, 2, "other")
    return None


# -- layout --------------------------------------------------------------------------------------
def swaps_last_two(node: Node) -> Optional[Node]:
    """x for x.transpose(-2, -1) / transpose(2, 3) / permute(.., last two swapped) / x.mT."""
    x = node.args[0] if node.args else None
    if not is_tensor_node(x):
        return None
    nd = ev(x).dim()
    if _fn(node, torch.transpose) or _method(node, "transpose"):
        dims = {d % nd for d in node.args[1:3] if isinstance(d, int)}
        return x if dims == {nd - 2, nd - 1} else None
    if _fn(node, torch.permute) or _method(node, "permute"):
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) \
            else node.args[1:]
        if not all(isinstance(d, int) for d in dims):
            return None
        dims = [d % nd for d in dims]
        want = list(range(nd - 2)) + [nd - 1, nd - 2]
        return x if dims == want else None
    if node.op == "call_function" and node.target is getattr and node.args[1:2] == ("mT",):
        return x
    return None


def is_sdpa(node: Node) -> bool:
    return node.op == "call_function" and node.target in sdpa_targets()


SDPA_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
SDPA_DEFAULTS = (None, None, None, None, 0.0, False, None, False)


def sdpa_args(node: Node) -> dict:
    out = dict(zip(SDPA_PARAMS, SDPA_DEFAULTS))
    out.update(zip(SDPA_PARAMS, node.args))
    out.update(node.kwargs)
    return out


def unrepeat_kv(node: Node) -> Optional[tuple[Node, int]]:
    """(x, n_rep) when node is HF repeat_kv(x) (x[:, :, None].expand(..).reshape(..)) or
    x.repeat_interleave(n_rep, dim=1) of a 4-D [B, Hkv, S, D] tensor."""
    out = ev(node)
    if not isinstance(out, torch.Tensor) or out.dim() != 4:
        return None
    if _fn(node, torch.repeat_interleave) or _method(node, "repeat_interleave"):
        x = _get(node, 0, "input")
        reps = _get(node, 1, "repeats")
        dim = _get(node, 2, "dim")
        if is_tensor_node(x) and isinstance(reps, int) and dim in (1, -3) and ev(x).dim() == 4:
            return x, reps
        return None
    if not (_method(node, "reshape", "view") or _fn(node, torch.reshape)):
        return None
    exp = node.args[0] if node.args else None
    if not (isinstance(exp, Node) and _method(exp, "expand") and len(exp.users) == 1):
        return None
    e = ev(exp)
    unsq = exp.args[0]
    if not isinstance(unsq, Node) or e is None or e.dim() != 5:
        return None
    x = None
    if unsq.op == "call_function" and unsq.target is operator.getitem:
        idx = unsq.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
        full = slice(None, None, None)
        if all(i is None or i == full or i is Ellipsis for i in idx) and \
                [i for i in idx if i is not Ellipsis][:3] == [full, full, None]:
            x = unsq.args[0]
    elif _method(unsq, "unsqueeze") or _fn(unsq, torch.unsqueeze):
        if _get(unsq, 1, "dim") in (2, -3):
            x = unsq.args[0] if unsq.args else None
    if not is_tensor_node(x):
        return None
    xs = ev(x)
    if xs.dim() != 4 or tuple(e.shape[:2]) != tuple(xs.shape[:2]) or \
            tuple(e.shape[3:]) != tuple(xs.shape[2:]):
        return None
    rep = e.shape[2]
    if not isinstance(rep, int) or tuple(out.shape) != (xs.shape[0], xs.shape[1] * rep,
                                                        xs.shape[2], xs.shape[3]):
        return None
    return x, rep


def constant_tensor_value(x) -> Any:
    """The number a one-element tensor built in the graph from a constant holds
    (``torch.tensor(-inf)``, ``torch.full([], finfo.min)``, ``torch.scalar_tensor(c)``, possibly
    followed by a cast); else None. Fake values carry no data, so only the graph can tell."""
    for _ in range(4):
        if not isinstance(x, Node) or x.op not in ("call_function", "call_method"):
            return None
        if _fn(x, torch.tensor, torch.scalar_tensor, torch.as_tensor):
            v = _get(x, 0, "data", x.kwargs.get("s"))
            return v if isinstance(v, (int, float)) and not isinstance(v, bool) else None
        if _fn(x, torch.full):
            size, v = _get(x, 0, "size"), _get(x, 1, "fill_value")
            if isinstance(v, (int, float)) and not isinstance(v, bool) and \
                    isinstance(size, (list, tuple)) and all(d == 1 for d in size):
                return v
            return None
        nxt = passthrough_input(x)
        if nxt is None:
            return None
        x = nxt
    return None
