"""`mmret search`: the gallery items that best match text queries or a query picture.

The gallery is a run's final embeddings of a dataset split (default: every image of the run's
dataset), searched through an index cached in `runs/<run>/index/<ds>-<split>-<images|captions>/`
(exact by default, FAISS IVF or HNSW on request). The index carries a fingerprint of the run's
checkpoint and the dataset: when they changed (the run trained on, the dataset was prepared
again) it is built again, as the embeddings are; it is never used for other embeddings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mmret.common.progress import NULL, Reporter
from mmret.errors import MmretError
from mmret.inference.embeddings import Embeddings, write_run_embeddings
from mmret.inference.index import IndexConfig, StaleIndex, ensure_index
from mmret.inference.loaded import LoadedRun

_logger = logging.getLogger(__name__)


@dataclass
class Hit:
    rank: int
    score: float
    image_id: str
    path: str
    captions: list[str]  # the image's captions (text queries); or the one matching caption (caption hits)
    right: bool | None = None  # the query is one of the gallery's captions: whether this is its item


@dataclass
class QueryResult:
    query: str  # the text, or the picture's path
    images: list[Hit]  # best-matching pictures
    captions: list[Hit] = field(default_factory=list)  # best-matching captions (picture queries)
    known: bool = False  # the query text is one of the gallery's captions (so its right item is known)

    def sheet_row(self) -> tuple[str, list]:
        """(title, items) for a results sheet: each hit's rank, score, id and captions, marked
        right or wrong when the query is a known caption."""
        from mmret.modalities import SheetItem

        title = f"{self.query!r}" + (" (a caption of this gallery)" if self.known else "")
        if self.known and not any(h.right for h in self.images):
            title += f": its item is not in the top {len(self.images)}"
        items = [SheetItem(h.path, [f"#{h.rank}  {h.score:.3f}  {h.image_id}", *h.captions[:2]],
                           None if h.right is None else ("right" if h.right else "wrong")) for h in self.images]
        return title, items


@dataclass
class SearchResult:
    run: str
    dataset: str
    split: str
    index: str
    results: list[QueryResult]
    modality: str = "image"  # what the gallery's items are

    def to_json(self) -> dict[str, Any]:
        import dataclasses

        return dataclasses.asdict(self)


def gallery_index(run_dir: Path, emb: Embeddings, which: str, cfg: IndexConfig, rebuild: bool, reporter: Reporter):
    """The cached index over the run's image (or caption) embeddings."""
    fingerprint = {"run": run_dir.name, "checkpoint": emb.manifest["checkpoint"], "dataset": emb.dataset,
                   "split": emb.split, "gallery": which,
                   "fingerprint": emb.manifest[f"{which}_fingerprint" if which == "images" else "captions_fingerprint"]}
    folder = run_dir / "index" / f"{emb.dataset}-{emb.split}-{which}"
    # an approximate index's recall is measured with the other modality's embeddings as queries,
    # which is how it will be searched
    other = emb.captions if which == "images" else emb.images
    queries = np.asarray(other[:cfg.check_queries], dtype=np.float32) if cfg.kind != "exact" else None
    try:
        return ensure_index(emb.path / f"{which}.npy", folder, fingerprint, cfg, queries=queries,
                            rebuild=rebuild, reporter=reporter)
    except StaleIndex:  # the run or the dataset changed since: build the index again, as the embeddings were
        _logger.warning("the %s gallery of %s changed since its index was built; building it again", which, emb.path.name)
        return ensure_index(emb.path / f"{which}.npy", folder, fingerprint, cfg, queries=queries, rebuild=True,
                            reporter=reporter)


def _image_hits(emb: Embeddings, scores: np.ndarray, ids: np.ndarray, query: str | None = None) -> list[Hit]:
    captions = emb.caption_table.groupby("image")["caption"].apply(list)
    table = emb.image_table
    return [Hit(rank + 1, float(s), str(table.image_id.iloc[i]), str(table.path.iloc[i]), captions.get(int(i), []),
                None if query is None else query in captions.get(int(i), []))
            for rank, (s, i) in enumerate(zip(scores, ids))]


def _caption_hits(emb: Embeddings, scores: np.ndarray, ids: np.ndarray) -> list[Hit]:
    rows = emb.caption_table
    out = []
    for rank, (s, i) in enumerate(zip(scores, ids)):
        image = int(rows.image.iloc[i])
        out.append(Hit(rank + 1, float(s), str(emb.image_table.image_id.iloc[image]),
                       str(emb.image_table.path.iloc[image]), [str(rows.caption.iloc[i])]))
    return out


def search(run_dir: Path, queries: list[str], image: Path | None = None, dataset: str | None = None,
           split: str = "all", k: int = 10, index: str = "exact", rebuild_index: bool = False,
           device: str = "auto", which: str = "best", reporter: Reporter = NULL,
           data_dir: Path | None = None) -> SearchResult:
    """Top-k pictures for each text query, or pictures and captions for a query picture."""
    if not queries and image is None:
        raise MmretError("nothing to search for: give a query text, --queries FILE, or --image PATH")
    if any(not q.strip() for q in queries):
        raise MmretError("a query is empty; give the words to search for")
    if image is not None and Path(image).is_dir():
        raise MmretError(f"--image {image} is a folder; give the path of one file to search with")
    if k < 1:
        raise MmretError(f"-k must be at least 1, got {k}")
    run = LoadedRun(run_dir, which, device)
    emb = write_run_embeddings(run, dataset, split, reporter=reporter, data_dir=data_dir)
    cfg = IndexConfig(kind=index)
    images_index = gallery_index(run_dir, emb, "images", cfg, rebuild_index, reporter)
    k_images = min(k, len(emb.images))
    results = []
    if queries:
        scores, ids = images_index.search(run.encode_texts(queries).numpy(), k_images)
        known = set(emb.caption_table["caption"])
        results += [QueryResult(q, _image_hits(emb, s, i, q if q in known else None), known=q in known)
                    for q, s, i in zip(queries, scores, ids)]
    if image is not None:
        query = run.encode_items([image]).numpy()
        scores, ids = images_index.search(query, k_images)
        captions_index = gallery_index(run_dir, emb, "captions", cfg, rebuild_index, reporter)
        c_scores, c_ids = captions_index.search(query, min(k, len(emb.captions)))
        results.append(QueryResult(str(image), _image_hits(emb, scores[0], ids[0]), _caption_hits(emb, c_scores[0], c_ids[0])))
    return SearchResult(run_dir.name, emb.dataset, split, index, results, run.cfg.data.modality)
