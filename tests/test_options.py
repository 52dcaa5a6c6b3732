"""Options owned by the config dataclasses: `mmret train`'s options generated from them (help and
defaults from the dataclass, one panel per method), `--config FILE` in JSON, YAML or TOML with the
command line winning, LoRA's alpha following the rank in one place, `--help` without torch, and
registries that refuse a taken name."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from mmret.cli import app
from mmret.errors import MmretError
from mmret.runs.settings import build_config, run_settings

runner = CliRunner()


def command(name: str):
    return typer.main.get_command(app).commands[name]


def test_every_setting_of_every_config_is_an_option_with_the_dataclass_default():
    params = {p.name: p for p in command("train").params}
    for rs in run_settings():
        s = rs.setting
        param = params[s.name]
        assert s.flag in param.opts, (s.name, param.opts)
        assert param.default is None  # not given: the file, the recipe or the dataclass decides
        shown = s.default_text()
        assert (f"[default: {shown}]" in param.help) == (shown is not None), (s.name, param.help)
        if s.kind is bool:
            assert param.secondary_opts, s.name
    assert params["rank"].help == "LoRA rank r. [default: 8]"
    assert params["alpha"].help == "LoRA scaling alpha. [default: 2 x rank]"
    assert params["item"].opts == ["--item-tower", "--vision", "--audio"]
    assert params["pretrained_image"].secondary_opts == ["--random-image"]


def test_help_groups_the_options_in_panels_per_method():
    text = runner.invoke(app, ["train", "--help"], terminal_width=200).stdout
    panels = [line[:-1] for line in text.splitlines() if line and not line.startswith(" ") and line.endswith(":")]
    assert panels[:6] == ["Options", "Run", "Data", "Towers", "Training", "Method: every method"]
    assert {"Method: lora", "Method: bridge", "Method: scratch", "Method: lora, prefix, adapter, full"} <= set(panels)
    lora = text[text.index("Method: lora:"):]
    lora = lora[:lora.index("\n\n")]
    assert [line.split()[0] for line in lora.splitlines()[1:]] == ["--rank", "--alpha", "--lora-dropout", "--targets"]
    assert "--workers" in text and text.count("CPU count") == 1  # one spelling of the workers' default


def test_help_imports_no_torch():
    code = ("import sys\nfrom mmret.cli import app\n"
            "for args in (['--help'], ['train', '--help'], ['probe-memory', '--help']):\n"
            "    try:\n        app(args)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'pandas', 'numpy', 'transformers', 'yaml') if m in sys.modules),"
            " file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ},
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "[]"


def _yaml(world) -> str:
    return (f"method:\n  method: lora\n  rank: 4\n  tower: text\n"
            f"train:\n  epochs: 3\n  batch_size: 16\n  lr: 1e-3\n  patience: 0\n"
            f"encoders:\n  vision: {world['vit']}\n  text: {world['bert']}\n"
            f"embed-dim: 16\n")


def _toml(world) -> str:
    return (f'method = "lora"\nrank = 4\ntower = "text"\nepochs = 3\nbatch-size = 16\nlr = 1e-3\npatience = 0\n'
            f'item-tower = {json.dumps(world["vit"])}\ntext = {json.dumps(world["bert"])}\nembed_dim = 16\n')


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world


@pytest.fixture
def env(world, tmp_path, monkeypatch):
    monkeypatch.setenv("MMRET_DATA_DIR", str(world["root"] / "data"))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(tmp_path / "runs"))
    return tmp_path


@pytest.mark.parametrize("suffix, write", [(".yaml", _yaml), (".toml", _toml)])
def test_train_config_file_in_yaml_or_toml_trains_and_the_command_line_wins(world, env, suffix, write):
    path = env / f"lora{suffix}"
    path.write_text(write(world))
    result = runner.invoke(app, ["train", "--config", str(path), "--epochs", "1", "--name", "r"])
    assert result.exit_code == 0, result.output
    saved = json.loads((env / "runs" / "r" / "config.json").read_text())
    assert saved["train"]["epochs"] == 1  # the command line won over the file's 3
    assert (saved["method"]["method"], saved["method"]["rank"], saved["method"]["alpha"]) == ("lora", 4, 8.0)
    assert (saved["method"]["tower"], saved["method"]["embed_dim"]) == ("text", 16)
    assert saved["train"]["lr"] == 0.001 and saved["train"]["batch_size"] == 16  # YAML reads 1e-3 as text
    assert saved["encoders"]["item"] == world["vit"]
    assert (env / "runs" / "r" / "checkpoints" / "best.safetensors").is_file()


@pytest.mark.parametrize("text, line", [
    ("rnak: 4\n", "unknown setting 'rnak' (the settings are `mmret train`'s options)"),
    ("train:\n  rank: 4\n", "'rank' is a method setting, not a train one"),
    ("epochs: three\n", "epochs must be a whole number, got 'three'"),
    ("method: lora\nrank: 0\n", "--rank must be positive, got 0"),
    ("sam: 1\n", "sam must be true or false, got 1"),
    ("- 4\n", "expected settings (name: value), got list"),
])
def test_a_bad_config_file_is_one_line_naming_it(env, text, line):
    path = env / "bad.yaml"
    path.write_text(text)
    result = runner.invoke(app, ["train", "--config", str(path), "--dry-run"])
    assert (result.exit_code, result.stderr) == (1, f"error: --config {path}: {line}\n")


def test_broken_yaml_and_toml_are_one_line(env):
    for name, text in (("bad.yaml", "epochs: [3\n"), ("bad.toml", "epochs = \n")):
        (env / name).write_text(text)
        result = runner.invoke(app, ["train", "--config", str(env / name), "--dry-run"])
        kind = "YAML" if name.endswith("yaml") else "TOML"
        assert result.exit_code == 1 and result.stderr.startswith(f"error: --config {env / name}: not valid {kind}: ")
        assert result.stderr.count("\n") == 1


def test_alpha_follows_the_rank_through_every_layer(env):
    assert build_config(given={"rank": 4}, recipe="both-r64").method.alpha == 8.0
    assert build_config(given={"rank": 4, "alpha": 3.0}, recipe="both-r64").method.alpha == 3.0
    assert build_config(given={}, recipe="both-r64").method.alpha == 128.0
    path = env / "lora.json"
    path.write_text(json.dumps({"method": {"method": "lora", "rank": 16, "alpha": 5.0}}))
    assert build_config(given={}, file=path).method.alpha == 5.0
    assert build_config(given={"rank": 2}, file=path).method.alpha == 4.0  # a new rank alone works alpha out again
    assert build_config(given={"targets": "q"}, file=path).method.alpha == 5.0


def test_a_runs_own_config_json_loads_as_the_run_does(env):
    """A run's config.json (it names its runs_dir) written before `same_caption` existed keeps the meaning
    it had (negative); a hand-written file that leaves it out gets today's default."""
    saved = build_config(given={"method": "heads"}).to_dict()
    del saved["train"]["same_caption"]
    (env / "config.json").write_text(json.dumps(saved))
    assert build_config(given={}, file=env / "config.json").train.same_caption == "negative"
    (env / "mine.json").write_text(json.dumps({"train": {"epochs": 2}}))
    assert build_config(given={}, file=env / "mine.json").train.same_caption == "positive"


