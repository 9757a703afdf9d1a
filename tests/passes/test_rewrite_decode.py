"""transformers ``generate`` under torch.compile, unmodified: with a static cache the decode
attention becomes aether::decode_attention and the key writes aether::key_cache_index_copy_
(both seen in Inductor's generated code), the key summary is built once per cache and then
updated in place, and the greedy tokens equal dense decoding's. CPU: the ops' reference (or,
under TRITON_INTERPRET=1, the Triton kernels through the interpreter)."""

from __future__ import annotations

import pytest
import torch

from aether_compile import kv_cache
from aether_compile._compat import run_and_get_code
from aether_compile.passes.rewrite import add_listener, remove_listener

transformers = pytest.importorskip("transformers")

ARCHS = {"llama": ("LlamaForCausalLM", "LlamaConfig", {}),
         "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
         "mistral": ("MistralForCausalLM", "MistralConfig", {"sliding_window": None})}
LAYERS = 2
NEW_TOKENS = 6


def _lm(arch):
    cls, cfg, extra = ARCHS[arch]
    torch.manual_seed(0)
    config = getattr(transformers, cfg)(
        vocab_size=128, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=1024,
        pad_token_id=0, **extra)
    config._attn_implementation = "sdpa"
    return getattr(transformers, cls)(config).eval()


def _prompt(B=2, L=80, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, :17] = 0  # left padding, as batched generation has
    return dict(input_ids=ids, attention_mask=mask)


@pytest.fixture(autouse=True)
def _fresh():
    torch._dynamo.reset()
    kv_cache.forget_summaries()
    kv_cache.STATS.clear()
    sites = []
    add_listener(sites.append)
    yield sites
    remove_listener(sites.append)
    torch._dynamo.reset()


def _generate(model, prompt, **kw):
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=NEW_TOKENS, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, **kw)
    return out.sequences, torch.stack(out.scores)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_static_cache_generate_decodes_through_the_summary(arch, _fresh):
    model = _lm(arch)
    prompt = _prompt()
    want_tokens, want_scores = _generate(model, prompt, cache_implementation="static")
    model.forward = torch.compile(model.forward, backend="aether",
                                  options={"allow_cpu": True, "eps": 1e-3, "decode": True})
    (tokens, scores), code = run_and_get_code(
        lambda: _generate(model, prompt, cache_implementation="static"))
    decode_sites = [s for s in _fresh if s.reason.startswith("decode")]
    assert len(decode_sites) == LAYERS and all(s.rewritten for s in decode_sites)
    generated = "\n".join(code)
    assert "torch.ops.aether.decode_attention" in generated
    assert "torch.ops.aether.key_cache_index_copy_" in generated
    assert torch.equal(tokens, want_tokens)
    assert (scores - want_scores).abs().max() < 1e-3 * want_scores.abs().max()
    # one summary per layer's key cache, at its first write; every later write updates it
    assert kv_cache.STATS["rebuilt"] == LAYERS and kv_cache.STATS["updated"] >= LAYERS * (NEW_TOKENS - 2), dict(kv_cache.STATS)

    if arch != "llama":
        return
    # a second prompt in the same model: transformers resets and reuses the cache buffers,
    # which the summaries notice (re-summarised, never trusted stale)
    prompt2 = _prompt(seed=1)
    kv_cache.STATS.clear()
    tokens2, _ = _generate(model, prompt2, cache_implementation="static")
    model2 = _lm(arch)
    want2, _ = _generate(model2, prompt2, cache_implementation="static")
    assert torch.equal(tokens2, want2)
    assert kv_cache.STATS["rebuilt"] + kv_cache.STATS["dropped"] >= LAYERS


