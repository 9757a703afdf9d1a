"""Random attention-like modules for fuzzing the rewrite pass (tests/passes/test_pass_fuzz.py,
benchmarks/run_reliability.py --fuzz).

``random_spec(rng)`` draws a spelling (SDPA, matmul/einsum/bmm/baddbmm + softmax, or
nn.MultiheadAttention), how the scale is written, a mask (none, additive, bool via masked_fill or
where, causal buffer, key padding, SDPA's is_causal, a zero fill that does not mask), GQA by
repeat_interleave / expand / broadcasting / enable_gqa, casts around the softmax, dropout (eval,
training, functional) and extra users of the scores or weights. ``check_spec`` compiles the module
with backend="aether" (explain, allow_cpu, eps=0) and classifies the outcome: every site is either
rewritten with outputs matching eager, or declined with a reason; anything else is a failure.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# bmm: all in 3-D [B*H, L, S] (mask flattened to match); baddbmm: GPT-2's upcast path (scores by
# baddbmm, then viewed 4-D for the mask, the softmax and a 4-D matmul with v).
SPELLINGS = ("sdpa", "matmul", "einsum", "bmm", "baddbmm", "mha")
SCALES = ("div_sqrt", "mul_const", "on_q", "split", "none", "tensor", "left_mul")
MASKS = ("none", "additive", "bool_fill_inf", "bool_fill_min", "where", "causal_buffer",
         "key_padding", "is_causal", "fill_zero")
GQAS = ("none", "repeat_interleave", "expand", "broadcast", "enable_gqa")
CASTS = ("none", "softmax_fp32", "float_then_back")
DROPOUTS = ("none", "module_eval", "module_train", "functional_eval", "functional_train")
EXTRAS = ("none", "return_weights", "scores_reused", "weights_reused", "two_sites")


@dataclass(frozen=True)
class Spec:
    spelling: str
    scale: str
    mask: str
    gqa: str
    cast: str
    dropout: str
    extra: str
    H: int
    Hkv: int
    D: int
    L: int
    seed: int

    def id(self) -> str:
        return "-".join(str(v) for v in asdict(self).values())


def random_spec(rng: random.Random) -> Spec:
    spelling = rng.choice(SPELLINGS)
    H = rng.choice((1, 2, 4))
    gqa = rng.choice(GQAS) if H > 1 else "none"
    if spelling == "mha":  # nn.MultiheadAttention: its own masks, no GQA, no custom scale
        gqa = "none"
    if spelling != "sdpa" and gqa == "enable_gqa":
        gqa = "repeat_interleave"
    if spelling in ("bmm", "baddbmm") and gqa == "broadcast":
        gqa = "expand"
    if spelling == "einsum" and gqa == "broadcast":  # einsum does not broadcast heads
        gqa = "expand"
    if gqa == "none":
        Hkv = H
    elif gqa == "broadcast":  # matmul broadcasts a single kv head only
        Hkv = 1
    else:
        Hkv = rng.choice([h for h in (1, 2) if H % h == 0 and h < H])
    # weights: about half the modules have no extra user and no training dropout (rewritable)
    extra = rng.choices(EXTRAS, weights=(5, 1, 1, 1, 2))[0]
    dropout = rng.choices(DROPOUTS, weights=(3, 2, 1, 2, 1))[0]
    return Spec(spelling=spelling, scale=rng.choice(SCALES), mask=rng.choice(MASKS), gqa=gqa,
                cast=rng.choice(CASTS), dropout=dropout, extra=extra,
                H=H, Hkv=Hkv, D=rng.choice((16, 24, 32)), L=rng.randint(3, 40),
                seed=rng.randrange(2 ** 16))


class FuzzAttention(nn.Module):
    """One attention site (two with extra="two_sites") spelled as ``spec`` says."""

    def __init__(self, spec: Spec):
        super().__init__()
        self.spec = spec
        H, Hkv, D = spec.H, spec.Hkv, spec.D
        C = H * D
        self.H, self.Hkv, self.D, self.C = H, Hkv, D, C
        self.q = nn.Linear(C, H * D)
        self.k = nn.Linear(C, Hkv * D)
        self.v = nn.Linear(C, Hkv * D)
        self.o = nn.Linear(H * D, C)
        self.drop = nn.Dropout(0.1)
        self.register_buffer("scale_t", torch.tensor(D ** -0.5))
        self.register_buffer("tril", torch.ones(64, 64).tril().view(1, 1, 64, 64))
        if spec.spelling == "mha":
            self.mha = nn.MultiheadAttention(C, H, batch_first=True, dropout=0.1)

    # -- pieces --------------------------------------------------------------------------------
    def heads(self, x):
        B, L, _ = x.shape
        q = self.q(x).view(B, L, self.H, self.D).transpose(1, 2)
        k = self.k(x).view(B, L, self.Hkv, self.D).transpose(1, 2)
        v = self.v(x).view(B, L, self.Hkv, self.D).transpose(1, 2)
        return q, k, v

    def expand_kv(self, k, v):
        g, rep = self.spec.gqa, self.H // self.Hkv
        if g == "repeat_interleave":
            return k.repeat_interleave(rep, dim=1), torch.repeat_interleave(v, rep, dim=1)
        if g == "expand":
            B, _, L, D = k.shape
            k = k[:, :, None].expand(B, self.Hkv, rep, L, D).reshape(B, self.H, L, D)
            v = v[:, :, None].expand(B, self.Hkv, rep, L, D).reshape(B, self.H, L, D)
        return k, v  # "broadcast": matmul broadcasts the single kv head (Hkv == 1 only)

    def scores(self, q, k):
        s, D = self.spec.scale, self.D
        if s == "on_q":
            q = q * D ** -0.5
        elif s == "split":
            q, k = q * D ** -0.25, k * D ** -0.25
        sp = self.spec.spelling
        if sp == "einsum":
            w = torch.einsum("bhqd,bhkd->bhqk", q, k)
        elif sp in ("bmm", "baddbmm"):
            B, H, L, _ = q.shape
            q3, k3 = q.reshape(B * H, L, D), k.reshape(B * H, -1, D)
            if sp == "bmm":
                w = torch.bmm(q3, k3.transpose(1, 2))
            else:
                alpha = D ** -0.5 if s == "div_sqrt" else 1.0
                w = torch.baddbmm(torch.empty(B * H, L, k3.shape[1], dtype=q.dtype,
                                              device=q.device), q3, k3.transpose(1, 2), beta=0,
                                  alpha=alpha)
                w = w.view(B, H, L, -1)  # bmm stays 3-D: [B*H, L, S]
        else:
            w = q @ k.transpose(-2, -1)
        if s == "div_sqrt" and sp != "baddbmm":
            w = w / math.sqrt(D)
        elif s == "mul_const":
            w = w * 0.3
        elif s == "left_mul":
            w = 0.3 * w
        elif s == "tensor":
            w = w * self.scale_t
        return w

    def apply_mask(self, w, mask):
        m, L = self.spec.mask, w.shape[-1]
        if m == "additive":
            return w + mask
        if m == "bool_fill_inf":
            return w.masked_fill(~mask, float("-inf"))
        if m == "bool_fill_min":
            return w.masked_fill(~mask, torch.finfo(w.dtype).min)
        if m == "where":
            return torch.where(mask, w, torch.tensor(float("-inf"), dtype=w.dtype))
        if m == "causal_buffer":
            tril = self.tril[:, :, :L, :L] if w.dim() == 4 else self.tril[0, :, :L, :L]
            return w.masked_fill(tril == 0, float("-inf"))
        if m == "key_padding":
            return w + mask
        if m == "fill_zero":
            return w.masked_fill(~mask, 0.0)
        return w  # none, is_causal (manual spellings ignore it)

    def softmax(self, w):
        c = self.spec.cast
        if c == "softmax_fp32":
            return F.softmax(w, dim=-1, dtype=torch.float32).to(w.dtype)
        if c == "float_then_back":
            return w.float().softmax(-1).to(w.dtype)
        return torch.softmax(w, dim=-1)

    def dropout(self, p):
        d = self.spec.dropout
        if d.startswith("module"):
            return self.drop(p)
        if d.startswith("functional"):
            return F.dropout(p, 0.1, training=self.training)
        return p

    def attend(self, q, k, v, mask):
        sp, spec = self.spec.spelling, self.spec
        if sp == "sdpa":
            scale = {"mul_const": 0.3, "left_mul": 0.3, "div_sqrt": None, "on_q": None,
                     "split": None, "none": 1.0, "tensor": None}[spec.scale]
            if spec.gqa not in ("enable_gqa", "none"):
                k, v = self.expand_kv(k, v)
                if spec.gqa == "broadcast":
                    k, v = self.expand_kv_dense(k, v)
            sdpa_mask = None
            if spec.mask in ("additive", "key_padding", "bool_fill_inf", "where", "bool_fill_min",
                             "fill_zero"):
                sdpa_mask = mask
            p = self.drop.p if spec.dropout.endswith("train") and self.training else 0.0
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=sdpa_mask, dropout_p=p,
                is_causal=spec.mask in ("is_causal", "causal_buffer"), scale=scale,
                enable_gqa=spec.gqa == "enable_gqa"), None
        k, v = self.expand_kv(k, v)
        if sp == "bmm":  # everything in 3-D [B*H, L, S]; the mask is flattened to match
            B, H, L, _ = q.shape
            if mask.dim() == 4:
                mask = mask.expand(B, H, mask.shape[2], mask.shape[3]).reshape(
                    B * H, mask.shape[2], mask.shape[3])
            w = self.apply_mask(self.scores(q, k), mask)
            p = self.dropout(self.softmax(w))
            y = torch.bmm(p, v.reshape(B * H, -1, self.D)).view(B, H, L, self.D)
            return y, (w, p)
        w = self.apply_mask(self.scores(q, k), mask)
        p = self.dropout(self.softmax(w))
        if sp == "einsum":
            y = torch.einsum("bhqk,bhkd->bhqd", p, v)
        else:
            y = p @ v
        return y, (w, p)

    def expand_kv_dense(self, k, v):
        B, _, L, D = k.shape
        return k.expand(B, self.H, L, D), v.expand(B, self.H, L, D)

    def forward(self, x, mask):
        spec = self.spec
        B, L, C = x.shape
        if spec.spelling == "mha":
            kw = {}
            if spec.mask == "key_padding":
                kw["key_padding_mask"] = ~mask.view(B, L)  # True = padding
            elif spec.mask in ("bool_fill_inf", "bool_fill_min", "where", "causal_buffer",
                               "is_causal"):
                kw["attn_mask"] = ~torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
            out, w = self.mha(x, x, x, need_weights=spec.extra == "return_weights", **kw)
            return (out, w) if spec.extra == "return_weights" else out
        q, k, v = self.heads(x)
        y, inter = self.attend(q, k, v, mask)
        out = self.o(y.transpose(1, 2).reshape(B, L, self.H * self.D))
        if spec.extra == "two_sites":
            y2, _ = self.attend(q * 0.5, k, v, mask)
            out = out + self.o(y2.transpose(1, 2).reshape(B, L, self.H * self.D))
        if inter is not None:
            w, p = inter
            if spec.extra == "return_weights":
                return out, p
            if spec.extra == "scores_reused":
                return out + w.amax(-1).mean()  # finite: key 0 is never masked
            if spec.extra == "weights_reused":
                return out + p.amax(-1).mean()
        return out


def inputs_for(spec: Spec, dtype=torch.float32):
    """(x, mask) with no fully masked row (eager softmax gives NaN there, the op 0): key 0 stays."""
    g = torch.Generator().manual_seed(spec.seed)
    B, L = 2, spec.L
    x = torch.randn(B, L, spec.H * spec.D, generator=g, dtype=dtype)
    keep = torch.rand(B, 1, L, L, generator=g) > 0.3
    keep[..., 0] = True
    if spec.mask == "additive":
        mask = torch.randn(B, 1, L, L, generator=g, dtype=dtype)
    elif spec.mask == "key_padding":
        pad = torch.ones(B, 1, 1, L, dtype=torch.bool)
        pad[1, ..., max(1, L // 2):] = False
        mask = pad if spec.spelling == "mha" else torch.zeros(B, 1, 1, L, dtype=dtype).masked_fill(
            ~pad, float("-inf"))
    else:
        mask = keep
    return x, mask


@dataclass
class FuzzResult:
    spec: Spec
    outcome: str  # "rewritten" | "declined" | "undetected" | "crash" | "mismatch" | "bad_decline"
    codes: tuple = ()
    detail: str = ""


def check_spec(spec: Spec, tol: float = 1e-4) -> FuzzResult:
    import aether_compile

    torch._dynamo.reset()
    torch.manual_seed(spec.seed)
    model = FuzzAttention(spec)
    model.train(spec.dropout.endswith("train"))
    x, mask = inputs_for(spec)
    grad = model.training
    with torch.set_grad_enabled(grad):  # eager first: an error here is the generator's bug
        torch.manual_seed(0)
        ref = model(x, mask)
    try:
        with torch.set_grad_enabled(grad):
            torch.manual_seed(0)
            report = aether_compile.explain(model, x, mask, options=dict(
                allow_cpu=True, eps=0.0, compiler="eager"))
    except Exception as e:  # noqa: BLE001 - counted
        return FuzzResult(spec, "crash", (), f"{type(e).__name__}: {e}"[:400])
    codes = tuple(s.code for s in report.sites)
    bad = [s for s in report.sites if s.code == "internal_error"
           or (not s.rewritten and not s.reason)]
    if bad:
        return FuzzResult(spec, "bad_decline", codes, "; ".join(s.reason for s in bad)[:400])
    outs = report.output if isinstance(report.output, tuple) else (report.output,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    if model.training:  # dropout draws differ between eager and compiled: compare shapes only
        ok = all(a.shape == b.shape for a, b in zip(outs, refs))
        err = 0.0
    else:
        errs = [float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))
                for a, b in zip(outs, refs)]
        err = max(errs)
        ok = err < tol
    if not ok:
        return FuzzResult(spec, "mismatch", codes, f"rel err {err:.3g}")
    if not report.sites:
        return FuzzResult(spec, "undetected", codes)
    return FuzzResult(spec, "rewritten" if any(s.rewritten for s in report.sites) else "declined",
                      codes)
