"""Latent mixup as in FuseMix (Vouitsis et al., 2024): augmentation in the frozen encoders' space.

Both modalities of a batch are mixed with ONE lambda ~ Beta(alpha, alpha) and ONE permutation, so
mixed item i and mixed caption i stay a matching pair. It is applied to the cached encoder
outputs (pooled features or token states) before the trainable parts; raw pixels or waveforms are never mixed.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch import Tensor

from mmret.errors import MmretError
from mmret.models.batch import Batch, batch_size


def sample_mixup(batch_size: int, alpha: float, generator: torch.Generator) -> tuple[float, Tensor]:
    """Draw (lambda, permutation) from `generator`; the same draw is meant for both modalities."""
    if alpha <= 0:
        raise MmretError(f"--mixup-alpha must be positive, got {alpha}")
    # torch's Beta sampler takes no generator, so seed a numpy one from the torch generator
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    lam = float(np.random.default_rng(seed).beta(alpha, alpha))
    return lam, torch.randperm(batch_size, generator=generator)


def _mix_tensor(key: str, x: Tensor, lam: float, perm: Tensor) -> Tensor:
    other = x[perm.to(x.device)]
    if x.dtype == torch.bool or key.endswith("mask"):
        # a mixed token sequence holds tokens wherever either source had them
        return torch.maximum(x, other)
    if x.is_floating_point():
        return lam * x + (1.0 - lam) * other
    raise MmretError(f"latent mixup cannot mix {key!r} ({x.dtype}); mix cached features, not token ids")


def mix(x: Batch, lam: float, perm: Tensor) -> Batch:
    """lam * x + (1 - lam) * x[perm] for a tensor or each tensor of a dict (masks: union)."""
    if isinstance(x, Mapping):
        return {k: _mix_tensor(k, v, lam, perm) for k, v in x.items()}
    return _mix_tensor("features", x, lam, perm)


def latent_mixup(
    items: Batch, texts: Batch, alpha: float, generator: torch.Generator
) -> tuple[Batch, Batch, float, Tensor]:
    """Mix a batch of cached item and text outputs with one shared lambda and permutation."""
    n = batch_size(items)
    if batch_size(texts) != n:
        raise MmretError(f"latent mixup needs as many items as captions, got {n} and {batch_size(texts)}")
    lam, perm = sample_mixup(n, alpha, generator)
    return mix(items, lam, perm), mix(texts, lam, perm), lam, perm
