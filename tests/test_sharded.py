"""Sharded encoding: N processes (`--shard i/N`) fill one feature cache, and a run's final
embeddings, and the sealed result is byte for byte what one process writes; a shard killed
half-way resumes; --finalize names what is missing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import tiny_models
from typer.testing import CliRunner

from mmret import training
from mmret.cli import app
from mmret.common.shards import env_shard, parse_shard
from mmret.encoders import load_image_encoder, load_text_encoder
from mmret.errors import MmretError
from mmret.features import ensure_features, open_features
from mmret.features import shards as shards_module
from mmret.features.shards import encode_shard, seal_features
from mmret.inference.embeddings import write_run_embeddings
from mmret.runs import RunConfig, with_overrides

ARRAYS = ("pooled.npy", "tokens.npy", "mask.npy", "ids.json")
OPTIONS = dict(precision="fp32", workers=1, batch_size=4, shard_rows=8)  # 60 pictures: 8 cache shards


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    bert = str(tiny_models.save_tiny_bert(root / "bert"))
    return load_image_encoder(str(tiny_models.save_tiny_timm_vit(root / "vit"))), load_text_encoder(bert), bert


def one_process(dataset, encoder, which: str, tokens: bool) -> dict[str, bytes]:
    """The cache one process writes; moved aside so the shards start from nothing."""
    feats = ensure_features(dataset, encoder, which, tokens=tokens, **OPTIONS)
    kept = {name: (feats.path / name).read_bytes() for name in ARRAYS if (feats.path / name).is_file()}
    shutil.rmtree(feats.path)
    return kept


def assert_same_bytes(path: Path, expected: dict[str, bytes]) -> None:
    assert not (path / "parts").exists()
    for name, data in expected.items():
        assert (path / name).read_bytes() == data, name


@pytest.mark.parametrize("which, tokens", [("images", True), ("captions", False)])
def test_two_shards_and_the_seal_equal_one_process_byte_for_byte(example_ds, towers, which, tokens):
    encoder = towers[0] if which == "images" else towers[1]
    expected = one_process(example_ds, encoder, which, tokens)
    first = encode_shard(example_ds, encoder, which, (0, 2), tokens, **OPTIONS)
    assert first.sealed is None and first.encoded and first.missing
    assert open_features(example_ds, encoder, which, tokens) is None  # not sealed: nobody reads it yet
    second = encode_shard(example_ds, encoder, which, (1, 2), tokens, **OPTIONS)
    assert second.sealed is not None and second.missing == []
    assert sorted(first.encoded + second.encoded) == list(range(len(second.sealed.manifest["shards"])))
    assert second.sealed.manifest["status"] == "complete"
    assert_same_bytes(second.sealed.path, expected)


def test_a_shard_killed_half_way_resumes(example_ds, towers, monkeypatch):
    vit = towers[0]
    expected = one_process(example_ds, vit, "images", True)
    real = shards_module._PartWriter.record
    calls = []

    def record_then_die(self, idx, values, reasons):
        calls.append(len(idx))
        if len(calls) == 3:  # after the first of its shards (2 batches of 4) was kept, inside the second
            raise KeyboardInterrupt
        return real(self, idx, values, reasons)

    monkeypatch.setattr(shards_module._PartWriter, "record", record_then_die)
    with pytest.raises(KeyboardInterrupt):
        encode_shard(example_ds, vit, "images", (0, 2), True, **OPTIONS)
    monkeypatch.setattr(shards_module._PartWriter, "record", real)
    with pytest.raises(MmretError, match=r"cache shards are not encoded yet \(1, 2, 3"):
        seal_features(example_ds, vit, "images", True)
    again = encode_shard(example_ds, vit, "images", (0, 2), True, **OPTIONS)
    assert again.encoded == [2, 4, 6] and again.stats.encoded == 8 + 8 + 6  # shard 0 was kept (val: 6 rows)
    other = encode_shard(example_ds, vit, "images", (1, 2), True, **OPTIONS)
    assert other.sealed is not None
    assert_same_bytes(other.path, expected)


def test_finalize_seals_what_the_shards_left(example_ds, towers):
    bert = towers[1]
    expected = one_process(example_ds, bert, "captions", False)
    for i in range(3):
        monkey_unsealed = encode_shard(example_ds, bert, "captions", (i, 3), False, **OPTIONS)
    assert monkey_unsealed.sealed is not None  # the last one sealed
    assert_same_bytes(monkey_unsealed.path, expected)
    assert seal_features(example_ds, bert, "captions").path == monkey_unsealed.path  # complete: found as it is


def test_run_embeddings_by_shards_equal_one_process(tiny_world, tmp_path):
    cfg = with_overrides(RunConfig(), dict(method="heads", dataset="example", item=tiny_world["vit"],
                                           text=tiny_world["bert"], data_dir=tiny_world["root"] / "data",
                                           runs_dir=tmp_path / "runs", epochs=1, batch_size=16, embed_dim=32,
                                           patience=0, name="r"))
    run = training.train(cfg).run_dir
    one = write_run_embeddings(run, split="all", batch_size=2, device="cpu")
    expected = {n: (one.path / n).read_bytes()
                for n in ("items.npy", "captions.npy", "items.parquet", "captions.parquet")}
    shutil.rmtree(one.path)
    with pytest.raises(MmretError, match="blocks of these embeddings are not written yet"):
        write_run_embeddings(run, split="all", batch_size=2, device="cpu", finalize=True)
    # 60 items and 300 captions in blocks of 32 rows: 2 + 10 blocks, split over 3 processes
    assert write_run_embeddings(run, split="all", batch_size=2, device="cpu", shard="0/3") is None
    assert write_run_embeddings(run, split="all", batch_size=2, device="cpu", shard="2/3") is None
    last = write_run_embeddings(run, split="all", batch_size=2, device="cpu", shard="1/3")
    assert last is not None and not (run / "embeddings" / ".example-all.parts").exists()
    for name, data in expected.items():
        assert (last.path / name).read_bytes() == data, name


def test_shard_option_and_launcher_variables(example_ds, towers, monkeypatch):
    assert parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "x/2", "1"):
        with pytest.raises(MmretError, match="--shard must be i/N"):
            parse_shard(bad)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert env_shard() == (1, 2)
    result = CliRunner().invoke(app, ["precompute-embeddings", "--dataset", "example", "--text", towers[2],
                                      "--precision", "fp32", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    assert "shard 1/2 encoded 1 cache shards (30 rows)" in result.output and "still to encode" in result.output
