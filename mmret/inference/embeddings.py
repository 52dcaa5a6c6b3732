"""Final embeddings of a trained run: normalized float16 item and caption embeddings of one
dataset split, written once to `runs/<run>/embeddings/<ds>-<split>/` and read memory-mapped by
`eval` and `search`.

The folder holds `images.npy` (N, D) and `captions.npy` (M, D) float16, `images.parquet`
(image_id, path) and `captions.parquet` (caption_id, image, caption; `image` is the row of the
caption's item), and `manifest.json` naming the checkpoint (its digest) and the dataset table
(its fingerprint) they came from: embeddings of another checkpoint or of a re-prepared dataset
are never served as they are.

Reuse by row: both tables carry each row's stamp (`mmret.data.stamps`: an item's file, a
caption's text). When the dataset changed (prepared again after pictures were added to its
folder), the rows of the previous embeddings of the same checkpoint whose stamps still match are
copied and only new or changed rows are embedded. Folders written before stamps existed still
open; they just lend no rows.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmret.common.digest import file_digest
from mmret.common.io import atomic_dir, load_npy, read_json, read_parquet, write_json
from mmret.common.progress import NULL, Reporter
from mmret.data.prepared import load_dataset
from mmret.data.stamps import caption_stamps, item_stamps, match
from mmret.errors import MmretError
from mmret.features import CAPTIONS, dataset_fingerprint
from mmret.inference.loaded import LoadedRun

_logger = logging.getLogger(__name__)

FORMAT = 1


@dataclass
class Embeddings:
    path: Path
    dataset: str
    split: str
    images: np.ndarray  # (N, D) float16, normalized
    captions: np.ndarray  # (M, D) float16, normalized
    image_table: pd.DataFrame  # image_id, path
    caption_table: pd.DataFrame  # caption_id, image (row in images), caption
    manifest: dict

    @property
    def caption_image(self) -> torch.Tensor:
        return torch.tensor(self.caption_table["image"].to_numpy(np.int64))


FILES = ("images.npy", "captions.npy", "images.parquet", "captions.parquet")
FIX = "delete the folder; the embeddings are computed again from the run"


def open_embeddings(path: Path) -> Embeddings:
    manifest = read_json(path / "manifest.json", FIX)
    return Embeddings(path, manifest["dataset"], manifest["split"], load_npy(path / "images.npy", FIX),
                      load_npy(path / "captions.npy", FIX), read_parquet(path / "images.parquet", FIX),
                      read_parquet(path / "captions.parquet", FIX), manifest)


def _digests(path: Path) -> dict[str, str]:
    return {name: file_digest(path / name) for name in FILES}


def _fresh(path: Path, expected: dict) -> bool:
    """Whether the folder holds embeddings of `expected`'s checkpoint and dataset, unchanged since
    written (every file matches the digest in the manifest; they are small)."""
    try:
        manifest = read_json(path / "manifest.json")
        if not all(manifest.get(k) == v for k, v in expected.items()):
            return False
        if "digests" in manifest and manifest["digests"] != _digests(path):
            _logger.warning("%s does not match its checksums; computing the embeddings again", path)
            return False
    except (OSError, ValueError):
        return False
    return True


def identity(run: LoadedRun, ds: Any, split: str) -> dict:
    """What the embeddings of `split` of `ds` by `run` must have been made from to be served as
    they are: the checkpoint's bytes and the dataset's tables (manifest fields)."""
    cfg = run.cfg
    return {"format": FORMAT, "checkpoint": run.digest, "which": run.which,
            "images_fingerprint": dataset_fingerprint(ds, ds.modality.plural),
            "captions_fingerprint": dataset_fingerprint(ds, CAPTIONS), "split": split,
            "folds": [cfg.data.folds, cfg.data.fold] if ds.name == cfg.data.dataset else [0, 0]}


def write_run_embeddings(run: LoadedRun | Path, dataset: str | None = None, split: str = "test", which: str = "best",
                         device: str = "auto", batch_size: int = 256, reporter: Reporter = NULL,
                         data_dir: Path | None = None) -> Embeddings:
    """Embed a split (or `all`) of a dataset (default: the run's, from `data_dir` or the run's data
    root) with the run's `which` checkpoint (`run` may be a loaded run, whose checkpoint and device
    then apply)."""
    start = time.perf_counter()
    run = run if isinstance(run, LoadedRun) else LoadedRun(run, which, device)
    ds = load_dataset(dataset or run.cfg.data.dataset, data_dir or run.cfg.data.data_dir)
    target = run.run_dir / "embeddings" / f"{ds.name}-{split}"
    expected = identity(run, ds, split)
    if _fresh(target, expected):
        return open_embeddings(target)
    source = run.source(ds, split, reporter)
    t = source.tables
    stamps = item_stamps(t.image_ids, t.paths, ds.path), caption_stamps(t.captions)
    old = _previous(target, run.digest)
    (image_from, image_todo), (caption_from, caption_todo) = (
        match(stamps[i], old[i].stamp.to_numpy(object) if old else None) for i in (0, 1))
    new_images, new_captions = run.embed_rows(source, image_todo, caption_todo, batch_size, reporter,
                                              f"{ds.name}-{split}")
    dim = next(x.shape[1] for x in (new_images, new_captions, old[2] if old else None) if x is not None and x.shape[1])
    images = _assemble(image_from, image_todo, new_images, old[2] if old else None, dim)
    captions = _assemble(caption_from, caption_todo, new_captions, old[3] if old else None, dim)
    ds.check_current("embedding")
    with atomic_dir(target, replace=True) as tmp:
        np.save(tmp / "images.npy", images)
        np.save(tmp / "captions.npy", captions)
        pd.DataFrame({"image_id": t.image_ids, "path": t.paths, "stamp": stamps[0]}).to_parquet(
            tmp / "images.parquet", index=False)
        pd.DataFrame({"caption_id": t.caption_ids, "image": t.caption_image, "caption": t.captions,
                      "stamp": stamps[1]}).to_parquet(tmp / "captions.parquet", index=False)
        write_json(tmp / "manifest.json", {**expected, "dataset": ds.name, "run": run.name, "dim": dim,
                                           "images": len(images), "captions": len(captions), "digests": _digests(tmp),
                                           "reused": {"images": len(images) - len(image_todo),
                                                      "captions": len(captions) - len(caption_todo)},
                                           "seconds": round(time.perf_counter() - start, 2)})
    return open_embeddings(target)


def _previous(target: Path, digest: str) -> tuple | None:
    """(item table, caption table, item array, caption array) of the embeddings this checkpoint
    wrote before in `target`, if their rows carry stamps; else None."""
    try:
        old = open_embeddings(target)
        if "digests" in old.manifest and old.manifest["digests"] != _digests(target):
            return None  # damaged since written: lends nothing
    except (OSError, ValueError, KeyError, MmretError):
        return None
    if (old.manifest.get("format") != FORMAT or old.manifest.get("checkpoint") != digest
            or "stamp" not in old.image_table or "stamp" not in old.caption_table):
        return None
    return old.image_table, old.caption_table, old.images, old.captions


def _assemble(found: np.ndarray, todo: np.ndarray, new: torch.Tensor, old: np.ndarray | None, dim: int) -> np.ndarray:
    """(N, dim) float16: row i from old row found[i] where found[i] >= 0, else from the new rows, in order."""
    out = np.empty((len(found), dim), dtype=np.float16)
    kept = np.flatnonzero(found >= 0)
    if len(kept):
        out[kept] = old[found[kept]]
    if len(todo):
        out[todo] = new.numpy().astype(np.float16)
    return out
