"""`mmret eval` beyond retrieval, end to end on tiny towers: zero-shot classification, the linear
probe, CLIP_benchmark's JSON, the embedding map and the failure gallery, and their bad inputs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import tiny_models
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from mmret import training
from mmret.cli import app
from mmret.data import PrepareConfig, load_dataset, prepare
from mmret.errors import MmretError
from mmret.evaluation.classification import evaluate_classification, zero_shot_weights
from mmret.evaluation.linear_probe import C_GRID
from mmret.evaluation.suite import EvalConfig, run_eval
from mmret.evaluation.templates import IMAGENET_TEMPLATES
from mmret.figures.failures import failure_gallery
from mmret.inference.embeddings import write_run_embeddings
from mmret.inference.loaded import LoadedRun
from mmret.metrics.classification import classification_metrics
from mmret.metrics.retrieval import retrieval_metrics
from mmret.modalities import get_modality
from mmret.runs import RunConfig, with_overrides

runner = CliRunner()
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220)}
SHAPES = ("circle", "square", "triangle")


def shape_picture(path, colour, shape, jitter):
    img = Image.new("RGB", (32, 32), "white")
    draw = ImageDraw.Draw(img)
    box = (4 + jitter, 4, 26 + jitter, 26)
    {"circle": draw.ellipse, "square": draw.rectangle}.get(shape, lambda b, fill: draw.polygon(
        [(15 + jitter, 4), (4 + jitter, 26), (26 + jitter, 26)], fill=fill))(box, fill=COLOURS[colour])
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Coloured shapes in one folder per colour (30 pictures, each with a caption beside it), a
    heads run trained on them, a dataset without labels and a tiny CLIP for the zero-shot row."""
    root = tmp_path_factory.mktemp("suite")
    data, runs, raw = root / "data", root / "runs", root / "raw"
    for colour in COLOURS:
        for i in range(10):
            shape = SHAPES[i % 3]
            shape_picture(raw / colour / f"{shape}{i}.png", colour, shape, i % 4)
            (raw / colour / f"{shape}{i}.txt").write_text(f"a {colour} {shape}\n")
    prepare(PrepareConfig(source="classes", root=raw, name="shapes", val=0.2, test=0.3, data_dir=data))
    prepare(PrepareConfig(source="example", count=12, data_dir=data))
    vit = tiny_models.save_tiny_timm_vit(root / "vit", spread=20.0)
    bert = tiny_models.save_tiny_bert(root / "bert", pooling_config="mean")
    cfg = with_overrides(RunConfig(), dict(method="heads", dataset="shapes", item=str(vit), text=str(bert),
                                           data_dir=data, runs_dir=runs, epochs=20, batch_size=8, lr=1e-2,
                                           dropout=0.0, embed_dim=32, patience=0, name="shapes-heads"))
    run = training.train(cfg).run_dir
    return {"root": root, "data": data, "runs": runs, "run": run, "clip": tiny_models.save_tiny_clip(root / "clip")}


@pytest.fixture
def env(world, monkeypatch):
    monkeypatch.setenv("MMRET_DATA_DIR", str(world["data"]))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(world["runs"]))
    return world


