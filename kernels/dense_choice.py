"""The dense/sparse choice of compiled graphs, decided from an earlier call's sample.

A compiled model calls each attention site once per layer and step. Sampling and reading on every
call cost too much on an H100 (benchmarks/results/logs/host_e2e_lag_*.txt): the read drains the
GPU queue once per layer, and issuing the sample's plan and count from Python takes about 0.5 ms
of host time (2.3 ms before eager launches skipped wrap_triton's op), against 1.2 ms for cuDNN at
16K tokens. Llama with 8 layers at 16K and no mask ran at 0.87x Inductor that way and 0.95x with
the lagged choice. So a site samples on its first call and then every 16th call
(``resample_every``); the counts travel to the host without a wait and decide the calls after they
arrive. Only a site's first call reads at once. Either choice is correct (dense is exact, sparse is certified), so a
stale choice costs speed only. AETHER_DENSE_LAG=0 samples and reads every call instead;
AETHER_DENSE_RESAMPLE sets the period."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

MAX_SITES = 4096  # distinct (site, shape bucket) keys kept; a few recur in practice


@dataclass
class _Site:
    dense: bool | None = None  # the choice in force; None until the first counts arrive
    calls: int = 0  # calls since the first
    pending: list = field(default_factory=list)  # [(ready() -> bool, host counts)], oldest first


_SITES: dict = {}


def lag_enabled() -> bool:
    return os.environ.get("AETHER_DENSE_LAG", "1") != "0"


def resample_every() -> int:
    return max(1, int(os.environ.get("AETHER_DENSE_RESAMPLE", "16")))


def shape_bucket(query, key) -> tuple:
    """Calls whose choice may be shared: same site, head layout and dtype, and sequence lengths
    in the same power-of-two bucket (under dynamic shapes every length would be a new key)."""
    B, H, L, D = query.shape
    S = key.shape[-2]
    return (B, H, key.shape[1], D, 1 << max(L - 1, 0).bit_length(),
            1 << max(S - 1, 0).bit_length(), query.dtype, query.device)


def choose_dense(site_key, sample, fraction: float, lagged: bool = True) -> bool:
    """Whether this call runs dense. sample: ``() -> int64[2]`` (certified visits, live blocks)
    of a sample of this call's rows on its device, issued without a host read; None where the
    device cannot be read (CUDA-graph capture: the choice in force is kept, else sparse).

    Not lagged, or the first call of ``site_key``: samples and reads at once. Otherwise samples
    every ``resample_every()``-th call, copies the counts to the host without waiting, and uses
    the newest counts that have arrived."""
    site = _SITES.get(site_key)
    if sample is None:
        return bool(site is not None and site.dense)
    if site is None:
        if len(_SITES) >= MAX_SITES:
            _SITES.clear()
        site = _SITES[site_key] = _Site()
    if not lagged or site.dense is None:
        site.pending.clear()
        site.dense = _exceeds(sample().tolist(), fraction)
        return site.dense
    while site.pending and site.pending[0][0]():
        _, host = site.pending.pop(0)
        site.dense = _exceeds(host.tolist(), fraction)
    site.calls += 1
    if site.calls % resample_every() == 0:
        site.pending.append(_copy_to_host(sample()))
        del site.pending[:-4]  # never more than a few in flight; older ones are superseded anyway
    return site.dense


def _exceeds(counts, fraction: float) -> bool:
    visit, live = counts
    return live > 0 and visit > fraction * live


def _copy_to_host(counts: torch.Tensor):
    """(ready, host): a non-blocking device-to-host copy and whether it has landed."""
    if counts.device.type != "cuda":
        return (lambda: True), counts.clone()
    host = torch.empty(counts.shape, dtype=counts.dtype, pin_memory=True)
    host.copy_(counts, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return done.query, host


def forget() -> None:
    """Drop every site's state (tests; a model whose attention changed character)."""
    _SITES.clear()
