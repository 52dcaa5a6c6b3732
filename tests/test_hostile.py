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
from test_hardening import example, heads_cfg, one_line
from typer.testing import CliRunner

from mmret.cli import app
from mmret.training import train

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


def test_a_table_opens_by_names_and_its_links_are_followed_only_when_read(home, monkeypatch, reads, towers):
    """Opening 100,000 items must not cost 100,000 link resolutions (a cold search spent 10 s on
    them): the table is checked by names, and a link is caught when its file is read."""
    import shutil

    from mmret.data import load_dataset
    from mmret.encoders import load_image_encoder
    from mmret.features import ensure_features

    raw_folder(home)
    assert prepare_folder(home).exit_code == 0
    folder = home / "data" / "t"
    shutil.copytree(home / "raw", folder / "items")  # items kept in the dataset's folder, named relative to it
    table = pd.read_parquet(folder / "images.parquet")
    table["path"] = [f"items/{Path(p).name}" for p in table["path"]]
    table.to_parquet(folder / "images.parquet", index=False)
    (folder / "items" / "2.png").unlink()
    os.symlink(home / "outside" / "secret.png", folder / "items" / "2.png")
    home.baseline()
    followed: list[str] = []
    realpath = os.path.realpath
    monkeypatch.setattr(os.path, "realpath", lambda p, **kw: followed.append(str(p)) or realpath(p, **kw))
    ds = load_dataset("t")
    assert ds.items["path"].tolist()[0] == str(folder / "items" / "0.png")
    assert not [p for p in followed if p.endswith(".png")] and len(ds.items) == 6
    feats = ensure_features(ds, load_image_encoder(towers["vit"]), "images")
    assert list(feats.failed) == ["2.png"] and str(folder / "items" / "2.png") in followed  # refused when read


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


# ---------------------------------------------------------------------------- 6: Ctrl-C inside a step


def interrupt_inside_step(monkeypatch, step: int) -> None:
    """Training raises KeyboardInterrupt inside the forward pass of step `step`, once, right after the
    item tower has run (its BatchNorm statistics moved, dropout drew), as a SIGINT arriving then would."""
    from mmret.training import loop

    real, fired = loop.setup, []

    def setup(*args, **kwargs):
        s = real(*args, **kwargs)

        def hook(module, inputs, output):
            if module.training and s.state.step == step and not fired:
                fired.append(step)
                raise KeyboardInterrupt

        tower = s.model.visual if hasattr(s.model, "visual") else s.model.item_tower  # scratch's or a head's
        tower.register_forward_hook(hook)
        return s

    monkeypatch.setattr(loop, "setup", setup)


def same_weights(a: Path, b: Path) -> None:
    from safetensors.torch import load_file

    for name in ("last.safetensors", "best.safetensors"):
        x, y = load_file(str(a / "checkpoints" / name)), load_file(str(b / "checkpoints" / name))
        assert sorted(x) == sorted(y)
        different = [k for k in x if x[k].numpy().tobytes() != y[k].numpy().tobytes()]
        assert not different, f"{name}: {len(different)} of {len(x)} tensors differ, e.g. {different[:3]}"


@pytest.mark.parametrize("method", ["scratch", "heads"])
def test_ctrl_c_at_a_random_step_then_resume_is_the_uninterrupted_run(home, towers, monkeypatch, method):
    import random

    from mmret.runs import RunConfig, with_overrides
    from mmret.training import TrainingInterrupted, resume

    example(home, count=48)
    if method == "scratch":  # a ResNet: BatchNorm statistics and num_batches_tracked move in every forward pass
        options = dict(method="scratch", dataset="example", data_dir=home / "data", runs_dir=home / "runs", epochs=3,
                       batch_size=16, patience=0, image_model="resnet10t", image_size=32, text_width=32, text_depth=1,
                       embed_dim=32, vocab_size=300, max_length=24, workers=0, lr=2e-3)
        cfg = lambda name: with_overrides(RunConfig(), {**options, "name": name})  # noqa: E731
    else:  # heads over cached features, with dropout drawing from the generators
        cfg = lambda name: with_overrides(heads_cfg(home, towers, name=name, dropout=0.2), {"epochs": 3})  # noqa: E731
    whole = train(cfg("whole"))
    step = random.Random(25).randrange(1, whole.steps - 1)
    interrupt_inside_step(monkeypatch, step)
    with pytest.raises(TrainingInterrupted, match=f"interrupted at step {step}: saved"):
        train(cfg("cut"))
    resumed = resume(home / "runs" / "cut")
    assert (resumed.steps, resumed.best) == (whole.steps, whole.best)
    same_weights(whole.run_dir, resumed.run_dir)


# ---------------------------------------------------------------------------- 5, 8: verify that verifies


