"""Training on many processes: `torchrun --nproc_per_node N -m mmret train ...` (or the same
command under SLURM's `srun`) runs one process per GPU (or CPU slot), all training one run.

The shape is open_clip's (`gather_features` + `ClipLoss(local_loss=True, gather_with_grad=True)`),
built from torch.distributed alone (NCCL on CUDA, gloo on the CPU):

- one data order: every process walks the same seeded global batches (`epoch_batches`, a pure
  function of seed and epoch) and takes its own slice of each (`World.part`), so `--batch-size`
  still counts the pairs in one contrastive loss whatever the number of processes, and a run
  stopped on N processes resumes on M;
- the loss: each process embeds its slice, the embeddings of all processes are all-gathered with
  gradient (`gather_rows`), and each process scores its own rows against every column of the global
  batch, its labels offset by the rows before it (`GatheredClipLoss`). The per-process losses are
  weighted so that their mean is the one-process loss over the global batch; DistributedDataParallel
  averages the gradients, so the step equals one process's step over the global batch;
- gradient caching composes: each process caches its own micro-batches, the gather sits inside the
  loss over the cached embeddings, and only the backward that ends the step goes through DDP;
- DDP over the trainable parameters only: frozen towers are neither broadcast nor reduced;
- rank 0 alone writes (metrics, plots, checkpoints) and computes validation; the others wait at a
  barrier and receive its numbers, so early stopping is decided once and the same everywhere.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import warnings
from dataclasses import dataclass
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mmret.errors import MmretError
from mmret.models.batch import Batch, call
from mmret.training.session import World

_logger = logging.getLogger(__name__)

DEFAULT_PORT = "29500"
TIMEOUT = timedelta(minutes=30)  # how long a collective waits for a process that is stuck (not dead)


# ---------------------------------------------------------------------------- the processes


def env_world() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) from torchrun's variables, else from SLURM's (`srun` starting
    one task per GPU); None for a single process."""
    env = os.environ
    if int(env.get("WORLD_SIZE", "1")) > 1:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0"))
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env and "RANK" not in env:
        if "MASTER_ADDR" not in env:
            raise MmretError("under srun, export MASTER_ADDR (the first node: "
                             "$(scontrol show hostnames $SLURM_JOB_NODELIST | head -n 1)) before mmret train")
        rank, size, local = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0"))
        env.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(local))
        env.setdefault("MASTER_PORT", DEFAULT_PORT)
        return rank, size, local
    return None


@dataclass
class DistributedWorld(World):
    """The processes of one run, joined by torch.distributed."""

    local_rank: int = 0

    def barrier(self) -> None:
        torch.distributed.barrier()

    def part(self, n: int) -> slice:
        """This process's rows of a global batch of `n`: contiguous, sizes differing by at most one."""
        bounds = np.cumsum([0] + [len(p) for p in np.array_split(np.arange(n), self.size)])
        return slice(int(bounds[self.rank]), int(bounds[self.rank + 1]))

    def positives(self, positives: Tensor | None, accumulation: str) -> Tensor | None:
        """The gathered loss (`--accumulation cache`) reads the global batch's (B, B); plain
        accumulation's loss sees this process's pairs alone, so it gets their block."""
        if positives is None or accumulation == "cache":
            return positives
        part = self.part(len(positives))
        return positives[part, part]

    def sizes(self, n: int, device: torch.device) -> list[int]:
        """How many rows every process holds."""
        counts = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(self.size)]
        torch.distributed.all_gather(counts, torch.tensor([n], dtype=torch.long, device=device))
        return [int(c) for c in counts]

    def mean(self, x: Tensor) -> Tensor:
        """The mean of a tensor over the processes (detached)."""
        y = x.detach().clone()
        torch.distributed.all_reduce(y)
        return y / self.size

    def share(self, value: Any, device: torch.device) -> Any:
        """Rank 0's JSON-able `value`, on every process. Sent as JSON bytes in a tensor rather than
        with `broadcast_object_list`, which would unpickle what it receives."""
        data = json.dumps(value).encode() if self.is_main else b""
        size = torch.tensor([len(data)], dtype=torch.long, device=device)
        torch.distributed.broadcast(size, 0)
        buf = torch.zeros(int(size), dtype=torch.uint8, device=device)
        if self.is_main:
            buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        torch.distributed.broadcast(buf, 0)
        return json.loads(bytes(buf.cpu().numpy().tobytes()).decode())


