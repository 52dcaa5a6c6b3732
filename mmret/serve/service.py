"""The long-lived object behind the web server, as clip-retrieval's `KnnService` is: the gallery
loaded once, the worker threads that own the model, the thumbnails, and every query the API
answers, checked against the limits. It knows nothing of HTTP beyond the status of its errors.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
from PIL import Image

from mmret.api import load
from mmret.common.io import atomic_path
from mmret.common.paths import ANYWHERE, Roots, data_root
from mmret.common.progress import NULL, Reporter
from mmret.common.version import __version__
from mmret.data.stamps import item_stamps
from mmret.errors import MmretError
from mmret.inference.search import Gallery, Hit
from mmret.modalities import ItemError
from mmret.modalities.base import open_source
from mmret.modalities.image import TooLarge, TooThin
from mmret.serve.config import ServeConfig
from mmret.serve.worker import BatchWorker, Busy

_logger = logging.getLogger(__name__)


class ApiError(Exception):
    """A request the server refuses: an HTTP status and one line that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


@dataclass
class Answer:
    """What one query found: items best first, captions (for item queries), and the time it took."""

    items: list[Hit]
    captions: list[Hit]
    ms: float


@dataclass
class _VectorJob:
    text: str | None  # encoded by the text tower, or
    row: int  # the gallery row whose embedding is the query ("more like this"; left out of the items), or -1
    k: int
    captions: bool  # also the captions that fit
    vector: np.ndarray | None = None  # or a query embedding given as it is


