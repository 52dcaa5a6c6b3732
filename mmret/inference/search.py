"""Search a run's gallery: the items that best match text queries, a query item, or an item of
the gallery itself (more like this: its row's embedding as the query, the row left out, as `mmret
serve` asks), and the captions that fit a query item.

A `Gallery` is loaded once and answers many queries: the run (`LoadedRun`), its final embeddings
of a dataset split (default: every item of the run's dataset) and the indexes over them, cached in
`runs/<run>/index/<ds>-<split>-<items|captions>/` (exact by default, FAISS IVF or HNSW on
request). `mmret search` opens one per command, `mmret serve` one per process. An index carries a
fingerprint of the run's checkpoint and the dataset: when they changed (the run trained on, the
dataset was prepared again after items were added) it is built again, as the embeddings are; it is
never used for other embeddings.

Inside, a hit names its item `item_id` and a query's hits are its `items`, whatever the modality;
`SearchResult.to_json`, the one place answers are named for people, says what the dataset's tables
say: `images` and `image_id` for pictures, `audio` and `audio_id` for sounds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmret.common.paths import Roots
from mmret.common.progress import NULL, Reporter
from mmret.data.prepared import load_dataset
from mmret.errors import MmretError
from mmret.inference.embeddings import Embeddings, write_run_embeddings
from mmret.inference.index import IndexConfig, StaleIndex, ensure_index
from mmret.inference.loaded import LoadedRun
from mmret.modalities import Modality, get_modality
from mmret.runs.space import space_member, space_runs

_logger = logging.getLogger(__name__)


@dataclass
class Hit:
    rank: int
    score: float
    item_id: str  # the gallery item's id (a picture's, or a sound's)
    path: str
    captions: list[str]  # the item's captions (item hits); or the one matching caption (caption hits)
    right: bool | None = None  # the query is one of the gallery's captions: whether this is its item
    url: str | None = None  # where the item came from (img2dataset's url, a captions table's url column), if known
    row: int = -1  # the item's row in the gallery (its embeddings' row)
    caption_row: int = -1  # caption hits: the caption's row in the gallery's captions


@dataclass
class QueryResult:
    query: str  # the text, the item file's path, or the gallery id
    items: list[Hit]  # best-matching items
    captions: list[Hit] = field(default_factory=list)  # best-matching captions (item queries)
    known: bool = False  # the query text is one of the gallery's captions (so its right item is known)
    unknown: list[str] = field(default_factory=list)  # words of a text query the run never learned

    @property
    def mostly_unknown(self) -> bool:
        """Whether most words of a text query are outside what the run learned: its scores then mean little."""
        from mmret.data.tokenizer import words

        return bool(self.unknown) and 2 * len(self.unknown) > len(words(self.query))

    def sheet_row(self) -> tuple[str, list]:
        """(title, items) for a results sheet: each hit's rank, score, id and captions, marked
        right or wrong when the query is a known caption."""
        from mmret.modalities import SheetItem

        title = f"{self.query!r}" + (" (a caption of this gallery)" if self.known else "")
        if self.known and not any(h.right for h in self.items):
            title += f": its item is not in the top {len(self.items)}"
        items = [SheetItem(h.path, [f"#{h.rank}  {h.score:.3f}  {h.item_id}", *h.captions[:2]],
                           None if h.right is None else ("right" if h.right else "wrong")) for h in self.items]
        return title, items


@dataclass
class SearchResult:
    run: str
    dataset: str
    split: str
    index: str
    results: list[QueryResult]
    modality: str = "image"  # what the gallery's items are
    roots: Roots = field(default_factory=Roots, repr=False)  # where the gallery's files may be read
    query_run: str | None = None  # the run of the same space that embedded a query item of another modality

    def to_json(self) -> dict[str, Any]:
        import dataclasses

        modality = get_modality(self.modality)
        out = dataclasses.asdict(self)
        del out["roots"]

        def hit(h: dict) -> dict:
            return {modality.id_column if k == "item_id" else k: v for k, v in h.items()}

        out["results"] = [{"query": q["query"], modality.plural: [hit(h) for h in q["items"]],
                           "captions": [hit(h) for h in q["captions"]], "known": q["known"],
                           "unknown_words": q["unknown"]} for q in out["results"]]
        return out


def near_duplicates(vectors: np.ndarray, threshold: float = 0.94, block: int = 1024) -> set[int]:
    """The positions clip-retrieval's `deduplicate` leaves out of a ranked list: results whose
    embeddings are within `threshold` cosine of another's are one group, transitively (connected
    components), and each group keeps only its best-ranked member. Compared block by block, so
    10,000 results never hold a 10,000 x 10,000 matrix."""
    x = np.asarray(vectors, dtype=np.float32)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    parent = list(range(len(x)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for start in range(0, len(x), block):
        close = np.argwhere(x[start:start + block] @ x.T >= threshold)
        for i, j in close.tolist():
            a, b = root(start + i), root(j)
            if a != b:
                parent[max(a, b)] = min(a, b)  # a group's root is its best-ranked member
    return {i for i in range(len(x)) if root(i) != i}


def gallery_index(run_dir: Path, emb: Embeddings, side: str, *, cfg: IndexConfig, rebuild: bool,
                  reporter: Reporter):
    """The cached index over the run's item (`side` items) or caption (captions) embeddings."""
    fingerprint = {"run": run_dir.name, "checkpoint": emb.manifest["checkpoint"], "dataset": emb.dataset,
                   "split": emb.split, "gallery": side,
                   "fingerprint": emb.manifest[f"{side}_fingerprint"]}
    folder = run_dir / "index" / f"{emb.dataset}-{emb.split}-{side}"
    # an approximate index's recall is measured with the other modality's embeddings as queries,
    # which is how it will be searched
    other = emb.captions if side == "items" else emb.items
    queries = np.asarray(other[:cfg.check_queries], dtype=np.float32) if cfg.kind != "exact" and len(other) else None
    try:
        return ensure_index(emb.array_path(side), folder, fingerprint, cfg, queries=queries,
                            rebuild=rebuild, reporter=reporter)
    except StaleIndex:  # the run or the dataset changed since: build the index again, as the embeddings were
        _logger.warning("the %s gallery of %s changed since its index was built; building it again", side,
                        emb.path.name)
        return ensure_index(emb.array_path(side), folder, fingerprint, cfg, queries=queries, rebuild=True,
                            reporter=reporter)


