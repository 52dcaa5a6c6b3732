"""The package's shape: no import cycles, data flowing one way between the subpackages, a method
registered from outside `mmret` bringing its options to the command line and training through it,
and a text search on a heads run loading only the text tower."""

from __future__ import annotations

import ast
import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from mmret.cli import app
from mmret.common.options import option
from mmret.errors import MmretError
from mmret.methods import METHODS, MethodConfig, get_method, register_method
from mmret.methods.config import check_positive
from mmret.methods.features import FeaturesMethod
from mmret.models import DualEncoder
from mmret.models.heads import InputNorm
from mmret.models.temperature import build_temperature

PACKAGE = Path(__file__).resolve().parents[1] / "mmret"

# lowest first: a module may import from its own layer and the layers before it, never after
LAYERS = ["errors", "common", "metrics", "modalities", "data", "encoders", "features", "models", "methods", "runs",
          "training", "memory", "inference", "api", "figures", "evaluation", "export", "serve", "quickstart", "verify",
          "cli", "__main__"]
# the same rule inside a subpackage, lowest first, for the modules (or folders) it names; modules it does not
# name (package faces among them) stand outside that order
SUBLAYERS: dict[str, list[str]] = {
    "common": ["version", "lazy", "registry", "options", "paths", "io", "digest", "items", "progress", "shards",
               "device"],
    "metrics": ["retrieval", "classification"],
    "modalities": ["base", "spectrogram", "listening", "image", "audio"],
    "data": ["config", "stamps", "readers", "tables", "create", "prepared", "tokenizer", "negatives", "pairs"],
    "encoders": ["base", "convert", "presets", "hub", "preprocess", "registry", "image", "text", "audio", "spectrogram",
                 "load"],
    "features": ["config", "cache", "runner", "encode", "shards", "views", "source", "precompute"],
    "models": ["batch", "temperature", "heads", "linformer", "tuners", "towers", "embed", "fused", "mixup", "dual",
               "bridge", "miniclip", "scratch_clip"],
    "methods": ["config", "queries", "base", "registry", "features", "heads", "bridge", "towers", "scratch",
                "zeroshot", "catalog", "choice"],
    "runs": ["config", "settings", "defaults", "folders", "checkpoint"],
    "training": ["losses", "batches", "sam", "snapshot", "gradcache", "world", "step", "session", "distributed",
                 "plots", "dry_run", "loop"],
    "memory": ["live", "probe", "plan"],
    "inference": ["inputs", "loaded", "embeddings", "exact", "index", "search", "zeroshot"],
    "figures": ["draw", "maps", "failures"],
    "evaluation": ["config", "templates", "clip_benchmark", "retrieval", "classification", "linear_probe", "suite"],
    "export": ["registry", "card", "graphs", "peft_adapter", "onnx_format", "openvino_format", "sbert", "catalog"],
    "serve": ["config", "schemas", "worker", "service", "knn", "app", "server"],
    "cli": ["ui", "app", "options", "show", "prepare", "train", "inference", "serve", "export", "verify", "quickstart"],
}


