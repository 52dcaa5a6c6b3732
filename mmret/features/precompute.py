"""`mmret precompute-embeddings`: fill the feature caches of a dataset under named frozen towers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mmret.common.device import check_precision, pick_device
from mmret.common.progress import NULL, Reporter
from mmret.common.shards import shard_of
from mmret.data.pairs import mentions_sides
from mmret.features.cache import CAPTIONS, CachedFeatures
from mmret.features.encode import ensure_features
from mmret.features.views import ItemView


@dataclass
class PrecomputeResult:
    dataset: str
    device: str
    parts: list[tuple[str, CachedFeatures]]  # (encoder name, features) for items and/or captions, once complete
    seconds: float
    notes: list[str] = field(default_factory=list)  # what was left out and why
    shards: list[tuple[str, Any]] = field(default_factory=list)  # (encoder name, ShardResult) with --shard


def item_views(dataset: Any, count: int, hflip: bool | None = None) -> list[ItemView]:
    """Views 1..count of a dataset's items; flips unless `hflip` is False, or (None) unless its
    captions say left or right (the rule training follows, so both name the same caches)."""
    if hflip is None:
        hflip = not mentions_sides(dataset.captions["caption"].tolist())
    return [ItemView(v, hflip=hflip) for v in range(1, count + 1)]


def precompute_embeddings(cfg: Any, reporter: Reporter = NULL) -> PrecomputeResult:
    """`mmret precompute-embeddings`: load the dataset and the towers (so a bad name fails before
    any work), then fill the item and caption caches."""
    from mmret.data.prepared import load_dataset
    from mmret.encoders import load_text_encoder, load_tower

    start = time.perf_counter()
    dataset = load_dataset(cfg.dataset, cfg.data_dir)
    device = pick_device(cfg.device)
    check_precision(device, cfg.precision, inference=True)
    towers = []
    if cfg.item:
        encoder = load_tower(cfg.item, dataset.modality.name, image_size=cfg.image_size)
        towers.append((dataset.modality.plural, encoder))
    notes = []
    if cfg.text and dataset.captions.empty:
        notes.append(f"{dataset.name} has no captions: the text tower has nothing to encode")
    elif cfg.text:
        towers.append((CAPTIONS, load_text_encoder(cfg.text, max_length=cfg.max_length)))
    from mmret.features.shards import encode_shard, seal_features

    shard = shard_of(cfg.shard)
    parts, shards = [], []
    for which, encoder in towers:
        if cfg.finalize:
            parts.append((encoder.name, seal_features(dataset, encoder, which, cfg.tokens, cfg.split)))
            continue
        if shard is not None:
            done = encode_shard(dataset, encoder.to(device), which, shard, cfg.tokens, cfg.split, cfg.batch_size,
                                reporter, device, cfg.precision, cfg.workers,
                                compile=cfg.compile)
            shards.append((encoder.name, done))
            if done.sealed is not None:
                parts.append((encoder.name, done.sealed))
        else:
            parts.append((encoder.name, ensure_features(dataset, encoder.to(device), which, tokens=cfg.tokens,
                                                        split=cfg.split, batch_size=cfg.batch_size, reporter=reporter,
                                                        device=device, precision=cfg.precision, workers=cfg.workers,
                                                        compile=cfg.compile)))
            if which != CAPTIONS:
                parts += [(f"{encoder.name} view {view.index}", ensure_features(
                    dataset, encoder.to(device), which, tokens=cfg.tokens, batch_size=cfg.batch_size,
                    reporter=reporter, device=device, precision=cfg.precision, workers=cfg.workers,
                    compile=cfg.compile, view=view)) for view in item_views(dataset, cfg.views)]
        encoder.to("cpu")
    return PrecomputeResult(dataset.name, str(device), parts, time.perf_counter() - start, notes, shards)
