"""Compile-time costs we control on CPU: Inductor's access analysis of our Triton kernels, and
when Inductor starts compiling them.

Inductor derives which arguments a traced Triton launch writes from the kernel's TTIR, several
times per launch. Our kernels declare what they write (``KERNEL_WRITES``) and
``inductor_access.memoise_kernel_access_analysis`` answers from that, or computes the analysis once per
kernel and argument signature. These tests run Torch's real analysis (Triton's frontend, for an
sm_90 target named by a stub driver; no GPU needed) and check that both answers are its answer.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import triton
import triton.language as tl
from torch._higher_order_ops import triton_kernel_wrap as tkw
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget

from aether_compile import _compat, ops  # noqa: F401  (ops installs the memo)
from aether_compile.inductor import access as inductor_access
from aether_compile.inductor import early_compile
from aether_compile.kernels import bounds
from aether_compile.kernels import dense as kernel_dense
from aether_compile.kernels import forward as kernel_forward
from aether_compile.kernels import launch
from aether_compile.kernels import plan as kernel_plan

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = pytest.mark.skipif(not ops.USE_TRITON_OP, reason="AETHER_TRITON_OP=0: no tracing")
# Triton's interpreter patches its language for the whole process, so TTIR cannot be generated
# there: under TRITON_INTERPRET=1 (CI) the tests below run again in a process without it.
compiled_triton = pytest.mark.skipif(INTERPRETED, reason="TTIR generation needs compiled Triton")


class _Sm90Driver:
    """Just enough of a Triton driver for TTIR generation on a machine without a GPU."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


@pytest.fixture
def sm90_target():
    previous = triton.runtime.driver._active
    triton.runtime.driver.set_active(_Sm90Driver())
    try:
        yield
    finally:
        triton.runtime.driver._active = previous


def _analysis():
    name = next(n for n in inductor_access.ACCESS_ANALYSIS_FNS if hasattr(tkw, n))
    fn = getattr(tkw, name)
    assert getattr(fn, "_aether_memoised", False), f"{name} is not memoised"
    return fn


def _written(result) -> set:
    """Names written, from either version's result (TensorAccesses or a list of names)."""
    if isinstance(result, list):
        return set(result)
    return {dep.name for dep in result.read_writes.writes}


# Under TRITON_INTERPRET=1 the module's kernels are interpreter functions; Torch's analysis needs
# the JITFunction of the same Python function (the memo keys on that function either way).
GEOMETRY = triton.runtime.jit.JITFunction(getattr(bounds._geometry_kernel, "fn",
                                                  bounds._geometry_kernel))


def _geometry_kwargs(dtype, n_kb):
    with FakeTensorMode():
        key = torch.empty(1, 2, 64 * n_kb, 64, dtype=dtype)
        geo16 = torch.empty(2 * n_kb, 3, 64, dtype=torch.float16)
        geo_norm = torch.empty(2 * n_kb, 4, dtype=torch.float32)
    strides = dict(zip(("stride_kb", "stride_kh", "stride_kn", "stride_kd"), key.stride()))
    kwargs = dict(K=key, Geo16=geo16, GeoNorm=geo_norm, **strides, S=64 * n_kb, D=64,
                  n_kb=n_kb, H_KV=2, BLOCK_N=64, D_PAD=64, WITH_BOX=False)
    assert set(kwargs) == set(GEOMETRY.arg_names)
    return kwargs


