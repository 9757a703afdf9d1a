"""The dense/sparse choice of compiled graphs, decided from the previous call's sample.

A compiled model calls each attention site once per layer and step. Reading a sample's visit
count on the host in every call drains the GPU queue once per layer: on an H100, Llama with 8
layers at 16K tokens spent 9 of its 29 ms idle that way (benchmarks/results e2e_llama, 6fbac45).
So a site's choice lags by one call: each call starts an asynchronous copy of its sample's counts
and uses the newest counts that have already arrived. Only the first call of a site and shape
bucket reads at once. Either choice is correct (dense is exact, sparse is certified), so a stale
choice costs speed only; AETHER_DENSE_LAG=0 reads every call's own sample instead.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

MAX_SITES = 4096  # distinct (site, shape bucket) keys kept; a few recur in practice


@dataclass
class _Site:
    dense: bool | None = None  # the choice in force; None until the first counts arrive
    pending: list = field(default_factory=list)  # [(ready() -> bool, host counts)], oldest first


_SITES: dict = {}


def lag_enabled() -> bool:
    return os.environ.get("AETHER_DENSE_LAG", "1") != "0"


def shape_bucket(query, key) -> tuple:
    """Calls whose choice may be shared: same site, head layout and dtype, and sequence lengths
    in the same power-of-two bucket (under dynamic shapes every length would be a new key)."""
    B, H, L, D = query.shape
    S = key.shape[-2]
    return (B, H, key.shape[1], D, 1 << max(L - 1, 0).bit_length(),
            1 << max(S - 1, 0).bit_length(), query.dtype, query.device)


def choose_dense(site_key, counts: torch.Tensor | None, fraction: float,
                 lagged: bool = True) -> bool:
    """Whether this call runs dense. counts: int64[2] (certified visits, live blocks) of this
    call's sample on its device, or None where it cannot be read (CUDA-graph capture: the last
    choice in force, else sparse). Not lagged, or the first call of ``site_key``: reads counts now.
    Otherwise copies them to the host without waiting and decides from the newest counts that
    have arrived."""
    site = _SITES.get(site_key)
    if counts is None:
        return bool(site is not None and site.dense)
    if site is None:
        if len(_SITES) >= MAX_SITES:
            _SITES.clear()
        site = _SITES[site_key] = _Site()
    if not lagged or site.dense is None:
        site.pending.clear()
        site.dense = _exceeds(counts.tolist(), fraction)
        return site.dense
    while site.pending and site.pending[0][0]():
        _, host = site.pending.pop(0)
        site.dense = _exceeds(host.tolist(), fraction)
    site.pending.append(_copy_to_host(counts))
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
