"""Post-RoPE queries, keys and values of the stdlib byte LM (``train_stdlib_lm.ByteLM``) on
validation text: the learned attention inputs that bound studies and decode benchmarks measure on.

    from learned_qkv import capture_qkv, load_model, validation_windows

    model, info = load_model(".ckpt/long_lm.pt")           # parts accepted
    ids = validation_windows(32768, n=2, seed=0)            # [2, 32768] int64
    qkv = capture_qkv(model, ids, layers=[0, 5], q_last=64)  # {layer: (q, k, v)}

Works on the CPU and on CUDA, in the model's dtype (cast the model to bf16 for bf16 inputs).
Forward hooks only (``train_stdlib_lm.py`` is untouched): a pre-hook on each ``Attention`` sees
its input and the RoPE tables and recomputes q, k, v with the module's own projection, so the
capture costs one extra qkv projection per captured layer, no global patching. The forward
stops after the last captured layer (no MLP, head or logits past it). ``verify_capture`` checks
on a short input that the captured tensors reproduce the module's output.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

BENCH = os.path.dirname(os.path.abspath(__file__))
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)
import train_stdlib_lm as lm  # noqa: E402  (benchmarks/ on sys.path)


class _StopForward(Exception):
    """Raised by the hook of the last captured layer: nothing after it is needed."""


def load_model(path: str, device="cpu", dtype=torch.float32):
    """(ByteLM in eval mode on ``device`` in ``dtype``, the checkpoint's other entries)."""
    model, extras = lm.load_checkpoint(path)
    return model.to(device, dtype).eval(), extras


def attention_qkv(attn: "lm.Attention", x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [B, H, T, D], k, v [B, Hkv, T, D] after RoPE, as ``lm.Attention.forward`` makes them."""
    B, T, C = x.shape
    hd = C // attn.n_head
    q, k, v = attn.qkv(x).split([C, attn.n_kv_head * hd, attn.n_kv_head * hd], -1)
    q = q.view(B, T, attn.n_head, hd).transpose(1, 2)
    k, v = (t.view(B, T, attn.n_kv_head, hd).transpose(1, 2) for t in (k, v))
    return lm.apply_rope(q, cos, sin), lm.apply_rope(k, cos, sin), v


@torch.no_grad()
def capture_qkv(model: "lm.ByteLM", ids: torch.Tensor, layers=None, q_last: int | None = None):
    """{layer: (q, k, v)} of ``model`` on ``ids`` [B, T]: q [B, H, T, D] (only the last
    ``q_last`` positions when given: decode rows, and T times less memory), k, v [B, Hkv, T, D],
    contiguous, in the model's dtype on its device. ``layers``: indices (default all)."""
    n_layer = len(model.blocks)
    wanted = sorted(set(range(n_layer) if layers is None else layers))
    if not wanted or wanted[0] < 0 or wanted[-1] >= n_layer:
        raise ValueError(f"layers must lie in [0, {n_layer}), got {layers}")
    device = next(model.parameters()).device
    captured, handles = {}, []

    def hook_for(index):
        def pre_hook(attn, args):
            q, k, v = attention_qkv(attn, *args)
            if q_last is not None:
                q = q[:, :, -q_last:]
            captured[index] = (q.contiguous(), k.contiguous(), v.contiguous())
            if index == wanted[-1]:
                raise _StopForward
        return pre_hook

    for i in wanted:
        handles.append(model.blocks[i].attn.register_forward_pre_hook(hook_for(i)))
    try:
        model(ids.to(device).long())
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return captured


@torch.no_grad()
def verify_capture(model: "lm.ByteLM", ids: torch.Tensor, atol: float = 1e-4) -> float:
    """Largest |proj(SDPA(captured q, k, v)) - Attention's output| over layers, on ``ids``
    (keep it short: a check of the plumbing, not a benchmark). Raises if above ``atol``."""
    outputs = {}
    handles = [blk.attn.register_forward_hook(
        lambda mod, args, out, i=i: outputs.__setitem__(i, out))
        for i, blk in enumerate(model.blocks)]
    try:
        qkv = capture_qkv(model, ids)  # stops before the forward hook of the last layer runs
        model(ids.to(next(model.parameters()).device).long())
    finally:
        for h in handles:
            h.remove()
    worst = 0.0
    for i, (q, k, v) in qkv.items():
        attn = model.blocks[i].attn
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           enable_gqa=attn.n_kv_head != attn.n_head)
        B, _, T, _ = q.shape
        y = attn.proj(y.transpose(1, 2).reshape(B, T, -1))
        worst = max(worst, float((y - outputs[i]).abs().max()))
    if worst > atol:
        raise AssertionError(f"captured q, k, v do not reproduce the attention output: "
                             f"max abs diff {worst:.3e} > {atol:.1e}")
    return worst


_VAL = {}


def validation_split() -> torch.Tensor:
    """The validation bytes of ``train_stdlib_lm.load_corpus`` (uint8), cached."""
    if "val" not in _VAL:
        _, _VAL["val"], _VAL["info"] = lm.load_corpus()
    return _VAL["val"]


def window_starts(length: int, n: int, seed: int) -> list[int]:
    """``n`` distinct start offsets of ``length``-byte windows of the validation split, drawn
    with ``seed`` (sorted, so a run reads them in file order)."""
    span = validation_split().numel() - length
    if span < n:
        raise ValueError(f"validation split ({validation_split().numel()} bytes) holds fewer "
                         f"than {n} windows of {length}")
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(span, generator=g)[:n].tolist())


def validation_windows(length: int, n: int, seed: int = 0) -> torch.Tensor:
    """[n, length] int64 byte ids: windows of the validation split at ``window_starts``."""
    val = validation_split()
    return torch.stack([val[s:s + length].long() for s in window_starts(length, n, seed)])


def corpus_info() -> dict:
    """The local validation split's description (load_corpus's record)."""
    validation_split()
    return _VAL["info"]