@pytest.mark.parametrize("route", ["exact_op", "sdpa"])
@pytest.mark.parametrize("cache", ["static", "dynamic"])
def test_decode_at_eps_0_is_exact_and_keeps_no_summary(cache, route, _fresh, monkeypatch):
    """At eps = 0 nothing reads a key summary: the decode sites become exact attention on the
    cache itself (no repeat_kv copies, no state, so CUDA graphs capture it), the key writes and
    concatenations stay as the model wrote them, and no summary is ever built. The exact op
    does it, or, where one of SDPA's fused CUDA kernels takes GQA with the mask (on the CPU:
    made to say so), SDPA itself with enable_gqa, called from the graph."""
    from aether_compile.passes import decode

    if route == "sdpa":
        monkeypatch.setattr(decode, "_fused_sdpa_takes", lambda q, site, mask: True)
    model = _lm("llama")
    prompt = _prompt()
    kw = {"cache_implementation": "static"} if cache == "static" else {}
    want, want_scores = _generate(model, prompt, **kw)
    model.forward = torch.compile(model.forward, backend="aether",
                                  options={"allow_cpu": True, "eps": 0.0, "decode": True})
    (got, scores), code = run_and_get_code(lambda: _generate(model, prompt, **kw))
    generated = "\n".join(code)
    assert ("torch.ops.aether.exact_decode_attention" in generated) == (route == "exact_op")
    if route == "sdpa" and cache == "static":
        # SDPA's kernel reads the caches themselves (graph inputs), not repeat_kv's copies
        import re

        reads_cache = re.findall(r"aten\._scaled_dot_product_\w+\.default\(\w+, arg\d+_1, "
                                 r"arg\d+_1", generated)
        assert len(reads_cache) >= LAYERS, generated[-3000:]
    for op in ("decode_attention", "key_cache_index_copy_", "key_cache_cat"):
        assert f"torch.ops.aether.{op}" not in generated, op
    decode_sites = [s for s in _fresh if s.reason.startswith("decode")]
    assert decode_sites and all(s.rewritten and "exact" in s.reason for s in decode_sites)
    assert torch.equal(got, want)
    assert (scores - want_scores).abs().max() < 1e-4 * want_scores.abs().max()
    assert not kv_cache.STATS, dict(kv_cache.STATS)


def _without_static_launcher(monkeypatch):
    """Inductor's own kernels through Triton's launcher, not its static one: on torch 2.11 the
    static launcher segfaulted while CUDA graphs recorded this test's first graph partition
    (results/logs/gpu_fe46cc8/gpu_tests.txt; the default compile under reduce-overhead crashes
    the same way there), killing every test after it."""
    import torch._inductor.config as inductor_config

    if hasattr(inductor_config, "use_static_cuda_launcher"):
        monkeypatch.setattr(inductor_config, "use_static_cuda_launcher", False)


@pytest.mark.gpu
def test_static_cache_generate_under_cuda_graphs_checks_every_step(_fresh, monkeypatch):
    """With Inductor's CUDA graphs (what mode="reduce-overhead" turns on) the rest of each step
    replays from graphs while the decode ops run their Python every step, between two graphs:
    every key write updates the summary (counted per step, so the checks ran), a second prompt
    in the same buffers is noticed, and the tokens equal dense decoding's."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("AETHER_STATIC_DENSE", "0")  # a tiny cache: else left dense or exact
    _without_static_launcher(monkeypatch)

    model = _lm("llama").cuda().half()
    prompt = {k: v.cuda() for k, v in _prompt().items()}
    want, want_scores = _generate(model, prompt, cache_implementation="static")
    model.forward = torch.compile(
        model.forward, backend="aether",
        options={"eps": 1e-3, "decode": True, "triton.cudagraphs": True})
    counters.clear()
    for _ in range(3):  # warm-up, capture, replay
        kv_cache.STATS.clear()
        got, scores = _generate(model, prompt, cache_implementation="static")
        assert torch.equal(got, want)
        assert (scores - want_scores).abs().max() < 2e-2 * want_scores.abs().max()
    # the last generate replayed: its writes still went through the op's Python, one per layer
    # and decode step (the prompt's own write too), each finding its summary current or, the
    # first after transformers reset the buffers, re-summarising
    assert kv_cache.STATS["updated"] >= LAYERS * (NEW_TOKENS - 1), dict(kv_cache.STATS)
    assert kv_cache.STATS["rebuilt"] + kv_cache.STATS["dropped"] >= LAYERS, dict(kv_cache.STATS)
    assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
    prompt2 = {k: v.cuda() for k, v in _prompt(seed=1).items()}
    want2, _ = _generate(_lm("llama").cuda().half(), prompt2, cache_implementation="static")
    got2, _ = _generate(model, prompt2, cache_implementation="static")
    assert torch.equal(got2, want2)


@pytest.mark.gpu
def test_exact_decode_stays_inside_cuda_graphs(_fresh, monkeypatch):
    """At eps = 0 the decode op carries no cudagraph_unsafe tag: Inductor's CUDA graphs split no
    step around it (fewer graph partitions than at eps > 0, whose ops run between graphs), and
    the tokens equal dense decoding's."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("AETHER_STATIC_DENSE", "0")  # a tiny cache: else left dense or exact
    _without_static_launcher(monkeypatch)

    model = _lm("llama").cuda().half()
    forward = model.forward
    prompt = {k: v.cuda() for k, v in _prompt().items()}
    want, _ = _generate(model, prompt, cache_implementation="static")
    partitions = {}
    for eps in (0.0, 1e-3):
        torch._dynamo.reset()
        counters.clear()
        model.forward = torch.compile(forward, backend="aether", options={
            "eps": eps, "decode": True, "triton.cudagraphs": True})
        for _ in range(3):  # warm-up, capture, replay
            got, _ = _generate(model, prompt, cache_implementation="static")
            assert torch.equal(got, want), eps
        assert not counters["inductor"]["cudagraph_skips"], dict(counters["inductor"])
        partitions[eps] = counters["inductor"]["cudagraph_partitions"]
    if not partitions[1e-3]:
        pytest.skip(f"torch {torch.__version__} counts no CUDA graph partitions")
    assert partitions[0.0] < partitions[1e-3], partitions


