"""How far can frozen features be aligned? Closed-form linear baselines (ridge regression from
image to text features, and CCA) under the same 5-fold split that `benchmarks/crossval.py` uses,
on a dataset with one caption per image. Their held-out Recall@1 is a reference point for what a
trained head can reach on these features and this many pairs.

    python benchmarks/ceiling.py --dataset tuxpaint --vision ~/.cache/mmret-offline/models/dinov2-small \
        --text ~/.cache/mmret-offline/models/all-minilm-l6-v2

Sounds work the same way (the item tower of the dataset's modality; metrics say t2a / a2t).
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from mmret.data import load_dataset
from mmret.encoders import load_text_encoder, load_tower
from mmret.features import ensure_features
from mmret.inference.metrics import directions, retrieval_metrics


def standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mu, sd = train.mean(0), train.std(0) + 1e-6
    return [(a - mu) / sd for a in (train, *others)]


def ridge(x: np.ndarray, y: np.ndarray, lam: float):
    w = np.linalg.solve(x.T @ x + lam * np.eye(x.shape[1]), x.T @ y)
    return lambda a, b: (a @ w, b)


def cca(x: np.ndarray, y: np.ndarray, k: int, reg: float):
    n = len(x)

    def inv_sqrt(c: np.ndarray) -> np.ndarray:
        w, v = np.linalg.eigh(c)
        return v @ np.diag(w ** -0.5) @ v.T

    wx = inv_sqrt(x.T @ x / n + reg * np.eye(x.shape[1]))
    wy = inv_sqrt(y.T @ y / n + reg * np.eye(y.shape[1]))
    u, s, vt = np.linalg.svd(wx @ (x.T @ y / n) @ wy)
    a, b = wx @ u[:, :k] * s[:k], wy @ vt.T[:, :k] * s[:k]
    return lambda p, q: (p @ a, q @ b)


def fold_scores(images: np.ndarray, texts: np.ndarray, folds: list[np.ndarray], fit, item: str = "i") -> np.ndarray:
    scores = []
    for k, test in enumerate(folds):
        train = np.concatenate([f for j, f in enumerate(folds) if j != k])
        xi, xt = standardise(images[train], images[test])
        yi, yt = standardise(texts[train], texts[test])
        a, b = fit(xi, yi)(xt, yt)
        m = retrieval_metrics(torch.from_numpy(a).float(), torch.from_numpy(b).float(), torch.arange(len(test)),
                              item=item).metrics
        t2x, x2t = directions(item)
        scores.append([m[f"{t2x}_r1"], m[f"{t2x}_r5"], m[f"{x2t}_r1"]])
    return np.array(scores)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--vision", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args()
    ds = load_dataset(args.dataset)
    first = ds.captions.groupby("image_id").caption_id.first()
    image_feats = ensure_features(ds, load_tower(args.vision, ds.modality.name), ds.modality.plural)
    text_feats = ensure_features(ds, load_text_encoder(args.text, max_length=64), "captions")
    ids = np.array(sorted(ds.images.image_id))  # the order DataConfig folds partition, seed 0
    rows, caption_rows = image_feats.row_of(), text_feats.row_of()
    images = np.asarray(image_feats.pooled, np.float32)[[rows[i] for i in ids]]
    texts = np.asarray(text_feats.pooled, np.float32)[[caption_rows[int(first[i])] for i in ids]]
    perm = np.random.default_rng(0).permutation(len(ids))
    folds = [perm[k::args.folds] for k in range(args.folds)]
    t2x, x2t = directions(ds.modality.short)
    print(f"{args.dataset}: {len(ids)} {ds.modality.plural}, {args.folds} folds of ~{len(ids) // args.folds}; "
          f"chance {t2x} R@1 {args.folds / len(ids):.3f}")
    print(f"baseline                  {t2x} R@1         {t2x} R@5         {x2t} R@1")
    for name, fit in [(f"ridge lambda={lam}", lambda x, y, lam=lam: ridge(x, y, lam)) for lam in (10, 100, 1000)] + \
                     [(f"cca k={k} reg={r}", lambda x, y, k=k, r=r: cca(x, y, k, r)) for k, r in ((64, 1.0), (128, 1.0))]:
        s = fold_scores(images, texts, folds, fit, ds.modality.short)
        print(f"{name:24s}  " + "  ".join(f"{m:.3f} ± {d:.3f}" for m, d in zip(s.mean(0), s.std(0))))


if __name__ == "__main__":
    main()
