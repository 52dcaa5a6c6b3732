"""Filling a feature cache: frozen towers run over a dataset's items or captions, shard by shard.

`ensure_features` opens a complete cache or computes what it lacks: items are decoded and
preprocessed in DataLoader workers by the encoder's own item loader (a file that cannot be read
yields a blank input, a NaN row and a reason), captions are tokenized; the first batch of a new
cache chooses its precision (`mmret.common.device`), and the tower runs eager, compiled or int8
(`mmret.features.runner`). See `mmret.features.cache` for the layout and the resume rules.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch

from mmret.common.device import check_precision, default_workers, synchronize
from mmret.common.io import read_json, write_json
from mmret.common.progress import NULL, Reporter
from mmret.common.threads import rebalance
from mmret.common.version import __version__
from mmret.data.prepared import PreparedDataset
from mmret.data.readers.base import SPLITS
from mmret.data.stamps import content_stamps, match
from mmret.errors import MmretError
from mmret.features.cache import (
    CAPTIONS,
    CONTENT,
    FORMAT,
    STAMPS,
    CachedFeatures,
    EncodeStats,
    FeatureCache,
    _layout,
    _now,
    _read_manifest,
    _spec_text,
    _split_shards,
    _view,
    cache_rows,
    dataset_fingerprint,
    feature_key,
    features_root,
    lendable_rows,
    open_features,
    remove_cache,
    row_stamps,
    sibling_caches,
)
from mmret.features.runner import TowerRunner
from mmret.features.runner import forward as _forward
from mmret.modalities import ItemError, get_modality

_logger = logging.getLogger(__name__)

SHARD_ROWS = {"items": 256, CAPTIONS: 2048}  # rows per shard: at most this much work is lost to a kill
CPU_BATCH = {"items": 32, CAPTIONS: 256}


def _kind(which: str) -> str:
    return CAPTIONS if which == CAPTIONS else "items"




class _ItemRows(torch.utils.data.Dataset):
    """Decode + preprocess in DataLoader workers; a bad file yields a blank input and its reason."""

    def __init__(self, rows: np.ndarray, paths: list[str], load: Any, blank: torch.Tensor):
        self.rows, self.paths, self.load, self.blank = rows, paths, load, blank

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        try:
            return int(self.rows[i]), self.load(self.paths[i]), ""
        except ItemError as e:
            reason = str(e)
        except Exception as e:  # a transform failing on an odd file fails that item only
            reason = f"cannot preprocess: {e}"
        return int(self.rows[i]), torch.zeros_like(self.blank), reason


def _item_batches(rows: pd.DataFrame, batches: list[np.ndarray], encoder: Any, workers: int,
                  device: torch.device, roots: Any, load: Any = None) -> Iterator[tuple[np.ndarray, dict, list[str]]]:
    todo = np.concatenate(batches)
    paths = rows["path"].to_numpy()[todo].tolist()
    blank = encoder.blank_inputs(1, "cpu")[encoder.input_name][0]
    data = _ItemRows(todo, paths, (load or encoder.item_loader()).reading(roots), blank)
    starts = np.cumsum([0] + [len(b) for b in batches])
    sampler = [list(range(a, b)) for a, b in zip(starts[:-1], starts[1:])]  # positions in `todo`
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, num_workers=min(workers, len(sampler)),
                                         pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if workers else None)
    for idx, items, reasons in loader:
        yield idx.numpy(), {encoder.input_name: items.to(device, non_blocking=True)}, list(reasons)


def _caption_batches(rows: pd.DataFrame, batches: list[np.ndarray], encoder: Any, tokens: bool,
                     device: torch.device) -> Iterator[tuple[np.ndarray, dict, list[str]]]:
    texts = rows["caption"].to_numpy()
    for idx in batches:
        batch = encoder.tokenize(texts[idx].tolist(), pad_to_max_length=tokens)
        yield idx, {k: v.to(device) for k, v in batch.items()}, [""] * len(idx)


def shard_batches(manifest: dict, shards: list[int], batch_size: int) -> list[np.ndarray]:
    """Row batches that never cross a cache shard: the same batches whichever process encodes a
    shard, so a cache filled by many processes holds the bytes one process would have written."""
    return [np.arange(a, min(a + batch_size, hi)) for lo, hi in (manifest["shards"][j] for j in shards)
            for a in range(lo, hi, batch_size)]


def _to_arrays(out: Any, tokens: bool, ok: np.ndarray) -> dict[str, np.ndarray]:
    pooled = out.pooled.float()
    if not torch.isfinite(pooled[torch.from_numpy(ok).to(pooled.device)]).all():
        raise MmretError("the encoder produced NaN or infinite values; run again with --precision fp32")
    values = {"pooled": pooled.to(torch.float16).cpu().numpy()}
    if tokens:
        values["tokens"] = out.tokens.to(torch.float16).cpu().numpy()
        if out.mask is not None:
            values["mask"] = out.mask.to(torch.uint8).cpu().numpy()
    if not np.isfinite(values["pooled"][ok]).all():
        raise MmretError("features exceed the float16 range (65504) and cannot be cached")
    for name in ("pooled", "tokens"):
        if name in values:
            values[name][~ok] = np.nan  # rows of items that could not be read
    return values


def _probe_shapes(encoder: Any, which: str, n: int, tokens: bool, device: torch.device) -> tuple[dict, dict]:
    """Array shapes from one forward pass of a blank input (T is only known after a pass)."""
    out = _forward(encoder, encoder.blank_inputs(1, device), device, "fp32")
    shapes = {"pooled": (n, out.pooled.shape[-1])}
    dtypes = {"pooled": "float16", "tokens": "float16", "mask": "uint8"}
    if tokens:
        shapes["tokens"] = (n, *out.tokens.shape[1:])
        if which == CAPTIONS:
            shapes["mask"] = (n, out.tokens.shape[1])
    return shapes, dtypes


def auto_batch_size(encoder: Any, which: str, device: torch.device) -> int:
    """CPU: a fixed size past which throughput stops growing. CUDA: the largest power of two that
    runs in inference (doubling until out of memory or 1024), halved for headroom."""
    if device.type != "cuda":
        return CPU_BATCH[_kind(which)]
    best, size = 8, 8
    while size <= 1024:
        try:
            inputs = encoder.blank_inputs(size, device)
            _forward(encoder, inputs, device, "fp16" if not torch.cuda.is_bf16_supported() else "bf16")
            best, size = size, size * 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return max(8, best // 2)


def tower_precision(device: torch.device, precision: str, which: str) -> str:
    """The precision to encode `which` in: `precision` checked for the device; int8 runs item
    towers only (fixed-shape batches), so captions asked for int8 choose automatically."""
    check_precision(device, precision, inference=True)
    if precision == "int8" and _kind(which) == CAPTIONS:
        _logger.info("int8 applies to item towers; captions choose their precision automatically")
        return "auto"
    return precision


def content_twins(dataset: PreparedDataset, encoder: Any, which: str, tokens: bool,
                  view: Any = None) -> list[tuple[Path, dict]]:
    """Caches of the same tower, token setting and augmented view in the other datasets of the same
    data folder that record their rows' content (`CONTENT`; captions: their stamps), newest first:
    the same picture or caption there lends its features. Caches written before contents were
    recorded still open; they only lend nothing to other datasets."""
    spec, view_spec = _spec_text(encoder.spec), _spec_text(None if view is None else view.spec())
    found = []
    for folder in sorted(dataset.path.parent.iterdir()) if dataset.path.parent.is_dir() else []:
        root = folder / "features"
        if folder == dataset.path or not root.is_dir():
            continue
        for path in sorted(root.iterdir()):
            manifest = _read_manifest(path) if path.is_dir() else None
            if (manifest is not None and manifest.get("which") == which and bool(manifest.get("tokens")) == tokens
                    and _spec_text(manifest.get("encoder")) == spec and _spec_text(manifest.get("view")) == view_spec
                    and (which == CAPTIONS or (path / CONTENT).is_file())):
                found.append((path, manifest))
    return sorted(found, key=lambda pm: str(pm[1].get("created", "")), reverse=True)


@dataclass
class _Job:
    """One `ensure_features` call: what to encode and how."""

    dataset: PreparedDataset
    encoder: Any
    which: str
    tokens: bool
    split: str
    rows: pd.DataFrame  # cache_rows(dataset, which)
    fingerprint: str
    device: torch.device
    precision: str  # auto | fp32 | bf16 | fp16 | int8
    batch_size: int | str
    workers: int | None
    shard_rows: int
    reporter: Reporter
    compile: bool | None = None  # torch.compile the item tower: yes, no, or None when it pays (see TowerRunner)
    view: Any = None  # an augmented view (mmret.features.views.ItemView), or None for the plain transform

    @property
    def key(self) -> str:
        return feature_key(self.encoder, self.dataset, self.which, self.tokens, self.fingerprint, self.view)

    @property
    def ids(self) -> np.ndarray:
        return np.asarray(self.rows["caption_id" if self.which == CAPTIONS else "item_id"])

    @functools.cached_property
    def stamps(self) -> np.ndarray:
        return row_stamps(self.dataset, self.which, self.rows)

    @functools.cached_property
    def content(self) -> np.ndarray:
        """What each row is, whatever its dataset: its file's bytes (items) or its text (captions)."""
        return self.stamps if self.which == CAPTIONS else content_stamps(self.rows["path"], self.dataset.roots)

    def prepare(self, cache: FeatureCache) -> None:
        """Open the half-built cache in the folder, or allocate a new one."""
        manifest = _read_manifest(cache.path)
        if manifest is not None and cache.open(manifest):
            _logger.info("resuming %s: %d of %d shards done", cache.path.name, len(manifest["done"]),
                         len(manifest["shards"]))
            return
        splits, shards = _layout(self.rows, self.shard_rows)
        shapes, dtypes = _probe_shapes(self.encoder, self.which, len(self.rows), self.tokens, self.device)
        cache.create({
            "format": FORMAT, "key": self.key, "status": "building", "which": self.which, "tokens": self.tokens,
            "encoder": self.encoder.spec, "encoder_name": self.encoder.name,
            "dataset": {"name": self.dataset.name, "fingerprint": self.fingerprint,
                        "created": self.dataset.info.get("created"), "generation": self.dataset.generation},
            "rows": len(self.rows), "splits": splits, "shard_rows": self.shard_rows, "shards": shards, "done": [],
            "failed": {}, "precision": None, "precision_reason": None, "mmret_version": __version__,
            "view": None if self.view is None else self.view.spec(),
            "created": _now(),
        }, self.ids.tolist(), shapes, {n: dtypes[n] for n in shapes}, self.stamps.tolist())
        if self.which != CAPTIONS:
            write_json(cache.path / CONTENT, self.content.tolist())
        cache.writable()

    def batches(self, batches: list[np.ndarray]) -> Iterator[tuple[np.ndarray, dict, list[str]]]:
        if self.which != CAPTIONS:
            workers = default_workers(self.device) if self.workers is None else self.workers
            load = None if self.view is None else self.view.loader(self.encoder)
            return _item_batches(self.rows, batches, self.encoder, workers, self.device, self.dataset.roots, load)
        return _caption_batches(self.rows, batches, self.encoder, self.tokens, self.device)

    def resolved_batch_size(self) -> int:
        return (auto_batch_size(self.encoder, self.which, self.device) if self.batch_size == "auto"
                else int(self.batch_size))

    def run(self, cache: FeatureCache) -> CachedFeatures:
        self.prepare(cache)
        manifest = cache.manifest
        cache.absorb_parts()  # shards other processes encoded (`--shard`) and nobody sealed yet
        done = set(manifest["done"])
        todo_shards = [i for i in _split_shards(manifest, self.split) if i not in done]
        batch_size = self.resolved_batch_size()
        stats = self.stats(manifest, todo_shards, batch_size)
        if todo_shards:
            progress = _Progress(cache, todo_shards, self.dataset)
            todo = np.concatenate([np.arange(*manifest["shards"][i]) for i in todo_shards])
            left = self.reuse(progress, todo, stats)
            batches = [b[np.isin(b, left)] for b in shard_batches(manifest, todo_shards, batch_size)]
            if len(left):
                self.encode(cache, lambda idx, values, reasons: progress.record(idx, values, reasons, self.ids),
                            [b for b in batches if len(b)], stats)
            stats.precision = manifest.get("precision") or ""  # also when every row was reused
            stats.precision_reason = manifest.get("precision_reason") or ""
        cache.arrays = {}
        return _view(cache.path, read_json(cache.path / "manifest.json"), self.split, self.tokens, stats)

    def reuse(self, progress: "_Progress", todo: np.ndarray, stats: EncodeStats) -> np.ndarray:
        """Copy into `cache` the rows of `todo` that another cache of this tower computed under the
        same stamp (the same unchanged file, or the same caption); returns the rows left to encode.
        A cache computed in another precision than the one requested lends nothing."""
        cache = progress.cache
        siblings = [(path, manifest, STAMPS) for path, manifest in sibling_caches(
            self.dataset, self.encoder, self.which, self.tokens, cache.path, self.view)]
        twins = [(path, manifest, STAMPS if self.which == CAPTIONS else CONTENT) for path, manifest in content_twins(
            self.dataset, self.encoder, self.which, self.tokens, self.view)]  # other datasets: by content
        for path, manifest, kind in siblings + twins:
            if not len(todo) or not self._compatible(cache.manifest, manifest):
                continue
            lent = lendable_rows(path, manifest, kind)
            if lent is None:
                continue
            mine = self.stamps if kind == STAMPS else self.content  # a caption's stamp is its text
            found, missing = match(mine[todo], lent[0])
            rows, source = todo[found >= 0], lent[1][found[found >= 0]]
            arrays = {n: np.load(path / f"{n}.npy", mmap_mode="r") for n in cache.arrays}
            order = np.argsort(source)  # sorted reads of the old arrays
            for a in range(0, len(rows), self.shard_rows):
                part = order[a:a + self.shard_rows]
                progress.record(rows[part], {n: np.asarray(arr[source[part]]) for n, arr in arrays.items()},
                                [""] * len(part), self.ids)
            if len(rows) and cache.manifest["precision"] is None:
                cache.manifest["precision"] = manifest["precision"]
                cache.manifest["precision_reason"] = f"{manifest['precision_reason']} (kept from {path.name})"
            stats.reused += len(rows)
            todo = todo[missing]
        return todo

    def _compatible(self, mine: dict, theirs: dict) -> bool:
        same_arrays = all(n in theirs["arrays"] and theirs["arrays"][n]["shape"][1:] == meta["shape"][1:]
                          and theirs["arrays"][n]["dtype"] == meta["dtype"] for n, meta in mine["arrays"].items())
        precision = mine["precision"] or (self.precision if self.precision != "auto" else None)
        return same_arrays and theirs.get("precision") is not None and precision in (None, theirs["precision"])

    def prune(self, cache: FeatureCache) -> None:
        """Remove the other caches of this tower once this one is complete: they were made from
        an older preparation of the dataset, which no table opens any more."""
        for path, manifest in sibling_caches(self.dataset, self.encoder, self.which, self.tokens, cache.path,
                                             self.view):
            made_from = manifest["dataset"].get("generation") or manifest["dataset"].get("created") or ""
            if str(made_from) != self.dataset.generation and remove_cache(path):
                _logger.info("removed %s: superseded by %s", path.name, cache.path.name)

    def stats(self, manifest: dict, todo_shards: list[int], batch_size: int) -> EncodeStats:
        lo, hi = (0, manifest["rows"]) if self.split == "all" else manifest["splits"][self.split]
        todo = sum(b - a for a, b in (manifest["shards"][j] for j in todo_shards))
        return EncodeStats(reused=(hi - lo) - todo, batch_size=batch_size, device=str(self.device),
                           precision=manifest.get("precision") or "",
                           precision_reason=manifest.get("precision_reason") or "")

    def calibration(self, batches: list[np.ndarray], n: int) -> Iterator[dict]:
        """Inputs of `n` of the rows in `batches`, spread evenly over them (so over a dataset's folders and kinds),
        in batches of the usual size, without the items that could not be read: what int8's scales are set on."""
        todo = np.concatenate(batches)
        pick = np.unique(todo[np.linspace(0, len(todo) - 1, min(n, len(todo))).astype(int)])
        size = max(len(b) for b in batches)
        for _, inputs, reasons in self.batches([pick[a:a + size] for a in range(0, len(pick), size)]):
            ok = torch.tensor([not r for r in reasons])
            yield {k: v[ok] for k, v in inputs.items()}

    def encode(self, cache: FeatureCache, record: Any, batches: list[np.ndarray], stats: EncodeStats) -> None:
        """Encode `batches` of rows; `record(idx, values, reasons)` keeps each batch's arrays and
        returns how many of its rows failed."""
        manifest = cache.manifest
        if self.precision != "auto":
            manifest["precision"], manifest["precision_reason"] = self.precision, f"{self.precision}: requested"
        unit = "cap" if self.which == CAPTIONS else get_modality(self.encoder.modality).unit
        start = time.perf_counter()
        total = sum(len(b) for b in batches)
        label = self.which if self.view is None else f"{self.which} view {self.view.index}"
        with self.reporter.task(f"{label} · {self.encoder.name}", total=total, unit=unit) as task:
            runner = TowerRunner(self.encoder, self.device, manifest, self.compile if self.which != CAPTIONS else False,
                                 max(len(b) for b in batches), total, lambda note: task.advance(0, status=note),
                                 pooled_only=not self.tokens and self.which != CAPTIONS,
                                 calibration=functools.partial(self.calibration, batches))
            for idx, inputs, reasons in self.batches(batches):
                rebalance()  # this process's share of the cores among the busy mmret processes
                ok = np.array([not r for r in reasons])
                stats.failed += record(idx, _to_arrays(runner(inputs), self.tokens, ok), reasons)
                stats.encoded += len(idx)
                task.advance(len(idx))
        stats.precision = manifest.get("precision") or ""
        stats.precision_reason = manifest.get("precision_reason") or ""
        synchronize(self.device)
        stats.seconds = time.perf_counter() - start
        stats.compiled = runner.compiled is not None


