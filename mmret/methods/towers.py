"""What the methods that adapt the towers share: loading the two towers, their input pipelines,
and the model (adapted encoder + projection head on each side).

`--model clip-b32` takes both towers from one CLIP, whose projected embeddings already share a
space: no head when the embedding size is CLIP's projection width, and the temperature starts at
CLIP's trained value (logit scale 100). `--vision ENC --text ENC` pairs two experts, each followed
by an input norm and a projection head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from mmret.adapters import apply_peft, set_grad_checkpointing
from mmret.models import DualEncoder, ProjectionHead
from mmret.models.heads import InputNorm
from mmret.models.temperature import build_temperature
from mmret.models.towers import EncoderTower

CLIP_TEMPERATURE = 0.01  # CLIP's logit scale ends training at its cap, 100


@dataclass
class Towers:
    image: nn.Module  # ImageEncoder
    text: nn.Module  # TextEncoder
    cached: str | None = None  # the side that stays frozen and is read from the feature cache: image | text


def frozen_side(cfg: Any) -> str | None:
    """The tower that `--tower` leaves frozen (its outputs can then be cached), if any."""
    if cfg.method.method == "full" or cfg.method.tower == "both":
        return None
    return "image" if cfg.method.tower == "text" else "text"


def load_towers(cfg: Any, run_dir: Any = None) -> Towers:
    from mmret.encoders import load_image_encoder, load_text_encoder

    vision = cfg.encoders.model or cfg.encoders.vision
    text = cfg.encoders.model or cfg.encoders.text
    return Towers(load_image_encoder(vision), load_text_encoder(text, max_length=cfg.encoders.max_length),
                  frozen_side(cfg))


def tower_inputs(cfg: Any, towers: Towers, tables: Any) -> tuple[Any, Any, Any]:
    """(training transform, evaluation transform, tokenize) from the towers' own preprocessing."""
    from mmret.pairs import mentions_sides

    hflip = cfg.train.hflip
    if hflip is None:
        hflip = tables is not None and not mentions_sides(tables.captions["caption"].tolist())
    return towers.image.transform(train=True, hflip=hflip), towers.image.transform(), towers.text.tokenize


def _head(encoder: nn.Module, m: Any) -> nn.Module | None:
    if encoder.pooling == "proj" and encoder.dim == m.embed_dim:
        return None  # a CLIP tower already ends in the shared space
    return nn.Sequential(InputNorm(encoder.dim), ProjectionHead(encoder.dim, m.embed_dim, m.head_layers,
                                                                m.head_hidden, m.dropout))


def build_tower_model(cfg: Any, towers: Towers, method: str) -> DualEncoder:
    """Adapt the towers with `method` (in place) and join them with heads into a dual encoder.

    A tower that stays frozen and is read from the feature cache (`towers.cached`) is not part of
    the model: only its head is, over the cached pooled features."""
    m = cfg.method
    sides = []
    for side, encoder in (("image", towers.image), ("text", towers.text)):
        head = _head(encoder, m)
        if side == towers.cached:
            sides.append(head if head is not None else nn.Identity())
            continue
        apply_peft(encoder, method, m)
        if cfg.train.grad_checkpointing:
            set_grad_checkpointing(encoder, True)
        sides.append(EncoderTower(encoder, head))
    clip = all(_head(enc, m) is None for enc in (towers.image, towers.text))
    temperature = build_temperature(m.temperature, CLIP_TEMPERATURE if clip else m.init_temperature)
    return DualEncoder(sides[0], sides[1], m.embed_dim, temperature)


def register_tower_method(name: str, help: str, lr: float):
    """Register `name` as a method that adapts the towers with `apply_peft(..., name, ...)`."""
    from mmret.methods import register_method

    def build(cfg: Any, towers: Towers) -> DualEncoder:
        return build_tower_model(cfg, towers, name)

    register_method(name, help=help, inputs="pixels", lr=lr, context=load_towers, inputs_for=tower_inputs)(build)
    return build
