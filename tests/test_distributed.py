"""One distributed step (2 processes, gloo on the CPU) equals one process's step over the same
global batch, with and without gradient caching, with a dynamic temperature, and with captions
shared across the processes' slices plus HN-NCE weighting; the plain per-process loss without the
gather does not; so does a step with extra wrong captions (`--caption-negatives`), held by both
processes or by one. The loss alone on 2 processes, with each of open_clip's `local_loss` and
`gather_with_grad` choices, against the loss on one."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tiny_models import heads_model

from mmret.data.pairs import NegativeBatch
from mmret.models.temperature import build_temperature
from mmret.runs.config import TrainConfig
from mmret.training.losses import ClipLoss
from mmret.training.session import run_loss
from mmret.training.step import Stepper, make_optimizer
from mmret.training.world import World

B, IMAGE_DIM, TEXT_DIM, EMBED = 11, 12, 10, 8  # 11 pairs: the two processes hold 6 and 5
# (name, micro-batch, temperature, distributed loss): micro 2 caches gradients (6 rows: 3 micro-batches,
# 5 rows: 3), None runs the whole slice at once
CASES = [("whole", None, "learned", "gathered"), ("cached", 2, "learned", "gathered"),
         ("dynamic", 2, "dynamic", "gathered"), ("no-gather", None, "learned", "local"),
         ("shared", 2, "learned", "gathered"), ("negatives", 2, "learned", "gathered"),
         ("negatives-one-side", None, "learned", "gathered")]
# "shared": pairs 1 and 8 (one on each process) and 4 and 5 share a caption text; HN-NCE beta 0.5
HN_BETA = 0.5
POSITIVES = torch.eye(B, dtype=torch.bool)
for i, j in ((1, 8), (4, 5)):
    POSITIVES[i, j] = POSITIVES[j, i] = True
# extra wrong captions and the global batch row each belongs to: "negatives-one-side" has none on process 0
NEGATIVE_OWNERS = {"negatives": torch.tensor([0, 0, 3, 6, 6, 7, 10]), "negatives-one-side": torch.tensor([6, 7, 10])}
FLAGS = [(False, False), (False, True), (True, False), (True, True)]  # (local_loss, gather_with_grad)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(B, IMAGE_DIM, generator=g), torch.randn(B, TEXT_DIM, generator=g)


def embeddings() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    item, text = torch.randn(B, EMBED, generator=g), torch.randn(B, EMBED, generator=g)
    return F.normalize(item, dim=-1), F.normalize(text, dim=-1)


def scale_of(item_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """A logit scale that reads the whole batch's similarities, as a dynamic temperature does."""
    return 5.0 + 5.0 * (item_emb @ text_emb.T).mean()


def stepper(micro: int | None, temperature: str, hn_beta: float = 0.0, world: World | None = None,
            local: bool = False) -> Stepper:
    """The step of a run (`run_loss`), or with `local` each process's loss over its own pairs alone."""
    torch.manual_seed(0)
    world = world or World()
    model = heads_model(IMAGE_DIM, TEXT_DIM, EMBED, layers=2, temperature=build_temperature(temperature))
    cfg = TrainConfig(batch_size=B, micro_batch=micro, warmup=0.0, grad_clip=1.0, hn_beta=hn_beta)
    opt = make_optimizer(model, 0.05, 0.05)
    return Stepper(model=model, optimizer=opt, train=cfg, peak_lr=0.05, total_steps=10, device=torch.device("cpu"),
                   precision="fp32", scaler=torch.amp.GradScaler("cpu", enabled=False),
                   loss=ClipLoss(hn_beta=hn_beta) if local else run_loss(cfg, world), world=world)


def negatives(name: str, rows: slice = slice(0, B)) -> NegativeBatch | None:
    """The wrong captions of the global batch's rows `rows`, owners counted from the slice's start."""
    if name not in NEGATIVE_OWNERS:
        return None
    owner = NEGATIVE_OWNERS[name]
    texts = torch.randn(len(owner), TEXT_DIM, generator=torch.Generator().manual_seed(5))
    mine = (owner >= rows.start) & (owner < rows.stop)
    return NegativeBatch(texts[mine], (owner[mine] - rows.start).numpy())


def one_process(micro: int | None, temperature: str, shared: bool = False,
                name: str = "") -> tuple[float, dict]:
    s = stepper(micro, temperature, HN_BETA if shared else 0.0)
    images, texts = batch()
    loss = s(images, texts, 0, POSITIVES if shared else None, negatives(name))
    return loss, {k: v.detach().clone() for k, v in s.model.state_dict().items()}


