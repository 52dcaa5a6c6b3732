"""The learning curve of a run, written with matplotlib's file backend (no display needed)."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from mmret.common.io import atomic_path

LABELS = {"t2i_r1": "text→image R@1", "i2t_r1": "image→text R@1", "t2a_r1": "text→audio R@1",
          "a2t_r1": "audio→text R@1", "mean_recall": "mean recall"}


def recall_columns(columns) -> list[str]:
    """The R@1 columns of both directions (t2i_r1 / i2t_r1, t2a_r1 / a2t_r1, ...) and the mean recall."""
    found = [c for c in columns if re.fullmatch(r"t2[a-z]+_r1|[a-z]+2t_r1", str(c))]
    return sorted(found, key=lambda c: not c.startswith("t2")) + [c for c in columns if c == "mean_recall"]


def learning_curve(history: pd.DataFrame, path: Path) -> None:
    """Train and val loss (left) and val recall (right) against the optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_recall) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(history["step"], history["train_loss"], marker="o", label="train loss")
    ax_loss.plot(history["step"], history["val_loss"], marker="o", label="val loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("contrastive loss")
    ax_loss.legend()
    for column in recall_columns(history.columns):
        ax_recall.plot(history["step"], history[column], marker="o", label=LABELS.get(column, column))
    ax_recall.set_xlabel("step")
    ax_recall.set_ylabel("validation recall")
    ax_recall.set_ylim(0, 1)
    ax_recall.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
