"""No work done twice: a `precompute-embeddings` whose caches are all complete builds no tower (its spec
remembered beside the caches, keyed by the model files' stamps), and the remembered spec is dropped when
the tower's files change."""

from __future__ import annotations

import json
import os

import numpy as np
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


def test_a_tower_by_hub_id_is_remembered_from_the_hub_cache(example_ds, towers, tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    tiny_models.install_in_hub_cache(towers["vit"], cache, "tiny-org/tiny-vit")
    folder = example_ds.path / "features"
    first = named.named_tower(folder, "tiny-org/tiny-vit", "image")
    assert first.is_meta and not isinstance(first, named.NamedTower)
    again = named.named_tower(folder, "tiny-org/tiny-vit", "image")
    assert isinstance(again, named.NamedTower) and feature_key(again, example_ds) == feature_key(first, example_ds)
    # a newer download is another snapshot (refs/main moves): its files are other files, so built again
    tiny_models.install_in_hub_cache(towers["vit"], cache, "tiny-org/tiny-vit", commit="f" * 40)
    assert not isinstance(named.named_tower(folder, "tiny-org/tiny-vit", "image"), named.NamedTower)
    assert named.memo_key("tiny-org/not-downloaded", "image", {}) is None  # found without asking the Hub


def test_the_same_pictures_under_another_dataset_name_encode_nothing(example_ds, towers, data_dir, monkeypatch):
    import shutil

    from mmret.data import PrepareConfig, load_dataset, prepare
    from mmret.features import ensure_features

    folder = data_dir.parent / "copies"  # the example's pictures and captions as a folder dataset, files renamed
    folder.mkdir()
    rows = example_ds.items.head(20)
    for n, path in enumerate(rows["path"]):
        shutil.copy(path, folder / f"copy{n}.png")
        captions = example_ds.captions[example_ds.captions["item_id"] == rows["item_id"].iloc[n]]["caption"]
        (folder / f"copy{n}.txt").write_text("\n".join(captions) + "\n")
    (folder / "new.png").write_bytes(tiny_models.save_picture(data_dir.parent / "new.png", seed=7).read_bytes())
    (folder / "new.txt").write_text("a new picture\n")
    prepare(PrepareConfig(source="folder", root=folder, name="copies", data_dir=data_dir))
    vit = load_image_encoder(str(towers["vit"]))
    first = ensure_features(example_ds, vit, workers=0, precision="fp32")
    copies = load_dataset("copies", data_dir)
    again = ensure_features(copies, vit, workers=0, precision="fp32")
    assert (again.stats.encoded, again.stats.reused) == (1, 20)  # only the new picture is encoded
    lent, checked = dict(zip(first.ids, np.asarray(first.pooled))), 0
    for item, row in zip(again.ids, np.asarray(again.pooled)):
        source = copies.items.set_index("item_id").loc[item, "path"]
        if "copy" in source:
            original = rows["item_id"].iloc[int(source.rsplit("copy", 1)[1].split(".")[0])]
            np.testing.assert_array_equal(row, lent[str(original)])
            checked += 1
    assert checked == 20
    # captions lend by their text across datasets too
    from mmret.encoders import load_text_encoder

    bert = load_text_encoder(str(towers["bert"]))
    ensure_features(example_ds, bert, "captions", workers=0, precision="fp32")
    texts = ensure_features(copies, bert, "captions", workers=0, precision="fp32")
    assert texts.stats.encoded == 1 and texts.stats.reused == len(copies.captions) - 1
