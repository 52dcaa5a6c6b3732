"""Caption selection (`mmret eval --task caption-selection`), checked against CLIP_benchmark's own
`image_caption_selection.evaluate` on the same embeddings: the pure metrics, a SugarCrepe-format
set read by CLIP_benchmark's own SugarCrepe dataset class, and a Winoground-layout fixture through
`prepare winoground` + eval."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import tiny_models
import torch
from clip_benchmark.datasets.builder import image_captions_collate_fn
from clip_benchmark.datasets.sugar_crepe import SugarCrepe
from clip_benchmark.metrics import image_caption_selection
from PIL import Image
from typer.testing import CliRunner

from mmret.cli import app
from mmret.data import PrepareConfig, load_dataset, prepare
from mmret.data.readers.example import render
from mmret.errors import MmretError
from mmret.evaluation.selection import evaluate_selection
from mmret.inference.embeddings import write_run_embeddings
from mmret.inference.loaded import LoadedRun
from mmret.metrics.selection import bootstrap_selection, caption_selection, chance

runner = CliRunner()


class Lookup(torch.nn.Module):
    """A CLIP-like model for CLIP_benchmark whose 'pictures' are row numbers of item embeddings and whose
    'tokens' are row numbers of caption embeddings."""

    def __init__(self, items: torch.Tensor, texts: torch.Tensor):
        super().__init__()
        self.items, self.texts = items, texts

    def encode_image(self, x):
        return self.items[x.flatten().long()]

    def encode_text(self, x):
        return self.texts[x.long()]


def clip_benchmark(examples, items, texts, batch_size=4):
    """CLIP_benchmark's evaluate over examples given as (item rows, caption rows)."""
    batches = [examples[a:a + batch_size] for a in range(0, len(examples), batch_size)]
    loader = [(torch.tensor([[[[[float(i)]]] for i in rows] for rows, _ in batch]),
               [[str(c) for c in caps] for _, caps in batch]) for batch in batches]
    tokenize = lambda strings: torch.tensor([int(s) for s in strings])  # noqa: E731
    return image_caption_selection.evaluate(Lookup(items, texts), loader, tokenize, "cpu", amp=False)


@pytest.mark.parametrize("n_items, n_captions", [(1, 2), (2, 2), (1, 4)])
def test_the_metrics_are_clip_benchmarks_to_the_digit(n_items, n_captions):
    g = torch.Generator().manual_seed(n_items * 10 + n_captions)
    items = torch.randn(60 * n_items, 6, generator=g).half().float()  # as stored: float16
    texts = torch.randn(60 * n_captions, 6, generator=g)
    texts[n_captions * 3] = texts[n_captions * 3 + 1] = items[n_items * 3]  # a tie at the top: the first (right)
    # caption takes it
    texts[n_captions * 7] = items[n_items * 7] * 3.0  # a right caption that matches exactly
    examples = [(list(range(e * n_items, (e + 1) * n_items)), list(range(e * n_captions, (e + 1) * n_captions)))
                for e in range(60)]
    ours = caption_selection([items[i] for i, _ in examples], [texts[c] for _, c in examples], ["t"] * 60)
    theirs = clip_benchmark(examples, items, texts)
    assert {k: v for k, v in ours.metrics()["t"].items() if k != "n"} == theirs
    assert 0 < theirs["text_acc"] < 1
    if n_items == 1:  # a tie, and an exact match, go to the right caption
        assert ours.text_ok[3] and ours.text_ok[7]


def test_chance_counts_every_order():
    assert chance(1, 2) == {"text_acc": 0.5, "image_acc": 1.0, "acc": 0.5}
    assert chance(2, 2) == {"text_acc": 0.25, "image_acc": 0.25, "acc": pytest.approx(1 / 6, abs=1e-12)}
    rng = np.random.default_rng(0)  # against random scores
    scores = rng.random((200_000, 2, 2))
    both = ((scores.argmax(2) == [0, 1]).all(1) & (scores.argmax(1) == [0, 1]).all(1)).mean()
    assert both == pytest.approx(1 / 6, abs=0.003)


def test_bootstrap_intervals_hold_the_value_and_tasks_are_kept_apart():
    result = caption_selection([torch.eye(2)[:1]] * 10 + [torch.eye(2)[1:]] * 10, [torch.eye(2)] * 20,
                               ["a"] * 10 + ["b"] * 10)
    assert result.metrics()["a"]["text_acc"] == 1.0 and result.metrics()["b"]["text_acc"] == 0.0
    assert result.metrics()["all"] == {"text_acc": 0.5, "image_acc": 1.0, "acc": 0.5, "n": 20}
    ci = bootstrap_selection(result, 200, seed=1)
    assert ci["a"]["text_acc"] == (1.0, 1.0) and ci["all"]["text_acc"][0] < 0.5 < ci["all"]["text_acc"][1]


