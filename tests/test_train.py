"""The training core on tiny random towers and the `example` dataset: learning, exact resume,
checkpoints without frozen weights, the dry-run table, early stopping and failure modes."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mmret import training
from mmret.cli import app
from mmret.data.pairs import epoch_batches
from mmret.errors import MmretError
from mmret.runs import RunConfig, with_overrides
from mmret.runs.checkpoint import read_meta
from mmret.training import loop
from mmret.training import step as step_module

RECALLS = ["t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "mean_recall", "train_loss", "val_loss"]


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world


def config(world, tmp_path, **options) -> RunConfig:
    base = dict(dataset="example", item=world["vit"], text=world["bert"], data_dir=world["root"] / "data",
                runs_dir=tmp_path / "runs", epochs=4, batch_size=16, lr=5e-3, embed_dim=32, head_layers=2,
                queries=4, bridge_layers=1, bridge_width=32, bridge_heads=4, patience=0, dropout=0.1)
    return with_overrides(RunConfig(), {**base, **options})


def metrics(run_dir) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "metrics.parquet")


@pytest.mark.parametrize("method", ["heads", "bridge"])
def test_training_loss_falls_and_the_run_folder_is_complete(world, tmp_path, method):
    result = training.train(config(world, tmp_path, method=method, epochs=6, name="r"))
    history = metrics(result.run_dir)
    assert len(history) == 6 and history["train_loss"].iloc[-1] < history["train_loss"].iloc[0] - 0.2
    for name in ("config.json", "train.log", "metrics.parquet", "plots/learning_curve.png",
                 "checkpoints/best.safetensors", "checkpoints/last.safetensors", "checkpoints/last.state.safetensors"):
        assert (result.run_dir / name).is_file(), name
    assert (tmp_path / "runs" / "latest").resolve() == result.run_dir
    assert json.loads((result.run_dir / "config.json").read_text())["method"]["method"] == method


def test_checkpoints_hold_only_the_trainable_part(world, tmp_path):
    result = training.train(config(world, tmp_path, method="bridge", epochs=1))
    saved = load_file(str(result.run_dir / "checkpoints" / "last.safetensors"))
    assert {k.split(".")[0] for k in saved} == {"item_tower", "text_tower", "temperature"}
    model = training.setup(config(world, tmp_path, method="bridge", name="probe")).model
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(v.numel() for v in saved.values()) == trainable  # no frozen tower inside


def test_killed_and_resumed_run_ends_with_the_same_metrics(world, tmp_path, monkeypatch):
    whole = training.train(config(world, tmp_path, method="bridge", name="whole"))
    real_step = loop.train_step

    def step_then_kill(s, images, texts, *negatives):
        if s.state.step == 5:  # in the middle of epoch 2 (3 steps an epoch)
            raise KeyboardInterrupt
        return real_step(s, images, texts, *negatives)

    monkeypatch.setattr(loop, "train_step", step_then_kill)
    with pytest.raises(training.TrainingInterrupted, match="continue with `mmret train --resume killed`"):
        training.train(config(world, tmp_path, method="bridge", name="killed"))
    monkeypatch.setattr(loop, "train_step", real_step)
    resumed = training.resume(tmp_path / "runs" / "killed")
    pd.testing.assert_frame_equal(metrics(whole.run_dir)[RECALLS], metrics(resumed.run_dir)[RECALLS])
    a = load_file(str(whole.run_dir / "checkpoints" / "last.safetensors"))
    b = load_file(str(resumed.run_dir / "checkpoints" / "last.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.steps == whole.steps == 12


def test_gradient_caching_run_matches_the_full_batch_run(world, tmp_path):
    full = training.train(config(world, tmp_path, method="heads", name="full", dropout=0.0, epochs=2))
    cached = training.train(config(world, tmp_path, method="heads", name="cached", dropout=0.0, epochs=2,
                                   micro_batch=4))
    pd.testing.assert_frame_equal(metrics(full.run_dir)[RECALLS], metrics(cached.run_dir)[RECALLS],
                                  atol=1e-4, rtol=1e-4)


def test_dry_run_counts_are_exact(world, tmp_path):
    plan = training.dry_run(config(world, tmp_path, method="heads", head_layers=2, head_hidden=16, embed_dim=8))
    rows = {r.part.split(" (")[0]: (r.total, r.trainable) for r in plan.rows}
    vit_width, bert_width = 32, 32  # tiny_models.HIDDEN: pooled widths of both tiny towers
    # input norm (scale + shift), fc1 weight + bias, fc2 weight + bias
    item_head = 2 * vit_width + vit_width * 16 + 16 + 16 * 8 + 8
    text_head = 2 * bert_width + bert_width * 16 + 16 + 16 * 8 + 8
    assert rows["image"] == (item_head, item_head)  # the item side is named after what it reads
    assert rows["text"] == (text_head, text_head)
    assert rows["temperature"] == (1, 1)
    frozen = rows["image encoder"][0] + rows["text encoder"][0]
    assert rows["image encoder"][1] == rows["text encoder"][1] == 0
    assert rows["total"] == (frozen + item_head + text_head + 1, item_head + text_head + 1)


def test_early_stopping_when_validation_stops_improving(world, tmp_path):
    result = training.train(config(world, tmp_path, method="heads", lr=1e-12, epochs=10, patience=2, warmup=0.0))
    assert result.epochs == 3 and result.stopped.startswith("early stop")


def test_non_finite_loss_stops_with_a_clear_message_and_keeps_the_last_checkpoint(world, tmp_path, monkeypatch):
    real = step_module.contrastive_step
    calls = {"n": 0}

    def nan_after_an_epoch(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 5 else loss

    monkeypatch.setattr(step_module, "contrastive_step", nan_after_an_epoch)
    with pytest.raises(MmretError, match=r"the loss became nan at step 5 \(epoch 2\); training stopped and the last "
                                         r"good checkpoint is kept"):
        training.train(config(world, tmp_path, method="heads", name="nan"))
    assert read_meta(tmp_path / "runs" / "nan" / "checkpoints" / "last.safetensors")["step"] == 3


def test_max_steps_stops_mid_epoch_with_an_evaluation(world, tmp_path):
    result = training.train(config(world, tmp_path, method="heads", max_steps=2))
    assert result.steps == 2 and result.stopped == "reached --max-steps 2" and len(metrics(result.run_dir)) == 1


def test_same_seed_same_run(world, tmp_path):
    a = training.train(config(world, tmp_path, method="bridge", name="a", epochs=2))
    b = training.train(config(world, tmp_path, method="bridge", name="b", epochs=2))
    pd.testing.assert_frame_equal(metrics(a.run_dir)[RECALLS], metrics(b.run_dir)[RECALLS])


def test_epoch_order_is_pure_and_covers_every_image_once():
    captions_of = [np.array([2 * i, 2 * i + 1]) for i in range(11)]
    first = epoch_batches(captions_of, 4, seed=1, epoch=3)
    assert [b[0].tolist() for b in first] == [b[0].tolist() for b in epoch_batches(captions_of, 4, seed=1, epoch=3)]
    assert sorted(np.concatenate([b[0] for b in first]).tolist()) == list(range(11))
    assert all(c in captions_of[i] for b in first for i, c in zip(*b))
    assert [len(b[0]) for b in epoch_batches(captions_of[:9], 4, 0, 0)] == [4, 5]  # no batch of one
    assert epoch_batches(captions_of, 4, 1, 4)[0][0].tolist() != first[0][0].tolist()


def test_folds_partition_the_images(example_ds):
    tests = [set(example_ds.with_folds(5, k).split("test").items.item_id) for k in range(5)]
    assert set().union(*tests) == set(example_ds.items.item_id)
    assert sum(len(t) for t in tests) == len(example_ds.items)
    fold = example_ds.with_folds(5, 0)
    assert set(fold.captions.split) == {"train", "val", "test"}
    assert (fold.captions.set_index("item_id").split.groupby(level=0).nunique() == 1).all()


def test_cli_train_dry_run_and_bad_method(world, tmp_path, monkeypatch):
    monkeypatch.setenv("MMRET_DATA_DIR", str(world["root"] / "data"))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(tmp_path / "runs"))
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--method", "heads", "--vision", world["vit"], "--text", world["bert"],
                                 "--dry-run", "--head-layers", "1", "--embed-dim", "8"])
    assert result.exit_code == 0, result.output
    assert re.search(r"│ image\s+│\s+328 │\s+328 │\s+100.00% │", result.stdout)  # 2*32 + 32*8 + 8
    assert '"method": "heads"' in result.stdout
    bad = runner.invoke(app, ["train", "--method", "magic"])
    assert (bad.exit_code, bad.stderr.strip()) == (1, "error: unknown method 'magic'; choose one of heads, bridge, "
                                                      "lora, prefix, adapter, full, scratch")
    missing = runner.invoke(app, ["train", "--method", "heads", "--dataset", "nope", "--vision", world["vit"],
                                  "--text", world["bert"]])
    assert missing.exit_code == 1 and missing.stderr.startswith("error: no prepared dataset 'nope'")
    no_run = runner.invoke(app, ["train", "--resume", "ghost"])
    assert no_run.exit_code == 1 and "no run 'ghost'" in no_run.stderr


def test_cli_trains_and_prints_the_best_validation_table(world, tmp_path, monkeypatch):
    monkeypatch.setenv("MMRET_DATA_DIR", str(world["root"] / "data"))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(tmp_path / "runs"))
    result = CliRunner().invoke(app, ["train", "--method", "heads", "--vision", world["vit"], "--text", world["bert"],
                                      "--epochs", "2", "--batch-size", "16", "--name", "cli"])
    assert result.exit_code == 0, result.output
    assert "best validation" in result.stdout and "finished all epochs after 2 epochs, 6 steps" in result.stdout


def test_a_finished_run_is_resumed_only_to_train_longer(world, tmp_path):
    result = training.train(config(world, tmp_path, method="heads", epochs=1, name="done"))
    with pytest.raises(MmretError, match=r"run done has already finished \(finished all epochs\) after 1 epochs; to "
                                         r"train it longer: `mmret train --resume done --epochs N` with N above 1"):
        training.resume(result.run_dir)
    with pytest.raises(MmretError, match=r"run done has trained 1 epochs \(3 steps\); --epochs 1 leaves nothing to do"):
        training.resume(result.run_dir, epochs=1)


def test_extending_a_run_follows_the_schedule_of_the_longer_run(world, tmp_path, monkeypatch):
    """A finished 2-epoch run extended to 3 takes, at every step of its third epoch, the learning
    rate a run started with --epochs 3 takes: the cosine over 9 steps (3 an epoch), not a new cycle."""
    seen: list[tuple[int, int, int, float]] = []  # (step, planned total, warm-up, rate), once per parameter group
    real = step_module.lr_at

    def spy(step, total, warmup, peak):
        seen.append((step, total, warmup, real(step, total, warmup, peak)))
        return seen[-1][3]

    monkeypatch.setattr(step_module, "lr_at", spy)
    training.train(config(world, tmp_path, method="heads", epochs=3, name="three"))
    three, seen[:] = list(seen), []
    short = training.train(config(world, tmp_path, method="heads", epochs=2, name="two"))
    assert short.steps == 6 and seen[-1][1] == 6 and seen[-1][3] < 0.1 * 5e-3  # decayed to near zero at its end
    seen.clear()
    longer = training.resume(short.run_dir, epochs=3)
    assert (longer.epochs, longer.steps, longer.stopped) == (3, 9, "finished all epochs")
    assert [row[0] for row in three] == [s for s in range(9) for _ in (0, 1)]  # two parameter groups
    assert seen == three[12:]  # steps 6, 7, 8 of a 9-step plan: same total, warm-up and rates
    peak, (step, total, warmup, lr) = 5e-3, seen[0]
    assert (step, total, warmup) == (6, 9, 0)
    assert lr == pytest.approx(peak * 0.5 * (1 + np.cos(np.pi * 6 / 9)))  # a quarter of the peak, restarted
    saved = json.loads((short.run_dir / "config.json").read_text())
    assert saved["train"]["epochs"] == 3 and len(metrics(short.run_dir)) == 3
    log = (short.run_dir / "train.log").read_text()
    assert "extended from --epochs 2 to --epochs 3 at epoch 3, step 6 (it had finished: finished all epochs)" in log
