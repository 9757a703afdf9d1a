"""backend="aether", enable(), explain(), AetherOptions, and the pass's safety net."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch._inductor.config as icfg
from torch._dynamo.utils import counters

import aether_compile
import aether_compile.passes.common  # noqa: F401
import aether_compile.passes.softmax  # noqa: F401
from aether_compile import AetherOptions, passes
from aether_compile.backend import split_options
from aether_compile.context import AetherPass
from tests.models import spellings as S


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield


def _block():
    torch.manual_seed(0)
    return S.NanoGPTBlock(flash=False).eval(), torch.randn(2, 20, 32)


# -- options -------------------------------------------------------------------------------------
def test_options_frozen_and_coerced():
    o = AetherOptions.coerce({"eps": 1e-3, "exclude": "encoder.*"})
    assert o.exclude == ("encoder.*",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        o.eps = 0.0
    with pytest.raises(TypeError, match="unknown aether option"):
        AetherOptions.coerce({"epsilon": 1.0})
    with pytest.raises(ValueError):
        AetherOptions(eps=-1.0)
    assert AetherOptions.coerce(o, min_seq_len=64).min_seq_len == 64


@pytest.mark.parametrize("bad, message", [
    ({"allow_cpu": "yes"}, "allow_cpu must be True or False, got 'yes'"),
    ({"eps": True}, "eps must be None or a number >= 0, got True"),
    ({"eps": "1e-3"}, "eps must be None or a number >= 0, got '1e-3'"),
    ({"min_seq_len": 1.5}, "min_seq_len must be an int >= 0, got 1.5"),
    ({"exclude": [3]}, "exclude must hold strings"),
    ({"compiler": "tvm"}, "compiler must be one of"),
])
def test_options_of_the_wrong_type_are_refused_by_name(bad, message):
    with pytest.raises((TypeError, ValueError), match=message.replace("(", r"\(")):
        AetherOptions.coerce(bad)
    with pytest.raises((TypeError, ValueError), match="must"):
        aether_compile.enable(**bad)


def test_unknown_option_named_with_ours_listed_and_inductor_keys_passed_through():
    with pytest.raises(TypeError) as info:
        split_options({"epsilon": 1e-3})
    text = str(info.value)
    assert "['epsilon']" in text and "'eps'" in text and "'allow_cpu'" in text
    assert "Inductor config" in text
    with pytest.raises(TypeError, match="unknown aether option.*'epsilon'.*'eps'"):
        aether_compile.enable(epsilon=1e-3)
    assert split_options({"triton.cudagraphs": False, "eps": 0.0})[1] == {"triton.cudagraphs": False}


def test_unknown_option_through_torch_compile_names_the_key_not_inductor():
    model, x = _block()
    compiled = torch.compile(model, backend="aether", options={"epsilon": 1e-3})
    with pytest.raises(Exception) as info:
        compiled(x)
    text = str(info.value)
    assert "unknown option(s) ['epsilon']" in text and "'eps'" in text
    assert "torch._inductor.config.epsilon does not exist" not in text


def test_backend_options_split():
    ours, inductor = split_options({"eps": 0.0, "allow_cpu": True, "max_autotune": False})
    assert ours == AetherOptions(eps=0.0, allow_cpu=True)
    assert inductor == {"max_autotune": False}
    ours, inductor = split_options({"aether": AetherOptions(min_seq_len=8), "trace.enabled": False})
    assert ours.min_seq_len == 8 and inductor == {"trace.enabled": False}


# -- backend -------------------------------------------------------------------------------------
def test_backend_by_name_and_idempotent_registration():
    from torch._dynamo.backends.registry import lookup_backend

    assert lookup_backend("aether") is aether_compile.aether_backend  # entry point
    aether_compile.backend.register()
    aether_compile.backend.register()  # no duplicate-name assertion
    assert "aether" in torch._dynamo.list_backends()


def test_backend_mode_and_options_through_torch_compile():
    model, x = _block()
    compiled = torch.compile(model, backend="aether",
                             options={"allow_cpu": True, "eps": 0.0, "compiler": "aot_eager"})
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert counters["aether"]["rewritten"] == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aether",
                             options=AetherOptions(allow_cpu=True, eps=0.0, compiler="eager"))
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)
    assert counters["aether"]["rewritten"] == 2
    torch._dynamo.reset()
    with torch.no_grad():  # mode= reaches the backend (Inductor); CPU without allow_cpu: dense
        torch.testing.assert_close(torch.compile(model, backend="aether", mode="default")(x),
                                   model(x), rtol=1e-5, atol=1e-5)
    assert counters["aether"]["device"] == 1


# -- enable() ------------------------------------------------------------------------------------
class _UserPass(AetherPass.__mro__[1]):  # a CustomGraphPass of the user's
    def __init__(self):
        self.calls = 0

    def __call__(self, graph):
        self.calls += 1

    def uuid(self):
        return b"user-pass"


def test_enable_chains_restores_and_nests():
    user = _UserPass()
    icfg.pre_grad_custom_pass = user
    try:
        with aether_compile.enable(allow_cpu=True) as outer:
            p_outer = icfg.pre_grad_custom_pass
            assert isinstance(p_outer, AetherPass) and p_outer.chained is user
            with aether_compile.enable(allow_cpu=True, eps=0.0):
                inner = icfg.pre_grad_custom_pass
                assert inner.chained is user and inner.options.eps == 0.0  # not double-rewritten
            assert icfg.pre_grad_custom_pass is p_outer
            assert outer.options.allow_cpu
        assert icfg.pre_grad_custom_pass is user
        with pytest.raises(RuntimeError):
            with aether_compile.enable():
                raise RuntimeError("boom")
        assert icfg.pre_grad_custom_pass is user
    finally:
        icfg.pre_grad_custom_pass = None


def test_enable_as_decorator_rewrites_default_inductor_compile():
    model, x = _block()
    user = _UserPass()
    icfg.pre_grad_custom_pass = user

    @aether_compile.enable(allow_cpu=True, eps=0.0)
    def run():
        # caches off: a cache hit (keyed on the pass's uuid) would skip the pass and its counters
        with torch.no_grad(), icfg.patch(fx_graph_cache=False), \
                torch._functorch.config.patch(enable_autograd_cache=False):
            return torch.compile(model)(x)

    try:
        out = run()
    finally:
        icfg.pre_grad_custom_pass = None
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert counters["aether"]["rewritten"] == 1
    assert user.calls >= 1  # the chained pass ran too


def test_pass_uuid_depends_on_options_and_chained_pass():
    a = AetherPass(AetherOptions(eps=1e-3)).uuid()
    assert a and a == AetherPass(AetherOptions(eps=1e-3)).uuid()
    assert a != AetherPass(AetherOptions(eps=1e-4)).uuid()
    assert a != AetherPass(AetherOptions(eps=1e-3), chained=_UserPass()).uuid()
    assert AetherPass(chained=lambda g: None).uuid() is None  # uncacheable chained pass


# -- explain() -----------------------------------------------------------------------------------
def test_explain_table_and_counters():
    model, x = _block()
    with torch.no_grad():
        report = aether_compile.explain(model, x, options=AetherOptions(compiler="eager"))
    assert [(s.decision, s.code, s.module) for s in report.sites] == [("dense", "device", "attn")]
    assert "spellings.py" in report.sites[0].source
    text = str(report)
    assert "attn" in text and "device cpu is not CUDA" in text and "fallbacks: device=1" in text
    assert report.counters == {"device": 1}


# -- safety net ----------------------------------------------------------------------------------
def test_internal_error_leaves_graph_and_compile_goes_on(monkeypatch):
    def broken(node):
        if passes.softmax.softmax_args(node) is not None:
            raise KeyError("matcher bug")
        return None

    monkeypatch.setattr(passes.softmax, "match", broken)
    model, x = _block()
    with torch.no_grad():
        report = aether_compile.explain(model, x, options=dict(allow_cpu=True, compiler="aot_eager"))
        torch.testing.assert_close(report.output, model(x))
    assert [s.code for s in report.sites] == ["internal_error"]
    assert "matcher bug" in report.sites[0].reason


def test_rewrite_failure_rolls_back(monkeypatch):
    """A failure while inserting the replacement restores the graph (no half-built nodes)."""
    def boom(*a, **k):
        raise RuntimeError("fake-mode trouble")

    monkeypatch.setattr(aether_compile.passes.common.Builder, "fn", boom)
    model, x = _block()
    with torch.no_grad():
        report = aether_compile.explain(model, x, options=dict(allow_cpu=True, compiler="eager"))
        torch.testing.assert_close(report.output, model(x))
    assert [s.code for s in report.sites] == ["internal_error"]


def test_exclude_by_module_class_name():
    model, x = _block()
    with torch.no_grad():
        report = aether_compile.explain(model, x, options=dict(
            allow_cpu=True, compiler="eager", exclude=("NanoGPTAttention",)))
    assert [s.code for s in report.sites] == ["excluded"]


def test_backend_inside_enable_rewrites_once():
    model, x = _block()
    with aether_compile.enable(allow_cpu=True), torch.no_grad(), \
            icfg.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        torch.compile(model, backend="aether", options={"allow_cpu": True})(x)
    assert counters["aether"]["sites"] == 1


def test_min_seq_len_static_vs_symbolic_length():
    import functools

    model, x = _block()
    backend = functools.partial(aether_compile.aether_backend,
                                options=dict(allow_cpu=True, compiler="eager", min_seq_len=1000))
    with torch.no_grad():
        torch.compile(model, backend=backend)(x)
        assert counters["aether"]["min_seq_len"] == 1
        torch._dynamo.reset()
        torch.compile(model, backend=backend, dynamic=True)(x)
    assert counters["aether"]["rewritten"] == 1


def test_inductor_failure_on_the_op_compiles_the_graph_as_captured(monkeypatch):
    """If Inductor cannot compile the rewritten graph, the backend compiles the captured graph
    (dense) instead: the user's compile goes on, counters and the explain report say why."""
    from aether_compile import _compat

    real = _compat.compile_fx
    attempts = []

    def failing_on_our_op(gm, example_inputs, patches):
        has_op = any(str(n.target).startswith("aether.") for n in gm.graph.nodes)
        attempts.append(has_op)
        if has_op:
            raise RuntimeError("simulated Inductor failure on aether::attention")
        return real(gm, example_inputs, patches)

    monkeypatch.setattr(_compat, "compile_fx", failing_on_our_op)
    block, x = _block()
    with torch.no_grad():
        report = aether_compile.explain(block, x, options={"allow_cpu": True})
        ref = block(x)
    assert attempts == [True, False]
    torch.testing.assert_close(report.output, ref)
    assert [s.decision for s in report.sites] == ["dense"]
    assert "Inductor failed" in report.sites[0].reason
    assert counters["aether"]["compile_failed"] == 1 and counters["aether"]["rewritten"] == 0


