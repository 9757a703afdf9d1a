"""attn_implementation="aether": transformers calls the op itself, eagerly or compiled."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("transformers")

import aether_compile  # noqa: E402,F401  (registers attn_implementation="aether")
from tests.models import zoo  # noqa: E402

# Each zoo model whose attention goes through transformers' attention interface, and how many
# attention calls one forward makes.
INTERFACE_MODELS = ["bert", "roberta", "gpt2", "llama", "mistral", "qwen2", "vit", "clip",
                    "whisper"]
EXTRA_INTERFACE_MODELS = ["distilbert", "bart", "opt", "phi3", "gemma", "qwen3", "gpt-neox",
                          "electra"]


class CountOpCalls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aether.attention_with_stats.default:
            self.calls += 1
        return func(*args, **(kwargs or {}))


def _outputs(case, out):
    return [t for t in case.out(out) if isinstance(t, torch.Tensor)]


def _compare(build, name):
    ref_case, case = build(name, "sdpa"), build(name, "aether")
    with torch.no_grad():
        ref = ref_case.model(*ref_case.args, **ref_case.kwargs)
        with CountOpCalls() as count:
            out = case.model(*case.args, **case.kwargs)
    assert case.model.config._attn_implementation == "aether"
    assert count.calls >= max(case.sites, 1), f"{name}: the op ran {count.calls} times"
    for o, r in zip(_outputs(case, out), _outputs(ref_case, ref)):
        torch.testing.assert_close(o, r, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", INTERFACE_MODELS)
def test_zoo_model_runs_the_op_eagerly_and_matches_sdpa(name):
    _compare(zoo.hf_case, name)


@pytest.mark.parametrize("name", EXTRA_INTERFACE_MODELS)
def test_more_architectures_run_the_op_eagerly(name):
    _compare(zoo.extra_case, name)


def _llama(impl, layers=2):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=99, hidden_size=64, intermediate_size=64,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2)
    return transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()


def test_generate_with_a_cache_matches_sdpa_greedy_tokens():
    ids = torch.randint(3, 99, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    kw = dict(max_new_tokens=12, do_sample=False, attention_mask=mask, pad_token_id=0)
    with CountOpCalls() as count:
        ours = _llama("aether").generate(ids, **kw)
    ref = _llama("sdpa").generate(ids, **kw)
    assert torch.equal(ours, ref)
    assert count.calls == 2 * 12  # prefill and 11 decode steps, 2 layers each


def test_long_sequence_skips_blocks_within_the_certificate():
    """At 1024 tokens the reference skips blocks (fp32 default eps); logits stay at fp32 noise."""
    ids = torch.randint(3, 99, (1, 1024), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = _llama("eager", layers=1)(ids).logits
        out = _llama("aether", layers=1)(ids).logits
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_compiled_model_with_aether_attention_runs_the_op():
    model = _llama("aether")
    ids = torch.randint(3, 99, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = _llama("sdpa")(ids).logits
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        out = compiled(ids).logits
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_unsupported_feature_runs_transformers_sdpa(caplog, monkeypatch):
    """softcap and attention sinks are not in the op: the call goes to transformers' own SDPA
    path, with its arguments, and says so once."""
    import transformers.integrations.sdpa_attention as hf_sdpa

    from aether_compile import transformers_attention

    seen = []
    monkeypatch.setattr(hf_sdpa, "sdpa_attention_forward",
                        lambda *args, **kwargs: seen.append(kwargs) or ("sdpa", None))
    monkeypatch.setattr(transformers_attention, "_fallbacks_logged", set())
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    with caplog.at_level("WARNING", logger="aether_compile"):
        for _ in range(2):
            out = transformers_attention.aether_attention_forward(torch.nn.Module(), q, k, v,
                                                                  None, softcap=30.0)
            assert out == ("sdpa", None)
    assert [kw["softcap"] for kw in seen] == [30.0, 30.0]
    assert caplog.text.count("softcap is not expressible") == 1


def test_registered_whether_transformers_is_imported_before_or_after():
    code = ("import {first}, {second}, transformers.modeling_utils as mu\n"
            "assert 'aether' in mu.AttentionInterface._global_mapping\n"
            "from transformers.masking_utils import AttentionMaskInterface as M\n"
            "assert 'aether' in M._global_mapping\n")
    for first, second in (("aether_compile", "transformers"), ("transformers", "aether_compile")):
        proc = subprocess.run([sys.executable, "-c", code.format(first=first, second=second)],
                              capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_importing_aether_compile_does_not_import_transformers():
    proc = subprocess.run([sys.executable, "-c", "import sys, aether_compile; "
                           "print('transformers' in sys.modules)"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "False"


@pytest.mark.gpu
@pytest.mark.parametrize("masked", [False, True])
def test_cuda_eager_model_runs_aether_attention(masked, monkeypatch):
    """On CUDA at 8K tokens the interface calls aether's attention once per layer: with a padding
    mask the op runs (the Triton path); without one, 8K tokens x 8 heads are below the static
    dense work, so the public function runs the dense kernel itself, before the op. Logits stay
    within fp16 noise of SDPA's."""
    import transformers

    public = sys.modules["aether_compile.attention"]
    calls, real = [], public.attention
    monkeypatch.setattr(public, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=99, hidden_size=512, intermediate_size=512,
                                   num_hidden_layers=1, num_attention_heads=8,
                                   num_key_value_heads=2, max_position_embeddings=8192)
    ids = torch.randint(3, 99, (1, 8192), device="cuda")
    kwargs = {}
    if masked:  # HF then builds a bool [B, 1, L, S] mask instead of is_causal
        kwargs["attention_mask"] = torch.ones_like(ids)
        kwargs["attention_mask"][:, :100] = 0
    # a config each: from_config records attn_implementation on the config it is given, and a
    # shared one would make the reference model run aether too (two calls, nothing compared)
    models = {impl: transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(cfg), attn_implementation=impl).to("cuda", torch.float16).eval()
        for impl in ("sdpa", "aether")}
    assert {impl: m.config._attn_implementation for impl, m in models.items()} == {
        "sdpa": "sdpa", "aether": "aether"}
    models["aether"].load_state_dict(models["sdpa"].state_dict())
    with torch.no_grad():
        ref = models["sdpa"](ids, **kwargs).logits.float()
        with CountOpCalls() as count:
            out = models["aether"](ids, **kwargs).logits.float()
    assert len(calls) == 1 and count.calls == (1 if masked else 0), (calls, count.calls)
    rows = slice(100, None) if masked else slice(None)  # fully padded rows differ by convention
    err = (out - ref)[:, rows].abs().max().item()
    assert err < 2e-2 * ref[:, rows].abs().max().item(), err
