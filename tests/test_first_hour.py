"""What a new user meets in the first hour: progress lines when output goes to a file or a pipe, the
default method chosen by a rule and said (with every other default taken), warnings where numbers
mislead (too short a training, a query outside a scratch tokenizer's words, the paired test in
words), and files other users of the machine may read."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import tiny_models
import torch
from typer.testing import CliRunner

from mmret.cli import app
from mmret.common import io
from mmret.common.progress import LineReporter, _LineTask, duration
from mmret.data import PrepareConfig, prepare
from mmret.evaluation.retrieval import EvalResult, comparison_sentence
from mmret.inference.search import QueryResult
from mmret.methods.choice import RELATIONAL_SETTINGS, Signals, choose_method, relational_share, signals
from mmret.metrics.retrieval import PairedDiff
from mmret.training.loop import MIN_STEPS, plan_notes

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- progress without a terminal


def test_a_line_says_count_rate_eta_and_the_latest_numbers():
    task = _LineTask(LineReporter(print), "training", 1200, "pairs", started=100.0)
    assert task.line(102.0) == "training: 0/1,200 pairs (0%), - pairs/s, 2s so far"
    task.advance(32)  # the first batch: a rate is counted from here on
    task.first = (110.0, 32)
    task.advance(288, loss=1.23456, lr=0.003)
    assert task.line(120.0) == ("training: 320/1,200 pairs (27%), 28.8 pairs/s, eta 31s, 20s so far, loss 1.235, "
                                "lr 0.003")
    assert task.end_line(150.0) == "training: 320 pairs in 50s (7.2 pairs/s), loss 1.235, lr 0.003"
    assert [duration(s) for s in (4.4, 59.6, 185, 3725)] == ["4s", "1:00", "3:05", "1:02:05"]


def test_lines_come_while_one_long_batch_holds_the_work():
    lines: list[str] = []
    reporter = LineReporter(lines.append, every=0.05)
    with reporter.task("embedding", total=10, unit="rows") as task:
        time.sleep(0.4)  # nothing advances: the lines still come, from the reporter's own thread
        task.advance(10)
    assert len(lines) >= 3 and all(re.fullmatch(r"embedding: 0/10 rows \(0%\), - rows/s, \d+s so far", x)
                                   for x in lines[:-1]), lines
    assert re.fullmatch(r"embedding: 10 rows in \d+s \(.+ rows/s\)", lines[-1])
    assert not [t for t in threading.enumerate() if t.name == "mmret-progress"]  # the thread ends with the last task
    quiet: list[str] = []
    with LineReporter(quiet.append, every=5.0).task("short", total=3) as task:
        task.advance(3)
    assert quiet == []  # work shorter than a line's interval says nothing


def test_the_quick_start_piped_to_a_file_prints_progress(tmp_path):
    """`mmret quickstart > log 2>&1`: the steps, the plan, plain progress lines with rates and ETAs."""
    env = {**os.environ, "MMRET_PROGRESS_SECONDS": "0.5", "MMRET_DATA_DIR": str(tmp_path / "data"),
           "MMRET_RUNS_DIR": str(tmp_path / "runs"), "PYTHONPATH": str(REPO), "COLUMNS": "200"}
    with open(tmp_path / "log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "mmret", "quickstart", "--epochs", "1"], stdout=log,
                              stderr=subprocess.STDOUT, env=env, cwd=tmp_path, timeout=900)
    text = (tmp_path / "log").read_text()
    assert done.returncode == 0, text
    for step in range(1, 5):
        assert f"quick start {step} of 4: " in text
    assert re.search(r"^training scratch on example: 400 train / 50 val images, 13 steps \(13 an epoch, 0 of "
                     r"warm-up\), \w+ on cpu, 1 process$", text, re.M), text
    assert "note: 13 optimizer steps (0 of warm-up) are too few to learn (fewer than 50)" in text
    progress = re.findall(r"^training: ([\d,]+)/400 pairs \(\d+%\), ([\d.,-]+) pairs/s(, eta [\d:]+s?)?, .*so far",
                          text, re.M)
    assert len(progress) >= 2 and any(eta for _, _, eta in progress), text
    assert re.search(r"^training: 400 pairs in [\d:]+s? \([\d.,]+ pairs/s\), loss [\d.]+", text, re.M)
    assert "\x1b[" not in text and "━" not in text.split("example (example)")[0]  # no bars redrawn in a log


PROGRESS = re.compile(r"^(?P<what>[^:\n]+): [\d,]+/[\d,]+ (?P<unit>\w+) \(\d+%\), [\d.,-]+ (?P=unit)/s"
                      r"(, eta [\d:]+s?)?, [\d:]+s? so far", re.M)
ENDED = re.compile(r"^(?P<what>[^:\n]+): [\d,]+ (?P<unit>\w+) in [\d:]+s?( \([\d.,]+ (?P=unit)/s\))?", re.M)


@pytest.fixture(scope="module")
def busy(tmp_path_factory):
    """A heads run on tiny towers, a gallery it has never embedded and a class-folder dataset: work
    that `serve`, `eval --task classification` and `probe-memory` do before they answer."""
    from test_eval_suite import COLOURS, SHAPES, shape_picture

    from mmret import training
    from mmret.runs import RunConfig, with_overrides

    root = tmp_path_factory.mktemp("busy")
    data, runs = root / "data", root / "runs"
    prepare(PrepareConfig(source="example", count=40, data_dir=data))
    prepare(PrepareConfig(source="example", count=300, name="gallery", data_dir=data))
    for colour in COLOURS:
        for i in range(30):
            shape_picture(root / "raw" / colour / f"{SHAPES[i % 3]}{i}.png", colour, SHAPES[i % 3], i % 4)
    prepare(PrepareConfig(source="classes", root=root / "raw", name="shapes", data_dir=data))
    vit, bert = tiny_models.save_tiny_timm_vit(root / "vit"), tiny_models.save_tiny_bert(root / "bert")
    training.train(with_overrides(RunConfig(), dict(
        method="heads", dataset="example", item=str(vit), text=str(bert), data_dir=data, runs_dir=runs, epochs=1,
        batch_size=16, embed_dim=16, name="tiny")))
    return {"data": data, "runs": runs, "vit": vit, "bert": bert}


def _piped_env(busy) -> dict[str, str]:
    return {**os.environ, "MMRET_PROGRESS_SECONDS": "0.05", "MMRET_DATA_DIR": str(busy["data"]),
            "MMRET_RUNS_DIR": str(busy["runs"]), "PYTHONPATH": str(REPO), "COLUMNS": "200"}


@pytest.mark.parametrize("command, steps", [
    (["serve", "--run", "tiny", "--dataset", "gallery", "--port", "0"], ["images · vit", "captions · bert"]),
    (["eval", "--run", "tiny", "--task", "classification", "--dataset", "shapes", "--split", "all"], ["images · vit"]),
    (["eval", "--run", "tiny", "--task", "linear-probe", "--dataset", "shapes"],
     ["fitting the linear probe (choosing C)"]),
    (["probe-memory", "--vram", "6", "--method", "heads", "--vision", "{vit}", "--text", "{bert}", "--dataset",
      "example"], ["estimating peak memory"]),
], ids=["serve's gallery", "classification", "linear probe", "probe-memory"])
def test_long_steps_print_progress_lines_into_a_pipe(busy, tmp_path, command, steps):
    """Each command's long steps, with output to a pipe: plain lines with the count, the rate and the
    time so far, and one when the step ends; no bars redrawn in place."""
    args = [sys.executable, "-m", "mmret", *[a.format(**busy) for a in command]]
    with subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_piped_env(busy),
                          cwd=tmp_path) as process:
        lines: list[str] = []
        for line in process.stdout:  # serve never ends by itself: it is stopped once it says it serves
            lines.append(line)
            if line.startswith("serving "):
                process.terminate()
        process.wait(timeout=60)
    text = "".join(lines)
    assert command[0] == "serve" or process.returncode == 0, text
    assert "\x1b[" not in text and "━━" not in text.split("┏")[0], text
    for step in steps:
        assert step in {m["what"] for m in PROGRESS.finditer(text)}, text
        assert step in {m["what"] for m in ENDED.finditer(text)}, text


def test_eval_and_search_of_a_stopped_run_say_which_checkpoint(busy, monkeypatch):
    from mmret import training
    from mmret.runs import RunConfig, with_overrides
    from mmret.training import loop

    real_step = loop.train_step

    def step_then_stop(s, items, texts, *negatives):
        if s.state.step == 3:  # in the middle of epoch 2 of 3 (2 steps an epoch)
            raise KeyboardInterrupt
        return real_step(s, items, texts, *negatives)

    monkeypatch.setattr(loop, "train_step", step_then_stop)
    with pytest.raises(training.TrainingInterrupted):
        training.train(with_overrides(RunConfig(), dict(
            method="heads", dataset="example", item=str(busy["vit"]), text=str(busy["bert"]), data_dir=busy["data"],
            runs_dir=busy["runs"], epochs=3, batch_size=16, embed_dim=16, name="stopped")))
    monkeypatch.setenv("MMRET_DATA_DIR", str(busy["data"]))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(busy["runs"]))
    line = re.compile(r"^run stopped, its (best|last) checkpoint \(epoch 1, step (2, val mean recall [\d.]+|3)\); "
                      r"the run stopped at epoch \d of 3 without finishing \(`mmret train --resume stopped` goes on\)$",
                      re.M)
    for args in (["eval", "--run", "stopped"], ["eval", "--run", "stopped", "--checkpoint", "last"],
                 ["search", "a red circle", "--run", "stopped", "-k", "2"]):
        out = runner.invoke(app, args)
        assert out.exit_code == 0, out.output
        said = " ".join(out.stderr.split(" \n"))
        assert line.search(said), said
        assert f"its {'last' if 'last' in args else 'best'} checkpoint" in said
    newest = runner.invoke(app, ["eval", "--run", "tiny"])  # a finished run the user named: nothing to say
    assert newest.exit_code == 0 and "checkpoint" not in newest.stderr, newest.stderr


def test_a_towers_note_is_said_once_however_often_it_loads(tmp_path, caplog):
    """serve loads the item tower for the gallery and again for the queries: its note comes once."""
    import logging

    from mmret.encoders import load_image_encoder

    dino = tiny_models.save_tiny_dinov2(tmp_path / "dino")  # no preprocessor_config.json: a note
    with caplog.at_level(logging.WARNING, logger="mmret.encoders"):
        for _ in range(3):
            load_image_encoder(str(dino), image_size=32)
    assert caplog.text.count("no preprocessor_config.json") == 1, caplog.text


def test_a_tower_not_on_this_machine_names_the_option_that_takes_a_folder(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("MMRET_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(tmp_path / "runs"))
    prepare(PrepareConfig(source="example", count=20, data_dir=tmp_path / "data"))
    bert = tiny_models.save_tiny_bert(tmp_path / "bert")
    out = runner.invoke(app, ["train", "--method", "heads", "--text", str(bert), "--epochs", "1"])
    assert out.exit_code == 1
    assert out.stderr.splitlines()[-1] == (
        "error: model 'timm/vit_small_patch16_224.dino' (--vision dino-vits16) is not in the local Hugging Face "
        "cache and HF_HUB_OFFLINE is set; download it on a connected machine, or give --vision the path of a local "
        "model folder")
    text = runner.invoke(app, ["train", "--method", "heads", "--vision", str(tmp_path / "no"), "--text",
                               "mmret-test/not-cached", "--epochs", "1"])
    assert text.exit_code == 1 and "--vision" not in text.stderr  # a folder that is not there says so first
    vit = tiny_models.save_tiny_timm_vit(tmp_path / "vit")
    text = runner.invoke(app, ["train", "--method", "heads", "--vision", str(vit), "--text", "mmret-test/not-cached",
                               "--epochs", "1"])
    assert text.exit_code == 1 and text.stderr.splitlines()[-1] == (
        "error: model 'mmret-test/not-cached' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
        "download it on a connected machine, or give --text the path of a local model folder")


# ---------------------------------------------------------------------------- the default method


def test_the_rule_picks_heads_on_a_cpu_and_a_gpu_and_says_why():
    cpu = choose_method(Signals(device="cpu", dataset="tux", captions=430))
    assert cpu.method == "heads" and "10-40x faster than bridge on a CPU" in cpu.why
    assert cpu.line().startswith("method: heads for the 430 captions of tux on cpu, chosen because heads train")
    gpu = choose_method(Signals(device="cuda"))
    assert gpu.method == "heads" and gpu.why.startswith("bridge has not beaten heads beyond noise")
    assert choose_method(Signals(device="cpu", model=True)).method == "lora"
    assert choose_method(Signals(device="cpu", asked=("bridge",), asked_by="--queries")).line().startswith(
        "method: bridge on cpu, chosen because --queries is a setting of bridge")
    assert signals({"rank": 64, "embed_dim": 32}, "cuda").asked == ("lora",)
    assert signals({"head_layers": 1}, "cuda").asked[0] == "heads"  # heads has it too: no reason to leave heads


def test_captions_that_name_relations_get_the_bridge_with_wrong_captions():
    titles_and_relations = ["A shipwreck.", "sleeping bear", "a dog to the left of a cat", "a cup above a bowl"]
    assert relational_share(titles_and_relations) == 0.5
    assert relational_share(["a dog next to a cat", "A chick inside an egg.", None]) == 0.5  # next to: symmetric
    titles = choose_method(Signals(device="cpu", dataset="tux", captions=538, relational=1 / 538))
    assert titles.method == "heads" and titles.settings == {}
    rel = choose_method(Signals(device="cpu", dataset="rel", captions=2358, relational=1.0))
    assert rel.method == "bridge" and rel.settings == RELATIONAL_SETTINGS
    assert rel.line().startswith("method: bridge with --caption-negatives swap,relation --queries 8 --bridge-width 192 "
                                 "--token-pool 2 --lr 0.001 for the 2,358 captions of rel on cpu, chosen because 100% "
                                 "of its captions say where one thing is relative to another")
    heads_only = Signals(device="cpu", relational=1.0, asked=("heads",), asked_by="--head-layers")
    assert choose_method(heads_only).method == "heads"  # a setting only heads has keeps heads


def test_train_says_the_method_it_chose_and_every_default(tmp_path, monkeypatch):
    monkeypatch.setenv("MMRET_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(tmp_path / "runs"))
    prepare(PrepareConfig(source="example", count=20, data_dir=tmp_path / "data"))
    vit, bert = tiny_models.save_tiny_timm_vit(tmp_path / "vit"), tiny_models.save_tiny_bert(tmp_path / "bert")
    out = runner.invoke(app, ["train", "--vision", str(vit), "--text", str(bert), "--epochs", "1", "--batch-size",
                              "8", "--embed-dim", "16"])
    assert out.exit_code == 0, out.output
    said = out.stderr.splitlines()
    # the example's captions name relations ("a red circle above a blue square"): the rule takes the bridge
    assert said[0].startswith("method: bridge with --caption-negatives swap,relation --queries 8 --bridge-width 192 "
                              "--token-pool 2 --lr 0.001 for the 100 captions of example on cpu, chosen because ")
    assert said[0].endswith("(--method picks another)")
    assert said[1] == "dataset: example, the default (--dataset NAME trains on one you prepared)"
    assert said[2].startswith("training bridge on example: 16 train / 2 val images, 2 steps (2 an epoch, 0 of warm-up)")
    assert said[2].endswith("fp32 on cpu, 1 process") and said[3].startswith("note: 2 optimizer steps")
    run = json.loads((tmp_path / "runs" / "latest" / "config.json").read_text())
    assert run["method"]["method"] == "bridge" and run["train"]["caption_negatives"] == "swap,relation"
    assert run["method"]["queries"] == 8 and run["train"]["lr"] == 0.001
    towers = runner.invoke(app, ["train", "--dry-run", "--method", "lora"])
    assert towers.exit_code == 0, towers.output
    assert ("towers: --vision dino-vits16 (timm/vit_small_patch16_224.dino) and --text distilbert "
            "(distilbert/distilbert-base-uncased), the defaults; each takes a preset, a hub id or a local model "
            "folder") in towers.stderr
    plan = runner.invoke(app, ["probe-memory", "--vram", "6", "--estimate", "--vision", str(vit), "--text", str(bert),
                               "--batch-size", "8", "--embed-dim", "16"])
    assert plan.exit_code == 0, plan.output
    assert plan.stderr.startswith("method: bridge with --caption-negatives swap,relation")
    command = plan.stdout.splitlines()[-1].strip()
    assert command.startswith(f"mmret train --vision {vit} --text {bert} --batch-size 8 --embed-dim 16 "
                              "--method bridge --caption-negatives swap,relation --queries 8 --bridge-width 192 "
                              "--token-pool 2 --lr 0.001")


def test_a_training_too_short_to_learn_is_said_before_it_starts():
    assert plan_notes(MIN_STEPS, 0.05) == []
    short = plan_notes(8, 0.05)
    assert short == ["8 optimizer steps (0 of warm-up) are too few to learn (fewer than 50): its numbers will sit "
                     "near chance. Train longer: more --epochs, or a smaller --batch-size (more steps an epoch)"]
    assert plan_notes(200, 0.6) == ["120 of the 200 steps warm up (--warmup 0.6): the rate is near its peak only "
                                    "briefly; a --warmup of 0.05 to 0.1 is usual"]


# ---------------------------------------------------------------------------- numbers that mislead


def test_a_scratch_run_knows_the_words_of_its_training_captions_only(tmp_path, monkeypatch):
    from mmret import training
    from mmret.inference.loaded import LoadedRun
    from mmret.runs import RunConfig, with_overrides

    data, runs = tmp_path / "data", tmp_path / "runs"
    prepare(PrepareConfig(source="example", count=20, data_dir=data))
    tiny = training.train(with_overrides(RunConfig(), dict(
        method="scratch", dataset="example", data_dir=data, runs_dir=runs, epochs=1, batch_size=8,
        image_model="resnet10t", text_width=16, text_depth=1, embed_dim=16, vocab_size=300, max_length=16,
        workers=0, image_size=32, name="tiny"))).run_dir
    run = LoadedRun(tiny)
    assert {"a", "red", "circle", "above", "left", "of"} <= run.vocabulary and "dog" not in run.vocabulary
    assert run.unknown_words("A dog on the Beach, a RED circle") == ["dog", "beach"]  # "on the left of" is there
    assert QueryResult("a dog near a beach", [], unknown=["dog", "near", "beach"]).mostly_unknown
    assert not QueryResult("a dog on the beach", [], unknown=["dog", "beach"]).mostly_unknown
    monkeypatch.setenv("MMRET_DATA_DIR", str(data))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(runs))
    out = runner.invoke(app, ["search", "a dog on the beach", "a dog near a beach", "-k", "2"])
    assert out.exit_code == 0, out.output
    said = " ".join(out.stderr.split())
    assert ("note: 'dog', 'beach' of 'a dog on the beach' are in none of run tiny's training captions, the only words "
            "a model trained from scratch has learned: it reads the query as if they were not there") in said
    assert "note: 'dog', 'near', 'beach' of 'a dog near a beach' are in none" in said and "scores mean little" in said
    known = runner.invoke(app, ["search", "a red circle above a blue square", "-k", "2", "--json"])
    assert json.loads(known.stdout)["results"][0]["unknown_words"] == [] and "note:" not in known.stderr


def test_a_pretrained_text_tower_knows_words_beyond_the_captions(tmp_path):
    memorised = tiny_models.train_memorised(tmp_path)
    from mmret.inference.loaded import LoadedRun

    run = LoadedRun(memorised["run"])
    assert run.vocabulary is None and run.unknown_words("a dog on the beach") == []


def _result(run: str, diffs: dict[str, PairedDiff] | None = None) -> EvalResult:
    metrics = {"t2i_r1": 0.5, "t2i_r5": 0.8, "t2i_medr": 2.0, "rsum": 300.0}
    return EvalResult(run=run, dataset="d", split="test", metrics=metrics, n_items=50, n_captions=250, diffs=diffs)


def test_the_paired_test_is_said_in_words():
    first = _result("a")
    none = _result("b", {"t2i_r1": PairedDiff(0.02, -0.01, 0.05, 0.3), "t2i_r5": PairedDiff(-0.004, -0.02, 0.01, 0.6),
                         "t2i_medr": PairedDiff(-1.0, -2.0, 0.5, 0.4)})
    line = comparison_sentence(first, none, 1000)
    assert line == ("b and a do not differ beyond chance in any metric (paired bootstrap over the 50 images, 1,000 "
                    "resamples, 95%); the largest difference, t2i_r1 +0.020 [-0.010, +0.050], is within noise")
    some = _result("c", {"t2i_r1": PairedDiff(0.1, 0.04, 0.16, 0.002), "t2i_r5": PairedDiff(0.0, -0.02, 0.02, 1.0),
                         "t2i_medr": PairedDiff(2.0, 1.0, 3.0, 0.01)})
    assert comparison_sentence(first, some, 200) == (
        "c differs from a beyond chance in 2 metrics (paired bootstrap over the 50 images, 200 resamples, 95%): "
        "t2i_r1 +0.100 [+0.040, +0.160] (better); t2i_medr +2.000 [+1.000, +3.000] (worse); 1 other does not")


def test_eval_compare_prints_the_sentence(tmp_path, monkeypatch):
    memorised = tiny_models.train_memorised(tmp_path)
    monkeypatch.setenv("MMRET_DATA_DIR", str(memorised["data"]))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(memorised["runs"]))
    out = runner.invoke(app, ["eval", "--compare", "memorised,memorised", "--bootstrap", "100", "--split", "train"])
    assert out.exit_code == 0, out.output
    text = " ".join(out.stdout.split())
    assert ("memorised and memorised do not differ beyond chance in any metric (paired bootstrap over the 8 "
            "images, 100 resamples, 95%)") in text
    assert "note: memorised trained on 8 of these 8 items: its scores flatter it" in " ".join(out.stderr.split())
    test = runner.invoke(app, ["eval", "--run", "memorised"])
    assert test.exit_code == 0 and "note:" not in test.stderr  # the test split was never trained on


# ---------------------------------------------------------------------------- files others may read


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_files_are_written_with_the_users_umask(tmp_path, monkeypatch, umask, file_mode, dir_mode):
    from mmret.figures.draw import confusion_figure
    from mmret.runs.checkpoint import save_weights

    old = os.umask(umask)
    monkeypatch.setattr(io, "UMASK", umask)  # what a process started under this umask reads at import
    try:
        io.write_json(tmp_path / "result.json", {"a": 1})
        io.write_parquet(tmp_path / "table.parquet", pd.DataFrame({"a": [1]}))
        save_weights(torch.nn.Linear(2, 2), tmp_path / "weights.safetensors", {"step": 1})
        confusion_figure(torch.eye(2).numpy(), ["a", "b"], "t", tmp_path / "confusion.png")
        with io.atomic_dir(tmp_path / "folder") as tmp:
            (tmp / "inside.txt").write_text("x")
    finally:
        os.umask(old)
    for name in ("result.json", "table.parquet", "weights.safetensors", "confusion.png", "folder/inside.txt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == file_mode, name
    assert stat.S_IMODE((tmp_path / "folder").stat().st_mode) == dir_mode
