"""aether_compile: certified geometric block-sparse attention for torch.compile."""

__version__ = "0.1.0"

from . import ops  # noqa: F401  (registers the torch.ops.aether.* ops)
from .attention import AttentionStats, attention

__all__ = ["AttentionStats", "attention", "__version__"]
