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
