"""GPU-only: the Triton op at 4K-32K in fp16 and bf16, numerics and the certificate, grid and
int64 limits. Run on an H100: python -m pytest -q -m gpu tests/kernels/test_gpu_attention.py"""

import pytest
import torch
import torch.nn.functional as F

import aether_compile
from aether_compile import triton_forward
from aether_compile.kernels import dense as kernel_dense
from aether_compile.kernels import plan as kernel_plan
from aether_compile.kernels.reference import dropped_mass
from aether_compile.workloads import WORKLOADS

from tests.helpers import REL_TOL, chunked_oracle, rel_err

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _sparse_path(monkeypatch):
    """Most shapes here are small enough for the op's static dense choice; test the sparse
    kernels on them (test_static_dense_in_eager switches the choice back on)."""
    monkeypatch.setenv("AETHER_STATIC_DENSE", "0")

DTYPES = [torch.float16, torch.bfloat16]
CASES = [
    # (workload, N, S, is_causal, H, Hkv, mask)
    ("clustered", 4096, None, False, 2, 2, None),
    ("clustered", 16384, None, False, 2, 2, None),
    ("clustered", 32768, None, False, 2, 2, None),
    ("clustered", 8192, None, True, 4, 2, None),
    ("uniform", 4096, None, True, 2, 2, None),
    ("clustered", 4096, 6000, False, 2, 1, "key_padding"),
    ("sink_local", 8192, None, True, 2, 2, None),
    ("adversarial", 4096, None, False, 2, 2, None),
    ("clustered", 1024, 65536, False, 2, 2, None),  # launch.LONG_KEYS: key blocks of 128
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("workload,N,S,is_causal,H,Hkv,mask", CASES,
                         ids=[f"{c[0]}-N{c[1]}-S{c[2]}-{'causal' if c[3] else 'full'}-H{c[4]}-"
                              f"Hkv{c[5]}-{c[6]}" for c in CASES])
def test_numerics_and_certificate(dtype, workload, N, S, is_causal, H, Hkv, mask):
    kw = {"block_n": 64} if workload == "adversarial" else {}
    q, k, v = WORKLOADS[workload](1, H, N, 128, dtype=dtype, device="cuda", seed=N, **kw)
    S = S or N
    if S != N or Hkv != H:  # keys of another length / fewer heads, same workload family
        _, k, v = WORKLOADS[workload](1, Hkv, S, 128, dtype=dtype, device="cuda", seed=N, **kw)
    attn_mask = None
    if mask == "key_padding":
        attn_mask = torch.ones(1, 1, 1, S, dtype=torch.bool, device="cuda")
        attn_mask[..., S - 1000:] = False
    out, stats = aether_compile.attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                          enable_gqa=H != Hkv, return_stats=True)
    assert not out.isnan().any()
    dropped = dropped_mass(q, k, stats.kept_blocks, stats.block_m, stats.block_n,
                           attn_mask=attn_mask, is_causal=is_causal)
    assert float(dropped.max()) <= stats.eps
    restricted = chunked_oracle(q, k, v, attn_mask, is_causal, stats.kept_blocks, stats.block_m,
                                stats.block_n)
    assert rel_err(out, restricted) < REL_TOL[dtype]
    dense = chunked_oracle(q, k, v, attn_mask, is_causal)
    sdpa_noise = rel_err(F.scaled_dot_product_attention(
        q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1),
        attn_mask=attn_mask, is_causal=is_causal), dense)
    # the default eps keeps the op within (a small multiple of) the dtype's own rounding noise
    assert rel_err(out, dense) < max(2 * sdpa_noise, REL_TOL[dtype])


def test_eps0_is_dense_and_deterministic():
    q, k, v = WORKLOADS["clustered"](1, 4, 8192, 128, dtype=torch.float16, device="cuda")
    a = aether_compile.attention(q, k, v, eps=0.0)
    b = aether_compile.attention(q, k, v, eps=0.0)
    assert torch.equal(a, b)
    assert rel_err(a, chunked_oracle(q, k, v)) < REL_TOL[torch.float16]


@pytest.mark.parametrize("D", [16, 64, 80, 256])
def test_head_dims(D):
    q, k, v = WORKLOADS["clustered"](2, 2, 2048, D, dtype=torch.bfloat16, device="cuda")
    out = aether_compile.attention(q, k, v, is_causal=True)
    assert rel_err(out, chunked_oracle(q, k, v, None, True)) < REL_TOL[torch.bfloat16]


def test_batch_heads_beyond_grid_limit_and_int64_offsets():
    """B*H = 140000 > 65535 and more than 2^31 elements per tensor."""
    BH, L, D = 140_000, 128, 128
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(1, BH, L, D, device="cuda", dtype=torch.float16, generator=g)
    assert q.numel() > 2 ** 31
    out = aether_compile.attention(q, q, q, eps=0.0)
    for sl in (slice(0, 8), slice(BH - 8, BH)):
        ref = F.scaled_dot_product_attention(q[:, sl], q[:, sl], q[:, sl])
        assert rel_err(out[:, sl], ref) < 5e-3


