"""Shared fixtures: synthetic checkpoints made once per test session."""

from __future__ import annotations

import shutil

import pytest
import torch

from longcat_tools.model import avatar
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


@pytest.fixture(scope="session")
def avatar_trees(tmp_path_factory):
    """Tiny fp32 weights trees of both avatar releases, by model name (``avatar.VERSIONS``):
    ``LongCat-Video/`` beside the avatar folder. Read only: change a copy (``avatar_copy``).
    A module that needs other trees overrides this fixture."""
    root = tmp_path_factory.mktemp("avatar_trees")
    return {m: synth(root / m, "tiny", model=m).path for m in avatar.VERSIONS}


@pytest.fixture
def avatar_copy(avatar_trees, tmp_path):
    """``make(model)``: a private copy of that weights tree; returns its avatar folder."""
    def make(model: str):
        dst = tmp_path / model
        shutil.copytree(avatar_trees[model], dst)
        return dst / avatar.VERSIONS[model].folder
    return make


@pytest.fixture
def fp8_gemm_inputs(monkeypatch):
    """Counts what the fp8 GEMMs (``kernels.fp8.linear``) read: an activation ("Tensor") or
    its e4m3 rows ("Rows")."""
    from collections import Counter

    from longcat_tools.kernels import fp8

    seen: Counter = Counter()
    real = fp8.linear

    def spy(x, *args, **kwargs):
        seen[type(x).__name__] += 1
        return real(x, *args, **kwargs)

    monkeypatch.setattr(fp8, "linear", spy)
    return seen