def test_dynamos_restart_signal_reaches_dynamo_not_the_dense_fallback(monkeypatch):
    """Dynamo's control flow raised through the backend (TensorifyScalarRestartAnalysis under
    dynamic=True) is not an Inductor failure: Dynamo traces again and the sites stay rewritten
    (before, the fallback caught it and the compile died with an IndexError)."""
    from aether_compile import _compat

    real = _compat.compile_fx
    raised = []

    def restart_once(gm, example_inputs, patches):
        if not raised:
            raised.append(True)
            raise torch._dynamo.exc.TensorifyScalarRestartAnalysis()
        return real(gm, example_inputs, patches)

    monkeypatch.setattr(_compat, "compile_fx", restart_once)
    block, x = _block()
    with torch.no_grad():
        out = torch.compile(block, backend="aether", options={"allow_cpu": True})(x)
        torch.testing.assert_close(out, block(x), rtol=1e-4, atol=1e-4)
    assert raised and counters["aether"]["compile_failed"] == 0
    assert counters["aether"]["rewritten"] >= 1


def test_short_cuda_attention_stays_dense(monkeypatch):
    """A CUDA site whose static sizes leave the sparse path nothing to win is declined as "short"
    (few key blocks, or little work): it stays the dense attention it is, mask included, and
    compiles exactly as in the default compile. Long or symbolic sizes are rewritten, and
    AETHER_STATIC_DENSE=0 rewrites everything (tests, benchmarks). Fake CUDA tensors: no GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from aether_compile.passes import checks

    def qkv(B, H, L, D, mode):
        with mode:
            q = torch.empty(B, H, L, D, device="cuda", dtype=torch.float16)
        return q, q, q

    mode = FakeTensorMode()
    few_blocks = checks.short_attention(*qkv(8, 32, 512, 128, mode))  # 8 key blocks, much work
    assert few_blocks is not None and few_blocks.code == "short" and "8 key blocks" in few_blocks.message
    small = checks.short_attention(*qkv(2, 12, 1024, 64, mode))  # GPT-2 at 1024 tokens
    assert small is not None and "2**36" in small.message
    assert checks.short_attention(*qkv(1, 32, 16384, 128, mode)) is None  # long: rewritten
    monkeypatch.setenv("AETHER_STATIC_DENSE", "0")
    assert checks.short_attention(*qkv(2, 12, 1024, 64, mode)) is None
    monkeypatch.delenv("AETHER_STATIC_DENSE")
    from aether_compile import dense_policy

    length = ShapeEnv().create_unbacked_symint()  # a symbolic length: the op decides per call
    assert dense_policy.static_dense_reason(2, 12, length, length, 64, 64, 64, True) is None
    with mode:
        cpu = torch.empty(2, 12, 1024, 64, dtype=torch.float16)
    assert checks.short_attention(cpu, cpu, cpu) is None  # the CPU reference is not about speed


# -- enable() binds torch.compile ----------------------------------------------------------------
def _no_caches():
    return icfg.patch(fx_graph_cache=False), torch._functorch.config.patch(
        enable_autograd_cache=False)


def test_model_compiled_inside_enable_is_rewritten_when_first_run_after_it():
    model, x = _block()
    original = torch.compile
    with aether_compile.enable(allow_cpu=True, eps=0.0):
        assert torch.compile is not original
        compiled = torch.compile(model)
    assert torch.compile is original  # unwrapped on exit
    assert counters["aether"]["sites"] == 0  # nothing compiled yet: torch.compile is lazy
    a, b = _no_caches()
    with a, b, torch.no_grad():
        out = compiled(x)
        torch.testing.assert_close(out, model(x), rtol=1e-5, atol=1e-5)
    assert counters["aether"]["rewritten"] == 1 and counters["aether"]["sites"] == 1


def test_enable_binding_keeps_mode_and_leaves_other_backends_alone():
    model, x = _block()
    with aether_compile.enable(allow_cpu=True):
        with_mode = torch.compile(model, mode="max-autotune-no-cudagraphs")
        eager = torch.compile(model, backend="eager")
    a, b = _no_caches()
    with a, b, torch.no_grad():
        eager(x)
        assert counters["aether"]["sites"] == 0  # backend="eager" was not ours to change
        with_mode(x)
    assert counters["aether"]["rewritten"] == 1


def test_enable_binding_is_per_thread():
    import threading

    model, x = _block()
    compiled = {}
    with aether_compile.enable(allow_cpu=True):
        t = threading.Thread(target=lambda: compiled.setdefault("other", torch.compile(model)))
        t.start()
        t.join()
    a, b = _no_caches()
    with a, b, torch.no_grad():
        compiled["other"](x)
    assert counters["aether"]["sites"] == 0  # compiled in a thread that held no enable()


# -- explain(): inputs as the model takes them, and what ran ------------------------------------
class _TwoInputs(torch.nn.Module):
    def forward(self, q, k=None, *, causal=False):
        return torch.nn.functional.scaled_dot_product_attention(q, k, k, is_causal=causal)


def test_explain_unpacks_a_dict_of_keyword_arguments():
    from aether_compile.explain import _call_arguments

    m = _TwoInputs()
    q = torch.randn(1, 2, 8, 16)
    assert _call_arguments(m, ({"q": q, "k": q},), {}) == ((), {"q": q, "k": q})
    assert _call_arguments(m, ({"k": q},), {})[0] == ({"k": q},)  # q missing: passed as given
    assert _call_arguments(m, ({"other": q},), {})[0] == ({"other": q},)
    with torch.no_grad():
        report = aether_compile.explain(m, {"q": q, "k": q}, options={"compiler": "eager"})
    assert report.counters == {"device": 1}


def test_explain_replays_and_reports_what_the_op_did():
    from aether_compile.workloads import clustered_qkv

    q, k, _ = clustered_qkv(1, 2, 2048, 64, dtype=torch.float32, device="cpu", seed=0)
    with torch.no_grad():
        sparse = aether_compile.explain(_TwoInputs(), q, k, options={"allow_cpu": True,
                                                                     "compiler": "eager"})
        exact = aether_compile.explain(_TwoInputs(), q, k, causal=True,
                                       options={"allow_cpu": True, "compiler": "eager",
                                                "eps": 0.0})
    (site,) = sparse.sites
    out, stats = aether_compile.attention(q, k, k, return_stats=True)
    assert site.kept_fraction == pytest.approx(stats.kept_fraction) and site.kept_fraction < 1
    assert f"kept {site.kept_fraction:.0%}" in str(sparse)
    (site,) = exact.sites
    assert site.kept_fraction == 1.0  # every causally live block: dense
    assert "dense" in str(exact).splitlines()[2]
