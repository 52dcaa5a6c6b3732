"""The training loop: `train(cfg) -> RunResult`.

Plain functions, one job each: `mmret.training.session.setup` builds everything a run needs,
`train_one_epoch` runs the steps of one epoch (`train_step`: the session's `Stepper`, see
`mmret.training.step`), `evaluate` computes validation recall, `finish_epoch` records metrics,
checkpoints and decides on early stopping.

Exact resume: the data order is a pure function of (seed, epoch), mixup draws from a generator
seeded by (seed, step), and the checkpoint holds the optimizer, the global RNG states and the
position inside the epoch, so `--resume` continues as if the run had never stopped. Ctrl-C lands
between steps; a step cut short inside is undone first (`mmret.training.snapshot`), so the last
checkpoint is the run after its last whole step, to the bit.

Extending (`--resume RUN --epochs N`, or `--max-steps N`): a stopped or finished run trains on to
its new length. The learning rate is a pure function of the step and the planned length
(`mmret.training.step.lr_at`), so from its next step the run takes exactly the rates a run started
with the new length takes at those steps: the warm-up over `warmup` x the new total, then the
cosine from the peak to zero at the new last step. A finished run, whose rate had reached zero,
starts again from that schedule's value at its step (a quarter of the peak, about, for 20 epochs
extended to 30) and decays to zero at the new end; early stopping counts its patience afresh, and
config.json records the new length.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from mmret.common.io import ensure_free_space, uninterrupted, write_json, write_parquet
from mmret.common.progress import NULL, Reporter
from mmret.errors import MmretError
from mmret.modalities import get_modality
from mmret.models.embed import embed_source
from mmret.runs import RunConfig, load_run_config, point_latest
from mmret.runs.checkpoint import read_meta, rng_state, save_state, save_weights, set_rng_state
from mmret.training.losses import ClipLoss
from mmret.training.session import Session, setup
from mmret.training.snapshot import StepSnapshot
from mmret.training.step import NonFiniteLoss
from mmret.training.world import World, start_world, stop_world

_logger = logging.getLogger(__name__)

SELECT_METRIC = "mean_recall"  # mean of Recall@1/5/10 in both directions, on val
PLOT_EVERY = 30.0  # seconds between redraws of the learning curve during training (and once at the end)
# fewer optimizer steps than this are said to be too few to learn: the quick start's model is still near
# chance after them (see `plan_notes`)
MIN_STEPS = 50


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


def train_step(s: Session, items: Any, texts: Any) -> float:
    """One optimizer step over one contrastive batch (its right pairs beyond the diagonal, if any,
    in `s.positives`); returns its loss."""
    try:
        loss = s.stepper(items, texts, s.state.step, s.positives)
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
    for (items, captions), (inputs, texts) in zip(batches, s.train.iter_pairs(mine, epoch=st.epoch)):
        n = len(items)  # pairs in the global batch
        s.positives = s.world.positives(s.plan.positives(items, captions), cfg.accumulation)
        before = StepSnapshot.take(s.model, s.stepper.scaler)
        with uninterrupted():  # a Ctrl-C lands after the step and its counts, never inside the update
            try:
                loss = train_step(s, inputs, texts)
            except KeyboardInterrupt:  # raised inside the step: undo what it changed (see `snapshot`)
                before.restore(s.model, s.optimizer, s.stepper.scaler, s.stepper.sam)
                raise
            s.step_rng = rng_state()
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


def train(cfg: RunConfig, reporter: Reporter = NULL, resume_dir: Path | None = None, *,
          extend: bool = False) -> RunResult:
    """Train a method as configured; with `resume_dir`, continue that run from its last checkpoint
    (`extend`: to the length `cfg` now gives, even when it had finished; see the module's docstring).
    Started by torchrun (or under SLURM) on several processes, each trains its slice of every
    batch (see `mmret.training.distributed`); only the main process reports progress and writes."""
    from mmret.training.distributed import run_on_world

    world = start_world(cfg.train.device)
    finished = False
    try:
        if world.size > 1:
            result = run_on_world(lambda: _train(cfg, reporter if world.is_main else NULL, resume_dir, world, extend),
                                  world, cfg, resume_dir)
        else:
            result = _train(cfg, reporter, resume_dir, world, extend)
        finished = True
        return result
    finally:
        stop_world(world, finished=finished)


def plan_line(s: Session) -> str:
    """One line: what trains on what, how long, in what precision, on which device and processes."""
    cfg = s.cfg
    warmup = int(cfg.train.warmup * s.total_steps)
    processes = "1 process" if s.world.size == 1 else \
        f"{s.world.size} processes ({torch.distributed.get_backend()})"
    return (f"training {cfg.method.method} on {cfg.data.dataset}: {s.train.num_items:,} train / {s.val.num_items:,} "
            f"val {get_modality(cfg.data.modality).plural}, {s.total_steps:,} steps ({s.steps_per_epoch:,} an epoch, "
            f"{warmup:,} of warm-up), {s.precision} on {s.device}, {processes}")


def plan_notes(total_steps: int, warmup: float) -> list[str]:
    """What says, before any time is spent, that a run is too short to learn: fewer than `MIN_STEPS`
    optimizer steps (the quick start's model, at 13 and 26 steps, is still near chance), or a
    warm-up that takes half of them or more (the rate is near its peak only briefly)."""
    notes, warm = [], int(warmup * total_steps)
    if total_steps < MIN_STEPS:
        notes.append(f"{total_steps} optimizer steps ({warm} of warm-up) are too few to learn (fewer than "
                     f"{MIN_STEPS}): its numbers will sit near chance. Train longer: more --epochs, or a smaller "
                     "--batch-size (more steps an epoch)")
    elif warm >= total_steps / 2:
        notes.append(f"{warm} of the {total_steps} steps warm up (--warmup {warmup:g}): the rate is near its peak only "
                     "briefly; a --warmup of 0.05 to 0.1 is usual")
    return notes


def continue_run(s: Session, extend: bool) -> None:
    """A resumed run goes on where it stopped; a finished one only when `extend`ed to a length that
    leaves steps to take (then early stopping starts counting again and config.json says the new length)."""
    st, tc, name = s.state, s.cfg.train, s.run_dir.name
    saved = load_run_config(s.run_dir).train
    length = f"--epochs {tc.epochs}" + (f" --max-steps {tc.max_steps}" if tc.max_steps else "")
    if not extend:
        if st.finished:
            raise MmretError(f"run {name} has already finished ({st.finished}) after {st.epoch} epochs; to train it "
                             f"longer: `mmret train --resume {name} --epochs N` with N above {st.epoch}")
        return
    if st.epoch >= tc.epochs or (tc.max_steps and st.step >= tc.max_steps):
        raise MmretError(f"run {name} has trained {st.epoch} epochs ({st.step} steps); {length} leaves nothing to "
                         f"do: give --epochs above {st.epoch}" + (" and a larger --max-steps" if tc.max_steps else ""))
    was = f"--epochs {saved.epochs}" + (f" --max-steps {saved.max_steps}" if saved.max_steps else "")
    s.log(f"extended from {was} to {length} at epoch {st.epoch + 1}, step {st.step}"
          + (f" (it had finished: {st.finished})" if st.finished else ""))
    st.finished, st.bad_evals = "", 0
    if s.world.is_main:
        write_json(s.run_dir / "config.json", s.cfg.to_dict())


def _train(cfg: RunConfig, reporter: Reporter, resume_dir: Path | None, world: World, extend: bool) -> RunResult:
    s = setup(cfg, reporter, resume_dir, world)
    st, tc = s.state, cfg.train
    if resume_dir is not None:
        continue_run(s, extend)
        reporter.note(f"resuming run {s.run_dir.name} at epoch {st.epoch + 1}, step {st.step:,}: " + plan_line(s))
    else:
        s.log(plan_line(s))
        reporter.note(plan_line(s))
    for note in plan_notes(s.total_steps, tc.warmup):
        reporter.note(note, warning=True)
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
            set_rng_state(*s.step_rng)  # the generators as the last whole step left them
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


def resume(run_dir: Path, reporter: Reporter = NULL, *, epochs: int | None = None,
           max_steps: int | None = None) -> RunResult:
    """Continue a stopped run exactly where its last checkpoint left it; with `epochs` or
    `max_steps`, train a stopped or finished run on to that length (see the module's docstring)."""
    cfg = load_run_config(run_dir)
    longer = {k: v for k, v in (("epochs", epochs), ("max_steps", max_steps)) if v is not None}
    if longer:  # validated as a new run's would be
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **longer))
    return train(cfg, reporter, resume_dir=run_dir, extend=bool(longer))
