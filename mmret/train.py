"""The training loop: `train(cfg) -> RunResult`.

Plain functions, one job each: `setup` builds everything a run needs (data, model, optimizer,
state, possibly restored from a checkpoint), `train_one_epoch` runs the steps of one epoch,
`evaluate` computes validation recall, `finish_epoch` records metrics, checkpoints and decides
on early stopping. `lr_at` is a pure warmup + cosine schedule.

Exact resume: the data order is a pure function of (seed, epoch), mixup draws from a generator
seeded by (seed, step), and the checkpoint holds the optimizer, the global RNG states and the
position inside the epoch, so `--resume` continues as if the run had never stopped.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from mmret.checkpoint import load_state, load_weights, read_meta, save_state, save_weights
from mmret.config import RunConfig
from mmret.device import autocast_context, check_precision, grad_scaler, pick_device
from mmret.errors import MmretError
from mmret.gradcache import accumulate_step, contrastive_step
from mmret.io import write_parquet
from mmret.losses import clip_loss
from mmret.methods import Method, get_method
from mmret.mixup import latent_mixup
from mmret.models.heads import init_input_norms
from mmret.pairs import RunData, epoch_batches, load_run_data
from mmret.progress import NULL, Reporter
from mmret.sam import SAM
from mmret.runs import create_run_dir, load_run_config, point_latest

_logger = logging.getLogger(__name__)

SELECT_METRIC = "mean_recall"  # mean of Recall@1/5/10 in both directions, on val
PLOT_EVERY = 30.0  # seconds between redraws of the learning curve during training (and once at the end)


class TrainingInterrupted(MmretError):
    """Ctrl-C during training: `last` was saved; the message says how to resume."""

    exit_code = 130


# ---------------------------------------------------------------------------- pure pieces


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine decay to zero at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on weight matrices only, never on norms, biases or the temperature."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "temperature" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def training_precision(device: torch.device, requested: str, method: Method) -> str:
    """`auto`: AMP on CUDA (bf16 where supported, else fp16 with a GradScaler); on the CPU bf16
    autocast for methods that run the towers (where the matrix products dominate), else fp32."""
    from mmret.device import bf16_supported, reduced_precision

    check_precision(device, requested)
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return reduced_precision(device) or "fp32"
    return "bf16" if method.inputs == "pixels" and bf16_supported(device) else "fp32"


# ---------------------------------------------------------------------------- state


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
    data: RunData
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    state: LoopState
    steps_per_epoch: int
    total_steps: int
    sam: Any = None  # SAM wrapper around the optimizer, with --sam
    started: float = field(default_factory=time.perf_counter)
    step_rng: torch.Tensor = field(default_factory=torch.get_rng_state)  # CPU RNG after the last whole step
    plotted: float = field(default_factory=time.perf_counter)  # when the learning curve was last drawn

    def autocast(self):
        return autocast_context(self.device, self.precision)

    def log(self, message: str) -> None:
        with open(self.run_dir / "train.log", "a", encoding="utf-8") as f:
            f.write(f"{datetime.now().isoformat(timespec='seconds')} {message}\n")
        _logger.info(message)


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


# ---------------------------------------------------------------------------- setup


def _seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def setup(cfg: RunConfig, reporter: Reporter = NULL, resume_dir: Path | None = None) -> Session:
    """Everything a run needs; from `resume_dir`'s last checkpoint when resuming."""
    method = get_method(cfg.method.method, training=True)
    device = pick_device(cfg.train.device)
    precision = training_precision(device, cfg.train.precision, method)
    _seed_everything(cfg.train.seed)
    data = load_run_data(cfg, method, device, reporter, resume_dir)
    model = method.build(cfg, data.context).to(device)
    if resume_dir is None:
        init_heads(model, data.train, device, cfg.train.seed)
    lr = cfg.train.lr or method.lr
    optimizer = torch.optim.AdamW(param_groups(model, cfg.train.weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    steps_per_epoch = len(epoch_batches(data.train.tables.captions_of, cfg.train.batch_size, cfg.train.seed, 0))
    total = cfg.train.max_steps or cfg.train.epochs * steps_per_epoch
    run_dir = resume_dir or create_run_dir(cfg)
    if method.save_context is not None and resume_dir is None:
        method.save_context(data.context, run_dir)
    scaler = grad_scaler(device, precision)
    sam = SAM(optimizer, cfg.train.sam_rho, scaler) if cfg.train.sam else None
    session = Session(cfg, run_dir, device, precision, method, data, model, optimizer, scaler, LoopState(),
                      steps_per_epoch, total, sam)
    if resume_dir is not None:
        _restore(session)
    return session


def init_heads(model: nn.Module, source: Any, device: torch.device, seed: int, chunk: int = 32) -> None:
    """Initialise the input norms of the heads from a sample of training inputs. Cached features
    are summarised where they are (the CPU); towers that run in the loop encode the sample on the
    device a chunk at a time, so the sample never sits on the device whole."""
    from mmret.models.heads import InputNorm

    if not any(isinstance(m, InputNorm) for m in model.modules()):
        return
    images, texts = source.sample(seed=seed)
    for tower, x in ((model.image_tower, images), (model.text_tower, texts)):
        if hasattr(tower, "pooled_sample"):
            n = len(x["input_ids"]) if isinstance(x, dict) else len(x)
            parts = [_call(tower.pooled_sample, _to(_rows(x, a, a + chunk), device)).cpu() for a in range(0, n, chunk)]
            x = torch.cat(parts)
        init_input_norms(tower, x)


def _rows(x: Any, a: int, b: int) -> Any:
    return {k: v[a:b] for k, v in x.items()} if isinstance(x, dict) else x[a:b]


def _restore(s: Session) -> None:
    ckpt = s.run_dir / "checkpoints"
    if not (ckpt / "last.state.safetensors").is_file():
        raise MmretError(f"run {s.run_dir.name} has no checkpoint to resume from; start it again")
    weights = load_weights(s.model, ckpt / "last.safetensors")
    meta = load_state(s.optimizer, ckpt / "last.state.safetensors")
    if weights.get("step") != meta["loop"]["step"]:
        raise MmretError(f"the last checkpoint of {s.run_dir.name} is torn (weights at step {weights.get('step')}, "
                         f"optimizer at step {meta['loop']['step']}); resume from best or start again")
    s.state = LoopState(**meta["loop"])
    if s.state.finished:
        raise MmretError(f"run {s.run_dir.name} has already finished ({s.state.finished}); nothing to resume. "
                         f"Train a new run (`mmret train --config {s.run_dir / 'config.json'} ...`) to go further")
    s.step_rng = torch.get_rng_state()
    if meta.get("scaler"):
        s.scaler.load_state_dict(meta["scaler"])
    s.log(f"resumed at epoch {s.state.epoch + 1}, batch {s.state.batch}, step {s.state.step}")


# ---------------------------------------------------------------------------- steps


def train_step(s: Session, images: Any, texts: Any) -> float:
    """One optimizer step over one contrastive batch; returns its loss."""
    cfg = s.cfg.train
    for group in s.optimizer.param_groups:
        group["lr"] = lr_at(s.state.step, s.total_steps, int(cfg.warmup * s.total_steps), cfg.lr or s.method.lr)
    images, texts = _to(images, s.device), _to(texts, s.device)
    if s.cfg.method.mixup > 0:
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + s.state.step)
        images, texts, _, _ = latent_mixup(images, texts, s.cfg.method.mixup, gen)
    step_fn = contrastive_step if cfg.accumulation == "cache" else accumulate_step
    micro = cfg.micro_batch or cfg.batch_size

    def forward_backward() -> torch.Tensor:
        return step_fn(s.model, images, texts, micro, loss_fn=clip_loss, scaler=s.scaler, autocast=s.autocast)

    if s.sam is not None:
        loss_t, _ = s.sam.step(forward_backward, module=s.model, max_grad_norm=cfg.grad_clip or None)
        loss = _finite(s, float(loss_t))
    else:
        s.optimizer.zero_grad(set_to_none=True)
        loss = _finite(s, float(forward_backward()))
        s.scaler.unscale_(s.optimizer)
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in s.model.parameters() if p.requires_grad], cfg.grad_clip)
        s.scaler.step(s.optimizer)
        s.scaler.update()
    s.model.clamp_logit_scale_()
    s.state.step += 1
    return loss


