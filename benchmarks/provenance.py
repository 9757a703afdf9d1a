"""Which commit a result came from, for every runner's results JSON."""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(short: bool = False, mark_dirty: bool = False) -> str:
    """AETHER_COMMIT if set (the GPU copy has no .git), else git HEAD (with "-dirty" appended
    when ``mark_dirty`` and tracked files changed), else "unknown"."""
    env = os.environ.get("AETHER_COMMIT")
    if env:
        return env
    try:
        head = subprocess.check_output(["git", "rev-parse", *(["--short"] if short else []), "HEAD"],
                                       text=True, cwd=ROOT, stderr=subprocess.DEVNULL).strip()
        if not mark_dirty:
            return head
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"],
                                        text=True, cwd=ROOT, stderr=subprocess.DEVNULL).strip()
        return head + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001  (no git, not a checkout)
        return "unknown"
