"""The training loop: `train(cfg) -> RunResult`.

Plain functions, one job each: `mmret.training.session.setup` builds everything a run needs,
`train_one_epoch` runs the steps of one epoch (`train_step`: the session's `Stepper`, see
`mmret.training.step`), `evaluate` computes validation recall, `finish_epoch` records metrics,
checkpoints and decides on early stopping.

Exact resume: the data order is a pure function of (seed, epoch), mixup draws from a generator
seeded by (seed, step), and the checkpoint holds the optimizer, the global RNG states and the
position inside the epoch, so `--resume` continues as if the run had never stopped.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from mmret.common.io import ensure_free_space, uninterrupted, write_parquet
from mmret.common.progress import NULL, Reporter
from mmret.errors import MmretError
from mmret.modalities import get_modality
from mmret.models.embed import embed_source
from mmret.runs import RunConfig, load_run_config, point_latest
from mmret.runs.checkpoint import read_meta, save_state, save_weights
from mmret.training.losses import ClipLoss
from mmret.training.session import Session, setup
from mmret.training.step import NonFiniteLoss
from mmret.training.world import World, start_world, stop_world

_logger = logging.getLogger(__name__)

SELECT_METRIC = "mean_recall"  # mean of Recall@1/5/10 in both directions, on val
PLOT_EVERY = 30.0  # seconds between redraws of the learning curve during training (and once at the end)


class TrainingInterrupted(MmretError):
    """Ctrl-C during training: `last` was saved; the message says how to resume."""

    exit_code = 130


@dataclass
class RunResult:
    run_dir: Path
    epochs: int  # epochs completed
    steps: int
    best: dict  # validation metrics at the best checkpoint
    last: dict  # validation metrics at the last evaluation
    stopped: str  # why training ended
    seconds: float
    precision: str
    device: str
    rank: int = 0  # this process (only rank 0 reports)
    processes: int = 1


def train_step(s: Session, items: Any, texts: Any, negatives: Any = None) -> float:
    """One optimizer step over one contrastive batch (its right pairs beyond the diagonal, if any,
    in `s.positives`; its captions' wrong captions in `negatives`); returns its loss."""
    try:
        loss = s.stepper(items, texts, s.state.step, s.positives, negatives)
    except NonFiniteLoss as e:
        raise MmretError(
            f"the loss became {e.loss} at step {s.state.step + 1} (epoch {s.state.epoch + 1}); training stopped and "
            f"the last good checkpoint is kept in {s.run_dir / 'checkpoints'}. Try a lower --lr or --precision fp32"
        ) from None
    s.state.step += 1
    return loss


def train_one_epoch(s: Session, task: Any) -> None:
    """The remaining batches of the current epoch (all of them unless resuming mid-epoch). On
    several processes each reads and steps over its own slice of every (global) batch."""
    st, cfg = s.state, s.cfg.train
    s.dataset.check_current("training")
    batches = s.plan.batches(st.epoch, s.world.min_last_batch)[st.batch:]
    mine = [(items[s.world.part(len(items))], captions[s.world.part(len(items))]) for items, captions in batches]
    s.model.train()
    for (items, captions), (_, own), (inputs, texts) in zip(batches, mine, s.train.iter_pairs(mine, epoch=st.epoch)):
        n = len(items)  # pairs in the global batch
        s.positives = s.world.positives(s.plan.positives(items, captions), cfg.accumulation)
        loss = train_step(s, inputs, texts, s.train.negative_batch(own))
        s.step_rng = torch.get_rng_state()
        st.batch, st.loss_sum, st.pairs = st.batch + 1, st.loss_sum + loss * n, st.pairs + n
        task.advance(n, loss=loss, lr=s.optimizer.param_groups[0]["lr"])
        if cfg.max_steps and st.step >= cfg.max_steps:
            return


# ---------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def validation_loss(model: nn.Module, item_emb: torch.Tensor, text_emb: torch.Tensor,
                    captions_of: list[np.ndarray], batch_size: int) -> float:
    """The contrastive loss over fixed batches of (item, its first caption), in item order."""
    first = np.array([caps[0] for caps in captions_of])
    device = next(model.parameters()).device
    losses, weights, loss = [], [], ClipLoss()
    for a in range(0, len(first), batch_size):
        idx = np.arange(a, min(a + batch_size, len(first)))
        if len(idx) < 2:
            continue
        items, texts = item_emb[idx].to(device), text_emb[first[idx]].to(device)
        losses.append(float(loss(items, texts, model.logit_scale_for)))
        weights.append(len(idx))
    return float(np.average(losses, weights=weights)) if losses else float("nan")


