"""The table of one kind of registered thing (methods, dataset readers, encoder families,
modalities), which takes each name once: registering a taken name raises and names both places,
as peft's `register_peft_method` refuses a name it has.

The table holds only what was registered. A kind's built-in entries, and the lookup that imports
them when first asked for, stand above the modules that register them (timm's `_registry.py`
beside `models/__init__.py`), so no registry names a module that imports it back.
"""

from __future__ import annotations

from typing import Any

from mmret.errors import MmretError


class Registry(dict):
    """name -> entry for one kind; `add` refuses a name that is taken."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.places: dict[str, str] = {}  # name -> where its entry was registered from

    def add(self, name: str, entry: Any, place: str) -> Any:
        """Register `entry` as `name`; `place` says where it comes from (a module, a class) for the message."""
        if not name:
            raise MmretError(f"a {self.kind} needs a name ({place})")
        if name in self:
            first = self.places.get(name, "another module")
            raise MmretError(f"{self.kind} {name!r} is already registered by {first}; {place} cannot register it "
                             "again: give it another name")
        self[name] = entry
        self.places[name] = place
        return entry


def place_of(thing: Any) -> str:
    """`module.qualname` of a function or class, or of an object's class: where an entry came from."""
    kind = thing if isinstance(thing, type) or (callable(thing) and hasattr(thing, "__qualname__")) else type(thing)
    return f"{kind.__module__}.{kind.__qualname__}"