def test_verify_catches_a_flipped_byte_in_a_checkpoint(home, towers):
    example(home)
    run = train(heads_cfg(home, towers, name="r")).run_dir
    best = run / "checkpoints" / "best.safetensors"
    data = bytearray(best.read_bytes())
    data[-3] ^= 0x01  # a bit of the last tensor's bytes: the file still loads
    best.write_bytes(bytes(data))
    one_line(runner.invoke(app, ["verify", "--run", "r"]),
             f"1 damaged: {run / 'checkpoints'} (best.safetensors); resume from the other checkpoint or train the run "
             "again")


def test_verify_says_a_half_built_cache_is_incomplete(home, towers):
    from mmret.data import load_dataset
    from mmret.encoders import load_image_encoder
    from mmret.features import ensure_features

    example(home, count=60)
    ensure_features(load_dataset("example"), load_image_encoder(towers["vit"]), "images", split="test", shard_rows=4)
    result = runner.invoke(app, ["verify", "--dataset", "example"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "ok, incomplete: 2 of 16 shards computed" in result.stdout  # 48 / 6 / 6 pictures in shards of 4


def test_the_advice_for_a_truncated_cache_array_works(home, towers):
    from mmret.data import load_dataset
    from mmret.encoders import load_image_encoder
    from mmret.features import open_features

    example(home)
    train(heads_cfg(home, towers, name="r"))
    cache = open_features(load_dataset("example"), load_image_encoder(towers["vit"]), "images").path
    (cache / "pooled.npy").write_bytes((cache / "pooled.npy").read_bytes()[:100])
    advice = f"run the command that uses it again to compute the damaged shards anew (or delete {cache})"
    one_line(runner.invoke(app, ["verify", "--dataset", "example"]), f"1 damaged: {cache} (pooled.npy); {advice}")
    again = runner.invoke(app, ["precompute-embeddings", "--dataset", "example", "--vision", towers["vit"]])
    assert again.exit_code == 0, again.output  # the command that uses it, run again, computes it anew
    assert runner.invoke(app, ["verify", "--dataset", "example"]).exit_code == 0
    assert runner.invoke(app, ["train", "--method", "heads", "--vision", towers["vit"], "--text", towers["bert"],
                               "--epochs", "1", "--batch-size", "8", "--embed-dim", "8"]).exit_code == 0


# ---------------------------------------------------------------------------- 7: unbounded expansions


def test_a_brace_pattern_of_ten_million_shards_is_refused_before_it_is_built(home):
    import time

    start = time.monotonic()
    one_line(runner.invoke(app, ["prepare", "wds", "--root", "shards/{0000000..9999999}.tar"]),
             f"--root {home / 'shards' / '{0000000..9999999}.tar'} names 10,000,000 shards; mmret reads at most "
             "100,000 from one pattern: check the braces, e.g. 'shards/{00000..00099}.tar'")
    assert time.monotonic() - start < 10


def test_nshards_of_a_billion_is_refused_before_it_is_built(home):
    import time

    split = home / "set" / "test"
    split.mkdir(parents=True)
    (split / "nshards.txt").write_text("1000000000\n")
    (home / "set" / "dataset_type.txt").write_text("retrieval\n")
    home.baseline()
    start = time.monotonic()
    one_line(runner.invoke(app, ["prepare", "wds", "--root", str(home / "set")]),
             f"{split / 'nshards.txt'} says 1,000,000,000 shards, more than the 100,000 mmret reads from one split, "
             f"and {split} holds 0 numbered .tar files; correct nshards.txt")
    assert time.monotonic() - start < 10


# ---------------------------------------------------------------------------- 9: file content on the terminal


def test_control_characters_from_a_file_are_escaped_in_the_error_line(home):
    root = raw_folder(home, 2)
    (root / "captions.csv").write_bytes(b"\x1b]0;owned\x07\x1b[2J,caption\na.png,a cat\n")
    home.baseline()
    one_line(prepare_folder(home), "captions.csv needs columns 'image' and 'caption'; it has \\x1b]0;owned\\x07"
                                   "\\x1b[2J, caption")


def test_a_csv_of_random_bytes_is_one_line_without_pandas_warnings(home):
    import numpy as np

    root = raw_folder(home, 2)
    (root / "captions.csv").write_bytes(np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes())
    home.baseline()
    result = prepare_folder(home)
    one_line(result, "^error: captions.csv needs columns 'image' and 'caption'; it has ")
    assert "\x1b" not in result.stderr and "Warning" not in result.stderr


# ---------------------------------------------------------------------------- 10: wording


def test_a_checkpoint_tensor_of_the_wrong_shape_is_one_line(home, towers):
    import torch
    from safetensors.torch import load_file

    from mmret.runs.checkpoint import _save, read_meta

    example(home)
    run = train(heads_cfg(home, towers, name="r")).run_dir
    best = run / "checkpoints" / "best.safetensors"
    tensors = load_file(str(best))
    name = sorted(k for k in tensors if tensors[k].ndim == 2)[0]
    shape = tuple(tensors[name].shape)
    tensors[name] = torch.zeros(shape[0] + 1, shape[1])
    _save(tensors, best, read_meta(best))  # a well-formed file, checksum and all, of another model
    one_line(runner.invoke(app, ["eval", "--run", "r"]),
             f"checkpoint {best} does not fit this model ({name} is {(shape[0] + 1, shape[1])} there, {shape} here); "
             "was it made with another configuration?")


def test_a_config_value_of_the_wrong_type_is_one_line(home, towers):
    import json

    example(home)
    run = train(heads_cfg(home, towers, name="r")).run_dir
    config = json.loads((run / "config.json").read_text())
    config["method"]["embed_dim"] = "abc"
    (run / "config.json").write_text(json.dumps(config))
    one_line(runner.invoke(app, ["eval", "--run", "r"]), "config.json method: embed_dim must be a whole number, "
                                                        "got 'abc'")


@pytest.mark.parametrize("fractions, advice", [
    (["--test", "1.0"], "has no train images; prepare it again with smaller --val and --test fractions"),
    (["--val", "0"], "has no val images; prepare it again with a val split (e.g. --val 0.1)"),
])
def test_a_missing_split_names_options_prepare_has(home, towers, fractions, advice):
    assert runner.invoke(app, ["prepare", "example", "--count", "20", *fractions]).exit_code == 0
    one_line(runner.invoke(app, ["train", "--method", "heads", "--vision", towers["vit"], "--text", towers["bert"],
                                 "--epochs", "1", "--batch-size", "8", "--embed-dim", "8"]),
             f"dataset 'example' {advice}, or train with --folds")
    for option in ("--val", "--test", "--folds"):  # the options the line names exist where it says
        command = ["train"] if option == "--folds" else ["prepare", "example"]
        assert option in runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"}).stdout


@pytest.mark.parametrize("name", [".", ".."])
def test_a_name_of_dots_says_why_it_is_refused(home, name):
    one_line(runner.invoke(app, ["prepare", "example", "--name", name]),
             f"--name {name!r} is only dots, which name a folder and its parent; give a name with a letter or digit "
             "in it")


def test_classes_too_small_for_val_and_test_say_so(home):
    root = home / "raw"
    for label in ("cat", "dog", "fox"):
        tiny_models.save_picture(root / label / "one.png", seed=len(label))
    home.baseline()
    result = runner.invoke(app, ["prepare", "classes", "--root", str(root), "--name", "c"])
    assert result.exit_code == 0, result.output
    problems = pd.read_json(home / "data" / "c" / "dataset.json", typ="series")["problems"]
    assert [(p["kind"], p["item"], p["reason"]) for p in problems] == [
        ("empty split", split, f"no {split} items: the dataset (or each of its classes) is too small for a 0.1 share; "
                               f"add items, or pass --{split} 0") for split in ("val", "test")]


def test_an_empty_shard_is_a_problem_line_not_webdatasets_warning(home, capfd):
    from test_wds import write_shards

    write_shards(home / "shards")
    (home / "shards" / "00003.tar").write_bytes(b"")
    home.baseline()
    result = runner.invoke(app, ["prepare", "wds", "--root", "shards/{00000..00003}.tar", "--name", "w"])
    assert result.exit_code == 0, result.output
    raw = result.output + capfd.readouterr().err  # the readers' processes write to the real stderr
    assert "WARNING" not in raw and "BufferedReader" not in raw, raw
    problems = pd.read_json(home / "data" / "w" / "dataset.json", typ="series")["problems"]
    assert [(p["kind"], Path(p["item"]).name) for p in problems if p["kind"] == "unreadable shard"] == [
        ("unreadable shard", "00003.tar")]


def test_a_key_twice_in_one_shard_is_not_blamed_on_an_earlier_shard():
    from mmret.data.readers.wds import duplicate_key

    assert duplicate_key("/s/00001.tar", "/s/00001.tar") == "this shard holds the key twice; kept the first"
    assert duplicate_key("/s/00000.tar", "/s/00001.tar") == "00000.tar holds this key already; kept that one"


def test_libmpg123_notes_about_a_damaged_mp3_go_to_the_debug_log(tmp_path, capfd, caplog):
    import logging

    import numpy as np

    sf = pytest.importorskip("soundfile")
    if "MP3" not in sf.available_formats():
        pytest.skip("this libsndfile writes no MP3")
    from mmret.modalities.audio import load_audio

    sf.write(tmp_path / "a.mp3", (np.sin(np.arange(48_000) * 0.05) * 0.5).astype("float32"), 16_000, format="MP3")
    good = (tmp_path / "a.mp3").read_bytes()
    (tmp_path / "bad.mp3").write_bytes(good[:3000] + bytes(range(256)) * 8 + good[5000:])
    capfd.readouterr()
    with caplog.at_level(logging.DEBUG, logger="mmret.modalities.audio"):
        assert len(load_audio(tmp_path / "bad.mp3", 16_000, 10.0)) > 0
    raw = [line for line in capfd.readouterr().err.splitlines() if line and "libsndfile: " not in line]
    assert raw == []  # nothing reached the terminal past the logging (a CLI shows debug lines only when asked)
    assert "libsndfile: Note: Illegal Audio-MPEG-Header" in caplog.text
