"""Loading a frozen tower by preset, hub id, local folder or `timm:NAME`, with its weights or
(`meta=True`) without them.

Each modality's family registers its builder (`mmret.encoders.registry`): a function from a
resolved `ModelSource` to a tower. The built-in families are named here, above their modules, and
imported on first use. The loaders resolve the name, apply a preset's options, build, and give a
tower built without weights the way to load them later (`Tower.with_weights`).

A preset built without weights uses the local Hugging Face cache when it holds the checkpoint
(so its spec, and with it the feature-cache key, is the real one), else its published
architecture; it never goes to the network.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from mmret.common.lazy import import_all
from mmret.encoders.base import Tower
from mmret.encoders.hub import ARCHITECTURE_ONLY, ModelSource, resolve_source
from mmret.encoders.presets import ENCODERS, Preset, encoder_names
from mmret.encoders.registry import FAMILIES, MODEL_TYPES, WRAPPERS
from mmret.errors import MmretError

_logger = logging.getLogger(__name__)

# the built-in families and wrappers: each module registers its own when imported
BUILTIN_FAMILIES = ("mmret.encoders.image", "mmret.encoders.text", "mmret.encoders.audio", "mmret.encoders.spectrogram")
_SAID: set[tuple[str, str]] = set()  # (tower, note) already said in this process
LOADS: dict[str, int] = {}  # towers loaded with weights in this process, per modality (tests count them)


def tower_modality(name: str) -> str | None:
    """The item modality the tower `name` takes (a preset's, a wrapper's, or what its config's
    model type says), or None when only loading it could tell. Reads no weights and never goes
    to the network; for `probe-memory` and `--dry-run` without a prepared dataset."""
    import_all(BUILTIN_FAMILIES)
    for prefix, wrapper in WRAPPERS.items():
        if name.startswith(prefix):
            return wrapper.modality
    preset = ENCODERS.get(name)
    if preset is not None:
        return next((m for m in preset.modalities if m != "text"), None)
    try:
        source = resolve_source(name, need_weights=False, local_only=True)
    except MmretError:
        return None
    return MODEL_TYPES.get((source.config if source else {}).get("model_type"))


def _wrapped(name: str, modality: str, meta: bool, given: dict) -> Tower | None:
    """The tower a registered prefix (`spectrogram:`) builds around another, or None."""
    for prefix, wrapper in WRAPPERS.items():
        if name.startswith(prefix):
            if wrapper.modality != modality:
                raise MmretError(f"{name!r} is a {wrapper.modality} encoder, not an {modality} encoder")
            tower = wrapper.build(load_tower(name[len(prefix):], wrapper.inner, meta=meta, **given))
            tower.name = name
            return tower
    return None


def _unknown(name: str, modality: str) -> MmretError:
    preset = ENCODERS.get(name)
    presets = ", ".join(encoder_names(modality))
    if preset is not None:
        other = "/".join(preset.modalities)
        return MmretError(f"{name!r} is a {other} encoder, not an {modality} encoder; {modality} presets: {presets}")
    return MmretError(f"unknown {modality} encoder {name!r}: use a preset ({presets}), "
                      "a hub id such as owner/name, or a local model folder")


def _architecture_source(preset: Preset) -> ModelSource:
    arch = preset.architecture
    config = {"model_type": arch.name, **arch.values} if arch.library == "transformers" else {}
    return ModelSource(preset.name if arch.library == "transformers" else arch.name, arch.library,
                       ARCHITECTURE_ONLY, config=config, input_size=arch.input_size)


def _preset_source(preset: Preset, meta: bool) -> ModelSource:
    if not meta:
        return resolve_source(preset.source)
    try:
        return resolve_source(preset.source, need_weights=False, local_only=True)
    except MmretError:
        return _architecture_source(preset)


def _source(name: str, modality: str, weights_file: str | Path | None, meta: bool) -> ModelSource:
    if weights_file is not None and not name.startswith("timm:"):
        raise MmretError("weights= applies to timm:NAME models only; a folder or hub id brings its own weights")
    source = resolve_source(name, weights_file, need_weights=not meta)
    if source is None:
        raise _unknown(name, modality)
    return source


def load_tower(name: str, modality: str, *, meta: bool = False, weights: str | Path | None = None,
               **options: Any) -> Tower:
    """The frozen `modality` tower `name` (preset, hub id, folder, or `timm:NAME` with `weights=FILE`).

    `options` go to the family's builder (`image_size`, `pooling`, `max_length`, ...; None: the
    preset's or the model's own). With `meta=True` nothing is read but configs: the tower has
    every shape and its spec, and `with_weights()` loads it for real.
    """
    if modality not in FAMILIES or not WRAPPERS:
        import_all(BUILTIN_FAMILIES)
    if modality not in FAMILIES:
        raise MmretError(f"no encoder family for {modality!r}; known: {', '.join(FAMILIES)}")
    given = {k: v for k, v in options.items() if v is not None}
    preset = ENCODERS.get(name)
    tower = _wrapped(name, modality, meta, given)
    if tower is None and preset is not None:
        if modality not in preset.modalities:
            raise _unknown(name, modality)
        tower = FAMILIES[modality](_preset_source(preset, meta), not meta, **{**preset.options[modality], **given})
        tower.name = name
    elif tower is None:
        tower = FAMILIES[modality](_source(name, modality, weights, meta), not meta, **given)
    if meta:
        tower.reload = functools.partial(load_tower, name, modality, weights=weights, **given)
    else:
        LOADS[modality] = LOADS.get(modality, 0) + 1
        _logger.info("%s encoder %s: %s", modality, name, tower.spec)
        for note in tower.notes:  # said when the tower can encode, not when it only names a cache; once, though a
            if (name, note) not in _SAID:  # server or an eval loads it again for another step
                _SAID.add((name, note))
                _logger.warning(note)
    return tower


def load_image_encoder(name_or_path: str, image_size: int | None = None, pooling: str | None = None,
                       weights: str | Path | None = None, meta: bool = False) -> Tower:
    """A frozen image tower from a preset, hub id, local folder or `timm:NAME` (+ `weights=FILE`).

    `image_size` changes the square input size (position embeddings are interpolated);
    `pooling` overrides the preset's (cls | mean, or proj for CLIP).
    """
    return load_tower(name_or_path, "image", meta=meta, weights=weights, image_size=image_size, pooling=pooling)


def load_text_encoder(name_or_path: str, pooling: str | None = None, max_length: int | None = None,
                      meta: bool = False) -> Tower:
    """A frozen text tower from a preset, hub id or local transformers folder.

    `max_length` (tokens) defaults to 64 (DEFAULT_MAX_LENGTH), capped by the model's position limit.
    """
    return load_tower(name_or_path, "text", meta=meta, pooling=pooling, max_length=max_length)
