"""What the methods that train over cached frozen-tower outputs share (heads, bridge, zeroshot).

Both towers stay frozen and never run in training: their outputs are computed once into the
feature cache (`mmret.features`) and read back memory-mapped. The towers are opened on the meta
device (shapes, preprocessing and the spec that names the cache, no weights); a tower gets its
weights only when something must be encoded: a cache that is not complete yet, or a search query.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from mmret.data.pairs import split_tables
from mmret.data.prepared import run_tables
from mmret.encoders import load_text_encoder, load_tower
from mmret.features import CAPTIONS, FeatureSource, ensure_features
from mmret.methods.base import SIDES, FeatureDims, FrozenPart, Inputs, Method


@dataclass
class FeatureContext:
    """The two frozen towers (built without weights until needed) and the widths of their outputs."""

    item: nn.Module  # item tower (a picture or a sound tower)
    text: nn.Module
    loaded: dict[str, nn.Module] = field(default_factory=dict)  # side -> the tower with weights, on its device

    @property
    def dims(self) -> FeatureDims:
        return FeatureDims(self.item.dim, self.item.token_dim, self.text.dim)

    def tower(self, side: str, device: torch.device) -> nn.Module:
        """The tower of `side` with its weights, on `device` (loaded on first use)."""
        if side not in self.loaded:
            frozen = self.item if side == "item" else self.text
            self.loaded[side] = frozen.with_weights().to(device).eval()
        return self.loaded[side]


def open_frozen_towers(cfg: Any, item: str, text: str) -> FeatureContext:
    """Both towers of a run on the meta device, the item tower of the run's modality."""
    return FeatureContext(load_tower(item, cfg.data.modality, meta=True),
                          load_text_encoder(text, max_length=cfg.encoders.max_length, meta=True))


class FeaturesMethod(Method):
    """A method whose model reads cached pooled (or, with `item_tokens`, token) features."""

    item_tokens = False  # read the item tower's token states (bridge), not its pooled output
    sample_size = FeatureSource.sample_size

    def open(self, cfg: Any, dataset: Any = None, run_dir: Any = None, *, weights: bool = True,
             need: tuple[str, ...] = SIDES) -> FeatureContext:
        return open_frozen_towers(cfg, cfg.encoders.item, cfg.encoders.text)

    def caches(self, ctx: FeatureContext, dataset: Any, device: torch.device, reporter: Any) -> tuple[Any, Any]:
        """The item and caption caches of the whole dataset (computed where they are missing; no
        caption cache for a gallery without captions)."""
        items = ensure_features(dataset, ctx.item, dataset.modality.plural, tokens=self.item_tokens,
                                reporter=reporter, device=device)
        if dataset.captions.empty:
            return items, None
        captions = ensure_features(dataset, ctx.text, CAPTIONS, reporter=reporter, device=device)
        return items, captions

    def sources(self, cfg: Any, ctx: FeatureContext, dataset: Any, splits: tuple[str, ...], device: torch.device,
                reporter: Any) -> list[Any]:
        items, captions = self.caches(ctx, dataset, device, reporter)
        tables = run_tables(cfg, dataset)
        return [FeatureSource(split_tables(tables, s), items, captions, self.item_tokens) for s in splits]

    def cached_sides(self, cfg: Any) -> tuple[str, ...]:
        return SIDES

    def query_loader(self, cfg: Any, ctx: FeatureContext) -> Any:
        return ctx.item.item_loader()

    def tokenizer(self, cfg: Any, ctx: FeatureContext) -> Any:
        return ctx.text.tokenize

    def standalone_tokenizer(self, cfg: Any, ctx: FeatureContext) -> Any:
        return ctx.text.standalone_tokenizer()

    def item_input(self, cfg: Any, ctx: FeatureContext) -> str:
        return ctx.item.input_name

    def frozen_tower(self, cfg: Any, ctx: FeatureContext, side: str, device: torch.device) -> tuple[nn.Module, str]:
        return ctx.tower(side, device), "tokens" if side == "item" and self.item_tokens else "pooled"

    def input_shapes(self, cfg: Any, ctx: FeatureContext, num_tokens: Callable[[nn.Module], int]) -> Inputs:
        item = (num_tokens(ctx.item), ctx.item.token_dim) if self.item_tokens else (ctx.item.dim,)
        return Inputs(item, (ctx.text.dim,))

    def frozen_parts(self, cfg: Any, ctx: FeatureContext) -> list[FrozenPart]:
        return [FrozenPart(f"{enc.modality} encoder ({enc.name}, frozen)", sum(p.numel() for p in enc.parameters()))
                for enc in (ctx.item, ctx.text)]

    def memory_notes(self, cfg: Any) -> list[str]:
        return [f"{self.name} trains from cached features: the towers never run in training and are not counted"]

    def memory_cuts(self, cfg: Any) -> list[str]:
        return [f"a smaller --embed-dim than {cfg.method.embed_dim}", "smaller towers"]
