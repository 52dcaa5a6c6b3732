"""Failure galleries (`mmret eval --failures worst.png`): the text→item queries a run gets most
wrong, each with its caption, the right item and the items it ranked above it.

Ranks follow `mmret.metrics.retrieval` (a wrong item scoring as high as the right one counts as
above it); the worst queries are those of the highest rank, the earlier caption first among
equals. The same rows are written as JSON beside the PNG for scripts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from mmret.common.io import write_json
from mmret.errors import MmretError
from mmret.figures.draw import GalleryRow, gallery_figure
from mmret.inference.embeddings import Embeddings
from mmret.metrics.retrieval import retrieval_metrics
from mmret.modalities import Modality


@dataclass
class FailuresResult:
    path: Path  # the PNG
    json_path: Path
    rows: list[GalleryRow]
    n_queries: int


def worst_queries(emb: Embeddings, t2i_ranks: torch.Tensor | None = None, *, count: int = 8,
                  above: int = 5) -> list[GalleryRow]:
    """The `count` captions whose item ranked lowest, with up to `above` items ranked over it."""
    if count < 1:
        raise MmretError(f"--worst must be at least 1, got {count}")
    if above < 0:
        raise MmretError(f"the items shown above the right one cannot be fewer than 0, got {above}")
    items = torch.from_numpy(np.asarray(emb.items, dtype=np.float32))
    captions = torch.from_numpy(np.asarray(emb.captions, dtype=np.float32))
    truth = emb.caption_item
    if t2i_ranks is None:
        t2i_ranks = retrieval_metrics(items, captions, truth).t2i_ranks
    order = sorted(range(len(t2i_ranks)), key=lambda q: (-int(t2i_ranks[q]), q))[:count]
    files = emb.item_table["path"].tolist()
    rows = []
    for q in order:
        scores = captions[q] @ items.T  # (N,)
        right = int(truth[q])
        over = (scores >= scores[right]).nonzero().squeeze(1)
        over = over[over != right]
        best = sorted(over.tolist(), key=lambda i: (-float(scores[i]), i))[:above]
        rows.append(GalleryRow(str(emb.caption_table["caption"].iloc[q]), files[right], int(t2i_ranks[q]),
                               float(scores[right]), [(files[i], float(scores[i])) for i in best]))
    return rows


def failure_gallery(emb: Embeddings, modality: Modality, path: Path, *, count: int = 8, above: int = 5,
                    t2i_ranks: torch.Tensor | None = None, title: str = "") -> FailuresResult:
    """Draw the worst text→item queries of `emb` to `path` (PNG) and list them in `path`.json."""
    rows = worst_queries(emb, t2i_ranks, count=count, above=above)
    n = len(emb.captions)
    title = title or (f"{emb.dataset} {emb.split}: the {len(rows)} worst of {n:,} text→{modality.noun} queries "
                      f"({len(emb.items):,} {modality.plural})")
    gallery_figure(rows, modality, title=title, path=path, roots=emb.roots)
    json_path = path.with_suffix(".json")
    write_json(json_path, {"dataset": emb.dataset, "split": emb.split, "queries": n,
                           "rows": [asdict(r) for r in rows]})
    return FailuresResult(path, json_path, rows, n)
