"""Terminal output for the command layer: rich progress bars behind the library's `Reporter` (plain
lines every few seconds when stderr is not a terminal), the one-line error and note formats, and
small table helpers. Only the command modules import this module.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Iterable

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from mmret.errors import printable


class SafeConsole(Console):
    """A rich console that prints the control characters in any text it is given (a caption, a file
    name, a message quoting a file) as escapes (`mmret.errors.printable`), keeping only the line
    breaks: text from a file can never drive the terminal. Every string printed, table cells
    included, passes through `render_str`."""

    def render_str(self, text: str, **kwargs: Any) -> Text:
        return super().render_str("\n".join(printable(line) for line in text.split("\n")), **kwargs)


console = SafeConsole()
err_console = SafeConsole(stderr=True, soft_wrap=True)


def print_error(message: str) -> None:
    """The one red line a user sees for an `MmretError` (line breaks in it escaped too)."""
    err_console.print(f"[bold red]error:[/bold red] {escape(printable(message))}", soft_wrap=True, highlight=False)


def print_note(message: str) -> None:
    """A number that would mislead without a word, or something the user should know before trusting a result."""
    err_console.print(f"[yellow]note:[/yellow] {escape(printable(message))}", soft_wrap=True, highlight=False)


def say(message: str) -> None:
    """One line on stderr about what a command chose on the user's behalf (stdout stays the result's)."""
    err_console.print(escape(message), soft_wrap=True, highlight=False)


PROGRESS_ENV = "MMRET_PROGRESS_SECONDS"  # seconds between the plain progress lines of output that is not a terminal


def progress_seconds() -> float:
    from mmret.errors import MmretError

    text = os.environ.get(PROGRESS_ENV, "5")
    try:
        every = float(text)
    except ValueError:
        every = -1.0
    if not every > 0:
        raise MmretError(f"{PROGRESS_ENV} must be a positive number of seconds, got {text!r}")
    return every


class _RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        unit = task.fields.get("unit", "it")
        return Text(f"{speed:,.1f} {unit}/s" if speed else f"- {unit}/s", style="cyan")


def _format_fields(fields: dict[str, Any]) -> str:
    parts = []
    for key, value in fields.items():
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return "  ".join(parts)


class _RichTask:
    def __init__(self, reporter: "RichReporter", task_id: int):
        self.reporter, self.task_id = reporter, task_id

    def advance(self, n: int = 1, **fields: Any) -> None:
        update = {"info": _format_fields(fields)} if fields else {}
        self.reporter.progress.update(self.task_id, advance=n, **update)

    def close(self) -> None:
        self.reporter._close(self.task_id)

    def __enter__(self) -> "_RichTask":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class RichReporter:
    """One live rich display shared by all open tasks (rich allows only one at a time) on a
    terminal; elsewhere (a log file, a pipe, CI) plain lines every few seconds (`LineReporter`)."""

    def __init__(self, console: Console = err_console):
        from mmret.common.progress import LineReporter

        self.console = console
        self.progress: Progress | None = None
        self.open: set[int] = set()
        self.lines = None if console.is_terminal else LineReporter(self._write, progress_seconds())

    def _write(self, line: str) -> None:
        self.console.file.write(line + "\n")
        self.console.file.flush()

    def note(self, message: str, warning: bool = False) -> None:
        if self.lines is not None:
            self.lines.note(message, warning)
        elif warning:
            self.console.print(f"[yellow]note:[/yellow] {escape(message)}", soft_wrap=True, highlight=False)
        else:
            self.console.print(escape(message), soft_wrap=True, highlight=False)

    def task(self, description: str, total: int | None = None, unit: str = "it") -> _RichTask:
        if self.lines is not None:  # bars redrawn in place would be noise in a log
            return self.lines.task(description, total, unit)
        if self.progress is None:
            self.progress = Progress(*self._columns(), console=self.console, transient=False)
            self.progress.start()
        task_id = self.progress.add_task(description, total=total, unit=unit, info="")
        self.open.add(task_id)
        return _RichTask(self, task_id)

    def _columns(self) -> list:
        """Everything on a wide terminal; on a narrow one (80 columns) a short bar and no elapsed time."""
        if self.console.width >= 120:
            return [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(),
                    TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}")]
        return [TextColumn("[bold]{task.description}"), BarColumn(bar_width=10), MofNCompleteColumn(), _RateColumn(),
                TimeRemainingColumn(), TextColumn("{task.fields[info]}")]

    def _close(self, task_id: int) -> None:
        self.open.discard(task_id)
        if not self.open and self.progress is not None:
            self.progress.stop()
            self.progress = None


def NullReporterIfJson(json_output: bool):
    """Progress bars go to stderr, but scripts reading --json want a quiet terminal."""
    from mmret.common.progress import NULL

    return NULL if json_output else RichReporter()


def table(title: str | None, columns: Iterable[str], rows: Iterable[Iterable[Any]]) -> Table:
    out = Table(title=title, title_justify="left", header_style="bold")
    columns = list(columns)
    for i, col in enumerate(columns):
        out.add_column(col, justify="left" if i == 0 else "right")
    for row in rows:
        out.add_row(*[f"{v:,}" if isinstance(v, int) else str(v) for v in row])
    return out


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def is_terminal() -> bool:
    return sys.stderr.isatty()