class SearchService:
    def __init__(self, gallery: Gallery, cfg: ServeConfig):
        self.gallery, self.cfg = gallery, cfg
        self.modality = gallery.modality
        self.vectors = BatchWorker("queries", self._run_vectors, cfg.max_batch, cfg.max_waiting)
        self.items = BatchWorker("items", self._run_items, 1, cfg.max_waiting)
        self.thumbnails = Thumbnails(data_root(gallery.run.cfg.data.data_dir) / gallery.dataset / "thumbnails",
                                     cfg.thumbnail_px, self.modality)
        self.started = time.time()

    @classmethod
    def open(cls, cfg: ServeConfig, reporter: Reporter = NULL) -> "SearchService":
        """Load the run, the gallery's embeddings and indexes, then warm every path a query takes."""
        gallery = load(cfg.run_dir, checkpoint=cfg.which, device=cfg.device).gallery(
            cfg.dataset, cfg.split, index=cfg.index, rebuild_index=cfg.rebuild_index, reporter=reporter)
        service = cls(gallery, cfg)
        service.warm_up()
        return service

    def warm_up(self) -> None:
        """Build the model for both sides and run one query of each kind, so the first request is
        as fast as the rest (and lazily built parts are built before any thread races for them)."""
        self.gallery.run.model()
        self._run_vectors([_VectorJob("warm up", -1, 1, True), _VectorJob(None, 0, 1, True)])
        for path in self.gallery.paths[:8]:
            try:
                self._run_items([(path, 1)])
                break
            except (MmretError, ApiError):
                continue  # an unreadable gallery file: try the next one

    def close(self) -> None:
        self.vectors.close()
        self.items.close()

    # -- what the server is
    def info(self) -> dict[str, Any]:
        g, run = self.gallery, self.gallery.run
        return {
            "run": run.name, "method": run.cfg.method.method, "checkpoint": run.which, "checkpoint_digest": run.digest,
            "dim": g.dim, "dataset": g.dataset, "split": g.split, "modality": self.modality.name,
            "noun": self.modality.noun, "plural": self.modality.plural, "items": g.n_items, "captions": g.n_captions,
            "index": g.index, "device": str(run.device), "version": __version__,
            "api_key": self.cfg.api_key is not None,
            "k": self.cfg.k, "uptime_s": round(time.time() - self.started, 1),
            "limits": {"max_k": self.cfg.max_k, "max_query_chars": self.cfg.max_query_chars,
                       "max_upload_bytes": self.cfg.max_upload_bytes, "max_pixels": self.cfg.max_pixels},
        }

    # -- queries
    async def text(self, text: str, k: int, captions: bool = False) -> Answer:
        """Items for a text (and with `captions`, the gallery's captions nearest to it)."""
        return await self._ask(self.vectors, _VectorJob(self._check_text(text), -1, self._check_k(k), captions))

    async def similar(self, item: str, k: int) -> Answer:
        """More like a gallery item: its nearest other items, and the captions that fit it."""
        row = self.row(item)
        return await self._ask(self.vectors, _VectorJob(None, row, self._check_k(k), True))

    async def vector(self, values: list[float], k: int) -> Answer:
        """Items and captions for a query embedding given by the client (normalized here)."""
        vec = np.asarray(values, dtype=np.float64)
        if vec.shape != (self.gallery.dim,) or not np.isfinite(vec).all() or not np.abs(vec).max() > 0:
            raise ApiError(422, f"embedding_input must be {self.gallery.dim} finite numbers, not all zero")
        vec = vec / np.abs(vec).max()  # first: the norm of numbers near the float limits would overflow
        vec = (vec / np.linalg.norm(vec)).astype(np.float32)
        return await self._ask(self.vectors, _VectorJob(None, -1, self._check_k(k), True, vec))

    async def upload(self, path: Path, k: int) -> Answer:
        """Items and captions for an uploaded item file (already within the byte limit)."""
        k = self._check_k(k)
        from starlette.concurrency import run_in_threadpool

        await run_in_threadpool(self._check_item_file, path)
        return await self._ask(self.items, (str(path), k))

    async def _ask(self, worker: BatchWorker, job: Any) -> Answer:
        import asyncio

        start = time.perf_counter()
        try:
            future = worker.submit(job)
        except Busy as e:
            raise ApiError(503, f"the server is busy ({e}); try again shortly") from None
        try:
            items, captions = await asyncio.wait_for(asyncio.wrap_future(future), self.cfg.timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(503, f"no answer within {self.cfg.timeout_s:g} s; try again shortly") from None
        return Answer(items, captions, round(1000 * (time.perf_counter() - start), 2))

    def row(self, item: str) -> int:
        if item not in self.gallery.row_of:
            raise ApiError(404, f"no {self.modality.noun} {item[:200]!r} in the gallery")
        return self.gallery.row_of[item]

    def _check_k(self, k: int) -> int:
        most = max(self.cfg.max_k, self.cfg.max_knn)  # /knn-service may ask for more than the page's routes
        if not 1 <= k <= most:
            raise ApiError(422, f"k must be between 1 and {most}, got {k}")
        return k

    def _check_text(self, text: str) -> str:
        if len(text) > self.cfg.max_query_chars:
            raise ApiError(422, f"the query has {len(text):,} characters; the limit is {self.cfg.max_query_chars:,}")
        if not text.strip():
            raise ApiError(422, "the query is empty")
        return text

    def _check_item_file(self, path: Path) -> None:
        """The upload opens as this gallery's kind of item and is within the pixel limit (read
        from the header, before anything is decoded)."""
        try:
            with open_source(path, ANYWHERE) as source:
                columns = self.modality.probe(source, False)
        except TooLarge as e:
            raise ApiError(413, f"the upload is too large: {e}") from None
        except TooThin as e:
            raise ApiError(422, f"the upload is too thin: {e}") from None
        except ItemError as e:
            raise ApiError(415, f"the upload is not a {self.modality.noun} mmret can read: {e}") from None
        pixels = columns.get("width", 0) * columns.get("height", 0)
        if pixels > self.cfg.max_pixels:
            raise ApiError(413, f"the upload is too large: {columns['width']:,} x {columns['height']:,} pixels "
                                f"({pixels:,}) is over the limit of {self.cfg.max_pixels:,} pixels")

    # -- the worker threads' batches
    def _run_vectors(self, jobs: list[_VectorJob]) -> list[tuple[list[Hit], list[Hit]]]:
        g = self.gallery
        texts = [j.text for j in jobs if j.text is not None]
        encoded = iter(g.encode_texts(texts) if texts else [])
        queries = np.stack([next(encoded) if j.text is not None else j.vector if j.vector is not None
                            else g.vectors([j.row])[0] for j in jobs])
        k = max(j.k for j in jobs)
        items = g.items_for(queries, k, leave_out=[j.row for j in jobs])
        want = [i for i, j in enumerate(jobs) if j.captions]
        found = dict(zip(want, g.captions_for(queries[want], k))) if want else {}
        return [(items[i][:j.k], found.get(i, [])[:j.k]) for i, j in enumerate(jobs)]

    def _run_items(self, jobs: list[tuple[str, int]]) -> list[tuple[list[Hit], list[Hit]]]:
        (path, k), = jobs
        try:
            query = self.gallery.encode_items([path])
        except MmretError as e:  # said without the temporary file's name
            raise ApiError(415, str(e).replace(f" {path}", "")) from None
        return [(self.gallery.items_for(query, k)[0], self.gallery.captions_for(query, k)[0])]

    # -- files
    def media(self, item: str) -> BinaryIO:
        """The file of a gallery item, found by its id only (never by a path from the request), opened
        through the gallery's roots (see `mmret.common.paths.Roots`): a file replaced by a link to
        elsewhere since the dataset was prepared is refused. The caller closes it."""
        return open_gallery_file(item, self.gallery.paths[self.row(item)], self.gallery.roots)

    def thumbnail(self, item: str) -> Path:
        return self.thumbnails.get(item, self.gallery.paths[self.row(item)], self.gallery.roots)

    def save_upload(self, chunks: Any, suffix: str) -> Path:
        """Write an upload to a temporary file (the caller deletes it)."""
        suffix = suffix.lower() if suffix.lower() in self.modality.extensions else ""
        fd, name = tempfile.mkstemp(prefix="mmret-query-", suffix=suffix)
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
        return Path(name)


def open_gallery_file(item: str, path: str, roots: Roots) -> BinaryIO:
    """A gallery item's file opened through `roots`: 404 when it is missing, 403 when it may not be
    read (it now resolves outside the dataset's roots, or is no regular file)."""
    try:
        return open_source(path, roots)
    except ItemError as e:
        status = 404 if str(e) == "file not found" else 403
        raise ApiError(status, f"the file of {item[:200]!r} cannot be served: {e}") from None


class Thumbnails:
    """Small JPEGs of gallery items, made on first request and kept in `folder/<size>/`, named by
    the item's stamp (id, file, size, mtime), so a changed file gets a new one."""

    def __init__(self, folder: Path, size: int, modality: Any):
        self.folder, self.size, self.modality = folder / str(size), size, modality
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def get(self, item: str, path: str, roots: Roots) -> Path:
        if self.modality.thumbnail is None:
            raise ApiError(404, f"no thumbnails for {self.modality.plural}; fetch the item itself")
        stamp = item_stamps([item], [str(path)], "")[0]
        name = hashlib.blake2b(f"{stamp}:{self.size}".encode(), digest_size=12).hexdigest() + ".jpg"
        out = self.folder / name
        if out.is_file():
            return out
        with self._guard:
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:  # two requests for one new thumbnail make it once
            if not out.is_file():
                try:
                    with open_gallery_file(item, path, roots) as source:
                        pixels = self.modality.thumbnail(source, self.size)
                except ItemError as e:
                    raise ApiError(415, f"cannot make a thumbnail of {item[:200]!r}: {e}") from None
                with atomic_path(out) as tmp:
                    Image.fromarray(pixels).save(tmp, format="JPEG", quality=85)
        with self._guard:
            self._locks.pop(name, None)
        return out
