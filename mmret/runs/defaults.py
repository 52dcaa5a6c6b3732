"""What a run takes that nobody named: the method chosen by `mmret.methods.choice` when no layer
of the settings (the command line, a `--config` file, a recipe) names one, and one line for each
default a user may not know they are getting (the dataset, the method, the towers), so that
`mmret train` never guesses silently and a failure on a tower nobody typed names the option to give.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mmret.methods import get_method, recipe_values
from mmret.methods.choice import Choice, choose_method, signals
from mmret.runs.config import ITEM_FLAGS, RENAMED, SECTIONS, RunConfig, settle_modality
from mmret.runs.settings import build_config, flat_settings, read_settings_file


@dataclass
class Settled:
    cfg: RunConfig
    choice: Choice | None = None  # the method the rule chose (None: a setting named it)
    lines: list[str] = field(default_factory=list)  # one per default taken, the choice first


def named_settings(*, given: dict[str, Any], file: Path | None = None, recipe: str | None = None) -> dict[str, Any]:
    """Every setting some layer names, with the value of the last layer that does (a run's own
    config.json names them all)."""
    named: dict[str, Any] = {}
    if file is not None:
        data = read_settings_file(file)
        if "runs_dir" in data and all(isinstance(data.get(s), dict) for s in SECTIONS):
            for section in SECTIONS:
                named.update({RENAMED.get((section, k), k): v for k, v in data[section].items()})
        else:
            named.update(flat_settings(data, f"--config {file}"))
    if recipe:
        named.update(recipe_values(recipe))
    named.update({k: v for k, v in given.items() if v is not None})
    return named


def settle(*, given: dict[str, Any], file: Path | None = None, recipe: str | None = None,
           target: str | None = None) -> Settled:
    """The run's config from its layers (`mmret.runs.settings.build_config`), the method chosen by
    the rule when none names it (`target`: the device planned for, when not this machine's), and
    the lines that say what was taken by default."""
    named = named_settings(given=given, file=file, recipe=recipe)
    choice = None if "method" in named else choose_method(signals(named, target))
    if choice is not None:  # what the user set stays as they set it; the line says only what the rule set
        choice = replace(choice, settings={k: v for k, v in choice.settings.items() if k not in named})
    chosen = {"method": choice.method, **choice.settings} if choice else {}
    cfg = build_config(given={**given, **chosen}, file=file, recipe=recipe)
    get_method(cfg.method.method, training=True)  # a method that cannot train is refused before anything is said
    lines = [choice.line()] if choice else []
    if "dataset" not in named:
        lines.append(f"dataset: {cfg.data.dataset}, the default (--dataset NAME trains on one you prepared)")
    lines += _tower_lines(cfg, named)
    return Settled(cfg, choice, lines)


def _tower_lines(cfg: RunConfig, named: dict[str, Any]) -> list[str]:
    """A line naming the default towers a run will load, and the options that take a local folder."""
    if not get_method(cfg.method.method).towers or cfg.encoders.model:
        return []
    from mmret.encoders.presets import ENCODERS

    modality = settle_modality(cfg)
    item_flag = ITEM_FLAGS.get(modality, "--item-tower")
    defaults = [(flag, name) for flag, key, name in ((item_flag, "item", cfg.encoders.item),
                                                      ("--text", "text", cfg.encoders.text)) if key not in named]
    if not defaults:
        return []

    def spelled(name: str) -> str:
        preset = ENCODERS.get(name)
        return f"{name} ({preset.source})" if preset is not None else name

    towers = " and ".join(f"{flag} {spelled(name)}" for flag, name in defaults)
    return [f"towers: {towers}, the default{'s' if len(defaults) > 1 else ''}; each takes a preset, a hub id or a "
            "local model folder (an offline machine needs the folder)"]


def tower_option(cfg: RunConfig, repo_id: str) -> tuple[str, str] | None:
    """The option and value of `cfg` that asked for the hub model `repo_id` (`("--vision",
    "dino-vits16")`), so that a failure to load it names the option that takes a local folder."""
    from mmret.encoders.presets import ENCODERS

    item_flag = ITEM_FLAGS.get(settle_modality(cfg), "--item-tower")
    for flag, value in (("--model", cfg.encoders.model), (item_flag, cfg.encoders.item), ("--text", cfg.encoders.text)):
        if not value:
            continue
        for name in (value, value.split(":", 1)[-1]):  # a wrapped tower (spectrogram:NAME) names its inner one
            preset = ENCODERS.get(name)
            if (preset.source if preset is not None else name).partition("@")[0] == repo_id:
                return flag, value
    return None
