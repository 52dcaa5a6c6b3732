"""Sound↔picture search through a space, on Tux Paint's stamps: the pictures and the recordings that
share a relative path (`animals/mammals/dog.png` ↔ `animals/mammals/dog.ogg`) are the pairs.

A picture run (heads over DINOv2-small + MiniLM-L6) trains on the Tux Paint pictures, never on a
sound. For each seed, the sounds are split anew (seeded: train / val / test); a sound run (heads
over `spectrogram:DINOv2`) trains into the picture run's space (`--bind-to`) on the train sounds,
and the held-out test sounds are scored: sound → picture among every picture, and picture → sound
among the test sounds, with bootstrap intervals, chance and the caption-chain route beside.

    python benchmarks/space_pairs.py --pictures ~/.cache/mmret-offline/data/tuxpaint \
        --sounds ~/.cache/mmret-offline/data/tuxpaint-sounds --models ~/.cache/mmret-offline/models \
        --work /tmp/space-pairs --seeds 0 1 2 3 4

Prints one table per seed, then mean ± std over seeds, the CPU and the load.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from machine import cpu_model, loadavg  # benchmarks/machine.py

from mmret.data import PrepareConfig, load_dataset, prepare
from mmret.errors import MmretError
from mmret.evaluation.cross_modal import evaluate_cross_modal
from mmret.runs import RunConfig, with_overrides
from mmret.training import train


def run(options: dict) -> Path:
    return train(with_overrides(RunConfig(), options)).run_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pictures", type=Path, required=True)
    p.add_argument("--sounds", type=Path, required=True)
    p.add_argument("--models", type=Path, required=True)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--bootstrap", type=int, default=1000)
    args = p.parse_args()
    data, runs = args.work / "data", args.work / "runs"
    dino, minilm = str(args.models / "dinov2-small"), str(args.models / "all-minilm-l6-v2")
    common = dict(data_dir=data, runs_dir=runs, text=minilm, method="heads", batch_size=32, patience=10,
                  epochs=args.epochs)
    print(f"CPU: {cpu_model()}; load before: {loadavg()}", flush=True)
    try:
        load_dataset("pictures", data)
    except MmretError:
        prepare(PrepareConfig(source="folder", root=args.pictures, name="pictures", data_dir=data))
    start = time.perf_counter()
    if not (runs / "pictures" / "checkpoints" / "best.safetensors").is_file():
        run({**common, "dataset": "pictures", "item": dino, "name": "pictures"})
    print(f"picture run: {time.perf_counter() - start:.0f} s", flush=True)
    table = {}
    for seed in args.seeds:
        name = f"sounds-s{seed}"
        try:
            load_dataset(name, data)
        except MmretError:
            prepare(PrepareConfig(source="folder", root=args.sounds, name=name, data_dir=data, val=0.15, test=0.3,
                                  seed=seed))
        start = time.perf_counter()
        if not (runs / name / "checkpoints" / "best.safetensors").is_file():
            run({**common, "dataset": name, "item": f"spectrogram:{dino}", "name": name, "bind_to": "pictures",
                 "seed": seed})
        seconds = time.perf_counter() - start
        r = evaluate_cross_modal(runs / "pictures", name, "pictures", split="test", bootstrap=args.bootstrap,
                                 seed=seed)
        print(f"\nseed {seed}: {r.sizes['queries']} test sounds with a picture among {r.sizes['candidates']} "
              f"pictures; sound run {seconds:.0f} s")
        for row in r.rows:
            ci = row.ci or {}
            cells = "  ".join(f"{k} {row.metrics[k]:.3f}" + (f" [{ci[k][0]:.3f}, {ci[k][1]:.3f}]" if k in ci else "")
                              for k in ("r1", "r5", "r10", "mrr"))
            print(f"  {row.direction:16s} {row.route:14s} {cells}")
            table.setdefault((row.direction, row.route), []).append(row.metrics)
        for direction, chance in r.chance.items():
            print(f"  {direction:16s} {'chance':14s} " + "  ".join(f"{k} {chance[k]:.3f}" for k in ("r1", "r5", "r10",
                                                                                                   "mrr")))
            table.setdefault((direction, "chance"), []).append(chance)
    print(f"\nmean ± std over {len(args.seeds)} seeds (load after: {loadavg()})")
    print("| direction | route | R@1 | R@5 | R@10 | MRR |\n|---|---|---|---|---|---|")
    for (direction, route), rows in table.items():
        cells = " | ".join(f"{np.mean([m[k] for m in rows]):.3f} ± {np.std([m[k] for m in rows]):.3f}"
                           for k in ("r1", "r5", "r10", "mrr"))
        print(f"| {direction} | {route} | {cells} |")
    (args.work / "results.json").write_text(json.dumps({f"{d}|{r}": v for (d, r), v in table.items()}, indent=1))


if __name__ == "__main__":
    main()
