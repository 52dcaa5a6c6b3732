"""A pretrained tower in the training loop: the encoder (adapted inside, or not) followed by a
projection head into the shared space.

Used by the methods that run items and tokens through the towers at every step (lora, prefix,
adapter, full). The head is an `InputNorm` + `ProjectionHead`, or nothing when the tower already
ends in the shared space (a CLIP tower's projected embedding, when its width is the embedding size).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn


class EncoderTower(nn.Module):
    """encoder(inputs).pooled → head → (B, embed_dim)."""

    def __init__(self, encoder: nn.Module, head: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = head if head is not None else nn.Identity()

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        pooled = self.encoder(*args, **kwargs).pooled  # (B, D)
        return self.head(pooled)  # (B, embed_dim)

    def named_parts(self) -> dict[str, nn.Module]:
        parts = {"encoder": self.encoder}
        if not isinstance(self.head, nn.Identity):
            parts["head"] = self.head
        return parts

    @torch.no_grad()
    def pooled_sample(self, *args: Any, **kwargs: Any) -> Tensor:
        """The encoder's pooled output for a sample batch, to initialise the head's input norm."""
        was_training = self.encoder.training
        self.encoder.eval()
        out = self.encoder(*args, **kwargs).pooled.float()
        self.encoder.train(was_training)
        return out
