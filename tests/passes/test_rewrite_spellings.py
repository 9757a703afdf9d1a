"""One small module per attention spelling (tests/models/spellings.py), and the declines."""

from __future__ import annotations

import pytest
import torch

from tests.models import spellings as S
from tests.models.harness import run_case
from tests.models.zoo import Case

OPTIONS = dict(allow_cpu=True, eps=0.0, compiler="aot_eager")
B, L = 2, 24


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield


def _x(C=32, seed=0):
    return torch.randn(B, L, C, generator=torch.Generator().manual_seed(seed))


def _keep():
    keep = torch.rand(B, 1, L, L, generator=torch.Generator().manual_seed(1)) > 0.3
    keep[..., 0] = True  # no fully masked row (eager gives NaN there, the op 0)
    return keep


REWRITTEN = {
    "matmul-div-additive-mask": (S.MatmulDivMask, lambda: (_x(), torch.randn(B, 1, L, L)),
                                 "softmax-matmul(matmul)", "mask=additive"),
    "mask-then-scale": (S.MaskThenScale, lambda: (_x(), torch.randn(B, 1, L, L)),
                        "softmax-matmul(matmul)", "mask=additive"),
    "scale-on-q-dropout-eval": (S.ScaleOnQ, lambda: (_x(),), "softmax-matmul(matmul)", "mask=none"),
    "split-scale-fp32-softmax": (S.SplitScale, lambda: (_x(),), "softmax-matmul(matmul)",
                                 "mask=none"),
    "upcast-softmax-type-as-scores": (S.UpcastTypeAs, lambda: (_x(),), "softmax-matmul(matmul)",
                                      "mask=none"),
    "einsum-masked-fill-finfo-min": (S.EinsumMaskedFill, lambda: (_x(), _keep()),
                                     "softmax-matmul(einsum)", "mask=bool"),
    "bmm-3d-where-causal": (S.BmmWhere, lambda: (_x(),), "softmax-matmul(bmm)", "mask=bool"),
    "where-tensor-fill-gpt2-4x": (S.WhereTensorFill, lambda: (_x(), torch.randn(B, 1, 1, L)),
                                  "softmax-matmul(matmul)", "mask=additive+bool"),
    "baddbmm-gpt2-upcast": (S.Baddbmm, lambda: (_x(),), "softmax-matmul(baddbmm)", "mask=none"),
    "repeat-interleave-gqa": (S.RepeatInterleaveGQA, lambda: (_x(64),), "softmax-matmul(matmul)",
                              "gqa"),
    "broadcast-mqa": (S.BroadcastMQA, lambda: (_x(64),), "softmax-matmul(matmul)", "gqa"),
    "sdpa-all-args": (S.SdpaAllArgs, lambda: (_x(64), _keep()), "sdpa", "gqa"),
}


@pytest.mark.parametrize("case", list(REWRITTEN), ids=list(REWRITTEN))
def test_spelling_rewritten(case):
    cls, inputs, pattern, reason_part = REWRITTEN[case]
    torch.manual_seed(0)
    model = cls().eval()
    report, err = run_case(Case(model, inputs(), sites=1, out=lambda o: (o,)), OPTIONS)
    assert [s.decision for s in report.sites] == ["sparse"], str(report)
    assert report.sites[0].pattern == pattern
    assert reason_part in report.sites[0].reason
    assert err < 1e-5


DECLINED = {
    "tensor-scale": (S.TensorScale, lambda: (_x(),), "scale"),
    "fill-zero-mask": (S.FillZero, lambda: (_x(), _keep()), "mask"),
    "returns-weights": (S.ReturnsWeights, lambda: (_x(),), "weights_used"),
}


@pytest.mark.parametrize("case", list(DECLINED), ids=list(DECLINED))
def test_spelling_declined(case):
    cls, inputs, code = DECLINED[case]
    torch.manual_seed(0)
    model = cls().eval()
    out = (lambda o: o) if cls is S.ReturnsWeights else (lambda o: (o,))
    report, err = run_case(Case(model, inputs(), sites=1, out=out), OPTIONS)
    assert [(s.decision, s.code) for s in report.sites] == [("dense", code)], str(report)
    assert err == 0.0  # graph left as it was


