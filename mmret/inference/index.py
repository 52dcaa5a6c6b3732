"""Search a gallery of embeddings: exact top-k over a memory-mapped float16 matrix
(`mmret.inference.exact`), or a FAISS index (IVF or HNSW) for galleries of millions, cached in a
folder with a fingerprint.

The index folder (`runs/<run>/index/<gallery>/` by convention) holds `meta.json` (the caller's
fingerprint, sizes, a digest of the vectors, and for each FAISS index its parameters and the
recall@10 against exact search measured when it was built), `vectors.npy` (a hard link to the
embeddings when they are on the same disk, else a copy) and `<kind>.faiss`. An index whose
fingerprint differs from the caller's is refused, never silently used.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmret.common.io import atomic_dir, atomic_path, read_json, write_json
from mmret.common.progress import NULL, Reporter
from mmret.errors import MmretError
from mmret.inference.exact import ExactIndex, _check_gallery, _check_k, _check_queries

_logger = logging.getLogger(__name__)

INDEX_KINDS = ("exact", "ivf", "hnsw")
META_VERSION = 1
CHECK_K = 10  # a FAISS index is measured and tuned on recall@10 against exact search
_BUILD_KEYS = ("nlist", "hnsw_m", "ef_construction", "seed")  # a change rebuilds a FAISS index
_BREADTH = {"ivf": "nprobe", "hnsw": "efSearch"}


class StaleIndex(MmretError):
    """An index built from other vectors than the caller's (another fingerprint, or changed embeddings)."""


@dataclass
class IndexConfig:
    kind: str = "exact"  # exact | ivf | hnsw (the last two need faiss-cpu)
    nlist: int = 0  # ivf: number of lists (0: the power of two nearest sqrt(n))
    # hnsw graph quality: on a 1M x 512 gallery, 48/200 reached recall@10 0.95 at efSearch 104 (1.1 ms
    # a query) where 32/80 needed 512 (2.8 ms), for 2.5x the build time (benchmarks/search.py)
    hnsw_m: int = 48  # hnsw: links per node; more gives better recall, more memory and build time
    ef_construction: int = 200  # hnsw: candidates examined per insertion while building
    nprobe: int = 0  # ivf: lists searched per query (0: the fewest that reach target_recall)
    ef_search: int = 0  # hnsw: candidates examined per query (0: the fewest that reach target_recall)
    target_recall: float = 0.95  # recall@10 against exact search that automatic tuning aims for
    check_queries: int = 1000  # queries used to measure recall@10 when a FAISS index is built
    seed: int = 0  # sampling of training vectors and check queries

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise MmretError(f"--index must be one of {', '.join(INDEX_KINDS)}, got {self.kind!r}")
        for name in ("nlist", "nprobe", "ef_search"):
            if getattr(self, name) < 0:
                raise MmretError(f"--{name.replace('_', '-')} must be 0 (automatic) or positive, "
                                 f"got {getattr(self, name)}")
        if self.hnsw_m < 4 or self.ef_construction < 8:
            raise MmretError(f"--hnsw-m must be >= 4 and --ef-construction >= 8, "
                             f"got {self.hnsw_m} and {self.ef_construction}")
        if not 0 < self.target_recall <= 1:
            raise MmretError(f"--target-recall must be in (0, 1], got {self.target_recall}")
        if self.check_queries < 10:
            raise MmretError(f"--check-queries must be at least 10, got {self.check_queries}")


# --- FAISS --------------------------------------------------------------------------------------


def _faiss():
    try:
        import faiss
    except ImportError:
        raise MmretError("the ivf and hnsw indexes need FAISS: pip install 'mmret[faiss]' "
                         "(or faiss-cpu); the exact index needs nothing more") from None
    return faiss