# ---------------------------------------------------------------------------- a run on prepared sets


SCENES = [(("red", "circle"), ("blue", "square"), "left of"), (("green", "triangle"), ("yellow", "circle"), "above"),
          (("purple", "square"), ("orange", "triangle"), "left of"), (("blue", "circle"), ("red", "triangle"), "above")]


def _caption(first, second, relation):
    return f"a {' '.join(first)} {relation} a {' '.join(second)}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A heads run that memorised 12 example pictures; a SugarCrepe-format set of 8 two-shape pictures
    (each scene in both arrangements) with swap_obj.json and replace_rel.json in a sibling folder, as the
    relations set lays them out; and a Winoground-layout folder of 4 examples."""
    root = tmp_path_factory.mktemp("selection")
    world = tiny_models.train_memorised(root)
    pics, wino = root / "sc" / "pictures", root / "wino"
    (root / "sc" / "sugar_crepe").mkdir(parents=True)
    (wino / "images").mkdir(parents=True)
    rng = random.Random(0)
    swap, rerel, lines, n = {}, {}, [], 0
    for k, (a, b, rel) in enumerate(SCENES):
        for first, second in ((a, b), (b, a)):
            pics.mkdir(exist_ok=True)
            render(first, second, rel, rng).save(pics / f"{n:03d}.png")
            render(first, second, rel, rng).save(wino / "images" / f"ex_{k}_img_{n % 2}.png")
            right = _caption(first, second, rel)
            swap[str(n)] = {"filename": f"{n:03d}.png", "caption": right,
                            "negative_caption": _caption(second, first, rel)}
            rerel[str(n)] = {"filename": f"{n:03d}.png", "caption": right,
                             "negative_caption": right.replace("left", "right").replace("above", "below")}
            n += 1
        lines.append(json.dumps({"id": k, "caption_0": _caption(a, b, rel), "caption_1": _caption(b, a, rel),
                                 "image_0": f"ex_{k}_img_0", "image_1": f"ex_{k}_img_1", "tag": "Object"}))
    swap["99"] = {"filename": "missing.png", "caption": "a red circle", "negative_caption": "a blue circle"}
    swap["100"] = {"filename": "000.png", "caption": ""}
    (root / "sc" / "sugar_crepe" / "swap_obj.json").write_text(json.dumps(swap))
    (root / "sc" / "sugar_crepe" / "replace_rel.json").write_text(json.dumps(rerel))
    (wino / "examples.jsonl").write_text("\n".join(lines) + "\n")
    prepare(PrepareConfig(source="sugar-crepe", root=pics, name="sc", data_dir=world["data"]))
    prepare(PrepareConfig(source="winoground", root=wino, name="wino", data_dir=world["data"]))
    return world | {"pics": pics, "sc": root / "sc", "wino": wino}


@pytest.fixture
def env(world, monkeypatch):
    monkeypatch.setenv("MMRET_DATA_DIR", str(world["data"]))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(world["runs"]))
    return world


def test_prepare_sugar_crepe_writes_the_candidates(world):
    ds = load_dataset("sc", world["data"])
    assert len(ds.items) == 8 and (ds.items["split"] == "test").all()
    assert len(ds.captions) == 8  # one right caption a picture: both categories share it
    assert ds.info["selection"] == {"replace_rel": 8, "swap_obj": 8} and "selection_benchmark" not in ds.info
    first = ds.candidates[(ds.candidates["task"] == "swap_obj")].sort_values(["example", "position"]).head(2)
    assert first["caption"].tolist() == ["a red circle left of a blue square", "a blue square left of a red circle"]
    assert first["item_id"].tolist()[0] == "000" and first["item_id"].isna().tolist() == [False, True]
    kinds = {p["kind"] for p in ds.info["problems"]}
    assert {"malformed example", "missing image", "selection example dropped"} <= kinds


def test_eval_equals_clip_benchmark_reading_the_sugar_crepe_files_itself(env):
    out = runner.invoke(app, ["eval", "--run", "memorised", "--dataset", "sc", "--task", "caption-selection",
                              "--format", "json", "--bootstrap", "100"])
    assert out.exit_code == 0, out.output
    (result,) = json.loads(out.stdout)
    assert result["chance"]["swap_obj"] == {"text_acc": 0.5, "image_acc": 1.0, "acc": 0.5}
    run = LoadedRun(env["run"])
    emb = write_run_embeddings(run, "sc", "test")
    row = {str(i): r for r, i in enumerate(emb.item_table["item_id"])}
    for task in ("swap_obj", "replace_rel"):
        data = SugarCrepe(str(env["pics"]), str(env["sc"] / "sugar_crepe" / f"{task}.json"),
                          transform=lambda img: torch.tensor([[[float(row[img.filename.split("/")[-1][:-4]])]]]))
        data.ann = {k: v for k, v in data.ann.items() if int(k) < 8}  # the two broken entries mmret left out
        data.idx_strings = list(data.ann)
        texts = sorted({v[k] for v in data.ann.values() for k in ("caption", "negative_caption")})
        model = Lookup(torch.from_numpy(np.asarray(emb.items, np.float32)), run.encode_texts(texts))
        loader = torch.utils.data.DataLoader(data, batch_size=3, collate_fn=image_captions_collate_fn)
        theirs = image_caption_selection.evaluate(model, loader, lambda s: torch.tensor([texts.index(t) for t in s]),
                                                  "cpu", amp=False)
        assert {k: result["metrics"][task][k] for k in theirs} == theirs
    assert result["metrics"]["swap_obj"]["n"] == 8 and result["dropped"] == 0


def test_a_winoground_layout_through_prepare_and_eval(env):
    ds = load_dataset("wino", env["data"])
    assert len(ds.items) == 8 and ds.info["selection"] == {"winoground": 4}
    result = evaluate_selection(env["run"], "wino", bootstrap=50)
    assert result.chance["winoground"]["acc"] == pytest.approx(1 / 6) and result.metrics["winoground"]["n"] == 4
    run = LoadedRun(env["run"])
    emb = write_run_embeddings(run, "wino", "test")
    row = {str(i): r for r, i in enumerate(emb.item_table["item_id"])}
    lines = [json.loads(x) for x in (env["wino"] / "examples.jsonl").read_text().splitlines()]
    texts = [ex[f"caption_{k}"] for ex in lines for k in (0, 1)]
    examples = [([row[ex["image_0"]], row[ex["image_1"]]], [2 * e, 2 * e + 1]) for e, ex in enumerate(lines)]
    theirs = clip_benchmark(examples, torch.from_numpy(np.asarray(emb.items, np.float32)), run.encode_texts(texts))
    assert {k: result.metrics["winoground"][k] for k in theirs} == theirs
    out = runner.invoke(app, ["eval", "--run", "memorised", "--dataset", "wino", "--task", "caption-selection",
                              "--format", "clip-benchmark"])
    assert out.exit_code == 0, out.output
    rec = json.loads(out.stdout)
    assert (rec["dataset"], rec["task"]) == ("winoground", "image_caption_selection")
    assert rec["metrics"] == {k: result.metrics["winoground"][k] for k in ("text_acc", "image_acc", "acc")}


def test_sugar_crepe_names_itself_as_clip_benchmark_does_only_over_coco(env, tmp_path):
    val = tmp_path / "coco" / "val2017"
    val.mkdir(parents=True)
    Image.new("RGB", (16, 16), "white").save(val / "000000397133.jpg")
    (val.parent / "swap_att.json").write_text(json.dumps({"0": {"filename": "000000397133.jpg", "caption": "a red cup",
                                                                "negative_caption": "a cup red"}}))
    prepare(PrepareConfig(source="sugar-crepe", root=val, name="coco-sc", data_dir=env["data"]))
    out = runner.invoke(app, ["eval", "--run", "memorised", "--dataset", "coco-sc", "--task", "caption-selection",
                              "--format", "clip-benchmark"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["dataset"] == "sugar_crepe/swap_att"
    mine = runner.invoke(app, ["eval", "--run", "memorised", "--dataset", "sc", "--task", "caption-selection",
                               "--format", "clip-benchmark"])
    assert [r["dataset"] for r in json.loads(mine.stdout)] == ["sc/replace_rel", "sc/swap_obj"]


def test_the_bad_inputs_are_one_line(env, tmp_path):
    out = runner.invoke(app, ["eval", "--run", "memorised", "--dataset", "example", "--task", "caption-selection"])
    assert (out.exit_code, out.stderr) == (1, "error: dataset 'example' has no caption-selection examples; prepare "
                                              "one with `mmret prepare sugar-crepe` or `mmret prepare winoground`\n")
    (tmp_path / "empty").mkdir()
    out = runner.invoke(app, ["prepare", "sugar-crepe", "--root", str(tmp_path / "empty")])
    assert out.exit_code == 1 and out.stderr.startswith("error: no SugarCrepe annotation files in ")
    out = runner.invoke(app, ["prepare", "winoground", "--root", str(tmp_path / "empty")])
    assert out.exit_code == 1 and out.stderr.startswith("error: no Winoground examples.jsonl under ")
    with pytest.raises(MmretError, match="dataset 'sc' has no train images"):
        evaluate_selection(env["run"], "sc", split="train")