@dataclass
class _Progress:
    """Counts the rows written per shard and commits each shard as soon as it is complete."""

    cache: FeatureCache
    todo_shards: list[int]
    dataset: PreparedDataset  # checked to be the one read at the start before each commit
    failed: dict[int, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shards = self.cache.manifest["shards"]
        self.remaining = {i: b - a for i, (a, b) in enumerate(shards)}
        self.shard_of = np.zeros(self.cache.manifest["rows"], dtype=np.int64)  # (N,) shard of each row
        for i, (a, b) in enumerate(shards):
            self.shard_of[a:b] = i

    def record(self, idx: np.ndarray, values: dict[str, np.ndarray], reasons: list[str], ids: np.ndarray) -> int:
        """Write rows, count them and commit the shards they complete. Returns the failures among them."""
        self.cache.write(idx, values)
        bad = 0
        for row, reason in zip(idx.tolist(), reasons):
            shard = int(self.shard_of[row])
            self.remaining[shard] -= 1
            if reason:
                self.failed.setdefault(shard, {})[str(ids[row])] = reason
                bad += 1
        for shard in [s for s in self.todo_shards if self.remaining[s] == 0]:
            self.dataset.check_current("precompute-embeddings")
            self.cache.commit(shard, self.failed.pop(shard, {}))
            self.todo_shards.remove(shard)
        return bad


def ensure_features(dataset: PreparedDataset, encoder: Any, which: str | None = None, tokens: bool = False,
                    split: str = "all", batch_size: int | str = "auto", reporter: Reporter = NULL,
                    device: torch.device | str | None = None, precision: str = "auto",
                    workers: int | None = None, shard_rows: int | None = None,
                    compile: bool | None = None, view: Any = None) -> CachedFeatures:
    """The features of `dataset`'s items (`which` None or its modality's plural) or captions
    (`which="captions"`) under `encoder`, computing what the cache lacks for `split` (all | train |
    val | test) and reusing what is valid.

    Pass the whole prepared dataset (not `.split(...)`), so every split shares one cache. Returns
    the requested split's rows, memory-mapped read-only; `.stats` says what was done. `precision`
    auto tries bf16 (fp16 on older GPUs) on the first batch against fp32; see `mmret.common.device`;
    int8 (CPU, item towers) quantises the tower, see `mmret.features.runner`.
    `encoder` may be built without weights (on the meta device): its weights are loaded only
    when something has to be computed.
    `compile` runs the item tower through torch.compile: a minute or so once, then faster; None
    decides by the work left (see `mmret.features.runner`).
    `view` (`mmret.features.views.ItemView`, items only) encodes a seeded augmented view instead.
    """
    if split != "all" and split not in SPLITS:
        raise MmretError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)} or all")
    which = which or dataset.modality.plural
    rows = cache_rows(dataset, which)
    if rows.empty:
        raise MmretError(f"dataset {dataset.name!r} has no {which} to encode")
    fingerprint = dataset_fingerprint(dataset, which)
    if view is not None and which == CAPTIONS:
        raise MmretError("augmented views are of items, not captions")
    found = open_features(dataset, encoder, which, tokens, split, fingerprint, repair=True, view=view)
    if found is not None:
        return found
    encoder = encoder.with_weights()
    device = torch.device(device) if device is not None else encoder.device
    precision = tower_precision(device, precision, which)
    job = _Job(dataset, encoder.to(device), which, tokens, split, rows, fingerprint, device, precision,
               batch_size, workers, shard_rows or SHARD_ROWS[_kind(which)], reporter, compile, view)
    with FeatureCache(features_root(dataset) / job.key).locked() as cache:
        result = job.run(cache)
    if result.manifest.get("status") == "complete":
        job.prune(cache)
    return result
