"""``aether_compile.enable()``: the rewrite for graphs compiled with the default Inductor backend.

    with aether_compile.enable(eps=1e-3):
        y = torch.compile(model)(x)        # compiled inside: attention rewritten

    @aether_compile.enable(allow_cpu=True)
    def run(...): ...

It installs ``AetherPass`` as Inductor's ``pre_grad_custom_pass``, chaining whatever pass was set,
and a ``CacheSalt`` as ``post_grad_custom_post_pass`` (chaining that one too; it changes nothing in
the graph, only the cache keys), and restores both previous values on exit (also on exceptions).
Contexts nest; the innermost options win.

A model compiled inside is rewritten even when it first runs after the block: ``torch.compile``
compiles lazily, at the first call, so inside ``enable()`` a ``torch.compile(...)`` call with the
default (Inductor) backend is bound to the aether backend with these options (``mode``,
``options``, ``dynamic``, ``fullgraph`` pass through unchanged). Code compiled earlier and first run
inside is rewritten too (the Inductor pass). A model compiled outside and first run outside is
not; neither is a compile through a reference to ``torch.compile`` taken before the block.

Threads: ``enable()`` changes Inductor's config, and what that reaches depends on torch:

* torch 2.13 keeps config overrides per thread (``_compat.CONFIG_IS_THREAD_LOCAL``): ``enable()``
  affects compiles in the thread that entered it, and only those. Two threads may each hold their
  own ``enable()`` with different options at the same time; a compile that runs in a thread that
  did not enter ``enable()`` (a worker thread, a thread pool) is not rewritten.
* torch 2.11 keeps them process-wide: a block would rewrite every other thread's compiles too and
  interleaved exits would restore the wrong values, so entering ``enable()`` while another thread
  holds one raises ``RuntimeError``. (Nesting in one thread is fine.) Use
  ``torch.compile(model, backend="aether", options=...)`` there, which carries its options per
  compile.

Caching: ``CacheSalt.uuid()`` (and ``AetherPass.uuid()``) hash the options, the sources that shape
a compiled graph (``passes/``, ``kernels/``, the op and backend modules) and the environment
switches that change generated code (``settings.KEYED``), so the FX graph cache and the
AOTAutograd cache never hand a graph compiled under other options, other code or other knobs to
this compile, and identical compiles hit across processes.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import logging
import os
import threading
from typing import Any, Optional

import torch

from . import _compat, settings
from .options import AetherOptions

log = logging.getLogger("aether_compile")

# Modules of the package whose code cannot end up in (or decide) a compiled graph: editing them
# must not invalidate caches. Every other module of the package, passes/ and kernels/ counts.
_NOT_IN_GRAPHS = ("demo.py", "workloads.py", "explain.py", "training_task.py", "settings.py")


def _source_files() -> tuple[str, ...]:
    from aether_compile import kernels, passes

    here = os.path.dirname(os.path.abspath(__file__))
    files = [f for f in sorted(glob.glob(os.path.join(here, "*.py")))
             if os.path.basename(f) not in _NOT_IN_GRAPHS]
    files += sorted(glob.glob(os.path.join(here, "inductor", "*.py")))
    for pkg in (passes, kernels):  # namespace packages: no __file__, one folder each
        for folder in pkg.__path__:
            files += sorted(glob.glob(os.path.join(os.path.abspath(folder), "*.py")))
    return tuple(dict.fromkeys(f for f in files if os.path.isfile(f)))


def _env_knobs() -> tuple[tuple[str, str], ...]:
    return settings.keyed()


_fingerprints: dict = {}
_fingerprint_lock = threading.Lock()


def code_fingerprint() -> str:
    """Hex digest of the package version, the graph-shaping sources and ``settings.keyed()``.
    Recomputed when a file's mtime/size or a knob changes (a stat per file otherwise)."""
    from aether_compile import __version__

    files = _source_files()
    stamp = []
    for f in files:
        st = os.stat(f)
        stamp.append((f, st.st_mtime_ns, st.st_size))
    key = (tuple(stamp), _env_knobs())
    with _fingerprint_lock:
        hit = _fingerprints.get(key)
    if hit is not None:
        return hit
    h = hashlib.sha256()
    h.update(f"aether_compile {__version__}\0".encode())
    for f in files:
        h.update(os.path.basename(os.path.dirname(f)).encode() + b"/" +
                 os.path.basename(f).encode() + b"\0")
        with open(f, "rb") as fh:
            h.update(fh.read())
        h.update(b"\0")
    for k, v in key[1]:
        h.update(f"{k}={v}\0".encode())
    digest = h.hexdigest()
    with _fingerprint_lock:
        if len(_fingerprints) > 16:
            _fingerprints.clear()
        _fingerprints[key] = digest
    return digest


