"""`mmret precompute-embeddings`: fill the feature caches of a dataset under named frozen towers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mmret.common.progress import NULL, Reporter
from mmret.common.shards import shard_of
from mmret.features.cache import CAPTIONS, CachedFeatures, open_features


@dataclass
class PrecomputeResult:
    dataset: str
    device: str | None  # None: every cache was complete, no tower was loaded
    parts: list[tuple[str, CachedFeatures]]  # (encoder name, features) for items and/or captions, once complete
    seconds: float
    notes: list[str] = field(default_factory=list)  # what was left out and why
    shards: list[tuple[str, Any]] = field(default_factory=list)  # (encoder name, ShardResult) with --shard


def item_views(dataset: Any, count: int, hflip: bool | None = None) -> list[Any]:
    """Views 1..count of a dataset's items (`mmret.features.views.ItemView`); flips unless `hflip` is
    False, or (None) unless its captions say left or right (the rule training follows, so both name
    the same caches)."""
    if not count:
        return []
    from mmret.data.pairs import mentions_sides
    from mmret.features.views import ItemView

    if hflip is None:
        hflip = not mentions_sides(dataset.captions["caption"].tolist())
    return [ItemView(v, hflip=hflip) for v in range(1, count + 1)]


def precompute_embeddings(cfg: Any, reporter: Reporter = NULL) -> PrecomputeResult:
    """`mmret precompute-embeddings`: name the towers (so a bad name fails before any work), then fill
    the item and caption caches. A tower is loaded only when a cache lacks something: with every cache
    complete, nothing is built (see `mmret.features.named`)."""
    from mmret.data.prepared import load_dataset
    from mmret.features.cache import features_root
    from mmret.features.named import named_tower

    start = time.perf_counter()
    dataset = load_dataset(cfg.dataset, cfg.data_dir)
    device = _Device(cfg)  # torch is imported only when something has to be encoded
    towers = []
    if cfg.item:
        encoder = named_tower(features_root(dataset), cfg.item, dataset.modality.name, image_size=cfg.image_size)
        towers.append((dataset.modality.plural, encoder))
    notes = []
    if cfg.text and dataset.captions.empty:
        notes.append(f"{dataset.name} has no captions: the text tower has nothing to encode")
    elif cfg.text:
        towers.append((CAPTIONS, named_tower(features_root(dataset), cfg.text, "text", max_length=cfg.max_length)))
    shard = shard_of(cfg.shard)
    parts, shards = [], []
    for which, named in towers:
        if cfg.finalize or shard is not None:
            from mmret.features.shards import encode_shard, seal_features
        if cfg.finalize:
            parts.append((named.name, seal_features(dataset, named, which, cfg.tokens, cfg.split)))
            continue
        if shard is not None:
            done = encode_shard(dataset, named, which, shard, cfg.tokens, cfg.split, cfg.batch_size, reporter,
                                device(), cfg.precision, cfg.workers, compile=cfg.compile)
            shards.append((named.name, done))
            if done.sealed is not None:
                parts.append((named.name, done.sealed))
            continue
        encoder = _Loaded(named)
        parts.append((named.name, encoder.features(dataset, which, cfg.split, cfg, reporter, device)))
        if which != CAPTIONS:
            parts += [(f"{named.name} view {view.index}", encoder.features(dataset, which, "all", cfg, reporter,
                                                                           device, view))
                      for view in item_views(dataset, cfg.views)]
        encoder.release()
    return PrecomputeResult(dataset.name, device.name, parts, time.perf_counter() - start, notes, shards)


class _Device:
    """The device, picked (and the precision checked against it) the first time a tower is loaded."""

    def __init__(self, cfg: Any):
        self.cfg, self.device = cfg, None

    def __call__(self) -> Any:
        if self.device is None:
            from mmret.common.device import check_precision, pick_device

            self.device = pick_device(self.cfg.device)
            check_precision(self.device, self.cfg.precision, inference=True)
        return self.device

    @property
    def name(self) -> str | None:
        return None if self.device is None else str(self.device)


class _Loaded:
    """A tower loaded with its weights the first time one of its caches lacks something, then kept for
    the others (the plain cache and each augmented view)."""

    def __init__(self, named: Any):
        self.tower = named

    def features(self, dataset: Any, which: str, split: str, cfg: Any, reporter: Reporter, device: Any,
                 view: Any = None) -> CachedFeatures:
        found = open_features(dataset, self.tower, which, cfg.tokens, split, repair=True, view=view)
        if found is not None:
            return found
        from mmret.features.encode import ensure_features

        device = device()
        self.tower = self.tower.with_weights().to(device)
        return ensure_features(dataset, self.tower, which, tokens=cfg.tokens, split=split, batch_size=cfg.batch_size,
                               reporter=reporter, device=device, precision=cfg.precision, workers=cfg.workers,
                               compile=cfg.compile, view=view)

    def release(self) -> None:
        if not self.tower.is_meta:
            self.tower.to("cpu")
