"""The lagged dense/sparse choice of compiled graphs (dense_policy.choose_dense) and the site
numbers it keys on. The GPU side (the choice inside a compiled graph, and under CUDA-graph
capture) is in test_inductor_gpu.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from aether_compile import ops
from aether_compile import dense_policy
from aether_compile.kernels import dense as kernel_dense

# Samples' (visits, live blocks): dense and sparse at fraction 0.6
DENSE, SPARSE = (lambda: torch.tensor([90, 100])), (lambda: torch.tensor([20, 100]))


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setenv("AETHER_DENSE_RESAMPLE", "1")  # every call samples (one test sets 4)
    dense_policy.forget_lagged_choices()
    yield
    dense_policy.forget_lagged_choices()


def test_first_call_decides_from_its_own_counts_then_lags_by_one():
    site = ("s",)
    assert dense_policy.choose_dense(site, DENSE, 0.6) is True  # read at once: no choice yet
    assert dense_policy.choose_dense(site, SPARSE, 0.6) is True  # the previous call's counts
    assert dense_policy.choose_dense(site, SPARSE, 0.6) is False
    assert dense_policy.choose_dense(site, DENSE, 0.6) is False
    assert dense_policy.choose_dense(site, DENSE, 0.6) is True


def test_without_lag_each_call_uses_its_own_counts():
    site = ("s",)
    for counts, dense in ((DENSE, True), (SPARSE, False), (DENSE, True)):
        assert dense_policy.choose_dense(site, counts, 0.6, lagged=False) is dense


def test_sites_keep_their_own_choices():
    assert dense_policy.choose_dense(("a",), DENSE, 0.6) is True
    assert dense_policy.choose_dense(("b",), SPARSE, 0.6) is False
    assert dense_policy.choose_dense(("a",), SPARSE, 0.6) is True
    assert dense_policy.choose_dense(("b",), DENSE, 0.6) is False


def test_unreadable_counts_keep_the_last_choice_else_sparse():
    """CUDA-graph capture passes no counts: the site's choice so far is captured, else sparse."""
    assert dense_policy.choose_dense(("new",), None, 0.6) is False
    dense_policy.choose_dense(("seen",), DENSE, 0.6)
    assert dense_policy.choose_dense(("seen",), None, 0.6) is True


def test_nothing_live_is_not_dense():
    assert dense_policy.choose_dense(("s",), lambda: torch.tensor([0, 0]), 0.6) is False


def test_a_site_resamples_every_nth_call(monkeypatch):
    monkeypatch.setenv("AETHER_DENSE_RESAMPLE", "4")
    sampled = []

    def sample():
        sampled.append(1)
        return torch.tensor([20, 100])

    choices = [dense_policy.choose_dense(("s",), sample, 0.6) for _ in range(9)]
    assert len(sampled) == 3  # the first call, then calls 4 and 8 after it
    assert choices == [False] * 9
    dense_policy.forget_lagged_choices()
    sampled.clear()
    choices = [dense_policy.choose_dense(("s",), DENSE if i == 0 else sample, 0.6)
               for i in range(6)]
    assert choices == [True] * 5 + [False]  # the sample of call 5 decides call 6


def test_shape_buckets_group_lengths_by_power_of_two():
    def bucket(L, S=None, H=4, dtype=torch.float16):
        q = torch.empty(1, H, L, 64, dtype=dtype)
        return dense_policy.shape_bucket(q, torch.empty(1, 2, S or L, 64, dtype=dtype))

    assert bucket(1000) == bucket(1024) != bucket(1025)
    assert bucket(1024, 4096) != bucket(1024)
    assert bucket(1024, H=8) != bucket(1024)
    assert bucket(1024, dtype=torch.bfloat16) != bucket(1024)


def test_traced_site_ids_count_from_zero_in_each_compile():
    """Sites are numbered in trace order per fake mode: the same model gets the same numbers in
    every compile and process (the FX graph cache keys on them), and eager calls get -1."""
    assert ops._traced_site_id(torch.empty(1)) == -1
    for _ in range(2):
        with FakeTensorMode() as mode:
            q = mode.from_tensor(torch.empty(1, 1, 8, 8))
            assert [ops._traced_site_id(q) for _ in range(3)] == [0, 1, 2]


