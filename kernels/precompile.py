"""Compile the opaque prepare op's Triton kernels while Inductor compiles the graph (issue 5).

``aether::prepare_pass`` launches its kernels (geometry, bounds, plan, the sample's count-only
pass) eagerly when the graph first runs, so on a cold Triton cache their JIT compiles came after
the whole of torch.compile, one after another: most of the compile-time excess of a site forced
onto the sparse path. Tracing the graph calls the op's fake with the real shapes, and that is
when we start them: a background thread replays the op's launch sequence on fake CUDA tensors of
those shapes, strides and dtypes, and each launch becomes ``kernel.warmup`` (compile, no launch)
on a small thread pool. Triton's in-memory and disk caches then hold the exact specialisations
the first call asks for. The first eager call waits for compiles still in flight rather than
start the same ones again.

Threads share the GIL with Inductor's own compile (the front end of a Triton compile is Python),
so only part of the JIT overlaps; on the H100, 8 zoo models forced sparse, cold: geomean 1.37 with
it against 1.52 without (same run, 25b738f). Worker processes that compile into the disk cache
(76a4329) were worse, 2.58 against 1.64: each pays a Python that imports torch and this package
before compiling, longer than the compile it hides.

Only a speed-up: static shapes on CUDA, never raises into the compile (a failure is logged at
debug level and the first call compiles as before). AETHER_PRECOMPILE=0 turns it off.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import threading

import torch

from . import triton_attention as _tri

log = logging.getLogger(__name__)

_MAX_WORKERS = 4
_MAX_REMEMBERED = 256

_lock = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_started: set = set()  # spec keys whose warm-up was started in this process
_pending: list = []  # futures of warm-ups and their compiles not yet waited for


class _PointerArg:
    """What Triton's specialisation reads of a tensor argument: its dtype and whether its address
    is 16-byte aligned (fresh allocations are; a view's offset may not be)."""

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        self._address = tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._address


def enabled() -> bool:
    return (os.environ.get("AETHER_PRECOMPILE", "1") != "0" and not _tri.INTERPRET
            and torch.cuda.is_available())


def _tensor_spec(t):
    """(sizes, strides, offset, dtype) in plain ints (None for no tensor); raises _Symbolic
    where any is symbolic."""
    if t is None:
        return None
    sizes, strides, offset = tuple(t.shape), tuple(t.stride()), t.storage_offset()
    if not _tri.is_static(*sizes, *strides, offset):
        raise _Symbolic
    return sizes, strides, offset, t.dtype


class _Symbolic(Exception):
    pass


def start_for_prepare(query, key, value, attn_mask, *args) -> None:
    """From ``aether::prepare_pass``'s fake: start compiling the kernels its first call will
    launch for these inputs (``args``: the op's arguments after the mask). Returns at once."""
    if query.device.type != "cuda" or not enabled():
        return
    try:
        specs = tuple(_tensor_spec(t) for t in (query, key, value, attn_mask))
    except _Symbolic:
        return  # dynamic shapes: the first call compiles what it needs
    spec = (query.device, specs, args)
    with _lock:
        if spec in _started:
            return
        if len(_started) >= _MAX_REMEMBERED:
            _started.clear()
        _started.add(spec)
        _pending.append(_executor().submit(_warm, spec))


def wait() -> None:
    """Wait for every warm-up started so far (an eager call is about to launch those kernels:
    compiling them again in this thread would only race the pool)."""
    while _pending:
        with _lock:
            futures, _pending[:] = list(_pending), []
        concurrent.futures.wait(futures)


def _executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = concurrent.futures.ThreadPoolExecutor(_MAX_WORKERS, thread_name_prefix="aether-jit")
    return _pool


def _warm(spec) -> None:
    """Replay the prepare op on fake tensors of ``spec``; each launch queues its compile."""
    device, specs, args = spec
    try:
        from torch._subclasses.fake_tensor import FakeTensorMode

        on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
        with on_device, FakeTensorMode(), _tri.launches_to(_queue_compile):
            q, k, v, m = (_fake(s, device) for s in specs)
            replay_prepare(q, k, v, m, *args)
    except Exception as e:  # a speed-up only: the first call compiles as before
        log.debug("aether: precompiling the prepare op's kernels failed: %r", e)


def _fake(spec, device):
    if spec is None:
        return None
    sizes, strides, offset, dtype = spec
    extent = offset + sum((n - 1) * st for n, st in zip(sizes, strides)) + 1
    base = torch.empty(max(extent, 1), dtype=dtype, device=device)
    return base.as_strided(sizes, strides, offset)


def _queue_compile(kernel, grid, args, kwargs) -> None:
    """A launch in warm-up mode: compile it on the pool with this call's specialisation."""
    args = tuple(_PointerArg(a) if isinstance(a, torch.Tensor) else a for a in args)
    device = torch.cuda.current_device()
    # Triton makes a kernel's per-device cache on first use, unlocked: make it here, in one
    # thread, so that two compiles of one kernel cannot each make one and lose the other's.
    kernel.device_caches[device]

    def compile_one():
        with torch.cuda.device(device):
            kernel.warmup(*args, grid=grid, **kwargs)

    with _lock:
        _pending.append(_executor().submit(compile_one))


def replay_prepare(query, key, value, attn_mask, is_causal, scale, eps, block_m, block_n,
                   fraction, precheck, gated) -> None:
    """The Triton launches of ``triton_attention.prepare_pass``'s first call, without its host
    reads: both branches of the precheck's dense choice (the sample's plan and count, the full
    plan); for a gated call the plan and the probe (the gate itself launches only SDPA)."""
    if precheck and query.device.type == "cuda":
        _tri.sample_visit_counts(query, key, value, is_causal, scale, eps, block_m, block_n,
                                 whole_if_no_sample=True)
    plan = _tri.plan_attention(query, key, value, None if precheck else attn_mask, is_causal,
                               scale, block_m, block_n)
    if gated and not precheck:
        _tri._probe_visit_count(query, key, value, plan, eps)
