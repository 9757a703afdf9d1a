"""Small attention modules, each written in one spelling the matcher must recognise.

All take x [B, L, C] and return [B, L, C]; heads H, head dim D = C // H.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class _Base(nn.Module):
    def __init__(self, C=32, H=2, Hkv=None):
        super().__init__()
        self.H, self.Hkv, self.D = H, Hkv or H, C // H
        self.q = nn.Linear(C, H * self.D)
        self.k = nn.Linear(C, self.Hkv * self.D)
        self.v = nn.Linear(C, self.Hkv * self.D)
        self.o = nn.Linear(H * self.D, C)

    def heads(self, x):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.H, self.D).transpose(1, 2)
        k = self.k(x).view(B, L, self.Hkv, self.D).transpose(1, 2)
        v = self.v(x).view(B, L, self.Hkv, self.D).transpose(1, 2)
        return q, k, v

    def merge(self, y):
        B, H, L, D = y.shape
        return self.o(y.transpose(1, 2).reshape(B, L, H * D))


class MatmulDivMask(_Base):
    """(q @ kᵀ) / sqrt(D) + additive float mask, torch.softmax, .matmul method."""

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        s = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.D) + mask
        return self.merge(torch.softmax(s, dim=-1).matmul(v))


class MaskThenScale(_Base):
    """Mask added before the scale: softmax((q @ kᵀ + mask) * s) — the mask is scaled too."""

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        s = (torch.matmul(q, k.transpose(-2, -1)) + mask).mul(self.D ** -0.5)
        return self.merge(F.softmax(s, -1) @ v)


class ScaleOnQ(_Base):
    """timm's manual path: q * scale before the matmul, the .softmax method, dropout module."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        q, k, v = self.heads(x)
        q = q * self.D ** -0.5
        a = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.merge(self.drop(a) @ v)


class SplitScale(_Base):
    """Scale split over q and k (math SDPA style), permute for kᵀ, fp32 softmax cast back."""

    def forward(self, x):
        q, k, v = self.heads(x)
        s = self.D ** -0.25
        w = (q * s) @ (k * s).permute(0, 1, 3, 2)
        p = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return self.merge(p @ v)


class UpcastTypeAs(_Base):
    """Softmax in float32, cast back with ``type_as(scores)`` (reads only the scores' dtype)."""

    def forward(self, x):
        q, k, v = self.heads(x)
        scores = (q @ k.transpose(-2, -1)) * self.D ** -0.5
        return self.merge(scores.float().softmax(-1).type_as(scores) @ v)


class EinsumMaskedFill(_Base):
    """einsum for both products, bool masked_fill with finfo.min."""

    def forward(self, x, keep):
        q, k, v = self.heads(x)
        s = torch.einsum("bhqd,bhkd->bhqk", q, k) * self.D ** -0.5
        s = s.masked_fill(~keep, torch.finfo(s.dtype).min)
        return self.merge(torch.einsum("bhqk,bhkd->bhqd", s.softmax(-1), v))


class BmmWhere(_Base):
    """3-D bmm over [B*H, L, D] with torch.where(causal, scores, -inf)."""

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = (t.reshape(B * self.H, L, self.D) for t in self.heads(x))
        s = torch.bmm(q, k.transpose(1, 2)) * self.D ** -0.5
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        s = torch.where(causal, s, float("-inf"))
        y = torch.bmm(F.softmax(s, dim=-1), v)
        return self.merge(y.view(B, self.H, L, self.D))


class WhereTensorFill(_Base):
    """transformers 4.x GPT-2: torch.where(causal, w, full([], finfo.min)) then + attention_mask."""

    def forward(self, x, mask):
        B, L, _ = x.shape
        q, k, v = self.heads(x)
        w = torch.matmul(q, k.transpose(-1, -2)) / torch.full([], self.D ** 0.5, dtype=q.dtype)
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        mask_value = torch.full([], torch.finfo(w.dtype).min, dtype=w.dtype, device=w.device)
        w = torch.where(causal, w.to(w.dtype), mask_value) + mask
        return self.merge(torch.matmul(F.softmax(w, dim=-1).type(v.dtype), v))


class Baddbmm(_Base):
    """GPT-2's reorder_and_upcast_attn: baddbmm(empty, q, kᵀ, beta=0, alpha=scale) in fp32."""

    def forward(self, x):
        B, L, _ = x.shape
        q, k, v = self.heads(x)
        w = torch.empty(B * self.H, L, L, dtype=torch.float32, device=x.device)
        w = torch.baddbmm(w, q.reshape(-1, L, self.D).float(),
                          k.reshape(-1, L, self.D).transpose(-1, -2).float(), beta=0,
                          alpha=self.D ** -0.5)
        w = w.view(B, self.H, L, L).softmax(dim=-1).type(v.dtype)
        return self.merge(torch.matmul(w, v))


