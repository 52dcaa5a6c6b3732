"""The registry of frozen pretrained towers: load by preset, hub id or local folder, with each
model's own preprocessing, pooling and output shapes.

Every tower is an `nn.Module` wrapper around the library's own model (`.model`: a transformers or
timm module, so peft can put adapters inside it):

- `ImageEncoder.forward(pixels (B, 3, H, W)) -> EncoderOutput(pooled (B, D), tokens (B, T, Dt))`
- `TextEncoder.forward(input_ids (B, L), attention_mask (B, L)) -> EncoderOutput(pooled, tokens, mask)`

`forward` never turns gradients off (later methods train inside the towers); callers that only
encode wrap it in `torch.inference_mode()`. Parameters start frozen (`requires_grad=False`) and
the model in eval mode.

Where the weights come from, in the order tried:
- a preset name (`ENCODERS`, e.g. `dinov2-vits14`) stands for a hub id and a pooling;
- a local folder: transformers if its `config.json` has a `model_type`, timm if it names an
  `architecture` (what `timm.models.save_for_hf` writes) next to a weights file;
- `timm:NAME` for a timm model by name (weights from the hub, or from `weights=` a local file);
- a hub id `owner/name[@revision]`: the local Hugging Face cache first, the network only when the
  cache lacks it, with short timeouts, so an offline machine fails at once with one clear line.
A hub id and the folder it was downloaded to load through the same code.

`.spec` holds everything that changes the numbers (model id and revision or a hash of the folder's
files, pooling, image size and normalisation, text length): the feature cache key is its hash.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import nn

from mmret.errors import MmretError

_logger = logging.getLogger(__name__)

MODALITIES = ("image", "text")
DEFAULT_MAX_LENGTH = 64  # as EncoderConfig.max_length; longer than nearly every Flickr30k or COCO caption
HUB_CONNECT_TIMEOUT = 5.0  # seconds to reach the hub before giving up: never hang on a download
HUB_READ_TIMEOUT = 30.0
_CONFIG_FILES = ["*.json", "*.txt", "*.model", "1_Pooling/*"]  # configs, tokenizers, pooling
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_HASHED_SUFFIXES = (".json", ".txt", ".model") + _WEIGHT_SUFFIXES
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


class EncoderOutput(NamedTuple):
    pooled: torch.Tensor  # (B, D)
    tokens: torch.Tensor  # (B, T, Dt) token states before pooling / projection
    mask: torch.Tensor | None = None  # (B, T) 1 for real tokens (text); None for images


# ---------------------------------------------------------------------------- where weights come from


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: a local folder (or a timm name plus a weights file) and its identity."""

    id: str  # hub repo id, folder name, or timm model name
    library: str  # transformers | timm
    revision: str  # hub commit, or "sha256:..." of the local files
    folder: Path | None = None
    weights: Path | None = None  # timm by name: the weights file
    config: dict = field(default_factory=dict, compare=False)


_DIGESTS: dict[tuple, str] = {}


def _file_digest(path: Path, h: Any) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)


def files_digest(paths: list[Path], root: Path | None = None) -> str:
    """sha256 over the names and bytes of `paths`; remembered per (path, size, mtime) in-process."""
    stamp = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths)
    if stamp not in _DIGESTS:
        h = hashlib.sha256()
        for p in paths:
            h.update(str(p.relative_to(root) if root else p.name).encode() + b"\0")
            _file_digest(p, h)
        _DIGESTS[stamp] = "sha256:" + h.hexdigest()[:16]
    return _DIGESTS[stamp]


