"""Where a tower's weights come from: a local folder, a timm model by name, or a hub id resolved
through the local Hugging Face cache (the network only when the cache lacks it, with short
timeouts, so an offline machine fails at once with one clear line). A hub id and the folder it
was downloaded to resolve to the same `ModelSource`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from mmret.common.digest import files_digest
from mmret.errors import MmretError

_logger = logging.getLogger(__name__)

HUB_CONNECT_TIMEOUT = 5.0  # seconds to reach the hub before giving up: never hang on a download
HUB_READ_TIMEOUT = 30.0
CONFIG_FILES = ["*.json", "*.txt", "*.model", "1_Pooling/*"]  # configs, tokenizers, pooling
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
_HASHED_SUFFIXES = (".json", ".txt", ".model") + _WEIGHT_SUFFIXES
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")
ARCHITECTURE_ONLY = "architecture only"  # the revision of a tower built from a config, without weights


@dataclass(frozen=True)
class ModelSource:
    """A resolved model: a local folder (or a timm name plus a weights file) and its identity."""

    id: str  # hub repo id, folder name, or timm model name
    library: str  # transformers | timm
    revision: str  # hub commit, or "sha256:..." of the local files
    folder: Path | None = None
    weights: Path | None = None  # timm by name: the weights file
    config: dict = field(default_factory=dict, compare=False)  # config.json, or the published config
    input_size: int | None = None  # a picture tower built from its architecture alone: the side it crops to


def _model_files(folder: Path) -> list[Path]:
    """Files that decide the numbers: configs, tokenizer files, and the weights transformers or
    timm would load (safetensors when present, so unused .bin copies are not hashed)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in _HASHED_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if any(p.suffix == ".safetensors" for p in files):
        files = [p for p in files if p.suffix not in (".bin", ".pth", ".pt")]
    return files


def _has_weights(folder: Path) -> bool:
    return any(p.suffix in _WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file())


def read_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise MmretError(f"folder {folder} holds no config.json: it is not a transformers or timm model folder")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise MmretError(f"cannot read {path}: {e}") from None


def source_from_folder(folder: Path, hub_id: str | None = None, commit: str | None = None,
                       need_weights: bool = True) -> ModelSource:
    """Recognise a model folder: transformers by `model_type`, timm by `architecture`. Without
    `need_weights` a folder of configs alone will do (a tower built without weights)."""
    folder = folder.expanduser().absolute()
    config = read_config(folder)
    if "model_type" in config:
        library = "transformers"
    elif "architecture" in config:
        library = "timm"
    else:
        raise MmretError(f"{folder / 'config.json'} names neither a transformers model_type nor a timm "
                         "architecture; pass a transformers or timm model folder")
    if need_weights and not _has_weights(folder):
        raise MmretError(f"folder {folder} holds no weights file (model.safetensors or pytorch_model.bin)")
    revision = commit or files_digest(_model_files(folder), folder)
    return ModelSource(hub_id or folder.name, library, revision, folder, config=config)


@contextlib.contextmanager
def _hub_timeouts() -> Iterator[None]:
    """Short connect/read timeouts on huggingface_hub's shared client (its default is none)."""
    import huggingface_hub

    session = huggingface_hub.get_session()
    old = getattr(session, "timeout", None)
    if old is None:  # not an httpx client (an older or a customised huggingface_hub): leave it be
        yield
        return
    session.timeout = type(old)(HUB_READ_TIMEOUT, connect=HUB_CONNECT_TIMEOUT)
    try:
        yield
    finally:
        session.timeout = old


class NotDownloaded(MmretError):
    """A hub model this machine has not downloaded and cannot download now. `repo_id` lets a
    command name the option that asked for it (`with_option`)."""

    def __init__(self, repo_id: str, why: str, option: tuple[str, str] | None = None):
        self.repo_id, self.why = repo_id, why
        asked = f" ({option[0]} {option[1]})" if option and option[1] != repo_id else ""
        way_out = f"give {option[0]} the path of a local model folder" if option else \
            "pass the path of a local model folder instead"
        super().__init__(f"model {repo_id!r}{asked} is not in the local Hugging Face cache and {why}; download it on "
                         f"a connected machine, or {way_out}")

    def with_option(self, flag: str, value: str) -> "NotDownloaded":
        """The same failure, naming the command-line option that asked for the model (`--vision dino-vits16`)."""
        return NotDownloaded(self.repo_id, self.why, (flag, value))


def _offline_error(repo_id: str, why: str) -> NotDownloaded:
    return NotDownloaded(repo_id, why)


def _snapshot(repo_id: str, revision: str | None, local_only: bool, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                  local_files_only=local_only, etag_timeout=HUB_CONNECT_TIMEOUT))


