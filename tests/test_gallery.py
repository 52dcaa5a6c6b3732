"""A gallery of pictures without captions, searched with a trained run, and what a folder that
gains pictures costs: `prepare folder --no-captions`, search / precompute / eval / train on it,
and rows reused by item stamp in the feature caches and in a run's embeddings (the new and changed
pictures are the only ones computed; caches written before stamps existed still load)."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pandas as pd
import pytest
import tiny_models
from PIL import Image
from typer.testing import CliRunner

from mmret import training
from mmret.cli import app
from mmret.data import PrepareConfig, load_dataset, prepare
from mmret.features import encode as encoding
from mmret.features import open_features
from mmret.inference import loaded
from mmret.inference.embeddings import write_run_embeddings
from mmret.inference.search import search
from mmret.runs import RunConfig, with_overrides

runner = CliRunner()


def example_pictures(world, split: str = "all") -> pd.DataFrame:
    """The memorised run's pictures with their first caption (those of train are memorised)."""
    ds = load_dataset("example", world["data"]).split(split)
    first = ds.captions.groupby("item_id").caption.first()
    return ds.items.assign(caption=ds.items.item_id.map(first))


def photo_folder(world, folder, rows) -> None:
    """Copy pictures into a folder of 'photos' (half of them in a sub-folder, no caption files),
    leaving those already there untouched."""
    for n, (_, row) in enumerate(rows.iterrows()):
        dest = folder / ("trip" if n % 2 else "") / f"photo-{row.item_id}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            shutil.copy(row.path, dest)


def photo_id(n: int, item_id: str) -> str:
    return f"{'trip/' if n % 2 else ''}photo-{item_id}.png"


@pytest.fixture
def env(memorised, monkeypatch):
    monkeypatch.setenv("MMRET_DATA_DIR", str(memorised["data"]))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(memorised["runs"]))
    return memorised


def test_prepare_no_captions_keeps_every_picture_in_test(env, tmp_path):
    pictures = example_pictures(env)
    photo_folder(env, tmp_path / "photos", pictures.iloc[:5])
    (tmp_path / "photos" / "photo-00000.txt").write_text("a caption that --no-captions leaves out")
    result = runner.invoke(app, ["prepare", "folder", "--root", str(tmp_path / "photos"), "--name", "nocap1",
                                 "--no-captions"])
    assert result.exit_code == 0, result.output
    assert "no captions: every item is in test" in result.stdout
    ds = load_dataset("nocap1", env["data"])
    assert sorted(ds.items.item_id) == sorted(photo_id(n, i) for n, i in enumerate(pictures.item_id[:5]))
    assert set(ds.items.split) == {"test"} and ds.captions.empty
    assert list(ds.captions.columns) == ["caption_id", "item_id", "caption", "split"]


def test_a_folder_without_captions_needs_the_flag(env, tmp_path):
    photo_folder(env, tmp_path / "photos", example_pictures(env).iloc[:3])
    result = runner.invoke(app, ["prepare", "folder", "--root", str(tmp_path / "photos"), "--name", "nocap2"])
    assert result.exit_code == 1
    assert result.stderr.strip().endswith("3 no caption; --no-captions prepares them as a gallery to search")


def test_a_trained_run_searches_a_gallery_without_captions(env, tmp_path):
    pictures = example_pictures(env, "train")
    photo_folder(env, tmp_path / "photos", pictures)
    prepare(PrepareConfig(source="folder", root=tmp_path / "photos", name="nocap3", captions=False,
                          data_dir=env["data"]))
    for n, row in enumerate(pictures.itertuples()):
        found = runner.invoke(app, ["search", row.caption, "--run", "memorised", "--dataset", "nocap3", "-k", "3",
                                    "--checkpoint", "last", "--json"])
        assert found.exit_code == 0, found.output
        hits = json.loads(found.stdout)["results"][0]["images"]
        assert hits[0]["image_id"] == photo_id(n, row.item_id) and hits[0]["captions"] == []
    by_picture = search(env["run"], [], item=pictures.path.iloc[2], dataset="nocap3", k=2, which="last")
    assert by_picture.results[0].items[0].item_id == photo_id(2, pictures.item_id.iloc[2])
    assert by_picture.results[0].captions == []  # a gallery without captions has none to offer
    precomputed = runner.invoke(app, ["precompute-embeddings", "--run", "memorised", "--dataset", "nocap3"])
    assert precomputed.exit_code == 0 and "8 images and 0 captions" in precomputed.stdout
    towers = runner.invoke(app, ["precompute-embeddings", "--dataset", "nocap3", "--vision", str(env["vit"]),
                                 "--text", str(env["bert"])])
    assert towers.exit_code == 0, towers.output
    assert "nocap3 has no captions: the text tower has nothing to encode" in towers.stderr


