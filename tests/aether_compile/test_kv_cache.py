"""The decode ops (aether_compile/kv_cache.py): the cache write keeps the key summary in step
with the cache, a cache changed behind our back is re-summarised (never trusted stale), and the
decode op equals float64 SDPA within its certificate, eagerly and inside torch.compile."""

from __future__ import annotations

import collections
import functools
import math

import pytest
import torch
import torch.nn.functional as F

from aether_compile import kv_cache
from aether_compile.kernels import decode

from tests.helpers import REL_TOL, TRITON_INTERPRET

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _fresh():
    kv_cache.forget_summaries()
    kv_cache.STATS.clear()
    yield
    kv_cache.forget_summaries()


def _cache(B=2, Hkv=2, S=256, D=32, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, S, D, generator=g)
    k[:, :, ::37] *= 4  # a few keys that dominate
    v = torch.randn(B, Hkv, S, D, generator=g)
    return k.to(DEVICE, dtype), v.to(DEVICE, dtype)


def _query(B=2, Hq=4, Lq=1, D=32, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, Hq, Lq, D, generator=g) * 2).to(DEVICE, dtype)


def _oracle(q, k, v, mask=None):
    if mask is not None and mask.is_floating_point():
        mask = mask.double()  # SDPA silently misreads a float32 mask on float64 inputs
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q.double(), k, v, attn_mask=mask)


def _within_certificate(out, q, k, v, eps, mask=None):
    """|out - exact| <= 2 eps max|v| (the dropped mass, renormalised) + the dtype's rounding."""
    want = _oracle(q, k, v, mask)
    bound = 2 * eps * v.double().abs().max() + 4 * REL_TOL[q.dtype] * want.abs().max()
    return (out.double() - want).abs().max().item() <= bound.item()


def _summaries_equal(a, b):
    return all(torch.equal(x, y) for x, y in zip((a.codes, a.center, a.step),
                                                  (b.codes, b.center, b.step)))


def test_writes_keep_the_summary_in_step_with_the_cache():
    k, _ = _cache()
    versions = []
    for step, pos in enumerate(([0, 1, 2, 3], [4], [5], [200])):
        index = torch.tensor(pos, device=DEVICE)
        new = torch.randn(2, 2, len(pos), 32, device=DEVICE) * (step + 1)
        torch.ops.aether.key_cache_index_copy_(k, 2, index, new)
        versions.append((k._version, [e.version for e in kv_cache._SUMMARIES.values()]))
        assert torch.equal(k[:, :, index], new)
    # summarised once, then in place
    assert kv_cache.STATS == {"rebuilt": 1, "updated": 3}, (
        versions, kv_cache._DISPATCH_BUMPS, torch.__version__)
    assert _summaries_equal(kv_cache.summary_for(k), decode.summarize_keys(k))
    assert kv_cache.STATS["rebuilt"] == 1


@pytest.mark.parametrize("change", ["zero_", "reorder_batch", "slice_assign", "new_buffer"])
def test_a_cache_changed_behind_our_back_is_summarised_again(change, monkeypatch):
    # the certified path every call: on CUDA the site's lagged choice may run a call dense,
    # which reads no summary and so rebuilds none
    monkeypatch.setenv("AETHER_DENSE_FRACTION", "off")
    k, v = _cache()
    q = _query()
    torch.ops.aether.key_cache_index_copy_(k, 2, torch.tensor([0], device=DEVICE),
                                           torch.randn(2, 2, 1, 32, device=DEVICE))
    before = kv_cache.STATS["rebuilt"]
    if change == "zero_":  # a new prompt in the same buffers
        k.zero_()
    elif change == "reorder_batch":  # beam search
        k.copy_(k.index_select(0, torch.tensor([1, 0], device=DEVICE)))
    elif change == "slice_assign":
        k[:, :, 10:20] = 5.0
    else:
        k = k.clone()
    out = torch.ops.aether.decode_attention(q, k, v, None, False, None, 1e-2)
    assert kv_cache.STATS["rebuilt"] == before + 1
    assert _summaries_equal(kv_cache.summary_for(k), decode.summarize_keys(k))
    assert _within_certificate(out, q, k, v, 1e-2)


