"""The batches of each epoch and which of their pairs are right: what `--hard-negatives`,
`--mine-by` and `--same-caption` change (the functions are in `mmret.data.negatives`).

`BatchPlan.batches(epoch)` is a pure function of the training split, its cached features, the
seed and the epoch, so an interrupted run resumes exactly; the neighbours are mined once, when
the plan is made.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmret.data.negatives import batch_positives, hard_negative_batches, mine_neighbours, shared_text_items
from mmret.data.pairs import Batch, epoch_batches

_logger = logging.getLogger(__name__)

NEIGHBOURS = 16  # mined per item; a group takes the nearest of them that are still free


@dataclass
class BatchPlan:
    source: Any  # the training split's source
    train: Any  # TrainConfig
    neighbours: np.ndarray | None = None  # (N, NEIGHBOURS) with --hard-negatives

    @classmethod
    def make(cls, source: Any, train: Any) -> "BatchPlan":
        plan = cls(source, train)
        if train.hard_negatives:
            start = time.perf_counter()
            tables = source.tables
            exclude = shared_text_items(tables.captions_of, tables.caption_key)
            k = max(NEIGHBOURS, train.hard_negatives)
            plan.neighbours = mine_neighbours(source.mining_features(train.mine_by), k, exclude)
            _logger.info("mined %d neighbours of %d items by %s features in %.1fs", k, len(exclude),
                         train.mine_by, time.perf_counter() - start)
        return plan

    def batches(self, epoch: int, min_last: int = 2) -> list[Batch]:
        """The epoch's batches; a last one of fewer than `min_last` pairs joins the one before."""
        t, captions_of = self.train, self.source.tables.captions_of
        if self.neighbours is None:
            return epoch_batches(captions_of, t.batch_size, t.seed, epoch, min_last)
        return hard_negative_batches(captions_of, self.neighbours, t.batch_size, t.hard_negatives, t.seed, epoch,
                                     min_last)

    def positives(self, items: np.ndarray, captions: np.ndarray) -> torch.Tensor | None:
        """(B, B) pairs of the batch the loss counts as right, or None for the diagonal alone."""
        if self.train.same_caption != "positive":
            return None
        tables = self.source.tables
        pos = batch_positives(items, captions, tables.captions_of, tables.caption_key)
        return pos if pos.sum() > len(items) else None  # the diagonal alone: the plain loss is the same and faster