def test_stop_mode_is_a_certified_subset_of_twopass_at_32k():
    from aether_compile.triton_forward import triton_attention

    q, k, v = WORKLOADS["clustered"](1, 2, 32768, 128, dtype=torch.float16, device="cuda")
    _, _, kept_stop = triton_attention(q, k, v, eps=1e-3, mode="stop")
    _, _, kept_two = triton_attention(q, k, v, eps=1e-3, mode="twopass")
    assert torch.all(kept_two | ~kept_stop)
    for kept in (kept_stop, kept_two):
        d = dropped_mass(q, k, kept, 128, 64)
        assert 0.0 < float(d.max()) <= 1e-3


@pytest.mark.parametrize("H,Hkv,is_causal,mask_kind", [(4, 4, False, None), (8, 2, True, None),
                                                       (8, 2, False, "hf"),
                                                       (8, 2, False, "static_cache")],
                         ids=["mha-full", "gqa-causal", "gqa-hf-causal-mask",
                              "gqa-static-cache-mask"])
def test_dense_dispatch_on_unprunable_data(H, Hkv, is_causal, mask_kind, monkeypatch):
    """Uniform data: the certified visit would cover every block, so the op runs the fastest dense
    SDPA kernel (GQA from k and v as they are, or expanded); stats say every live block was
    computed, the result matches the sparse kernel run densely, and gradients still flow. A
    static cache's prefill mask (bool, top-left causal over 8K queries and 8K + 256 cache slots)
    goes dense too, on the first 8K keys."""
    dense_calls = []
    real = kernel_dense.dense_sdpa_with_lse
    monkeypatch.setattr(kernel_dense, "dense_sdpa_with_lse",
                        lambda *a, **k: dense_calls.append(1) or real(*a, **k))
    L, S = 8192, 8192 + (256 if mask_kind == "static_cache" else 0)
    q, _, _ = WORKLOADS["uniform"](1, H, L, 128, dtype=torch.float16, device="cuda")
    _, k, v = WORKLOADS["uniform"](1, Hkv, S, 128, dtype=torch.float16, device="cuda", seed=1)
    mask = None
    tril = torch.ones(L, S, dtype=torch.bool, device="cuda").tril()
    if mask_kind == "hf":  # a materialised causal mask as transformers builds it: found causal at run time
        mask = torch.zeros(1, 1, L, S, dtype=torch.float16, device="cuda").masked_fill(
            ~tril, torch.finfo(torch.float16).min)
    elif mask_kind == "static_cache":
        mask = tril.expand(1, 1, L, S)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out, stats = aether_compile.attention(*leaves, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=H != Hkv, return_stats=True)
    assert dense_calls, "the dense path was not taken"
    ref_out, ref_lse, ref_kept = triton_forward.triton_attention(q, k, v, mask, is_causal, None, H != Hkv,
                                                      0.0)  # the sparse kernel, dense
    if mask is None:
        assert torch.equal(stats.kept_blocks, ref_kept)  # every live block
    else:  # found exactly causal, so run as is_causal: the causal blocks (the HF mask's blocks
        # past the diagonal hold finfo.min, live to the masked kernel but never computed here)
        causal = kernel_plan.all_live_blocks(L, S, stats.block_m, stats.block_n, True, 1, H,
                                             "cuda")
        assert torch.equal(stats.kept_blocks, causal)
        assert not bool((causal & ~ref_kept).any())
    assert rel_err(out, ref_out) < 2e-3
    assert torch.allclose(stats.lse, ref_lse, atol=2e-2)
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("try_cudnn", [True, False], ids=["cudnn", "flash"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_dense_gqa_reads_kv_heads_natively_or_expands(try_cudnn, is_causal):
    """The dense kernels serve GQA from the unexpanded k and v where a one-time check on a small
    problem found that they can (no copy), else from expanded ones; either way query head h must
    read kv head h // group (a kernel reading the wrong heads would pass any shape check)."""

    q, _, _ = WORKLOADS["uniform"](1, 8, 4096, 128, dtype=torch.float16, device="cuda")
    _, k, v = WORKLOADS["uniform"](1, 2, 4096, 128, dtype=torch.float16, device="cuda", seed=1)
    v = v + torch.arange(2, device="cuda", dtype=v.dtype)[None, :, None, None]  # heads differ
    out, lse = kernel_dense.dense_sdpa_with_lse(q, k, v, is_causal, 128 ** -0.5, try_cudnn=try_cudnn)
    ke, ve = k.repeat_interleave(4, 1), v.repeat_interleave(4, 1)
    assert rel_err(out, F.scaled_dot_product_attention(q.double(), ke.double(), ve.double(),
                                                       is_causal=is_causal)) < 2 * REL_TOL[q.dtype]
    logits = (q.double() @ ke.double().transpose(-1, -2)) * 128 ** -0.5
    if is_causal:
        above = torch.ones(4096, 4096, device="cuda", dtype=torch.bool).triu(1)
        logits = logits.masked_fill(above, -torch.inf)
    assert torch.allclose(lse.double(), logits.logsumexp(-1), atol=1e-2)
    print("native GQA:", {k[0]: ok for k, ok in kernel_dense._NATIVE_GQA.items()})


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_eager_sample_sends_unprunable_data_dense_before_the_full_plan(is_causal, monkeypatch):
    """Eager calls without a mask plan a sample of their rows first: uniform data goes dense
    having planned only the sample (every plan is shorter than the call), clustered data still
    takes the sparse path, and AETHER_DENSE_SAMPLE=0 plans the whole call again."""

    planned = []
    real = kernel_plan.plan_attention
    monkeypatch.setattr(kernel_plan, "plan_attention",
                        lambda q, *a, **k: planned.append(q.shape[2]) or real(q, *a, **k))
    N = 16384
    q, k, v = WORKLOADS["uniform"](1, 8, N, 128, dtype=torch.float16, device="cuda")
    out, stats = aether_compile.attention(q, k, v, is_causal=is_causal, return_stats=True)
    assert planned and max(planned) < N, planned
    assert rel_err(out, chunked_oracle(q, k, v, None, is_causal)) < REL_TOL[torch.float16]
    assert stats.kept_fraction > (0.49 if is_causal else 0.99)  # every live block, dense
    if not is_causal:  # clustered, non-causal: prunable, so the full plan and the sparse kernel
        planned.clear()
        q, k, v = WORKLOADS["clustered"](1, 8, N, 128, dtype=torch.float16, device="cuda")
        _, stats = aether_compile.attention(q, k, v, return_stats=True)
        assert max(planned) == N and stats.kept_fraction < 0.6
    planned.clear()
    monkeypatch.setenv("AETHER_DENSE_SAMPLE", "0")
    aether_compile.attention(q, k, v, is_causal=is_causal)
    assert planned == [N]


def test_public_eager_call_chooses_dense_before_the_op(monkeypatch):
    """Without stats or a mask, the public function samples before the op: uniform data runs
    the dense kernel with no op call (gradients through the kernel's own backward, equal to
    float64 autograd), a 4K call goes dense on its sizes alone, and clustered data samples once
    and then plans the whole call in the op (no second sample)."""
    from aether_compile import ops

    planned, op_calls = [], []
    real_plan, real_forward = kernel_plan.plan_attention, ops.forward_impl
    monkeypatch.setattr(kernel_plan, "plan_attention",
                        lambda q, *a, **k: planned.append(q.shape[2]) or real_plan(q, *a, **k))
    monkeypatch.setattr(ops, "forward_impl",
                        lambda *a, **k: op_calls.append(1) or real_forward(*a, **k))
    N = 16384
    q, k, v = WORKLOADS["uniform"](1, 4, N, 64, dtype=torch.float16, device="cuda")
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    out = aether_compile.attention(*leaves)
    assert planned and max(planned) < N and not op_calls, (planned, op_calls)
    assert rel_err(out, chunked_oracle(q, k, v)) < REL_TOL[torch.float16]
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, do)
    ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(F.scaled_dot_product_attention(*ref), ref, do.float())
    for got, w in zip(grads, want):
        assert rel_err(got, w) < 4 * REL_TOL[torch.float16]
    monkeypatch.delenv("AETHER_STATIC_DENSE")
    planned.clear()
    small = WORKLOADS["clustered"](1, 4, 4096, 128, dtype=torch.float16, device="cuda")
    with torch.no_grad():
        assert rel_err(aether_compile.attention(*small, is_causal=True),
                       chunked_oracle(*small, None, True)) < REL_TOL[torch.float16]
    assert not planned and not op_calls
    q, k, v = WORKLOADS["clustered"](1, 4, N, 128, dtype=torch.float16, device="cuda")
    out = aether_compile.attention(q, k, v)
    assert len(planned) == 2 and planned[0] < N and planned[1] == N and op_calls == [1]
    assert rel_err(out, chunked_oracle(q, k, v)) < REL_TOL[torch.float16] * 4


def test_static_dense_in_eager(monkeypatch):
    """4K tokens x 4 heads: too little work for the sparse path to repay its fixed cost, so the op
    runs dense SDPA without planning; every live block is reported kept."""

    monkeypatch.delenv("AETHER_STATIC_DENSE")
    planned = []
    real = kernel_plan.plan_attention
    monkeypatch.setattr(kernel_plan, "plan_attention", lambda *a, **k: planned.append(1) or real(*a, **k))
    q, k, v = WORKLOADS["clustered"](1, 4, 4096, 128, dtype=torch.float16, device="cuda")
    out, stats = aether_compile.attention(q, k, v, is_causal=True, return_stats=True)
    assert not planned
    assert int(stats.kept_blocks.sum()) == 4 * sum(range(1, 4096 // 128 + 1)) * 2
    assert rel_err(out, chunked_oracle(q, k, v, None, True)) < REL_TOL[torch.float16]
