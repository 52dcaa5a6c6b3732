"""Wrong captions that teach composition (`--caption-negatives`): the rules that write them, the loss
that counts them as negatives only (one process, GradCache, plain accumulation), their cache, and
training runs that use them."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from tiny_models import heads_model
from typer.testing import CliRunner

from mmret.cli import app
from mmret.data.composition import GENERATORS, negative_table, replace_relation, swap_attributes, swap_objects
from mmret.data.config import NEGATIVE_RULES, negative_rules
from mmret.data.pairs import NegativeBatch
from mmret.errors import MmretError
from mmret.models.temperature import build_temperature
from mmret.runs import RunConfig, with_overrides
from mmret.runs.config import TrainConfig
from mmret.training import train
from mmret.training.gradcache import accumulate_step
from mmret.training.losses import ClipLoss
from mmret.training.step import Stepper, make_optimizer

runner = CliRunner()


@pytest.mark.parametrize("caption, swapped, replaced, attributes", [
    ("a red circle to the left of a blue square", "a blue square to the left of a red circle",
     "a red circle to the right of a blue square", "a blue circle to the left of a red square"),
    ("A syringe above a doe.", "A doe above a syringe.", "A syringe below a doe.", None),
    ("there is a blue square under a red circle", "there is a red circle under a blue square",
     "there is a blue square over a red circle", "there is a red square under a blue circle"),
    ("a small dog next to a big cat", None, None, "a big dog next to a small cat"),  # symmetric: no swap
    ("a green apple left of a green pear", "a green pear left of a green apple", "a green apple right of a green pear",
     None),  # the same attribute on both sides: nothing to swap
    ("A shipwreck.", None, None, None),
    ("A red and white anemone flower.", None, None, None),  # two colours of one flower: not two things
    ("a red cup with a green", None, None, None),
    ("the leftover of a meal above", None, None, None),  # whole words only, and a side on each end
])
def test_the_rules_rewrite_as_documented(caption, swapped, replaced, attributes):
    assert (swap_objects(caption), replace_relation(caption), swap_attributes(caption)) == (swapped, replaced,
                                                                                            attributes)


def test_the_rule_names_are_the_ones_the_option_takes():
    assert set(GENERATORS) | {"table"} == set(NEGATIVE_RULES)
    assert negative_rules(" swap,relation,swap ") == ("swap", "relation")
    with pytest.raises(MmretError, match="--caption-negatives takes swap, relation, attribute, table"):
        negative_rules("swap,colour")


def test_the_negative_table_never_holds_a_right_caption():
    captions = pd.DataFrame({"caption_id": [0, 1, 2, 3], "item_id": ["a", "a", "b", "c"],
                             "caption": ["a cat above a dog", "a dog below a cat", "a red cup left of a blue jug",
                                         "A flower."], "split": ["train", "train", "test", "val"]})
    table = negative_table(captions, ("swap", "relation", "attribute"))
    got = set(zip(table["of_caption"], table["rule"], table["caption"]))
    # "a cat above a dog" reversed is "a cat below a dog"; its swap "a dog above a cat" is wrong too, but
    # "a dog below a cat" swapped ("a cat below a dog") and reversed ("a dog above a cat") repeat the first
    # caption's negatives; none of them is one of item a's own captions
    assert got == {(0, "swap", "a dog above a cat"), (0, "relation", "a cat below a dog"),
                   (1, "swap", "a cat below a dog"), (1, "relation", "a dog above a cat"),
                   (2, "swap", "a blue jug left of a red cup"), (2, "relation", "a red cup right of a blue jug"),
                   (2, "attribute", "a blue cup left of a red jug")}
    assert list(table["caption_id"]) == list(range(len(table)))
    assert dict(zip(table["of_caption"], table["split"])) == {0: "train", 1: "train", 2: "test"}
    symmetric = pd.DataFrame({"caption_id": [0], "item_id": ["a"], "caption": ["a cat above a cat"],
                              "split": ["train"]})
    assert negative_table(symmetric, ("swap",)).empty  # the swap says the same thing: never a negative


def test_the_table_rule_reads_the_datasets_wrong_candidates():
    captions = pd.DataFrame({"caption_id": [7, 8], "item_id": ["x", "y"], "caption": ["A dog on a mat.", "two cats"],
                             "split": ["train", "train"]})
    candidates = pd.DataFrame({"task": ["swap_obj"] * 4, "example": [0, 0, 1, 1], "position": [0, 1, 0, 1],
                               "caption": ["a dog on a mat", "a mat on a dog", "two cats", "two dogs"],
                               "item_id": ["x", None, "z", None]})  # example 1 is another item's: not y's
    table = negative_table(captions, ("table",), candidates)
    assert list(zip(table["of_caption"], table["rule"], table["caption"])) == [(7, "table", "a mat on a dog")]


# ---------------------------------------------------------------------------- the loss


def test_negatives_are_extra_columns_of_the_item_rows_only():
    g = torch.Generator().manual_seed(0)
    items, texts, negs = (F.normalize(torch.randn(n, 8, generator=g), dim=1) for n in (5, 5, 4))
    scale = 7.0
    got = ClipLoss()(items, texts, scale, negatives=negs)
    per_item = scale * items @ torch.cat([texts, negs]).T  # (5, 9): the item rows see every caption and negative
    per_text = scale * texts @ items.T  # (5, 5): the caption rows are CLIP's
    labels = torch.arange(5)
    expected = (F.cross_entropy(per_item, labels) + F.cross_entropy(per_text, labels)) / 2
    torch.testing.assert_close(got, expected)
    assert torch.equal(ClipLoss()(items, texts, scale, negatives=negs[:0]), ClipLoss()(items, texts, scale))
    # with shared-caption positives and HN-NCE the negatives are never right: each item row's loss grows
    pos = torch.eye(5, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True
    hn = ClipLoss(hn_beta=0.5)
    assert hn(items, texts, scale, pos, negs) > hn(items, texts, scale, pos)


def _stepper(micro, accumulation="cache"):
    torch.manual_seed(0)
    model = heads_model(6, 5, 8, layers=2, temperature=build_temperature("learned"))
    cfg = TrainConfig(batch_size=6, micro_batch=micro, accumulation=accumulation, warmup=0.0, grad_clip=0.0)
    return Stepper(model=model, optimizer=make_optimizer(model, 0.05, 0.0), train=cfg, peak_lr=0.05, total_steps=4,
                   device=torch.device("cpu"), precision="fp32", scaler=torch.amp.GradScaler("cpu", enabled=False))


def _batch():
    g = torch.Generator().manual_seed(3)
    owner = np.array([0, 0, 2, 3, 5, 5, 5])
    return torch.randn(6, 6, generator=g), torch.randn(6, 5, generator=g), \
        NegativeBatch(torch.randn(len(owner), 5, generator=g), owner)


def test_gradient_caching_with_negatives_equals_one_pass_and_plain_accumulation_splits_them():
    items, texts, negs = _batch()
    whole, cached = _stepper(None), _stepper(2)
    assert whole(items, texts, 0, None, negs) == pytest.approx(cached(items, texts, 0, None, negs), rel=1e-5)
    for (name, a), b in zip(whole.model.state_dict().items(), cached.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert _stepper(None)(items, texts, 0, None, negs) > _stepper(None)(items, texts, 0) + 1e-3  # more columns
    # plain accumulation: micro-batch [2, 4) sees the negatives of rows 2 and 3 only
    model = _stepper(2, "plain").model
    seen = []

    def loss_fn(i, t, s, negatives=None):
        seen.append(None if negatives is None else len(negatives))
        return ClipLoss()(i, t, s, negatives=negatives)

    accumulate_step(model, items, texts, 2, loss_fn=loss_fn, negatives=negs.inputs,
                    negative_owner=torch.as_tensor(negs.owner))
    assert seen == [2, 2, 3]


# ---------------------------------------------------------------------------- training with them


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world


def test_a_heads_run_caches_the_negatives_once_and_learns_with_them(world, tmp_path):
    common = dict(method="heads", dataset="example", item=world["vit"], text=world["bert"],
                  data_dir=world["root"] / "data", runs_dir=tmp_path / "runs", epochs=3, batch_size=16, embed_dim=16,
                  caption_negatives="swap,relation")
    first = train(with_overrides(RunConfig(), {**common, "name": "neg"}))
    history = pd.read_parquet(first.run_dir / "metrics.parquet")
    assert np.isfinite(history["train_loss"]).all()
    assert json.loads((first.run_dir / "config.json").read_text())["train"]["caption_negatives"] == "swap,relation"
    features = world["root"] / "data" / "example" / "features"
    manifests = [json.loads((p / "manifest.json").read_text()) for p in features.iterdir()]
    captions = [m for m in manifests if m["which"] == "captions"]
    # the example's 300 captions, and their wrong ones: four of a picture's five captions name a relation
    # ("... on the left, ... on the right" does not), each swapped and reversed
    assert sorted(m["rows"] for m in captions) == [300, 480]
    stamps = {p.name: p.stat().st_mtime_ns for p in features.iterdir()}
    train(with_overrides(RunConfig(), {**common, "name": "neg-again", "seed": 1}))
    assert {p.name: p.stat().st_mtime_ns for p in features.iterdir()} == stamps  # nothing encoded again


def test_a_tower_method_tokenizes_the_negatives(world, tmp_path):
    cfg = with_overrides(RunConfig(), dict(method="lora", tower="text", dataset="example", item=world["vit"],
                                           text=world["bert"], data_dir=world["root"] / "data",
                                           runs_dir=tmp_path / "runs", epochs=1, batch_size=16, embed_dim=16,
                                           max_steps=2, caption_negatives="swap", name="lora-neg"))
    result = train(cfg)
    assert result.steps == 2 and np.isfinite(pd.read_parquet(result.run_dir / "metrics.parquet")["train_loss"]).all()


def test_negatives_and_mixup_do_not_combine(world, tmp_path, monkeypatch):
    monkeypatch.setenv("MMRET_DATA_DIR", str(world["root"] / "data"))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(tmp_path / "runs"))
    args = ["train", "--method", "heads", "--dataset", "example", "--vision", world["vit"], "--text", world["bert"],
            "--epochs", "1"]
    bad = runner.invoke(app, [*args, "--caption-negatives", "swap", "--mixup", "0.4"])
    assert (bad.exit_code, bad.stderr) == (1, "error: --caption-negatives does not combine with --mixup: a blend of "
                                              "two captions has no wrong captions of its own\n")
    unknown = runner.invoke(app, [*args, "--caption-negatives", "shuffle"])
    assert (unknown.exit_code, unknown.stderr) == (1, "error: --caption-negatives takes swap, relation, attribute, "
                                                      "table (comma-separated), got shuffle\n")
