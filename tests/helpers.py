"""Shared test utilities: float64 oracles, per-dtype tolerances, readable case ids."""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

# Relative Frobenius error allowed against a float64 oracle, per input dtype (Triton dots:
# fp32 in IEEE mode; fp16/bf16 operands with fp32 accumulation).
# The repository root: tests import each other as tests.* from there.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Triton kernels run on CPU through its interpreter when this is set (CI).
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

REL_TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    denom = b.norm()
    return float((a - b).norm() / denom) if denom > 0 else float((a - b).norm())


def dense_oracle(q, k, v, attn_mask=None, is_causal=False, scale=None):
    """Float64 SDPA with causal combined into the mask explicitly (SDPA's math path refuses the
    combination in some versions; our op defines it as the logical AND)."""
    q, k, v = q.double(), k.double(), v.double()
    L, S = q.shape[-2], k.shape[-2]
    mask = attn_mask
    if mask is not None and mask.is_floating_point():
        mask = mask.double()
    if is_causal:
        causal = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
        if mask is None:
            mask = causal
        elif mask.dtype == torch.bool:
            mask = mask & causal
        else:
            mask = mask.masked_fill(~causal, -math.inf)
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def make_mask(kind: str, B: int, H: int, L: int, S: int, dtype, device="cpu", seed=0):
    """Every SDPA mask form: None, bool/float full, key padding, per-head broadcast, 2-D."""
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None
    if kind == "bool":
        m = torch.rand(B, 1, L, S, generator=g) > 0.3
    elif kind == "bool2d":
        m = torch.rand(L, S, generator=g) > 0.5
    elif kind == "key_padding":  # [B, 1, 1, S], last keys of batch 0 padded away
        m = torch.ones(B, 1, 1, S, dtype=torch.bool)
        m[0, ..., S - max(1, S // 3):] = False
    elif kind == "float":
        m = torch.randn(1, H, 1, S, generator=g).to(dtype)
    elif kind == "float_full":  # HF style: 0 or finfo.min
        keep = torch.rand(B, 1, L, S, generator=g) > 0.2
        m = torch.zeros(B, 1, L, S, dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
    else:
        raise ValueError(kind)
    return m.to(device)


# Workload parameters that make small (CI-sized) inputs prunable: short runs, few centres, tiles
# of 32 keys. Uniform never prunes; adversarial puts the bound close to the threshold.
SMALL_WORKLOAD_KW = {
    "clustered": dict(run=32, centers=8),
    "sink_local": dict(window=16, strength=10.0),
    "adversarial": dict(block_n=32),
    "uniform": {},
    "llm_like": dict(kv_heads=1, needles=2),
    "clustered_gqa": dict(kv_heads=1, run=32, centers=8),
}


def chunked_oracle(q, k, v, attn_mask=None, is_causal=False, kept=None, block_m=None, block_n=None):
    """Float64 attention (restricted to ``kept`` when given), row-chunked for 32K tokens."""
    from aether_compile.kernels.reference import chunked_attention_fp64

    return chunked_attention_fp64(q, k, v, attn_mask, is_causal, kept, block_m, block_n)


def causal_and_dtypes(dtypes=(torch.float32, torch.float16, torch.bfloat16)):
    """Parametrises ``is_causal, dtype``: every pair on a GPU. Under Triton's interpreter (CPU CI,
    where a small case takes seconds) float32 with both, and each half precision with one of them
    (float16 full, bfloat16 causal): every dtype and both masks still run on every case."""
    import pytest

    pairs = [(c, d) for c in (False, True) for d in dtypes]
    if TRITON_INTERPRET:
        pairs = [(c, d) for c, d in pairs if d not in (torch.float16, torch.bfloat16)
                 or (d == torch.bfloat16) == c]
    return pytest.mark.parametrize("is_causal,dtype", [
        pytest.param(c, d, id=f"{'causal' if c else 'full'}-{str(d).split('.')[-1]}")
        for c, d in pairs])


def wait_for_inductor_pool(timeout_s: float = 120.0) -> None:
    """Until Inductor's worker pool answers (a new process's pool starts with the first ask)."""
    import time

    from aether_compile.inductor import precompile

    deadline = time.monotonic() + timeout_s
    while precompile.inductor_compile_pool() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert precompile.inductor_compile_pool() is not None, "no Inductor worker pool on this machine"
