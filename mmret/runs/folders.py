"""Run folders: `runs/<run>/` naming, the `runs/latest` link, and finding a run by name.

A run folder holds `config.json` (enough to rebuild the model), `train.log`, `metrics.parquet`,
`checkpoints/`, `plots/`, and later `embeddings/`, `eval/` and `index/`.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

from mmret.common.io import read_json, write_json
from mmret.common.paths import runs_root
from mmret.errors import MmretError
from mmret.runs.config import RunConfig

LATEST = "latest"


def default_name(cfg: RunConfig) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{cfg.method.method}-{cfg.data.dataset}"


def run_names(runs_dir: Path) -> list[str]:
    if not runs_dir.is_dir():
        return []
    return sorted(p.name for p in runs_dir.iterdir() if p.name != LATEST and (p / "config.json").is_file())


def resolve_run(name: str | Path | None, runs_dir: str | Path | None = None) -> Path:
    """A run folder from a name under the runs root, a path, or `latest` / None for the newest run."""
    root = runs_root(runs_dir)
    name = str(name or LATEST)
    candidates = [Path(name).expanduser(), root / name]
    for path in candidates:  # a run folder holds checkpoints/ beside config.json (a model folder has only the latter)
        if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
            return path.resolve()
    known = run_names(root)
    if name == LATEST:
        raise MmretError(f"no runs in {root} yet; train one with `mmret train`")
    hint = f" (runs: {', '.join(known[-5:])})" if known else ""
    raise MmretError(f"no run {name!r} in {root}{hint}; pass a run name or folder")


def newest_run(runs_dir: str | Path | None = None) -> Path | None:
    """The run `runs/latest` links to, or None when there is none yet."""
    try:
        return resolve_run(LATEST, runs_dir)
    except MmretError:
        return None


def create_run_dir(cfg: RunConfig, latest: bool = True) -> Path:
    """A new, empty run folder holding the run's config; refuses to overwrite an existing run."""
    cfg.name = cfg.name or default_name(cfg)
    path = cfg.runs_dir / cfg.name
    if path.exists() and any(path.iterdir()):
        raise MmretError(f"run {cfg.name!r} already exists in {cfg.runs_dir}; pick another --name or --resume it")
    for sub in ("checkpoints", "plots"):
        (path / sub).mkdir(parents=True, exist_ok=True)
    write_json(path / "config.json", cfg.to_dict())
    if latest:
        point_latest(cfg.runs_dir, path)
    return path


def point_latest(runs_dir: Path, run_dir: Path) -> None:
    """Make `runs/latest` a symlink to `run_dir`, replaced atomically."""
    link = runs_dir / LATEST
    tmp = runs_dir / f".{LATEST}.{os.getpid()}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(run_dir.name, tmp)
    os.replace(tmp, link)


def load_run_config(run_dir: Path) -> RunConfig:
    data = read_json(run_dir / "config.json", "restore the run's config.json, or train the run again")
    if not isinstance(data, dict):
        raise MmretError(f"{run_dir / 'config.json'} is damaged (not a JSON object); restore it or train the run again")
    cfg = RunConfig.from_dict(data)
    cfg.runs_dir = run_dir.parent
    cfg.name = run_dir.name
    return cfg


def checkpoint_path(run_dir: Path, which: str = "best") -> Path:
    path = run_dir / "checkpoints" / f"{which}.safetensors"
    if not path.is_file():
        raise MmretError(f"run {run_dir.name} has no {which} checkpoint yet; train it (or --resume it) first")
    return path
