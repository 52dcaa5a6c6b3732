"""Sound towers through the user's path: tiny random AST and CLAP saved with `save_pretrained` and
loaded by folder or hub id, their outputs against transformers' own classes, CLAP's text tower,
the presets built on the meta device offline, and the spectrogram-image route."""

from __future__ import annotations

import numpy as np
import pytest
import tiny_audio
import tiny_models
import torch
from safetensors.torch import load_file

from mmret.common.paths import ANYWHERE
from mmret.encoders import (
    AudioEncoder,
    SpectrogramEncoder,
    load_text_encoder,
    load_tower,
    tower_modality,
)
from mmret.errors import MmretError
from mmret.modalities.audio import load_audio
from mmret.modalities.spectrogram import MelSettings, mel_picture


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio-towers")
    return {"ast": tiny_audio.save_tiny_ast(root / "ast"), "ast_cls": tiny_audio.save_tiny_ast(root / "astc", 1, True),
            "clap": tiny_audio.save_tiny_clap(root / "clap"),
            "dinov2": tiny_models.save_tiny_dinov2(root / "dinov2", with_processor=True),
            "sound": tiny_audio.write_sound(root / "s.ogg", "rising", 3.0, 44100), "root": root}


def test_ast_folder_matches_transformers(towers):
    from transformers import ASTFeatureExtractor, ASTModel

    enc = load_tower(str(towers["ast"]), "audio")
    assert isinstance(enc, AudioEncoder) and enc.modality == "audio" and enc.input_name == "input_values"
    assert (enc.dim, enc.token_dim, enc.preprocessing.sample_rate) == (32, 32, 16000)
    assert enc.preprocessing.seconds == pytest.approx((127 * 160 + 400) / 16000)
    x = enc.item_loader().reading(ANYWHERE)(towers["sound"])  # decoded, resampled 44.1 -> 16 kHz, cut, features
    extractor, model = (ASTFeatureExtractor.from_pretrained(towers["ast"]),
                        ASTModel.from_pretrained(towers["ast"]).eval())
    wave = load_audio(towers["sound"], 16000, enc.preprocessing.seconds)
    ref_in = extractor(wave, sampling_rate=16000, return_tensors="pt")["input_values"]
    assert torch.equal(x[None], ref_in)
    with torch.no_grad():
        out, ref = enc(input_values=x[None]), model(input_values=ref_in)
    assert torch.allclose(out.pooled, ref.pooler_output, atol=1e-6)  # AST's pooler: mean of CLS and distillation
    assert out.tokens.shape == (1, 2 + 2 * 12, 32)


def test_the_published_classification_checkpoint_loads_into_the_bare_model(towers):
    enc = load_tower(str(towers["ast_cls"]), "audio")
    saved = load_file(str(towers["ast_cls"] / "model.safetensors"))
    # saved as the published checkpoint is (transformers 4 names: ...encoder.layer.0.attention.attention.query)
    key = next(k for k in saved
               if k.endswith(("layer.0.attention.attention.query.weight", "layers.0.attention.q_proj.weight")))
    assert torch.equal(enc.model.layers[0].attention.q_proj.weight, saved[key])


def test_a_hub_id_and_its_folder_load_the_same_tower(towers, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    tiny_models.install_in_hub_cache(towers["ast"], tmp_path / "hub", "someone/tiny-ast")
    by_id, by_folder = load_tower("someone/tiny-ast", "audio"), load_tower(str(towers["ast"]), "audio")
    assert by_id.source.id == "someone/tiny-ast" and by_id.preprocessing.numbers() == by_folder.preprocessing.numbers()
    x = by_id.blank_inputs(2)["input_values"]
    assert torch.equal(by_id(input_values=x).pooled, by_folder(input_values=x).pooled)
    assert tower_modality("someone/tiny-ast") == "audio" and tower_modality(str(towers["clap"])) == "audio"


def test_clap_towers_match_transformers_clap_model(towers):
    from transformers import ClapFeatureExtractor, ClapModel

    audio, text = load_tower(str(towers["clap"]), "audio"), load_text_encoder(str(towers["clap"]))
    assert ((audio.dim, audio.token_dim, audio.preprocessing.sample_rate, audio.preprocessing.seconds)
            == (16, 32, 48000, 1.0))
    assert (text.dim, text.pooling) == (16, "proj")
    model = ClapModel.from_pretrained(towers["clap"]).eval()
    extractor = ClapFeatureExtractor.from_pretrained(towers["clap"])
    waves = [load_audio(tiny_audio.write_sound(towers["root"] / f"c{i}.wav", k, 0.6, 16000), 48000, 1.0)
             for i, k in enumerate(("low", "noise", "pulses"))]
    ref_in = extractor(waves, sampling_rate=48000, return_tensors="pt")
    ours = torch.stack([audio.item_loader().reading(ANYWHERE)(towers["root"] / f"c{i}.wav") for i in range(3)])
    assert torch.allclose(ours, ref_in["input_features"], atol=1e-5)  # short clips repeated to fill 1 s
    captions = ["a low steady hum", "white noise hissing", "a clock ticking"]
    tokens = text.tokenize(captions)
    with torch.no_grad():
        ref = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"],
                    input_features=ref_in["input_features"], is_longer=ref_in["is_longer"])
        a = torch.nn.functional.normalize(audio(input_features=ours).pooled, dim=-1)
        t = torch.nn.functional.normalize(text(**tokens).pooled, dim=-1)
    assert torch.allclose(t @ a.T, ref.logits_per_text / model.logit_scale_t.exp(), atol=1e-5)