def _call(fn: Any, x: Any) -> torch.Tensor:
    return fn(**x) if isinstance(x, dict) else fn(x)


def _finite(s: Session, loss: float) -> float:
    if not math.isfinite(loss):
        raise MmretError(
            f"the loss became {loss} at step {s.state.step + 1} (epoch {s.state.epoch + 1}); training stopped and the "
            f"last good checkpoint is kept in {s.run_dir / 'checkpoints'}. Try a lower --lr or --precision fp32")
    return loss


def _to(x: Any, device: torch.device) -> Any:
    if isinstance(x, dict):
        return {k: v.to(device, non_blocking=True) for k, v in x.items()}
    return x.to(device, non_blocking=True)


def train_one_epoch(s: Session, task: Any) -> None:
    """The remaining batches of the current epoch (all of them unless resuming mid-epoch)."""
    st, cfg = s.state, s.cfg.train
    batches = epoch_batches(s.data.train.tables.captions_of, cfg.batch_size, cfg.seed, st.epoch)
    s.model.train()
    for images, texts in s.data.train.iter_pairs(batches[st.batch:], epoch=st.epoch):
        n = len(texts["input_ids"]) if isinstance(texts, dict) else len(texts)
        loss = train_step(s, images, texts)
        s.step_rng = torch.get_rng_state()
        st.batch, st.loss_sum, st.pairs = st.batch + 1, st.loss_sum + loss * n, st.pairs + n
        task.advance(n, loss=loss, lr=s.optimizer.param_groups[0]["lr"])
        if cfg.max_steps and st.step >= cfg.max_steps:
            return


