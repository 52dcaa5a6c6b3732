"""`mmret prepare`'s options, and the rules `--caption-negatives` names, checked before anything is read
(importable without pandas)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmret.common.paths import check_name, data_root
from mmret.errors import MmretError


def _check_fraction(name: str, value: float, top: float = 1.0) -> None:
    if not 0.0 <= value < top or value > 1.0:
        raise MmretError(f"--{name} must be a fraction in [0, {top:g}{']' if top > 1 else ')'}, got {value}")


NEGATIVE_RULES = ("swap", "relation", "attribute", "table")  # the rules of `mmret.data.composition`


def negative_rules(text: str | None) -> tuple[str, ...]:
    """`--caption-negatives swap,relation` -> ("swap", "relation"): known rules, each once, in the order given."""
    rules = tuple(dict.fromkeys(r.strip() for r in str(text or "").split(",") if r.strip()))
    unknown = [r for r in rules if r not in NEGATIVE_RULES]
    if unknown:
        raise MmretError(f"--caption-negatives takes {', '.join(NEGATIVE_RULES)} (comma-separated), got "
                         f"{', '.join(unknown)}")
    return rules


@dataclass
class PrepareConfig:
    source: str  # reader name: flickr30k | coco | flickr8k | folder | classes | example
    root: Path | None = None  # where the raw dataset lives (not needed for `example`)
    name: str | None = None  # dataset name under data/ (default: the source name)
    val: float = 0.1  # fraction of items for validation, when the source has no official split
    test: float = 0.1  # fraction of items for testing, when the source has no official split
    seed: int = 0  # seed of the random split and of the generated example
    check_items: bool = False  # decode every item fully and drop broken ones (and silent sounds)
    force: bool = False  # replace an existing prepared dataset
    count: int = 500  # number of pictures in the generated `example` dataset
    data_dir: Path | None = None  # data root (default $MMRET_DATA_DIR or ./data)
    captions: bool = True  # False: a gallery without captions (every item kept, all in test, searched not trained on)
    allow_outside_root: bool = False  # include files outside --root (a table names them, or a link leads there)

    def __post_init__(self) -> None:
        self.name = check_name("--name", self.name or self.source)
        _check_fraction("val", self.val)
        _check_fraction("test", self.test, top=1.0 + 1e-9)  # --test 1.0: a set meant only for evaluation
        if self.test == 1.0:
            self.val = 0.0  # every item is for evaluation: a test set, nothing to train on
        elif self.val + self.test >= 1.0:
            raise MmretError(f"--val + --test must leave a training split, got {self.val} + {self.test} "
                             "(--test 1.0 makes a set for evaluation only)")
        if self.count < 10:
            raise MmretError(f"--count must be at least 10, got {self.count}")
        if self.root is not None:
            self.root = Path(self.root).expanduser().absolute()
        self.data_dir = data_root(self.data_dir)
