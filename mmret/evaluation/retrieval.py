"""`mmret eval`: retrieval metrics of trained runs on a dataset split, the way papers report them.

A run's final embeddings of the split (written once by `mmret.inference.embeddings`) are scored
with `mmret.metrics.retrieval`: text→item and item→text Recall@1/5/10, MRR, median rank, mAP (and
for sounds DCASE's mAP@10) and RSUM, named by the items' modality (t2i / i2t, t2a / a2t), with
optional bootstrap confidence intervals. Several runs on the same split are compared with a
paired bootstrap that marks significant differences from the first run. Each result is saved to
`runs/<run>/eval/<ds>-<split>.json`; when pictures of the split share a caption text, it also
holds `same_text`: the metrics with those captions counted as one answer (`same_text_metrics`).
`--format clip-benchmark` also scores Recall@k under CLIP_benchmark's tie rule (`torch.topk` picks
among equal scores by position; mmret counts a tie against the query) and reports those; when
exact ties made the two differ, the JSON keeps them as `clip_benchmark_ties`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmret.api import load
from mmret.common.io import write_json
from mmret.common.progress import NULL, Reporter
from mmret.data.negatives import caption_keys
from mmret.data.prepared import load_dataset
from mmret.errors import MmretError
from mmret.evaluation import clip_benchmark as cb
from mmret.metrics.retrieval import (
    DEFAULT_KS,
    PairedDiff,
    RetrievalResult,
    bootstrap_ci,
    directions,
    paired_bootstrap,
    retrieval_metrics,
    same_text_metrics,
)
from mmret.modalities import get_modality


def headline(ks=DEFAULT_KS, item: str = "i", map_at: tuple[int, ...] = ()) -> list[str]:
    """The metrics a table shows, in order, for recall cut-offs `ks` and items called `item` (t2i /
    i2t for pictures; t2a / a2t and DCASE's mAP@10 for sounds: `map_at`)."""
    t2x, x2t = directions(item)
    return ([f"{t2x}_r{k}" for k in ks] + [f"{x2t}_r{k}" for k in ks]
            + [f"{t2x}_mrr", f"{x2t}_mrr", f"{t2x}_medr", f"{x2t}_medr", f"{x2t}_map"]
            + [f"{d}_map{k}" for k in map_at for d in (t2x, x2t)] + ["rsum"])



@dataclass
class EvalResult:
    run: str
    dataset: str
    split: str
    metrics: dict[str, float]
    n_items: int
    n_captions: int
    ci: dict[str, tuple[float, float]] | None = None  # 95% bootstrap interval per metric
    diffs: dict[str, PairedDiff] | None = None  # against the first run of a comparison
    path: Path | None = None  # where the result was saved
    ranks: RetrievalResult | None = field(default=None, repr=False)
    modality: str = "image"  # what the items are: names the metrics and the table's rows
    same_text: dict[str, float] | None = None  # metrics when captions of the same text count as one answer
    topk: dict[str, float] | None = None  # Recall@k with CLIP_benchmark's tie rule (when asked for)
    train_overlap: int | None = None  # items of the split the run trained on (None: not a trained run)
    comparison: str | None = None  # the paired test against the first run of a comparison, in words

    @property
    def ks(self) -> tuple[int, ...]:
        return self.ranks.ks if self.ranks is not None else DEFAULT_KS

    @property
    def headline(self) -> list[str]:
        """The metrics a table shows for this result, in order."""
        modality = get_modality(self.modality)
        return headline(self.ks, modality.short, modality.map_at)

    def to_json(self) -> dict[str, Any]:
        out = {"run": self.run, "dataset": self.dataset, "split": self.split, "modality": self.modality,
               "metrics": self.metrics,
               "n_items": self.n_items, "n_captions": self.n_captions, "train_overlap": self.train_overlap,
               "chance": {f"r{k}": min(1.0, k / self.n_items) for k in self.ks}}
        if self.ci:
            out["ci95"] = {k: list(v) for k, v in self.ci.items()}
        if self.same_text:
            out["same_text"] = self.same_text
        if self.topk and any(abs(v - self.metrics[k]) > 1e-12 for k, v in self.topk.items()):
            out["clip_benchmark_ties"] = self.topk  # ties changed a recall: both rules' numbers are kept
        if self.diffs:
            out["vs_first"] = {k: {"delta": d.delta, "low": d.low, "high": d.high, "p": d.p_value,
                                   "significant": d.significant} for k, d in self.diffs.items()}
            out["vs_first_summary"] = self.comparison
        return out


def evaluate_run(run_dir: Path, dataset: str | None = None, split: str = "test", *, bootstrap: int = 0,
                 seed: int = 0, which: str = "best", device: str = "auto", reporter: Reporter = NULL,
                 data_dir: Path | None = None, ks: tuple[int, ...] = DEFAULT_KS,
                 clip_benchmark: bool = False) -> EvalResult:
    """Score one run on a split (Recall@k for each of `ks`; with `clip_benchmark`, also under
    CLIP_benchmark's tie rule, `topk`); saves `runs/<run>/eval/<ds>-<split>.json`."""
    model = load(run_dir, checkpoint=which, device=device)
    name = dataset or model.dataset
    if load_dataset(name, data_dir or model.config.data.data_dir).captions.empty:
        raise MmretError(f"dataset {name!r} has no captions, so there is nothing to score; a gallery without "
                         "captions is for mmret search and mmret serve")
    emb = model.embed_split(name, split, reporter=reporter, data_dir=data_dir)
    items = torch.from_numpy(np.asarray(emb.items, dtype=np.float32))
    captions = torch.from_numpy(np.asarray(emb.captions, dtype=np.float32))
    modality = get_modality(emb.modality)
    ranks = retrieval_metrics(items, captions, emb.caption_item, ks=ks, item=modality.short, map_at=modality.map_at)
    ci = bootstrap_ci(ranks, n_boot=bootstrap, seed=seed) if bootstrap else None
    keys = caption_keys(emb.caption_table["caption"].tolist())
    same = (same_text_metrics(items, captions, emb.caption_item, torch.from_numpy(keys), item=modality.short)
            if len(np.unique(keys)) < len(keys) else None)  # only when items share a caption text
    topk = cb.topk_recalls(items, captions, emb.caption_item, ks, item=modality.short) if clip_benchmark else None
    result = EvalResult(run=run_dir.name, dataset=emb.dataset, split=split, metrics=ranks.metrics, n_items=len(items),
                        n_captions=len(captions), ci=ci, ranks=ranks, modality=modality.name, same_text=same,
                        topk=topk, train_overlap=model.run.trained_on(list(emb.item_table["path"])))
    result.path = run_dir / "eval" / f"{emb.dataset}-{split}.json"
    write_json(result.path, {**result.to_json(), "checkpoint": emb.manifest["checkpoint"], "which": which,
                             "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    return result


def comparison_sentence(first: EvalResult, other: EvalResult, resamples: int) -> str:
    """The paired test's outcome in words: which metrics of `other` differ from `first`'s beyond
    chance (95% interval of the difference excluding zero), better or worse, or that none does."""
    lower_better = ("medr",)  # a rank: smaller is better
    items = get_modality(first.modality).plural
    test = f"paired bootstrap over the {first.n_items:,} {items}, {resamples:,} resamples, 95%"
    found = [(k, d) for k in other.headline if (d := (other.diffs or {}).get(k)) is not None and d.significant]
    if not found:
        fractions = [(k, d) for k, d in (other.diffs or {}).items() if k in other.headline
                     and not k.endswith(("medr", "rsum"))]  # comparable sizes: recalls, MRR, mAP
        largest = max(fractions, key=lambda kd: abs(kd[1].delta), default=None)
        within = (f"; the largest difference, {largest[0]} {largest[1].delta:+.3f} [{largest[1].low:+.3f}, "
                  f"{largest[1].high:+.3f}], is within noise") if largest else ""
        return f"{other.run} and {first.run} do not differ beyond chance in any metric ({test}){within}"

    def said(k: str, d: PairedDiff) -> str:
        better = (d.delta < 0) if k.endswith(lower_better) else (d.delta > 0)
        return f"{k} {d.delta:+.3f} [{d.low:+.3f}, {d.high:+.3f}] ({'better' if better else 'worse'})"

    rest = len([k for k in other.headline if k in (other.diffs or {})]) - len(found)
    return (f"{other.run} differs from {first.run} beyond chance in {len(found)} metric{'s' * (len(found) > 1)} "
            f"({test}): " + "; ".join(said(k, d) for k, d in found)
            + (f"; {rest} other{'s do' if rest > 1 else ' does'} not" if rest else ""))


def compare_runs(run_dirs: list[Path], dataset: str | None = None, split: str = "test", *, bootstrap: int = 1000,
                 seed: int = 0, which: str = "best", device: str = "auto", reporter: Reporter = NULL,
                 data_dir: Path | None = None, ks: tuple[int, ...] = DEFAULT_KS,
                 clip_benchmark: bool = False) -> list[EvalResult]:
    """Every run on the same split; each after the first carries a paired bootstrap against it."""
    from mmret.runs import load_run_config

    dataset = dataset or load_run_config(run_dirs[0]).data.dataset
    results = [evaluate_run(r, dataset, split, seed=seed, which=which, device=device, reporter=reporter,
                            data_dir=data_dir, ks=ks, clip_benchmark=clip_benchmark) for r in run_dirs]
    first = results[0]
    for result in results[1:]:
        result.diffs = paired_bootstrap(first.ranks, result.ranks, n_boot=max(bootstrap, 100), seed=seed)
        result.comparison = comparison_sentence(first, result, max(bootstrap, 100))
    if bootstrap:
        for result in results:
            result.ci = bootstrap_ci(result.ranks, n_boot=bootstrap, seed=seed)
    return results