# ---------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def embed_source(model: nn.Module, source: Any, batch_size: int, device: torch.device, autocast: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized embeddings of every image and every caption of a source, as float32 on the CPU."""
    was_training = model.training
    model.eval()
    with autocast():
        images = torch.cat([_call(model.encode_image, _to(x, device)).float().cpu() for x in source.iter_images(batch_size)])
        texts = torch.cat([_call(model.encode_text, _to(x, device)).float().cpu() for x in source.iter_texts(batch_size)])
    model.train(was_training)
    return images, texts


@torch.inference_mode()
def validation_loss(model: nn.Module, image_emb: torch.Tensor, text_emb: torch.Tensor,
                    captions_of: list[np.ndarray], batch_size: int) -> float:
    """The contrastive loss over fixed batches of (image, its first caption), in image order."""
    first = np.array([caps[0] for caps in captions_of])
    device = next(model.parameters()).device
    losses, weights = [], []
    for a in range(0, len(first), batch_size):
        idx = np.arange(a, min(a + batch_size, len(first)))
        if len(idx) < 2:
            continue
        images, texts = image_emb[idx].to(device), text_emb[first[idx]].to(device)
        losses.append(float(clip_loss(images, texts, model.logit_scale_for(images, texts))))
        weights.append(len(idx))
    return float(np.average(losses, weights=weights)) if losses else float("nan")


