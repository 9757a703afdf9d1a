"""enable() state (issue 7 §5): nesting, exceptions, decorator use, threads, chained user passes,
and the cache keys (AetherPass / CacheSalt uuids).

Compiles here use tiny SDPA functions (one extern call after the rewrite, no C++ kernels), with
Inductor's caches off *in the compiling thread* (on torch 2.13 config patches are per thread), so
the pre-grad pass runs on every compile.
"""

from __future__ import annotations

import threading

import pytest
import torch
import torch._functorch.config as fcfg
import torch._inductor.config as icfg
import torch.nn.functional as F
from torch._dynamo.utils import counters

import aether_compile
from aether_compile import _compat, context
from aether_compile.context import AetherPass, CacheSalt
from aether_compile.options import AetherOptions


@pytest.fixture(autouse=True)
def _clean():
    torch._dynamo.reset()
    counters.clear()
    icfg.pre_grad_custom_pass = None
    icfg.post_grad_custom_post_pass = None
    yield
    icfg.pre_grad_custom_pass = None
    icfg.post_grad_custom_post_pass = None
    torch._dynamo.reset()


@pytest.fixture
def seen(monkeypatch):
    """(thread name, eps) of every rewrite the pre-grad pass runs."""
    import aether_compile.passes.rewrite as passes

    log, real = [], passes.rewrite_attention

    def recording(gm, options):
        log.append((threading.current_thread().name, AetherOptions.coerce(options).eps))
        return real(gm, options)

    monkeypatch.setattr(passes, "rewrite_attention", recording)
    return log


# distinct code objects: Dynamo caches compiled code per code object, not per config
def attn_a(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def attn_b(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def attn_c(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def _qkv():
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, 2, 32, 16, generator=g) for _ in range(3))


def compile_here(fn):
    """Compile and run fn under default Inductor in this thread, caches off; check vs eager."""
    q, k, v = _qkv()
    with torch.no_grad(), icfg.patch(fx_graph_cache=False), \
            fcfg.patch(enable_autograd_cache=False):
        out = torch.compile(fn)(q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v), atol=1e-5,
                               rtol=1e-5)


def _installed():
    return icfg.pre_grad_custom_pass, icfg.post_grad_custom_post_pass


class UserPass(_compat.CustomGraphPass):
    def __init__(self, name="user", uuid=True):
        self.name, self.has_uuid, self.calls = name, uuid, 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return self.name.encode() if self.has_uuid else None


# -- nesting and exceptions ----------------------------------------------------------------------
def test_nested_inner_options_win_outer_restored(seen):
    with aether_compile.enable(allow_cpu=True, eps=1e-3):
        outer = _installed()
        assert outer[0].options.eps == 1e-3 and isinstance(outer[1], CacheSalt)
        with aether_compile.enable(allow_cpu=True, eps=0.0):
            inner = _installed()
            assert inner[0].options.eps == 0.0
            assert inner[0].chained is None and inner[1].chained is None  # not stacked
            compile_here(attn_a)
        assert _installed() == outer
        compile_here(attn_b)
    assert _installed() == (None, None)
    assert seen == [("MainThread", 0.0), ("MainThread", 1e-3)]
    assert counters["aether"]["rewritten"] == 2


def test_restored_after_exception_inside():
    user = UserPass()
    icfg.pre_grad_custom_pass = user
    with pytest.raises(KeyError):
        with aether_compile.enable(allow_cpu=True):
            with aether_compile.enable(eps=0.0):
                raise KeyError("boom")
    assert _installed() == (user, None)
    with pytest.raises(ValueError):  # a bad option fails before anything is installed
        with aether_compile.enable(eps=-1.0):
            pass
    assert _installed() == (user, None)
    assert context._saved_stack() == []


def test_exit_without_exception_does_not_swallow():
    with pytest.raises(RuntimeError, match="inner"):
        with aether_compile.enable():
            raise RuntimeError("inner")


# -- decorator -----------------------------------------------------------------------------------
def test_decorator_fresh_context_per_call_and_recursion(seen):
    @aether_compile.enable(allow_cpu=True, eps=0.0)
    def run(fn, depth=0):
        mine = icfg.pre_grad_custom_pass
        assert isinstance(mine, AetherPass)
        if depth == 0:
            run(attn_b, depth=1)  # re-entered while active: nests, restores to the outer one
            assert icfg.pre_grad_custom_pass is mine
        compile_here(fn)

    run(attn_a)
    assert _installed() == (None, None)
    assert [eps for _, eps in seen] == [0.0, 0.0]
    assert counters["aether"]["rewritten"] == 2


