"""The source layout shadows nothing: from the repository root (first on sys.path under
``python -m`` and pytest) every installed package imports as itself, and ours installs both as an
editable checkout and as a wheel."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = "aether_compile"


def top_level_folders() -> list[str]:
    return sorted(d for d in os.listdir(ROOT) if os.path.isdir(os.path.join(ROOT, d))
                  and d.isidentifier() and not d.startswith("."))


def test_only_our_package_is_a_regular_package_at_the_top():
    """A top-level folder with an __init__.py would outrank an installed package of its name
    (HF's `kernels`); without one it is a namespace portion, which never does."""
    regular = [d for d in top_level_folders()
               if os.path.isfile(os.path.join(ROOT, d, "__init__.py"))]
    assert regular == [OURS]


def test_no_top_level_name_is_claimed_by_another_installed_distribution():
    provided = importlib.metadata.packages_distributions()
    for name in top_level_folders():
        others = [d for d in provided.get(name, []) if d.replace("-", "_") != OURS]
        if not others:
            continue
        # Installed elsewhere: from the root the import must still reach theirs, as the package
        # itself or, where theirs is a namespace portion too (some wheels ship a bare `docs/`),
        # as one of the merged namespace's folders.
        code = (f"import {name}, os; m = {name}; print(*[os.path.abspath(p) for p in "
                "([m.__file__] if getattr(m, '__file__', None) else list(m.__path__))], sep='\\n')")
        proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                              text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]
        places = proc.stdout.split()
        assert any(not p.startswith(ROOT + os.sep) and p != ROOT for p in places), (
            name, others, places)


def test_transformers_and_kernels_import_from_the_root():
    pytest.importorskip("transformers")
    code = ("import kernels, transformers.modeling_utils, aether_compile.kernels.reference, "
            "aether_compile.passes.rewrite, os; print(kernels.__file__)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not proc.stdout.strip().startswith(ROOT + os.sep), proc.stdout


def test_wheel_carries_the_subpackages(tmp_path):
    """A wheel install (not the editable checkout) imports passes and kernels from inside the
    package, away from the source tree."""
    pytest.importorskip("setuptools")
    wheel_dir, target, src = tmp_path / "wheel", tmp_path / "site", tmp_path / "src"
    # A copy: setuptools builds in the source tree (build/, *.egg-info), and would leave files
    # there that a later build packs although their source is gone.
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "__pycache__", ".venv", ".whl", "benchmarks", "tests"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                            "--no-build-isolation", "-w", str(wheel_dir), str(src)],
                           capture_output=True, text=True, cwd=tmp_path)
    if build.returncode != 0 and "No module named" in build.stderr:
        pytest.skip(f"cannot build a wheel here: {build.stderr.strip()[-200:]}")
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(wheel_dir.glob("*.whl"))
    install = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                              "--target", str(target), str(wheel)], capture_output=True, text=True)
    assert install.returncode == 0, install.stderr[-3000:]
    code = ("import aether_compile, aether_compile.kernels.reference as r, "
            "aether_compile.passes.rewrite as p; print(aether_compile.__file__, r.__file__, "
            "p.__file__)")
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert all(path.startswith(str(target)) for path in proc.stdout.split()), proc.stdout