def test_softmax_that_is_not_attention_is_not_a_site():
    torch.manual_seed(0)
    model = S.NotAttention().eval()
    report, err = run_case(Case(model, (_x(),), sites=0, out=lambda o: (o,)), OPTIONS)
    assert report.sites == [], str(report)
    assert err == 0.0


def test_gemma2_softcapping_reported_dense():
    """Gemma-2 soft-caps the scores with tanh: not expressible as SDPA, reported with the op."""
    transformers = pytest.importorskip("transformers")
    from tests.models import zoo

    model = zoo._hf("Gemma2Model", "Gemma2Config", "eager", vocab_size=99, hidden_size=64,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    head_dim=16, intermediate_size=64, use_cache=False,
                    attn_logit_softcapping=50.0)
    case = Case(model, (), dict(input_ids=zoo._ids(2, 24)), sites=2)
    report, err = run_case(case, OPTIONS)
    assert [(s.code, s.reason) for s in report.sites] == [
        ("pattern", "scores pass through tanh (not a scale or a mask)")] * 2, str(report)
    assert err == 0.0
    del transformers


def test_dropout_in_training_stays_dense():
    torch.manual_seed(0)
    model = S.ScaleOnQ().train()
    report, _ = run_case(Case(model, (_x(),), sites=1, out=lambda o: (o,)), OPTIONS, grad=True)
    assert [(s.decision, s.code) for s in report.sites] == [("dense", "dropout")]
    assert "training" in report.sites[0].reason


def test_sdpa_dropout_in_training_stays_dense():
    torch.manual_seed(0)
    model = S.NanoGPTBlock(flash=True, dropout=0.1).train()
    report, _ = run_case(Case(model, (_x(),), sites=1, out=lambda o: (o,)), OPTIONS, grad=True)
    assert [(s.decision, s.code) for s in report.sites] == [("dense", "dropout")]


def test_learned_bias_rewritten_in_inference_dense_in_training():
    torch.manual_seed(0)
    model = S.LearnedBias().eval()
    report, err = run_case(Case(model, (_x(),), sites=1, out=lambda o: (o,)), OPTIONS)
    assert [(s.decision, s.reason) for s in report.sites] == [("sparse", "mask=additive, scale=1")]
    assert err < 1e-5
    torch._dynamo.reset()
    report, _ = run_case(Case(model.train(), (_x(),), sites=1, out=lambda o: (o,)), OPTIONS,
                         grad=True)
    assert [s.code for s in report.sites] == ["mask"]
    assert "requires grad" in report.sites[0].reason


def test_hf_bert_training_dropout_stays_dense():
    pytest.importorskip("transformers")
    from tests.models import zoo

    for impl in zoo.HF_IMPLS:
        torch._dynamo.reset()
        case = zoo.hf_case("bert", impl)
        case.model.train()
        report, _ = run_case(case, OPTIONS, grad=True)
        assert [s.code for s in report.sites] == ["dropout"] * 2, str(report)
        assert "training" in report.sites[0].reason


def test_cpu_without_allow_cpu_stays_dense():
    torch.manual_seed(0)
    model = S.MatmulDivMask().eval()
    report, err = run_case(Case(model, (_x(), torch.randn(B, 1, L, L)), sites=1,
                                out=lambda o: (o,)), dict(OPTIONS, allow_cpu=False))
    assert [(s.decision, s.code) for s in report.sites] == [("dense", "device")]
    assert "allow_cpu" in report.sites[0].reason
    assert err == 0.0


def test_min_seq_len_and_exclude():
    torch.manual_seed(0)
    model = S.NanoGPTBlock(flash=False).eval()
    report, _ = run_case(Case(model, (_x(),), sites=1, out=lambda o: (o,)),
                         dict(OPTIONS, min_seq_len=L + 1))
    assert [s.code for s in report.sites] == ["min_seq_len"]
    torch._dynamo.reset()
    report, _ = run_case(Case(model, (_x(),), sites=1, out=lambda o: (o,)),
                         dict(OPTIONS, exclude=("attn",)))
    assert [s.code for s in report.sites] == ["excluded"]
    assert report.sites[0].module == "attn"


