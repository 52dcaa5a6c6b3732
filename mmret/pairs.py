"""What a training step and an evaluation see: image-caption pairs of one split.

A source holds the images of a split, the captions of each image, and turns row indices into
model inputs. `FeatureSource` reads cached frozen-tower outputs (memory-mapped float16), so a
step costs only the trainable part. The order of an epoch is a pure function of (seed, epoch):
every image once, shuffled, each with one of its captions drawn at random. That is what makes a
resumed run continue exactly where the interrupted one would have gone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmret.errors import MmretError
from mmret.features import CachedFeatures
from mmret.methods import FeatureDims

_logger = logging.getLogger(__name__)

Batch = tuple[np.ndarray, np.ndarray]  # (image indices, caption indices) into a source


def epoch_batches(captions_of: list[np.ndarray], batch_size: int, seed: int, epoch: int) -> list[Batch]:
    """Every image once per epoch in a seeded order, each with one random caption of its own.

    A last batch of a single pair (no negatives) joins the one before it.
    """
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(captions_of))
    picks = np.array([caps[rng.integers(len(caps))] for caps in captions_of], dtype=np.int64)
    cuts = list(range(0, len(order), batch_size))
    if len(cuts) > 1 and len(order) - cuts[-1] < 2:
        cuts.pop()
    bounds = cuts[1:] + [len(order)]
    return [(order[a:b], picks[order[a:b]]) for a, b in zip(cuts, bounds)]


def group_captions(caption_image: np.ndarray, n_images: int) -> list[np.ndarray]:
    """Caption indices of each image, from the image index of each caption."""
    order = np.argsort(caption_image, kind="stable")
    counts = np.bincount(caption_image, minlength=n_images)
    return np.split(order, np.cumsum(counts)[:-1])


@dataclass
class SplitTables:
    """The images and captions of one split; `caption_image[j]` is the image index of caption j."""

    image_ids: np.ndarray  # (N,) str
    caption_ids: np.ndarray  # (M,) int
    caption_image: np.ndarray  # (M,) int64 index into image_ids
    captions: list[str]
    paths: list[str]

    @classmethod
    def from_frames(cls, images: pd.DataFrame, captions: pd.DataFrame) -> "SplitTables":
        index = {k: i for i, k in enumerate(images["image_id"])}
        captions = captions[captions["image_id"].isin(index)]
        return cls(images["image_id"].to_numpy(), captions["caption_id"].to_numpy(),
                   captions["image_id"].map(index).to_numpy(np.int64), captions["caption"].tolist(),
                   images["path"].tolist())

    def __post_init__(self) -> None:
        self.captions_of = group_captions(self.caption_image, len(self.image_ids))


class Source:
    """What every source has: the split's tables, and captions in evaluation order."""

    tables: SplitTables

    @property
    def num_images(self) -> int:
        return len(self.tables.image_ids)

    @property
    def num_captions(self) -> int:
        return len(self.tables.caption_ids)

    def iter_texts(self, batch_size: int):
        for a in range(0, self.num_captions, batch_size):
            yield self.text_batch(np.arange(a, min(a + batch_size, self.num_captions)))


