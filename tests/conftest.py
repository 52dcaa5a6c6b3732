"""Shared fixtures: an isolated data root per test and a small prepared `example` dataset."""

from __future__ import annotations

import pytest

from mmret.data import PrepareConfig
from mmret.data import load_dataset, prepare


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    """A fresh data root, also set as $MMRET_DATA_DIR so CLI calls use it."""
    root = tmp_path / "data"
    monkeypatch.setenv("MMRET_DATA_DIR", str(root))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(tmp_path / "runs"))
    return root


@pytest.fixture
def example_ds(data_dir):
    """60 generated pictures (48 train / 6 val / 6 test), five captions each."""
    prepare(PrepareConfig(source="example", count=60, data_dir=data_dir))
    return load_dataset("example", data_dir)
