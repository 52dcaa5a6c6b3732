"""A run on 2 processes (gloo on the CPU) ends with the validation metrics of the 1-process run of
the same seed; a 2-process run stopped half-way resumes on 1 process; a process that dies ends
the run with one line and leaves `last` as the last good checkpoint; `mmret train --nproc 2`."""

from __future__ import annotations

import os
import re

import pandas as pd
import pytest
import torch.multiprocessing as mp
from test_distributed import free_port
from typer.testing import CliRunner

from mmret import training
from mmret.cli import app
from mmret.runs import RunConfig, with_overrides
from mmret.runs.checkpoint import read_meta

RECALLS = ["t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "mean_recall"]
LOSSES = ["train_loss", "val_loss"]
# Tolerance: recalls equal exactly; losses within 1e-4 (float32 sums taken in another order on 2
# processes move the weights by ~1e-7 a step)
LOSS_TOL = 1e-4


def config(world, runs, **options) -> RunConfig:
    base = dict(method="heads", dataset="example", item=world["vit"], text=world["bert"],
                data_dir=world["root"] / "data", runs_dir=runs, epochs=3, batch_size=16, lr=5e-3, embed_dim=32,
                head_layers=2, patience=0, dropout=0.0, device="cpu")
    return with_overrides(RunConfig(), {**base, **options})


def _rank(rank: int, size: int, port: int, cfg: dict, stop_at: int | None, die_at: int | None, out: str) -> None:
    from mmret.errors import MmretError
    from mmret.training import loop

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    real_step = loop.train_step

    def step(s, images, texts, *negatives):
        if s.state.step == stop_at:
            raise KeyboardInterrupt
        if s.state.step == die_at and rank == 1:
            os._exit(7)
        return real_step(s, images, texts, *negatives)

    loop.train_step = step
    try:
        training.train(RunConfig.from_dict(cfg))
    except (MmretError, training.TrainingInterrupted) as e:
        with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
            f.write(str(e))


def on_processes(cfg: RunConfig, out, stop_at=None, die_at=None, size=2) -> list[int]:
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank, args=(r, size, port, cfg.to_dict(), stop_at, die_at, str(out)))
             for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(300)
    return [p.exitcode for p in procs]


def metrics(run_dir) -> pd.DataFrame:
    return pd.read_parquet(run_dir / "metrics.parquet")


def assert_same_metrics(a: pd.DataFrame, b: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(a[RECALLS], b[RECALLS])
    pd.testing.assert_frame_equal(a[LOSSES], b[LOSSES], check_exact=False, atol=LOSS_TOL, rtol=0)


@pytest.fixture(scope="module")
def one(tiny_world, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    return training.train(config(tiny_world, runs, name="one")), runs


def cli_args(world, runs, name: str) -> list[str]:
    return ["train", "--method", "heads", "--dataset", "example", "--vision", world["vit"], "--text", world["bert"],
            "--data-dir", str(world["root"] / "data"), "--runs-dir", str(runs), "--epochs", "3", "--batch-size", "16",
            "--lr", "5e-3", "--embed-dim", "32", "--head-layers", "2", "--patience", "0", "--dropout", "0",
            "--device", "cpu", "--name", name, "--nproc", "2"]


def test_two_processes_end_with_the_metrics_of_one_and_resume_on_one(tiny_world, one, tmp_path, monkeypatch, capfd):
    single, runs = one
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    result = CliRunner().invoke(app, cli_args(tiny_world, runs, "two"))  # torchrun's launcher, started here
    assert result.exit_code == 0, result.output
    said = capfd.readouterr().err  # the processes' own output: the first speaks for the run, once
    assert re.search(r"^training heads on example: .*, fp32 on cpu, 2 processes \(gloo\)$", said, re.M), said
    assert said.count("too few to learn") == 1, said
    assert_same_metrics(metrics(single.run_dir), metrics(runs / "two"))
    assert on_processes(config(tiny_world, runs, name="stopped"), tmp_path, stop_at=4) == [0, 0]
    assert "continue with `mmret train --resume stopped`" in (tmp_path / "rank0.txt").read_text()
    assert read_meta(runs / "stopped" / "checkpoints" / "last.safetensors")["step"] == 4
    resumed = training.resume(runs / "stopped")  # on this one process
    assert resumed.processes == 1 and resumed.steps == single.steps
    assert_same_metrics(metrics(single.run_dir), metrics(resumed.run_dir))


def test_a_process_that_dies_ends_the_run_and_last_stays_good(tiny_world, one, tmp_path):
    _, runs = one
    codes = on_processes(config(tiny_world, runs, name="dies"), tmp_path, die_at=4)  # 3 steps an epoch
    assert codes == [0, 7]  # rank 0 ends on its own, with a line
    line = (tmp_path / "rank0.txt").read_text()
    assert line.startswith("process 0 of 2 lost contact with another process; the run ends here.")
    assert "(step 3): continue with `mmret train --resume dies`" in line
    assert read_meta(runs / "dies" / "checkpoints" / "last.safetensors")["step"] == 3
    assert training.resume(runs / "dies").steps == 9


def test_nproc_refuses_a_batch_too_small_to_split_and_names_a_failed_process(tiny_world, one, tmp_path):
    _, runs = one
    args = cli_args(tiny_world, runs, "small")
    small = CliRunner().invoke(app, args[:args.index("--batch-size") + 1] + ["2"]
                               + args[args.index("--batch-size") + 2:])
    assert small.exit_code == 1 and "--batch-size 2 is split over 2 processes; use at least 4" in small.output
