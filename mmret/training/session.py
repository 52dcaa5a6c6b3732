"""Everything a run needs while it trains: `setup` builds it (data sources, model, optimizer, the
step and its loss, the loop's state, possibly restored from a checkpoint), `init_heads` starts
the input norms from a sample of training inputs, `restore` puts a stopped run back where it was.
A run on several processes passes its `World` (`mmret.training.world`); alone it is a world of one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmret.common.device import autocast_context, grad_scaler, pick_device
from mmret.common.progress import NULL, Reporter
from mmret.data.prepared import load_dataset
from mmret.errors import MmretError
from mmret.methods import Method, get_method
from mmret.models.batch import call, to_device
from mmret.models.heads import InputNorm, init_input_norms
from mmret.models.tuners import use_matmul_attention
from mmret.runs import RunConfig, create_run_dir
from mmret.runs.checkpoint import load_state, load_weights, rng_state
from mmret.training.batches import BatchPlan
from mmret.training.losses import ClipLoss
from mmret.training.sam import SAM
from mmret.training.step import Stepper, make_optimizer, training_precision
from mmret.training.world import World

_logger = logging.getLogger(__name__)


@dataclass
class LoopState:
    """Where the run is; saved with every checkpoint."""

    epoch: int = 0  # current epoch, 0-based
    batch: int = 0  # next batch inside the epoch
    step: int = 0  # optimizer steps done
    best: float = -1.0  # best validation mean recall so far
    best_epoch: int = -1
    bad_evals: int = 0  # evaluations since the best one
    loss_sum: float = 0.0  # training loss summed over this epoch's pairs so far
    pairs: int = 0  # pairs seen this epoch
    seconds: float = 0.0  # training time before this session
    history: list[dict] = field(default_factory=list)  # one row per evaluation
    finished: str = ""  # why the run ended, once it has (a finished run is not resumed)


@dataclass
class Session:
    cfg: RunConfig
    run_dir: Path
    device: torch.device
    precision: str
    method: Method
    dataset: Any  # the prepared dataset (checked to be unchanged at every epoch)
    train: Any  # the training split's source (see mmret.data.pairs)
    val: Any
    model: nn.Module
    optimizer: torch.optim.Optimizer
    stepper: Stepper
    state: LoopState
    steps_per_epoch: int
    plan: BatchPlan  # each epoch's batches, and which pairs of a batch are right
    world: World = field(default_factory=World)
    started: float = field(default_factory=time.perf_counter)
    positives: torch.Tensor | None = None  # the current batch's right pairs beyond the diagonal (see BatchPlan)
    step_rng: tuple = field(default_factory=rng_state)  # the random generators after the last whole step
    plotted: float = field(default_factory=time.perf_counter)  # when the learning curve was last drawn

    @property
    def total_steps(self) -> int:
        return self.stepper.total_steps

    def autocast(self):
        return autocast_context(self.device, self.precision)

    def log(self, message: str) -> None:
        if self.world.is_main:
            with open(self.run_dir / "train.log", "a", encoding="utf-8") as f:
                f.write(f"{datetime.now().isoformat(timespec='seconds')} {message}\n")
        _logger.info(message)


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg: RunConfig, reporter: Reporter = NULL, resume_dir: Path | None = None,
          world: World | None = None) -> Session:
    """Everything a run needs; from `resume_dir`'s last checkpoint when resuming."""
    world = world or World()
    method = get_method(cfg.method.method, training=True)
    device = pick_device(cfg.train.device)
    precision = training_precision(device, cfg.train.precision, method.runs_towers)
    _seed_everything(cfg.train.seed)
    dataset = load_dataset(cfg.data.dataset, cfg.data.data_dir)
    if dataset.captions.empty:
        raise MmretError(f"dataset {dataset.name!r} has no captions: a gallery without captions can be searched "
                         "(mmret search, mmret serve) but not trained on")
    cfg.data.modality = dataset.modality.name
    with world.main_first():  # the main process fills missing feature caches; the others read them
        context = method.open(cfg, dataset, resume_dir)
        train, val = method.sources(cfg, context, dataset, ("train", "val"), device, reporter)
    _seed_everything(cfg.train.seed)  # the same start whether or not the sources had caches to fill (which draws)
    model = method.build(cfg, context).to(device)
    if device.type == "cpu" and method.runs_towers:
        use_matmul_attention(model)  # SDPA's backward is slow on CPUs
    if resume_dir is None:
        init_heads(model, train, device, cfg.train.seed)
    optimizer = make_optimizer(model, cfg.train.lr or method.lr, cfg.train.weight_decay)
    plan = BatchPlan.make(train, cfg.train)
    steps_per_epoch = len(plan.batches(0, world.min_last_batch))
    run_dir = resume_dir or _new_run_dir(cfg, world, device)
    if resume_dir is None and world.is_main:
        method.save(context, run_dir)
    scaler = grad_scaler(device, precision)
    stepper = Stepper(model=model, optimizer=optimizer, train=cfg.train, peak_lr=cfg.train.lr or method.lr,
                      total_steps=cfg.train.max_steps or cfg.train.epochs * steps_per_epoch, device=device,
                      precision=precision, scaler=scaler,
                      sam=SAM(optimizer, cfg.train.sam_rho, scaler) if cfg.train.sam else None,
                      batch_transform=method.batch_transform(cfg), loss=run_loss(cfg.train, world), world=world)
    session = Session(cfg, run_dir, device, precision, method, dataset, train, val, model, optimizer, stepper,
                      LoopState(), steps_per_epoch, plan, world)
    if resume_dir is not None:
        restore(session)
    return session


