"""Live tensor bytes: a dispatch mode that counts every tensor storage alive, by what it holds
(weights, gradients, optimizer state, activations, workspace), and the largest total it saw."""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = ("weights", "gradients", "optimizer", "activations", "workspace")


@dataclass
class Breakdown:
    """Bytes alive at a peak, by what they hold; `total` is the peak."""

    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    workspace: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.workspace

    @classmethod
    def of(cls, counts: dict[str, int]) -> "Breakdown":
        return cls(**{k: int(counts.get(k, 0)) for k in CATEGORIES})


def _storages(out: Any) -> Iterator[torch.UntypedStorage]:
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            yield t.untyped_storage()


def _is_fake(args: tuple) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(a, FakeTensor) for a in args)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage alive, by category, and the largest total.

    Storages existing on entry are registered as weights (the model's parameters and buffers),
    gradients and optimizer state; every storage an operation returns afterwards is new: made in
    backward (the autograd engine is running) or in the optimizer's step it counts as workspace,
    otherwise as activations, and a gradient that autograd stores into `.grad` moves to gradients.
    A weak reference per storage takes its bytes off when it is freed. `peak` is the largest total
    seen and `at_peak` its split; `at_backward` is the split when backward starts (what the forward
    pass left alive for it).

    On fake tensors, reading a value (`.item()`, `bool(t)`) has no data to read: it answers 1, so
    a loss passes its finiteness check and an all-ones mask reads as all ones.
    """

    def __init__(self, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 block: int = 1) -> None:
        super().__init__()
        self.block = block  # round each storage up to this (the CUDA allocator's 512)
        self.bytes = dict.fromkeys(CATEGORIES, 0)
        self.live: dict[int, tuple[weakref.ref, str, int]] = {}
        self.peak, self.at_peak, self.at_backward = 0, dict(self.bytes), None
        self.category = "activations"  # of new storages outside backward
        self._hooks: list[Any] = []
        if model is not None:
            self._register_model(model)
        if optimizer is not None:
            self._register_optimizer(optimizer)
        self._mark_peak()

    # -- registration ---------------------------------------------------
    def add(self, storage: torch.UntypedStorage, category: str) -> None:
        key = id(storage)
        if key in self.live:
            return
        nbytes = -(-storage.nbytes() // self.block) * self.block
        self.live[key] = (weakref.ref(storage, lambda _, k=key: self._free(k)), category, nbytes)
        self.bytes[category] += nbytes

    def move(self, storage: torch.UntypedStorage, category: str) -> None:
        entry = self.live.get(id(storage))
        if entry is None:
            self.add(storage, category)
        elif entry[1] != category:
            self.bytes[entry[1]] -= entry[2]
            self.bytes[category] += entry[2]
            self.live[id(storage)] = (entry[0], category, entry[2])

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.bytes[entry[1]] -= entry[2]

    def _register_model(self, model: nn.Module) -> None:
        for t in [*model.parameters(), *model.buffers()]:
            self.add(t.untyped_storage(), "weights")
        for p in model.parameters():
            if p.grad is not None:
                self.add(p.grad.untyped_storage(), "gradients")
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _register_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    self.add(value.untyped_storage(), "optimizer")
        # the step's temporaries (foreach AdamW keeps a whole copy of the moments for a moment)
        self._hooks.append(optimizer.register_step_pre_hook(lambda *_: setattr(self, "category", "workspace")))
        self._hooks.append(optimizer.register_step_post_hook(lambda *_: setattr(self, "category", "activations")))

    def _on_grad(self, param: torch.Tensor) -> None:
        self.move(param.grad.untyped_storage(), "gradients")

    # -- accounting -----------------------------------------------------
    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def _mark_peak(self) -> None:
        total = self.total
        if total > self.peak:
            self.peak, self.at_peak = total, dict(self.bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args):
            return {torch.bool: True}.get(args[0].dtype, 1.0 if args[0].is_floating_point() else 1)
        out = func(*args, **(kwargs or {}))
        in_backward = torch._C._current_graph_task_id() != -1
        if in_backward and self.at_backward is None:
            self.at_backward = dict(self.bytes)
        category = "workspace" if in_backward else self.category
        for storage in _storages(out):
            self.add(storage, category)
        self._mark_peak()
        return out

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        super().__exit__(*exc)

    def breakdown(self) -> Breakdown:
        return Breakdown.of(self.at_peak)
