"""`mmret verify`: check every byte of the files mmret derived against the checksums recorded when
they were written: a dataset's feature caches (each shard of each array, and the ids), a run's
final embeddings and its checkpoints (weights and optimizer state). Opening a cache checks only a
sample of a large one; this checks all of it, says which file is damaged and what to do, and says
which cache is only partly computed (incomplete is not damaged: the next run that needs it goes on
where it stopped). A damaged part is computed again by the next command that needs it, which is
what the advice says."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mmret.common.digest import file_digest
from mmret.common.io import DamagedFile, read_json
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
    incomplete: str = ""  # e.g. "3 of 8 shards computed": a cache still being filled

    @property
    def ok(self) -> bool:
        return not self.damaged

    @property
    def result(self) -> str:
        if self.damaged:
            return "DAMAGED: " + ", ".join(self.damaged)
        return f"ok, incomplete: {self.incomplete}" if self.incomplete else "ok"


def _feature_cache(path: Path) -> Checked:
    from mmret.features.cache import _digest, damaged_shards

    fix = f"run the command that uses it again to compute the damaged shards anew (or delete {path})"
    what = f"feature cache {path.name}"
    try:
        manifest = read_json(path / "manifest.json", fix)
    except (OSError, MmretError):
        return Checked(what, path, 0, ["manifest.json"], fix)
    damaged, done = [], manifest.get("done", [])
    try:
        if manifest.get("ids_digest") not in (None, _digest((path / "ids.json").read_bytes())):
            damaged.append("ids.json")
    except OSError:
        damaged.append("ids.json")
    try:
        damaged += [f"shard {i}" for i in damaged_shards(path, manifest, done)]
    except DamagedFile as e:  # an array that is no .npy any more (truncated, overwritten)
        damaged.append(Path(e.path).name if e.path else "arrays")
    except OSError as e:
        damaged.append(Path(e.filename).name if e.filename else "arrays")
    shards = len(manifest.get("shards", []))
    incomplete = f"{len(done)} of {shards} shards computed" if len(done) < shards else ""
    return Checked(what, path, len(done) + 1, damaged, fix, incomplete)


def _embeddings(path: Path) -> Checked:
    fix = f"delete {path}; `mmret eval` or `mmret search` computes it again from the run"
    try:
        recorded = read_json(path / "manifest.json").get("digests") or {}
    except (OSError, MmretError, AttributeError):
        return Checked(f"embeddings {path.name}", path, 0, ["manifest.json"], fix)
    damaged = []
    for name, digest in recorded.items():
        try:
            if file_digest(path / name) != digest:
                damaged.append(name)
        except OSError:
            damaged.append(name)
    return Checked(f"embeddings {path.name}", path, len(recorded), damaged, fix)


def _checkpoints(run_dir: Path) -> Checked:
    """Every checkpoint file (weights and optimizer state) read and compared with the digest written
    with it, as loading it for a resume or a search does."""
    from mmret.runs.checkpoint import read_tensors

    files = sorted((run_dir / "checkpoints").glob("*.safetensors"))
    damaged = []
    for file in files:
        try:
            read_tensors(file)
        except (MmretError, OSError):
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
