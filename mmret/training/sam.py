"""Sharpness-aware minimisation (Foret et al. 2021, "Sharpness-Aware Minimization for Efficiently
Improving Generalization"): one ascent step per update, around any torch optimizer (AdamW here).

One update takes two forward/backward passes:

    backward at w            -> first_step():  save w, move to w + e_w with e_w = rho * g / ||g||
    backward at w + e_w      -> second_step(): copy w back, base optimizer step with these gradients

or both at once with `step(closure)`, where `closure()` zeroes nothing, runs forward and backward
(scaling the loss when a GradScaler is in use) and returns the loss.

Mixed precision: under fp16 with a GradScaler both backward passes are scaled by the same factor.
The direction g / ||g|| does not depend on it, so `first_step` uses the scaled gradients as they are
and only checks that they are finite; the gradients are unscaled once, by the scaler in
`second_step`, and the scaler is stepped and updated once per update. A non-finite gradient in
either pass skips the update (and, with a scaler, lowers its scale). The ascent is undone by copying
the saved weights back, not by subtracting e_w: (w + e) - e is not w in floating point.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import Tensor, nn

from mmret.errors import MmretError


def _grad_norm(params: list[Tensor]) -> Tensor:
    """The global L2 norm of the gradients, in fp32 (inf or NaN if any gradient is)."""
    if not params:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))


@contextmanager
def frozen_norm_stats(module: nn.Module | None) -> Iterator[None]:
    """Keep BatchNorm running statistics unchanged inside the block (SAM's second pass runs at
    perturbed weights; its batch statistics should not enter the running averages)."""
    norms = [] if module is None else [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = (1 - 0) * running + 0 * batch
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


class SAM:
    """Wraps a base optimizer; `first_step` / `second_step` (or `step(closure)`) make one SAM update."""

    def __init__(self, optimizer: torch.optim.Optimizer, rho: float = 0.05,
                 scaler: torch.amp.GradScaler | None = None, keep_grads: bool = False) -> None:
        if not rho > 0:
            raise MmretError(f"--sam-rho must be positive, got {rho}")
        self.optimizer, self.rho = optimizer, rho
        self.keep_grads = keep_grads  # never free the gradients (memory probing measures them alive)
        self.scaler = scaler if scaler is not None and scaler.is_enabled() else None
        self._saved: list[tuple[Tensor, Tensor]] = []  # (parameter, its weights before the ascent)

    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups  # so a learning-rate schedule can set "lr" as usual

    def _params_with_grad(self) -> list[Tensor]:
        return [p for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]

    def zero_grad(self) -> None:
        if not self.keep_grads:
            self.optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def first_step(self) -> bool:
        """After the backward at w: move to w + e_w and clear the gradients.

        Returns False, having skipped this update, when a gradient is inf or NaN.
        """
        if self._saved:
            raise RuntimeError("SAM.first_step called twice without second_step")
        params = self._params_with_grad()
        norm = _grad_norm(params)
        if not torch.isfinite(norm):
            self._skip()
            return False
        scale = self.rho / (norm + 1e-12)  # a (possibly GradScaler-scaled) norm: the ratio is scale-free
        for p in params:
            self._saved.append((p, p.detach().clone()))
            p.add_(p.grad * scale.to(p.grad.device, p.grad.dtype))
        self.zero_grad()
        return True

    def second_step(self, max_grad_norm: float | None = None) -> bool:
        """After the backward at w + e_w: restore w and step the base optimizer with these gradients.

        `max_grad_norm` clips the (unscaled) gradients first. Returns whether the weights changed.
        """
        if not self._saved:
            raise RuntimeError("SAM.second_step needs a first_step that returned True")
        with torch.no_grad():
            for p, weights in self._saved:
                p.copy_(weights)
        self._saved.clear()
        params = self._params_with_grad()
        stepped = self._scaled_step(params, max_grad_norm) if self.scaler else self._plain_step(params, max_grad_norm)
        self.zero_grad()
        return stepped

    @torch.no_grad()
    def undo(self) -> None:
        """Back to w from an ascent whose update was cut short (an interrupted step)."""
        for p, weights in self._saved:
            p.copy_(weights)
        self._saved.clear()

    def _scaled_step(self, params: list[Tensor], max_grad_norm: float | None) -> bool:
        if max_grad_norm is not None:
            self.scaler.unscale_(self.optimizer)  # the one unscale; scaler.step will not repeat it
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        before = self.scaler.get_scale()
        self.scaler.step(self.optimizer)  # skips the step itself when it finds inf/NaN
        self.scaler.update()
        return self.scaler.get_scale() >= before  # the scale only drops after a skipped step

    def _plain_step(self, params: list[Tensor], max_grad_norm: float | None) -> bool:
        if not torch.isfinite(_grad_norm(params)):
            return False
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        self.optimizer.step()
        return True

    def _skip(self) -> None:
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # records the inf and does not step
            self.scaler.update()  # lowers the scale, as after any overflowing step
        self.zero_grad()

    def step(self, closure: Callable[[], Tensor], module: nn.Module | None = None,
             max_grad_norm: float | None = None) -> tuple[Tensor, bool]:
        """A whole update: closure at w, ascent, closure at w + e_w, descent.

        `closure()` runs forward and backward and returns the loss; `module`'s BatchNorm running
        statistics are kept from the first pass. Returns (loss at w, whether the weights changed).
        """
        self.zero_grad()
        loss = closure()
        if not self.first_step():
            return loss, False
        with frozen_norm_stats(module):
            closure()
        return loss, self.second_step(max_grad_norm)

    def state_dict(self) -> dict:
        return self.optimizer.state_dict()  # SAM keeps nothing between updates

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)
