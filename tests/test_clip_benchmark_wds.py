"""CLIP_benchmark's webdataset sets (`wds/<name>`), written by CLIP_benchmark's own writer
(`webdataset_builder.convert_retrieval_dataset` / `convert_dataset`) and prepared with `mmret
prepare wds --root DIR`: items, every caption in order, splits and labels as written; retrieval
scored by mmret and by CLIP_benchmark's own reader and recall code alike; zero-shot classification
with the set's classes and shipped templates; and each broken layout in one line."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
import tiny_models
import torch
from clip_benchmark.datasets.builder import build_wds_dataset, image_captions_collate_fn
from clip_benchmark.metrics import zeroshot_retrieval as cb_ret
from clip_benchmark.webdataset_builder import PIL_to_bytes, convert_dataset, convert_retrieval_dataset
from PIL import Image
from typer.testing import CliRunner

from mmret.cli import app
from mmret.common.items import open_item
from mmret.data import load_dataset
from mmret.inference.embeddings import write_run_embeddings
from mmret.inference.loaded import LoadedRun
from mmret.inference.zeroshot import zero_shot_run

# CLIP_benchmark's writer always starts 8 DataLoader workers; its reader leaves shardshuffle unset
pytestmark = [pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning"),
              pytest.mark.filterwarnings("ignore:WebDataset\\(shardshuffle:UserWarning")]
runner = CliRunner()
CLASSES = ["red apple", "green-leaf", "blue", "violet"]  # violet has no items: it still competes
COLOURS = [(220, 30, 30), (30, 200, 60), (40, 60, 220)]
TEMPLATES = ["a drawing of a {c}.", "a {c} shape"]


def picture(i: int, colour=None) -> Image.Image:
    """A 32x32 picture unique to `i` (its corner pixels encode it), in a class's colour if given."""
    img = Image.new("RGB", (32, 32), colour or (i * 13 % 256, i * 29 % 256, 90))
    img.putpixel((0, 0), (i % 256, i // 256, 7))
    return img


class Captioned(torch.utils.data.Dataset):
    """(picture, [captions]): one to three captions each, as a retrieval set has them."""

    def __init__(self, split: str, n: int, offset: int):
        self.items = [(picture(offset + i), [f"{split} picture {i} caption {j}" for j in range(1 + i % 3)])
                      for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


class Labelled(torch.utils.data.Dataset):
    """(picture, label) with `.classes` and `.templates`, as `convert_dataset` reads them."""

    classes, templates = CLASSES, TEMPLATES

    def __init__(self, n: int, offset: int):
        self.items = [(picture(offset + i, COLOURS[i % 3]), i % 3) for i in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


WRITE = dict(transform=PIL_to_bytes("webp"), image_format="webp", max_count=3, verbose=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("cbwds")
    ret, cls, data = root / "wds_retrieval", root / "wds_classes", root / "data"
    written = {"test": Captioned("test", 7, 0), "train": Captioned("train", 10, 100)}
    for split, ds in written.items():
        convert_retrieval_dataset(ds, split, str(ret), **WRITE)
    convert_retrieval_dataset(Captioned("extra", 2, 200), "extra", str(ret), **WRITE)  # not a split mmret has
    labelled = {"test": Labelled(9, 300), "train": Labelled(12, 400)}
    for split, ds in labelled.items():
        convert_dataset(ds, split, str(cls), **WRITE)
    outputs = {}
    for name, folder in (("cbret", ret), ("cbcls", cls)):
        out = runner.invoke(app, ["prepare", "wds", "--root", str(folder), "--name", name, "--val", "0.25",
                                  "--data-dir", str(data)])
        assert out.exit_code == 0, out.output
        outputs[name] = " ".join(out.stdout.split())
    return {"root": root, "ret": ret, "cls": cls, "data": data, "runs": root / "runs", "written": written,
            "labelled": labelled, "out": outputs, "clip": tiny_models.save_tiny_clip(root / "clip")}


def _pixels(img: Image.Image) -> bytes:
    return img.convert("RGB").tobytes()


def test_retrieval_items_captions_and_splits_are_as_written(world):
    ds = load_dataset("cbret", world["data"])
    images = ds.items.set_index("item_id")
    captions = ds.captions.groupby("item_id", sort=False)["caption"].apply(list)
    for split, written in world["written"].items():
        for i, (img, caps) in enumerate(written.items):
            item_id = f"{split}/s{i:07d}"
            assert captions[item_id] == caps  # all of them, in order
            assert images.loc[item_id, "path"].endswith(f"/{split}/{i // 3}.tar::s{i:07d}.webp")
            in_place = open_item(images.loc[item_id, "path"], ds.roots)  # read in place
            assert _pixels(Image.open(in_place)) == _pixels(img)
    assert (images["split"] == "test").sum() == 7  # exactly the set's test
    held = images[images.index.str.startswith("train/")]["split"].value_counts().to_dict()
    assert held == {"train": 8, "val": 2}  # --val 0.25 of train, no val folder
    assert len(ds.captions) == 13 + 19  # one to three captions for each of 7 + 10 pictures
    info = json.loads((world["data"] / "cbret" / "dataset.json").read_text())
    assert info["clip_benchmark"] == {"dataset_type": "retrieval", "shards": {"test": 3, "train": 4}}
    assert "classnames" not in info and "label" not in ds.items.columns
    assert ("1 other split" in world["out"]["cbret"]
            and "extra/: not train, val or test; left out" in world["out"]["cbret"])
    assert not any(p.suffix == ".webp" for p in (world["data"] / "cbret").rglob("*"))  # nothing unpacked


def test_classification_labels_classes_and_templates_are_as_written(world):
    ds = load_dataset("cbcls", world["data"])
    images = ds.items.set_index("item_id")
    for split, written in world["labelled"].items():
        for i, (_, label) in enumerate(written.items):
            assert images.loc[f"{split}/s{i:07d}", "label"] == CLASSES[label]
    captions = ds.captions.groupby("item_id")["caption"].apply(list)
    assert captions["test/s0000001"] == ["green-leaf"]  # the class name, as classnames.txt writes it
    assert ds.classes() == (CLASSES, CLASSES)  # every class, in CLIP_benchmark's order
    assert ds.info["templates"] == TEMPLATES
    by_split = ds.items.groupby("split")["label"].value_counts().unstack(fill_value=0)
    assert by_split.loc["test"].tolist() == [3, 3, 3] and by_split.loc["val"].tolist() == [1, 1, 1]


def test_retrieval_equals_clip_benchmark_reading_its_own_folder(world, monkeypatch):
    """CLIP_benchmark's `build_wds_dataset` reads the folder and its `evaluate` scores it, with the
    embeddings mmret computed for the same pictures and captions: the same recall at every k."""
    monkeypatch.setenv("MMRET_DATA_DIR", str(world["data"]))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(world["runs"]))
    out = runner.invoke(app, ["eval", "--zero-shot", str(world["clip"]), "--dataset", "cbret", "--recall-k", "1,2,5",
                              "--format", "json"])
    assert out.exit_code == 0, out.output
    (ours,) = json.loads(out.stdout)
    assert (ours["n_items"], ours["n_captions"]) == (7, 13)
    emb = write_run_embeddings(LoadedRun(zero_shot_run(str(world["clip"]), "cbret", world["data"], world["runs"])),
                               "cbret", "test", data_dir=world["data"])
    row_of = {_pixels(Image.open(open_item(p, emb.roots))): i for i, p in enumerate(emb.item_table["path"])}
    text_row = {c: i for i, c in enumerate(emb.caption_table["caption"])}
    theirs_ds = build_wds_dataset("cbret", transform=lambda img: torch.tensor(row_of[_pixels(img)]), split="test",
                                  data_dir=str(world["ret"]))
    loader = torch.utils.data.DataLoader(theirs_ds, batch_size=3, collate_fn=image_captions_collate_fn)

    class StandIn(torch.nn.Module):
        def encode_image(self, rows):  # CLIP_benchmark calls the open_clip name
            return torch.from_numpy(np.asarray(emb.items, np.float32))[rows]

        def encode_text(self, rows):
            return torch.from_numpy(np.asarray(emb.captions, np.float32))[rows]

    theirs = cb_ret.evaluate(StandIn(), loader, lambda texts: torch.tensor([text_row[t] for t in texts]), "cpu",
                             amp=False, recall_k_list=[1, 2, 5])
    for k in (1, 2, 5):
        assert ours["metrics"][f"t2i_r{k}"] == pytest.approx(theirs[f"image_retrieval_recall@{k}"], abs=1e-6)
        assert ours["metrics"][f"i2t_r{k}"] == pytest.approx(theirs[f"text_retrieval_recall@{k}"], abs=1e-6)


def test_zero_shot_classification_uses_the_sets_classes_and_templates(world, monkeypatch):
    monkeypatch.setenv("MMRET_DATA_DIR", str(world["data"]))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(world["runs"]))
    embedded: list[str] = []
    encode = LoadedRun.encode_texts
    monkeypatch.setattr(LoadedRun, "encode_texts", lambda self, texts: embedded.extend(texts) or encode(self, texts))
    args = ["eval", "--task", "classification", "--zero-shot", str(world["clip"]), "--dataset", "cbcls"]
    out = runner.invoke(app, args)
    assert out.exit_code == 0, out.output
    assert "9 items into 4 classes, 2 prompts each (the dataset's templates)" in " ".join(out.stdout.split())
    assert embedded == [t.format(c=c) for c in CLASSES for t in TEMPLATES]  # names verbatim: "green-leaf"
    (rec,) = json.loads(runner.invoke(app, args + ["--format", "json"]).stdout)
    assert (rec["classes"], rec["counts"], rec["templates_from"]) == (CLASSES, [3, 3, 3, 0], "dataset")
    assert rec["chance"]["acc1"] == pytest.approx(1 / 4)
    cb = json.loads(runner.invoke(app, args + ["--format", "clip-benchmark"]).stdout)
    assert (cb["dataset"], cb["task"], cb["classnames"], cb["templates"]) == ("wds/cbcls", "zeroshot_classification",
                                                                           CLASSES, TEMPLATES)
    assert (world["runs"] / "zeroshot-clip" / "eval" / "clip_benchmark"
            / "wds_cbcls_zero-shot_clip_en_zeroshot_classification.json").is_file()
    (world["root"] / "mine.txt").write_text("itap of a {c}\n")
    embedded.clear()
    (rec,) = json.loads(runner.invoke(app, args + ["--templates", str(world["root"] / "mine.txt"),
                                                   "--format", "json"]).stdout)
    assert rec["templates_per_class"] == 1 and embedded == [f"itap of a {c}" for c in CLASSES]  # --templates wins


def _broken(world, tmp_path, which: str):
    root = tmp_path / "set"
    shutil.copytree(world["ret"] if which != "classes" else world["cls"], root)
    return root


@pytest.mark.parametrize("damage, line", [
    (lambda r: (r / "test" / "nshards.txt").unlink(),
     "error: {r}/test/nshards.txt is missing: CLIP_benchmark reads how many shards test/ holds from it (write the "
     "number, e.g. `ls {r}/test/*.tar | wc -l > {r}/test/nshards.txt`)"),
    (lambda r: (r / "test" / "1.tar").write_bytes(b"\x00not a tar" * 30),
     "error: cannot index shard {r}/test/1.tar (an uncompressed tar is needed): truncated header; write the shard "
     "again, or remove it and correct test/nshards.txt"),
    (lambda r: (r / "test" / "nshards.txt").write_text("5\n"),
     "error: {r}/test/nshards.txt says 5 shards but 2 are missing (first: {r}/test/3.tar); copy them, or correct "
     "nshards.txt"),
    (lambda r: (r / "test" / "nshards.txt").write_text("three\n"),
     "error: {r}/test/nshards.txt must hold the number of shards (a whole number, at least 1), got 'three'"),
    (lambda r: (r / "dataset_type.txt").write_text("multilabel\n"),
     "error: {r}/dataset_type.txt says multilabel: multi-label sets (.npy labels) are not read; prepare a retrieval "
     "or single-label classification set"),
    (lambda r: (r / "dataset_type.txt").unlink(),
     "error: {r} is a CLIP_benchmark classification set (no dataset_type.txt saying retrieval) without "
     "classnames.txt: add it, one class name per line in label order"),
    (lambda r: [shutil.rmtree(r / d) for d in ("test", "train", "extra")],
     "error: {r} holds no train, val or test folder of CLIP_benchmark shards (test/nshards.txt beside "
     "test/0.tar, ...)"),
])
def test_a_broken_layout_is_one_line(world, tmp_path, damage, line):
    root = _broken(world, tmp_path, "retrieval")
    damage(root)
    out = runner.invoke(app, ["prepare", "wds", "--root", str(root), "--data-dir", str(tmp_path / "data")])
    assert (out.exit_code, out.stderr.strip()) == (1, line.format(r=root))
    assert not (tmp_path / "data" / "wds").exists()  # nothing half-written


def test_a_label_beyond_the_class_names_is_reported(world, tmp_path):
    root = _broken(world, tmp_path, "classes")
    (root / "classnames.txt").write_text("red apple\ngreen-leaf\n")  # label 2 (blue) has no name now
    out = runner.invoke(app, ["prepare", "wds", "--root", str(root), "--data-dir", str(tmp_path / "data")])
    assert out.exit_code == 0, out.output
    assert "7 bad label" in " ".join(out.stdout.split())  # 3 of test's 9, 4 of train's 12
    assert sorted(set(load_dataset("wds", tmp_path / "data").items["label"])) == ["green-leaf", "red apple"]


def test_a_folder_that_is_no_benchmark_set_is_one_line(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "notes.txt").write_text("hello")
    out = runner.invoke(app, ["prepare", "wds", "--root", str(tmp_path / "raw"), "--data-dir", str(tmp_path / "data")])
    assert (out.exit_code, out.stderr.strip()) == (1, (
        f"error: --root {tmp_path / 'raw'} is a folder but no CLIP_benchmark webdataset (dataset_type.txt, "
        f"test/nshards.txt, test/0.tar, ...); for img2dataset shards give a pattern such as "
        f"'{tmp_path / 'raw'}/{{00000..00099}}.tar'"))


@pytest.mark.parametrize("cls, label, problem", [(b"2", 2, None), (b" 0\n", 0, None), (b"-1", None, "bad label"),
                                                 (b"two", None, "bad label"), (None, None, "no label")])
def test_a_samples_class_index(cls, label, problem):
    from mmret.data.readers.wds import summarize

    png = io.BytesIO()
    picture(1).save(png, "png")
    sample = {"__key__": "s0000001", "__url__": "/x/test/0.tar", "png": png.getvalue(),
              **({"cls": cls} if cls is not None else {})}
    out = summarize(sample, labels=True)
    assert out.get("label") == label and [p["kind"] for p in out["problems"]] == ([problem] if problem else [])
    assert out["columns"] == {"width": 32, "height": 32} and "captions" not in out
