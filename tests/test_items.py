"""Items, not images: what was written before the item side had its own name still opens and scores
as it did. A prepared dataset keeps its modality's names on disk (`images.parquet` / `image_id`);
a run folder written by the earlier code (checkpoint keys `image_tower.*`, config.json
`encoders.vision` and `mine_by: image`, embeddings `images.npy` / `images.parquet` with
`image_id` and the captions' row column `image`) loads, serves its embeddings as they are and
evaluates to the same numbers, and its checkpoint's digest is still checked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tiny_models
from safetensors.torch import load_file

from mmret import training
from mmret.common.digest import file_digest
from mmret.data import PrepareConfig, load_dataset, prepare
from mmret.errors import MmretError
from mmret.evaluation.retrieval import evaluate_run
from mmret.inference.embeddings import write_run_embeddings
from mmret.inference.search import search
from mmret.runs import RunConfig, load_run_config, with_overrides
from mmret.runs.checkpoint import _save, read_meta


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("items")
    data, runs = root / "data", root / "runs"
    prepare(PrepareConfig(source="example", count=30, val=0.2, test=0.2, data_dir=data))
    vit = str(tiny_models.save_tiny_timm_vit(root / "vit", spread=20.0))
    bert = str(tiny_models.save_tiny_bert(root / "bert", pooling_config="mean"))
    cfg = with_overrides(RunConfig(), dict(method="heads", dataset="example", item=vit, text=bert, data_dir=data,
                                           runs_dir=runs, epochs=3, batch_size=8, embed_dim=16, patience=0,
                                           hard_negatives=4, mine_by="item", name="new"))
    run = training.train(cfg).run_dir
    return {"root": root, "data": data, "runs": runs, "run": run, "vit": vit, "bert": bert,
            "metrics": evaluate_run(run).metrics}


def test_prepared_tables_keep_their_modality_names_on_disk(world):
    folder = world["data"] / "example"
    assert list(pd.read_parquet(folder / "images.parquet").columns) == ["image_id", "path", "split", "width", "height"]
    assert list(pd.read_parquet(folder / "captions.parquet").columns) == ["caption_id", "image_id", "caption", "split"]
    ds = load_dataset("example", world["data"])  # in memory the key is item_id
    assert list(ds.items.columns[:3]) == ["item_id", "path", "split"] and "item_id" in ds.captions.columns


def test_a_dataset_written_by_the_first_version_opens(world):
    """No modality or generation in dataset.json (the layout before sounds), pictures named image_id."""
    folder = world["data"] / "first"
    (folder / "pictures").mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        tiny_models.save_picture(folder / "pictures" / name, seed=ord(name[0]))
    pd.DataFrame({"image_id": ["a.png", "b.png", "c.png"], "path": [f"pictures/{n}.png" for n in "abc"],
                  "split": ["train", "val", "test"], "width": np.int32(40), "height": np.int32(40)}).to_parquet(
        folder / "images.parquet", index=False)
    pd.DataFrame({"caption_id": [0, 1, 2, 3], "image_id": ["a.png", "b.png", "c.png", "c.png"],
                  "caption": ["a red circle", "a blue square", "a green triangle", "a small green triangle"],
                  "split": ["train", "val", "test", "test"]}).to_parquet(folder / "captions.parquet", index=False)
    (folder / "dataset.json").write_text(json.dumps({"name": "first", "source": "folder", "root": str(folder),
                                                     "created": "2026-01-01T00:00:00+00:00"}))
    ds = load_dataset("first", world["data"])
    assert ds.modality.name == "image" and ds.items["item_id"].tolist() == ["a.png", "b.png", "c.png"]
    assert ds.split("test").captions["item_id"].tolist() == ["c.png", "c.png"]
    assert ds.items["path"].tolist() == [str(folder / "pictures" / f"{n}.png") for n in "abc"]
    result = evaluate_run(world["run"], dataset="first")  # features, embeddings and metrics over it
    assert (result.n_items, result.n_captions) == (1, 2) and result.metrics["t2i_r1"] == 1.0


def to_old_layout(run: Path) -> None:
    """Rewrite a run folder as the code before items had a name wrote it."""
    for path in (run / "checkpoints").glob("*.safetensors"):
        if not path.name.endswith(".state.safetensors"):  # optimizer state is kept by index, not name
            tensors = {k.replace("item_tower.", "image_tower.", 1): v for k, v in load_file(str(path)).items()}
            _save(tensors, path, read_meta(path))  # a digest over the old names, as it was written then
    config = json.loads((run / "config.json").read_text())
    config["encoders"]["vision"] = config["encoders"].pop("item")
    config["train"]["mine_by"] = "image"
    (run / "config.json").write_text(json.dumps(config, indent=2))
    for emb in (run / "embeddings").iterdir():
        (emb / "items.npy").rename(emb / "images.npy")
        pd.read_parquet(emb / "items.parquet").rename(columns={"item_id": "image_id"}).to_parquet(
            emb / "images.parquet", index=False)
        (emb / "items.parquet").unlink()
        captions = pd.read_parquet(emb / "captions.parquet")
        captions.rename(columns={"item": "image"}).to_parquet(emb / "captions.parquet", index=False)
        manifest = json.loads((emb / "manifest.json").read_text())
        manifest["images_fingerprint"], manifest["images"] = manifest.pop("items_fingerprint"), manifest.pop("items")
        manifest["reused"] = {"images": manifest["reused"]["items"], "captions": manifest["reused"]["captions"]}
        manifest["checkpoint"] = file_digest(run / "checkpoints" / f"{manifest['which']}.safetensors")
        manifest["digests"] = {name: file_digest(emb / name) for name in
                               ("images.npy", "captions.npy", "images.parquet", "captions.parquet")}
        (emb / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture
def old_run(world, tmp_path):
    run = world["runs"] / f"old-{tmp_path.name}"
    shutil.copytree(world["run"], run)
    to_old_layout(run)
    return run


def test_an_old_run_folder_opens_and_evaluates_identically(world, old_run):
    assert "image_tower.0.scale" in load_file(str(old_run / "checkpoints" / "best.safetensors"))
    cfg = load_run_config(old_run)
    assert (cfg.encoders.item, cfg.train.mine_by) == (world["vit"], "item")
    emb_dir = old_run / "embeddings" / "example-test"
    written = (emb_dir / "manifest.json").stat().st_mtime_ns
    emb = write_run_embeddings(old_run)
    assert (emb_dir / "manifest.json").stat().st_mtime_ns == written  # served as it is, not computed again
    assert list(emb.item_table.columns[:2]) == ["item_id", "path"] and "item" in emb.caption_table.columns
    new = write_run_embeddings(world["run"])
    np.testing.assert_array_equal(np.asarray(emb.items), np.asarray(new.items))
    assert evaluate_run(old_run).metrics == world["metrics"]
    shutil.rmtree(emb_dir)  # from the old checkpoint, read under today's module names
    assert evaluate_run(old_run).metrics == world["metrics"]
    assert (emb_dir / "items.npy").is_file() and not (emb_dir / "images.npy").exists()


def test_an_old_gallery_is_searched_from_its_old_files(world, old_run):
    query = ["a red circle above a blue square"]
    old = search(old_run, query, split="test", k=3).results[0].items
    new = search(world["run"], query, split="test", k=3).results[0].items
    assert [(h.item_id, h.score) for h in old] == [(h.item_id, h.score) for h in new]
    assert (old_run / "embeddings" / "example-test" / "images.npy").is_file()


def test_an_old_checkpoint_is_still_checked_against_its_digest(old_run):
    path = old_run / "checkpoints" / "best.safetensors"
    tensors, meta = load_file(str(path)), read_meta(path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        digest = f.metadata()["mmret_digest"]
    tensors["image_tower.0.scale"] = tensors["image_tower.0.scale"] + 1  # changed after it was written
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"mmret": json.dumps(meta), "mmret_digest": digest})
    shutil.rmtree(old_run / "embeddings")
    with pytest.raises(MmretError, match="do not match the checksum written with them"):
        evaluate_run(old_run)