def test_eval_and_train_refuse_a_gallery_without_captions(env, tmp_path):
    photo_folder(env, tmp_path / "photos", example_pictures(env).iloc[:4])
    prepare(PrepareConfig(source="folder", root=tmp_path / "photos", name="nocap4", captions=False,
                          data_dir=env["data"]))
    scored = runner.invoke(app, ["eval", "--run", "memorised", "--dataset", "nocap4"])
    assert (scored.exit_code, scored.stderr.strip()) == (1, "error: dataset 'nocap4' has no captions, so there is "
                                                            "nothing to score; a gallery without captions is for "
                                                            "mmret search and mmret serve")
    trained = runner.invoke(app, ["train", "--method", "heads", "--dataset", "nocap4", "--vision", str(env["vit"]),
                                  "--text", str(env["bert"]), "--epochs", "1"])
    assert trained.exit_code == 1
    assert "has no captions: a gallery without captions can be searched" in trained.stderr


@pytest.fixture
def counted(monkeypatch):
    """Rows the frozen towers encode, and rows a run embeds, from now on. The galleries here copy the
    example's pictures, whose features the example's caches would lend by content (test_never_twice.py):
    that is turned off, so what is counted is one dataset's own reuse."""
    monkeypatch.setattr(encoding, "content_twins", lambda *args, **kwargs: [])
    seen = {"encoded": 0, "embedded": 0}
    real_encode, real_embed = encoding._Job.encode, loaded.embed_source

    def encode(self, cache, record, batches, *args, **kwargs):
        seen["encoded"] += sum(len(b) for b in batches)
        return real_encode(self, cache, record, batches, *args, **kwargs)

    def embed(model, source, batch_size, device, autocast, advance=None, items=None, captions=None):
        seen["embedded"] += source.num_items if items is None else len(items)
        return real_embed(model, source, batch_size, device, autocast, advance, items=items, captions=captions)

    monkeypatch.setattr(encoding._Job, "encode", encode)
    monkeypatch.setattr(loaded, "embed_source", embed)
    return seen


