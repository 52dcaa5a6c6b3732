"""The export formats by name (the built-in ones imported on first use, in the order `--help`
lists them) and `export_run`, which writes one run in one format into a new folder at once."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmret.common.io import atomic_dir
from mmret.errors import MmretError
from mmret.export.card import write_card
from mmret.export.registry import EXPORTS, Exporter

# format -> the module that registers it
BUILTIN_EXPORTS = {"peft": "mmret.export.peft_adapter", "onnx": "mmret.export.onnx_format",
                   "openvino": "mmret.export.openvino_format", "sentence-transformers": "mmret.export.sbert"}


@dataclass
class ExportResult:
    path: Path
    format: str
    files: list[str]  # relative paths, sorted


def format_names() -> list[str]:
    return list(BUILTIN_EXPORTS) + [name for name in EXPORTS if name not in BUILTIN_EXPORTS]


def get_exporter(name: str) -> Exporter:
    if name not in EXPORTS and name in BUILTIN_EXPORTS:
        importlib.import_module(BUILTIN_EXPORTS[name])
    if name not in EXPORTS:
        raise MmretError(f"unknown export format {name!r}; choose one of {', '.join(format_names())}")
    return EXPORTS[name]


def export_run(model: Any, to: str | Path, format: str, *, force: bool = False) -> ExportResult:
    """Write `model` (a loaded `mmret.Model`) in `format` to the folder `to`, with a model card; the
    folder appears whole or not at all. An existing folder that is not empty is replaced only with
    `force`."""
    exporter = get_exporter(format)
    to = Path(to).expanduser()
    if to.exists() and (not to.is_dir() or any(to.iterdir())) and not force:
        raise MmretError(f"--to {to} exists and is not empty; give a new folder, or --force to replace it")
    with atomic_dir(to, replace=True) as tmp:
        about = exporter.write(model, tmp)
        write_card(model, tmp, format, about)
    files = sorted(str(p.relative_to(to)) for p in to.rglob("*") if p.is_file())
    return ExportResult(to, format, files)
