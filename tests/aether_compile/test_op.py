"""The public function and the registered torch ops: SDPA contract, errors, stats, opcheck,
autograd, torch.compile."""

import math

import pytest
import torch
import torch.nn.functional as F

import aether_compile
from aether_compile.kernels.reference import dropped_mass
from aether_compile.ops import DEFAULT_EPS
from aether_compile.workloads import clustered_qkv

from tests.helpers import dense_oracle, rel_err


def _qkv(B=2, H=4, Hkv=4, L=50, S=50, D=16, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, L, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, S, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, S, D, generator=g, dtype=dtype))


@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize("L,S", [(50, 50), (30, 70), (70, 30)])
def test_matches_sdpa_float64(is_causal, L, S):
    q, k, v = _qkv(L=L, S=S, H=4, Hkv=2, dtype=torch.float64)
    out = aether_compile.attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    assert rel_err(out, ref) < 1e-12  # float64 defaults to eps = 0


def test_scale_and_mask_broadcast_forms():
    q, k, v = _qkv(dtype=torch.float64)
    for mask in (torch.rand(50, 50) > 0.3, torch.randn(4, 1, 50, dtype=torch.float64),
                 torch.randn(2, 1, 1, 50, dtype=torch.float64)):
        out = aether_compile.attention(q, k, v, attn_mask=mask, scale=0.3)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3)
        assert rel_err(out, ref) < 1e-12


def test_return_stats_certifies_every_row():
    q, k, v = clustered_qkv(1, 2, 1024, 32, run=64, centers=8, seed=1)
    out, stats = aether_compile.attention(q, k, v, eps=1e-2, return_stats=True)
    assert stats.eps == 1e-2
    assert stats.kept_blocks.dtype == torch.bool
    assert stats.kept_blocks.shape == (1, 2, math.ceil(1024 / stats.block_m),
                                       math.ceil(1024 / stats.block_n))
    assert 0.0 < stats.kept_fraction < 1.0
    d = dropped_mass(q, k, stats.kept_blocks, stats.block_m, stats.block_n)
    assert float(d.max()) <= 1e-2


def test_other_ranks_keep_the_certificate_and_give_stats_in_their_layout():
    """Rank 3 [H, L, E] and rank 5 [b1, b2, H, L, E] go through the op flattened: the output and
    the per-row stats come back in the input's layout, and every row's dropped mass is <= eps."""
    q, k, v = clustered_qkv(2, 2, 1024, 32, run=64, centers=8, seed=1)  # [2, 2, 1024, 32]
    for shape in ((4, 1024, 32), (2, 1, 2, 1024, 32)):
        q5, k5, v5 = (t.reshape(shape) for t in (q, k, v))
        out, stats = aether_compile.attention(q5, k5, v5, eps=1e-2, return_stats=True)
        assert out.shape == shape and stats.lse.shape == shape[:-1]
        assert stats.kept_blocks.shape[:-2] == shape[:-2]
        assert 0.0 < stats.kept_fraction < 1.0
        flat = [t.reshape(2, 2, 1024, 32) for t in (q5, k5)]
        kept = stats.kept_blocks.reshape(2, 2, *stats.kept_blocks.shape[-2:])
        assert float(dropped_mass(*flat, kept, stats.block_m, stats.block_n).max()) <= 1e-2
        ref = F.scaled_dot_product_attention(q5.double(), k5.double(), v5.double())
        assert rel_err(out.double(), ref) < 1e-2


def test_default_eps_per_dtype():
    q, k, v = _qkv(dtype=torch.float16)
    _, stats = aether_compile.attention(q, k, v, return_stats=True)
    assert stats.eps == DEFAULT_EPS[torch.float16] > 0
    _, stats = aether_compile.attention(q.double(), k.double(), v.double(), return_stats=True)
    assert stats.eps == 0.0


def test_dropout_falls_back_to_sdpa():
    q, k, v = _qkv()
    torch.manual_seed(0)
    a = aether_compile.attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    b = F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="return_stats"):
        aether_compile.attention(q, k, v, dropout_p=0.5, return_stats=True)


def test_empty_sequences_like_sdpa():
    q, k, v = _qkv(L=0)
    assert aether_compile.attention(q, k, v).shape == (2, 4, 0, 16)
    q, k, v = _qkv(S=0)
    out = aether_compile.attention(q, k, v)
    assert out.shape == (2, 4, 50, 16) and torch.all(out == 0)


@pytest.mark.parametrize("bad,match", [
    (lambda q, k, v: (torch.cat([q, q[:1]]), k, v), "batch dimensions do not broadcast"),
    (lambda q, k, v: (q, k[..., :8], v), "query head dim 16 != key head dim 8"),
    (lambda q, k, v: (q, k.double(), v), "share a dtype"),
    (lambda q, k, v: (q.int(), k, v), "floating-point"),
    (lambda q, k, v: (q, k[:, :, :10], v), "key length 10 != value length 50"),
    (lambda q, k, v: (q, k[:, :3], v[:, :3]), "enable_gqa"),
])
def test_errors_name_the_bad_value(bad, match):
    q, k, v = _qkv()
    with pytest.raises((ValueError, TypeError), match=match):
        aether_compile.attention(*bad(q, k, v))


