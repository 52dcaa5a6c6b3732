"""Final embeddings of a trained run: normalized float16 item and caption embeddings of one
dataset split, written once to `runs/<run>/embeddings/<ds>-<split>/` and read memory-mapped by
`eval` and `search`.

The folder holds `items.npy` (N, D) and `captions.npy` (M, D) float16, `items.parquet`
(item_id, path) and `captions.parquet` (caption_id, item, caption; `item` is the row of the
caption's item), and `manifest.json` naming the checkpoint (its digest) and the dataset table
(its fingerprint) they came from: embeddings of another checkpoint or of a re-prepared dataset
are never served as they are. Folders written before the item side had its own name
(`images.npy`, `images.parquet` with `image_id`, the captions' row column `image`, manifest keys
`images...`) open as they are, read under today's names (`OLD_NAMES`).

Reuse by row: both tables carry each row's stamp (`mmret.data.stamps`: an item's file, a
caption's text). When the dataset changed (prepared again after pictures were added to its
folder), the rows of the previous embeddings of the same checkpoint whose stamps still match are
copied and only new or changed rows are embedded. Folders written before stamps existed still
open; they just lend no rows.

Many processes (`--shard i/N`, or torchrun) share the work: the rows are cut into blocks of whole
batches, process i embeds blocks i, i+N, ... into `.<ds>-<split>.parts/`, and whoever finds every
block there assembles the folder (as `--finalize` does). Batches start where one process's would,
so the arrays are the bytes one process writes; a killed process runs again and skips its
finished blocks.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from mmret.common.device import autocast_context
from mmret.common.digest import file_digest
from mmret.common.io import atomic_dir, atomic_path, load_npy, read_json, read_parquet, write_json
from mmret.common.paths import Roots
from mmret.common.progress import NULL, Reporter
from mmret.common.shards import Shard, shard_of
from mmret.data.prepared import PreparedDataset, load_dataset
from mmret.data.stamps import caption_stamps, item_stamps, match
from mmret.errors import MmretError
from mmret.features import CAPTIONS, FeatureCache, dataset_fingerprint
from mmret.inference.loaded import LoadedRun
from mmret.methods import SIDES
from mmret.models.embed import embed_source

_logger = logging.getLogger(__name__)

FORMAT = 1
BLOCK_BATCHES = 16  # batches in one block of rows that one process embeds and keeps as a part


@dataclass
class Embeddings:
    path: Path
    dataset: str
    split: str
    items: np.ndarray  # (N, D) float16, normalized
    captions: np.ndarray  # (M, D) float16, normalized
    item_table: pd.DataFrame  # item_id, path
    caption_table: pd.DataFrame  # caption_id, item (row in items), caption
    manifest: dict
    roots: Roots = Roots()  # where the item files may be read: the dataset's roots (set by `write_run_embeddings`)

    @property
    def modality(self) -> str:
        """What the items are (embeddings written before sounds existed are pictures)."""
        return self.manifest.get("modality", "image")

    @property
    def caption_item(self) -> torch.Tensor:
        return torch.tensor(self.caption_table["item"].to_numpy(np.int64))

    def array_path(self, side: str) -> Path:
        """The `.npy` file of `side` (items | captions), under the name it was written with."""
        return _file(self.path, f"{side}.npy")


FILES = ("items.npy", "captions.npy", "items.parquet", "captions.parquet")
FIX = "delete the folder; the embeddings are computed again from the run"
# what folders written before the item side had its own name call things: files, columns, manifest keys
OLD_NAMES = {"images.npy": "items.npy", "images.parquet": "items.parquet", "image_id": "item_id", "image": "item",
             "images_fingerprint": "items_fingerprint", "images": "items"}


def _file(path: Path, name: str) -> Path:
    """`path / name`, or the file's earlier name when only that exists."""
    old = next((o for o, n in OLD_NAMES.items() if n == name), None)
    return path / old if old and not (path / name).exists() and (path / old).exists() else path / name


def _manifest(path: Path) -> dict:
    """manifest.json with its keys under today's names."""
    manifest = read_json(path / "manifest.json", FIX)
    if not isinstance(manifest, dict):
        return manifest
    if isinstance(manifest.get("reused"), dict):
        manifest["reused"] = {OLD_NAMES.get(k, k): v for k, v in manifest["reused"].items()}
    return {OLD_NAMES.get(k, k): v for k, v in manifest.items()}


def open_embeddings(path: Path) -> Embeddings:
    manifest = _manifest(path)
    item_table, caption_table = (read_parquet(_file(path, name), FIX).rename(columns=OLD_NAMES) for name in FILES[2:])
    return Embeddings(path=path, dataset=manifest["dataset"], split=manifest["split"],
                      items=load_npy(_file(path, "items.npy"), FIX), captions=load_npy(path / "captions.npy", FIX),
                      item_table=item_table, caption_table=caption_table, manifest=manifest)


