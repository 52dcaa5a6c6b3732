"""The processes a run trains in. `World` is one process: the only writer, nothing to wait for,
the whole of every batch. `DistributedWorld` is one of several processes joined by
torch.distributed (`torchrun --nproc_per_node N -m mmret train ...`, SLURM's `srun`, or
`mmret train --nproc N`): NCCL on CUDA, gloo on the CPU.

- one data order: every process walks the same seeded global batches and takes its own slice of
  each (`part`), so `--batch-size` still counts the pairs in one contrastive loss whatever the
  number of processes, and a run stopped on N processes resumes on M;
- DistributedDataParallel averages the gradients (`ddp`): only parameters that require a gradient
  are reduced, so frozen towers cost nothing after the start, when DDP makes every process's
  parameters and buffers equal to rank 0's;
- rank 0 alone writes and validates; the others wait at a barrier and receive its numbers (`share`),
  so early stopping is decided once and the same everywhere.
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor, nn

from mmret.errors import MmretError
from mmret.models.batch import Batch, call

_logger = logging.getLogger(__name__)

DEFAULT_PORT = "29500"
TIMEOUT = timedelta(minutes=30)  # how long a collective waits for a process that is stuck (not dead)
Embed = Callable[[Batch, Batch], tuple[Tensor, Tensor]]  # (items, texts) -> (item_emb, text_emb)


@dataclass
class World:
    """The processes a run trains in: one, by default."""

    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        """Whether this process writes the run's files (metrics, plots, checkpoints)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every process gets here (nothing to wait for alone)."""

    def part(self, n: int) -> slice:
        """This process's rows of a global batch of `n` pairs (all of them alone)."""
        return slice(0, n)

    def share(self, value: Any, device: torch.device) -> Any:
        """The main process's `value` (JSON-able), on every process."""
        return value

    def mean(self, x: Tensor) -> Tensor:
        """The mean of a tensor over the processes (detached)."""
        return x.detach()

    def positives(self, positives: Tensor | None, accumulation: str) -> Tensor | None:
        """What of a global batch's (B, B) right pairs this process's loss reads (all of them alone)."""
        return positives

    def ddp(self, model: nn.Module, device: torch.device) -> Embed | None:
        """How the forward whose backward ends a step embeds, so that the gradients are averaged
        over the processes (alone: None, the model itself)."""
        return None

    @property
    def min_last_batch(self) -> int:
        """The smallest last batch of an epoch: smaller ones join the batch before, so that every
        process holds at least two pairs of it (BatchNorm needs two rows in training)."""
        return 2 * self.size

    @contextmanager
    def main_first(self):
        """Run the block in the main process first, then in the others (work that fills shared
        caches: the others then find them complete)."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()


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

    def mean(self, x: Tensor) -> Tensor:
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

    def ddp(self, model: nn.Module, device: torch.device) -> Embed:
        """DistributedDataParallel over `PairEmbed(model)`. DDP reduces only parameters that require
        a gradient, so frozen towers are never all-reduced. Buffers are not synchronised at every
        forward: processes may run different numbers of micro-batches, and a collective in the
        forward would then deadlock (they are made equal once, when DDP starts)."""
        from torch.nn.parallel import DistributedDataParallel as DDP

        cuda = device.type == "cuda"
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()] if cuda else None
        # newer torch names it forward_sync_buffers and deprecates broadcast_buffers
        sync = "forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DDP).parameters else \
            "broadcast_buffers"
        return DDP(PairEmbed(model), device_ids=device_ids, **{sync: False})


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


def stop_world(world: World, *, finished: bool = True) -> None:
    """Leave the process group. A process that `finished` first waits for the others: rank 0 hosts the
    rendezvous store, and tearing the group down while another process still talks to it can abort
    in C++. After a failure nobody waits (a peer may be gone)."""
    if isinstance(world, DistributedWorld) and torch.distributed.is_initialized():
        if finished:
            torch.distributed.barrier()
        torch.distributed.destroy_process_group()