def assert_same_rows(a, b) -> None:
    """Row by row the same embeddings, up to the precision the frozen tower's cache chose (bf16
    or fp32, timed on the first batch, so a cache built from scratch may choose otherwise)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.995, cosine


def grow(env, folder, name, pictures, changed: int) -> None:
    """Add the pictures not in the folder yet, rewrite one that is (other bytes, a later mtime),
    and prepare the dataset again."""
    photo_folder(env, folder, pictures)
    victim = folder / photo_id(changed, pictures.item_id.iloc[changed])
    time.sleep(0.01)
    Image.open(victim).convert("L").convert("RGB").save(victim)  # the same picture in grey
    prepare(PrepareConfig(source="folder", root=folder, name=name, captions=False, force=True, data_dir=env["data"]))


def test_new_pictures_cost_only_themselves(env, tmp_path, counted):
    pictures, folder = example_pictures(env), tmp_path / "photos"
    photo_folder(env, folder, pictures.iloc[:8])
    prepare(PrepareConfig(source="folder", root=folder, name="grows", captions=False, data_dir=env["data"]))
    first = write_run_embeddings(env["run"], "grows", "all", which="last")
    assert first.manifest["reused"] == {"items": 0, "captions": 0} and counted == {"encoded": 8, "embedded": 8}
    before = dict(zip(first.item_table.item_id, np.asarray(first.items)))

    grow(env, folder, "grows", pictures, changed=3)
    grown = write_run_embeddings(env["run"], "grows", "all", which="last")
    assert len(grown.items) == 12 and grown.manifest["reused"]["items"] == 7  # 8 less the rewritten one
    assert counted == {"encoded": 8 + 5, "embedded": 8 + 5}  # 4 new pictures and the rewritten one
    after = dict(zip(grown.item_table.item_id, np.asarray(grown.items)))
    kept = [photo_id(n, i) for n, i in enumerate(pictures.item_id[:8]) if n != 3]
    assert all(np.array_equal(before[i], after[i]) for i in kept)
    rewritten = photo_id(3, pictures.item_id.iloc[3])
    with pytest.raises(AssertionError):  # never a stale row
        assert_same_rows(before[rewritten][None], after[rewritten][None])

    caches = list((env["data"] / "grows" / "features").iterdir())
    assert len(caches) == 1  # the cache of the older preparation was removed once the new one was complete
    scratch = tmp_path / "scratch"
    shutil.copytree(env["run"], scratch, ignore=shutil.ignore_patterns("embeddings", "index"))
    shutil.rmtree(caches[0])
    fresh = write_run_embeddings(scratch, "grows", "all", which="last")  # everything from scratch
    assert list(fresh.item_table.item_id) == list(grown.item_table.item_id)
    assert_same_rows(fresh.items, grown.items)


def test_caches_written_before_stamps_still_load_and_lend_nothing(env, tmp_path, counted):
    pictures, folder = example_pictures(env), tmp_path / "photos"
    photo_folder(env, folder, pictures.iloc[:6])
    prepare(PrepareConfig(source="folder", root=folder, name="olden", captions=False, data_dir=env["data"]))
    emb = write_run_embeddings(env["run"], "olden", "all", which="last")
    (cache,) = (env["data"] / "olden" / "features").iterdir()
    (cache / "stamps.json").unlink()  # as caches were written before stamps
    table = pd.read_parquet(emb.path / "items.parquet").drop(columns="stamp")
    table.to_parquet(emb.path / "items.parquet", index=False)
    manifest = json.loads((emb.path / "manifest.json").read_text())
    del manifest["digests"]  # folders written before stamps had no checksums either
    (emb.path / "manifest.json").write_text(json.dumps(manifest))
    written = (emb.path / "manifest.json").stat().st_mtime_ns
    ds = load_dataset("olden", env["data"])
    vit = loaded.LoadedRun(env["run"], which="last").model(("item",))[0].item
    assert open_features(ds, vit, "images") is not None  # opened by its key, as before
    again = write_run_embeddings(env["run"], "olden", "all", which="last")
    assert (again.path / "manifest.json").stat().st_mtime_ns == written and len(again.items) == 6
    grow(env, folder, "olden", pictures.iloc[:7], changed=0)
    counted.update(encoded=0, embedded=0)
    grown = write_run_embeddings(env["run"], "olden", "all", which="last")
    assert grown.manifest["reused"]["items"] == 0 and counted == {"encoded": 7, "embedded": 7}


def test_a_tower_method_embeds_only_the_new_pictures(memorised, tmp_path, counted):
    clip = tiny_models.save_tiny_clip(tmp_path / "clip")
    cfg = with_overrides(RunConfig(), dict(method="full", model=str(clip), dataset="example",
                                           data_dir=memorised["data"], runs_dir=tmp_path / "runs", epochs=1,
                                           batch_size=8, embed_dim=16, patience=0, workers=0, name="full"))
    run = training.train(cfg).run_dir
    pictures, folder = example_pictures(memorised), tmp_path / "photos"
    photo_folder(memorised, folder, pictures.iloc[:5])
    prepare(PrepareConfig(source="folder", root=folder, name="towers", captions=False, data_dir=memorised["data"]))
    write_run_embeddings(run, "towers", "all")
    counted.update(encoded=0, embedded=0)
    grow(memorised, folder, "towers", pictures.iloc[:9], changed=1)
    grown = write_run_embeddings(run, "towers", "all")
    assert counted["embedded"] == 5 and grown.manifest["reused"]["items"] == 4
    scratch = tmp_path / "scratch"
    shutil.copytree(run, scratch, ignore=shutil.ignore_patterns("embeddings", "index"))
    fresh = write_run_embeddings(scratch, "towers", "all")
    assert_same_rows(fresh.items, grown.items)


def test_an_index_follows_its_gallery(env, tmp_path):
    pictures, folder = example_pictures(env), tmp_path / "photos"
    photo_folder(env, folder, pictures.iloc[:5])
    prepare(PrepareConfig(source="folder", root=folder, name="indexed", captions=False, data_dir=env["data"]))
    assert len(search(env["run"], ["a red circle"], dataset="indexed", k=20).results[0].items) == 5
    grow(env, folder, "indexed", pictures.iloc[:8], changed=0)
    assert len(search(env["run"], ["a red circle"], dataset="indexed", k=20).results[0].items) == 8  # rebuilt


def test_a_tar_member_is_stamped_by_its_shard(tmp_path):
    """A member of a shard has no file of its own: rewriting the shard gives its members new
    stamps (so their rows are computed again), an untouched shard keeps them."""
    import os
    import tarfile

    from mmret.common.items import member_address
    from mmret.data.stamps import item_stamps

    shard = tmp_path / "000000.tar"
    (tmp_path / "a.png").write_bytes(b"picture")
    with tarfile.open(shard, "w") as tar:
        tar.add(tmp_path / "a.png", arcname="a.png")
    address = member_address(shard, "a.png")
    first = item_stamps(["a"], [address], tmp_path)
    assert (item_stamps(["a"], [address], tmp_path) == first).all()
    with tarfile.open(shard, "a") as tar:
        tar.add(tmp_path / "a.png", arcname="b.png")
    os.utime(shard, ns=(1, 1))
    assert (item_stamps(["a"], [address], tmp_path) != first).all()
