import os

import pytest
import torch


def _shard(value: str) -> tuple[int, int] | None:
    """AETHER_TEST_SHARD=i/n: run every n-th selected test from the i-th (CI runs the README's
    test command as two such shards at once, one per core). Unset: every test."""
    value = value.strip()
    if not value:
        return None
    try:
        index, count = (int(x) for x in value.split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise pytest.UsageError(f"AETHER_TEST_SHARD must be i/n with 0 <= i < n, got {value!r}")
    return index, count


def pytest_configure(config):
    # taken out of the environment: a test that runs pytest in a child process (on the whole
    # of a file) must not have the child shard it again
    config.aether_shard = _shard(os.environ.pop("AETHER_TEST_SHARD", ""))


@pytest.hookimpl(trylast=True)  # after -m and -k have deselected: shards split what runs
def pytest_collection_modifyitems(config, items):
    shard = config.aether_shard
    if shard is not None:
        index, count = shard
        # round robin in collection order: each shard gets every file's cheap and costly cases
        keep = [item for i, item in enumerate(items) if i % count == index]
        config.hook.pytest_deselected(items=[item for i, item in enumerate(items)
                                             if i % count != index])
        items[:] = keep
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
