"""Does a frozen ViT's token cache still say where each patch is, and does pooling the grid keep it?
And how far apart are a picture and its mirror arrangement, or a caption and its swap, before any
training? The evidence behind the bridge's design on the relations set.

    python benchmarks/positions.py --train relations-train --test relations-test \\
        --vision ~/.cache/mmret-offline/models/dinov2-small --text ~/.cache/mmret-offline/models/all-minilm-l6-v2

1. A linear probe (ridge, one-hot targets) from each patch token's cached state to its row and its
   column in the patch grid, fit on `--pictures` training pictures and scored on as many test
   pictures: exact accuracy and within one patch, with chance (1 / side); then the same on the grid
   average-pooled 2x2 as `--token-pool 2` pools it. The bridge's cross-attention is blind to the
   order of its keys, so place reaches the queries only through what the token states hold.
2. On the test set: the class-token cosine between a picture and the picture of the same two objects
   in the other arrangement (found through its caption's `swap` rewrite), against two random pictures;
   and the text tower's cosine between a caption and its `swap` and `relation` rewrites, against two
   random captions.
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F

from mmret.data import load_dataset
from mmret.data.composition import replace_relation, swap_objects
from mmret.encoders import load_text_encoder, load_tower
from mmret.features import ensure_features


def pooled_grid(tokens: np.ndarray, factor: int) -> tuple[np.ndarray, int]:
    """(N, g'*g', D) patch states (class token dropped), average-pooled by `factor`, and the side g'."""
    n, t, d = tokens.shape
    side = math.isqrt(t - 1)
    grid = torch.from_numpy(tokens[:, 1:].astype(np.float32)).transpose(1, 2).reshape(n, d, side, side)
    pooled = F.avg_pool2d(grid, factor, ceil_mode=True) if factor > 1 else grid
    return pooled.flatten(2).transpose(1, 2).numpy(), pooled.shape[-1]


def probe(train: np.ndarray, test: np.ndarray, side: int, lam: float = 10.0) -> dict[str, float]:
    """Ridge from a patch state to its row and its column: exact and within-one accuracy on `test`."""
    x, y = train.reshape(-1, train.shape[-1]), test.reshape(-1, test.shape[-1])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, y = np.c_[(x - mu) / sd, np.ones(len(x))], np.c_[(y - mu) / sd, np.ones(len(y))]
    gram = x.T @ x + lam * np.eye(x.shape[1])
    place = np.arange(side * side)
    out = {}
    for name, target in (("row", place // side), ("column", place % side)):
        w = np.linalg.solve(gram, x.T @ np.eye(side)[np.tile(target, len(train))])
        guess, truth = (y @ w).argmax(1), np.tile(target, len(test))
        out[f"{name} exact"] = float(np.mean(guess == truth))
        out[f"{name} within 1"] = float(np.mean(np.abs(guess - truth) <= 1))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--vision", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--pictures", type=int, default=300)
    args = parser.parse_args()
    tower = load_tower(args.vision, "image", meta=True)
    sets = {}
    for role, name in (("train", args.train), ("test", args.test)):
        ds = load_dataset(name)
        sets[role] = (ds, ensure_features(ds, tower, tokens=True))
    picked = {role: np.asarray(feats.tokens[:args.pictures]) for role, (_, feats) in sets.items()}
    print(f"patch-position probe, {args.pictures} train and {args.pictures} test pictures:")
    for factor in (1, 2):
        (train, side), (test, _) = (pooled_grid(picked[r], factor) for r in ("train", "test"))
        scores = probe(train, test, side)
        print(f"  token pool {factor} ({side}x{side} grid, chance {1 / side:.3f}): "
              + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
    ds, feats = sets["test"]
    cls = F.normalize(torch.from_numpy(np.asarray(feats.pooled, np.float32)), dim=1)
    row = {str(i): r for r, i in enumerate(feats.ids)}
    by_caption = dict(zip(ds.captions["caption"], ds.captions["item_id"]))
    pairs = [(row[str(i)], row[str(by_caption[swap_objects(c)])]) for c, i in zip(ds.captions["caption"],
                                                                                  ds.captions["item_id"])
             if swap_objects(c) in by_caption]
    rng = np.random.default_rng(0)
    shuffled = rng.permutation(len(cls))
    mirror = float(np.mean([float(cls[a] @ cls[b]) for a, b in pairs]))
    print(f"class token: cosine to the mirror arrangement {mirror:.3f} ({len(pairs)} pictures), "
          f"to a random picture {float((cls * cls[shuffled]).sum(1).mean()):.3f}")
    text = load_text_encoder(args.text).eval()
    captions = [c for c in ds.captions["caption"] if swap_objects(c)]

    def embed(texts: list[str]) -> torch.Tensor:
        with torch.inference_mode():
            return torch.cat([F.normalize(text(**text.tokenize(texts[a:a + 256])).pooled.float(), dim=1)
                              for a in range(0, len(texts), 256)])

    right = embed(captions)
    for rule, rewrite in (("swap", swap_objects), ("relation", replace_relation)):
        print(f"text tower: cosine of a caption to its {rule} rewrite "
              f"{float((right * embed([rewrite(c) for c in captions])).sum(1).mean()):.4f}")
    print(f"text tower: cosine of two random captions "
          f"{float((right * right[rng.permutation(len(right))]).sum(1).mean()):.4f}")


if __name__ == "__main__":
    main()