def _model_files(folder: Path) -> list[Path]:
    """Files that decide the numbers: configs, tokenizer files, and the weights transformers or
    timm would load (safetensors when present, so unused .bin copies are not hashed)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _HASHED_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if any(p.suffix == ".safetensors" for p in files):
        files = [p for p in files if p.suffix not in (".bin", ".pth", ".pt")]
    return files


def _has_weights(folder: Path) -> bool:
    return any(p.suffix in _WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file())


def _read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise MmretError(f"folder {folder} holds no config.json: it is not a transformers or timm model folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MmretError(f"cannot read {path}: {e}") from None


def source_from_folder(folder: Path, hub_id: str | None = None, commit: str | None = None) -> ModelSource:
    """Recognise a model folder: transformers by `model_type`, timm by `architecture`."""
    folder = folder.expanduser().absolute()
    config = _read_config(folder)
    if "model_type" in config:
        library = "transformers"
    elif "architecture" in config:
        library = "timm"
    else:
        raise MmretError(f"{folder / 'config.json'} names neither a transformers model_type nor a timm "
                         "architecture; pass a transformers or timm model folder")
    if not _has_weights(folder):
        raise MmretError(f"folder {folder} holds no weights file (model.safetensors or pytorch_model.bin)")
    revision = commit or files_digest(_model_files(folder), folder)
    return ModelSource(hub_id or folder.name, library, revision, folder, config=config)


@contextlib.contextmanager
def _hub_timeouts() -> Iterator[None]:
    """Short connect/read timeouts on huggingface_hub's shared client (its default is none)."""
    import huggingface_hub

    session = huggingface_hub.get_session()
    old = getattr(session, "timeout", None)
    if old is None:  # not an httpx client (an older or a customised huggingface_hub): leave it be
        yield
        return
    session.timeout = type(old)(HUB_READ_TIMEOUT, connect=HUB_CONNECT_TIMEOUT)
    try:
        yield
    finally:
        session.timeout = old


def _offline_error(repo_id: str, why: str) -> MmretError:
    return MmretError(f"model {repo_id!r} is not in the local Hugging Face cache and {why}; download it on a "
                      "connected machine, or pass the path of a local model folder instead")


def _snapshot(repo_id: str, revision: str | None, local_only: bool, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                  local_files_only=local_only, etag_timeout=HUB_CONNECT_TIMEOUT))


def _download(repo_id: str, revision: str | None) -> Path:
    from huggingface_hub import constants
    from huggingface_hub import errors as hub_errors

    with contextlib.suppress(hub_errors.LocalEntryNotFoundError, OSError):
        folder = _snapshot(repo_id, revision, True, _CONFIG_FILES + ["*.safetensors", "*.bin"])
        if _has_weights(folder):
            return folder
    if constants.is_offline_mode():
        raise _offline_error(repo_id, "HF_HUB_OFFLINE is set")
    _logger.info("downloading %s from the Hugging Face Hub", repo_id)
    try:
        with _hub_timeouts():
            folder = _snapshot(repo_id, revision, False, _CONFIG_FILES + ["*.safetensors"])
            if not _has_weights(folder):  # an older repo without safetensors
                folder = _snapshot(repo_id, revision, False, _CONFIG_FILES + ["*.bin"])
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError) as e:
        raise MmretError(f"no model {repo_id!r} on the Hugging Face Hub that this machine may read "
                         f"({type(e).__name__}); check the name, or log in with `hf auth login`") from None
    except hub_errors.RevisionNotFoundError:
        raise MmretError(f"model {repo_id!r} has no revision {revision!r}") from None
    except (hub_errors.LocalEntryNotFoundError, OSError) as e:
        _logger.debug("hub download failed: %s", e)
        raise _offline_error(repo_id, "the Hub cannot be reached (offline?)") from None
    return folder


def resolve_source(name_or_path: str, weights: str | Path | None = None) -> ModelSource | None:
    """A local folder, `timm:NAME`, or a hub id (`owner/name[@revision]`) resolved to local files;
    None when the string is none of these."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return source_from_folder(path)
    if name_or_path.startswith("timm:"):
        return _timm_source(name_or_path[len("timm:"):], weights)
    looks_like_path = name_or_path.startswith((".", "/", "~")) or path.exists()
    if looks_like_path:
        raise MmretError(f"{name_or_path} is not a model folder (a folder with config.json and weights)")
    if _HUB_ID.match(name_or_path):
        repo_id, _, revision = name_or_path.partition("@")
        folder = _download(repo_id, revision or None)
        return source_from_folder(folder, hub_id=repo_id, commit=_snapshot_commit(folder))
    return None


def _snapshot_commit(folder: Path) -> str | None:
    """The commit of a hub cache snapshot (its folder name), or None for any other folder."""
    return folder.name if folder.parent.name == "snapshots" else None


def _timm_source(name: str, weights: str | Path | None) -> ModelSource:
    import timm

    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise MmretError(f"unknown timm model {name!r}; see timm.list_models()")
    if weights is not None:
        weights = Path(weights).expanduser().absolute()
        if not weights.is_file():
            raise MmretError(f"weights file {weights} does not exist")
        return ModelSource(name, "timm", files_digest([weights]), weights=weights)
    hub_id = getattr(timm.models.get_pretrained_cfg(name) or object(), "hf_hub_id", None)
    if not hub_id:
        raise MmretError(f"timm model {name!r} has no weights on the Hugging Face Hub; pass weights=FILE")
    folder = _download(hub_id, None)
    return source_from_folder(folder, hub_id=hub_id, commit=_snapshot_commit(folder))


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers prints load reports (e.g. the text weights a vision tower skips) and progress
    bars; keep them out of the user's terminal unless MMRET_DEBUG asks for logs."""
    from transformers.utils import logging as tlog

    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    if not _logger.isEnabledFor(logging.DEBUG):
        tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def _freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


