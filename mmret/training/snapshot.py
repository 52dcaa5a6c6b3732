"""Undoing a training step that did not finish, so an interrupted run resumes as if it never stopped.

A step changes more than the weights the optimizer moves: the forward pass updates BatchNorm's
running statistics and `num_batches_tracked`, dropout and augmentation draw from the random
generators, SAM moves the weights to its ascent point between its two passes, and the loss scaler
adapts its scale. `StepSnapshot.take` keeps all of that before the step (the buffers of the modules
that train, which are few and small: the statistics of norm layers, not the weights), and `restore`
puts it back when the step is cut short. The optimizer's update and the loop's counters are one
block that a Ctrl-C does not split (`mmret.training.loop` runs the step under
`mmret.common.io.uninterrupted`, so a signal lands between steps); an exception raised inside the
step (a KeyboardInterrupt from elsewhere, a hook) is what `restore` undoes. (mmret keeps no EMA of
the weights; a scaler's state is restored with the rest.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmret.runs.checkpoint import rng_state, set_rng_state


@dataclass
class StepSnapshot:
    rng: tuple[dict[str, torch.Tensor], dict[str, Any]]  # torch (CPU and CUDA), numpy and Python generators
    buffers: list[tuple[torch.Tensor, torch.Tensor]]  # (a buffer of a training module, its value before the step)
    scaler: dict | None  # the loss scaler's state, when it scales

    @classmethod
    def take(cls, model: nn.Module, scaler: Any) -> "StepSnapshot":
        buffers = [(b, b.detach().clone()) for m in model.modules() if m.training
                   for b in m.buffers(recurse=False) if not b.is_meta]
        return cls(rng_state(), buffers, scaler.state_dict() if scaler.is_enabled() else None)

    @torch.no_grad()
    def restore(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, sam: Any = None) -> None:
        """Everything back as it was before the step: SAM's ascent undone, the buffers, the scaler, the
        random generators; the step's gradients dropped."""
        if sam is not None:
            sam.undo()
        for buffer, before in self.buffers:
            buffer.copy_(before)
        if self.scaler is not None:
            scaler.load_state_dict(self.scaler)
        set_rng_state(*self.rng)
        optimizer.zero_grad(set_to_none=True)