def _qkv(L, S, B=1, H=2, D=64):
    """Fake CUDA fp16 inputs: the policy reads metadata only, and its rules differ on CUDA."""
    with FakeTensorMode():
        return tuple(torch.empty(B, H, n, D, device="cuda", dtype=torch.float16)
                     for n in (L, S, S))


def test_causal_with_fewer_queries_than_keys_is_dense_on_the_first_keys():
    """Top-left causal with L < S (a prompt prefilled into a longer static cache): no row sees a
    key past L - 1, so the dense kernels compute it from the first L keys as a square causal call
    (flash would align L != S bottom-right); L > S has no such form."""
    q, k, v = _qkv(256, 4096)
    assert kernel_dense.dense_eligible(q, k, v, None, True)
    assert not kernel_dense.dense_eligible(*_qkv(4096, 256), None, True)
    q, k, v = (torch.randn(1, 2, n, 16) for n in (3, 5, 5))
    keys, values = kernel_dense.causal_keys(q, k, v, True)
    assert torch.equal(keys, k[:, :, :3]) and torch.equal(values, v[:, :, :3])
    assert keys.data_ptr() == k.data_ptr()  # a view of the cache, no copy
    assert kernel_dense.causal_keys(q, k, v, False) == (k, v)  # not causal: every key counts
    causal = torch.ones(3, 5, dtype=torch.bool).tril()  # top-left, as SDPA's is_causal
    torch.testing.assert_close(
        F.scaled_dot_product_attention(q, keys, values, is_causal=True),
        F.scaled_dot_product_attention(q, k, v, attn_mask=causal))


def test_route_names_each_way_a_call_can_be_decided(monkeypatch):
    """The op's one question to the policy: static sizes first, then a sample of the rows (no
    mask), else the gate (compiled graphs, masked calls)."""
    monkeypatch.delenv("AETHER_DENSE_FRACTION", raising=False)
    monkeypatch.delenv("AETHER_STATIC_DENSE", raising=False)
    short = dense_policy.route(*_qkv(64, 64), None, False, block_n=64, twopass=True)
    assert short == dense_policy.Route(static_dense=True)
    q, k, v = _qkv(256, 4096)  # 64 key blocks: past the probe; work under 2**36: static dense
    assert dense_policy.route(q, k, v, None, False, 64, False).static_dense
    monkeypatch.setenv("AETHER_STATIC_DENSE", "0")
    sampled = dense_policy.route(q, k, v, None, False, 64, twopass=True)
    assert sampled == dense_policy.Route(False, dense_policy.DENSE_FRACTION, sample=True)
    with FakeTensorMode():
        mask = torch.empty(256, 4096, device="cuda", dtype=torch.bool)
        causal_mask = torch.empty(4096, 4096, device="cuda", dtype=torch.bool)
    routes = [dense_policy.route(q, k, v, mask, False, 64, twopass=t) for t in (True, False)]
    # L < S: might be top-left causal (a static cache's prefill), so compiled graphs gate
    assert [(r.sample, r.gate) for r in routes] == [(False, True), (False, False)]
    q3, k3, v3 = _qkv(8192, 4096)
    with FakeTensorMode():
        wide_mask = torch.empty(8192, 4096, device="cuda", dtype=torch.bool)
    past = dense_policy.route(q3, k3, v3, wide_mask, False, 64, twopass=True)
    assert (past.sample, past.gate) == (False, False)  # L > S: no causal kernel computes it
    q4, k4, v4 = _qkv(16, 8192)
    with FakeTensorMode():
        step_mask = torch.empty(16, 8192, device="cuda", dtype=torch.bool)
    draft = dense_policy.route(q4, k4, v4, step_mask, False, 64, twopass=True)
    assert (draft.static_dense, draft.gate) == (False, False)  # decode-shaped: no host read
    q2, k2, v2 = _qkv(4096, 4096)
    gate = dense_policy.route(q2, k2, v2, causal_mask, False, 64, twopass=True)
    assert (gate.sample, gate.gate) == (False, True)  # might be exactly causal: the gate checks
    eager = dense_policy.route(q2, k2, v2, causal_mask, False, 64, twopass=False)
    assert (eager.sample, eager.gate) == (False, False)  # eager: the op's own gate decides
    monkeypatch.setenv("AETHER_DENSE_FRACTION", "off")
    assert dense_policy.route(q, k, v, None, False, 64, True) == dense_policy.Route(False)
