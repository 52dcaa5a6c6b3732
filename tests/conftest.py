"""Shared fixtures: an isolated data root per test, a small prepared `example` dataset, and the
hardening tests' `home` (a working folder with bait outside data/ and runs/) and tiny `towers`."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import tiny_models

from mmret.data import PrepareConfig, load_dataset, prepare

# text queries through an inference runtime convert the run's text side on first use (seconds a run);
# tests/test_runtime.py turns it on where it is the subject
os.environ.setdefault("MMRET_RUNTIME", "torch")


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


@pytest.fixture(scope="module")
def tiny_world(tmp_path_factory):
    """A prepared example dataset (60 pictures) and a tiny timm ViT and BERT saved as model
    folders, shared by a module (so its feature caches are reused)."""
    root = tmp_path_factory.mktemp("world")
    prepare(PrepareConfig(source="example", count=60, data_dir=root / "data"))
    return {"root": root, "vit": str(tiny_models.save_tiny_timm_vit(root / "vit")),
            "bert": str(tiny_models.save_tiny_bert(root / "bert"))}


@pytest.fixture(scope="session")
def memorised(tmp_path_factory):
    """A 12-picture example dataset (five captions each) that a heads run memorises, so a picture's
    own caption finds it first; shared by the gallery, serve and browser tests."""
    return tiny_models.train_memorised(tmp_path_factory.mktemp("memorised"))


# ---------------------------------------------------------------------------- the hardening tests' home


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` outside data/ and runs/: size and modification time."""
    out = {}
    for path in root.rglob("*"):
        rel = path.relative_to(root)
        if path.is_file() and rel.parts[0] not in ("data", "runs"):
            st = path.stat()
            out[str(rel)] = (st.st_size, st.st_mtime_ns)
    return out


class Home(type(Path())):
    """The test's working folder; `baseline()` records every file outside data/ and runs/ (call it
    again after writing a raw dataset), and the fixture checks at the end that none changed."""

    def baseline(self) -> None:
        self.before = snapshot(self)


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A working folder with data/ and runs/ (set as the roots), a file outside them as bait, and a
    check, after the test, that nothing outside data/ and runs/ changed."""
    monkeypatch.setenv("MMRET_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.chdir(tmp_path)
    tiny_models.save_picture(tmp_path / "outside" / "secret.png")
    folder = Home(tmp_path)
    folder.baseline()
    yield folder
    after = snapshot(folder)
    assert after == folder.before, f"files outside data/ and runs/ changed: {sorted(set(after) ^ set(folder.before))}"


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {"vit": str(tiny_models.save_tiny_timm_vit(root / "vit")),
            "bert": str(tiny_models.save_tiny_bert(root / "bert"))}