def evaluate(s: Session) -> dict[str, float]:
    """Recall@1/5/10 both ways (and their mean), MRR and the loss on the validation split; metric
    names say what the items are (t2i / i2t for pictures, t2a / a2t for sounds)."""
    from mmret.metrics.retrieval import directions, retrieval_metrics

    source, modality = s.val, get_modality(s.cfg.data.modality)
    item_emb, text_emb = embed_source(s.model, source, s.cfg.train.batch_size, s.device, s.autocast)
    result = retrieval_metrics(item_emb, text_emb, torch.tensor(source.tables.caption_item), item=modality.short,
                               map_at=modality.map_at)
    loss = validation_loss(s.model, item_emb, text_emb, source.tables.captions_of, s.cfg.train.batch_size)
    recalls = [result.metrics[f"{d}_r{k}"] for d in directions(modality.short) for k in (1, 5, 10)]
    return {**result.metrics, SELECT_METRIC: float(np.mean(recalls)), "val_loss": loss}


# ---------------------------------------------------------------------------- end of an epoch


def _checkpoint(s: Session, metrics: dict[str, float], weights: bool = True) -> None:
    if not s.world.is_main:
        return
    ckpt, st = s.run_dir / "checkpoints", s.state
    ensure_free_space(ckpt, 3 * sum(p.numel() * p.element_size() for p in s.model.parameters() if p.requires_grad),
                      f"a checkpoint of run {s.run_dir.name}")
    meta = {"step": st.step, "epoch": st.epoch, "metrics": metrics}
    loop = asdict(st) | {"seconds": st.seconds + time.perf_counter() - s.started}
    with uninterrupted():  # the weights and the state of `last` are replaced together or not at all
        save_state(s.optimizer, ckpt / "last.state.safetensors",
                   {"loop": loop, "scaler": s.stepper.scaler.state_dict() if s.stepper.scaler.is_enabled() else None})
        if weights:
            save_weights(s.model, ckpt / "last.safetensors", meta)
            point_latest(s.cfg.runs_dir, s.run_dir)  # `latest` only ever names a run that has a checkpoint


def finish_epoch(s: Session, partial: bool = False) -> bool:
    """Evaluate, record, checkpoint; returns True when early stopping says to stop."""
    st, cfg = s.state, s.cfg.train
    s.dataset.check_current("training")  # the epoch just trained read the files the run started with
    metrics = s.world.share(evaluate(s) if s.world.is_main else None, s.device)  # computed once
    row = {"step": st.step, "epoch": st.epoch + 1, "train_loss": st.loss_sum / max(st.pairs, 1),
           "lr": s.optimizer.param_groups[0]["lr"], "seconds": st.seconds + time.perf_counter() - s.started,
           **metrics}
    st.history.append(row)
    improved = metrics[SELECT_METRIC] > st.best
    st.best, st.best_epoch = (metrics[SELECT_METRIC], st.epoch + 1) if improved else (st.best, st.best_epoch)
    st.bad_evals = 0 if improved else st.bad_evals + 1
    if not partial:
        st.epoch, st.batch, st.loss_sum, st.pairs = st.epoch + 1, 0, 0.0, 0
    if s.world.is_main:
        write_parquet(s.run_dir / "metrics.parquet", pd.DataFrame(st.history))
        if time.perf_counter() - s.plotted > PLOT_EVERY:
            _plot(s)
    _checkpoint(s, metrics)
    ckpt = s.run_dir / "checkpoints"
    if improved and s.world.is_main:
        save_weights(s.model, ckpt / "best.safetensors", {"step": st.step, "epoch": row["epoch"], "metrics": metrics})
    if cfg.save_every and row["epoch"] % cfg.save_every == 0 and not partial and s.world.is_main:
        save_weights(s.model, ckpt / f"epoch-{row['epoch']:03d}.safetensors", {"step": st.step, "metrics": metrics})
    s.world.barrier()
    s.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return bool(cfg.patience) and st.bad_evals >= cfg.patience


