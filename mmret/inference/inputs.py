"""Query items into one batch of model-ready tensors, whatever form they come in: a file (a path),
an item held in memory (a PIL image or a uint8 array; a (waveform, sample rate) pair: what the
modality `accept`s), or a tensor already preprocessed (what `preprocess` gives). Search, serve and
the Python API all turn items into a batch here, so a picture given as a path, as a PIL image or
as its pixels gives the same embedding."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from mmret.common.paths import ANYWHERE
from mmret.errors import MmretError
from mmret.modalities import ItemError, ItemLoader, Modality


def _name(item: Any) -> str:
    return str(item) if isinstance(item, (str, Path)) else f"({type(item).__name__})"


def preprocess_item(modality: Modality, loader: ItemLoader, item: Any) -> torch.Tensor:
    """One item -> the tensor the model's input is stacked from (a tensor passes as it is)."""
    if isinstance(item, torch.Tensor) and item.is_floating_point():
        return item
    try:
        if isinstance(item, (str, Path)):  # a file the user names: read wherever it is, if a regular file
            return loader.reading(ANYWHERE)(item)
        if modality.accept is None:
            raise ItemError(f"{modality.plural} are given as file paths")
        return loader.transform(modality.accept(item, loader.decode))
    except ItemError as e:
        raise MmretError(f"cannot read the query {modality.noun} {_name(item)}: {e}") from None


def as_items(items: Any) -> list:
    """A single item, or a batch of them: a list or tuple of items, a (B, ...) tensor of
    preprocessed items, or a (B, H, W, C) array of pictures, as a list. A pair (waveform, rate)
    is one item, not two."""
    if isinstance(items, torch.Tensor):
        return list(items) if items.ndim == 4 else [items]
    if isinstance(items, np.ndarray):
        return list(items) if items.ndim == 4 else [items]
    if isinstance(items, tuple) and len(items) == 2 and isinstance(items[1], (int, np.integer)):
        return [items]
    if isinstance(items, (list, tuple)):
        return list(items)
    return [items]


def item_batch(modality: Modality, loader: ItemLoader, items: Sequence) -> torch.Tensor:
    """(B, ...) preprocessed items, stacked; items that preprocess to different shapes are refused
    in one line (tensors made for another input size)."""
    tensors = [preprocess_item(modality, loader, item) for item in items]
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) > 1:
        raise MmretError(f"the {modality.plural} preprocess to different shapes {sorted(shapes)}; give tensors made "
                         "by this model's preprocess")
    return torch.stack([t.float() for t in tensors])
