"""Compiling the prepare op's kernels while the graph compiles (aether_compile/inductor/precompile.py).

The replay on fake tensors must ask Triton for exactly the specialisations the op's first real
call launches, or the warm-up compiles kernels nobody uses and the first call still waits. On CPU
both run through the interpreter and their launches are compared; on a GPU, after the warm-up
the first call compiles nothing."""

import itertools

import pytest
import torch

from aether_compile import _compat
from aether_compile.inductor import early_compile, precompile
from aether_compile.kernels import launch
from aether_compile.kernels import registry
from aether_compile import triton_forward
from aether_compile.workloads import WORKLOADS

from tests.helpers import TRITON_INTERPRET
from tests.helpers import REPO_ROOT, make_mask, wait_for_inductor_pool

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not TRITON_INTERPRET,
                                reason="Triton on CPU needs TRITON_INTERPRET=1")
_SITES = itertools.count(10_000)  # dense-choice state of its own per call


def _arg_signature(a):
    """What decides a launch's compiled specialisation, and more (shapes) for a stricter test."""
    if isinstance(a, torch.Tensor):
        aligned = a.storage_offset() * a.element_size() % 16 == 0
        return ("tensor", a.dtype, tuple(a.shape), tuple(a.stride()), aligned)
    return (type(a).__name__, a)


def _launch_signature(kernel, grid, args, kwargs):
    return (repr(kernel), tuple(grid), tuple(map(_arg_signature, args)),
            tuple(sorted((k, repr(v)) for k, v in kwargs.items())))


def _record(launches, run_too):
    def hook(kernel, grid, args, kwargs):
        launches.add(_launch_signature(kernel, grid, args, kwargs))
        if run_too:
            kernel[grid](*args, **kwargs)
    return hook


def _case(route, L=128, D=32):
    """Inputs and the op's arguments for one route of prepare_pass. The query is split from a
    projection and the key sits at an offset of a fused qkv buffer, as in GPT-2."""
    q, _, v = WORKLOADS["clustered"](1, 2, L, D, dtype=torch.float16, device=DEVICE, seed=3,
                                     run=32, centers=4)
    qkv = torch.cat([q, q.flip(2), v], dim=-1).transpose(1, 2).contiguous()  # [B, L, H, 3D]
    q, k, v = (t.transpose(1, 2) for t in qkv.split(D, dim=-1))
    mask = make_mask("bool", 1, 2, L, L, None, DEVICE, seed=5) if route == "gate-mask" else None
    bm, bn = launch.default_blocks(D, q.device.type)
    fraction = None if route == "plain" else 0.65
    is_causal = route == "sample-causal"
    args = (is_causal, D ** -0.5, 1e-3, bm, bn, fraction, route.startswith("sample"),
            route == "gate-mask")
    return (q, k, v, mask), args


ROUTES = ["sample", "sample-causal", "gate-mask", "plain"]


@pytest.mark.parametrize("route", ROUTES)
def test_replay_asks_for_the_launches_of_the_first_call(route):
    """Every launch of the op's first call (recorded while it runs) is one the replay on fake
    tensors asks for: same kernel, grid, constexprs, dtypes, shapes, strides and alignment. The
    replay may ask for more only where the first call's host read picks one of two branches."""
    tensors, args = _case(route)
    real = set()
    with launch.launches_to(_record(real, run_too=True)):
        triton_forward.prepare_pass(*tensors, *args, site=next(_SITES))
    replayed = set()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(), launch.launches_to(_record(replayed, run_too=False)):
        fakes = [None if t is None else precompile._fake(precompile._tensor_spec(t), t.device)
                 for t in tensors]
        precompile.replay_prepare(*fakes, *args)
    assert real, "the first call launched nothing: the test would pass vacuously"
    assert real <= replayed, sorted(real - replayed)
    if not route.startswith("sample"):
        assert replayed == real


def test_pointer_arg_alignment_follows_the_view_offset():
    base = torch.empty(64, dtype=torch.float16)
    assert precompile._PointerArg(base[8:]).data_ptr() % 16 == 0
    assert precompile._PointerArg(base[4:]).data_ptr() % 16 == 8


