"""The `mmret` command line: each command parses options, builds a config, calls one library
function and renders its result. No logic lives here.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

from mmret import __version__
from mmret.errors import MmretError

app = typer.Typer(
    name="mmret",
    help="Image-text retrieval you can train on one consumer GPU or a laptop CPU.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
    rich_markup_mode=None,
)

DEBUG_ENV = "MMRET_DEBUG"

DataDir = Annotated[Optional[Path], typer.Option(
    "--data-dir", envvar="MMRET_DATA_DIR", show_envvar=True,
    help="Folder holding the prepared datasets (default: ./data).")]
RunsDir = Annotated[Optional[Path], typer.Option(
    "--runs-dir", envvar="MMRET_RUNS_DIR", show_envvar=True, help="Folder holding the runs (default: ./runs).")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
Checkpoint = Annotated[str, typer.Option(help="Which checkpoint: best or last.")]


def debug() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def command(fn: Callable) -> Callable:
    """Turn an `MmretError` into one red line and exit code 1 (a traceback with MMRET_DEBUG=1)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from mmret import ui

        try:
            return fn(*args, **kwargs)
        except MmretError as e:
            if debug():
                raise
            ui.print_error(str(e))
            raise typer.Exit(getattr(e, "exit_code", 1)) from None
        except KeyboardInterrupt:
            if debug():
                raise
            ui.print_error("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mmret {__version__}")
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Image-text retrieval you can train on one consumer GPU or a laptop CPU."""
    logging.basicConfig(level=logging.DEBUG if debug() else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


# ---------------------------------------------------------------------------- prepare

def _source_help() -> str:
    from mmret.datasets import READER_HELP

    return "Dataset format: " + "; ".join(f"{k} ({v})" for k, v in READER_HELP.items())


@app.command()
@command
def prepare(
    source: Annotated[str, typer.Argument(help=_source_help(), show_default=False)],
    root: Annotated[Optional[Path], typer.Option(help="Folder that holds the raw dataset (not needed for `example`).")] = None,
    name: Annotated[Optional[str], typer.Option(help="Name of the prepared dataset under the data folder (default: SOURCE).")] = None,
    val: Annotated[float, typer.Option(help="Fraction of images for validation when the source has no official split.")] = 0.1,
    test: Annotated[float, typer.Option(help="Fraction of images for testing when the source has no official split.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the random split (and of the generated example).")] = 0,
    check_images: Annotated[bool, typer.Option("--check-images", help="Decode every image fully and drop broken ones (slower).")] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace the dataset if it was prepared before.")] = False,
    count: Annotated[int, typer.Option(help="Number of pictures in the generated `example` dataset.")] = 500,
    data_dir: DataDir = None,
) -> None:
    """Read a raw dataset and write its image and caption tables with train/val/test splits."""
    from mmret import ui
    from mmret.config import PrepareConfig
    from mmret.datasets import prepare as run_prepare

    cfg = PrepareConfig(source=source, root=root, name=name, val=val, test=test, seed=seed,
                        check_images=check_images, force=force, count=count, data_dir=data_dir)
    result = run_prepare(cfg, ui.RichReporter())
    _show_prepare(result)


def _show_prepare(result) -> None:
    from mmret import ui

    rows = []
    for split, c in result.counts.items():
        per = f"{c['captions'] / c['images']:.2f}" if c["images"] else "-"
        rows.append((split, c["images"], c["captions"], per, c["dropped images"]))
    ui.console.print(ui.table(f"{result.name} ({result.source})", ["split", "images", "captions", "captions/image", "dropped images"], rows))
    ui.console.print(f"splits: {result.split_note}", highlight=False)
    if result.problems:
        ui.console.print("dropped or fixed: " + ", ".join(f"{n} {k}" for k, n in result.dropped.items()), highlight=False)
        for p in result.problems[:5]:
            ui.console.print(f"  {p.kind}: {p.item}: {p.reason}", highlight=False, soft_wrap=True)
        if len(result.problems) > 5:
            ui.console.print(f"  ... all {len(result.problems)} listed in {result.path / 'dataset.json'}", highlight=False)
    ui.console.print(f"wrote {result.path} in {result.seconds:.1f}s", highlight=False)


# ---------------------------------------------------------------------------- precompute-embeddings

def _encoder_help(modality: str) -> str:
    from mmret.encoders import ENCODERS

    presets = "; ".join(f"{name} ({entry.help.rstrip('.')})" for name, entry in ENCODERS.items()
                        if modality in entry.builders)
    return f"Frozen {modality} tower: a preset, a hub id (owner/name) or a local model folder. Presets: {presets}."


@app.command("precompute-embeddings")
@command
def precompute_embeddings(
    dataset: Annotated[Optional[str], typer.Option(help="Prepared dataset to encode (with --run: default the run's).", show_default=False)] = None,
    run: Annotated[Optional[str], typer.Option(help="Write this trained run's final embeddings (name, folder or latest) to runs/<run>/embeddings/<ds>-<split>/.", show_default=False)] = None,
    zero_shot: Annotated[Optional[str], typer.Option(help="Write the final embeddings of a pretrained CLIP as it is (e.g. clip-b32).", show_default=False)] = None,
    vision: Annotated[Optional[str], typer.Option(help=_encoder_help("image"), show_default=False)] = None,
    text: Annotated[Optional[str], typer.Option(help=_encoder_help("text"), show_default=False)] = None,
    split: Annotated[str, typer.Option(help="Rows to compute now: all, train, val or test (one cache spans every split).")] = "all",
    tokens: Annotated[bool, typer.Option("--tokens", help="Also keep the token states (N, T, D), for methods that read them.")] = False,
    batch_size: Annotated[str, typer.Option(help="Rows per forward pass, or auto.")] = "auto",
    precision: Annotated[str, typer.Option(help="auto (bf16 when it matches fp32 and is faster; AMP on CUDA), fp32, bf16, or fp16 (CUDA only).")] = "auto",
    device: Device = "auto",
    image_size: Annotated[Optional[int], typer.Option(help="Square input size in pixels (default: the model's own).", show_default=False)] = None,
    max_length: Annotated[int, typer.Option(help="Text tokens per caption.")] = 64,
    workers: Annotated[Optional[int], typer.Option(help="Image decoding workers (default: CPU count - 1, at most 4).", show_default=False)] = None,
    compile: Annotated[bool, typer.Option("--compile", help="Compile the image tower with torch.compile first: a minute or so once, then faster (worth it for thousands of images).")] = False,
    data_dir: DataDir = None,
    runs_dir: RunsDir = None,
) -> None:
    """Encode a dataset's images and captions once with frozen towers into data/<ds>/features/,
    or with --run, write a trained run's final embeddings for eval and search.

    A cache that is already complete is reused; an interrupted run resumes where it stopped.
    """
    from mmret import ui
    from mmret.config import PrecomputeConfig
    from mmret.features import precompute_embeddings as run_precompute

    if run or zero_shot:
        from mmret.embeddings import write_run_embeddings

        run_dir = _run_or_zero_shot(run, zero_shot, dataset, data_dir, runs_dir)
        emb = write_run_embeddings(run_dir, dataset, split, device=device, reporter=ui.RichReporter())
        ui.console.print(f"{emb.dataset}-{emb.split}: {emb.images.shape[0]:,} images and {emb.captions.shape[0]:,} "
                         f"captions, {emb.images.shape[1]}-d float16, in {emb.path}", highlight=False)
        return
    if dataset is None:
        raise MmretError("precompute-embeddings needs --dataset (or --run RUN for a trained run's embeddings)")
    cfg = PrecomputeConfig(dataset=dataset, vision=vision, text=text, split=split, tokens=tokens,
                           batch_size=batch_size, precision=precision, device=device, image_size=image_size,
                           max_length=max_length, workers=workers, compile=compile, data_dir=data_dir)
    _show_precompute(run_precompute(cfg, ui.RichReporter()))


def _run_or_zero_shot(run, zero_shot, dataset, data_dir, runs_dir) -> Path:
    """The run folder named by --run, or the one standing for --zero-shot MODEL on --dataset."""
    from mmret.runs import load_run_config, resolve_run

    if zero_shot:
        from mmret.embeddings import zero_shot_run

        if dataset is None:
            dataset = load_run_config(resolve_run(run, runs_dir)).data.dataset if run else None
        if dataset is None:
            raise MmretError("--zero-shot needs --dataset: the prepared dataset to evaluate on")
        return zero_shot_run(zero_shot, dataset, data_dir, runs_dir)
    return resolve_run(run, runs_dir)


def _show_precompute(result) -> None:
    from mmret import ui

    rows = []
    for name, feats in result.parts:
        s = feats.stats
        rate = f"{s.rows_per_second:,.1f}" if s.encoded else "-"
        tokens = str(tuple(feats.tokens.shape)) if feats.tokens is not None else "-"
        rows.append((feats.which, name, f"{s.encoded:,} / {s.reused:,}", str(tuple(feats.pooled.shape)),
                     tokens, s.precision or "-", ui.human_bytes(feats.disk_bytes), f"{s.seconds:.1f}s", rate))
    columns = ["rows", "tower", "new / reused", "pooled", "tokens", "precision", "disk", "time", "rows/s"]
    ui.console.print(ui.table(f"{result.dataset}: frozen features on {result.device}", columns, rows))
    for _, feats in result.parts:
        if feats.stats.precision_reason:
            ui.console.print(f"{feats.which} precision: {feats.stats.precision_reason}", highlight=False)
        if feats.failed:
            ui.print_note(f"{len(feats.failed)} {feats.which} could not be read (rows left NaN, valid=False):")
            for item, reason in list(feats.failed.items())[:5]:
                ui.console.print(f"  {item}: {reason}", highlight=False, soft_wrap=True)
        ui.console.print(f"{feats.which} cache: {feats.path}", highlight=False, soft_wrap=True)
    ui.console.print(f"done in {result.seconds:.1f}s", highlight=False)


# ---------------------------------------------------------------------------- train

def _method_help() -> str:
    from mmret.methods import method_help

    return "Training method. " + method_help()


def _recipe_help() -> str:
    from mmret.adapters import RECIPE_HELP

    return "A named LoRA recipe (options given beside it win): " + "; ".join(f"{k}: {v}" for k, v in RECIPE_HELP.items())


# options train and probe-memory share
Method = Annotated[Optional[str], typer.Option(help=_method_help(), show_default=False)]
ClipModel = Annotated[Optional[str], typer.Option(help="A CLIP (preset clip-b32/clip-b16, hub id or folder) whose two towers lora/prefix/adapter/full adapt.", show_default=False)]
PairBatch = Annotated[Optional[int], typer.Option(help="Pairs in one contrastive loss [default: 128].", show_default=False)]
MaxLength = Annotated[Optional[int], typer.Option(help="Text tokens per caption [default: 64].", show_default=False)]
EmbedDim = Annotated[Optional[int], typer.Option(help="Size of the shared embedding space [default: 512].", show_default=False)]
Recipe = Annotated[Optional[str], typer.Option(help=_recipe_help(), show_default=False)]
Rank = Annotated[Optional[int], typer.Option(help="LoRA rank r [default: 8].", show_default=False)]
Tower = Annotated[Optional[str], typer.Option(help="Which tower lora/prefix/adapter adapt: text, vision or both [default: both].", show_default=False)]


@app.command()
@command
def train(
    method: Method = None,
    dataset: Annotated[Optional[str], typer.Option(help="Prepared dataset to train on [default: example].", show_default=False)] = None,
    vision: Annotated[Optional[str], typer.Option(help="Frozen image tower: preset, hub id or folder [default: dino-vits16].", show_default=False)] = None,
    text: Annotated[Optional[str], typer.Option(help="Frozen text tower: preset, hub id or folder [default: distilbert].", show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the training images [default: 20].", show_default=False)] = None,
    batch_size: PairBatch = None,
    micro_batch: Annotated[Optional[int], typer.Option(help="Pairs per forward pass; smaller than --batch-size uses gradient caching, so every pair still sees the whole batch's negatives.", show_default=False)] = None,
    accumulation: Annotated[Optional[str], typer.Option(help="With --micro-batch: cache (exact, default) or plain accumulation (each micro-batch sees only its own negatives).", show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate [default: the method's].", show_default=False)] = None,
    weight_decay: Annotated[Optional[float], typer.Option(help="AdamW weight decay on weight matrices [default: 0.05].", show_default=False)] = None,
    warmup: Annotated[Optional[float], typer.Option(help="Fraction of steps spent warming up [default: 0.05].", show_default=False)] = None,
    grad_clip: Annotated[Optional[float], typer.Option(help="Clip the gradient norm; 0 turns it off [default: 1.0].", show_default=False)] = None,
    precision: Annotated[Optional[str], typer.Option(help="auto, fp32, bf16 or fp16 (CUDA only, with loss scaling) [default: auto].", show_default=False)] = None,
    patience: Annotated[Optional[int], typer.Option(help="Stop after this many epochs without a better val mean recall; 0 never stops early [default: 5].", show_default=False)] = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of data order, initialisation and dropout [default: 0].", show_default=False)] = None,
    max_steps: Annotated[Optional[int], typer.Option(help="Stop after this many optimizer steps.", show_default=False)] = None,
    device: Annotated[Optional[str], typer.Option(help="auto, cpu, cuda or cuda:N [default: auto].", show_default=False)] = None,
    save_every: Annotated[Optional[int], typer.Option(help="Also keep a checkpoint every N epochs [default: 0, off].", show_default=False)] = None,
    embed_dim: EmbedDim = None,
    head_layers: Annotated[Optional[int], typer.Option(help="Projection heads: 1 linear, 2 or more an MLP [default: 2].", show_default=False)] = None,
    head_hidden: Annotated[Optional[int], typer.Option(help="Hidden width of MLP heads [default: the input width].", show_default=False)] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Dropout in heads and bridge [default: 0.1].", show_default=False)] = None,
    queries: Annotated[Optional[int], typer.Option(help="Bridge: learnable queries K [default: 32].", show_default=False)] = None,
    bridge_layers: Annotated[Optional[int], typer.Option(help="Bridge: cross-attention blocks L [default: 2].", show_default=False)] = None,
    bridge_width: Annotated[Optional[int], typer.Option(help="Bridge: width [default: 384].", show_default=False)] = None,
    bridge_heads: Annotated[Optional[int], typer.Option(help="Bridge: attention heads [default: 6].", show_default=False)] = None,
    token_pool: Annotated[Optional[int], typer.Option(help="Bridge: average-pool the patch grid by this factor first; 2 reads about 4x fewer tokens [default: 1].", show_default=False)] = None,
    mixup: Annotated[Optional[float], typer.Option(help="Latent mixup Beta(alpha, alpha) on cached features, as in FuseMix; 0 is off.", show_default=False)] = None,
    temperature: Annotated[Optional[str], typer.Option(help="learned, fixed or dynamic [default: learned].", show_default=False)] = None,
    model: ClipModel = None,
    recipe: Recipe = None,
    rank: Rank = None,
    alpha: Annotated[Optional[float], typer.Option(help="LoRA alpha [default: 2 x rank].", show_default=False)] = None,
    lora_dropout: Annotated[Optional[float], typer.Option(help="Dropout on the LoRA path [default: 0.1].", show_default=False)] = None,
    targets: Annotated[Optional[str], typer.Option(help="LoRA targets among q, k, v, o, mlp, comma-separated [default: q,v].", show_default=False)] = None,
    tower: Tower = None,
    prefix_tokens: Annotated[Optional[int], typer.Option(help="Prefix: learned prompt tokens per block [default: 16].", show_default=False)] = None,
    adapter_dim: Annotated[Optional[int], typer.Option(help="Adapter: bottleneck width [default: 64].", show_default=False)] = None,
    grad_checkpointing: Annotated[Optional[bool], typer.Option("--grad-checkpointing/--no-grad-checkpointing", help="Recompute tower activations in backward to save memory.", show_default=False)] = None,
    hflip: Annotated[Optional[bool], typer.Option("--hflip/--no-hflip", help="Random horizontal flips of training pictures [default: on unless captions say left or right].", show_default=False)] = None,
    workers: Annotated[Optional[int], typer.Option(help="Picture decoding workers [default: CPU count - 1, at most 4].", show_default=False)] = None,
    arch: Annotated[Optional[str], typer.Option(help="Scratch: miniclip (ResNet + Linformer), clip-tiny or clip-b16 [default: miniclip].", show_default=False)] = None,
    image_model: Annotated[Optional[str], typer.Option(help="Scratch miniclip: timm CNN of the image tower [default: resnet34].", show_default=False)] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Scratch: picture side in pixels [default: 64].", show_default=False)] = None,
    text_width: Annotated[Optional[int], typer.Option(help="Scratch miniclip: Linformer width [default: 256].", show_default=False)] = None,
    text_depth: Annotated[Optional[int], typer.Option(help="Scratch miniclip: Linformer blocks [default: 4].", show_default=False)] = None,
    linformer_k: Annotated[Optional[int], typer.Option(help="Scratch miniclip: keys and values projected to this length [default: 16].", show_default=False)] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="Scratch: bpe (trained on the captions, saved in the run) or a transformers tokenizer id or folder [default: bpe].", show_default=False)] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="Scratch: BPE vocabulary size [default: 2000].", show_default=False)] = None,
    pretrained_image: Annotated[Optional[bool], typer.Option("--pretrained-image/--random-image", help="Scratch miniclip: start the ResNet from ImageNet weights (needs the hub or its cache).", show_default=False)] = None,
    max_length: MaxLength = None,
    sam: Annotated[Optional[bool], typer.Option("--sam/--no-sam", help="Sharpness-aware minimisation (two passes a step).", show_default=False)] = None,
    sam_rho: Annotated[Optional[float], typer.Option(help="SAM neighbourhood size rho [default: 0.05].", show_default=False)] = None,
    folds: Annotated[Optional[int], typer.Option(help="k-fold cross-validation: re-split all images into k folds.", show_default=False)] = None,
    fold: Annotated[Optional[int], typer.Option(help="With --folds: the fold used as test split.", show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option(help="Run name [default: date-method-dataset].", show_default=False)] = None,
    config: Annotated[Optional[Path], typer.Option(help="Start from this config.json (a run's, or one probe-memory saved); options given here override it.", show_default=False)] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue this stopped run (name or folder) from its last checkpoint.", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the parameter table and the resolved config, and stop.")] = False,
    data_dir: DataDir = None,
    runs_dir: RunsDir = None,
) -> None:
    """Train a retrieval model: a run folder with checkpoints, metrics and plots."""
    from mmret import ui
    from mmret import train as training
    from mmret.config import RunConfig, with_overrides
    from mmret.io import read_json
    from mmret.runs import resolve_run

    if resume:
        result = training.resume(resolve_run(resume, runs_dir), ui.RichReporter())
        _show_train(result)
        return
    base = RunConfig.from_dict(read_json(config)) if config else RunConfig()
    values = dict(locals())
    for key in ("config", "resume", "dry_run", "ui", "training", "RunConfig", "with_overrides", "read_json",
                "resolve_run", "base", "recipe"):
        values.pop(key, None)
    if recipe:
        from mmret.adapters import recipe_values

        values.update(recipe_values(recipe, {k: values.get(k) for k in ("method", "tower", "rank", "alpha", "targets", "lora_dropout")}))
    cfg = with_overrides(base, values)
    if dry_run:
        _show_dry_run(training.dry_run(cfg))
        return
    _show_train(training.train(cfg, ui.RichReporter()))


def _show_dry_run(plan) -> None:
    import json

    from mmret import ui

    rows = [(r.part, r.total, r.trainable, f"{r.percent_trainable:.2f}%") for r in plan.rows]
    ui.console.print(ui.table(f"parameters: {plan.method}", ["part", "parameters", "trainable", "% trainable"], rows))
    ui.console.print(json.dumps(plan.config, indent=2, sort_keys=True), highlight=False, soft_wrap=True)


def _show_train(result) -> None:
    from mmret import ui

    keys = [k for k in ("t2i_r1", "t2i_r5", "t2i_r10", "i2t_r1", "i2t_r5", "i2t_r10", "mean_recall") if k in result.best]
    ui.console.print(ui.table("best validation", ["metric", "value"], [(k, f"{result.best[k]:.4f}") for k in keys]))
    ui.console.print(f"{result.stopped} after {result.epochs} epochs, {result.steps} steps, "
                     f"{result.seconds:.1f}s ({result.precision} on {result.device})", highlight=False)
    ui.console.print(f"run: {result.run_dir}", highlight=False)


# ---------------------------------------------------------------------------- eval and search


def _runs_list(values: list[str] | None) -> list[str]:
    return [v for value in values or [] for v in value.split(",") if v]


@app.command("eval")
@command
def eval_command(
    run: Annotated[Optional[str], typer.Option(help="Run to evaluate: name, folder or latest [default: the newest run].", show_default=False)] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Prepared dataset [default: the run's].", show_default=False)] = None,
    split: Annotated[str, typer.Option(help="Split to score: test, val, train or all.")] = "test",
    compare: Annotated[Optional[list[str]], typer.Option(help="Runs to put side by side (repeat the option or separate with commas); differences from the first are tested with a paired bootstrap.", show_default=False)] = None,
    zero_shot: Annotated[Optional[str], typer.Option(help="Also (or only) evaluate a pretrained CLIP as it is, e.g. clip-b32: the baseline row.", show_default=False)] = None,
    bootstrap: Annotated[int, typer.Option(help="Resamples for 95% confidence intervals (0: none; 1000 is usual).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    checkpoint: Checkpoint = "best",
    format: Annotated[str, typer.Option(help="Output: table, markdown or json.")] = "table",
    device: Device = "auto",
    runs_dir: RunsDir = None,
    data_dir: DataDir = None,
) -> None:
    """Recall@1/5/10, MRR, median rank, mAP and RSUM in both directions, as papers report them."""
    from mmret import ui
    from mmret.evaluate import compare_runs, evaluate_run
    from mmret.runs import load_run_config, resolve_run

    if format not in ("table", "markdown", "json"):
        raise MmretError(f"--format must be table, markdown or json, got {format!r}")
    names = _runs_list(compare) or ([run] if run or not zero_shot else [])
    run_dirs = [resolve_run(name, runs_dir) for name in names]
    if zero_shot:
        ds = dataset or (load_run_config(run_dirs[0]).data.dataset if run_dirs else None)
        run_dirs.insert(0, _run_or_zero_shot(None, zero_shot, ds, data_dir, runs_dir))
    reporter = ui.RichReporter()
    if len(run_dirs) == 1:
        results = [evaluate_run(run_dirs[0], dataset, split, bootstrap, seed, checkpoint, device, reporter)]
    else:
        results = compare_runs(run_dirs, dataset, split, bootstrap, seed, checkpoint, device, reporter)
    _show_eval(results, format)


def _show_eval(results, format: str) -> None:
    import json

    from mmret import ui
    from mmret.evaluate import HEADLINE

    if format == "json":
        ui.console.print_json(json.dumps([r.to_json() for r in results]))
        return
    first = results[0]
    columns = ["metric"] + [r.run for r in results]
    rows = []
    for key in HEADLINE:
        cells = [key]
        for r in results:
            cell = f"{r.metrics[key]:.4f}" if key not in ("rsum",) and not key.endswith("medr") else f"{r.metrics[key]:.1f}"
            if r.ci:
                lo, hi = r.ci[key]
                cell += f" [{lo:.3f}, {hi:.3f}]" if not key.endswith(("medr", "rsum")) else f" [{lo:.0f}, {hi:.0f}]"
            if r.diffs and r.diffs[key].significant:
                cell += " *"
            cells.append(cell)
        rows.append(cells)
    rows.append(["chance R@1/5/10"] + [" / ".join(f"{min(1, k / r.n_images):.3f}" for k in (1, 5, 10)) for r in results])
    title = f"{first.dataset} {first.split}: {first.n_images:,} images, {first.n_captions:,} captions"
    if format == "markdown":
        print(f"**{title}**\n")
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        ui.console.print(ui.table(title, columns, rows))
    if any(r.diffs and any(d.significant for d in r.diffs.values()) for r in results):
        ui.console.print(f"* differs from {first.run} (paired bootstrap, 95%)", highlight=False)
    for r in results:
        ui.console.print(f"saved {r.path}", highlight=False)


@app.command()
@command
def search(
    query: Annotated[Optional[list[str]], typer.Argument(help="Text queries (each one searched), e.g. \"a dog on the beach\".", show_default=False)] = None,
    image: Annotated[Optional[Path], typer.Option(help="Search with this picture instead: similar pictures and the captions that fit it.", show_default=False)] = None,
    queries: Annotated[Optional[Path], typer.Option(help="A file with one query per line (- reads standard input), searched in one batch.", show_default=False)] = None,
    run: Annotated[Optional[str], typer.Option(help="Run whose model searches [default: the newest run].", show_default=False)] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset whose pictures form the gallery [default: the run's].", show_default=False)] = None,
    split: Annotated[str, typer.Option(help="Gallery split: all, train, val or test.")] = "all",
    k: Annotated[int, typer.Option("-k", "--top", help="Results per query.")] = 10,
    index: Annotated[str, typer.Option(help="exact, or ivf / hnsw (FAISS, needs the faiss extra) for galleries of millions.")] = "exact",
    rebuild_index: Annotated[bool, typer.Option("--rebuild-index", help="Build the cached index again (e.g. after the run improved).")] = False,
    checkpoint: Checkpoint = "best",
    json_output: Annotated[bool, typer.Option("--json", help="Print the results as JSON for scripts.")] = False,
    grid: Annotated[Optional[Path], typer.Option(help="Also write a contact sheet of the results (PNG) here.", show_default=False)] = None,
    device: Device = "auto",
    runs_dir: RunsDir = None,
) -> None:
    """The best-matching pictures for text queries (or pictures and captions for a picture)."""
    import sys

    from mmret import ui
    from mmret.runs import resolve_run
    from mmret.search import search as run_search

    texts = list(query or [])
    if queries is not None:
        try:
            source = sys.stdin.read() if str(queries) == "-" else queries.read_text(encoding="utf-8")
        except OSError as e:
            raise MmretError(f"cannot read --queries {queries}: {e.strerror}") from None
        texts += [line.strip() for line in source.splitlines() if line.strip()]
    result = run_search(resolve_run(run, runs_dir), texts, image, dataset, split, k, index, rebuild_index, device,
                        checkpoint, ui.NullReporterIfJson(json_output))
    if grid is not None:
        from mmret.plots import contact_sheet

        contact_sheet([(h.path, f"{q.query[:12]} #{h.rank} {h.score:.3f}") for q in result.results for h in q.images], grid)
    if json_output:
        import json

        print(json.dumps(result.to_json(), indent=2))
        return
    _show_search(result, grid)


def _show_search(result, grid) -> None:
    from mmret import ui

    for q in result.results:
        rows = [(h.rank, f"{h.score:.4f}", h.image_id, h.path, " | ".join(h.captions[:2])) for h in q.images]
        ui.console.print(ui.table(f"{q.query!r}: pictures", ["#", "score", "image", "path", "captions"], rows))
        if q.captions:
            rows = [(h.rank, f"{h.score:.4f}", h.captions[0], h.image_id) for h in q.captions]
            ui.console.print(ui.table(f"{q.query!r}: captions", ["#", "score", "caption", "of image"], rows))
    ui.console.print(f"gallery: {result.dataset}-{result.split} of run {result.run}, {result.index} search", highlight=False)
    if grid is not None:
        ui.console.print(f"contact sheet: {grid}", highlight=False)


# ---------------------------------------------------------------------------- probe-memory

@app.command("probe-memory")
@command
def probe_memory(
    vram: Annotated[float, typer.Option(help="GPU memory to fit in, in GB (2^30 bytes): 6 for a 6 GB card.", show_default=False)],
    method: Method = None,
    model: ClipModel = None,
    vision: Annotated[Optional[str], typer.Option(help="Image tower: preset, hub id or folder [default: dino-vits16]. Only its config is read.", show_default=False)] = None,
    text: Annotated[Optional[str], typer.Option(help="Text tower: preset, hub id or folder [default: distilbert]. Only its config is read.", show_default=False)] = None,
    batch_size: PairBatch = None,
    max_length: MaxLength = None,
    embed_dim: EmbedDim = None,
    recipe: Recipe = None,
    rank: Rank = None,
    targets: Annotated[Optional[str], typer.Option(help="LoRA targets among q, k, v, o, mlp [default: q,v].", show_default=False)] = None,
    tower: Tower = None,
    accumulation: Annotated[Optional[str], typer.Option(help="With a micro-batch: cache (exact, default) or plain accumulation.", show_default=False)] = None,
    dataset: Annotated[Optional[str], typer.Option(help="Dataset the saved config trains on [default: example]; its size bounds the input-norm sample.", show_default=False)] = None,
    config: Annotated[Optional[Path], typer.Option(help="Start from this config.json (a run's, or one saved before); options given here override it.", show_default=False)] = None,
    reserve: Annotated[Optional[float], typer.Option(help="GB of the budget kept for the CUDA context and other programs [default: measured on a GPU, else 0.5].", show_default=False)] = None,
    estimate: Annotated[bool, typer.Option("--estimate", help="Estimate on fake tensors even when a CUDA GPU is present (to plan for another GPU).")] = False,
    save: Annotated[Optional[Path], typer.Option(help="Write the recommended configuration here, for `mmret train --config FILE`.", show_default=False)] = None,
    data_dir: DataDir = None,
) -> None:
    """Find the training configuration that fits a GPU memory budget and runs fastest.

    Tries every micro-batch, precision (fp32, bf16, fp16) and gradient checkpointing setting. On a
    CUDA GPU it measures real training steps; without one it estimates them on fake tensors,
    building the towers from their configs without weights.
    """
    from mmret import ui
    from mmret.config import RunConfig, with_overrides
    from mmret.io import read_json
    from mmret.memory import probe_memory as run_probe
    from mmret.memory import save_config

    if config is not None and not config.is_file():
        raise MmretError(f"--config {config}: no such file")
    base = RunConfig.from_dict(read_json(config)) if config else RunConfig()
    values = dict(method=method, model=model, vision=vision, text=text, batch_size=batch_size, max_length=max_length,
                  embed_dim=embed_dim, rank=rank, targets=targets, tower=tower, accumulation=accumulation,
                  dataset=dataset, data_dir=data_dir)
    if recipe:
        from mmret.adapters import recipe_values

        values.update(recipe_values(recipe, {k: values.get(k) for k in ("method", "tower", "rank", "targets")}))
    report = run_probe(with_overrides(base, values), vram, reserve, "estimate" if estimate else "auto", ui.RichReporter())
    _show_memory(report)
    if save is not None:
        ui.console.print(f"saved {save_config(report.config, save)}: train with `mmret train --config {save}`",
                         highlight=False, soft_wrap=True)


def _show_memory(report) -> None:
    from mmret import ui
    from mmret.memory import CATEGORIES, describe, needed

    size, rows = ui.human_bytes, []
    for r in report.rows:
        c, m = r.candidate, r.step
        step = [size(getattr(m, k)) for k in CATEGORIES] + [size(m.total)] if m else ["-"] * 5 + ["out of memory"]
        others = [size(r.phases[k]) if r.phases[k] is not None else "out of memory" for k in ("eval", "setup")]
        fits = "best" if r is report.best else "yes" if r.fits else "no"
        rows.append((c.micro_batch, c.precision, "on" if c.grad_checkpointing else "off", *step, *others, r.phase, fits))
    columns = ["micro-batch", "precision", "checkpointing", *CATEGORIES, "step peak", "eval", "setup", "peak in", "fits"]
    title = f"{report.method}, batch {report.batch_size}: peak training memory against {report.vram:g} GB"
    ui.console.print(ui.table(title, columns, rows))
    ui.console.print(report.how, highlight=False, soft_wrap=True)
    for note in report.notes:
        ui.console.print(f"- {note}", highlight=False, soft_wrap=True)
    best, tc = report.best, report.config.train
    flags = f"--micro-batch {tc.micro_batch or tc.batch_size} --precision {tc.precision}"
    flags += " --grad-checkpointing" if tc.grad_checkpointing else ""
    ui.console.print(f"recommended: {describe(best.candidate, report.batch_size)}; peak {size(best.peak)} "
                     f"({size(needed(best.peak))} with the margin) of {size(report.usable)} usable; "
                     f"mmret train {flags}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------------------- quickstart


@app.command()
@command
def quickstart(
    epochs: Annotated[Optional[int], typer.Option(help="Training epochs [default: 15].", show_default=False)] = None,
    data_dir: DataDir = None,
    runs_dir: RunsDir = None,
) -> None:
    """The whole pipeline offline on the built-in example: prepare, train a small scratch model,
    evaluate it on held-out pictures, and search with a caption (a few minutes on a laptop CPU)."""
    from mmret import ui
    from mmret.quickstart import quickstart as run_quickstart

    result = run_quickstart(data_dir, runs_dir, epochs, ui.RichReporter())
    _show_prepare(result.prepared)
    _show_train(result.trained)
    _show_eval([result.evaluated], "table")
    _show_search(result.searched, None)
    ui.console.print(f"quick start done in {result.seconds:.0f}s; the run is {result.trained.run_dir.name} "
                     f"(try `mmret search \"a green triangle left of a purple square\"`)", highlight=False)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