def _rank(rank: int, port: int, out: str) -> None:
    from mmret.training.world import start_world, stop_world

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    world = start_world("cpu")
    images, texts = batch()
    mine = world.part(B)
    for name, micro, temperature, loss in CASES:
        shared = name == "shared"
        s = stepper(micro, temperature, HN_BETA if shared else 0.0, world, local=loss == "local")
        value = s(images[mine], texts[mine], 0, world.positives(POSITIVES, "cache") if shared else None,
                  negatives(name, mine))
        if rank == 0:
            state = {k: v.detach().contiguous() for k, v in s.model.state_dict().items()}
            save_file(state | {"loss": torch.tensor(value, dtype=torch.float64)},
                      os.path.join(out, f"{name}.safetensors"))
    for local, with_grad in FLAGS:  # the loss alone: this process's loss and the gradient of its rows
        item, text = (e[mine].clone().requires_grad_() for e in embeddings())
        loss = ClipLoss(local_loss=local, gather_with_grad=with_grad, rank=world.rank, world_size=world.size,
                        hn_beta=HN_BETA)(item, text, scale_of, POSITIVES)
        loss.backward()
        save_file({"loss": loss.detach(), "item": item.grad, "text": text.grad},
                  os.path.join(out, f"loss-{local}-{with_grad}-{rank}.safetensors"))
    stop_world(world)


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    mp.spawn(_rank, args=(free_port(), str(out)), nprocs=2, join=True)
    steps = {name: load_file(str(out / f"{name}.safetensors")) for name, *_ in CASES}
    losses = {flags: [load_file(str(out / f"loss-{flags[0]}-{flags[1]}-{r}.safetensors")) for r in (0, 1)]
              for flags in FLAGS}
    return steps | losses


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


@pytest.mark.parametrize("name, micro", [("negatives", 2), ("negatives-one-side", None)])
def test_wrong_captions_across_processes_equal_one_process(two_processes, name, micro):
    loss, weights = one_process(micro, "learned", name=name)
    got = two_processes[name]
    assert abs(float(got["loss"]) - loss) < 1e-5 * max(1.0, abs(loss))
    for key, value in weights.items():
        torch.testing.assert_close(got[key], value, rtol=1e-5, atol=1e-6, msg=key)
    plain, _ = one_process(micro, "learned")
    assert loss > plain + 1e-3  # the wrong captions were counted


def test_per_process_losses_without_the_gather_do_not_match(two_processes):
    loss, weights = one_process(None, "learned")
    got = two_processes["no-gather"]
    assert abs(float(got["loss"]) - loss) > 1e-2  # each process saw only its own 5 or 6 negatives
    moved = max((got[k] - v).abs().max().item() for k, v in weights.items() if v.dtype.is_floating_point)
    assert moved > 1e-4


@pytest.mark.parametrize("local, with_grad", FLAGS)
def test_the_loss_on_two_processes_against_one(two_processes, local, with_grad):
    """Shared captions, HN-NCE and a scale read from the whole batch, on slices of 6 and 5 pairs. The
    mean of the two losses is the one-process loss; DDP averages the two gradients, so each process's
    rows end with half the gradient it computed: the one-process gradient when gathered with
    gradient; without, 1/2 of it for the whole matrix and something else for the local loss."""
    item, text = (e.requires_grad_() for e in embeddings())
    loss = ClipLoss(hn_beta=HN_BETA)(item, text, scale_of, POSITIVES)
    loss.backward()
    parts = two_processes[(local, with_grad)]
    assert float(sum(p["loss"] for p in parts)) / 2 == pytest.approx(loss.item(), rel=1e-6)
    for side, expected in (("item", item.grad), ("text", text.grad)):
        averaged = torch.cat([p[side] for p in parts]) / 2  # in rank order: the global batch's rows
        if with_grad:
            torch.testing.assert_close(averaged, expected, rtol=1e-5, atol=1e-7)
        elif not local:
            torch.testing.assert_close(averaged, expected / 2, rtol=1e-5, atol=1e-7)
        else:
            assert (averaged - expected).abs().max() > 1e-3


def test_the_slices_of_a_global_batch_cover_it_once():
    from mmret.training.world import DistributedWorld

    for n, size in ((11, 2), (64, 8), (9, 4)):
        parts = [DistributedWorld(r, size).part(n) for r in range(size)]
        rows = [i for p in parts for i in range(n)[p]]
        sizes = [len(range(n)[p]) for p in parts]
        assert rows == list(range(n)) and max(sizes) - min(sizes) <= 1


def test_the_world_comes_from_torchrun_or_slurm(monkeypatch):
    from mmret.errors import MmretError
    from mmret.training.world import env_world

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
