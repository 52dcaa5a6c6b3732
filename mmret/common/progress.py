"""How library code reports progress without knowing about terminals.

Long-running functions take a `Reporter`; the command layer passes one that draws rich progress
bars, tests and library users get the silent default. Library code never imports rich.
"""

from __future__ import annotations

from typing import Any, Protocol


class Task(Protocol):
    def advance(self, n: int = 1, **fields: Any) -> None: ...

    def close(self) -> None: ...


class Reporter(Protocol):
    def task(self, description: str, total: int | None = None, unit: str = "it") -> Task: ...


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
    """Reports nothing; the default for library calls."""

    def task(self, description: str, total: int | None = None, unit: str = "it") -> _NullTask:
        return _NullTask()


NULL = NullReporter()