def test_a_grown_cache_inherits_the_summary_only_from_its_current_past():
    """key_cache_cat hands a current summary on (equal to summarising the grown cache), not one
    of a past written behind our back, and never one left by a freed cache whose memory a new
    tensor of the same shape reuses."""
    k, v = _cache(S=100)
    q = _query()
    kv_cache.summary_for(k)
    grown = torch.ops.aether.key_cache_cat(k, torch.randn(2, 2, 1, 32, device=DEVICE))
    assert torch.equal(grown, torch.cat([k, grown[:, :, -1:]], 2))
    assert kv_cache.STATS == {"rebuilt": 1, "extended": 1}
    assert _summaries_equal(kv_cache.summary_for(grown), decode.summarize_keys(grown))
    assert kv_cache.STATS["rebuilt"] == 1  # the handed-on summary was used as it is

    k[:, :, 5] = 9.0  # the past changes after its summary was taken: nothing to hand on
    grown = torch.ops.aether.key_cache_cat(k, torch.randn(2, 2, 1, 32, device=DEVICE))
    assert kv_cache.STATS["extended"] == 1
    v_grown = torch.cat([v, v[:, :, -1:]], 2)
    out = torch.ops.aether.decode_attention(q, grown, v_grown, None, False, None, 1e-2)
    assert kv_cache.STATS["rebuilt"] == 2 and _within_certificate(out, q, grown, v_grown, 1e-2)

    # a summary kept for a tensor that is gone: a new tensor at the same address, of the same
    # shape and version, is not described by it
    ident = kv_cache._ident(grown)
    entry = kv_cache._SUMMARIES[ident]
    stranger = torch.randn_like(grown)
    kv_cache._SUMMARIES[kv_cache._ident(stranger)] = entry
    assert not entry.describes(stranger, kv_cache._version(stranger))
    kv_cache.summary_for(stranger)
    assert kv_cache.STATS["rebuilt"] == 3


needs_kernels = pytest.mark.skipif(DEVICE == "cpu" and not TRITON_INTERPRET,
                                   reason="the reference path runs instead (tested below)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Lq,mask_kind", [(1, "none"), (1, "bool"), (3, "float"), (2, "causal")])
def test_decode_equals_sdpa_within_its_certificate(dtype, Lq, mask_kind):
    k, v = _cache(dtype=dtype)
    q = _query(Lq=Lq, dtype=dtype)
    S = k.shape[2]
    mask, is_causal = None, False
    if mask_kind == "bool":  # a left-padded batch: sequence 1 starts at 40
        mask = torch.ones(2, 1, Lq, S, dtype=torch.bool, device=DEVICE)
        mask[1, ..., :40] = False
    elif mask_kind == "float":  # transformers' static-cache mask: finfo.min past the length
        mask = torch.zeros(2, 1, Lq, S, dtype=dtype, device=DEVICE)
        mask[..., 180:] = torch.finfo(dtype).min
    elif mask_kind == "causal":
        is_causal = True
    eps = 1e-2
    out = torch.ops.aether.decode_attention(q, k, v, mask, is_causal, None, eps)
    assert out.shape == q.shape and out.dtype == dtype
    ref_mask = mask
    if is_causal:
        ref_mask = torch.ones(Lq, S, dtype=torch.bool, device=DEVICE).tril()
    assert _within_certificate(out, q, k, v, eps, ref_mask)


def test_calls_it_does_not_serve_are_sdpa():
    k, v = _cache(S=32)  # two blocks: nothing worth skipping
    q = _query()
    out = torch.ops.aether.decode_attention(q, k, v, None, False, None, 1e-2)
    assert kv_cache.STATS["rebuilt"] == 0
    assert torch.allclose(out.double(), _oracle(q, k, v), atol=1e-5)
    reason = kv_cache.decode_dense_reason(_query(Lq=17), *_cache(), None)
    assert "prefill" in reason


