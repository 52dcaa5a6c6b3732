"""The methods that adapt pretrained towers and run them at every step: `lora`, `prefix`,
`adapter` and `full`.

`--model clip-b32` takes both towers from one CLIP, whose projected embeddings already share a
space: no head when the embedding size is CLIP's projection width, and the temperature starts at
CLIP's trained value (logit scale 100). `--vision ENC --text ENC` (or `--audio ENC`) pairs two experts, each followed
by an input norm and a projection head. `--tower text|vision` adapts one tower; the other stays
frozen, never runs in training and is read from the feature cache.

Each method is a `TowerMethod` that says how it puts its parameters inside a bare tower
(`inject`, with the layers of `mmret.models.tuners`) and whether the tower's own weights train.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from mmret.data.pairs import FileSource, mentions_sides, split_tables
from mmret.data.prepared import run_tables
from mmret.encoders import load_text_encoder, load_tower
from mmret.features import CAPTIONS, FeatureSource, ensure_features
from mmret.methods.base import SIDES, FrozenPart, Inputs, Method
from mmret.methods.config import (
    AdapterConfig,
    FullConfig,
    LoraConfig,
    PrefixConfig,
    TowerConfig,
)
from mmret.methods.registry import register_method
from mmret.modalities import get_modality
from mmret.models import DualEncoder, ProjectionHead
from mmret.models.heads import InputNorm
from mmret.models.temperature import build_temperature
from mmret.models.towers import EncoderTower
from mmret.models.tuners import covers, set_grad_checkpointing, tune

_logger = logging.getLogger(__name__)

CLIP_TEMPERATURE = 0.01  # CLIP's logit scale ends training at its cap, 100


@dataclass
class Towers:
    item: nn.Module  # the item tower (picture or sound)
    text: nn.Module
    cached: str | None = None  # the side that stays frozen and is read from the feature cache: item | text
    loaded: dict[str, nn.Module] | None = None  # the frozen side with weights, for queries


class TowerMethod(Method):
    """Adapt the pretrained towers in place and train them with a head on each side."""

    lr = 1e-4
    config = TowerConfig
    runs_towers = True
    checkpointable = True
    train_base = False  # the towers' own weights train too (full fine-tuning)

    # -- what each method puts inside a tower
    def inject(self, model: nn.Module, modality: str, m: Any) -> None:
        """Put this method's trainable parameters inside a bare transformers/timm tower."""

    def prepare(self, encoder: nn.Module, m: Any) -> None:
        """Adjust the wrapped tower before `inject` (prompt tokens shorten the text)."""

    def tune_model(self, model: nn.Module, modality: str, m: Any) -> nn.Module:
        """`inject` into a bare tower, freezing its own weights unless they train; in place."""
        return tune(model, self.name, lambda bare: self.inject(bare, modality, m), self.train_base)

    def adapt(self, encoder: nn.Module, m: Any) -> nn.Module:
        """Adapt a loaded tower in place when `m.tower` covers it (a tower it does not cover stays
        frozen). Returns the encoder, whose forward still gives `EncoderOutput(pooled, tokens, mask)`."""
        if not covers(self.adapted_tower(m), encoder.modality):
            _logger.info("%s tower %s stays frozen (--tower %s)", encoder.modality, encoder.name, m.tower)
            return encoder
        self.prepare(encoder, m)
        self.tune_model(encoder.model, encoder.modality, m)
        trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
        _logger.info("%s tower %s: %s, %d trainable parameters", encoder.modality, encoder.name, self.name, trainable)
        return encoder

    def adapted_tower(self, m: Any) -> str:
        return m.tower

    # -- Method
    def cached_sides(self, cfg: Any) -> tuple[str, ...]:
        tower = self.adapted_tower(cfg.method)
        return () if tower == "both" else ("item",) if tower == "text" else ("text",)

    def open(self, cfg: Any, dataset: Any = None, run_dir: Any = None, *, weights: bool = True,
             need: tuple[str, ...] = SIDES) -> Towers:
        """Both towers; a side that stays frozen, or that is not needed, is built without weights."""
        cached = self.cached_sides(cfg)
        real = {side: weights and side in need and side not in cached for side in SIDES}
        item = cfg.encoders.model or cfg.encoders.item
        text = cfg.encoders.model or cfg.encoders.text
        return Towers(load_tower(item, cfg.data.modality, meta=not real["item"]),
                      load_text_encoder(text, max_length=cfg.encoders.max_length, meta=not real["text"]),
                      cached[0] if cached else None, {})

    def sources(self, cfg: Any, ctx: Towers, dataset: Any, splits: tuple[str, ...], device: torch.device,
                reporter: Any) -> list[Any]:
        tables = run_tables(cfg, dataset)
        hflip = cfg.train.hflip
        if hflip is None:
            hflip = not mentions_sides(tables.captions["caption"].tolist())
        frozen = self._frozen_caches(ctx, dataset, device, reporter)
        train_load, eval_load = ctx.item.item_loader(train=True, hflip=hflip), ctx.item.item_loader()
        sources = []
        for split in splits:
            part = split_tables(tables, split)
            cached = FeatureSource(part, *frozen) if frozen else None
            sources.append(FileSource(part, train_load, eval_load, ctx.text.tokenize, cfg.train.seed,
                                      cfg.train.workers, device.type == "cuda", cached, ctx.cached))
        return sources

    @staticmethod
    def _frozen_caches(ctx: Towers, dataset: Any, device: torch.device, reporter: Any) -> tuple | None:
        """(item features, None) or (None, caption features) of the tower that stays frozen."""
        if ctx.cached == "item":
            return ensure_features(dataset, ctx.item, dataset.modality.plural, reporter=reporter, device=device), None
        if ctx.cached == "text":  # a gallery without captions has none to read
            captions = None if dataset.captions.empty else ensure_features(dataset, ctx.text, CAPTIONS,
                                                                            reporter=reporter, device=device)
            return None, captions
        return None

    def build(self, cfg: Any, ctx: Towers) -> DualEncoder:
        """Adapt the towers (in place) and join them with heads into a dual encoder. A tower that
        stays frozen and is read from the feature cache is not part of the model: only its head is,
        over the cached pooled features."""
        m = cfg.method
        sides = []
        for side, encoder in (("item", ctx.item), ("text", ctx.text)):
            head = _head(encoder, m)
            if side == ctx.cached:
                sides.append(head if head is not None else nn.Identity())
                continue
            self.adapt(encoder, m)
            if cfg.train.grad_checkpointing:
                set_grad_checkpointing(encoder, True)
            sides.append(EncoderTower(encoder, head))
        clip = all(_head(enc, m) is None for enc in (ctx.item, ctx.text))
        temperature = build_temperature(m.temperature, CLIP_TEMPERATURE if clip else m.init_temperature)
        return DualEncoder(sides[0], sides[1], m.embed_dim, temperature)

    def query_loader(self, cfg: Any, ctx: Towers) -> Any:
        return ctx.item.item_loader()

    def tokenizer(self, cfg: Any, ctx: Towers) -> Any:
        return ctx.text.tokenize

    def standalone_tokenizer(self, cfg: Any, ctx: Towers) -> Any:
        return ctx.text.standalone_tokenizer()

    def item_input(self, cfg: Any, ctx: Towers) -> str:
        return ctx.item.input_name

    def frozen_tower(self, cfg: Any, ctx: Towers, side: str, device: torch.device) -> tuple[nn.Module, str] | None:
        """The tower that stays frozen runs once on a query; the model reads its pooled output."""
        if side != ctx.cached:
            return None
        if side not in ctx.loaded:
            ctx.loaded[side] = (ctx.item if side == "item" else ctx.text).with_weights().to(device).eval()
        return ctx.loaded[side], "pooled"

    def input_shapes(self, cfg: Any, ctx: Towers, num_tokens: Callable[[nn.Module], int]) -> Inputs:
        text = ctx.text
        if ctx.cached == "item":
            item_row: tuple[int, ...] = (ctx.item.dim,)
        else:
            item_row = tuple(ctx.item.blank_inputs(1, "meta")[ctx.item.input_name].shape[1:])
        return Inputs(item_row, (text.dim,) if ctx.cached == "text" else None, text.max_length,
                      text.model.config.vocab_size)

    def frozen_parts(self, cfg: Any, ctx: Towers) -> list[FrozenPart]:
        if ctx.cached is None:
            return []
        enc = ctx.item if ctx.cached == "item" else ctx.text
        label = f"{enc.modality} encoder ({enc.name}, frozen, cached)"
        return [FrozenPart(label, sum(p.numel() for p in enc.parameters()))]

    def memory_notes(self, cfg: Any) -> list[str]:
        cached = self.cached_sides(cfg)
        if not cached:
            return []
        frozen = get_modality(cfg.data.modality).noun if cached == ("item",) else "text"
        return [f"the frozen {frozen} tower never runs in training: its outputs come from the feature cache "
                "and it is not counted"]

    def memory_cuts(self, cfg: Any) -> list[str]:
        cuts = ["adapting one tower (--tower text)"] if self.adapted_tower(cfg.method) == "both" else []
        return cuts + ["cached features (--method bridge or heads: the towers never run in training)",
                       "a shorter --max-length", "smaller towers"]


