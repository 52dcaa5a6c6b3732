"""The shared steps that turn a reader's records into the two tables `prepare` writes: clean the
captions, check the item files (through their modality), assign splits, and build the frames.
"""

from __future__ import annotations

import dataclasses
import os
import random
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from mmret.common.paths import Roots, within
from mmret.common.progress import NULL, Reporter
from mmret.data.readers.base import ItemRecord, Problem
from mmret.modalities import ItemError, Modality
from mmret.modalities.base import open_source

_SPACES = re.compile(r"\s+")
SOURCE = "source_"  # the item table's columns that hold the source's own fields (`source_url`, ...)


def clean_captions(records: list[ItemRecord], problems: list[Problem]) -> list[ItemRecord]:
    """Strip captions, drop empty ones and duplicates within an item, drop items left with none."""
    kept = []
    for rec in records:
        seen, captions = set(), []
        for cap in rec.captions:
            cap = _SPACES.sub(" ", cap).strip()
            if not cap:
                problems.append(Problem("empty caption", rec.item_id, "empty caption dropped", rec.split))
                continue
            key = cap.lower()
            if key in seen:
                problems.append(Problem("duplicate caption", rec.item_id, f"repeated caption dropped: {cap!r}", rec.split))
                continue
            seen.add(key)
            captions.append(cap)
        if captions:
            kept.append(dataclasses.replace(rec, captions=captions))
        else:
            problems.append(Problem("no caption", rec.item_id, "no usable caption", rec.split))
    return kept


def inside_root(records: list[ItemRecord], root: Path, problems: list[Problem]) -> list[ItemRecord]:
    """The records whose file really lies inside `root`: a path from a table such as `../../x.png`,
    an absolute path elsewhere, and a file or folder inside `root` that is a symbolic link to
    elsewhere are left out unopened, and reported. (Reading goes through `Roots` again, so a link
    put in place later is refused then.)"""
    kept, roots = [], Roots.of(root)
    for rec in records:
        path = Path(root) / rec.path
        real = os.path.realpath(path)
        if within(path, root) and roots.holds(real):
            kept.append(rec)
            continue
        where = f"not inside {root}" if not within(path, root) else f"resolves to {real}, outside {root}"
        problems.append(Problem("outside root", rec.path, f"{where}; left out unopened (pass --allow-outside-root to "
                                                          "include such files)", rec.split))
    return kept


def merge_duplicate_ids(records: list[ItemRecord]) -> list[ItemRecord]:
    """One record per item id, captions concatenated in order (annotation files list them per row)."""
    merged: dict[str, ItemRecord] = {}
    for rec in records:
        if rec.item_id in merged:
            merged[rec.item_id].captions.extend(rec.captions)
        else:
            merged[rec.item_id] = dataclasses.replace(rec, captions=list(rec.captions))
    return list(merged.values())


def check_files(records: list[ItemRecord], base: Path, full: bool, problems: list[Problem], modality: Modality,
                roots: Roots, reporter: Reporter = NULL) -> tuple[list[ItemRecord], list[dict[str, int]]]:
    """Keep records whose file opens through `roots` (and with `full`, decodes); return them with
    their table columns (a picture's width and height, a sound's rate, channels and length). What
    the probe notes about a kept file (a sound mixed down from 8 channels) becomes a problem line too."""
    def probe(rec: ItemRecord):
        if rec.columns is not None:  # probed by the reader, from the bytes it read
            return rec.columns
        try:
            with open_source(base / rec.path, roots) as source:
                return modality.probe(source, full)
        except ItemError as e:
            return e

    kept, columns = [], []
    with ThreadPoolExecutor(max_workers=8) as pool, reporter.task(
        f"checking {modality.plural}" if full else f"reading {modality.name} sizes", total=len(records),
        unit=modality.unit
    ) as task:
        for rec, result in zip(records, pool.map(probe, records, chunksize=64)):
            task.advance()
            if isinstance(result, ItemError):
                kind = f"missing {modality.name}" if str(result) == "file not found" else f"broken {modality.name}"
                problems.append(Problem(kind, rec.path, str(result), rec.split))
                continue
            for kind, reason in result.pop("notes", ()):  # kept, with one line saying what is odd
                problems.append(Problem(kind, rec.path, reason, rec.split))
            kept.append(rec)
            columns.append(result)
    return kept, columns


def split_counts(n: int, sizes: tuple) -> tuple[int, int]:
    """Numbers of val and test items out of `n` for fractions or (val, test, reference) counts."""
    if len(sizes) == 3:
        val, test, reference = sizes
        if n > 2 * (val + test):
            return int(val), int(test)
        val, test = val / reference, test / reference
    else:
        val, test = sizes
    n_val, n_test = round(n * val), round(n * test)
    if n >= 3:  # a tiny dataset still gets one item in each requested split
        n_val = max(n_val, 1 if val > 0 else 0)
        n_test = max(n_test, 1 if test > 0 else 0)
    return n_val, n_test


def assign_random_splits(records: list[ItemRecord], sizes: tuple, seed: int) -> None:
    """Seeded split of records without an official split (by item, so captions never leak).

    Records with class labels are split class by class in the same proportions (stratified), so
    a rare class still reaches val and test; unlabelled records form one group."""
    rng = random.Random(seed)
    todo = [r for r in records if r.split is None]
    for label in sorted({r.label or "" for r in todo}):
        group = sorted((r for r in todo if (r.label or "") == label), key=lambda r: r.item_id)
        rng.shuffle(group)
        n_val, n_test = split_counts(len(group), sizes)
        for i, rec in enumerate(group):
            rec.split = "test" if i < n_test else "val" if i < n_test + n_val else "train"


def to_tables(records: list[ItemRecord], columns: list[dict[str, int]],
              modality: Modality) -> tuple[pd.DataFrame, pd.DataFrame]:
    order = sorted(range(len(records)), key=lambda i: records[i].item_id)
    items = pd.DataFrame({
        "item_id": [records[i].item_id for i in order],
        "path": [records[i].path for i in order],
        "split": [records[i].split for i in order],
    })
    for name in modality.columns:
        items[name] = np.asarray([columns[i][name] for i in order], dtype=np.int32)
    if any(rec.label is not None for rec in records):
        items["label"] = [records[i].label for i in order]
    sources = [records[i].source or {} for i in order]
    for name in sorted({str(k) for s in sources for k in s}):
        items[f"{SOURCE}{name}"] = source_column([s.get(name) for s in sources])
    rows = [(records[i].item_id, cap, records[i].split) for i in order for cap in records[i].captions]
    captions = pd.DataFrame(rows, columns=["item_id", "caption", "split"])
    captions.insert(0, "caption_id", range(len(captions)))
    return items, captions


def source_column(values: list) -> list:
    """A source field's values as one parquet column: numbers and text as they are; nested values
    (img2dataset's exif) as JSON; a column that mixes kinds as text; NaN as missing."""
    import json

    def plain(v):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return None
        if isinstance(v, np.generic):
            v = v.item()
        return json.dumps(v, sort_keys=True, default=str) if isinstance(v, (dict, list, tuple)) else v

    out = [plain(v) for v in values]
    kinds = {type(v) for v in out if v is not None}
    if len(kinds) > 1 and not kinds <= {int, float}:
        out = [None if v is None else str(v) for v in out]
    return out


def problem_counts(problems: list[Problem]) -> dict[str, int]:
    return dict(sorted(Counter(p.kind for p in problems).items()))
