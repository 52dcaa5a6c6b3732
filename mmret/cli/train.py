"""`mmret train` and `mmret probe-memory`, and the options they share."""

from __future__ import annotations

import math

from pathlib import Path
from typing import Annotated, Optional

import typer

from mmret.cli import show
from mmret.cli.app import DataDir, RunsDir, app, command, flag, item_tower, read_config
from mmret.errors import MmretError


# ---------------------------------------------------------------------------- train

def _method_help() -> str:
    from mmret.methods import method_help

    return "Training method. " + method_help()


def _recipe_help() -> str:
    from mmret.methods.catalog import RECIPE_HELP

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
    item: Annotated[Optional[str], item_tower("preset, hub id or folder (sounds: ast-audioset, clap-htsat, spectrogram:IMAGE-TOWER) [default: dino-vits16].")] = None,
    text: Annotated[Optional[str], typer.Option(help="Frozen text tower: preset, hub id or folder [default: distilbert].", show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Passes over the training items [default: 20].", show_default=False)] = None,
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
    queries: Annotated[Optional[int], typer.Option(help="Bridge: learnable queries K; 0 for the pooled path alone (with --bridge-base) [default: 32].", show_default=False)] = None,
    bridge_layers: Annotated[Optional[int], typer.Option(help="Bridge: cross-attention blocks L [default: 2].", show_default=False)] = None,
    bridge_width: Annotated[Optional[int], typer.Option(help="Bridge: width [default: 384].", show_default=False)] = None,
    bridge_heads: Annotated[Optional[int], typer.Option(help="Bridge: attention heads [default: 6].", show_default=False)] = None,
    token_pool: Annotated[Optional[int], typer.Option(help="Bridge: average-pool the patch grid by this factor first; 2 reads about 4x fewer tokens [default: 1].", show_default=False)] = None,
    bridge_base: Annotated[Optional[str], typer.Option(help="Bridge: the pooled path its queries correct: cls or mean token, or cls+mean (class token plus the patches' mean); none for the queries alone [default: cls].", show_default=False)] = None,
    token_drop: Annotated[Optional[float], typer.Option(help="Bridge: share of patch tokens hidden per picture in training [default: 0].", show_default=False)] = None,
    query_drop: Annotated[Optional[float], typer.Option(help="Bridge: share of queries left out of the average in training [default: 0].", show_default=False)] = None,
    views: Annotated[Optional[int], typer.Option(help="Heads/bridge: augmented views (random crops, flips) of each picture cached once; each epoch reads one [default: 0].", show_default=False)] = None,
    hard_negatives: Annotated[Optional[int], typer.Option(help="Batches of groups of this many near neighbours mined from cached features; 0 is random batches [default: 0].", show_default=False)] = None,
    mine_by: Annotated[Optional[str], typer.Option(help="Hard negatives are neighbours by item, text or both cached features [default: both].", show_default=False)] = None,
    hn_beta: Annotated[Optional[float], typer.Option(help="HN-NCE: weight negatives by softmax(beta x logit); 0 is plain InfoNCE [default: 0].", show_default=False)] = None,
    same_caption: Annotated[Optional[str], typer.Option(help="Pictures whose captions have the same text: positive (never each other's negatives) or negative (as CLIP) [default: positive].", show_default=False)] = None,
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
    folds: Annotated[Optional[int], typer.Option(help="k-fold cross-validation: re-split all items into k folds.", show_default=False)] = None,
    fold: Annotated[Optional[int], typer.Option(help="With --folds: the fold used as test split.", show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option(help="Run name [default: date-method-dataset].", show_default=False)] = None,
    config: Annotated[Optional[Path], typer.Option(help="Start from this config.json (a run's, or one probe-memory saved); options given here override it.", show_default=False)] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue this stopped run (name or folder) from its last checkpoint.", show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the parameter table and the resolved config, and stop.")] = False,
    nproc: Annotated[int, typer.Option(help="Train on this many processes on this machine (torchrun's launcher, started here): one per GPU, or CPU processes with gloo. Under torchrun or srun leave it at 1.")] = 1,
    data_dir: DataDir = None,
    runs_dir: RunsDir = None,
) -> None:
    """Train a retrieval model: a run folder with checkpoints, metrics and plots.

    On several GPUs or machines start it with `torchrun --nproc_per_node N -m mmret train ...`
    (or under srun): --batch-size stays the pairs in one contrastive loss, split across processes.
    """
    options = {k: v for k, v in locals().items() if k not in ("config", "resume", "dry_run", "recipe", "nproc")}
    from mmret.cli import ui
    from mmret.runs import RunConfig, resolve_run, with_overrides

    if resume:
        given = sorted(k for k, v in options.items() if v is not None and k not in ("runs_dir", "data_dir"))
        if given or config or recipe or dry_run:
            flags = ", ".join(flag(k) for k in given + [k for k, v in
                              (("config", config), ("recipe", recipe), ("dry_run", dry_run)) if v])
            raise MmretError(f"--resume continues run {resume} with the settings it started with; leave out {flags} "
                             f"(to change them, train a new run from its config: --config <run>/config.json)")
        from mmret import training

        if nproc > 1:
            training.train_on_processes(nproc, resume_dir=resolve_run(resume, runs_dir))
            return
        show.show_train(training.resume(resolve_run(resume, runs_dir), ui.RichReporter()))
        return
    base = RunConfig.from_dict(read_config(config)) if config else RunConfig()
    if recipe:
        from mmret.methods.catalog import recipe_values

        options.update(recipe_values(recipe, {k: options.get(k) for k in ("method", "tower", "rank", "alpha", "targets", "lora_dropout")}))
    cfg = with_overrides(base, options)
    from mmret import training

    if dry_run:
        show.show_dry_run(training.dry_run(cfg))
        return
    if nproc > 1:
        training.train_on_processes(nproc, cfg)
        return
    show.show_train(training.train(cfg, ui.RichReporter()))


