"""Sounds end to end, on tiny towers: prepare → features → heads and bridge over AST → eval (t2a / a2t,
bootstrap, --compare, a zero-shot CLAP row) → search (text, --audio, --json, the listening page);
LoRA, prefix, adapter and full inside AST; probe-memory and --dry-run on sound towers; a text
search of a sound run that loads only the text tower."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import tiny_audio
import tiny_models
import torch
from typer.testing import CliRunner

from mmret import training
from mmret.cli import app
from mmret.data import PrepareConfig, load_dataset, prepare
from mmret.encoders import LOADS
from mmret.inference.embeddings import write_run_embeddings
from mmret.inference.zeroshot import zero_shot_run
from mmret.models.tuners.prompts import add_prompts
from mmret.runs import RunConfig, with_overrides

runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio-world")
    data, runs = root / "data", root / "runs"
    tiny_audio.sound_folder(root / "sounds", n=24)
    prepare(PrepareConfig(source="folder", root=root / "sounds", name="sounds", data_dir=data, val=0.2, test=0.2))
    w = {"root": root, "data": data, "runs": runs, "ast": str(tiny_audio.save_tiny_ast(root / "ast", spread=3.0)),
         "bert": str(tiny_models.save_tiny_bert(root / "bert", pooling_config="mean")),
         "clap": str(tiny_audio.save_tiny_clap(root / "clap"))}
    w["heads"] = training.train(config(w, method="heads", name="heads", epochs=40, lr=1e-2)).run_dir
    return w


def config(world, **options) -> RunConfig:
    base = dict(dataset="sounds", item=world["ast"], text=world["bert"], data_dir=world["data"],
                runs_dir=world["runs"], epochs=2, batch_size=8, embed_dim=16, patience=0, workers=0, dropout=0.0)
    return with_overrides(RunConfig(), {**base, **options})


@pytest.fixture
def env(world, monkeypatch):
    monkeypatch.setenv("MMRET_DATA_DIR", str(world["data"]))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(world["runs"]))
    return world


def test_heads_over_ast_learn_and_name_their_metrics_after_sounds(world):
    history = pd.read_parquet(world["heads"] / "metrics.parquet")
    assert {"t2a_r1", "a2t_r1", "t2a_map10", "a2t_map10"} <= set(history.columns) and "t2i_r1" not in history
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]
    # the last checkpoint is what 40 epochs learnt; `best` is picked on 5 val clips at an early epoch
    # (7 here), whose fit of the training clips turns on the feature caches' automatic precision
    emb = write_run_embeddings(world["heads"], split="train", which="last")
    scores = np.asarray(emb.captions, np.float32) @ np.asarray(emb.items, np.float32).T
    kind = np.array([path.split("/")[-2] for path in emb.item_table.path])  # clips of a kind share captions
    assert (kind[scores.argmax(1)] == kind[emb.caption_item.numpy()]).mean() > 0.8  # chance: 1 in 6
    assert emb.modality == "audio"


def test_cli_eval_with_bootstrap_and_a_zero_shot_clap_row(env):
    result = runner.invoke(app, ["eval", "--zero-shot", env["clap"], "--compare", "heads", "--format", "json",
                                 "--bootstrap", "50"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["run"] for r in rows] == ["zeroshot-clap", "heads"] and rows[0]["modality"] == "audio"
    assert {"t2a_r1", "a2t_r10", "t2a_map10", "a2t_map10", "a2t_map"} <= set(rows[1]["metrics"])
    assert set(rows[1]["vs_first"]["t2a_map10"]) == {"delta", "low", "high", "p", "significant"}
    table = runner.invoke(app, ["eval", "--run", "heads", "--split", "val"])
    assert table.exit_code == 0 and "sounds val: 5 audio, 10 captions" in table.stdout
    assert "t2a_map10" in table.stdout and "t2i" not in table.stdout


def test_zero_shot_clap_scores_are_clap_model_scores(env):
    from transformers import ClapFeatureExtractor, ClapModel

    from mmret.encoders import load_text_encoder, load_tower
    from mmret.features import ensure_features
    from mmret.inference.loaded import LoadedRun
    from mmret.modalities.audio import load_audio

    prepare(PrepareConfig(source="folder", root=env["root"] / "sounds", name="clapped", val=0.2, test=0.2))
    ds = load_dataset("clapped")  # fresh caches, filled in fp32 (the automatic choice may take bf16)
    for tower, which in ((load_tower(env["clap"], "audio"), "audio"), (load_text_encoder(env["clap"]), "captions")):
        ensure_features(ds, tower, which, precision="fp32")
    run = LoadedRun(zero_shot_run(env["clap"], "clapped"))
    source, audio, captions = run.embed(ds, "test")  # from the feature caches (float16), before eval's float16
    model = ClapModel.from_pretrained(env["clap"]).eval()
    extractor = ClapFeatureExtractor.from_pretrained(env["clap"])
    waves = [load_audio(p, 48000, 1.0) for p in source.tables.paths]
    tokens = load_text_encoder(env["clap"]).tokenize(source.tables.captions)
    with torch.no_grad():
        out = model(input_features=extractor(waves, sampling_rate=48000, return_tensors="pt")["input_features"],
                    **tokens)
    want = (out.logits_per_text / model.logit_scale_t.exp()).detach()
    assert (captions @ audio.T - want).abs().max() < 1e-3
    emb = write_run_embeddings(run, "clapped", split="test")  # the run may have been made for another dataset
    got = np.asarray(emb.captions, np.float32) @ np.asarray(emb.items, np.float32).T
    assert np.abs(got - want.numpy()).max() < 2e-3  # stored as float16


def test_cli_search_by_text_and_by_sound_with_a_listening_page(env):
    page = env["root"] / "hits.html"
    text = runner.invoke(app, ["search", "a low steady hum", "--run", "heads", "-k", "3", "--grid", str(page)])
    assert text.exit_code == 0, text.output
    assert "'a low steady hum': audio" in text.stdout and f"listening page: {page}" in text.stdout
    html = page.read_text()
    assert html.count("<audio controls") == 3 and html.count("data:image/png;base64,") == 3
    query = next((env["root"] / "sounds" / "noise").glob("*.wav"))
    found = runner.invoke(app, ["search", "--audio", str(query), "--run", "heads", "-k", "2", "--json"])
    assert found.exit_code == 0, found.output
    result = json.loads(found.stdout)["results"][0]
    assert set(result) == {"query", "audio", "captions", "known", "unknown_words"}
    assert result["audio"][0]["path"] == str(query.absolute()) and "audio_id" in result["audio"][0]
    assert result["audio"][0]["score"] == pytest.approx(1.0, abs=1e-2) and len(result["captions"]) == 2
    wrong = runner.invoke(app, ["search", "--image", str(query), "--run", "heads"])
    assert (wrong.exit_code, " ".join(wrong.stderr.split())) == (
        1, "error: run heads searches audio, not images, and no run over images shares its space: query with --audio "
           "PATH, or train one into it (mmret train --dataset <images> --bind-to heads)")
    nothing = runner.invoke(app, ["search", "--run", "heads"])
    assert nothing.stderr.strip() == "error: nothing to search for: give a query text, --queries FILE, or --audio PATH"


def test_a_text_search_of_a_sound_run_loads_only_the_text_tower(env):
    from mmret.inference.search import search

    search(env["heads"], ["a hum"], k=1)  # embeddings and index exist after this
    before = dict(LOADS)
    search(env["heads"], ["white noise hissing"], k=1)
    assert LOADS.get("audio", 0) == before.get("audio", 0) and LOADS["text"] == before.get("text", 0) + 1


def test_a_bridge_reads_ast_token_states(world):
    result = training.train(config(world, method="bridge", name="bridge", queries=4, bridge_width=16, bridge_heads=2,
                                   bridge_layers=1))
    assert np.isfinite(pd.read_parquet(result.run_dir / "metrics.parquet")["t2a_r1"]).all()
    cache = next(p for p in (world["data"] / "sounds" / "features").iterdir() if "-audio-tokens-" in p.name)
    assert json.loads((cache / "manifest.json").read_text())["arrays"]["tokens"]["shape"][1:] == [26, 32]


@pytest.mark.parametrize("method", ["lora", "prefix", "adapter", "full"])
def test_tower_methods_adapt_ast(world, method):
    result = training.train(config(world, method=method, name=f"ast-{method}", rank=2, prefix_tokens=3, adapter_dim=4,
                                   tower="vision", max_steps=3, lr=1e-3))
    from safetensors.torch import load_file

    saved = load_file(str(result.run_dir / "checkpoints" / "last.safetensors"))
    inside = [k for k in saved if k.startswith("item_tower.encoder.")]
    marker = {"lora": "lora_", "prefix": "mmret_prompt", "adapter": "mmret_adapter", "full": "layers.0"}[method]
    assert inside and all(marker in k for k in inside if method != "full") and any(marker in k for k in inside)
    assert np.isfinite(pd.read_parquet(result.run_dir / "metrics.parquet")["a2t_r1"]).all()


def test_ast_prompts_go_after_its_cls_and_distillation_tokens(world):
    from mmret.encoders import load_tower

    enc = load_tower(world["ast"], "audio")
    x = enc.blank_inputs(2)["input_values"] + torch.randn(2, 128, 32)
    with torch.no_grad():
        before = enc(input_values=x)
    prompt = add_prompts(enc.model, "audio", 5)
    with torch.no_grad():
        after = enc(input_values=x)
    assert prompt.start == 2 and after.tokens.shape == before.tokens.shape == (2, 26, 32)
    assert not torch.allclose(after.pooled, before.pooled)  # the prompts take part in attention
    clap = load_tower(world["clap"], "audio")
    with pytest.raises(Exception, match="Swin transformer .* --method lora or adapter"):
        add_prompts(clap.model, "audio", 4)


def test_cli_dry_run_and_probe_memory_know_sound_towers(env):
    dry = runner.invoke(app, ["train", "--method", "lora", "--vision", env["ast"], "--text", env["bert"],
                              "--dataset", "not-prepared", "--dry-run"])
    assert dry.exit_code == 0, dry.output
    assert "audio.encoder" in dry.stdout and '"modality": "audio"' in dry.stdout
    probe = runner.invoke(app, ["probe-memory", "--vram", "1", "--method", "lora", "--vision", env["ast"], "--text",
                                env["clap"], "--batch-size", "4"])
    assert probe.exit_code == 0, probe.output
    assert "recommended: micro-batch" in probe.stdout
    assert "gradient checkpointing is not tried: ClapTextModelWithProjection does not support" in probe.stdout
    presets = runner.invoke(app, ["train", "--method", "adapter", "--vision", "ast-audioset", "--text", "clap-htsat",
                                  "--dataset", "not-prepared", "--dry-run"])
    assert presets.exit_code == 0 and "86,187,264" not in presets.stdout  # adapters add to AST's 86,187,264
    assert "audio.encoder" in presets.stdout


def test_the_item_tower_is_one_setting_that_sounds_spell_audio(env, tmp_path):
    """--audio, --vision and --item-tower set the same item tower, in train, probe-memory and
    precompute-embeddings; the command probe-memory recommends names it after the items."""
    configs = []
    for flag in ("--audio", "--item-tower", "--vision"):
        dry = runner.invoke(app, ["train", "--method", "heads", flag, env["ast"], "--text", env["bert"],
                                  "--dataset", "sounds", "--dry-run"])
        assert dry.exit_code == 0, dry.output
        configs.append(json.loads(dry.stdout[dry.stdout.index("\n{") + 1:]))
    assert configs[0] == configs[1] == configs[2] and configs[0]["encoders"]["item"] == env["ast"]
    assert "vision" not in configs[0]["encoders"]
    probe = runner.invoke(app, ["probe-memory", "--vram", "1", "--method", "heads", "--audio", env["ast"], "--text",
                                env["bert"], "--batch-size", "4", "--save", str(tmp_path / "fits.json")])
    assert probe.exit_code == 0, probe.output
    assert f"--audio {env['ast']}" in probe.stdout.replace("\n", "")
    assert json.loads((tmp_path / "fits.json").read_text())["encoders"]["item"] == env["ast"]
    cached = runner.invoke(app, ["precompute-embeddings", "--dataset", "sounds", "--audio", env["ast"], "--precision",
                                 "fp32"])
    assert cached.exit_code == 0, cached.output
    assert any("-audio-" in p.name for p in (env["data"] / "sounds" / "features").iterdir())


def test_serve_plays_sounds_draws_their_spectrograms_and_takes_a_sound_upload(world):
    """The web API over a sound run: hits link to the recording itself (the page's audio player
    plays it), thumbnails are spectrogram JPEGs, an uploaded sound finds itself, and a picture
    sent to a gallery of sounds is refused in one line."""
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from mmret.inference.search import Gallery
    from mmret.serve.app import create_app
    from mmret.serve.config import ServeConfig
    from mmret.serve.service import SearchService

    gallery = Gallery.open(world["heads"], split="all", data_dir=world["data"])
    service = SearchService(gallery, ServeConfig(world["heads"]))
    try:
        client = TestClient(create_app(service), base_url="http://127.0.0.1")
        info = client.get("/api/info").json()
        assert (info["modality"], info["noun"], info["items"]) == ("audio", "sound", 24)
        body = client.post("/api/search", json={"text": "a low steady hum", "k": 3}).json()
        assert body["modality"] == "audio" and len(body["results"]) == 3
        hit = body["results"][0]
        media = client.get(hit["url"])
        assert media.status_code == 200 and media.headers["content-type"].startswith("audio/")
        assert media.content == open(gallery.paths[gallery.row_of[hit["id"]]], "rb").read()
        thumb = client.get(hit["thumbnail"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert Image.open(io.BytesIO(thumb.content)).format == "JPEG"
        query = next(p for p in gallery.paths if p.endswith(".wav"))
        with open(query, "rb") as f:
            found = client.post("/api/search/upload", files={"file": ("mine.wav", f, "audio/wav")}, data={"k": "2"})
        assert found.status_code == 200, found.text
        assert found.json()["results"][0]["id"] == gallery.ids[gallery.paths.index(query)]
        assert found.json()["captions"]
        picture = io.BytesIO()
        Image.new("RGB", (8, 8)).save(picture, format="PNG")
        refused = client.post("/api/search/upload", files={"file": ("cat.png", picture.getvalue(), "image/png")})
        assert refused.status_code == 415 and refused.json()["error"].startswith("the upload is not a sound mmret can")
    finally:
        service.close()
