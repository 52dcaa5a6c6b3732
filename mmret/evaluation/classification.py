"""Zero-shot classification with any run (`mmret eval --task classification`), as CLIP_benchmark
scores it: each class name goes through the prompt templates, the run embeds the prompts, their
normalised mean is the class's weight vector, and an item's class is the one whose weight it
matches best (`zeroshot_classification.py`: `zero_shot_classifier`, `accuracy`,
`balanced_accuracy_score`).

The metrics are `mmret.metrics.classification`'s (top-k accuracy and mean per-class recall, with
the pessimistic tie rule of the retrieval metrics).

Results go to `runs/<run>/eval/<ds>-<split>-classification.json` with a confusion matrix PNG
beside it. The dataset must carry class labels (`mmret prepare classes`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from mmret.api import load
from mmret.common.io import write_json
from mmret.common.progress import NULL, Reporter
from mmret.data.prepared import PreparedDataset, load_dataset
from mmret.errors import MmretError
from mmret.evaluation.templates import class_prompts, dataset_templates, load_templates
from mmret.inference.embeddings import Embeddings
from mmret.metrics.classification import bootstrap_accuracy, classification_metrics, confusion_matrix

PROMPT_BATCH = 256  # prompts embedded per call: ImageNet's 80 x 1000 never go through a tower at once


def zero_shot_weights(encode: Callable[[list[str]], torch.Tensor], prompts: list[list[str]],
                      batch: int = PROMPT_BATCH) -> torch.Tensor:
    """(C, D) class weights: the normalised mean of each class's normalised prompt embeddings."""
    flat = [p for group in prompts for p in group]
    emb = torch.cat([encode(flat[i:i + batch]).float() for i in range(0, len(flat), batch)])
    emb = F.normalize(emb, dim=-1)
    owner = torch.repeat_interleave(torch.arange(len(prompts)), torch.tensor([len(g) for g in prompts]))
    sums = torch.zeros(len(prompts), emb.shape[1]).index_add_(0, owner, emb)
    return F.normalize(sums, dim=-1)  # the mean's direction: the count divides out


# ---------------------------------------------------------------- a run on a labelled dataset


def labelled_dataset(name: str, data_dir: Any) -> PreparedDataset:
    ds = load_dataset(name, data_dir)
    if "label" not in ds.items.columns:
        raise MmretError(f"dataset {name!r} has no class labels; prepare a folder of class subfolders with "
                         "`mmret prepare classes --root DIR` and evaluate on that")
    return ds


def item_labels(emb: Embeddings, ds: PreparedDataset, labels: list[str]) -> torch.Tensor:
    """(N,) class index of each embedded item, in the embeddings' row order."""
    by_id = dict(zip(ds.items["item_id"], ds.items["label"]))
    index = {label: i for i, label in enumerate(labels)}
    return torch.tensor([index[by_id[i]] for i in emb.item_table["item_id"]], dtype=torch.int64)


@dataclass
class ClassificationResult:
    run: str
    dataset: str
    split: str
    metrics: dict[str, float]
    labels: list[str]  # class labels, in the order of the confusion matrix
    counts: list[int]  # items of each class in the split
    templates: int  # prompts per class (the largest, for per-class prompts)
    confusion: np.ndarray = field(repr=False)
    train_overlap: int | None = None  # items of the split the run trained on
    ci: dict[str, tuple[float, float]] | None = None
    path: Path | None = None
    confusion_png: Path | None = None
    embeddings: Embeddings | None = field(default=None, repr=False)
    templates_from: str | None = None  # None: CLIP's ImageNet set; "dataset": the set's own; else the file
    own_templates: list[str] | dict[str, list[str]] | None = field(default=None, repr=False)  # unless the default

    @property
    def n_items(self) -> int:
        return int(sum(self.counts))

    @property
    def chance(self) -> dict[str, float]:
        """A guess's scores: uniform top-k (1/C, 5/C) and always naming the largest class."""
        c = len(self.labels)
        return {"acc1": 1 / c, "acc5": min(1.0, 5 / c), "majority": max(self.counts) / max(1, self.n_items),
                "mean_per_class_recall": 1 / c}

    def to_json(self) -> dict[str, Any]:
        out = {"run": self.run, "dataset": self.dataset, "split": self.split, "task": "classification",
               "metrics": self.metrics, "chance": self.chance, "n_items": self.n_items, "classes": self.labels,
               "counts": self.counts, "templates_per_class": self.templates, "templates_from": self.templates_from,
               "train_overlap": self.train_overlap,
               "confusion": self.confusion.tolist()}
        if self.ci:
            out["ci95"] = {k: list(v) for k, v in self.ci.items()}
        return out


def evaluate_classification(run_dir: Path, dataset: str | None = None, split: str = "test", *,
                            templates: Path | None = None, bootstrap: int = 0, seed: int = 0, which: str = "best",
                            device: str = "auto", reporter: Reporter = NULL, plot: bool = True,
                            data_dir: Path | None = None) -> ClassificationResult:
    """Zero-shot classification of one split (of a dataset in `data_dir`, default the run's data
    root); saves the JSON (and the confusion matrix PNG)."""
    model = load(run_dir, checkpoint=which, device=device)
    run = model.run
    ds = labelled_dataset(dataset or model.dataset, data_dir or run.cfg.data.data_dir)
    shipped = ds.info.get("templates") if templates is None else None  # a CLIP_benchmark set's own
    prompts_from = dataset_templates(shipped, ds.name) if shipped else load_templates(templates)
    emb = model.embed_split(ds.name, split, reporter=reporter, data_dir=data_dir)
    labels, names = ds.classes()  # every class of the dataset, so all splits share one order
    target = item_labels(emb, ds, labels)
    prompts = class_prompts(labels, names, prompts_from)
    n_prompts = sum(map(len, prompts))
    with reporter.task(f"embedding {n_prompts:,} prompts", total=n_prompts, unit="prompts") as task:
        def encode(texts: list[str]) -> torch.Tensor:
            out = model.encode_text(texts, output="torch")
            task.advance(len(texts))
            return out

        weights = zero_shot_weights(encode, prompts)
    logits = torch.from_numpy(np.asarray(emb.items, dtype=np.float32)) @ weights.T  # (N, C)
    scores = classification_metrics(logits, target)
    result = ClassificationResult(
        run=run_dir.name, dataset=ds.name, split=split, metrics=scores.metrics, labels=labels,
        counts=torch.bincount(target, minlength=len(labels)).tolist(), templates=max(map(len, prompts)),
        confusion=confusion_matrix(target, scores.pred, len(labels)).numpy(),
        train_overlap=run.trained_on(list(emb.item_table["path"])),
        ci=bootstrap_accuracy(scores, target, len(labels), n_boot=bootstrap, seed=seed) if bootstrap else None,
        embeddings=emb, templates_from="dataset" if shipped else str(templates) if templates else None,
        own_templates=prompts_from if shipped or templates else None)
    result.path = run_dir / "eval" / f"{ds.name}-{split}-classification.json"
    if plot:
        from mmret.figures.draw import confusion_figure

        result.confusion_png = result.path.with_suffix(".png")
        confusion_figure(result.confusion, labels, f"{run_dir.name}: {ds.name} {split}, zero-shot top-1 "
                         f"{scores.metrics['acc1']:.3f} (chance {1 / len(labels):.3f})", result.confusion_png)
    write_json(result.path, {**result.to_json(), "checkpoint": emb.manifest["checkpoint"], "which": which,
                             "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return result
