"""A prepared dataset read back from `data/<ds>/`: what every step after `prepare` reads.

`load_dataset(name)` gives a `PreparedDataset`: its item table (with `path` resolved to absolute
paths), its caption table, its `dataset.json` and its modality. `split` selects one split;
`with_folds` re-splits it for k-fold cross-validation.

On disk each modality names its item table and key after itself: `images.parquet` with
`image_id` for pictures, `audio.parquet` with `audio_id` for sounds (and the caption table's key
column the same way). Those files are read by people and by their own pandas scripts, where a
column called item_id over sound files would say less. In memory the key is always `item_id`:
one name keeps every later step (pairs, feature caches, embeddings, metrics) blind to the
modality, and renaming it here, the one place that reads the files (and back in `create`, the one
place that writes them), costs nothing. Datasets prepared by any earlier version load unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from mmret.common.io import damaged, read_json, read_parquet
from mmret.common.items import resolve_item
from mmret.common.paths import Roots, check_name, data_root, within
from mmret.data.readers.base import SPLITS
from mmret.data.readers.classes import class_name
from mmret.data.tables import SOURCE
from mmret.errors import MmretError
from mmret.modalities import Modality, get_modality


@dataclass
class PreparedDataset:
    """A prepared dataset read back from `data/<name>/`; `path` columns resolved to absolute paths."""

    name: str
    path: Path
    info: dict
    items: pd.DataFrame  # item_id, path, split, the modality's columns (and label, and source_* fields)
    captions: pd.DataFrame  # caption_id, item_id, caption, split

    @property
    def generation(self) -> str:
        """Which prepare wrote this dataset: a new one each time (`--force` included)."""
        return str(self.info.get("generation") or self.info.get("created", ""))

    def check_current(self, during: str) -> None:
        """Stop with one line when the dataset was prepared again since it was loaded (its files
        may now hold other pictures than the tables read at the start)."""
        try:
            now = read_json(self.path / "dataset.json")
        except (OSError, ValueError):
            now = {}
        if str(now.get("generation") or now.get("created", "")) != self.generation:
            raise MmretError(f"dataset {self.name!r} was prepared again while {during} was reading it; its files no "
                             "longer match the tables read at the start. Run the command again")

    @property
    def roots(self) -> Roots:
        """Where its item files may be read: the dataset folder and the root it was prepared from (or
        the shards' folder), real paths compared, symbolic links followed; anywhere when it was
        prepared with --allow-outside-root."""
        return Roots.of(self.path, self.info.get("item_root") or self.info.get("root"),
                        anywhere=bool(self.info.get("arguments", {}).get("allow_outside_root")))

    @property
    def modality(self) -> Modality:
        """What the items are: `dataset.json`'s modality (image for datasets that do not say)."""
        return get_modality(self.info.get("modality"))

    def sources(self) -> pd.DataFrame:
        """item_id and the source's own fields of each item, named as the source named them (an
        img2dataset shard's `url`, `sha256`, `original_width`, ...; a captions table's other columns);
        just item_id when the source had none."""
        own = [c for c in self.items.columns if c.startswith(SOURCE)]
        return self.items[["item_id", *own]].rename(columns={c: c[len(SOURCE):] for c in own})

    def classes(self) -> tuple[list[str], list[str]]:
        """(labels, names) of the classes zero-shot classification ranks: a CLIP_benchmark set's, all
        of them in its order and named as its classnames.txt names them; else the table's labels,
        sorted, named by `class_name` (`_` and `-` read as spaces)."""
        if self.info.get("class_labels"):
            return list(self.info["class_labels"]), list(self.info["classnames"])
        labels = sorted(set(self.items["label"]))
        return labels, [class_name(label) for label in labels]

    def split(self, split: str) -> "PreparedDataset":
        """The items and captions of one split (`all` keeps everything)."""
        if split == "all":
            return self
        if split not in SPLITS:
            raise MmretError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)} or all")
        items = self.items[self.items["split"] == split].reset_index(drop=True)
        captions = self.captions[self.captions["split"] == split].reset_index(drop=True)
        return PreparedDataset(self.name, self.path, self.info, items, captions)

    def with_folds(self, folds: int, fold: int, seed: int = 0, val: float = 0.1) -> "PreparedDataset":
        """Splits for k-fold cross-validation: fold `fold` of a seeded partition of the items is
        test, a seeded `val` fraction of the rest is val, the remainder train."""
        import numpy as np

        ids = np.array(sorted(self.items["item_id"]))
        rng = np.random.default_rng(seed)
        ids = ids[rng.permutation(len(ids))]
        test = set(ids[fold::folds])
        rest = [i for i in ids if i not in test]
        n_val = max(1, round(len(rest) * val))
        split = {i: "test" for i in test} | {i: "val" for i in rest[:n_val]} | {i: "train" for i in rest[n_val:]}
        items = self.items.assign(split=self.items["item_id"].map(split))
        captions = self.captions.assign(split=self.captions["item_id"].map(split))
        return PreparedDataset(self.name, self.path, self.info, items, captions)


