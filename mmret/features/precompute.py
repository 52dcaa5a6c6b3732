"""`mmret precompute-embeddings`: fill the feature caches of a dataset under named frozen towers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmret.common.device import check_precision, pick_device
from mmret.common.paths import data_root
from mmret.common.progress import NULL, Reporter
from mmret.common.shards import parse_shard, shard_of
from mmret.errors import MmretError
from mmret.features.cache import CAPTIONS, CachedFeatures
from mmret.features.encode import ensure_features


@dataclass
class PrecomputeConfig:
    dataset: str  # prepared dataset under the data root
    vision: str | None = None  # frozen item tower (image): preset, hub id or local folder
    text: str | None = None  # frozen text tower: preset, hub id or local folder
    split: str = "all"  # all | train | val | test: which rows to compute now (the cache spans all)
    tokens: bool = False  # also keep token states (N, T, D), for methods that read them
    batch_size: int | str = "auto"  # rows per forward pass, or auto
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (fp16 only on CUDA)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    image_size: int | None = None  # square input size (default: the model's own)
    max_length: int = 64  # text tokens per caption (as EncoderConfig.max_length, so training reuses the cache)
    workers: int | None = None  # decoding workers (default: CPU count - 1, at most 4)
    compile: bool = False  # torch.compile the item tower first (pays off over thousands of items)
    shard: str | None = None  # i/N: encode only this process's shards of the caches (default: torchrun's rank)
    finalize: bool = False  # seal caches whose shards were all encoded by --shard processes; encode nothing
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
        if self.batch_size != "auto" and self.batch_size <= 0:
            raise MmretError(f"--batch-size must be positive, got {self.batch_size}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise MmretError(f"--precision must be auto, fp32, bf16 or fp16, got {self.precision!r}")
        if self.image_size is not None and self.image_size < 16:
            raise MmretError(f"--image-size must be at least 16 pixels, got {self.image_size}")
        if self.max_length < 2:
            raise MmretError(f"--max-length must be at least 2 tokens, got {self.max_length}")
        if self.workers is not None and self.workers < 0:
            raise MmretError(f"--workers cannot be negative, got {self.workers}")
        if self.shard is not None:
            parse_shard(self.shard)
        if self.finalize and self.shard:
            raise MmretError("--finalize seals what the --shard processes encoded; pass one or the other")
        self.data_dir = data_root(self.data_dir)


@dataclass
class PrecomputeResult:
    dataset: str
    device: str
    parts: list[tuple[str, CachedFeatures]]  # (encoder name, features) for images and/or captions, once complete
    seconds: float
    shards: list[tuple[str, Any]] = field(default_factory=list)  # (encoder name, ShardResult) with --shard


def precompute_embeddings(cfg: Any, reporter: Reporter = NULL) -> PrecomputeResult:
    """`mmret precompute-embeddings`: load the dataset and the towers (so a bad name fails before
    any work), then fill the image and caption caches."""
    from mmret.data.prepared import load_dataset
    from mmret.encoders import load_text_encoder, load_tower

    start = time.perf_counter()
    dataset = load_dataset(cfg.dataset, cfg.data_dir)
    device = pick_device(cfg.device)
    check_precision(device, cfg.precision)
    towers = []
    if cfg.vision:
        encoder = load_tower(cfg.vision, dataset.modality.name, image_size=cfg.image_size)
        towers.append((dataset.modality.plural, encoder))
    if cfg.text:
        towers.append((CAPTIONS, load_text_encoder(cfg.text, max_length=cfg.max_length)))
    from mmret.features.shards import encode_shard, seal_features

    shard = shard_of(cfg.shard)
    parts, shards = [], []
    for which, encoder in towers:
        if cfg.finalize:
            parts.append((encoder.name, seal_features(dataset, encoder, which, cfg.tokens, cfg.split)))
            continue
        if shard is not None:
            done = encode_shard(dataset, encoder.to(device), which, shard, cfg.tokens, cfg.split, cfg.batch_size,
                                reporter, device, cfg.precision, cfg.workers)
            shards.append((encoder.name, done))
            if done.sealed is not None:
                parts.append((encoder.name, done.sealed))
        else:
            parts.append((encoder.name, ensure_features(dataset, encoder.to(device), which, tokens=cfg.tokens,
                                                        split=cfg.split, batch_size=cfg.batch_size, reporter=reporter,
                                                        device=device, precision=cfg.precision, workers=cfg.workers,
                                                        compile=cfg.compile)))
        encoder.to("cpu")
    return PrecomputeResult(dataset.name, str(device), parts, time.perf_counter() - start, shards)
