"""Decode sites: SDPA of a few query rows against a KV cache that the same graph writes.

transformers' static cache (``cache_implementation="static"``) writes each step's keys with
``cache.index_copy_(2, cache_position, k)`` on a graph input and attends over the whole cache
(through ``repeat_kv`` or ``enable_gqa``) with a mask that hides the unwritten tail. Such a site
becomes ``aether::decode_attention`` on the cache itself, and the key write becomes
``aether::key_cache_index_copy_``, which keeps the cache's key summary in step
(``aether_compile/kv_cache.py``). Key writes feeding prefill sites of the same cache are rewritten
too, so that every write of a cache in compiled code, CUDA-graph replays included, updates its
summary.

transformers' default dynamic cache instead grows by ``torch.cat([past, new], dim=-2)`` each
step, ``past`` a graph input: the key concatenation becomes ``aether::key_cache_cat``, which hands
``past``'s summary on to the grown cache, and the site decodes against the concatenations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.fx import GraphModule, Node

from aether_compile._compat import size_hint

from .build import Builder, check_replacement, erase_dead, rolled_back_on_failure
from .common import AttentionMatch, build_scale
from .site import Decline
from .spellings import ev


@dataclass
class CacheSite:
    key_cache: Node  # the key cache [B, Hkv, S, D]: a graph input, or the concatenation below
    value_cache: Node
    key_writes: list  # the index_copy_ nodes writing key_cache at sequence positions
    grows_by_cat: bool = False  # key_cache is torch.cat([past keys, new keys], dim=-2)


def _cache_input(node: Node) -> bool:
    return node.op in ("placeholder", "get_attr")


def _sequence_writes(cache: Node) -> list:
    """``cache.index_copy_(2 or -2, index, source)`` nodes on ``cache``."""
    out = []
    for user in cache.users:
        if user.op == "call_method" and user.target == "index_copy_" and user.args[0] is cache:
            dim = user.args[1] if len(user.args) > 1 else user.kwargs.get("dim")
            if dim in (2, -2):
                out.append(user)
    return out


def _grown_cache(node: Node) -> bool:
    """``torch.cat([past, new], dim=-2)`` with ``past`` a graph input: a cache that grows by
    concatenation each step (transformers' dynamic cache)."""
    if node.op != "call_function" or node.target is not torch.cat:
        return False
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    return (isinstance(tensors, (list, tuple)) and len(tensors) == 2 and dim in (2, -2)
            and isinstance(tensors[0], Node) and _cache_input(tensors[0])
            and ev(node).dim() == 4)


def cache_site(m: AttentionMatch) -> Optional[CacheSite]:
    """The caches an SDPA site reads: graph inputs the graph writes in place at sequence
    positions (static cache), or concatenations of graph inputs with the step's keys and values
    (dynamic cache); else None."""
    if m.pattern != "sdpa" or m.k.perm is not None or m.k.transpose or m.v.perm is not None \
            or m.v.transpose or m.k.heads or m.v.heads:
        return None
    k, v = m.k.node, m.v.node
    if _grown_cache(k) and _grown_cache(v):
        return CacheSite(k, v, [], grows_by_cat=True)
    if not (_cache_input(k) and _cache_input(v)):
        return None
    writes = _sequence_writes(k)
    if not writes or not _sequence_writes(v):
        return None
    return CacheSite(k, v, writes)


def rewrite_key_cat(gm: GraphModule, site: CacheSite) -> None:
    """The key concatenation -> ``aether::key_cache_cat``, which hands the past keys' summary on
    to the grown cache."""
    node = site.key_cache
    past, new = node.args[0] if node.args else node.kwargs["tensors"]
    b = Builder(gm.graph, node, node, [ev(node)])
    with rolled_back_on_failure(b, "key concatenation rewrite"):
        grown = b.fn(torch.ops.aether.key_cache_cat.default, past, new)
        check_replacement(ev(node), ev(grown), "key_cache_cat")
    node.replace_all_uses_with(grown)
    gm.graph.erase_node(node)
    site.key_cache = grown


def decode_problem(m: AttentionMatch) -> Optional[Decline]:
    """Why a cache site is not a decode site (then it is prefill, handled as any SDPA)."""
    from aether_compile.kv_cache import MAX_DECODE_ROWS

    q = m.q.value()
    rows = size_hint(q.shape[-2])
    if q.dim() != 4 or rows is None or not isinstance(q.shape[-2], int) \
            or rows > MAX_DECODE_ROWS:
        return Decline("pattern", f"{q.shape[-2]} query rows: prefill")
    for mv in m.mask_values:
        if mv.dim() == 4 and mv.shape[1] != 1:
            return Decline("mask", "per-head mask on a decode site")
    return None


def rewrite_key_writes(gm: GraphModule, site: CacheSite) -> None:
    """Each ``key_cache.index_copy_(2, index, source)`` -> ``aether::key_cache_index_copy_``;
    the first write of the cache in the graph is told of AOTAutograd's version bump."""
    for i, node in enumerate(sorted(site.key_writes, key=_order(gm))):
        if node._erased:
            continue
        cache, dim, index, source = (list(node.args) + [None] * 4)[:4]
        index = index if index is not None else node.kwargs.get("index")
        source = source if source is not None else node.kwargs.get("source")
        b = Builder(gm.graph, node, node, [ev(cache)])
        b.fn(torch.ops.aether.key_cache_index_copy_.default, cache, 2, index, source,
             1 if i == 0 else 0)
        node.replace_all_uses_with(cache)  # index_copy_ returns its (now written) self
        gm.graph.erase_node(node)
    site.key_writes.clear()


def _order(gm: GraphModule):
    position = {n: i for i, n in enumerate(gm.graph.nodes)}
    return lambda n: position[n]


# Where the size rules apply: the host and launch costs they stand for are CUDA's. (The CPU's
# certified path exists for tests, which add "cpu" to see the rules act on a real compile.)
SIZE_RULE_DEVICES = ("cuda",)


def exact_reason(site: CacheSite, options) -> Optional[str]:
    """Why a decode site compiles exact (SDPA on the cache, or ``aether::exact_decode_attention``:
    no key summary, key writes left as the model wrote them, inside CUDA graphs), or None where
    it is certified. At eps = 0 nothing reads a summary. On CUDA, a static cache too small for a
    certified step to pay (``dense_policy.decode_exact_reason``: every call would run dense, or
    its dense read is shorter than the certified ops' host time a step waits on) compiles exact
    too; a dynamic cache's (symbolic length) by its bytes alone, as a guard. AETHER_STATIC_DENSE=0
    turns the size rules off, as it does for prefill."""
    if options.eps is not None and options.eps <= 0:
        return "eps 0"
    from aether_compile import dense_policy

    k, v = ev(site.key_cache), ev(site.value_cache)
    if k.device.type not in SIZE_RULE_DEVICES:
        return None
    row_bytes = k.shape[-1] * k.element_size() + v.shape[-1] * v.element_size()
    return dense_policy.decode_exact_reason(*k.shape[:3], row_bytes)


def _fused_sdpa_takes(q: Node, site: CacheSite, mask: Optional[Node]) -> bool:
    """Whether one of SDPA's fused CUDA kernels takes the exact site as it will run: the query
    heads of a GQA group against the cache itself (``enable_gqa``) with the model's mask. Then
    the site stays SDPA, on the cache instead of ``repeat_kv``'s copies, and Inductor calls that
    kernel straight from the graph: no Python at run time (a default-mode step waits on host
    time at every layer) and nothing CUDA graphs leave out. Else the exact op does it."""
    from aether_compile._compat import sdpa_fused_takes

    qv, k, v = ev(q), ev(site.key_cache), ev(site.value_cache)
    if qv.device.type != "cuda":
        return False
    return sdpa_fused_takes(qv, k, v, None if mask is None else ev(mask),
                            qv.shape[1] != k.shape[1])


def keeps_summaries(site: CacheSite, options) -> bool:
    """Whether a decode site of ``site``'s cache compiled with ``options`` reads key summaries
    (so its key writes keep them): not where it is exact (``exact_reason``)."""
    return exact_reason(site, options) is None


def apply_decode(gm: GraphModule, m: AttentionMatch, site: CacheSite, options) -> Optional[str]:
    """Replace the SDPA with ``aether::decode_attention`` on the caches themselves (the
    ``repeat_kv`` copies die) and route the key writes through the summary-keeping op; where
    ``exact_reason`` says so, with ``aether::exact_decode_attention``, leaving the writes alone.
    Returns that reason, or None for a certified site."""
    exact = exact_reason(site, options)
    certified = exact is None
    if site.grows_by_cat and certified:
        rewrite_key_cat(gm, site)
    b = Builder(gm.graph, m.replace, m.anchor, [m.q.value(), ev(m.replace)])
    with rolled_back_on_failure(b, "decode rewrite"):
        q = m.q.build(b)
        scale = build_scale(b, m.scale, m.scale_nodes)
        mask = m.mask(b)
        if certified:
            out = b.fn(torch.ops.aether.decode_attention.default, q, site.key_cache,
                       site.value_cache, mask, bool(m.is_causal), scale, options.eps)
        elif _fused_sdpa_takes(q, site, mask):
            gqa = ev(q).shape[1] != ev(site.key_cache).shape[1]  # as sdpa_fused_takes asked
            out = b.fn(torch.nn.functional.scaled_dot_product_attention, q, site.key_cache,
                       site.value_cache, attn_mask=mask, is_causal=bool(m.is_causal),
                       scale=scale, enable_gqa=gqa)
        else:
            out = b.fn(torch.ops.aether.exact_decode_attention.default, q, site.key_cache,
                       site.value_cache, mask, bool(m.is_causal), scale)
        check_replacement(ev(m.replace), ev(out), "decode")
    m.replace.replace_all_uses_with(out)
    erase_dead(gm.graph, [m.replace, *reversed(m.visited)])
    if certified:
        rewrite_key_writes(gm, site)
    return exact