def _digests(path: Path, names: Any = FILES) -> dict[str, str]:
    return {name: file_digest(path / name) for name in names}


def _fresh(path: Path, expected: dict) -> bool:
    """Whether the folder holds embeddings of `expected`'s checkpoint and dataset, unchanged since
    written (every file matches the digest in the manifest; they are small)."""
    try:
        manifest = _manifest(path)
        if not all(manifest.get(k) == v for k, v in expected.items()):
            return False
        if "digests" in manifest and manifest["digests"] != _digests(path, manifest["digests"]):
            _logger.warning("%s does not match its checksums; computing the embeddings again", path)
            return False
    except (OSError, ValueError):
        return False
    return True


def identity(run: LoadedRun, ds: Any, split: str) -> dict:
    """What the embeddings of `split` of `ds` by `run` must have been made from to be served as
    they are: the checkpoint's bytes and the dataset's tables (manifest fields)."""
    cfg = run.cfg
    return {"format": FORMAT, "checkpoint": run.digest, "which": run.which,
            "items_fingerprint": dataset_fingerprint(ds, ds.modality.plural),
            "captions_fingerprint": dataset_fingerprint(ds, CAPTIONS), "split": split,
            "folds": [cfg.data.folds, cfg.data.fold] if ds.name == cfg.data.dataset else [0, 0]}


def write_run_embeddings(run: LoadedRun | Path, dataset: str | PreparedDataset | None = None, split: str = "test", *,
                         which: str = "best", device: str = "auto", batch_size: int = 256, reporter: Reporter = NULL,
                         data_dir: Path | None = None, shard: str | None = None,
                         finalize: bool = False) -> Embeddings | None:
    """Embed a split (or `all`) of a dataset (default: the run's, from `data_dir` or the run's data
    root; or one loaded already) with the run's `which` checkpoint (`run` may be a loaded run, whose
    checkpoint and device then apply). With `shard` ("i/N", or torchrun's rank) this process embeds its blocks only, and
    None comes back unless it was the last and assembled the folder; `finalize` only assembles."""
    start = time.perf_counter()
    run = run if isinstance(run, LoadedRun) else LoadedRun(run, which=which, device=device)
    ds = dataset if isinstance(dataset, PreparedDataset) else load_dataset(dataset or run.cfg.data.dataset,
                                                                             data_dir or run.cfg.data.data_dir)
    emb = _embed(run, ds, split, batch_size=batch_size, reporter=reporter, shard=shard, finalize=finalize, start=start)
    if emb is not None:
        emb.roots = ds.roots
    return emb


def _embed(run: LoadedRun, ds: Any, split: str, *, batch_size: int, reporter: Reporter, shard: str | None,
           finalize: bool, start: float) -> Embeddings | None:
    target = run.run_dir / "embeddings" / f"{ds.name}-{split}"
    expected = identity(run, ds, split)
    if _fresh(target, expected):
        return open_embeddings(target)
    sharded = shard_of(shard)
    if sharded is not None or finalize:
        return _by_blocks(run, ds, split, batch_size=batch_size, reporter=reporter, target=target, expected=expected,
                          shard=sharded, start=start)
    source = run.source(ds, split, reporter)
    stamps = _stamps(ds, source.tables)
    old = _previous(target, run.digest)
    (item_from, item_todo), (caption_from, caption_todo) = (
        match(stamps[i], old[i].stamp.to_numpy(object) if old else None) for i in (0, 1))
    new_items, new_captions = run.embed_rows(source, item_rows=item_todo, caption_rows=caption_todo,
                                             batch_size=batch_size, reporter=reporter, label=f"{ds.name}-{split}")
    dim = next((x.shape[1] for x in (new_items, new_captions, old[2] if old else None)
                if x is not None and x.shape[1]), 0)
    items = _assemble(item_from, item_todo, new_items, old[2] if old else None, dim)
    captions = _assemble(caption_from, caption_todo, new_captions, old[3] if old else None, dim)
    ds.check_current("embedding")
    return _write(target, expected, ds, run=run.name, t=source.tables, items=items, captions=captions, stamps=stamps,
                  reused=(len(items) - len(item_todo), len(captions) - len(caption_todo)), start=start)


def _stamps(ds: Any, t: Any) -> tuple[np.ndarray, np.ndarray]:
    return item_stamps(t.item_ids, t.paths, ds.path), caption_stamps(t.captions)