def _step(q, k_cache, v_cache, pos, k_new, v_new, mask, graph_bumps=0):
    torch.ops.aether.key_cache_index_copy_(k_cache, 2, pos, k_new, graph_bumps)
    v_cache.index_copy_(2, pos, v_new)
    return torch.ops.aether.decode_attention(q, k_cache, v_cache, mask, False, None, 1e-2)


def test_inside_torch_compile_the_summary_is_updated_not_rebuilt():
    """Inductor hands the write op the cache itself, so each step updates the summary in place;
    the results equal the eager steps'."""
    k, v = _cache(S=320)
    k2, v2 = k.clone(), v.clone()
    compiled = torch.compile(functools.partial(_step, graph_bumps=1), backend="inductor",
                             fullgraph=True)
    S = k.shape[2]
    for t in range(100, 104):
        pos = torch.tensor([t], device=DEVICE)
        q = _query(seed=t)
        k_new, v_new = (torch.randn(2, 2, 1, 32, device=DEVICE) for _ in range(2))
        mask = (torch.arange(S, device=DEVICE) <= t).expand(2, 1, 1, S)
        with torch.no_grad():
            got = compiled(q, k, v, pos, k_new, v_new, mask)
        want = _step(q, k2, v2, pos, k_new, v_new, mask)
        assert torch.allclose(got, want, atol=1e-5)
        assert _within_certificate(got, q, k, v, 1e-2, mask)
    assert torch.equal(k, k2)
    # each cache summarised once (at its first write), then updated in place every step
    assert kv_cache.STATS == {"rebuilt": 2, "updated": 6}
    assert _summaries_equal(kv_cache.summary_for(k), decode.summarize_keys(k))


@pytest.mark.skipif(not hasattr(torch.Tag, "cudagraph_unsafe"),
                    reason="this torch has no cudagraph_unsafe tag")
@pytest.mark.parametrize("name", ["key_cache_index_copy_", "key_cache_cat", "decode_attention"])
def test_the_decode_ops_stay_out_of_cuda_graphs(name):
    """Their Python (the version checks that notice a cache written behind our back, the lagged
    choice) must run every step: a CUDA graph would replay only the kernels a capture launched.
    Inductor leaves ops with this tag out of its graphs (tests/passes/test_rewrite_decode.py
    runs generate under CUDA graphs on the GPU)."""
    import torch._inductor.utils as inductor_utils

    op = getattr(torch.ops.aether, name).default
    assert torch.Tag.cudagraph_unsafe in op.tags
    if hasattr(inductor_utils, "is_cudagraph_unsafe_fx_node"):  # what Inductor asks (2.13)
        node = torch.fx.Graph().call_function(op, ())
        assert inductor_utils.is_cudagraph_unsafe_fx_node(node)


def test_a_write_bumps_the_version_once_as_index_copy_does():
    """Each write through the op moves the cache's version by one, as index_copy_ does (autograd's
    saved-tensor checks read it), whether it summarises the cache afresh or updates a current
    summary; the dispatcher adds no bump of its own (the op is not a custom_op), as the import's
    calibration measured. Any other count would make every write look like one made behind our
    back."""
    assert kv_cache._DISPATCH_BUMPS == (0, 0)
    g = torch.Generator().manual_seed(0)
    cache = torch.zeros(2, 2, 256, 16)
    for step in range(3):
        before = cache._version
        torch.ops.aether.key_cache_index_copy_(cache, 2, torch.tensor([step]),
                                               torch.randn(2, 2, 1, 16, generator=g))
        assert cache._version == before + 1
    assert kv_cache.STATS["rebuilt"] == 1 and kv_cache.STATS["updated"] == 2, dict(kv_cache.STATS)


