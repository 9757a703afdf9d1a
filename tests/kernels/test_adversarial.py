"""Adversarial inputs for the op and the Triton kernels: nearly tight bounds, huge scores,
NaN/Inf, fully masked rows, zero lengths, strided and expanded inputs; on a GPU, a mask whose
offsets need int64.

What runs where. Inputs live on DEVICE: "cuda" when a GPU is present, else "cpu" (env
``AETHER_TEST_DEVICE=cpu|cuda`` overrides). Three paths per test:
  * "op" (``aether_compile.attention`` -> ``torch.ops.aether``): on CPU the plain-torch reference;
    on CUDA the Triton path with the op's tiles (128 x 64 at head dim <= 128) and its default
    dense dispatch: the static choice (at most PROBE_BLOCKS key blocks, or a small call; cuDNN /
    flash SDPA where a dense kernel is exact, e.g. fp16/bf16 without a mask, else eps-0 Triton)
    and the runtime gate (above 60% of the live blocks). Tests that assert what the op pruned
    take the ``sparse_op`` fixture (AETHER_DENSE_FRACTION=off, AETHER_STATIC_DENSE=0; the CPU
    reference reads neither).
  * "twopass" / "stop" (``triton_attention`` with 16 x 16 tiles, no dense dispatch): compiled on
    CUDA; on CPU through Triton's interpreter, skipped unless TRITON_INTERPRET=1.
Oracles are float64: SDPA's math backend on CPU copies (``sdpa_math``), the kept-block oracle and
the dropped-mass recomputation on DEVICE. Tolerances are per dtype (``helpers.REL_TOL``), the same
on both devices. On CPU CI nothing changes; on a GPU machine every test here runs on CUDA except
``test_mask_offsets_beyond_int32_within_one_head`` (gpu-marked, skipped on CPU) and the assertion
about the CPU reference in ``test_masked_nan_key_is_ignored_by_triton`` (on CPU copies).

Non-finite inputs, compared with SDPA's math backend
(``torch.ops.aten._scaled_dot_product_attention_math``) in float64 on CPU. "The op's reference"
is the op on CPU; on CUDA the op behaves as the Triton kernels below (with its own tiles):
  * NaN/±Inf in query row i: row i is NaN, every other row exact — all paths, as math.
  * NaN in a key: every row NaN — the op's reference, as math. Triton: a NaN key that is masked
    (bool mask or causal) is ignored (math gives NaN: NaN + -inf); a NaN key's block is never
    pruned.
  * +Inf in a key: the same rows are NaN as math (rows whose score is +inf), on every path.
  * NaN/Inf in a value, at eps = 0 and no mask: the same non-finite pattern as math. Math (and the
    op's CPU reference) also spread a NaN value to rows that mask its key (0 * NaN); the Triton
    kernels read only the blocks a query tile visits, so under causal masking, or at eps > 0 when
    the block is skipped, the NaN reaches exactly the tiles that visited its block.
  * NaN or +Inf in a float mask entry (i, j): row i NaN, as math.
Fully masked rows (bool False or float -inf everywhere) give 0, as math; rows masked entirely with
HF's finfo(float32/bfloat16).min average v uniformly, as math.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import aether_compile
from aether_compile import triton_forward
from aether_compile.kernels import forward as kernel_forward
from aether_compile.kernels.reference import dropped_mass

from tests.helpers import REL_TOL, rel_err
from tests.property_cases import device_from_env, restricted_oracle, triton_runs_on

DEVICE = device_from_env("cuda" if torch.cuda.is_available() else "cpu")
ON_CUDA = DEVICE == "cuda"
PATHS = ["op", "twopass", "stop"]
needs_triton = pytest.mark.skipif(not triton_runs_on(DEVICE),
                                  reason="Triton on CPU needs TRITON_INTERPRET=1")
path_params = [pytest.param(p, marks=[needs_triton] if p != "op" else []) for p in PATHS]
BT = 16  # tiles of the direct Triton calls (tl.dot needs >= 16; several blocks per test)


def dev(t):
    return None if t is None else t.to(DEVICE)


def triton_semantics(path) -> bool:
    """Whether ``path`` runs the Triton kernels here: the modes always, the op on CUDA (on CPU it
    is the plain-torch reference, whose NaN propagation follows math)."""
    return path != "op" or ON_CUDA


@pytest.fixture
def sparse_op(monkeypatch):
    """For tests that assert what the op kept: on CUDA the op may answer densely (static choice
    for few key blocks, runtime gate for unprunable calls), marking every live block kept; turn
    both off. The CPU reference reads neither variable."""
    monkeypatch.setenv("AETHER_DENSE_FRACTION", "off")
    monkeypatch.setenv("AETHER_STATIC_DENSE", "0")


def sdpa_math(q, k, v, mask=None, is_causal=False, scale=None):
    """SDPA's math backend in float64 on CPU (differentiable copies; the result goes back to q's
    device). Bool masks become 0/-inf first, as F.sdpa does before calling it (the aten op itself
    mishandles a bool mask), causal is folded into the mask."""
    device = q.device
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    mask = None if mask is None else mask.cpu()
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    if mask is not None and mask.dtype == torch.bool:  # as F.scaled_dot_product_attention does
        mask = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, -math.inf)
    if mask is not None:
        mask = mask.double()
    if is_causal and mask is not None:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril()
        mask = mask.masked_fill(~causal, -math.inf)
        is_causal = False
    return torch.ops.aten._scaled_dot_product_attention_math(q, k, v, mask, 0.0, is_causal,
                                                             scale=scale)[0].to(device)


def run(path, q, k, v, mask=None, is_causal=False, scale=None, eps=0.0):
    """(out, kept, block_m, block_n) of one implementation."""
    gqa = q.shape[1] != k.shape[1]
    if path == "op":
        out, st = aether_compile.attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                           scale=scale, enable_gqa=gqa, eps=eps, return_stats=True)
        return out, st.kept_blocks, st.block_m, st.block_n
    out, _, kept = triton_forward.triton_attention(q, k, v, mask, is_causal, scale, gqa, eps, BT, BT, path)
    return out, kept, BT, BT


def blocks_of(path):
    return (BT, BT) if path != "op" else (128, 64)  # the op's tiles at head dim <= 128


def randn(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def qkv(B=1, H=1, Hkv=1, L=48, S=40, D=16, dtype=torch.float32, seed=0):
    """Seeded on CPU (the same data on every device), then moved to DEVICE."""
    return (dev(randn(B, H, L, D, dtype=dtype, seed=seed)),
            dev(randn(B, Hkv, S, D, dtype=dtype, seed=seed + 1)),
            dev(randn(B, Hkv, S, D, dtype=dtype, seed=seed + 2)))


def bad_rows(x):
    """Per row of [1, 1, L, D]: 'nan', 'inf' or 'ok'."""
    nan = x.isnan().any(-1)[0, 0]
    inf = x.isinf().any(-1)[0, 0] & ~nan
    return ["nan" if a else "inf" if b else "ok" for a, b in zip(nan.tolist(), inf.tolist())]


def nonfinite_rows(x):
    return (~torch.isfinite(x)).any(-1)[0, 0]


# -- nearly tight bounds ---------------------------------------------------------------------------
def tight_qkv(path, dtype, eps, n_cold=15, seed=0):
    """Every key block holds n identical keys along one direction e, and all queries point along e:
    ball and box bounds are then exact (radius 0, zero-width box), so the certificate has only its
    fp slack between it and the truth. Block 0 is hot (score 0); the n_cold other blocks each carry
    delta = eps/8 of the hot block's mass, so the best-first visit stops with a dropped mass just
    under eps."""
    bm, bn = blocks_of(path)
    D, L = 16, bm
    S = bn * (1 + n_cold)
    e = torch.zeros(D)
    e[0] = 1.0
    qn = 4.0
    q = (qn * e).expand(1, 1, L, D).clone()
    delta = eps / 8
    scale = D ** -0.5
    score = torch.full((1 + n_cold,), math.log(delta))
    score[0] = 0.0
    score[1:] += torch.linspace(0, 0.01, n_cold)  # distinct, nearly equal bounds
    a = score / (qn * scale)
    k = (a.repeat_interleave(bn)[:, None] * e).view(1, 1, S, D)
    v = randn(1, 1, S, D, seed=seed)
    return dev(q.to(dtype)), dev(k.to(dtype)), dev(v.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("eps", [1e-3, 1e-1])
@pytest.mark.parametrize("path", path_params)
def test_tight_bounds_certified_close_to_eps(path, eps, dtype, monkeypatch, sparse_op):
    monkeypatch.setattr(kernel_forward, "PROBE_BLOCKS", 1)
    q, k, v = tight_qkv(path, dtype, eps)
    out, kept, bm, bn = run(path, q, k, v, eps=eps)
    dropped = dropped_mass(q, k, kept, bm, bn)
    assert float(dropped.max()) <= eps
    assert float(dropped.max()) > 0.5 * eps, "the bound is not tight: nothing near eps dropped"
    ref, _ = restricted_oracle(q, k, v, None, False, None, kept, bm, bn)
    assert rel_err(out, ref) < REL_TOL[dtype]


# -- huge scores -----------------------------------------------------------------------------------
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("path", path_params)
def test_scores_of_1e4_do_not_overflow(path, dtype, is_causal):
    """|scores| ~ 1e4 (softmax all but one-hot): finite, certified, equal to float64 attention."""
    q, k, v = qkv(B=2, H=2, Hkv=2, L=40, S=72, D=32, seed=3)
    q, k = (q * 100).to(dtype), (k * 100).to(dtype)  # score std = 100 * 100 * sqrt(32) / sqrt(32)
    v = v.to(dtype)
    s = (q.double() @ k.double().transpose(-1, -2)) * 32 ** -0.5
    assert float(s.abs().max()) > 3e4
    eps = 1e-3
    out, kept, bm, bn = run(path, q, k, v, is_causal=is_causal, eps=eps)
    assert torch.isfinite(out).all()
    assert float(dropped_mass(q, k, kept, bm, bn, is_causal=is_causal).max()) <= eps
    ref, _ = restricted_oracle(q, k, v, None, is_causal, None, kept, bm, bn)
    # relative rounding of a score of ~4e4 in fp32 is ~2e-3 absolute: allow that much more
    assert rel_err(out, ref) < REL_TOL[dtype] + 4 * 2.0 ** -24 * float(s.abs().max())


# -- NaN / Inf -------------------------------------------------------------------------------------
def with_value(t, idx, val):
    t = t.clone()
    t[idx] = val
    return t


@pytest.mark.parametrize("val", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("path", path_params)
def test_nonfinite_query_row_poisons_only_that_row(path, val):
    q, k, v = qkv(L=48, S=40)
    q = with_value(q, (0, 0, 5, 3), val)
    ref = sdpa_math(q, k, v)
    out, *_ = run(path, q, k, v, eps=1e-3)
    assert bad_rows(out) == bad_rows(ref) == ["ok"] * 5 + ["nan"] + ["ok"] * 42
    ok = torch.arange(48, device=DEVICE) != 5
    assert rel_err(out[:, :, ok], ref[:, :, ok]) < REL_TOL[torch.float32]


@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("path", path_params)
def test_nan_key_poisons_every_row(path, is_causal):
    """As math: NaN + -inf is NaN, so even rows that causal hides the key from are NaN — except on
    Triton (the modes, and the op on CUDA), which drops masked keys before adding (rows before
    the NaN key stay exact)."""
    q, k, v = qkv(L=48, S=40)  # L a multiple of the Triton tile: see the xfail below
    k = with_value(k, (0, 0, 20, 3), math.nan)
    assert bad_rows(sdpa_math(q, k, v, is_causal=is_causal)) == ["nan"] * 48
    out, *_ = run(path, q, k, v, is_causal=is_causal, eps=0.0)
    if triton_semantics(path) and is_causal:
        assert bad_rows(out) == ["ok"] * 20 + ["nan"] * 28
        ref = sdpa_math(q[:, :, :20], k[:, :, :20], v[:, :, :20], is_causal=True)
        assert rel_err(out[:, :, :20], ref) < REL_TOL[torch.float32]
    else:
        assert bad_rows(out) == ["nan"] * 48


@needs_triton
@pytest.mark.parametrize("mode", ["twopass", "stop"])
def test_nan_key_poisons_every_row_of_a_partial_tile(mode):
    q, k, v = qkv(L=40, S=40)  # the last tile holds rows 32..39 of 16
    k = with_value(k, (0, 0, 20, 3), math.nan)
    out, *_ = run(mode, q, k, v, eps=0.0)
    assert bad_rows(out) == ["nan"] * 40


@pytest.mark.parametrize("path", path_params)
def test_inf_key_makes_the_same_rows_nonfinite(path):
    q, k, v = qkv(L=48, S=40)
    k = with_value(k, (0, 0, 20, 3), math.inf)
    ref = sdpa_math(q, k, v)
    out, *_ = run(path, q, k, v, eps=0.0)
    positive = q[0, 0, :, 3] > 0  # score +inf: softmax inf - inf
    assert torch.equal(nonfinite_rows(ref), positive) and torch.equal(nonfinite_rows(out), positive)
    # NaN on every path, as math (the op's reference normalises with softmax: inf - inf)
    assert {bad_rows(out)[i] for i in positive.nonzero().flatten().tolist()} == {"nan"}
    assert rel_err(out[:, :, ~positive], ref[:, :, ~positive]) < REL_TOL[torch.float32]


@pytest.mark.parametrize("val", [math.nan, math.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("path", path_params)
def test_nonfinite_value_at_eps0_like_math(path, val):
    q, k, v = qkv(L=48, S=40)
    v = with_value(v, (0, 0, 20, 3), val)
    ref = sdpa_math(q, k, v)
    out, *_ = run(path, q, k, v, eps=0.0)
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    assert not torch.isfinite(out[..., 3]).any() and torch.isfinite(out[..., :3]).all()


@pytest.mark.parametrize("path", path_params)
def test_nan_value_behind_the_causal_diagonal(path):
    """Math and the op's CPU reference: NaN in every row (0 * NaN for the masked key). Documented
    difference: Triton reads only blocks its tile visits, so with 16 x 16 tiles the NaN of key 20
    (key block 1) reaches query tiles 1 and 2 — rows 16.. (including rows 16-19, which precede
    key 20 but share the tile) — and not tile 0. The op on CUDA (one 128-row tile, one 64-key
    block here) visits key 20's block from its only tile: every row."""
    q, k, v = qkv(L=48, S=40)
    v = with_value(v, (0, 0, 20, 3), math.nan)
    assert sdpa_math(q, k, v, is_causal=True)[..., 3].isnan().all()
    out, kept, bm, bn = run(path, q, k, v, is_causal=True, eps=0.0)
    if triton_semantics(path):  # exactly the rows of the tiles that visited key 20's block
        visited = kept[0, 0, :, 20 // bn].repeat_interleave(bm)[:48].tolist()
        expected = ["nan" if t else "ok" for t in visited]
    else:
        expected = ["nan"] * 48
    if path != "op":
        assert expected == ["ok"] * 16 + ["nan"] * 32
    assert bad_rows(out) == expected


@pytest.mark.parametrize("path", path_params)
def test_nan_value_in_a_skipped_block(path, monkeypatch, sparse_op):
    """Math: NaN in every row (0 * NaN). The op's CPU reference agrees (it multiplies the dense,
    zero-filled probability matrix by v). Documented difference: the Triton kernels (and the op
    on CUDA) read only kept blocks, so the NaN reaches exactly the rows whose query tile kept its
    block."""
    monkeypatch.setattr(kernel_forward, "PROBE_BLOCKS", 1)
    q, k, v = tight_qkv(path, torch.float32, 0.1)
    bm, bn = blocks_of(path)
    j = bn  # first key of block 1: the coldest block (tight_qkv raises the later ones)
    v = with_value(v, (0, 0, j, 0), math.nan)
    assert sdpa_math(q, k, v)[..., 0].isnan().all()
    out, kept, bm, bn = run(path, q, k, v, eps=0.1)
    tile_kept = kept[0, 0, :, j // bn]
    assert not tile_kept.all(), "the NaN block was not skipped anywhere"
    row_kept = tile_kept.repeat_interleave(bm)[: q.shape[2]]
    expected = row_kept if triton_semantics(path) else torch.ones_like(row_kept)
    assert torch.equal(out[0, 0].isnan().any(-1), expected)


@pytest.mark.parametrize("val", [math.nan, math.inf], ids=["nan", "+inf"])
@pytest.mark.parametrize("path", path_params)
def test_nonfinite_float_mask_entry(path, val):
    q, k, v = qkv(L=48, S=40)
    mask = dev(with_value(torch.zeros(48, 40), (5, 7), val))
    ref = sdpa_math(q, k, v, mask)
    out, *_ = run(path, q, k, v, mask, eps=1e-3)
    assert bad_rows(ref) == ["ok"] * 5 + ["nan"] + ["ok"] * 42
    expected = "nan"  # every path, as math
    assert bad_rows(out) == ["ok"] * 5 + [expected] + ["ok"] * 42


@needs_triton
@pytest.mark.parametrize("mode", ["twopass", "stop"])
def test_masked_nan_key_is_ignored_by_triton(mode):
    """Documented difference: math gives NaN everywhere (NaN + -inf); the op's CPU reference also
    (it adds the mask; checked on CPU copies on every machine), but the Triton kernels drop masked
    keys, so the output is exact attention without that key — the op on CUDA too."""
    q, k, v = qkv(L=48, S=40)
    k = with_value(k, (0, 0, 20, 3), math.nan)
    mask = torch.ones(48, 40, dtype=torch.bool)
    mask[:, 20] = False
    mask = dev(mask)
    assert sdpa_math(q, k, v, mask).isnan().all()
    cpu = [t.cpu() for t in (q, k, v, mask)]
    assert aether_compile.attention(*cpu[:3], attn_mask=cpu[3], eps=0.0).isnan().all()
    out, *_ = run(mode, q, k, v, mask, eps=0.0)
    keep = torch.arange(40, device=DEVICE) != 20
    ref = sdpa_math(q, k[:, :, keep], v[:, :, keep])
    assert rel_err(out, ref) < REL_TOL[torch.float32]
    if ON_CUDA:
        op_out, *_ = run("op", q, k, v, mask, eps=0.0)
        assert rel_err(op_out, ref) < REL_TOL[torch.float32]


# -- fully masked rows -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bool", "float_-inf"])
@pytest.mark.parametrize("path", path_params)
def test_fully_masked_rows_give_zero_like_math(path, kind):
    B, H, Hkv, L, S = 2, 4, 2, 48, 80
    q, k, v = qkv(B, H, Hkv, L, S, dtype=torch.float32, seed=7)
    keep = torch.rand(B, 1, L, S, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[0, :, 3] = False  # one row
    keep[1, :, 16:32] = False  # a whole query tile
    mask = dev(keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, -math.inf))
    ref = sdpa_math(q, k, v, mask)
    assert torch.all(ref[0, :, 3] == 0) and torch.all(ref[1, :, 16:32] == 0)
    for causal in (False, True):
        out, kept, bm, bn = run(path, q, k, v, mask, causal, eps=1e-2)
        assert torch.all(out[0, :, 3] == 0) and torch.all(out[1, :, 16:32] == 0)
        assert torch.isfinite(out).all()
        assert rel_err(out, sdpa_math(q, k, v, mask, causal)) < 0.05  # eps = 1e-2 of the mass
        assert float(dropped_mass(q, k, kept, bm, bn, mask, causal).max()) <= 1e-2


def test_fully_masked_rows_have_zero_gradients_like_math():
    q, k, v = qkv(1, 2, 2, 20, 24, dtype=torch.float64, seed=8)
    mask = torch.ones(20, 24, dtype=torch.bool)
    mask[4] = False
    mask = dev(mask)
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = aether_compile.attention(*ins, attn_mask=mask)
    grads = torch.autograd.grad((out * out).sum(), ins)
    ref_in = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = sdpa_math(*ref_in, mask)
    ref_grads = torch.autograd.grad((ref * ref).sum(), ref_in)
    for g, r in zip(grads, ref_grads):
        assert torch.isfinite(g).all() and rel_err(g, r) < 1e-10
    assert torch.all(grads[0][:, :, 4] == 0)


def hf_mask(dtype, L, S, rows):
    m = torch.zeros(1, 1, L, S, dtype=dtype)
    m[..., rows, :] = torch.finfo(dtype).min
    return dev(m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("mode", ["twopass", "stop"])
@needs_triton
def test_hf_min_row_averages_uniformly_on_triton(mode, dtype):
    """A row masked entirely by finfo(dtype).min: s + min rounds to min for every key, so math
    averages v uniformly; the Triton kernels do too (the mask is floored at -1e30 first)."""
    q, k, v = qkv(1, 1, 1, 32, 128, dtype=dtype, seed=9)
    mask = hf_mask(dtype, 32, 128, [5])
    ref = sdpa_math(q, k, v, mask)
    assert torch.allclose(ref[0, 0, 5], v[0, 0].double().mean(0))
    out, *_ = run(mode, q, k, v, mask, eps=1e-2)
    assert rel_err(out[0, 0, 5], ref[0, 0, 5]) < REL_TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_hf_min_row_averages_uniformly_on_the_op(dtype):
    q, k, v = qkv(1, 1, 1, 32, 128, dtype=dtype, seed=9)
    mask = hf_mask(dtype, 32, 128, [5])
    out = aether_compile.attention(q, k, v, attn_mask=mask, eps=0.0)
    assert rel_err(out[0, 0, 5], sdpa_math(q, k, v, mask)[0, 0, 5]) < REL_TOL[dtype]


@pytest.mark.parametrize("path", path_params)
def test_hf_min_tile_is_not_pruned(path, monkeypatch, sparse_op):
    monkeypatch.setattr(kernel_forward, "PROBE_BLOCKS", 1)
    q, k, v = qkv(1, 1, 1, 16, 512, seed=10)
    mask = hf_mask(torch.float32, 16, 512, slice(None))
    out, kept, *_ = run(path, q, k, v, mask, eps=1e-3)
    assert bool(kept.all())


def test_dropped_mass_of_a_uniform_hf_row():
    q, k, _ = qkv(1, 1, 1, 16, 64, seed=11)
    mask = hf_mask(torch.float32, 16, 64, slice(None))
    kept = torch.zeros(1, 1, 1, 4, dtype=torch.bool, device=DEVICE)
    kept[..., 0] = True  # one of four key blocks kept: uniform weights drop 3/4
    d = dropped_mass(q, k, kept, 16, 16, mask)
    assert torch.allclose(d, torch.full_like(d, 0.75))


# -- zero lengths ----------------------------------------------------------------------------------
@pytest.mark.parametrize("B,H,Hkv,L,S", [(2, 4, 2, 0, 9), (2, 4, 2, 9, 0), (2, 4, 2, 0, 0),
                                         (0, 4, 2, 9, 9), (2, 0, 0, 9, 9)],
                         ids=lambda x: str(x))
@pytest.mark.parametrize("mask_kind", [None, "bool", "float"])
def test_zero_lengths_like_sdpa(B, H, Hkv, L, S, mask_kind):
    """The op on DEVICE; SDPA, the reference, on the CPU originals."""
    gqa = H != Hkv
    q, k, v = (torch.randn(B, H, L, 16), torch.randn(B, Hkv, S, 16), torch.randn(B, Hkv, S, 24))
    mask = None
    if mask_kind == "bool":
        mask = torch.ones(B, 1, L, S, dtype=torch.bool)
    elif mask_kind == "float":
        mask = torch.zeros(1, max(H, 1), L, S)[:, :H] if H else torch.zeros(L, S)
    for causal in (False, True):
        ins = [dev(t.clone()).requires_grad_() for t in (q, k, v)]
        out, st = aether_compile.attention(*ins, attn_mask=dev(mask), is_causal=causal,
                                           enable_gqa=gqa, eps=1e-3, return_stats=True)
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa,
                                             is_causal=causal and mask is None)
        assert out.shape == ref.shape == (B, H, L, 24)
        assert torch.all(out == 0) and torch.equal(out.cpu(), ref.nan_to_num())
        assert st.lse.shape == (B, H, L) and st.kept_blocks.shape[:2] == (B, H)
        grads = torch.autograd.grad(out.sum(), ins)
        for g, t in zip(grads, (q, k, v)):
            assert g.shape == t.shape and torch.all(g == 0)


# -- strides ---------------------------------------------------------------------------------------
def strided(form):
    """(q, k, v, mask) on DEVICE with one non-contiguous or stride-0 operand. Drawn on CPU with
    one generator (the same data on every device); each strided view is taken on DEVICE, after
    the move (``Tensor.to`` would not keep a view's strides)."""
    B, H, L, S, D = 2, 2, 33, 40, 32  # odd L: a partial query tile; three 16-key blocks on Triton
    g = torch.Generator().manual_seed(12)

    def draw(*shape):
        return dev(torch.randn(*shape, generator=g))

    q = draw(B, L, H, D).transpose(1, 2)  # SDPA's usual [B, L, H, D] memory
    k = draw(B, H, S, D)
    v = draw(B, H, S, D)
    mask = None
    if form == "head_dim_stride2":
        q = draw(B, H, L, 2 * D)[..., ::2]
    elif form == "seq_stride3":
        k = draw(B, H, 3 * S, D)[:, :, ::3]
    elif form == "kv_expanded_batch":
        k, v = k[:1].expand(B, H, S, D), v[:1].expand(B, H, S, D)
    elif form == "kv_expanded_heads":
        k, v = k[:, :1].expand(B, H, S, D), v[:, :1].expand(B, H, S, D)
    elif form == "k_expanded_seq":  # every key identical: zero radius, zero-width box
        k = k[:, :, :1].expand(B, H, S, D)
    elif form == "q_expanded_seq":
        q = q[:, :, :1].expand(B, H, L, D)
    elif form == "kv_transposed":
        k = draw(B, S, H, D).transpose(1, 2)
        v = draw(B, H, D, S).transpose(2, 3)
    elif form == "mask_expanded":
        mask = (draw(1, 1, 1, S) > 0).expand(B, H, L, S)
    elif form == "mask_transposed":
        mask = draw(S, L).t()
    elif form == "mask_batch_stride0_float":
        mask = draw(1, H, L, S).expand(B, H, L, S)
    return q, k, v, mask


FORMS = ["transposed_q", "head_dim_stride2", "seq_stride3", "kv_expanded_batch",
         "kv_expanded_heads", "k_expanded_seq", "q_expanded_seq", "kv_transposed",
         "mask_expanded", "mask_transposed", "mask_batch_stride0_float"]


# "stop" reads q, k and v through the same launcher strides as "twopass": under the interpreter
# its own run covers the mask forms only (the full product took 44 s of CPU CI); GPUs run it all
STRIDED_CASES = [pytest.param(p.values[0], form, marks=p.marks, id=f"{p.values[0]}-{form}")
                 for p in path_params for form in FORMS
                 if ON_CUDA or p.values[0] != "stop" or form.startswith("mask")]


@pytest.mark.parametrize("path,form", STRIDED_CASES)
def test_strided_and_expanded_inputs(path, form):
    q, k, v, mask = strided(form)
    for causal in (False, True) if path == "op" else (form.startswith("mask"),):
        out, kept, bm, bn = run(path, q, k, v, mask, causal, eps=1e-2)
        ref, _ = restricted_oracle(q, k, v, mask, causal, None, kept, bm, bn)
        assert rel_err(out, ref) < REL_TOL[torch.float32]
        assert float(dropped_mass(q, k, kept, bm, bn, mask, causal).max()) <= 1e-2
        # the same selection and output as on contiguous copies
        c = [None if t is None else t.contiguous() for t in (q, k, v, mask)]
        out_c, kept_c, *_ = run(path, *c, causal, eps=1e-2)
        assert torch.equal(kept, kept_c) and rel_err(out, out_c) < 1e-6


# -- int64 offsets (GPU) ---------------------------------------------------------------------------
@pytest.mark.gpu
def test_mask_offsets_beyond_int32_within_one_head():
    """A [L, S] bool mask of 65536^2 > 2^31 elements: row offsets i * S overflow int32 in one
    (batch, head). The last rows (largest offsets) match SDPA on those rows."""
    L = S = 65536
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, 1, L, 64, device="cuda", dtype=torch.float16, generator=g)
               for _ in range(3))
    mask = torch.ones(L, S, dtype=torch.bool, device="cuda").tril_(S - L)
    mask[-16:, : S // 2] = False  # visible only if read at the right (int64) offsets
    assert mask.numel() > 2 ** 31
    out = aether_compile.attention(q, k, v, attn_mask=mask, eps=0.0)
    rows = slice(L - 16, L)
    ref = F.scaled_dot_product_attention(q[:, :, rows].float(), k.float(), v.float(),
                                         attn_mask=mask[rows])
    assert rel_err(out[:, :, rows], ref) < REL_TOL[torch.float16]
