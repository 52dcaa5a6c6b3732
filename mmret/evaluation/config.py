"""`mmret eval`'s options, checked before anything is read (importable without torch, so an
option error answers at once)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmret.errors import MmretError
from mmret.figures import MAP_METHODS

TASKS = ("retrieval", "classification", "linear-probe", "caption-selection", "cross-modal")
FORMATS = ("table", "markdown", "json", "clip-benchmark")


def parse_ks(text: str) -> tuple[int, ...]:
    """`1,5,10` -> (1, 5, 10), as CLIP_benchmark's --recall_k takes them."""
    try:
        ks = tuple(sorted({int(k) for k in str(text).replace(" ", "").split(",") if k}))
    except ValueError:
        ks = ()
    if not ks or ks[0] < 1:
        raise MmretError(f"--recall-k must be positive whole numbers separated by commas (e.g. 1,5,10), got {text!r}")
    return ks


@dataclass
class EvalConfig:
    task: str = "retrieval"  # retrieval | classification | linear-probe | caption-selection
    dataset: str | None = None  # prepared dataset (default: the first run's)
    split: str = "test"
    recall_k: tuple[int, ...] = (1, 5, 10)  # retrieval cut-offs
    bootstrap: int = 0  # resamples for 95% intervals (0: none)
    seed: int = 0  # seed of the bootstrap, the probe and the map
    which: str = "best"  # checkpoint
    device: str = "auto"
    templates: Path | None = None  # prompt templates for classification (default: CLIP's ImageNet set)
    map: Path | None = None  # draw the embedding map here (PNG)
    map_method: str = "umap"  # umap | tsne
    failures: Path | None = None  # draw the worst text queries here (PNG)
    worst: int = 8  # queries in the failure gallery
    clip_benchmark: bool = False  # also write each result in CLIP_benchmark's schema
    data_dir: Path | None = None  # where the dataset is prepared (default: the run's data root)
    queries: str | None = None  # cross-modal: the dataset whose split holds the queries
    items: str | None = None  # cross-modal: the dataset whose items are the candidates
    pairs: Path | None = None  # cross-modal: a table of (query item id, candidate item id); default: same paths

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise MmretError(f"--task must be {', '.join(TASKS)}, got {self.task!r}")
        if self.map_method not in MAP_METHODS:
            raise MmretError(f"--map-method must be {' or '.join(MAP_METHODS)}, got {self.map_method!r}")
        if self.worst < 1:
            raise MmretError(f"--worst must be at least 1, got {self.worst}")
        if self.bootstrap < 0:
            raise MmretError(f"--bootstrap must be 0 (none) or a number of resamples, got {self.bootstrap}")
        if self.templates is not None and self.task != "classification":
            raise MmretError("--templates applies to --task classification only")
        if self.task == "cross-modal" and not (self.queries and self.items):
            raise MmretError("--task cross-modal needs --queries DATASET and --items DATASET (of two kinds of items)")
        if (self.queries or self.items or self.pairs) and self.task != "cross-modal":
            raise MmretError("--queries, --items and --pairs apply to --task cross-modal only")
        if self.task == "cross-modal" and self.clip_benchmark:
            raise MmretError("CLIP_benchmark has no cross-modal task; use --format table, markdown or json")
        self.recall_k = parse_ks(",".join(map(str, self.recall_k)))
