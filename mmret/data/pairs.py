"""What a training step and an evaluation see: item-caption pairs of one split.

A source holds the items (pictures, or sounds) of a split, the captions of each item, and turns
row indices into model inputs. `FileSource` reads the files (decoded in DataLoader workers by an
item loader the method gives it) and tokenizes captions; `mmret.features.source.FeatureSource`
reads cached frozen-tower outputs instead. The order of an epoch is a pure function of (seed,
epoch): every item once, shuffled, each with one of its captions drawn at random. That is what
makes a resumed run continue exactly where the interrupted one would have gone.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmret.common.device import default_workers
from mmret.common.paths import Roots
from mmret.data.negatives import caption_keys
from mmret.errors import MmretError
from mmret.modalities import ItemError

Batch = tuple[np.ndarray, np.ndarray]  # (item indices, caption indices) into a source


def epoch_batches(captions_of: list[np.ndarray], batch_size: int, seed: int, epoch: int,
                  min_last: int = 2) -> list[Batch]:
    """Every item once per epoch in a seeded order, each with one random caption of its own.

    A last batch of fewer than `min_last` pairs (one pair has no negatives; on N processes each
    needs two) joins the one before it. The order never depends on anything else, so a run on any
    number of processes sees the same batches.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(captions_of))
    picks = np.array([caps[rng.integers(len(caps))] for caps in captions_of], dtype=np.int64)
    cuts = list(range(0, len(order), batch_size))
    if len(cuts) > 1 and len(order) - cuts[-1] < min_last:
        cuts.pop()
    bounds = cuts[1:] + [len(order)]
    return [(order[a:b], picks[order[a:b]]) for a, b in zip(cuts, bounds)]


def group_captions(caption_item: np.ndarray, n_items: int) -> list[np.ndarray]:
    """Caption indices of each item, from the item index of each caption."""
    order = np.argsort(caption_item, kind="stable")
    counts = np.bincount(caption_item, minlength=n_items)
    return np.split(order, np.cumsum(counts)[:-1])


@dataclass
class SplitTables:
    """The items and captions of one split; `caption_item[j]` is the item index of caption j."""

    item_ids: np.ndarray  # (N,) str
    caption_ids: np.ndarray  # (M,) int
    caption_item: np.ndarray  # (M,) int64 index into item_ids
    captions: list[str]
    paths: list[str]
    roots: Roots = Roots()  # where the item files may be read (the dataset's roots)

    @classmethod
    def from_frames(cls, items: pd.DataFrame, captions: pd.DataFrame, roots: Roots) -> "SplitTables":
        index = {k: i for i, k in enumerate(items["item_id"])}
        captions = captions[captions["item_id"].isin(index)]
        return cls(items["item_id"].to_numpy(), captions["caption_id"].to_numpy(),
                   captions["item_id"].map(index).to_numpy(np.int64), captions["caption"].tolist(),
                   items["path"].tolist(), roots)

    def __post_init__(self) -> None:
        self.captions_of = group_captions(self.caption_item, len(self.item_ids))

    @cached_property
    def caption_key(self) -> np.ndarray:
        """(M,) int64, equal for captions with the same text (see `mmret.data.negatives`)."""
        return caption_keys(self.captions)

    def keep(self, keep: np.ndarray) -> "SplitTables":
        """The tables without the items where `keep` is False (and without their captions)."""
        kept = np.flatnonzero(keep)
        remap = np.full(len(keep), -1, dtype=np.int64)
        remap[kept] = np.arange(len(kept))
        caption_keep = keep[self.caption_item]
        return SplitTables(self.item_ids[keep], self.caption_ids[caption_keep],
                           remap[self.caption_item[caption_keep]],
                           [c for c, k in zip(self.captions, caption_keep) if k],
                           [p for p, k in zip(self.paths, keep) if k], self.roots)


