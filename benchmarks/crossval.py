"""k-fold cross-validated retrieval of training methods on a prepared dataset.

For each method and fold: train with `--folds K --fold k` (test = fold k, val = 10% of the rest),
embed the held-out test fold with the best checkpoint, and score it. Prints mean ± std over folds
of text→image and image→text Recall@1/5/10, with chance level beside them.

    python benchmarks/crossval.py --dataset tuxpaint \
        --vision ~/.cache/mmret-offline/models/dinov2-small --text ~/.cache/mmret-offline/models/all-minilm-l6-v2

Extra `key=value` arguments set training options for every run (e.g. epochs=40 mixup=0.4).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from mmret.runs import RunConfig, with_overrides
from mmret.inference.embeddings import write_run_embeddings
from mmret.inference.metrics import retrieval_metrics
from mmret.training import train

KS = (1, 5, 10)


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def run_fold(args, method: str, fold: int, extra: dict) -> dict:
    options = dict(method=method, dataset=args.dataset, vision=args.vision, text=args.text, folds=args.folds,
                   fold=fold, name=f"cv-{args.tag}-{method}-fold{fold}", **extra)
    cfg = with_overrides(RunConfig(), options)
    start = time.perf_counter()
    result = train(cfg)
    emb = write_run_embeddings(result.run_dir, split="test")
    images, captions = (torch.from_numpy(np.asarray(a, dtype=np.float32)) for a in (emb.images, emb.captions))
    scores = retrieval_metrics(images, captions, emb.caption_image).metrics
    scores.update(n_images=len(emb.images), n_captions=len(emb.captions), seconds=time.perf_counter() - start,
                  epochs=result.epochs)
    print(f"{method} fold {fold}: t2i R@1 {scores['t2i_r1']:.3f}  i2t R@1 {scores['i2t_r1']:.3f}  "
          f"({scores['n_images']} test images, {result.epochs} epochs, {scores['seconds']:.0f}s)", flush=True)
    return scores


def table(results: dict[str, list[dict]]) -> str:
    cols = [f"{d} R@{k}" for d in ("t2i", "i2t") for k in KS]
    lines = ["| method | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for method, folds in results.items():
        cells = []
        for d in ("t2i", "i2t"):
            for k in KS:
                v = np.array([f[f"{d}_r{k}"] for f in folds])
                cells.append(f"{v.mean():.3f} ± {v.std():.3f}")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    any_folds = next(iter(results.values()))
    n_img = np.mean([f["n_images"] for f in any_folds])
    # a random ranking finds the one right image, or one of an image's c captions among c per image, with p ~ k / images
    chance = [f"{min(1, k / n_img):.3f}" for k in KS] * 2
    lines.append("| chance | " + " | ".join(chance) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--vision", required=True)
    parser.add_argument("--text", required=True)
    parser.add_argument("--methods", default="heads,bridge")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--only", help="comma-separated folds to run (default: all), e.g. for a quick check")
    parser.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--json", help="also write the per-fold scores here")
    parser.add_argument("options", nargs="*", help="training options as key=value")
    args = parser.parse_args()
    extra = {k: parse_value(v) for k, v in (o.split("=", 1) for o in args.options)}
    folds = [int(k) for k in args.only.split(",")] if args.only else range(args.folds)
    results = {m: [run_fold(args, m, k, extra) for k in folds] for m in args.methods.split(",")}
    print()
    print(f"{args.folds}-fold cross-validation on {args.dataset}, options {extra or 'default'}:")
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
