"""Picture towers: timm models and transformers vision models (CLIP's with their projection),
built with their weights or, for shapes only, on the meta device.

`ImageEncoder.forward(pixels (B, 3, H, W)) -> EncoderOutput(pooled (B, D), tokens (B, T, Dt))`.
`item_loader()` gives the picklable path -> (3, H, W) function DataLoader workers run: decode the
file (`mmret.modalities.image`), then the model's own preprocessing.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import torch
from torch import nn

from mmret.encoders.base import (
    EncoderOutput,
    Tower,
    accepts,
    check_pooling,
    hf_config,
    is_clip,
    is_dual,
    load_hf,
    size_pair,
)
from mmret.encoders.hub import ModelSource
from mmret.encoders.preprocess import ImagePreprocess, ImageTransform, preprocess_from_hf, preprocess_from_timm
from mmret.encoders.registry import register_family
from mmret.errors import MmretError
from mmret.modalities.base import ItemLoader
from mmret.modalities.image import load_rgb

_logger = logging.getLogger(__name__)


class ImageEncoder(Tower):
    """A frozen picture tower; subclasses implement `forward`."""

    modality = "image"
    input_name = "pixels"  # the keyword `forward` takes a batch of items by

    def __init__(self, model: nn.Module, source: ModelSource, pre: ImagePreprocess, dim: int,
                 token_dim: int, pooling: str):
        super().__init__(model, source)
        self.preprocessing, self.pooling = pre, pooling
        self.dim, self.token_dim = dim, token_dim  # pooled width D, token width Dt

    @property
    def image_size(self) -> tuple[int, int]:
        return self.preprocessing.size

    @property
    def mean(self) -> tuple[float, float, float]:
        return self.preprocessing.mean

    @property
    def std(self) -> tuple[float, float, float]:
        return self.preprocessing.std

    @property
    def spec(self) -> dict:
        """Everything that changes the features; the cache key hashes it."""
        return {"modality": "image", "library": self.source.library, "model": self.source.id,
                "revision": self.source.revision, "class": type(self.model).__name__,
                "pooling": self.pooling, **self.preprocessing.numbers()}

    @property
    def notes(self) -> list[str]:
        return [self.preprocessing.note] if self.preprocessing.note else []

    def transform(self, train: bool = False, hflip: bool = True,
                  scale: tuple[float, float] = (0.5, 1.0)) -> ImageTransform:
        """PIL picture -> (3, H, W) tensor."""
        return ImageTransform(self.preprocessing, train=train, hflip=hflip, scale=scale)

    def item_loader(self, train: bool = False, hflip: bool = True) -> ItemLoader:
        """Picture file -> (3, H, W) tensor, decoded and preprocessed (picklable, for workers); big
        JPEGs are decoded at a reduced scale that still covers what the transform needs."""
        transform = self.transform(train=train, hflip=hflip)
        return ItemLoader(functools.partial(load_rgb, draft=transform.source_side), transform)

    def blank_inputs(self, n: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """`forward`'s keyword inputs for `n` blank pictures (for shapes and batch-size probes)."""
        return {"pixels": torch.zeros(n, 3, *self.image_size, device=device)}

    @property
    def num_tokens(self) -> int:
        """T of `tokens`, found with one forward pass of a blank picture."""
        with torch.inference_mode():
            return self(**self.blank_inputs(1, self.device)).tokens.shape[1]

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, token_dim={self.token_dim}, image_size={self.image_size}"


class TimmImageEncoder(ImageEncoder):
    """A timm model: tokens from `forward_features`, pooled by the model's own head (pre-logits)."""

    def forward(self, pixels: torch.Tensor) -> EncoderOutput:
        feats = self.model.forward_features(pixels)  # (B, T, Dt), or (B, C, h, w) for CNNs
        pooled = self.model.forward_head(feats, pre_logits=True)  # (B, D)
        tokens = feats.flatten(2).transpose(1, 2) if feats.ndim == 4 else feats  # (B, T, Dt)
        return EncoderOutput(pooled, tokens)