def split_tables(dataset: Any, split: str) -> SplitTables:
    """The tables of one split of a prepared dataset; a split with no items is a one-line error."""
    part = dataset.split(split)
    if part.items.empty:
        how = "smaller --val and --test fractions" if split == "train" else f"a {split} split (e.g. --{split} 0.1)"
        raise MmretError(f"dataset {dataset.name!r} has no {split} {dataset.modality.plural}; prepare it again with "
                         f"{how}, or train with --folds")
    return SplitTables.from_frames(part.items, part.captions, dataset.roots)


def mentions_sides(captions: list[str], share: float = 0.05) -> bool:
    """Whether enough captions say "left" or "right" that a mirrored picture would contradict them."""
    if not captions:
        return False
    hits = sum(("left" in c.lower().split()) or ("right" in c.lower().split()) for c in captions)
    return hits / len(captions) >= share


@dataclass
class NegativeBatch:
    """The extra wrong captions of a batch's captions (`--caption-negatives`), for the loss to count
    as negatives only."""

    inputs: Any  # as `text_batch` gives captions: cached features, or token ids
    owner: np.ndarray  # (n,) int64: the batch row of the caption each one is wrong for


class Source:
    """What every source has: the split's tables, and captions in evaluation order."""

    tables: SplitTables
    sample_size = 128  # rows `sample` draws by default (the input-norm sample of `init_heads`)
    negatives: pd.DataFrame | None = None  # wrong captions of this split's captions (`use_negatives`)

    def use_negatives(self, table: pd.DataFrame) -> None:
        """Bring each caption's wrong captions into its batches: the rows of `table`
        (`mmret.data.composition.negative_table`) that belong to this split's captions."""
        row = {int(c): i for i, c in enumerate(self.tables.caption_ids)}
        mine = table[table["of_caption"].isin(row)].reset_index(drop=True)
        self.negatives = mine
        self.negatives_of = group_captions(mine["of_caption"].map(row).to_numpy(np.int64), self.num_captions)

    def negative_batch(self, captions: np.ndarray) -> NegativeBatch | None:
        """The wrong captions of a batch's captions (`captions`: their rows), or None without them."""
        if self.negatives is None:
            return None
        parts = [self.negatives_of[c] for c in captions]
        rows = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        owner = np.repeat(np.arange(len(captions), dtype=np.int64), [len(p) for p in parts])
        return NegativeBatch(self.negative_inputs(rows), owner)

    def negative_inputs(self, rows: np.ndarray) -> Any:
        """The text inputs of wrong captions (rows of `negatives`)."""
        raise NotImplementedError

    @property
    def num_items(self) -> int:
        return len(self.tables.item_ids)

    @property
    def num_captions(self) -> int:
        return len(self.tables.caption_ids)

    def iter_texts(self, batch_size: int, rows: Any = None):
        """Batches of caption inputs in order: every caption, or the given rows."""
        rows = np.arange(self.num_captions) if rows is None else np.asarray(rows, dtype=np.int64)
        for a in range(0, len(rows), batch_size):
            yield self.text_batch(rows[a:a + batch_size])

    def mining_features(self, by: str = "both") -> np.ndarray:
        """(N, D) float32 per item, whose cosine similarity says which items look alike (hard
        negatives are mined from it): frozen-tower features, where a source has them cached."""
        raise MmretError("--hard-negatives mines neighbours from cached frozen features; this method caches "
                         "none (use heads, bridge, or leave one tower frozen with --tower)")


class _Items(torch.utils.data.Dataset):
    """Decoded, transformed items; keys are (epoch, index) so that augmentation is a pure
    function of (seed, epoch, index) whichever worker runs it."""

    def __init__(self, paths: list[str], load: Any, seed: int):
        self.paths, self.load, self.seed = paths, load, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        epoch, i = key
        torch.manual_seed(hash((self.seed, epoch, i)) & 0x7FFF_FFFF)  # worker-local generator
        try:
            return self.load(self.paths[i])
        except ItemError as e:
            raise MmretError(f"cannot read {self.paths[i]}: {e}; prepare the dataset again with --check-images "
                             "--force to leave broken files out") from None


