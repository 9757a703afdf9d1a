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