def _cache_site(B, Hkv, S, device="cuda", D=64):
    """A decode site's CacheSite whose key cache node carries a fake [B, Hkv, S, D] bf16 cache
    on ``device`` (fake tensors need no GPU)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from aether_compile.passes import decode

    graph = torch.fx.Graph()
    k, v = graph.placeholder("k"), graph.placeholder("v")
    with FakeTensorMode():
        for node in (k, v):
            node.meta["val"] = torch.empty(B, Hkv, S, D, device=device, dtype=torch.bfloat16)
    return decode.CacheSite(k, v, [])


def test_a_static_cache_too_small_to_pay_compiles_to_the_exact_op(monkeypatch):
    """A CUDA static cache's decode site is exact where a certified site cannot pay: below the
    cached key rows (batch x KV heads x keys) where a certified call ever beats dense
    (kv_cache.decode_dense_fraction is 0), and below the K and V bytes whose dense read takes
    longer than the certified ops' host time a step waits on (DECODE_HOST_BOUND_BYTES). The
    exact route keeps no summary and stays inside CUDA graphs. Larger caches, the CPU (the
    interpreter's tests), eps = 0, AETHER_DENSE_FRACTION and AETHER_STATIC_DENSE=0 as stated."""
    from aether_compile import dense_policy
    from aether_compile.options import AetherOptions
    from aether_compile.passes import decode

    monkeypatch.delenv("AETHER_STATIC_DENSE", raising=False)
    monkeypatch.delenv("AETHER_DENSE_FRACTION", raising=False)
    certified, exact0 = AetherOptions(eps=1e-2, decode=True), AetherOptions(eps=0.0, decode=True)
    small = _cache_site(1, 2, 33024)  # batch 1 of the long LM: 66K rows
    assert kv_cache.decode_dense_fraction(1, 2, 33024) == 0.0
    reason = decode.exact_reason(small, certified)
    assert reason is not None and "66048 cached key rows" in reason
    assert not decode.keeps_summaries(small, certified)
    # batch 8 of the long LM: 528K rows, where a certified call can beat dense, but 129 MiB of
    # K and V, read in far less time than the certified ops' Python adds to the step
    host_bound = _cache_site(8, 2, 33024)
    assert kv_cache.decode_dense_fraction(8, 2, 33024) > 0
    reason = decode.exact_reason(host_bound, certified)
    assert reason is not None and "host time" in reason and "129 MiB" in reason, reason
    assert not decode.keeps_summaries(host_bound, certified)
    # the anchor (GQA 32/8, D 128, batch 8, 32K keys): 1 GiB, still under the host time
    assert "1024 MiB" in decode.exact_reason(_cache_site(8, 8, 32768, D=128), certified)
    # batch 32 at 128K keys: 16 GiB, 4.9 ms to read on an H100: certified
    large = _cache_site(32, 8, 131072, D=128)
    assert 32 * 8 * 131072 * 2 * 128 * 2 >= dense_policy.DECODE_HOST_BOUND_BYTES
    assert decode.exact_reason(large, certified) is None
    assert decode.keeps_summaries(large, certified)
    assert decode.exact_reason(large, AetherOptions(decode=True)) is None  # the dtype's eps
    assert decode.exact_reason(large, exact0) == "eps 0"
    assert decode.exact_reason(_cache_site(1, 2, 33024, device="cpu"), certified) is None
    # a fraction set by hand, even the size's own, leaves the choice to the run time
    for by_hand in ("0.5", "off", str(kv_cache.decode_dense_fraction(8, 2, 33024))):
        monkeypatch.setenv("AETHER_DENSE_FRACTION", by_hand)
        assert decode.exact_reason(small, certified) is None
        assert decode.exact_reason(host_bound, certified) is None
    monkeypatch.delenv("AETHER_DENSE_FRACTION")
    monkeypatch.setenv("AETHER_STATIC_DENSE", "0")
    assert decode.exact_reason(small, certified) is None
    assert decode.exact_reason(host_bound, certified) is None


@pytest.mark.gpu
def test_a_static_cache_too_small_to_pay_is_exact_on_the_gpu(_fresh):
    """Compiled on CUDA, a static cache of 64K cached key rows (large enough not to be left as
    written, too small for skipping to pay) decodes through the exact op: no key summary, the
    write left as index_copy_, the output SDPA's."""
    import torch.nn.functional as F

    def step(q, k_cache, v_cache, pos, k_new, v_new, mask):
        k_cache.index_copy_(2, pos, k_new)
        v_cache.index_copy_(2, pos, v_new)
        return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=mask,
                                              enable_gqa=True)

    B, Hq, Hkv, S, D = 1, 32, 8, 8192, 128  # K and V: 32 MiB, DECODE_MIN_CACHE_BYTES
    g = torch.Generator(device="cuda").manual_seed(0)
    k, v = (torch.randn(B, Hkv, S, D, device="cuda", dtype=torch.float16, generator=g)
            for _ in range(2))
    q, k_new, v_new = (torch.randn(B, h, 1, D, device="cuda", dtype=torch.float16, generator=g)
                       for h in (Hq, Hkv, Hkv))
    pos = torch.tensor([5000], device="cuda")
    mask = (torch.arange(S, device="cuda") <= 5000).expand(B, 1, 1, S)
    compiled = torch.compile(step, backend="aether", options={"eps": 1e-2, "decode": True})
    k2, v2 = k.clone(), v.clone()
    with torch.no_grad():
        got, code = run_and_get_code(compiled, q, k, v, pos, k_new, v_new, mask)
    want = step(q.double(), k2.double(), v2.double(), pos, k_new.double(), v_new.double(), mask)
    generated = "\n".join(code)
    # exact: SDPA's own fused kernel on the cache where one takes GQA with the mask (called
    # from the graph), else the exact op; neither certified op, nor the summary-keeping write
    assert ("torch.ops.aether.exact_decode_attention" in generated
            or "scaled_dot_product" in generated)
    assert "torch.ops.aether.decode_attention" not in generated
    assert "torch.ops.aether.key_cache_index_copy_" not in generated
    sites = [s for s in _fresh if s.reason.startswith("decode")]
    assert sites and all("never pays at 65536 cached key rows" in s.reason for s in sites), sites
    assert torch.equal(k, k2.index_copy_(2, pos, k_new)) and not kv_cache.STATS
    assert (got.double() - want).abs().max() < 2e-3