# ---------------------------------------------------------------------------- image preprocessing


@dataclass(frozen=True)
class ImagePreprocess:
    """Resize, crop and normalise, as numbers taken from the model's own preprocessing config."""

    size: tuple[int, int]  # (H, W) fed to the model
    resize: int | tuple[int, int]  # shortest edge, or (H, W) to squash to, before the centre crop
    interpolation: str  # bicubic | bilinear | ...
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    origin: str = field(default="", compare=False)  # where the numbers came from (for logs)

    def numbers(self) -> dict:
        d = asdict(self)
        d.pop("origin")
        return d

    def resized(self, image_size: int) -> "ImagePreprocess":
        """The same recipe at another square input size, keeping the resize/crop ratio."""
        if isinstance(self.resize, int):
            resize: int | tuple[int, int] = round(self.resize * image_size / self.size[0])
        else:
            resize = tuple(round(r * image_size / s) for r, s in zip(self.resize, self.size))
        return ImagePreprocess((image_size, image_size), resize, self.interpolation, self.mean, self.std,
                               f"{self.origin}, resized to {image_size}")


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

        self.pre, self.train = pre, train
        interp = _interpolation(pre.interpolation)
        if train:
            steps = [T.RandomResizedCrop(pre.size, scale=scale, interpolation=interp, antialias=True)]
            steps += [T.RandomHorizontalFlip()] if hflip else []
        else:
            steps = [T.Resize(pre.resize, interpolation=interp, antialias=True), T.CenterCrop(pre.size)]
        self.pipeline = T.Compose(steps + [T.ToTensor(), T.Normalize(pre.mean, pre.std)])

    def __call__(self, img) -> torch.Tensor:
        return self.pipeline(img)

    def __repr__(self) -> str:
        return f"ImageTransform(train={self.train}, {self.pipeline})"


def _size_pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, (int, float)) else (int(value[-2]), int(value[-1]))


def preprocess_from_timm(model: nn.Module) -> ImagePreprocess:
    """timm's data config: input size, crop_pct (resize = floor(size / crop_pct)), interpolation, mean, std."""
    import timm

    cfg = timm.data.resolve_model_data_config(model)
    size = _size_pair(cfg["input_size"])
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
        with _quiet_loading():
            return transformers.AutoImageProcessor.from_pretrained(folder), "preprocessor_config.json"
    name = _processor_class_name(model_type)
    if not name or not hasattr(transformers, name):
        raise MmretError(f"{folder} has no preprocessor_config.json and transformers knows no image processor "
                         f"for model type {model_type!r}; add a preprocessor_config.json to the folder")
    if model_type in _PUBLISHED_PROCESSORS:
        return (getattr(transformers, name)(**_PUBLISHED_PROCESSORS[model_type]),
                f"{name} with the published {model_type} settings (defaults: no preprocessor_config.json in the folder)")
    return getattr(transformers, name)(), f"{name} defaults (no preprocessor_config.json in the folder)"


def preprocess_from_hf(folder: Path, model_type: str) -> ImagePreprocess:
    processor, origin = _hf_image_processor(folder, model_type)
    d = processor.to_dict()
    if d.get("do_rescale", True) and abs(d.get("rescale_factor", 1 / 255) - 1 / 255) > 1e-9:
        raise MmretError(f"{folder}: image processor rescale_factor {d['rescale_factor']} is not 1/255")
    size = d.get("size") or {}
    crop = _size_pair((d["crop_size"]["height"], d["crop_size"]["width"])) if d.get("do_center_crop") else None
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
    pre = ImagePreprocess(crop, resize, interp, mean, std, origin)
    if "defaults" in origin:
        _logger.warning("%s: no preprocessor_config.json; using %s: resize %s, crop %s, %s, mean %s, std %s",
                        folder.name, origin.split(" (")[0], resize, crop, interp, mean, std)
    return pre


