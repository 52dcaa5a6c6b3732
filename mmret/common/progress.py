"""How library code reports progress and what it decided, without knowing about terminals.

Long-running functions take a `Reporter`: `task(...)` for work with a count (rows, pairs,
steps), `note(...)` for one line about a choice made on the user's behalf or a number that would
mislead without a word. The command layer passes a reporter that draws rich progress bars on a
terminal and prints `LineReporter`'s plain lines anywhere else (a log file, a pipe, CI); library
users get the silent default, whose notes go to the `mmret` logger. Library code never imports rich.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

_logger = logging.getLogger("mmret")


class Task(Protocol):
    def advance(self, n: int = 1, **fields: Any) -> None: ...

    def close(self) -> None: ...


class Reporter(Protocol):
    def task(self, description: str, total: int | None = None, unit: str = "it") -> Task: ...

    def note(self, message: str, warning: bool = False) -> None:
        """One line: a choice made on the user's behalf, or (`warning`) a number that would mislead."""


class _NullTask:
    def advance(self, n: int = 1, **fields: Any) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "_NullTask":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class NullReporter:
    """Draws nothing; the default for library calls. Notes go to the log (warnings at WARNING, the rest at INFO)."""

    def task(self, description: str, total: int | None = None, unit: str = "it") -> _NullTask:
        return _NullTask()

    def note(self, message: str, warning: bool = False) -> None:
        _logger.log(logging.WARNING if warning else logging.INFO, message)


NULL = NullReporter()


# ---------------------------------------------------------------------------- plain lines


def duration(seconds: float) -> str:
    """`42s`, `3:05`, `1:02:09`: how a line says a time."""
    seconds = int(round(max(0.0, seconds)))
    if seconds < 60:
        return f"{seconds}s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _fields(fields: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())


@dataclass
class _LineTask:
    reporter: "LineReporter"
    description: str
    total: int | None
    unit: str
    started: float
    done: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    first: tuple[float, int] | None = None  # (time, count) after the first advance: the rate is counted from there
    said: float | None = None  # when a line was last printed
    closed: bool = False

    def advance(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        self.fields.update(fields)
        if self.first is None:  # a resumed run's jump to where it was, or the first batch, is not a rate
            self.first = (self.reporter.clock(), self.done)

    def rate(self, now: float) -> float | None:
        """Units per second since the first advance (over the whole task while there was only one)."""
        if self.first is not None and self.done > self.first[1] and now > self.first[0]:
            return (self.done - self.first[1]) / (now - self.first[0])
        if self.done and now > self.started:
            return self.done / (now - self.started)
        return None

    def line(self, now: float) -> str:
        rate, unit = self.rate(now), self.unit
        if self.total:
            count = f"{self.done:,}/{self.total:,} {unit} ({100 * self.done / self.total:.0f}%)"
        else:
            count = f"{self.done:,} {unit}"
        parts = [count, f"{rate:,.1f} {unit}/s" if rate else f"- {unit}/s"]
        if self.total and rate:
            parts.append(f"eta {duration((self.total - self.done) / rate)}")
        parts.append(f"{duration(now - self.started)} so far")
        if self.fields:
            parts.append(_fields(self.fields))
        return f"{self.description}: " + ", ".join(parts)

    def end_line(self, now: float) -> str:
        rate = self.rate(now)
        speed = f" ({rate:,.1f} {self.unit}/s)" if rate else ""
        extra = f", {_fields(self.fields)}" if self.fields else ""
        return f"{self.description}: {self.done:,} {self.unit} in {duration(now - self.started)}{speed}{extra}"

    def close(self) -> None:
        self.reporter._close(self)

    def __enter__(self) -> "_LineTask":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LineReporter:
    """Progress as plain lines for output that is not a terminal: nothing for work shorter than
    `every` seconds; then a line every `every` seconds with the count, the rate, the time left and
    the task's latest numbers (loss, lr), and one when it ends. A background thread prints them, so
    a line comes even while one long batch holds the work. `write` takes one line (no newline)."""

    def __init__(self, write: Callable[[str], None], every: float = 5.0, clock: Callable[[], float] = time.monotonic):
        if every <= 0:
            raise ValueError(f"every must be a positive number of seconds, got {every}")
        self.write, self.every, self.clock = write, every, clock
        self.open: list[_LineTask] = []
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()  # the running thread's own: a thread started later gets another

    def task(self, description: str, total: int | None = None, unit: str = "it") -> _LineTask:
        task = _LineTask(self, description, total, unit, self.clock())
        with self._lock:
            self.open.append(task)
            if self._thread is None:
                self._stop = threading.Event()
                self._thread = threading.Thread(target=self._tick, args=(self._stop,), name="mmret-progress",
                                                daemon=True)
                self._thread.start()
        return task

    def note(self, message: str, warning: bool = False) -> None:
        with self._lock:
            self.write(f"note: {message}" if warning else message)

    def tick(self) -> None:
        """Print a line for every open task that has gone `every` seconds without one."""
        now = self.clock()
        with self._lock:
            for task in self.open:
                if now - (task.said if task.said is not None else task.started) >= self.every:
                    self.write(task.line(now))
                    task.said = now

    def _tick(self, stop: threading.Event) -> None:
        while not stop.wait(min(1.0, self.every / 2)):
            self.tick()

    def _close(self, task: _LineTask) -> None:
        now = self.clock()
        with self._lock:
            if task.closed:
                return
            task.closed = True
            self.open.remove(task)
            if task.said is not None:  # a task that said how it went says how it ended
                self.write(task.end_line(now))
            thread = self._thread if not self.open else None
            if thread is not None:
                self._thread = None
                self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
