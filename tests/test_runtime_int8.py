"""`--precision int8` through the inference runtime's own quantiser (NNCF, run by OpenVINO): quantised once
per tower on real items of the dataset, kept by the rule of `mmret.common.device.MIN_COSINE` (and when faster
than torch), the verdict saved so a second start neither quantises nor measures, recorded in the manifest,
and torch's PT2E int8 as the fallback when the runtime is absent or fails the rule."""

from __future__ import annotations

import json
import shutil
import time

import numpy as np
import pytest
import tiny_models

from mmret.common import device as dev
from mmret.encoders import load_image_encoder
from mmret.features import backend, ensure_features
from mmret.features import runner as runner_mod
from mmret.inference import runtime

pytest.importorskip("nncf")
pytest.importorskip("openvino")
pytest.importorskip("onnxscript")


def _cosines(a, b) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.fixture
def vit(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.RUNTIME_ENV, "auto")
    monkeypatch.setenv(backend.CACHE_ENV, str(tmp_path / "cache"))
    return load_image_encoder(str(tiny_models.save_tiny_timm_vit(tmp_path / "vit")))


def _fp32(example_ds, vit, monkeypatch):
    with monkeypatch.context() as m:
        m.setenv(runtime.RUNTIME_ENV, "torch")
        feats = ensure_features(example_ds, vit, workers=0, precision="fp32", batch_size=16)
        rows = np.array(feats.pooled, dtype=np.float32)
        shutil.rmtree(feats.path)
    return rows


def test_int8_through_the_runtime_is_quantised_once_kept_by_the_rule_and_reused(example_ds, vit, tmp_path,
                                                                                monkeypatch):
    reference = _fp32(example_ds, vit, monkeypatch)
    monkeypatch.setattr(backend, "CALIBRATION_ITEMS", 20)
    real_forward = runner_mod.forward

    def slow_torch(tower, inputs, device, precision):  # a tiny tower's timings are noise: torch made plainly slower
        if precision == "bf16" or (precision == "fp32" and not dev.bf16_supported(device)):
            time.sleep(0.3)
        return real_forward(tower, inputs, device, precision)

    monkeypatch.setattr(runner_mod, "forward", slow_torch)
    monkeypatch.setattr(runner_mod.TowerRunner, "_start", lambda *a, **k: pytest.fail("torch's int8 used"))
    feats = ensure_features(example_ds, vit, workers=0, precision="int8", batch_size=16)
    manifest = json.loads((feats.path / "manifest.json").read_text())
    assert manifest["precision"] == "int8" and manifest["backend"] == "openvino"
    assert "openvino int8 (NNCF): cosine to fp32" in manifest["precision_reason"] and not feats.stats.compiled
    folder = next((tmp_path / "cache" / "towers").glob("*/int8"))
    assert json.loads((folder / "quantized.json").read_text())["calibration_items"] == 20  # of the 60 pictures
    decision = json.loads((folder / "decision.json").read_text())
    assert decision["kept"] and decision["bound"] == dev.MIN_COSINE["int8"] and decision["speedup"] > 1
    got = np.array(feats.pooled, dtype=np.float32)
    cosines = _cosines(got, reference)  # the rule measured the first batch; the rest stay as close on the whole
    assert cosines[:16].min() >= dev.MIN_COSINE["int8"] and cosines.mean() >= dev.MIN_COSINE["int8"]
    assert cosines.min() >= 1 - 10 * (1 - dev.MIN_COSINE["int8"])
    assert np.abs(got - reference).max() > 0  # int8 indeed: not the float tower again

    # a second start (another dataset, a later run): the quantised model and its verdict, nothing measured
    shutil.rmtree(feats.path)
    monkeypatch.setattr(backend, "quantize", lambda *a: pytest.fail("quantised again"))
    monkeypatch.setattr(runner_mod, "forward", lambda *a: pytest.fail("measured again"))
    again = ensure_features(example_ds, vit, workers=0, precision="int8", batch_size=16)
    manifest = json.loads((again.path / "manifest.json").read_text())
    assert manifest["backend"] == "openvino" and "(measured before)" in manifest["precision_reason"]
    np.testing.assert_allclose(np.array(again.pooled, dtype=np.float32), got, atol=2e-3)  # float16 rows


def test_torch_int8_when_the_runtime_is_absent_or_fails_the_rule(example_ds, vit, tmp_path, monkeypatch):
    tried = []

    def torch_int8(self, inputs, reference, precision, record=True):  # stands in for PT2E's minute of compiling
        tried.append(precision)
        return None

    monkeypatch.setattr(runner_mod.TowerRunner, "_start", torch_int8)
    with monkeypatch.context() as m:  # no runtime: torch's int8 (here failing, so fp32), nothing converted
        m.setenv(runtime.RUNTIME_ENV, "torch")
        feats = ensure_features(example_ds, vit, workers=0, precision="int8", batch_size=16)
        shutil.rmtree(feats.path)
    assert tried == ["int8"] and feats.stats.precision == "fp32" and "int8 failed" in feats.stats.precision_reason
    assert not (tmp_path / "cache").exists()

    monkeypatch.setitem(dev.MIN_COSINE, "int8", 1.01)  # a bound nothing meets: the runtime's int8 fails the rule
    feats = ensure_features(example_ds, vit, workers=0, precision="int8", batch_size=16)
    assert tried == ["int8", "int8"] and "backend" not in json.loads((feats.path / "manifest.json").read_text())
    assert "not the runtime's int8: openvino int8 (NNCF): cosine to fp32" in feats.stats.precision_reason
    decision = json.loads(next((tmp_path / "cache" / "towers").glob("*/int8/decision.json")).read_text())
    assert not decision["kept"] and decision["bound"] == 1.01
    shutil.rmtree(feats.path)  # a second start goes straight to torch: nothing quantised or measured again
    monkeypatch.setattr(backend, "quantize", lambda *a: pytest.fail("quantised again"))
    feats = ensure_features(example_ds, vit, workers=0, precision="int8", batch_size=16)
    assert tried == ["int8"] * 3 and "(measured before)" not in feats.stats.precision_reason
    assert "not the runtime's int8" in feats.stats.precision_reason
