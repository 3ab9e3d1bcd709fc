"""Shared fixtures: synthetic checkpoints made once per test session."""

from __future__ import annotations

import pytest
import torch

from longcat_tools.synth import synth


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_native(tmp_path_factory):
    """A tiny native-layout checkpoint; tests must not modify it (copy it first)."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny-native"
    synth(path, "tiny", seed=0)
    return path


@pytest.fixture(scope="session")
def real_sparse(tmp_path_factory):
    """The real 13.6B layout with data left as file holes (headers only)."""
    path = tmp_path_factory.mktemp("ckpt") / "real-sparse"
    synth(path, "real", sparse=True)
    return path
