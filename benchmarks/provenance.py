"""Where a result came from and how it is written: the one record writer every runner uses.

``env_record()`` is the ``env`` of every results JSON (card, versions, commit, date),
``card_tag(env)`` the suffix of its file name, ``write_json(path, record)`` writes it atomically.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(short: bool = False, mark_dirty: bool = False) -> str:
    """AETHER_COMMIT if set (the GPU copy has no .git), else git HEAD (with "-dirty" appended
    when ``mark_dirty`` and tracked files changed), else "unknown"."""
    env = os.environ.get("AETHER_COMMIT")
    if env:
        return env
    try:
        head = subprocess.check_output(
            ["git", "rev-parse", *(["--short"] if short else []), "HEAD"], text=True, cwd=ROOT,
            stderr=subprocess.DEVNULL).strip()
        if not mark_dirty:
            return head
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--untracked-files=no"],
                                        text=True, cwd=ROOT, stderr=subprocess.DEVNULL).strip()
        return head + ("-dirty" if dirty else "")
    except Exception:  # noqa: BLE001  (no git, not a checkout)
        return "unknown"


def _version(module: str):
    try:
        return __import__(module).__version__
    except Exception:  # noqa: BLE001
        return None


def env_record(device: str | None = None, **extra) -> dict:
    """What ran where: the device ("cuda" when one is available, unless named) with its card,
    capability and memory; CPU threads; torch, Triton, transformers, Python and aether_compile
    versions; the commit (short, "-dirty" if tracked files changed); the UTC date; ``extra``."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    env = {"device": device, "card": "cpu", "threads": torch.get_num_threads(),
           "cpu_count": os.cpu_count(), "torch": torch.__version__, "triton": _version("triton"),
           "transformers": _version("transformers"), "python": platform.python_version(),
           "aether_compile": _version("aether_compile"),
           "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
           "commit": git_commit(short=True, mark_dirty=True),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(card=torch.cuda.get_device_name(), capability=[props.major, props.minor],
                   cuda=torch.version.cuda, gpu_memory_gib=round(props.total_memory / 2 ** 30, 1))
    env.update(extra)
    return env


def card_tag(env: dict) -> str:
    """The card as a file-name suffix ("NVIDIA_H200", "cpu")."""
    return (env.get("card") or "cpu").replace(" ", "_")


def write_json(path: str, record: dict) -> None:
    """Write ``record`` to ``path`` whole or not at all (a run killed mid-write leaves the last
    complete file)."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1, default=str)
    os.replace(tmp, path)
