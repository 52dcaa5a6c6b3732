"""The docs cannot drift: the command reference is regenerated from `--help` and compared."""

from __future__ import annotations

import importlib.util
import re
import shlex
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


# --- the pages people read: links, commands and paths that still exist ----------------------------------------

ROOT = DOCS.parent
GENERATED = DOCS / "reference" / "commands.md"  # written from the app itself: checked above, not here
FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[^\n]*$", re.M | re.S)  # indented too: fences inside lists
CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
SHELL_ENDS = {"&&", "||", "|", ";", ">", ">>", "<", "&", "2>", "2>&1"}


def pages() -> list[Path]:
    found = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
    return [p for p in found if p != GENERATED]


def _prose(text: str) -> str:
    """The text outside fenced code blocks and inline code spans (which may show link syntax)."""
    return CODE_SPAN.sub("code", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: its text without markup or punctuation, lower case, spaces as '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text stands for it
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """The page's heading anchors; GitHub numbers repeated headings -1, -2, ..."""
    seen: dict[str, int] = {}
    found = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        n = seen.get(base, 0)
        seen[base] = n + 1
        found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(page: Path) -> list[str]:
    broken = []
    for target in LINK.findall(_prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: — not ours to check offline
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            broken.append(f"{target}: no heading with that anchor in {file.name}")
    return broken


def test_slugs_are_githubs():
    assert slug("`mmret prepare`") == "mmret-prepare"
    assert slug("CLIP_benchmark's webdataset sets") == "clip_benchmarks-webdataset-sets"
    assert slug("5. Serve a search page") == "5-serve-a-search-page"
    assert slug("Batches, the loss and the optimiser") == "batches-the-loss-and-the-optimiser"


def test_every_relative_link_points_to_a_file_and_heading():
    assert len(pages()) > 10  # the README and the docs/ site
    broken = {p.relative_to(ROOT).as_posix(): b for p in pages() if (b := broken_links(p))}
    assert not broken, broken


def test_the_link_check_finds_a_missing_file_and_a_missing_anchor(tmp_path):
    (tmp_path / "a.md").write_text("# Title here\n\n## A `code` heading\n", encoding="utf-8")
    page = tmp_path / "b.md"
    page.write_text("[ok](a.md#a-code-heading) [top](a.md#title-here) ![x](missing.png) [gone](a.md#nope)\n"
                    "`[not a link](nowhere.md)`\n\n```\n[nor this](nowhere.md)\n```\n", encoding="utf-8")
    assert broken_links(page) == ["missing.png: no such file", "a.md#nope: no heading with that anchor in a.md"]


def _commands() -> dict[str, set[str]]:
    """Every command of the app and the options it takes, both spellings of a flag among them."""
    import typer.main

    from mmret.cli import app

    group = typer.main.get_command(app)
    return {name: {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)} | {"--help"}
            for name, cmd in group.commands.items()}


GROUP_OPTIONS = {"--threads"}  # options of `mmret` itself that take a value, written before the command


def mmret_calls(text: str) -> list[tuple[str, list[str]]]:
    """(command, its option names) for every `mmret CMD ...` (or `python -m mmret CMD ...`) in shell text:
    each line of the code blocks, lines ending in a backslash joined, and each inline span that starts with one."""
    shell = re.findall(r"^[ \t]*(?:```|~~~)[^\n]*\n(.*?)^[ \t]*(?:```|~~~)", text, re.M | re.S)
    shell += [span for _, span in CODE_SPAN.findall(FENCE.sub("", text))
              if re.match(r"(python3? -m )?mmret\s", span.strip())]
    calls = []
    for block in shell:
        for line in block.replace("\\\n", " ").splitlines():
            if "mmret" not in line:
                continue
            lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>")
            lexer.whitespace_split = True
            lexer.commenters = "#"
            try:
                tokens = list(lexer)
            except ValueError:  # not shell (a layout listing with an apostrophe): no command on this line
                continue
            for i, token in enumerate(tokens[:-1]):
                if token == "mmret" and (i == 0 or tokens[i - 1] in SHELL_ENDS | {"-m", "$"}):
                    while i + 2 < len(tokens) and tokens[i + 1] in GROUP_OPTIONS:  # `mmret --threads 1 CMD`
                        i += 2
                    rest = []
                    for t in tokens[i + 2:]:
                        if t in SHELL_ENDS:
                            break
                        rest.append(t)
                    options = [t.split("=", 1)[0] for t in rest if re.match(r"^--?[A-Za-z]", t)]
                    calls.append((tokens[i + 1], options))
    return calls


def test_every_mmret_command_in_the_docs_is_real_with_real_options():
    commands = _commands()
    wrong, seen = [], set()
    for page in pages():
        for name, options in mmret_calls(page.read_text(encoding="utf-8")):
            seen.add(name)
            where = page.relative_to(ROOT).as_posix()
            if name not in commands:
                wrong.append(f"{where}: `mmret {name}` is not a command")
                continue
            wrong += [f"{where}: `mmret {name}` has no option {o}" for o in options if o not in commands[name]]
    assert not wrong, "\n".join(wrong)
    assert seen == set(commands), f"commands no page shows in a code block: {set(commands) - seen}"


def test_the_group_options_are_the_apps():
    import typer

    from mmret.cli import app

    valued = {o for p in typer.main.get_command(app).params if not p.is_flag for o in p.opts}
    assert valued == GROUP_OPTIONS
    assert mmret_calls("```\nmmret --threads 1 search --top 3 a\n```") == [("search", ["--top"])]


def test_the_command_check_reads_shell_as_a_shell():
    text = ("```bash\ntorchrun --nproc_per_node 4 -m mmret train --method lora \\\n    --batch-size 8  # mmret nope\n"
            "pip install -e . && mmret quickstart --epochs=3 > out.txt\nls mmret/cli/\n```\n"
            "1. In a list:\n   ```bash\n   $ mmret verify --run latest\n   ```\n"
            "Run `mmret search \"a dog\" -k 5`, not `mmret/serve/app.py`.\n")
    assert mmret_calls(text) == [("train", ["--method", "--batch-size"]), ("quickstart", ["--epochs"]),
                                 ("verify", ["--run"]), ("search", ["-k"])]


def named_paths(text: str) -> list[str]:
    """Files of this repository the text names: mmret/..., tests/... and benchmarks/... anywhere, and module
    paths such as `training/loop.py` (relative to mmret/) in inline code."""
    found = re.findall(r"(?<![\w.~/-])((?:mmret|tests|benchmarks)/[\w./-]*[\w/])", text)
    found += [span for _, span in CODE_SPAN.findall(FENCE.sub("", text))
              if re.fullmatch(r"[a-z_]+(?:/[a-z_]+)+\.py", span)]
    return found


def test_every_file_the_docs_name_exists():
    """Module paths drift when code moves: every one a page names must still be there."""
    missing = [f"{page.relative_to(ROOT).as_posix()}: {path}" for page in pages()
               for path in named_paths(page.read_text(encoding="utf-8"))
               if not (ROOT / path).exists() and not (ROOT / "mmret" / path).exists()]
    assert not missing, "\n".join(missing)


def test_no_page_keeps_notes_meant_for_the_project():
    notes = re.compile(r"\bissue #?\d|\bhelpers?\b|\bthe lead\b|\bthis session\b|\brebase\b|\btarget \(", re.I)
    found = [f"{p.relative_to(ROOT).as_posix()}: {m.group(0)!r}" for p in pages()
             for m in notes.finditer(p.read_text(encoding="utf-8"))]
    assert not found, found


def test_the_readme_spells_out_the_quick_starts_training():
    """The README's `mmret train --method scratch ...` line is the quick start's, option for option."""
    from mmret.quickstart import TRAIN_OPTIONS

    text = (ROOT / "README.md").read_text(encoding="utf-8").replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith("mmret train --method scratch"))
    tokens = shlex.split(line, comments=True)[2:]
    given = {name[2:].replace("-", "_"): value for name, value in zip(tokens[::2], tokens[1::2])}
    assert given.keys() == TRAIN_OPTIONS.keys()
    assert all(type(value)(given[key]) == value for key, value in TRAIN_OPTIONS.items()), given
