"""The command line: help text everywhere, the version, one red error line and exit code 1."""

from __future__ import annotations

import pytest
import typer
from typer.testing import CliRunner

from mmret import __version__
from mmret.cli import app

runner = CliRunner()


def commands():
    group = typer.main.get_command(app)
    return group, group.commands


def test_every_command_and_option_has_help_text():
    group, cmds = commands()
    assert cmds, "no commands registered"
    for name, cmd in cmds.items():
        assert cmd.help, f"command {name} has no help"
        for param in cmd.params:
            assert getattr(param, "help", None), f"{name}: {param.name} has no help text"


def test_help_lists_the_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for name in commands()[1]:
        assert name in result.output


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"mmret {__version__}"


def test_prepare_example_prints_the_summary(data_dir):
    result = runner.invoke(app, ["prepare", "example", "--count", "30"])
    assert result.exit_code == 0, result.output
    assert "│ total │     30 │      150 │           5.00 │" in result.stdout
    assert (data_dir / "example" / "captions.parquet").is_file()


def test_error_is_one_red_line_and_exit_code_1(data_dir):
    assert runner.invoke(app, ["prepare", "example", "--count", "20"]).exit_code == 0
    result = runner.invoke(app, ["prepare", "example", "--count", "20"])
    assert result.exit_code == 1
    assert result.stderr == (f"error: dataset 'example' already exists at {data_dir / 'example'}; pass --force to "
                             "replace it\n")
    assert "Traceback" not in result.output


@pytest.mark.parametrize("args, line", [
    (["prepare", "imagenet"], "error: unknown source 'imagenet'; choose one of flickr30k, coco, flickr8k, folder, "
                              "classes, example, wds, sugar-crepe, winoground, clotho, audiocaps"),
    (["prepare", "folder"], "error: prepare folder needs --root: the folder that holds the dataset"),
    (["prepare", "folder", "--val", "2"], "error: --val must be a fraction in [0, 1), got 2.0"),
])
def test_bad_input_lines(data_dir, args, line):
    result = runner.invoke(app, args)
    assert (result.exit_code, result.stderr.strip()) == (1, line)


def test_missing_root_folder(data_dir, tmp_path):
    result = runner.invoke(app, ["prepare", "flickr30k", "--root", str(tmp_path / "nowhere")])
    assert (result.exit_code, result.stderr.strip()) == (1, f"error: --root {tmp_path / 'nowhere'} is not a folder")


def test_debug_shows_the_traceback(data_dir, monkeypatch):
    monkeypatch.setenv("MMRET_DEBUG", "1")
    result = runner.invoke(app, ["prepare", "imagenet"])
    assert result.exit_code == 1
    assert type(result.exception).__name__ == "MmretError"


def test_data_dir_option_moves_the_data_root(tmp_path, data_dir):
    other = tmp_path / "elsewhere"
    result = runner.invoke(app, ["prepare", "example", "--count", "12", "--data-dir", str(other)])
    assert result.exit_code == 0
    assert (other / "example" / "dataset.json").is_file() and not (data_dir / "example").exists()


def test_a_run_name_beside_a_model_folder_of_that_name_is_the_run(tmp_path, monkeypatch, memorised):
    import shutil

    from mmret.runs import resolve_run

    runs = tmp_path / "runs"
    shutil.copytree(memorised["run"], runs / "dino")
    (tmp_path / "dino").mkdir()
    (tmp_path / "dino" / "config.json").write_text('{"model_type": "dinov2"}')  # a model folder in the working folder
    monkeypatch.chdir(tmp_path)
    assert resolve_run("dino", runs) == (runs / "dino").resolve()