def test_dynamic_cache_generate_matches_dense(_fresh):
    """Without decode=True the default cache's decode calls are ordinary SDPA sites
    (aether::attention), and the tokens still equal dense decoding's."""
    model = _lm("llama")
    prompt = _prompt()
    want, _ = _generate(model, prompt)
    model.forward = torch.compile(model.forward, backend="aether",
                                  options={"allow_cpu": True, "eps": 1e-3})
    got, _ = _generate(model, prompt)
    assert torch.equal(got, want)
    assert any(s.rewritten for s in _fresh)


def test_dynamic_cache_generate_decodes_through_the_grown_summary(_fresh):
    """The default cache grows by torch.cat each step: with decode=True the key concatenation
    becomes aether::key_cache_cat, which hands the summary on (a read of the new group only), and
    the decode calls aether::decode_attention on the concatenations; tokens equal dense decoding,
    also for a second prompt of the same shapes (whose freed caches' memory comes back)."""
    model = _lm("llama")
    prompt = _prompt()
    want, want_scores = _generate(model, prompt)
    model.forward = torch.compile(model.forward, backend="aether",
                                  options={"allow_cpu": True, "eps": 1e-3, "decode": True})
    (got, scores), code = run_and_get_code(lambda: _generate(model, prompt))
    generated = "\n".join(code)
    assert "torch.ops.aether.key_cache_cat" in generated
    assert "torch.ops.aether.decode_attention" in generated
    decode_sites = [s for s in _fresh if s.reason.startswith("decode")]
    assert decode_sites and all(s.rewritten for s in decode_sites)
    assert torch.equal(got, want)
    assert (scores - want_scores).abs().max() < 1e-3 * want_scores.abs().max()
    # each layer's cache summarised once (the first decode step), then handed on at every step
    assert kv_cache.STATS["rebuilt"] == LAYERS, dict(kv_cache.STATS)
    assert kv_cache.STATS["extended"] == LAYERS * (NEW_TOKENS - 2), dict(kv_cache.STATS)
    prompt2 = _prompt(seed=1)
    want2, _ = _generate(_lm("llama"), prompt2)
    got2, _ = _generate(model, prompt2)
    assert torch.equal(got2, want2)


