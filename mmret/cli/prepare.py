"""`mmret prepare` and `mmret precompute-embeddings`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from mmret.cli import show
from mmret.cli.app import DataDir, Device, RunsDir, app, command, item_tower, run_or_zero_shot
from mmret.errors import MmretError

# ---------------------------------------------------------------------------- prepare

def _source_help() -> str:
    from mmret.data.readers import reader_help

    return "Dataset format: " + "; ".join(f"{k} ({v})" for k, v in reader_help().items())


@app.command()
@command
def prepare(
    source: Annotated[str, typer.Argument(help=_source_help(), show_default=False)],
    root: Annotated[Optional[Path], typer.Option(
        help="Folder that holds the raw dataset (not needed for `example`); for wds a shard pattern such as "
             "'shards/{00000..00099}.tar', or a CLIP_benchmark webdataset folder (test/nshards.txt, "
             "test/0.tar, ...).",
    )] = None,
    name: Annotated[Optional[str], typer.Option(
        help="Name of the prepared dataset under the data folder (default: SOURCE).",
    )] = None,
    val: Annotated[float, typer.Option(
        help="Fraction of items for validation when the source has no official split.",
    )] = 0.1,
    test: Annotated[float, typer.Option(
        help="Fraction of items for testing when the source has no official split (1.0: all of them, a set for "
             "evaluation only).",
    )] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the random split (and of the generated example).")] = 0,
    check_items: Annotated[bool, typer.Option(
        "--check-images", "--check-audio",
        help="Decode every picture or sound fully and drop broken ones, and silent sounds (slower).",
    )] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace the dataset if it was prepared before.")] = False,
    count: Annotated[int, typer.Option(help="Number of pictures in the generated `example` dataset.")] = 500,
    allow_outside_root: Annotated[bool, typer.Option(
        "--allow-outside-root",
        help="Include files outside --root, named by a captions table or reached through a symbolic link (they are "
             "left out otherwise); recorded, so later reads allow them too.",
    )] = False,
    no_captions: Annotated[bool, typer.Option(
        "--no-captions",
        help="A gallery to search, not to train on: every picture, with or without captions (all in test). Prepare "
             "it again with --force to add new pictures; only they are embedded next time.",
    )] = False,
    data_dir: DataDir = None,
) -> None:
    """Read a raw dataset and write its item (picture or sound) and caption tables with train/val/test splits."""
    from mmret.cli import ui
    from mmret.data.config import PrepareConfig

    cfg = PrepareConfig(source=source, root=root, name=name, val=val, test=test, seed=seed,
                        check_items=check_items, force=force, count=count, data_dir=data_dir,
                        allow_outside_root=allow_outside_root, captions=not no_captions)
    from mmret.data.create import prepare as run_prepare

    result = run_prepare(cfg, ui.RichReporter())
    show.show_prepare(result)


# ---------------------------------------------------------------------------- precompute-embeddings

def _encoder_help(modality: str) -> str:
    from mmret.encoders import ENCODERS

    fits = (lambda p: set(p.modalities) - {"text"}) if modality == "item" else (lambda p: modality in p.modalities)
    presets = "; ".join(f"{name} ({preset.help.rstrip('.')})" for name, preset in ENCODERS.items() if fits(preset))
    if modality == "item":
        return (f"a preset, a hub id (owner/name), a local model folder, or spectrogram:IMAGE-TOWER (a picture tower "
                f"over log-mel pictures of sounds). Presets: {presets}.")
    return f"Frozen {modality} tower: a preset, a hub id (owner/name) or a local model folder. Presets: {presets}."


@app.command("precompute-embeddings")
@command
def precompute_embeddings(
    dataset: Annotated[Optional[str], typer.Option(
        help="Prepared dataset to encode (with --run: default the run's).",
        show_default=False,
    )] = None,
    run: Annotated[Optional[str], typer.Option(
        help="Write this trained run's final embeddings (name, folder or latest) to "
             "runs/<run>/embeddings/<ds>-<split>/.",
        show_default=False,
    )] = None,
    zero_shot: Annotated[Optional[str], typer.Option(
        help="Write the final embeddings of a pretrained CLIP as it is (e.g. clip-b32).",
        show_default=False,
    )] = None,
    item: Annotated[Optional[str], item_tower(_encoder_help("item"))] = None,
    text: Annotated[Optional[str], typer.Option(help=_encoder_help("text"), show_default=False)] = None,
    split: Annotated[str, typer.Option(
        help="Rows to compute now: all, train, val or test (one cache spans every split).",
    )] = "all",
    tokens: Annotated[bool, typer.Option(
        "--tokens",
        help="Also keep the token states (N, T, D), for methods that read them.",
    )] = False,
    batch_size: Annotated[str, typer.Option(help="Rows per forward pass, or auto.")] = "auto",
    precision: Annotated[str, typer.Option(
        help="auto (bf16, or int8 on big jobs, when it matches fp32 and is faster; AMP on CUDA), fp32, bf16, fp16 "
             "(CUDA only) or int8 (CPU, item tower).",
    )] = "auto",
    device: Device = "auto",
    image_size: Annotated[Optional[int], typer.Option(
        help="A picture tower's square input size in pixels (default: the model's own).",
        show_default=False,
    )] = None,
    max_length: Annotated[int, typer.Option(help="Text tokens per caption.")] = 64,
    workers: Annotated[Optional[int], typer.Option(
        help="Item decoding workers (default: CPU count - 1, at most 4).",
        show_default=False,
    )] = None,
    compile: Annotated[Optional[bool], typer.Option(
        "--compile/--no-compile",
        help="Compile the item tower with torch.compile first: a minute or so once, then faster [default: on a CPU "
             "when the work left would take over 5 minutes].",
        show_default=False,
    )] = None,
    shard: Annotated[Optional[str], typer.Option(
        help="i/N: this process encodes the i-th of N disjoint slices into the same cache (N machines or GPUs fill "
             "one cache; the last to finish seals it). Under torchrun each process takes its rank.",
        show_default=False,
    )] = None,
    finalize: Annotated[bool, typer.Option(
        "--finalize",
        help="Seal a cache whose slices were all encoded by --shard processes.",
    )] = False,
    views: Annotated[int, typer.Option(
        help="Also cache this many augmented views (random crops and flips) of each picture, for training with "
             "--views.",
    )] = 0,
    data_dir: DataDir = None,
    runs_dir: RunsDir = None,
) -> None:
    """Encode a dataset's items and captions once with frozen towers into data/<ds>/features/,
    or with --run, write a trained run's final embeddings for eval and search.

    A cache that is already complete is reused; an interrupted run resumes where it stopped.
    """
    from mmret.cli import ui
    from mmret.features.config import PrecomputeConfig

    if run or zero_shot:
        from mmret.inference.embeddings import write_run_embeddings

        run_dir = run_or_zero_shot(run=run, zero_shot=zero_shot, dataset=dataset, data_dir=data_dir, runs_dir=runs_dir)
        emb = write_run_embeddings(run_dir, dataset, split, device=device, reporter=ui.RichReporter(),
                                   shard=shard, finalize=finalize)
        if emb is None:
            ui.console.print(f"shard {shard or 'of this process'} written; the last shard to finish seals "
                             f"{run_dir.name}'s embeddings (or run --finalize)", highlight=False)
            return
        from mmret.modalities import get_modality

        items = get_modality(emb.modality).plural
        ui.console.print(f"{emb.dataset}-{emb.split}: {emb.items.shape[0]:,} {items} and {emb.captions.shape[0]:,} "
                         f"captions, {emb.items.shape[1]}-d float16, in {emb.path}", highlight=False)
        return
    if dataset is None:
        raise MmretError("precompute-embeddings needs --dataset (or --run RUN for a trained run's embeddings)")
    cfg = PrecomputeConfig(dataset=dataset, item=item, text=text, split=split, tokens=tokens,
                           batch_size=batch_size, precision=precision, device=device, image_size=image_size,
                           max_length=max_length, workers=workers, compile=compile, shard=shard, finalize=finalize,
                           views=views, data_dir=data_dir)
    from mmret.features.precompute import precompute_embeddings as run_precompute

    show.show_precompute(run_precompute(cfg, ui.RichReporter()))


