"""The plain-torch reference: exact at eps = 0, certified at eps > 0 (float64, CPU)."""

import itertools

import pytest
import torch

from aether_compile.kernels.reference import dropped_mass, reference_attention
from aether_compile.workloads import WORKLOADS

from tests.helpers import SMALL_WORKLOAD_KW, dense_oracle, make_mask, rel_err

SHAPES = [(1, 1), (63, 63), (113, 113), (113, 77), (77, 113), (1023, 1023)]


@pytest.mark.parametrize("L,S", SHAPES, ids=[f"L{l}-S{s}" for l, s in SHAPES])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "key_padding"])
def test_eps0_equals_dense(L, S, is_causal, mask_kind):
    g = torch.Generator().manual_seed(L * 7 + S)
    B, H, Hkv, D = 2, 4, 2, 16
    q = torch.randn(B, H, L, D, generator=g, dtype=torch.float64)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=torch.float64)
    v = torch.randn(B, Hkv, S, 24, generator=g, dtype=torch.float64)
    mask = make_mask(mask_kind, B, H, L, S, torch.float64)
    out, lse, kept = reference_attention(q, k, v, mask, is_causal, None, True, 0.0, 32, 32)
    ref = dense_oracle(q, k, v, mask, is_causal)
    assert rel_err(out, ref) < 1e-12
    assert kept.shape == (B, H, (L + 31) // 32, (S + 31) // 32)


CERT_CASES = list(itertools.product(sorted(WORKLOADS), [1e-3, 1e-2, 1e-1], [False, True]))


@pytest.mark.parametrize("workload,eps,is_causal", CERT_CASES,
                         ids=[f"{w}-eps{e:g}-{'causal' if c else 'full'}" for w, e, c in CERT_CASES])
def test_certificate_every_row(workload, eps, is_causal):
    """Every row's dropped softmax mass, recomputed exactly from `kept`, is <= eps."""
    worst = 0.0
    for seed in range(3):
        q, k, v = WORKLOADS[workload](1, 2, 512, 32, dtype=torch.float64, seed=seed,
                                      **SMALL_WORKLOAD_KW[workload])
        gqa = k.shape[1] != q.shape[1]
        out, lse, kept = reference_attention(q, k, v, None, is_causal, None, gqa, eps, 32, 32)
        dropped = dropped_mass(q, k, kept, 32, 32, is_causal=is_causal)
        assert float(dropped.max()) <= eps, (seed, float(dropped.max()))
        worst = max(worst, float(dropped.max()))
        # the output is the exact attention over the kept blocks, so its error is O(eps)
        ref = dense_oracle(q, k, v, None, is_causal)
        assert rel_err(out, ref) < 10 * eps
    if workload in ("clustered", "clustered_gqa") or (workload == "adversarial" and eps == 0.1):
        assert worst > eps / 100, "nothing was pruned: the certificate check would be vacuous"


def test_sparsity_happens_on_clustered_data():
    q, k, v = WORKLOADS["clustered"](1, 2, 2048, 64, dtype=torch.float64, run=128, centers=16)
    _, _, kept = reference_attention(q, k, v, None, False, None, False, 1e-2, 64, 64)
    assert kept.float().mean() < 0.8
