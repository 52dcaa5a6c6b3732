"""webdataset shards in img2dataset's layout (written here, with a corrupt member and a shard
without captions) prepare, encode (by shards, more workers than tar shards) and train, reading
pictures straight from the tars; a table address that leaves its root is refused."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pandas as pd
import pytest
import tiny_models
from PIL import Image
from typer.testing import CliRunner

from mmret import training
from mmret.cli import app
from mmret.common.items import open_item, split_address
from mmret.data import load_dataset
from mmret.encoders import load_image_encoder
from mmret.errors import MmretError
from mmret.features.shards import encode_shard
from mmret.runs import RunConfig, with_overrides

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("square", "circle")


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _picture(colour: str, shape: str, fmt: str) -> bytes:
    img = Image.new("RGB", (40, 32), (255, 255, 255))
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    (draw.rectangle if shape == "square" else draw.ellipse)((8, 6, 32, 26), fill=COLOURS[colour])
    out = io.BytesIO()
    img.save(out, fmt)
    return out.getvalue()


def write_shards(folder) -> None:
    """img2dataset's layout: 00000.tar and 00001.tar with key.jpg|png + key.txt + key.json (in
    00001 some captions only in the json), a corrupt member in 00000, and 00002.tar without captions."""
    folder.mkdir(parents=True)
    n = 0
    for shard in range(3):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as tar:
            for colour in COLOURS:
                for shape in SHAPES:
                    for _ in range(2):
                        key, fmt = f"{shard:05d}{n:04d}", ("jpeg", "jpg") if n % 2 else ("png", "png")
                        n += 1
                        _add(tar, f"{key}.{fmt[1]}", _picture(colour, shape, fmt[0]))
                        caption = f"a {colour} {shape}"
                        meta = {"key": key, "status": "success", "caption": caption}
                        if shard == 0 or (shard == 1 and n % 3):
                            _add(tar, f"{key}.txt", caption.encode())
                        if shard != 2:
                            _add(tar, f"{key}.json", json.dumps(meta).encode())
            if shard == 0:
                _add(tar, "000009999.jpg", b"\xff\xd8\xff\xe0 truncated, not a picture")
                _add(tar, "000009999.txt", b"a broken picture")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("wds")
    write_shards(root / "shards")
    data = root / "data"
    result = CliRunner().invoke(app, ["prepare", "wds", "--root", str(root / "shards" / "{00000..00002}.tar"),
                                      "--data-dir", str(data), "--val", "0.15", "--test", "0.15"])
    assert result.exit_code == 0, result.output
    return root, data, result.output


def test_prepare_reads_the_shards_in_place_and_reports_the_bad_member(shards):
    root, data, output = shards
    ds = load_dataset("wds", data)
    assert len(ds.items) == 32  # 16 + 16 captioned (json captions count); the 16 of 00002 have none
    assert "1 broken image" in output and "16 no caption" in output
    info = json.loads((data / "wds" / "dataset.json").read_text())
    broken = [p for p in info["problems"] if p["kind"] == "broken image"]
    assert len(broken) == 1 and broken[0]["item"].endswith("00000.tar::000009999.jpg")
    stored = pd.read_parquet(data / "wds" / "images.parquet")["path"]
    assert stored.str.match(r"^0000[01]\.tar::\d+\.(png|jpg)$").all()  # relative to the shards' folder
    assert not any(p.suffix in (".png", ".jpg") for p in (data / "wds").rglob("*"))  # nothing unpacked
    first = ds.items["path"][0]
    shard, member = split_address(first)
    assert shard.startswith(str(root / "shards")) and Image.open(open_item(first, ds.roots)).size == (40, 32)


def test_encode_by_shards_and_train_from_the_tars(shards, tmp_path):
    _, data, _ = shards
    ds = load_dataset("wds", data)
    vit = load_image_encoder(str(tiny_models.save_tiny_timm_vit(tmp_path / "vit")))
    # 2 processes x 3 DataLoader workers over 2 tar shards with items: rows are split, never shards
    parts = [encode_shard(ds, vit, "images", (i, 2), batch_size=4, workers=3, shard_rows=8, precision="fp32")
             for i in range(2)]
    feats = parts[1].sealed
    assert feats is not None and len(feats) == 32 and feats.valid.all() and np.isfinite(feats.pooled).all()
    cfg = with_overrides(RunConfig(), dict(method="scratch", dataset="wds", data_dir=data, runs_dir=tmp_path / "runs",
                                           image_model="resnet10t", image_size=32, text_width=32, text_depth=1,
                                           linformer_k=4, embed_dim=16, vocab_size=300, max_length=12, batch_size=8,
                                           epochs=2, patience=0, workers=3, name="from-tars"))
    result = training.train(cfg)  # pictures decoded from the tar members in DataLoader workers
    history = pd.read_parquet(result.run_dir / "metrics.parquet")
    assert len(history) == 2 and np.isfinite(history["train_loss"]).all()


def test_an_address_that_leaves_the_root_is_refused(shards, tmp_path):
    _, data, _ = shards
    import shutil

    shutil.copytree(data / "wds", tmp_path / "data" / "evil")
    table = pd.read_parquet(tmp_path / "data" / "evil" / "images.parquet")
    table.loc[0, "path"] = "../../etc/passwd.tar::x.png"
    table.to_parquet(tmp_path / "data" / "evil" / "images.parquet", index=False)
    with pytest.raises(MmretError, match="outside the dataset's root"):
        load_dataset("evil", tmp_path / "data")
    table.loc[0, "path"] = "/etc/x.tar::x.png"
    table.to_parquet(tmp_path / "data" / "evil" / "images.parquet", index=False)
    with pytest.raises(MmretError, match="outside the dataset's root"):
        load_dataset("evil", tmp_path / "data")


def test_missing_shards_are_one_line(tmp_path):
    result = CliRunner().invoke(app, ["prepare", "wds", "--root", str(tmp_path / "{0..3}.tar"),
                                      "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and "4 of 4 shards of" in result.output