@compiled_triton
def test_memo_returns_the_analysis_and_runs_it_once_per_signature(sm90_target, monkeypatch):
    """The memo, for a kernel of ours that declared nothing (all of ours declare their writes)."""
    monkeypatch.delitem(inductor_access._declared_writes, id(GEOMETRY.fn))
    analysis = _analysis()
    analysis.cache.clear()
    kwargs = _geometry_kwargs(torch.float16, 4)
    want = analysis.__wrapped__(GEOMETRY, kwargs, {})
    assert _written(want) == {"Geo16", "GeoNorm"}  # the analysis ran (its fallback says all)

    misses = inductor_access.access_analysis_stats["misses"]
    first = analysis(GEOMETRY, kwargs, {})
    again = analysis(GEOMETRY, _geometry_kwargs(torch.float16, 4), {})
    assert _written(first) == _written(again) == _written(want)
    assert inductor_access.access_analysis_stats["misses"] == misses + 1
    assert again is not first  # each caller gets its own copy

    # What TTIR generation sees differs (dtype; a length of 1 specialises): analysed afresh.
    analysis(GEOMETRY, _geometry_kwargs(torch.bfloat16, 4), {})
    analysis(GEOMETRY, _geometry_kwargs(torch.float16, 1), {})
    assert inductor_access.access_analysis_stats["misses"] == misses + 3


@compiled_triton
def test_symbolic_sizes_share_one_entry(sm90_target):
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    shape_env = ShapeEnv()
    kwargs = _geometry_kwargs(torch.float16, 4)
    key_a, key_b = (
        inductor_access._access_key(GEOMETRY, {**kwargs, "S": s}, {})
        for s in (shape_env.create_unbacked_symint(), shape_env.create_unbacked_symint()))
    assert key_a == key_b is not None


