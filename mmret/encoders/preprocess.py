"""A picture tower's preprocessing as numbers taken from the model's own config (timm's data
config, or the transformers image processor), and the transform that applies it.

`ImageTransform` maps a PIL picture to a (3, H, W) tensor: resize, centre crop and normalise for
evaluation; a random resized crop and (unless captions say left or right) a flip for training.

The resize rule (`ResizeCrop`) is torchvision's resize of the shorter side and centre crop, computed
for the crop alone: the same pixels reach the model, but a thin picture (1 x 20,000) no longer
becomes size x (size x 20,000) on the way, so memory is bounded by the model's input size and the
picture (whose size `mmret.modalities.image` bounds by its header), never by its aspect ratio.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmret.encoders.base import quiet_loading, size_pair
from mmret.errors import MmretError

_logger = logging.getLogger(__name__)

_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize, crop and normalise, as numbers taken from the model's own preprocessing config."""

    size: tuple[int, int]  # (H, W) fed to the model
    resize: int | tuple[int, int]  # shortest edge, or (H, W) to squash to, before the centre crop
    interpolation: str  # bicubic | bilinear | ...
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    origin: str = field(default="", compare=False)  # where the numbers came from (for logs)
    note: str = field(default="", compare=False)  # worth telling the user when pictures are encoded with it

    def numbers(self) -> dict:
        d = asdict(self)
        d.pop("origin")
        d.pop("note")
        return d

    def resized(self, image_size: int) -> "ImagePreprocess":
        """The same recipe at another square input size, keeping the resize/crop ratio."""
        if isinstance(self.resize, int):
            resize: int | tuple[int, int] = round(self.resize * image_size / self.size[0])
        else:
            resize = tuple(round(r * image_size / s) for r, s in zip(self.resize, self.size))
        return ImagePreprocess((image_size, image_size), resize, self.interpolation, self.mean, self.std,
                               f"{self.origin}, resized to {image_size}", self.note)


PLAIN_RESIZE = 16  # a resized picture up to this many times the crop is resized whole (at most 4 MB at 224)


class ResizeCrop:
    """PIL picture -> its shorter side resized to `size` (the longer in proportion, as `T.Resize(size)`
    computes it), then the centre `crop` (H, W) of that (as `T.CenterCrop`). A picture whose resized
    whole is at most `PLAIN_RESIZE` times the crop (any aspect ratio up to about 16:1) takes exactly
    torchvision's steps. A thinner one is computed for the crop alone: the horizontal pass over the
    rows the vertical pass reads, then the vertical pass, each over PIL's box of the region (the passes
    and order of PIL's own resize, so the pixels are those of resizing the whole and cropping, up to
    the float rounding of the box: a value off by one in about 1 in 10,000). Memory is then bounded by
    the crop and the picture, never by the resized whole: 1 x 20,000 pixels resized to a shorter side
    of 256 would be 256 x 5,120,000. Picklable."""

    def __init__(self, size: int, crop: tuple[int, int], interpolation: Any):
        self.size, self.crop, self.interpolation = size, tuple(crop), interpolation

    def _resized(self, w: int, h: int) -> tuple[int, int]:
        if w <= h:
            return self.size, int(self.size * h / w)
        return int(self.size * w / h), self.size

    def __call__(self, img: Any) -> Any:
        import numpy as np
        from PIL import Image
        from torchvision.transforms import functional as F

        (w, h), (ch, cw) = img.size, self.crop
        wr, hr = self._resized(w, h)
        if wr * hr <= PLAIN_RESIZE * ch * cw or ch > hr or cw > wr:  # torchvision's own steps, to the bit
            return F.center_crop(F.resize(img, self.size, self.interpolation, antialias=True), list(self.crop))
        resample = F.pil_modes_mapping[self.interpolation]
        top, left = int(round((hr - ch) / 2.0)), int(round((wr - cw) / 2.0))
        sx, sy = w / wr, h / hr
        if self.interpolation.value == "nearest":  # each output pixel is one source pixel: pick them
            rows = np.minimum(h - 1, ((top + np.arange(ch) + 0.5) * sy).astype(np.int64))
            cols = np.minimum(w - 1, ((left + np.arange(cw) + 0.5) * sx).astype(np.int64))
            return Image.fromarray(np.asarray(img)[rows][:, cols])
        reach = 3 * max(sy, 1.0) + 2  # the widest filter's support (Lanczos: 3), in source rows
        r0, r1 = max(0, math.floor(top * sy - reach)), min(h, math.ceil((top + ch) * sy + reach))
        band = img if (r0, r1) == (0, h) else img.crop((0, r0, w, r1))
        wide = band.resize((cw, r1 - r0), resample, box=(left * sx, 0, (left + cw) * sx, r1 - r0))
        return wide.resize((cw, ch), resample, box=(0, top * sy - r0, cw, (top + ch) * sy - r0))

    def __repr__(self) -> str:
        return f"ResizeCrop(size={self.size}, crop={self.crop}, interpolation={self.interpolation.value})"


