"""Before/after Dynamo graphs of small cases, as expecttest inline expectations.

Update with ``EXPECTTEST_ACCEPT=1 python -m pytest tests/passes/test_rewrite_graphs.py``.
"""

from __future__ import annotations

import math
import unittest

import expecttest
import torch
import torch.nn.functional as F

from aether_compile import AetherOptions
from aether_compile._compat import TORCH_VERSION
from aether_compile.passes.rewrite import rewrite_attention

OPTIONS = AetherOptions(allow_cpu=True, eps=0.0)


def _graphs(fn, *args):
    """(code before, code after) of the graph Dynamo captures for fn(*args)."""
    seen = {}

    def backend(gm, example_inputs):
        seen["before"] = gm.code.strip()
        rewrite_attention(gm, OPTIONS)
        seen["after"] = gm.code.strip()
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return seen["before"], seen["after"]


def hf_llama_eager(q, k, v, mask):
    """transformers' eager_attention_forward with repeat_kv (GQA), additive mask, fp32 softmax."""

    def repeat_kv(x, n_rep):
        b, h, s, d = x.shape
        return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)

    k, v = repeat_kv(k, 2), repeat_kv(v, 2)
    w = torch.matmul(q, k.transpose(2, 3)) * 0.25
    w = w + mask
    w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
    w = F.dropout(w, p=0.0, training=False)
    return torch.matmul(w, v).transpose(1, 2).contiguous()


def nanogpt_manual(q, k, v, bias):
    T = q.size(-2)
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    att = att.masked_fill(bias[:, :, :T, :T] == 0, float("-inf"))
    return F.softmax(att, dim=-1) @ v


@unittest.skipUnless(TORCH_VERSION[:2] == (2, 13), "graph code text is specific to torch 2.13")
class TestRewriteGraphs(expecttest.TestCase):
    def test_hf_llama_eager(self):
        q = torch.randn(1, 4, 8, 16)
        k, v = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16)
        before, after = _graphs(hf_llama_eager, q, k, v, torch.zeros(1, 1, 8, 8))
        self.assertExpectedInline(before, """\
def forward(self, L_k_ : torch.Tensor, L_v_ : torch.Tensor, L_q_ : torch.Tensor, L_mask_ : torch.Tensor):
    l_k_ = L_k_
    l_v_ = L_v_
    l_q_ = L_q_
    l_mask_ = L_mask_
    getitem = l_k_[(slice(None, None, None), slice(None, None, None), None, slice(None, None, None), slice(None, None, None))];  l_k_ = None
    expand = getitem.expand(1, 2, 2, 8, 16);  getitem = None
    k = expand.reshape(1, 4, 8, 16);  expand = None
    getitem_1 = l_v_[(slice(None, None, None), slice(None, None, None), None, slice(None, None, None), slice(None, None, None))];  l_v_ = None
    expand_1 = getitem_1.expand(1, 2, 2, 8, 16);  getitem_1 = None
    v = expand_1.reshape(1, 4, 8, 16);  expand_1 = None
    transpose = k.transpose(2, 3);  k = None
    matmul = torch.matmul(l_q_, transpose);  l_q_ = transpose = None
    w = matmul * 0.25;  matmul = None
    w_1 = w + l_mask_;  w = l_mask_ = None
    softmax = torch.nn.functional.softmax(w_1, dim = -1, dtype = torch.float32);  w_1 = None
    w_2 = softmax.to(torch.float32);  softmax = None
    w_3 = torch.nn.functional.dropout(w_2, p = 0.0, training = False);  w_2 = None
    matmul_1 = torch.matmul(w_3, v);  w_3 = v = None
    transpose_1 = matmul_1.transpose(1, 2);  matmul_1 = None
    contiguous = transpose_1.contiguous();  transpose_1 = None
    return (contiguous,)""")
        self.assertExpectedInline(after, """\
def forward(self, L_k_ : torch.Tensor, L_v_ : torch.Tensor, L_q_ : torch.Tensor, L_mask_ : torch.Tensor):
    l_k_ = L_k_
    l_v_ = L_v_
    l_q_ = L_q_
    l_mask_ = L_mask_
    attention_default = torch.ops.aether.attention.default(l_q_, l_k_, l_v_, l_mask_, False, 0.25, True, 0.0);  l_q_ = l_k_ = l_v_ = l_mask_ = None
    transpose_1 = attention_default.transpose(1, 2);  attention_default = None
    contiguous = transpose_1.contiguous();  transpose_1 = None
    return (contiguous,)""")

    def test_nanogpt_manual(self):
        q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
        bias = torch.tril(torch.ones(16, 16)).view(1, 1, 16, 16)
        before, after = _graphs(nanogpt_manual, q, k, v, bias)
        self.assertExpectedInline(before, """\
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_bias_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_bias_ = L_bias_
    l_v_ = L_v_
    transpose = l_k_.transpose(-2, -1);  l_k_ = None
    matmul = l_q_ @ transpose;  l_q_ = transpose = None
    att = matmul * 0.25;  matmul = None
    getitem = l_bias_[(slice(None, None, None), slice(None, None, None), slice(None, 8, None), slice(None, 8, None))];  l_bias_ = None
    eq = getitem == 0;  getitem = None
    att_1 = att.masked_fill(eq, -inf);  att = eq = None
    softmax = torch.nn.functional.softmax(att_1, dim = -1);  att_1 = None
    matmul_1 = softmax @ l_v_;  softmax = l_v_ = None
    return (matmul_1,)""")
        self.assertExpectedInline(after, """\
def forward(self, L_q_ : torch.Tensor, L_k_ : torch.Tensor, L_bias_ : torch.Tensor, L_v_ : torch.Tensor):
    l_q_ = L_q_
    l_k_ = L_k_
    l_bias_ = L_bias_
    l_v_ = L_v_
    getitem = l_bias_[(slice(None, None, None), slice(None, None, None), slice(None, 8, None), slice(None, 8, None))];  l_bias_ = None
    eq = getitem == 0;  getitem = None
    invert = ~eq;  eq = None
    attention_default = torch.ops.aether.attention.default(l_q_, l_k_, l_v_, invert, False, 0.25, False, 0.0);  l_q_ = l_k_ = l_v_ = invert = None
    return (attention_default,)""")