def start_world(device: str = "auto") -> World:
    """The world this process trains in: joins the process group when torchrun or SLURM started
    several processes (NCCL when training on CUDA, gloo otherwise), else a world of one."""
    found = env_world()
    if found is None:
        return World()
    rank, size, local = found
    cuda = torch.cuda.is_available() and not device.startswith("cpu")
    if cuda:
        torch.cuda.set_device(local % torch.cuda.device_count())
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    _logger.info("process %d of %d (%s)", rank, size, torch.distributed.get_backend())
    return DistributedWorld(rank, size, local)


def stop_world(world: World) -> None:
    if isinstance(world, DistributedWorld) and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------- the loss


def gather_rows(x: Tensor, world: DistributedWorld) -> tuple[Tensor, int, int]:
    """Every process's rows of `x` (b, D) in rank order, with gradient (the backward sends each
    process the gradient of its own rows, summed over the processes), and where this process's rows
    start, and how many there are in all. Processes may hold different numbers of rows: each pads
    to the largest before the all-gather (which needs equal shapes) and the padding is cut away."""
    sizes = world.sizes(len(x), x.device)
    padded = F.pad(x, (0, 0, 0, max(sizes) - len(x))).contiguous()
    with warnings.catch_warnings():  # open_clip's gather_with_grad; torch suggests a private module instead
        warnings.simplefilter("ignore", FutureWarning)
        parts = torch.distributed.nn.functional.all_gather(padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)]), sum(sizes[:world.rank]), sum(sizes)


class GatheredClipLoss:
    """The contrastive loss of the global batch, as this process's share: its rows (items and
    captions) against the gathered columns of every process, labels offset by the rows before it
    (open_clip's `local_loss`). Summed over its rows and scaled by world size / (2 x global batch),
    so the mean over processes (what DDP's gradient averaging takes) is `clip_loss` over the
    global batch. `scale_for(all_item_emb, all_text_emb)` recomputes the logit scale over the
    gathered batch (a dynamic temperature reads the global similarities, as on one process)."""

    def __init__(self, world: DistributedWorld, scale_for: Callable[[Tensor, Tensor], Tensor] | None = None,
                 hn_beta: float = 0.0):
        self.world, self.scale_for, self.hn_beta = world, scale_for, hn_beta

    def __call__(self, item_emb: Tensor, text_emb: Tensor, logit_scale: Tensor,
                 positives: Tensor | None = None) -> Tensor:
        """`positives` (B, B) bool over the GLOBAL batch: pairs beyond the diagonal that count as
        right (as `clip_loss` takes them); with them or `hn_beta`, each row's loss is `row_losses`'."""
        all_items, start, total = gather_rows(item_emb, self.world)  # (B, D)
        all_texts, _, _ = gather_rows(text_emb, self.world)  # (B, D)
        if self.scale_for is not None:
            logit_scale = self.scale_for(all_items, all_texts)
        labels = torch.arange(start, start + len(item_emb), device=item_emb.device)
        per_item = logit_scale * item_emb @ all_texts.T  # (b, B)
        per_text = logit_scale * text_emb @ all_items.T  # (b, B)
        if positives is not None or self.hn_beta:
            from mmret.training.losses import row_losses

            eye = torch.zeros_like(per_item, dtype=torch.bool)
            eye[torch.arange(len(labels)), labels] = True
            pos = positives.to(device=eye.device, dtype=torch.bool) if positives is not None else None
            rows_i = eye if pos is None else pos[start:start + len(labels)] | eye
            rows_t = eye if pos is None else pos.T[start:start + len(labels)] | eye
            summed = row_losses(per_item, rows_i, self.hn_beta).sum() + row_losses(per_text, rows_t, self.hn_beta).sum()
            return summed * (self.world.size / (2 * total))
        summed = F.cross_entropy(per_item, labels, reduction="sum") + F.cross_entropy(per_text, labels, reduction="sum")
        return summed * (self.world.size / (2 * total))


