"""Certified decode (kernels/decode.py) against float64: the key summary, the bounds it gives
(sound for every row and block), the certificate (each row's dropped mass <= eps, measured),
and the output over the kept blocks. On CPU through Triton's interpreter, at small sizes."""

from __future__ import annotations

import math

import pytest
import torch

from aether_compile.kernels import decode
from aether_compile.kernels import decode_reference as ref

from tests.helpers import REL_TOL, TRITON_INTERPRET, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cpu" and not TRITON_INTERPRET,
                                reason="Triton on CPU needs TRITON_INTERPRET=1")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(B, Hq, Hkv, Lq, S, D, dtype, seed, kind="clustered", DV=None):
    """q, k, v on DEVICE. "clustered": each KV head's keys hold a few planted keys aligned with
    its queries and two outlier channels (as learned keys have), so skipping has something to
    find; "uniform": plain Gaussian."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Lq, D, generator=g)
    k = torch.randn(B, Hkv, S, D, generator=g)
    v = torch.randn(B, Hkv, S, DV or D, generator=g)
    if kind == "clustered":
        k[..., :2] *= 6  # outlier channels
        q_dir = q.view(B, Hkv, Hq // Hkv, Lq, D).mean((2, 3))
        picks = torch.randint(0, S, (max(1, S // 40),), generator=g)
        k[:, :, picks] += 3 * q_dir[:, :, None] / q_dir.norm(dim=-1, keepdim=True)[..., None] * 4
        q *= 2
    return [t.to(DEVICE, dtype) for t in (q, k, v)]


CASES = [
    # (B, Hq, Hkv, Lq, S, D)
    (1, 1, 1, 1, 16, 16),
    (2, 4, 2, 1, 300, 64),
    (1, 8, 2, 3, 200, 32),  # several query positions share the read
    (2, 2, 2, 1, 129, 80),  # D not a power of two
]


def _bias(B, Lq, S, kind, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "causal_tail":  # Lq new tokens at the end of the cache, causal among themselves
        pos = torch.arange(S)
        rows = S - Lq + torch.arange(Lq)
        b = torch.where(pos[None, :] <= rows[:, None], 0.0, -math.inf)
        return b.expand(B, Lq, S).contiguous().to(DEVICE)
    b = torch.where(torch.rand(B, Lq, S, generator=g) > 0.2, 0.0, -math.inf)
    return (b + torch.rand(B, Lq, S, generator=g) * -2).to(DEVICE)  # masked and graded


@pytest.mark.parametrize("rows_kernel", [False, True])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,Lq,S,D", CASES, ids=lambda c: str(c))
@pytest.mark.parametrize("bias_kind", ["none", "causal_tail", "random"])
def test_bounds_hold_for_every_row_and_block(dtype, B, Hq, Hkv, Lq, S, D, bias_kind, rows_kernel):
    q, k, _ = _inputs(B, Hq, Hkv, Lq, S, D, dtype, seed=S + D)
    bias = _bias(B, Lq, S, bias_kind)
    summary = decode.summarize_keys(k)
    scale = D ** -0.5
    upper, lower = decode.decode_bounds(q, summary, S, scale, bias,
                                        config={"rows_kernel": rows_kernel})
    exact = ref.block_log_mass(ref.exact_scores(q, k, scale, summary.codes.shape[2], bias))
    live = exact > -math.inf
    assert torch.equal(upper > -math.inf, live) and torch.equal(lower > -math.inf, live)
    assert (upper.double()[live] >= exact[live]).all()
    assert (lower.double()[live] <= exact[live]).all()
    # tight: int8 codes leave a small gap (here under 1 nat per block on average)
    assert (upper.double() - exact)[live].mean() < 1.0


@pytest.mark.parametrize("one_lse", [True, False])
@pytest.mark.parametrize("int8_dot", [True, False])
def test_both_dot_paths_bound_soundly_and_agree(int8_dot, one_lse):
    """The bounds kernel's two ways to multiply q ⊙ s by the codes (int8 dots on the codes as
    stored; float16 dots on converted codes) both hold for every block, large-magnitude queries
    included, and differ by little (the int8 split adds a little slack)."""
    q, k, _ = _inputs(2, 8, 2, 1, 700, 64, torch.float32, seed=21)
    q[0] *= 300  # scores of hundreds of nats: the rounding terms matter
    summary = decode.summarize_keys(k)
    scale = 64 ** -0.5
    exact = ref.block_log_mass(ref.exact_scores(q, k, scale, summary.codes.shape[2], None))
    live = exact > -math.inf
    upper, lower = decode.decode_bounds(q, summary, 700, scale,
                                        config={"int8_dot": int8_dot, "one_lse": one_lse})
    assert (upper.double()[live] >= exact[live]).all()
    assert (lower.double()[live] <= exact[live]).all()
    other, _ = decode.decode_bounds(q, summary, 700, scale, config={"int8_dot": not int8_dot})
    gap, other_gap = ((u.double() - exact)[live].mean() for u in (upper, other))
    assert abs(gap - other_gap) <= 0.05 * other_gap


@pytest.mark.parametrize("Hq,Lq", [(2, 1), (6, 1), (4, 3)])  # 2, 6 and 12 rows per KV head
def test_bounds_on_the_real_rows_equal_bounds_on_the_padded_tile(Hq, Lq):
    """The bounds kernel's work after the dots on the real rows only (R_EPI < 16) gives the
    bounds the 16-row tile gives (to float32 rounding: the compiled reductions' order follows
    the tile's shape), bias included, and both hold."""
    q, k, _ = _inputs(2, Hq, 1, Lq, 300, 32, torch.float16, seed=Hq + Lq)
    summary = decode.summarize_keys(k)
    bias = _bias(2, Lq, 300, "graded", seed=1)
    got, want = (decode.decode_bounds(q, summary, 300, 32 ** -0.5, bias,
                                      config={"real_rows": real}) for real in (True, False))
    exact = ref.block_log_mass(ref.exact_scores(q, k, 32 ** -0.5, summary.codes.shape[2], bias))
    live = exact > -math.inf
    for a, b in zip(got, want):
        assert torch.equal(live, a > -math.inf) and torch.equal(live, b > -math.inf)
        torch.testing.assert_close(a[live], b[live], rtol=1e-5, atol=1e-5)
    for upper, lower in (got, want):
        assert (upper.double()[live] >= exact[live]).all()
        assert (lower.double()[live] <= exact[live]).all()


def _split_residue_sign(q, step):
    """The sign of what the bounds kernel's int8 split of q ⊙ s leaves out, per channel
    (63 qs_n = head + (tail + rho) / 254; kernels/decode.py), computed as the kernel does."""
    qs = (q.float() * step.float()).double()
    e = torch.floor(torch.log2(qs.abs().max()))
    a = (qs * 2.0 ** -e).float() * 63
    head = torch.floor(a + 0.5)
    r1 = (a - head) * 254
    return torch.sign(r1 - torch.floor(r1 + 0.5)).double()


@pytest.mark.parametrize("one_lse,int8_dot,rows_kernel", [
    (True, True, False), (True, False, False), (False, True, False), (False, False, False),
    (True, False, True), (False, False, True)])
def test_bounds_hold_where_every_key_sits_at_its_worst_error(int8_dot, one_lse, rows_kernel):
    """Keys a hair inside half a quantisation step from their code, on the side of q's sign in
    every channel, with codes of ±126 on the side of the int8 split's residue: the summary's
    error term (s/2 per channel) and the split's are met almost exactly, so every slack term must
    carry its own weight. Two keys per group pin each channel's range and are masked out."""
    D, S, group = 64, 256, decode.QUANT_GROUP
    g = torch.Generator().manual_seed(5)
    q = torch.randn(D, generator=g, dtype=torch.float64) * 20
    keys = torch.empty(S, D, dtype=torch.float64)
    ends = []
    for start in range(0, S, group):
        center = torch.randn(D, generator=g, dtype=torch.float64)
        step = torch.rand(D, generator=g, dtype=torch.float64) * 0.05 + 0.01
        keys[start:start + group] = center
        keys[start] = center + decode.CODE_MAX * step  # the range's ends
        keys[start + 1] = center - decode.CODE_MAX * step
        ends.append(keys[start:start + 2].clone())
    pinned = decode.summarize_keys(keys.float().view(1, 1, S, D).to(DEVICE))
    for i, start in enumerate(range(0, S, group)):
        center, step = (t[0, 0, i].double().cpu() for t in (pinned.center, pinned.step))
        code = 126 * _split_residue_sign(q, step)
        code = torch.where(code == 0, torch.ones_like(code), code)
        keys[start:start + group] = center + step * (code + 0.5 * torch.sign(q) * (1 - 1e-4))
        keys[start:start + 2] = ends[i]
    k = keys.float().view(1, 1, S, D).to(DEVICE)
    qd = q.float().view(1, 1, 1, D).to(DEVICE)
    bias = torch.zeros(1, 1, S)
    bias[..., 0::group] = bias[..., 1::group] = -math.inf
    bias = bias.to(DEVICE)
    summary = decode.summarize_keys(k)
    assert all(torch.equal(a, b) for a, b in ((summary.center, pinned.center),
                                               (summary.step, pinned.step)))
    scale = D ** -0.5
    exact = ref.block_log_mass(ref.exact_scores(qd, k, scale, summary.codes.shape[2], bias))
    upper, lower = decode.decode_bounds(qd, summary, S, scale, bias,
                                        config={"int8_dot": int8_dot, "one_lse": one_lse,
                                                "rows_kernel": rows_kernel})
    assert (upper.double() >= exact).all() and (lower.double() <= exact).all()
    # the construction works: the bound is tight here (the summary's error term is spent)
    assert ((upper.double() - exact) < 0.1 * (exact - lower.double())).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("eps", [0.0, 1e-3, 1e-2, 1e-1])
@pytest.mark.parametrize("B,Hq,Hkv,Lq,S,D", CASES[1:], ids=lambda c: str(c))
def test_each_rows_dropped_mass_is_at_most_eps(dtype, eps, B, Hq, Hkv, Lq, S, D):
    q, k, v = _inputs(B, Hq, Hkv, Lq, S, D, dtype, seed=7 + S)
    bias = _bias(B, Lq, S, "causal_tail")
    summary = decode.summarize_keys(k)
    scale = D ** -0.5
    out, lse, keep_rows = decode.decode_attention(q, k, v, summary, eps, scale, bias)
    keep = keep_rows.any(2)
    # what each row itself kept is enough for its certificate; the KV head reads the union
    assert (ref.dropped_mass(q, k, keep_rows.any(2), scale, bias) <= eps + 1e-12).all()
    for r in range(keep_rows.shape[2]):
        assert (ref.dropped_mass(q, k, keep_rows[:, :, r], scale, bias)[:, :, r]
                <= eps + 1e-12).all()
    want, want_lse = ref.restricted_decode(q, k, v, keep, scale, bias)
    assert rel_err(out, want) <= REL_TOL[dtype]
    live = want_lse > -math.inf
    assert torch.allclose(lse[live], want_lse[live], atol=1e-3)
    if eps == 0.0:  # every block with a live key is read
        exact = ref.block_log_mass(ref.exact_scores(q, k, scale, summary.codes.shape[2], bias))
        assert torch.equal(keep, (exact > -math.inf).any(2))


def test_skipping_finds_the_planted_keys():
    """On clustered data a small eps reads well under half the blocks, uniform data nearly all."""
    kept = {}
    for kind in ("clustered", "uniform"):
        q, k, v = _inputs(2, 4, 2, 1, 640, 64, torch.float32, seed=3, kind=kind)
        _, _, keep_rows = decode.decode_attention(q, k, v, decode.summarize_keys(k), 1e-2,
                                                  64 ** -0.5)
        kept[kind] = keep_rows.float().mean().item()
    assert kept["clustered"] < 0.5 < kept["uniform"]


def test_lengths_end_each_sequence_and_empty_rows_are_zero():
    q, k, v = _inputs(3, 4, 2, 1, 96, 32, torch.float16, seed=1)
    lengths = torch.tensor([96, 40, 0], device=DEVICE, dtype=torch.int32)
    summary = decode.summarize_keys(k)
    out, lse, keep_rows = decode.decode_attention(q, k, v, summary, 1e-3, 32 ** -0.5,
                                                  lengths=lengths)
    want, want_lse = ref.restricted_decode(q, k, v, keep_rows.any(2), 32 ** -0.5,
                                           lengths=lengths)
    assert rel_err(out[:2], want[:2]) <= REL_TOL[torch.float16]
    assert not keep_rows[2].any() and (out[2] == 0).all() and torch.isinf(lse[2]).all()
    assert not keep_rows[1, ..., 3:].any()  # blocks past the length are never read


@pytest.mark.parametrize("bias_kind", ["none", "graded", "causal_tail"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,Hq,Hkv,Lq,S,D", CASES, ids=lambda c: str(c))
def test_attend_all_is_exact_attention(B, Hq, Hkv, Lq, S, D, dtype, bias_kind):
    """Every block kept (the decode op's dense path): float64 SDPA with the bias as a mask,
    within the dtype's rounding, with lengths ending each sequence."""
    q, k, v = _inputs(B, Hq, Hkv, Lq, S, D, dtype, seed=S + Lq)
    bias = _bias(B, Lq, S, bias_kind, seed=3)
    lengths = torch.tensor([S - 7 * b for b in range(B)], device=DEVICE, dtype=torch.int32)
    out, lse = decode.attend_all(q, k, v, D ** -0.5, bias, lengths)
    mask = torch.zeros(B, 1, Lq, S, dtype=torch.float64, device=DEVICE)
    if bias is not None:
        mask += bias.double()[:, None]
    mask += torch.where(torch.arange(S, device=DEVICE)[None, :] < lengths[:, None].long(), 0.0,
                        -math.inf)[:, None, None, :]
    rep = Hq // Hkv
    want = torch.nn.functional.scaled_dot_product_attention(
        q.double(), k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1),
        attn_mask=mask, scale=D ** -0.5)
    assert rel_err(out, want) <= REL_TOL[dtype]
    scores = (q.double() @ k.double().repeat_interleave(rep, 1).transpose(-1, -2)) * D ** -0.5
    assert torch.allclose(lse.double(), torch.logsumexp(scores + mask, -1), atol=1e-3)


@pytest.mark.parametrize("rows_kernel", [False, True])
def test_masks_read_as_given_equal_their_float_bias(rows_kernel, monkeypatch):
    """The decode op hands the kernels transformers' mask as it is (a bool [B, 1, Lq, S] or a
    half-precision one, expanded to [B, Lq, S] at stride 0, no bias built): bounds, selection
    input and attention equal what the float32 bias of the same mask gives: the same blocks
    dead (-inf), the rest within a rounding (each bias kind compiles its own kernel, and CUDA's
    compiler may contract a product and a sum into one rounding in one of them)."""
    monkeypatch.setitem(decode.BOUNDS_CONFIG, "rows_kernel", rows_kernel)
    B, Hq, Hkv, Lq, S, D = 2, 8, 2, 1, 300, 64
    q, k, v = _inputs(B, Hq, Hkv, Lq, S, D, torch.float16, seed=11)
    keep = torch.ones(B, 1, Lq, S, dtype=torch.bool, device=DEVICE)
    keep[1, :, :, :40] = False  # a left-padded sequence
    keep[0, :, :, 250:] = False  # and a static cache's empty tail
    half = torch.zeros(keep.shape, dtype=torch.float16, device=DEVICE).masked_fill(
        ~keep, torch.finfo(torch.float16).min)
    summary = decode.summarize_keys(k)
    for given, want in ((keep, torch.where(keep, 0.0, -math.inf)), (half, half.float())):
        view = given[:, 0].expand(B, Lq, S)
        assert view.stride(1) == 0 or Lq == 1
        as_bias = want[:, 0].expand(B, Lq, S).contiguous()
        assert decode.bias_kind(view) == (decode.BIAS_KEEP if given.dtype == torch.bool
                                          else decode.BIAS_ADD)
        for a, b in zip(decode.decode_bounds(q, summary, S, D ** -0.5, view),
                        decode.decode_bounds(q, summary, S, D ** -0.5, as_bias)):
            assert torch.equal(torch.isinf(a), torch.isinf(b))
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
        for a, b in zip(decode.attend_all(q, k, v, D ** -0.5, view),
                        decode.attend_all(q, k, v, D ** -0.5, as_bias)):
            torch.testing.assert_close(a, b)  # fp16 output, float32 lse: their dtypes' rounding


@pytest.mark.parametrize("splits", [1, 3, 16])
def test_splits_do_not_change_the_result(splits):
    q, k, v = _inputs(1, 4, 1, 1, 400, 32, torch.float32, seed=5)
    summary = decode.summarize_keys(k)
    outs = [decode.decode_attention(q, k, v, summary, 1e-3, 32 ** -0.5, splits=n)[0]
            for n in (splits, 2)]
    # float32 rounding only: the splits' partial states are rescaled (exp2, a few ulps each)
    # and summed in another order. 16 splits read 1.07e-6 on one CPU where 1e-6 was the bound;
    # a split that dropped or repeated a 16-key block would be off by orders more.
    assert rel_err(outs[0], outs[1]) <= 1e-5


@pytest.mark.parametrize("splits", [1, 5, 40])
def test_combine_kernel_equals_the_torch_merge(splits, monkeypatch):
    """The one-launch merge of the splits' states equals combine_splits (empty splits, whose
    running max is -inf, and a row with nothing at all included)."""
    q, k, v = _inputs(2, 4, 2, 2, 300, 32, torch.float16, seed=9)
    summary = decode.summarize_keys(k)
    upper, lower = decode.decode_bounds(q, summary, 300, 32 ** -0.5)
    order, n_kept, _ = decode.select_blocks(upper, lower, 1e-2)
    n_kept[1, 0] = 0  # that KV head's rows get nothing: zeros and lse -inf
    got = decode.attend_kept(q, k, v, order, n_kept, 32 ** -0.5, splits=splits)
    parts = {}

    def spy(*args, real=decode.combine_splits):
        parts["out"] = real(*args)
        return parts["out"]
    monkeypatch.setattr(decode, "combine_splits", spy)
    monkeypatch.setattr(decode, "_use_kernel", lambda t: False)
    want = decode.attend_kept(q, k, v, order, n_kept, 32 ** -0.5, splits=splits)
    assert "out" in parts
    assert rel_err(got[0], want[0]) <= REL_TOL[torch.float16]
    assert torch.equal(torch.isinf(got[1]), torch.isinf(want[1]))
    live = ~torch.isinf(want[1])
    assert torch.allclose(got[1][live], want[1][live], atol=1e-5)
    assert (got[0][1, :2] == 0).all() and torch.isinf(got[1][1, :2]).all()


def test_updating_the_summary_where_keys_land_equals_summarising_from_scratch():
    _, k, _ = _inputs(2, 2, 2, 1, 200, 32, torch.bfloat16, seed=2)
    summary = decode.summarize_keys(k)
    before = decode.KeySummary(*(t.clone() for t in (summary.codes, summary.center,
                                                       summary.step)))
    positions = torch.tensor([5, 130, 131], device=DEVICE)
    k[:, :, positions] = torch.randn(2, 2, 3, 32, device=DEVICE).to(k.dtype) * 5
    decode.update_summary(summary, k, positions)
    fresh = decode.summarize_keys(k)
    for got, want in zip((summary.codes, summary.center, summary.step),
                         (fresh.codes, fresh.center, fresh.step)):
        assert torch.equal(got, want)
    touched = torch.zeros(summary.center.shape[2], dtype=torch.bool)
    touched[[0, 2]] = True  # groups of 64 holding positions 5, 130, 131
    assert torch.equal((summary.center != before.center).any(-1).any(0).any(0).cpu(), touched)


def test_reference_matches_the_kernels_selection():
    q, k, v = _inputs(2, 4, 2, 2, 250, 32, torch.float32, seed=11)
    summary = decode.summarize_keys(k)
    got = decode.decode_attention(q, k, v, summary, 1e-2, 32 ** -0.5)
    want = ref.reference_decode_attention(q, k, v, summary, 1e-2, 32 ** -0.5)
    # the kernel's bounds carry rounding slack, so it may keep a block the exact bounds skip
    assert (got[2] | ~want[2]).all()
    assert (got[2] != want[2]).float().mean() < 0.05
    assert rel_err(got[0], want[0]) < 1e-2


@pytest.mark.parametrize("config", [{"per_row": True}, {"per_row": False, "sections": 1},
                                    {"per_row": False, "sections": 4},
                                    {"per_row": False, "sections": 8}])
@pytest.mark.parametrize("R,NB", [(1, 7), (4, 100), (8, 1300)])
# 1e-3 is fp16's default eps: in CPU CI (12 cases, 9 s through the interpreter)
@pytest.mark.parametrize("eps", [0.0, 1e-3, 1e-2, 0.3])
def test_selection_kernel_is_certified_and_as_tight_as_sorting(R, NB, eps, config):
    """The sort-free selection (a bisected threshold per row: one program per row, or one per KV
    head trying 1, 4 or 8 thresholds a pass) skips a subset of what sorting skips, within a
    block or two of it, and its skipped bounded mass is <= eps * Z_low per row; kept_order lists
    the kept blocks ascending, then the rest."""
    g = torch.Generator().manual_seed(R * NB)
    upper = (torch.randn(2, 3, R, NB, generator=g) * 3).to(DEVICE)
    lower = upper - torch.rand(2, 3, R, NB, generator=g).to(DEVICE) * 2
    upper[..., -3:] = -math.inf  # blocks past the cache: no live key
    lower[..., -3:] = -math.inf
    order, n_kept, keep_rows = decode.select_blocks(upper, lower, eps, config)
    _, n_sorted, keep_sorted = decode.select_blocks_sorted(upper, lower, eps)
    skipped = torch.logsumexp(upper.masked_fill(keep_rows, -math.inf), -1)
    budget = torch.logsumexp(lower, -1) + (math.log(eps) if eps > 0 else -math.inf)
    assert (skipped <= budget + 1e-6).all()
    assert (keep_rows | ~keep_sorted).all()  # never skips what sorting keeps
    assert int((keep_rows & ~keep_sorted).sum()) <= max(2, keep_rows.numel() // 1000)
    keep = keep_rows.any(2)
    assert torch.equal(n_kept, keep.sum(-1, dtype=torch.int32))
    for b in range(2):
        for h in range(3):
            n = int(n_kept[b, h])
            assert torch.equal(order[b, h, :n].long().cpu(), keep[b, h].nonzero().flatten().cpu())
            assert sorted(order[b, h].tolist()) == list(range(NB))


@pytest.mark.parametrize("positions", [[199], [64, 65, 70], [3, 130, 131, 4]])
def test_fused_write_equals_index_copy_then_summarising(positions):
    """write_keys (the cache write and the summary's update in one launch) leaves the cache and
    the summary exactly as index_copy_ followed by summarising from scratch; several new keys in
    one group included."""
    _, k, _ = _inputs(2, 2, 2, 1, 200, 32, torch.bfloat16, seed=6)
    summary = decode.summarize_keys(k)
    pos = torch.tensor(positions, device=DEVICE)
    new = (torch.randn(2, 2, len(positions), 32) * 4).to(DEVICE, k.dtype)
    want = k.clone().index_copy_(2, pos, new)
    assert decode.write_keys(summary, k, pos, new)
    assert torch.equal(k, want)
    fresh = decode.summarize_keys(want)
    for got, exp in zip((summary.codes, summary.center, summary.step),
                        (fresh.codes, fresh.center, fresh.step)):
        assert torch.equal(got, exp)


def test_fused_write_declines_what_it_does_not_serve():
    _, k, _ = _inputs(1, 2, 2, 1, 100, 32, torch.float16, seed=6)
    summary = decode.summarize_keys(k)
    before = k.clone()
    many = torch.arange(decode.WRITE_FUSED_MAX + 1, device=DEVICE)
    assert not decode.write_keys(summary, k, many, torch.zeros(1, 2, len(many), 32,
                                                                device=DEVICE, dtype=k.dtype))
    assert not decode.write_keys(summary, k, many[:1], torch.zeros(1, 2, 1, 32, device=DEVICE))
    assert torch.equal(k, before)  # declined: nothing written


def test_extending_a_summary_equals_summarising_the_grown_cache():
    _, k, _ = _inputs(2, 2, 2, 1, 300, 32, torch.bfloat16, seed=4)
    for start in (63, 64, 100, 299):
        grown = decode.extend_summary(decode.summarize_keys(k[:, :, :start]), k, start)
        fresh = decode.summarize_keys(k)
        for got, want in zip((grown.codes, grown.center, grown.step),
                             (fresh.codes, fresh.center, fresh.step)):
            assert torch.equal(got, want), start
