"""The dual encoder: two towers into one normalised embedding space, and a temperature.

A tower is any `nn.Module` that maps a batch to (B, embed_dim): a head over cached pooled
features, a bridge over cached token states, or a frozen pretrained encoder (with LoRA inside)
followed by a head. A batch is a tensor, passed as `tower(x)`, or a dict of tensors, passed as
`tower(**x)`, so tokenizer output and {"tokens", "mask"} feature batches both work. The temperature
is a `mmret.models.temperature` module; the default is CLIP's learned log-scale, initialised at
log(1/0.07) and kept at most log(100).

The contract `gradcache.py` relies on (shared with `MiniCLIP`): `encode_item(batch)`,
`encode_text(batch)` and `logit_scale_for(item_emb, text_emb)` over the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch.nn.functional as F
from torch import Tensor, nn

from mmret.errors import MmretError
from mmret.models.batch import Batch, call
from mmret.models.temperature import Temperature, build_temperature, logit_scale_for


class DualOutput(NamedTuple):
    item_emb: Tensor  # (B, D), normalised
    text_emb: Tensor  # (B, D), normalised
    logit_scale: Tensor  # () the multiplier 1/temperature that `ClipLoss` takes


class DualEncoder(nn.Module):
    """Item tower (pictures or sounds) + text tower → normalised (B, embed_dim) embeddings, and a logit scale."""

    def __init__(
        self,
        item_tower: nn.Module,
        text_tower: nn.Module,
        embed_dim: int = 512,
        temperature: Temperature | None = None,  # default: learned, 1/0.07 at start, at most 100
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.item_tower = item_tower
        self.text_tower = text_tower
        self.temperature = temperature if temperature is not None else build_temperature("learned")

    @property
    def logit_scale(self) -> Tensor | None:
        """The stored log-scale (open_clip's `model.logit_scale`); None for a dynamic temperature."""
        return getattr(self.temperature, "log_scale", None)

    def logit_scale_for(self, item_emb: Tensor, text_emb: Tensor) -> Tensor:
        """The multiplier for this batch's similarities (a dynamic temperature reads them)."""
        return logit_scale_for(self.temperature, item_emb, text_emb)  # ()

    def clamp_logit_scale_(self) -> None:
        """Call after each optimiser step, as open_clip does, so the scale stays in its range."""
        self.temperature.clamp_()

    def _encode(self, which: str, tower: nn.Module, x: Batch | None, inputs: dict, normalize: bool) -> Tensor:
        x = inputs if x is None else x
        out = call(tower, x)
        if out.dim() != 2 or out.shape[1] != self.embed_dim:
            raise MmretError(
                f"the {which} tower returned shape {tuple(out.shape)}, expected (batch, {self.embed_dim}); "
                "set its output size to the model's embedding size"
            )
        return F.normalize(out, dim=-1) if normalize else out  # (B, D)

    def encode_item(self, x: Batch | None = None, /, normalize: bool = True, **inputs: Tensor) -> Tensor:
        """A tensor, a dict of tensors, or the tensors as keywords → (B, embed_dim)."""
        return self._encode("item", self.item_tower, x, inputs, normalize)

    def encode_text(self, x: Batch | None = None, /, normalize: bool = True, **inputs: Tensor) -> Tensor:
        """A tensor, a dict of tensors (e.g. input_ids, attention_mask), or keywords → (B, embed_dim)."""
        return self._encode("text", self.text_tower, x, inputs, normalize)

    def forward(self, items: Batch, texts: Batch) -> DualOutput:
        item_emb, text_emb = self.encode_item(items), self.encode_text(texts)
        return DualOutput(item_emb, text_emb, self.logit_scale_for(item_emb, text_emb))

    def named_parts(self) -> dict[str, nn.Module]:
        """The parts for a parameter table; a tower with its own `named_parts` is listed by sub-part."""
        parts: dict[str, nn.Module] = {}
        for name, tower in (("item", self.item_tower), ("text", self.text_tower)):
            sub = tower.named_parts() if callable(getattr(tower, "named_parts", None)) else None
            parts.update({f"{name}.{k}": m for k, m in sub.items()} if sub else {name: tower})
        parts["temperature"] = self.temperature
        return parts


@dataclass(frozen=True)
class PartCount:
    part: str
    total: int
    trainable: int

    @property
    def percent_trainable(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0


def count_part(module: nn.Module, name: str = "total") -> PartCount:
    """Total and trainable parameter counts of a module (shared tensors counted once)."""
    params = list(module.parameters())  # parameters() already skips repeated (tied) tensors
    return PartCount(name, sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad))


def parameter_table(model: nn.Module) -> list[PartCount]:
    """One row per part of `model.named_parts()` (if it has them), then a "total" row over the model."""
    parts = model.named_parts() if callable(getattr(model, "named_parts", None)) else {}
    return [count_part(m, name) for name, m in parts.items()] + [count_part(model)]
