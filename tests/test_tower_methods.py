"""Methods that adapt the towers (lora, prefix, adapter, full) through the real training loop, on
a tiny random CLIP and tiny experts: they learn, save only their own weights, and reload exactly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tiny_models
import torch
from safetensors.torch import load_file
from test_adapters import merge_lora

from mmret import training
from mmret.data import PrepareConfig, prepare
from mmret.inference.embeddings import write_run_embeddings
from mmret.inference.loaded import LoadedRun
from mmret.methods import get_method
from mmret.runs import RunConfig, with_overrides


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    prepare(PrepareConfig(source="example", count=40, data_dir=root / "data"))
    return {"root": root, "clip": str(tiny_models.save_tiny_clip(root / "clip")),
            "vit": str(tiny_models.save_tiny_timm_vit(root / "vit")),
            "bert": str(tiny_models.save_tiny_bert(root / "bert"))}


def config(world, tmp_path, **options) -> RunConfig:
    base = dict(dataset="example", data_dir=world["root"] / "data", runs_dir=tmp_path / "runs", epochs=3,
                batch_size=16, embed_dim=16, patience=0, lr=3e-3, rank=4, workers=0, dropout=0.0, lora_dropout=0.0)
    return with_overrides(RunConfig(), {**base, **options})


def towers(world, kind):
    return {"model": world["clip"]} if kind == "clip" else {"item": world["vit"], "text": world["bert"]}


CASES = [("lora", "clip"), ("lora", "experts"), ("prefix", "clip"), ("adapter", "experts"), ("full", "clip")]


@pytest.mark.parametrize("method, kind", CASES)
def test_tower_method_learns_and_saves_only_its_weights(world, tmp_path, method, kind):
    cfg = config(world, tmp_path, method=method, **towers(world, kind))
    result = training.train(cfg)
    history = pd.read_parquet(result.run_dir / "metrics.parquet")
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    saved = load_file(str(result.run_dir / "checkpoints" / "last.safetensors"))
    model = training.setup(config(world, tmp_path, method=method, name="probe", **towers(world, kind))).model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(saved) == trainable
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert (frozen == 0) == (method == "full")
    if method == "lora":
        assert all("lora_" in k or ".head." in k or k.startswith("temperature") for k in saved)


def batch(world, n=6):

    from mmret.data import load_dataset

    ds = load_dataset("example", world["root"] / "data")
    return ds.items.path.tolist()[:n], ds.captions.caption.tolist()[:n]


def embed(model, towers_, paths, captions):
    from PIL import Image

    transform = towers_.item.transform()
    pixels = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.inference_mode():
        return model.encode_item(pixels), model.encode_text(**towers_.text.tokenize(captions))


def test_a_saved_run_reloads_to_identical_embeddings_and_merged_lora_matches(world, tmp_path):
    cfg = config(world, tmp_path, method="lora", epochs=2, **towers(world, "clip"))
    result = training.train(cfg)
    paths, captions = batch(world)
    first_towers, a = LoadedRun(result.run_dir, which="last").model()
    second_towers, b = LoadedRun(result.run_dir, which="last").model()
    ea, eb = embed(a, first_towers, paths, captions), embed(b, second_towers, paths, captions)
    assert all(torch.equal(x, y) for x, y in zip(ea, eb))
    base_towers = get_method("lora").open(cfg)
    base = get_method("lora").build(cfg, base_towers).eval()
    differs = embed(base, base_towers, paths, captions)
    assert not torch.allclose(differs[1], ea[1], atol=1e-4)  # training changed the text tower
    assert merge_lora(a.item_tower.encoder) + merge_lora(a.text_tower.encoder) > 0
    em = embed(a, first_towers, paths, captions)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(em, eb))


def test_run_embeddings_of_a_tower_run(world, tmp_path):
    result = training.train(config(world, tmp_path, method="adapter", epochs=1, **towers(world, "experts")))
    emb = write_run_embeddings(result.run_dir, split="test")
    assert emb.items.shape == (len(emb.item_table), 16) and emb.items.dtype == np.float16
    norms = np.linalg.norm(np.asarray(emb.items, dtype=np.float32), axis=1)
    assert np.allclose(norms, 1.0, atol=1e-2)
    again = write_run_embeddings(result.run_dir, split="test")
    assert again.manifest["seconds"] == emb.manifest["seconds"]  # reused, not recomputed


def test_no_flip_when_captions_say_left_or_right(world, tmp_path):
    from mmret.common.progress import NULL
    from mmret.data import load_dataset

    def tower_inputs(cfg, dataset):
        lora = get_method("lora")
        (source,) = lora.sources(cfg, lora.open(cfg, dataset), dataset, ("train",), torch.device("cpu"), NULL)
        return source.train_items.load, source.eval_items.load, source.tokenize

    cfg = config(world, tmp_path, method="lora", **towers(world, "clip"))
    train_t, _, _ = tower_inputs(cfg, load_dataset("example", world["root"] / "data"))
    assert "HorizontalFlip" not in repr(train_t)
    flip = with_overrides(cfg, {"hflip": True})
    train_t, _, _ = tower_inputs(flip, load_dataset("example", world["root"] / "data"))
    assert "HorizontalFlip" in repr(train_t)


def test_a_frozen_tower_is_read_from_the_feature_cache_not_run(world, tmp_path, monkeypatch):
    from mmret.data import load_dataset
    from mmret.encoders import TimmImageEncoder, load_image_encoder
    from mmret.features import ensure_features
    from mmret.inference.search import search
    from mmret.models.towers import EncoderTower

    ensure_features(load_dataset("example", world["root"] / "data"), load_image_encoder(world["vit"]), "images")

    def refuse(*args, **kwargs):
        raise AssertionError("the frozen image tower ran during training")

    monkeypatch.setattr(TimmImageEncoder, "forward", refuse)
    cfg = config(world, tmp_path, method="lora", tower="text", epochs=2, **towers(world, "experts"))
    result = training.train(cfg)
    model = training.setup(config(world, tmp_path, method="lora", tower="text", name="probe",
                                  **towers(world, "experts"))).model
    assert isinstance(model.text_tower, EncoderTower) and not isinstance(model.item_tower, EncoderTower)
    rows = {r.part: r for r in training.dry_run(cfg).rows}
    assert any("frozen, cached" in part for part in rows)
    monkeypatch.undo()  # a picture query does run the frozen tower, once
    emb = write_run_embeddings(result.run_dir, split="test")
    hits = search(result.run_dir, [], item=emb.item_table.path.iloc[0], split="test", k=1, which="last")
    assert hits.results[0].items[0].item_id == emb.item_table.item_id.iloc[0]


def _fused_attention(model: torch.nn.Module) -> tuple[int, int]:
    """(fused, plain) attention blocks in `model`: transformers models by their attention
    implementation, timm attention blocks by `fused_attn`."""
    fused = plain = 0
    for module in model.modules():
        impl = getattr(getattr(module, "config", None), "_attn_implementation", None)
        if callable(getattr(module, "set_attn_implementation", None)) and impl is not None:
            fused, plain = fused + (impl == "sdpa"), plain + (impl == "eager")
        elif isinstance(getattr(module, "fused_attn", None), bool):
            fused, plain = fused + module.fused_attn, plain + (not module.fused_attn)
    return fused, plain


@pytest.mark.parametrize("method, kind", [("lora", "clip"), ("adapter", "experts")])
def test_tower_methods_train_on_a_cpu_with_matrix_product_attention(world, tmp_path, method, kind):
    """`setup` switches every tower the step runs from SDPA to matrix-product attention on a CPU
    (SDPA's backward is the slowest part of a tower step there, `benchmarks/tower_step.py`)."""
    cfg = config(world, tmp_path, method=method, name="probe", device="cpu", **towers(world, kind))
    as_loaded = get_method(method).build(cfg, get_method(method).open(cfg))
    assert _fused_attention(as_loaded)[0] > 0  # the towers load with SDPA: there is something to switch
    model = training.setup(cfg).model
    fused, plain = _fused_attention(model)
    assert fused == 0 and plain >= _fused_attention(as_loaded)[0]