class FaissIndex:
    """An approximate FAISS index (IVF or HNSW over float16 vectors) with its measured recall."""

    def __init__(self, kind: str, index, info: dict):
        self.kind, self.index, self.info = kind, index, info
        self.dim = index.d

    @property
    def n(self) -> int:
        return self.index.ntotal

    def search(self, queries: Any, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids), both (n_queries, k), best first; ids are -1 where fewer than k were found."""
        q = _check_queries(queries, self.dim).numpy()
        return self.index.search(q, _check_k(k, self.n))

    def set_breadth(self, value: int) -> None:
        """Lists searched (IVF nprobe) or candidates examined (HNSW efSearch) per query."""
        _faiss().ParameterSpace().set_index_parameter(self.index, _BREADTH[self.kind], int(value))
        self.info["breadth"] = int(value)


def _new_faiss_index(cfg: IndexConfig, n: int, dim: int):
    """An empty index and its factory string. SQfp16 keeps the float16 gallery exactly as it is,
    in half the memory of Flat."""
    faiss = _faiss()
    if cfg.kind == "ivf":
        nlist = min(n, cfg.nlist or 2 ** max(1, round(math.log2(math.sqrt(n)))))
        factory = f"IVF{nlist},SQfp16"
        return faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT), factory
    factory = f"HNSW{cfg.hnsw_m},SQfp16"
    index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    faiss.downcast_index(index).hnsw.efConstruction = cfg.ef_construction
    return index, factory


def _fill_faiss_index(index, gallery: torch.Tensor, cfg: IndexConfig, reporter: Reporter) -> None:
    n = len(gallery)
    if not index.is_trained:  # IVF k-means on a sample: FAISS wants >= 39 vectors per list
        lists = _faiss().extract_index_ivf(index).nlist if cfg.kind == "ivf" else 1
        gen = torch.Generator().manual_seed(cfg.seed)
        sample = torch.randperm(n, generator=gen)[:min(n, max(64 * lists, 10_000))].sort().values
        index.train(gallery[sample].float().numpy())
    task = reporter.task(f"building the {cfg.kind} index", total=n, unit="vec")
    try:
        for start in range(0, n, 65536):
            chunk = gallery[start:start + 65536]
            index.add(chunk.float().numpy())
            task.advance(len(chunk))
    finally:
        task.close()


def _check_set(exact: ExactIndex, queries: Any | None, cfg: IndexConfig):
    """Queries for measuring recall, their exact top-10, their own gallery rows, and their source.

    Given queries (e.g. the captions that will search this gallery) are the honest test. Without
    them, gallery rows are used and each one's own row is left out of both lists, since finding
    an item from itself is trivial."""
    gen = torch.Generator().manual_seed(cfg.seed)
    if queries is not None:
        q = _check_queries(queries, exact.dim)
        q = q[torch.randperm(len(q), generator=gen)[:cfg.check_queries]]
        return q.numpy(), exact.search(q, CHECK_K)[1], None, "given queries"
    own = torch.randperm(exact.n, generator=gen)[:cfg.check_queries]
    q = exact.gallery[own].float()
    truth = _drop_own_rows(exact.search(q, CHECK_K + 1)[1], own.numpy())
    return q.numpy(), truth, own.numpy(), "gallery rows, own row left out"


def _drop_own_rows(ids: np.ndarray, own: np.ndarray | None) -> np.ndarray:
    if own is None:
        return ids[:, :CHECK_K]
    kept = [row[row != o][:CHECK_K] for row, o in zip(ids, own)]
    return np.stack([np.pad(r, (0, CHECK_K - len(r)), constant_values=-1) for r in kept])


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean fraction of each query's true top-k (a row of `truth`) found in its row of `found`."""
    k = truth.shape[1]
    hits = [len((set(f[:k].tolist()) & set(t.tolist())) - {-1}) for f, t in zip(found, truth)]
    return float(np.mean(hits) / k)


