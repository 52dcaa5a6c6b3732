"""Datasets: readers for each source format, `prepare` that writes `data/<ds>/`, and
`load_dataset` that every later step uses to read it back.

`data/<ds>/` holds `dataset.json`, `images.parquet` (image_id, path, split, width, height) and
`captions.parquet` (caption_id, image_id, caption, split). The whole folder is built under a
temporary name and renamed into place, so a failed or interrupted prepare leaves nothing behind.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from mmret import __version__
from mmret.config import PrepareConfig, data_root, to_dict
# importing the readers registers them, in the order the help text lists them
from mmret.datasets import flickr30k  # noqa: F401, I001
from mmret.datasets import coco  # noqa: F401
from mmret.datasets import flickr8k  # noqa: F401
from mmret.datasets import folder  # noqa: F401
from mmret.datasets import example  # noqa: F401
from mmret.datasets.base import (
    READER_HELP, READERS, SPLITS, Problem, assign_random_splits, check_files, clean_captions,
    merge_duplicate_ids, problem_counts, to_tables,
)
from mmret.errors import MmretError
from mmret.io import atomic_dir, read_json, write_json, write_parquet
from mmret.progress import NULL, Reporter

__all__ = ["PrepareResult", "PreparedDataset", "prepare", "load_dataset", "READER_HELP", "SPLITS"]


@dataclass
class PrepareResult:
    name: str
    path: Path
    source: str
    split_note: str
    counts: dict[str, dict[str, int]]  # split -> images, captions, dropped
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def dropped(self) -> dict[str, int]:
        return problem_counts(self.problems)


def _check_target(cfg: PrepareConfig) -> Path:
    target = cfg.data_dir / cfg.name
    if target.exists() and any(target.iterdir()) and not cfg.force:
        raise MmretError(f"dataset {cfg.name!r} already exists at {target}; pass --force to replace it")
    if cfg.source == "example":
        return target
    if cfg.root is None:
        raise MmretError(f"prepare {cfg.source} needs --root: the folder that holds the dataset")
    if not cfg.root.is_dir():
        raise MmretError(f"--root {cfg.root} is not a folder")
    return target


def _counts(images: pd.DataFrame, captions: pd.DataFrame, problems: list[Problem]) -> dict[str, dict[str, int]]:
    counts = {}
    for split in SPLITS:
        dropped = sum(p.kind in ("missing image", "broken image") and p.split == split for p in problems)
        counts[split] = {"images": int((images["split"] == split).sum()),
                         "captions": int((captions["split"] == split).sum()), "dropped images": dropped}
    counts["total"] = {"images": len(images), "captions": len(captions),
                       "dropped images": sum(p.kind in ("missing image", "broken image") for p in problems)}
    return counts


def prepare(cfg: PrepareConfig, reporter: Reporter = NULL) -> PrepareResult:
    """Read a raw dataset, clean and split it, and write `data/<name>/` in one atomic step."""
    if cfg.source not in READERS:
        raise MmretError(f"unknown source {cfg.source!r}; choose one of {', '.join(READERS)}")
    start = time.perf_counter()
    target = _check_target(cfg)
    with atomic_dir(target, replace=cfg.force) as tmp:
        source = READERS[cfg.source](tmp if cfg.source == "example" else cfg.root, cfg)
        problems = source.problems
        records = clean_captions(merge_duplicate_ids(source.images), problems)
        records, sizes = check_files(records, tmp, cfg.check_images, problems, reporter)
        if not records:
            kinds = ", ".join(f"{n} {k}" for k, n in problem_counts(problems).items()) or "no images listed"
            raise MmretError(f"no usable images in {cfg.root}: {kinds}")
        if source.split_sizes is not None:
            assign_random_splits(records, source.split_sizes, cfg.seed)
        images, captions = to_tables(records, sizes)
        counts = _counts(images, captions, problems)
        write_parquet(tmp / "images.parquet", images)
        write_parquet(tmp / "captions.parquet", captions)
        write_json(tmp / "dataset.json", {
            "name": cfg.name, "source": cfg.source, "root": str(cfg.root or target),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "mmret_version": __version__,
            "arguments": to_dict(cfg), "split_note": source.split_note, "annotation_files": source.files,
            "counts": counts, "dropped": problem_counts(problems), "problems": [asdict(p) for p in problems],
        })
    return PrepareResult(cfg.name, target, cfg.source, source.split_note, counts, problems,
                         time.perf_counter() - start)


@dataclass
class PreparedDataset:
    """A prepared dataset read back from `data/<name>/`; `path` columns resolved to absolute paths."""

    name: str
    path: Path
    info: dict
    images: pd.DataFrame
    captions: pd.DataFrame

    def split(self, split: str) -> "PreparedDataset":
        """The images and captions of one split (`all` keeps everything)."""
        if split == "all":
            return self
        if split not in SPLITS:
            raise MmretError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)} or all")
        images = self.images[self.images["split"] == split].reset_index(drop=True)
        captions = self.captions[self.captions["split"] == split].reset_index(drop=True)
        return PreparedDataset(self.name, self.path, self.info, images, captions)


    def with_folds(self, folds: int, fold: int, seed: int = 0, val: float = 0.1) -> "PreparedDataset":
        """Splits for k-fold cross-validation: fold `fold` of a seeded partition of the images is
        test, a seeded `val` fraction of the rest is val, the remainder train."""
        import numpy as np

        ids = np.array(sorted(self.images["image_id"]))
        rng = np.random.default_rng(seed)
        ids = ids[rng.permutation(len(ids))]
        test = set(ids[fold::folds])
        rest = [i for i in ids if i not in test]
        n_val = max(1, round(len(rest) * val))
        split = {i: "test" for i in test} | {i: "val" for i in rest[:n_val]} | {i: "train" for i in rest[n_val:]}
        images = self.images.assign(split=self.images["image_id"].map(split))
        captions = self.captions.assign(split=self.captions["image_id"].map(split))
        return PreparedDataset(self.name, self.path, self.info, images, captions)


def prepared_names(data_dir: Path) -> list[str]:
    if not data_dir.is_dir():
        return []
    return sorted(p.name for p in data_dir.iterdir() if (p / "dataset.json").is_file())


def load_dataset(name: str, data_dir: str | Path | None = None) -> PreparedDataset:
    root = data_root(data_dir)
    path = root / name
    if not (path / "dataset.json").is_file():
        known = prepared_names(root)
        hint = f" (prepared: {', '.join(known)})" if known else ""
        raise MmretError(f"no prepared dataset {name!r} in {root}{hint}; run `mmret prepare` first")
    images = pd.read_parquet(path / "images.parquet")
    images["path"] = [str(path / p) for p in images["path"]]  # absolute paths stay as they are
    return PreparedDataset(name, path, read_json(path / "dataset.json"), images,
                           pd.read_parquet(path / "captions.parquet"))
