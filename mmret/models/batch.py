"""A batch as models take it: a tensor (passed as `f(x)`) or a dict of tensors (passed as
`f(**x)`, e.g. a tokenizer's output), and the few operations every caller needs on either."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import torch
from torch import Tensor

from mmret.errors import MmretError

Batch = Tensor | Mapping[str, Any]


def batch_size(x: Batch) -> int:
    """Rows in a tensor, or in every tensor of a dict (which must agree)."""
    if not isinstance(x, Mapping):
        return len(x)
    sizes = {k: len(v) for k, v in x.items()}
    if len(set(sizes.values())) != 1:
        raise MmretError(f"the inputs of one batch have different numbers of rows: {sizes}")
    return next(iter(sizes.values()))


def slice_batch(x: Batch, start: int, stop: int) -> Batch:
    """Rows start:stop of a tensor or of each tensor in a dict."""
    if isinstance(x, Mapping):
        return {k: v[start:stop] for k, v in x.items()}
    return x[start:stop]


def to_device(x: Batch, device: torch.device) -> Batch:
    if isinstance(x, Mapping):
        return {k: v.to(device, non_blocking=True) for k, v in x.items()}
    return x.to(device, non_blocking=True)


def call(fn: Callable[..., Tensor], x: Batch) -> Tensor:
    """`fn(**x)` for a dict, `fn(x)` for a tensor."""
    return fn(**x) if isinstance(x, Mapping) else fn(x)
