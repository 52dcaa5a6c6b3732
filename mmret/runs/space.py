"""A space: one frozen text side (a run's text tower and text head) and the runs bound to it.

`mmret train --bind-to RUN` trains a run of another modality into RUN's space: RUN's text side is
taken frozen, so a caption has the same embedding in both runs and the two runs' items (pictures
of one, sounds of the other) can be compared with each other, not only with text. Text is the
anchor because every run already trains against it (ImageBind's idea, with text in the place of
pictures). The anchor of a space is the run whose text side it is: a run not bound to another is
the anchor of its own space, and a run bound to a run bound to X is in X's space (the text side
is X's all along the chain).

Runs name each other by folder name inside one runs folder; config.json records `bind_to` (the
run this one was bound to) and `anchor` (the root of the chain).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mmret.errors import MmretError
from mmret.runs.config import RunConfig
from mmret.runs.folders import checkpoint_path, load_run_config, resolve_run, run_names


def bind_settings(cfg: RunConfig) -> list[str]:
    """Fill `cfg` for a run bound to `cfg.train.bind_to`: that run's text tower, caption length and
    embedding size (the text side the new run takes frozen), and the names of the run bound to and
    of the space's anchor. Returns a line for each setting taken that differed."""
    target = resolve_run(cfg.train.bind_to, cfg.runs_dir)
    if target.parent.resolve() != Path(cfg.runs_dir).resolve():
        raise MmretError(f"--bind-to {cfg.train.bind_to}: bind to a run of the runs folder this run is written to "
                         f"({cfg.runs_dir}); runs of a space name each other by folder name")
    checkpoint_path(target, "best")  # a run that has not trained yet has no text side to take
    other = load_run_config(target)
    taken = {("encoders", "text"): other.encoders.text, ("encoders", "max_length"): other.encoders.max_length,
             ("method", "embed_dim"): other.method.embed_dim}
    lines = []
    for (section, name), value in taken.items():
        part = getattr(cfg, section)
        if getattr(part, name) != value:
            lines.append(f"--{name.replace('_', '-')} {value} (from run {target.name}, whose text side this run takes)")
            setattr(cfg, section, dataclasses.replace(part, **{name: value}))
    cfg.train.bind_to = target.name
    cfg.train.anchor = other.train.anchor or target.name
    return lines


def anchor_of(run_dir: Path) -> str:
    """The name of the run whose text side `run_dir`'s space is (the run itself when not bound)."""
    return load_run_config(run_dir).train.anchor or run_dir.name


def space_runs(run_dir: Path) -> list[Path]:
    """The runs of `run_dir`'s space, the anchor first, then the runs bound into it by name."""
    run_dir = Path(run_dir)
    anchor, root = anchor_of(run_dir), run_dir.parent
    bound = [root / name for name in run_names(root)
             if name != anchor and load_run_config(root / name).train.anchor == anchor]
    return ([root / anchor] if (root / anchor / "config.json").is_file() else []) + bound


def space_member(run_dir: Path, modality: str, noun: str) -> Path:
    """The run of `run_dir`'s space whose items are of `modality`: `run_dir` itself when they are,
    else the one bound run of that modality (the newest trained, when there are several)."""
    run_dir = Path(run_dir)
    if load_run_config(run_dir).data.modality == modality:
        return run_dir
    members = [r for r in space_runs(run_dir) if load_run_config(r).data.modality == modality]
    if not members:
        raise MmretError(f"no run over {noun} shares a space with run {run_dir.name} (anchor "
                         f"{anchor_of(run_dir)}); train one into it: mmret train --dataset <{noun}> "
                         f"--bind-to {run_dir.name}")
    return max(members, key=lambda r: (r / "checkpoints" / "best.safetensors").stat().st_mtime
               if (r / "checkpoints" / "best.safetensors").is_file() else 0.0)