def test_classification_scores_what_the_embeddings_give(world):
    result = evaluate_classification(world["run"], split="test", bootstrap=200)
    run = LoadedRun(world["run"])
    emb = write_run_embeddings(run, "shapes", "test")
    weights = zero_shot_weights(run.encode_texts, [[t.format(c=c) for t in IMAGENET_TEMPLATES]
                                                   for c in ("blue", "green", "red")])
    ds = load_dataset("shapes", world["data"]).items.set_index("item_id")
    target = torch.tensor([["blue", "green", "red"].index(ds.loc[i, "label"]) for i in emb.item_table["item_id"]])
    direct = classification_metrics(torch.from_numpy(np.asarray(emb.items, np.float32)) @ weights.T, target)
    assert result.metrics == pytest.approx(direct.metrics, nan_ok=True)
    assert result.labels == ["blue", "green", "red"] and result.counts == [3, 3, 3] and result.templates == 80
    assert result.confusion.sum() == 9 and np.trace(result.confusion) == round(9 * direct.metrics["acc1"])
    assert result.train_overlap == 0 and result.chance["acc1"] == pytest.approx(1 / 3)
    lo, hi = result.ci["acc1"]
    assert lo <= result.metrics["acc1"] <= hi and "acc5" not in result.ci  # top-5 of 3 classes is nan
    saved = json.loads(result.path.read_text())
    assert saved["metrics"]["acc1"] == result.metrics["acc1"] and saved["confusion"] == result.confusion.tolist()
    assert result.confusion_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_classification_on_the_training_split_says_so(env):
    result = runner.invoke(app, ["eval", "--task", "classification", "--split", "train"])
    assert result.exit_code == 0, result.output
    assert ("note: shapes-heads trained on 15 of these 15 items: its scores flatter it"
            in " ".join(result.stderr.split()))
    assert "zero-shot classification of 15 items into 3 classes, 80 prompts each" in " ".join(result.stdout.split())


def test_clip_benchmark_json_has_its_schema_and_the_native_numbers(env):
    out = runner.invoke(app, ["eval", "--format", "clip-benchmark", "--recall-k", "2,1"])
    assert out.exit_code == 0, out.output
    rec = json.loads(out.stdout)
    assert set(rec) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
    assert (rec["dataset"], rec["task"], rec["language"], rec["pretrained"]) == ("shapes", "zeroshot_retrieval", "en",
                                                                                "shapes-heads")
    assert rec["model"] == "mmret-heads-vit-bert"
    # the recalls under CLIP_benchmark's tie rule; the saved JSON keeps them beside mmret's when ties made them differ
    ties = json.loads((env["run"] / "eval" / "shapes-test.json").read_text()).get("clip_benchmark_ties", {})
    native = json.loads(runner.invoke(app, ["eval", "--format", "json", "--recall-k", "1,2"]).stdout)[0]["metrics"]
    expected = {f"{name}@{k}": ties.get(key, native[key]) for name, side in (("image_retrieval_recall", "t2i"),
                                                                             ("text_retrieval_recall", "i2t"))
                for k in (1, 2) for key in [f"{side}_r{k}"]}
    assert rec["metrics"] == pytest.approx(expected, abs=1e-6)
    saved = (env["run"] / "eval" / "clip_benchmark"
             / "shapes_shapes-heads_mmret-heads-vit-bert_en_zeroshot_retrieval.json")
    assert json.loads(saved.read_text()) == rec


