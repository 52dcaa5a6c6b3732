"""The pictures eval draws for people to look at, with matplotlib's file backend: a confusion
matrix, a 2-D map of item and caption embeddings, and a gallery of failed text queries.

Items are drawn through their modality's `thumbnail` (a picture shrunk; another modality draws
what suits it), never opened here: an item that cannot be drawn shows its file name instead.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from mmret.common.io import atomic_path
from mmret.modalities import ItemError, Modality
from mmret.modalities.base import open_source

_GOOD, _BAD = "#1a9850", "#d73027"  # frame of the right item, of the items ranked above it


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path, dpi: int = 100) -> None:
    plt = _pyplot()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def thumbnail(modality: Modality, path: str | Path, size: int, roots: Any) -> np.ndarray | None:
    """The item (read through `roots`) drawn small by its modality, or None when it has no drawing or
    cannot be read."""
    if modality.thumbnail is None:
        return None
    try:
        with open_source(path, roots) as source:
            return modality.thumbnail(source, size)
    except ItemError:
        return None


def colours(n: int) -> list[Any]:
    """n distinguishable colours (tab10 / tab20, repeating beyond 20)."""
    cmap = _pyplot().get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def confusion_figure(confusion: np.ndarray, labels: Sequence[str], title: str, path: Path) -> None:
    """Rows are the right classes, columns the predicted ones; colour is the row's share (recall),
    the number the count."""
    plt = _pyplot()
    c = len(labels)
    share = confusion / np.maximum(confusion.sum(1, keepdims=True), 1)
    side = min(24.0, max(5.0, 0.42 * c + 2.5))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    shown = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the class's items")
    ax.set_xticks(range(c), labels, rotation=60, ha="right", fontsize=8 if c > 20 else 9)
    ax.set_yticks(range(c), [f"{label} ({n})" for label, n in zip(labels, confusion.sum(1))],
                  fontsize=8 if c > 20 else 9)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("right class (items)")
    if c <= 40:
        for i, j in zip(*np.nonzero(confusion)):
            ax.text(j, i, str(confusion[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path)


@dataclass
class MapPoints:
    xy: np.ndarray  # (n, 2)
    group: np.ndarray  # (n,) int: index into the map's groups
    kind: str  # "item" or "caption"


def map_figure(items: MapPoints, captions: MapPoints, *, groups: list[str], legend: str,
               thumbs: list[tuple[int, str]], modality: Modality, title: str, path: Path, roots: Any,
               thumb_px: int = 40) -> int:
    """Items as dots and captions as crosses, coloured by group, with `thumbs` (item row, file, read
    through `roots`) drawn at their dots; returns how many thumbnails were drawn."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.offsetbox import AnnotationBbox, OffsetImage

    palette = colours(len(groups))
    fig, ax = plt.subplots(figsize=(12, 10))
    ax.scatter(captions.xy[:, 0], captions.xy[:, 1], c=[palette[g] for g in captions.group], marker="x", s=14,
               linewidths=0.8, alpha=0.55)
    ax.scatter(items.xy[:, 0], items.xy[:, 1], c=[palette[g] for g in items.group], marker="o", s=22,
               edgecolors="white", linewidths=0.4, alpha=0.9)
    drawn = 0
    for row, file in thumbs:
        picture = thumbnail(modality, file, thumb_px, roots)
        if picture is None:
            continue
        box = AnnotationBbox(OffsetImage(picture, zoom=1.0), items.xy[row], frameon=True, pad=0.1,
                             bboxprops={"edgecolor": palette[items.group[row]], "linewidth": 1.5})
        ax.add_artist(box)
        drawn += 1
    handles = [Line2D([], [], marker="o", ls="", color="grey", label=modality.noun + "s"),
               Line2D([], [], marker="x", ls="", color="grey", label="captions")]
    if len(groups) > 1:
        handles += [Line2D([], [], marker="s", ls="", color=palette[i], label=g) for i, g in enumerate(groups[:20])]
    ax.legend(handles=handles, title=legend, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, path, dpi=110)
    return drawn


@dataclass
class GalleryRow:
    caption: str
    right: str  # the right item's file
    rank: int  # where the run ranked it
    score: float
    above: list[tuple[str, float]]  # (file, score) of the items ranked above it, best first


QUOTES = {'"': '"', "'": "'", "“": "”", "‘": "’", "«": "»", "„": "“"}  # opening mark -> its closing mark


def quoted(caption: str) -> str:
    """The caption in quotation marks, unless it is quoted already (`“School Crossing”.`, a title as
    some sets write it), which marks of ours around it would double."""
    core = caption.strip().rstrip(".!?;:,")
    if len(core) > 1 and core[0] in QUOTES and core[-1] == QUOTES[core[0]]:
        return caption.strip()
    return f"“{caption}”"


def gallery_figure(rows: list[GalleryRow], modality: Modality, *, title: str, path: Path, roots: Any,
                   thumb_px: int = 160) -> None:
    """One row per failed query: its caption over the right item (green) and what ranked above it
    (red), the items read through `roots`."""
    plt = _pyplot()
    cols = 1 + max(1, max(len(r.above) for r in rows))
    fig = plt.figure(figsize=(2.0 * cols, 2.55 * len(rows) + 0.5))
    head, *subs = fig.subfigures(len(rows) + 1, 1, height_ratios=[0.5 / 2.55] + [1.0] * len(rows))
    head.suptitle(title, fontsize=11, y=0.6)
    for sub, row in zip(subs, rows):
        sub.suptitle("\n".join(textwrap.wrap(quoted(row.caption), 40 * cols // 2)[:2]), fontsize=9, x=0.01,
                     ha="left")
        axes = sub.subplots(1, cols)
        cells = [(row.right, f"right {modality.noun}: rank {row.rank}\nscore {row.score:.3f}", _GOOD)]
        cells += [(file, f"#{i} score {score:.3f}", _BAD) for i, (file, score) in enumerate(row.above, 1)]
        for i, ax in enumerate(axes):
            ax.set_xticks([])
            ax.set_yticks([])
            if i >= len(cells):
                ax.axis("off")
                continue
            file, label, colour = cells[i]
            picture = thumbnail(modality, file, thumb_px, roots)
            if picture is None:
                ax.text(0.5, 0.5, Path(file).name, ha="center", va="center", fontsize=7, wrap=True)
            else:
                ax.imshow(picture)
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
            ax.set_xlabel(label, fontsize=7.5, color=colour)
    _save(fig, path)
