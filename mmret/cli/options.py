"""The options `mmret train` and `mmret probe-memory` generate from a run's config dataclasses
(`mmret.runs.settings.run_settings`): one option per setting, named `--field-name` (a bool
`--x/--no-x`), with the help and the default `--help` shows taken from the dataclass, grouped in
help panels: the run, the data, the towers, training, then the method settings under the methods
that have them.

Typer builds a command's options from its function's signature. `with_settings` gives the command
a signature made of its own parameters and the generated ones, made again each time Typer reads it
(each time the command line is built), so a method registered after import brings its options. The
command receives the generated values as one mapping, `settings` (None: not given).
"""

from __future__ import annotations

import functools
import inspect
from typing import Annotated, Any, Callable, Optional

import typer
from typer.core import TyperCommand

PANELS = {"run": "Run", "data": "Data", "encoders": "Towers", "train": "Training"}


def with_settings(select: Callable[[Any], bool]) -> Callable[[Callable], Callable]:
    """Decorate a command taking `settings: dict` with the options of the run settings `select` keeps."""
    def wrap(fn: Callable) -> Callable:
        return _WithSettings(fn, select)

    return wrap


class _WithSettings:
    """The command function with a generated signature (see the module's docstring)."""

    def __init__(self, fn: Callable, select: Callable[[Any], bool]) -> None:
        functools.update_wrapper(self, fn)
        self._fn, self._select = fn, select
        self._own = [p for p in inspect.signature(fn, eval_str=True).parameters.values() if p.name != "settings"]

    @property
    def __signature__(self) -> inspect.Signature:
        from mmret.runs.settings import run_settings

        generated = [inspect.Parameter(rs.setting.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                       annotation=Annotated[Optional[rs.setting.kind], _option(rs)])
                     for rs in run_settings() if self._select(rs)]
        return inspect.Signature(self._own + generated)

    def __call__(self, **values: Any) -> Any:
        own = {p.name: values.pop(p.name) for p in self._own if p.name in values}
        return self._fn(settings=values, **own)


def _option(rs: Any) -> Any:
    s = rs.setting
    decls = s.flags or ((f"{s.flag}/--no-{s.flag[2:]}",) if s.kind is bool else ())
    text = s.help
    if s.name == "method":  # the methods there are: the built-in ones and any registered since
        from mmret.methods import method_help

        text += ". " + method_help()
    default = s.default_text()
    text += "." + (f" [default: {default}]" if default is not None else "")  # click would wrap it in brackets
    return typer.Option(*decls, help=text, show_default=False, envvar=s.envvar, show_envvar=s.envvar is not None,
                        rich_help_panel=_panel(rs))


def _panel(rs: Any) -> str:
    if rs.section != "method":
        return PANELS[rs.section]
    return "Method: every method" if rs.shared else "Method: " + ", ".join(rs.owners)


class PanelledCommand(TyperCommand):
    """`--help` in plain text (the app has no rich markup) with its options under their panels' titles."""

    def format_options(self, ctx: typer.Context, formatter: Any) -> None:
        panels: dict[str, list[tuple[str, str]]] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is not None:
                panels.setdefault(getattr(param, "rich_help_panel", None) or "Options", []).append(record)
        for title, records in panels.items():
            with formatter.section(title):
                formatter.write_dl(records)
