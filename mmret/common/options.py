"""Settings declared once, on a config dataclass's fields: each field's default and help (and, when
the command line spells it otherwise, its option names), read back as `Setting`s from which a
command line's options and a config file's keys are generated.

    rank: int = option(8, "LoRA rank r")
    alpha: float | None = option(None, "LoRA scaling alpha", shown="2 x rank", follows="rank")

`option` is `dataclasses.field` with metadata (the way transformers' `HfArgumentParser` reads
`field(metadata={"help": ...})`), so the dataclasses stay plain; validation stays in their
`__post_init__`.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmret.errors import MmretError


def option(default: Any, help: str, *, shown: str | None = None, flags: tuple[str, ...] = (),
           envvar: str | None = None, follows: str | None = None, cli: bool = True) -> Any:
    """A dataclass field that is also a setting users give.

    `shown`: what the default is when it is worked out later (`default` None: "2 x rank");
    `flags`: the option's names when not `--field-name` (`--x/--no-x` for a bool);
    `envvar`: an environment variable the command line reads it from;
    `follows`: the setting this one is worked out from, so changing that one alone works it out again;
    `cli=False`: kept in the config but set by mmret, never given (a dataset's modality).
    """
    return dataclasses.field(default=default, metadata={
        "help": help, "shown": shown, "flags": flags, "envvar": envvar, "follows": follows, "cli": cli})


@dataclass(frozen=True)
class Setting:
    """One field of a config dataclass as users give it."""

    name: str  # the field's name
    kind: type  # int, float, str, bool or Path (None is allowed too when `optional`)
    optional: bool
    default: Any  # the dataclass's default (None: worked out later, `shown` says how)
    help: str
    shown: str | None = None
    flags: tuple[str, ...] = ()
    envvar: str | None = None
    follows: str | None = None

    @property
    def flag(self) -> str:
        """The option's first name: `--rank`, `--item-tower`."""
        return self.flags[0].split("/")[0] if self.flags else "--" + self.name.replace("_", "-")

    @property
    def names(self) -> tuple[str, ...]:
        """Every spelling a config file may use for it: `batch_size`, and each option name without dashes."""
        spelled = [flag.split("/")[0].lstrip("-").replace("-", "_") for flag in self.flags]
        return tuple(dict.fromkeys([self.name, *spelled]))

    def default_text(self) -> str | None:
        """What `--help` shows as the default (None: nothing to show)."""
        if self.shown is not None:
            return self.shown
        if self.default is None:
            return None
        if isinstance(self.default, bool):
            return "on" if self.default else "off"
        return str(self.default)


def settings_of(kind: type) -> list[Setting]:
    """The settings a config dataclass declares with `option`, in field order; a field declared
    without `option` (a subclass giving `method` its own default) is left out, and so is one set by mmret."""
    hints = typing.get_type_hints(kind)
    found = []
    for f in dataclasses.fields(kind):
        meta = f.metadata
        if "help" not in meta or not meta["cli"]:
            continue
        base, optional = _unwrap(hints[f.name])
        found.append(Setting(name=f.name, kind=base, optional=optional, default=f.default, help=meta["help"],
                             shown=meta["shown"], flags=tuple(meta["flags"]), envvar=meta["envvar"],
                             follows=meta["follows"]))
    return found


def _unwrap(hint: Any) -> tuple[type, bool]:
    """(int, True) for `int | None`; (int, False) for `int`."""
    args = typing.get_args(hint)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return hint, False


_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text", Path: "a path"}


def coerce(setting: Setting, value: Any, where: str) -> Any:
    """`value` read from a config file, checked against the setting's type (a YAML `1e-3`, which YAML
    reads as text, becomes the number); one line naming `where` when it does not fit."""
    kind = setting.kind
    if value is None and setting.optional:
        return None
    if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif kind is Path and isinstance(value, str):
        return Path(value)
    elif isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise MmretError(f"{where}: {setting.name} must be {_WORDS.get(kind, kind.__name__)}, got {value!r}")
