"""mmret against CLIP_benchmark's own code (the `clip-benchmark` package, installed without its
model-zoo dependencies: its metric modules need only torch, tqdm and scikit-learn): the same
embeddings or scores give the same recall, the same class weights and the same accuracy.
CLIP_benchmark's `evaluate` functions are driven whole, with a stand-in model that returns the
given embeddings, so its own bookkeeping (positive pairs, batching, prompt averaging) is tested too."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clip_benchmark.metrics import zeroshot_classification as cb_cls
from clip_benchmark.metrics import zeroshot_retrieval as cb_ret
from sklearn.metrics import balanced_accuracy_score

from mmret.evaluation import clip_benchmark as cb
from mmret.evaluation.classification import zero_shot_weights
from mmret.evaluation.linear_probe import C_GRID, choose_c, probe_arrays
from mmret.evaluation.templates import IMAGENET_TEMPLATES
from mmret.metrics.classification import classification_metrics
from mmret.metrics.retrieval import metrics_from_scores, retrieval_metrics


def accuracy_numpy2(output, target, topk=(1,)):
    """CLIP_benchmark 1.6.2's `accuracy` line for line, but for its last line: `float()` of a
    one-element array, which NumPy 2 refuses, becomes `.item()`."""
    pred = output.topk(max(topk), 1, True, True)[1].t()
    correct = pred.eq(target.view(1, -1).expand_as(pred))
    n = len(target)
    return [correct[:k].reshape(-1).float().sum(0, keepdim=True).cpu().numpy().item() / n for k in topk]


@pytest.fixture(autouse=True)
def _accuracy_for_numpy2(monkeypatch):
    if int(np.__version__.split(".")[0]) >= 2:
        monkeypatch.setattr(cb_cls, "accuracy", accuracy_numpy2)


class StandIn(torch.nn.Module):
    """A "CLIP" whose image input is already the embedding and whose text tokens index a table."""

    def __init__(self, text_table: torch.Tensor):
        super().__init__()
        self.text_table = text_table

    def encode_image(self, x):
        return x

    def encode_text(self, ids):
        return self.text_table[ids]


def _embeddings(n_image, n_text, dim, seed):
    gen = torch.Generator().manual_seed(seed)
    images = F.normalize(torch.randn(n_image, dim, generator=gen), dim=-1)
    text_image = torch.cat([torch.arange(n_image), torch.randint(n_image, (n_text - n_image,), generator=gen)])
    texts = F.normalize(images[text_image] + 0.9 * torch.randn(n_text, dim, generator=gen), dim=-1)
    return images, texts, text_image


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_retrieval_recall_equals_clip_benchmark_evaluate(seed):
    images, texts, text_image = _embeddings(40, 130, 16, seed)
    # CLIP_benchmark's loader yields (images, list of captions per image); captions are text ids here
    per_image = [[str(t) for t in (text_image == i).nonzero().squeeze(1).tolist()] for i in range(len(images))]
    order = [int(t) for caps in per_image for t in caps]  # the caption order evaluate() builds
    batches = [(images[s:s + 7], per_image[s:s + 7]) for s in range(0, len(images), 7)]
    tokenizer = lambda caps: torch.tensor([int(c) for c in caps])  # noqa: E731
    theirs = cb_ret.evaluate(StandIn(texts), batches, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    ours = retrieval_metrics(images, texts[order], text_image[order], ks=(1, 5, 10)).metrics
    mine = cb.retrieval_metrics(ours, (1, 5, 10))
    assert mine.keys() == theirs.keys()
    for key in theirs:
        assert mine[key] == pytest.approx(theirs[key], abs=1e-6), key
    assert 0 < theirs["image_retrieval_recall@1"] < 1  # a case where the numbers mean something


def test_recall_at_k_on_a_given_score_matrix_matches_batchify():
    gen = torch.Generator().manual_seed(5)
    scores = torch.randn(90, 30, generator=gen)
    # every image has a caption, as in a prepared dataset (CLIP_benchmark would count an image
    # without one as a miss, 0/0; mmret leaves it out of image->text)
    text_image = torch.cat([torch.arange(30), torch.randint(30, (60,), generator=gen)])
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(90), text_image] = True
    ours = metrics_from_scores(scores, text_image, ks=(1, 3, 7)).metrics
    for k in (1, 3, 7):
        t2i = (cb_ret.batchify(cb_ret.recall_at_k, scores, positive, 16, "cpu", k=k) > 0).float().mean().item()
        i2t = (cb_ret.batchify(cb_ret.recall_at_k, scores.T, positive.T, 16, "cpu", k=k) > 0).float().mean().item()
        assert (ours[f"t2i_r{k}"], ours[f"i2t_r{k}"]) == pytest.approx((t2i, i2t), abs=1e-6)


@pytest.mark.parametrize("num_classes", [3, 12])
def test_classification_equals_clip_benchmark_evaluate(num_classes):
    gen = torch.Generator().manual_seed(num_classes)
    names = [f"class{i}" for i in range(num_classes)]
    templates = list(IMAGENET_TEMPLATES[:6])
    prompts = [t.format(c=n) for n in names for t in templates]
    table = torch.randn(len(prompts), 24, generator=gen)  # a prompt's id is its place in `prompts`
    tokenizer = lambda texts: torch.tensor([prompts.index(t) for t in texts])  # noqa: E731
    model = StandIn(table)
    weights = cb_cls.zero_shot_classifier(model, tokenizer, names, templates, "cpu", amp=False)  # (D, C)
    ours = zero_shot_weights(lambda texts: table[tokenizer(texts)], [[t.format(c=n) for t in templates] for n in names],
                             batch=5)
    torch.testing.assert_close(ours, weights.T, atol=1e-6, rtol=0)

    target = torch.randint(num_classes, (70,), generator=gen)
    items = F.normalize(ours[target] + 1.2 * torch.randn(70, 24, generator=gen), dim=-1)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(items, target), batch_size=16)
    loader.dataset.classes = names
    theirs = cb_cls.evaluate(model, loader, tokenizer, names, templates, "cpu", amp=False)
    mine = classification_metrics(items @ ours.T, target).metrics
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        assert (math.isnan(value) and math.isnan(mine[key])) or mine[key] == pytest.approx(value, abs=1e-9), key
    assert 1 / num_classes < theirs["acc1"] < 1


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_classification_accuracy_and_per_class_recall_on_given_logits():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(200, 9, generator=gen)
    target = torch.randint(8, (200,), generator=gen)  # class 8 never occurs: left out of the mean
    ours = classification_metrics(logits, target).metrics
    acc1, acc5 = cb_cls.accuracy(logits, target, topk=(1, 5))
    expected = (acc1, acc5, balanced_accuracy_score(target.numpy(), logits.argmax(1).numpy()))
    assert (ours["acc1"], ours["acc5"], ours["mean_per_class_recall"]) == pytest.approx(expected, abs=1e-12)


def test_ties_count_against_the_right_class():
    logits = torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.9, 0.9]])
    scores = classification_metrics(logits, torch.tensor([0, 2]))
    assert scores.ranks.tolist() == [2, 2] and scores.metrics["acc1"] == 0.0 and math.isnan(scores.metrics["acc5"])


def test_linear_probe_searches_c_the_way_clip_benchmark_does():
    gen = np.random.default_rng(0)
    centres = gen.normal(size=(4, 8)) * 3
    x = {s: np.concatenate([centres[c] + gen.normal(size=(n, 8)) for c in range(4)]) for s, n in
         (("train", 30), ("val", 10), ("test", 10))}
    y = {s: np.repeat(np.arange(4), len(x[s]) // 4) for s in x}
    best, tried = choose_c((x["train"], y["train"]), (x["val"], y["val"]))
    first = [float(C_GRID[i]) for i in (0, 16, 32, 48, 64, 80, 96)]
    assert set(first) <= set(tried) and len(C_GRID) == 97 and C_GRID[0] == pytest.approx(1e-6)
    assert tried[float(C_GRID[best])] == max(tried.values())
    metrics, C, val_acc, _ = probe_arrays(x, y, 4)
    assert metrics["lp_acc1"] >= 0.9 and math.isnan(metrics["lp_acc5"]) and C == C_GRID[best]


def test_schema_names_and_file_name():
    rec = cb.record("retrieval", "flickr30k", model="mmret-heads-dino-minilm", pretrained="my/run",
                    metrics={"image_retrieval_recall@5": 0.5})
    assert list(rec) == ["dataset", "model", "pretrained", "task", "metrics", "language"]
    assert rec["task"] == "zeroshot_retrieval" and rec["language"] == "en"
    assert cb.file_name(rec) == "flickr30k_run_mmret-heads-dino-minilm_en_zeroshot_retrieval.json"
    rec["pretrained"] = "laion400m_e32 @last"
    assert cb.file_name(rec) == "flickr30k_laion400m_e32-last_mmret-heads-dino-minilm_en_zeroshot_retrieval.json"
    assert cb.dataset_name("f30k", "flickr30k", "test") == "flickr30k"
    assert cb.dataset_name("f30k", "flickr30k", "val") == "f30k-val"
    assert cb.dataset_name("mine", "folder", "test") == "mine"


def test_format_clip_benchmark_breaks_ties_as_clip_benchmarks_evaluate(tmp_path, monkeypatch):
    """Pictures that share a caption text ("A fireman.", as 40 of Tux Paint's do) have captions with
    equal embeddings: ties. mmret's own numbers count a tie against the query; `--format
    clip-benchmark` gives what CLIP_benchmark's `evaluate` gives on the same embeddings."""
    import json

    import pandas as pd
    import tiny_models
    from typer.testing import CliRunner

    from mmret.cli import app
    from mmret.inference.embeddings import open_embeddings

    root = tmp_path / "pictures"
    rows = []
    for i in range(10):
        tiny_models.save_picture(root / f"p{i}.png", seed=i)
        rows += [(f"p{i}.png", "A fireman."), (f"p{i}.png", f"picture number {i} of ten")]
    pd.DataFrame(rows, columns=["image", "caption"]).to_csv(root / "captions.csv", index=False)
    clip = tiny_models.save_tiny_clip(tmp_path / "clip")
    monkeypatch.setenv("MMRET_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(tmp_path / "runs"))
    runner = CliRunner()
    assert runner.invoke(app, ["prepare", "folder", "--root", str(root), "--name", "ties"]).exit_code == 0
    eval_args = ["eval", "--zero-shot", str(clip), "--dataset", "ties", "--split", "all", "--recall-k", "1,2,5"]
    out = runner.invoke(app, [*eval_args, "--format", "clip-benchmark"])
    assert out.exit_code == 0, out.output
    ours = json.loads(out.stdout)["metrics"]  # the one record, as CLIP_benchmark writes it
    own = json.loads((tmp_path / "runs" / "zeroshot-clip" / "eval" / "ties-all.json").read_text())
    assert own["clip_benchmark_ties"] != {k: own["metrics"][k] for k in own["clip_benchmark_ties"]}  # both kept
    own = own["metrics"]

    emb = open_embeddings(tmp_path / "runs" / "zeroshot-clip" / "embeddings" / "ties-all")
    items, captions = torch.from_numpy(emb.items.astype(np.float32)), torch.from_numpy(emb.captions.astype(np.float32))
    of_item = [[str(c) for c in np.flatnonzero(emb.caption_table["item"].to_numpy() == i)] for i in range(len(items))]
    batches = [(items[s:s + 64], of_item[s:s + 64]) for s in range(0, len(items), 64)]  # as its loader yields them
    tokenizer = lambda ids: torch.tensor([int(c) for c in ids])  # noqa: E731
    theirs = cb_ret.evaluate(StandIn(captions), batches, tokenizer, "cpu", amp=False, recall_k_list=[1, 2, 5])
    assert ours == theirs  # exactly: the same ties broken the same way
    assert own["i2t_r1"] < theirs["text_retrieval_recall@1"]  # the pessimistic rule counts the ties as misses
