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

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mmret.common.io import atomic_dir, read_json, write_json
from mmret.common.progress import NULL, Reporter
from mmret.data.prepared import load_dataset
from mmret.features import CAPTIONS, dataset_fingerprint
from mmret.inference.loaded import LoadedRun

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


def open_embeddings(path: Path) -> Embeddings:
    manifest = read_json(path / "manifest.json")
    return Embeddings(path, manifest["dataset"], manifest["split"],
                      np.load(path / "images.npy", mmap_mode="r"), np.load(path / "captions.npy", mmap_mode="r"),
                      pd.read_parquet(path / "images.parquet"), pd.read_parquet(path / "captions.parquet"), manifest)


def _fresh(path: Path, expected: dict) -> bool:
    if not (path / "manifest.json").is_file():
        return False
    manifest = read_json(path / "manifest.json")
    return all(manifest.get(k) == v for k, v in expected.items())


def write_run_embeddings(run: LoadedRun | Path, dataset: str | None = None, split: str = "test", which: str = "best",
                         device: str = "auto", batch_size: int = 256, reporter: Reporter = NULL) -> Embeddings:
    """Embed a split (or `all`) of a dataset (default: the run's) with the run's `which` checkpoint
    (`run` may be a loaded run, whose checkpoint and device then apply)."""
    start = time.perf_counter()
    run = run if isinstance(run, LoadedRun) else LoadedRun(run, which, device)
    cfg = run.cfg
    ds = load_dataset(dataset or cfg.data.dataset, cfg.data.data_dir)
    target = run.run_dir / "embeddings" / f"{ds.name}-{split}"
    expected = {"format": FORMAT, "checkpoint": run.digest, "which": run.which,
                "images_fingerprint": dataset_fingerprint(ds, ds.modality.plural),
                "captions_fingerprint": dataset_fingerprint(ds, CAPTIONS), "split": split,
                "folds": [cfg.data.folds, cfg.data.fold] if ds.name == cfg.data.dataset else [0, 0]}
    if _fresh(target, expected):
        return open_embeddings(target)
    source, images, captions = run.embed(ds, split, batch_size, reporter)
    t = source.tables
    with atomic_dir(target, replace=True) as tmp:
        np.save(tmp / "images.npy", images.numpy().astype(np.float16))
        np.save(tmp / "captions.npy", captions.numpy().astype(np.float16))
        pd.DataFrame({"image_id": t.image_ids, "path": t.paths}).to_parquet(tmp / "images.parquet", index=False)
        pd.DataFrame({"caption_id": t.caption_ids, "image": t.caption_image, "caption": t.captions}).to_parquet(
            tmp / "captions.parquet", index=False)
        write_json(tmp / "manifest.json", {**expected, "dataset": ds.name, "run": run.name, "dim": images.shape[1],
                                           "images": len(images), "captions": len(captions),
                                           "seconds": round(time.perf_counter() - start, 2)})
    return open_embeddings(target)
