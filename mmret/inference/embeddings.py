"""Final embeddings of a trained run: normalized float16 item and caption embeddings of one
dataset split, written once to `runs/<run>/embeddings/<ds>-<split>/` and read memory-mapped by
`eval` and `search`.

The folder holds `images.npy` (N, D) and `captions.npy` (M, D) float16, `images.parquet`
(image_id, path) and `captions.parquet` (caption_id, image, caption; `image` is the row of the
caption's item), and `manifest.json` naming the checkpoint (its digest) and the dataset table
(its fingerprint) they came from: embeddings of another checkpoint or of a re-prepared dataset
are never reused.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mmret.common.digest import file_digest
from mmret.common.io import atomic_dir, load_npy, read_json, read_parquet, write_json
from mmret.common.progress import NULL, Reporter
from mmret.data.prepared import load_dataset
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


def write_run_embeddings(run: LoadedRun | Path, dataset: str | None = None, split: str = "test", which: str = "best",
                         device: str = "auto", batch_size: int = 256, reporter: Reporter = NULL,
                         data_dir: Path | None = None) -> Embeddings:
    """Embed a split (or `all`) of a dataset (default: the run's, from `data_dir` or the run's data
    root) with the run's `which` checkpoint (`run` may be a loaded run, whose checkpoint and device
    then apply)."""
    start = time.perf_counter()
    run = run if isinstance(run, LoadedRun) else LoadedRun(run, which, device)
    cfg = run.cfg
    ds = load_dataset(dataset or cfg.data.dataset, data_dir or cfg.data.data_dir)
    target = run.run_dir / "embeddings" / f"{ds.name}-{split}"
    expected = {"format": FORMAT, "checkpoint": run.digest, "which": run.which,
                "images_fingerprint": dataset_fingerprint(ds, ds.modality.plural),
                "captions_fingerprint": dataset_fingerprint(ds, CAPTIONS), "split": split,
                "folds": [cfg.data.folds, cfg.data.fold] if ds.name == cfg.data.dataset else [0, 0]}
    if _fresh(target, expected):
        return open_embeddings(target)
    source, images, captions = run.embed(ds, split, batch_size, reporter)
    ds.check_current("embedding")
    t = source.tables
    with atomic_dir(target, replace=True) as tmp:
        np.save(tmp / "images.npy", images.numpy().astype(np.float16))
        np.save(tmp / "captions.npy", captions.numpy().astype(np.float16))
        pd.DataFrame({"image_id": t.image_ids, "path": t.paths}).to_parquet(tmp / "images.parquet", index=False)
        pd.DataFrame({"caption_id": t.caption_ids, "image": t.caption_image, "caption": t.captions}).to_parquet(
            tmp / "captions.parquet", index=False)
        write_json(tmp / "manifest.json", {**expected, "dataset": ds.name, "run": run.name, "dim": images.shape[1],
                                           "images": len(images), "captions": len(captions), "digests": _digests(tmp),
                                           "seconds": round(time.perf_counter() - start, 2)})
    return open_embeddings(target)