# -- threads -------------------------------------------------------------------------------------
def _in_threads(*targets):
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001  (reported in the main thread)
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(t), name=f"T{i}") for i, t in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]


@pytest.mark.skipif(not _compat.CONFIG_IS_THREAD_LOCAL,
                    reason="Inductor config is process-wide on this torch (see the next test)")
def test_threads_each_hold_their_own_enable(seen):
    """torch 2.13: config overrides are per thread, so two threads inside enable() at the same
    time each compile with their own options, and neither leaks into the main thread."""
    barrier = threading.Barrier(2, timeout=60)
    installed = {}

    def worker(fn, eps):
        def run():
            assert icfg.pre_grad_custom_pass is None  # a new thread starts from the defaults
            with aether_compile.enable(allow_cpu=True, eps=eps):
                barrier.wait()  # both threads are inside their blocks now
                installed[threading.current_thread().name] = icfg.pre_grad_custom_pass.options.eps
                compile_here(fn)
                barrier.wait()
            assert _installed() == (None, None)
        return run

    _in_threads(worker(attn_a, 0.0), worker(attn_b, 1e-3))
    assert installed == {"T0": 0.0, "T1": 1e-3}
    assert sorted(seen) == [("T0", 0.0), ("T1", 1e-3)]
    assert _installed() == (None, None)


@pytest.mark.skipif(not _compat.CONFIG_IS_THREAD_LOCAL, reason="process-wide config")
def test_enable_does_not_reach_other_threads(seen):
    """The documented flip side on 2.13: a compile in a thread that did not enter enable() (a
    worker, a pool) is not rewritten, even while another thread holds one."""
    with aether_compile.enable(allow_cpu=True, eps=0.0):
        _in_threads(lambda: compile_here(attn_c))
        compile_here(attn_a)
    assert seen == [("MainThread", 0.0)]


def test_decorated_function_in_two_threads(seen):
    @aether_compile.enable(allow_cpu=True, eps=0.0)
    def run(fn):
        compile_here(fn)

    if _compat.CONFIG_IS_THREAD_LOCAL:
        _in_threads(lambda: run(attn_a), lambda: run(attn_b))
        assert sorted(seen) == [("T0", 0.0), ("T1", 0.0)]
    else:  # one at a time (see below)
        _in_threads(lambda: run(attn_a))
        _in_threads(lambda: run(attn_b))
        assert len(seen) == 2
    assert _installed() == (None, None)


@pytest.mark.skipif(not _compat.CONFIG_IS_THREAD_LOCAL, reason="process-wide config")
def test_one_instance_shared_by_two_threads():
    """One enable() object entered by two threads at once: each thread restores its own state."""
    shared = aether_compile.enable(allow_cpu=True, eps=0.0)
    barrier = threading.Barrier(2, timeout=60)

    def run(user):
        def body():
            icfg.pre_grad_custom_pass = user
            with shared:
                barrier.wait()
                assert icfg.pre_grad_custom_pass.chained is user
                barrier.wait()
            assert icfg.pre_grad_custom_pass is user
        return body

    _in_threads(run(UserPass("t0")), run(UserPass("t1")))


def test_process_wide_config_refuses_second_thread(monkeypatch):
    """torch 2.11 (process-wide config), simulated: a second thread entering enable() while one
    is active gets a clear RuntimeError; nesting in one thread is fine; the claim is released on
    exit, also after an exception."""
    monkeypatch.setattr(_compat, "CONFIG_IS_THREAD_LOCAL", False)
    inside, release = threading.Event(), threading.Event()

    def holder():
        with aether_compile.enable(eps=0.0):
            with aether_compile.enable(eps=1e-3):  # nested, same thread
                inside.set()
                release.wait(60)

    t = threading.Thread(target=holder)
    t.start()
    try:
        assert inside.wait(60)
        with pytest.raises(RuntimeError, match="already active in another thread"):
            with aether_compile.enable():
                pass
    finally:
        release.set()
        t.join(60)
    assert context._holders == {}
    with pytest.raises(KeyError):
        with aether_compile.enable():
            raise KeyError("x")
    assert context._holders == {}
    with aether_compile.enable():  # free again
        pass