# ---------------------------------------------------------------------------- the towers


def _accepts(module: nn.Module, arg: str) -> bool:
    return arg in inspect.signature(module.forward).parameters


class ImageEncoder(nn.Module):
    """A frozen image tower; subclasses implement `forward`."""

    modality = "image"

    def __init__(self, model: nn.Module, source: ModelSource, pre: ImagePreprocess, dim: int,
                 token_dim: int, pooling: str):
        super().__init__()
        self.model = _freeze(model)
        self.source, self.preprocessing, self.pooling = source, pre, pooling
        self.dim, self.token_dim = dim, token_dim  # pooled width D, token width Dt
        self.name = source.id
        self._num_tokens: int | None = None

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

    def transform(self, train: bool = False, hflip: bool = True, scale: tuple[float, float] = (0.5, 1.0)) -> ImageTransform:
        return ImageTransform(self.preprocessing, train=train, hflip=hflip, scale=scale)

    def preprocess(self, images: list) -> torch.Tensor:
        """PIL images -> (B, 3, H, W) on the encoder's device, with the evaluation transform."""
        transform = self.transform()
        return torch.stack([transform(img) for img in images]).to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_tokens(self) -> int:
        """T of `tokens`, found with one forward pass of a blank image."""
        if self._num_tokens is None:
            with torch.inference_mode():
                out = self(torch.zeros(1, 3, *self.image_size, device=self.device))
            self._num_tokens = out.tokens.shape[1]
        return self._num_tokens

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


def _create_timm(source: ModelSource, **kwargs: Any) -> nn.Module:
    import timm

    name = source.id if source.weights is not None else f"local-dir:{source.folder}"
    if source.weights is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(source.weights)}
    try:
        try:
            return timm.create_model(name, pretrained=True, **kwargs)
        except TypeError:  # CNNs take no img_size: any input size works as is
            if kwargs.pop("img_size", None) is None:
                raise
            return timm.create_model(name, pretrained=True, **kwargs)
    except (RuntimeError, ValueError, KeyError, OSError, TypeError) as e:
        raise MmretError(f"cannot build timm model {source.id!r}: {str(e).splitlines()[0]}") from None


def _timm_image_encoder(source: ModelSource, image_size: int | None, pooling: str | None) -> ImageEncoder:
    kwargs: dict[str, Any] = {"num_classes": 0}
    if image_size:
        kwargs["img_size"] = image_size
    if pooling:
        kwargs["global_pool"] = {"cls": "token", "mean": "avg"}.get(pooling, pooling)
    model = _create_timm(source, **kwargs)
    pre = preprocess_from_timm(model)
    if image_size and pre.size != (image_size, image_size):
        pre = pre.resized(image_size)
    pool = getattr(model, "global_pool", None)
    pool = pool if isinstance(pool, str) else type(pool).__name__
    dim = getattr(model, "head_hidden_size", None) or model.num_features
    return TimmImageEncoder(model, source, pre, dim, model.num_features, f"timm:{pool}")


def _is_dual(config: dict) -> bool:
    return "vision_config" in config and "text_config" in config


def _load_hf(cls: Any, folder: Path, config: Any = None) -> nn.Module:
    try:
        with _quiet_loading():
            return cls.from_pretrained(folder, **({"config": config} if config is not None else {}))
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise MmretError(f"cannot load the model in {folder}: {str(e).splitlines()[0]}") from None


def _is_clip(config: dict, tower: str) -> bool:
    """A CLIP checkpoint with a projection for `tower` (vision | text)."""
    kind = config.get("model_type")
    return kind == "clip" or (kind == f"clip_{tower}_model" and "WithProjection" in str(config.get("architectures")))


def _check_pooling(pooling: str, model: nn.Module, projection: str, name: str) -> None:
    if pooling not in ("proj", "cls", "mean") or (pooling == "proj" and not hasattr(model, projection)):
        raise MmretError(f"pooling {pooling!r} does not apply to {name}; choose cls or mean")