def run_loss(train: Any, world: World) -> ClipLoss:
    """The loss each process takes: with gradient caching, over the global batch (the slices of
    every process gathered with gradient, this process's rows against all columns); plain
    accumulation's micro-batches see only their own pairs, on many processes as on one."""
    if train.accumulation == "cache":
        return ClipLoss(local_loss=True, gather_with_grad=True, rank=world.rank, world_size=world.size,
                        hn_beta=train.hn_beta)
    return ClipLoss(hn_beta=train.hn_beta)


def _new_run_dir(cfg: RunConfig, world: World, device: torch.device) -> Path:
    """The main process creates the run folder (and names it); the others learn its name."""
    # runs/latest moves once a checkpoint exists
    name = create_run_dir(cfg, latest=False).name if world.is_main else None
    cfg.name = world.share(name, device)
    world.barrier()
    return cfg.runs_dir / cfg.name


def init_heads(model: nn.Module, source: Any, device: torch.device, seed: int, chunk: int = 32) -> None:
    """Initialise the input norms of the heads from a sample of training inputs. Cached features
    are summarised where they are (the CPU); towers that run in the loop encode the sample on the
    device a chunk at a time, so the sample never sits on the device whole."""
    if not any(isinstance(m, InputNorm) for m in model.modules()):
        return
    items, texts = source.sample(seed=seed)
    for tower, x in ((model.item_tower, items), (model.text_tower, texts)):
        if hasattr(tower, "pooled_sample"):
            n = len(x["input_ids"]) if isinstance(x, dict) else len(x)
            parts = [call(tower.pooled_sample, to_device(_rows(x, a, a + chunk), device)).cpu()
                     for a in range(0, n, chunk)]
            x = torch.cat(parts)
        init_input_norms(tower, x)


def _rows(x: Any, a: int, b: int) -> Any:
    return {k: v[a:b] for k, v in x.items()} if isinstance(x, dict) else x[a:b]


def restore(s: Session) -> None:
    """Load the last checkpoint of `s.run_dir` (weights, optimizer, loss scale, RNG, loop state)."""
    ckpt = s.run_dir / "checkpoints"
    if not (ckpt / "last.state.safetensors").is_file():
        raise MmretError(f"run {s.run_dir.name} has no checkpoint to resume from; start it again")
    weights = load_weights(s.model, ckpt / "last.safetensors")
    meta = load_state(s.optimizer, ckpt / "last.state.safetensors")
    if weights.get("step") != meta["loop"]["step"]:
        raise MmretError(f"the last checkpoint of {s.run_dir.name} is torn (weights at step {weights.get('step')}, "
                         f"optimizer at step {meta['loop']['step']}); resume from best or start again")
    s.state = LoopState(**meta["loop"])  # a finished run is refused or extended by the loop (`continue_run`)
    s.step_rng = rng_state()
    if meta.get("scaler"):
        s.stepper.scaler.load_state_dict(meta["scaler"])
    s.log(f"resumed at epoch {s.state.epoch + 1}, batch {s.state.batch}, step {s.state.step}")
