"""``AetherOptions``: every knob of the rewrite in one frozen dataclass.

Accepted by ``torch.compile(..., backend="aether", options=...)``, ``aether_compile.enable(**options)``
and ``aether_compile.explain(..., options=...)``, as the dataclass or as a dict of its fields.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping, Optional

COMPILERS = ("inductor", "aot_eager", "eager")


@dataclass(frozen=True)
class AetherOptions:
    """How attention sites are rewritten to ``torch.ops.aether.attention``.

    eps: certificate tolerance passed to the op (None = the dtype default, 0 = exact/dense).
    min_seq_len: shortest key length that takes the sparse op; shorter sites stay dense (0 = always).
        Decided per compiled graph: a graph with a symbolic (dynamic) length is always rewritten.
    allow_cpu: rewrite CPU tensors too (the op runs its plain-torch reference there).
    exclude: module paths (``encoder.layer.0.attention``, fnmatch patterns such as ``*.crossattention``
        or a module class name) whose attention is left dense.
    compiler: what runs the rewritten graph in the ``aether`` backend: "inductor" (default),
        "aot_eager" or "eager" (debugging, fast tests).
    decode: rewrite decode against a KV cache the graph writes (transformers' static cache) to
        certified decode (``aether::decode_attention``, docs/decode.md). Off by default until
        its kernels are measured faster than dense decode; off, such sites are ordinary SDPA
        sites.
    """

    eps: Optional[float] = None
    min_seq_len: int = 0
    allow_cpu: bool = False
    exclude: tuple[str, ...] = ()
    compiler: str = "inductor"
    decode: bool = False

    def __post_init__(self):
        # Checked here, with the bad value named, so that a typo fails where it was written and not
        # as a crash inside the compile (a bool is an int in Python: refused where a number is
        # meant).
        if self.eps is not None and (isinstance(self.eps, bool) or not isinstance(
                self.eps, (int, float)) or not float(self.eps) >= 0.0):
            raise ValueError(f"eps must be None or a number >= 0, got {self.eps!r}")
        if (isinstance(self.min_seq_len, bool) or not isinstance(self.min_seq_len, int)
                or self.min_seq_len < 0):
            raise ValueError(f"min_seq_len must be an int >= 0, got {self.min_seq_len!r}")
        if not isinstance(self.allow_cpu, bool):
            raise TypeError(f"allow_cpu must be True or False, got {self.allow_cpu!r}")
        exclude = (self.exclude,) if isinstance(self.exclude, str) else self.exclude
        try:
            exclude = tuple(exclude)
        except TypeError:
            raise TypeError("exclude must be a module path pattern or a sequence of them, got "
                            f"{self.exclude!r}") from None
        if not all(isinstance(x, str) for x in exclude):
            raise TypeError(f"exclude must hold strings (module path patterns), got {exclude!r}")
        object.__setattr__(self, "exclude", exclude)
        if not isinstance(self.decode, bool):
            raise TypeError(f"decode must be True or False, got {self.decode!r}")
        if self.compiler not in COMPILERS:
            raise ValueError(f"compiler must be one of {COMPILERS}, got {self.compiler!r}")

    @classmethod
    def field_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in dataclasses.fields(cls))

    @classmethod
    def coerce(cls, options: Any = None, **overrides) -> "AetherOptions":
        """AetherOptions from None, an AetherOptions, or a mapping of its fields (plus overrides)."""
        bad = set(overrides) - cls.field_names()
        if bad:
            raise TypeError(f"unknown aether option(s) {sorted(bad)}; aether's options are "
                            f"{sorted(cls.field_names())}")
        if options is None:
            base = cls()
        elif isinstance(options, cls):
            base = options
        elif isinstance(options, Mapping):
            unknown = set(options) - cls.field_names()
            if unknown:
                raise TypeError(f"unknown aether option(s) {sorted(unknown)}; aether's options "
                                f"are {sorted(cls.field_names())}")
            base = cls(**options)
        else:
            raise TypeError(f"options must be None, a dict or AetherOptions, got "
                            f"{type(options).__name__}")
        return dataclasses.replace(base, **overrides) if overrides else base

    def key(self) -> str:
        """Stable text form, part of the pass's uuid (FX graph cache key)."""
        return repr(dataclasses.astuple(self))
