"""A run's settings as users give them: every setting of the run's config listed once (`run_settings`,
what `mmret train` generates its options from), a `--config FILE` read (JSON, YAML or TOML, flat
`rank: 8` or sectioned as config.json is), and the run's config built from its layers, each winning
over the one before: the dataclasses' defaults, the file, a LoRA recipe, the command line.

A run's own config.json (it names its `runs_dir`) loads as the run itself does: settings added
since it was written keep the meaning they had. Any other file is a set of settings over today's
defaults, whatever it leaves out.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmret.common.options import Setting, coerce, settings_of
from mmret.errors import MmretError
from mmret.methods import MethodConfig, method_configs, recipe_values
from mmret.runs.config import SECTIONS, RunConfig, with_overrides

FORMATS = {".yaml": "YAML", ".yml": "YAML", ".toml": "TOML"}  # any other ending is read as JSON


@dataclass(frozen=True)
class RunSetting:
    section: str  # run (the run's name and folder), data, encoders, method or train
    setting: Setting
    owners: tuple[str, ...] = ()  # the methods that have a method setting
    shared: bool = False  # a setting every method has (`MethodConfig`'s)


def run_settings() -> list[RunSetting]:
    """Every setting a run takes, section by section (the method's last: there are many); a method setting
    once, with the methods that have it."""
    found = [RunSetting("run", s) for s in settings_of(RunConfig)]
    for section in ("data", "encoders", "train"):
        found += [RunSetting(section, s) for s in settings_of(SECTIONS[section])]
    found += _method_settings()
    names = [rs.setting.name for rs in found]
    taken = sorted({n for n in names if names.count(n) > 1})
    if taken:  # a method registered with a setting of another section would shadow it
        raise MmretError(f"setting {taken[0]!r} is declared twice (by {', '.join(_declaring(taken[0], found))}): "
                         "give the method's setting another name")
    return found


def _method_settings() -> list[RunSetting]:
    """The shared settings (`MethodConfig`'s), then each method's own in the order the methods are listed;
    a setting several methods have (heads and lora's `head_layers`) comes once, naming them all."""
    configs = method_configs()
    shared = settings_of(MethodConfig)
    own: dict[str, list[tuple[str, Setting]]] = {}
    for method, kind in configs.items():
        for s in settings_of(kind):
            if s.name not in {x.name for x in shared}:
                own.setdefault(s.name, []).append((method, s))
    found = [RunSetting("method", s, tuple(configs), shared=True) for s in shared]
    for name, declared in own.items():
        setting = declared[0][1]
        if len({(s.kind, s.optional) for _, s in declared}) > 1:
            raise MmretError(f"methods {' and '.join(m for m, _ in declared)} declare setting {name!r} with different "
                             "types: give one of them another name")
        defaults = {m: s.default_text() for m, s in declared}
        if len(set(defaults.values())) > 1:  # each method's own default, said in --help
            setting = dataclasses.replace(setting, shown="; ".join(f"{m}: {d}" for m, d in defaults.items()))
        found.append(RunSetting("method", setting, tuple(m for m, _ in declared)))
    return found


def _declaring(name: str, found: list[RunSetting]) -> list[str]:
    return [", ".join(rs.owners) if rs.section == "method" else rs.section for rs in found if rs.setting.name == name]


def read_settings_file(path: Path) -> dict[str, Any]:
    """The mapping a --config file holds (JSON, YAML or TOML by its ending); one line when it cannot be read."""
    if not path.is_file():
        raise MmretError(f"--config {path}: no such file")
    kind = FORMATS.get(path.suffix.lower(), "JSON")
    try:
        text = path.read_text(encoding="utf-8")
        data = _parse(text, kind)
    except (UnicodeDecodeError, ValueError) as e:  # every parser's error is a ValueError
        raise MmretError(f"--config {path}: not valid {kind}: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise MmretError(f"--config {path}: expected settings (name: value), got {type(data).__name__}")
    return data


def _parse(text: str, kind: str) -> Any:
    if kind == "YAML":
        import yaml

        try:
            return yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ValueError(str(e)) from None
    if kind == "TOML":
        if sys.version_info >= (3, 11):
            import tomllib
        else:  # pragma: no cover - the tomli backport on Python 3.10
            import tomli as tomllib
        return tomllib.loads(text)
    return json.loads(text)


def flat_settings(data: dict[str, Any], where: str) -> dict[str, Any]:
    """A file's settings as one flat mapping: keys at the top level or in their section (`train: {epochs: 3}`),
    spelled as fields (`batch_size`) or as options (`batch-size`, `vision`); values checked against their type."""
    spellings = {name: rs for rs in run_settings() for name in rs.setting.names}
    fields = {f.name: section for section, kind in SECTIONS.items() for f in dataclasses.fields(kind)}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        inside = value.items() if key in SECTIONS and isinstance(value, dict) else [(key, value)]
        section = key if key in SECTIONS and isinstance(value, dict) else None
        for name, v in inside:
            rs = spellings.get(str(name).replace("-", "_"))
            if rs is not None and section in (None, rs.section):
                flat[rs.setting.name] = coerce(rs.setting, v, where)
            elif name in fields and section in (None, fields[name]):
                flat[name] = v  # a setting mmret sets itself (data.modality), as a saved config holds it
            elif rs is not None:
                raise MmretError(f"{where}: {name!r} is a {rs.section} setting, not a {section} one")
            else:
                raise MmretError(f"{where}: unknown setting {name!r} (the settings are `mmret train`'s options)")
    return flat


def config_from_file(path: Path) -> RunConfig:
    """The run config a --config file describes (see the module's docstring)."""
    data, where = read_settings_file(path), f"--config {path}"
    try:
        if "runs_dir" in data and all(isinstance(data.get(s), dict) for s in SECTIONS):
            return RunConfig.from_dict(data)
        return with_overrides(RunConfig(), flat_settings(data, where))
    except MmretError as e:
        raise MmretError(str(e) if str(e).startswith(where) else f"{where}: {e}") from None


def build_config(*, given: dict[str, Any], file: Path | None = None, recipe: str | None = None) -> RunConfig:
    """The run config from its layers, each winning over the one before: the defaults, `file`, the LoRA
    `recipe`, then `given` (the command line's values; None: not given)."""
    cfg = config_from_file(file) if file is not None else RunConfig()
    if recipe:
        cfg = with_overrides(cfg, recipe_values(recipe))
    return with_overrides(cfg, given)
