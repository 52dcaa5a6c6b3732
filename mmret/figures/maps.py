"""A 2-D map of a run's item and caption embeddings (`mmret eval --map map.png`).

Items and captions of the split are projected together, with UMAP (umap-learn, cosine distance)
or t-SNE (scikit-learn), so the picture shows both how the classes or splits cluster and how far
apart the two modalities sit (contrastive models keep a "modality gap" between them). Points are
coloured by class when the dataset has labels, else by split when the split is `all`; a seeded
sample of items is drawn as thumbnails through the modality.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mmret.errors import MmretError
from mmret.figures import MAP_METHODS
from mmret.figures.draw import MapPoints, map_figure
from mmret.inference.embeddings import Embeddings
from mmret.modalities import Modality

INSTALL = "pip install umap-learn scikit-learn (or: pip install 'mmret[eval]')"


@dataclass
class MapResult:
    path: Path
    method: str
    n_items: int
    n_captions: int
    colour_by: str  # class, split or modality
    groups: list[str]
    thumbnails: int  # drawn


def project(vectors: np.ndarray, method: str = "umap", seed: int = 0) -> np.ndarray:
    """(n, 2) coordinates of (n, D) embeddings: neighbours in the embedding stay neighbours."""
    n = len(vectors)
    if n < 5:
        raise MmretError(f"a map needs at least 5 embeddings, the split has {n}; map a larger split (e.g. --split all)")
    if method not in MAP_METHODS:
        raise MmretError(f"--map-method must be umap or tsne, got {method!r}")
    try:
        if method == "umap":
            import umap

            reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), metric="cosine", random_state=seed,
                                init="spectral" if n > 50 else "random")
        else:
            from sklearn.manifold import TSNE

            reducer = TSNE(n_components=2, perplexity=min(30.0, (n - 1) / 3), metric="cosine", init="pca",
                           random_state=seed)
    except ImportError:
        raise MmretError(f"--map-method {method} needs its library: {INSTALL}") from None
    with warnings.catch_warnings():  # umap warns that a seed turns off its parallel mode
        warnings.simplefilter("ignore")
        return np.asarray(reducer.fit_transform(np.asarray(vectors, dtype=np.float32)), dtype=np.float64)


def _groups(emb: Embeddings, ds: Any, rows: np.ndarray) -> tuple[str, list[str], np.ndarray]:
    """What colours the items (class, split or nothing), its names, and each item's group."""
    ids = emb.item_table["item_id"].to_numpy()[rows]
    table = ds.items.set_index("item_id") if ds is not None else pd.DataFrame()
    for column, name in (("label", "class"), ("split", "split")):
        if column in table.columns and (column == "label" or emb.split == "all"):
            values = table.loc[ids, column].astype(str).to_numpy()
            names = sorted(set(values))
            index = {v: i for i, v in enumerate(names)}
            return name, names, np.array([index[v] for v in values])
    return "modality", [emb.split], np.zeros(len(rows), dtype=np.int64)


def embedding_map(emb: Embeddings, ds: Any, modality: Modality, path: Path, *, method: str = "umap",
                  thumbnails: int = 30, max_items: int = 2000, seed: int = 0, title: str = "") -> MapResult:
    """Draw the map of `emb` (at most `max_items` items, a seeded sample, with their captions)."""
    rng = np.random.default_rng(seed)
    n_items = len(emb.items)
    rows = np.sort(rng.choice(n_items, max_items, replace=False)) if n_items > max_items else np.arange(n_items)
    caption_item = emb.caption_table["item"].to_numpy()
    caption_rows = np.nonzero(np.isin(caption_item, rows))[0]
    position = {r: i for i, r in enumerate(rows)}  # item row -> place in the sample
    xy = project(np.concatenate([np.asarray(emb.items, np.float32)[rows],
                                 np.asarray(emb.captions, np.float32)[caption_rows]]), method, seed)
    colour_by, groups, group = _groups(emb, ds, rows)
    items = MapPoints(xy[:len(rows)], group, "item")
    captions = MapPoints(xy[len(rows):], group[[position[r] for r in caption_item[caption_rows]]], "caption")
    picked = rng.choice(len(rows), min(thumbnails, len(rows)), replace=False) if thumbnails > 0 else []
    files = emb.item_table["path"].to_numpy()[rows]
    sampled = f", a sample of {len(rows):,} of {n_items:,} {modality.plural}" if len(rows) < n_items else ""
    title = title or f"{emb.dataset} {emb.split}: {len(rows):,} {modality.plural} and {len(caption_rows):,} captions"
    drawn = map_figure(items, captions, groups=groups, legend=f"colour: {colour_by}",
                       thumbs=[(int(i), files[i]) for i in picked], modality=modality,
                       title=f"{title} ({method}{sampled})", path=path, roots=emb.roots)
    return MapResult(path=path, method=method, n_items=len(rows), n_captions=len(caption_rows), colour_by=colour_by,
                     groups=groups, thumbnails=drawn)
