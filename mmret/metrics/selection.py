"""Caption selection as CLIP_benchmark scores it (`clip_benchmark/metrics/image_caption_selection.py`,
the protocol of SugarCrepe and Winoground): pure tensor functions.

An example holds I items and C captions; item i is right for caption i (i < min(I, C)). With
normalised embeddings, `scores = items @ captions.T` (I, C):

- `text_acc`: every one of the first min(I, C) items ranks its own caption first among the C
  (SugarCrepe's accuracy: the right caption beats the wrong one);
- `image_acc`: every one of the first min(I, C) captions ranks its own item first among the I
  (always true with one item);
- `acc`: both (Winoground's group score).

Ties go as `torch.argmax` takes them, to the first index, which is CLIP_benchmark's rule (it
favours the right answer, which always comes first), so the numbers are CLIP_benchmark's to the
digit. Chance is what random scores would give: exact by counting orders for small examples.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

NAMES = ("text_acc", "image_acc", "acc")


@dataclass
class SelectionResult:
    """Per-example outcomes; `metrics` is their mean per task and over all examples (`all`)."""

    text_ok: np.ndarray  # (E,) bool
    image_ok: np.ndarray  # (E,) bool
    tasks: np.ndarray  # (E,) str

    @property
    def both_ok(self) -> np.ndarray:
        return self.text_ok & self.image_ok

    def outcomes(self) -> dict[str, np.ndarray]:
        return {"text_acc": self.text_ok, "image_acc": self.image_ok, "acc": self.both_ok}

    def metrics(self, rows: np.ndarray | None = None) -> dict[str, dict[str, float]]:
        """{task: {text_acc, image_acc, acc, n}} over `rows` of the examples (default all), and `all`
        when there are several tasks."""
        rows = np.arange(len(self.tasks)) if rows is None else rows
        out = {}
        names = list(dict.fromkeys(self.tasks[rows].tolist()))
        for task in names + (["all"] if len(names) > 1 else []):
            mine = rows if task == "all" else rows[self.tasks[rows] == task]
            out[task] = {k: float(v[mine].mean()) if len(mine) else float("nan") for k, v in self.outcomes().items()}
            out[task]["n"] = int(len(mine))
        return out


def caption_selection(items: list[Tensor], captions: list[Tensor], tasks: list[str]) -> SelectionResult:
    """Every example's outcome: `items[e]` (I, D) and `captions[e]` (C, D) embeddings, item i right
    for caption i. Examples of one shape are scored together."""
    text_ok, image_ok = np.zeros(len(items), bool), np.zeros(len(items), bool)
    shapes: dict[tuple[int, int], list[int]] = {}
    for e, (i, c) in enumerate(zip(items, captions)):
        shapes.setdefault((len(i), len(c)), []).append(e)
    for (n_items, n_captions), group in shapes.items():
        a = F.normalize(torch.stack([items[e] for e in group]).float(), dim=-1)  # (G, I, D)
        b = F.normalize(torch.stack([captions[e] for e in group]).float(), dim=-1)  # (G, C, D)
        scores = a @ b.transpose(1, 2)  # (G, I, C)
        gt = torch.arange(min(n_items, n_captions))
        text_ok[group] = (scores.argmax(dim=2)[:, :len(gt)] == gt).all(dim=1).numpy()
        image_ok[group] = (scores.argmax(dim=1)[:, :len(gt)] == gt).all(dim=1).numpy()
    return SelectionResult(text_ok, image_ok, np.asarray(tasks, dtype=object))


def chance(n_items: int, n_captions: int, draws: int = 20000, seed: int = 0) -> dict[str, float]:
    """What random scores give for an example of `n_items` x `n_captions`: text_acc and image_acc
    exactly ((1/C)^g and (1/I)^g, g = min(I, C): each row, or column, is its own draw); acc by
    counting every order of the I*C scores when there are at most 8 of them (2 x 2: 1/6, as
    Winoground reports), else by `draws` seeded random draws."""
    g = min(n_items, n_captions)
    text, image = (1 / n_captions) ** g, (1 / n_items) ** g
    if n_items == 1 or n_captions == 1:
        return {"text_acc": text, "image_acc": image, "acc": min(text, image)}
    cells = n_items * n_captions
    gt = torch.arange(g)
    if cells <= 8:
        orders = torch.tensor(list(itertools.permutations(range(cells))), dtype=torch.float32)
    else:
        orders = torch.rand(draws, cells, generator=torch.Generator().manual_seed(seed))
    scores = orders.view(-1, n_items, n_captions)
    both = (scores.argmax(2)[:, :g] == gt).all(1) & (scores.argmax(1)[:, :g] == gt).all(1)
    return {"text_acc": text, "image_acc": image, "acc": int(both.sum()) / len(both)}


def bootstrap_selection(result: SelectionResult, n_boot: int = 1000, seed: int = 0,
                        level: float = 0.95) -> dict[str, dict[str, tuple[float, float]]]:
    """Percentile intervals of every task's metrics, resampling the examples of each task (with
    replacement, seeded)."""
    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, tuple[float, float]]] = {}
    tasks = list(dict.fromkeys(result.tasks.tolist()))
    for task in tasks + (["all"] if len(tasks) > 1 else []):
        rows = np.arange(len(result.tasks)) if task == "all" else np.flatnonzero(result.tasks == task)
        draws = rows[rng.integers(0, len(rows), size=(n_boot, len(rows)))]  # (n_boot, n)
        lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
        out[task] = {k: (float(np.percentile(v[draws].mean(1), lo)), float(np.percentile(v[draws].mean(1), hi)))
                     for k, v in result.outcomes().items()}
    return out
