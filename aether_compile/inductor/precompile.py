"""Compile the opaque prepare op's Triton kernels while Inductor compiles the graph (issue 5).

``aether::prepare_pass`` launches its kernels (geometry, bounds, plan, the sample's count-only
pass) eagerly when the graph first runs, so on a cold Triton cache their JIT compiles came after
the whole of torch.compile, one after another: most of the compile-time excess of a site forced
onto the sparse path. Tracing the graph calls the op's fake with the real shapes, and that is
when we start them:

1. a background thread replays the op's launch sequence on fake CUDA tensors of those shapes,
   strides and dtypes (``replay_prepare``); each launch yields what Triton would compile for it
   (signature, constexprs, alignment attributes, options, target: ``_compile_request``), from
   Triton's own binder; nothing runs;
2. Inductor's compile workers compile those, and build their C launchers (gcc), into Triton's
   disk cache (``compile_in_this_process``):
   persistent processes that have torch imported already, so a job costs the compile (and once
   per worker, importing this package: 0.1 s). A job runs with this process's cache
   directories, ptxas and the ptxas version this process keys on (``_job_env``; Inductor's
   workers run torch's ptxas, and the version is in the cache key). The jobs also build the C
   launcher Inductor needs for its own copy of the traced pass (``replay_pass``). Where Inductor
   would compile in-process (one compile thread, or its pool still starting: a process's first
   compile), a thread pool here compiles them instead;
3. the op's first call waits for compiles still running (``wait``) and finds every kernel in the
   disk cache.

Measured on the H100 (8 zoo models forced sparse, cold): threads in this process gave geomean 1.37
against 1.52 without (25b738f): the front end of a Triton compile is Python and took the GIL from
Inductor's own compile. Processes of our own (76a4329) were worse, 2.58 against 1.64: each paid a
Python start that imports torch, longer than the compile it hid. Inductor's workers pay neither:
1.26 (04ae454), once the C launchers were built there too (before that, the first call spent
about 4 s in gcc after every compile job had finished), and 1.11-1.13 (three runs, 7ff0347) once
the jobs keyed on the asking process's ptxas version (until then the first call missed every
entry and compiled again) and built the traced pass's launcher as well.

Only a speed-up: static shapes on CUDA, never raises into the compile (a failure is logged at
debug level and the first call compiles as before). AETHER_PRECOMPILE=0 turns it off;
AETHER_PRECOMPILE=threads compiles on this process's threads even where Inductor has workers. The
request mirrors ``JITFunction.run`` up to its compile (Triton internals, the same in 3.6 and 3.9:
``device_caches``, ``_pack_args``); a Triton that changes them only loses the speed-up.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import importlib
import logging
import os
import threading
import time
from typing import NamedTuple

import torch

from aether_compile import dense_policy, settings, triton_forward
from aether_compile.kernels import forward as kernel_forward
from aether_compile.kernels import launch
from aether_compile.kernels import plan as kernel_plan

log = logging.getLogger(__name__)

_MAX_THREADS = 4  # the fallback without Inductor's worker pool
_MAX_REMEMBERED = 256
_WAIT_TIMEOUT_S = 300.0  # a first call waits at most this for jobs (then compiles itself)

_lock = threading.Lock()
_threads: concurrent.futures.ThreadPoolExecutor | None = None
_started: set = set()  # replay specs and compile keys already started in this process
_pending: list = []  # futures of replays and compiles not yet waited for
# (monotonic seconds, event, detail) of the last replays, jobs and waits: where a first call's
# time goes (benchmarks/compile_time.py records it)
timeline: collections.deque = collections.deque(maxlen=512)


def _note(event: str, detail=None) -> None:
    timeline.append((time.monotonic(), event, detail))


class _PointerArg:
    """What Triton's specialisation reads of a tensor argument: its dtype and whether its address
    is 16-byte aligned (fresh allocations are; a view's offset may not be)."""

    def __init__(self, tensor: torch.Tensor):
        self.dtype = tensor.dtype
        self._address = tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self._address


def enabled() -> bool:
    return (settings.precompile_mode() != "off" and not launch.INTERPRET
            and torch.cuda.is_available())


def _tensor_spec(t):
    """(sizes, strides, offset, dtype) in plain ints (None for no tensor); raises _Symbolic
    where any is symbolic."""
    if t is None:
        return None
    sizes, strides, offset = tuple(t.shape), tuple(t.stride()), t.storage_offset()
    if not launch.is_static(*sizes, *strides, offset):
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
    if _remember(spec):
        future = _thread_pool().submit(_replay_and_compile, spec)
        with _lock:
            _pending.append(future)


def wait() -> None:
    """Wait for every compile started so far (an eager call is about to launch those kernels:
    compiling them again here would only duplicate the work)."""
    if _pending:
        _note("wait")
    deadline = time.monotonic() + _WAIT_TIMEOUT_S
    while _pending:
        with _lock:
            futures, _pending[:] = list(_pending), []
        try:
            for future in concurrent.futures.as_completed(
                    futures, timeout=max(0.0, deadline - time.monotonic())):
                if future.exception() is not None:
                    log.debug("aether: a precompile job failed: %r", future.exception())
                elif future.result() is not None:
                    _note("compiled", future.result())
        except concurrent.futures.TimeoutError:  # a stuck pool: the call compiles what it needs
            log.debug("aether: precompile jobs still running after %.0f s; not waiting",
                      _WAIT_TIMEOUT_S)
            return
        _note("waited")


def _remember(key) -> bool:
    """True the first time ``key`` is seen (bounded memory)."""
    with _lock:
        if key in _started:
            return False
        if len(_started) >= _MAX_REMEMBERED:
            _started.clear()
        _started.add(key)
        return True


def _thread_pool() -> concurrent.futures.ThreadPoolExecutor:
    """The module's threads (made on first use). Takes ``_lock``: never call it holding it."""
    global _threads
    with _lock:
        if _threads is None:
            _threads = concurrent.futures.ThreadPoolExecutor(_MAX_THREADS,
                                                             thread_name_prefix="aether-jit")
        return _threads


def _replay_and_compile(spec) -> None:
    """Replay the prepare op on fake tensors of ``spec`` and start compiling what it launches:
    on Inductor's workers where it has them, else on this module's threads."""
    try:
        _note("replay")
        requests = compile_requests(*spec)
        _note("replayed", [r.name for r in requests])
        in_threads = settings.precompile_mode() == "threads"
        workers = None if in_threads or not requests else inductor_compile_pool()
        job_env = None
        if workers is not None:
            pool, cache_env = workers
            job_env = _job_env(cache_env, requests[0].target)
        if job_env is not None:
            submit = lambda request: pool.submit(compile_in_this_process, [request], job_env)
        else:
            submit = lambda request: _thread_pool().submit(compile_in_this_process, [request])
        for request in requests:  # one job each: the pool spreads them over its workers
            future = submit(request)
            with _lock:
                _pending.append(future)
    except Exception as e:  # a speed-up only: the first call compiles as before
        log.debug("aether: precompiling the prepare op's kernels failed: %r", e)


def compile_requests(device, specs, args) -> list:
    """What the prepare op's first call on tensors of ``specs`` would compile, as picklable
    requests, less what this process has compiled or asked for already."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    requests = []
    launcher_only = False  # the pass: Inductor compiles its own copy of the kernel

    def collect(kernel, grid, launch_args, kwargs):
        made = _compile_request(kernel, launch_args, kwargs, launcher_only)
        if made is not None and _remember(made[0]):
            requests.append(made[1])

    on_device = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with on_device, FakeTensorMode(), launch.launches_to(collect):
        q, k, v, m = (_fake(s, device) for s in specs)
        replay_prepare(q, k, v, m, *args)
        launcher_only = True
        replay_pass(q, k, v, m, *args)
    return requests


def _fake(spec, device):
    if spec is None:
        return None
    sizes, strides, offset, dtype = spec
    extent = offset + sum((n - 1) * st for n, st in zip(sizes, strides)) + 1
    base = torch.empty(max(extent, 1), dtype=dtype, device=device)
    return base.as_strided(sizes, strides, offset)


class CompileRequest(NamedTuple):
    """What ``triton.compile`` needs to build a launch's binary elsewhere (picklable: it travels
    to Inductor's workers), and whether only its C launcher is wanted."""
    module: str
    name: str
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    target: object  # triton.backends.compiler.GPUTarget
    launcher_only: bool


def _compile_request(kernel, args, kwargs, launcher_only: bool = False):
    """(key, request) for one launch: Triton's in-memory cache key and what ``triton.compile``
    needs to build the same binary (hence the same disk-cache entry) elsewhere; None where this
    process has the kernel already. Mirrors ``JITFunction.run`` up to its compile.
    ``launcher_only``: the request builds the launch's C launcher and not the kernel."""
    from triton import knobs
    from triton.runtime.jit import compute_cache_key

    args = tuple(_PointerArg(a) if isinstance(a, torch.Tensor) else a for a in args)
    kwargs = dict(kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kernel_cache, key_cache, target, backend, binder = kernel.device_caches[_current_device()]
    bound_args, specialization, options = binder(*args, **kwargs)
    key = compute_cache_key(key_cache, specialization, options)
    if key in kernel_cache and not launcher_only:
        return None
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args,
                                                              specialization, options)
    if launcher_only:  # the launch Inductor generates: its signature types floats its own way
        signature = inductor_launch_signature(signature)
    return ((kernel.fn.__qualname__, key, launcher_only),
            CompileRequest(kernel.fn.__module__, kernel.fn.__name__, signature, constexprs, attrs,
                           options.__dict__, target, launcher_only))


def _current_device() -> int:
    from triton.runtime.driver import driver

    return driver.active.get_current_device()


# Inductor's workers run torch's bundled ptxas (TRITON_PTXAS_PATH, set when they start), and
# ptxas's version is part of Triton's cache key: a job compiles with the ptxas of the process
# that asked, or its entries would never be found there. And with the version that process keys
# on, which may not be its ptxas's: Triton memoises the version at the process's first ask, and
# Inductor asks early (its own cache keys) but points TRITON_PTXAS_PATH at torch's ptxas only at
# its first in-process compile. On the H100 every job's entry was missed that way (8503c71's
# compile log: bert, vit, gpt2 and whisper each recompiled all their kernels at the first call).
_TOOL_VARS = ("TRITON_PTXAS_PATH", "TRITON_PTXAS_BLACKWELL_PATH")
_VERSION_VAR = "TRITON_MOCK_PTX_VERSION"  # what Triton's get_ptxas_version answers, where set


def _job_env(cache_env: dict, target) -> dict | None:
    """What a worker's job sets while it compiles: the cache directories (``cache_env``), this
    process's ptxas (None: unset, Triton's own) and the ptxas version this process keys
    ``target``'s compiles on (asked now, so the answer stays fixed in this process from here on);
    None where that cannot be had (then the jobs run on this process's threads)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas_version

        version = get_ptxas_version(target.arch)
    except Exception as e:  # noqa: BLE001  (another backend or Triton: threads key as we do)
        log.debug("aether: no ptxas version to give the workers: %r", e)
        return None
    return {**cache_env, **{name: os.environ.get(name) for name in _TOOL_VARS},
            _VERSION_VAR: version}


@contextlib.contextmanager
def _environment(env: dict):
    """``env`` set (None values unset) for the duration, then restored."""
    saved = {name: os.environ.get(name) for name in env}
    _set_environment(env)
    try:
        yield
    finally:
        _set_environment(saved)


def _set_environment(values: dict) -> None:
    for name, value in values.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    with contextlib.suppress(Exception):  # Triton memoises ptxas's version: forget it
        from triton.backends.nvidia.compiler import get_ptxas_version
        get_ptxas_version.cache_clear()


def compile_in_this_process(requests, env=None) -> dict:
    """A compile job (in an Inductor worker or a thread): build each request for its target into
    Triton's disk cache (``CompileRequest``s). ``env`` (workers only, ``_job_env``): the cache
    directories, ptxas and ptxas version of the process that asked, which may differ from the
    worker's. Returns where its time went."""
    from triton.compiler import ASTSource, compile

    took = {"pid": os.getpid()}
    with _environment(env) if env else contextlib.nullcontext():
        for r in requests:
            t0 = time.monotonic()
            fn = getattr(importlib.import_module(r.module), r.name)
            t1 = time.monotonic()
            source = ASTSource(fn, r.signature, r.constexprs, r.attrs)
            kernel = (None if r.launcher_only
                      else compile(source, target=r.target, options=r.options))
            t2 = time.monotonic()
            if r.target.backend == "cuda":
                _build_launcher(source, kernel.metadata if kernel is not None else _NO_SCRATCH)
            # import, compile, launcher seconds
            took[r.name] = tuple(round(b - a, 3) for a, b in ((t0, t1), (t1, t2),
                                                            (t2, time.monotonic())))
    return took


# What a launcher reads of a kernel's metadata besides its signature (the C source depends on the
# signature and tensor descriptors only): for the pass, whose kernel Inductor compiles itself
_NO_SCRATCH = type("NoScratch", (), dict(
    num_ctas=1, global_scratch_size=0, global_scratch_align=1, profile_scratch_size=0,
    profile_scratch_align=1, launch_cooperative_grid=False, launch_pdl=False,
    tensordesc_meta=None))()


def _build_launcher(source, metadata) -> None:
    """The C launcher of a kernel of this ``source`` (its signature), which Triton 3.6 builds with
    gcc at the kernel's first launch (about 0.5 s each on a cold cache: most of a first call's
    time once the kernels themselves are compiled), into the same disk cache, keyed by its C
    source. Inductor builds one the same way for the pass it compiles. Loading it needs libcuda;
    where that fails, the file is in the cache already. (Triton 3.9 has one generic launcher:
    nothing to build.)"""
    from triton.backends.nvidia.driver import CudaLauncher

    with contextlib.suppress(Exception):  # a speed-up only (no libcuda: cannot even link)
        CudaLauncher(source, metadata)


def replay_pass(query, key, value, attn_mask, is_causal, scale, eps, block_m, block_n,
                fraction, sample, gate) -> None:
    """The traced pass after the prepare op (``attention_after_prepare``) on fresh outputs of the
    op's fake: the launch whose C launcher Inductor builds for its copy of the kernel (in this
    process, with gcc, after its workers compiled the kernel: 0.5 s of the compile's critical
    path on the H100; 16adb64's probe showed the signatures differ in the float types only)."""
    prepared = triton_forward.new_prepared(query, key, value, attn_mask, block_m, block_n,
                                           kernel_forward.heads_interleaved(query))
    triton_forward.attention_after_prepare(query, key, value, attn_mask, is_causal, scale, eps,
                                           block_m, block_n, prepared, sample, gate)


def replay_prepare(query, key, value, attn_mask, is_causal, scale, eps, block_m, block_n,
                   fraction, sample, gate) -> None:
    """The Triton launches of ``triton_forward.prepare_pass``'s first call, without its host
    reads: both branches of the sample's dense choice (the sample's plan and count, the full
    plan); for a call with a gate, the plan and the probe (the gate itself launches only SDPA)."""
    if sample and query.device.type == "cuda":
        dense_policy.sample_visit_counts(query, key, value, is_causal, scale, eps, block_m, block_n,
                                 whole_if_no_sample=True)
    plan = kernel_plan.plan_attention(query, key, value, None if sample else attn_mask, is_causal,
                               scale, block_m, block_n)
    if gate and not sample:
        kernel_forward.probe_visit_count(query, key, value, plan, eps)


# -- what Inductor itself would do -------------------------------------------------------------
def inductor_launch_signature(signature: dict) -> dict:
    """The signature Inductor gives a launch of a user-defined Triton kernel, from Triton's own
    for the same arguments (a C launcher is keyed by it): Inductor types Python floats fp64 where
    ``_use_fp64_for_unbacked_floats`` is on (2.11 and 2.13; CUDA supports fp64), Triton fp32.
    Ints, bools, pointers and constexprs (ints equal to 1 included) agree."""
    import torch._inductor.config as icfg

    if not getattr(icfg, "_use_fp64_for_unbacked_floats", False):
        return dict(signature)
    return {k: "fp64" if ty == "fp32" else ty for k, ty in signature.items()}


def inductor_compile_pool():
    """Inductor's pool of compile worker processes (persistent, torch already imported), and the
    environment a job must set (cache directories may change after the workers started), or None
    where Inductor would compile in-process now: one compile thread, a daemonic process, a pool
    still starting (a process's first compile), or internals that differ. Same calls on 2.11 and
    2.13: ``AsyncCompile.use_process_pool`` / ``process_pool`` and the variables
    ``AsyncCompile.triton`` passes to its own jobs."""
    import os

    try:
        from torch._inductor import async_compile as ac

        allowed = getattr(ac, "_process_pool_allowed", lambda: True)
        if ac.get_compile_threads() <= 1 or not allowed():
            return None
        if not ac.AsyncCompile.use_process_pool():  # not ready: Inductor compiles in-process too
            return None
        pool = ac.AsyncCompile.process_pool()
    except Exception:
        return None
    names = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "TRITON_LIBDEVICE_PATH")
    return pool, {n: os.environ[n] for n in names if n in os.environ}
