"""The regression suite of the hardening issue: every defect found by trying mmret as a careful user
and as an attacker would, each asserting the exact one-line message (exit 1, no traceback) and that
nothing outside the data and runs folders was touched."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tiny_models
from typer.testing import CliRunner

from mmret.cli import app
from mmret.data import PrepareConfig, prepare
from mmret.errors import MmretError
from mmret.runs import RunConfig, with_overrides
from mmret.training import train

runner = CliRunner()


def one_line(result, expected: str) -> None:
    """Exit 1 and one error line on stderr, the last, `error: ` + `expected` (a regex when it starts
    with ^); before it only the lines a command says at start (the defaults it took, its plan)."""
    import re

    err = result.stderr
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = err.splitlines()
    assert err.endswith("\n") and "Traceback" not in err, err
    assert [n for n, text in enumerate(lines) if text.startswith("error:")] == [len(lines) - 1], err
    line = lines[-1]
    if expected.startswith("^"):
        assert re.match(expected, line), line
    else:
        assert line == "error: " + expected, line


def example(home: Path, count: int = 40) -> None:
    prepare(PrepareConfig(source="example", count=count, data_dir=home / "data"))


def heads_cfg(home: Path, towers: dict, **options) -> RunConfig:
    return with_overrides(RunConfig(), dict(method="heads", dataset="example", item=towers["vit"], text=towers["bert"],
                                            data_dir=home / "data", runs_dir=home / "runs", epochs=2, batch_size=8,
                                            embed_dim=8, patience=0, **options))


# ---------------------------------------------------------------------------- path escapes


@pytest.mark.parametrize("name, line", [
    ("../escape", "--name '../escape' may hold only letters, digits, '-', '_' and '.'"),
    ("/tmp/abs", "--name '/tmp/abs' may hold only letters, digits, '-', '_' and '.'"),
    ("a/b", "--name 'a/b' may hold only letters, digits, '-', '_' and '.'"),
    ("latest", "--name 'latest' is reserved (runs/latest links to the newest run); pick another name"),
])
def test_run_names_cannot_escape_or_take_latest(home, name, line):
    example(home)
    one_line(runner.invoke(app, ["train", "--method", "heads", "--name", name, "--epochs", "1"]), line)
    assert not (home / "runs").exists() or not any((home / "runs").iterdir())


def test_dataset_names_cannot_escape(home):
    one_line(runner.invoke(app, ["eval", "--dataset", "../x", "--zero-shot", "clip-b32"]),
             "--dataset '../x' may hold only letters, digits, '-', '_' and '.'")


@pytest.mark.parametrize("kind", ["csv", "jsonl", "parquet"])
def test_a_captions_table_cannot_pull_files_from_outside_its_root(home, kind):
    root = home / "raw"
    root.mkdir()
    tiny_models.save_picture(root / "inside.png")
    rows = pd.DataFrame({"image": ["inside.png", "../outside/secret.png", "/etc/shadow", "../../../etc/passwd"],
                         "caption": ["a picture inside", "a secret", "shadow", "passwd"]})
    {"csv": lambda p: rows.to_csv(p, index=False), "jsonl": lambda p: rows.to_json(p, orient="records", lines=True),
     "parquet": lambda p: rows.to_parquet(p)}[kind](root / f"captions.{kind}")
    home.baseline()
    result = runner.invoke(app, ["prepare", "folder", "--root", str(root), "--name", "t"])
    assert result.exit_code == 0, result.output
    images = pd.read_parquet(home / "data" / "t" / "images.parquet")
    assert images["image_id"].tolist() == ["inside.png"]  # on disk a picture table names its key image_id
    problems = json.loads((home / "data" / "t" / "dataset.json").read_text())["problems"]
    problems = [p for p in problems if p["kind"] != "empty split"]  # one picture: no val or test, said apart
    assert {p["kind"] for p in problems} == {"outside root"} and len(problems) == 3
    assert not any("exist" in p["reason"] or "found" in p["reason"] for p in problems)  # nothing was opened


def test_a_table_edited_to_point_outside_is_refused_at_load(home):
    example(home)
    path = home / "data" / "example" / "images.parquet"
    images = pd.read_parquet(path)
    images.loc[0, "path"] = str(home / "outside" / "secret.png")
    images.to_parquet(path)
    one_line(runner.invoke(app, ["eval", "--zero-shot", "clip-b32", "--dataset", "example"]),
             f"^error: the item table of {home / 'data' / 'example'} names 1 file\\(s\\) outside the dataset's root")


# ---------------------------------------------------------------------------- silent wrong results


def test_a_dataset_prepared_again_during_training_stops_it(home, towers, monkeypatch):
    from mmret.training import loop

    example(home)
    real = loop.train_step
    calls = []

    def reprepare_then_step(s, images, texts, *negatives):
        calls.append(1)
        if len(calls) == 2:  # in the middle of epoch 1, someone runs `mmret prepare example --force`
            prepare(PrepareConfig(source="example", count=40, seed=7, force=True, data_dir=home / "data"))
        return real(s, images, texts, *negatives)

    monkeypatch.setattr(loop, "train_step", reprepare_then_step)
    with pytest.raises(MmretError, match="dataset 'example' was prepared again while training was reading it; its "
                                         "files no longer match the tables read at the start. Run the command again"):
        train(heads_cfg(home, towers, name="r"))
    assert not (home / "runs" / "r" / "checkpoints" / "last.safetensors").exists()  # no epoch of mixed pairs kept
    assert not (home / "runs" / "latest").exists()  # and `latest` names no run without a checkpoint


def test_a_dataset_prepared_again_during_precompute_stops_it(home, towers, monkeypatch):
    from mmret.data import load_dataset
    from mmret.encoders import load_image_encoder
    from mmret.features import FeatureCache, ensure_features

    example(home, count=60)
    real = FeatureCache.commit

    def reprepare_then_commit(self, shard, failed):
        prepare(PrepareConfig(source="example", count=60, seed=3, force=True, data_dir=home / "data"))
        return real(self, shard, failed)

    monkeypatch.setattr(FeatureCache, "commit", reprepare_then_commit)
    with pytest.raises(MmretError,
                       match="dataset 'example' was prepared again while precompute-embeddings was reading it"):
        ensure_features(load_dataset("example"), load_image_encoder(towers["vit"]), "images", shard_rows=16)


def test_noise_in_a_feature_cache_is_caught_and_computed_again(home, towers, caplog):
    from mmret.data import load_dataset
    from mmret.encoders import load_image_encoder
    from mmret.features import ensure_features

    example(home)
    ds, enc = load_dataset("example"), load_image_encoder(towers["vit"])
    feats = ensure_features(ds, enc, "images", shard_rows=16)
    clean = np.array(feats.pooled)
    file = feats.path / "pooled.npy"
    arr = np.load(file, mmap_mode="r+")
    arr[20:24] += np.float16(0.5)  # finite noise, as a bad disk or a stray write would leave
    arr.flush()
    del arr
    one_line(runner.invoke(app, ["verify", "--dataset", "example"]),
             f"1 damaged: {feats.path} (shard 1); run the command that uses it again to compute the damaged shards "
             f"anew (or delete {feats.path})")
    again = ensure_features(ds, enc, "images", shard_rows=16)
    assert "shard(s) [1] do not match their checksums; computing them again" in caplog.text
    np.testing.assert_array_equal(np.array(again.pooled), clean)
    assert runner.invoke(app, ["verify", "--dataset", "example"]).exit_code == 0


def test_noise_in_run_embeddings_is_caught_and_they_are_computed_again(home, towers):
    from mmret.inference.embeddings import write_run_embeddings

    example(home)
    run = train(heads_cfg(home, towers, name="r")).run_dir
    emb = write_run_embeddings(run, split="test")
    clean = np.array(emb.items)
    arr = np.load(emb.path / "items.npy", mmap_mode="r+")
    arr[0] = -arr[0]
    arr.flush()
    del arr
    one_line(runner.invoke(app, ["verify", "--run", "r"]),
             f"1 damaged: {emb.path} (items.npy); delete {emb.path}; `mmret eval` or `mmret search` computes it again "
             "from the run")
    np.testing.assert_array_equal(np.array(write_run_embeddings(run, split="test").items), clean)


# ---------------------------------------------------------------------------- crashes become one line


@pytest.fixture
def trained(home, towers):
    example(home)
    return train(heads_cfg(home, towers, name="r")).run_dir


def test_a_truncated_checkpoint_is_one_line(home, trained):
    best = trained / "checkpoints" / "best.safetensors"
    best.write_bytes(best.read_bytes()[:40])
    one_line(runner.invoke(app, ["eval", "--run", "r"]),
             f"^error: {best} is damaged \\(not a readable safetensors checkpoint: .*\\); use the run's other "
             "checkpoint \\(--checkpoint best or last\\) or train the run again$")


def test_a_pickle_in_place_of_a_checkpoint_is_refused_unread(home, trained):
    import pickle

    best = trained / "checkpoints" / "best.safetensors"
    best.write_bytes(pickle.dumps({"boom": os.system}))
    one_line(runner.invoke(app, ["eval", "--run", "r"]), f"^error: {best} is damaged \\(not a readable safetensors")


@pytest.mark.filterwarnings("error::UserWarning")  # a warning would print a second line in a terminal
def test_a_malicious_pickle_in_a_model_folder_is_one_line(home, tmp_path):
    import pickle

    folder = tmp_path / "outside" / "evil-bert"
    tiny_models.save_tiny_bert(folder)
    (folder / "model.safetensors").unlink()

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch pwned",))

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Boom()))
    home.baseline()
    example(home)
    result = runner.invoke(app, ["precompute-embeddings", "--dataset", "example", "--text", str(folder)])
    one_line(result, f"^error: cannot load the model in {folder}: ")
    assert not (home / "pwned").exists()


def test_truncated_cache_files_are_one_line(home, trained, towers):
    from mmret.data import load_dataset
    from mmret.encoders import load_image_encoder
    from mmret.features import open_features

    cache = open_features(load_dataset("example"), load_image_encoder(towers["vit"]), "images").path
    ids = cache / "ids.json"
    ids.write_bytes(ids.read_bytes()[:10])
    one_line(runner.invoke(app, ["precompute-embeddings", "--dataset", "example", "--vision", towers["vit"]]),
             f"ids.json is damaged (its checksum does not match the manifest); run the command again to compute the "
             f"damaged part anew (or delete {cache})".join([str(cache) + "/", ""]))


def test_a_truncated_npy_is_one_line(home, trained, towers):
    from mmret.data import load_dataset
    from mmret.encoders import load_image_encoder
    from mmret.features import open_features

    cache = open_features(load_dataset("example"), load_image_encoder(towers["vit"]), "images").path
    (cache / "pooled.npy").write_bytes((cache / "pooled.npy").read_bytes()[:100])
    one_line(runner.invoke(app, ["verify", "--dataset", "example"]),
             f"1 damaged: {cache} (pooled.npy); run the command that uses it again to compute the damaged shards anew "
             f"(or delete {cache})")


def test_malformed_dataset_json_and_truncated_parquet_are_one_line(home):
    example(home)
    info = home / "data" / "example" / "dataset.json"
    info.write_text("{ not json")
    fix = "prepare the dataset again (mmret prepare ... --name example --force)"
    one_line(runner.invoke(app, ["eval", "--zero-shot", "clip-b32", "--dataset", "example"]),
             f"^error: {info} is damaged \\(not valid JSON: .*\\); " + fix.replace("(", "\\(").replace(")", "\\)")
             .replace(".", "\\.") + "$")
    example_again = runner.invoke(app, ["prepare", "example", "--force", "--count", "20"])
    assert example_again.exit_code == 0
    table = home / "data" / "example" / "images.parquet"
    table.write_bytes(table.read_bytes()[:50])
    one_line(runner.invoke(app, ["eval", "--zero-shot", "clip-b32", "--dataset", "example"]),
             f"^error: {table} is damaged \\(not a readable parquet table: .*\\); prepare the dataset again")


def test_a_malformed_run_config_is_one_line(home, trained):
    (trained / "config.json").write_text('{"method": ')
    one_line(runner.invoke(app, ["eval", "--run", str(trained)]),
             f"^error: {trained / 'config.json'} is damaged \\(not valid JSON: .*\\); restore the run's config.json, "
             "or train the run again$")


def test_a_read_only_data_folder_is_one_line(home, monkeypatch):
    import tempfile

    def refuse(*args, dir=None, **kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system", str(dir))

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    one_line(runner.invoke(app, ["prepare", "example"]),
             f"{home / 'data'}: the file system is read-only: point --data-dir / --runs-dir at a writable folder")


def test_a_full_disk_before_a_cache_is_one_line_and_leaves_nothing(home, towers, monkeypatch):
    import shutil
    from collections import namedtuple

    example(home)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    result = runner.invoke(app, ["precompute-embeddings", "--dataset", "example", "--vision", towers["vit"]])
    one_line(result, "^error: the feature cache needs [0-9.]+ MB in .*, and 64.0 MB to spare, but its disk has 0.0 MB "
                     "free; free some space or point --data-dir / --runs-dir at a larger disk$")
    assert not any((home / "data" / "example" / "features").glob("*/manifest.json"))


def test_a_disk_full_while_allocating_is_one_line(home, towers, monkeypatch):
    example(home)

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    one_line(runner.invoke(app, ["precompute-embeddings", "--dataset", "example", "--vision", towers["vit"]]),
             "the disk is full: free some space (or point --data-dir / --runs-dir at a larger disk) and run the "
             "command again; what was finished before is kept")


def test_a_disk_full_at_the_first_checkpoint_leaves_latest_alone(home, towers, monkeypatch):
    import mmret.runs.checkpoint as checkpoint

    example(home)
    before = train(heads_cfg(home, towers, name="good")).run_dir

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "last.safetensors")

    monkeypatch.setattr(checkpoint, "save_file", full)
    result = runner.invoke(app, ["train", "--method", "heads", "--vision", towers["vit"], "--text", towers["bert"],
                                 "--epochs", "1", "--batch-size", "8", "--name", "full"])
    one_line(result, "last.safetensors: the disk is full: free some space (or point --data-dir / --runs-dir at a "
                     "larger disk) and run the command again; what was finished before is kept")
    assert os.readlink(home / "runs" / "latest") == before.name


@pytest.mark.parametrize("grid, line", [
    ("outside", "--grid outside is a folder; give a file name (e.g. outside/results.png)"),
])
def test_grid_at_a_folder_is_one_line(home, trained, grid, line):
    one_line(runner.invoke(app, ["search", "a red circle", "--grid", grid]), line)


def test_vram_infinity_is_one_line(home):
    one_line(runner.invoke(app, ["probe-memory", "--vram", "inf"]), "--vram must be a positive number of GB, got inf")


# ---------------------------------------------------------------------------- unclear or ignored


def test_eval_and_search_read_datasets_from_data_dir(home, trained, tmp_path):
    import shutil

    moved = tmp_path / "moved"
    shutil.move(str(home / "data"), str(moved))
    assert runner.invoke(app, ["eval", "--run", "r", "--data-dir", str(moved)]).exit_code == 0
    assert runner.invoke(app, ["search", "a red circle", "--data-dir", str(moved)]).exit_code == 0
    shutil.move(str(moved), str(home / "data"))


def test_search_refuses_a_folder_picture_and_an_empty_query(home, trained):
    one_line(runner.invoke(app, ["search", "--image", "outside"]),
             "--image outside is a folder; give the path of one file to search with")
    one_line(runner.invoke(app, ["search", "  "]), "a query is empty; give the words to search for")


def test_resume_refuses_the_options_it_would_ignore(home, trained):
    one_line(runner.invoke(app, ["train", "--resume", "r", "--epochs", "3", "--lr", "0.1", "--seed", "2"]),
             "--resume continues run r with the settings it started with (only --epochs and --max-steps may change, to "
             "train it longer); leave out --lr, --seed (to change them, train a new run from its config: --config "
             "<run>/config.json)")


def test_a_ragged_csv_row_is_reported_not_shifted(home):
    root = home / "raw"
    root.mkdir()
    for name in ("a.png", "b.png"):
        tiny_models.save_picture(root / name)
    (root / "captions.csv").write_text("image,caption\na.png,a cat\nb.png,a dog, sitting, on a mat\n")
    home.baseline()
    result = runner.invoke(app, ["prepare", "folder", "--root", str(root), "--name", "t"])
    assert result.exit_code == 0, result.output
    captions = pd.read_parquet(home / "data" / "t" / "captions.parquet")
    assert captions[["image_id", "caption"]].values.tolist() == [["a.png", "a cat"]]
    assert ("ragged row: captions.csv: 4 fields where the header has 2 (quote captions that hold commas)"
            in result.stdout)


def test_a_test_only_folder_is_allowed(home):
    root = home / "raw"
    root.mkdir()
    for i in range(5):
        tiny_models.save_picture(root / f"{i}.png")
        (root / f"{i}.txt").write_text(f"picture {i}\n")
    home.baseline()
    result = runner.invoke(app, ["prepare", "folder", "--root", str(root), "--name", "t", "--test", "1.0"])
    assert result.exit_code == 0, result.output
    assert set(pd.read_parquet(home / "data" / "t" / "images.parquet")["split"]) == {"test"}


def test_an_index_is_rebuilt_after_the_dataset_is_prepared_again(home, towers):
    example(home)
    train(heads_cfg(home, towers, name="r"))
    assert runner.invoke(app, ["search", "a red circle"]).exit_code == 0
    assert runner.invoke(app, ["prepare", "example", "--force", "--count", "40", "--seed", "5"]).exit_code == 0
    again = runner.invoke(app, ["search", "a red circle"])
    assert again.exit_code == 0, again.output


def test_probe_memory_recommends_a_command_that_trains_what_was_probed(home):
    result = runner.invoke(app, ["probe-memory", "--vram", "6", "--method", "heads", "--vision", "dino-vits16",
                                 "--text", "distilbert", "--batch-size", "8"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    command = [ln for ln in result.stdout.splitlines() if ln.startswith("  mmret train ")][0]
    assert "--method heads" in command and "--vision dino-vits16" in command and "--batch-size 8" in command
    assert max(len(ln) for ln in result.stdout.splitlines() if ln.startswith(("┃", "│", "┏", "└"))) <= 80


def test_zero_shot_eval_takes_the_newest_runs_dataset(home, trained, tmp_path):
    clip = tiny_models.save_tiny_clip(tmp_path / "outside" / "clip")
    home.baseline()
    result = runner.invoke(app, ["eval", "--zero-shot", str(clip)])
    assert result.exit_code == 0, result.output
    assert "example test" in result.stdout


def test_the_contact_sheet_is_readable(home, trained, tmp_path):
    from PIL import Image

    sheet = home / "runs" / "sheet.png"
    captions = pd.read_parquet(home / "data" / "example" / "captions.parquet")["caption"]
    result = runner.invoke(app, ["search", captions.iloc[0], "-k", "5", "--grid", str(sheet)])
    assert result.exit_code == 0, result.output
    img = np.asarray(Image.open(sheet).convert("RGB"))
    assert img.shape[1] >= 5 * 200 and img.shape[0] >= 200  # thumbnails of 200 px, not 64
    green = ((img[..., 1] > 120) & (img[..., 0] < 60) & (img[..., 2] < 90)).sum()
    red = ((img[..., 0] > 170) & (img[..., 1] < 70) & (img[..., 2] < 70)).sum()
    assert green + red > 4 * 200  # the known-right item framed green, the others red