def test_presets_build_on_the_meta_device_offline(monkeypatch):
    from mmret.memory.probe import token_count

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ast, clap = load_tower("ast-audioset", "audio", meta=True), load_tower("clap-htsat", "audio", meta=True)
    clap_text = load_text_encoder("clap-htsat", meta=True)
    assert ast.is_meta and clap.is_meta and clap_text.is_meta
    assert sum(p.numel() for p in ast.parameters()) == 86_187_264  # ASTModel of the AudioSet checkpoint
    assert ast.input_shape == (1024, 128) and clap.input_shape == (1, 1001, 64)
    assert ast.preprocessing.seconds == pytest.approx(10.255) and clap.preprocessing.sample_rate == 48000
    assert (clap.dim, clap_text.dim) == (512, 512)
    assert clap.preprocessing.extractor.truncation == "rand_trunc" and clap.preprocessing.extractor.frequency_min == 50
    assert token_count(ast) == 2 + 12 * 101 and token_count(clap) == 64
    assert tower_modality("ast-audioset") == "audio" and tower_modality("clip-b32") == "image"


def test_a_meta_tower_loads_its_weights_when_asked(towers):
    meta = load_tower(str(towers["ast"]), "audio", meta=True)
    real = meta.with_weights()
    assert meta.is_meta and not real.is_meta and real.spec == meta.spec


def test_wrong_towers_say_what_to_pass(towers):
    with pytest.raises(MmretError, match=r"is not a sound model mmret knows \(AST or CLAP\).*pass spectrogram:"):
        load_tower(str(towers["dinov2"]), "audio")
    with pytest.raises(MmretError, match="'ast-audioset' is a audio encoder, not an image encoder"):
        load_tower("ast-audioset", "image")
    with pytest.raises(MmretError, match="is a audio encoder, not an image encoder"):
        load_tower(f"spectrogram:{towers['dinov2']}", "image")
    with pytest.raises(MmretError, match="choose cls or mean"):
        load_tower(str(towers["ast"]), "audio", pooling="proj")


def test_spectrogram_route_feeds_a_picture_tower(towers):
    enc = load_tower(f"spectrogram:{towers['dinov2']}", "audio")
    assert isinstance(enc, SpectrogramEncoder) and enc.modality == "audio" and enc.model is enc.image.model
    assert enc.spec["route"] == "spectrogram" and enc.spec["image"]["model"] == "dinov2"
    x = enc.item_loader().reading(ANYWHERE)(towers["sound"])
    assert x.shape == (3, 32, 32) and torch.isfinite(x).all()
    with torch.no_grad():
        out = enc(pixels=x[None])
    assert out.pooled.shape == (1, 32)
    names = [n for n, _ in enc.named_parameters()]
    assert len(names) == len(set(names)) and all(n.startswith("image.model.") for n in names)
    meta = load_tower(f"spectrogram:{towers['dinov2']}", "audio", meta=True)
    assert meta.is_meta and meta.with_weights().spec == enc.spec


def test_a_spectrogram_picture_puts_low_sounds_low_and_silence_black():
    settings = MelSettings(seconds=1.0)
    t = np.arange(16000) / 16000
    low = mel_picture((0.5 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), settings)
    high = mel_picture((0.5 * np.sin(2 * np.pi * 5000 * t)).astype(np.float32), settings)
    assert low.shape == (128, 101) and 0.0 <= low.min() and low.max() == 1.0
    rows = np.arange(128)[:, None]
    assert (low * rows).sum() / low.sum() > (high * rows).sum() / high.sum()  # low frequencies in the bottom rows
    assert not mel_picture(np.zeros(8000, np.float32), settings).any()
    quiet = mel_picture((0.01 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), settings)
    assert np.allclose(quiet, low, atol=1e-4)  # loudness is relative to the clip's loudest bin