def resize_and_crop(resize: int | tuple[int, int], crop: tuple[int, int], interpolation: Any) -> list:
    """The evaluation steps: the shorter side to `resize` and the centre crop, as one `ResizeCrop`;
    or a squash to the (H, W) pair `resize` (bounded by the picture already), then the centre crop."""
    from torchvision import transforms as T

    if isinstance(resize, int):
        return [ResizeCrop(resize, crop, interpolation)]
    return [T.Resize(resize, interpolation=interpolation, antialias=True), T.CenterCrop(crop)]


def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode

    try:
        return InterpolationMode(name)
    except ValueError:
        raise MmretError(f"unsupported interpolation {name!r} in the model's preprocessing config") from None


class ImageTransform:
    """PIL RGB image -> (3, H, W) float tensor. Picklable, so DataLoader workers can run it.

    Evaluation: resize, centre crop, normalise. Training adds a random resized crop and
    (unless `hflip=False`, e.g. for captions that say "left of") a horizontal flip.
    """

    def __init__(self, pre: ImagePreprocess, train: bool = False, hflip: bool = True,
                 scale: tuple[float, float] = (0.5, 1.0)):
        from torchvision import transforms as T

        self.pre, self.train, self.scale = pre, train, scale
        interp = _interpolation(pre.interpolation)
        if train:
            steps = [T.RandomResizedCrop(pre.size, scale=scale, interpolation=interp, antialias=True)]
            steps += [T.RandomHorizontalFlip()] if hflip else []
        else:
            steps = resize_and_crop(pre.resize, pre.size, interp)
        self.pipeline = T.Compose(steps + [T.ToTensor(), T.Normalize(pre.mean, pre.std)])

    def __call__(self, img) -> torch.Tensor:
        return self.pipeline(img)

    @property
    def source_side(self) -> int:
        """Pixels the picture needs on its shorter side so that nothing is upsampled: the resize
        target, or for training's random crops (down to `scale[0]` of the area) the input size over
        the square root of that."""
        if not self.train:
            return max(self.pre.resize) if isinstance(self.pre.resize, tuple) else int(self.pre.resize)
        return math.ceil(max(self.pre.size) / math.sqrt(self.scale[0]))

    def __repr__(self) -> str:
        return f"ImageTransform(train={self.train}, {self.pipeline})"


def preprocess_from_timm(model: nn.Module) -> ImagePreprocess:
    """timm's data config: input size, crop_pct (resize = floor(size / crop_pct)), interpolation, mean, std."""
    import timm

    cfg = timm.data.resolve_model_data_config(model)
    size = size_pair(cfg["input_size"])
    crop_pct, mode = cfg.get("crop_pct") or 1.0, cfg.get("crop_mode") or "center"
    scaled = tuple(math.floor(s / crop_pct) for s in size)
    if mode == "squash":
        resize: int | tuple[int, int] = scaled
    else:
        if mode != "center":
            _logger.warning("timm crop_mode %r is approximated by a centre crop", mode)
        resize = scaled[0] if size[0] == size[1] else scaled
    return ImagePreprocess(size, resize, str(cfg["interpolation"]), tuple(cfg["mean"]), tuple(cfg["std"]),
                           "timm data config")