@pytest.mark.parametrize("mask_kind", ["none", "bool_b1", "float_2d", "per_head", "causal",
                                       "bool_b1_broadcast_batch"])
@pytest.mark.parametrize("Lq", [1, 3])
def test_dense_decode_folds_the_gqa_group_and_equals_sdpa(mask_kind, Lq):
    """The decode op's dense path where the kernels do not run (float64: the GQA group folded
    into query rows, so SDPA's fused kernels take it with a mask) equals SDPA with enable_gqa,
    for every mask form SDPA takes; with a mask and is_causal together it does what SDPA does."""
    B, Hq, Hkv, S, D = 2, 8, 2, 40, 16
    g = torch.Generator().manual_seed(Lq)
    q, k, v = (torch.randn(B, h, n, D, generator=g, dtype=torch.float64)
               for h, n in ((Hq, Lq), (Hkv, S), (Hkv, S)))
    mask, causal = None, False
    if mask_kind == "bool_b1":
        mask = torch.rand(B, 1, Lq, S, generator=g) > 0.3
        mask[..., 0] = True
    elif mask_kind == "bool_b1_broadcast_batch":
        mask = torch.rand(1, 1, Lq, S, generator=g) > 0.3
        mask[..., 0] = True
    elif mask_kind == "float_2d":
        mask = torch.randn(Lq, S, generator=g, dtype=torch.float64)
    elif mask_kind == "per_head":
        mask = torch.randn(B, Hq, Lq, S, generator=g, dtype=torch.float64)
    elif mask_kind == "causal":
        causal = True
    want = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, scale=0.3, enable_gqa=True)
    got = kv_cache.dense_decode(q, k, v, mask, causal, 0.3)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if mask is not None:  # a mask and is_causal together: whatever SDPA does with them
        try:
            want = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=True, scale=0.3, enable_gqa=True)
        except RuntimeError as e:
            with pytest.raises(type(e)):
                kv_cache.dense_decode(q, k, v, mask, True, 0.3)
        else:
            torch.testing.assert_close(kv_cache.dense_decode(q, k, v, mask, True, 0.3), want)


@pytest.mark.skipif(DEVICE == "cpu" and not TRITON_INTERPRET,
                    reason="Triton on CPU needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("mask_kind", ["none", "bool_b1", "float_2d", "causal", "per_head"])
def test_dense_decode_with_a_mask_runs_the_split_kernel(mask_kind, dtype, monkeypatch):
    """Where the decode kernels run, a masked (or causal) dense decode call goes to
    ``attend_all`` (SDPA would fall to math for GQA with a mask) and an unmasked one to SDPA
    itself; a per-head mask, which the kernel's bias cannot carry, is folded. All equal float64
    SDPA within the dtype's rounding."""
    B, Hq, Hkv, Lq, S, D = 2, 8, 2, 2, 200, 32
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(B, h, n, D, generator=g).to(DEVICE, dtype)
               for h, n in ((Hq, Lq), (Hkv, S), (Hkv, S)))
    mask, causal = None, mask_kind == "causal"
    if mask_kind == "bool_b1":
        mask = (torch.rand(B, 1, Lq, S, generator=g) > 0.3).to(DEVICE)
        mask[..., 0] = True
    elif mask_kind == "float_2d":
        mask = torch.randn(Lq, S, generator=g).to(DEVICE)
    elif mask_kind == "per_head":
        mask = torch.randn(B, Hq, Lq, S, generator=g).to(DEVICE)
    calls = []
    real = decode.attend_all
    monkeypatch.setattr(decode, "attend_all", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    got = kv_cache.dense_decode(q, k, v, mask, causal, 0.3)
    assert len(calls) == (mask_kind in ("bool_b1", "float_2d", "causal"))
    m64 = mask.double() if mask is not None and mask.is_floating_point() else mask
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m64,
                                          is_causal=causal, scale=0.3, enable_gqa=True)
    assert (got.double() - want).abs().max().item() <= 4 * REL_TOL[dtype] * want.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("user_backends", ["default", "flash_only"])
