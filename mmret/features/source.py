"""A split read from feature caches: what features methods train and evaluate on.

Pooled or token item features and pooled caption features, memory-mapped float16 read as float32
batches, so a step costs only the trainable part. Items whose features could not be computed
(unreadable files) are left out, and counted.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from mmret.data.pairs import Batch, Source, SplitTables
from mmret.errors import MmretError
from mmret.features.cache import CachedFeatures

_logger = logging.getLogger(__name__)


class FeatureSource(Source):
    """Item and caption inputs gathered from caches by row (either cache may be absent)."""

    sample_size = 4096

    def __init__(self, tables: SplitTables, item_feats: CachedFeatures | None, text_feats: CachedFeatures | None,
                 item_tokens: bool = False):
        if item_tokens and item_feats.tokens is None:
            raise MmretError(f"this method reads token states, but the {item_feats.which} cache holds pooled "
                             "features only")
        if item_feats is not None:
            rows = item_feats.row_of()
            keep = np.array([i in rows and bool(item_feats.valid[rows[i]]) for i in tables.item_ids], dtype=bool)
        else:
            keep = np.ones(len(tables.item_ids), dtype=bool)
        self.dropped = int((~keep).sum())
        if self.dropped:
            _logger.warning("%d %s without features are left out", self.dropped, item_feats.which)
        self.tables = tables.keep(keep)
        self.pooled_array = self.text_array = None
        self.views: list[np.ndarray] = []  # augmented views' arrays (see `use_views`)
        self.item_tokens, self.view_seed = item_tokens, 0
        if item_feats is not None:
            self._ids = item_feats.ids
            self.item_rows = np.array([rows[i] for i in self.tables.item_ids], dtype=np.int64)
            self.item_array = item_feats.tokens if item_tokens else item_feats.pooled
            self.pooled_array = item_feats.pooled
        if text_feats is not None:
            text_rows = text_feats.row_of()
            self.caption_rows = np.array([text_rows[int(c)] for c in self.tables.caption_ids], dtype=np.int64)
            self.text_array = text_feats.pooled

    @staticmethod
    def _gather(array: np.ndarray, rows: np.ndarray) -> torch.Tensor:
        order = np.argsort(rows)  # sorted reads are kind to the page cache; then undo the sort
        values = np.asarray(array[rows[order]], dtype=np.float32)
        out = np.empty_like(values)
        out[order] = values
        return torch.from_numpy(out)

    def item_batch(self, idx: np.ndarray) -> torch.Tensor:
        return self._gather(self.item_array, self.item_rows[idx])  # (B, D) or (B, T, D)

    def text_batch(self, idx: np.ndarray) -> torch.Tensor:
        return self._gather(self.text_array, self.caption_rows[idx])  # (B, D)

    def use_negatives(self, table: Any, features: CachedFeatures | None = None) -> None:
        """Wrong captions, read from `features`: the cache of `table`'s texts (a caption cache of the
        dataset with `table` as its captions, `PreparedDataset.with_captions`)."""
        super().use_negatives(table)
        if features is None:
            raise MmretError("wrong captions of cached captions need a cache of their own texts")
        rows = features.row_of()
        self.negative_rows = np.array([rows[int(c)] for c in self.negatives["caption_id"]], dtype=np.int64)
        self.negative_array = features.pooled

    def negative_inputs(self, rows: np.ndarray) -> torch.Tensor:
        if not len(rows):
            return torch.zeros(0, self.negative_array.shape[1])
        return self._gather(self.negative_array, self.negative_rows[rows])  # (n, D)

    def use_views(self, views: list[CachedFeatures], seed: int = 0) -> None:
        """Train on augmented views too: each epoch every item is read from one of the plain cache
        and `views` (caches of `mmret.features.views.ItemView`s of the same dataset), drawn by
        (seed, epoch). Evaluation and `sample` keep reading the plain cache."""
        for v in views:
            if not np.array_equal(v.ids, self._ids) or (self.item_tokens and v.tokens is None):
                raise MmretError("an augmented view's cache does not match the plain one; compute it again")
        self.views = [v.tokens if self.item_tokens else v.pooled for v in views]
        self.view_seed = seed

    def view_of(self, epoch: int) -> np.ndarray:
        """(N,) which array each item is read from in `epoch`: 0 the plain cache, v the v-th view."""
        rng = np.random.default_rng([self.view_seed, epoch, 2])
        return rng.integers(0, len(self.views) + 1, size=self.num_items)

    def _view_batch(self, idx: np.ndarray, which: np.ndarray) -> torch.Tensor:
        arrays = [self.item_array, *self.views]
        parts = {v: self._gather(arrays[v], self.item_rows[idx[which == v]]) for v in np.unique(which)}
        out = torch.empty((len(idx), *parts[which[0]].shape[1:]))
        for v, values in parts.items():
            out[torch.from_numpy(which == v)] = values
        return out

    def mining_features(self, by: str = "both") -> np.ndarray:
        """Standardised, normalised pooled item features and/or the mean of each item's standardised
        caption features (`by`: item, text, or both where cached), side by side: the cosine of two
        rows is the mean of the two sides' cosines."""
        sides = []
        if by in ("item", "both") and self.pooled_array is not None:
            sides.append(self._gather(self.pooled_array, self.item_rows).numpy())
        if by in ("text", "both") and self.text_array is not None:
            text = _standardise(self._gather(self.text_array, self.caption_rows).numpy())
            sides.append(np.stack([text[caps].mean(0) for caps in self.tables.captions_of]))
        if not sides:
            return super().mining_features(by)
        parts = [_unit(_standardise(x)) for x in sides]
        return np.concatenate(parts, axis=1) / np.sqrt(len(parts))

    def sample(self, n: int = sample_size, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to `n` item inputs and `n` caption inputs, drawn at random: for input statistics."""
        rng = np.random.default_rng(seed)
        items = rng.choice(self.num_items, min(n, self.num_items), replace=False)
        captions = rng.choice(self.num_captions, min(n, self.num_captions), replace=False)
        return self.item_batch(np.sort(items)), self.text_batch(np.sort(captions))

    def iter_pairs(self, batches: list[Batch], epoch: int = 0):
        """(item inputs, text inputs) of each batch, in order (items from their view of the epoch)."""
        view = self.view_of(epoch) if self.views else None
        for items, captions in batches:
            inputs = self.item_batch(items) if view is None else self._view_batch(items, view[items])
            yield inputs, self.text_batch(captions)

    def iter_items(self, batch_size: int, rows: Any = None):
        rows = np.arange(self.num_items) if rows is None else np.asarray(rows, dtype=np.int64)
        for a in range(0, len(rows), batch_size):
            yield self.item_batch(rows[a:a + batch_size])


def _standardise(x: np.ndarray) -> np.ndarray:
    """Per-channel zero mean, unit variance: frozen features share a large common direction that
    would make every pair look alike."""
    return (x - x.mean(0)) / (x.std(0) + 1e-6)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-12)
