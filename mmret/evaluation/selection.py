"""`mmret eval --task caption-selection`: SugarCrepe and Winoground as CLIP_benchmark scores them.

A dataset prepared with `mmret prepare sugar-crepe` or `prepare winoground` holds caption-selection
examples (`candidates.parquet`): items, and candidate captions of which caption i is right for
item i. The run embeds the split's items (its final embeddings, as retrieval reads them) and every
candidate caption through its text side (`Model.encode_text`, the same call as a search query);
`mmret.metrics.selection` scores them. Results per task (a SugarCrepe category, or winoground):
`text_acc`, `image_acc`, `acc` under CLIP_benchmark's names, with bootstrap intervals over the
examples and chance beside them; saved to `runs/<run>/eval/<ds>-<split>-selection.json`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmret.api import load
from mmret.common.io import write_json
from mmret.common.progress import NULL, Reporter
from mmret.data.prepared import load_dataset
from mmret.errors import MmretError
from mmret.metrics.selection import SelectionResult, bootstrap_selection, caption_selection, chance

TEXT_BATCH = 256  # candidate captions embedded per call


@dataclass
class SelectionEvalResult:
    run: str
    dataset: str
    split: str
    metrics: dict[str, dict[str, float]]  # task -> text_acc, image_acc, acc, n
    chance: dict[str, dict[str, float]]  # task -> the same under random scores
    dropped: int = 0  # examples left out: an item of theirs is not in the split
    n_items: int = 0  # the split's items
    train_overlap: int | None = None  # of them, items the run trained on (None: unknown)
    ci: dict[str, dict[str, tuple[float, float]]] | None = None  # task -> metric -> 95% interval
    path: Path | None = None
    benchmark: str | None = None  # CLIP_benchmark's name of the set (sugar_crepe, winoground), if it is one
    outcome: SelectionResult | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        out = {"run": self.run, "dataset": self.dataset, "split": self.split, "task": "caption-selection",
               "metrics": self.metrics, "chance": self.chance, "dropped": self.dropped,
               "n_items": self.n_items, "train_overlap": self.train_overlap}
        if self.ci:
            out["ci95"] = {t: {k: list(v) for k, v in m.items()} for t, m in self.ci.items()}
        return out


def selection_examples(candidates: Any, rows: dict[str, int]) -> tuple[list[tuple[str, list[int], list[str]]], int]:
    """(task, item rows, captions) of each example whose items all have a row in `rows` (item_id ->
    row of the split's embeddings), in example order; and how many were left out."""
    examples, dropped = [], 0
    for _, group in candidates.sort_values(["example", "position"]).groupby("example", sort=True):
        items = [i for i in group["item_id"].tolist() if isinstance(i, str) and i]
        if not all(i in rows for i in items):
            dropped += 1
            continue
        examples.append((str(group["task"].iloc[0]), [rows[i] for i in items], group["caption"].tolist()))
    return examples, dropped


def evaluate_selection(run_dir: Path, dataset: str | None = None, split: str = "test", *, bootstrap: int = 0,
                       seed: int = 0, which: str = "best", device: str = "auto", reporter: Reporter = NULL,
                       data_dir: Path | None = None) -> SelectionEvalResult:
    """Score one run on the caption-selection examples of a split; saves the result beside its other evals."""
    model = load(run_dir, checkpoint=which, device=device)
    ds = load_dataset(dataset or model.dataset, data_dir or model.config.data.data_dir)
    if ds.candidates is None or ds.candidates.empty:
        raise MmretError(f"dataset {ds.name!r} has no caption-selection examples; prepare one with `mmret prepare "
                         "sugar-crepe` or `mmret prepare winoground`")
    emb = model.embed_split(ds.name, split, reporter=reporter, data_dir=data_dir)
    rows = {str(i): r for r, i in enumerate(emb.item_table["item_id"])}
    examples, dropped = selection_examples(ds.candidates, rows)
    if not examples:
        raise MmretError(f"none of {ds.name!r}'s caption-selection examples has its items in the {split} split")
    texts = sorted({c for _, _, captions in examples for c in captions})
    with reporter.task("embedding candidate captions", total=len(texts), unit="cap") as task:
        parts = []
        for a in range(0, len(texts), TEXT_BATCH):
            parts.append(model.encode_text(texts[a:a + TEXT_BATCH], output="torch"))
            task.advance(len(parts[-1]))
    text_emb, where = torch.cat(parts), {t: i for i, t in enumerate(texts)}
    item_emb = torch.from_numpy(np.asarray(emb.items, dtype=np.float32))
    outcome = caption_selection([item_emb[r] for _, r, _ in examples],
                                [text_emb[[where[c] for c in captions]] for _, _, captions in examples],
                                [task for task, _, _ in examples])
    metrics = outcome.metrics()
    result = SelectionEvalResult(run=model.name, dataset=ds.name, split=split, metrics=metrics,
                                 chance=_chance(examples, list(metrics)), dropped=dropped, outcome=outcome,
                                 n_items=len(rows), train_overlap=model.run.trained_on(list(emb.item_table["path"])),
                                 benchmark=ds.info.get("selection_benchmark"),
                                 ci=bootstrap_selection(outcome, bootstrap, seed) if bootstrap else None)
    result.path = run_dir / "eval" / f"{ds.name}-{split}-selection.json"
    write_json(result.path, {**result.to_json(), "checkpoint": emb.manifest["checkpoint"], "which": which,
                             "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return result


def _chance(examples: list[tuple[str, list[int], list[str]]], tasks: list[str]) -> dict[str, dict[str, float]]:
    """Each task's mean chance over its examples (their shapes may differ)."""
    out = {}
    for task in tasks:
        shapes = Counter((len(i), len(c)) for t, i, c in examples if task in ("all", t))
        per = {shape: chance(*shape) for shape in shapes}
        total = sum(shapes.values())
        out[task] = {k: sum(per[s][k] * n for s, n in shapes.items()) / total for k in ("text_acc", "image_acc", "acc")}
    return out
