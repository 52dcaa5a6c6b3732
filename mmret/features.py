"""The feature cache: frozen-tower outputs computed once and read back memory-mapped.

`data/<ds>/features/<key>/` holds

    manifest.json   what the arrays are (encoder spec, rows per split, shards done, failures, precision)
    ids.json        image_id or caption_id of every row, in row order
    pooled.npy      (N, D) float16
    tokens.npy      (N, T, Dt) float16, only with tokens
    mask.npy        (N, T) uint8, captions with tokens only (1 = real token)

Rows cover the whole dataset, grouped by split (train, then val, then test; the table's order
inside each), so training, validation and test read one cache and a split is a contiguous slice.
`ensure_features(split="test")` computes only the test rows of that cache and leaves the rest for
later.

`<key>` hashes everything that changes the numbers: the encoder's spec (model id and revision or
a hash of its files, pooling, image size and normalisation, text length), which table is encoded,
whether token states are kept, and a fingerprint of the table itself plus the time the dataset was
prepared, so a re-prepared dataset never meets a stale cache.

Writing: the arrays are allocated at full size up front and filled shard by shard (a few hundred
rows); after each shard the arrays are flushed and then the manifest, rewritten atomically, records
the shard as done. An interrupted run therefore loses at most the shard in flight and the next run
resumes after the last recorded one. A complete cache is opened read-only and never written again.
(Filling preallocated arrays avoids a second copy of what can be many gigabytes of token states.)

Images that cannot be read do not stop the run: their rows are NaN, `valid` is False for them,
and `failed` maps their ids to the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd
import torch

from mmret import __version__
from mmret.datasets import SPLITS, PreparedDataset
from mmret.device import (
    COSINE_THRESHOLD, PrecisionChoice, autocast_context, check_precision, choose_inference_precision, min_cosine,
    synchronize,
)
from mmret.errors import MmretError
from mmret.images import ImageError, load_rgb
from mmret.io import read_json, write_json
from mmret.progress import NULL, Reporter

_logger = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout or the meaning of the arrays changes
WHICH = ("images", "captions")
SHARD_ROWS = {"images": 256, "captions": 2048}  # rows per shard: at most this much work is lost to a kill
CPU_BATCH = {"images": 32, "captions": 256}


# ---------------------------------------------------------------------------- keys


def cache_rows(dataset: PreparedDataset, which: str) -> pd.DataFrame:
    """The rows a cache holds, in its order: grouped by split (train, val, test), table order inside."""
    if which not in WHICH:
        raise MmretError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
    table = dataset.images if which == "images" else dataset.captions
    rank = table["split"].map({s: i for i, s in enumerate(SPLITS)}).fillna(len(SPLITS))
    return table.iloc[np.argsort(rank.to_numpy(), kind="stable")].reset_index(drop=True)


def dataset_fingerprint(dataset: PreparedDataset, which: str) -> str:
    """A hash of the encoded table (ids, files relative to the dataset, splits, captions) and of
    when the dataset was prepared."""
    rows = cache_rows(dataset, which)
    if which == "images":
        base = str(dataset.path) + os.sep
        rel = [p[len(base):] if p.startswith(base) else p for p in rows["path"]]
        table = pd.DataFrame({"id": rows["image_id"].astype(str), "path": rel, "split": rows["split"],
                              "w": rows["width"], "h": rows["height"]})
    else:
        table = rows[["caption_id", "image_id", "caption", "split"]].astype(str)
    h = hashlib.sha256(str(dataset.info.get("created", "")).encode())
    h.update(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def _slug(model_id: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", model_id.rstrip("/").split("/")[-1].lower()).strip("-")[:40] or "model"


def feature_key(encoder: Any, dataset: PreparedDataset, which: str = "images", tokens: bool = False,
                fingerprint: str | None = None) -> str:
    """`<model>-<which>[-tokens]-<hash>`: the hash covers the encoder spec, the table and `tokens`.
    `fingerprint` saves re-hashing the table when the caller already has it."""
    payload = {"format": FORMAT, "encoder": encoder.spec, "which": which, "tokens": bool(tokens),
               "dataset": fingerprint or dataset_fingerprint(dataset, which)}
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:12]
    return f"{_slug(encoder.source.id)}-{which}{'-tokens' if tokens else ''}-{digest}"


def features_root(dataset: PreparedDataset) -> Path:
    return dataset.path / "features"


# ---------------------------------------------------------------------------- reading


@dataclass
class EncodeStats:
    """What one `ensure_features` call did."""

    encoded: int = 0  # rows computed now
    reused: int = 0  # rows read from the cache
    failed: int = 0  # rows whose image could not be read (in this call)
    seconds: float = 0.0  # encoding time
    precision: str = ""
    precision_reason: str = ""
    batch_size: int = 0
    device: str = ""
    compiled: bool = False  # the tower ran through torch.compile

    @property
    def rows_per_second(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else 0.0


@dataclass
class CachedFeatures:
    """Rows of a feature cache (all of it, or one split), arrays memory-mapped read-only."""

    key: str
    path: Path
    which: str  # images | captions
    split: str  # all | train | val | test
    ids: np.ndarray  # (N,) image_id (str) or caption_id (int), row order
    splits: np.ndarray  # (N,) split of each row
    pooled: np.ndarray  # (N, D) float16
    tokens: np.ndarray | None  # (N, T, Dt) float16
    mask: np.ndarray | None  # (N, T) uint8, captions with tokens
    valid: np.ndarray  # (N,) bool: False where the image could not be read (rows are NaN)
    failed: dict[str, str]  # id -> reason, for the rows returned
    manifest: dict
    stats: EncodeStats = field(default_factory=EncodeStats)

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, split: str) -> "CachedFeatures":
        """One split of an `all` view (a contiguous slice, still memory-mapped)."""
        if split == self.split or split == "all":
            return self
        if self.split != "all":
            raise MmretError(f"these features hold only the {self.split} split, not {split}")
        return _view(self.path, self.manifest, split, self.tokens is not None, self.stats)

    def row_of(self) -> dict:
        """id -> row index."""
        return {k: i for i, k in enumerate(self.ids.tolist())}

    @property
    def disk_bytes(self) -> int:
        arrays = {"pooled": self.pooled, "tokens": self.tokens, "mask": self.mask}
        return sum((self.path / f"{n}.npy").stat().st_size for n, a in arrays.items() if a is not None)


def _view(path: Path, manifest: dict, split: str, tokens: bool, stats: EncodeStats | None = None) -> CachedFeatures:
    lo, hi = (0, manifest["rows"]) if split == "all" else manifest["splits"][split]
    ids = np.asarray(read_json(path / "ids.json"))[lo:hi]
    splits = np.repeat(np.array(SPLITS + ("?",)), _split_counts(manifest))[lo:hi]
    arrays = {n: np.load(path / f"{n}.npy", mmap_mode="r") for n in manifest["arrays"]}
    names = set(map(str, ids.tolist()))
    failed = {k: v for k, v in manifest["failed"].items() if k in names}
    valid = ~np.isin(ids.astype(str), list(failed)) if failed else np.ones(len(ids), bool)
    return CachedFeatures(
        manifest["key"], path, manifest["which"], split, ids, splits, arrays["pooled"][lo:hi],
        arrays["tokens"][lo:hi] if tokens and "tokens" in arrays else None,
        arrays["mask"][lo:hi] if tokens and "mask" in arrays else None,
        valid, failed, manifest, stats or EncodeStats(reused=hi - lo, precision=manifest.get("precision") or "",
                                                       precision_reason=manifest.get("precision_reason") or ""))


def _split_counts(manifest: dict) -> list[int]:
    counts = [manifest["splits"][s][1] - manifest["splits"][s][0] for s in SPLITS]
    return counts + [manifest["rows"] - sum(counts)]


def _covers(manifest: dict, split: str) -> bool:
    """True when every shard holding rows of `split` is done."""
    done = set(manifest["done"])
    return all(i in done for i in _split_shards(manifest, split))


def _split_shards(manifest: dict, split: str) -> list[int]:
    lo, hi = (0, manifest["rows"]) if split == "all" else manifest["splits"][split]
    return [i for i, (a, b) in enumerate(manifest["shards"]) if a < hi and b > lo]


def open_features(dataset: PreparedDataset, encoder: Any, which: str = "images", tokens: bool = False,
                  split: str = "all", fingerprint: str | None = None) -> CachedFeatures | None:
    """The cached features if they are complete for `split` (a token cache serves pooled requests
    too), else None. Never computes anything."""
    fingerprint = fingerprint or dataset_fingerprint(dataset, which)
    for with_tokens in ((True,) if tokens else (False, True)):
        path = features_root(dataset) / feature_key(encoder, dataset, which, with_tokens, fingerprint)
        manifest = _read_manifest(path)
        if manifest is not None and _covers(manifest, split):
            return _view(path, manifest, split, tokens)
    return None


def _read_manifest(path: Path) -> dict | None:
    try:
        manifest = read_json(path / "manifest.json")
    except (OSError, ValueError):
        return None
    return manifest if manifest.get("format") == FORMAT else None


# ---------------------------------------------------------------------------- writing


class FeatureCache:
    """One cache folder being filled: allocation, shard commits and the lock that keeps a second
    process from writing the same folder."""

    def __init__(self, path: Path):
        self.path = path
        self.manifest: dict = {}
        self.arrays: dict[str, np.memmap] = {}
        self._lock_file = None

    @contextlib.contextmanager
    def locked(self) -> Iterator["FeatureCache"]:
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.path / ".lock", "w")
        try:
            _try_lock(self._lock_file, self.path)
            yield self
        finally:
            self.arrays = {}  # drop the memory maps before the lock goes
            self._lock_file.close()

    def create(self, manifest: dict, ids: list, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str]) -> None:
        """Allocate the arrays (sparse files on most file systems) and write ids and manifest."""
        for name in ("pooled", "tokens", "mask"):
            (self.path / f"{name}.npy").unlink(missing_ok=True)
        write_json(self.path / "ids.json", ids)
        for name, shape in shapes.items():
            arr = np.lib.format.open_memmap(self.path / f"{name}.npy", mode="w+", dtype=dtypes[name], shape=shape)
            arr.flush()
            del arr
        manifest["arrays"] = {n: {"shape": list(s), "dtype": dtypes[n]} for n, s in shapes.items()}
        self.manifest = manifest
        self.save()

    def open(self, manifest: dict) -> bool:
        """Open a half-built cache for writing; False if its arrays are missing or do not match."""
        self.manifest = manifest
        try:
            for name, meta in manifest["arrays"].items():
                arr = np.load(self.path / f"{name}.npy", mmap_mode="r+")
                if list(arr.shape) != meta["shape"] or str(arr.dtype) != meta["dtype"]:
                    return False
                self.arrays[name] = arr
        except (OSError, ValueError, KeyError):
            return False
        return True

    def writable(self) -> None:
        self.arrays = {n: np.load(self.path / f"{n}.npy", mmap_mode="r+") for n in self.manifest["arrays"]}

    def write(self, rows: np.ndarray, values: dict[str, np.ndarray]) -> None:
        for name, value in values.items():
            self.arrays[name][rows] = value

    def commit(self, shard: int, failed: dict[str, str]) -> None:
        """Flush the arrays, then record the shard (and its failed rows) in the manifest."""
        for arr in self.arrays.values():
            arr.flush()
        self.manifest["done"] = sorted(set(self.manifest["done"]) | {shard})
        self.manifest["failed"].update(failed)
        if len(self.manifest["done"]) == len(self.manifest["shards"]):
            self.manifest["status"] = "complete"
            self.manifest["finished"] = _now()
        self.save()

    def save(self) -> None:
        write_json(self.path / "manifest.json", self.manifest)


def _try_lock(f: Any, path: Path) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent writers are the user's business
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise MmretError(f"another mmret process is writing {path}; wait for it to finish") from None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _layout(rows: pd.DataFrame, shard_rows: int) -> tuple[dict, list[list[int]]]:
    """Row range of each split, and shards that never cross a split boundary."""
    splits, shards, start = {}, [], 0
    for split in SPLITS:
        n = int((rows["split"] == split).sum())
        splits[split] = [start, start + n]
        shards += [[a, min(a + shard_rows, start + n)] for a in range(start, start + n, shard_rows)]
        start += n
    if start < len(rows):  # rows without a known split (not written by `prepare`)
        shards += [[a, min(a + shard_rows, len(rows))] for a in range(start, len(rows), shard_rows)]
    return splits, shards


# ---------------------------------------------------------------------------- encoding


class _ImageRows(torch.utils.data.Dataset):
    """Decode + preprocess in DataLoader workers; a bad file yields a blank tensor and its reason."""

    def __init__(self, rows: np.ndarray, paths: list[str], transform: Any, size: tuple[int, int]):
        self.rows, self.paths, self.transform, self.size = rows, paths, transform, size

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, str]:
        try:
            return int(self.rows[i]), self.transform(load_rgb(self.paths[i])), ""
        except ImageError as e:
            reason = str(e)
        except Exception as e:  # a transform failing on an odd image fails that image only
            reason = f"cannot preprocess: {e}"
        return int(self.rows[i]), torch.zeros(3, *self.size), reason


def default_workers(device: torch.device) -> int:
    """Decoding workers: on the CPU leave the cores to the model but one; on a GPU use more."""
    cpus = os.cpu_count() or 1
    return min(8, cpus) if device.type == "cuda" else min(4, max(1, cpus - 1))


def _image_batches(rows: pd.DataFrame, todo: np.ndarray, encoder: Any, batch_size: int, workers: int,
                   device: torch.device) -> Iterator[tuple[np.ndarray, dict, list[str]]]:
    paths = rows["path"].to_numpy()[todo].tolist()
    data = _ImageRows(todo, paths, encoder.transform(), encoder.image_size)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers,
                                         pin_memory=device.type == "cuda",
                                         prefetch_factor=4 if workers else None)
    for idx, pixels, reasons in loader:
        yield idx.numpy(), {"pixels": pixels.to(device, non_blocking=True)}, list(reasons)


def _caption_batches(rows: pd.DataFrame, todo: np.ndarray, encoder: Any, batch_size: int, tokens: bool,
                     device: torch.device) -> Iterator[tuple[np.ndarray, dict, list[str]]]:
    texts = rows["caption"].to_numpy()
    for start in range(0, len(todo), batch_size):
        idx = todo[start:start + batch_size]
        batch = encoder.tokenize(texts[idx].tolist(), pad_to_max_length=tokens)
        yield idx, {k: v.to(device) for k, v in batch.items()}, [""] * len(idx)


def _forward(encoder: Any, inputs: dict, device: torch.device, precision: str) -> Any:
    with torch.inference_mode(), autocast_context(device, precision):
        return encoder(**inputs)


def _slice(inputs: dict, n: int) -> dict:
    return {k: v[:n] for k, v in inputs.items()}


def _choose_precision(encoder: Any, inputs: dict, device: torch.device, requested: str) -> tuple[PrecisionChoice, dict]:
    """Try the first real batch in fp32 and bf16/fp16; keep every output so none is computed twice."""
    outputs: dict[str, Any] = {}

    def run(p: str) -> torch.Tensor:
        outputs[p] = _forward(encoder, inputs, device, p)
        return outputs[p].pooled

    choice = choose_inference_precision(run, device, requested,
                                        warmup=lambda p: _forward(encoder, _slice(inputs, 2), device, p))
    return choice, outputs


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
            values[name][~ok] = np.nan  # rows of images that could not be read
    return values


def _probe_shapes(encoder: Any, which: str, n: int, tokens: bool, device: torch.device) -> tuple[dict, dict]:
    """Array shapes from one forward pass of a blank input (T is only known after a pass)."""
    if which == "images":
        inputs = {"pixels": torch.zeros(1, 3, *encoder.image_size, device=device)}
    else:
        inputs = {k: v.to(device) for k, v in encoder.tokenize([""], pad_to_max_length=True).items()}
    out = _forward(encoder, inputs, device, "fp32")
    shapes = {"pooled": (n, out.pooled.shape[-1])}
    dtypes = {"pooled": "float16", "tokens": "float16", "mask": "uint8"}
    if tokens:
        shapes["tokens"] = (n, *out.tokens.shape[1:])
        if which == "captions":
            shapes["mask"] = (n, out.tokens.shape[1])
    return shapes, dtypes


def auto_batch_size(encoder: Any, which: str, device: torch.device) -> int:
    """CPU: a fixed size past which throughput stops growing. CUDA: the largest power of two that
    runs in inference (doubling until out of memory or 1024), halved for headroom."""
    if device.type != "cuda":
        return CPU_BATCH[which]
    best, size = 8, 8
    while size <= 1024:
        try:
            if which == "images":
                inputs = {"pixels": torch.zeros(size, 3, *encoder.image_size, device=device)}
            else:
                ids = torch.ones(size, encoder.max_length, dtype=torch.long, device=device)
                inputs = {"input_ids": ids, "attention_mask": ids}
            _forward(encoder, inputs, device, "fp16" if not torch.cuda.is_bf16_supported() else "bf16")
            best, size = size, size * 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    return max(8, best // 2)


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
    precision: str  # auto | fp32 | bf16 | fp16
    batch_size: int | str
    workers: int | None
    shard_rows: int
    reporter: Reporter
    compile: bool = False  # torch.compile the image tower (see _Runner)

    @property
    def key(self) -> str:
        return feature_key(self.encoder, self.dataset, self.which, self.tokens, self.fingerprint)

    @property
    def ids(self) -> np.ndarray:
        return np.asarray(self.rows["image_id" if self.which == "images" else "caption_id"])

    def prepare(self, cache: FeatureCache) -> None:
        """Open the half-built cache in the folder, or allocate a new one."""
        manifest = _read_manifest(cache.path)
        if manifest is not None and cache.open(manifest):
            _logger.info("resuming %s: %d of %d shards done", cache.path.name, len(manifest["done"]), len(manifest["shards"]))
            return
        splits, shards = _layout(self.rows, self.shard_rows)
        shapes, dtypes = _probe_shapes(self.encoder, self.which, len(self.rows), self.tokens, self.device)
        cache.create({
            "format": FORMAT, "key": self.key, "status": "building", "which": self.which, "tokens": self.tokens,
            "encoder": self.encoder.spec, "encoder_name": self.encoder.name,
            "dataset": {"name": self.dataset.name, "fingerprint": self.fingerprint,
                        "created": self.dataset.info.get("created")},
            "rows": len(self.rows), "splits": splits, "shard_rows": self.shard_rows, "shards": shards, "done": [],
            "failed": {}, "precision": None, "precision_reason": None, "mmret_version": __version__,
            "created": _now(),
        }, self.ids.tolist(), shapes, {n: dtypes[n] for n in shapes})
        cache.writable()

    def batches(self, todo: np.ndarray, batch_size: int) -> Iterator[tuple[np.ndarray, dict, list[str]]]:
        if self.which == "images":
            workers = default_workers(self.device) if self.workers is None else self.workers
            return _image_batches(self.rows, todo, self.encoder, batch_size, workers, self.device)
        return _caption_batches(self.rows, todo, self.encoder, batch_size, self.tokens, self.device)

    def run(self, cache: FeatureCache) -> CachedFeatures:
        self.prepare(cache)
        manifest = cache.manifest
        done = set(manifest["done"])
        todo_shards = [i for i in _split_shards(manifest, self.split) if i not in done]
        todo = np.concatenate([np.arange(*manifest["shards"][i]) for i in todo_shards] or [np.arange(0)])
        batch_size = auto_batch_size(self.encoder, self.which, self.device) if self.batch_size == "auto" else int(self.batch_size)
        lo, hi = (0, manifest["rows"]) if self.split == "all" else manifest["splits"][self.split]
        stats = EncodeStats(reused=(hi - lo) - len(todo), batch_size=batch_size, device=str(self.device))
        if len(todo):
            self.encode(cache, _Progress(cache, todo_shards), todo, batch_size, stats)
        stats.precision = manifest.get("precision") or ""
        stats.precision_reason = manifest.get("precision_reason") or ""
        cache.arrays = {}
        return _view(cache.path, read_json(cache.path / "manifest.json"), self.split, self.tokens, stats)

    def encode(self, cache: FeatureCache, progress: "_Progress", todo: np.ndarray, batch_size: int,
               stats: EncodeStats) -> None:
        manifest, ids = cache.manifest, self.ids
        if self.precision != "auto":
            manifest["precision"], manifest["precision_reason"] = self.precision, f"{self.precision}: requested"
        unit = "img" if self.which == "images" else "cap"
        start = time.perf_counter()
        with self.reporter.task(f"{self.which} · {self.encoder.name}", total=len(todo), unit=unit) as task:
            runner = _Runner(self.encoder, self.device, manifest, self.compile and self.which == "images",
                             batch_size, lambda note: task.advance(0, status=note))
            for idx, inputs, reasons in self.batches(todo, batch_size):
                ok = np.array([not r for r in reasons])
                cache.write(idx, _to_arrays(runner(inputs), self.tokens, ok))
                stats.failed += progress.record(idx, reasons, ids)
                stats.encoded += len(idx)
                task.advance(len(idx))
        synchronize(self.device)
        stats.seconds = time.perf_counter() - start
        stats.compiled = runner.compiled is not None


class _Runner:
    """Encodes batches in the cache's precision. The first batch of a new cache decides it (fp32
    against bf16/fp16, see `mmret.device`). With `compile`, the tower is compiled once with
    torch.compile (inductor, weights frozen as constants) at a fixed batch size (the last batch is
    padded, so nothing recompiles) and its first output is checked against fp32 like the
    precision; a compiler that fails or disagrees leaves the run eager."""

    def __init__(self, encoder: Any, device: torch.device, manifest: dict, compile: bool, batch_size: int,
                 status: Any = None):
        self.encoder, self.device, self.manifest, self.batch_size = encoder, device, manifest, batch_size
        self.want_compile, self.compiled = compile, None
        self.status = status or (lambda note: None)

    def __call__(self, inputs: dict) -> Any:
        reference = out = None
        if self.manifest["precision"] is None:
            choice, outputs = _choose_precision(self.encoder, inputs, self.device, "auto")
            self.manifest["precision"], self.manifest["precision_reason"] = choice.precision, choice.reason
            _logger.info("precision for %s: %s", self.encoder.name, choice.reason)
            reference, out = outputs.get("fp32"), outputs[choice.precision]
        if self.want_compile:
            self.want_compile = False
            compiled = self._start_compiled(inputs, reference)
            if compiled is not None:
                return compiled
        if self.compiled is not None:
            return self._run_compiled(inputs)
        return out if out is not None else self._eager(inputs)

    def _eager(self, inputs: dict) -> Any:
        return _forward(self.encoder, inputs, self.device, self.manifest["precision"])

    def _run_compiled(self, inputs: dict) -> Any:
        n = len(next(iter(inputs.values())))
        if n < self.batch_size:
            inputs = {k: torch.cat([v, v.new_zeros(self.batch_size - n, *v.shape[1:])]) for k, v in inputs.items()}
        out = _forward(self.compiled, inputs, self.device, self.manifest["precision"])
        return type(out)(*(t[:n] if t is not None else None for t in out))

    def _start_compiled(self, inputs: dict, reference: Any) -> Any:
        """Compile, encode the first batch, and keep the compiled tower only if it matches fp32."""
        self.status("compiling")
        if reference is None:
            reference = _forward(self.encoder, inputs, self.device, "fp32")
        try:
            self.compiled = torch.compile(self.encoder, dynamic=False, options={"freezing": True})
            out = self._run_compiled(inputs)
        except Exception as e:  # no C++ compiler, an unsupported op, ...: eager still works
            _logger.warning("torch.compile failed, encoding without it: %s", (str(e) or repr(e)).splitlines()[0])
            self.compiled = None
            return None
        finally:
            self.status("")
        cosine = min_cosine(reference.pooled, out.pooled)
        if not cosine >= COSINE_THRESHOLD:
            _logger.warning("the compiled tower disagrees with fp32 (cosine %.4f); encoding without it", cosine)
            self.compiled = None
            return None
        self.manifest["precision_reason"] += f"; compiled, cosine to fp32 {cosine:.4f}"
        return out


@dataclass
class _Progress:
    """Counts the rows written per shard and commits each shard as soon as it is complete."""

    cache: FeatureCache
    todo_shards: list[int]
    failed: dict[int, dict[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shards = self.cache.manifest["shards"]
        self.remaining = {i: b - a for i, (a, b) in enumerate(shards)}
        self.shard_of = np.zeros(self.cache.manifest["rows"], dtype=np.int64)  # (N,) shard of each row
        for i, (a, b) in enumerate(shards):
            self.shard_of[a:b] = i

    def record(self, idx: np.ndarray, reasons: list[str], ids: np.ndarray) -> int:
        """Count written rows and commit the shards they complete. Returns the failures among them."""
        bad = 0
        for row, reason in zip(idx.tolist(), reasons):
            shard = int(self.shard_of[row])
            self.remaining[shard] -= 1
            if reason:
                self.failed.setdefault(shard, {})[str(ids[row])] = reason
                bad += 1
        for shard in [s for s in self.todo_shards if self.remaining[s] == 0]:
            self.cache.commit(shard, self.failed.pop(shard, {}))
            self.todo_shards.remove(shard)
        return bad


def ensure_features(dataset: PreparedDataset, encoder: Any, which: str = "images", tokens: bool = False,
                    split: str = "all", batch_size: int | str = "auto", reporter: Reporter = NULL,
                    device: torch.device | str | None = None, precision: str = "auto",
                    workers: int | None = None, shard_rows: int | None = None, compile: bool = False) -> CachedFeatures:
    """The features of `dataset`'s images or captions under `encoder`, computing what the cache
    lacks for `split` (all | train | val | test) and reusing what is valid.

    Pass the whole prepared dataset (not `.split(...)`), so every split shares one cache. Returns
    the requested split's rows, memory-mapped read-only; `.stats` says what was done. `precision`
    auto tries bf16 (fp16 on older GPUs) on the first batch against fp32; see `mmret.device`.
    `compile` runs the image tower through torch.compile: a minute or so once, then faster.
    """
    if split != "all" and split not in SPLITS:
        raise MmretError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)} or all")
    rows = cache_rows(dataset, which)
    if rows.empty:
        raise MmretError(f"dataset {dataset.name!r} has no {which} to encode")
    fingerprint = dataset_fingerprint(dataset, which)
    found = open_features(dataset, encoder, which, tokens, split, fingerprint)
    if found is not None:
        return found
    device = torch.device(device) if device is not None else encoder.device
    check_precision(device, precision)
    job = _Job(dataset, encoder.to(device), which, tokens, split, rows, fingerprint, device, precision,
               batch_size, workers, shard_rows or SHARD_ROWS[which], reporter, compile)
    with FeatureCache(features_root(dataset) / job.key).locked() as cache:
        return job.run(cache)


# ---------------------------------------------------------------------------- the command


@dataclass
class PrecomputeResult:
    dataset: str
    device: str
    parts: list[tuple[str, CachedFeatures]]  # (encoder name, features) for images and/or captions
    seconds: float


def precompute_embeddings(cfg: Any, reporter: Reporter = NULL) -> PrecomputeResult:
    """`mmret precompute-embeddings`: load the dataset and the towers (so a bad name fails before
    any work), then fill the image and caption caches."""
    from mmret.datasets import load_dataset
    from mmret.device import pick_device
    from mmret.encoders import load_image_encoder, load_text_encoder

    start = time.perf_counter()
    dataset = load_dataset(cfg.dataset, cfg.data_dir)
    device = pick_device(cfg.device)
    check_precision(device, cfg.precision)
    towers = []
    if cfg.vision:
        towers.append(("images", load_image_encoder(cfg.vision, image_size=cfg.image_size)))
    if cfg.text:
        towers.append(("captions", load_text_encoder(cfg.text, max_length=cfg.max_length)))
    parts = []
    for which, encoder in towers:
        feats = ensure_features(dataset, encoder.to(device), which, tokens=cfg.tokens, split=cfg.split,
                                batch_size=cfg.batch_size, reporter=reporter, device=device,
                                precision=cfg.precision, workers=cfg.workers, compile=cfg.compile)
        parts.append((encoder.name, feats))
        encoder.to("cpu")
    return PrecomputeResult(dataset.name, str(device), parts, time.perf_counter() - start)