def _tune_breadth(index: FaissIndex, check, cfg: IndexConfig) -> tuple[list[dict], dict]:
    """Recall@10 and time per query at each breadth tried, and the one chosen: the fixed breadth, or
    the smallest reaching the target, found by doubling and then halving the gap (to within 1/8)."""
    fixed = cfg.nprobe if index.kind == "ivf" else cfg.ef_search
    if fixed:
        point = _measure(index, check, fixed)
        return [point], point
    limit = _faiss().extract_index_ivf(index.index).nlist if index.kind == "ivf" else 4096
    tried, low, high = {}, 0, None
    breadth = 1 if index.kind == "ivf" else 16
    while high is None:
        tried[breadth] = _measure(index, check, breadth)
        if tried[breadth]["recall@10"] >= cfg.target_recall:
            high = breadth
        elif breadth >= limit:
            break
        else:
            low, breadth = breadth, min(2 * breadth, limit)
    while high is not None and low and high - low > max(1, low // 8):
        mid = (low + high) // 2
        tried[mid] = _measure(index, check, mid)
        low, high = (low, mid) if tried[mid]["recall@10"] >= cfg.target_recall else (mid, high)
    chosen = tried[high if high is not None else breadth]
    index.set_breadth(chosen["breadth"])
    return [tried[b] for b in sorted(tried)], chosen


def _measure(index: FaissIndex, check, breadth: int) -> dict:
    q, truth, own, _ = check
    index.set_breadth(breadth)
    t0 = time.perf_counter()
    found = index.search(q, CHECK_K + (own is not None))[1]
    ms = 1000 * (time.perf_counter() - t0) / len(q)
    recall = recall_at_k(_drop_own_rows(found, own), truth)
    return {"breadth": breadth, "recall@10": round(recall, 4), "ms_per_query": round(ms, 4)}


def _faiss_entry(exact: ExactIndex, cfg: IndexConfig, *, queries: Any | None, folder: Path,
                 reporter: Reporter, old: dict | None) -> dict:
    """Build (or reuse, when its build parameters match) the FAISS index in `folder`, then tune it."""
    faiss = _faiss()
    path = folder / f"{cfg.kind}.faiss"
    build = _build_params(cfg)
    if old and old.get("build") == build and path.is_file():
        index, factory, seconds = faiss.read_index(str(path)), old["factory"], old["build_seconds"]
    else:
        t0 = time.perf_counter()
        index, factory = _new_faiss_index(cfg, exact.n, exact.dim)
        _fill_faiss_index(index, exact.gallery, cfg, reporter)
        seconds = time.perf_counter() - t0
        with atomic_path(path) as tmp:
            faiss.write_index(index, str(tmp))
    check = _check_set(exact, queries, cfg)
    curve, chosen = _tune_breadth(FaissIndex(cfg.kind, index, {}), check, cfg)
    if chosen["recall@10"] < cfg.target_recall:
        _logger.warning("the %s index reaches recall@10 %.3f, below the target %.2f, at %s=%d", cfg.kind,
                        chosen["recall@10"], cfg.target_recall, _BREADTH[cfg.kind], chosen["breadth"])
    return {"file": path.name, "factory": factory, "build": build, "search": _search_params(cfg, queries),
            "build_seconds": round(seconds, 2),
            "breadth_name": _BREADTH[cfg.kind], "breadth": chosen["breadth"], "recall@10": chosen["recall@10"],
            "ms_per_query": chosen["ms_per_query"], "target_recall": cfg.target_recall,
            "recall_queries": check[3], "n_check_queries": len(check[0]), "tuning": curve}


# --- the cached folder --------------------------------------------------------------------------


def vectors_digest(vectors: np.ndarray) -> str:
    """A cheap digest of a large matrix: its shape, dtype and up to 4096 evenly spaced rows.

    It catches a regenerated gallery without reading every byte; the caller's fingerprint (model,
    checkpoint, dataset) is what says whose embeddings these are."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{vectors.shape}{vectors.dtype}".encode())
    rows = np.unique(np.linspace(0, len(vectors) - 1, num=min(len(vectors), 4096)).astype(np.int64))
    h.update(np.ascontiguousarray(vectors[rows]).tobytes())
    return h.hexdigest()


def build_index(
    vectors: str | Path | np.ndarray, folder: str | Path, fingerprint: dict[str, Any],
    cfg: IndexConfig | None = None, *, queries: Any | None = None, reporter: Reporter = NULL,
) -> ExactIndex | FaissIndex:
    """Write a new index folder for `vectors` ((n, dim) float16 .npy file or array), replacing any old one.

    `fingerprint` says what the vectors are (model, checkpoint, dataset, split); `queries`, when
    given, measure the FAISS index's recall (else gallery rows do)."""
    cfg = cfg or IndexConfig()
    fingerprint = _jsonable(fingerprint)
    array = _check_gallery(_load_vectors(vectors))
    exact = ExactIndex(array)
    meta = {"version": META_VERSION, "fingerprint": fingerprint, "n": exact.n, "dim": exact.dim,
            "digest": vectors_digest(array), "max_norm": exact.max_norm, "faiss": {}}
    folder = Path(folder)
    with atomic_dir(folder, replace=True) as tmp:
        _place_vectors(vectors, tmp / "vectors.npy")
        if cfg.kind != "exact":
            meta["faiss"][cfg.kind] = _faiss_entry(exact, cfg, queries=queries, folder=tmp, reporter=reporter,
                                                   old=None)
        write_json(tmp / "meta.json", meta)
    return open_index(folder, fingerprint, cfg.kind)


def ensure_index(
    vectors: str | Path | np.ndarray, folder: str | Path, fingerprint: dict[str, Any],
    cfg: IndexConfig | None = None, *, queries: Any | None = None, rebuild: bool = False,
    reporter: Reporter = NULL,
) -> ExactIndex | FaissIndex:
    """The index in `folder`, built on first use and reused after.

    A folder built for another fingerprint, or from vectors that have changed since, is refused
    (unless `rebuild`). A FAISS kind not built yet is added; changed build parameters rebuild it,
    changed search parameters only tune it again."""
    cfg = cfg or IndexConfig()
    folder = Path(folder)
    if rebuild or not folder.exists():
        return build_index(vectors, folder, fingerprint, cfg, queries=queries, reporter=reporter)
    meta = _read_meta(folder)
    _check_fingerprint(folder, meta, fingerprint)
    array = _check_gallery(_load_vectors(vectors))
    if array.shape != (meta["n"], meta["dim"]) or vectors_digest(array) != meta["digest"]:
        raise StaleIndex(f"the embeddings changed since the index in {folder} was built; "
                         f"delete {folder} or pass --rebuild-index to build it again")
    if cfg.kind != "exact" and _stale_entry(meta["faiss"].get(cfg.kind), cfg, queries):
        exact = _open(folder, meta, "exact", array)
        meta["faiss"][cfg.kind] = _faiss_entry(exact, cfg, queries=queries, folder=folder, reporter=reporter,
                                               old=meta["faiss"].get(cfg.kind))
        write_json(folder / "meta.json", meta)
    return _open(folder, meta, cfg.kind, array)


def _stale_entry(entry: dict | None, cfg: IndexConfig, queries: Any | None) -> bool:
    """Whether a FAISS index must be built (build parameters) or tuned again (search parameters)."""
    return entry is None or entry["build"] != _build_params(cfg) or entry["search"] != _search_params(cfg, queries)


def _build_params(cfg: IndexConfig) -> dict:
    return {key: getattr(cfg, key) for key in _BUILD_KEYS}


def _search_params(cfg: IndexConfig, queries: Any | None) -> dict:
    return {"fixed_breadth": cfg.nprobe if cfg.kind == "ivf" else cfg.ef_search, "target_recall": cfg.target_recall,
            "check_queries": cfg.check_queries, "given_queries": queries is not None}


def open_index(folder: str | Path, fingerprint: dict[str, Any], kind: str = "exact") -> ExactIndex | FaissIndex:
    """Open a built index; refuse one built from other vectors than `fingerprint` describes."""
    folder = Path(folder)
    meta = _read_meta(folder)
    _check_fingerprint(folder, meta, fingerprint)
    return _open(folder, meta, kind)


def _open(folder: Path, meta: dict, kind: str, verified: np.ndarray | None = None) -> ExactIndex | FaissIndex:
    """The index of a checked `meta`; `verified`: the caller's vectors, already matched to `meta`."""
    if verified is not None:
        array = verified
    else:
        try:
            array = np.load(folder / "vectors.npy", mmap_mode="r")
        except (OSError, ValueError):
            array = None
        if array is None or array.shape != (meta["n"], meta["dim"]) or vectors_digest(array) != meta["digest"]:
            raise MmretError(f"the vectors in {folder} do not match its meta.json; delete {folder} to rebuild the "
                             "index")
    exact = ExactIndex(array, max_norm=meta["max_norm"], info={"folder": str(folder)})
    if kind == "exact":
        return exact
    entry = meta["faiss"].get(kind)
    if entry is None:
        raise MmretError(f"no {kind} index has been built in {folder}; build it first")
    out = FaissIndex(kind, _faiss().read_index(str(folder / entry["file"])), dict(entry, folder=str(folder)))
    out.set_breadth(entry["breadth"])
    return out


def _read_meta(folder: Path) -> dict:
    path = folder / "meta.json"
    if not path.is_file():
        raise MmretError(f"no index in {folder} (meta.json is missing); delete the folder to rebuild it")
    try:
        meta = read_json(path)
    except ValueError:
        raise MmretError(f"{path} is damaged; delete {folder} to rebuild the index") from None
    if meta.get("version") != META_VERSION:
        raise MmretError(f"the index in {folder} was written by another mmret version; delete {folder} to rebuild it")
    return meta


def _check_fingerprint(folder: Path, meta: dict, fingerprint: dict[str, Any]) -> None:
    want, have = _jsonable(fingerprint), meta["fingerprint"]
    if want == have:
        return
    differ = [k for k in sorted(set(want) | set(have)) if want.get(k) != have.get(k)]
    built = ", ".join(f"{k}={have.get(k)}" for k in differ)
    asked = ", ".join(f"{k}={want.get(k)}" for k in differ)
    raise StaleIndex(f"the index in {folder} was built for {built}, not {asked}: it belongs to another "
                     f"model or dataset and will not be used; delete {folder} or pass --rebuild-index to build it "
                     "again")


def _jsonable(fingerprint: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(fingerprint, dict) or not fingerprint:
        raise MmretError("an index needs a non-empty fingerprint (model, checkpoint, dataset) to guard against reuse")
    return {str(k): v if isinstance(v, (int, float, bool)) or v is None else str(v) for k, v in fingerprint.items()}


def _load_vectors(vectors: str | Path | np.ndarray) -> np.ndarray:
    if isinstance(vectors, np.ndarray):
        return vectors
    path = Path(vectors)
    if not path.is_file():
        raise MmretError(f"no embeddings at {path}; compute them first (mmret precompute-embeddings --run ...)")
    try:
        return np.load(path, mmap_mode="r")
    except (ValueError, OSError) as e:
        raise MmretError(f"cannot read the embeddings at {path} ({e}); compute them again") from None


def _place_vectors(vectors: str | Path | np.ndarray, dest: Path) -> None:
    """Hard-link the embeddings file into the index: free, and since files are replaced rather than
    rewritten, the link keeps the version the index was built from. Else copy or save it."""
    if isinstance(vectors, np.ndarray):
        np.save(dest, np.ascontiguousarray(vectors))
        return
    try:
        os.link(vectors, dest)
    except OSError:
        shutil.copyfile(vectors, dest)
