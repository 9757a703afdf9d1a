"""The byte-level LM of ``train_stdlib_lm.py``: a plain-torch pre-norm decoder with RoPE (the
rewrite has to find its attention itself), its checkpoints (whole, or bf16 in parts small enough
for the GPU machine's file limit) and ``to_llama``, the same network as a transformers
LlamaForCausalLM for ``generate`` with transformers' caches."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import aether_compile


@dataclass
class LMConfig:
    vocab: int = 256
    n_layer: int = 6
    d_model: int = 512
    n_head: int = 8
    mlp_mult: int = 4
    n_kv_head: int = 0  # key/value heads (GQA); 0: as many as query heads
    mlp: str = "gelu"  # "gelu" (fc, out) or "swiglu" (gate, fc, out: Llama's, see to_llama)
    rope_theta: float = 10000.0


def rope_tables(T: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32)
                          / head_dim)
    freqs = torch.outer(torch.arange(T, device=device, dtype=torch.float32), inv)
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, -1)
    rot = torch.cat([-x2, x1], -1)
    return (x.float() * cos + rot * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.n_kv_head = cfg.n_kv_head or cfg.n_head
        head_dim = cfg.d_model // cfg.n_head
        # one projection for q, k and v (3 x d_model wide without GQA, as older checkpoints)
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * self.n_kv_head * head_dim, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.stats = None  # {"eps": e, "kept": []}: eager runs through aether_compile.attention

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        hd = C // self.n_head
        q, k, v = self.qkv(x).split([C, self.n_kv_head * hd, self.n_kv_head * hd], -1)
        q = q.view(B, T, self.n_head, hd).transpose(1, 2)
        k, v = (t.view(B, T, self.n_kv_head, hd).transpose(1, 2) for t in (k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_head != self.n_head
        if self.stats is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y, st = aether_compile.attention(q, k, v, is_causal=True, enable_gqa=gqa,
                                             eps=self.stats["eps"], return_stats=True)
            self.stats["kept"].append(kept_summary(st, T))
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model)
        hidden = mlp_hidden(cfg)
        self.swiglu = cfg.mlp == "swiglu"
        if self.swiglu:
            self.gate = nn.Linear(cfg.d_model, hidden, bias=False)
        self.fc = nn.Linear(cfg.d_model, hidden, bias=False)
        self.out = nn.Linear(hidden, cfg.d_model, bias=False)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        h = self.norm2(x)
        h = (F.silu(self.gate(h)) * self.fc(h)) if self.swiglu else F.gelu(self.fc(h),
                                                                             approximate="tanh")
        return x + self.out(h)


def mlp_hidden(cfg: LMConfig) -> int:
    """The MLP's width: mlp_mult * d_model, or for SwiGLU 2/3 of it in multiples of 64 (the
    same parameter count)."""
    if cfg.mlp == "swiglu":
        return 64 * round(cfg.mlp_mult * cfg.d_model * 2 / 3 / 64)
    return cfg.mlp_mult * cfg.d_model


class ByteLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.d_model)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 / math.sqrt(2 * cfg.n_layer) if name.endswith(("proj.weight",
                                                                          "out.weight")) else 0.02
                nn.init.normal_(p, std=std)

    def forward(self, ids):
        T = ids.shape[1]
        cos, sin = rope_tables(T, self.cfg.d_model // self.cfg.n_head, self.cfg.rope_theta,
                               ids.device)
        x = self.emb(ids)
        for blk in self.blocks:
            x = blk(x, cos, sin)
        return F.linear(self.norm(x), self.emb.weight)  # tied head

    def set_stats(self, eps):
        for blk in self.blocks:
            blk.attn.stats = None if eps is None else {"eps": eps, "kept": []}

    def collect_stats(self) -> list:
        return [blk.attn.stats["kept"][0] for blk in self.blocks]


def kept_summary(st, T: int) -> dict:
    """Kept fraction of all (query tile, key block) pairs and of the causal-live ones."""
    kept = st.kept_blocks
    nqt, nkb = kept.shape[-2], kept.shape[-1]
    last_row = torch.clamp((torch.arange(nqt, device=kept.device) + 1) * st.block_m - 1, max=T - 1)
    live = (torch.arange(nkb, device=kept.device) * st.block_n)[None, :] <= last_row[:, None]
    n_kept = float(kept.sum())
    return {"kept_fraction": n_kept / kept.numel(),
            "kept_fraction_of_causal": n_kept / (float(live.sum()) * kept.shape[0] * kept.shape[1]),
            "block_m": st.block_m, "block_n": st.block_n}


def save_checkpoint(path: str, model: "ByteLM", extra: dict, shard_mib=None) -> None:
    """The model's weights, config and ``extra``; with ``shard_mib``, weights in bf16 split over
    ``path.part0, path.part1, ...`` of at most that size each (``load_checkpoint`` reads both)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    state = model.state_dict()
    if shard_mib is None:
        torch.save({"model": state, "config": asdict(model.cfg), **extra}, path)
        print(f"checkpoint -> {path}", flush=True)
        return
    parts, size = [{}], 0
    for name, t in state.items():
        t = t.detach().to("cpu", torch.bfloat16 if t.is_floating_point() else t.dtype)
        if parts[-1] and size + t.numel() * t.element_size() > shard_mib * 2 ** 20:
            parts.append({})
            size = 0
        parts[-1][name] = t
        size += t.numel() * t.element_size()
    for i, part in enumerate(parts):
        torch.save({"model": part, "config": asdict(model.cfg), "parts": len(parts),
                    **(extra if i == 0 else {})}, f"{path}.part{i}")
    print(f"checkpoint -> {path}.part0..{len(parts) - 1} (bf16)", flush=True)


