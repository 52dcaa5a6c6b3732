"""How far can frozen features be aligned? Closed-form linear baselines (ridge regression from
image to text features, and CCA) under the same k-fold split that `benchmarks/crossval.py` uses.
Their held-out recall is a reference point for what a trained head can reach on these features
and this many pairs.

Every caption counts: the maps are fit on all (picture, caption) pairs of the non-test pictures
(a picture with two captions gives two pairs; crossval also keeps 10% of those for validation,
which these fits do not need) and scored on every caption of the test fold, as crossval scores.

    python benchmarks/ceiling.py --dataset tuxpaint --vision ~/.cache/mmret-offline/models/dinov2-small \
        --text ~/.cache/mmret-offline/models/all-minilm-l6-v2 --json ceiling-tuxpaint.json

Sounds work the same way (the item tower of the dataset's modality; metrics say t2a / a2t).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from mmret.data import load_dataset
from mmret.encoders import load_text_encoder, load_tower
from mmret.features import ensure_features
from mmret.metrics.retrieval import directions, retrieval_metrics


def keys(item: str = "i") -> list[str]:
    """The recalls reported, named after the items (t2i / i2t, t2a / a2t)."""
    return [f"{d}_r{k}" for d in directions(item) for k in (1, 5, 10)]


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


def fold_scores(images: np.ndarray, texts: np.ndarray, caption_item: np.ndarray, folds: list[np.ndarray],
                fit, item: str = "i") -> list[dict]:
    """Per fold: fit on every caption of the other folds' pictures, score every test caption."""
    scores = []
    for k, test in enumerate(folds):
        is_test = np.zeros(len(images), bool)
        is_test[test] = True
        train_caps = np.flatnonzero(~is_test[caption_item])
        test_caps = np.flatnonzero(is_test[caption_item])
        row = {int(i): r for r, i in enumerate(test)}
        xi, xt = standardise(images[caption_item[train_caps]], images[test])
        yi, yt = standardise(texts[train_caps], texts[test_caps])
        a, b = fit(xi, yi)(xt, yt)
        target = torch.tensor([row[int(i)] for i in caption_item[test_caps]])
        m = retrieval_metrics(torch.from_numpy(a).float(), torch.from_numpy(b).float(), target, item=item).metrics
        scores.append({key: m[key] for key in keys(item)} | {"n_items": len(test), "n_captions": len(test_caps)})
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--vision", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--json", help="write the per-fold scores here (for crossval.py --report --ceiling)")
    args = parser.parse_args()
    ds = load_dataset(args.dataset)
    item_feats = ensure_features(ds, load_tower(args.vision, ds.modality.name), ds.modality.plural)
    text_feats = ensure_features(ds, load_text_encoder(args.text, max_length=64), "captions")
    ids = np.array(sorted(ds.items.item_id))  # the order DataConfig folds partition, seed 0
    index = {i: r for r, i in enumerate(ids)}
    rows, caption_rows = item_feats.row_of(), text_feats.row_of()
    images = np.asarray(item_feats.pooled, np.float32)[[rows[i] for i in ids]]
    caps = ds.captions[ds.captions.item_id.isin(index)]
    texts = np.asarray(text_feats.pooled, np.float32)[[caption_rows[int(c)] for c in caps.caption_id]]
    caption_item = caps.item_id.map(index).to_numpy(np.int64)
    perm = np.random.default_rng(0).permutation(len(ids))
    folds = [perm[k::args.folds] for k in range(args.folds)]
    item, names = ds.modality.short, keys(ds.modality.short)
    print(f"{args.dataset}: {len(ids)} {ds.modality.plural}, {len(caps)} captions, {args.folds} folds of "
          f"~{len(ids) // args.folds}; chance {names[0][:3]} R@1 {args.folds / len(ids):.3f}")
    print("baseline                  " + "  ".join(f"{k:15s}" for k in names))
    out = {}
    for name, fit in [(f"ridge lambda={lam}", lambda x, y, lam=lam: ridge(x, y, lam)) for lam in (10, 100, 1000)] + \
                     [(f"cca k={k} reg={r}", lambda x, y, k=k, r=r: cca(x, y, k, r))
                      for k, r in ((64, 1.0), (128, 1.0))]:
        out[name] = fold_scores(images, texts, caption_item, folds, fit, item)
        s = np.array([[f[k] for k in names] for f in out[name]])
        print(f"{name:24s}  " + "  ".join(f"{m:.3f} ± {d:.3f}" for m, d in zip(s.mean(0), s.std(0))))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"dataset": args.dataset, "baselines": out}, f, indent=2)


if __name__ == "__main__":
    main()
