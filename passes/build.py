"""Inserting replacement nodes into a Dynamo graph, with FakeTensor metadata, and undoing it."""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, Iterable, Iterator

import torch
from torch.fx import Graph, Node
from torch.fx.node import map_arg

from .site import Decline
from .spellings import ev

_COPIED_META = ("stack_trace", "nn_module_stack")


class Builder:
    """Creates nodes before ``before``; each gets ``example_value`` computed under the graph's
    fake mode and the anchor's source metadata. ``rollback()`` erases everything it created."""

    def __init__(self, graph: Graph, before: Node, meta_from: Node, fake_values: Iterable[Any]):
        self.graph = graph
        self.before = before
        self.meta_from = meta_from
        self.fake_mode = next((v.fake_mode for v in fake_values if hasattr(v, "fake_mode")), None)
        self.created: list[Node] = []

    def fn(self, target, *args, **kwargs) -> Node:
        return self._make("call_function", target, args, kwargs)

    def method(self, name: str, *args, **kwargs) -> Node:
        return self._make("call_method", name, args, kwargs)

    def _make(self, op: str, target, args: tuple, kwargs: dict) -> Node:
        with self.graph.inserting_before(self.before):
            node = self.graph.create_node(op, target, args, kwargs)
        self.created.append(node)
        for key in _COPIED_META:
            if key in self.meta_from.meta:
                node.meta[key] = self.meta_from.meta[key]
        fargs = map_arg(args, ev)
        fkwargs = map_arg(kwargs, ev)
        with self.fake_mode if self.fake_mode is not None else nullcontext():
            if op == "call_method":
                value = getattr(fargs[0], target)(*fargs[1:], **fkwargs)
            else:
                value = target(*fargs, **fkwargs)
        node.meta["example_value"] = value
        return node

    def rollback(self) -> None:
        for node in reversed(self.created):
            if not node.users:
                self.graph.erase_node(node)
        self.created.clear()


_INPLACE_OPERATORS = ("iadd", "isub", "imul", "itruediv", "iand", "ior")


def _pure(node: Node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if (name.endswith("_") and not name.endswith("__")) or name in _INPLACE_OPERATORS:
        return False
    try:
        return not node.is_impure()
    except Exception:
        return False


def erase_dead(graph: Graph, candidates: Iterable[Node]) -> None:
    """Erase the given nodes once they have no users, and then any pure input of an erased node
    left without users (the matched chain dies back to its real inputs)."""
    work = [n for n in dict.fromkeys(candidates)]
    while work:
        node = work.pop()
        if node._erased or node.users or not _pure(node):
            continue
        inputs = list(node.all_input_nodes)
        graph.erase_node(node)
        work.extend(inputs)


@contextmanager
def rolled_back_on_failure(b: Builder, what: str) -> Iterator[Builder]:
    """Build a replacement with ``b``: on a Decline, or any other error (which becomes a Decline
    naming it), every node ``b`` created is erased, so a failed rewrite leaves the graph as it was
    and never breaks the user's compile."""
    try:
        yield b
    except Decline:
        b.rollback()
        raise
    except Exception as e:
        b.rollback()
        raise Decline("internal_error", f"{what} failed: {type(e).__name__}: {e}") from e


def check_replacement(want, got, what: str = "replacement") -> None:
    """The replacement's example value must have the site's shape and dtype."""
    if tuple(want.shape) != tuple(got.shape) or want.dtype != got.dtype:
        raise Decline("internal_error", f"{what} gives {tuple(got.shape)} {got.dtype}, site "
                                        f"gives {tuple(want.shape)} {want.dtype}")
