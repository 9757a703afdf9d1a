"""Compiled training through the op: torch.compile(model, backend="aether") training steps of
transformers GPT-2 and Llama (train mode, dropout 0) against the default inductor compile."""

import pytest
import torch
from torch._dynamo.utils import counters

from aether_compile.training_task import recall_batch

from tests.helpers import rel_err

transformers = pytest.importorskip("transformers")


def _model(kind: str, device, dtype=torch.float32):
    torch.manual_seed(0)
    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                      attn_implementation="eager")
        model = transformers.GPT2LMHeadModel(cfg)
    else:
        cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2,
                                       intermediate_size=128, max_position_embeddings=256,
                                       attention_dropout=0.0, use_cache=False,
                                       attn_implementation="eager")
        model = transformers.LlamaForCausalLM(cfg)
    return model.to(device=device, dtype=dtype).train()


def _step(model, compiled, ids, labels):
    model.zero_grad(set_to_none=True)
    loss = compiled(input_ids=ids, labels=labels).loss
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()
                           if p.grad is not None}


def _compare_with_default_compile(kind, device, dtype, options, loss_tol, grad_tol):
    ids, labels = recall_batch(2, 64, seed=1, device=device)
    model = _model(kind, device, dtype)
    torch._dynamo.reset()
    ref_loss, ref_grads = _step(model, torch.compile(model), ids, labels)
    torch._dynamo.reset()
    counters.clear()
    loss, grads = _step(model, torch.compile(model, backend="aether", options=options), ids,
                        labels)
    assert counters["aether"]["rewritten"] == 2, dict(counters["aether"])  # both layers
    assert abs(float(loss) - float(ref_loss)) <= loss_tol * abs(float(ref_loss))
    assert grads.keys() == ref_grads.keys()
    for name in ref_grads:
        assert rel_err(grads[name], ref_grads[name]) < grad_tol, name


# gpt2 (the softmax spelling's backward, ~19 s) is out of the CI budget; llama runs in CI
@pytest.mark.parametrize("kind", [pytest.param("gpt2", marks=pytest.mark.slow), "llama"])
def test_compiled_training_matches_default_compile_cpu(kind):
    _compare_with_default_compile(kind, "cpu", torch.float32,
                                  {"allow_cpu": True, "eps": 0.0}, 1e-5, 1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_compiled_training_matches_default_compile_gpu(kind, monkeypatch):
    # 64 tokens: short enough that the pass would leave the attention dense ("short")
    monkeypatch.setenv("AETHER_STATIC_DENSE", "0")
    _compare_with_default_compile(kind, "cuda", torch.bfloat16, {"eps": 0.0}, 2e-2, 5e-2)
