"""`mmret prepare classes`: class folders and label tables read into a prepared dataset with a
`label` column and stratified splits, and every kind of bad input."""

from __future__ import annotations

import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from mmret.cli import app
from mmret.data import PrepareConfig, load_dataset, prepare
from mmret.data.readers.classes import class_name
from mmret.errors import MmretError

runner = CliRunner()


def picture(path, color=(200, 10, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), color).save(path)
    return path


def class_folders(root, counts=None):
    """root/<class>/<n>.png, with a nested subfolder in the first class."""
    counts = counts or {"red_apple": 10, "green-leaf": 10, "blue": 3}
    for label, n in counts.items():
        for i in range(n):
            sub = "nested/" if label == "red_apple" and i % 2 else ""
            picture(root / label / f"{sub}{i}.png")
    return root


def run(root, data_dir, **kw):
    return prepare(PrepareConfig(source="classes", root=root, data_dir=data_dir, **kw))


def test_class_folders_give_labels_captions_and_stratified_splits(tmp_path, data_dir):
    root = class_folders(tmp_path / "raw")
    (root / "blue" / "0.txt").write_text("a small blue square\nblue tile\n")
    result = run(root, data_dir, val=0.2, test=0.2)
    ds = load_dataset("classes", data_dir)
    assert sorted(set(ds.items["label"])) == ["blue", "green-leaf", "red_apple"]
    assert ds.items.set_index("item_id").loc["red_apple/nested/1.png", "label"] == "red_apple"
    by_class = pd.crosstab(ds.items["label"], ds.items["split"])
    assert by_class.loc["red_apple"].to_dict() == {"test": 2, "train": 6, "val": 2}
    assert by_class.loc["blue"].to_dict() == {"test": 1, "train": 1, "val": 1}  # a rare class still reaches test
    captions = ds.captions.groupby("item_id")["caption"].apply(list)
    assert captions["blue/0.png"] == ["a small blue square", "blue tile"]  # its sidecar
    assert captions["red_apple/2.png"] == ["red apple"] and captions["green-leaf/0.png"] == ["green leaf"]
    assert "stratified by class" in result.split_note and result.problems == []


def test_same_seed_same_split_and_unlabelled_folders_split_as_before(tmp_path, data_dir):
    root = class_folders(tmp_path / "raw")
    run(root, data_dir, name="a")
    run(root, data_dir, name="b")
    a, b = load_dataset("a", data_dir).items, load_dataset("b", data_dir).items
    assert a["split"].tolist() == b["split"].tolist()
    for path in (tmp_path / "raw").rglob("*.png"):
        path.with_suffix(".txt").write_text("a caption")
    prepare(PrepareConfig(source="folder", root=root, data_dir=data_dir, name="plain"))
    assert "label" not in load_dataset("plain", data_dir).items.columns


def test_label_table_with_captions_official_split_and_problems(tmp_path, data_dir):
    root = tmp_path / "raw"
    for name in ("a.png", "b.png", "c.png", "d.png", "e.png"):
        picture(root / "pics" / name)
    pd.DataFrame({
        "image": ["pics/a.png", "pics/a.png", "pics/b.png", "pics/c.png", "pics/c.png", "pics/d.png", "pics/e.png", ""],
        "label": ["cat", "cat", "dog", "cat", "dog", "", "dog", "cat"],
        "caption": ["a cat asleep", "a grey cat", None, None, None, "x", None, None],
        "split": ["test", "test", "train", "", "", "", "TRAIN", ""],
    }).to_csv(root / "labels.csv", index=False)
    result = run(root, data_dir)
    ds = load_dataset("classes", data_dir)
    assert ds.items.set_index("item_id")["label"].to_dict() == {"pics/a.png": "cat", "pics/b.png": "dog",
                                                                  "pics/e.png": "dog"}
    assert ds.items.set_index("item_id")["split"].to_dict() == {"pics/a.png": "test", "pics/b.png": "train",
                                                                  "pics/e.png": "train"}
    assert ds.captions[ds.captions.item_id == "pics/a.png"]["caption"].tolist() == ["a cat asleep", "a grey cat"]
    assert ds.captions[ds.captions.item_id == "pics/b.png"]["caption"].tolist() == ["dog"]
    kinds = sorted((p.kind, p.item) for p in result.problems)
    assert kinds == [("conflicting labels", "pics/c.png"), ("empty split", "val"), ("no file", "row 9"),
                     ("no label", "pics/d.png")]  # no row says val, and no picture is left to draw it from
    assert result.split_note.startswith("official split from labels.csv where given")


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_label_table_formats(tmp_path, data_dir, fmt):
    root = tmp_path / "raw"
    frame = pd.DataFrame({"image": [f"{i}.png" for i in range(6)], "label": ["x", "y"] * 3})
    for name in frame["image"]:
        picture(root / name)
    frame.to_json(root / "labels.jsonl", orient="records", lines=True) if fmt == "jsonl" else \
        frame.to_parquet(root / "labels.parquet")
    run(root, data_dir)
    assert sorted(set(load_dataset("classes", data_dir).items["label"])) == ["x", "y"]


