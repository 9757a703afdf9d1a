"""GPU-only: the op inside Inductor (issue 5). The attention kernel lands in Inductor's generated
code (triton_op; the stages before it are one opaque op), the static dense choice, CUDA-graph
replays, max-autotune, dynamic lengths without per-length recompiles, fullgraph on a transformers
model, and opcheck of the traced op.
Run on an H100: python -m pytest -q -m gpu tests/aether_compile/test_inductor_gpu.py"""

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

import aether_compile  # noqa: F401  (registers the ops)
from aether_compile._compat import run_and_get_code
from aether_compile import dense_policy
from aether_compile.kernels import dense as kernel_dense
from aether_compile.kernels import plan as kernel_plan
from aether_compile.workloads import WORKLOADS

from tests.helpers import REL_TOL, chunked_oracle, dense_oracle, rel_err

pytestmark = pytest.mark.gpu

SPARSE_KERNELS = ("_attention_kernel", "prepare_pass")


class Attention(torch.nn.Module):
    def __init__(self, is_causal=False):
        super().__init__()
        self.is_causal = is_causal

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=self.is_causal)


def _qkv(workload, L, dtype=torch.float16, H=4, D=64, seed=0, grad=False):
    q, k, v = WORKLOADS[workload](1, H, L, D, dtype=dtype, device="cuda", seed=seed)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _tol(dtype):
    return 2 * REL_TOL[dtype]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    # These shapes are small enough for the op's static dense choice; switch it off so that the
    # sparse kernels are what gets compiled (test_static_dense_* switch it back on).
    monkeypatch.setenv("AETHER_STATIC_DENSE", "0")
    torch._dynamo.reset()
    counters.clear()
    dense_policy.forget_lagged_choices()  # each test's sites start without a previous call's choice
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_kernels_in_generated_code(is_causal):
    q, k, v = _qkv("clustered", 4096)
    compiled = torch.compile(Attention(is_causal), backend="aether")
    out, code = run_and_get_code(compiled, q, k, v)
    code = "\n".join(code)
    for name in SPARSE_KERNELS:
        assert name in code, f"{name} not in Inductor's output code"
    assert "aether.attention_with_stats" not in code  # traced into, not an extern call
    assert counters["aether"]["rewritten"] == 1
    assert rel_err(out, dense_oracle(q, k, v, is_causal=is_causal)) < _tol(q.dtype)


def test_backward_kernels_in_generated_code():
    q, k, v = _qkv("clustered", 2048, grad=True)
    compiled = torch.compile(Attention(True), backend="aether", options={"eps": 0.0})

    def step():
        out = compiled(q, k, v)
        out.float().square().sum().backward()
        return out

    _, code = run_and_get_code(step)
    code = "\n".join(code)
    assert "_dq_kernel" in code and "_dkv_kernel" in code
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    dense_oracle(qd, kd, vd, is_causal=True).square().sum().backward()
    for got, want in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
        assert rel_err(got, want) < 4 * REL_TOL[q.dtype]


def test_dynamic_lengths_backward_one_graph():
    """Training under dynamic=True across tile boundaries: one graph; the kept map, whose block
    counts are unbacked sizes there, reaches the backward kernels; gradients against float64."""
    compiled = torch.compile(Attention(True), backend="aether", dynamic=True,
                             options={"eps": 0.0})
    for L in (100, 129, 200, 1024):
        q, k, v = _qkv("clustered", L, seed=L, grad=True)
        compiled(q, k, v).float().square().sum().backward()
        qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
        dense_oracle(qd, kd, vd, is_causal=True).square().sum().backward()
        for got, want in ((q.grad, qd.grad), (k.grad, kd.grad), (v.grad, vd.grad)):
            assert rel_err(got, want) < 4 * REL_TOL[q.dtype], L
    assert counters["frames"]["ok"] == 1