def _chained_uuids(chained) -> Optional[list[str]]:
    """The uuids of the chained passes as text, or None if one of them has none (uncacheable)."""
    out = []
    for p in _compat.custom_passes(chained):
        u = p.uuid() if hasattr(p, "uuid") else None
        if not u:
            return None
        out.append(u.hex() if isinstance(u, bytes) else str(u))
    return out


def _digest(*parts: str) -> bytes:
    return hashlib.sha256("|".join(parts).encode()).digest()


class AetherPass(_compat.CustomGraphPass):
    """Pre-grad custom pass: rewrite attention, then run the pass it chains (if any)."""

    def __init__(self, options: Optional[AetherOptions] = None, chained: Any = None):
        self.options = AetherOptions.coerce(options)
        while isinstance(chained, AetherPass):  # nesting: the innermost options win
            chained = chained.chained
        self.chained = chained

    def __call__(self, graph) -> None:
        from aether_compile.passes.rewrite import rewrite_attention

        try:
            rewrite_attention(_compat.graph_module_of(graph), self.options)
        except Exception:  # rewrite_attention already guards; belt and braces
            log.exception("aether: pre-grad pass failed; graph left as is")
        for p in _compat.custom_passes(self.chained):
            p(graph)

    def uuid(self) -> Optional[bytes]:
        chained = _chained_uuids(self.chained)
        if chained is None:
            return None  # an uncacheable chained pass makes the pair uncacheable
        return _digest("AetherPass", code_fingerprint(), self.options.key(), *chained)


class CacheSalt(_compat.CustomGraphPass):
    """A post-grad pass that only runs the pass it chains; its ``uuid`` puts the aether options,
    sources and knobs into Inductor's FX graph and AOTAutograd cache keys (both torch versions).
    Needed because a rewritten graph names ``aether::attention`` but not the code behind it: the
    Python and Triton code traced into the graph on CUDA, or knobs such as
    ``AETHER_DENSE_FRACTION`` read while tracing, would otherwise not reach the AOTAutograd key."""

    def __init__(self, options: Optional[AetherOptions] = None, chained: Any = None):
        self.options = AetherOptions.coerce(options)
        while isinstance(chained, CacheSalt):
            chained = chained.chained
        self.chained = chained

    def __call__(self, graph) -> None:
        for p in _compat.custom_passes(self.chained):
            p(graph)

    def uuid(self) -> Optional[bytes]:
        chained = _chained_uuids(self.chained)
        if chained is None:
            return None
        return _digest("CacheSalt", code_fingerprint(), self.options.key(), *chained)


# -- enable() ------------------------------------------------------------------------------------
# per thread: a stack of (pre_grad, post_grad) values to restore, and the block's options
_local = threading.local()
_holders: dict[int, int] = {}  # thread ident -> open enable() blocks (process-global config only)
_holders_lock = threading.Lock()


def _saved_stack() -> list:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def _claim_global_config() -> None:
    me = threading.get_ident()
    with _holders_lock:
        others = [t for t, n in _holders.items() if n > 0 and t != me]
        if others:
            raise RuntimeError(
                "aether_compile.enable() is already active in another thread; with this torch "
                f"({_compat.TORCH_VERSION[0]}.{_compat.TORCH_VERSION[1]}) Inductor's config is "
                "process-wide, so a second thread's enable() would rewrite (and restore) the "
                "first thread's compiles too. Use torch.compile(model, backend=\"aether\", "
                "options=...) for per-compile options, or enter enable() from one thread.")
        _holders[me] = _holders.get(me, 0) + 1


