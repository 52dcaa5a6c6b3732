"""`mmret prepare`: read a raw dataset with its reader and write `data/<ds>/`.

`data/<ds>/` holds `dataset.json`, the item table named after its modality (`images.parquet`:
image_id, path, split, width, height; `audio.parquet`: audio_id, path, split, sample_rate,
channels, duration_ms) and `captions.parquet` (caption_id, image_id or audio_id, caption, split);
in memory the key is `item_id` whatever the modality (see `mmret.data.prepared`).
The whole folder is built under a temporary name and renamed into place, so a failed or
interrupted prepare leaves nothing behind.

With `captions=False` (`--no-captions`) the items are a gallery to search, not pairs to train on:
every item is kept whatever captions it has, the caption table is empty, and every item is in the
test split. A dataset prepared again (`--force`) keeps the caches computed from the old one
(`features/`, `thumbnails/`): their rows are reused item by item wherever the file has not changed
(see `mmret.data.stamps`), so a folder that gained items costs only the new ones.
"""

from __future__ import annotations

import dataclasses
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from mmret.common.version import __version__
from mmret.common.io import atomic_dir, config_dict, write_json, write_parquet
from mmret.common.paths import Roots
from mmret.common.progress import NULL, Reporter
from mmret.data.config import PrepareConfig
from mmret.data.readers import get_reader, pattern_root
from mmret.data.readers.base import SPLITS, ItemRecord, Problem
from mmret.data.tables import (
    assign_random_splits, check_files, clean_captions, inside_root, merge_duplicate_ids, problem_counts, to_tables,
)
from mmret.errors import MmretError
from mmret.modalities import Modality, get_modality


@dataclass
class PrepareResult:
    name: str
    path: Path
    source: str
    split_note: str
    counts: dict[str, dict[str, int]]  # split -> items, captions, dropped items
    problems: list[Problem] = field(default_factory=list)
    seconds: float = 0.0
    modality: str = "image"  # what the items are

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
    if not pattern_root(cfg.source) and not cfg.root.is_dir():
        raise MmretError(f"--root {cfg.root} is not a folder")
    return target


def _counts(items: pd.DataFrame, captions: pd.DataFrame, problems: list[Problem],
            modality: Modality) -> dict[str, dict[str, int]]:
    """Items, captions and dropped items per split."""
    lost = (f"missing {modality.name}", f"broken {modality.name}")
    counts = {}
    for split in SPLITS:
        dropped = sum(p.kind in lost and p.split == split for p in problems)
        counts[split] = {"items": int((items["split"] == split).sum()),
                         "captions": int((captions["split"] == split).sum()), "dropped items": dropped}
    counts["total"] = {"items": len(items), "captions": len(captions),
                       "dropped items": sum(p.kind in lost for p in problems)}
    return counts


CARRIED = ("features", "thumbnails")  # caches whose rows are reused item by item after a new prepare
GALLERY_NOTE = "no captions: every item is in test (a gallery to search, not to train on)"


def _without_captions(records: list[ItemRecord]) -> list[ItemRecord]:
    return [dataclasses.replace(r, captions=[], split="test") for r in records]


def _empty_splits(records: list[ItemRecord], sizes: tuple) -> list[Problem]:
    """A line for each split asked for (a share above 0) that no item landed in: each class, or the
    whole dataset, too small to give it one."""
    shares = {"val": sizes[0], "test": sizes[1]} if len(sizes) == 2 else {}
    return [Problem("empty split", split, f"no {split} items: the dataset (or each of its classes) is too small for "
                                          f"a {share:g} share; add items, or pass --{split} 0")
            for split, share in shares.items() if share > 0 and not any(r.split == split for r in records)]


def _carry_caches(old: Path, new: Path) -> None:
    """Move the caches of the dataset being replaced into its new folder (see the module docstring)."""
    for name in CARRIED:
        if (old / name).is_dir():
            os.replace(old / name, new / name)


def prepare(cfg: PrepareConfig, reporter: Reporter = NULL) -> PrepareResult:
    """Read a raw dataset, clean and split it, and write `data/<name>/` in one atomic step."""
    reader = get_reader(cfg.source)
    start = time.perf_counter()
    target = _check_target(cfg)
    with atomic_dir(target, replace=cfg.force) as tmp:
        source = reader(tmp if cfg.source == "example" else cfg.root, cfg)
        problems, modality = source.problems, get_modality(source.modality)
        records = merge_duplicate_ids(source.items)
        root = tmp if cfg.source == "example" else source.item_root or cfg.root
        if not cfg.allow_outside_root:
            records = inside_root(records, root, problems)
        records = clean_captions(records, problems) if cfg.captions else _without_captions(records)
        roots = Roots.of(tmp, root, anywhere=cfg.allow_outside_root)  # as `PreparedDataset.roots` will be
        records, columns = check_files(records, tmp, cfg.check_items, problems, modality, roots, reporter)
        if not records:
            kinds = ", ".join(f"{n} {k}" for k, n in problem_counts(problems).items()) or f"no {modality.plural} listed"
            hint = ("; --no-captions prepares them as a gallery to search" if any(p.kind == "no caption" for p in problems)
                    else "")
            raise MmretError(f"no usable {modality.plural} in {cfg.root}: {kinds}{hint}")
        if source.split_sizes is not None and cfg.captions:
            assign_random_splits(records, source.split_sizes, cfg.seed)
            problems += _empty_splits(records, source.split_sizes)
        split_note = source.split_note if cfg.captions else GALLERY_NOTE
        items, captions = to_tables(records, columns, modality)
        counts = _counts(items, captions, problems, modality)
        key = {"item_id": modality.id_column}  # each modality names its table and key on disk (see prepared)
        write_parquet(tmp / modality.table, items.rename(columns=key))
        write_parquet(tmp / "captions.parquet", captions.rename(columns=key))
        write_json(tmp / "dataset.json", {
            "name": cfg.name, "source": cfg.source, "modality": modality.name, "root": str(cfg.root or target),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "generation": uuid.uuid4().hex,
            "mmret_version": __version__,
            "arguments": config_dict(cfg), "split_note": split_note, "annotation_files": source.files,
            **({"item_root": source.item_root} if source.item_root else {}),
            **source.info,
            "counts": counts, "dropped": problem_counts(problems), "problems": [asdict(p) for p in problems],
        })
        _carry_caches(target, tmp)
    return PrepareResult(cfg.name, target, cfg.source, split_note, counts, problems,
                         time.perf_counter() - start, modality.name)
