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


# ---------------------------------------------------------------------------- a run as a query encoder


class RunEncoder:
    """A trained run as an encoder of new captions and pictures (search queries): the frozen
    towers for features methods, or the run's own towers and inputs for pixel methods."""

    def __init__(self, run_dir: Path, which: str = "best", device: str = "auto"):
        from mmret.encoders import load_image_encoder, load_text_encoder
        from mmret.methods import FeatureDims

        cfg = load_run_config(run_dir)
        self.method = get_method(cfg.method.method)
        self.device = pick_device(device)
        self.towers = None
        if self.method.inputs == "features":
            image_enc = load_image_encoder(cfg.encoders.vision)
            text_enc = load_text_encoder(cfg.encoders.text, max_length=cfg.encoders.max_length)
            context: Any = FeatureDims(image_enc.dim, image_enc.token_dim, text_enc.dim)
            self.towers = (image_enc.to(self.device).eval(), text_enc.to(self.device).eval())
            self.transform, self.tokenize = image_enc.transform(), text_enc.tokenize
        else:
            context = self.method.context(cfg, run_dir)
        self.run = load_run_model(run_dir, context, which)
        if self.towers is None:
            _, self.transform, self.tokenize = self.method.inputs_for(cfg, context, None)
            side = getattr(context, "cached", None)  # a frozen tower read from the cache in training
            if side is not None:
                frozen = (context.image if side == "image" else context.text).to(self.device).eval()
                self.towers = (frozen, None) if side == "image" else (None, frozen)
        self.model = self.run.model.to(self.device)

    @torch.inference_mode()
    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        """(Q, D) normalized float32 embeddings of captions or queries."""
        tokens = {k: v.to(self.device) for k, v in self.tokenize(list(texts)).items()}
        if self.towers is not None and self.towers[1] is not None:
            return self.model.encode_text(self.towers[1](**tokens).pooled).float().cpu()
        return self.model.encode_text(**tokens).float().cpu()

    @torch.inference_mode()
    def encode_images(self, paths: list[str | Path]) -> torch.Tensor:
        """(Q, D) normalized float32 embeddings of pictures on disk."""
        from mmret.images import ImageError, load_rgb

        pictures = []
        for path in paths:
            try:
                pictures.append(self.transform(load_rgb(path)))
            except ImageError as e:
                raise MmretError(f"cannot read the query picture {path}: {e}") from None
        pixels = torch.stack(pictures).to(self.device)
        if self.towers is not None and self.towers[0] is not None:
            out = self.towers[0](pixels)
            return self.model.encode_image(out.tokens if self.method.image_tokens else out.pooled).float().cpu()
        return self.model.encode_image(pixels).float().cpu()


def zero_shot_run(model: str, dataset: str, data_dir: Any = None, runs_dir: Any = None) -> Path:
    """The run folder that stands for a pretrained CLIP evaluated as it is (made on first use)."""
    from safetensors.torch import save_file

    from mmret.config import DataConfig, EncoderConfig, MethodConfig
    from mmret.runs import create_run_dir, slug

    cfg = RunConfig(name=f"zeroshot-{slug(model)}", runs_dir=runs_dir, data=DataConfig(dataset=dataset, data_dir=data_dir),
                    encoders=EncoderConfig(vision=model, text=model), method=MethodConfig(method="zeroshot"))
    path = cfg.runs_dir / cfg.name
    if not (path / "config.json").is_file():
        path = create_run_dir(cfg, latest=False)
    best = path / "checkpoints" / "best.safetensors"
    if not best.is_file():
        best.parent.mkdir(parents=True, exist_ok=True)
        save_file({}, str(best), metadata={"mmret": '{"zero_shot": true}'})
    return path