def evaluate(s: Session) -> dict[str, float]:
    """Recall@1/5/10 both ways (and their mean), MRR and the loss on the validation split."""
    from mmret.metrics import retrieval_metrics

    source = s.data.val
    image_emb, text_emb = embed_source(s.model, source, s.cfg.train.batch_size, s.device, s.autocast)
    result = retrieval_metrics(image_emb, text_emb, torch.tensor(source.tables.caption_image))
    loss = validation_loss(s.model, image_emb, text_emb, source.tables.captions_of, s.cfg.train.batch_size)
    recalls = [result.metrics[f"{d}_r{k}"] for d in ("t2i", "i2t") for k in (1, 5, 10)]
    return {**result.metrics, SELECT_METRIC: float(np.mean(recalls)), "val_loss": loss}


# ---------------------------------------------------------------------------- end of an epoch


def _checkpoint(s: Session, metrics: dict[str, float], weights: bool = True) -> None:
    ckpt, st = s.run_dir / "checkpoints", s.state
    meta = {"step": st.step, "epoch": st.epoch, "metrics": metrics}
    loop = asdict(st) | {"seconds": st.seconds + time.perf_counter() - s.started}
    save_state(s.optimizer, ckpt / "last.state.safetensors",
               {"loop": loop, "scaler": s.scaler.state_dict() if s.scaler.is_enabled() else None})
    if weights:
        save_weights(s.model, ckpt / "last.safetensors", meta)


def finish_epoch(s: Session, partial: bool = False) -> bool:
    """Evaluate, record, checkpoint; returns True when early stopping says to stop."""
    st, cfg = s.state, s.cfg.train
    metrics = evaluate(s)
    row = {"step": st.step, "epoch": st.epoch + 1, "train_loss": st.loss_sum / max(st.pairs, 1),
           "lr": s.optimizer.param_groups[0]["lr"], "seconds": st.seconds + time.perf_counter() - s.started,
           **metrics}
    st.history.append(row)
    improved = metrics[SELECT_METRIC] > st.best
    st.best, st.best_epoch = (metrics[SELECT_METRIC], st.epoch + 1) if improved else (st.best, st.best_epoch)
    st.bad_evals = 0 if improved else st.bad_evals + 1
    if not partial:
        st.epoch, st.batch, st.loss_sum, st.pairs = st.epoch + 1, 0, 0.0, 0
    write_parquet(s.run_dir / "metrics.parquet", pd.DataFrame(st.history))
    if time.perf_counter() - s.plotted > PLOT_EVERY:
        _plot(s)
    _checkpoint(s, metrics)
    ckpt = s.run_dir / "checkpoints"
    if improved:
        save_weights(s.model, ckpt / "best.safetensors", {"step": st.step, "epoch": row["epoch"], "metrics": metrics})
    if cfg.save_every and row["epoch"] % cfg.save_every == 0 and not partial:
        save_weights(s.model, ckpt / f"epoch-{row['epoch']:03d}.safetensors", {"step": st.step, "metrics": metrics})
    s.log(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))
    return bool(cfg.patience) and st.bad_evals >= cfg.patience


def _plot(s: Session) -> None:
    from mmret.plots import learning_curve

    if s.state.history:
        learning_curve(pd.DataFrame(s.state.history), s.run_dir / "plots" / "learning_curve.png")
    s.plotted = time.perf_counter()


# ---------------------------------------------------------------------------- the run