def test_loose_files_and_empty_class_folders_are_reported(tmp_path, data_dir):
    root = class_folders(tmp_path / "raw", {"a": 3, "b": 3})
    picture(root / "stray.png")
    (root / "empty").mkdir()
    (root / ".hidden").mkdir()
    picture(root / ".hidden" / "x.png")
    result = run(root, data_dir)
    assert sorted((p.kind, p.item) for p in result.problems) == [("empty class", "empty"), ("no class", "stray.png")]
    assert result.counts["total"]["items"] == 6


@pytest.mark.parametrize("layout, message", [
    ({}, r"classification needs at least two classes in .*, found none: put the items in one subfolder per class"),
    ({"only": 4}, r"classification needs at least two classes in .*, found only 'only'"),
])
def test_fewer_than_two_classes(tmp_path, data_dir, layout, message):
    root = class_folders(tmp_path / "raw", layout) if layout else tmp_path / "raw"
    root.mkdir(exist_ok=True)
    with pytest.raises(MmretError, match=message):
        run(root, data_dir)
    assert not (data_dir / "classes").exists()


def test_bad_label_tables(tmp_path, data_dir):
    root = tmp_path / "raw"
    picture(root / "a.png")
    (root / "labels.csv").write_text("file,class\na.png,cat\n")
    with pytest.raises(MmretError, match="labels.csv needs columns 'image' and 'label'; it has file, class"):
        run(root, data_dir)
    (root / "labels.csv").write_text("image,label,split\na.png,cat,holdout\n")
    with pytest.raises(MmretError,
                       match=r"labels.csv row 2: split must be train, val or test \(or empty\), got 'holdout'"):
        run(root, data_dir)


def test_missing_pictures_in_a_table_are_dropped_with_a_reason(tmp_path, data_dir):
    root = tmp_path / "raw"
    for i in range(4):
        picture(root / f"{i}.png")
    pd.DataFrame({"image": ["0.png", "1.png", "2.png", "3.png", "gone.png"],
                  "label": ["a", "b", "a", "b", "a"]}).to_csv(root / "labels.csv", index=False)
    result = run(root, data_dir)
    (problem,) = [p for p in result.problems if p.kind != "empty split"]  # four pictures: too few for val and test
    assert problem.kind == "missing image" and problem.item.endswith("gone.png") and problem.reason == "file not found"


def test_cli_prepare_classes(tmp_path, data_dir):
    root = class_folders(tmp_path / "raw")
    result = runner.invoke(app, ["prepare", "classes", "--root", str(root)])
    assert result.exit_code == 0, result.output
    assert "stratified by class" in result.stdout
    assert "classes (items sorted into class folders" in " ".join(
        runner.invoke(app, ["prepare", "--help"]).stdout.split())


def test_class_name_reads_separators_as_spaces():
    assert class_name("red_apple") == "red apple" and class_name("Sea-Lion__2") == "Sea Lion 2"
