"""Dense attention on SDPA's fused kernels (cuDNN, flash) with its log-sum-exp: what a call
runs when the dense choice says so. Which calls they compute exactly, which one SDPA itself would
pick, and whether they read GQA's k and v without expanding them."""

from __future__ import annotations

import torch

from .forward import as_out_layout


def dense_eligible(query, key, value, attn_mask, is_causal: bool) -> bool:
    """Whether a dense SDPA kernel computes exactly this call: fp16/bf16 on CUDA, no mask, causal
    only for L <= S (``causal_keys``), flash-compatible head dims. GQA is
    served natively where the kernel checks out, else from expanded k and v
    (``dense_sdpa_with_lse``).
    Static metadata only, so it is safe to ask while tracing."""
    return attn_mask is None and dense_kernel_fits(query, key, value, is_causal)


def dense_kernel_fits(query, key, value, is_causal: bool) -> bool:
    L, S = query.shape[-2], key.shape[-2]
    D, DV = query.shape[-1], value.shape[-1]
    return (query.device.type == "cuda" and query.dtype in (torch.float16, torch.bfloat16)
            and D == DV and D % 8 == 0 and D <= 256 and (not is_causal or L <= S))


def causal_keys(query, key, value, is_causal: bool):
    """(key, value) a dense kernel should see. SDPA's is_causal is top-left (row i sees keys
    j <= i), but flash aligns a causal mask bottom-right when L != S. For L < S no row sees a key
    past L - 1, so attention over the first L keys with L == L is the same call, in every
    backend's alignment (a static cache's prefill: a 32K prompt in a cache of 32K + 256)."""
    L, S = query.shape[-2], key.shape[-2]
    if is_causal and L < S:
        return key[..., :L, :], value[..., :L, :]
    return key, value


def sdpa_picks_cudnn(query, key, value, is_causal: bool, scale: float) -> bool:
    """Whether SDPA's own dispatcher would run cuDNN here: the choice Inductor's default compile
    bakes into a traced graph. SDPA asks its CUDA selector directly (from tensor metadata), so this
    does too: through the dispatcher, traced (functional, fake) tensors reach the meta kernel, which
    answers "math". False if it cannot say."""
    from torch.nn.attention import SDPBackend

    op = torch.ops.aten._fused_sdp_choice.default
    args = (query, key, value, None, 0.0, is_causal)
    for call in (lambda: op.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *args,
                                       scale=scale),
                 lambda: op(*args, scale=scale)):
        try:
            return int(call()) == int(SDPBackend.CUDNN_ATTENTION)
        except Exception:  # noqa: BLE001  (an old build, symbolic sizes: try the next, else flash)
            continue
    return False


def _flash_sdpa(query, key, value, is_causal: bool, scale: float):
    return torch.ops.aten._scaled_dot_product_flash_attention(
        query, key, value, 0.0, is_causal, False, scale=scale)


def _cudnn_sdpa(query, key, value, is_causal: bool, scale: float, with_lse: bool = True):
    return torch.ops.aten._scaled_dot_product_cudnn_attention(
        query, key, value, None, with_lse, 0.0, is_causal, False, scale=scale)


def dense_sdpa_with_lse(query, key, value, is_causal: bool, scale: float, try_cudnn=True):
    """Dense attention and its natural-log log-sum-exp from the fastest SDPA kernel available
    (cuDNN, then flash), for inputs where ``dense_eligible`` holds; None if neither runs.

    try_cudnn: True tries cuDNN and falls back on a RuntimeError (eager, where the error can be
    caught); "if_sdpa_picks" (traced graphs, where it cannot) uses cuDNN only where SDPA's own
    dispatcher would, else flash. GQA (fewer kv heads): the kernel reads k and v as they are where
    ``_native_gqa`` has checked that it can, else they are expanded first (a copy)."""
    res = _fastest_dense(query, key, value, is_causal, scale, try_cudnn, with_lse=True)
    if res is None:
        return None
    B, H, L, _ = query.shape
    return as_out_layout(res[0], query), res[1].reshape(B, H, L).float().contiguous()