class FeatureSource(Source):
    """A split read from feature caches: pooled or token image features, pooled caption features.

    Images whose features could not be computed (unreadable files) are left out, and counted.
    """

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
        images_kept = np.flatnonzero(keep)
        remap = np.full(len(keep), -1, dtype=np.int64)
        remap[images_kept] = np.arange(len(images_kept))
        caption_keep = keep[tables.caption_image]
        self.tables = SplitTables(tables.image_ids[keep], tables.caption_ids[caption_keep],
                                  remap[tables.caption_image[caption_keep]],
                                  [c for c, k in zip(tables.captions, caption_keep) if k],
                                  [p for p, k in zip(tables.paths, keep) if k])
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

    def sample(self, n: int = 4096, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Up to `n` image inputs and `n` caption inputs, drawn at random: for input statistics."""
        rng = np.random.default_rng(seed)
        images = rng.choice(self.num_images, min(n, self.num_images), replace=False)
        captions = rng.choice(self.num_captions, min(n, self.num_captions), replace=False)
        return self.image_batch(np.sort(images)), self.text_batch(np.sort(captions))

    def iter_pairs(self, batches: list[Batch], epoch: int = 0):
        """(image inputs, text inputs) of each batch, in order."""
        for images, captions in batches:
            yield self.image_batch(images), self.text_batch(captions)

    def iter_images(self, batch_size: int):
        for a in range(0, self.num_images, batch_size):
            yield self.image_batch(np.arange(a, min(a + batch_size, self.num_images)))


# ---------------------------------------------------------------------------- pixels and tokens


class _Pictures(torch.utils.data.Dataset):
    """Decoded, transformed pictures; keys are (epoch, index) so that augmentation is a pure
    function of (seed, epoch, index) whichever worker runs it."""

    def __init__(self, paths: list[str], transform: Any, seed: int):
        self.paths, self.transform, self.seed = paths, transform, seed

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        from mmret.images import ImageError, load_rgb

        epoch, i = key
        try:
            img = load_rgb(self.paths[i])
        except ImageError as e:
            raise MmretError(f"cannot read {self.paths[i]}: {e}; prepare the dataset again with --check-images "
                             "--force to leave broken pictures out") from None
        torch.manual_seed(hash((self.seed, epoch, i)) & 0x7FFF_FFFF)  # worker-local generator
        return self.transform(img)


def default_workers() -> int:
    import os

    return max(0, min(4, (os.cpu_count() or 1) - 1))


class PixelSource(Source):
    """A split read as pictures and token ids, for methods that run the towers at every step.

    Pictures are decoded and transformed in DataLoader workers (`train_transform` with random
    crops and flips for training pairs, `eval_transform` for evaluation); captions are tokenized
    in the main process, which is fast next to the towers.
    """

    def __init__(self, tables: SplitTables, train_transform: Any, eval_transform: Any,
                 tokenize: Any, seed: int = 0, workers: int | None = None, pin_memory: bool = False,
                 cached: FeatureSource | None = None, cached_side: str | None = None):
        # a frozen side (`cached_side`: image or text) is read from the feature cache instead
        self.cached, self.cached_side = cached, cached_side
        tables = cached.tables if cached is not None else tables
        self.tables, self.tokenize = tables, tokenize
        self.train_pictures = _Pictures(tables.paths, train_transform, seed)
        self.eval_pictures = _Pictures(tables.paths, eval_transform, seed)
        self.workers = default_workers() if workers is None else workers
        self.pin_memory = pin_memory

    def _loader(self, pictures: _Pictures, batches: list[list[tuple[int, int]]]):
        workers = min(self.workers, len(batches))
        return torch.utils.data.DataLoader(pictures, batch_sampler=batches, num_workers=workers,
                                           pin_memory=self.pin_memory, persistent_workers=False)

    def text_batch(self, idx: np.ndarray) -> Any:
        if self.cached_side == "text":
            return self.cached.text_batch(idx)
        return self.tokenize([self.tables.captions[i] for i in idx])

    def _image_batches(self, pictures: _Pictures, keys: list[list[tuple[int, int]]]):
        if self.cached_side == "image":
            return (self.cached.image_batch(np.array([i for _, i in batch])) for batch in keys)
        return self._loader(pictures, keys)

    def iter_pairs(self, batches: list[Batch], epoch: int = 0):
        keys = [[(epoch, int(i)) for i in images] for images, _ in batches]
        for pixels, (_, captions) in zip(self._image_batches(self.train_pictures, keys), batches):
            yield pixels, self.text_batch(captions)

    def iter_images(self, batch_size: int):
        keys = [[(0, i) for i in range(a, min(a + batch_size, self.num_images))]
                for a in range(0, self.num_images, batch_size)]
        yield from self._image_batches(self.eval_pictures, keys)

    def sample(self, n: int = 128, seed: int = 0) -> tuple[Any, Any]:
        """Up to `n` evaluation inputs of pictures and of captions, drawn at random."""
        rng = np.random.default_rng(seed)
        images = np.sort(rng.choice(self.num_images, min(n, self.num_images), replace=False))
        captions = np.sort(rng.choice(self.num_captions, min(n, self.num_captions), replace=False))
        pixels = next(iter(self._image_batches(self.eval_pictures, [[(0, int(i)) for i in images]])))
        return pixels, self.text_batch(captions)


def mentions_sides(captions: list[str], share: float = 0.05) -> bool:
    """Whether enough captions say "left" or "right" that a mirrored picture would contradict them."""
    if not captions:
        return False
    hits = sum(("left" in c.lower().split()) or ("right" in c.lower().split()) for c in captions)
    return hits / len(captions) >= share


# ---------------------------------------------------------------------------- a run's data


@dataclass
class RunData:
    train: Any  # a source: FeatureSource (or a pixel source for methods that run the towers)
    val: Any
    context: Any  # what the method's `build` takes: FeatureDims, or the loaded towers


def split_frames(dataset: Any, split: str) -> SplitTables:
    part = dataset.split(split)
    if part.images.empty:
        raise MmretError(f"dataset {dataset.name!r} has no {split} images; prepare it with a {split} split "
                         f"(e.g. --{split} 0.1) or train with --folds")
    return SplitTables.from_frames(part.images, part.captions)


def run_splits(cfg: Any, dataset: Any) -> Any:
    """The dataset with the run's splits: its own, or the run's cross-validation folds."""
    if cfg.data.folds and dataset.name == cfg.data.dataset:
        return dataset.with_folds(cfg.data.folds, cfg.data.fold)
    return dataset


def load_run_data(cfg: Any, method: Any, device: torch.device, reporter: Any, run_dir: Any = None) -> RunData:
    """The train and val sources of a run; missing feature caches are computed on the way."""
    from mmret.datasets import load_dataset

    dataset = load_dataset(cfg.data.dataset, cfg.data.data_dir)
    sources, context = split_sources(cfg, method, dataset, ("train", "val"), device, reporter, run_dir)
    return RunData(sources[0], sources[1], context)


def split_sources(cfg: Any, method: Any, dataset: Any, splits: tuple[str, ...], device: torch.device,
                  reporter: Any, run_dir: Any = None) -> tuple[list[Any], Any]:
    """A source for each of `splits` of `dataset` as the run's method reads it, and the context
    its model is built from (feature widths, or the loaded towers)."""
    tables = run_splits(cfg, dataset)
    if method.inputs == "pixels":
        context = method.context(cfg, run_dir)
        train_t, eval_t, tokenize = method.inputs_for(cfg, context, tables)
        side = getattr(context, "cached", None)  # a frozen tower whose outputs come from the feature cache
        feats = _frozen_side_cache(context, side, dataset, device, reporter) if side else None
        sources = []
        for split in splits:
            split_tables = split_frames(tables, split)
            cached = FeatureSource(split_tables, *feats) if feats else None
            sources.append(PixelSource(split_tables, train_t, eval_t, tokenize, cfg.train.seed, cfg.train.workers,
                                       device.type == "cuda", cached, side))
        return sources, context
    image_feats, text_feats, image_enc, _ = feature_caches(cfg, dataset, method.image_tokens, device, reporter)
    dims = FeatureDims(image_feats.pooled.shape[1], image_enc.token_dim, text_feats.pooled.shape[1])
    return [FeatureSource(split_frames(tables, s), image_feats, text_feats, method.image_tokens) for s in splits], dims


def _frozen_side_cache(context: Any, side: str, dataset: Any, device: torch.device, reporter: Any) -> tuple:
    """(image features, None) or (None, caption features) of the tower that stays frozen."""
    from mmret.features import ensure_features

    if side == "image":
        return ensure_features(dataset, context.image, "images", reporter=reporter, device=device), None
    return None, ensure_features(dataset, context.text, "captions", reporter=reporter, device=device)


def feature_caches(cfg: Any, dataset: Any, image_tokens: bool, device: torch.device, reporter: Any):
    """The image and caption caches of the whole dataset under the run's frozen towers."""
    from mmret.encoders import load_image_encoder, load_text_encoder
    from mmret.features import ensure_features

    image_enc = load_image_encoder(cfg.encoders.vision)
    text_enc = load_text_encoder(cfg.encoders.text, max_length=cfg.encoders.max_length)
    image_feats = ensure_features(dataset, image_enc, "images", tokens=image_tokens, reporter=reporter, device=device)
    text_feats = ensure_features(dataset, text_enc, "captions", reporter=reporter, device=device)
    return image_feats, text_feats, image_enc.to("cpu"), text_enc.to("cpu")
