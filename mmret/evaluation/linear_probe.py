"""Linear probe (`mmret eval --task linear-probe`): how linearly separable the classes are in a
run's frozen, normalised item embeddings.

A multinomial logistic regression (scikit-learn, L-BFGS, L2) is fitted on the train split; its
regularisation is chosen on the val split by the search CLIP_benchmark's `linear_probe.py` runs
(97 log-spaced values, 7 evenly spread first, then around the best with steps of 8, 4, 2 and 1;
the first of equally good values wins), and the chosen model, refitted on train + val, is scored
on the test split with `mmret.evaluation.classification`'s metrics. CLIP_benchmark trains a torch linear
layer with AdamW over a weight-decay grid on a GPU; this follows the CLIP paper's own probe
(scikit-learn L-BFGS logistic regression, the inverse strength C swept over 1e-6 .. 1e6), which
needs no GPU and no learning-rate schedule. Results go to
`runs/<run>/eval/<ds>-<split>-linear-probe.json`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmret.api import load
from mmret.common.io import write_json
from mmret.common.progress import NULL, Reporter
from mmret.errors import MmretError
from mmret.evaluation.classification import item_labels, labelled_dataset
from mmret.inference.embeddings import Embeddings
from mmret.metrics.classification import classification_metrics

C_GRID = np.logspace(-6, 6, 97)  # inverse regularisation strengths, as in CLIP's sweep
_FIRST = [int(i) for i in np.linspace(0, len(C_GRID) - 1, 7)]  # 0, 16, ..., 96: the first pass


@dataclass
class ProbeResult:
    run: str
    dataset: str
    split: str
    metrics: dict[str, float]  # lp_acc1, lp_acc5, lp_mean_per_class_recall (CLIP_benchmark's names)
    C: float  # the chosen inverse regularisation strength
    val_acc1: float  # its accuracy on val
    sizes: dict[str, int]  # items in train, val and the scored split
    labels: list[str]
    seed: int = 0
    tried: dict[float, float] = field(default_factory=dict, repr=False)  # C -> val top-1
    path: Path | None = None
    train_overlap: int | None = None  # scored (test) items the run trained on (None: not a trained run)

    @property
    def n_items(self) -> int:
        return self.sizes["test"]

    def to_json(self) -> dict[str, Any]:
        c = len(self.labels)
        return {"run": self.run, "dataset": self.dataset, "split": self.split, "task": "linear-probe",
                "metrics": self.metrics, "C": self.C, "val_acc1": self.val_acc1, "sizes": self.sizes,
                "classes": self.labels, "seed": self.seed, "tried": {f"{k:.3g}": v for k, v in self.tried.items()},
                "train_overlap": self.train_overlap,
                "chance": {"acc1": 1 / c, "acc5": min(1.0, 5 / c), "mean_per_class_recall": 1 / c}}


def _fit(x: np.ndarray, y: np.ndarray, C: float, seed: int) -> Any:
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, max_iter=1000, random_state=seed)
    with warnings.catch_warnings():  # the weakest C values may stop at max_iter: still a valid probe
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(x, y)


def _logits(model: Any, x: np.ndarray, num_classes: int) -> torch.Tensor:
    """(N, C) scores over every class; a class the probe never saw scores below every other."""
    scores = np.asarray(model.decision_function(x), dtype=np.float64)
    if scores.ndim == 1:  # two classes seen: one column, the second class's margin
        scores = np.stack([-scores, scores], 1)
    out = torch.full((len(x), num_classes), float(scores.min()) - 1.0, dtype=torch.float64)
    out[:, torch.as_tensor(model.classes_)] = torch.from_numpy(scores)
    return out


def _top1(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    return float((model.predict(x) == y).mean())


def choose_c(train: tuple[np.ndarray, np.ndarray], val: tuple[np.ndarray, np.ndarray], seed: int = 0):
    """(index into C_GRID, {C: val top-1}): CLIP_benchmark's peak search over the grid."""
    tried: dict[int, float] = {}

    def peak(indices: list[int]) -> int:
        best, best_acc = indices[0], -1.0
        for i in indices:
            if i not in tried:
                tried[i] = _top1(_fit(*train, C_GRID[i], seed), *val)
            if tried[i] > best_acc:
                best, best_acc = i, tried[i]
        return best

    best, step = peak(_FIRST), 8
    while step:
        best = peak([max(best - step, 0), best, min(best + step, len(C_GRID) - 1)])
        step //= 2
    return best, {float(C_GRID[i]): tried[i] for i in sorted(tried)}


def _need_items(sizes: dict[str, int]) -> None:
    for split, n in sizes.items():
        if n == 0:
            raise MmretError(f"the linear probe needs labelled items in train, val and test; {split} has none "
                             "(prepare the dataset with --val and --test above 0)")


def probe_arrays(x: dict[str, np.ndarray], y: dict[str, np.ndarray], num_classes: int, seed: int = 0):
    """Fit on x["train"], choose C on x["val"], refit on both, score x["test"]: (metrics, C, val top-1, tried)."""
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise MmretError("--task linear-probe needs scikit-learn: pip install scikit-learn "
                         "(or: pip install 'mmret[eval]')") from None
    _need_items({s: len(x[s]) for s in ("train", "val", "test")})
    if len(np.unique(y["train"])) < 2:
        raise MmretError("the linear probe needs at least two classes in the train split")
    best, tried = choose_c((x["train"], y["train"]), (x["val"], y["val"]), seed)
    model = _fit(np.concatenate([x["train"], x["val"]]), np.concatenate([y["train"], y["val"]]), C_GRID[best], seed)
    scores = classification_metrics(_logits(model, x["test"], num_classes), torch.from_numpy(y["test"]))
    metrics = {f"lp_{k}": v for k, v in scores.metrics.items()}
    return metrics, float(C_GRID[best]), tried[float(C_GRID[best])], tried


def evaluate_linear_probe(run_dir: Path, dataset: str | None = None, split: str = "test", *, seed: int = 0,
                          which: str = "best", device: str = "auto", reporter: Reporter = NULL,
                          data_dir: Path | None = None) -> ProbeResult:
    """Probe a run's item embeddings of a labelled dataset: fitted on train, chosen on val, scored on test."""
    if split != "test":
        raise MmretError(f"the linear probe fits on train, chooses its regularisation on val and is scored on "
                         f"test; drop --split {split}")
    model = load(run_dir, checkpoint=which, device=device)
    ds = labelled_dataset(dataset or model.dataset, data_dir or model.config.data.data_dir)
    labels = sorted(set(ds.items["label"]))
    _need_items({s: len(ds.split(s).items) for s in ("train", "val", "test")})
    parts: dict[str, Embeddings] = {s: model.embed_split(ds.name, s, reporter=reporter, data_dir=data_dir)
                                    for s in ("train", "val", "test")}
    x = {s: np.asarray(e.items, dtype=np.float32) for s, e in parts.items()}
    y = {s: item_labels(e, ds, labels).numpy() for s, e in parts.items()}
    metrics, C, val_acc, tried = probe_arrays(x, y, len(labels), seed)
    result = ProbeResult(run=run_dir.name, dataset=ds.name, split=split, metrics=metrics, C=C, val_acc1=val_acc,
                         sizes={s: len(x[s]) for s in ("train", "val", "test")}, labels=labels, seed=seed, tried=tried,
                         train_overlap=model.run.trained_on(list(parts["test"].item_table["path"])))
    result.path = run_dir / "eval" / f"{ds.name}-{split}-linear-probe.json"
    write_json(result.path, {**result.to_json(), "checkpoint": parts["train"].manifest["checkpoint"],
                             "which": which, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return result
