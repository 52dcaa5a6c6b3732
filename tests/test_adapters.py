"""Adapting pretrained towers (LoRA, prompt tokens, bottleneck adapters, full): tiny random towers
saved to folders and loaded by path, adapted in place; gradients reach only the method's
parameters, saved trainable weights reload exactly, merged LoRA matches unmerged, every method
lowers a toy contrastive loss, and the CLIP ViT-B/16 count is checked on the meta device."""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import logging
import math
from pathlib import Path

import pytest
import tiny_models
import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from mmret.encoders import EncoderOutput, load_image_encoder, load_text_encoder
from mmret.errors import MmretError
from mmret.methods import MethodConfig, config_for, get_method
from mmret.methods.config import RECIPES, recipe_values
from mmret.methods.towers import LoraConfig
from mmret.models.tuners import set_grad_checkpointing
from mmret.models.tuners.lora import target_modules
from mmret.runs.checkpoint import load_weights, save_weights
from mmret.training.losses import ClipLoss

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle above a blue square", "two green shapes", "a yellow triangle left of a circle",
            "the purple square is small", "an orange circle below a big triangle", "one blue shape here",
            "a picture of two red squares", "the green triangle sits on the right"]
IMAGE_ARCHS = ["clip", "dinov2", "timm"]
TEXT_ARCHS = ["clip", "bert", "distilbert"]
TOWERS = [("image", a) for a in IMAGE_ARCHS] + [("text", a) for a in TEXT_ARCHS]
METHODS = ["lora", "prefix", "adapter", "full"]
UNUSED = (".pooler.", "mask_token")  # BERT's pooler (mmret pools itself), DINOv2's masked-modelling token
MARKERS = {"lora": "lora_", "prefix": "mmret_prompt", "adapter": "mmret_adapter"}


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    return tiny_models.save_all(tmp_path_factory.mktemp("towers"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matrices gain nothing from threads, and on a shared CPU each op then waits for a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def load(towers, modality: str, arch: str):
    if modality == "image":
        return load_image_encoder(str(towers[arch]), image_size=tiny_models.IMAGE_SIZE)
    return load_text_encoder(str(towers[arch]))


def batch_for(enc, n: int = 4, seed: int = 0):
    if enc.modality == "image":  # blocky colour fields: one colour per 8 px patch, distinct per picture
        g = torch.Generator().manual_seed(seed)
        return {"pixels": F.interpolate(2 * torch.randn(n, 3, 4, 4, generator=g), size=tiny_models.IMAGE_SIZE)}
    return enc.tokenize(CAPTIONS[:n])


def apply_peft(encoder: nn.Module, method: str, m) -> nn.Module:
    """Adapt a loaded tower in place with tower method `method`, as training does."""
    return get_method(method).adapt(encoder, m)


def apply_recipe(m: MethodConfig, name: str) -> LoraConfig:
    """The LoRA config of recipe `name` on top of `m`'s shared settings."""
    return config_for("lora", **{**{f.name: getattr(m, f.name) for f in dataclasses.fields(MethodConfig)},
                                 **recipe_values(name)})


def cfg_for(method: str, **kw) -> MethodConfig:
    settings = dict(targets="q,k,v", lora_dropout=0.0, prefix_tokens=4, adapter_dim=8)
    return config_for(method, **{**settings, **kw})


def param_names(module: nn.Module, trainable: bool) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad == trainable}


def nudge(enc) -> None:
    """Move every trainable tensor away from its (often zero) initial value, as training would."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in enc.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


# ---------------------------------------------------------------------------- gradients and outputs


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("modality,arch", TOWERS)
def test_gradients_reach_only_the_method_parameters(towers, modality, arch, method):
    enc = load(towers, modality, arch)
    base_names = {n for n, _ in enc.named_parameters()}
    batch = batch_for(enc)
    base_tokens = enc(**batch).tokens.shape
    apply_peft(enc, method, cfg_for(method))
    out = enc(**batch)
    assert isinstance(out, EncoderOutput) and out.tokens.shape == base_tokens  # prompt positions dropped
    (out.pooled.square().sum() + out.tokens.square().mean()).backward()

    trainable = param_names(enc, True)
    if method == "full":
        assert trainable == base_names
    else:
        assert trainable and all(MARKERS[method] in n for n in trainable)
    for name, p in enc.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, name
        elif not any(u in name for u in UNUSED):
            assert p.grad is not None, name
    if method == "prefix":  # every block's own tokens shape the output (deep prompts)
        assert (enc.model.mmret_prompt.tokens.grad.flatten(1).abs().sum(1) > 0).all()
    if method != "full":  # the frozen base weights are exactly the ones loaded
        fresh = dict(load(towers, modality, arch).named_parameters())
        for name, p in enc.named_parameters():
            if not p.requires_grad:
                assert torch.equal(p, fresh[name.replace(".base_layer", "")]), name


@pytest.mark.parametrize("method", ["lora", "adapter"])
@pytest.mark.parametrize("modality,arch", TOWERS)
def test_lora_and_adapters_start_as_the_identity(towers, modality, arch, method):
    enc = load(towers, modality, arch)
    batch = batch_for(enc)
    with torch.inference_mode():
        before = enc(**batch)
        apply_peft(enc, method, cfg_for(method))
        after = enc(**batch)
    torch.testing.assert_close(after.pooled, before.pooled)
    torch.testing.assert_close(after.tokens, before.tokens)


def test_tower_option_leaves_the_other_tower_frozen(towers):
    cfg = cfg_for("lora", tower="text")
    image = apply_peft(load(towers, "image", "clip"), "lora", cfg)
    text = apply_peft(load(towers, "text", "clip"), "lora", cfg)
    assert not param_names(image, True) and not any("lora_" in n for n, _ in image.named_parameters())
    assert param_names(text, True)
    vision_only = cfg_for("adapter", tower="vision")
    assert param_names(apply_peft(load(towers, "image", "dinov2"), "adapter", vision_only), True)
    assert not param_names(apply_peft(load(towers, "text", "bert"), "adapter", vision_only), True)


# ---------------------------------------------------------------------------- target names and counts


@pytest.mark.parametrize("modality,arch,q,v", [
    ("image", "clip", "vision_model.encoder.layers.{}.self_attn.q_proj",
     "vision_model.encoder.layers.{}.self_attn.v_proj"),
    ("text", "clip", "text_model.encoder.layers.{}.self_attn.q_proj", "text_model.encoder.layers.{}.self_attn.v_proj"),
    ("text", "bert", "encoder.layer.{}.attention.self.query", "encoder.layer.{}.attention.self.value"),
    ("text", "distilbert", "transformer.layer.{}.attention.q_lin", "transformer.layer.{}.attention.v_lin"),
    ("image", "dinov2", "encoder.layer.{}.attention.q_proj", "encoder.layer.{}.attention.v_proj"),
])
def test_targets_map_to_each_architectures_names(towers, modality, arch, q, v):
    model = load(towers, modality, arch).model
    assert sorted(target_modules(model, "q,v")) == sorted(f.format(i) for i in range(2) for f in (q, v))
    assert len(target_modules(model, "q, k ,v,o")) == 8
    assert len(target_modules(model, "mlp")) == 4


def test_timm_fused_qkv_is_one_matrix_and_counts_differ(towers, caplog):
    d, r, blocks = tiny_models.HIDDEN, 4, 2
    timm_enc = load(towers, "image", "timm")
    assert target_modules(timm_enc.model, "q,k,v") == [f"blocks.{i}.attn.qkv" for i in range(blocks)]
    assert target_modules(timm_enc.model, "o") == [f"blocks.{i}.attn.proj" for i in range(blocks)]
    with caplog.at_level(logging.WARNING, logger="mmret.adapters"):
        apply_peft(timm_enc, "lora", cfg_for("lora", rank=r, targets="q,v"))
    assert "fuses q, k and v" in caplog.text
    assert sum(p.numel() for p in timm_enc.parameters() if p.requires_grad) == blocks * r * (d + 3 * d)
    clip_enc = apply_peft(load(towers, "image", "clip"), "lora", cfg_for("lora", rank=r, targets="q,v"))
    assert sum(p.numel() for p in clip_enc.parameters() if p.requires_grad) == blocks * 2 * r * (d + d)
    clip_qkv = apply_peft(load(towers, "image", "clip"), "lora", cfg_for("lora", rank=r, targets="q,k,v"))
    assert sum(p.numel() for p in clip_qkv.parameters() if p.requires_grad) == blocks * 3 * r * (d + d)


@pytest.mark.parametrize("modality,arch", TOWERS)
def test_prefix_and_adapter_counts(towers, modality, arch):
    d, blocks, p, a = tiny_models.HIDDEN, 2, 4, 8
    prefix = apply_peft(load(towers, modality, arch), "prefix", cfg_for("prefix"))
    assert sum(x.numel() for x in prefix.parameters() if x.requires_grad) == blocks * p * d
    adapter = apply_peft(load(towers, modality, arch), "adapter", cfg_for("adapter"))
    assert sum(x.numel() for x in adapter.parameters() if x.requires_grad) == blocks * 2 * (2 * d * a + a + d)


def test_bad_targets_end_in_one_clear_line(towers):
    model = load(towers, "text", "bert").model
    with pytest.raises(MmretError, match=r"--targets 'q,x': use a comma-separated list of q, k, v, o, mlp"):
        target_modules(model, "q,x")
    with pytest.raises(MmretError, match=r"matches no layer of Sequential \(its Linear layers end in: 0, 2\); "
                                         r"valid targets are q, k, v, o, mlp"):
        target_modules(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)), "q,v")


def _benchmark():
    spec = importlib.util.spec_from_file_location("params_benchmark", ROOT / "benchmarks" / "params.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_clip_b16_counts_on_the_meta_device():
    bench = _benchmark()
    method, cfg = bench.settings()["lora both-r64"]
    model = bench.adapted_clip("ViT-B/16", method, cfg)
    assert next(model.parameters()).device.type == "meta"
    assert bench.tower_trainable(model) == 5_898_240 == 12 * 3 * 64 * (768 + 768) + 12 * 3 * 64 * (512 + 512)
    rows = {c.part: c for c in bench.tables("ViT-B/16")["full"]}
    assert rows["total"].total == rows["total"].trainable == 149_620_737  # CLIPModel ViT-B/16's published size
    method, cfg = bench.settings()["lora text-r8"]
    rows = {c.part: c for c in bench.parameter_table(bench.adapted_clip("ViT-B/32", method, cfg))}
    assert (rows["item"].trainable, rows["text"].trainable) == (0, 12 * 2 * 8 * (512 + 512))


# ---------------------------------------------------------------------------- saving, reloading, merging


def _clip_pair(towers, method: str, cfg: MethodConfig):
    return nn.ModuleDict({m: apply_peft(load(towers, m, "clip"), method, cfg) for m in ("image", "text")})


def _embed(pair: nn.ModuleDict) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        return (pair["image"](**batch_for(pair["image"])).pooled,
                pair["text"](**batch_for(pair["text"])).pooled)


@pytest.mark.parametrize("method", METHODS)
def test_saved_trainable_weights_reload_onto_a_fresh_base_exactly(towers, tmp_path, method):
    cfg = cfg_for(method)
    pair = _clip_pair(towers, method, cfg)
    nudge(pair)
    save_weights(pair, tmp_path / "w.safetensors", {"step": 1})
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "w.safetensors"))
    assert set(saved) == param_names(pair, True)  # just the trainable tensors
    if method != "full":
        assert all(MARKERS[method] in k for k in saved)

    fresh = _clip_pair(towers, method, cfg)
    assert not torch.equal(_embed(fresh)[0], _embed(pair)[0])
    load_weights(fresh, tmp_path / "w.safetensors")
    for a, b in zip(_embed(fresh), _embed(pair)):
        assert torch.equal(a, b)


def merge_lora(encoder: nn.Module) -> int:
    """Fold every LoRA update into its base weight and put the plain layer back (peft's merge), so
    the tower runs at base speed with the same outputs. Returns the number of merged layers (0: no
    LoRA here). Load trained weights before merging: a merged tower has no LoRA parameters left."""
    model = getattr(encoder, "model", encoder)
    names = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name in names:
        layer = model.get_submodule(name)
        layer.merge(safe_merge=True)  # raises on NaN/inf in the merged weight
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    if names and hasattr(model, "peft_config"):
        del model.peft_config
    return len(names)


@pytest.mark.parametrize("modality,arch", [("image", "clip"), ("text", "clip"), ("image", "timm"), ("text", "bert")])
def test_merged_lora_gives_the_unmerged_embeddings(towers, modality, arch):
    enc = apply_peft(load(towers, modality, arch), "lora", cfg_for("lora"))
    nudge(enc)
    batch = batch_for(enc)
    with torch.inference_mode():
        unmerged = enc(**batch)
    assert merge_lora(enc) == (2 if arch == "timm" else 2 * 3)  # per block: fused qkv, or q, k and v
    with torch.inference_mode():
        merged = enc(**batch)
    torch.testing.assert_close(merged.pooled, unmerged.pooled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged.tokens, unmerged.tokens, atol=1e-5, rtol=1e-5)
    merged_state, base_state = enc.state_dict(), load(towers, modality, arch).state_dict()
    assert set(merged_state) == set(base_state)  # plain layers again, no LoRA left
    value = target_modules(enc.model, "v")[0]
    key = next(k for k in base_state if k.endswith(f"{value}.weight"))
    assert not torch.equal(merged_state[key], base_state[key])  # the update is in the weight now
    assert merge_lora(load(towers, modality, arch)) == 0


# ---------------------------------------------------------------------------- training


@pytest.mark.parametrize("method,lr", [("lora", 1e-2), ("prefix", 1e-2), ("adapter", 1e-2), ("full", 1e-3)])
def test_each_method_lowers_a_toy_contrastive_loss(towers, method, lr):
    torch.manual_seed(0)
    pair = _clip_pair(towers, method, cfg_for(method))
    images, texts = batch_for(pair["image"], 8), batch_for(pair["text"], 8)
    params = [p for p in pair.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    pair.train()
    losses = []
    for _ in range(40):
        item_emb = F.normalize(pair["image"](**images).pooled, dim=-1)
        text_emb = F.normalize(pair["text"](**texts).pooled, dim=-1)
        loss = ClipLoss()(item_emb, text_emb, 10.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and losses[-1] < 0.85 * math.log(8), losses  # well below chance, log(8)


# ---------------------------------------------------------------------------- the rest


@pytest.mark.parametrize("modality,arch", [("image", "clip"), ("text", "bert"), ("image", "timm")])
def test_grad_checkpointing_recomputes_blocks_with_the_same_gradients(towers, modality, arch):
    enc = apply_peft(load(towers, modality, arch), "prefix", cfg_for("prefix"))
    enc.train()
    calls = []
    first_q = enc.model.get_submodule(target_modules(enc.model, "q")[0])  # inside block 0
    first_q.register_forward_pre_hook(lambda *a: calls.append(1))
    batch = batch_for(enc)

    def grads() -> list[torch.Tensor]:
        calls.clear()
        enc.zero_grad()
        torch.manual_seed(0)  # the same dropout masks (BERT's) in every run; checkpointing replays them
        enc(**batch).pooled.square().sum().backward()
        return [p.grad.clone() for p in enc.parameters() if p.requires_grad]

    plain, plain_calls = grads(), len(calls)
    set_grad_checkpointing(enc, True)
    checkpointed, ckpt_calls = grads(), len(calls)
    set_grad_checkpointing(enc, False)
    again = grads()
    assert (plain_calls, ckpt_calls, len(calls)) == (1, 2, 1)  # the block ran again during backward
    for a, b, c in zip(plain, checkpointed, again):
        torch.testing.assert_close(a, b)
        torch.testing.assert_close(a, c)


def test_text_prompts_make_room_in_the_position_table(towers, caplog):
    enc = load(towers, "text", "clip")  # 40 positions
    assert enc.max_length == 40
    with caplog.at_level(logging.WARNING, logger="mmret.adapters"):
        apply_peft(enc, "prefix", cfg_for("prefix", prefix_tokens=16))
    assert enc.max_length == 24 and "max_length lowered from 40 to 24" in caplog.text
    long = enc.tokenize([" ".join(["red"] * 60)])
    assert long["input_ids"].shape[1] == 24
    assert enc(**long).tokens.shape == (1, 24, tiny_models.HIDDEN)
    with pytest.raises(MmretError, match="--prefix-tokens 39 leaves no room for text in .*; use at most 38"):
        apply_peft(load(towers, "text", "clip"), "prefix", cfg_for("prefix", prefix_tokens=39))


def test_text_prompts_keep_clip_pooling_on_the_end_of_text_token(towers):
    """CLIP pools at the end-of-text token: with prompts inside, it must still pick that token."""
    enc = apply_peft(load(towers, "text", "clip"), "prefix", cfg_for("prefix"))
    batch = batch_for(enc)
    with torch.inference_mode():
        out = enc(**batch)
        eos = (batch["input_ids"] == enc.model.config.eos_token_id).int().argmax(-1)
        proj = enc.model.text_projection(out.tokens[torch.arange(len(eos)), eos])
    torch.testing.assert_close(out.pooled, proj)


@pytest.mark.parametrize("method", ["prefix", "adapter", "lora"])
def test_a_deep_copy_carries_its_own_method_weights(towers, method):
    enc = apply_peft(load(towers, "image", "clip"), method, cfg_for(method))
    nudge(enc)
    twin = copy.deepcopy(enc)
    batch = batch_for(enc)
    with torch.inference_mode():
        before = enc(**batch).pooled
        for p in twin.parameters():
            if p.requires_grad:
                p.mul_(3.0)
        assert torch.equal(enc(**batch).pooled, before)
        assert not torch.allclose(twin(**batch).pooled, before)


def test_recipes_are_one_flag_away():
    assert set(RECIPES) == {"text-r8", "both-r64"}
    text = apply_recipe(MethodConfig(), "text-r8")
    assert (text.method, text.tower, text.rank, text.alpha) == ("lora", "text", 8, 16.0)
    assert (text.targets, text.lora_dropout) == ("q,v", 0.1)
    both = apply_recipe(MethodConfig(), "both-r64")
    assert (both.tower, both.rank, both.alpha, both.targets) == ("both", 64, 128.0, "q,k,v")
    assert LoraConfig(**recipe_values("text-r8", {"rank": 4, "targets": None})).alpha == 8.0  # alpha follows a new rank
    assert recipe_values("both-r64", {"alpha": 32.0, "rank": 16})["alpha"] == 32.0
    with pytest.raises(MmretError, match="unknown --recipe 'r8'; choose one of text-r8, both-r64"):
        recipe_values("r8")


def test_a_tower_adapted_twice_is_a_clear_error(towers):
    enc = load(towers, "text", "bert")
    apply_peft(enc, "lora", cfg_for("lora"))
    with pytest.raises(MmretError, match="already adapted with lora; load a fresh one"):
        apply_peft(enc, "adapter", cfg_for("adapter"))
