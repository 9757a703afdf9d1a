"""Backward: the gradient of attention restricted to the forward's kept blocks, against float64
autograd of the plain-torch function (Triton via the interpreter on CPU, natively on a GPU)."""

import pytest
import torch

import aether_compile
from aether_compile.kernels.reference import restricted_attention
from aether_compile.triton_forward import triton_attention
from aether_compile.kernels.backward import triton_attention_backward
from aether_compile.workloads import clustered_qkv

from tests.helpers import TRITON_INTERPRET
from tests.helpers import REL_TOL, causal_and_dtypes, make_mask, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(DEVICE == "cpu" and not TRITON_INTERPRET,
                                  reason="Triton on CPU needs TRITON_INTERPRET=1")


def _autograd_oracle(q, k, v, do, mask, is_causal, kept, bm, bn):
    """float64 autograd of attention restricted to ``kept``."""
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    out = restricted_attention(*leaves, mask, is_causal, None, kept, bm, bn)
    return torch.autograd.grad(out, leaves, do.double())


CASES = [  # (L, S, D, DV, H, Hkv, mask kind, workload)
    (63, 63, 32, 32, 2, 2, "none", "random"),
    (50, 77, 24, 40, 4, 2, "bool", "random"),
    (77, 50, 16, 16, 2, 1, "float", "random"),
    (40, 40, 32, 32, 2, 2, "key_padding", "random"),
    (128, 128, 32, 32, 2, 2, "none", "clustered"),
]


@needs_triton
@causal_and_dtypes()
@pytest.mark.parametrize("L,S,D,DV,H,Hkv,mask_kind,workload", CASES,
                         ids=[f"L{c[0]}-S{c[1]}-D{c[2]}-H{c[4]}-Hkv{c[5]}-{c[6]}-{c[7]}"
                              for c in CASES])
def test_triton_backward_matches_float64_autograd(dtype, is_causal, L, S, D, DV, H, Hkv,
                                                  mask_kind, workload):
    g = torch.Generator().manual_seed(L + S)
    if workload == "clustered":
        q, k, v = clustered_qkv(2, H, L, D, run=32, centers=8, seed=1)
    else:
        q, k, v = (torch.randn(2, H, L, D, generator=g), torch.randn(2, Hkv, S, D, generator=g),
                   torch.randn(2, Hkv, S, DV, generator=g))
    q, k, v = (t.to(DEVICE, dtype) for t in (q, k, v))
    mask = make_mask(mask_kind, 2, H, L, S, dtype, DEVICE)
    # "stop" mode: at 8 key blocks the two-pass probe would cover every block
    out, lse, kept = triton_attention(q, k, v, mask, is_causal, None, H != Hkv, 1e-2, 16, 16,
                                      "stop")
    if workload == "clustered":
        assert kept.float().mean() < 0.9  # gradients of a genuinely sparse selection
    do = torch.randn_like(out)
    grads = triton_attention_backward(do, q, k, v, out, lse, kept, mask, is_causal, None, 16, 16)
    ref = _autograd_oracle(q, k, v, do, mask, is_causal, kept, 16, 16)
    for name, got, want in zip("qkv", grads, ref):
        assert got.dtype == dtype and got.shape == want.shape
        assert rel_err(got, want) < 2 * REL_TOL[dtype], name


def test_op_autograd_saves_no_score_matrix():
    """Through the registered op: gradients equal float64 autograd of the restricted function,
    and the tensors saved for backward are O(L + S) plus the block map."""
    q, k, v = clustered_qkv(1, 2, 512, 32, run=64, centers=8, seed=3)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse, kept = torch.ops.aether.attention_with_stats(*leaves, None, True, None, False, 1e-2,
                                                           64, 64)
    saved = [t for t in out.grad_fn.saved_tensors if t is not None]
    assert len(saved) == 6  # q, k, v, out, lse, kept
    for t in saved:
        assert t.numel() <= max(512 * 32 * 2, kept.numel())
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    ref = _autograd_oracle(q, k, v, do, None, True, kept, 64, 64)
    for got, want in zip(grads, ref):
        assert rel_err(got, want) < 1e-5


