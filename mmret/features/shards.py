"""One feature cache filled by many processes: `precompute-embeddings --shard i/N` on N machines or
GPUs (or under torchrun, one shard a process) each encode the cache shards whose number is i mod
N into `parts/`, and whoever finds every shard encoded seals the cache (`--finalize` seals it on
its own). A process that was killed runs again and encodes only the shards it has no part for.
The layout, the locks and the seal are `mmret.features.cache`'s; this module only divides the work.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmret.common.progress import NULL, Reporter
from mmret.common.shards import Shard
from mmret.errors import MmretError
from mmret.features.cache import (
    CachedFeatures,
    EncodeStats,
    FeatureCache,
    _read_manifest,
    _split_shards,
    _view,
    cache_rows,
    dataset_fingerprint,
    feature_key,
    features_root,
    open_features,
)
from mmret.features.encode import SHARD_ROWS, _Job, _kind, shard_batches, tower_precision
from mmret.features.runner import choose_precision

_logger = logging.getLogger(__name__)


@dataclass
class ShardResult:
    which: str
    path: Path
    shard: Shard
    encoded: list[int]  # cache shards this process encoded now
    missing: list[int]  # cache shards nobody has encoded yet (for the split)
    stats: EncodeStats = field(default_factory=EncodeStats)
    sealed: CachedFeatures | None = None  # the cache, once complete (this process sealed it, or found it so)


class _PartWriter:
    """Rows of whole cache shards, held until a shard is complete and then written as its part."""

    def __init__(self, cache: FeatureCache, shards: list[int], ids: np.ndarray):
        self.cache, self.ids = cache, ids
        self.bounds = {j: tuple(cache.manifest["shards"][j]) for j in shards}
        self.left = {j: b - a for j, (a, b) in self.bounds.items()}
        self.values: dict[int, dict[str, np.ndarray]] = {}
        self.failed: dict[int, dict[str, str]] = {}

    def record(self, idx: np.ndarray, values: dict[str, np.ndarray], reasons: list[str]) -> int:
        j = next(j for j, (a, b) in self.bounds.items() if a <= idx[0] < b)  # a batch never crosses shards
        a, b = self.bounds[j]
        buf = self.values.setdefault(j, {n: np.empty((b - a, *v.shape[1:]), v.dtype) for n, v in values.items()})
        for name, value in values.items():
            buf[name][idx - a] = value
        bad = {str(self.ids[r]): why for r, why in zip(idx.tolist(), reasons) if why}
        self.failed.setdefault(j, {}).update(bad)
        self.left[j] -= len(idx)
        if self.left[j] == 0:
            self.cache.write_part(j, self.values.pop(j), self.failed.pop(j))
        return len(bad)


def _fix_precision(job: _Job, cache: FeatureCache, first: np.ndarray) -> None:
    """Decide the cache's precision once, under the lock, so every shard encodes in the same one."""
    manifest = cache.manifest
    if manifest["precision"] is None:
        if job.precision != "auto":
            manifest["precision"], manifest["precision_reason"] = job.precision, f"{job.precision}: requested"
        else:
            _, inputs, _ = next(iter(job.batches([first])))
            choice, _ = choose_precision(job.encoder, inputs, job.device)
            manifest["precision"], manifest["precision_reason"] = choice.precision, choice.reason
        cache.save()
    job.precision = "auto"  # from here on the manifest's precision holds for this process too


def _pending(cache: FeatureCache, split: str) -> list[int]:
    encoded = set(cache.manifest["done"]) | set(cache.parts())
    return [j for j in _split_shards(cache.manifest, split) if j not in encoded]


def _seal_if_complete(cache: FeatureCache, split: str, tokens: bool) -> tuple[list[int], CachedFeatures | None]:
    with cache.locked(wait=True):
        manifest = _read_manifest(cache.path)
        if manifest is None or not cache.open(manifest):
            raise MmretError(f"the feature cache {cache.path} is damaged; delete it and encode again")
        missing = _pending(cache, split)
        if missing:
            cache.arrays = {}
            return missing, None
        cache.absorb_parts()
        cache.arrays = {}
    return [], _view(cache.path, cache.manifest, split, tokens)


def encode_shard(dataset: Any, encoder: Any, which: str, shard: Shard, tokens: bool = False, split: str = "all",
                 batch_size: int | str = "auto", reporter: Reporter = NULL, device: Any = None,
                 precision: str = "auto", workers: int | None = None, shard_rows: int | None = None,
                 compile: bool | None = None) -> ShardResult:
    """Encode this process's cache shards of `dataset`'s `which` (those numbered index mod count),
    then seal the cache if no shard is missing any more."""
    rows = cache_rows(dataset, which)
    fingerprint = dataset_fingerprint(dataset, which)
    path = features_root(dataset) / feature_key(encoder, dataset, which, tokens, fingerprint)
    found = open_features(dataset, encoder, which, tokens, split, fingerprint)
    if found is not None:
        return ShardResult(which, found.path, shard, [], [], found.stats, found)
    encoder = encoder.with_weights()
    device = torch.device(device) if device is not None else encoder.device
    precision = tower_precision(device, precision, which)
    job = _Job(dataset, encoder.to(device), which, tokens, split, rows, fingerprint, device, precision,
               batch_size, workers, shard_rows or SHARD_ROWS[_kind(which)], reporter, compile)
    cache = FeatureCache(path)
    index, count = shard
    with cache.locked(wait=True):
        job.prepare(cache)
        mine = [j for j in _pending(cache, split) if j % count == index]
        size = job.resolved_batch_size()
        _fix_precision(job, cache,
                       shard_batches(cache.manifest, mine or _split_shards(cache.manifest, split)[:1], size)[0])
        cache.arrays = {}
    stats = job.stats(cache.manifest, mine, size)
    if mine:
        _logger.info("shard %d/%d of %s: %d cache shards to encode", index, count, path.name, len(mine))
        job.encode(cache, _PartWriter(cache, mine, job.ids).record, shard_batches(cache.manifest, mine, size), stats)
    missing, sealed = _seal_if_complete(cache, split, tokens)
    if sealed is not None:
        sealed.stats = stats
    return ShardResult(which, path, shard, mine, missing, stats, sealed)


def seal_features(dataset: Any, encoder: Any, which: str, tokens: bool = False, split: str = "all") -> CachedFeatures:
    """`--finalize`: seal a cache every shard of which has been encoded; a one-line error naming
    the shards still missing otherwise."""
    found = open_features(dataset, encoder, which, tokens, split)
    if found is not None:
        return found
    path = features_root(dataset) / feature_key(encoder, dataset, which, tokens)
    if _read_manifest(path) is None:
        raise MmretError(f"no {which} cache of {encoder.name} to finalize in {path.parent}; encode it first "
                         "(precompute-embeddings --shard i/N)")
    missing, sealed = _seal_if_complete(FeatureCache(path), split, tokens)
    if sealed is None:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise MmretError(f"{len(missing)} {which} cache shards are not encoded yet ({shown}); run the --shard "
                         "processes that own them again (a killed one resumes), then --finalize")
    return sealed
