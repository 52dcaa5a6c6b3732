"""The docs cannot drift: the command reference is regenerated from `--help` and compared."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("docs_generate", DOCS / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_command_reference_is_what_help_says():
    gen = _generator()
    assert gen.REFERENCE.read_text(encoding="utf-8") == gen.command_reference(), (
        "docs/reference/commands.md differs from the commands' --help: run `python docs/generate.py`")


def test_the_reference_names_every_command_and_option():
    """The generator itself: every command, and every option of `train`, reach the page."""
    import typer.main

    from mmret.cli import app

    text = _generator().command_reference()
    command = typer.main.get_command(app)
    for name, sub in command.commands.items():
        assert f"## `mmret {name}`" in text
        for param in sub.params:
            for opt in param.opts:
                if opt.startswith("--"):
                    assert re.search(rf"`[^`\n]*{re.escape(opt)}\b", text), (name, opt)
