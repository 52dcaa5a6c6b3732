"""Package faces that import a module only when one of its names is first asked for (PEP 562),
so that `mmret --help` and an option error answer without importing torch or pandas.

    __getattr__ = lazy_names(globals(), {"load_dataset": "mmret.data.prepared", ...})
"""

from __future__ import annotations

import importlib
from typing import Any, Callable


def lazy_names(namespace: dict[str, Any], names: dict[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` that imports `names[name]` on first use and keeps the value."""
    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(names[name]), name)
        namespace[name] = value
        return value

    return __getattr__


def import_all(modules: tuple[str, ...]) -> None:
    """Import modules named by strings (built-in entries of a registry register themselves)."""
    for module in modules:
        importlib.import_module(module)
