"""The table of export formats: each registers a function that writes the run's files into a
folder; a taken name is refused."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from mmret.common.registry import Registry, place_of


@dataclass(frozen=True)
class Exporter:
    name: str  # what --format says
    help: str  # one line for --help
    write: Callable[[Any, Path], dict[str, Any]]  # (the loaded Model, an empty folder) -> what the card says of it


EXPORTS: Registry = Registry("export format")  # name -> Exporter


def register_export(exporter: Exporter) -> Exporter:
    return EXPORTS.add(exporter.name, exporter, place_of(exporter.write))