def train(cfg: RunConfig, reporter: Reporter = NULL, resume_dir: Path | None = None) -> RunResult:
    """Train a method as configured; with `resume_dir`, continue that run from its last checkpoint."""
    s = setup(cfg, reporter, resume_dir)
    st, tc = s.state, cfg.train
    if resume_dir is None:
        s.log(f"training {cfg.method.method} on {cfg.data.dataset}: {s.data.train.num_images} train / "
              f"{s.data.val.num_images} val images, {s.total_steps} steps, {s.precision} on {s.device}")
    stopped = "finished all epochs"
    total_pairs = s.data.train.num_images * tc.epochs
    with reporter.task(f"training {s.run_dir.name}", total=total_pairs, unit="pairs") as task:
        task.advance(min(st.epoch * s.data.train.num_images + st.pairs, total_pairs))
        try:
            while st.epoch < tc.epochs:
                train_one_epoch(s, task)
                at_limit = bool(tc.max_steps) and st.step >= tc.max_steps
                if finish_epoch(s, partial=at_limit and st.batch < s.steps_per_epoch):
                    stopped = f"early stop: no better val {SELECT_METRIC} in {tc.patience} evaluations"
                    break
                task.advance(0, **{"val R@1": s.state.history[-1].get("t2i_r1", float("nan"))})
                if at_limit:
                    stopped = f"reached --max-steps {tc.max_steps}"
                    break
        except KeyboardInterrupt:
            torch.set_rng_state(s.step_rng)  # as if the interrupted step had never started
            _checkpoint(s, {})
            _plot(s)
            s.log(f"interrupted at step {st.step}; saved last")
            raise TrainingInterrupted(f"interrupted at step {st.step}: saved {s.run_dir / 'checkpoints' / 'last.safetensors'}; "
                                      f"continue with `mmret train --resume {s.run_dir.name}`") from None
    return _result(s, stopped)


def _result(s: Session, stopped: str) -> RunResult:
    st = s.state
    st.finished = stopped
    _checkpoint(s, {}, weights=False)  # the weights of `last` are already saved; mark the state finished
    _plot(s)
    s.log(f"done: {stopped}; best val {SELECT_METRIC} {st.best:.4f} at epoch {st.best_epoch}")
    point_latest(s.cfg.runs_dir, s.run_dir)
    best = read_meta(s.run_dir / "checkpoints" / "best.safetensors").get("metrics", {})
    return RunResult(s.run_dir, st.epoch, st.step, best, st.history[-1] if st.history else {}, stopped,
                     st.seconds + time.perf_counter() - s.started, s.precision, str(s.device))


def resume(run_dir: Path, reporter: Reporter = NULL) -> RunResult:
    """Continue a stopped run exactly where its last checkpoint left it."""
    cfg = load_run_config(run_dir)
    return train(cfg, reporter, resume_dir=run_dir)


# ---------------------------------------------------------------------------- dry run


@dataclass
class DryRun:
    method: str
    rows: list  # PartCount rows: the frozen towers, the model's parts, and the total
    config: dict


def dry_run(cfg: RunConfig) -> DryRun:
    """The parameter table and the resolved config, without computing features or training."""
    from mmret.models import PartCount, parameter_table

    method = get_method(cfg.method.method, training=True)
    if method.inputs == "pixels":
        context = method.context(cfg, None)
        model = method.build(cfg, context)
        rows = parameter_table(model)
        side = getattr(context, "cached", None)
        if side is not None:  # the frozen tower is outside the model: its outputs are cached
            enc = context.image if side == "image" else context.text
            n = sum(p.numel() for p in enc.parameters())
            frozen = PartCount(f"{side} encoder ({enc.name}, frozen, cached)", n, 0)
            rows = [frozen] + rows[:-1] + [PartCount("total", rows[-1].total + n, rows[-1].trainable)]
        return DryRun(method.name, rows, cfg.to_dict())
    from mmret.encoders import load_image_encoder, load_text_encoder
    from mmret.methods import FeatureDims

    image_enc = load_image_encoder(cfg.encoders.vision)
    text_enc = load_text_encoder(cfg.encoders.text, max_length=cfg.encoders.max_length)
    model = method.build(cfg, FeatureDims(image_enc.dim, image_enc.token_dim, text_enc.dim))
    frozen = [PartCount(f"{which} encoder ({enc.name}, frozen)", sum(p.numel() for p in enc.parameters()), 0)
              for which, enc in (("image", image_enc), ("text", text_enc))]
    parts = parameter_table(model)
    total = PartCount("total", parts[-1].total + sum(r.total for r in frozen), parts[-1].trainable)
    return DryRun(method.name, frozen + parts[:-1] + [total], cfg.to_dict())