def dense_sdpa(query, key, value, is_causal: bool, scale: float, with_lse: bool):
    """The output alone of ``dense_sdpa_with_lse``'s kernel (eager), in the kernel's own layout, or
    None. Without ``with_lse`` cuDNN skips the log-sum-exp (1.5 % of its time at 16K tokens, D 64,
    H200), which only its backward needs; autograd goes through the ATen kernel's own formula."""
    res = _fastest_dense(query, key, value, is_causal, scale, True, with_lse)
    return None if res is None else res[0]


def _fastest_dense(query, key, value, is_causal: bool, scale: float, try_cudnn, with_lse: bool):
    group = query.shape[1] // key.shape[1]
    key, value = causal_keys(query, key, value, is_causal)
    expanded = None
    if try_cudnn == "if_sdpa_picks":  # asked as the default compile asks: with k, v expanded
        if group > 1:
            expanded = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
        try_cudnn = sdpa_picks_cudnn(query, *(expanded or (key, value)), is_causal, scale)
    for run in ((_cudnn_sdpa, _flash_sdpa) if try_cudnn else (_flash_sdpa,)):
        kv = (key, value)
        if group > 1 and not _native_gqa(run, query, group):
            if expanded is None:  # query head h reads kv head h // group, as SDPA's enable_gqa
                expanded = key.repeat_interleave(group, 1), value.repeat_interleave(group, 1)
            kv = expanded
        try:
            if run is _cudnn_sdpa:
                return run(query, *kv, is_causal, scale, with_lse)
            return run(query, *kv, is_causal, scale)
        except RuntimeError:  # backend unavailable for these inputs / this build
            continue
    return None


def cudnn_unmasked(query, key, value, scale: float):
    """cuDNN's attention output without a mask, reading k and v as they are (GQA natively, never
    a copy), or None where cuDNN does not run it. For decode: SDPA's dispatcher picks flash there
    even with cuDNN put first, and cuDNN was as fast or faster at every decode shape measured."""
    group = query.shape[1] // key.shape[1]
    if query.device.type != "cuda" or query.shape[1] % key.shape[1] \
            or (group > 1 and not _native_gqa(_cudnn_sdpa, query, group)):
        return None
    try:
        return _cudnn_sdpa(query, key, value, False, scale)[0]
    except RuntimeError:  # cuDNN unavailable for these inputs / this build
        return None


_NATIVE_GQA: dict = {}


def _native_gqa(run, query, group: int) -> bool:
    """Whether SDPA kernel ``run`` computes GQA from unexpanded k and v here. Checked once per
    kernel, device, dtype, head dim and group on a small problem against the expanded call, since
    a backend without a head-count check could read the wrong heads silently. Never while
    tracing or capturing a CUDA graph (then: expand)."""
    from torch._subclasses.fake_tensor import is_fake

    D = query.shape[-1]
    key = (run.__name__, query.device, query.dtype, D, group)
    if key not in _NATIVE_GQA:
        if is_fake(query) or torch.cuda.is_current_stream_capturing():
            return False
        gen = torch.Generator(device=query.device).manual_seed(0)
        q = torch.randn(1, 2 * group, 256, D, generator=gen, device=query.device).to(query.dtype)
        k, v = (torch.randn(1, 2, 256, D, generator=gen, device=query.device).to(query.dtype)
                for _ in range(2))
        try:
            native = run(q, k, v, False, D ** -0.5)
            expanded = run(q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), False,
                           D ** -0.5)
            ok = all(torch.allclose(a.float(), b.float(), atol=1e-3, rtol=1e-3)
                     for a, b in zip(native[:2], expanded[:2]))
        except RuntimeError:
            ok = False
        _NATIVE_GQA[key] = ok
    return _NATIVE_GQA[key]
