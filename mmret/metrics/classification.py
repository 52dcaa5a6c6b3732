"""Classification metrics, pure tensor functions: top-k accuracy, mean per-class recall (scikit-
learn's balanced accuracy: the recall of every class present, averaged), the confusion matrix and
seeded bootstrap intervals, as CLIP_benchmark's `zeroshot_classification.py` reports them.

Tie rule (pessimistic, as in `mmret.metrics.retrieval`): a wrong class that scores exactly as high
as the right one is ranked above it, so without ties top-k accuracy equals CLIP_benchmark's `topk`
count and with ties it never flatters a model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from mmret.errors import MmretError

TOP_KS = (1, 5)


@dataclass(frozen=True)
class ClassScores:
    metrics: dict[str, float]  # acc1, acc5 (nan below 5 classes), mean_per_class_recall
    ranks: torch.Tensor  # (N,) int64: rank of each item's right class among all classes
    pred: torch.Tensor  # (N,) int64: the best-scoring class (the first of equal ones)



def classification_metrics(logits: torch.Tensor, target: torch.Tensor, ks: Sequence[int] = TOP_KS) -> ClassScores:
    """Top-k accuracies and mean per-class recall of (N, C) scores against (N,) class indices."""
    if logits.ndim != 2 or 0 in logits.shape:
        raise MmretError(f"scores must be a non-empty (items, classes) matrix, got shape {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise MmretError("the class scores hold NaN or inf values; check the run's embeddings")
    n, c = logits.shape
    target = torch.as_tensor(target)
    if target.shape != (n,) or target.is_floating_point() or int(target.min()) < 0 or int(target.max()) >= c:
        raise MmretError(f"targets must be {n} class indices below {c}, got {target.dtype} of shape "
                         f"{tuple(target.shape)}")
    target = target.long()
    right = logits.gather(1, target[:, None])  # (N, 1)
    ranks = (logits >= right).sum(1)  # pessimistic: ties with the right class count against it
    pred = logits.argmax(1)
    metrics = {f"acc{k}": (ranks <= k).double().mean().item() if k <= c else math.nan for k in ks}
    metrics["mean_per_class_recall"] = mean_per_class_recall(pred, target, c)
    return ClassScores(metrics, ranks, pred)


def mean_per_class_recall(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> float:
    """Recall of each class present in `target`, averaged (scikit-learn's balanced accuracy)."""
    total = torch.bincount(target, minlength=num_classes)
    hits = torch.bincount(target[pred == target], minlength=num_classes)
    present = total > 0
    return (hits[present].double() / total[present]).mean().item()


def confusion_matrix(target: torch.Tensor, pred: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(C, C) counts: row = the right class, column = the predicted one."""
    return torch.bincount(target * num_classes + pred, minlength=num_classes ** 2).view(num_classes, num_classes)


def bootstrap_accuracy(scores: ClassScores, target: torch.Tensor, num_classes: int, *, n_boot: int, seed: int,
                       level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile intervals of every metric from `n_boot` resamples of the items (seeded)."""
    if n_boot < 2:
        raise MmretError(f"the bootstrap needs at least 2 resamples (1000 is usual), got {n_boot}")
    gen = torch.Generator().manual_seed(seed)
    n = len(target)
    weights = torch.zeros(n_boot, n).scatter_add_(1, torch.randint(n, (n_boot, n), generator=gen),
                                                  torch.ones(n_boot, n))  # (B, N) draws of each item
    onehot = F.one_hot(target, num_classes).float()  # (N, C)
    per_class = weights @ (onehot * (scores.pred == target).float()[:, None])  # (B, C) hits
    counts = weights @ onehot
    reps = {k: weights @ (scores.ranks <= int(k[3:])).float() / n for k in scores.metrics if k.startswith("acc")}
    reps["mean_per_class_recall"] = torch.nanmean(per_class / counts, dim=1)  # 0/0 = nan: class not drawn
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    return {k: tuple(torch.quantile(v.double(), q).tolist()) for k, v in reps.items()
            if not math.isnan(scores.metrics[k])}
