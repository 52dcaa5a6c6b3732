"""The feature cache: frozen-tower outputs computed once and read back memory-mapped.

`data/<ds>/features/<key>/` holds

    manifest.json   what the arrays are (encoder spec, rows per split, shards done, failures, precision)
    ids.json        item_id or caption_id of every row, in row order
    stamps.json     the stamp of every row (`mmret.data.stamps`: an item's file, a caption's text)
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

Writing: the arrays are allocated at full size up front (no second copy of many gigabytes of token
states) and filled shard by shard (a few hundred rows); after each shard the arrays are flushed and
then the manifest, rewritten atomically, records the shard as done. An interrupted run loses at most
the shard in flight. A complete cache is opened read-only and never written again.

Many processes (`--shard i/N`, or torchrun) fill one cache: each encodes whole shards of its own
into `parts/<shard>/` (written under a temporary name and renamed, so a killed process loses at
most the shard in flight and resumes after it), and whoever finds every shard encoded seals the
cache: the parts are copied into the arrays shard by shard, each recorded done in the manifest as
above. The batches never cross a shard, so the sealed arrays hold the bytes one process writes.

Items that cannot be read do not stop the run: their rows are NaN, `valid` is False for them,
and `failed` maps their ids to the reason. (`mmret.features.encode` fills a cache.)

Checksums: each shard's rows of each array, and `ids.json`, have a blake2b digest in the manifest,
taken when the shard is committed. Opening a cache checks the shards it reads: all of them up to
`VERIFY_ALL_BYTES`, else a seeded sample (`mmret verify` checks everything). A damaged shard, or
every shard of an array file that no longer reads (truncated), is computed again by
`ensure_features`; anything else that meets one stops with a line naming it.

Reuse by row: a new cache (the dataset was prepared again: new pictures in the folder) first
copies the rows that an older cache of the same tower holds under the same stamp, so only new or
changed items are encoded; the older cache, which no table can open any more, is then removed.
Caches written before stamps existed still open by their key; they just lend no rows.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pandas as pd

from mmret.common.io import atomic_dir, damaged, ensure_free_space, load_npy, read_json, reserve, write_json
from mmret.common.paths import slug
from mmret.data.prepared import PreparedDataset
from mmret.data.readers.base import SPLITS
from mmret.data.stamps import caption_stamps, item_stamps
from mmret.errors import MmretError

_logger = logging.getLogger(__name__)

FORMAT = 1  # bump when the layout or the meaning of the arrays changes
VERIFY_ALL_BYTES = 256 * 2**20  # up to this much, opening a cache checks every shard it reads
VERIFY_SAMPLE = 8  # shards checked when more would be read
CAPTIONS = "captions"  # `which` of a caption cache; an item cache's `which` is its modality's plural (images, audio)


def check_which(dataset: PreparedDataset, which: str) -> None:
    if which not in (dataset.modality.plural, CAPTIONS):
        raise MmretError(f"which must be one of {dataset.modality.plural}, {CAPTIONS}, got {which!r}")


def cache_rows(dataset: PreparedDataset, which: str) -> pd.DataFrame:
    """The rows a cache holds, in its order: grouped by split (train, val, test), table order inside."""
    check_which(dataset, which)
    table = dataset.captions if which == CAPTIONS else dataset.items
    rank = table["split"].map({s: i for i, s in enumerate(SPLITS)}).fillna(len(SPLITS))
    return table.iloc[np.argsort(rank.to_numpy(), kind="stable")].reset_index(drop=True)


def dataset_fingerprint(dataset: PreparedDataset, which: str) -> str:
    """A hash of the encoded table (ids, files relative to the dataset, splits, captions) and of
    when the dataset was prepared."""
    rows = cache_rows(dataset, which)
    if which != CAPTIONS:
        base = str(dataset.path) + os.sep
        rel = [p[len(base):] if p.startswith(base) else p for p in rows["path"]]
        table = pd.DataFrame({"id": rows["item_id"].astype(str), "path": rel, "split": rows["split"],
                              **{c: rows[c] for c in dataset.modality.columns}})
    else:
        table = rows[["caption_id", "item_id", "caption", "split"]].astype(str)
    h = hashlib.sha256(str(dataset.info.get("created", "")).encode())
    h.update(pd.util.hash_pandas_object(table, index=False).to_numpy().tobytes())
    return h.hexdigest()[:16]


def row_stamps(dataset: PreparedDataset, which: str, rows: pd.DataFrame) -> np.ndarray:
    """The stamp of each row of a cache (`rows` as `cache_rows` gives them)."""
    if which == CAPTIONS:
        return caption_stamps(rows["caption"])
    return item_stamps(rows["item_id"], rows["path"], dataset.path)


def feature_key(encoder: Any, dataset: PreparedDataset, which: str | None = None, tokens: bool = False,
                fingerprint: str | None = None, view: Any = None) -> str:
    """`<model>-<which>[-tokens][-view<v>]-<hash>`: the hash covers the encoder spec, the table,
    `tokens` and the augmented view (`mmret.features.views`), if any. `fingerprint` saves
    re-hashing the table when the caller already has it."""
    which = which or dataset.modality.plural  # None: the dataset's items
    payload = {"format": FORMAT, "encoder": encoder.spec, "which": which, "tokens": bool(tokens),
               "dataset": fingerprint or dataset_fingerprint(dataset, which)}
    if view is not None:
        payload["view"] = view.spec()
    digest = hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:12]
    suffix = ("-tokens" if tokens else "") + (f"-view{view.index}" if view is not None else "")
    return f"{slug(encoder.source.id)}-{which}{suffix}-{digest}"


def features_root(dataset: PreparedDataset) -> Path:
    return dataset.path / "features"


# ---------------------------------------------------------------------------- reading


@dataclass
class EncodeStats:
    """What one `ensure_features` call did."""

    encoded: int = 0  # rows computed now
    reused: int = 0  # rows read from the cache
    failed: int = 0  # rows whose item could not be read (in this call)
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
    which: str  # the modality's plural (images, audio) | captions
    split: str  # all | train | val | test
    ids: np.ndarray  # (N,) item_id (str) or caption_id (int), row order
    splits: np.ndarray  # (N,) split of each row
    pooled: np.ndarray  # (N, D) float16
    tokens: np.ndarray | None  # (N, T, Dt) float16
    mask: np.ndarray | None  # (N, T) uint8, captions with tokens
    valid: np.ndarray  # (N,) bool: False where the item could not be read (rows are NaN)
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


def _repair_hint(path: Path) -> str:  # true: `open_features(repair=True)` marks what is damaged to compute again
    return f"run the command again to compute the damaged part anew (or delete {path})"


def _view(path: Path, manifest: dict, split: str, tokens: bool, stats: EncodeStats | None = None) -> CachedFeatures:
    lo, hi = (0, manifest["rows"]) if split == "all" else manifest["splits"][split]
    fix = _repair_hint(path)
    raw = (path / "ids.json").read_bytes()
    if manifest.get("ids_digest") not in (None, _digest(raw)):
        raise damaged(path / "ids.json", "its checksum does not match the manifest", fix)
    ids = np.asarray(read_json(path / "ids.json", fix))[lo:hi]
    splits = np.repeat(np.array(SPLITS + ("?",)), _split_counts(manifest))[lo:hi]
    arrays = {n: load_npy(path / f"{n}.npy", fix) for n in manifest["arrays"]}
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


def open_features(dataset: PreparedDataset, encoder: Any, which: str | None = None, tokens: bool = False,
                  split: str = "all", fingerprint: str | None = None, repair: bool = False,
                  view: Any = None) -> CachedFeatures | None:
    """The cached features if they are complete for `split` (a token cache serves pooled requests
    too), else None. Never computes anything. The shards read are checked against their checksums
    (see the module docstring): a damaged one is a `DamagedFile`, or with `repair` it is marked
    not done (so `ensure_features` computes it again) and None is returned."""
    which = which or dataset.modality.plural  # None: the dataset's items
    fingerprint = fingerprint or dataset_fingerprint(dataset, which)
    for with_tokens in ((True,) if tokens else (False, True)):
        path = features_root(dataset) / feature_key(encoder, dataset, which, with_tokens, fingerprint, view)
        manifest = _read_manifest(path)
        if manifest is None or not _covers(manifest, split):
            continue
        try:
            bad = damaged_shards(path, manifest, _split_shards(manifest, split), sample=True)
            if not bad:
                return _view(path, manifest, split, tokens)
            why = f"shard(s) {bad} do not match their checksums"
        except MmretError as e:  # a whole file no longer reads (a truncated array, edited ids): every shard is lost
            if not repair:
                raise
            bad, why = list(manifest["done"]), str(e).split("; ")[0]
        if not repair:
            raise damaged(path, why.replace("[", "").replace("]", ""), _repair_hint(path))
        _logger.warning("%s: %s; computing them again", path.name, why)
        manifest["done"] = [i for i in manifest["done"] if i not in bad]
        manifest["status"] = "building"
        write_json(path / "manifest.json", manifest)
    return None


def _digest(data: bytes | memoryview) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def shard_digests(arrays: dict[str, np.ndarray], rows: tuple[int, int]) -> dict[str, str]:
    """The digest of rows [a, b) of each array."""
    a, b = rows
    return {name: _digest(np.ascontiguousarray(arr[a:b]).data) for name, arr in arrays.items()}


def damaged_shards(path: Path, manifest: dict, shards: list[int], sample: bool = False) -> list[int]:
    """Which of `shards` (done ones with a recorded checksum) no longer match it. With `sample`,
    all of them up to `VERIFY_ALL_BYTES` of rows, else a seeded sample of `VERIFY_SAMPLE`."""
    digests = manifest.get("digests") or {}
    shards = [i for i in shards if str(i) in digests and i in set(manifest["done"])]
    if not shards:
        return []
    arrays = {n: load_npy(path / f"{n}.npy", _repair_hint(path)) for n in manifest["arrays"]}
    row_bytes = sum(arr[:1].nbytes for arr in arrays.values())
    rows = sum(b - a for a, b in (manifest["shards"][i] for i in shards))
    if sample and rows * row_bytes > VERIFY_ALL_BYTES:
        rng = np.random.default_rng(len(shards))
        shards = sorted(rng.choice(shards, min(VERIFY_SAMPLE, len(shards)), replace=False).tolist())
    return [i for i in shards if shard_digests(arrays, tuple(manifest["shards"][i])) != digests[str(i)]]


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
    def locked(self, wait: bool = False) -> Iterator["FeatureCache"]:
        """Hold the folder's lock: at once or a one-line error, or with `wait` (the short sections
        in which shard processes allocate the cache or seal it) as soon as it is free."""
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_file = open(self.path / ".lock", "w")
        try:
            _try_lock(self._lock_file, self.path, wait)
            yield self
        finally:
            self.arrays = {}  # drop the memory maps before the lock goes
            self._lock_file.close()

    def create(self, manifest: dict, ids: list, shapes: dict[str, tuple[int, ...]], dtypes: dict[str, str],
               stamps: list[str]) -> None:
        """Allocate the arrays and write ids, stamps and manifest. The disk space is claimed now
        (`reserve`), so a full disk is one clear line here rather than a crash half-way."""
        for name in ("pooled", "tokens", "mask"):
            (self.path / f"{name}.npy").unlink(missing_ok=True)
        sizes = {n: int(np.prod(shape)) * np.dtype(dtypes[n]).itemsize for n, shape in shapes.items()}
        ensure_free_space(self.path, sum(sizes.values()), "the feature cache")
        write_json(self.path / "ids.json", ids)
        write_json(self.path / STAMPS, stamps)
        for name, shape in shapes.items():
            file = self.path / f"{name}.npy"
            arr = np.lib.format.open_memmap(file, mode="w+", dtype=dtypes[name], shape=shape)
            arr.flush()
            del arr
            reserve(file)
        manifest["arrays"] = {n: {"shape": list(s), "dtype": dtypes[n]} for n, s in shapes.items()}
        manifest["ids_digest"] = _digest((self.path / "ids.json").read_bytes())
        manifest["digests"] = {}
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
        """Flush the arrays, then record the shard (its checksums and failed rows) in the manifest."""
        for arr in self.arrays.values():
            arr.flush()
        if "digests" in self.manifest:  # caches begun before checksums existed go on without them
            self.manifest["digests"][str(shard)] = shard_digests(self.arrays, tuple(self.manifest["shards"][shard]))
        self.manifest["done"] = sorted(set(self.manifest["done"]) | {shard})
        self.manifest["failed"].update(failed)
        if len(self.manifest["done"]) == len(self.manifest["shards"]):
            self.manifest["status"] = "complete"
            self.manifest["finished"] = _now()
        self.save()

    def save(self) -> None:
        write_json(self.path / "manifest.json", self.manifest)

    # -- shards encoded by other processes
    def write_part(self, shard: int, values: dict[str, np.ndarray], failed: dict[str, str]) -> None:
        """Keep one whole encoded shard in `parts/<shard>/` (atomically: all of it or nothing)."""
        with atomic_dir(self.path / "parts" / f"{shard:06d}", replace=True) as tmp:
            for name, value in values.items():
                np.save(tmp / f"{name}.npy", value)
            write_json(tmp / "failed.json", failed)

    def parts(self) -> dict[int, Path]:
        """Shards encoded and waiting to be sealed into the arrays."""
        root = self.path / "parts"
        if not root.is_dir():
            return {}
        return {int(p.name): p for p in root.iterdir() if p.is_dir() and p.name.isdigit()}

    def absorb_parts(self) -> int:
        """Copy every waiting part into the arrays, committing its shard (the seal). Returns how many."""
        parts = self.parts()
        if parts and not self.arrays:
            self.writable()
        for shard, path in sorted(parts.items()):
            if shard not in self.manifest["done"]:
                a, b = self.manifest["shards"][shard]
                for name in self.manifest["arrays"]:
                    self.arrays[name][a:b] = np.load(path / f"{name}.npy")
                self.commit(shard, read_json(path / "failed.json"))
            shutil.rmtree(path)
        if parts and not self.parts():
            shutil.rmtree(self.path / "parts", ignore_errors=True)
        return len(parts)


STAMPS = "stamps.json"


def _spec_text(spec: Any) -> str:
    return json.dumps(spec, sort_keys=True, default=str)


def sibling_caches(dataset: PreparedDataset, encoder: Any, which: str, tokens: bool,
                   exclude: Path, view: Any = None) -> list[tuple[Path, dict]]:
    """Other caches of the same tower, table, token setting and augmented view (none, or the same
    `mmret.features.views.ItemView`: a view's rows are other crops) in the dataset's features
    folder (older preparations of the dataset), newest first."""
    root, spec = features_root(dataset), _spec_text(encoder.spec)
    view_spec = _spec_text(None if view is None else view.spec())
    found = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        manifest = _read_manifest(path) if path != exclude and path.is_dir() else None
        if (manifest is not None and manifest.get("which") == which and bool(manifest.get("tokens")) == tokens
                and _spec_text(manifest.get("encoder")) == spec and _spec_text(manifest.get("view")) == view_spec):
            found.append((path, manifest))
    return sorted(found, key=lambda pm: str(pm[1].get("created", "")), reverse=True)


def lendable_rows(path: Path, manifest: dict) -> tuple[np.ndarray, np.ndarray] | None:
    """(stamps, rows) of a cache's rows that are computed and valid, or None for a cache without stamps."""
    try:
        stamps = np.asarray(read_json(path / STAMPS), dtype=object)
        ids = np.asarray(read_json(path / "ids.json")).astype(str)
    except (OSError, ValueError):
        return None
    if len(stamps) != manifest["rows"] or len(ids) != manifest["rows"]:
        return None
    done = np.zeros(manifest["rows"], dtype=bool)
    try:
        damaged = set(damaged_shards(path, manifest, list(manifest["done"])))  # a damaged row is never lent
    except MmretError:
        return None
    for shard in manifest["done"]:
        if shard not in damaged:
            done[slice(*manifest["shards"][shard])] = True
    if manifest["failed"]:
        done &= ~np.isin(ids, list(manifest["failed"]))
    rows = np.flatnonzero(done)
    return stamps[rows], rows


def remove_cache(path: Path) -> bool:
    """Delete a cache folder unless a process is writing it (its lock is held); True if removed."""
    try:
        with FeatureCache(path).locked():
            shutil.rmtree(path, ignore_errors=True)
    except MmretError:
        return False
    return True


def _try_lock(f: Any, path: Path, wait: bool = False) -> None:
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent writers are the user's business
        return
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
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