def _plot(s: Session) -> None:
    from mmret.training.plots import learning_curve

    if s.state.history and s.world.is_main:
        learning_curve(pd.DataFrame(s.state.history), s.run_dir / "plots" / "learning_curve.png")
    s.plotted = time.perf_counter()


# ---------------------------------------------------------------------------- the run


def train(cfg: RunConfig, reporter: Reporter = NULL, resume_dir: Path | None = None) -> RunResult:
    """Train a method as configured; with `resume_dir`, continue that run from its last checkpoint.
    Started by torchrun (or under SLURM) on several processes, each trains its slice of every
    batch (see `mmret.training.distributed`); only the main process reports progress and writes."""
    from mmret.training.distributed import run_on_world

    world = start_world(cfg.train.device)
    finished = False
    try:
        if world.size > 1:
            result = run_on_world(lambda: _train(cfg, reporter if world.is_main else NULL, resume_dir, world),
                                  world, cfg, resume_dir)
        else:
            result = _train(cfg, reporter, resume_dir, world)
        finished = True
        return result
    finally:
        stop_world(world, finished=finished)


def _train(cfg: RunConfig, reporter: Reporter, resume_dir: Path | None, world: World) -> RunResult:
    s = setup(cfg, reporter, resume_dir, world)
    st, tc = s.state, cfg.train
    if resume_dir is None:
        s.log(f"training {cfg.method.method} on {cfg.data.dataset}: {s.train.num_items} train / "
              f"{s.val.num_items} val {get_modality(cfg.data.modality).plural}, {s.total_steps} steps, "
              f"{s.precision} on {s.device}")
    stopped = "finished all epochs"
    total_pairs = s.train.num_items * tc.epochs
    with reporter.task("training", total=total_pairs, unit="pairs") as task:
        task.advance(min(st.epoch * s.train.num_items + st.pairs, total_pairs))
        try:
            while st.epoch < tc.epochs:
                train_one_epoch(s, task)
                at_limit = bool(tc.max_steps) and st.step >= tc.max_steps
                if finish_epoch(s, partial=at_limit and st.batch < s.steps_per_epoch):
                    stopped = f"early stop: no better val {SELECT_METRIC} in {tc.patience} evaluations"
                    break
                t2x = f"t2{get_modality(cfg.data.modality).short}_r1"
                task.advance(0, **{"val R@1": s.state.history[-1].get(t2x, float("nan"))})
                if at_limit:
                    stopped = f"reached --max-steps {tc.max_steps}"
                    break
        except KeyboardInterrupt:
            torch.set_rng_state(s.step_rng)  # as if the interrupted step had never started
            _checkpoint(s, {})
            _plot(s)
            s.log(f"interrupted at step {st.step}; saved last")
            last = s.run_dir / "checkpoints" / "last.safetensors"
            raise TrainingInterrupted(f"interrupted at step {st.step}: saved {last}; "
                                      f"continue with `mmret train --resume {s.run_dir.name}`") from None
    return _result(s, stopped)


def _result(s: Session, stopped: str) -> RunResult:
    st = s.state
    st.finished = stopped
    _checkpoint(s, {}, weights=False)  # the weights of `last` are already saved; mark the state finished
    _plot(s)
    s.log(f"done: {stopped}; best val {SELECT_METRIC} {st.best:.4f} at epoch {st.best_epoch}")
    s.world.barrier()
    best = read_meta(s.run_dir / "checkpoints" / "best.safetensors").get("metrics", {})
    return RunResult(s.run_dir, st.epoch, st.step, best, st.history[-1] if st.history else {}, stopped,
                     st.seconds + time.perf_counter() - s.started, s.precision, str(s.device), s.world.rank,
                     s.world.size)


def resume(run_dir: Path, reporter: Reporter = NULL) -> RunResult:
    """Continue a stopped run exactly where its last checkpoint left it."""
    cfg = load_run_config(run_dir)
    return train(cfg, reporter, resume_dir=run_dir)
