"""What the pass records per attention site, and the exception a matcher declines with."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

SPARSE = "sparse"
DENSE = "dense"


class Decline(Exception):
    """An attention site that stays dense. ``code`` keys the counters; ``message`` is for people."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Site:
    """One attention site found in a captured graph."""

    pattern: str  # e.g. "sdpa", "softmax-matmul", "mha"
    decision: str  # SPARSE (rewritten to aether.attention) or DENSE (left as it was)
    reason: str  # why; for SPARSE a short description of what the op got
    code: str  # counter key: "rewritten" or a decline code ("device", "dropout", ...)
    module: str = ""  # dotted module path inside the compiled model
    module_type: str = ""
    source: str = ""  # "file.py:line  code"
    node: str = ""  # name of the anchor node in the graph
    # What the op did when explain() replayed the rewritten graph on the model's inputs:
    # computed blocks over the causally live ones (1.0: dense), or None (not replayed).
    kept_fraction: Optional[float] = None

    @property
    def rewritten(self) -> bool:
        return self.decision == SPARSE
