"""Augmented views of the items, cached once: what gives features methods augmentation without
running the tower at every step.

View v of a dataset is every item passed once through the training transform (a random resized
crop, and a flip unless the captions say left or right), with the random draws seeded by (seed,
v, the item's file), so a view is the same whenever it is computed. Each view is a feature cache
of its own (`ensure_features(..., view=ItemView(v))`, its key covering the view); training reads
view 0 (the plain centre crop) or one of views 1..K for each item, drawn afresh every epoch
(`FeatureSource.use_views`).
"""

from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from mmret.errors import MmretError


@dataclass(frozen=True)
class ItemView:
    index: int  # 1..K (0 is the evaluation transform, the plain cache)
    seed: int = 0  # seeds the random crops of every view
    hflip: bool = True  # random horizontal flips too

    def __post_init__(self) -> None:
        if self.index < 1:
            raise MmretError(f"an augmented view is numbered from 1, got {self.index}")

    def spec(self) -> dict:
        return {"transform": "train", **asdict(self)}

    def loader(self, encoder: Any) -> Callable[[str], torch.Tensor]:
        return SeededLoader(encoder.item_loader(train=True, hflip=self.hflip), self.seed, self.index)


class SeededLoader:
    """path -> input tensor through a random transform, with the draws seeded by (seed, view, path):
    picklable, for DataLoader workers, and the same in whichever worker runs it."""

    def __init__(self, load: Any, seed: int, view: int):
        self.load, self.seed, self.view = load, seed, view

    def reading(self, roots: Any) -> "SeededLoader":
        """The same loader reading from `roots` (see `mmret.modalities.base.ItemLoader`)."""
        return SeededLoader(self.load.reading(roots), self.seed, self.view)

    def __call__(self, path: str) -> torch.Tensor:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(f"{self.seed}/{self.view}/{path}".encode()))
            return self.load(path)