def test_unmasked_dense_decode_runs_cudnn_first_unless_the_user_turned_it_off(user_backends):
    """An unmasked dense decode call runs cuDNN (SDPA's dispatcher picks flash, slower at every
    decode shape measured) and equals float64 SDPA; a user's own backend choice is kept."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.profiler import ProfilerActivity, profile

    B, Hq, Hkv, S, D = 4, 16, 4, 4096, 128
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, h, n, D, generator=g).to("cuda", torch.bfloat16)
               for h, n in ((Hq, 1), (Hkv, S), (Hkv, S)))
    import contextlib
    user = sdpa_kernel([SDPBackend.FLASH_ATTENTION]) if user_backends == "flash_only" \
        else contextlib.nullcontext()
    with user:
        kv_cache.dense_decode(q, k, v, None, False, 0.1)  # warm-up
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            got = kv_cache.dense_decode(q, k, v, None, False, 0.1)
            torch.cuda.synchronize()
    names = " ".join(e.name.lower() for e in prof.events())
    if user_backends == "flash_only":
        assert "cudnn" not in names and "flash" in names, names[:300]
    else:
        assert "cudnn" in names, names[:300]
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.1,
                                          enable_gqa=True)
    assert (got.double() - want).abs().max().item() <= 4 * REL_TOL[torch.bfloat16] * want.abs().max()


def test_decode_dense_fraction_stays_under_the_measured_break_even():
    """The op's dense threshold by call size sits at or under the break-even kept fraction the
    committed decode grid measured for every shape it holds (bench_decode's
    break_even_kept_kv): where the op runs a certified step, the measured kernels beat dense."""
    import json
    import pathlib

    results = pathlib.Path(__file__).parents[2] / "benchmarks" / "results"
    grid = results / "decode_NVIDIA_H100_80GB_HBM3.json"
    rows = [r for r in json.loads(grid.read_text())["rows"]
            if r.get("break_even_kept_kv") is not None]
    assert len(rows) >= 20
    for r in rows:
        fraction = kv_cache.decode_dense_fraction(r["batch"], r["hkv"], r["kv"])
        assert fraction <= max(0.0, r["break_even_kept_kv"]), r
    # and it is not the old constant: the large calls certify where they pay
    assert kv_cache.decode_dense_fraction(8, 8, 32768) > 0.3
    assert kv_cache.decode_dense_fraction(1, 8, 8192) == 0.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("keys", [8192, 131072])
def test_masked_dense_decode_takes_sdpa_from_its_size_where_a_fused_kernel_takes_the_mask(keys):
    """A masked dense decode call below SDPA_MASKED_MIN_KEYS runs the split kernel; from it, SDPA
    where one of its fused kernels takes the mask with GQA (else the split kernel still). Both
    equal float64 SDPA."""
    from aether_compile import _compat

    B, Hq, Hkv, D = 1, 8, 2, 64
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(B, h, n, D, generator=g).to("cuda", torch.bfloat16)
               for h, n in ((Hq, 1), (Hkv, keys), (Hkv, keys)))
    mask = torch.ones(B, 1, 1, keys, dtype=torch.bool, device="cuda")
    mask[..., keys // 2:] = False  # a static cache half filled
    before = collections.Counter(kv_cache.CALLS)
    got = kv_cache.dense_decode(q, k, v, mask, False, D ** -0.5)
    took = kv_cache.CALLS - before
    fused = _compat.sdpa_fused_takes(q, k, v, mask, True)
    sdpa = B * keys >= kv_cache.SDPA_MASKED_MIN_KEYS and fused
    assert took == {"dense_sdpa_masked" if sdpa else "dense_split": 1}, (took, fused)
    want = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask,
                                          enable_gqa=True)
    assert (got.double() - want).abs().max().item() <= 4 * REL_TOL[q.dtype] * want.abs().max()