def _download(repo_id: str, revision: str | None, need_weights: bool = True, local_only: bool = False) -> Path:
    from huggingface_hub import constants
    from huggingface_hub import errors as hub_errors

    with contextlib.suppress(hub_errors.LocalEntryNotFoundError, OSError):
        folder = _snapshot(repo_id, revision, True, CONFIG_FILES + ["*.safetensors", "*.bin"])
        if _has_weights(folder) or not need_weights:
            return folder
    if local_only:
        raise _offline_error(repo_id, "only the local cache was searched")
    if constants.is_offline_mode():
        raise _offline_error(repo_id, "HF_HUB_OFFLINE is set")
    _logger.info("downloading %s from the Hugging Face Hub", repo_id)
    try:
        with _hub_timeouts():
            if not need_weights:
                return _snapshot(repo_id, revision, False, CONFIG_FILES)
            folder = _snapshot(repo_id, revision, False, CONFIG_FILES + ["*.safetensors"])
            if not _has_weights(folder):  # an older repo without safetensors
                folder = _snapshot(repo_id, revision, False, CONFIG_FILES + ["*.bin"])
    except (hub_errors.RepositoryNotFoundError, hub_errors.GatedRepoError) as e:
        raise MmretError(f"no model {repo_id!r} on the Hugging Face Hub that this machine may read "
                         f"({type(e).__name__}); check the name, or log in with `hf auth login`") from None
    except hub_errors.RevisionNotFoundError:
        raise MmretError(f"model {repo_id!r} has no revision {revision!r}") from None
    except (hub_errors.LocalEntryNotFoundError, OSError) as e:
        _logger.debug("hub download failed: %s", e)
        raise _offline_error(repo_id, "the Hub cannot be reached (offline?)") from None
    return folder


def cached_folder(hub_id: str) -> Path | None:
    """The hub cache's snapshot folder of `hub_id` (`owner/name[@revision]`) when this machine has
    it, without asking the Hub; else None."""
    from huggingface_hub import errors as hub_errors

    repo_id, _, revision = hub_id.partition("@")
    try:
        return _snapshot(repo_id, revision or None, True, CONFIG_FILES + ["*.safetensors", "*.bin"])
    except (hub_errors.LocalEntryNotFoundError, OSError, ValueError):
        return None


def resolve_source(name_or_path: str, weights: str | Path | None = None, need_weights: bool = True,
                   local_only: bool = False) -> ModelSource | None:
    """A local folder, `timm:NAME`, or a hub id (`owner/name[@revision]`) resolved to local files;
    None when the string is none of these. Without `need_weights` only configs are fetched (for a
    tower built without weights); a timm model by name then needs nothing at all."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return source_from_folder(path, need_weights=need_weights)
    if name_or_path.startswith("timm:"):
        return _timm_source(name_or_path[len("timm:"):], weights, need_weights)
    looks_like_path = name_or_path.startswith((".", "/", "~")) or path.exists()
    if looks_like_path:
        raise MmretError(f"{name_or_path} is not a model folder (a folder with config.json and weights)")
    if HUB_ID.match(name_or_path):
        repo_id, _, revision = name_or_path.partition("@")
        folder = _download(repo_id, revision or None, need_weights, local_only)
        return source_from_folder(folder, hub_id=repo_id, commit=_snapshot_commit(folder), need_weights=need_weights)
    return None


def _snapshot_commit(folder: Path) -> str | None:
    """The commit of a hub cache snapshot (its folder name), or None for any other folder."""
    return folder.name if folder.parent.name == "snapshots" else None


def _timm_source(name: str, weights: str | Path | None, need_weights: bool = True) -> ModelSource:
    import timm

    arch = name.split(".")[0]
    if not timm.is_model(arch):
        raise MmretError(f"unknown timm model {name!r}; see timm.list_models()")
    if not need_weights:
        return ModelSource(name, "timm", ARCHITECTURE_ONLY)
    if weights is not None:
        weights = Path(weights).expanduser().absolute()
        if not weights.is_file():
            raise MmretError(f"weights file {weights} does not exist")
        return ModelSource(name, "timm", files_digest([weights]), weights=weights)
    hub_id = getattr(timm.models.get_pretrained_cfg(name) or object(), "hf_hub_id", None)
    if not hub_id:
        raise MmretError(f"timm model {name!r} has no weights on the Hugging Face Hub; pass weights=FILE")
    folder = _download(hub_id, None, need_weights)
    return source_from_folder(folder, hub_id=hub_id, commit=_snapshot_commit(folder), need_weights=need_weights)
