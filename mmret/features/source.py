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

    def __init__(self, tables: SplitTables, image_feats: CachedFeatures | None, text_feats: CachedFeatures | None,
                 image_tokens: bool = False):
        if image_tokens and image_feats.tokens is None:
            raise MmretError("this method reads image token states, but the image cache holds pooled features only")
        if image_feats is not None:
            rows = image_feats.row_of()
            keep = np.array([i in rows and bool(image_feats.valid[rows[i]]) for i in tables.image_ids], dtype=bool)
        else:
            keep = np.ones(len(tables.image_ids), dtype=bool)
        self.dropped = int((~keep).sum())
        if self.dropped:
            _logger.warning("%d images without features are left out", self.dropped)
        self.tables = tables.keep(keep)
        if image_feats is not None:
            self.image_rows = np.array([rows[i] for i in self.tables.image_ids], dtype=np.int64)
            self.image_array = image_feats.tokens if image_tokens else image_feats.pooled
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

    def image_batch(self, idx: np.ndarray) -> torch.Tensor:
        return self._gather(self.image_array, self.image_rows[idx])  # (B, D) or (B, T, D)

    def text_batch(self, idx: np.ndarray) -> torch.Tensor:
        return self._gather(self.text_array, self.caption_rows[idx])  # (B, D)

    def sample(self, n: int = sample_size, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to `n` item inputs and `n` caption inputs, drawn at random: for input statistics."""
        rng = np.random.default_rng(seed)
        images = rng.choice(self.num_images, min(n, self.num_images), replace=False)
        captions = rng.choice(self.num_captions, min(n, self.num_captions), replace=False)
        return self.image_batch(np.sort(images)), self.text_batch(np.sort(captions))

    def iter_pairs(self, batches: list[Batch], epoch: int = 0):
        """(item inputs, text inputs) of each batch, in order."""
        for images, captions in batches:
            yield self.image_batch(images), self.text_batch(captions)

    def iter_images(self, batch_size: int, rows: Any = None):
        rows = np.arange(self.num_images) if rows is None else np.asarray(rows, dtype=np.int64)
        for a in range(0, len(rows), batch_size):
            yield self.image_batch(rows[a:a + batch_size])
