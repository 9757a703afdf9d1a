"""Every snippet in README.md runs as written, as a user would paste it, from the repo root."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = open(os.path.join(ROOT, "README.md")).read()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", README, flags=re.S | re.M)


def test_readme_python_snippets_run_in_order():
    """The python blocks, one session as a reader runs them (later ones reuse the first's model),
    with the repository root first on sys.path, as `python -` from the root puts it."""
    pytest.importorskip("transformers")
    snippets = blocks("python")
    assert len(snippets) >= 4
    code = "\n".join(snippets) + "\nprint('README snippets ran')\n"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell
    proc = subprocess.run([sys.executable, "-"], input=code, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert "attention site(s)" in out  # explain's table printed
    # enable() bound the compile made inside the block, though the model first ran after it:
    # the pass saw its sites (rewritten on CPU with allow_cpu; "short", left dense, on CUDA)
    assert re.search(r"'sites': [1-9]", out), out[-2000:]
    assert re.search(r"computed \d+% of the key blocks", out), out[-2000:]
    assert out.rstrip().endswith("README snippets ran")


def test_readme_commands_are_what_ci_runs():
    commands = blocks("bash")[0].strip().splitlines()
    assert len(commands) == 2
    assert commands[0].endswith("python -m aether_compile.demo")
    assert "pytest" in commands[1]
    ci = open(os.path.join(ROOT, ".ci", "run")).read()
    assert "## Two commands" in ci and 'eval "${COMMANDS[1]}"' in ci


def test_readme_links_resolve():
    for target in re.findall(r"\]\(([^)#]+)\)", README):
        if not target.startswith("http"):
            assert os.path.exists(os.path.join(ROOT, target)), target


def test_test_shards_split_the_selected_tests_between_them():
    """CI runs the test command as shards at once (AETHER_TEST_SHARD=i/n, tests/conftest.py):
    together they select exactly what the command alone selects, each test once; a bad value
    is an error naming it."""
    def collected(shard):
        env = {**os.environ, "AETHER_TEST_SHARD": shard}
        proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "--collect-only", "-m", "not slow", "tests/test_readme.py",
                               "tests/test_layout.py"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        ids = [line for line in proc.stdout.splitlines() if "::" in line]
        return proc, ids

    _, everything = collected("")
    _, first = collected("0/2")
    _, second = collected("1/2")
    assert len(everything) >= 6 and first and second
    assert sorted(first + second) == sorted(everything) and not set(first) & set(second)
    proc, _ = collected("2/2")
    assert proc.returncode != 0 and "AETHER_TEST_SHARD" in proc.stdout + proc.stderr
    assert "'2/2'" in proc.stdout + proc.stderr