def _every_launch_of_the_op():
    """(kernel, arguments by name) of every Triton launch the op makes: the prepare stages with a
    bool mask and causal, the pass in each of its visit modes, the backward's two kernels (meta
    tensors; nothing runs)."""
    from aether_compile.inductor import precompile
    from aether_compile.kernels import backward as bwd

    launches = []

    def record(kernel, grid, args, kwargs):
        named = dict(zip(kernel.arg_names, args))
        named.update((k, v) for k, v in kwargs.items() if k in kernel.arg_names)
        launches.append((kernel, named))

    with FakeTensorMode(), launch.launches_to(record):
        B, H, L, D = 1, 4, 1024, 64
        q, k, v = (torch.empty(B, H, L, D, device="meta", dtype=torch.float16) for _ in range(3))
        mask = torch.empty(B, 1, L, L, device="meta", dtype=torch.bool)
        bm, bn = launch.default_blocks(D, "cuda")
        for m, causal in ((mask, False), (None, True)):
            plan = kernel_plan.plan_attention(q, k, v, m, causal, D ** -0.5, bm, bn)
            for gate in (True, False):  # VISIT_FIXED, VISIT_CERTIFY
                precompile.replay_pass(q, k, v, m, causal, D ** -0.5, 1e-3, bm, bn, None,
                                       False, gate)
            kept = torch.zeros(plan.order.shape, dtype=torch.int8, device="meta")
            kernel_forward.launch_attention(q, k, v, plan, 1e-3, None, kept)  # VISIT_STOP
        lse = torch.empty(B, H, L, device="meta")
        kept = torch.ones(B, H, L // bm, L // bn, dtype=torch.bool, device="meta")
        bwd.triton_attention_backward(q, q, k, v, q, lse, kept, mask, False)
    return launches


@compiled_triton
def test_declared_writes_are_what_the_analysis_finds(sm90_target):
    """Our kernels declare what they write (KERNEL_WRITES), so Inductor's access analysis is
    answered without generating TTIR (0.4-0.5 s per kernel variant of a cold compile on the H100's
    host). For every launch the op makes, the declared answer writes exactly what Torch's own
    analysis finds and reads at least what it reads."""
    analysis = _analysis()
    name = next(n for n in inductor_access.ACCESS_ANALYSIS_FNS if hasattr(tkw, n))
    launches = _every_launch_of_the_op()
    seen = {(k.fn.__name__, named.get("VISIT")) for k, named in launches}
    assert len(seen) == 9, seen  # 5 forward kernels (the pass in 3 modes), 2 backward
    for kernel, named in launches:
        declared = inductor_access.declared_access(kernel, named, name)
        found = analysis.__wrapped__(kernel, named, {})
        where = (kernel.fn.__name__, named.get("VISIT"))
        assert declared is not None, where
        assert _written(declared) == _written(found), where
        if not isinstance(found, list):  # 2.13: TensorAccesses
            reads = lambda r: {d.name for d in r.read_writes.reads}  # noqa: E731
            assert reads(declared) >= reads(found), where
        else:  # 2.11: the names in argument order
            assert declared == found, where
    before = inductor_access.access_analysis_stats["declared"]
    kernel, named = launches[0]
    assert _written(analysis(kernel, named, {})) == _written(
        inductor_access.declared_access(kernel, named, name))
    assert inductor_access.access_analysis_stats["declared"] == before + 1  # answered, not analysed


@triton.jit
def _foreign_kernel(X, Y, N, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    tl.store(Y + o, tl.load(X + o, mask=o < N), mask=o < N)


@compiled_triton
def test_other_kernels_are_analysed_as_before(sm90_target):
    analysis = _analysis()
    with FakeTensorMode():
        x, y = torch.empty(8), torch.empty(8)
    kwargs = dict(X=x, Y=y, N=8, BLOCK=8)
    assert inductor_access._access_key(_foreign_kernel, kwargs, {}) is None
    size = len(analysis.cache)
    assert _written(analysis(_foreign_kernel, kwargs, {})) == {"Y"}
    assert len(analysis.cache) == size


@compiled_triton
@pytest.mark.parametrize("mask", [False, True], ids=["causal", "bool-mask"])
def test_traced_body_launches_one_kernel(sm90_target, monkeypatch, mask):
    """Compile time grows with what the op's traced body holds: Inductor traces, lowers,
    schedules and writes out every launch in it (about 0.6 s per launch for GPT-2 on an H100).
    So a site is the opaque ``aether::prepare_pass`` (dense choice, geometry, mask statistics,
    bounds, plan, probe and gate, launched when the graph runs) and one attention kernel launch.
    Traced here on meta tensors standing for CUDA ones."""
    from torch._functorch.aot_autograd import aot_function

    monkeypatch.setattr(ops, "use_triton", lambda q, k, v: True)
    monkeypatch.setattr(kernel_dense, "dense_kernel_fits", lambda q, k, v, causal: (
        q.dtype in (torch.float16, torch.bfloat16) and (not causal or q.shape[-2] == k.shape[-2])))
    monkeypatch.setenv("AETHER_STATIC_DENSE", "0")
    graphs = []

    def keep(gm, _):
        graphs.append(gm)
        return gm

    def attend(q, k, v, m):
        return torch.ops.aether.attention(q, k, v, m, m is None, None, False, None)

    mode = FakeTensorMode()
    with mode:
        q, k, v = (torch.empty(1, 4, 1024, 64, device="meta", dtype=torch.float16)
                   for _ in range(3))
        m = torch.empty(1, 1, 1024, 1024, device="meta", dtype=torch.bool) if mask else None
    with torch.no_grad(), mode:
        aot_function(attend, fw_compiler=keep)(q, k, v, m)
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert targets.count("triton_kernel_wrapper_functional") == 1, targets
    assert [t for t in targets if t.startswith("aether.")] == ["aether.prepare_pass.default"]
    prepare = next(n for n in graphs[0].graph.nodes
                   if str(n.target) == "aether.prepare_pass.default")
    sample, gate = prepare.args[10:12]
    assert (sample, gate) == ((False, True) if mask else (True, False))


@compiled_triton
def test_eager_launches_skip_the_higher_order_op():
    """wrap_triton only while tracing: an eager launch through its higher-order op cost about
    0.2 ms of host time on an H100 (the retired benchmarks/profile_host.py), and the runtime dense choice's
    custom op launches kernels eagerly on every sample."""
    from torch.library import wrap_triton

    kernel = bounds._geometry_kernel
    assert launch.traceable(kernel) is kernel
    with FakeTensorMode():
        traced = launch.traceable(kernel)
    assert traced is not kernel and type(traced) is type(wrap_triton(kernel))


class _Wrapper:
    """Inductor's Python wrapper as ``define_user_defined_triton_kernel`` uses it: the kernel
    definitions it is given."""

    def __init__(self):
        self.defined = []

    def define_kernel(self, name, body, metadata=None):
        self.defined.append((name, body, metadata))


# A kernel definition as Inductor writes it: a source with a backslash and triple quotes, escaped
# for the literal (the module's call gets the unescaped text)
_BODY = "async_compile.triton('k_0', '''\n@triton.jit\ndef k_0(x):\n    s = \"a\\\\b \\\'\\\'\\\' c\"\n''', device_str='cuda')"


def _define(self, kernel, *args):  # what Inductor's define_user_defined_triton_kernel does
    self.define_kernel("k_0", _BODY, "# Original path: x.py:1")
    return "k_0", {}, {}, []


class _Calls:
    def __init__(self):
        self.calls = []

    def triton(self, name, source, device_str="cuda"):
        self.calls.append((name, source, device_str))


@pytest.fixture
def async_compile(monkeypatch):
    """Inductor's AsyncCompile with a warm pool (or not), recording what is asked of it."""
    from torch._inductor.async_compile import AsyncCompile

    calls, state = _Calls(), {"pool": True}
    monkeypatch.setattr(AsyncCompile, "use_process_pool", classmethod(lambda cls: state["pool"]))
    monkeypatch.setattr(AsyncCompile, "triton", lambda self, *a, **kw: calls.triton(*a, **kw))
    calls.state = state
    return calls


def test_our_kernels_compile_as_soon_as_inductor_writes_them(async_compile):
    """Inductor starts its own kernels' compiles when it generates them, a user kernel's only when
    the module loads (ours was the tail of async_compile.wait). The early call must be exactly
    the module's: same name and the source the literal evaluates to (the future is keyed by it)."""
    wrapper, define = _Wrapper(), early_compile._starting_early(_define)
    expected = _Calls()
    eval(_BODY, {"async_compile": expected})  # what the module's own call will pass
    before = dict(early_compile.early_compile_stats)
    assert define(wrapper, kernel_forward._attention_kernel) == ("k_0", {}, {}, [])
    assert async_compile.calls == expected.calls and len(expected.calls) == 1
    assert wrapper.defined == [("k_0", _BODY, "# Original path: x.py:1")]  # passed on unchanged
    assert "define_kernel" not in vars(wrapper)  # the recording was for that call only
    assert early_compile.early_compile_stats["started"] == before["started"] + 1


def test_early_compile_leaves_other_kernels_and_in_process_compiles_alone(async_compile):
    define = early_compile._starting_early(_define)
    define(_Wrapper(), _foreign_kernel)  # not ours: as before
    async_compile.state["pool"] = False  # Inductor compiles in-process: the module's call does it
    before = dict(early_compile.early_compile_stats)
    define(_Wrapper(), kernel_forward._attention_kernel)
    assert async_compile.calls == []
    assert early_compile.early_compile_stats["skipped"] == before["skipped"] + 1


def test_early_compile_is_installed():
    from torch._inductor.codegen.wrapper import PythonWrapperCodegen

    assert getattr(PythonWrapperCodegen.define_user_defined_triton_kernel, "_aether_early", False)


@pytest.mark.skipif(not INTERPRETED, reason="runs the tests above in a process without the "
                    "interpreter; they already ran in this one")
def test_in_a_process_without_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    from tests.helpers import REPO_ROOT as root

    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          os.path.abspath(__file__)], cwd=root, env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0 and "10 passed" in res.stdout, res.stdout[-3000:] + res.stderr[-2000:]
