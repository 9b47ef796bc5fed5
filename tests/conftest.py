"""Shared fixtures: a small synthetic data set written once per session, and config composition
with every path pointed at a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import jointdit  # noqa: F401  (applies the torchvision fix before any test imports diffusers)
from jointdit.config import compose

@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """Eight clips (two of each class) in AVSync15's layout."""
    from jointdit.data.synthetic import write_dataset

    return write_dataset(tmp_path_factory.mktemp("synthetic"), num_clips=8, seed=0, progress=False)


@pytest.fixture
def compose_cfg(tmp_path, monkeypatch):
    """compose(name, overrides) with paths.root_dir at tmp_path and no JOINTDIT_* knobs leaking in."""
    for key in list(os.environ):
        if key.startswith("JOINTDIT_"):
            monkeypatch.delenv(key)

    def _compose(name: str = "train", overrides: list[str] | None = None):
        return compose(name, [f"paths.root_dir={tmp_path}", *(overrides or [])])

    return _compose
