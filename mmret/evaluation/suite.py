"""`mmret eval` as one call: a task (retrieval, zero-shot classification or a linear probe) for
one run or several side by side, the pictures asked for (an embedding map, a failure gallery),
and the results in CLIP_benchmark's schema when asked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmret.api import load
from mmret.common.progress import NULL, Reporter
from mmret.data.prepared import load_dataset
from mmret.errors import MmretError
from mmret.evaluation import clip_benchmark as cb
from mmret.evaluation.config import EvalConfig
from mmret.inference.loaded import LoadedRun


@dataclass
class EvalReport:
    task: str
    results: list[Any]  # EvalResult, ClassificationResult or ProbeResult, one per run
    map: Any = None  # MapResult
    failures: Any = None  # FailuresResult
    clip_benchmark: list[tuple[Path, dict]] = field(default_factory=list)  # (file, record) per run


def _evaluate(run_dirs: list[Path], cfg: EvalConfig, reporter: Reporter) -> list[Any]:
    if cfg.task == "classification":
        from mmret.evaluation.classification import evaluate_classification

        return [evaluate_classification(r, cfg.dataset, cfg.split, templates=cfg.templates, bootstrap=cfg.bootstrap,
                                        seed=cfg.seed, which=cfg.which, device=cfg.device, reporter=reporter,
                                        data_dir=cfg.data_dir) for r in run_dirs]
    if cfg.task == "linear-probe":
        from mmret.evaluation.linear_probe import evaluate_linear_probe

        return [evaluate_linear_probe(r, cfg.dataset, cfg.split, seed=cfg.seed, which=cfg.which, device=cfg.device,
                                      reporter=reporter, data_dir=cfg.data_dir) for r in run_dirs]
    from mmret.evaluation.retrieval import compare_runs, evaluate_run

    options = dict(bootstrap=cfg.bootstrap, seed=cfg.seed, which=cfg.which, device=cfg.device, reporter=reporter,
                   data_dir=cfg.data_dir, ks=cfg.recall_k, clip_benchmark=cfg.clip_benchmark)
    if len(run_dirs) == 1:
        return [evaluate_run(run_dirs[0], cfg.dataset, cfg.split, **options)]
    return compare_runs(run_dirs, cfg.dataset, cfg.split, **options)


def _benchmark_record(run: LoadedRun, result: Any, cfg: EvalConfig) -> dict:
    ds = load_dataset(result.dataset, cfg.data_dir or run.cfg.data.data_dir)
    model, pretrained = cb.model_names(run.cfg, run.name, run.method.trainable, cfg.which)
    name = cb.dataset_name(ds.name, ds.info.get("source"), result.split, wds="clip_benchmark" in ds.info)
    if cfg.task == "retrieval":
        return cb.record("retrieval", name, model=model, pretrained=pretrained,
                         metrics=cb.retrieval_metrics(result.topk or result.metrics, cfg.recall_k))
    if cfg.task == "classification":  # as with --dump_classnames, and --dump_templates for templates not the default
        own = {"templates": result.own_templates} if result.own_templates else {}
        return cb.record("classification", name, model=model, pretrained=pretrained, metrics=result.metrics,
                         classnames=result.labels, **own)
    return cb.record("linear-probe", name, model=model, pretrained=pretrained,
                     metrics={**result.metrics, "C": result.C, "fewshot_k": -1, "normalized": True,
                              "seed": result.seed})


def _draw(run_dir: Path, result: Any, cfg: EvalConfig, report: EvalReport, reporter: Reporter) -> None:
    """The map and the failure gallery of the first run, from its embeddings of the split."""
    model = load(run_dir, checkpoint=cfg.which, device=cfg.device)
    emb = model.embed_split(result.dataset, cfg.split, reporter=reporter, data_dir=cfg.data_dir)
    ds = load_dataset(emb.dataset, cfg.data_dir or model.config.data.data_dir)
    if cfg.map is not None:
        from mmret.figures.maps import embedding_map

        with reporter.task(f"drawing the {cfg.map_method} map", total=1, unit="maps") as task:
            report.map = embedding_map(emb, ds, ds.modality, cfg.map, method=cfg.map_method, seed=cfg.seed,
                                       title=f"{model.name}: {emb.dataset} {emb.split}")
            task.advance()
    if cfg.failures is not None:
        from mmret.figures.failures import failure_gallery

        ranks = getattr(result, "ranks", None)
        report.failures = failure_gallery(emb, ds.modality, cfg.failures, count=cfg.worst,
                                          t2i_ranks=ranks.t2i_ranks if ranks is not None else None,
                                          title=f"{model.name}: {emb.dataset} {emb.split}, the {cfg.worst} worst "
                                                f"text→{ds.modality.noun} queries")


def run_eval(run_dirs: list[Path], cfg: EvalConfig, reporter: Reporter = NULL) -> EvalReport:
    """Evaluate every run on the same split; draw and convert what `cfg` asks for."""
    if not run_dirs:
        raise MmretError("nothing to evaluate: give --run, --compare or --zero-shot")
    if (cfg.map or cfg.failures) and len(run_dirs) > 1:
        raise MmretError("--map and --failures draw one run; evaluate the runs one at a time to draw each")
    if cfg.task == "linear-probe" and cfg.bootstrap:
        raise MmretError("--bootstrap applies to retrieval and classification, not to the linear probe")
    report = EvalReport(cfg.task, _evaluate(run_dirs, cfg, reporter))
    if cfg.map or cfg.failures:
        _draw(run_dirs[0], report.results[0], cfg, report, reporter)
    if cfg.clip_benchmark:
        for run_dir, result in zip(run_dirs, report.results):
            rec = _benchmark_record(LoadedRun(run_dir, which=cfg.which, device=cfg.device), result, cfg)
            report.clip_benchmark.append((cb.write_record(run_dir, rec), rec))
    return report