class TransformersImageEncoder(ImageEncoder):
    """A transformers vision model: tokens are `last_hidden_state`; pooled is the CLIP projection
    (`proj`), the first token (`cls`) or the mean of all tokens (`mean`)."""

    def __init__(self, *args: Any, interpolate: bool = False, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.interpolate = interpolate  # run at a size other than the position embeddings were trained for

    def forward(self, pixels: torch.Tensor) -> EncoderOutput:
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        out = self.model(pixel_values=pixels, **kwargs)
        tokens = out.last_hidden_state  # (B, T, Dt)
        if self.pooling == "proj":
            pooled = out.image_embeds  # (B, D) projected
        elif self.pooling == "mean":
            pooled = tokens.mean(dim=1)
        else:
            pooled = tokens[:, 0]
        return EncoderOutput(pooled, tokens)


def _create_timm(source: ModelSource, weights: bool, **kwargs: Any) -> nn.Module:
    import timm

    if source.folder is not None:
        name = f"local-dir:{source.folder}"
    else:
        name = source.id
        if source.weights is not None:
            kwargs["pretrained_cfg_overlay"] = {"file": str(source.weights)}
    try:
        with torch.device("meta") if not weights else torch.device("cpu"):
            try:
                return timm.create_model(name, pretrained=weights, **kwargs)
            except TypeError:  # CNNs take no img_size: any input size works as is
                if kwargs.pop("img_size", None) is None:
                    raise
                return timm.create_model(name, pretrained=weights, **kwargs)
    except (RuntimeError, ValueError, KeyError, OSError, TypeError) as e:
        raise MmretError(f"cannot build timm model {source.id!r}: {str(e).splitlines()[0]}") from None


def timm_image_encoder(source: ModelSource, image_size: int | None, pooling: str | None,
                       weights: bool = True) -> ImageEncoder:
    kwargs: dict[str, Any] = {"num_classes": 0}
    if image_size:
        kwargs["img_size"] = image_size
    if pooling:
        kwargs["global_pool"] = {"cls": "token", "mean": "avg"}.get(pooling, pooling)
    model = _create_timm(source, weights, **kwargs)
    pre = preprocess_from_timm(model)
    if image_size and pre.size != (image_size, image_size):
        pre = pre.resized(image_size)
    pool = getattr(model, "global_pool", None)
    pool = pool if isinstance(pool, str) else type(pool).__name__
    dim = getattr(model, "head_hidden_size", None) or model.num_features
    return TimmImageEncoder(model, source, pre, dim, model.num_features, f"timm:{pool}")


def _architecture_preprocess(source: ModelSource) -> ImagePreprocess:
    """For a tower built from a published config alone: the input size, standard numbers otherwise."""
    side = source.input_size or 224
    return ImagePreprocess((side, side), side, "bicubic", (0.5,) * 3, (0.5,) * 3, "architecture only")


def hf_image_encoder(source: ModelSource, image_size: int | None, pooling: str | None,
                     weights: bool = True) -> ImageEncoder:
    config = hf_config(source)
    if is_clip(source.config, "vision"):
        from transformers import CLIPVisionModelWithProjection  # seconds to import: only for CLIP towers

        vision = config.vision_config if source.config["model_type"] == "clip" else config
        vision.projection_dim = getattr(config, "projection_dim", vision.projection_dim)  # kept on the top config
        model = load_hf(CLIPVisionModelWithProjection, source, vision, weights)
        pooling, processor_type = pooling or "proj", "clip"
    elif is_dual(source.config):
        raise MmretError(f"{source.id}: model type {source.config['model_type']!r} has two towers and only "
                         "CLIP's are supported; pass a vision-only model")
    else:
        from transformers import AutoModel

        model, vision = load_hf(AutoModel, source, config, weights), config
        if not accepts(model, "pixel_values"):
            raise MmretError(f"{source.id} ({source.config['model_type']}) is not an image model")
        pooling, processor_type = pooling or "cls", source.config["model_type"]
    check_pooling(pooling, model, "visual_projection", source.id)
    pre = preprocess_from_hf(source.folder, processor_type) if source.folder else _architecture_preprocess(source)
    if image_size:
        pre = pre.resized(image_size)
    dim = vision.projection_dim if pooling == "proj" else vision.hidden_size
    native = getattr(vision, "image_size", None)
    interpolate = bool(native) and size_pair(native) != pre.size and accepts(model, "interpolate_pos_encoding")
    return TransformersImageEncoder(model, source, pre, dim, vision.hidden_size, pooling, interpolate=interpolate)


def build_image_encoder(source: ModelSource, weights: bool = True, image_size: int | None = None,
                        pooling: str | None = None) -> ImageEncoder:
    build = timm_image_encoder if source.library == "timm" else hf_image_encoder
    return build(source, image_size, pooling, weights)


register_family("image", build_image_encoder)
