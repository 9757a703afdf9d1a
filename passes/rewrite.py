"""FX passes that find attention in captured graphs and rewrite it to ``torch.ops.aether.*``.

``rewrite_attention(gm, options)`` is the whole pass: one matcher per spelling family (``sdpa``,
``softmax``, ``mha``), shared checks that decline with a reason (``checks``), one rewrite routine
(``common.apply``). Every site found is counted in ``torch._dynamo.utils.counters["aether"]``,
logged on ``aether_compile.passes`` and handed to the listeners (``explain`` subscribes).
"""

from __future__ import annotations

import logging
from typing import Callable

from torch.fx import GraphModule

from aether_compile._compat import module_path, source_line

from . import decode, mha, sdpa, softmax
from .common import apply, check_common
from .site import DENSE, SPARSE, Decline, Site

log = logging.getLogger("aether_compile.passes")

MATCHERS = (sdpa, softmax, mha)
# Expected declines (by configuration, or dense is simply faster): logged at info level
_QUIET_CODES = ("device", "min_seq_len", "excluded", "short")
_listeners: list[Callable[[Site], None]] = []
_DONE = "aether_compile.rewritten"

__all__ = ["rewrite_attention", "Site", "Decline", "SPARSE", "DENSE", "add_listener",
           "remove_listener"]


def add_listener(fn: Callable[[Site], None]) -> None:
    _listeners.append(fn)


def remove_listener(fn: Callable[[Site], None]) -> None:
    if fn in _listeners:
        _listeners.remove(fn)


def _record(site: Site) -> None:
    from torch._dynamo.utils import counters

    counters["aether"][site.code] += 1
    counters["aether"]["sites"] += 1
    quiet = site.rewritten or site.code in _QUIET_CODES
    (log.info if quiet else log.warning)(
        "aether: %s %s at %s [%s]: %s", site.decision, site.pattern, site.module or "<top>",
        site.source, site.reason)
    for fn in list(_listeners):
        try:
            fn(site)
        except Exception:  # a listener must not break the compile either
            log.exception("aether: site listener %r failed", fn)


def _site_for(gm: GraphModule, node, matcher, options) -> Site | None:
    try:
        module, module_type = module_path(node)
        source = source_line(node)
    except Exception:  # metadata we could not read: the site is still handled
        module, module_type, source = "", "", ""
    where = dict(module=module, module_type=module_type, source=source, node=node.name)
    try:
        m = matcher.match(node)
        if m is None:
            return None
        if hasattr(m, "check"):  # matcher with its own replacement (mha)
            problem = m.check(options, module, module_type)
            if problem is not None:
                raise problem
            m.apply(gm, options)
        else:
            cache = decode.cache_site(m) if options.decode else None
            if cache is not None and decode.decode_problem(m) is None:
                problem = check_common(m, options, module, module_type, decode=True)
                if problem is not None:
                    raise problem
                exact = decode.apply_decode(gm, m, cache, options)
                exact = "" if exact is None else f", exact ({exact})"
                return Site(m.pattern, SPARSE, f"decode: kv cache, mask={m.mask_kind}{exact}",
                            "rewritten", **where)
            problem = check_common(m, options, module, module_type)
            if cache is not None and decode.keeps_summaries(cache, options) and (
                    problem is None or problem.code == "short"):
                # prefill of a cache that decode sites read: its writes keep the summary too
                decode.rewrite_key_writes(gm, cache)
            if problem is not None:
                raise problem
            apply(gm, m, options)
    except Decline as d:
        return Site(getattr(matcher, "PATTERN", matcher.__name__), DENSE, d.message, d.code, **where)
    except Exception as e:  # a bug in a matcher must never break the user's compile
        log.exception("aether: matcher %s failed on %s", matcher.__name__, node.name)
        return Site(getattr(matcher, "PATTERN", matcher.__name__), DENSE,
                    f"internal error: {type(e).__name__}: {e}", "internal_error", **where)
    desc = f"mask={m.mask_kind}" + (", gqa" if m.enable_gqa else "") + (
        f", scale={m.scale:.4g}" if m.scale is not None and not m.scale_nodes else "") + (
        ", symbolic scale" if getattr(m, "scale_nodes", None) else "")
    return Site(m.pattern, SPARSE, desc, "rewritten", **where)


def rewrite_attention(gm: GraphModule, options) -> list[Site]:
    """Rewrite every supported attention site of ``gm`` in place; return all sites found."""
    from aether_compile.options import AetherOptions

    options = AetherOptions.coerce(options)
    sites: list[Site] = []
    meta = getattr(gm, "meta", None)
    if isinstance(meta, dict):
        if meta.get(_DONE):  # backend="aether" inside enable(): the graph was already rewritten
            return sites
        meta[_DONE] = True
    try:
        anchors = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
        for node in anchors:
            if node._erased:
                continue
            for matcher in MATCHERS:
                site = _site_for(gm, node, matcher, options)
                if site is not None:
                    sites.append(site)
                    _record(site)
                    break
        if any(s.rewritten for s in sites):
            gm.graph.lint()
            gm.recompile()
    except Exception:  # leave whatever is consistent; compilation goes on
        log.exception("aether: pass failed; remaining attention left as is")
    return sites