# -- chained user passes -------------------------------------------------------------------------
def test_user_passes_chained_called_and_restored(seen):
    pre, post = UserPass("pre"), UserPass("post")
    icfg.pre_grad_custom_pass, icfg.post_grad_custom_post_pass = pre, post
    with aether_compile.enable(allow_cpu=True, eps=0.0):
        p, s = _installed()
        assert p.chained is pre and s.chained is post
        compile_here(attn_a)
    assert _installed() == (pre, post)
    assert pre.calls == 1 and post.calls == 1 and len(seen) == 1


@pytest.mark.skipif(not _compat.PRE_GRAD_PASS_MAY_BE_LIST, reason="list-valued pass is 2.13+")
def test_list_valued_pre_grad_pass_chained():
    a, b = UserPass("a"), UserPass("b")
    icfg.pre_grad_custom_pass = [a, b]
    with aether_compile.enable(allow_cpu=True, eps=0.0):
        compile_here(attn_a)
    assert icfg.pre_grad_custom_pass == [a, b]
    assert a.calls == b.calls == 1 and counters["aether"]["rewritten"] == 1


def test_backend_chains_user_post_grad_pass_from_options():
    user = UserPass("opt")
    q, k, v = _qkv()
    with torch.no_grad(), icfg.patch(fx_graph_cache=False), \
            fcfg.patch(enable_autograd_cache=False):
        torch.compile(attn_a, backend="aether", options={
            "allow_cpu": True, "eps": 0.0, "post_grad_custom_post_pass": user})(q, k, v)
    assert user.calls == 1 and counters["aether"]["rewritten"] == 1
    assert _installed() == (None, None)


# -- cache keys ----------------------------------------------------------------------------------
def test_uuids_follow_options_knobs_and_sources(monkeypatch, tmp_path):
    a = AetherOptions(eps=1e-3)
    base = (AetherPass(a).uuid(), CacheSalt(a).uuid())
    assert all(base) and base == (AetherPass(a).uuid(), CacheSalt(a).uuid())
    assert AetherPass(AetherOptions(eps=1e-4)).uuid() != base[0]
    assert CacheSalt(AetherOptions(eps=1e-4)).uuid() != base[1]
    assert CacheSalt(a, chained=UserPass("x")).uuid() != base[1]
    assert CacheSalt(a, chained=UserPass("x", uuid=False)).uuid() is None  # uncacheable chain
    assert CacheSalt(a, chained=CacheSalt(AetherOptions())).chained is None  # never stacked

    monkeypatch.setenv("AETHER_DENSE_FRACTION", "off")  # a knob read while tracing
    knob = (AetherPass(a).uuid(), CacheSalt(a).uuid())
    assert knob[0] != base[0] and knob[1] != base[1]
    monkeypatch.delenv("AETHER_DENSE_FRACTION")
    assert (AetherPass(a).uuid(), CacheSalt(a).uuid()) == base

    src = tmp_path / "kernel.py"
    src.write_text("X = 1\n")
    real = context._source_files
    monkeypatch.setattr(context, "_source_files", lambda: real() + (str(src),))
    before = CacheSalt(a).uuid()
    src.write_text("X = 2  # edited\n")
    assert CacheSalt(a).uuid() != before


def test_fingerprint_covers_graph_shaping_sources():
    import os

    names = {os.path.basename(f) for f in context._source_files()}
    assert {"common.py", "checks.py", "forward.py", "plan.py", "bounds.py", "reference.py",
            "certificate.py", "ops.py", "backend.py", "attention.py", "dense_policy.py",
            "triton_forward.py", "transformers_attention.py"} <= names, sorted(names)
    assert not names & {"demo.py", "workloads.py", "explain.py", "settings.py"}


def test_cache_key_covers_exactly_the_switches_that_change_generated_code(monkeypatch):
    """A harness's AETHER_* variable or a run-time switch leaves the key alone; a switch read
    while tracing changes it."""
    from aether_compile import settings

    base = context.code_fingerprint()
    monkeypatch.setenv("AETHER_BENCH_PARTIAL", "/tmp/x.json")  # a benchmark's own variable
    monkeypatch.setenv("AETHER_DENSE_RESAMPLE", "4")  # read at run time only
    assert context.code_fingerprint() == base
    for name in settings.KEYED:
        monkeypatch.setenv(name, "0")
        assert context.code_fingerprint() != base, name
        monkeypatch.delenv(name)
