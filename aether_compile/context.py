"""``aether_compile.enable()``: the rewrite for graphs compiled with the default Inductor backend.

    with aether_compile.enable(eps=1e-3):
        y = torch.compile(model)(x)        # compiled inside: attention rewritten

    @aether_compile.enable(allow_cpu=True)
    def run(...): ...

It installs ``AetherPass`` as Inductor's ``pre_grad_custom_pass``, chaining whatever pass was set,
and restores the previous value on exit (also on exceptions). Contexts nest; the innermost options
win. Only compiles that happen inside are affected: Dynamo does not recompile code that was
compiled before, and a backward compiled lazily after exit misses nothing (the rewrite is in the
forward graph, before AOT autograd).
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from typing import Any, Optional

from . import _compat
from .options import AetherOptions

log = logging.getLogger("aether_compile")


def _source_files() -> tuple[str, ...]:
    from aether_compile import passes

    here = os.path.dirname(os.path.abspath(__file__))
    files = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(passes.__file__)), "*.py")))
    files += [os.path.join(here, f) for f in ("options.py", "_compat.py", "context.py", "ops.py")]
    return tuple(files)


class AetherPass(_compat.CustomGraphPass):
    """Pre-grad custom pass: rewrite attention, then run the pass it chains (if any)."""

    def __init__(self, options: Optional[AetherOptions] = None, chained: Any = None):
        self.options = AetherOptions.coerce(options)
        while isinstance(chained, AetherPass):  # nesting: the innermost options win
            chained = chained.chained
        self.chained = chained

    def __call__(self, graph) -> None:
        from aether_compile.passes import rewrite_attention

        try:
            rewrite_attention(_compat.graph_module_of(graph), self.options)
        except Exception:  # rewrite_attention already guards; belt and braces
            log.exception("aether: pre-grad pass failed; graph left as is")
        for p in _compat.custom_passes(self.chained):
            p(graph)

    def uuid(self) -> Optional[bytes]:
        from aether_compile import __version__

        extra = [__version__, self.options.key()]
        for p in _compat.custom_passes(self.chained):
            u = p.uuid() if hasattr(p, "uuid") else None
            if not u:
                return None  # an uncacheable chained pass makes the pair uncacheable
            extra.append(u.hex() if isinstance(u, bytes) else str(u))
        return _compat.get_hash_for_files(_source_files(), "|".join(extra))


class enable(contextlib.ContextDecorator):
    """Context manager and decorator turning the rewrite on for compiles inside it."""

    def __init__(self, options: Any = None, **kwargs):
        self.options = AetherOptions.coerce(options, **kwargs)
        self._saved: list = []

    def __enter__(self) -> "enable":
        prev = _compat.get_pre_grad_pass()
        self._saved.append(prev)
        _compat.set_pre_grad_pass(AetherPass(self.options, chained=prev))
        return self

    def __exit__(self, *exc) -> bool:
        _compat.set_pre_grad_pass(self._saved.pop())
        return False