def test_dynamic_cache_is_exact_until_it_grows_past_the_host_bound(_fresh, monkeypatch):
    """The default cache's length is symbolic after its second step: the host-time rule becomes a
    guard on the cache's bytes. Under the bound the sites compile exact (no summary, no
    key_cache_cat); once the cache grows past it the guard fails and the graph recompiles
    certified, which summarises the cache once and hands the summary on. Tokens equal dense
    decoding's throughout. (The rules act on CUDA only; the CPU is added here to see them.)"""
    from aether_compile import dense_policy
    from aether_compile.passes import decode

    monkeypatch.delenv("AETHER_STATIC_DENSE", raising=False)
    monkeypatch.delenv("AETHER_DENSE_FRACTION", raising=False)
    monkeypatch.setattr(decode, "SIZE_RULE_DEVICES", ("cuda", "cpu"))
    model = _lm("llama")
    prompt = _prompt()  # 80 tokens; decode steps see caches of 81 ... 85 keys
    want, want_scores = _generate(model, prompt)
    # K and V: batch 2 x 2 KV heads x (16 + 16) fp32 channels = 512 bytes a key: the bound
    # falls between the third and fourth decode steps (83 and 84 keys)
    monkeypatch.setattr(dense_policy, "DECODE_HOST_BOUND_BYTES", 512 * 84)
    model.forward = torch.compile(model.forward, backend="aether",
                                  options={"allow_cpu": True, "eps": 1e-3, "decode": True})
    (got, scores), code = run_and_get_code(lambda: _generate(model, prompt))
    reasons = [s.reason for s in _fresh if s.reason.startswith("decode")]
    assert any("never pays at 324 cached key rows" in r for r in reasons), reasons  # static S
    assert any("stay under 0 MiB (a guard" in r for r in reasons), reasons  # symbolic S
    assert any("exact" not in r for r in reasons), reasons  # recompiled certified past it
    generated = "\n".join(code)
    assert "torch.ops.aether.decode_attention" in generated
    assert torch.equal(got, want)
    assert (scores - want_scores).abs().max() < 1e-3 * want_scores.abs().max()
    # summarised once at the first certified step (84 keys), handed on at the next (85)
    assert kv_cache.STATS["rebuilt"] == LAYERS, dict(kv_cache.STATS)
    assert kv_cache.STATS["extended"] == LAYERS, dict(kv_cache.STATS)


def test_decode_is_opt_in(_fresh):
    """Without decode=True a static-cache decode site is an ordinary SDPA site: no summaries."""
    model = _lm("llama")
    prompt = _prompt()
    want, _ = _generate(model, prompt, cache_implementation="static")
    model.forward = torch.compile(model.forward, backend="aether",
                                  options={"allow_cpu": True, "eps": 1e-3})
    got, _ = _generate(model, prompt, cache_implementation="static")
    assert torch.equal(got, want)
    assert not any(s.reason.startswith("decode") for s in _fresh) and not kv_cache.STATS