# ---------------------------------------------------------------------------- probe-memory

@app.command("probe-memory")
@command
def probe_memory(
    vram: Annotated[float, typer.Option(help="GPU memory to fit in, in GB (2^30 bytes): 6 for a 6 GB card.", show_default=False)],
    method: Method = None,
    model: ClipModel = None,
    item: Annotated[Optional[str], item_tower("preset, hub id or folder (sounds: ast-audioset, clap-htsat, spectrogram:IMAGE-TOWER) [default: dino-vits16]. Only its config is read.")] = None,
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
    from mmret.cli import ui
    from mmret.runs import RunConfig, with_overrides

    if not math.isfinite(vram) or vram <= 0:
        raise MmretError(f"--vram must be a positive number of GB, got {vram}")
    base = RunConfig.from_dict(read_config(config)) if config else RunConfig()
    values = dict(method=method, model=model, item=item, text=text, batch_size=batch_size, max_length=max_length,
                  embed_dim=embed_dim, rank=rank, targets=targets, tower=tower, accumulation=accumulation,
                  dataset=dataset, data_dir=data_dir)
    if recipe:
        from mmret.methods.catalog import recipe_values

        values.update(recipe_values(recipe, {k: values.get(k) for k in ("method", "tower", "rank", "targets")}))
    from mmret.memory import probe_memory as run_probe
    from mmret.memory import save_config

    report = run_probe(with_overrides(base, values), vram, reserve, "estimate" if estimate else "auto", ui.RichReporter())
    given = [f"--config {config}"] if config else []
    given += [f"--recipe {recipe}"] if recipe else []
    given += [f"{flag(k, report.config.data.modality)} {v}" for k, v in values.items()
              if v is not None and k != "data_dir" and not (recipe and k in ("method", "tower", "rank", "targets"))]
    show.show_memory(report, " ".join(given))
    if save is not None:
        ui.console.print(f"saved {save_config(report.config, save)}: train with `mmret train --config {save}`",
                         highlight=False, soft_wrap=True)