@dataclass(frozen=True)
class Edge:
    target: str
    how: str  # import | relative import | import_module | module string (a lazy table, a registry)
    line: int


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    """The module an `ImportFrom` names, relative imports resolved against the importing module."""
    if not node.level:
        return node.module or ""
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _edges(tree: ast.AST, here: str, is_package: bool, modules: set[str]) -> list[Edge]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Edge(a.name, "import", node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = _absolute(node, here, is_package)
            how = "relative import" if node.level else "import"
            # `from a.b import c` imports a.b, and a.b.c when c is a module
            found += [Edge(f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source, how, node.lineno)
                      for a in node.names]
        elif isinstance(node, ast.Call) and _called(node.func) in ("import_module", "__import__") and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            found.append(Edge(node.args[0].value, "import_module", node.lineno))
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in modules \
                and "." in node.value:
            # a module named by a string is imported later: a lazy face's table, a registry of built-ins (the
            # bare package name is a word there: a metadata key, a logger's name)
            found.append(Edge(node.value, "module string", node.lineno))
    return found


def _called(func: ast.expr) -> str:
    return func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""


def import_edges(package: Path = PACKAGE) -> dict[str, list[Edge]]:
    """package module -> the package modules it imports anywhere in its body (function-level too), however
    written: absolute or relative imports, `importlib.import_module("...")`, or a module named by a string
    (lazy tables, registries of built-ins import those strings later)."""
    files = {module_name(p, package): p for p in package.rglob("*.py")}
    graph: dict[str, list[Edge]] = {}
    for name, path in files.items():
        edges = _edges(ast.parse(path.read_text(encoding="utf-8")), name, path.name == "__init__.py", set(files))
        graph[name] = [e for e in edges if e.target in files and e.target != name]
    return graph


def imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    return {name: {e.target for e in edges} for name, edges in import_edges(package).items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def rank(module: str, layers: list[str], sublayers: dict[str, list[str]]) -> tuple[int, int]:
    """Where a module stands: its subpackage's layer, then its place inside the subpackage (-1: not named)."""
    parts = module.split(".")
    if len(parts) < 2:
        return -1, -1
    top = layers.index(parts[1])
    inner = sublayers.get(parts[1], [])
    return top, inner.index(parts[2]) if len(parts) > 2 and parts[2] in inner else -1


def upward(package: Path = PACKAGE, layers: list[str] = LAYERS,
           sublayers: dict[str, list[str]] = SUBLAYERS) -> list[str]:
    """Every import that reaches back up: to a later subpackage, or inside a subpackage to a module named
    after the importing one in its own order. A package face (`__init__`) is above its modules."""
    found = []
    for a, edges in import_edges(package).items():
        for e in edges:
            (ta, ia), (tb, ib) = rank(a, layers, sublayers), rank(e.target, layers, sublayers)
            same = a.split(".")[:2] == e.target.split(".")[:2]
            if (not same and tb > ta >= 0) or (same and ia >= 0 and ib > ia):
                found.append(f"{a}:{e.line} -> {e.target} ({e.how})")
    return sorted(found)


def test_no_import_cycle_inside_mmret():
    cycle = find_cycle(imports())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _scratch(tmp_path: Path, files: dict[str, str]) -> Path:
    package = tmp_path / "mmret"
    for rel, text in files.items():
        (package / rel).parent.mkdir(parents=True, exist_ok=True)
        (package / rel).write_text(text)
    return package


def test_the_cycle_check_sees_a_cycle(tmp_path):
    """The check itself: two modules importing each other inside functions are caught."""
    package = _scratch(tmp_path, {"__init__.py": "", "a.py": "def f():\n    from mmret.b import g\n",
                                  "b.py": "def g():\n    import mmret.a\n"})
    assert find_cycle(imports(package)) == ["mmret.a", "mmret.b", "mmret.a"]


def test_data_flows_one_way_between_and_inside_the_subpackages():
    assert not upward(), "modules that reach back up: " + "; ".join(upward())


SCRATCH_LAYERS = ["low", "high"]


@pytest.mark.parametrize("how, text", [
    ("import", "from mmret.high.top import x\n"),
    ("relative import", "from ..high.top import x\n"),
    ("relative import", "from ..high import top\n"),
    ("import_module", "import importlib\ndef f():\n    return importlib.import_module('mmret.high.top')\n"),
    ("import_module", "from importlib import import_module\nm = import_module('mmret.high.top')\n"),
    ("module string", "from mmret.common_lazy import lazy_names\n__getattr__ = lazy_names(globals(), "
                      "{'x': 'mmret.high.top'})\n"),
])
def test_the_layer_check_sees_an_upward_import_however_it_is_written(tmp_path, how, text):
    package = _scratch(tmp_path, {"__init__.py": "", "low/__init__.py": "", "low/base.py": text,
                                  "high/__init__.py": "", "high/top.py": "x = 1\n"})
    found = upward(package, SCRATCH_LAYERS, {})
    assert found and found[0].startswith("mmret.low.base:") and found[0].endswith(f"-> mmret.high.top ({how})")
    assert not upward(_scratch(tmp_path / "ok", {"__init__.py": "", "low/__init__.py": "", "low/base.py": "",
                                                 "high/__init__.py": "", "high/top.py": text.replace(
                                                     "high.top", "low.base").replace("..high", "..low").replace(
                                                     "import top", "import base")}), SCRATCH_LAYERS, {})


def test_the_layer_check_holds_inside_a_subpackage(tmp_path):
    """Inside a subpackage the named order holds too: `low.base` may not import `low.later`, by any route."""
    package = _scratch(tmp_path, {"__init__.py": "", "low/__init__.py": "", "high/__init__.py": "",
                                  "low/base.py": "from . import later\n", "low/later.py": "from .base import y\n"})
    assert upward(package, SCRATCH_LAYERS, {"low": ["base", "later"]}) == [
        "mmret.low.base:1 -> mmret.low.later (relative import)"]
    assert upward(package, SCRATCH_LAYERS, {}) == []  # unnamed modules of one subpackage may use each other


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long


# ---------------------------------------------------------------------------- a method from outside


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world


@dataclass
class SharedConfig(MethodConfig):
    method: str = "shared"
    width: int = option(24, "The shared space's width before the last projection")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_positive("width", self.width)


class SharedHead(nn.Module):
    def __init__(self, in_dim: int, shared: nn.Module):
        super().__init__()
        self.norm = InputNorm(in_dim)  # started from training features, as the heads method does
        self.fit, self.shared = nn.Linear(in_dim, shared.in_features), shared

    def forward(self, x):
        return self.shared(torch.relu(self.fit(self.norm(x))))


class SharedMethod(FeaturesMethod):
    """Each side fits its features to one width; a single projection, shared, maps both."""

    name, help, lr, config = "shared", "one projection shared by both sides", 5e-3, SharedConfig

    def build(self, cfg, ctx):
        m = cfg.method
        shared = nn.Linear(m.width, m.embed_dim)
        return DualEncoder(SharedHead(ctx.dims.item_dim, shared), SharedHead(ctx.dims.text_dim, shared),
                           m.embed_dim, build_temperature(m.temperature, m.init_temperature))


class AnotherShared(SharedMethod):
    """A second method that wants the same name."""


@pytest.fixture
def shared_method():
    """`shared` registered for one test, as a plugin would register it; nothing under mmret/ knows it."""
    register_method(SharedMethod())
    yield
    del METHODS["shared"]


def test_a_method_registered_from_a_test_file_brings_its_options_and_trains(world, tmp_path, monkeypatch,
                                                                            shared_method):
    """A new features-method, defined in this file with its own config class: `train --help` shows its
    option in its own panel with the dataclass's default; it trains with that option and with a
    `--config` YAML file; `mmret eval` scores it; a second method with its name is refused."""
    monkeypatch.setenv("MMRET_DATA_DIR", str(world["root"] / "data"))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(tmp_path / "runs"))
    runner = CliRunner()
    shown = runner.invoke(app, ["train", "--help"], terminal_width=200).stdout
    panel = shown[shown.index("Method: shared:"):]
    assert "--width <int>" in panel and "The shared space's width before the last projection. [default: 24]" in panel
    assert "shared: one projection shared by both sides" in shown  # --method lists it
    common = ["--vision", world["vit"], "--text", world["bert"], "--batch-size", "16", "--embed-dim", "16",
              "--patience", "0"]
    result = runner.invoke(app, ["train", "--method", "shared", "--width", "20", "--epochs", "6", *common,
                                 "--name", "shared-run"])
    assert result.exit_code == 0, result.output
    history = pd.read_parquet(tmp_path / "runs" / "shared-run" / "metrics.parquet")
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0] - 0.2
    assert json.loads((tmp_path / "runs" / "shared-run" / "config.json").read_text())["method"]["width"] == 20
    (tmp_path / "shared.yaml").write_text("method: shared\nwidth: 28\nepochs: 2\n")
    from_file = runner.invoke(app, ["train", "--config", str(tmp_path / "shared.yaml"), *common, "--name", "yaml"])
    assert from_file.exit_code == 0, from_file.output
    saved = json.loads((tmp_path / "runs" / "yaml" / "config.json").read_text())
    assert (saved["method"]["method"], saved["method"]["width"], saved["train"]["epochs"]) == ("shared", 28, 2)
    bad = runner.invoke(app, ["train", "--method", "shared", "--width", "0", *common])
    assert (bad.exit_code, bad.stderr) == (1, "error: --width must be positive, got 0\n")
    scored = runner.invoke(app, ["eval", "--run", "shared-run", "--format", "json"])
    assert scored.exit_code == 0, scored.output
    with pytest.raises(MmretError, match=r"method 'shared' is already registered by [\w.]*SharedMethod; "
                                         r"[\w.]*AnotherShared cannot register it again"):
        register_method(AnotherShared())
    get_method("heads")  # a built-in's name is taken once its module is imported
    with pytest.raises(MmretError, match=r"method 'heads' is already registered by mmret\.methods\.heads\.HeadsMethod"):
        register_method(type("Heads", (SharedMethod,), {"name": "heads"})())


def test_a_text_search_on_a_heads_run_loads_only_the_text_tower(world, tmp_path, monkeypatch):
    from mmret.encoders import load as loading
    from mmret.runs import RunConfig, with_overrides
    from mmret.training import train

    cfg = with_overrides(RunConfig(), dict(method="heads", dataset="example", item=world["vit"], text=world["bert"],
                                           data_dir=world["root"] / "data", runs_dir=tmp_path / "runs", epochs=2,
                                           batch_size=16, embed_dim=16, name="heads-run"))
    train(cfg)
    loads: dict[str, int] = {}
    monkeypatch.setattr(loading, "LOADS", loads)
    monkeypatch.setenv("MMRET_DATA_DIR", str(world["root"] / "data"))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(tmp_path / "runs"))
    result = CliRunner().invoke(app, ["search", "a red circle above a blue square", "--run", "heads-run", "--json"])
    assert result.exit_code == 0, result.output
    assert loads == {"text": 1}  # the gallery came from the feature cache; the query ran the text tower only
