"""A tower named by what it was last time: when every cache a command needs is complete, nothing has to
be encoded, and building the tower (importing transformers, reading its configs, hashing its weights)
costs seconds that open nothing. So the spec a tower had (what names its caches) is remembered beside
the caches, keyed by the tower's name and options, the versions that build it and the stamps (path,
size, modification time) of its model files; a matching entry gives a `NamedTower` that opens caches
and loads the real tower only when something has to be encoded.

Towers by local folder, by a hub id this machine has downloaded (its snapshot folder in the hub's
cache, found without asking the Hub: a newer download is another snapshot, so other stamps), and
presets whose source is either, are remembered; `timm:` names are built each time (their hub id is
known only to timm, whose import is what they cost).
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

from mmret.common.io import write_json
from mmret.common.version import __version__

_logger = logging.getLogger(__name__)

MEMO = "towers.json"


class NamedTower:
    """Stands in for a tower whose caches may all be complete: its name, spec and source id (all a
    cache key needs); `with_weights()` loads the real tower the first time something needs encoding."""

    is_meta = True

    def __init__(self, name: str, spec: dict, source_id: str, load: Callable[[], Any]):
        self.name, self.spec, self.source = name, spec, SimpleNamespace(id=source_id)
        self._load, self._loaded = load, None

    def with_weights(self) -> Any:
        if self._loaded is None:
            self._loaded = self._load()
        return self._loaded


def _folder(name: str) -> Path | None:
    from mmret.encoders.hub import HUB_ID, cached_folder
    from mmret.encoders.presets import ENCODERS

    preset = ENCODERS.get(name)
    source = preset.source if preset is not None else name
    folder = Path(source).expanduser()
    if folder.is_dir():
        return folder.absolute()
    return cached_folder(source) if HUB_ID.match(source) else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def memo_key(name: str, modality: str, options: dict) -> str | None:
    """What a remembered spec is valid for, or None when the tower is not remembered (see above)."""
    from mmret.encoders.hub import _model_files

    folder = _folder(name)
    if folder is None:
        return None
    stamps = [(str(p), s.st_size, s.st_mtime_ns) for p in _model_files(folder) for s in [p.stat()]]
    payload = {"name": name, "modality": modality, "options": options, "files": stamps, "mmret": __version__,
               **{package: _version(package) for package in ("torch", "transformers", "timm")}}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _load(name: str, modality: str, **options: Any) -> Any:
    from mmret.encoders import load_tower  # torch and the model's library: only when a tower is built

    return load_tower(name, modality, **options)


def _read(path: Path) -> dict:
    try:
        memo = json.loads(path.read_text(encoding="utf-8"))
        return memo if isinstance(memo, dict) else {}
    except (OSError, ValueError):  # none yet, or damaged: it is only a shortcut, rebuilt on the next load
        return {}


def named_tower(folder: Path, name: str, modality: str, **options: Any) -> Any:
    """The tower `name` as a `NamedTower` when `folder` (a dataset's feature caches) remembers its spec,
    else built without weights (`mmret.encoders.load_tower(meta=True)`), its spec remembered."""
    given = {k: v for k, v in options.items() if v is not None}
    key = memo_key(name, modality, given)
    memo = _read(folder / MEMO) if key else {}
    entry = memo.get(key) if key else None
    if isinstance(entry, dict) and isinstance(entry.get("spec"), dict) and isinstance(entry.get("source"), str):
        return NamedTower(name, entry["spec"], entry["source"], functools.partial(_load, name, modality, **given))
    tower = _load(name, modality, meta=True, **given)
    if key:
        memo[key] = {"name": name, "spec": tower.spec, "source": tower.source.id}
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_json(folder / MEMO, memo)
        except OSError as e:  # a read-only dataset still encodes; it only pays the build next time too
            _logger.debug("cannot remember the spec of %s in %s: %s", name, folder, e)
    return tower
