"""``attn_implementation="aether"`` for Hugging Face transformers, eager or compiled.

    import aether_compile, transformers
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="aether")

``register()`` adds ``aether`` to transformers' ``AttentionInterface`` (the attention call) and
``AttentionMaskInterface`` (the mask builder: SDPA's, a bool mask or none at all where causality or
no padding says enough). ``import aether_compile`` registers it as soon as transformers'
``modeling_utils`` is imported, before or after us, without importing transformers itself
(``install_import_hook``): users who never touch transformers pay nothing.

The attention call mirrors transformers' SDPA integration: GQA without repeating k/v (the op
takes ``enable_gqa`` with any mask), ``is_causal`` only for multi-row queries without a mask, the
output as [B, L, H, D]. What the op cannot express (``softcap``, attention sinks) runs
transformers' own SDPA path, logged once per reason.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import logging
import sys
import threading
from typing import Optional

import torch

log = logging.getLogger("aether_compile")

NAME = "aether"
_HOOKED_MODULE = "transformers.modeling_utils"
_registered = False
_lock = threading.Lock()
_fallbacks_logged: set[str] = set()


def aether_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                             dropout: float = 0.0, scaling: Optional[float] = None,
                             is_causal: Optional[bool] = None,
                             position_bias: Optional[torch.Tensor] = None, **kwargs):
    """transformers' attention-function signature: q [B, H, L, D], k/v [B, Hkv, S, D] → ([B, L, H,
    D], None)."""
    unsupported = [k for k in ("softcap", "s_aux", "sinks") if kwargs.get(k) is not None]
    if unsupported:
        return _sdpa_fallback(f"{unsupported[0]} is not expressible in aether::attention", module,
                              query, key, value, attention_mask, dropout, scaling, is_causal,
                              position_bias, **kwargs)
    from aether_compile.attention import attention

    q_length = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # As transformers' SDPA path: is_causal only where no mask was built and more than one query
    # row (one decode row attends to the whole cache).
    is_causal = bool(q_length > 1 and attention_mask is None and is_causal)
    if is_causal and key.shape[2] > q_length:
        # A static cache's prefill: the keys past the prompt are unwritten, and causality
        # (top-left aligned) masks them anyway.
        key, value = key[:, :, :q_length], value[:, :, :q_length]
        if position_bias is not None:
            position_bias = position_bias[..., :q_length]
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal,
                                                   query, key)
        is_causal = False
    out = attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                    is_causal=is_causal, scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _sdpa_fallback(reason: str, *args, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if reason not in _fallbacks_logged:
        _fallbacks_logged.add(reason)
        log.warning("aether attention: %s; this call runs transformers' SDPA attention", reason)
    return sdpa_attention_forward(*args, **kwargs)


def register() -> bool:
    """Register ``attn_implementation="aether"`` with transformers (idempotent). False when
    transformers is not installed."""
    global _registered
    with _lock:
        if _registered:
            return True
        try:
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
            from transformers.modeling_utils import AttentionInterface
        except ImportError:
            return False
        AttentionInterface.register(NAME, aether_attention_forward)
        AttentionMaskInterface.register(NAME, sdpa_mask)
        _registered = True
        return True


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when ``transformers.modeling_utils`` is about to load, it wraps that
    module's loader so ``register()`` runs right after the module has executed."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _HOOKED_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return None
        spec.loader = _ThenRegister(spec.loader)
        return spec


class _ThenRegister(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        try:
            register()
        except Exception:  # never break the user's transformers import
            log.exception("aether: registering attn_implementation=%r failed", NAME)

    def __getattr__(self, name):  # get_source, get_filename, is_package... as the real loader
        return getattr(self.loader, name)


_hook = _RegisterAfterImport()


def install_import_hook() -> None:
    """Register now if transformers' modeling code is loaded, else as soon as it is."""
    if _HOOKED_MODULE in sys.modules:
        register()
    elif _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)
