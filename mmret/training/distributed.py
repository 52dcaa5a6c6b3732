"""A run on many processes: `torchrun --nproc_per_node N -m mmret train ...` (or the same command
under SLURM's `srun`) runs one process per GPU (or CPU slot), all training one run; `mmret train
--nproc N` starts N on this machine with torchrun's launcher.

The processes themselves, their data order and DistributedDataParallel are `mmret.training.world`'s;
the loss over the global batch is `mmret.training.losses.ClipLoss` (gathered with gradient, labels
offset by rank, as open_clip's `local_loss` + `gather_with_grad`), composed with gradient caching:
each process caches its own micro-batches, the gather sits inside the loss over the cached
embeddings, and only the backward that ends the step goes through DDP. This module runs the
training loop on a world, turning the death of another process into one line, and launches the
processes.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import torch

from mmret.errors import MmretError
from mmret.training.world import World


class ProcessStopped(BaseException):
    """The launcher (torchrun, srun) asked this process to stop, usually because another one died."""


def _stopped(signum: int, frame: Any) -> None:
    raise ProcessStopped(signal.Signals(signum).name)


def _is_collective_failure(e: BaseException) -> bool:
    if isinstance(e, (ProcessStopped, torch.distributed.DistError)):
        return True
    text = str(e)
    return isinstance(e, RuntimeError) and any(k in text for k in ("Connection closed by peer", "remote worker",
                                                                   "gloo", "NCCL", "Connection reset"))


def last_good(run_dir: Path | None) -> str:
    """Where the run's last good checkpoint is and how to continue from it."""
    from mmret.runs.checkpoint import read_meta

    last = run_dir / "checkpoints" / "last.safetensors" if run_dir is not None else None
    if last is None or not last.is_file():
        return "no checkpoint was written yet: start it again"
    step = read_meta(last).get("step")
    return (f"`last` ({last}) is the last good checkpoint (step {step}): continue with "
            f"`mmret train --resume {run_dir.name}` on any number of processes")


def run_on_world(fn: Callable[[], Any], world: World, cfg: Any, resume_dir: Path | None) -> Any:
    """Run `fn` (the training loop) on this process of a world, turning the death of another
    process (a failed collective) or the launcher's SIGTERM into one line that says which process
    saw it and where the last good checkpoint is. Nothing is written on the way out: `last` stays
    the last checkpoint every process had finished the steps of."""
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        return fn()
    except BaseException as e:
        if not _is_collective_failure(e):
            raise
        run_dir = resume_dir or (cfg.runs_dir / cfg.name if cfg.name else None)
        why = f"stopped by {e}" if isinstance(e, ProcessStopped) else "lost contact with another process"
        raise MmretError(f"process {world.rank} of {world.size} {why}; the run ends here. "
                         f"{last_good(run_dir)}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def launch_local(nproc: int, args: list[str]) -> None:
    """`mmret train --nproc N`: torchrun's launcher (torch.distributed's elastic agent), started in
    this process, runs `python -m mmret train ARGS` N times on this machine. A process that fails
    ends the others and this call, with one line naming it."""
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if nproc < 1:
        raise MmretError(f"--nproc must be at least 1, got {nproc}")
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=f"mmret-{uuid.uuid4().hex[:8]}",
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    try:
        elastic_launch(config, sys.executable)("-m", "mmret", "train", *args)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        how = f"signal {failure.signal_name()}" if failure.exitcode < 0 else f"exit code {failure.exitcode}"
        raise MmretError(f"process {rank} of {nproc} failed ({how}); the others were stopped. Its own error is "
                         f"printed above; an interrupted run continues with `mmret train --resume RUN`") from None


def train_on_processes(nproc: int, cfg: Any = None, resume_dir: Path | None = None, *, epochs: int | None = None,
                       max_steps: int | None = None) -> None:
    """`mmret train --nproc N`: the run configured by `cfg` (or the stopped run `resume_dir`,
    trained on to `epochs` or `max_steps` when given) on N processes of this machine. The resolved
    config goes to the processes as a file, so each builds exactly the same run; the first process
    prints what one process would."""
    import tempfile

    from mmret.common.io import write_json

    if resume_dir is not None:
        longer = [f"--{k.replace('_', '-')}={v}" for k, v in (("epochs", epochs), ("max_steps", max_steps)) if v]
        return launch_local(nproc, ["--resume", str(resume_dir), *longer])
    if cfg.train.batch_size < 2 * nproc:
        raise MmretError(f"--batch-size {cfg.train.batch_size} is split over {nproc} processes; use at least "
                         f"{2 * nproc} (two pairs a process)")
    if not torch.cuda.is_available():  # CPU processes share the cores instead of each taking all of them
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    with tempfile.TemporaryDirectory(prefix="mmret-nproc-") as tmp:
        path = Path(tmp) / "config.json"
        write_json(path, cfg.to_dict())
        return launch_local(nproc, ["--config", str(path)])