def _head(encoder: nn.Module, m: Any) -> nn.Module | None:
    if encoder.pooling == "proj" and encoder.dim == m.embed_dim:
        return None  # a CLIP tower already ends in the shared space
    return nn.Sequential(InputNorm(encoder.dim), ProjectionHead(encoder.dim, m.embed_dim, m.head_layers,
                                                                m.head_hidden, m.dropout))


# ---------------------------------------------------------------------------- the four methods


class LoraMethod(TowerMethod):
    """LoRA (peft) on the attention projections; see `mmret.models.tuners.lora` for the names.

    The two recipes people copy are `--recipe text-r8` and `--recipe both-r64` (`mmret.methods.config.RECIPES`)."""

    name = "lora"
    lr = 1e-4
    config = LoraConfig

    def inject(self, model: nn.Module, modality: str, m: LoraConfig) -> None:
        from mmret.models.tuners.lora import add_lora

        add_lora(model, m.rank, m.alpha, m.lora_dropout, m.targets)

    def memory_cuts(self, cfg: Any) -> list[str]:
        return [f"a lower --rank than {cfg.method.rank}"] + super().memory_cuts(cfg)


class PrefixMethod(TowerMethod):
    """Learned prompt tokens at the input of every block (deep prompt tuning; see
    `mmret.models.tuners.prompts` for why this is our own small module rather than peft's)."""

    name = "prefix"
    lr = 1e-3
    config = PrefixConfig

    def prepare(self, encoder: nn.Module, m: PrefixConfig) -> None:
        """Text prompts take positions: lower `max_length` so captions and prompts fit (raises first)."""
        from mmret.models.tuners.prompts import prompted_text_length

        if encoder.modality != "text":
            return
        length = prompted_text_length(encoder, m.prefix_tokens)
        if length < encoder.max_length:
            _logger.warning("%s reads at most %d positions: max_length lowered from %d to %d to make room for %d "
                            "prompt tokens", encoder.name, length + m.prefix_tokens, encoder.max_length, length,
                            m.prefix_tokens)
            encoder.max_length = length

    def inject(self, model: nn.Module, modality: str, m: PrefixConfig) -> None:
        from mmret.models.tuners.prompts import add_prompts

        add_prompts(model, modality, m.prefix_tokens)


class AdapterMethod(TowerMethod):
    """Bottleneck adapters after the attention and the MLP of every block (`--adapter-dim`)."""

    name = "adapter"
    lr = 5e-4
    config = AdapterConfig

    def inject(self, model: nn.Module, modality: str, m: AdapterConfig) -> None:
        from mmret.models.tuners.bottleneck import add_adapters

        add_adapters(model, m.adapter_dim)


class FullMethod(TowerMethod):
    """Every weight of the towers trains; the reference row of any comparison."""

    name = "full"
    lr = 1e-5
    config = FullConfig
    train_base = True

    def adapted_tower(self, m: Any) -> str:
        return "both"

    def memory_cuts(self, cfg: Any) -> list[str]:
        return ["LoRA instead of full fine-tuning (--method lora)"] + super().memory_cuts(cfg)


for _method in (LoraMethod(), PrefixMethod(), AdapterMethod(), FullMethod()):
    register_method(_method)


# ---------------------------------------------------------------------------- LoRA recipes