class FileSource(Source):
    """A split read from its files and captions, for methods that run the towers at every step.

    Items are decoded and transformed in DataLoader workers by item loaders (path -> tensor):
    `train_load` (with random crops and flips, say) for training pairs, `eval_load` for evaluation;
    captions are tokenized in the main process, which is fast next to the towers. A side whose
    tower stays frozen (`cached_side`: item or text) is read from `cached`, a feature source.
    """

    def __init__(self, tables: SplitTables, train_load: Any, eval_load: Any, tokenize: Any, seed: int = 0,
                 workers: int | None = None, pin_memory: bool = False, cached: Source | None = None,
                 cached_side: str | None = None):
        self.cached, self.cached_side = cached, cached_side
        tables = cached.tables if cached is not None else tables
        self.tables, self.tokenize = tables, tokenize
        self.train_items = _Items(tables.paths, train_load.reading(tables.roots), seed)
        self.eval_items = _Items(tables.paths, eval_load.reading(tables.roots), seed)
        self.workers = default_workers(torch.device("cpu")) if workers is None else workers
        self.pin_memory = pin_memory

    def _loader(self, items: _Items, batches: list[list[tuple[int, int]]]):
        # a generator of its own: the loader's seed draw leaves the global generator to the steps, so a run
        # resumed inside an epoch draws what the uninterrupted run drew (items seed their own transforms)
        workers = min(self.workers, len(batches))
        return torch.utils.data.DataLoader(items, batch_sampler=batches, num_workers=workers,
                                           pin_memory=self.pin_memory, persistent_workers=False,
                                           generator=torch.Generator().manual_seed(0))

    def mining_features(self, by: str = "both") -> np.ndarray:
        if self.cached is None:
            return super().mining_features(by)
        return self.cached.mining_features(by)

    def negative_inputs(self, rows: np.ndarray) -> Any:
        if self.cached_side == "text":
            return self.cached.negative_inputs(rows)
        texts = self.negatives["caption"].to_numpy()[rows].tolist()
        tokens = self.tokenize(texts or [""])  # a batch without any: the tokenizer's shape, no rows
        return tokens if texts else {k: v[:0] for k, v in tokens.items()}

    def text_batch(self, idx: np.ndarray) -> Any:
        if self.cached_side == "text":
            return self.cached.text_batch(idx)
        return self.tokenize([self.tables.captions[i] for i in idx])

    def _item_batches(self, items: _Items, keys: list[list[tuple[int, int]]]):
        if self.cached_side == "item":
            return (self.cached.item_batch(np.array([i for _, i in batch])) for batch in keys)
        return self._loader(items, keys)

    def iter_pairs(self, batches: list[Batch], epoch: int = 0):
        keys = [[(epoch, int(i)) for i in items] for items, _ in batches]
        for inputs, (_, captions) in zip(self._item_batches(self.train_items, keys), batches):
            yield inputs, self.text_batch(captions)

    def iter_items(self, batch_size: int, rows: Any = None):
        rows = np.arange(self.num_items) if rows is None else np.asarray(rows, dtype=np.int64)
        keys = [[(0, int(i)) for i in rows[a:a + batch_size]] for a in range(0, len(rows), batch_size)]
        yield from self._item_batches(self.eval_items, keys)

    def sample(self, n: int = Source.sample_size, seed: int = 0) -> tuple[Any, Any]:
        """Up to `n` evaluation inputs of items and of captions, drawn at random."""
        rng = np.random.default_rng(seed)
        items = np.sort(rng.choice(self.num_items, min(n, self.num_items), replace=False))
        captions = np.sort(rng.choice(self.num_captions, min(n, self.num_captions), replace=False))
        inputs = next(iter(self._item_batches(self.eval_items, [[(0, int(i)) for i in items]])))
        return inputs, self.text_batch(captions)