@pytest.mark.parametrize("L", [384, 4096], ids=["8-blocks", "small-work"])
def test_static_dense_choice(L, monkeypatch):
    """Static shapes with <= 8 key blocks, or too little work for skipping to repay the sparse
    path: the pass leaves the site as written (declined as "short", so it compiles exactly as in
    the default compile), and the op called directly makes the same choice: the SDPA kernel
    (cuDNN or flash) that the default compile runs, none of the sparse kernels."""
    monkeypatch.delenv("AETHER_STATIC_DENSE")
    q, k, v = _qkv("clustered", L)
    _, default_code = run_and_get_code(torch.compile(Attention(True)), q, k, v)
    default_code = "\n".join(default_code)
    default_kernel = next(name for name in ("cudnn_attention", "flash_attention")
                          if name in default_code)
    want = dense_oracle(q, k, v, is_causal=True)
    torch._dynamo.reset()
    counters.clear()
    out, code = run_and_get_code(torch.compile(Attention(True), backend="aether"), q, k, v)
    assert counters["aether"]["rewritten"] == 0 and counters["aether"]["short"] == 1
    torch._dynamo.reset()

    def direct(q, k, v):
        return aether_compile.attention(q, k, v, is_causal=True)

    direct_out, direct_code = run_and_get_code(torch.compile(direct), q, k, v)
    for code in ("\n".join(code), "\n".join(direct_code)):
        assert not any(name in code for name in SPARSE_KERNELS)
        assert default_kernel in code, f"the default compile runs {default_kernel}"
    assert rel_err(out, want) < _tol(q.dtype) and rel_err(direct_out, want) < _tol(q.dtype)


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_compiled_graph_decides_dense_before_planning(is_causal, monkeypatch):
    """In a compiled graph the opaque aether::prepare_pass plans a sample of the rows when the
    graph runs: uniform data goes to a dense SDPA kernel, nothing more is planned and the traced
    pass returns at once; clustered data takes the sparse path. Both match the oracle. The choice comes from an
    earlier call's sample (dense_policy.choose_dense; here every call samples): the first clustered
    call still runs dense, the next sparse."""
    from torch._subclasses.fake_tensor import is_fake


    monkeypatch.setenv("AETHER_DENSE_RESAMPLE", "1")
    planned, dense_calls = [], []
    real_plan, real_dense = kernel_plan.plan_attention, kernel_dense.dense_sdpa_with_lse

    def plan(q, *a, **k):
        if not is_fake(q):  # tracing runs the op's body on fake tensors too
            planned.append(q.shape[2])
        return real_plan(q, *a, **k)

    monkeypatch.setattr(kernel_plan, "plan_attention", plan)
    monkeypatch.setattr(kernel_dense, "dense_sdpa_with_lse",
                        lambda *a, **k: dense_calls.append(1) or real_dense(*a, **k))
    N = 16384
    compiled = torch.compile(Attention(is_causal), backend="aether")
    q, k, v = _qkv("uniform", N, H=8, D=128)
    out, code = run_and_get_code(compiled, q, k, v)
    assert "prepare_pass" in "\n".join(code)
    assert dense_calls and planned and max(planned) < N, planned  # only the sample was planned
    assert rel_err(out, chunked_oracle(q, k, v, None, is_causal)) < _tol(q.dtype)
    if not is_causal:
        q, k, v = _qkv("clustered", N, H=8, D=128)
        for expect_dense in (True, False):  # the uniform call's choice, then this data's own
            dense_calls.clear()
            out = compiled(q, k, v)
            assert bool(dense_calls) == expect_dense
            assert rel_err(out, chunked_oracle(q, k, v)) < _tol(q.dtype)


@pytest.mark.parametrize("workload", ["clustered", "uniform"])
def test_cuda_graph_replays(workload):
    """mode="reduce-overhead": captured without host syncs (the capture takes the choice the
    warm-up runs made, uniform dense and clustered sparse), and every replay with new inputs is
    correct."""
    compiled = torch.compile(Attention(), backend="aether", mode="reduce-overhead")
    for seed in range(4):
        q, k, v = _qkv(workload, 4096, seed=seed)
        out = compiled(q, k, v).clone()
        assert rel_err(out, dense_oracle(q, k, v)) < _tol(q.dtype), seed
    assert counters["inductor"]["cudagraph_skips"] == 0  # nothing in the graph refused capture


def test_max_autotune():
    q, k, v = _qkv("clustered", 4096)
    compiled = torch.compile(Attention(), backend="aether", mode="max-autotune")
    out = compiled(q, k, v)
    assert rel_err(out, dense_oracle(q, k, v)) < _tol(q.dtype)


# across tiles: the first length is not the head dim (64). Dynamo's duck shaping gives equal sizes
# one symbol, and the head dim is specialised (SDPA's default scale guards on it, as the tile's
# constexpr does), which would specialise that length with it: the default compile too.
@pytest.mark.parametrize("lengths", [(1024, 1536, 2048, 3000), (100, 64, 128, 129, 200)],
                         ids=["long", "across_tiles"])
@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "automatic"])
def test_lengths_do_not_recompile(dynamic, lengths):
    """One dynamic graph for every length, also where the block counts ceil(L/128) and
    ceil(S/64) cross 1 (short lengths: the static dense route's kept map, ops.live_blocks)."""
    compiled = torch.compile(Attention(True), backend="aether", dynamic=dynamic)
    for L in lengths:
        q, k, v = _qkv("clustered", L, seed=L)
        out = compiled(q, k, v)
        assert rel_err(out, dense_oracle(q, k, v, is_causal=True)) < _tol(q.dtype), L
    frames = counters["frames"]["ok"]
    assert frames <= (1 if dynamic else 2), f"{frames} compiles for {len(lengths)} lengths"
    assert counters["aether"]["rewritten"] == frames


def test_fullgraph_llama_has_kernels():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   intermediate_size=256, max_position_embeddings=4096,
                                   use_cache=False, attn_implementation="sdpa")
    model = transformers.LlamaModel(cfg).eval().cuda().half()
    ids = torch.randint(3, 128, (1, 2048), device="cuda")
    with torch.no_grad():
        ref = model(input_ids=ids).last_hidden_state
        compiled = torch.compile(model, backend="aether", fullgraph=True)
        out, code = run_and_get_code(compiled, input_ids=ids)
    assert counters["aether"]["rewritten"] == 2
    assert "_attention_kernel" in "\n".join(code)
    assert rel_err(out.last_hidden_state, ref) < 1e-2


def test_opcheck_traced_op():
    q, k, v = _qkv("clustered", 1024, grad=True)
    torch.library.opcheck(torch.ops.aether.attention_with_stats.default, (q, k, v),
                          {"is_causal": True, "eps": 1e-3})
