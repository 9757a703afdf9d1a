"""Compile the opaque prepare op's Triton kernels while Inductor compiles the graph (issue 5).

``aether::prepare_pass`` launches its kernels (geometry, bounds, plan, the sample's count-only
pass) eagerly when the graph first runs, so on a cold Triton cache their JIT compiles came after
the whole of torch.compile, one after another: most of the compile-time excess of a site forced
onto the sparse path. Tracing the graph calls the op's fake with the real shapes, and that is
when we start them:

1. a background thread replays the op's launch sequence on fake CUDA tensors of those shapes,
   strides and dtypes (``replay_prepare``); each launch yields what Triton would compile for it
   (signature, constexprs, alignment attributes, options: ``_compile_request``), nothing runs;
2. worker processes (``_start_worker``: a new Python that imports this module) compile those into
   Triton's disk cache. Processes, not threads: the front end of a Triton compile is Python, and
   threads would take the GIL from Inductor's own compile (measured: 1.52 -> only 1.37 geomean).
   A worker compiles for the target named in the request and needs no CUDA context;
3. the op's first call waits for workers still running (``wait``) and then finds every kernel in
   the disk cache.

Only a speed-up: static shapes on CUDA; it never raises into the compile (failures are logged at
debug level, and the first call compiles as before). AETHER_PRECOMPILE=0 turns it off. The
request is built from Triton's own binder (``JITFunction.device_caches``, ``_pack_args``), the
internals Triton's ``run`` uses (Triton 3.6); a Triton that changes them only loses the speed-up.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import importlib
import logging
import os
import pickle
import subprocess
import sys
import threading
import time

import torch

from . import triton_attention as _tri

log = logging.getLogger(__name__)

_WORKERS_PER_SHAPE = 3  # processes per replay; each pays a Python + torch start
_WAIT_TIMEOUT_S = 300.0
_MAX_REMEMBERED = 256

_lock = threading.Lock()
_replayer: concurrent.futures.ThreadPoolExecutor | None = None
_started: set = set()  # replay specs and compile keys already started in this process
_pending: list = []  # replay futures and worker processes not yet waited for


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


class _Symbolic(Exception):
    pass


def _tensor_spec(t):
    """(sizes, strides, offset, dtype) in plain ints; raises _Symbolic where any is symbolic."""
    if t is None:
        return None
    sizes, strides, offset = tuple(t.shape), tuple(t.stride()), t.storage_offset()
    if not _tri.is_static(*sizes, *strides, offset):
        raise _Symbolic
    return sizes, strides, offset, t.dtype


def start_for_prepare(query, key, value, attn_mask, *args) -> None:
    """From ``aether::prepare_pass``'s fake: start compiling the kernels its first call will
    launch for these inputs (``args``: the op's arguments from is_causal to gated). Returns at
    once."""
    if query.device.type != "cuda" or not enabled():
        return
    try:
        specs = tuple(_tensor_spec(t) for t in (query, key, value, attn_mask))
    except _Symbolic:
        return  # dynamic shapes: the first call compiles what it needs
    spec = (query.device, specs, args)
    if not _remember(spec):
        return
    global _replayer
    with _lock:
        if _replayer is None:
            _replayer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="aether-jit")
        _pending.append(_replayer.submit(_replay_and_compile, spec))


def wait(timeout_s: float = _WAIT_TIMEOUT_S) -> None:
    """Wait for every compile started so far: an eager call is about to launch those kernels,
    and compiling them again here would only duplicate the workers' work."""
    deadline = time.monotonic() + timeout_s
    while _pending:
        with _lock:
            todo, _pending[:] = list(_pending), []
        for item in todo:
            left = max(0.0, deadline - time.monotonic())
            if isinstance(item, concurrent.futures.Future):
                concurrent.futures.wait([item], timeout=left)
            else:
                _finish(item, left)


def _remember(key) -> bool:
    """True the first time ``key`` is seen (bounded memory)."""
    with _lock:
        if key in _started:
            return False
        if len(_started) >= _MAX_REMEMBERED:
            _started.clear()
        _started.add(key)
        return True


def _replay_and_compile(spec) -> None:
    device, specs, args = spec
    try:
        requests = compile_requests(device, specs, args)
        for share in (requests[i::_WORKERS_PER_SHAPE] for i in range(_WORKERS_PER_SHAPE)):
            if share:
                proc = _start_worker(share)
                with _lock:
                    _pending.append(proc)
    except Exception as e:  # a speed-up only: the first call compiles as before
        log.debug("aether: precompiling the prepare op's kernels failed: %r", e)


def compile_requests(device, specs, args) -> list:
    """What the prepare op's first call on tensors of ``specs`` would compile, as picklable
    requests, less what this process has compiled or asked for already."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    requests = []

    def collect(kernel, grid, launch_args, kwargs):
        made = _compile_request(kernel, launch_args, kwargs)
        if made is not None and _remember(made[0]):
            requests.append(made[1])

    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device, FakeTensorMode(), _tri.launches_to(collect):
        q, k, v, m = (_fake(s, device) for s in specs)
        replay_prepare(q, k, v, m, *args)
    return requests


def _fake(spec, device):
    if spec is None:
        return None
    sizes, strides, offset, dtype = spec
    extent = offset + sum((n - 1) * st for n, st in zip(sizes, strides)) + 1
    base = torch.empty(max(extent, 1), dtype=dtype, device=device)
    return base.as_strided(sizes, strides, offset)


def _compile_request(kernel, args, kwargs):
    """(key, request) for one launch: Triton's in-memory cache key and what ``triton.compile``
    needs to build the same binary (hence the same disk-cache entry) elsewhere; None where this
    process has the kernel already. Mirrors ``JITFunction.run`` up to its compile."""
    from triton import knobs
    from triton.runtime.jit import compute_cache_key

    args = tuple(_PointerArg(a) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kernel_cache, key_cache, target, backend, binder = kernel.device_caches[_current_device()]
    bound_args, specialization, options = binder(*args, **kwargs)
    key = compute_cache_key(key_cache, specialization, options)
    if key in kernel_cache:
        return None
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args,
                                                              specialization, options)
    return ((kernel.fn.__qualname__, key),
            (kernel.fn.__module__, kernel.fn.__name__, signature, constexprs, attrs,
             options.__dict__, target))


def _current_device() -> int:
    from triton.runtime.driver import driver

    return driver.active.get_current_device()


def _start_worker(requests) -> subprocess.Popen:
    """A process that compiles ``requests`` into Triton's disk cache and exits. It inherits this
    process's environment (the cache directory and every variable in the cache key) and its
    import path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    proc = subprocess.Popen([sys.executable, "-c", _WORKER_MAIN], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    proc.stdin.write(pickle.dumps(requests))
    proc.stdin.close()
    proc.stdin = None  # so that communicate() later only collects stderr
    return proc


_WORKER_MAIN = ("import pickle, sys; from aether_compile.kernels import precompile; "
                "precompile.compile_in_this_process(pickle.load(sys.stdin.buffer))")


def _finish(proc: subprocess.Popen, timeout_s: float) -> None:
    try:
        _, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()  # its cache writes are atomic; the first call compiles what is missing
        proc.communicate()
        log.debug("aether: a precompile worker ran past %.0f s and was stopped", timeout_s)
        return
    if proc.returncode != 0:
        log.debug("aether: a precompile worker failed (%d): %s", proc.returncode,
                  err.decode(errors="replace")[-2000:])


def compile_in_this_process(requests) -> None:
    """The worker's body: compile each request for its target, into Triton's disk cache."""
    from triton.compiler import ASTSource, compile

    for module, name, signature, constexprs, attrs, options, target in requests:
        fn = getattr(importlib.import_module(module), name)
        compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options)


def replay_prepare(query, key, value, attn_mask, is_causal, scale, eps, block_m, block_n,
                   fraction, precheck, gated, out_interleaved=False, site=-1) -> None:
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