def test_output_attentions_hf_stays_dense():
    """HF eager attention with output_attentions=True returns the weights: no rewrite."""
    transformers = pytest.importorskip("transformers")
    from tests.models import zoo

    case = zoo.hf_case("bert", "eager")
    case.kwargs["output_attentions"] = True
    report, err = run_case(case, OPTIONS)
    assert [s.code for s in report.sites] == ["weights_used"] * 2, str(report)
    assert err == 0.0
    del transformers


# -- nn.MultiheadAttention (torchvision's ViT uses it with need_weights=False) -------------------
class _MHA(torch.nn.Module):
    def __init__(self, batch_first, need_weights=False):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(32, 2, batch_first=batch_first)
        self.need_weights = need_weights

    def forward(self, x, **masks):
        out, w = self.attn(x, x, x, need_weights=self.need_weights, **masks)
        return (out, w) if self.need_weights else out


def _mha_masks(kind, N=2, T=12):
    kpm = torch.zeros(N, T, dtype=torch.bool)
    kpm[1, 8:] = True  # True = padding in MHA's convention
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)  # True = masked out
    return {"none": {}, "key_padding": {"key_padding_mask": kpm}, "causal": {"attn_mask": causal},
            "both": {"attn_mask": causal, "key_padding_mask": kpm}}[kind]


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("kind", ["none", "key_padding", "causal", "both"])
def test_multihead_attention_rewritten(batch_first, kind):
    torch.manual_seed(0)
    model = _MHA(batch_first).eval()
    x = torch.randn(2, 12, 32) if batch_first else torch.randn(12, 2, 32)
    report, err = run_case(Case(model, (x,), _mha_masks(kind), sites=1, out=lambda o: (o,)),
                           OPTIONS)
    # torch 2.13 keeps F.multi_head_attention_forward opaque ("mha"); if a version inlines it,
    # its SDPA call is matched instead
    assert [s.decision for s in report.sites] == ["sparse"], str(report)
    assert report.sites[0].pattern in ("mha", "sdpa")
    assert err < 1e-5


def test_multihead_attention_training_backward():
    torch.manual_seed(0)
    model = _MHA(True).train()  # dropout 0: rewritten in training too
    x = torch.randn(2, 12, 32)
    ref = model(x)
    ref.square().sum().backward()
    ref_grad = model.attn.in_proj_weight.grad.clone()
    model.zero_grad()
    import aether_compile

    report = aether_compile.explain(model, x, options=OPTIONS)
    assert [s.decision for s in report.sites] == ["sparse"]
    report.output.square().sum().backward()
    torch.testing.assert_close(model.attn.in_proj_weight.grad, ref_grad, rtol=1e-4, atol=1e-5)


def test_multihead_attention_weights_returned_stays_dense():
    torch.manual_seed(0)
    model = _MHA(True, need_weights=True).eval()
    report, err = run_case(Case(model, (torch.randn(2, 12, 32),), sites=1, out=lambda o: o),
                           OPTIONS)
    assert [s.code for s in report.sites] == ["weights_used"], str(report)
    assert err == 0.0


@pytest.mark.parametrize("mask_type", [None, 0, 1], ids=["no-mask", "attn-mask", "key-padding"])
def test_native_multihead_attention_fast_path_op(mask_type):
    """MHA's inference fast path, torch._native_multi_head_attention, if a graph contains it."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(32, 2, batch_first=True).eval()
    mask = {None: None, 0: torch.ones(12, 12, dtype=torch.bool).triu(1),
            1: torch.zeros(2, 12, dtype=torch.bool).index_fill(1, torch.arange(9, 12), True)}[
        mask_type]
    mask = mask if mask is None or mask_type != 1 else mask.clone()
    if mask_type == 1:
        mask[0] = False

    def native(x):
        return torch._native_multi_head_attention(
            x, x, x, 32, 2, mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight,
            mha.out_proj.bias, mask, False, True, mask_type)[0]

    report, err = run_case(Case(native, (torch.randn(2, 12, 32),), sites=1, out=lambda o: (o,)),
                           OPTIONS)
    assert [(s.pattern, s.decision) for s in report.sites] == [("mha", "sparse")], str(report)
    assert err < 1e-5
