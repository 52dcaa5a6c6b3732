"""Frozen towers: tiny random models saved to folders and loaded by path (the code a hub id takes),
checked against the library's own forward pass and preprocessing, plus the one-line errors."""

from __future__ import annotations

import logging
import pickle
import time

import numpy as np
import pytest
import tiny_models
import torch
from PIL import Image

from mmret.encoders import (
    ENCODERS,
    ImageEncoder,
    TextEncoder,
    TimmImageEncoder,
    encoder_names,
    load_image_encoder,
    load_text_encoder,
)
from mmret.errors import MmretError

CAPTIONS = ["a red circle above a blue square", "two shapes", "a green triangle left of a yellow circle there"]


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    return tiny_models.save_all(tmp_path_factory.mktemp("towers"))


@pytest.fixture
def picture():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (45, 60, 3), dtype=np.uint8))


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty huggingface_hub cache for this test only."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_registry_lists_the_presets_with_help():
    assert set(ENCODERS) == {"dino-vits16", "dinov2-vits14", "distilbert", "minilm", "clip-b32", "clip-b16",
                             "ast-audioset", "clap-htsat"}
    assert encoder_names("image") == ["dino-vits16", "dinov2-vits14", "clip-b32", "clip-b16"]
    assert encoder_names("text") == ["distilbert", "minilm", "clip-b32", "clip-b16", "clap-htsat"]
    assert encoder_names("audio") == ["ast-audioset", "clap-htsat"]
    assert ENCODERS["clip-b32"].modalities == ("image", "text")
    assert ENCODERS["dinov2-vits14"].source == "facebook/dinov2-small"
    assert all(entry.help for entry in ENCODERS.values())


def test_timm_folder_matches_timm(towers, picture):
    import timm

    enc = load_image_encoder(str(towers["timm"]))
    assert isinstance(enc, TimmImageEncoder) and isinstance(enc, ImageEncoder)
    assert (enc.dim, enc.token_dim, enc.image_size) == (32, 32, (32, 32))
    ref = timm.create_model(f"local-dir:{towers['timm']}", pretrained=True, num_classes=0).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = enc(x)
        assert out.pooled.shape == (2, 32) and out.tokens.shape == (2, 17, 32) and out.mask is None
        assert torch.allclose(out.pooled, ref(x), atol=1e-6)  # timm's own pooled (pre-logits) output
        assert torch.allclose(out.pooled, out.tokens[:, 0], atol=1e-6)  # DINO pools the CLS token
    # preprocessing is timm's eval transform for this model's data config, not copied constants
    timm_transform = timm.data.create_transform(**timm.data.resolve_model_data_config(ref))
    assert torch.allclose(enc.transform()(picture), timm_transform(picture), atol=1e-6)
    assert enc.spec["library"] == "timm" and enc.spec["revision"].startswith("sha256:")


