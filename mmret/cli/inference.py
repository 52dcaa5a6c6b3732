"""`mmret eval` and `mmret search`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mmret.cli import show
from mmret.cli.app import Checkpoint, DataDir, Device, RunsDir, app, check_writable, command, run_or_zero_shot
from mmret.errors import MmretError

# ---------------------------------------------------------------------------- eval and search


def _runs_list(values: list[str] | None) -> list[str]:
    return [v for value in values or [] for v in value.split(",") if v]


@app.command("eval")
@command
def eval_command(
    run: Annotated[Optional[str], typer.Option(
        help="Run to evaluate: name, folder or latest [default: the newest run].",
        show_default=False,
    )] = None,
    dataset: Annotated[Optional[str], typer.Option(
        help="Prepared dataset [default: the run's].",
        show_default=False,
    )] = None,
    split: Annotated[str, typer.Option(help="Split to score: test, val, train or all.")] = "test",
    task: Annotated[str, typer.Option(
        help="retrieval; classification (zero-shot, on a dataset from `prepare classes`); or linear-probe (logistic "
             "regression on the run's frozen item embeddings).",
    )] = "retrieval",
    compare: Annotated[Optional[list[str]], typer.Option(
        help="Runs to put side by side (repeat the option or separate with commas); differences from the first are "
             "tested with a paired bootstrap.",
        show_default=False,
    )] = None,
    zero_shot: Annotated[Optional[str], typer.Option(
        help="Also (or only) evaluate a pretrained CLIP or CLAP as it is, e.g. clip-b32 or clap-htsat: the baseline "
             "row.",
        show_default=False,
    )] = None,
    recall_k: Annotated[str, typer.Option(
        help="Retrieval: the k of Recall@k, separated by commas (CLIP_benchmark's --recall_k).",
    )] = "1,5,10",
    templates: Annotated[Optional[Path], typer.Option(
        help="Classification: prompt templates, one per line with {c} for the class name (or JSON) [default: the "
             "dataset's own, as a CLIP_benchmark set ships them; else CLIP's 80 ImageNet templates].",
        show_default=False,
    )] = None,
    map: Annotated[Optional[Path], typer.Option(
        "--map",
        help="Also draw a 2-D map of the split's item and caption embeddings to this PNG, coloured by class or split.",
        show_default=False,
    )] = None,
    map_method: Annotated[str, typer.Option(help="Projection of --map: umap or tsne.")] = "umap",
    failures: Annotated[Optional[Path], typer.Option(
        help="Also draw the worst text queries (caption, the right item, what ranked above it) to this PNG.",
        show_default=False,
    )] = None,
    worst: Annotated[int, typer.Option(help="Queries in the --failures gallery.")] = 8,
    bootstrap: Annotated[int, typer.Option(
        help="Resamples for 95% confidence intervals (0: none; 1000 is usual).",
    )] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap, the linear probe and the map.")] = 0,
    checkpoint: Checkpoint = "best",
    format: Annotated[str, typer.Option(
        help="Output: table, markdown, json, or clip-benchmark (CLIP_benchmark's result JSON, also saved under "
             "runs/<run>/eval/clip_benchmark/).",
    )] = "table",
    device: Device = "auto",
    runs_dir: RunsDir = None,
    data_dir: DataDir = None,
) -> None:
    """Retrieval (Recall@k, MRR, median rank, mAP, RSUM both ways, as papers report them), zero-shot
    classification or a linear probe; optionally an embedding map and a failure gallery."""
    from mmret.evaluation.config import FORMATS, EvalConfig, parse_ks

    if format not in FORMATS:
        raise MmretError(f"--format must be {', '.join(FORMATS)}, got {format!r}")
    cfg = EvalConfig(task=task, dataset=dataset, split=split, recall_k=parse_ks(recall_k), bootstrap=bootstrap,
                     seed=seed, which=checkpoint, device=device, templates=templates, map=map, map_method=map_method,
                     failures=failures, worst=worst, clip_benchmark=format == "clip-benchmark", data_dir=data_dir)
    for path, option in ((map, "--map"), (failures, "--failures")):
        if path is not None:
            check_writable(path, option)
    from mmret.cli import ui
    from mmret.evaluation.suite import run_eval
    from mmret.runs import load_run_config, resolve_run
    from mmret.runs.folders import newest_run

    names = _runs_list(compare) or ([run] if run or not zero_shot else [])
    run_dirs = [resolve_run(name, runs_dir) for name in names]
    if zero_shot:
        newest = run_dirs[0] if run_dirs else newest_run(runs_dir)
        ds = dataset or (load_run_config(newest).data.dataset if newest else None)
        run_dirs.insert(0, run_or_zero_shot(run=None, zero_shot=zero_shot, dataset=ds, data_dir=data_dir,
                                            runs_dir=runs_dir))
    report = run_eval(run_dirs, cfg, ui.NullReporterIfJson(format in ("json", "clip-benchmark")))
    show.show_eval_report(report, format)
    for run_dir in run_dirs:  # on stderr: what the numbers above came from, when that was not the user's choice
        show.say_run(run_dir, checkpoint, newest=not (compare or run or zero_shot))


@app.command()
@command
def search(
    query: Annotated[Optional[list[str]], typer.Argument(
        help="Text queries (each one searched), e.g. \"a dog on the beach\".",
        show_default=False,
    )] = None,
    image: Annotated[Optional[Path], typer.Option(
        help="Search with this picture instead: similar pictures and the captions that fit it.",
        show_default=False,
    )] = None,
    audio: Annotated[Optional[Path], typer.Option(
        help="Search with this sound instead (a run over sounds): similar sounds and the captions that fit it.",
        show_default=False,
    )] = None,
    queries: Annotated[Optional[Path], typer.Option(
        help="A file with one query per line (- reads standard input), searched in one batch.",
        show_default=False,
    )] = None,
    run: Annotated[Optional[str], typer.Option(
        help="Run whose model searches [default: the newest run].",
        show_default=False,
    )] = None,
    zero_shot: Annotated[Optional[str], typer.Option(
        help="Search with a pretrained CLIP or CLAP as it is instead (e.g. clip-b32, clap-htsat); needs --dataset.",
        show_default=False,
    )] = None,
    dataset: Annotated[Optional[str], typer.Option(
        help="Dataset whose pictures form the gallery [default: the run's].",
        show_default=False,
    )] = None,
    split: Annotated[str, typer.Option(help="Gallery split: all, train, val or test.")] = "all",
    k: Annotated[int, typer.Option("-k", "--top", help="Results per query.")] = 10,
    index: Annotated[str, typer.Option(
        help="exact, or ivf / hnsw (FAISS, needs the faiss extra) for galleries of millions.",
    )] = "exact",
    rebuild_index: Annotated[bool, typer.Option(
        "--rebuild-index",
        help="Build the cached index again (e.g. after the run improved).",
    )] = False,
    checkpoint: Checkpoint = "best",
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON for scripts.")] = False,
    grid: Annotated[Optional[Path], typer.Option(
        help="Also write the results here for people to look at: a contact sheet (PNG) of pictures, a listening page "
             "(HTML: a player and a spectrogram per hit) of sounds.",
        show_default=False,
    )] = None,
    device: Device = "auto",
    runs_dir: RunsDir = None,
    data_dir: DataDir = None,
) -> None:
    """The best-matching pictures or sounds for text queries (or items and captions for a picture or sound)."""
    import sys

    from mmret.api import load
    from mmret.cli import ui

    texts = list(query or [])
    if queries is not None:
        try:
            source = sys.stdin.read() if str(queries) == "-" else queries.read_text(encoding="utf-8")
        except OSError as e:
            raise MmretError(f"cannot read --queries {queries}: {e.strerror}") from None
        texts += [line.strip() for line in source.splitlines() if line.strip()]
    if grid is not None:
        check_writable(grid, "--grid")
    if image is not None and audio is not None:
        raise MmretError("search with --image or --audio, not both")
    run_dir = run_or_zero_shot(run=run, zero_shot=zero_shot, dataset=dataset, data_dir=data_dir, runs_dir=runs_dir)
    result = load(run_dir, checkpoint=checkpoint, device=device).search(
        texts, item=image or audio, dataset=dataset, split=split, k=k, index=index, rebuild_index=rebuild_index,
        reporter=ui.NullReporterIfJson(json_output), data_dir=data_dir,
        query_modality="audio" if audio is not None else "image" if image is not None else None)
    if grid is not None:
        from mmret.modalities import get_modality

        get_modality(result.modality).results_sheet([q.sheet_row() for q in result.results], grid, result.roots)
    if json_output:
        import json

        print(json.dumps(result.to_json(), indent=2))
        return
    show.show_search(result, grid)
    show.say_run(run_dir, checkpoint, newest=not (run or zero_shot))