def _release_global_config() -> None:
    me = threading.get_ident()
    with _holders_lock:
        n = _holders.get(me, 0) - 1
        if n > 0:
            _holders[me] = n
        else:
            _holders.pop(me, None)


class _EnabledBackend:
    """The ``aether`` backend with an ``enable()`` block's options: what ``torch.compile`` inside
    the block gets instead of Inductor, so the rewrite happens whenever the compile does."""

    __name__ = "aether"

    def __init__(self, options: AetherOptions):
        self.options = options

    def __call__(self, gm, example_inputs, mode: Optional[str] = None, options: Any = None):
        from .backend import aether_backend

        return aether_backend(gm, example_inputs, mode=mode,
                              options={"aether": self.options, **dict(options or {})})


_compile_lock = threading.Lock()
_compile_users = 0  # enable() blocks open in any thread while torch.compile is wrapped
_unwrapped_compile = None


def _options_in_force() -> Optional[AetherOptions]:
    stack = _saved_stack()
    return stack[-1][2] if stack else None


def _compile_in_enable(*args, **kwargs):
    """``torch.compile`` while an ``enable()`` block is open somewhere: compiles in a thread that
    holds one, with Inductor's backend, take the aether backend; everything else passes through."""
    options = _options_in_force()
    if options is not None and kwargs.get("backend", "inductor") == "inductor":
        kwargs["backend"] = _EnabledBackend(options)
    return _unwrapped_compile(*args, **kwargs)


def _wrap_torch_compile() -> None:
    global _compile_users, _unwrapped_compile
    with _compile_lock:
        if _compile_users == 0 and torch.compile is not _compile_in_enable:
            _unwrapped_compile = torch.compile
            functools.update_wrapper(_compile_in_enable, _unwrapped_compile)
            torch.compile = _compile_in_enable
        _compile_users += 1


def _unwrap_torch_compile() -> None:
    global _compile_users
    with _compile_lock:
        _compile_users -= 1
        # Someone who wrapped torch.compile after us keeps their wrapper (ours then passes
        # through, no block being open).
        if _compile_users == 0 and torch.compile is _compile_in_enable:
            torch.compile = _unwrapped_compile


class enable(contextlib.ContextDecorator):
    """Context manager and decorator turning the rewrite on for compiles inside it.

    Thread semantics (see the module docstring): on torch with per-thread Inductor config (2.13)
    it affects only compiles in the entering thread, and threads may hold their own at once; on
    torch with process-wide config (2.11) entering it while another thread holds one raises
    ``RuntimeError``. Each decorated call enters a fresh context, so a decorated function may run
    in several threads or recursively."""

    def __init__(self, options: Any = None, **kwargs):
        self.options = AetherOptions.coerce(options, **kwargs)

    def _recreate_cm(self) -> "enable":  # ContextDecorator: one context per decorated call
        return type(self)(self.options)

    def __enter__(self) -> "enable":
        if not _compat.CONFIG_IS_THREAD_LOCAL:
            _claim_global_config()
        _wrap_torch_compile()
        pushed = False
        try:
            pre, post = _compat.get_pre_grad_pass(), _compat.get_post_grad_post_pass()
            _saved_stack().append((pre, post, self.options))
            pushed = True
            _compat.set_pre_grad_pass(AetherPass(self.options, chained=pre))
            _compat.set_post_grad_post_pass(CacheSalt(self.options, chained=post))
        except BaseException:
            self._restore(pushed)
            raise
        return self

    def _restore(self, pushed: bool = True) -> None:
        try:
            _unwrap_torch_compile()
            if pushed:
                pre, post, _ = _saved_stack().pop()
                _compat.set_pre_grad_pass(pre)
                _compat.set_post_grad_post_pass(post)
        finally:
            if not _compat.CONFIG_IS_THREAD_LOCAL:
                _release_global_config()

    def __exit__(self, *exc) -> bool:
        self._restore()
        return False