def local_clip_loss(item_emb: Tensor, text_emb: Tensor, logit_scale: Tensor, **kw: Any) -> Tensor:
    """The loss WITHOUT the gather: each process's pairs see only its own slice's negatives. Kept
    for comparison (the test shows it does not equal the one-process step) and for `--accumulation
    plain`, where each micro-batch sees only its own negatives anyway."""
    from mmret.training.losses import clip_loss

    return clip_loss(item_emb, text_emb, logit_scale, **kw)


# ---------------------------------------------------------------------------- DDP


class PairEmbed(nn.Module):
    """What DistributedDataParallel wraps: a forward from (items, captions) to their embeddings.

    The models' own entry points are `encode_item` / `encode_text`, which DDP cannot see; this
    forward calls them. It also adds zero times every trainable parameter to the output, so each
    parameter's gradient hook fires in the backward that ends the step: the temperature (whose
    gradient came earlier, in the loss over cached embeddings) and any parameter a tower holds but
    does not use are averaged with the rest instead of leaving DDP waiting for them."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, items: Batch, texts: Batch) -> tuple[Tensor, Tensor]:
        item_emb, text_emb = call(self.model.encode_item, items), call(self.model.encode_text, texts)
        touch = sum(p.sum() for p in self.model.parameters() if p.requires_grad) * 0.0
        return item_emb + touch, text_emb + touch


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP over the trainable parameters of `model` only (frozen ones are ignored: neither
    broadcast at the start nor reduced). Buffers are not broadcast at every forward: processes may
    run different numbers of micro-batches, and a collective in the forward would then deadlock."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    module = PairEmbed(model)
    frozen = [name for name, p in module.named_parameters() if not p.requires_grad]
    DDP._set_params_and_buffers_to_ignore_for_model(module, frozen)
    device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else None
    import inspect

    # newer torch names it forward_sync_buffers (buffers are still made equal once, at the start)
    sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else "broadcast_buffers"
    return DDP(module, device_ids=device_ids, **{sync: False})


def distribute_step(stepper: Any, world: DistributedWorld, accumulation: str) -> None:
    """Make a `Stepper` step over this process's slice of the global batch: DDP averages its
    gradients, the loss is gathered (exact, with or without gradient caching) and averaged."""
    batch = stepper.train.batch_size
    if batch < 2 * world.size:
        raise MmretError(f"--batch-size {batch} is split over {world.size} processes; use at least {2 * world.size} "
                         "(two pairs a process)")
    ddp = wrap_ddp(stepper.model, stepper.device)
    stepper.sync_embed = ddp
    stepper.mean_loss = world.mean
    beta = stepper.train.hn_beta
    if accumulation == "cache":
        stepper.loss_fn = GatheredClipLoss(world, stepper.model.logit_scale_for, beta)
    else:  # plain accumulation: each micro-batch sees only its own negatives, here as on one process
        stepper.loss_fn = partial(local_clip_loss, hn_beta=beta) if beta else local_clip_loss


# ---------------------------------------------------------------------------- a run on many processes


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
        raise MmretError(f"process {world.rank} of {world.size} {why}; the run ends here. {last_good(run_dir)}") from None
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


def train_on_processes(nproc: int, cfg: Any = None, resume_dir: Path | None = None) -> None:
    """`mmret train --nproc N`: the run configured by `cfg` (or the stopped run `resume_dir`) on N
    processes of this machine. The resolved config goes to the processes as a file, so each
    builds exactly the same run; the first process prints what one process would."""
    import tempfile

    from mmret.common.io import write_json

    if resume_dir is not None:
        return launch_local(nproc, ["--resume", str(resume_dir)])
    if cfg.train.batch_size < 2 * nproc:
        raise MmretError(f"--batch-size {cfg.train.batch_size} is split over {nproc} processes; use at least {2 * nproc} "
                         "(two pairs a process)")
    if not torch.cuda.is_available():  # CPU processes share the cores instead of each taking all of them
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    with tempfile.TemporaryDirectory(prefix="mmret-nproc-") as tmp:
        path = Path(tmp) / "config.json"
        write_json(path, cfg.to_dict())
        return launch_local(nproc, ["--config", str(path)])
