"""MiniCLIP on real pictures and captions of the example dataset: shapes, training signal,
parameter counts worked out by hand, checkpoints, and the errors a user can hit."""

from __future__ import annotations

import dataclasses
import json

import huggingface_hub.constants
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mmret.data.tokenizer import train_bpe
from mmret.errors import MmretError
from mmret.modalities.image import load_rgb
from mmret.models.miniclip import MiniCLIP, MiniCLIPConfig, image_transform

B = 8
SMALL = dict(vocab_size=300, max_length=24, text_width=32, text_depth=2, text_heads=2, linformer_k=8,
             embed_dim=48)  # the image tower stays the real ResNet-34


def _clip_loss(item_emb, text_emb, logit_scale):
    # the symmetric InfoNCE written out here so this test does not depend on mmret.losses
    logits = logit_scale * item_emb @ text_emb.t()
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


@pytest.fixture
def batch(example_ds):
    """B pictures of the training split at 64 px and one BPE-tokenized caption each."""
    train = example_ds.split("train")
    tokenizer = train_bpe(train.captions["caption"], vocab_size=SMALL["vocab_size"])
    images = train.items.head(B)
    transform = image_transform(64)
    pixels = torch.stack([transform(load_rgb(p)) for p in images["path"]])
    first = train.captions.drop_duplicates("item_id").set_index("item_id").loc[images["item_id"], "caption"]
    tokens = tokenizer.tokenize(list(first), max_length=SMALL["max_length"])
    return pixels, tokens


def _model(**kw) -> MiniCLIP:
    torch.manual_seed(0)
    return MiniCLIP(MiniCLIPConfig(**(SMALL | kw)))


@pytest.mark.parametrize("temperature", ["learned", "dynamic"])
def test_forward_backward_on_pictures_and_captions(batch, temperature):
    pixels, tokens = batch
    assert pixels.shape == (B, 3, 64, 64)
    model = _model(temperature=temperature).train()
    item_emb, text_emb, scale = model(pixels, tokens["input_ids"], tokens["attention_mask"])
    assert item_emb.shape == text_emb.shape == (B, 48) and scale.shape == ()
    assert torch.allclose(item_emb.norm(dim=-1), torch.ones(B), atol=1e-5)
    assert torch.allclose(text_emb.norm(dim=-1), torch.ones(B), atol=1e-5)
    loss = _clip_loss(item_emb, text_emb, scale)
    assert torch.isfinite(loss)
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []
    assert model.temperature.fc1.weight.grad.abs().sum() > 0 if temperature == "dynamic" else True


def test_a_few_steps_lower_the_loss(batch):
    pixels, tokens = batch
    model = _model(image_model="resnet18").train()  # the smaller ResNet keeps this test quick
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        loss = _clip_loss(*model(pixels, tokens["input_ids"], tokens["attention_mask"]))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.clamp_logit_scale_()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_unnormalized_embeddings_and_bf16(batch):
    pixels, tokens = batch
    model = _model().eval()
    raw = model.encode_text(tokens["input_ids"], tokens["attention_mask"], normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(B), atol=1e-3)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        low = model.encode_item(pixels)
    assert torch.isfinite(low).all() and low.shape == (B, 48)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_parameter_counts_by_hand():
    model = _model()
    w, e, n, k, v, depth = 32, 48, 24, 8, 300, 2
    block = 2 * 2 * w + (3 * w * w + 3 * w) + (w * w + w) + 2 * k * n + (w * 4 * w + 4 * w) + (4 * w * w + w)
    text = v * w + n * w + depth * block + 2 * w
    mlp = 2 * e + (e * 4 * e + 4 * e) + (4 * e * e + e)
    projection = (512 * e + e) + (w * e + e) + mlp
    parts = {name: count_parameters(m) for name, m in model.named_parts().items()}
    assert parts == {"image tower": 21_284_672, "text tower": text, "projection": projection, "temperature": 1}
    assert count_parameters(model) == sum(parts.values())
    separate = _model(shared_projection=False)
    assert count_parameters(separate.named_parts()["projection"]) == projection + mlp


@pytest.mark.parametrize("shared", [True, False])
def test_state_dict_saves_with_safetensors_and_reloads(batch, tmp_path, shared):
    pixels, tokens = batch
    model = _model(shared_projection=shared).eval()
    save_file(model.state_dict(), tmp_path / "w.safetensors")  # refuses tensors shared between keys
    again = _model(shared_projection=shared)
    torch.nn.init.zeros_(again.image_in.weight)
    again.load_state_dict(load_file(tmp_path / "w.safetensors"))
    again.eval()
    assert torch.equal(again.encode_item(pixels), model.encode_item(pixels))
    assert torch.equal(again.encode_text(**tokens), model.encode_text(**tokens))


def test_config_round_trip_through_json():
    cfg = MiniCLIPConfig(**SMALL, temperature="dynamic")
    assert MiniCLIPConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(cfg)))) == cfg
    with pytest.raises(MmretError, match="unknown MiniCLIP config keys colour"):
        MiniCLIPConfig.from_dict({"colour": 1})


@pytest.mark.parametrize("change, message", [
    ({"text_width": 30, "text_heads": 4}, "--text-width .30. must be divisible by --text-heads .4."),
    ({"linformer_k": 40}, "--linformer-k .40. must be at most --max-length .24."),
    ({"image_size": 16}, "--image-size must be at least 32"),
    ({"temperature": "cold"}, "unknown --temperature 'cold'"),
    ({"dropout": 1.0}, "--dropout must be in"),
    ({"max_length": 1, "linformer_k": 1}, "--max-length must be at least 2"),
])
def test_bad_config_is_one_clear_line(change, message):
    with pytest.raises(MmretError, match=message):
        MiniCLIPConfig(**(SMALL | change))


def test_imagenet_weights_offline_fail_with_one_clear_line(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, no retries
    with pytest.raises(MmretError, match="cannot load ImageNet weights for resnet34") as e:
        MiniCLIP(MiniCLIPConfig(**SMALL, image_pretrained=True))
    assert "\n" not in str(e.value) and "--image-pretrained" in str(e.value)


def test_unknown_image_model():
    with pytest.raises(MmretError, match="unknown --image-model 'resnet3x'"):
        MiniCLIP(MiniCLIPConfig(**SMALL, image_model="resnet3x"))