class Gallery:
    """A run's gallery, loaded once: the model, the final embeddings and the indexes over them.

    Queries become embeddings through the run (`encode_texts`, `encode_items`) or are gallery rows
    (`vectors`); `items_for` and `captions_for` turn query embeddings into hits."""

    def __init__(self, run: LoadedRun, emb: Embeddings, items_index: Any, captions_index: Any | None, *,
                 index: str = "exact", sources: pd.DataFrame | None = None):
        self.run, self.emb, self.index = run, emb, index
        self.items_index, self.captions_index = items_index, captions_index
        self.ids = emb.item_table["item_id"].astype(str).tolist()
        self.paths = emb.item_table["path"].astype(str).tolist()
        self.row_of = {item: row for row, item in enumerate(self.ids)}
        self.caption_texts = emb.caption_table["caption"].astype(str).tolist()
        self.caption_items = emb.caption_table["item"].to_numpy(np.int64)
        self.known_captions = set(self.caption_texts)
        self.captions_of: list[list[str]] = [[] for _ in self.ids]
        for text, row in zip(self.caption_texts, self.caption_items.tolist()):
            self.captions_of[row].append(text)
        # each row's source fields (item_id, then e.g. url, sha256), when the dataset kept any
        known = sources is not None and len(sources.columns) > 1
        self.sources = (sources.drop_duplicates("item_id").set_index("item_id").reindex(self.ids) if known
                        else pd.DataFrame(index=pd.Index(self.ids, name="item_id")))
        self.urls: list[str | None] = ([None if pd.isna(u) else str(u) for u in self.sources["url"]]
                                       if "url" in self.sources.columns else [None] * len(self.ids))

    def source(self, row: int) -> dict[str, Any]:
        """The source's own fields of a gallery row (those it has), as JSON-ready values."""
        fields = self.sources.iloc[row].to_dict() if len(self.sources.columns) else {}
        return {k: (v.item() if hasattr(v, "item") else v) for k, v in fields.items() if not pd.isna(v)}

    @classmethod
    def open(cls, run: LoadedRun | Path, dataset: str | None = None, split: str = "all", *, index: str = "exact",
             rebuild_index: bool = False, captions: bool = True, which: str = "best", device: str = "auto",
             reporter: Reporter = NULL, data_dir: Path | None = None) -> "Gallery":
        """Load `run` (a folder or a loaded run) and its gallery; `captions` also opens the caption
        index (for item queries), when the gallery has captions."""
        run = run if isinstance(run, LoadedRun) else LoadedRun(run, which=which, device=device)
        ds = load_dataset(dataset or run.cfg.data.dataset, data_dir or run.cfg.data.data_dir)
        emb = write_run_embeddings(run, ds, split, reporter=reporter)
        cfg = IndexConfig(kind=index)
        items_index = gallery_index(run.run_dir, emb, "items", cfg=cfg, rebuild=rebuild_index, reporter=reporter)
        captions_index = None
        if captions and len(emb.captions):
            captions_index = gallery_index(run.run_dir, emb, "captions", cfg=cfg, rebuild=rebuild_index,
                                           reporter=reporter)
        return cls(run, emb, items_index, captions_index, index=index, sources=ds.sources())

    # -- what the gallery is
    @property
    def modality(self) -> Modality:
        return get_modality(self.run.cfg.data.modality)

    @property
    def dataset(self) -> str:
        return self.emb.dataset

    @property
    def split(self) -> str:
        return self.emb.split

    @property
    def roots(self) -> Roots:
        """Where the gallery's item files may be read (its dataset's roots)."""
        return self.emb.roots

    @property
    def n_items(self) -> int:
        return len(self.ids)

    @property
    def n_captions(self) -> int:
        return len(self.caption_texts)

    @property
    def dim(self) -> int:
        return int(self.emb.items.shape[1])

    # -- queries into embeddings
    def encode_texts(self, texts: list[str]) -> np.ndarray:
        """(Q, D) float32 embeddings of captions."""
        return self.run.encode_texts(list(texts)).numpy()

    def encode_items(self, items: list[Any]) -> np.ndarray:
        """(Q, D) float32 embeddings of items of the run's modality (files, or items held in memory)."""
        return self.run.encode_items(list(items)).numpy()

    def vectors(self, rows: list[int]) -> np.ndarray:
        """(Q, D) float32 gallery embeddings of rows: the query of "more like this"."""
        return np.asarray(self.emb.items[np.asarray(rows, dtype=np.int64)], dtype=np.float32)

    # -- embeddings into hits
    def items_for(self, queries: np.ndarray, k: int, leave_out: list[int] | None = None) -> list[list[Hit]]:
        """The top-k items of each query embedding, best first; `leave_out[q]` is a row that query
        q must not return (the item a "more like this" query started from)."""
        extra = 1 if leave_out is not None else 0
        scores, ids = self.items_index.search(queries, min(k + extra, self.n_items))
        out = []
        for q, (s, i) in enumerate(zip(scores, ids)):
            keep = (i >= 0) & (i != (leave_out[q] if leave_out is not None else -1))
            s, i = s[keep][:k], i[keep][:k]
            ranked = enumerate(zip(s.tolist(), i.tolist()))
            out.append([Hit(rank=r + 1, score=float(score), item_id=self.ids[row], path=self.paths[row],
                            captions=list(self.captions_of[row]), url=self.urls[row], row=row)
                        for r, (score, row) in ranked])
        return out

    def captions_for(self, queries: np.ndarray, k: int) -> list[list[Hit]]:
        """The top-k captions of each query embedding (none when the gallery has no captions)."""
        if self.captions_index is None:
            return [[] for _ in range(len(queries))]
        scores, ids = self.captions_index.search(queries, min(k, self.n_captions))
        out = []
        for s, i in zip(scores, ids):
            hits = []
            for r, (score, row) in enumerate((a, b) for a, b in zip(s.tolist(), i.tolist()) if b >= 0):
                item = int(self.caption_items[row])
                hits.append(Hit(rank=r + 1, score=float(score), item_id=self.ids[item], path=self.paths[item],
                                captions=[self.caption_texts[row]], url=self.urls[item], row=item, caption_row=row))
            out.append(hits)
        return out

    # -- whole queries
    def search_texts(self, texts: list[str], k: int) -> list[QueryResult]:
        """The items of each text; a text that is one of the gallery's captions marks its item right."""
        hits = self.items_for(self.encode_texts(texts), k)
        out = []
        for text, found in zip(texts, hits):
            known = text in self.known_captions
            for h in found:
                h.right = text in h.captions if known else None
            out.append(QueryResult(text, found, known=known, unknown=self.run.unknown_words(text)))
        return out

    def search_items(self, items: list[Any], k: int, encoder: LoadedRun | None = None) -> list[QueryResult]:
        """The items and captions nearest to each query item (a file, or an item held in memory),
        embedded by the gallery's run, or by `encoder`, a run of the same space whose items are of
        the query's modality (a sound finds pictures: see `mmret.runs.space`)."""
        queries = self.encode_items(items) if encoder is None else encoder.encode_items(list(items)).numpy()
        hits, captions = self.items_for(queries, k), self.captions_for(queries, k)
        names = [str(i) if isinstance(i, (str, Path)) else f"({type(i).__name__})" for i in items]
        return [QueryResult(n, h, c) for n, h, c in zip(names, hits, captions)]


