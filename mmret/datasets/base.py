"""What every reader produces, and the shared steps that turn it into the two parquet tables.

A reader parses one source format into `SourceData`: image records (id, file, captions, the
official split if the source has one) and the problems it met. `build_tables` then cleans the
captions, checks the image files, assigns splits and returns the tables that `prepare` writes.
"""

from __future__ import annotations

import os
import random
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from mmret.errors import MmretError
from mmret.images import IMAGE_EXTENSIONS, ImageError, probe_image
from mmret.progress import NULL, Reporter

SPLITS = ("train", "val", "test")


@dataclass
class ImageRecord:
    image_id: str
    path: str  # absolute, or relative to the dataset folder for files the dataset owns
    captions: list[str]
    split: str | None = None  # the source's official split, if it has one


@dataclass
class Problem:
    kind: str  # short category shown in the summary, e.g. "missing image"
    item: str  # the file, line or image concerned
    reason: str
    split: str | None = None


@dataclass
class SourceData:
    images: list[ImageRecord]
    files: list[str]  # the annotation files that were read
    split_note: str  # where the splits come from, said in the summary
    # a random split for images without an official one: (val, test) fractions, or counts with the
    # dataset size they were set for (Flickr30k: 1014 and 1000 of 31014), scaled down for smaller sets
    split_sizes: tuple[float, float] | tuple[int, int, int] | None = None
    problems: list[Problem] = field(default_factory=list)


Reader = Callable[[Path, "PrepareConfig"], SourceData]  # noqa: F821  (config imported lazily)
READERS: dict[str, Reader] = {}
READER_HELP: dict[str, str] = {}


def register_reader(name: str, help: str) -> Callable[[Reader], Reader]:
    def wrap(fn: Reader) -> Reader:
        READERS[name] = fn
        READER_HELP[name] = help
        return fn

    return wrap


# ---------------------------------------------------------------- helpers for readers


