"""`mmret precompute-embeddings`: fill the feature caches of a dataset under named frozen towers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mmret.common.device import check_precision, pick_device
from mmret.common.progress import NULL, Reporter
from mmret.features.cache import CAPTIONS, CachedFeatures
from mmret.features.encode import ensure_features


@dataclass
class PrecomputeResult:
    dataset: str
    device: str
    parts: list[tuple[str, CachedFeatures]]  # (encoder name, features) for images and/or captions
    seconds: float
    notes: list[str] = field(default_factory=list)  # what was left out and why


def precompute_embeddings(cfg: Any, reporter: Reporter = NULL) -> PrecomputeResult:
    """`mmret precompute-embeddings`: load the dataset and the towers (so a bad name fails before
    any work), then fill the image and caption caches."""
    from mmret.data.prepared import load_dataset
    from mmret.encoders import load_text_encoder, load_tower

    start = time.perf_counter()
    dataset = load_dataset(cfg.dataset, cfg.data_dir)
    device = pick_device(cfg.device)
    check_precision(device, cfg.precision)
    towers = []
    if cfg.vision:
        encoder = load_tower(cfg.vision, dataset.modality.name, image_size=cfg.image_size)
        towers.append((dataset.modality.plural, encoder))
    notes = []
    if cfg.text and dataset.captions.empty:
        notes.append(f"{dataset.name} has no captions: the text tower has nothing to encode")
    elif cfg.text:
        towers.append((CAPTIONS, load_text_encoder(cfg.text, max_length=cfg.max_length)))
    parts = []
    for which, encoder in towers:
        feats = ensure_features(dataset, encoder.to(device), which, tokens=cfg.tokens, split=cfg.split,
                                batch_size=cfg.batch_size, reporter=reporter, device=device,
                                precision=cfg.precision, workers=cfg.workers, compile=cfg.compile)
        parts.append((encoder.name, feats))
        encoder.to("cpu")
    return PrecomputeResult(dataset.name, str(device), parts, time.perf_counter() - start, notes)