class RepeatInterleaveGQA(_Base):
    """GQA by repeat_interleave on k and v; scale after as operator.mul on the left."""

    def __init__(self, **kw):
        super().__init__(C=64, H=4, Hkv=2)

    def forward(self, x):
        q, k, v = self.heads(x)
        k = k.repeat_interleave(self.H // self.Hkv, dim=1)
        v = torch.repeat_interleave(v, self.H // self.Hkv, dim=1)
        s = 0.25 * (q @ k.transpose(2, 3))
        return self.merge(s.softmax(-1) @ v)


class BroadcastMQA(_Base):
    """Multi-query attention by broadcasting: k and v have one head, matmul broadcasts it."""

    def __init__(self, **kw):
        super().__init__(C=64, H=4, Hkv=1)

    def forward(self, x):
        q, k, v = self.heads(x)
        return self.merge(torch.softmax(q @ k.transpose(-1, -2) * 0.25, -1) @ v)


class SdpaAllArgs(_Base):
    """F.scaled_dot_product_attention with mask, scale and enable_gqa all given."""

    def __init__(self, **kw):
        super().__init__(C=64, H=4, Hkv=2)

    def forward(self, x, mask):
        q, k, v = self.heads(x)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0,
                                           is_causal=False, scale=0.3, enable_gqa=True)
        return self.merge(y)


class LearnedBias(_Base):
    """T5-style: no scale, a learned position bias added to the scores."""

    def __init__(self, L=24, **kw):
        super().__init__(**kw)
        self.bias = nn.Parameter(torch.randn(1, self.H, L, L) * 0.1)

    def forward(self, x):
        q, k, v = self.heads(x)
        return self.merge(torch.softmax(q @ k.transpose(-1, -2) + self.bias, -1) @ v)


class TensorScale(_Base):
    """Scale held in a tensor: not a constant, stays dense."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.register_buffer("scale", torch.tensor(0.25))

    def forward(self, x):
        q, k, v = self.heads(x)
        return self.merge(((q @ k.transpose(-1, -2)) * self.scale).softmax(-1) @ v)


class FillZero(_Base):
    """masked_fill with 0 does not remove keys: unsupported mask, stays dense."""

    def forward(self, x, keep):
        q, k, v = self.heads(x)
        s = (q @ k.transpose(-1, -2)).masked_fill(~keep, 0.0)
        return self.merge(s.softmax(-1) @ v)


class ReturnsWeights(_Base):
    def forward(self, x):
        q, k, v = self.heads(x)
        p = (q @ k.transpose(-1, -2) * self.D ** -0.5).softmax(-1)
        return self.merge(p @ v), p


class NanoGPTAttention(nn.Module):
    """nanoGPT's CausalSelfAttention (Karpathy), flash and manual branches."""

    def __init__(self, n_embd=32, n_head=2, block_size=64, dropout=0.0, flash=True):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.attn_dropout = nn.Dropout(dropout)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd, self.dropout = n_head, n_embd, dropout
        self.flash = flash
        if not self.flash:
            self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size))
                                 .view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=None, dropout_p=self.dropout if self.training else 0,
                is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class NanoGPTBlock(nn.Module):
    def __init__(self, n_embd=32, n_head=2, flash=True, dropout=0.0, block_size=64):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = NanoGPTAttention(n_embd, n_head, block_size=block_size, dropout=dropout,
                                     flash=flash)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NotAttention(nn.Module):
    """Softmaxes that are not attention: a classifier, an MoE router, a similarity softmax
    that is reduced rather than multiplied with values. No site may be reported."""

    def __init__(self, C=32, E=4):
        super().__init__()
        self.head = nn.Linear(C, 10)
        self.router = nn.Linear(C, E)
        self.experts = nn.Parameter(torch.randn(E, C, C) * 0.1)

    def forward(self, x):
        probs = self.head(x).softmax(-1)
        gate = F.softmax(self.router(x), dim=-1)  # [B, L, E]
        mixed = torch.einsum("ble,ecd,blc->bld", gate, self.experts, x)
        sim = torch.softmax(x @ x.transpose(-1, -2) / 8.0, dim=-1)  # [B, L, L]
        return probs.sum() + mixed.mean() + sim.amax(-1).mean()
