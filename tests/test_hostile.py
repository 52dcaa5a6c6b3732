"""The second round of hardening: every defect found by trying mmret as an attacker would, each
asserting the exact one-line outcome and that nothing outside data/ and runs/ was read or written
(the files read are recorded as the guard opens them, and every open of a file under the bait
folder fails the test)."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import pandas as pd
import pytest
import tiny_models
from test_hardening import example, heads_cfg, home, one_line, towers  # noqa: F401  (fixtures)
from typer.testing import CliRunner

from mmret.cli import app

runner = CliRunner()


@pytest.fixture
def reads(home, monkeypatch):
    """Every file opened for reading while the test runs (`os.open` and `open`, real paths), and a
    check at the end that none lies in the bait folder outside data/ and runs/."""
    import builtins

    seen: list[str] = []
    real_os_open, real_open = os.open, builtins.open

    def os_open(path, flags, *args, **kwargs):
        if isinstance(path, (str, Path)) and not flags & (os.O_WRONLY | os.O_RDWR):
            seen.append(os.path.realpath(path))
        return real_os_open(path, flags, *args, **kwargs)

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, Path)) and "r" in mode and "+" not in mode:
            seen.append(os.path.realpath(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    yield seen
    bait = os.path.realpath(home / "outside")
    assert not [p for p in seen if p.startswith(bait + os.sep)], "a file outside data/ and runs/ was read"


def prepare_folder(home: Path, *extra: str):
    return runner.invoke(app, ["prepare", "folder", "--root", str(home / "raw"), "--name", "t", *extra])


def raw_folder(home: Path, n: int = 6) -> Path:
    root = home / "raw"
    for i in range(n):
        tiny_models.save_picture(root / f"{i}.png", seed=i)
        (root / f"{i}.txt").write_text(f"picture number {i}\n")
    return root


# ---------------------------------------------------------------------------- 2, 3: symbolic links


def test_links_inside_the_root_that_point_outside_are_left_out_unread(home, reads):
    root = raw_folder(home)
    os.symlink(home / "outside" / "secret.png", root / "link.png")
    (root / "link.txt").write_text("a secret\n")
    os.symlink(home / "outside", root / "linked-folder")  # a folder link: os.walk does not follow it
    (root / "caption-link.png").write_bytes((root / "0.png").read_bytes())
    os.symlink(home / "outside" / "secret.png", root / "caption-link.txt")  # a caption file that is a link
    home.baseline()
    result = prepare_folder(home)
    assert result.exit_code == 0, result.output
    info = pd.read_json(home / "data" / "t" / "dataset.json", typ="series")
    problems = {Path(p["item"]).name: p for p in info["problems"]}
    secret = os.path.realpath(home / "outside" / "secret.png")
    assert problems["link.png"]["reason"] == (f"resolves to {secret}, outside {root}; left out unopened (pass "
                                              "--allow-outside-root to include such files)")
    assert problems["caption-link.png"]["reason"] == (f"caption-link.txt resolves to {secret}, outside "
                                                      f"{os.path.realpath(root)}; not read")
    ids = pd.read_parquet(home / "data" / "t" / "images.parquet")["image_id"].tolist()
    assert ids == [f"{i}.png" for i in range(6)]


def test_a_file_swapped_for_a_link_after_prepare_is_never_read(home, reads, towers):
    from mmret.data import load_dataset
    from mmret.encoders import load_image_encoder
    from mmret.features import ensure_features

    root = raw_folder(home)
    assert prepare_folder(home).exit_code == 0
    (root / "2.png").unlink()
    os.symlink(home / "outside" / "secret.png", root / "2.png")
    home.baseline()
    feats = ensure_features(load_dataset("t"), load_image_encoder(towers["vit"]), "images")
    secret = os.path.realpath(home / "outside" / "secret.png")
    assert feats.failed == {"2.png": f"resolves to {secret}, outside {os.path.realpath(home / 'data' / 't')} or "
                                     f"{os.path.realpath(root)}"}


def test_allow_outside_root_is_recorded_and_honoured_when_reading(home, towers):
    from mmret.data import load_dataset
    from mmret.encoders import load_image_encoder
    from mmret.features import ensure_features

    root = raw_folder(home)
    os.symlink(home / "outside" / "secret.png", root / "link.png")
    (root / "link.txt").write_text("the user's own picture, kept elsewhere\n")
    home.baseline()
    assert prepare_folder(home, "--allow-outside-root").exit_code == 0
    ds = load_dataset("t")
    assert ds.info["arguments"]["allow_outside_root"] and ds.roots.anywhere
    feats = ensure_features(ds, load_image_encoder(towers["vit"]), "images")
    assert not feats.failed and "link.png" in feats.ids.tolist()


@pytest.mark.parametrize("kind, reason", [("fifo", "is a pipe (FIFO), not a regular file"),
                                          ("device", "is a device, not a regular file")])
def test_a_query_that_is_no_file_is_refused_without_waiting(home, memorised, kind, reason):
    query = Path("/dev/zero")
    if kind == "fifo":
        query = home / "runs" / "query.png"
        query.parent.mkdir()
        os.mkfifo(query)  # opened without O_NONBLOCK this would wait for a writer for ever
    one_line(runner.invoke(app, ["search", "--image", str(query), "--run", str(memorised["run"]), "--checkpoint",
                                 "last", "--data-dir", str(memorised["data"])]),
             f"cannot read the query picture {query}: {reason}")


# ---------------------------------------------------------------------------- 1: thin and huge pictures


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (its pixel data is a few bytes: PIL reads the header only)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def test_a_thin_dataset_picture_costs_what_a_square_one_costs(monkeypatch):
    """The resize never builds the resized whole: every picture PIL makes on the way is at most the
    decoded picture or a small multiple of the model's input."""
    import numpy as np
    from PIL import Image

    from mmret.encoders.preprocess import ImagePreprocess, ImageTransform

    made: list[int] = []
    real = Image.Image.resize

    def recorded(self, size, *args, **kwargs):
        made.append(size[0] * size[1])
        return real(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recorded)
    dinov2 = ImagePreprocess((224, 224), 256, "bicubic", (0.5,) * 3, (0.5,) * 3)  # resize 256, crop 224
    for size in [(1, 900), (20_000, 3), (640, 480), (37, 900)]:
        picture = Image.fromarray(np.full((size[1], size[0], 3), 200, dtype=np.uint8))
        assert tuple(ImageTransform(dinov2)(picture).shape) == (3, 224, 224)
    assert max(made) <= 16 * 224 * 224  # 20,000 x 3 resized whole would be 1,706,666 x 256


