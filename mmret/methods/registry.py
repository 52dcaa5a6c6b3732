"""The table of registered methods, and `register_method`, which refuses a name that is taken.

Only the table lives here: each method's module registers its method when imported, and
`mmret.methods.catalog` (above them all) names the built-in ones and imports them on first use.
"""

from __future__ import annotations

from mmret.common.registry import Registry, place_of
from mmret.methods.base import Method

METHODS: Registry = Registry("method")  # name -> Method, in the order they registered


def register_method(method: Method) -> Method:
    """Register a method object under its name (`mmret train --method NAME`); a taken name raises."""
    return METHODS.add(method.name, method, place_of(method))