# ---------------------------------------------------------------------------- registries refuse a taken name


def read_coco_again(root, cfg):
    raise AssertionError("never registered")


def build_text_again(source, weights, **options):
    raise AssertionError("never registered")


def test_every_registry_refuses_a_taken_name_naming_both_places():
    import dataclasses

    from mmret.data.readers import get_reader, register_reader
    from mmret.encoders.load import tower_modality
    from mmret.encoders.presets import ENCODERS, register_preset
    from mmret.encoders.registry import register_family
    from mmret.modalities import MODALITIES, register_modality

    get_reader("coco")
    with pytest.raises(MmretError, match=r"dataset reader 'coco' is already registered by mmret\.data\.readers\.coco\."
                                         r"\w+; test_options\.read_coco_again cannot register it again"):
        register_reader("coco")(read_coco_again)
    tower_modality("distilbert")  # imports the built-in families
    with pytest.raises(MmretError, match=r"encoder family 'text' is already registered by mmret\.encoders\.text\."
                                         r"build_text_encoder; test_options\.build_text_again cannot"):
        register_family("text", build_text_again)
    with pytest.raises(MmretError, match="modality 'image' is already registered by mmret.modalities.image; "):
        register_modality(dataclasses.replace(MODALITIES["image"], plural="pictures"))
    with pytest.raises(MmretError, match="encoder preset 'clip-b32' is already registered by the preset for "):
        register_preset(dataclasses.replace(ENCODERS["clip-b32"], source="someone/else"))
    assert MODALITIES["image"].plural == "images" and ENCODERS["clip-b32"].source != "someone/else"