def test_clip_towers_match_clip_model(towers, picture):
    from transformers import CLIPImageProcessor, CLIPModel

    image, text = load_image_encoder(str(towers["clip"])), load_text_encoder(str(towers["clip"]))
    ref = CLIPModel.from_pretrained(towers["clip"]).eval()
    assert (image.dim, image.token_dim, text.dim, text.token_dim) == (16, 32, 16, 32)
    x = torch.randn(3, 3, 32, 32)
    batch = text.tokenize(CAPTIONS)
    with torch.inference_mode():
        out, tout = image(x), text(**batch)
        ref_image = ref.get_image_features(pixel_values=x)
        ref_text = ref.get_text_features(**batch)
    ref_image = getattr(ref_image, "pooler_output", ref_image)
    ref_text = getattr(ref_text, "pooler_output", ref_text)
    assert out.tokens.shape == (3, 17, 32) and torch.allclose(out.pooled, ref_image, atol=1e-5)
    assert tout.tokens.shape == (3, batch["input_ids"].shape[1], 32)
    assert torch.allclose(tout.pooled, ref_text, atol=1e-5) and torch.equal(tout.mask, batch["attention_mask"])
    processor = CLIPImageProcessor.from_pretrained(towers["clip"])
    assert (image.mean, image.std) == (tuple(processor.image_mean), tuple(processor.image_std))
    processed = processor(images=picture, return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(image.transform()(picture), processed, atol=_one_level(image))


def _one_level(enc: ImageEncoder) -> float:
    """One 8-bit grey level after normalisation: PIL (ours) and torch (transformers) resampling round
    differently, never by more."""
    return 1.01 / 255 / min(enc.std)


def test_dinov2_without_processor_config_uses_the_published_settings_and_says_so(towers, caplog):
    from transformers import Dinov2Model

    with caplog.at_level(logging.WARNING, logger="mmret.encoders"):
        enc = load_image_encoder(str(towers["dinov2"]), image_size=32)
    assert "no preprocessor_config.json; using BitImageProcessorPil with the published dinov2 settings" in caplog.text
    assert enc.mean == (0.485, 0.456, 0.406) and enc.std == (0.229, 0.224, 0.225)  # ImageNet, as facebook/dinov2-*
    assert enc.image_size == (32, 32) and enc.preprocessing.resize == 37  # 256/224 kept at 32 px
    ref = Dinov2Model.from_pretrained(towers["dinov2"]).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        out = enc(x)
        assert out.tokens.shape == (2, 17, 32)
        assert torch.allclose(out.pooled, ref(pixel_values=x).pooler_output, atol=1e-6)


def test_dinov2_with_processor_config_reads_it(tmp_path, picture):
    from transformers import BitImageProcessor

    folder = tiny_models.save_tiny_dinov2(tmp_path / "d", with_processor=True)
    enc = load_image_encoder(str(folder))
    assert enc.image_size == (32, 32) and enc.preprocessing.resize == 40
    assert enc.mean == (0.485, 0.456, 0.406)
    processed = BitImageProcessor.from_pretrained(folder)(images=picture, return_tensors="pt")["pixel_values"][0]
    assert torch.allclose(enc.transform()(picture), processed, atol=_one_level(enc))


def test_text_pooling_is_mask_aware_and_follows_the_model(towers):
    minilm, bert = load_text_encoder(str(towers["minilm"])), load_text_encoder(str(towers["bert"]))
    assert minilm.pooling == "mean" and bert.pooling == "mean"  # 1_Pooling config / the default
    distil = load_text_encoder(str(towers["distilbert"]), pooling="cls")
    with torch.inference_mode():
        alone = minilm(**minilm.tokenize(CAPTIONS[1:2]))
        padded = minilm(**minilm.tokenize(CAPTIONS))  # "two shapes" padded to the longest caption
        assert padded.mask[1].sum() < padded.mask.shape[1]
        assert torch.allclose(alone.pooled[0], padded.pooled[1], atol=1e-5)
        real = padded.mask[1].bool()
        assert torch.allclose(padded.pooled[1], padded.tokens[1][real].mean(0), atol=1e-6)
        d = distil(**distil.tokenize(CAPTIONS))
        assert torch.allclose(d.pooled, d.tokens[:, 0])
    fixed = minilm.tokenize(CAPTIONS, pad_to_max_length=True)
    assert fixed["input_ids"].shape == (3, minilm.max_length) == (3, 64)  # DEFAULT_MAX_LENGTH, padded to it


def test_max_length_is_capped_by_the_model(towers, caplog):
    with caplog.at_level(logging.WARNING, logger="mmret.encoders"):
        enc = load_text_encoder(str(towers["bert"]), max_length=500)
    assert enc.max_length == 64 and "reads at most 64 tokens" in caplog.text
    assert load_text_encoder(str(towers["bert"]), max_length=16).max_length == 16
    long = " ".join(["circle"] * 100)
    assert enc.tokenize([long])["input_ids"].shape[1] == 64


def test_towers_start_frozen_but_forward_keeps_gradients(towers):
    enc = load_image_encoder(str(towers["timm"]))
    assert not any(p.requires_grad for p in enc.parameters()) and not enc.model.training
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    enc(x).pooled.sum().backward()  # no no_grad inside forward: gradients reach the input
    assert x.grad is not None and x.grad.abs().sum() > 0
    text = load_text_encoder(str(towers["bert"]))
    text.model.encoder.layer[0].attention.self.query.weight.requires_grad_(True)  # e.g. a LoRA target
    text(**text.tokenize(CAPTIONS)).pooled.pow(2).sum().backward()
    assert text.model.encoder.layer[0].attention.self.query.weight.grad is not None


def test_image_size_changes_the_input_the_tokens_and_the_spec(towers):
    base = load_image_encoder(str(towers["timm"]))
    big = load_image_encoder(str(towers["timm"]), image_size=48)
    assert big.image_size == (48, 48) and big.spec != base.spec and big.spec["size"] == (48, 48)
    assert big.num_tokens == 37 and base.num_tokens == 17  # (48/8)^2 + 1
    clip = load_image_encoder(str(towers["clip"]), image_size=48)
    with torch.inference_mode():
        assert clip(torch.randn(1, 3, 48, 48)).tokens.shape == (1, 37, 32)  # position embeddings interpolated


def test_transform_is_picklable_for_workers(towers, picture):
    enc = load_image_encoder(str(towers["clip"]))
    for train in (False, True):
        t = enc.transform(train=train)
        clone = pickle.loads(pickle.dumps(t))
        torch.manual_seed(0)
        a = t(picture)
        torch.manual_seed(0)
        assert torch.equal(a, clone(picture)) and a.shape == (3, 32, 32)


@pytest.mark.parametrize("name,tokens", [("test_vit", 101), ("test_resnet", None)])
def test_timm_by_name_plus_weights_file(tmp_path, name, tokens):
    import timm
    from safetensors.torch import load_file

    weights = tiny_models.save_timm_weights(name, tmp_path / f"{name}.safetensors")
    enc = load_image_encoder(f"timm:{name}", weights=weights)
    ref = timm.create_model(name, pretrained=False, num_classes=0).eval()
    ref.load_state_dict(load_file(str(weights)))
    x = torch.randn(2, 3, *enc.image_size)
    with torch.inference_mode():
        out = enc(x)
        assert torch.allclose(out.pooled, ref(x), atol=1e-5)
    assert out.tokens.ndim == 3 and out.tokens.shape[-1] == enc.token_dim  # CNN maps become (B, h*w, C)
    if tokens:
        assert out.tokens.shape[1] == tokens
    assert enc.spec["revision"].startswith("sha256:")


def test_hub_id_resolves_from_the_local_cache_without_network(towers, hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    tiny_models.install_in_hub_cache(towers["clip"], hub_cache, "mmret-test/tiny-clip", commit="ab" * 20)
    enc = load_image_encoder("mmret-test/tiny-clip")
    by_path = load_image_encoder(str(towers["clip"]))
    assert enc.spec["model"] == "mmret-test/tiny-clip" and enc.spec["revision"] == "ab" * 20
    x = torch.randn(1, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(enc(x).pooled, by_path(x).pooled)
    assert isinstance(load_text_encoder("mmret-test/tiny-clip"), TextEncoder)


def test_offline_hub_id_names_the_model_and_the_way_out(hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MmretError) as e:
        load_image_encoder("facebook/dinov2-small")
    assert str(e.value) == ("model 'facebook/dinov2-small' is not in the local Hugging Face cache and "
                            "HF_HUB_OFFLINE is set; download it on a connected machine, or pass the path "
                            "of a local model folder instead")
    with pytest.raises(MmretError, match="'sentence-transformers/all-MiniLM-L6-v2' is not in the local"):
        load_text_encoder("minilm")  # a preset goes the same way


def test_unreachable_hub_fails_fast(hub_cache, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    start = time.perf_counter()
    with pytest.raises(MmretError) as e:
        load_image_encoder("mmret-test/not-cached")
    assert time.perf_counter() - start < 30
    assert str(e.value) == ("model 'mmret-test/not-cached' is not in the local Hugging Face cache and the Hub "
                            "cannot be reached (offline?); download it on a connected machine, or pass the "
                            "path of a local model folder instead")


def test_unknown_names_and_wrong_modalities(tmp_path):
    with pytest.raises(MmretError) as e:
        load_image_encoder("nosuchmodel")
    assert str(e.value) == ("unknown image encoder 'nosuchmodel': use a preset (dino-vits16, dinov2-vits14, "
                            "clip-b32, clip-b16), a hub id such as owner/name, or a local model folder")
    with pytest.raises(MmretError) as e:
        load_image_encoder("minilm")
    assert str(e.value) == ("'minilm' is a text encoder, not an image encoder; image presets: "
                            "dino-vits16, dinov2-vits14, clip-b32, clip-b16")
    with pytest.raises(MmretError, match="'dino-vits16' is a image encoder, not an text encoder"):
        load_text_encoder("dino-vits16")
    with pytest.raises(MmretError, match="unknown timm model 'no_such_net'"):
        load_image_encoder("timm:no_such_net")
    with pytest.raises(MmretError, match="is not a model folder"):
        load_image_encoder(str(tmp_path / "missing"))


def test_folders_that_are_not_models(tmp_path, towers):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MmretError, match="holds no config.json: it is not a transformers or timm model folder"):
        load_image_encoder(str(tmp_path / "empty"))
    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(MmretError, match="holds no weights file"):
        load_text_encoder(str(tmp_path / "noweights"))
    with pytest.raises(MmretError, match="is not an image model"):
        load_image_encoder(str(towers["bert"]))
    with pytest.raises(MmretError, match="is a timm image model, not a text encoder"):
        load_text_encoder(str(towers["timm"]))


def test_folder_revision_follows_the_weights(tmp_path):
    a = tiny_models.save_tiny_bert(tmp_path / "a", seed=0)
    b = tiny_models.save_tiny_bert(tmp_path / "b", seed=1)
    a2 = tiny_models.save_tiny_bert(tmp_path / "c" / "a", seed=0)
    rev = lambda p: load_text_encoder(str(p)).spec["revision"]  # noqa: E731
    assert rev(a) != rev(b)
    assert rev(a) == rev(a2)  # same files elsewhere: same identity, the cache survives a move
