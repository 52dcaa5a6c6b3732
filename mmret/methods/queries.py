"""Running a frozen tower on a batch of query inputs, without gradients (the items themselves are
turned into a batch by `mmret.inference.inputs`)."""

from __future__ import annotations

from typing import Any

import torch


@torch.inference_mode()
def encode_with_tower(tower: Any, inputs: dict[str, torch.Tensor], device: torch.device) -> Any:
    """A frozen tower's output for a batch of inputs, on `device`."""
    return tower(**{k: v.to(device) for k, v in inputs.items()})
