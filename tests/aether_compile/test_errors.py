"""Input errors of ``aether_compile.attention``: what SDPA rejects, the op rejects too, with a
ValueError or TypeError that names the bad value. (The basic ones — head dims 16 vs 8,
dtype mix, int query, key/value lengths, GQA without enable_gqa — are in test_op.py.)

Also pinned here: other layouts SDPA takes (ranks 2, 3 and 5, mixed ranks, broadcast batch
dims), which the op takes too; where the op is stricter than SDPA on CPU (key/value length
mismatch, head dim 0) and where it is more lenient (1-D/0-D masks, a float mask of another float
dtype): each with what SDPA does.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import aether_compile

from tests.helpers import rel_err

B, H, L, S, D = 2, 4, 10, 12, 16


def qkv(Hkv=H, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(B, H, L, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, S, D, generator=g, dtype=dtype),
            torch.randn(B, Hkv, S, D, generator=g, dtype=dtype))


def bool_mask(*shape):
    return torch.ones(*shape, dtype=torch.bool)


# (id, build(q, k, v) -> (args, kwargs), exception types, message regex naming the value)
REJECTED_BY_BOTH = [
    ("value_dtype", lambda q, k, v: ((q, k, v.double()), {}), TypeError,
     r"share a dtype; got torch.float32, torch.float32, torch.float64"),
    ("key_dtype_half", lambda q, k, v: ((q, k.half(), v), {}), TypeError,
     r"torch.float16"),
    ("complex_inputs", lambda q, k, v: ((q.cfloat(), k.cfloat(), v.cfloat()), {}), TypeError,
     r"query must be a floating-point tensor, got dtype torch.complex64"),
    ("key_on_meta", lambda q, k, v: ((q, k.to("meta"), v), {}), ValueError,
     r"one device; got cpu, meta, cpu"),
    ("gqa_not_divisible", lambda q, k, v: ((q, k[:, :3], v[:, :3]), {"enable_gqa": True}),
     ValueError, r"query heads \(4\) divisible by key/value heads \(3\)"),
    ("kv_heads_differ", lambda q, k, v: ((q, k, v[:, :2]), {}), ValueError,
     r"key shape \(2, 4, 12, 16\) and value shape \(2, 2, 12, 16\)"),
    ("mask_bad_key_len", lambda q, k, v: ((q, k, v), {"attn_mask": bool_mask(L, 5)}), ValueError,
     r"attn_mask of shape \(10, 5\) does not broadcast to .*\[2, 4, 10, 12\]"),
    ("mask_bad_query_len", lambda q, k, v: ((q, k, v), {"attn_mask": bool_mask(3, S)}),
     ValueError, r"attn_mask of shape \(3, 12\)"),
    ("mask_bad_heads", lambda q, k, v: ((q, k, v), {"attn_mask": bool_mask(3, L, S)}), ValueError,
     r"attn_mask of shape \(3, 10, 12\)"),
    ("mask_bad_batch", lambda q, k, v: ((q, k, v), {"attn_mask": bool_mask(3, 1, L, S)}),
     ValueError, r"attn_mask of shape \(3, 1, 10, 12\)"),
    ("mask_5d", lambda q, k, v: ((q, k, v), {"attn_mask": bool_mask(1, B, H, L, S)}), ValueError,
     r"attn_mask of shape \(1, 2, 4, 10, 12\)"),
    ("mask_int", lambda q, k, v: ((q, k, v), {"attn_mask": torch.ones(L, S, dtype=torch.int64)}),
     TypeError, r"attn_mask must be bool or floating point, got torch.int64"),
    ("mask_list", lambda q, k, v: ((q, k, v), {"attn_mask": [[True]]}), TypeError,
     r"attn_mask must be a Tensor or None, got list"),
    ("query_list", lambda q, k, v: (([1.0], k, v), {}), TypeError,
     r"query must be a torch.Tensor, got list"),
    ("dropout_negative", lambda q, k, v: ((q, k, v), {"dropout_p": -0.1}), ValueError,
     r"dropout_p must be in \[0, 1\], got -0.1"),
    ("dropout_above_1", lambda q, k, v: ((q, k, v), {"dropout_p": 1.5}), ValueError,
     r"got 1.5"),
    ("scale_str", lambda q, k, v: ((q, k, v), {"scale": "x"}), TypeError,
     r"scale must be a Python float or None, got str"),
]


@pytest.mark.parametrize("build,exc,match", [c[1:] for c in REJECTED_BY_BOTH],
                         ids=[c[0] for c in REJECTED_BY_BOTH])
def test_rejected_like_sdpa_with_the_value_named(build, exc, match):
    args, kwargs = build(*qkv())
    with pytest.raises(Exception):
        F.scaled_dot_product_attention(*args, **kwargs)
    with pytest.raises(exc, match=match):
        aether_compile.attention(*args, **kwargs)


SDPA_LAYOUTS = [
    # SDPA takes any batch rank and mixed ranks, broadcasting batch dims; so does the op
    ("all_3d", lambda q, k, v: ((q[0], k[0], v[0]), {})),
    ("all_5d", lambda q, k, v: ((q[None], k[None], v[None]), {})),
    ("key_5d", lambda q, k, v: ((q, k[None], v), {})),
    ("value_3d", lambda q, k, v: ((q, k, v[0]), {})),
    ("query_batch_1", lambda q, k, v: ((q[:1], k, v), {})),
    ("all_2d", lambda q, k, v: ((q[0, 0], k[0, 0], v[0, 0]), {})),
    ("5d_mask_causal", lambda q, k, v: ((q[None], k[None], v[None]),
                                        {"attn_mask": torch.rand(2, 1, L, S) > 0.3,
                                         "is_causal": False})),
]


@pytest.mark.parametrize("build", [c[1] for c in SDPA_LAYOUTS], ids=[c[0] for c in SDPA_LAYOUTS])
def test_other_layouts_as_sdpa(build):
    args, kwargs = build(*(t.double() for t in qkv()))
    ref = F.scaled_dot_product_attention(*args, **kwargs)
    out = aether_compile.attention(*args, **kwargs, eps=0.0)
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-12


def test_other_layouts_that_do_not_broadcast_name_the_shapes():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"do not broadcast: \(2, 4, 10, 16\), \(3, 4, 12, 16\)"):
        aether_compile.attention(q, torch.cat([k, k[:1]]), torch.cat([v, v[:1]]))


STRICTER_THAN_SDPA = [
    # ... returns *something* for value length != key length on CPU ...
    ("value_len_5", lambda q, k, v: ((q, k, v[:, :, :5]), {}), r"key length 12 != value length 5"),
    # ... and uniform attention for head dim 0 (scale = 0^-0.5 = inf).
    ("head_dim_0", lambda q, k, v: ((q[..., :0], k[..., :0], v), {}), r"head dim must be > 0"),
    ("mask_on_meta", lambda q, k, v: ((q, k, v), {"attn_mask": torch.zeros(L, S, device="meta")}),
     r"attn_mask is on meta, query on cpu"),
]


@pytest.mark.parametrize("build,match", [c[1:] for c in STRICTER_THAN_SDPA],
                         ids=[c[0] for c in STRICTER_THAN_SDPA])
def test_stricter_than_sdpa_with_a_clear_error(build, match):
    args, kwargs = build(*qkv())
    F.scaled_dot_product_attention(*args, **kwargs)  # SDPA (CPU) accepts these
    with pytest.raises(ValueError, match=match):
        aether_compile.attention(*args, **kwargs)


@pytest.mark.parametrize("mask", [torch.zeros(S), torch.tensor(0.5),
                                  torch.randn(L, S, dtype=torch.float64)],
                         ids=["float_1d", "float_0d", "float64_mask_fp32_query"])
def test_more_lenient_than_sdpa(mask):
    """SDPA on CPU rejects 1-D and 0-D masks (IndexError) and a float mask of another float dtype
    (RuntimeError); the op broadcasts them (casting to the compute dtype), as SDPA would if given
    the mask reshaped to 2-D and cast."""
    q, k, v = qkv()
    with pytest.raises((IndexError, RuntimeError)):
        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out = aether_compile.attention(q, k, v, attn_mask=mask, eps=0.0)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.float().expand(L, S))
    assert rel_err(out, ref) < 1e-5


@pytest.mark.parametrize("eps", [-1e-3, math.nan], ids=["negative", "nan"])
def test_bad_eps_named(eps):
    with pytest.raises(ValueError, match=f"eps must be >= 0, got {eps}"):
        aether_compile.attention(*qkv(), eps=eps)


def test_errors_before_any_compute_on_zero_length():
    """Validation runs even when there is nothing to compute."""
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"attn_mask of shape \(3, 0\)"):
        aether_compile.attention(q, k[:, :, :0], v[:, :, :0], attn_mask=bool_mask(3, 0))
    with pytest.raises(ValueError, match="query head dim 16 != key head dim 8"):
        aether_compile.attention(q[:, :, :0], k[..., :8], v)


# Direct calls of the registered op validate exactly like the public function (tensor-typed
# failures only: the op's schema itself rejects non-tensor arguments first).
DIRECT_OP = [c for c in REJECTED_BY_BOTH + [(n, b, ValueError, m) for n, b, m in STRICTER_THAN_SDPA]
             if c[0] not in ("mask_list", "query_list", "dropout_negative", "dropout_above_1",
                             "scale_str")]


@pytest.mark.parametrize("build,exc,match", [c[1:] for c in DIRECT_OP],
                         ids=[c[0] for c in DIRECT_OP])
def test_direct_op_call_gets_the_same_error(build, exc, match):
    args, kwargs = build(*qkv())
    kwargs.pop("dropout_p", None)
    with pytest.raises(exc, match=match):
        torch.ops.aether.attention(*args, **kwargs)
