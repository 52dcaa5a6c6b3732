"""Final embeddings of a trained run: normalized float16 image and caption embeddings of one
dataset split, written once to `runs/<run>/embeddings/<ds>-<split>/` and read memory-mapped by
`eval` and `search`.

The folder holds `images.npy` (N, D) and `captions.npy` (M, D) float16, `images.parquet`
(image_id, path) and `captions.parquet` (caption_id, image, caption; `image` is the row of the
caption's image), and `manifest.json` naming the checkpoint (its digest) and the dataset table
(its fingerprint) they came from: embeddings of another checkpoint or of a re-prepared dataset
are never reused.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from mmret.checkpoint import load_weights
from mmret.config import RunConfig
from mmret.device import autocast_context, pick_device
from mmret.errors import MmretError
from mmret.io import atomic_dir, read_json, write_json
from mmret.methods import Method, get_method
from mmret.progress import NULL, Reporter
from mmret.runs import load_run_config

FORMAT = 1


@dataclass
class RunModel:
    """A run's model rebuilt from its config, with a checkpoint's trainable weights loaded."""

    run_dir: Path
    cfg: RunConfig
    method: Method
    model: nn.Module
    checkpoint: Path
    digest: str  # identifies the checkpoint's bytes


def checkpoint_path(run_dir: Path, which: str = "best") -> Path:
    path = run_dir / "checkpoints" / f"{which}.safetensors"
    if not path.is_file():
        raise MmretError(f"run {run_dir.name} has no {which} checkpoint yet; train it (or --resume it) first")
    return path


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_run_model(run_dir: Path, context: Any, which: str = "best") -> RunModel:
    """Rebuild the run's model for `context` (its feature widths) and load its weights."""
    cfg = load_run_config(run_dir)
    method = get_method(cfg.method.method)
    model = method.build(cfg, context)
    path = checkpoint_path(run_dir, which)
    load_weights(model, path)
    return RunModel(run_dir, cfg, method, model.eval(), path, file_digest(path))


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
        return torch.from_numpy(self.caption_table["image"].to_numpy(np.int64))


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


def write_run_embeddings(run_dir: Path, dataset: str | None = None, split: str = "test", which: str = "best",
                         device: str = "auto", batch_size: int = 256, reporter: Reporter = NULL) -> Embeddings:
    """Embed a split (or `all`) of a dataset (default: the run's) with the run's `which` checkpoint."""
    from mmret.datasets import load_dataset
    from mmret.features import dataset_fingerprint
    from mmret.pairs import split_sources
    from mmret.train import embed_source

    start = time.perf_counter()
    cfg = load_run_config(run_dir)
    method = get_method(cfg.method.method)
    ds = load_dataset(dataset or cfg.data.dataset, cfg.data.data_dir)
    target = run_dir / "embeddings" / f"{ds.name}-{split}"
    dev = pick_device(device)
    expected = {"format": FORMAT, "checkpoint": file_digest(checkpoint_path(run_dir, which)), "which": which,
                "images_fingerprint": dataset_fingerprint(ds, "images"),
                "captions_fingerprint": dataset_fingerprint(ds, "captions"), "split": split,
                "folds": [cfg.data.folds, cfg.data.fold] if ds.name == cfg.data.dataset else [0, 0]}
    if _fresh(target, expected):
        return open_embeddings(target)
    (source,), context = split_sources(cfg, method, ds, (split,), dev, reporter, run_dir)
    rm = load_run_model(run_dir, context, which)
    rm.model.to(dev)
    with reporter.task(f"embedding {ds.name}-{split}", total=source.num_images + source.num_captions, unit="rows") as task:
        images, captions = embed_source(rm.model, source, batch_size, dev, lambda: autocast_context(dev, "fp32"))
        task.advance(source.num_images + source.num_captions)
    t = source.tables
    with atomic_dir(target, replace=True) as tmp:
        np.save(tmp / "images.npy", images.numpy().astype(np.float16))
        np.save(tmp / "captions.npy", captions.numpy().astype(np.float16))
        pd.DataFrame({"image_id": t.image_ids, "path": t.paths}).to_parquet(tmp / "images.parquet", index=False)
        pd.DataFrame({"caption_id": t.caption_ids, "image": t.caption_image, "caption": t.captions}).to_parquet(
            tmp / "captions.parquet", index=False)
        write_json(tmp / "manifest.json", {**expected, "dataset": ds.name, "run": run_dir.name, "dim": images.shape[1],
                                           "images": len(images), "captions": len(captions),
                                           "seconds": round(time.perf_counter() - start, 2)})
    return open_embeddings(target)
