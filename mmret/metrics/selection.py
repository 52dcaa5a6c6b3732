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

    def task_rows(self) -> dict[str, np.ndarray]:
        """task -> its examples' rows, in order of appearance; `all` too when there are several tasks."""
        names = list(dict.fromkeys(self.tasks.tolist()))
        rows = {t: np.flatnonzero(self.tasks == t) for t in names}
        return rows | ({"all": np.arange(len(self.tasks))} if len(names) > 1 else {})

    def metrics(self) -> dict[str, dict[str, float]]:
        """{task: {text_acc, image_acc, acc, n}}, and `all` when there are several tasks."""
        return {task: {**{k: _mean(v[rows]) for k, v in self.outcomes().items()}, "n": len(rows)}
                for task, rows in self.task_rows().items()}


def _mean(ok: np.ndarray) -> float:
    """The share of True, computed as CLIP_benchmark does (a float32 mean), to its last digit."""
    return torch.tensor(ok, dtype=torch.float32).mean().item() if len(ok) else float("nan")


def caption_selection(items: list[Tensor], captions: list[Tensor], tasks: list[str]) -> SelectionResult:
    """Every example's outcome: `items[e]` (I, D) and `captions[e]` (C, D) embeddings, item i right
    for caption i. One example at a time, in CLIP_benchmark's order of operations, so that even
    near-ties fall the same way."""
    text_ok, image_ok = np.zeros(len(items), bool), np.zeros(len(items), bool)
    for e, (item_emb, text_emb) in enumerate(zip(items, captions)):
        scores = F.normalize(item_emb.float(), dim=-1) @ F.normalize(text_emb.float(), dim=-1).t()  # (I, C)
        gt = torch.arange(min(scores.shape))
        text_ok[e] = bool((scores.argmax(dim=1)[:len(gt)] == gt).all())
        image_ok[e] = bool((scores.argmax(dim=0)[:len(gt)] == gt).all())
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
    for task, rows in result.task_rows().items():
        draws = rows[rng.integers(0, len(rows), size=(n_boot, len(rows)))]  # (n_boot, n)
        lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
        out[task] = {k: (float(np.percentile(v[draws].mean(1), lo)), float(np.percentile(v[draws].mean(1), hi)))
                     for k, v in result.outcomes().items()}
    return out
