"""The package's shape: no import cycles, data flowing one way between the subpackages, a method
registered from outside `mmret` training through the command line, and a text search on a heads
run loading only the text tower."""

from __future__ import annotations

import ast
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from mmret.cli import app

PACKAGE = Path(__file__).resolve().parents[1] / "mmret"

# lowest first: a module may import from its own layer and the layers before it, never after
LAYERS = ["errors", "common", "modalities", "data", "encoders", "features", "models", "methods", "runs",
          "inference", "serve", "training", "memory", "quickstart", "verify", "cli", "__main__"]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """mmret module -> the mmret modules it imports anywhere in its body (function-level too)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                # `from a.b import c` imports a.b, and a.b.c when c is a module
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                            for a in node.names}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def test_no_import_cycle_inside_mmret():
    graph, state, stack = imports(), {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_the_cycle_check_sees_a_cycle(tmp_path, monkeypatch):
    """The check itself: two modules importing each other inside functions are caught."""
    fake = tmp_path / "mmret"
    fake.mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "a.py").write_text("def f():\n    from mmret.b import g\n")
    (fake / "b.py").write_text("def g():\n    import mmret.a\n")
    monkeypatch.setattr(__import__(__name__), "PACKAGE", fake)
    with pytest.raises(pytest.fail.Exception, match="import cycle: mmret.a -> mmret.b -> mmret.a"):
        test_no_import_cycle_inside_mmret()


def layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1]) if "." in module else -1


def test_data_flows_one_way_between_the_subpackages():
    upward = sorted(f"{a} -> {b}" for a, targets in imports().items() for b in targets
                    if "." in a and layer(b) > layer(a))
    assert not upward, "modules that reach back up: " + "; ".join(upward)


def test_no_module_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > 500}
    assert not long


# ---------------------------------------------------------------------------- a method from outside


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world


def test_a_method_registered_from_a_test_file_trains_through_the_cli(world, tmp_path, monkeypatch):
    """A new features-method, defined here with its own config and registered; nothing under mmret/
    knows it. `mmret train --method shared` trains it on the example data and `mmret eval` scores it."""
    from dataclasses import dataclass

    from mmret.methods import METHODS, MethodConfig, register_method
    from mmret.methods.features import FeatureContext, FeaturesMethod
    from mmret.models import DualEncoder
    from mmret.models.heads import InputNorm
    from mmret.models.temperature import build_temperature

    @dataclass
    class SharedConfig(MethodConfig):
        method: str = "shared"
        width: int = 24  # the shared space before the last projection

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

        def build(self, cfg, ctx: FeatureContext) -> DualEncoder:
            m = cfg.method
            shared = nn.Linear(m.width, m.embed_dim)
            return DualEncoder(SharedHead(ctx.dims.item_dim, shared), SharedHead(ctx.dims.text_dim, shared),
                               m.embed_dim, build_temperature(m.temperature, m.init_temperature))

    monkeypatch.setitem(METHODS, "shared", None)  # so the registration below is undone after the test
    register_method(SharedMethod())
    monkeypatch.setenv("MMRET_DATA_DIR", str(world["root"] / "data"))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(tmp_path / "runs"))
    runner = CliRunner()
    result = runner.invoke(app, ["train", "--method", "shared", "--vision", world["vit"], "--text", world["bert"],
                                 "--epochs", "6", "--batch-size", "16", "--embed-dim", "16", "--patience", "0",
                                 "--name", "shared-run"])
    assert result.exit_code == 0, result.output
    history = pd.read_parquet(tmp_path / "runs" / "shared-run" / "metrics.parquet")
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0] - 0.2
    assert '"width": 24' in (tmp_path / "runs" / "shared-run" / "config.json").read_text()
    scored = runner.invoke(app, ["eval", "--run", "shared-run", "--format", "json"])
    assert scored.exit_code == 0, scored.output


def test_a_text_search_on_a_heads_run_loads_only_the_text_tower(world, tmp_path, monkeypatch):
    from mmret.encoders import load as loading
    from mmret.training import train
    from mmret.runs import RunConfig, with_overrides

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
