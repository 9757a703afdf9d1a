"""aether_compile: certified geometric block-sparse attention for torch.compile."""

import os as _os

__version__ = "0.1.0"

# passes/ and kernels/ install as aether_compile.passes / aether_compile.kernels (setuptools
# package-dir). When this package is imported straight from a source checkout (repo root on
# sys.path, no install, or an editable install whose finder is not active), look for them beside it.
_here = _os.path.dirname(__file__)
_root = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "kernels")) and _os.path.isfile(
        _os.path.join(_root, "kernels", "__init__.py")):
    __path__.append(_root)  # noqa: F821  (the package's own __path__)

from . import ops  # noqa: F401  (registers the torch.ops.aether.* ops)
from .attention import AttentionStats, attention

__all__ = ["AttentionStats", "attention", "__version__"]

from .backend import aether_backend  # noqa: E402
from .context import AetherPass, enable  # noqa: E402
from .explain import ExplainReport, explain  # noqa: E402
from .options import AetherOptions  # noqa: E402

__all__ += ["AetherOptions", "AetherPass", "ExplainReport", "aether_backend", "enable", "explain"]