def _hf_image_encoder(source: ModelSource, image_size: int | None, pooling: str | None) -> ImageEncoder:
    from transformers import AutoConfig, AutoModel, CLIPVisionModelWithProjection

    config = AutoConfig.from_pretrained(source.folder)
    if _is_clip(source.config, "vision"):
        vision = config.vision_config if source.config["model_type"] == "clip" else config
        vision.projection_dim = getattr(config, "projection_dim", vision.projection_dim)  # kept on the top config
        model = _load_hf(CLIPVisionModelWithProjection, source.folder, vision)
        pooling, processor_type = pooling or "proj", "clip"
    elif _is_dual(source.config):
        raise MmretError(f"{source.id}: model type {source.config['model_type']!r} has two towers and only "
                         "CLIP's are supported; pass a vision-only model")
    else:
        model, vision = _load_hf(AutoModel, source.folder), config
        if not _accepts(model, "pixel_values"):
            raise MmretError(f"{source.id} ({source.config['model_type']}) is not an image model")
        pooling, processor_type = pooling or "cls", source.config["model_type"]
    _check_pooling(pooling, model, "visual_projection", source.id)
    pre = preprocess_from_hf(source.folder, processor_type)
    if image_size:
        pre = pre.resized(image_size)
    dim = vision.projection_dim if pooling == "proj" else vision.hidden_size
    native = getattr(vision, "image_size", None)
    interpolate = bool(native) and _size_pair(native) != pre.size and _accepts(model, "interpolate_pos_encoding")
    return TransformersImageEncoder(model, source, pre, dim, vision.hidden_size, pooling, interpolate=interpolate)