def load_checkpoint(path: str) -> tuple["ByteLM", dict]:
    """(model in float32 on the CPU, the checkpoint's other entries), from ``path`` or from the
    parts ``save_checkpoint`` wrote."""
    if os.path.exists(path):
        ck = torch.load(path, map_location="cpu", weights_only=False)
    else:
        ck = torch.load(f"{path}.part0", map_location="cpu", weights_only=False)
        for i in range(1, ck["parts"]):
            ck["model"].update(torch.load(f"{path}.part{i}", map_location="cpu",
                                          weights_only=False)["model"])
    model = ByteLM(LMConfig(**ck["config"]))
    model.load_state_dict({k: v.float() for k, v in ck.pop("model").items()})
    return model, ck


def to_llama(model: "ByteLM"):
    """The same network as a transformers LlamaForCausalLM (SwiGLU models only), for
    ``generate`` with its caches: Llama's RoPE, RMSNorm and MLP are this model's."""
    import transformers

    cfg = model.cfg
    if cfg.mlp != "swiglu":
        raise ValueError("to_llama needs a model trained with --mlp swiglu")
    head_dim = cfg.d_model // cfg.n_head
    kv = cfg.n_kv_head or cfg.n_head
    config = transformers.LlamaConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.d_model, intermediate_size=mlp_hidden(cfg),
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=kv,
        head_dim=head_dim, max_position_embeddings=1 << 20, rope_theta=cfg.rope_theta,
        rms_norm_eps=torch.finfo(torch.float32).eps, tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False, pad_token_id=0, bos_token_id=None,
        eos_token_id=None)
    config._attn_implementation = "sdpa"
    hf = transformers.LlamaForCausalLM(config)
    state = {"model.embed_tokens.weight": model.emb.weight, "model.norm.weight": model.norm.weight,
             "lm_head.weight": model.emb.weight}
    for i, blk in enumerate(model.blocks):
        p = f"model.layers.{i}."
        q, k, v = blk.attn.qkv.weight.split([cfg.d_model, kv * head_dim, kv * head_dim])
        state.update({p + "self_attn.q_proj.weight": q, p + "self_attn.k_proj.weight": k,
                      p + "self_attn.v_proj.weight": v,
                      p + "self_attn.o_proj.weight": blk.attn.proj.weight,
                      p + "input_layernorm.weight": blk.norm1.weight,
                      p + "post_attention_layernorm.weight": blk.norm2.weight,
                      p + "mlp.gate_proj.weight": blk.gate.weight,
                      p + "mlp.up_proj.weight": blk.fc.weight,
                      p + "mlp.down_proj.weight": blk.out.weight})
    hf.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    return hf.eval()


