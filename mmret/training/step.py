"""One optimizer step over one contrastive batch, and the pure pieces around it: the learning-rate
schedule, AdamW's parameter groups, and the training precision.

`Stepper` holds what a step needs (model, optimizer, loss scaler, SAM, the schedule, the loss and
the processes it is shared by) and nothing about runs, folders or data, so the training loop on
one process or many and memory probing all run the same step. A step computes the exact
contrastive loss over the whole batch (gradient caching when `--micro-batch` is smaller), clips,
steps the optimizer and clamps the temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from mmret.common.device import autocast_context, bf16_supported, check_precision, reduced_precision
from mmret.errors import MmretError
from mmret.models.batch import to_device
from mmret.training.gradcache import accumulate_step, contrastive_step
from mmret.training.losses import ClipLoss
from mmret.training.world import World


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


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, foreach: bool | None = None) -> torch.optim.AdamW:
    """AdamW; fused (one kernel over all parameters per step) where torch has it for every parameter's
    device, unless a `foreach` choice is asked for (probe-memory tracks the foreach path's buffers). On
    a CPU the unfused update makes a dozen passes over every parameter: for the quick start's 5 M it
    took an eighth of each step (profiled)."""
    groups = param_groups(model, weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = foreach is None and bool(params) and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                                                     for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, foreach=foreach, fused=fused or None)


def training_precision(device: torch.device, requested: str, runs_towers: bool) -> str:
    """`auto`: AMP on CUDA (bf16 where supported, else fp16 with a GradScaler); on the CPU bf16
    autocast for methods that run the towers (where the matrix products dominate), else fp32."""
    check_precision(device, requested)
    if requested != "auto":
        return requested
    if device.type == "cuda":
        return reduced_precision(device) or "fp32"
    return "bf16" if runs_towers and bf16_supported(device) else "fp32"


class NonFiniteLoss(Exception):
    """The loss of a step was NaN or infinite; the optimizer was not stepped."""

    def __init__(self, loss: float):
        super().__init__(str(loss))
        self.loss = loss


@dataclass(kw_only=True)
class Stepper:
    """What one step needs. `batch_transform(items, texts, generator)` augments a batch (latent
    mixup); `keep_grads` accumulates into gradients that already exist instead of zeroing them
    (memory probing measures a step at steady state that way); `loss` is the contrastive loss over
    the batch's embeddings. On many processes (`world`, see `mmret.training.world`) each process
    steps over its slice of the global batch: `loss` gathers the slices (or, for plain
    accumulation, sees this process's pairs alone), the backward that ends a step goes through
    DistributedDataParallel, and the step's loss is averaged over the processes, so every process
    reports (and stops on) the same number."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    train: Any  # TrainConfig: batch, micro-batch, accumulation, warmup, clipping, seed
    peak_lr: float
    total_steps: int
    device: torch.device
    precision: str  # fp32 | bf16 | fp16
    scaler: Any  # torch.amp.GradScaler (a pass-through unless fp16 on CUDA)
    sam: Any = None  # SAM wrapper around the optimizer, with --sam
    batch_transform: Callable | None = None
    keep_grads: bool = False
    loss: ClipLoss = field(default_factory=ClipLoss)
    world: World = field(default_factory=World)
    autocast: Callable[[], Any] | None = None  # default: autocast_context(device, precision)

    def __post_init__(self) -> None:
        if self.autocast is None:
            self.autocast = lambda: autocast_context(self.device, self.precision)
        if self.world.size > 1 and self.train.batch_size < self.world.min_last_batch:
            raise MmretError(f"--batch-size {self.train.batch_size} is split over {self.world.size} processes; use "
                             f"at least {self.world.min_last_batch} (two pairs a process)")
        self._embed = self.world.ddp(self.model, self.device)  # None alone

    def __call__(self, items: Any, texts: Any, step: int, positives: torch.Tensor | None = None,
                 negatives: Any = None) -> float:
        """Step `step` (0-based) of the run over one batch; returns its loss. Raises
        `NonFiniteLoss` before the optimizer moves when the loss is not finite. `positives` (B, B)
        bool marks pairs the loss counts as right besides the diagonal (captions shared by pictures);
        `negatives` (a `mmret.data.pairs.NegativeBatch`) brings extra wrong captions."""
        cfg = self.train
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.total_steps, int(cfg.warmup * self.total_steps), self.peak_lr)
        items, texts = to_device(items, self.device), to_device(texts, self.device)
        if self.batch_transform is not None:
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            items, texts = self.batch_transform(items, texts, gen)
            positives = None  # mixed pairs blend two pictures each: which of them share a caption is undefined
        step_fn = contrastive_step if cfg.accumulation == "cache" else accumulate_step
        micro = cfg.micro_batch or cfg.batch_size
        extra = {} if negatives is None else {
            "negatives": to_device(negatives.inputs, self.device),
            "negative_owner": torch.as_tensor(negatives.owner, device=self.device)}

        def forward_backward() -> torch.Tensor:
            return step_fn(self.model, items, texts, micro, loss_fn=self.loss, scaler=self.scaler,
                           autocast=self.autocast, sync_embed=self._embed, positives=positives, **extra)

        if self.sam is not None:
            loss_t, _ = self.sam.step(forward_backward, module=self.model, max_grad_norm=cfg.grad_clip or None)
            loss = _finite(float(self.world.mean(loss_t)))
        else:
            if not self.keep_grads:
                self.optimizer.zero_grad(set_to_none=True)
            loss = _finite(float(self.world.mean(forward_backward())))
            self.scaler.unscale_(self.optimizer)
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad], cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.model.clamp_logit_scale_()
        return loss


def _finite(loss: float) -> float:
    if not math.isfinite(loss):
        raise NonFiniteLoss(loss)
    return loss