class TextEncoder(nn.Module):
    """A frozen transformers text tower with its tokenizer.

    pooled: the CLIP projection (`proj`), the first token (`cls`), or the mean of the real tokens
    (`mean`, mask-aware: padding never counts).
    """

    modality = "text"

    def __init__(self, model: nn.Module, tokenizer: Any, source: ModelSource, dim: int, token_dim: int,
                 pooling: str, max_length: int):
        super().__init__()
        self.model = _freeze(model)
        self.tokenizer, self.source, self.pooling = tokenizer, source, pooling
        self.dim, self.token_dim, self.max_length = dim, token_dim, max_length
        self.name = source.id

    @property
    def spec(self) -> dict:
        return {"modality": "text", "library": self.source.library, "model": self.source.id,
                "revision": self.source.revision, "class": type(self.model).__name__,
                "pooling": self.pooling, "max_length": self.max_length}

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str], pad_to_max_length: bool = False) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask (B, L), truncated to `max_length`; L is the longest text
        unless `pad_to_max_length` (fixed L = max_length, e.g. for cached token states)."""
        enc = self.tokenizer(list(texts), padding="max_length" if pad_to_max_length else "longest",
                             truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        tokens = out.last_hidden_state  # (B, L, Dt)
        if self.pooling == "proj":
            pooled = out.text_embeds  # (B, D)
        elif self.pooling == "mean":
            weights = attention_mask.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        else:
            pooled = tokens[:, 0]
        return EncoderOutput(pooled, tokens, attention_mask)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, token_dim={self.token_dim}, max_length={self.max_length}"


def _sentence_transformers_pooling(folder: Path) -> str | None:
    path = folder / "1_Pooling" / "config.json"
    if not path.is_file():
        return None
    cfg = json.loads(path.read_text(encoding="utf-8"))
    return "mean" if cfg.get("pooling_mode_mean_tokens") else "cls" if cfg.get("pooling_mode_cls_token") else None


def _text_limit(config: Any, tokenizer: Any) -> int:
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    return min(int(x) for x in limits if x and x < 1_000_000)


def _hf_text_model(source: ModelSource, pooling: str | None) -> tuple[nn.Module, Any, str]:
    """The transformers text model, its (text) config and the pooling it uses."""
    from transformers import AutoConfig, AutoModel, CLIPTextModelWithProjection

    config = AutoConfig.from_pretrained(source.folder)
    if _is_clip(source.config, "text"):
        text = config.text_config if source.config["model_type"] == "clip" else config
        text.projection_dim = getattr(config, "projection_dim", text.projection_dim)
        return _load_hf(CLIPTextModelWithProjection, source.folder, text), text, pooling or "proj"
    if _is_dual(source.config):
        raise MmretError(f"{source.id}: model type {source.config['model_type']!r} has two towers and only "
                         "CLIP's are supported; pass a text-only model")
    model = _load_hf(AutoModel, source.folder)
    if not _accepts(model, "input_ids") or _accepts(model, "pixel_values"):
        raise MmretError(f"{source.id} ({source.config['model_type']}) is not a text model")
    pooling = pooling or _sentence_transformers_pooling(source.folder)
    if pooling is None:
        _logger.info("%s: no sentence-transformers pooling config; using mask-aware mean pooling", source.id)
    return model, config, pooling or "mean"


def _hf_text_encoder(source: ModelSource, pooling: str | None, max_length: int | None) -> TextEncoder:
    from transformers import AutoTokenizer

    model, text, pooling = _hf_text_model(source, pooling)
    _check_pooling(pooling, model, "text_projection", source.id)
    try:
        with _quiet_loading():
            tokenizer = AutoTokenizer.from_pretrained(source.folder)
    except (OSError, ValueError, TypeError) as e:
        raise MmretError(f"cannot load the tokenizer in {source.folder}: {str(e).splitlines()[0]}") from None
    limit = _text_limit(text, tokenizer)
    if max_length and max_length > limit:
        _logger.warning("%s reads at most %d tokens; max_length %d lowered to %d", source.id, limit, max_length, limit)
    max_length = min(max_length or DEFAULT_MAX_LENGTH, limit)
    dim = text.projection_dim if pooling == "proj" else text.hidden_size
    return TextEncoder(model, tokenizer, source, dim, text.hidden_size, pooling, max_length)


# ---------------------------------------------------------------------------- registry and loaders


@dataclass
class EncoderEntry:
    name: str
    source: str  # the hub id the preset stands for
    help: str
    builders: dict[str, Callable[..., nn.Module]] = field(default_factory=dict)  # modality -> build(**opts)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if m in self.builders)


ENCODERS: dict[str, EncoderEntry] = {}


def register_encoder(name: str, modality: str, source: str = "") -> Callable:
    """Register `build(**opts) -> ImageEncoder | TextEncoder` as preset `name` for one modality;
    the first line of its docstring is the help text the CLI lists."""
    if modality not in MODALITIES:
        raise ValueError(f"modality must be one of {MODALITIES}")

    def wrap(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        entry = ENCODERS.setdefault(name, EncoderEntry(name, source, ""))
        entry.help = entry.help or (build.__doc__ or "").strip().split("\n")[0]
        entry.builders[modality] = build
        return build

    return wrap


def encoder_names(modality: str) -> list[str]:
    return [name for name, entry in ENCODERS.items() if modality in entry.builders]


def _unknown(name: str, modality: str) -> MmretError:
    entry = ENCODERS.get(name)
    presets = ", ".join(encoder_names(modality))
    if entry is not None:
        other = "/".join(entry.modalities)
        return MmretError(f"{name!r} is a {other} encoder, not an {modality} encoder; {modality} presets: {presets}")
    return MmretError(f"unknown {modality} encoder {name!r}: use a preset ({presets}), "
                      "a hub id such as owner/name, or a local model folder")


def _resolve(name_or_path: str, modality: str, weights: str | Path | None) -> ModelSource:
    if weights is not None and not name_or_path.startswith("timm:"):
        raise MmretError("weights= applies to timm:NAME models only; a folder or hub id brings its own weights")
    source = resolve_source(name_or_path, weights)
    if source is None:
        raise _unknown(name_or_path, modality)
    return source


def load_image_encoder(name_or_path: str, image_size: int | None = None, pooling: str | None = None,
                       weights: str | Path | None = None) -> ImageEncoder:
    """A frozen image tower from a preset, hub id, local folder or `timm:NAME` (+ `weights=FILE`).

    `image_size` changes the square input size (position embeddings are interpolated);
    `pooling` overrides the preset's (cls | mean, or proj for CLIP).
    """
    entry = ENCODERS.get(name_or_path)
    if entry is not None:
        if "image" not in entry.builders:
            raise _unknown(name_or_path, "image")
        enc = entry.builders["image"](image_size=image_size, pooling=pooling)
        enc.name = name_or_path
        return enc
    source = _resolve(name_or_path, "image", weights)
    if source.library == "timm":
        enc = _timm_image_encoder(source, image_size, pooling)
    else:
        enc = _hf_image_encoder(source, image_size, pooling)
    _logger.info("image encoder %s: %s", name_or_path, enc.spec)
    return enc


def load_text_encoder(name_or_path: str, pooling: str | None = None, max_length: int | None = None) -> TextEncoder:
    """A frozen text tower from a preset, hub id or local transformers folder.

    `max_length` (tokens) defaults to 64 (DEFAULT_MAX_LENGTH), capped by the model's position limit.
    """
    entry = ENCODERS.get(name_or_path)
    if entry is not None:
        if "text" not in entry.builders:
            raise _unknown(name_or_path, "text")
        enc = entry.builders["text"](pooling=pooling, max_length=max_length)
        enc.name = name_or_path
        return enc
    source = _resolve(name_or_path, "text", None)
    if source.library != "transformers":
        raise MmretError(f"{name_or_path} is a timm image model, not a text encoder")
    enc = _hf_text_encoder(source, pooling, max_length)
    _logger.info("text encoder %s: %s", name_or_path, enc.spec)
    return enc


def load_encoder(name_or_path: str, modality: str, **opts: Any) -> nn.Module:
    if modality == "image":
        return load_image_encoder(name_or_path, **opts)
    if modality == "text":
        return load_text_encoder(name_or_path, **opts)
    raise ValueError(f"modality must be one of {MODALITIES}")


# ---------------------------------------------------------------------------- presets


@register_encoder("dino-vits16", modality="image", source="timm/vit_small_patch16_224.dino")
def dino_vits16(image_size: int | None = None, pooling: str | None = None) -> ImageEncoder:
    """DINO ViT-S/16 (timm): 197 tokens x 384 at 224 px, CLS pooled 384."""
    return load_image_encoder("timm/vit_small_patch16_224.dino", image_size, pooling)


@register_encoder("dinov2-vits14", modality="image", source="facebook/dinov2-small")
def dinov2_vits14(image_size: int | None = None, pooling: str | None = None) -> ImageEncoder:
    """DINOv2 ViT-S/14 (transformers): 257 tokens x 384 at 224 px, CLS pooled 384."""
    return load_image_encoder("facebook/dinov2-small", image_size, pooling or "cls")


@register_encoder("distilbert", modality="text", source="distilbert/distilbert-base-uncased")
def distilbert(pooling: str | None = None, max_length: int | None = None) -> TextEncoder:
    """DistilBERT base uncased: tokens x 768, CLS pooled 768."""
    return load_text_encoder("distilbert/distilbert-base-uncased", pooling or "cls", max_length)


@register_encoder("minilm", modality="text", source="sentence-transformers/all-MiniLM-L6-v2")
def minilm(pooling: str | None = None, max_length: int | None = None) -> TextEncoder:
    """all-MiniLM-L6-v2 sentence embedder: tokens x 384, mask-aware mean pooled 384."""
    return load_text_encoder("sentence-transformers/all-MiniLM-L6-v2", pooling or "mean", max_length)


@register_encoder("clip-b32", modality="image", source="openai/clip-vit-base-patch32")
def clip_b32_image(image_size: int | None = None, pooling: str | None = None) -> ImageEncoder:
    """CLIP ViT-B/32 towers: projected 512; tokens 50 x 768 (image), L x 512 (text)."""
    return load_image_encoder("openai/clip-vit-base-patch32", image_size, pooling or "proj")


@register_encoder("clip-b32", modality="text")
def clip_b32_text(pooling: str | None = None, max_length: int | None = None) -> TextEncoder:
    """CLIP ViT-B/32 text tower: projected 512, tokens L x 512."""
    return load_text_encoder("openai/clip-vit-base-patch32", pooling or "proj", max_length)


@register_encoder("clip-b16", modality="image", source="openai/clip-vit-base-patch16")
def clip_b16_image(image_size: int | None = None, pooling: str | None = None) -> ImageEncoder:
    """CLIP ViT-B/16 towers: projected 512; tokens 197 x 768 (image), L x 512 (text)."""
    return load_image_encoder("openai/clip-vit-base-patch16", image_size, pooling or "proj")


@register_encoder("clip-b16", modality="text")
def clip_b16_text(pooling: str | None = None, max_length: int | None = None) -> TextEncoder:
    """CLIP ViT-B/16 text tower: projected 512, tokens L x 512."""
    return load_text_encoder("openai/clip-vit-base-patch16", pooling or "proj", max_length)