def decode_text(raw: bytes, item: str, problems: list[Problem]) -> str | None:
    """UTF-8 (with or without BOM); else cp1252, reported; else None, reported."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        pass
    try:
        text = raw.decode("cp1252")
    except UnicodeDecodeError:
        problems.append(Problem("caption not UTF-8", item, "undecodable bytes; caption dropped"))
        return None
    problems.append(Problem("caption not UTF-8", item, "read as cp1252 (Windows-1252)"))
    return text


def index_images(root: Path) -> dict[str, Path]:
    """Every image file under `root` by its base name (the first found wins, sorted walk)."""
    found: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                found.setdefault(name, Path(dirpath) / name)
    return found


def find_file(root: Path, names: tuple[str, ...], depth: int = 3) -> Path | None:
    """The first of `names` found in `root` or its sub-folders down to `depth` levels."""
    level = [root]
    for _ in range(depth + 1):
        for folder in level:
            for name in names:
                if (folder / name).is_file():
                    return folder / name
        level = [d for f in level for d in sorted(f.iterdir()) if d.is_dir() and not d.name.startswith(".")]
    return None


def locate(name: str, index: dict[str, Path], root: Path) -> str:
    """Absolute path of an image named in an annotation file; a path under root if not indexed."""
    hit = index.get(Path(name).name)
    return str(hit if hit is not None else root / name)


# ---------------------------------------------------------------- building the tables

_SPACES = re.compile(r"\s+")


def clean_captions(records: list[ImageRecord], problems: list[Problem]) -> list[ImageRecord]:
    """Strip captions, drop empty ones and duplicates within an image, drop images left with none."""
    kept = []
    for rec in records:
        seen, captions = set(), []
        for cap in rec.captions:
            cap = _SPACES.sub(" ", cap).strip()
            if not cap:
                problems.append(Problem("empty caption", rec.image_id, "empty caption dropped", rec.split))
                continue
            key = cap.lower()
            if key in seen:
                problems.append(Problem("duplicate caption", rec.image_id, f"repeated caption dropped: {cap!r}", rec.split))
                continue
            seen.add(key)
            captions.append(cap)
        if captions:
            kept.append(ImageRecord(rec.image_id, rec.path, captions, rec.split))
        else:
            problems.append(Problem("no caption", rec.image_id, "image has no usable caption", rec.split))
    return kept


def merge_duplicate_ids(records: list[ImageRecord]) -> list[ImageRecord]:
    """One record per image id, captions concatenated in order (annotation files list them per row)."""
    merged: dict[str, ImageRecord] = {}
    for rec in records:
        if rec.image_id in merged:
            merged[rec.image_id].captions.extend(rec.captions)
        else:
            merged[rec.image_id] = ImageRecord(rec.image_id, rec.path, list(rec.captions), rec.split)
    return list(merged.values())


def check_files(records: list[ImageRecord], base: Path, full: bool, problems: list[Problem],
                reporter: Reporter = NULL) -> tuple[list[ImageRecord], list[tuple[int, int]]]:
    """Keep records whose image opens (and with `full`, decodes); return them with their sizes."""
    def probe(rec: ImageRecord):
        try:
            return probe_image(base / rec.path, full=full)
        except ImageError as e:
            return e

    kept, sizes = [], []
    with ThreadPoolExecutor(max_workers=8) as pool, reporter.task(
        "checking images" if full else "reading image sizes", total=len(records), unit="img"
    ) as task:
        for rec, result in zip(records, pool.map(probe, records, chunksize=64)):
            task.advance()
            if isinstance(result, ImageError):
                kind = "missing image" if str(result) == "file not found" else "broken image"
                problems.append(Problem(kind, rec.path, str(result), rec.split))
                continue
            kept.append(rec)
            sizes.append(result)
    return kept, sizes


def split_counts(n: int, sizes: tuple) -> tuple[int, int]:
    """Numbers of val and test images out of `n` for fractions or (val, test, reference) counts."""
    if len(sizes) == 3:
        val, test, reference = sizes
        if n > 2 * (val + test):
            return int(val), int(test)
        val, test = val / reference, test / reference
    else:
        val, test = sizes
    n_val, n_test = round(n * val), round(n * test)
    if n >= 3:  # a tiny dataset still gets one image in each requested split
        n_val = max(n_val, 1 if val > 0 else 0)
        n_test = max(n_test, 1 if test > 0 else 0)
    return n_val, n_test


def assign_random_splits(records: list[ImageRecord], sizes: tuple, seed: int) -> None:
    """Seeded split of records without an official split (by image, so captions never leak)."""
    todo = sorted((r for r in records if r.split is None), key=lambda r: r.image_id)
    random.Random(seed).shuffle(todo)
    n_val, n_test = split_counts(len(todo), sizes)
    for i, rec in enumerate(todo):
        rec.split = "test" if i < n_test else "val" if i < n_test + n_val else "train"


def to_tables(records: list[ImageRecord], sizes: list[tuple[int, int]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    order = sorted(range(len(records)), key=lambda i: records[i].image_id)
    images = pd.DataFrame({
        "image_id": [records[i].image_id for i in order],
        "path": [records[i].path for i in order],
        "split": [records[i].split for i in order],
        "width": [sizes[i][0] for i in order],
        "height": [sizes[i][1] for i in order],
    })
    rows = [(records[i].image_id, cap, records[i].split) for i in order for cap in records[i].captions]
    captions = pd.DataFrame(rows, columns=["image_id", "caption", "split"])
    captions.insert(0, "caption_id", range(len(captions)))
    images["width"] = images["width"].astype("int32")
    images["height"] = images["height"].astype("int32")
    return images, captions


def problem_counts(problems: list[Problem]) -> dict[str, int]:
    return dict(sorted(Counter(p.kind for p in problems).items()))


def require(cond: bool, message: str) -> None:
    if not cond:
        raise MmretError(message)