@pytest.mark.parametrize("size, status, line", [
    ((1, 1_000_000), 413, "the upload is too large: 1 x 1,000,000 pixels: a side is longer than the limit of "
                          "65,535"),
    ((2, 60_000), 422, "the upload is too thin: 2 x 60,000 pixels is thinner than the limit of 1:1000"),
    ((7_000, 7_000), 413, "the upload is too large: 7,000 x 7,000 pixels (49,000,000) is over the limit of "
                          "40,000,000 pixels"),
    ((20_000, 20_000), 413, "the upload is too large: over the limit of 178,956,970 pixels"),  # PIL's bomb guard
])
def test_pictures_are_refused_by_their_header_before_decoding(client, size, status, line):
    r = client.post("/api/search/upload", files={"file": ("thin.png", png_header(*size), "image/png")})
    assert (r.status_code, r.json()) == (status, {"error": line})


def test_a_thin_picture_in_a_folder_is_left_out_at_prepare(home):
    root = raw_folder(home, 3)
    (root / "thin.png").write_bytes(png_header(2, 3000))
    (root / "thin.txt").write_text("a thin strip\n")
    home.baseline()
    result = prepare_folder(home)
    assert result.exit_code == 0, result.output
    problems = pd.read_json(home / "data" / "t" / "dataset.json", typ="series")["problems"]
    assert [(p["kind"], Path(p["item"]).name, p["reason"]) for p in problems] == [
        ("broken image", "thin.png", "2 x 3,000 pixels is thinner than the limit of 1:1000")]


@pytest.fixture(scope="module")
def client(memorised):
    from fastapi.testclient import TestClient

    from mmret.inference.search import Gallery
    from mmret.serve.app import create_app
    from mmret.serve.config import ServeConfig
    from mmret.serve.service import SearchService

    service = SearchService(Gallery.open(memorised["run"], split="all", which="last"),
                            ServeConfig(memorised["run"], which="last"))
    yield TestClient(create_app(service), base_url="http://127.0.0.1")
    service.close()
