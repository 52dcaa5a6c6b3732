"""`mmret precompute-embeddings`'s options, checked before any model code loads (importable
without torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmret.common.paths import data_root
from mmret.common.shards import parse_shard
from mmret.errors import MmretError


@dataclass
class PrecomputeConfig:
    dataset: str  # prepared dataset under the data root
    item: str | None = None  # frozen item tower (a picture or a sound tower): preset, hub id or local folder
    text: str | None = None  # frozen text tower: preset, hub id or local folder
    split: str = "all"  # all | train | val | test: which rows to compute now (the cache spans all)
    tokens: bool = False  # also keep token states (N, T, D), for methods that read them
    batch_size: int | str = "auto"  # rows per forward pass, or auto
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (fp16 only on CUDA) | int8 (CPU, item towers)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    image_size: int | None = None  # a picture tower's square input size (default: the model's own)
    max_length: int = 64  # text tokens per caption (as EncoderConfig.max_length, so training reuses the cache)
    workers: int | None = None  # decoding workers (default: CPU count - 1, at most 4)
    compile: bool | None = None  # torch.compile the item tower first; None: when the work left pays for it
    shard: str | None = None  # i/N: encode only this process's shards of the caches (default: torchrun's rank)
    views: int = 0  # also K augmented views of the items (random crops/flips), as `--views` training reads
    finalize: bool = False  # seal caches whose shards were all encoded by --shard processes; encode nothing
    data_dir: Path | None = None  # data root (default $MMRET_DATA_DIR or ./data)

    def __post_init__(self) -> None:
        if not self.item and not self.text:
            raise MmretError("pass an item tower (pictures: --vision, sounds: --audio) and/or --text: "
                             "there is nothing to encode")
        if self.split not in ("all", "train", "val", "test"):
            raise MmretError(f"--split must be all, train, val or test, got {self.split!r}")
        if isinstance(self.batch_size, str) and self.batch_size != "auto":
            if not self.batch_size.isdigit():
                raise MmretError(f"--batch-size must be a positive number or auto, got {self.batch_size!r}")
            self.batch_size = int(self.batch_size)
        if self.batch_size != "auto" and self.batch_size <= 0:
            raise MmretError(f"--batch-size must be positive, got {self.batch_size}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16", "int8"):
            raise MmretError(f"--precision must be auto, fp32, bf16, fp16 or int8, got {self.precision!r}")
        if self.image_size is not None and self.image_size < 16:
            raise MmretError(f"--image-size must be at least 16 pixels, got {self.image_size}")
        if self.max_length < 2:
            raise MmretError(f"--max-length must be at least 2 tokens, got {self.max_length}")
        if self.views < 0:
            raise MmretError(f"--views cannot be negative, got {self.views}")
        if self.workers is not None and self.workers < 0:
            raise MmretError(f"--workers cannot be negative, got {self.workers}")
        if self.shard is not None:
            parse_shard(self.shard)
        if self.views and (self.shard or self.finalize):
            raise MmretError("--views is computed by one process; run it without --shard/--finalize once the cache "
                             "is sealed")
        if self.finalize and self.shard:
            raise MmretError("--finalize seals what the --shard processes encoded; pass one or the other")
        self.data_dir = data_root(self.data_dir)
