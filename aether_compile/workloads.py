"""Synthetic attention inputs shared by the demo, the tests and the benchmarks.

Each returns (q, k, v) of shape [B, H, N, D] (k, v with ``kv_heads`` heads where given), drawn
from a seeded generator on the CPU and then moved, so every device sees the same numbers.
"""

from __future__ import annotations

import math

import torch


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def uniform_qkv(B, H, N, D, *, dtype=torch.float32, device="cpu", seed=0, kv_heads=None):
    """W1: q, k, v ~ N(0, 1). Nothing can be pruned."""
    g = _gen(seed)
    hk = kv_heads or H
    q = torch.randn(B, H, N, D, generator=g)
    k = torch.randn(B, hk, N, D, generator=g)
    v = torch.randn(B, hk, N, D, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def clustered_qkv(B, H, N, D, *, dtype=torch.float32, device="cpu", seed=0, centers=64, run=256,
                  center_std=1.5, noise_std=0.3, S=None):
    """W2: per head ``centers`` centres ~ N(0, center_std^2 I); queries and keys come in
    contiguous runs of ``run`` tokens, each run around one random centre plus N(0, noise_std^2)."""
    g = _gen(seed)
    S = N if S is None else S
    c = torch.randn(B, H, centers, D, generator=g) * center_std

    def draw(n):
        runs = torch.randint(0, centers, (B, H, n // run + 1), generator=g)
        ids = runs.repeat_interleave(run, -1)[..., :n]
        x = torch.gather(c, 2, ids[..., None].expand(B, H, n, D))
        return x + noise_std * torch.randn(B, H, n, D, generator=g)

    q, k = draw(N), draw(S)
    v = torch.randn(B, H, S, D, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def sink_local_qkv(B, H, N, D, *, dtype=torch.float32, device="cpu", seed=0, window=64,
                   sink=4, strength=6.0):
    """Attention dominated by a few sink tokens and a local window (for causal use): keys carry a
    shared 'sink' direction at the first ``sink`` positions and a slowly drifting position code
    that matches nearby queries."""
    g = _gen(seed)
    pos = torch.arange(N, dtype=torch.float32)
    freqs = 1.0 / window * torch.arange(1, D // 4 + 1, dtype=torch.float32) / (D // 4)
    code = torch.cat([torch.sin(pos[:, None] * freqs), torch.cos(pos[:, None] * freqs)], -1)
    code = torch.nn.functional.pad(code, (0, D - code.shape[-1])) * strength / math.sqrt(D // 4)
    q = code + 0.5 * torch.randn(B, H, N, D, generator=g)
    k = code + 0.5 * torch.randn(B, H, N, D, generator=g)
    sink_dir = torch.randn(D, generator=g)
    sink_dir = sink_dir / sink_dir.norm() * strength
    k[..., :sink, :] += sink_dir
    q = q + 0.5 * sink_dir
    v = torch.randn(B, H, N, D, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def adversarial_qkv(B, H, N, D, *, dtype=torch.float32, device="cpu", seed=0, block_n=16):
    """Keys placed so the bounds are nearly tight: every key block is a tight cluster (tiny
    radius, narrow box) whose scores straddle the pruning threshold, plus one hot block."""
    g = _gen(seed)
    nb = (N + block_n - 1) // block_n
    dirs = torch.randn(B, H, nb, D, generator=g)
    dirs = dirs / dirs.norm(dim=-1, keepdim=True)
    k = dirs.repeat_interleave(block_n, 2)[:, :, :N] * 3.0
    k = k + 1e-3 * torch.randn(B, H, N, D, generator=g)
    q = k.mean(2, keepdim=True).expand(B, H, N, D) * 2.0 + 0.05 * torch.randn(B, H, N, D, generator=g)
    k[:, :, :block_n] = q[:, :, :1] * 0.5  # one block that aligns with every query
    v = torch.randn(B, H, N, D, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


WORKLOADS = {
    "uniform": uniform_qkv,
    "clustered": clustered_qkv,
    "sink_local": sink_local_qkv,
    "adversarial": adversarial_qkv,
}


def rope(x: torch.Tensor, theta: float = 500000.0, offset: int = 0) -> torch.Tensor:
    """Rotary position embedding (Llama's half-split layout) on [..., N, D]."""
    N, D = x.shape[-2], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    ang = (torch.arange(offset, offset + N, dtype=torch.float32)[:, None] * inv[None, :])
    cos, sin = torch.cos(ang), torch.sin(ang)
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1)


def llm_like_qkv(B, H, N, D, *, kv_heads=8, dtype=torch.float32, device="cpu", seed=0,
                 theta=500000.0, sink=4, sink_strength=4.0, local_strength=3.0, needles=8,
                 needle_strength=6.0, nonlocal_frac=0.375, key_noise=0.6):
    """W3: GQA (H query heads over ``kv_heads``), RoPE theta=500000, attention sinks, a local
    window and a few needle keys. Local heads get queries correlated with the keys just before
    them (RoPE makes that a local window); non-local heads (``nonlocal_frac`` of kv groups) get
    queries that ignore position and retrieve needles. Every head sees the sinks, which sit in the
    slow RoPE channels so rotation hardly moves them. ``key_noise`` weighs the i.i.d. per-key
    content noise (the random stream does not depend on it). Returns q [B,H,N,D], k, v
    [B,kv_heads,N,D]."""
    g = _gen(seed)
    group = H // kv_heads
    base = torch.randn(B, kv_heads, N, D, generator=g)
    # smooth content: keys drift slowly along the sequence, so nearby keys are alike
    smooth = torch.cumsum(torch.randn(B, kv_heads, N, D, generator=g) * 0.15, dim=2)
    k_pre = key_noise * base + smooth / smooth.std()
    slow = torch.zeros(D)
    slow[D // 2 - 4: D // 2] = 1.0
    slow[D - 4:] = 1.0
    slow = slow / slow.norm()
    k_pre[..., :sink, :] += sink_strength * math.sqrt(D) * slow
    needle_pos = torch.randint(sink, max(sink + 1, N), (B, kv_heads, needles), generator=g)
    needle_dir = torch.randn(B, kv_heads, 1, D, generator=g)
    needle_dir = needle_dir / needle_dir.norm(dim=-1, keepdim=True)
    for i in range(needles):
        idx = needle_pos[..., i]
        k_pre[torch.arange(B)[:, None], torch.arange(kv_heads)[None, :], idx] += (
            needle_strength * math.sqrt(D) * needle_dir[:, :, 0])
    q_pre = torch.empty(B, H, N, D)
    n_nonlocal = int(round(nonlocal_frac * kv_heads))
    for hk in range(kv_heads):
        for r in range(group):
            h = hk * group + r
            noise = torch.randn(B, N, D, generator=g)
            if hk < kv_heads - n_nonlocal:  # local head: look like the recent keys
                q_pre[:, h] = local_strength * k_pre[:, hk] / math.sqrt(D) * 4 + 0.5 * noise
            else:  # retrieval head: look for the needles
                q_pre[:, h] = needle_strength * needle_dir[:, hk] + 0.5 * noise
            q_pre[:, h] += 0.8 * sink_strength * slow
    q = rope(q_pre, theta)
    k = rope(k_pre, theta)
    v = torch.randn(B, kv_heads, N, D, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


WORKLOADS["llm_like"] = llm_like_qkv


def clustered_gqa_qkv(B, H, N, D, *, kv_heads=1, dtype=torch.float32, device="cpu", seed=0,
                      centers=64, run=256, center_std=1.5, noise_std=0.3):
    """W2's clustered data for GQA: each kv head has its centres, and the query heads of its
    group draw their runs from the same centres (W4: 1M tokens, one kv group)."""
    g = _gen(seed)
    group = H // kv_heads
    c = torch.randn(B, kv_heads, centers, D, generator=g) * center_std

    def draw(cent, n):
        runs = torch.randint(0, centers, (B, cent.shape[1], n // run + 1), generator=g)
        ids = runs.repeat_interleave(run, -1)[..., :n]
        x = torch.gather(cent, 2, ids[..., None].expand(B, cent.shape[1], n, D))
        return x + noise_std * torch.randn(B, cent.shape[1], n, D, generator=g)

    q = draw(c.repeat_interleave(group, 1), N)
    k = draw(c, N)
    v = torch.randn(B, kv_heads, N, D, generator=g)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


WORKLOADS["clustered_gqa"] = clustered_gqa_qkv
