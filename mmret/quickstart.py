"""The quick start: the whole pipeline on the built-in `example` dataset, offline, in about a minute on a
quiet 2-core CPU (docs/results gives the measured times).

prepare example → train a small `scratch` model (MiniCLIP with a ResNet-10t at 64 px, the pictures' own size, and a
one-block Linformer) → evaluate it on the held-out test pictures → search all the pictures with a
caption. Each step is the same library call the corresponding `mmret` command makes; the run is
an ordinary run folder afterwards (`mmret eval`, `mmret search` work on it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmret.common.progress import NULL, Reporter
from mmret.data import PrepareConfig
from mmret.runs import RunConfig, with_overrides

QUERY = "a red circle above a blue square"
# the `mmret train` options of the quick start; the README shows the same command spelled out
TRAIN_OPTIONS = dict(method="scratch", image_model="resnet10t", image_size=64, text_width=64, text_depth=1,
                     linformer_k=8, embed_dim=64, vocab_size=300, max_length=24, batch_size=32, lr=3e-3, epochs=15,
                     patience=0)


@dataclass
class QuickstartResult:
    prepared: Any  # PrepareResult
    trained: Any  # RunResult
    evaluated: Any  # EvalResult on the test split
    searched: Any  # SearchResult for QUERY
    seconds: float


def quickstart(data_dir: Path | None = None, runs_dir: Path | None = None, epochs: int | None = None,
               reporter: Reporter = NULL) -> QuickstartResult:
    from mmret.api import load
    from mmret.data import prepare
    from mmret.evaluation.retrieval import evaluate_run
    from mmret.training import train

    start = time.perf_counter()
    options = {**TRAIN_OPTIONS, "dataset": "example", "data_dir": data_dir, "runs_dir": runs_dir}
    if epochs is not None:
        options["epochs"] = epochs
    steps = [f"draw {PrepareConfig.count} pictures of shapes with captions",
             f"train a small CLIP from scratch for {options['epochs']} epochs",
             "score it on the held-out test pictures", f"search every picture for {QUERY!r}"]

    def step(i: int) -> None:
        reporter.note(f"quick start {i} of {len(steps)}: {steps[i - 1]} ({time.perf_counter() - start:.0f}s so far)")

    step(1)
    prepared = prepare(PrepareConfig(source="example", force=True, data_dir=data_dir), reporter)
    step(2)
    trained = train(with_overrides(RunConfig(), options), reporter)
    step(3)
    evaluated = evaluate_run(trained.run_dir, split="test", reporter=reporter)
    step(4)
    searched = load(trained.run_dir).search(QUERY, split="all", k=5, reporter=reporter)
    return QuickstartResult(prepared, trained, evaluated, searched, time.perf_counter() - start)
