"""`mmret train` and `mmret probe-memory`. Their settings' options are generated from the run's
config dataclasses (`mmret.cli.options`); the options here are the commands' own."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Annotated, Any, Iterator, Optional

import typer

from mmret.cli import show
from mmret.cli.app import app, command, flag
from mmret.cli.options import PanelledCommand, with_settings
from mmret.errors import MmretError


def _recipe_help() -> str:
    from mmret.methods import recipe_help

    return "A named LoRA recipe (options given beside it win): " + recipe_help() + "."


Recipe = Annotated[Optional[str], typer.Option(help=_recipe_help(), show_default=False)]
ConfigFile = Annotated[Optional[Path], typer.Option(
    "--config", help="Start from the settings in this file: a run's config.json, one probe-memory saved, or a "
                     "YAML (.yaml/.yml) or TOML (.toml) file, flat (rank: 8) or in sections as config.json; "
                     "options given here win.", show_default=False)]

# probe-memory takes what decides memory: the towers, the method, the batch, the dataset (its size bounds
# the input-norm sample); micro-batch, precision and gradient checkpointing are what it searches
PROBED = {("data", "dataset"), ("data", "data_dir"), ("train", "batch_size"), ("train", "accumulation")}


def _given(settings: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in settings.items() if v is not None}


# ---------------------------------------------------------------------------- train

@app.command(cls=PanelledCommand)
@with_settings(lambda rs: True)
@command
def train(
    *,
    settings: dict[str, Any],
    recipe: Recipe = None,
    config: ConfigFile = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue this stopped run (name or folder) from its last "
                                                       "checkpoint; with --epochs N (or --max-steps N), train a "
                                                       "stopped or finished run on to that length.",
                                                  show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the parameter table and the resolved config, "
                                                            "and stop.")] = False,
    nproc: Annotated[int, typer.Option(help="Train on this many processes on this machine (torchrun's launcher, "
                                            "started here): one per GPU, or CPU processes with gloo. Under torchrun "
                                            "or srun leave it at 1.")] = 1,
) -> None:
    """Train a retrieval model: a run folder with checkpoints, metrics and plots.

    On several GPUs or machines start it with `torchrun --nproc_per_node N -m mmret train ...`
    (or under srun): --batch-size stays the pairs in one contrastive loss, split across processes.
    """
    from mmret import training
    from mmret.cli import ui
    from mmret.runs import resolve_run
    from mmret.runs.defaults import settle

    if resume:
        _check_resume(resume, settings, recipe=recipe, config=config, dry_run=dry_run)
        run_dir = resolve_run(resume, settings["runs_dir"])
        longer = {k: settings[k] for k in EXTEND if settings.get(k) is not None}
        if nproc > 1:
            training.train_on_processes(nproc, resume_dir=run_dir, **longer)
            return
        show.show_train(training.resume(run_dir, ui.RichReporter(), **longer))
        return
    settled = settle(given=settings, file=config, recipe=recipe)
    cfg = settled.cfg
    if main_process():
        for line in settled.lines:
            ui.say(line)
    if dry_run:
        with towers_named(cfg):
            show.show_dry_run(training.dry_run(cfg))
        return
    if nproc > 1:
        training.train_on_processes(nproc, cfg)
        return
    with towers_named(cfg):
        show.show_train(training.train(cfg, ui.RichReporter()))


EXTEND = ("epochs", "max_steps")  # what --resume may change: how long the run trains


def _check_resume(resume: str, settings: dict[str, Any], *, recipe: str | None, config: Path | None,
                  dry_run: bool) -> None:
    """A resumed run keeps the settings it started with, except how long it trains (`EXTEND`): any
    other setting given is refused."""
    given = sorted(k for k in _given(settings) if k not in ("runs_dir", "data_dir") + EXTEND)
    own = [k for k, v in (("config", config), ("recipe", recipe), ("dry_run", dry_run)) if v]
    if given or own:
        raise MmretError(f"--resume continues run {resume} with the settings it started with (only --epochs and "
                         f"--max-steps may change, to train it longer); leave out "
                         f"{', '.join(flag(k) for k in given + own)} (to change them, train a new run from its "
                         "config: --config <run>/config.json)")


@contextlib.contextmanager
def towers_named(cfg: Any) -> Iterator[None]:
    """A tower the machine has not downloaded fails naming the option that asked for it, which
    also takes a local model folder (the default towers are hub ids nobody typed)."""
    from mmret.encoders.hub import NotDownloaded
    from mmret.runs.defaults import tower_option

    try:
        yield
    except NotDownloaded as e:
        option = tower_option(cfg, e.repo_id)
        if option is None:
            raise
        raise e.with_option(*option) from None


def main_process() -> bool:
    """Whether this is the process that speaks for a run (the first of several torchrun or srun started)."""
    import os

    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


# ---------------------------------------------------------------------------- probe-memory

@app.command("probe-memory", cls=PanelledCommand)
@with_settings(lambda rs: rs.section in ("encoders", "method") or (rs.section, rs.setting.name) in PROBED)
@command
def probe_memory(
    *,
    settings: dict[str, Any],
    vram: Annotated[float, typer.Option(help="GPU memory to fit in, in GB (2^30 bytes): 6 for a 6 GB card.",
                                        show_default=False)],
    recipe: Recipe = None,
    config: ConfigFile = None,
    reserve: Annotated[Optional[float], typer.Option(help="GB of the budget kept for the CUDA context and other "
                                                          "programs [default: measured on a GPU, else 0.5].",
                                                     show_default=False)] = None,
    estimate: Annotated[bool, typer.Option("--estimate", help="Estimate on fake tensors even when a CUDA GPU is "
                                                              "present (to plan for another GPU).")] = False,
    save: Annotated[Optional[Path], typer.Option(help="Write the recommended configuration here, for `mmret train "
                                                      "--config FILE`.", show_default=False)] = None,
) -> None:
    """Find the training configuration that fits a GPU memory budget and runs fastest.

    Tries every micro-batch, precision (fp32, bf16, fp16) and gradient checkpointing setting. On a
    CUDA GPU it measures real training steps; without one it estimates them on fake tensors,
    building the towers from their configs without weights (only the towers' configs are read).
    """
    from mmret.cli import ui
    from mmret.memory import probe_memory as run_probe
    from mmret.memory import save_config
    from mmret.runs.defaults import settle

    if not math.isfinite(vram) or vram <= 0:
        raise MmretError(f"--vram must be a positive number of GB, got {vram}")
    settled = settle(given=settings, file=config, recipe=recipe, target="cuda")  # the budget is a GPU's
    for line in settled.lines:
        ui.say(line)
    with towers_named(settled.cfg):
        report = run_probe(settled.cfg, vram, reserve, "estimate" if estimate else "auto", ui.RichReporter())
    given = [f"--config {config}"] if config else []
    given += [f"--recipe {recipe}"] if recipe else []
    given += [f"{flag(k, report.config.data.modality)} {v}" for k, v in _given(settings).items() if k != "data_dir"]
    chosen = settled.choice.settings if settled.choice else {}
    show.show_memory(report, " ".join(given + _unnamed_flags(report.config, settings, config, recipe, chosen)))
    if save is not None:
        ui.console.print(f"saved {save_config(report.config, save)}: train with `mmret train --config {save}`",
                         highlight=False, soft_wrap=True)


def _unnamed_flags(cfg: Any, settings: dict[str, Any], config: Path | None, recipe: str | None,
                   chosen: dict[str, Any]) -> list[str]:
    """The method (and the settings the rule chose with it) and towers a recommended command must
    name when the user did not (a default can change, and `mmret train` chooses its method for the
    machine it runs on and the captions it reads)."""
    from mmret.methods import get_method
    from mmret.runs.defaults import named_settings

    named = named_settings(given=settings, file=config, recipe=recipe)
    flags = [] if "method" in named else [f"--method {cfg.method.method}"]
    flags += [f"{flag(k, cfg.data.modality)} {v}" for k, v in chosen.items()]
    if get_method(cfg.method.method).towers and not cfg.encoders.model:
        flags += [f"{flag(k, cfg.data.modality)} {getattr(cfg.encoders, k)}" for k in ("item", "text")
                  if k not in named]
    return flags