def test_error_bad_mask_shape_and_eps():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 50\)"):
        aether_compile.attention(q, k, v, attn_mask=torch.ones(3, 50, dtype=torch.bool))
    with pytest.raises(ValueError, match="eps must be >= 0, got -1"):
        aether_compile.attention(q, k, v, eps=-1.0)
    with pytest.raises(ValueError, match="divisible"):
        aether_compile.attention(*_qkv(H=4, Hkv=3), enable_gqa=True)


def test_opcheck():
    q, k, v = _qkv(B=1, H=2, Hkv=2, L=20, S=24)
    mask = torch.rand(20, 24) > 0.2
    for args in [(q, k, v), (q, k, v, mask, False, 0.5, False, 1e-3), (q, k, v, None, True)]:
        torch.library.opcheck(torch.ops.aether.attention.default, args)
    torch.library.opcheck(torch.ops.aether.attention_with_stats.default, (q, k, v))
    for is_causal in (False, True):  # the dense call's kept map in traced bodies
        torch.library.opcheck(torch.ops.aether.live_blocks.default, (q, k, is_causal, 16, 8))


def test_fake_matches_real_shape_and_strides():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = _qkv(L=30, S=40, H=4, Hkv=2)
    real = torch.ops.aether.attention(q, k, v, None, False, None, True)
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(t) for t in (q, k, v))
        fake = torch.ops.aether.attention(fq, fk, fv, None, False, None, True)
    assert fake.shape == real.shape and fake.stride() == real.stride()


def test_long_key_lengths_take_longer_key_blocks_in_real_fake_and_compiled_calls():
    """From launch.LONG_KEYS keys a call without a mask plans key blocks of 128 (the plan's cost
    grows as 1 / block_n); fewer keys, or a mask, keep 64. The fake and a dynamic-shape compile
    give the kept map the real call's shape on both sides of the threshold."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from aether_compile.kernels.launch import LONG_KEYS

    q, k, v = _qkv(B=1, H=1, Hkv=1, L=8, S=LONG_KEYS + 64, D=16)
    short = (q, k[:, :, :LONG_KEYS - 64], v[:, :, :LONG_KEYS - 64])
    _, stats = aether_compile.attention(q, k, v, return_stats=True)
    assert (stats.block_n, stats.kept_blocks.shape[-1]) == (128, LONG_KEYS // 128 + 1)
    mask = torch.ones(8, LONG_KEYS + 64, dtype=torch.bool)
    assert aether_compile.attention(q, k, v, attn_mask=mask, return_stats=True)[1].block_n == 64
    assert aether_compile.attention(*short, return_stats=True)[1].block_n == 64
    with FakeTensorMode() as mode:
        fake = torch.ops.aether.attention_with_stats(*(mode.from_tensor(t) for t in (q, k, v)))
    assert fake[2].shape == stats.kept_blocks.shape
    compiled = torch.compile(lambda *qkv: torch.ops.aether.attention_with_stats(*qkv)[2],
                             backend="aot_eager", dynamic=True)
    assert compiled(*short).shape[-1] == (LONG_KEYS - 64) // 64
    assert compiled(q, k, v).shape == stats.kept_blocks.shape


@pytest.mark.parametrize("is_causal", [False, True])
def test_gradients_match_float64_autograd_at_eps0(is_causal):
    q, k, v = _qkv(B=1, H=4, Hkv=2, L=40, S=40, dtype=torch.float64)
    mask = torch.rand(40, 40) > 0.2
    mask[:, 0] = True
    inputs = [t.clone().requires_grad_() for t in (q, k, v)]
    out = aether_compile.attention(*inputs, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
    grads = torch.autograd.grad(out.sum(), inputs)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = dense_oracle(*ref_in, attn_mask=mask, is_causal=is_causal)
    ref_grads = torch.autograd.grad(ref.sum(), ref_in)
    for g, r in zip(grads, ref_grads):
        assert rel_err(g, r) < 1e-10


def test_mask_requiring_grad_gives_clear_error():
    q, k, v = (t.requires_grad_() for t in _qkv())
    mask = torch.zeros(50, 50, requires_grad=True)
    out = aether_compile.attention(q, k, v, attn_mask=mask)
    with pytest.raises(RuntimeError, match="gradient of attn_mask"):
        out.sum().backward()


def test_torch_compile_traces_through_the_op():
    q, k, v = _qkv()

    def f(q, k, v):
        return torch.ops.aether.attention(q * 2, k, v, None, True) + 1

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(q, k, v), f(q, k, v))


def test_an_eager_call_checks_its_inputs_once(monkeypatch):
    """The public function leaves the shape checks to the op (host time at 4K): one check_inputs
    per call, whose errors the op raises (test_errors_name_the_bad_value)."""
    import sys

    from aether_compile import ops, validation

    calls = []
    real = validation.check_inputs
    for module in (ops, sys.modules["aether_compile.attention"]):
        monkeypatch.setattr(module, "check_inputs", lambda *a: calls.append(1) or real(*a))
    q, k, v = _qkv()
    aether_compile.attention(q, k, v, attn_mask=torch.ones(50, 50, dtype=torch.bool))
    assert len(calls) == 1
