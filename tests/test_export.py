"""`mmret export`: ONNX and OpenVINO exports of heads, bridge, lora and scratch runs opened by
onnxruntime / OpenVINO in a process that imports nothing of mmret (`standalone_embed.py`), with
cosine >= 0.9999 to mmret's own embeddings; a LoRA adapter opened by `peft.PeftModel.from_pretrained`
matching the run's tower; the text side loaded by `SentenceTransformer`; a model card in every
export; and what cannot be exported refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_models
import torch
from typer.testing import CliRunner

import mmret
from mmret import training
from mmret.cli import app
from mmret.data import PrepareConfig, load_dataset, prepare
from mmret.export.catalog import export_run
from mmret.runs import RunConfig, with_overrides

HERE = Path(__file__).resolve().parent
CAPTIONS = ["a red circle above a blue square", "a green triangle", "two yellow squares side by side, a long caption"]
runner = CliRunner()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    prepare(PrepareConfig(source="example", count=24, data_dir=root / "data"))
    w = {"root": root, "data": root / "data", "runs": root / "runs",
         "vit": str(tiny_models.save_tiny_timm_vit(root / "vit", spread=4.0)),
         "bert": str(tiny_models.save_tiny_bert(root / "bert", pooling_config="mean"))}
    base = dict(dataset="example", data_dir=w["data"], runs_dir=w["runs"], epochs=2, batch_size=8, embed_dim=16,
                patience=0, workers=0, item=w["vit"], text=w["bert"])
    runs = {"heads": dict(method="heads", head_layers=2, lr=1e-2),
            "bridge": dict(method="bridge", queries=2, bridge_layers=1),
            "lora": dict(method="lora", rank=4, lr=3e-3, lora_dropout=0.0, dropout=0.0, targets="q,v,o"),
            "scratch": dict(method="scratch", image_model="resnet10t", pretrained_image=False, image_size=32,
                            text_width=32, text_depth=1, linformer_k=4, vocab_size=300, max_length=16, epochs=1)}
    for name, options in runs.items():
        training.train(with_overrides(RunConfig(), {**base, **options, "name": name}))
        w[name] = w["runs"] / name
    w["pictures"] = [str(p) for p in load_dataset("example", w["data"]).items["path"].tolist()[:5]]
    return w


def standalone(folder: Path, runtime: str, pictures: list[str]) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, str(HERE / "standalone_embed.py"), str(folder), runtime,
                          json.dumps(CAPTIONS), json.dumps(pictures)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def cosine(a, b) -> np.ndarray:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.mark.parametrize("runtime", ["onnx", "openvino"])
@pytest.mark.parametrize("method", ["heads", "bridge", "lora", "scratch"])
def test_an_export_embeds_without_mmret_as_mmret_does(world, tmp_path, method, runtime):
    model = mmret.load(world[method], device="cpu")
    result = export_run(model, tmp_path / "export", runtime)
    theirs = standalone(result.path, runtime, world["pictures"])
    assert theirs["mmret_imported"] == []
    tokens = model.tokenizer(CAPTIONS)  # the standalone tokenizer gives mmret's ids and mask exactly
    assert theirs["ids"] == tokens["input_ids"].tolist() and theirs["mask"] == tokens["attention_mask"].tolist()
    text, images = model.encode_text(CAPTIONS), model.encode_images(world["pictures"])
    assert cosine(theirs["text"], text).min() >= 0.9999
    assert cosine(theirs["images"], images).min() >= 0.9999
    assert np.linalg.norm(np.asarray(theirs["images"]), axis=1) == pytest.approx(1.0, abs=1e-4)
    card = (result.path / "README.md").read_text()
    assert f"method `{method}`" in card and "## Scores" in card and '"method": "' in card
    manifest = json.loads((result.path / "mmret.json").read_text())
    assert (manifest["format"], manifest["run"], manifest["checkpoint_digest"]) == (runtime, method, model.run.digest)


def test_a_lora_adapter_opens_with_peft_and_matches_the_runs_tower(world, tmp_path):
    from peft import PeftModel
    from transformers import AutoModel

    from mmret.encoders import load_text_encoder

    model = mmret.load(world["lora"], device="cpu")
    out = tmp_path / "peft"
    assert runner.invoke(app, ["export", str(world["lora"]), "--to", str(out), "--format", "peft"]).exit_code == 0
    assert {"text/adapter_config.json", "text/adapter_model.safetensors", "image/adapter_config.json",
            "text_head.safetensors", "image_head.safetensors", "README.md"} <= {
        str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    tokens = model.tokenizer(CAPTIONS)
    _, dual = model.run.model()
    with torch.inference_mode():
        ours = dual.text_tower.encoder.model(**tokens).last_hidden_state
        peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(world["bert"]), str(out / "text")).eval()
        theirs = peft_model(**tokens).last_hidden_state
        plain = AutoModel.from_pretrained(world["bert"]).eval()(**tokens).last_hidden_state
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (plain - ours).abs().max() > 1e-3  # the adapter moved the tower: the match above means something
    # the same adapter in mmret's own tower wrapper gives the pooled output the run's tower gives
    tower = load_text_encoder(world["bert"], pooling="mean")
    PeftModel.from_pretrained(tower.model, str(out / "text"))
    with torch.inference_mode():
        torch.testing.assert_close(tower(**tokens).pooled, dual.text_tower.encoder(**tokens).pooled, atol=1e-5,
                                   rtol=0)
    config = json.loads((out / "text" / "adapter_config.json").read_text())
    assert (config["r"], config["peft_type"], config["base_model_name_or_path"]) == (4, "LORA", world["bert"])


@pytest.mark.parametrize("method", ["heads", "lora"])
def test_the_text_side_loads_in_sentence_transformers(world, tmp_path, method):
    from sentence_transformers import SentenceTransformer

    model = mmret.load(world[method], device="cpu")
    result = export_run(model, tmp_path / "st", "sentence-transformers")
    st = SentenceTransformer(str(result.path), device="cpu")
    theirs = st.encode(CAPTIONS, convert_to_numpy=True)
    np.testing.assert_allclose(theirs, model.encode_text(CAPTIONS), atol=1e-5)


@pytest.mark.parametrize("method, format, message", [
    ("heads", "peft", "--format peft writes LoRA adapters, and run heads was trained with heads"),
    ("scratch", "sentence-transformers", "run scratch (scratch) has no transformers text tower"),
])
def test_what_a_format_cannot_hold_is_refused_in_one_line(world, tmp_path, method, format, message):
    out = runner.invoke(app, ["export", str(world[method]), "--to", str(tmp_path / "x"), "--format", format])
    assert out.exit_code == 1 and out.stderr.startswith(f"error: {message}") and out.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()


def test_export_refuses_an_unknown_format_and_a_folder_in_use(world, tmp_path):
    out = runner.invoke(app, ["export", str(world["heads"]), "--to", str(tmp_path / "x"), "--format", "tflite"])
    assert out.exit_code == 1 and out.stderr == ("error: unknown export format 'tflite'; choose one of peft, onnx, "
                                                 "openvino, sentence-transformers\n")
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    out = runner.invoke(app, ["export", str(world["heads"]), "--to", str(tmp_path / "used")])
    assert out.exit_code == 1 and "exists and is not empty; give a new folder, or --force" in out.stderr
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"


def test_a_format_is_registered_once():
    from mmret.errors import MmretError
    from mmret.export.catalog import format_names, get_exporter
    from mmret.export.registry import Exporter, register_export

    assert format_names()[:4] == ["peft", "onnx", "openvino", "sentence-transformers"]
    get_exporter("onnx")  # a built-in's module registers it when first asked for
    with pytest.raises(MmretError, match=r"export format 'onnx' is already registered by mmret\.export\.onnx_format\."
                                         r"write; .* cannot register it again"):
        register_export(Exporter("onnx", "another onnx", lambda model, folder: {}))
