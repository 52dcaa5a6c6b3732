"""Configuration dataclasses, one per concern, validated on creation and saved as JSON.

Every field has a default and a short comment; `__post_init__` checks values and names the field
in its message, so a bad option ends in one line that says what to change.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmret.errors import MmretError

DATA_DIR_ENV = "MMRET_DATA_DIR"
RUNS_DIR_ENV = "MMRET_RUNS_DIR"


def data_root(override: str | Path | None = None) -> Path:
    """The folder holding `data/<ds>/`: the option, else $MMRET_DATA_DIR, else ./data."""
    return Path(override or os.environ.get(DATA_DIR_ENV) or "data").expanduser().absolute()


def runs_root(override: str | Path | None = None) -> Path:
    """The folder holding `runs/<run>/`: the option, else $MMRET_RUNS_DIR, else ./runs."""
    return Path(override or os.environ.get(RUNS_DIR_ENV) or "runs").expanduser().absolute()


def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a config dataclass (paths become strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(cfg).items()}


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise MmretError(f"--{name} must be a fraction in [0, 1), got {value}")


@dataclass
class PrepareConfig:
    source: str  # reader name: flickr30k | coco | flickr8k | folder | example
    root: Path | None = None  # where the raw dataset lives (not needed for `example`)
    name: str | None = None  # dataset name under data/ (default: the source name)
    val: float = 0.1  # fraction of images for validation, when the source has no official split
    test: float = 0.1  # fraction of images for testing, when the source has no official split
    seed: int = 0  # seed of the random split and of the generated example
    check_images: bool = False  # decode every image fully and drop broken ones
    force: bool = False  # replace an existing prepared dataset
    count: int = 500  # number of pictures in the generated `example` dataset
    data_dir: Path | None = None  # data root (default $MMRET_DATA_DIR or ./data)

    def __post_init__(self) -> None:
        self.name = self.name or self.source
        if not self.name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise MmretError(f"--name {self.name!r} may hold only letters, digits, '-', '_' and '.'")
        _check_fraction("val", self.val)
        _check_fraction("test", self.test)
        if self.val + self.test >= 1.0:
            raise MmretError(f"--val + --test must leave images for training, got {self.val} + {self.test}")
        if self.count < 10:
            raise MmretError(f"--count must be at least 10, got {self.count}")
        if self.root is not None:
            self.root = Path(self.root).expanduser().absolute()
        self.data_dir = data_root(self.data_dir)


# ---------------------------------------------------------------------------- training runs


def _check_positive(name: str, value: float | int | None) -> None:
    if value is not None and value <= 0:
        raise MmretError(f"--{name} must be positive, got {value}")


@dataclass
class DataConfig:
    dataset: str = "example"  # prepared dataset under the data root
    folds: int = 0  # k-fold cross-validation over all images (0: use the dataset's own splits)
    fold: int = 0  # which fold is the test split when folds > 0
    data_dir: Path | None = None  # data root (default $MMRET_DATA_DIR or ./data)

    def __post_init__(self) -> None:
        if self.folds == 1 or self.folds < 0:
            raise MmretError(f"--folds must be 0 (off) or at least 2, got {self.folds}")
        if self.folds and not 0 <= self.fold < self.folds:
            raise MmretError(f"--fold must be in [0, {self.folds}), got {self.fold}")
        self.data_dir = data_root(self.data_dir)


@dataclass
class EncoderConfig:
    vision: str = "dino-vits16"  # frozen image tower: preset, hub id or local folder
    text: str = "distilbert"  # frozen text tower: preset, hub id or local folder
    model: str | None = None  # a CLIP whose two towers are adapted (lora/prefix/adapter/full)
    max_length: int = 64  # text tokens per caption
    tokens: bool = False  # whether the method reads token states (set by the method)


@dataclass
class MethodConfig:
    method: str = "bridge"  # heads | bridge | lora | prefix | adapter | full | scratch
    embed_dim: int = 512  # size of the shared embedding space
    head_layers: int = 2  # projection heads: 1 = linear, 2+ = MLP
    head_hidden: int | None = None  # hidden width of MLP heads (default: the input width)
    dropout: float = 0.1  # dropout in heads and bridge
    queries: int = 32  # bridge: learnable query vectors
    bridge_layers: int = 2  # bridge: cross-attention blocks
    bridge_width: int = 384  # bridge: width of queries and blocks
    bridge_heads: int = 6  # bridge: attention heads
    token_pool: int = 1  # bridge: average-pool the patch grid by this factor first (2: about 4x fewer tokens)
    mixup: float = 0.0  # latent mixup Beta(alpha, alpha) on cached features (0: off)
    input_norm: bool = True  # standardise cached features at the tower inputs (initialised from train data)
    init_temperature: float = 0.07  # initial softmax temperature (logit scale 1/T)
    rank: int = 8  # lora: rank r
    alpha: float | None = None  # lora: scaling alpha (default 2 x rank)
    lora_dropout: float = 0.1  # lora: dropout on the low-rank path
    targets: str = "q,v"  # lora: attention projections to adapt (q, k, v, o, mlp)
    tower: str = "both"  # which tower is adapted: text | vision | both
    prefix_tokens: int = 16  # prefix: virtual tokens per tower
    adapter_dim: int = 64  # adapter: bottleneck width
    arch: str = "miniclip"  # scratch: miniclip | clip-tiny | clip-b16
    image_model: str = "resnet34"  # scratch miniclip: timm CNN of the image tower
    image_size: int = 64  # scratch: picture side in pixels
    text_width: int = 256  # scratch miniclip: Linformer width
    text_depth: int = 4  # scratch miniclip: Linformer blocks
    linformer_k: int = 16  # scratch: Linformer projected sequence length
    tokenizer: str = "bpe"  # scratch: bpe (trained on the captions) or a transformers tokenizer
    vocab_size: int = 2000  # scratch: BPE vocabulary size
    temperature: str = "learned"  # learned | fixed | dynamic
    pretrained_image: bool = False  # scratch: start the ResNet from ImageNet weights

    def __post_init__(self) -> None:
        for name in ("embed_dim", "head_layers", "queries", "bridge_layers", "bridge_width", "bridge_heads",
                     "token_pool", "rank", "prefix_tokens", "adapter_dim", "linformer_k", "vocab_size", "image_size",
                     "text_width", "text_depth"):
            _check_positive(name.replace("_", "-"), getattr(self, name))
        if not 0 <= self.dropout < 1 or not 0 <= self.lora_dropout < 1:
            raise MmretError("--dropout and --lora-dropout must be in [0, 1)")
        if self.mixup < 0:
            raise MmretError(f"--mixup must be 0 (off) or a positive Beta alpha, got {self.mixup}")
        if self.tower not in ("text", "vision", "both"):
            raise MmretError(f"--tower must be text, vision or both, got {self.tower!r}")
        if self.temperature not in ("learned", "fixed", "dynamic"):
            raise MmretError(f"--temperature must be learned, fixed or dynamic, got {self.temperature!r}")
        if self.bridge_width % self.bridge_heads:
            raise MmretError(f"--bridge-width {self.bridge_width} must be divisible by --bridge-heads {self.bridge_heads}")
        if self.alpha is None:
            self.alpha = 2.0 * self.rank


@dataclass
class TrainConfig:
    epochs: int = 20  # passes over the training images
    batch_size: int = 128  # pairs in one contrastive loss
    micro_batch: int | None = None  # pairs per forward pass (default: the whole batch)
    accumulation: str = "cache"  # cache: every pair sees the whole batch's negatives; plain: only its micro-batch's
    lr: float | None = None  # peak learning rate (default: the method's)
    weight_decay: float = 0.05  # AdamW decay (never on norms, biases or the temperature)
    warmup: float = 0.05  # fraction of all steps spent warming up linearly
    grad_clip: float = 1.0  # clip the global gradient norm (0: off)
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (fp16 only on CUDA)
    patience: int = 5  # stop after this many evaluations without a better val mean recall (0: never)
    seed: int = 0  # seeds data order, initialisation and dropout
    workers: int | None = None  # DataLoader workers for pixel inputs (default: CPU count, at most 4)
    grad_checkpointing: bool = False  # recompute tower activations in backward to save memory
    hflip: bool | None = None  # random horizontal flips of training pictures (default: unless captions say left/right)
    sam: bool = False  # sharpness-aware minimisation
    sam_rho: float = 0.05  # SAM neighbourhood size
    save_every: int = 0  # also keep a checkpoint every N epochs (0: only best and last)
    max_steps: int | None = None  # stop after this many optimizer steps (for quick checks)
    device: str = "auto"  # auto | cpu | cuda | cuda:N

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "micro_batch", "lr", "max_steps"):
            _check_positive(name.replace("_", "-"), getattr(self, name))
        if self.micro_batch is not None and self.micro_batch > self.batch_size:
            raise MmretError(f"--micro-batch {self.micro_batch} cannot exceed --batch-size {self.batch_size}")
        if self.accumulation not in ("cache", "plain"):
            raise MmretError(f"--accumulation must be cache or plain, got {self.accumulation!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise MmretError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if not 0 <= self.warmup < 1:
            raise MmretError(f"--warmup is a fraction of all steps in [0, 1), got {self.warmup}")
        if self.patience < 0 or self.save_every < 0 or self.grad_clip < 0:
            raise MmretError("--patience, --save-every and --grad-clip cannot be negative")


@dataclass
class RunConfig:
    """Everything a training run needs, saved as `runs/<run>/config.json` to rebuild its model."""

    name: str | None = None  # run folder name (default: date-method-dataset)
    runs_dir: Path | None = None  # runs root (default $MMRET_RUNS_DIR or ./runs)
    data: DataConfig = field(default_factory=DataConfig)
    encoders: EncoderConfig = field(default_factory=EncoderConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        self.runs_dir = runs_root(self.runs_dir)

    def to_dict(self) -> dict:
        out = {"name": self.name, "runs_dir": str(self.runs_dir)}
        for part in ("data", "encoders", "method", "train"):
            out[part] = to_dict(getattr(self, part))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        parts = {"data": DataConfig, "encoders": EncoderConfig, "method": MethodConfig, "train": TrainConfig}
        unknown = set(data) - set(parts) - {"name", "runs_dir"}
        if unknown:
            raise MmretError(f"unknown config sections: {', '.join(sorted(unknown))}")
        kwargs: dict[str, Any] = {"name": data.get("name"), "runs_dir": data.get("runs_dir")}
        for key, kind in parts.items():
            section = data.get(key, {})
            names = {f.name for f in dataclasses.fields(kind)}
            bad = set(section) - names
            if bad:
                raise MmretError(f"unknown {key} settings in config: {', '.join(sorted(bad))}")
            kwargs[key] = kind(**section)
        return cls(**kwargs)


# ---------------------------------------------------------------------------- feature caches


@dataclass
class PrecomputeConfig:
    dataset: str  # prepared dataset under the data root
    vision: str | None = None  # frozen image tower: preset, hub id or local folder
    text: str | None = None  # frozen text tower: preset, hub id or local folder
    split: str = "all"  # all | train | val | test: which rows to compute now (the cache spans all)
    tokens: bool = False  # also keep token states (N, T, D), for methods that read them
    batch_size: int | str = "auto"  # rows per forward pass, or auto
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (fp16 only on CUDA)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    image_size: int | None = None  # square input size (default: the model's own)
    max_length: int = 64  # text tokens per caption (as EncoderConfig.max_length, so training reuses the cache)
    workers: int | None = None  # image decoding workers (default: CPU count - 1, at most 4)
    compile: bool = False  # torch.compile the image tower first (pays off over thousands of images)
    data_dir: Path | None = None  # data root (default $MMRET_DATA_DIR or ./data)

    def __post_init__(self) -> None:
        if not self.vision and not self.text:
            raise MmretError("pass --vision ENCODER and/or --text ENCODER: there is nothing to encode")
        if self.split not in ("all", "train", "val", "test"):
            raise MmretError(f"--split must be all, train, val or test, got {self.split!r}")
        if isinstance(self.batch_size, str) and self.batch_size != "auto":
            if not self.batch_size.isdigit():
                raise MmretError(f"--batch-size must be a positive number or auto, got {self.batch_size!r}")
            self.batch_size = int(self.batch_size)
        _check_positive("batch-size", None if self.batch_size == "auto" else self.batch_size)
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise MmretError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.image_size is not None and self.image_size < 16:
            raise MmretError(f"--image-size must be at least 16 pixels, got {self.image_size}")
        if self.max_length < 2:
            raise MmretError(f"--max-length must be at least 2 tokens, got {self.max_length}")
        if self.workers is not None and self.workers < 0:
            raise MmretError(f"--workers cannot be negative, got {self.workers}")
        self.data_dir = data_root(self.data_dir)


SECTIONS = {"data": DataConfig, "encoders": EncoderConfig, "method": MethodConfig, "train": TrainConfig}


def section_of(option: str) -> str:
    """The config section a flat option name (e.g. `rank`, `epochs`) belongs to."""
    for section, kind in SECTIONS.items():
        if option in {f.name for f in dataclasses.fields(kind)}:
            return section
    raise MmretError(f"unknown setting {option!r}")


def with_overrides(cfg: RunConfig, values: dict[str, Any]) -> RunConfig:
    """A copy of `cfg` with flat option values (None: not given) applied, validated again."""
    given = {k: v for k, v in values.items() if v is not None}
    top = {k: given.pop(k) for k in ("name", "runs_dir") if k in given}
    parts = {}
    for section in SECTIONS:
        current = getattr(cfg, section)
        changes = {k: v for k, v in given.items() if section_of(k) == section}
        if section == "method" and "rank" in changes and "alpha" not in changes:
            changes["alpha"] = None  # the default alpha follows the rank
        parts[section] = dataclasses.replace(current, **changes)
    return RunConfig(name=top.get("name", cfg.name), runs_dir=top.get("runs_dir", cfg.runs_dir), **parts)
