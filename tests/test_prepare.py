"""Every reader on fixture files in the exact real formats, and every kind of bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from mmret.data import PrepareConfig, load_dataset, prepare
from mmret.data.tables import split_counts
from mmret.errors import MmretError


def make_image(path, size=(8, 6), color=(200, 10, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else 128).save(path)
    return path


def run(source, root, data_dir, **kw):
    return prepare(PrepareConfig(source=source, root=root, data_dir=data_dir, **kw))


# ------------------------------------------------------------------ Flickr30k

RESULTS_CSV = """image_name| comment_number| comment
1000092795.jpg| 0| Two young guys with shaggy hair look at their hands while hanging out in the yard .
1000092795.jpg| 1| Two young , White males are outside near many bushes .
1000092795.jpg| 2| Two men in green shirts are standing in a yard .
1000092795.jpg| 3| A man in a blue shirt standing in a garden .
1000092795.jpg| 4| Two friends enjoy time spent together .
2199200615.jpg| 0| A dog with a red collar runs in a forest in the middle of winter .
2199200615.jpg| 1| A brown and white dog runs through the woods .
2199200615.jpg| 2| A dog running in the snow .
2199200615.jpg| 3| A dog runs through the snow covered trees .
2199200615.jpg| 4   A dog runs across the grass .
"""


def flickr_images(root, names=("1000092795", "2199200615")):
    for name in names:
        make_image(root / "flickr30k_images" / f"{name}.jpg")


def test_flickr30k_results_csv_recovers_the_malformed_row(tmp_path, data_dir):
    root = tmp_path / "f30k"
    flickr_images(root)
    (root / "results.csv").write_text(RESULTS_CSV)
    result = run("flickr30k", root, data_dir)
    ds = load_dataset("flickr30k", data_dir)
    caps = ds.captions[ds.captions.item_id == "2199200615"]["caption"].tolist()
    assert len(caps) == 5 and caps[-1] == "A dog runs across the grass ."
    assert (ds.captions[ds.captions.item_id == "1000092795"]["caption"].iloc[1]
            == "Two young , White males are outside near many bushes .")
    assert [p.kind for p in result.problems] == ["recovered line"]
    assert "seeded random split" in result.split_note
    assert result.counts["total"] == {"items": 2, "captions": 10, "dropped items": 0}


def karpathy_entry(name, split, captions, **extra):
    return {"filename": name, "split": split, "sentences": [{"raw": c, "tokens": c.split()} for c in captions], **extra}


def test_flickr30k_karpathy_json_keeps_its_split(tmp_path, data_dir):
    root = tmp_path / "f30k"
    flickr_images(root, ["1", "2", "3", "4"])
    data = {"dataset": "flickr30k", "images": [
        karpathy_entry("1.jpg", "train", ["a b", "c d"]), karpathy_entry("2.jpg", "val", ["e f"]),
        karpathy_entry("3.jpg", "test", ["g h"]), karpathy_entry("4.jpg", "train", ["i j"])]}
    (root / "dataset_flickr30k.json").write_text(json.dumps(data))
    result = run("flickr30k", root, data_dir)
    images = load_dataset("flickr30k", data_dir).items
    assert dict(zip(images.item_id, images.split)) == {"1": "train", "2": "val", "3": "test", "4": "train"}
    assert result.split_note.startswith("Karpathy split")


def test_flickr30k_clip_benchmark_txt_files_with_commas_in_captions(tmp_path, data_dir):
    root = tmp_path / "f30k"
    flickr_images(root, ["10", "20", "30"])
    (root / "flickr30k_train_karpathy.txt").write_text(
        "image,caption\n10.jpg,A man, a plan, a canal.\n10.jpg,Another one.\n")
    (root / "flickr30k_val_karpathy.txt").write_text("image,caption\n20.jpg,Val caption.\n")
    (root / "flickr30k_test_karpathy.txt").write_text("image,caption\n30.jpg,Test caption.\n")
    run("flickr30k", root, data_dir)
    ds = load_dataset("flickr30k", data_dir)
    assert ds.captions.caption.tolist() == ["A man, a plan, a canal.", "Another one.", "Val caption.", "Test caption."]
    assert ds.items.split.tolist() == ["train", "val", "test"]


def test_random_split_sizes_follow_karpathy_for_full_flickr30k():
    assert split_counts(31783, (1014, 1000, 31014)) == (1014, 1000)
    assert split_counts(100, (1014, 1000, 31014)) == (3, 3)
    assert split_counts(500, (0.1, 0.1)) == (50, 50)
    assert split_counts(5, (0.1, 0.1)) == (1, 1)


# ------------------------------------------------------------------ COCO

def coco_fixture(root):
    make_image(root / "train2014" / "COCO_train2014_000000000009.jpg")
    make_image(root / "val2014" / "COCO_val2014_000000000042.jpg")
    make_image(root / "val2014" / "COCO_val2014_000000000073.jpg")
    train = {"images": [{"id": 9, "file_name": "COCO_train2014_000000000009.jpg", "width": 8, "height": 6}],
             "annotations": [{"id": 100 + i, "image_id": 9, "caption": f"train caption {i}"} for i in range(6)]}
    val = {"images": [{"id": 42, "file_name": "COCO_val2014_000000000042.jpg"},
                      {"id": 73, "file_name": "COCO_val2014_000000000073.jpg"}],
           "annotations": [{"id": 200, "image_id": 42, "caption": "val caption"},
                           {"id": 201, "image_id": 73, "caption": "restval caption"}]}
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "captions_train2014.json").write_text(json.dumps(train))
    (root / "annotations" / "captions_val2014.json").write_text(json.dumps(val))


def test_coco_keeps_all_six_captions_and_karpathy_split_with_restval_in_train(tmp_path, data_dir):
    root = tmp_path / "coco"
    coco_fixture(root)
    karpathy = {"images": [
        karpathy_entry("COCO_train2014_000000000009.jpg", "train", ["k"] * 5, cocoid=9, filepath="train2014"),
        karpathy_entry("COCO_val2014_000000000042.jpg", "test", ["k"] * 5, cocoid=42, filepath="val2014"),
        karpathy_entry("COCO_val2014_000000000073.jpg", "restval", ["k"] * 5, cocoid=73, filepath="val2014")]}
    (root / "dataset_coco.json").write_text(json.dumps(karpathy))
    run("coco", root, data_dir)
    ds = load_dataset("coco", data_dir)
    assert (ds.captions.item_id == "9").sum() == 6
    assert dict(zip(ds.items.item_id, ds.items.split)) == {"9": "train", "42": "test", "73": "train"}
    assert ds.captions[ds.captions.item_id == "42"].caption.tolist() == ["val caption"]


def test_coco_official_only_splits_val2014_at_random(tmp_path, data_dir):
    root = tmp_path / "coco"
    coco_fixture(root)
    result = run("coco", root, data_dir)
    images = load_dataset("coco", data_dir).items
    assert images.set_index("item_id").loc["9", "split"] == "train"
    assert "val2014 split at random" in result.split_note


# ------------------------------------------------------------------ Flickr8k

def test_flickr8k_token_file_with_official_lists(tmp_path, data_dir):
    root = tmp_path / "f8k"
    names = ["1000268201_693b08cb0e", "1001773457_577c3a7d70", "1002674143_1b742ab4b8", "99_extra"]
    for n in names:
        make_image(root / "Flicker8k_Dataset" / f"{n}.jpg")
    lines = [f"{n}.jpg#{i}\tcaption {i} of {n} ." for n in names for i in range(5)]
    (root / "Flickr8k_text").mkdir()
    (root / "Flickr8k_text" / "Flickr8k.token.txt").write_text("\n".join(lines) + "\n")
    for split, n in zip(("train", "dev", "test"), names):
        (root / "Flickr8k_text" / f"Flickr_8k.{split}Images.txt").write_text(f"{n}.jpg\n")
    result = run("flickr8k", root, data_dir)
    ds = load_dataset("flickr8k", data_dir)
    assert dict(zip(ds.items.item_id, ds.items.split)) == dict(zip(names, ["train", "val", "test", "train"]))
    assert len(ds.captions) == 20
    assert result.dropped == {"not in a split list": 1}


# ------------------------------------------------------------------ folder

def test_folder_with_sidecar_captions_in_subfolders(tmp_path, data_dir):
    root = tmp_path / "pics"
    for i, ext in enumerate(["jpg", "png", "webp", "bmp", "gif"]):
        make_image(root / f"sub{i % 2}" / f"img{i}.{ext}")
        (root / f"sub{i % 2}" / f"img{i}.txt").write_text(f"first caption {i}\n\n second caption {i}  \n")
    run("folder", root, data_dir, val=0.2, test=0.2)
    ds = load_dataset("folder", data_dir)
    assert len(ds.items) == 5 and len(ds.captions) == 10
    assert ds.captions.caption.iloc[1] == "second caption 0"
    assert sorted(ds.items.split.value_counts().items()) == [("test", 1), ("train", 3), ("val", 1)]


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_folder_with_one_captions_table(tmp_path, data_dir, fmt):
    root = tmp_path / "pics"
    make_image(root / "a.jpg")
    make_image(root / "b" / "c.png")
    frame = pd.DataFrame({"image": ["a.jpg", "b/c.png", "a.jpg"], "caption": ["one, with comma", "two", "three"]})
    if fmt == "csv":
        frame.to_csv(root / "captions.csv", index=False)
    elif fmt == "jsonl":
        frame.to_json(root / "captions.jsonl", orient="records", lines=True)
    else:
        frame.to_parquet(root / "captions.parquet")
    run("folder", root, data_dir)
    ds = load_dataset("folder", data_dir)
    assert ds.captions.groupby("item_id").caption.apply(list).to_dict() == {"a.jpg": ["one, with comma", "three"],
                                                                            "b/c.png": ["two"]}


def test_folder_table_without_the_needed_columns(tmp_path, data_dir):
    root = tmp_path / "pics"
    make_image(root / "a.jpg")
    (root / "captions.csv").write_text("file,text\na.jpg,hello\n")
    with pytest.raises(MmretError, match="captions.csv needs columns 'image' and 'caption'; it has file, text"):
        run("folder", root, data_dir)


def test_split_is_deterministic_for_a_seed(tmp_path, data_dir):
    root = tmp_path / "pics"
    for i in range(40):
        make_image(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"caption {i}")
    run("folder", root, data_dir, name="a", seed=3)
    run("folder", root, data_dir, name="b", seed=3)
    run("folder", root, data_dir, name="c", seed=4)
    a, b, c = (load_dataset(n, data_dir).items.split.tolist() for n in "abc")
    assert a == b and a != c


# ------------------------------------------------------------------ example

def test_example_is_deterministic_and_captions_describe_distinct_scenes(data_dir):
    run("example", None, data_dir, count=40, name="e1")
    run("example", None, data_dir, count=40, name="e2")
    e1, e2 = load_dataset("e1", data_dir), load_dataset("e2", data_dir)
    assert e1.captions.caption.tolist() == e2.captions.caption.tolist()
    assert (e1.path / "images" / "00000.png").read_bytes() == (e2.path / "images" / "00000.png").read_bytes()
    first = e1.captions.groupby("item_id").caption.first()
    assert first.is_unique and len(first) == 40
    assert (e1.captions.groupby("item_id").size() == 5).all()
    assert e1.items.path.iloc[0] == str(e1.path / "images" / "00000.png")


def test_example_count_beyond_distinct_scenes(data_dir):
    with pytest.raises(MmretError, match="--count can be at most 612"):
        run("example", None, data_dir, count=1000)


# ------------------------------------------------------------------ bad input

def folder_with(root, files: dict):
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, Image.Image):
            content.save(path)
        else:
            path.write_bytes(content)


def test_bad_captions_are_reported_not_fatal(tmp_path, data_dir):
    root = tmp_path / "pics"
    img = Image.new("RGB", (5, 5))
    folder_with(root, {
        "ok.png": img, "ok.txt": b"a fine caption\nA Fine Caption\n",
        "empty.png": img, "empty.txt": b"\n  \n",
        "latin.png": img, "latin.txt": "un caf\xe9".encode("cp1252"),
        "garbage.png": img, "garbage.txt": b"\x81\x8d\x8f",
        "nocap.png": img,
    })
    result = run("folder", root, data_dir)
    ds = load_dataset("folder", data_dir)
    assert dict(zip(ds.captions.item_id, ds.captions.caption)) == {"ok.png": "a fine caption", "latin.png": "un café"}
    assert result.dropped == {"caption not UTF-8": 2, "duplicate caption": 1, "empty caption": 1, "no caption": 2,
                              "empty split": 2}  # five pictures are too few for a val and a test share


def test_missing_and_broken_images_are_dropped_with_a_reason(tmp_path, data_dir):
    root = tmp_path / "f30k"
    flickr_images(root, ["1000092795"])  # 2199200615.jpg is missing
    (root / "results.csv").write_text(RESULTS_CSV)
    result = run("flickr30k", root, data_dir)
    assert result.counts["total"]["items"] == 1
    assert ([(p.kind, p.reason) for p in result.problems if p.kind == "missing image"]
            == [("missing image", "file not found")])


def test_check_images_drops_truncated_zero_byte_and_bomb(tmp_path, data_dir, monkeypatch):
    root = tmp_path / "pics"
    good = Image.new("RGB", (40, 40), (1, 2, 3))
    folder_with(root, {"good.png": good, "good.txt": b"good", "zero.jpg": b"", "zero.txt": b"zero",
                       "notimage.jpg": b"hello", "notimage.txt": b"text"})
    noise = Image.effect_noise((200, 200), 50).convert("RGB")  # big enough that half keeps the header
    noise.save(root / "full.jpg", quality=95)
    data = (root / "full.jpg").read_bytes()
    (root / "trunc.jpg").write_bytes(data[: len(data) // 2])
    (root / "trunc.txt").write_text("truncated")
    (root / "full.jpg").unlink()
    huge = Image.new("RGB", (400, 400))
    folder_with(root, {"bomb.png": huge, "bomb.txt": b"bomb"})
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # 400x400 > 2 x 50,000: a "bomb"; 200x200 is not
    without = run("folder", root, data_dir, name="quick")
    assert without.counts["total"]["items"] == 2  # header read: good + truncated pass, bomb caught
    result = run("folder", root, data_dir, name="checked", check_items=True)
    reasons = {Path(p.item).name: p.reason for p in result.problems}
    assert load_dataset("checked", data_dir).items.item_id.tolist() == ["good.png"]
    assert reasons["zero.jpg"] == "empty file (0 bytes)"
    assert reasons["notimage.jpg"] == "not an image PIL can read"
    assert reasons["bomb.png"].startswith("over the limit of")  # PIL's bomb guard, said as --max-pixels says it
    assert reasons["trunc.jpg"].startswith("cannot decode")


def test_root_with_no_recognisable_format_names_the_expected_files(tmp_path, data_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MmretError) as e:
        run("flickr30k", tmp_path / "empty", data_dir)
    assert str(e.value) == (f"no Flickr30k annotations under {tmp_path / 'empty'}: expected dataset_flickr30k.json, "
                            "flickr30k_{train,val,test}_karpathy.txt or results.csv")
    with pytest.raises(MmretError, match="expected Flickr8k.token.txt"):
        run("flickr8k", tmp_path / "empty", data_dir)
    with pytest.raises(MmretError, match="expected captions_train2014.json"):
        run("coco", tmp_path / "empty", data_dir)
    with pytest.raises(MmretError, match="no captioned pictures or sounds under"):
        run("folder", tmp_path / "empty", data_dir)


def test_all_images_unusable_writes_nothing(tmp_path, data_dir):
    root = tmp_path / "pics"
    folder_with(root, {"a.png": b"", "a.txt": b"cap"})
    with pytest.raises(MmretError, match="no usable images .*1 broken image"):
        run("folder", root, data_dir)
    assert not (data_dir / "folder").exists()
    assert [p.name for p in data_dir.iterdir()] == []  # no temporary folder left behind


def test_existing_dataset_refused_then_replaced_with_force(tmp_path, data_dir):
    run("example", None, data_dir, count=20)
    before = (data_dir / "example" / "dataset.json").read_text()
    with pytest.raises(MmretError, match="dataset 'example' already exists at .*; pass --force to replace it"):
        run("example", None, data_dir, count=30)
    assert (data_dir / "example" / "dataset.json").read_text() == before
    run("example", None, data_dir, count=30, force=True)
    assert len(load_dataset("example", data_dir).items) == 30


def test_failed_force_leaves_the_old_dataset_untouched(tmp_path, data_dir):
    run("example", None, data_dir, count=20)
    before = (data_dir / "example" / "images.parquet").read_bytes()
    with pytest.raises(MmretError):
        prepare(PrepareConfig(source="folder", root=tmp_path, name="example", force=True, data_dir=data_dir))
    assert (data_dir / "example" / "images.parquet").read_bytes() == before


def test_interrupted_prepare_leaves_nothing(tmp_path, data_dir, monkeypatch):
    import mmret.data.create as datasets

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(datasets, "to_tables", boom)
    with pytest.raises(KeyboardInterrupt):
        run("example", None, data_dir, count=20)
    assert list(data_dir.iterdir()) == []


def test_dataset_json_records_arguments_counts_and_problems(tmp_path, data_dir):
    root = tmp_path / "f30k"
    flickr_images(root)
    (root / "results.csv").write_text(RESULTS_CSV)
    run("flickr30k", root, data_dir, seed=7)
    info = json.loads((data_dir / "flickr30k" / "dataset.json").read_text())
    assert info["arguments"]["seed"] == 7 and info["source"] == "flickr30k"
    assert info["counts"]["total"]["captions"] == 10
    assert info["problems"][0]["kind"] == "recovered line"


def test_bad_config_values_name_the_option():
    with pytest.raises(MmretError, match=r"--val must be a fraction in \[0, 1\), got 1.5"):
        PrepareConfig(source="folder", val=1.5)
    with pytest.raises(MmretError, match="--val \\+ --test must leave a training split"):
        PrepareConfig(source="folder", val=0.5, test=0.5)
    with pytest.raises(MmretError, match="--name 'a/b' may hold only"):
        PrepareConfig(source="folder", name="a/b")


def test_load_dataset_that_was_never_prepared(data_dir):
    with pytest.raises(MmretError, match=r"no prepared dataset 'nope' in .*; run `mmret prepare` first"):
        load_dataset("nope", data_dir)