def search(run: Path | LoadedRun, queries: list[str], *, item: Any = None, dataset: str | None = None,
           split: str = "all", k: int = 10, index: str = "exact", rebuild_index: bool = False,
           which: str = "best", device: str = "auto", reporter: Reporter = NULL,
           data_dir: Path | None = None, query_modality: str | None = None) -> SearchResult:
    """Top-k items for each text query, or items and captions for a query item (`item`: a picture
    or a sound, whichever the run's items are, as a file or held in memory; `query_modality` says
    which the caller meant, and a query of the other kind is refused). `run` is a run folder or a
    loaded run (whose checkpoint and device then apply)."""
    if any(not q.strip() for q in queries):
        raise MmretError("a query is empty; give the words to search for")
    if isinstance(item, (str, Path)) and Path(item).is_dir():
        raise MmretError(f"--{query_modality or 'image'} {item} is a folder; give the path of one file to search with")
    if k < 1:
        raise MmretError(f"-k must be at least 1, got {k}")
    run = run if isinstance(run, LoadedRun) else LoadedRun(run, which=which, device=device)
    modality = get_modality(run.cfg.data.modality)
    if not queries and item is None:
        raise MmretError(f"nothing to search for: give a query text, --queries FILE, or --{modality.name} PATH")
    encoder = None  # a query item of another modality is embedded by the run of the space that has its kind
    if item is not None and query_modality not in (None, modality.name):
        kind = get_modality(query_modality)
        try:
            member = space_member(run.run_dir, kind.name, kind.plural)
        except MmretError:
            raise MmretError(f"run {run.name} searches {modality.plural}, not {kind.plural}, and no run over "
                             f"{kind.plural} shares its space: query with --{modality.name} PATH, or train one into "
                             f"it (mmret train --dataset <{kind.plural}> --bind-to {run.name})") from None
        encoder = LoadedRun(member, which=run.which, device=str(run.device))
    gallery = Gallery.open(run, dataset, split, index=index, rebuild_index=rebuild_index, captions=item is not None,
                           reporter=reporter, data_dir=data_dir)
    results = gallery.search_texts(queries, k) if queries else []
    if item is not None:
        results += gallery.search_items([item], k, encoder)
    return SearchResult(run=run.name, dataset=gallery.dataset, split=split, index=index, results=results,
                        modality=gallery.modality.name, roots=gallery.roots,
                        query_run=encoder.name if encoder is not None else None)


def search_space(run: Path | LoadedRun, queries: list[str], *, item: Any = None, split: str = "all", k: int = 10,
                 index: str = "exact", which: str = "best", device: str = "auto", reporter: Reporter = NULL,
                 data_dir: Path | None = None, query_modality: str | None = None) -> list[SearchResult]:
    """`search` over the gallery of every run of `run`'s space (each its own dataset's items: the
    pictures of a picture run, the sounds of a sound run), the anchor first. The text side is the
    same in all of them, but each gallery is ranked apart: scores of different modalities are not
    comparable (each run's items sit at their own distance from the text)."""
    run_dir = run.run_dir if isinstance(run, LoadedRun) else Path(run)
    which, device = (run.which, str(run.device)) if isinstance(run, LoadedRun) else (which, device)
    loaded = run if isinstance(run, LoadedRun) else None  # the run already loaded is not loaded again
    return [search(loaded if loaded is not None and member.name == loaded.name else member, queries, item=item,
                   split=split, k=k, index=index, which=which, device=device, reporter=reporter, data_dir=data_dir,
                   query_modality=query_modality)
            for member in space_runs(run_dir)]
