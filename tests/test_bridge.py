"""The residual bridge (a head over the class token plus a zero-started query correction) and
augmented feature views, on tiny random towers and the `example` dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mmret import training
from mmret.data import PrepareConfig, load_dataset, prepare
from mmret.encoders import load_image_encoder
from mmret.features import ensure_features
from mmret.features.views import ItemView
from mmret.methods import config_for
from mmret.models import ProjectionHead, QueryBridge, ResidualBridge
from mmret.models.bridge import PooledHead, drop_tokens
from mmret.models.heads import InputNorm, init_input_norms
from mmret.runs import RunConfig, load_run_config, with_overrides


@pytest.fixture(scope="module")
def world(tiny_world):
    return tiny_world


def config(world, tmp_path, **options) -> RunConfig:
    base = dict(dataset="example", item=world["vit"], text=world["bert"], data_dir=world["root"] / "data",
                runs_dir=tmp_path / "runs", epochs=2, batch_size=16, lr=5e-3, embed_dim=16, head_layers=2,
                queries=4, bridge_layers=1, bridge_width=32, bridge_heads=4, patience=0, dropout=0.1)
    return with_overrides(RunConfig(), {**base, **options})


def embed_val(s):
    """Image and caption embeddings of the validation split, in eval mode."""
    s.model.eval()
    with torch.no_grad():
        idx = np.arange(s.val.num_items)
        caps = np.arange(s.val.num_captions)
        return s.model.encode_item(s.val.item_batch(idx)), s.model.encode_text(s.val.text_batch(caps))


def fresh_data(tmp_path):
    """A data root of its own, so the bridge's token cache is made first and the heads method reads
    its pooled features from that cache: two caches computed apart may differ in the last bits
    (each picks fp32 or bf16 by timing its first batch)."""
    prepare(PrepareConfig(source="example", count=60, data_dir=tmp_path / "data"))
    return tmp_path / "data"


def test_at_initialisation_the_bridge_embeds_as_the_heads_method_does(world, tmp_path):
    data = fresh_data(tmp_path)
    bridge = training.setup(config(world, tmp_path, method="bridge", name="bridge", data_dir=data))
    heads = training.setup(config(world, tmp_path, method="heads", name="heads", data_dir=data))
    assert isinstance(bridge.model.item_tower, ResidualBridge)
    assert bridge.val.item_batch(np.arange(2)).dim() == 3  # the bridge reads token states, heads pooled ones
    (hi, ht), (bi, bt) = embed_val(heads), embed_val(bridge)
    torch.testing.assert_close(bi, hi, rtol=0, atol=1e-6)
    torch.testing.assert_close(bt, ht, rtol=0, atol=0)
    # training moves the correction off zero: the bridge is then more than the heads model
    bridge.model.train()
    items, captions = bridge.plan.batches(0)[0]
    bridge.stepper(bridge.train.item_batch(items), bridge.train.text_batch(captions), 0)
    proj = bridge.model.item_tower.correction[1].proj
    assert proj.weight.abs().sum() > 0


def test_the_pooled_path_over_class_and_mean_patch_token_also_starts_as_heads(world, tmp_path):
    data = fresh_data(tmp_path)
    bridge = training.setup(config(world, tmp_path, method="bridge", bridge_base="cls+mean", queries=0, name="cm",
                                   data_dir=data))
    heads = training.setup(config(world, tmp_path, method="heads", name="heads", data_dir=data))
    assert bridge.model.item_tower.correction is None
    (hi, ht), (bi, bt) = embed_val(heads), embed_val(bridge)
    torch.testing.assert_close(bi, hi, rtol=0, atol=1e-6)
    torch.testing.assert_close(bt, ht, rtol=0, atol=0)


def test_the_old_bridge_is_one_option_away_and_old_configs_load_as_it(world, tmp_path):
    s = training.setup(config(world, tmp_path, method="bridge", bridge_base="none", name="old"))
    assert isinstance(s.model.item_tower[1], QueryBridge)  # InputNorm, then the queries alone
    saved = json.loads((s.run_dir / "config.json").read_text())
    del saved["method"]["bridge_base"], saved["train"]["same_caption"]  # as written before these existed
    (s.run_dir / "config.json").write_text(json.dumps(saved))
    old = load_run_config(s.run_dir)
    assert old.method.bridge_base == "none" and old.train.same_caption == "negative"
    assert config_for("bridge").bridge_base == "cls" and RunConfig().train.same_caption == "positive"


def test_residual_bridge_starts_at_its_pooled_head_and_reads_the_pooled_token():
    tokens = torch.randn(5, 7, 12) * 3 + 1
    for mode, pool in (("cls", lambda t: t[:, 0]), ("mean", lambda t: t.mean(1)), ("cls+mean", lambda t: t[:, 0])):
        torch.manual_seed(0)
        head = ProjectionHead(12, 8, layers=2)
        queries = torch.nn.Sequential(InputNorm(12), QueryBridge(12, 8, num_queries=3, depth=1, width=16, heads=4,
                                                                  zero_init=True))
        pooled = PooledHead(head, mode)
        bridge = ResidualBridge(pooled, queries)
        assert init_input_norms(bridge, tokens) == (3 if mode == "cls+mean" else 2)
        x = pool(tokens)
        torch.testing.assert_close(pooled.norm.shift, -x.mean(0) / x.std(0))
        torch.testing.assert_close(queries[0].shift, -tokens.reshape(-1, 12).mean(0) / tokens.reshape(-1, 12).std(0))
        torch.testing.assert_close(bridge(tokens), head(pooled.norm(x)), rtol=0, atol=1e-6)
        if mode == "cls+mean":  # the patches' mean enters the first layer once its weights move
            patches = tokens[:, 1:].mean(1)
            torch.testing.assert_close(pooled.patch_norm.shift, -patches.mean(0) / patches.std(0))
            with torch.no_grad():
                pooled.patch_in.weight.normal_()
            assert not torch.allclose(bridge(tokens), head(pooled.norm(x)))
    alone = ResidualBridge(PooledHead(ProjectionHead(12, 8), "cls"))  # --queries 0: the pooled path only
    alone.init_input_norms(tokens)
    assert alone(tokens).shape == (5, 8) and set(alone.named_parts()) == {"pooled head"}


def test_token_and_query_dropout_act_in_training_only():
    torch.manual_seed(0)
    tokens = torch.randn(4, 17, 6)
    kept = drop_tokens(tokens, 0.5)
    assert kept.shape == (4, 9, 6) and torch.equal(kept[:, 0], tokens[:, 0])  # class token always kept
    assert all(any(torch.equal(r, t) for t in tokens[b]) for b in range(4) for r in kept[b])  # real tokens only
    bridge = QueryBridge(6, 5, num_queries=4, depth=1, width=8, heads=2, token_drop=0.5, query_drop=0.5)
    bridge.eval()
    torch.testing.assert_close(bridge(tokens), bridge(tokens))
    bridge.train()
    assert not torch.allclose(bridge(tokens), bridge(tokens))


def test_augmented_views_are_cached_once_and_drawn_per_epoch(world, tmp_path):
    ds = load_dataset("example", world["root"] / "data")
    enc = load_image_encoder(world["vit"])
    plain = ensure_features(ds, enc, "images")
    # fp32: "auto" picks bf16 or fp32 by timing both, which a busy machine can flip between calls
    one = ensure_features(ds, enc, "images", view=ItemView(1), precision="fp32")
    again = ensure_features(ds, enc, "images", view=ItemView(1))
    two = ensure_features(ds, enc, "images", view=ItemView(2))
    assert again.stats.encoded == 0 and "-view1-" in one.key and one.key != two.key != plain.key
    assert not np.allclose(np.asarray(one.pooled), np.asarray(plain.pooled))
    assert not np.allclose(np.asarray(one.pooled), np.asarray(two.pooled))
    elsewhere = load_dataset("example", world["root"] / "data")  # a view is the same whenever computed
    import shutil
    shutil.rmtree(one.path)
    recomputed = ensure_features(elsewhere, enc, "images", view=ItemView(1), precision="fp32")
    np.testing.assert_array_equal(np.asarray(recomputed.pooled), np.asarray(again.pooled))
    assert recomputed.stats.reused == 0  # rows are lent by caches of the same view only, never by other crops

    s = training.setup(config(world, tmp_path, method="heads", views=2, name="views"))
    assert len(s.train.views) == 2 and not s.val.views
    picks = [s.train.view_of(e) for e in range(3)]
    assert set(np.concatenate(picks).tolist()) == {0, 1, 2} and not np.array_equal(picks[0], picks[1])
    items, _ = s.plan.batches(0)[0]
    batch, _ = next(s.train.iter_pairs([(items, s.train.tables.captions_of[0][:1].repeat(len(items)))], epoch=0))
    arrays = [s.train.item_array, *s.train.views]
    for row, i in enumerate(items):
        expected = np.asarray(arrays[picks[0][i]][s.train.item_rows[i]], dtype=np.float32)
        np.testing.assert_array_equal(batch[row].numpy(), expected)
    result = training.train(config(world, tmp_path, method="bridge", views=2, token_drop=0.25, name="views-run"))
    assert np.isfinite(result.last["train_loss"])


def test_crossval_report_writes_the_table_and_the_chart(tmp_path):
    import importlib.util
    from pathlib import Path
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("crossval", Path(__file__).parents[1] / "benchmarks" / "crossval.py")
    crossval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(crossval)

    def fold(r1: float) -> dict:
        scores = {f"{d}_r{k}": min(1.0, r1 * k ** 0.5) for d in ("t2i", "i2t") for k in (1, 5, 10)}
        return scores | {f"same_{k}": v for k, v in scores.items()} | {"n_items": 100, "train_seconds": 12.0,
                                                                       "seconds": 13.0}
    crossval.save(str(tmp_path / "r.json"), "toy", "heads", "heads", {}, [fold(0.1), fold(0.2)])
    crossval.save(str(tmp_path / "r.json"), "toy", "bridge", "bridge", {"queries": 8}, [fold(0.3), fold(0.3)])
    (tmp_path / "c.json").write_text(json.dumps({"baselines": {"ridge": [fold(0.05), fold(0.05)]}}))
    args = SimpleNamespace(report=[str(tmp_path / "r.json")], ceiling=str(tmp_path / "c.json"),
                           out=str(tmp_path / "t.md"), png=str(tmp_path / "c.png"))
    crossval.report(args)
    text = (tmp_path / "t.md").read_text()
    assert "| heads | 0.150 ± 0.050 |" in text and "| bridge | 0.300 ± 0.000 |" in text
    assert "| chance | 0.010 | 0.050 | 0.100 |" in text and "| ridge | 0.050 ± 0.000 |" in text
    assert "| 12 |" in text  # training seconds per fold
    assert "| bridge | +0.150 ± 0.050 |" in text and "| 2 of 2 |" in text  # paired with heads fold by fold
    assert (tmp_path / "c.png").stat().st_size > 10_000
