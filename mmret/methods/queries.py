"""Turning search queries into a tower's input: item files decoded and stacked (one line for a file
that cannot be read), and a frozen tower run on them without gradients."""

from __future__ import annotations

from typing import Any

import torch

from mmret.common.paths import ANYWHERE
from mmret.errors import MmretError
from mmret.modalities import ItemError, get_modality


def item_batch(tower: Any, load: Any, paths: list) -> dict[str, torch.Tensor]:
    """`forward`'s keyword input for the item files `paths`, through the item loader `load`: files the
    user names as queries, read wherever they are (but only if they are regular files)."""
    items, load = [], load.reading(ANYWHERE)
    for path in paths:
        try:
            items.append(load(path))
        except ItemError as e:
            raise MmretError(f"cannot read the query {get_modality(tower.modality).noun} {path}: {e}") from None
    return {tower.input_name: torch.stack(items)}


@torch.inference_mode()
def encode_with_tower(tower: Any, inputs: dict[str, torch.Tensor], device: torch.device) -> Any:
    """A frozen tower's output for a batch of inputs, on `device`."""
    return tower(**{k: v.to(device) for k, v in inputs.items()})
