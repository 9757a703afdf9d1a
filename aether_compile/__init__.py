"""aether_compile: certified geometric block-sparse attention for torch.compile."""

import importlib.machinery as _machinery
import importlib.util as _importlib_util
import os as _os
import sys as _sys

__version__ = "0.1.0"

# passes/ and kernels/ sit at the top of the source tree and install as aether_compile.passes /
# aether_compile.kernels (pyproject's package-dir). They have no __init__.py on purpose: a folder
# without one is only a namespace portion, which any installed package of the same name outranks,
# so running from the repository root (its folder first on sys.path) never hides Hugging Face's
# `kernels` (which transformers imports) or any other `passes`. A wheel install copies them into
# this package, where they import as plain namespace subpackages. From a checkout (an editable
# install, or no install) nothing maps them: setuptools' editable finder skips nested folders
# without an __init__.py. Attach them here, from beside this package.
_SUBPACKAGES = ("passes", "kernels")


def _attach_source_subpackages() -> None:
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    for name in _SUBPACKAGES:
        full = f"{__name__}.{name}"
        if full in _sys.modules or _importlib_util.find_spec(full) is not None:
            continue
        spec = _machinery.PathFinder.find_spec(full, [root])
        if spec is None:
            raise ImportError(f"{full}: no {name}/ folder beside {_os.path.dirname(__file__)}; "
                              "reinstall aether_compile")
        module = _importlib_util.module_from_spec(spec)
        _sys.modules[full] = module
        globals()[name] = module


_attach_source_subpackages()

from . import ops  # noqa: F401  (registers the torch.ops.aether.* ops)
from . import kv_cache  # noqa: F401  (and the decode ops)
from .attention import AttentionStats, attention

__all__ = ["AttentionStats", "attention", "__version__"]

from .backend import aether_backend  # noqa: E402
from .context import AetherPass, enable  # noqa: E402
from .explain import ExplainReport, explain  # noqa: E402
from .options import AetherOptions  # noqa: E402

__all__ += ["AetherOptions", "AetherPass", "ExplainReport", "aether_backend", "enable", "explain"]

# attn_implementation="aether" in transformers, once its modeling code loads (nothing imported now)
from .transformers_attention import install_import_hook as _install_transformers_hook  # noqa: E402

_install_transformers_hook()