def test_compiled_training_step_matches_eager():
    """torch.compile (Inductor, CPU) through the op's autograd: same loss and gradients."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 64, 32, requires_grad=True) for _ in range(3))

    def step(q, k, v):
        return aether_compile.attention(q * 1.5, k, v, is_causal=True).square().mean()

    loss = step(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    compiled = torch.compile(step, fullgraph=True)
    loss_c = compiled(q, k, v)
    grads_c = torch.autograd.grad(loss_c, (q, k, v))
    assert torch.allclose(loss, loss_c, rtol=1e-5)
    for a, b in zip(grads, grads_c):
        assert rel_err(b, a) < 1e-5


@needs_triton
def test_backward_regrids_a_kept_map_of_longer_key_blocks():
    """A forward on longer key blocks than the backward's own (launch.LONG_KEYS on a GPU): the
    backward runs on its grid, each kept block as the shorter blocks it covers, and equals
    float64 autograd of the forward's restricted function. S = 200 leaves a partial last block."""
    q, k, v = clustered_qkv(2, 2, 64, 32, S=200, run=32, centers=8, seed=3)
    q, k, v = (t.to(DEVICE, torch.float32) for t in (q, k, v))
    out, lse, kept = triton_attention(q, k, v, None, False, None, False, 1e-2, 16, 32, "stop")
    assert kept.shape[-1] == 7 and kept.float().mean() < 0.9  # 32-key blocks, sparse
    do = torch.randn_like(out)
    grads = triton_attention_backward(do, q, k, v, out, lse, kept, None, False, None, 16, 32)
    ref = _autograd_oracle(q, k, v, do, None, False, kept, 16, 32)
    for name, got, want in zip("qkv", grads, ref):
        assert rel_err(got, want) < 2 * REL_TOL[torch.float32], name


@pytest.mark.gpu
def test_gpu_long_keys_plan_longer_blocks_and_backward_matches(monkeypatch):
    """From LONG_KEYS keys a call without a mask plans and computes key blocks of 128: its kept
    map says so, each row's dropped mass stays within eps, and the gradients (on the backward's
    own 64-key grid) equal float64 autograd of the restricted function."""
    from aether_compile.kernels.launch import LONG_KEYS
    from aether_compile.kernels.reference import dropped_mass

    monkeypatch.setenv("AETHER_STATIC_DENSE", "0")  # 256 query rows: little work
    monkeypatch.setenv("AETHER_DENSE_FRACTION", "off")
    q, k, v = clustered_qkv(1, 2, 256, 128, S=LONG_KEYS, dtype=torch.float16, device="cuda",
                            seed=5)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, stats = aether_compile.attention(*leaves, return_stats=True)
    assert (stats.block_m, stats.block_n) == (128, 128)
    assert stats.kept_blocks.shape[-1] == LONG_KEYS // 128 and stats.kept_fraction < 0.5
    assert float(dropped_mass(q, k, stats.kept_blocks, 128, 128).max()) <= stats.eps
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    ref = _autograd_oracle(q, k, v, do, None, False, stats.kept_blocks, 128, 128)
    for name, got, want in zip("qkv", grads, ref):
        assert rel_err(got, want) < 2 * REL_TOL[torch.float16], name


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1024, 4096, 16384])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_gpu_backward_long(N, dtype):
    q, k, v = clustered_qkv(1, 2, N, 128, dtype=dtype, device="cuda", seed=N)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, lse, kept = torch.ops.aether.attention_with_stats(*leaves, None, True)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    # float64 oracle on a slice of query rows is enough for dq; dk/dv need all rows, so compare
    # against the same restricted function in float32 autograd (chunk-free at these sizes).
    ref = _autograd_oracle(q.float(), k.float(), v.float(), do.float(), None, True, kept, 128, 64) \
        if N <= 4096 else None
    if ref is not None:
        for got, want in zip(grads, ref):
            assert rel_err(got, want) < 2 * REL_TOL[dtype]
    for g in grads:
        assert torch.isfinite(g).all()