def test_symbolic_or_cpu_inputs_start_nothing(monkeypatch):
    """CPU inputs have nothing to compile; symbolic sizes (dynamic shapes) give no specialisation
    to replay: the first call compiles what it needs, as before."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    started = []
    monkeypatch.setattr(precompile, "_remember", lambda key: started.append(key))
    monkeypatch.setattr(precompile, "enabled", lambda: True)
    (q, k, v, _), args = _case("plain")
    precompile.start_for_prepare(q.cpu(), k.cpu(), v.cpu(), None, *args)
    shape_env = ShapeEnv()
    with FakeTensorMode(shape_env=shape_env):
        L = shape_env.create_unbacked_symint()
        q, k, v = (torch.empty(1, 2, L, 32, device="cuda") for _ in range(3))
        precompile.start_for_prepare(q, k, v, None, *args)
    assert not started


def test_a_failing_replay_is_logged_not_raised(monkeypatch, caplog):
    def boom(*a, **kw):
        raise RuntimeError("replay broke")
    monkeypatch.setattr(precompile, "replay_prepare", boom)
    (q, k, v, _), args = _case("plain")
    spec = (q.device, tuple(precompile._tensor_spec(t) for t in (q, k, v, None)), args)
    with caplog.at_level("DEBUG", logger=precompile.__name__):
        precompile._replay_and_compile(spec)
    assert "replay broke" in caplog.text


def test_no_worker_pool_while_inductor_would_compile_in_process(monkeypatch):
    """A pool still starting (a process's first compile) or one compile thread: Inductor compiles
    in-process then, and so do we (threads), rather than queue behind the pool's start."""
    from torch._inductor import async_compile

    monkeypatch.setattr(async_compile.AsyncCompile, "use_process_pool", staticmethod(lambda: False))
    monkeypatch.setattr(async_compile, "get_compile_threads", lambda: 4)
    assert precompile.inductor_compile_pool() is None
    monkeypatch.setattr(async_compile.AsyncCompile, "use_process_pool", staticmethod(lambda: True))
    monkeypatch.setattr(async_compile, "get_compile_threads", lambda: 1)
    assert precompile.inductor_compile_pool() is None


def test_wait_gives_up_on_a_stuck_job(monkeypatch, caplog):
    """A job that never finishes (a broken pool) delays the first call by the timeout, no more;
    the call then compiles what it needs itself."""
    import concurrent.futures

    monkeypatch.setattr(precompile, "_WAIT_TIMEOUT_S", 0.2)
    monkeypatch.setattr(precompile, "_pending", [concurrent.futures.Future()])
    with caplog.at_level("DEBUG", logger=precompile.__name__):
        precompile.wait()
    assert "still running" in caplog.text


_POOL_CHECK = """
import json, os
import torch
from triton import knobs
from aether_compile.inductor import precompile
from tests.helpers import wait_for_inductor_pool
from tests.sm90 import pretend_sm90

target = pretend_sm90()  # an H100 as Triton's binder sees it, without a GPU
L, H, D = 2048, 4, 64
args = (False, D ** -0.5, 1e-3, 128, 64, None, False, False)
in_threads = []  # what this process's threads run
threads = precompile._thread_pool()
submit = threads.submit
threads.submit = lambda fn, *a: in_threads.append(fn.__name__) or submit(fn, *a)
precompile.enabled = lambda: True
# The workers start with another ptxas (Inductor's run torch's) and the first cache directory...
os.environ["TRITON_PTXAS_PATH"] = os.environ["WRAPPED_PTXAS"]
wait_for_inductor_pool()  # started; ready once its workers answer
del os.environ["TRITON_PTXAS_PATH"]
os.environ["TRITON_CACHE_DIR"] += "/later"  # ...which then changes, as fresh_cache() does.
# This process keys on Triton's own ptxas (memoised at its first ask, as Inductor asks early)
# but then points at another, as Inductor's first in-process compile does
from triton.backends.nvidia.compiler import get_ptxas_version
get_ptxas_version(target.arch)
os.environ["TRITON_PTXAS_PATH"] = os.environ["WRAPPED_PTXAS"]
from torch._subclasses.fake_tensor import FakeTensorMode
with FakeTensorMode():  # what the op's fake sees while tracing: a fused qkv projection
    q, k, v = torch.empty(1, L, H, 3 * D, dtype=torch.float16, device="cuda").split(D, dim=-1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
precompile.start_for_prepare(q, k, v, None, *args)
precompile.wait()
# The same compiles in this process, as the first call would ask for them
precompile._started.clear()
specs = tuple(precompile._tensor_spec(t) for t in (q, k, v, None))
requests = precompile.compile_requests(torch.device("cuda", 0), specs, args)
hits = []
knobs.compilation.listener = lambda **kw: hits.append(kw["cache_hit"])
import triton.runtime.build as build
launchers_built_here = []  # gcc runs for C launchers (the first launch's), after the wait
gcc = build._build
build._build = lambda name, *a, **kw: launchers_built_here.append(name) or gcc(name, *a, **kw)
precompile.compile_in_this_process(requests)
from triton.backends.nvidia import driver as nvidia_driver
print(json.dumps({"kernels": [r.name for r in requests], "hits": hits,
                  "launcher_only": [sorted(set(r.signature.values())) for r in requests
                                    if r.launcher_only],
                  "launchers_built_here": launchers_built_here,
                  # Triton 3.6 builds a C launcher per kernel signature; 3.9 has one generic
                  "per_kernel_launchers": hasattr(nvidia_driver, "make_launcher"),
                  "in_threads": in_threads}))
"""


@pytest.mark.parametrize("how", ["workers", "threads"])
def test_compiles_fill_the_disk_cache_the_first_call_reads(tmp_path, how):
    """The whole path without a GPU, for an H100 target (Triton compiles for a named target
    without a device): the fake's start, the replay's requests, compiled by Inductor's worker
    processes (or, with AETHER_PRECOMPILE=threads, this process's threads) into the cache
    directory this process names now, with the ptxas it runs (not those the workers started
    with) and the ptxas version it keys on (memoised before it changed ptxas), the wait; the same
    compiles here then all hit Triton's disk cache, and the kernels' C launchers are in it too
    (no gcc here). Outside the interpreter (real JIT kernels)."""
    import json
    import os
    import subprocess
    import sys

    from triton import knobs

    # A ptxas whose version reads differently (Triton's cache key holds it), as torch's does
    wrapped = tmp_path / "ptxas"
    wrapped.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then "{knobs.nvidia.ptxas.path}" '
                       f'--version; echo wrapped; else exec "{knobs.nvidia.ptxas.path}" "$@"; fi\n')
    wrapped.chmod(0o755)
    # Launchers link libcuda: a stub with the driver calls they import stands in for it
    stub = tmp_path / "libcuda"
    stub.mkdir()
    calls = ("cuCtxGetCurrent cuCtxSetCurrent cuDeviceGet cuDevicePrimaryCtxRetain "
             "cuFuncSetAttribute cuGetErrorString cuPointerGetAttribute").split()
    (stub / "stub.c").write_text("".join(f"int {c}(void) {{ return 0; }}\n" for c in calls))
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", str(stub / "libcuda.so.1"),
                    str(stub / "stub.c")], check=True)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "TRITON_PTXAS_PATH")}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TORCHINDUCTOR_COMPILE_THREADS="2",
               WRAPPED_PTXAS=str(wrapped), TRITON_LIBCUDA_PATH=str(stub),
               LD_LIBRARY_PATH=os.pathsep.join(filter(None, [str(stub),
                                                             env.get("LD_LIBRARY_PATH")])),
               AETHER_PRECOMPILE="threads" if how == "threads" else "1",
               PYTHONPATH=os.pathsep.join(filter(None, [REPO_ROOT,
                                                        env.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", _POOL_CHECK], env=env, capture_output=True,
                          text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    # the prepare op's kernels, and the traced pass's launcher (Inductor compiles the kernel)
    assert result["kernels"] == ["_geometry_kernel", "_bounds_kernel", "_plan_kernel",
                                 "_attention_kernel"]
    assert result["hits"] == [True, True, True]
    # typed as Inductor types the launch it generates (Python floats fp64), not as Triton does
    [pass_types] = result["launcher_only"]
    assert "fp64" in pass_types and "fp32" not in pass_types, pass_types
    compiled_here = ["compile_in_this_process"] * 4 if how == "threads" else []
    assert result["in_threads"] == ["_replay_and_compile"] + compiled_here
    assert len(list((tmp_path / "later").rglob("*.cubin"))) == 3
    assert result["launchers_built_here"] == []
    if result["per_kernel_launchers"]:
        assert list((tmp_path / "later").rglob("__triton_launcher*.so"))


@pytest.mark.gpu
@pytest.mark.parametrize("route", ROUTES)
def test_first_call_after_warm_up_compiles_nothing(route, monkeypatch, tmp_path):
    """From the fake's start to the first real call, with a fresh Triton cache and the in-memory
    caches emptied: Inductor's workers compile, and every compile of the first call is a
    disk-cache hit, its C launchers too."""
    from triton import knobs

    wait_for_inductor_pool()
    monkeypatch.setenv("AETHER_PRECOMPILE", "1")
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    for kernel in registry.JIT_KERNELS:
        monkeypatch.setattr(kernel, "device_caches",
                            type(kernel.device_caches)(kernel.device_caches.default_factory))
    monkeypatch.setattr(precompile, "_started", set())
    tensors, args = _case(route, L=1024, D=64)
    precompile.start_for_prepare(*tensors, *args)
    precompile.wait()
    compiled = list(tmp_path.rglob("*.cubin"))
    assert compiled, "the workers compiled nothing"
    hits = []
    monkeypatch.setattr(knobs.compilation, "listener",
                        lambda **kw: hits.append((kw["src"].name, kw["cache_hit"])))
    import triton.runtime.build as build

    gcc, launchers_built = build._build, []
    monkeypatch.setattr(build, "_build", lambda name, *a, **kw: launchers_built.append(name)
                        or gcc(name, *a, **kw))
    torch.ops.aether.prepare_pass(*tensors, *args, False, next(_SITES))
    torch.cuda.synchronize()
    assert hits, "the first call compiled nothing at all: the in-memory caches were not emptied"
    assert all(hit for _, hit in hits), hits
    assert launchers_built == [], "the first call built C launchers with gcc"
    assert len(list(tmp_path.rglob("*.cubin"))) == len(compiled)


@pytest.mark.gpu
def test_cold_compile_builds_nothing_of_ours_in_this_process(monkeypatch):
    """A cold compile as a user's process runs it: its first compile in-process (Inductor's pool
    still starting: this points TRITON_PTXAS_PATH at torch's ptxas after Triton memoised the
    version of its own), then a model forced onto the sparse path with empty caches. From the
    compile's start to its first call's end, every compile of our kernels in this process is a
    disk-cache hit (the workers built them, keyed as this process keys) and gcc builds no
    launcher (the jobs built the prepare op's and the one Inductor asks for its pass)."""
    import torch.nn.functional as F
    import triton.runtime.build as build
    from torch._inductor.utils import fresh_cache
    from triton import knobs

    def attend(q, k, v):
        return F.scaled_dot_product_attention(q, k, v).sin()

    with fresh_cache():  # the process's first compile, in-process
        small = [torch.randn(1, 2, 64, 16, device="cuda") for _ in range(3)]
        torch.compile(attend)(*small)
    wait_for_inductor_pool()
    torch._dynamo.reset()
    monkeypatch.setenv("AETHER_STATIC_DENSE", "0")  # 1024 tokens: else short, dense
    for kernel in registry.JIT_KERNELS:  # as in a new process: nothing of ours in memory
        monkeypatch.setattr(kernel, "device_caches",
                            type(kernel.device_caches)(kernel.device_caches.default_factory))
    monkeypatch.setattr(precompile, "_started", set())
    ours = {k.fn.__name__ for k in registry.JIT_KERNELS}
    compiles, gcc_builds = [], []
    gcc = build._build
    monkeypatch.setattr(build, "_build", lambda name, *a, **kw: gcc_builds.append(name)
                        or gcc(name, *a, **kw))
    monkeypatch.setattr(knobs.compilation, "listener", lambda **kw: compiles.append(
        (kw["src"].name, kw["cache_hit"])))
    q, k, v = WORKLOADS["clustered"](2, 4, 1024, 64, dtype=torch.float16, device="cuda", seed=1)
    with fresh_cache():
        out = torch.compile(lambda q, k, v: attend(q, k, v), backend="aether")(q, k, v)
        torch.cuda.synchronize()
    ours_compiled = [(name, hit) for name, hit in compiles if name in ours]
    assert ours_compiled, "no kernel of ours was asked for: the sparse path was not compiled"
    assert all(hit for _, hit in ours_compiled), ours_compiled
    assert gcc_builds == [], gcc_builds
    torch.testing.assert_close(out, attend(q, k, v), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_inductor_compiles_our_pass_as_soon_as_it_writes_it(monkeypatch):
    """Inductor starts its own kernels' compiles as it generates them, a user kernel's only when
    its module loads: our pass, the graph's longest compile, was the tail of async_compile.wait.
    With the pool ready, the pass's compile starts at generation (inductor/early_compile.py), and the module's own
    call finds that compile (Inductor's in-memory future, keyed by the source) instead of
    starting another."""
    import torch.nn.functional as F
    from torch._inductor.async_compile import AsyncCompile, CompiledTritonKernels
    from torch._inductor.utils import fresh_cache

    wait_for_inductor_pool()
    torch._dynamo.reset()
    monkeypatch.setenv("AETHER_STATIC_DENSE", "0")
    asked, triton = [], AsyncCompile.triton

    def recording(self, kernel_name, source_code, *args, **kwargs):
        asked.append((kernel_name, CompiledTritonKernels.get(source_code) is not None))
        return triton(self, kernel_name, source_code, *args, **kwargs)

    monkeypatch.setattr(AsyncCompile, "triton", recording)
    before = early_compile.early_compile_stats["started"]
    q, k, v = WORKLOADS["clustered"](2, 4, 1024, 64, dtype=torch.float16, device="cuda", seed=2)
    with fresh_cache():
        out = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v).cos(),
                            backend="aether")(q, k, v)
    ours = [hit for name, hit in asked if name.startswith("_attention_kernel")]
    assert early_compile.early_compile_stats["started"] == before + 1
    assert ours == [False, True], asked  # started early, then found by the module
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v).cos(),
                               atol=2e-2, rtol=2e-2)