def _write(target: Path, expected: dict, ds: Any, *, run: str, t: Any, items: np.ndarray, captions: np.ndarray,
           stamps: tuple[np.ndarray, np.ndarray], reused: tuple[int, int], start: float) -> Embeddings:
    """Write the folder at once: float16 arrays, the tables with each row's stamp, the manifest."""
    with atomic_dir(target, replace=True) as tmp:
        np.save(tmp / "items.npy", items)
        np.save(tmp / "captions.npy", captions)
        pd.DataFrame({"item_id": t.item_ids, "path": t.paths, "stamp": stamps[0]}).to_parquet(
            tmp / "items.parquet", index=False)
        pd.DataFrame({"caption_id": t.caption_ids, "item": t.caption_item, "caption": t.captions,
                      "stamp": stamps[1]}).to_parquet(tmp / "captions.parquet", index=False)
        write_json(tmp / "manifest.json", {**expected, "dataset": ds.name, "modality": ds.modality.name,
                                           "run": run, "dim": items.shape[1],
                                           "items": len(items), "captions": len(captions), "digests": _digests(tmp),
                                           "reused": {"items": reused[0], "captions": reused[1]},
                                           "seconds": round(time.perf_counter() - start, 2)})
    return open_embeddings(target)


def _previous(target: Path, digest: str) -> tuple | None:
    """(item table, caption table, item array, caption array) of the embeddings this checkpoint
    wrote before in `target`, if their rows carry stamps; else None."""
    try:
        old = open_embeddings(target)
        if "digests" in old.manifest and old.manifest["digests"] != _digests(target, old.manifest["digests"]):
            return None  # damaged since written: lends nothing
    except (OSError, ValueError, KeyError, MmretError):
        return None
    if (old.manifest.get("format") != FORMAT or old.manifest.get("checkpoint") != digest
            or "stamp" not in old.item_table or "stamp" not in old.caption_table):
        return None
    return old.item_table, old.caption_table, old.items, old.captions


def _assemble(found: np.ndarray, todo: np.ndarray, new: torch.Tensor, old: np.ndarray | None, dim: int) -> np.ndarray:
    """(N, dim) float16: row i from old row found[i] where found[i] >= 0, else from the new rows, in order."""
    out = np.empty((len(found), dim), dtype=np.float16)
    kept = np.flatnonzero(found >= 0)
    if len(kept):
        out[kept] = old[found[kept]]
    if len(todo):
        out[todo] = new.numpy().astype(np.float16)
    return out


def _blocks(n: int, batch_size: int) -> list[range]:
    step = batch_size * BLOCK_BATCHES
    return [range(a, min(a + step, n)) for a in range(0, n, step)]


def _by_blocks(run: LoadedRun, ds, split: str, *, batch_size: int, reporter: Reporter, target: Path, expected: dict,
               shard: Shard | None, start: float) -> Embeddings | None:
    parts = target.parent / f".{target.name}.parts"
    with FeatureCache(parts).locked(wait=True):  # the folder lock of the feature cache serves here too
        if not (parts / "expected.json").is_file() or read_json(parts / "expected.json") != expected:
            for old in parts.glob("*.npy"):
                old.unlink()  # blocks of another checkpoint or table
            write_json(parts / "expected.json", expected)
    _, model = run.model(SIDES)
    source = run.source(ds, split, reporter)
    blocks = [(side, k, rows) for side, n in (("items", source.num_items), ("captions", source.num_captions))
              for k, rows in enumerate(_blocks(n, batch_size))]
    if shard is not None:
        index, count = shard
        for side, k, rows in blocks[index::count]:
            path = parts / f"{side}-{k:06d}.npy"
            if path.is_file():
                continue  # done before this process was stopped
            items, captions = (rows, range(0)) if side == "items" else (range(0), rows)
            item_emb, text_emb = embed_source(model, source, batch_size, run.device,
                                              lambda: autocast_context(run.device, "fp32"), items=items,
                                              captions=captions)
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.save(f, (item_emb if side == "items" else text_emb).numpy().astype(np.float16))
    with FeatureCache(parts).locked(wait=True):
        missing = [f"{side} {k}" for side, k, _ in blocks if not (parts / f"{side}-{k:06d}.npy").is_file()]
        if _fresh(target, expected):
            return open_embeddings(target)
        if missing:
            if shard is None:
                raise MmretError(f"{len(missing)} blocks of these embeddings are not written yet "
                                 f"({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); run the --shard "
                                 "processes again, then --finalize")
            return None
        ds.check_current("embedding")
        arrays = {side: np.concatenate([np.load(parts / f"{side}-{k:06d}.npy") for s, k, _ in blocks if s == side])
                  for side in ("items", "captions")}
        emb = _write(target, expected, ds, run=run.name, t=source.tables, items=arrays["items"],
                     captions=arrays["captions"], stamps=_stamps(ds, source.tables), reused=(0, 0), start=start)
    shutil.rmtree(parts, ignore_errors=True)
    return emb