def _processor_class_name(model_type: str) -> str | None:
    """The image processor transformers pairs with a model type (PIL flavour when there are two)."""
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING_NAMES

    names = IMAGE_PROCESSOR_MAPPING_NAMES.get(model_type)
    if isinstance(names, dict):  # transformers 5: {"pil": ..., "torchvision": ...}
        return names.get("pil") or names.get("torchvision")
    if isinstance(names, (tuple, list)):  # transformers 4: (slow, fast)
        return next((n for n in names if n), None)
    return names


# What the published checkpoints' preprocessor_config.json holds where it differs from the processor
# class's own defaults (facebook/dinov2-*: ImageNet statistics, resize 256 then crop 224, as DINOv2's
# evaluation transform), for folders that come without that file.
_PUBLISHED_PROCESSORS: dict[str, dict[str, Any]] = {
    "dinov2": dict(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, do_center_crop=True,
                   image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], resample=3),
}


def _hf_image_processor(folder: Path, model_type: str) -> tuple[Any, str]:
    """The folder's image processor, or the published settings / class defaults for its model type."""
    import transformers

    if (folder / "preprocessor_config.json").is_file():
        with quiet_loading():
            return transformers.AutoImageProcessor.from_pretrained(folder), "preprocessor_config.json"
    name = _processor_class_name(model_type)
    if not name or not hasattr(transformers, name):
        raise MmretError(f"{folder} has no preprocessor_config.json and transformers knows no image processor "
                         f"for model type {model_type!r}; add a preprocessor_config.json to the folder")
    if model_type in _PUBLISHED_PROCESSORS:
        return (getattr(transformers, name)(**_PUBLISHED_PROCESSORS[model_type]),
                f"{name} with the published {model_type} settings (defaults: no preprocessor_config.json in the "
                "folder)")
    return getattr(transformers, name)(), f"{name} defaults (no preprocessor_config.json in the folder)"


def preprocess_from_hf(folder: Path, model_type: str) -> ImagePreprocess:
    processor, origin = _hf_image_processor(folder, model_type)
    d = processor.to_dict()
    if d.get("do_rescale", True) and abs(d.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        raise MmretError(f"{folder}: image processor rescale_factor {d['rescale_factor']} is not 1/255")
    size = d.get("size") or {}
    crop = size_pair((d["crop_size"]["height"], d["crop_size"]["width"])) if d.get("do_center_crop") else None
    if "shortest_edge" in size and size["shortest_edge"]:
        resize: int | tuple[int, int] = int(size["shortest_edge"])
        crop = crop or (resize, resize)  # varying aspect ratios cannot be batched: crop a square
    elif size.get("height") and size.get("width"):
        resize = (int(size["height"]), int(size["width"]))
        crop = crop or resize
    else:
        raise MmretError(f"{folder}: unsupported image processor size {size}; expected shortest_edge or height/width")
    mean = tuple(d.get("image_mean")) if d.get("do_normalize", True) else (0.0, 0.0, 0.0)
    std = tuple(d.get("image_std")) if d.get("do_normalize", True) else (1.0, 1.0, 1.0)
    interp = _PIL_RESAMPLE.get(int(d.get("resample", 3)), "bicubic")
    note = ""
    if "defaults" in origin:
        note = (f"{folder.name}: no preprocessor_config.json; using {origin.split(' (')[0]}: resize {resize}, "
                f"crop {crop}, {interp}, mean {mean}, std {std}")
        _logger.info(note)
    return ImagePreprocess(crop, resize, interp, mean, std, origin, note)