def prepared_names(data_dir: Path) -> list[str]:
    if not data_dir.is_dir():
        return []
    return sorted(p.name for p in data_dir.iterdir() if (p / "dataset.json").is_file())


def load_dataset(name: str, data_dir: str | Path | None = None) -> PreparedDataset:
    root = data_root(data_dir)
    path = root / check_name("--dataset", name)
    if not (path / "dataset.json").is_file():
        known = prepared_names(root)
        hint = f" (prepared: {', '.join(known)})" if known else ""
        raise MmretError(f"no prepared dataset {name!r} in {root}{hint}; run `mmret prepare` first")
    fix = f"prepare the dataset again (mmret prepare ... --name {name} --force)"
    info = read_json(path / "dataset.json", fix)
    modality = get_modality(info.get("modality") if isinstance(info, dict) else None)
    items = read_parquet(path / modality.table, fix)
    captions = read_parquet(path / "captions.parquet", fix)
    key = modality.id_column  # each modality names its key on disk (see the module docstring)
    missing = {key, "path", "split"} - set(items.columns) or {key, "caption", "split"} - set(captions.columns)
    if missing or not isinstance(info, dict):
        raise damaged(path, f"its tables lack {', '.join(sorted(missing)) or 'a dataset.json object'}", fix)
    items, captions = items.rename(columns={key: "item_id"}), captions.rename(columns={key: "item_id"})
    # relative to the dataset folder, or to the shards' folder ("item_root"); absolute paths stay as they are
    item_root = info.get("item_root")
    items["path"] = [resolve_item(Path(item_root) if item_root else path, p, absolute=not item_root)
                     for p in items["path"]]
    _check_within(items["path"], [path, item_root or info.get("root")], info, fix)
    return PreparedDataset(name, path, info, items, captions)


def _check_within(paths: Any, roots: list[Any], info: dict, fix: str) -> None:
    """A table may name files only inside the dataset folder or the root it was prepared from
    (unless it was prepared with --allow-outside-root)."""
    if info.get("arguments", {}).get("allow_outside_root"):
        return
    roots = [r for r in roots if r]
    outside = [p for p in paths if not any(within(p, r) for r in roots)]
    if outside:
        raise MmretError(f"the item table of {roots[0]} names {len(outside)} file(s) outside the dataset's root "
                         f"(e.g. {outside[0]}); {fix}")


def run_tables(cfg: Any, dataset: PreparedDataset) -> PreparedDataset:
    """The dataset with a run's splits: its own, or the run's cross-validation folds (`cfg.data`)."""
    if cfg.data.folds and dataset.name == cfg.data.dataset:
        return dataset.with_folds(cfg.data.folds, cfg.data.fold)
    return dataset
