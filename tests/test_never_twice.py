"""No work done twice: a `precompute-embeddings` whose caches are all complete builds no tower (its spec
remembered beside the caches, keyed by the model files' stamps), and the remembered spec is dropped when
the tower's files change."""

from __future__ import annotations

import json
import os

import pytest
import tiny_models
from typer.testing import CliRunner

from mmret.cli import app
from mmret.encoders import load_image_encoder
from mmret.features import feature_key, named

runner = CliRunner()


@pytest.fixture
def towers(tmp_path):
    return {"vit": tiny_models.save_tiny_timm_vit(tmp_path / "vit"),
            "bert": tiny_models.save_tiny_bert(tmp_path / "bert", pooling_config="mean")}


def _precompute(towers, *extra):
    return runner.invoke(app, ["precompute-embeddings", "--dataset", "example", "--vision", str(towers["vit"]),
                               "--text", str(towers["bert"]), "--workers", "0", "--precision", "fp32", *extra],
                         env={"COLUMNS": "160"})


def _count_builds(monkeypatch) -> list:
    built = []
    real = named._load
    monkeypatch.setattr(named, "_load", lambda *a, **k: built.append((a, k)) or real(*a, **k))
    return built


def test_a_second_precompute_builds_no_tower(example_ds, towers, monkeypatch):
    assert _precompute(towers).exit_code == 0
    built = _count_builds(monkeypatch)
    again = _precompute(towers)
    assert again.exit_code == 0, again.output
    assert built == [] and "all cached: no tower loaded" in again.stdout
    assert "0 / 60" in again.stdout and "0 / 300" in again.stdout
    # a view not cached yet loads the picture tower (once, with its weights) and only it
    views = _precompute(towers, "--views", "1")
    assert views.exit_code == 0, views.output
    assert [(a[:2], "meta" in k) for a, k in built] == [((str(towers["vit"]), "image"), False)]
    assert "frozen features on cpu" in views.stdout


def test_the_remembered_spec_is_the_towers_and_is_dropped_when_its_files_change(example_ds, towers, monkeypatch):
    folder = example_ds.path / "features"
    tower = named.named_tower(folder, str(towers["vit"]), "image")
    assert tower.is_meta and (folder / named.MEMO).is_file()
    remembered = named.named_tower(folder, str(towers["vit"]), "image")
    assert isinstance(remembered, named.NamedTower)
    key = feature_key(tower, example_ds)
    assert feature_key(remembered, example_ds) == key == feature_key(load_image_encoder(str(towers["vit"])), example_ds)
    assert not remembered.with_weights().is_meta
    config = towers["vit"] / "config.json"
    os.utime(config, ns=(config.stat().st_atime_ns, config.stat().st_mtime_ns + 10**9))
    built = _count_builds(monkeypatch)
    assert not isinstance(named.named_tower(folder, str(towers["vit"]), "image"), named.NamedTower)
    assert len(built) == 1
    assert not isinstance(named.named_tower(folder, str(towers["vit"]), "image", image_size=48), named.NamedTower)
    (folder / named.MEMO).write_text("{not json")  # a damaged memo is only a lost shortcut
    assert not isinstance(named.named_tower(folder, str(towers["vit"]), "image"), named.NamedTower)
    assert json.loads((folder / named.MEMO).read_text())