def test_clip_benchmark_classification_and_linear_probe_records(env):
    out = runner.invoke(app, ["eval", "--task", "classification", "--format", "clip-benchmark"])
    assert out.exit_code == 0, out.output
    rec = json.loads(out.stdout)
    assert rec["task"] == "zeroshot_classification" and set(rec["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
    assert rec["classnames"] == ["blue", "green", "red"] and "templates" not in rec  # the default set
    probe = json.loads(runner.invoke(app, ["eval", "--task", "linear-probe", "--format", "clip-benchmark"]).stdout)
    assert probe["task"] == "linear_probe"
    assert {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "C", "fewshot_k"} <= set(probe["metrics"])


def test_zero_shot_clip_classifies_too(env):
    out = runner.invoke(app, ["eval", "--task", "classification", "--zero-shot", str(env["clip"]),
                              "--dataset", "shapes", "--compare", "shapes-heads", "--format", "json"])
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert [r["run"] for r in rows] == ["zeroshot-clip", "shapes-heads"]
    assert rows[0]["train_overlap"] is None and rows[1]["train_overlap"] == 0


def test_classification_reads_a_dataset_from_data_dir(env, tmp_path):
    elsewhere = tmp_path / "data"
    prepare(PrepareConfig(source="classes", root=env["root"] / "raw", name="moved", test=0.5, data_dir=elsewhere))
    out = runner.invoke(app, ["eval", "--task", "classification", "--dataset", "moved", "--data-dir", str(elsewhere),
                              "--format", "json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)[0]["n_items"] == 15


def test_linear_probe(world):
    (result,) = run_eval([world["run"]], EvalConfig(task="linear-probe")).results
    assert result.sizes == {"train": 15, "val": 6, "test": 9}
    assert result.C in C_GRID and 0 <= result.metrics["lp_acc1"] <= 1 and np.isnan(result.metrics["lp_acc5"])
    assert result.val_acc1 == max(result.tried.values())
    assert json.loads(result.path.read_text())["C"] == result.C


def test_custom_templates(env, tmp_path):
    (tmp_path / "t.txt").write_text("# mine\na {c} shape\na picture of a {}\n")
    out = runner.invoke(app, ["eval", "--task", "classification", "--templates", str(tmp_path / "t.txt"),
                              "--format", "json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)[0]["templates_per_class"] == 2
    out = runner.invoke(app, ["eval", "--task", "classification", "--templates", str(tmp_path / "t.txt"),
                              "--format", "clip-benchmark"])
    assert json.loads(out.stdout)["templates"] == ["a {c} shape", "a picture of a {c}"]
    (tmp_path / "own.json").write_text(json.dumps({"red": ["a red one"], "blue": ["a blue one", "blue"]}))
    out = runner.invoke(app, ["eval", "--task", "classification", "--templates", str(tmp_path / "own.json"),
                              "--run", "shapes-heads"])  # a run named: nothing to say before the error
    assert out.stderr.strip() == ("error: --templates gives no prompts for 1 classes: green; its keys must be the "
                                  "dataset's labels")


@pytest.mark.parametrize("content, line", [
    ("a photo\n", "error: t.txt line 1: a template needs {c} (or {}) where the class name goes, and no other "
                  "braces; got 'a photo'"),
    ("a {c} of {x}\n", "error: t.txt line 1: a template needs {c} (or {}) where the class name goes, and no other "
                       "braces; got 'a {c} of {x}'"),
    ("\n\n", "error: --templates {path} holds no templates: write one per line, e.g. 'a photo of a {c}.'"),
])
def test_bad_template_files(env, tmp_path, content, line):
    (tmp_path / "t.txt").write_text(content)
    out = runner.invoke(app, ["eval", "--task", "classification", "--templates", str(tmp_path / "t.txt")])
    assert (out.exit_code, out.stderr.strip()) == (1, line.replace("{path}", str(tmp_path / "t.txt")))


@pytest.mark.parametrize("args, line", [
    (["--task", "classification", "--dataset", "example"],
     "error: dataset 'example' has no class labels; prepare a folder of class subfolders with "
     "`mmret prepare classes --root DIR` and evaluate on that"),
    (["--task", "sorting"], "error: --task must be retrieval, classification, linear-probe, got 'sorting'"),
    (["--recall-k", "1,x"],
     "error: --recall-k must be positive whole numbers separated by commas (e.g. 1,5,10), got '1,x'"),
    (["--recall-k", "0"],
     "error: --recall-k must be positive whole numbers separated by commas (e.g. 1,5,10), got '0'"),
    (["--task", "linear-probe", "--split", "val"],
     "error: the linear probe fits on train, chooses its regularisation on val and is scored on test; "
     "drop --split val"),
    (["--task", "linear-probe", "--bootstrap", "100"],
     "error: --bootstrap applies to retrieval and classification, not to the linear probe"),
    (["--templates", "t.txt"], "error: --templates applies to --task classification only"),
    (["--map", "m.png", "--compare", "shapes-heads,shapes-heads"],
     "error: --map and --failures draw one run; evaluate the runs one at a time to draw each"),
    (["--map", "m.png", "--map-method", "pca"], "error: --map-method must be umap or tsne, got 'pca'"),
    (["--failures", "f.png", "--worst", "0"], "error: --worst must be at least 1, got 0"),
    (["--format", "csv"], "error: --format must be table, markdown, json, clip-benchmark, got 'csv'"),
])
def test_bad_eval_options(env, args, line):
    out = runner.invoke(app, ["eval", *args])
    assert (out.exit_code, out.stderr.strip()) == (1, line)


@pytest.mark.parametrize("method", ["tsne", "umap"])
def test_embedding_map(env, tmp_path, method):
    out = runner.invoke(app, ["eval", "--split", "all", "--map", str(tmp_path / "map.png"), "--map-method", method])
    assert out.exit_code == 0, out.output
    assert (tmp_path / "map.png").read_bytes()[:4] == b"\x89PNG"
    assert f"map ({method}, coloured by class, 30 items, 30 captions, 30 thumbnails)" in " ".join(out.stdout.split())


def test_map_of_an_unlabelled_split_is_coloured_by_split(world, tmp_path):
    from mmret.figures.maps import embedding_map, project

    emb = write_run_embeddings(world["run"], "example", "all")
    ds = load_dataset("example", world["data"])
    result = embedding_map(emb, ds, ds.modality, tmp_path / "m.png", method="tsne", thumbnails=4, max_items=10)
    assert (result.colour_by, result.groups, result.n_items, result.thumbnails) == ("split", ["test", "train", "val"],
                                                                                   10, 4)
    assert result.n_captions == 50  # the five captions of each of the ten sampled pictures
    with pytest.raises(MmretError, match=r"a map needs at least 5 embeddings, the split has 4; map a larger split"):
        project(np.eye(4, 8), "tsne")


def test_failure_gallery_lists_the_worst_queries(env, tmp_path):
    out = runner.invoke(app, ["eval", "--split", "all", "--failures", str(tmp_path / "worst.png"), "--worst", "3"])
    assert out.exit_code == 0, out.output
    rows = json.loads((tmp_path / "worst.json").read_text())["rows"]
    emb = write_run_embeddings(env["run"], "shapes", "all")
    ranks = retrieval_metrics(torch.from_numpy(np.asarray(emb.items, np.float32)),
                              torch.from_numpy(np.asarray(emb.captions, np.float32)), emb.caption_item).t2i_ranks
    assert [r["rank"] for r in rows] == sorted(ranks.tolist(), reverse=True)[:3]
    for row in rows:
        assert len(row["above"]) == min(5, row["rank"] - 1)
        assert all(score >= row["score"] for _, score in row["above"]) and row["right"] not in dict(row["above"])
    assert (tmp_path / "worst.png").read_bytes()[:4] == b"\x89PNG"


def test_a_modality_without_thumbnails_still_gets_a_gallery(world, tmp_path):
    emb = write_run_embeddings(world["run"], "shapes", "test")
    plain = dataclasses.replace(get_modality("image"), thumbnail=None)
    result = failure_gallery(emb, plain, tmp_path / "g.png", count=2)
    assert len(result.rows) == 2 and (tmp_path / "g.png").stat().st_size > 0


def test_every_task_says_when_it_scores_items_the_run_trained_on(env):
    """The same pictures split again (another seed): the run trained on some of the new test split,
    and retrieval, classification and the linear probe each say how many."""
    prepare(PrepareConfig(source="classes", root=env["root"] / "raw", name="reshuffled", val=0.2, test=0.3, seed=1,
                          data_dir=env["data"]))
    test = load_dataset("reshuffled", env["data"]).split("test").items
    seen = LoadedRun(env["run"]).trained_on(list(test["path"]))
    assert 0 < seen < len(test)
    for task in ("retrieval", "classification", "linear-probe"):
        out = runner.invoke(app, ["eval", "--task", task, "--dataset", "reshuffled"])
        assert out.exit_code == 0, out.output
        assert (f"note: shapes-heads trained on {seen} of these {len(test)} items: its scores flatter it"
                in " ".join(out.stderr.split())), (task, out.stderr)
        saved = json.loads(runner.invoke(app, ["eval", "--task", task, "--dataset", "reshuffled", "--format",
                                               "json"]).stdout)
        assert saved[0]["train_overlap"] == seen
