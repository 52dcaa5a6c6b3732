"""`mmret verify`: check every byte of the files mmret derived against the checksums recorded when
they were written: a dataset's feature caches (each shard of each array, and the ids), a run's
final embeddings and its checkpoints. Opening a cache checks only a sample of a large one; this
checks all of it, and says which file is damaged and what to do."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmret.common.digest import file_digest
from mmret.common.io import read_json
from mmret.common.progress import NULL, Reporter
from mmret.data.prepared import load_dataset
from mmret.errors import MmretError


@dataclass
class Checked:
    what: str  # e.g. "feature cache dinov2-small-images-…"
    path: Path
    parts: int  # shards, files or tensors checked
    damaged: list[str]  # what did not match
    fix: str = ""

    @property
    def ok(self) -> bool:
        return not self.damaged


def _feature_cache(path: Path) -> Checked:
    from mmret.features.cache import _digest, damaged_shards

    fix = f"run the command that uses it again to compute the damaged shards anew (or delete {path})"
    try:
        manifest = read_json(path / "manifest.json", fix)
    except OSError:
        return Checked("feature cache (no manifest)", path, 0, ["manifest.json"], fix)
    damaged = []
    if manifest.get("ids_digest") not in (None, _digest((path / "ids.json").read_bytes())):
        damaged.append("ids.json")
    done = manifest.get("done", [])
    damaged += [f"shard {i}" for i in damaged_shards(path, manifest, done)]
    return Checked(f"feature cache {path.name}", path, len(done) + 1, damaged, fix)


def _embeddings(path: Path) -> Checked:
    manifest = read_json(path / "manifest.json")
    recorded = manifest.get("digests") or {}
    damaged = [name for name, digest in recorded.items() if file_digest(path / name) != digest]
    return Checked(f"embeddings {path.name}", path, len(recorded), damaged,
                   f"delete {path}; `mmret eval` or `mmret search` computes it again from the run")


def _checkpoints(run_dir: Path) -> Checked:
    from mmret.runs.checkpoint import read_meta

    files = sorted((run_dir / "checkpoints").glob("*.safetensors"))
    damaged = []
    for file in files:
        try:
            from safetensors.torch import load_file

            read_meta(file)
            load_file(str(file))
        except (MmretError, OSError, Exception):  # noqa: BLE001 - any failure to read is damage here
            damaged.append(file.name)
    return Checked("checkpoints", run_dir / "checkpoints", len(files), damaged,
                   "resume from the other checkpoint or train the run again")


def verify(datasets: list[str], runs: list[Path], data_dir: Path | None = None,
           reporter: Reporter = NULL) -> list[Checked]:
    """Check the caches of `datasets` and the embeddings and checkpoints of `runs`."""
    targets: list[tuple[str, Path]] = []
    for name in datasets:
        ds = load_dataset(name, data_dir)  # its tables, and where they point, are checked as it loads
        targets += [("features", p) for p in sorted((ds.path / "features").glob("*")) if p.is_dir()]
    for run in runs:
        targets.append(("checkpoints", run))
        targets += [("embeddings", p) for p in sorted((run / "embeddings").glob("*"))
                    if (p / "manifest.json").is_file()]
    checks = {"features": _feature_cache, "embeddings": _embeddings, "checkpoints": _checkpoints}
    out = []
    with reporter.task("verifying", total=len(targets), unit="folders") as task:
        for kind, path in targets:
            out.append(checks[kind](path))
            task.advance()
    return out
