"""One distributed step (2 processes, gloo on the CPU) equals one process's step over the same
global batch, with and without gradient caching, with a dynamic temperature, and with captions
shared across the processes' slices plus HN-NCE weighting; the plain per-process loss without the
gather does not."""

from __future__ import annotations

import os
import socket

from functools import partial

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from mmret.runs.config import TrainConfig
from mmret.training.losses import clip_loss
from mmret.training.step import Stepper, make_optimizer
from mmret.models.temperature import build_temperature
from tiny_models import heads_model

B, IMAGE_DIM, TEXT_DIM, EMBED = 11, 12, 10, 8  # 11 pairs: the two processes hold 6 and 5
# (name, micro-batch, temperature, distributed loss): micro 2 caches gradients (6 rows: 3 micro-batches,
# 5 rows: 3), None runs the whole slice at once
CASES = [("whole", None, "learned", "gathered"), ("cached", 2, "learned", "gathered"),
         ("dynamic", 2, "dynamic", "gathered"), ("no-gather", None, "learned", "local"),
         ("shared", 2, "learned", "gathered")]
# "shared": pairs 1 and 8 (one on each process) and 4 and 5 share a caption text; HN-NCE beta 0.5
HN_BETA = 0.5
POSITIVES = torch.eye(B, dtype=torch.bool)
for i, j in ((1, 8), (4, 5)):
    POSITIVES[i, j] = POSITIVES[j, i] = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, IMAGE_DIM, generator=g), torch.randn(B, TEXT_DIM, generator=g)


def stepper(micro: int | None, temperature: str, hn_beta: float = 0.0) -> Stepper:
    torch.manual_seed(0)
    model = heads_model(IMAGE_DIM, TEXT_DIM, EMBED, layers=2, temperature=build_temperature(temperature))
    cfg = TrainConfig(batch_size=B, micro_batch=micro, warmup=0.0, grad_clip=1.0, hn_beta=hn_beta)
    opt = make_optimizer(model, 0.05, 0.05)
    return Stepper(model, opt, cfg, 0.05, 10, torch.device("cpu"), "fp32", torch.amp.GradScaler("cpu", enabled=False),
                   loss_fn=partial(clip_loss, hn_beta=hn_beta) if hn_beta else clip_loss)


def one_process(micro: int | None, temperature: str, shared: bool = False) -> tuple[float, dict]:
    s = stepper(micro, temperature, HN_BETA if shared else 0.0)
    images, texts = batch()
    loss = s(images, texts, 0, POSITIVES if shared else None)
    return loss, {k: v.detach().clone() for k, v in s.model.state_dict().items()}


def _rank(rank: int, port: int, out: str) -> None:
    from mmret.training import distributed as dist_mod

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    world = dist_mod.start_world("cpu")
    images, texts = batch()
    mine = world.part(B)
    for name, micro, temperature, loss in CASES:
        shared = name == "shared"
        s = stepper(micro, temperature, HN_BETA if shared else 0.0)
        dist_mod.distribute_step(s, world, "cache")
        if loss == "local":
            s.loss_fn = dist_mod.local_clip_loss
        value = s(images[mine], texts[mine], 0, world.positives(POSITIVES, "cache") if shared else None)
        if rank == 0:
            state = {k: v.detach().contiguous() for k, v in s.model.state_dict().items()}
            save_file(state | {"loss": torch.tensor(value, dtype=torch.float64)}, os.path.join(out, f"{name}.safetensors"))
    dist_mod.stop_world(world)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_rank, args=(free_port(), str(out)), nprocs=2, join=True)
    return {name: load_file(str(out / f"{name}.safetensors")) for name, *_ in CASES}


@pytest.mark.parametrize("name, micro, temperature", [c[:3] for c in CASES[:3]])
def test_a_two_process_step_equals_one_process_step(two_processes, name, micro, temperature):
    loss, weights = one_process(micro, temperature)
    got = two_processes[name]
    assert abs(float(got["loss"]) - loss) < 1e-5 * max(1.0, abs(loss))
    for key, value in weights.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_shared_captions_and_hn_nce_across_processes_equal_one_process(two_processes):
    loss, weights = one_process(2, "learned", shared=True)
    got = two_processes["shared"]
    assert abs(float(got["loss"]) - loss) < 1e-5 * max(1.0, abs(loss))
    for key, value in weights.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    plain, _ = one_process(2, "learned")
    assert abs(plain - loss) > 1e-3  # the positives and the weighting did change the loss


def test_per_process_losses_without_the_gather_do_not_match(two_processes):
    loss, weights = one_process(None, "learned")
    got = two_processes["no-gather"]
    assert abs(float(got["loss"]) - loss) > 1e-2  # each process saw only its own 5 or 6 negatives
    moved = max((got[k] - v).abs().max().item() for k, v in weights.items() if v.dtype.is_floating_point)
    assert moved > 1e-4


def test_the_slices_of_a_global_batch_cover_it_once():
    from mmret.training.distributed import DistributedWorld

    for n, size in ((11, 2), (64, 8), (9, 4)):
        parts = [DistributedWorld(r, size).part(n) for r in range(size)]
        rows = [i for p in parts for i in range(n)[p]]
        assert rows == list(range(n)) and max(len(range(n)[p]) for p in parts) - min(len(range(n)[p]) for p in parts) <= 1


def test_the_world_comes_from_torchrun_or_slurm(monkeypatch):
    from mmret.errors import MmretError
    from mmret.training.distributed import env_world

    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    # env_world writes RANK etc. for SLURM: give it a copy of the environment to write into
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items() if k not in names})
    assert env_world() is None
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    with pytest.raises(MmretError, match="export MASTER_ADDR"):
        env_world()
    monkeypatch.setenv("MASTER_ADDR", "node1")
    assert env_world() == (5, 8, 1)
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["MASTER_PORT"]) == ("5", "8", "29500")
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun's variables win
    monkeypatch.setenv("RANK", "2")
    assert env_world() == (2, 4, 1)
