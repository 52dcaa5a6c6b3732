"""The learning curve of a run, written with matplotlib's file backend (no display needed)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mmret.common.io import atomic_path


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
    for column, label in (("t2i_r1", "text→image R@1"), ("i2t_r1", "image→text R@1"), ("mean_recall", "mean recall")):
        if column in history:
            ax_recall.plot(history["step"], history[column], marker="o", label=label)
    ax_recall.set_xlabel("step")
    ax_recall.set_ylabel("validation recall")
    ax_recall.set_ylim(0, 1)
    ax_recall.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
