"""`mmret eval` and `mmret search` end to end on tiny towers: saved results, comparisons with a
zero-shot row, the right picture first for its own caption, JSON output, and stale indexes refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import tiny_models
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mmret.cli import app
from mmret.data import load_dataset
from mmret.evaluation.retrieval import evaluate_run
from mmret.inference.embeddings import write_run_embeddings
from mmret.inference.search import search
from mmret.metrics.retrieval import retrieval_metrics

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 12-picture dataset that a heads run memorises, and a tiny CLIP for the zero-shot row."""
    world = tiny_models.train_memorised(tmp_path_factory.mktemp("evalsearch"))
    return world | {"clip": tiny_models.save_tiny_clip(world["root"] / "clip")}


@pytest.fixture
def env(world, monkeypatch):
    monkeypatch.setenv("MMRET_DATA_DIR", str(world["data"]))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(world["runs"]))
    return world


def test_eval_saves_what_the_metrics_give(world):
    result = evaluate_run(world["run"], split="test", bootstrap=100)
    emb = write_run_embeddings(world["run"], split="test")
    direct = retrieval_metrics(torch.tensor(np.asarray(emb.items, np.float32)),
                               torch.tensor(np.asarray(emb.captions, np.float32)), emb.caption_item).metrics
    saved = json.loads((world["run"] / "eval" / "example-test.json").read_text())
    assert saved["metrics"] == pytest.approx(direct) and result.metrics == pytest.approx(direct)
    assert saved["n_items"] == 2 and saved["n_captions"] == 10
    lo, hi = saved["ci95"]["t2i_r5"]
    assert lo <= direct["t2i_r5"] <= hi


def test_cli_eval_compares_with_a_zero_shot_row(env):
    result = runner.invoke(app, ["eval", "--zero-shot", str(env["clip"]), "--compare", "memorised", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["run"] for r in rows] == ["zeroshot-clip", "memorised"]
    assert set(rows[1]["vs_first"]["t2i_r1"]) == {"delta", "low", "high", "p", "significant"}
    table = runner.invoke(app, ["eval", "--run", "memorised", "--split", "train"])
    assert table.exit_code == 0 and "example train: 8 images, 40 captions" in table.stdout


def test_search_puts_the_right_picture_first_for_its_own_caption(world):
    ds = load_dataset("example", world["data"]).split("train")
    captions = ds.captions.groupby("item_id").caption.first()
    result = search(world["run"], captions.tolist(), split="train", k=3, which="last")  # last: memorised
    firsts = [r.items[0].item_id for r in result.results]
    assert firsts == captions.index.tolist()
    assert all(r.items[0].score >= r.items[1].score >= r.items[2].score for r in result.results)


def test_search_with_a_picture_finds_itself_and_its_captions(world):
    ds = load_dataset("example", world["data"]).split("train")
    path, item_id = ds.items.path.iloc[3], ds.items.item_id.iloc[3]
    result = search(world["run"], [], item=path, split="train", k=2, which="last")
    (hit,) = result.results
    assert hit.items[0].item_id == item_id
    assert hit.captions[0].item_id == item_id


def test_cli_search_json_parses_and_reads_queries_from_stdin(env, tmp_path):
    result = runner.invoke(app, ["search", "--queries", "-", "--run", "memorised", "-k", "2", "--json",
                                 "--grid", str(tmp_path / "sheet.png")], input="a red circle\n\na blue square\n")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [q["query"] for q in data["results"]] == ["a red circle", "a blue square"]
    assert len(data["results"][0]["images"]) == 2 and (tmp_path / "sheet.png").stat().st_size > 0


def test_cli_search_without_a_query(env):
    result = runner.invoke(app, ["search", "--run", "memorised"])
    assert (result.exit_code, result.stderr.strip()) == (
        1, "error: nothing to search for: give a query text, --queries FILE, or --image PATH")


def test_an_index_of_other_embeddings_is_never_used_but_built_again(world, tmp_path):
    """The hardening issue changed this: an index whose inputs changed (here the checkpoint) is built
    again, as the embeddings are, instead of being refused; it is still never used as it was."""
    import json
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(world["run"], run, ignore=shutil.ignore_patterns("index", "embeddings"))
    search(run, ["a red circle"], split="train", k=1)  # builds the index
    meta = run / "index" / "example-train-items" / "meta.json"
    before = json.loads(meta.read_text())["fingerprint"]["checkpoint"]
    weights = load_file(str(run / "checkpoints" / "best.safetensors"))
    save_file({k: v + 0.01 for k, v in weights.items()}, str(run / "checkpoints" / "best.safetensors"))
    assert search(run, ["a red circle"], split="train", k=1).results
    after = json.loads(meta.read_text())["fingerprint"]["checkpoint"]
    assert after != before
    assert search(run, ["a red circle"], split="train", k=1, rebuild_index=True).results


def test_eval_of_a_run_that_does_not_exist(env):
    result = runner.invoke(app, ["eval", "--run", "ghost"])
    assert result.exit_code == 1 and result.stderr.startswith("error: no run 'ghost' in ")
