"""Damaged files of every kind mmret reads (parquet, json, npy, safetensors, pictures): random bytes
written over them, truncations, garbage of the same length. Whatever the damage, the command that
reads the file ends in one line (or, for a cache mmret derived itself, computes it again), never a
traceback, and no file outside the damaged one's own derived folder changes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import tiny_models
from typer.testing import CliRunner

from mmret.cli import app
from mmret.data import PrepareConfig, prepare
from mmret.runs import RunConfig, with_overrides
from mmret.training import train

runner = CliRunner()
DERIVED = ("features", "embeddings", "index", "eval")  # caches and results mmret writes itself


def mutations(data: bytes, seed: int) -> list[tuple[str, bytes]]:
    rng = random.Random(seed)
    cut = rng.randrange(1, max(2, len(data)))
    middle = bytearray(data)
    start = rng.randrange(0, max(1, len(data) - 16))
    middle[start:start + 16] = bytes(rng.randrange(256) for _ in range(16))
    return [("empty", b""), ("truncated", data[:cut]), ("overwritten", bytes(middle)),
            ("garbage", bytes(rng.randrange(256) for _ in range(len(data))))]


def files_state(root: Path, skip: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for path in root.rglob("*"):
        if path.is_file() and path != skip and not any(part in DERIVED for part in path.relative_to(root).parts):
            st = path.stat()
            out[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    prepare(PrepareConfig(source="example", count=30, data_dir=root / "data"))
    vit, bert = tiny_models.save_tiny_timm_vit(root / "vit"), tiny_models.save_tiny_bert(root / "bert")
    cfg = with_overrides(RunConfig(), dict(method="heads", dataset="example", item=str(vit), text=str(bert),
                                           data_dir=root / "data", runs_dir=root / "runs", epochs=1, batch_size=8,
                                           embed_dim=8, patience=0, name="r"))
    train(cfg)
    assert runner.invoke(app, ["eval", "--run", str(root / "runs" / "r")], env=env(root)).exit_code == 0
    tiny_models.save_picture(root / "query.png")
    return root


def env(root: Path) -> dict[str, str]:
    return {"MMRET_DATA_DIR": str(root / "data"), "MMRET_RUNS_DIR": str(root / "runs")}


def targets(root: Path) -> list[tuple[str, Path, list[str]]]:
    """(kind, file, the command that reads it)."""
    run, ds = root / "runs" / "r", root / "data" / "example"
    cache = next(p for p in (ds / "features").iterdir() if "images" in p.name)
    emb = run / "embeddings" / "example-test"
    evaluate = ["eval", "--run", str(run)]
    return [
        ("parquet", ds / "images.parquet", evaluate), ("parquet", ds / "captions.parquet", evaluate),
        ("parquet", emb / "captions.parquet", evaluate),
        ("json", ds / "dataset.json", evaluate), ("json", run / "config.json", evaluate),
        ("json", cache / "manifest.json", ["verify", "--dataset", "example"]),
        ("json", cache / "ids.json", ["verify", "--dataset", "example"]),
        ("npy", cache / "pooled.npy", ["verify", "--dataset", "example"]),
        ("npy", emb / "items.npy", evaluate),
        ("safetensors", run / "checkpoints" / "best.safetensors", evaluate),
        ("picture", root / "query.png", ["search", "--run", str(run), "--image", str(root / "query.png")]),
    ]


@pytest.mark.parametrize("kind", ["parquet", "json", "npy", "safetensors", "picture"])
def test_damaged_files_end_in_one_line(world, kind):
    seen = 0
    for i, (k, path, command) in enumerate(targets(world)):
        if k != kind:
            continue
        original = path.read_bytes()
        try:
            for name, damaged in mutations(original, seed=i):
                path.write_bytes(damaged)
                before = files_state(world, path)
                result = runner.invoke(app, command, env=env(world))
                where = f"{path.name} {name}: {result.output[-400:]}"
                assert result.exit_code in (0, 1), where
                assert "Traceback" not in result.stdout + result.stderr, where
                assert result.exception is None or isinstance(result.exception, SystemExit), where
                if result.exit_code == 1:
                    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), where
                assert files_state(world, path) == before, where
                seen += 1
        finally:
            path.write_bytes(original)
    assert seen >= 4
