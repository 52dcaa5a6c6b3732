"""Text queries through an inference runtime: a run's text side converted once per checkpoint, kept only
when the measured rule passes (cosine >= 0.999 to torch float32 on the run's captions, and faster),
the decision recorded so a second start neither converts nor measures, and torch as the fallback."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tiny_models

from mmret.errors import MmretError
from mmret.inference import runtime
from mmret.inference.loaded import LoadedRun

pytest.importorskip("onnxscript")


def _cosines(a: np.ndarray, b: np.ndarray) -> float:
    """The smallest row-wise cosine of two (N, D) arrays."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


@pytest.fixture
def run_dir(memorised, tmp_path):
    return shutil.copytree(memorised["run"], tmp_path / "run")  # the shared run stays without a runtime folder


def test_a_run_converts_once_and_answers_as_torch_does(run_dir, monkeypatch):
    monkeypatch.setenv(runtime.RUNTIME_ENV, "auto")
    texts = ["a red circle", "two blue squares on the left", "x"]
    with monkeypatch.context() as m:
        m.setenv(runtime.RUNTIME_ENV, "torch")
        expected = LoadedRun(run_dir).encode_texts(texts).numpy()
    run = LoadedRun(run_dir)
    with runtime.allow_conversion():  # as `mmret serve` starts
        got = run.encode_texts(texts).numpy()
    folder = runtime.folder_of(run_dir, run.digest)
    choice = json.loads((folder / "choice.json").read_text())
    assert set(choice["cosine"]) == set(runtime.installed_runtimes()) and "torch" in choice["ms"]
    if choice["backend"] == "torch":  # measured slower or further than the rule allows: torch answers
        assert run.text_runtime is None and "no runtime both" in choice["reason"]
    else:
        assert run.text_runtime.choice.backend == choice["backend"] in runtime.BACKENDS
        assert choice["cosine"][choice["backend"]] >= runtime.MIN_COSINE
        assert choice["ms"][choice["backend"]] < choice["ms"]["torch"]
    assert _cosines(got, expected) >= runtime.MIN_COSINE
    # a second start reads the decision: no conversion, no measuring, and no tower built for the words
    monkeypatch.setattr(runtime, "choose", lambda *a: pytest.fail("converted again"))
    again = LoadedRun(run_dir)
    np.testing.assert_allclose(again.encode_texts(texts).numpy(), got, atol=1e-6)
    if choice["backend"] != "torch":
        assert again.unknown_words("a red circle") == [] and again._built == {}


def test_a_forced_choice_runs_each_runtime_like_torch(run_dir, monkeypatch):
    monkeypatch.setenv(runtime.RUNTIME_ENV, "auto")
    run = LoadedRun(run_dir)
    with monkeypatch.context() as m:  # every runtime passes: each one's answers are checked, not only the fastest
        m.setattr(runtime, "MIN_COSINE", -1.0)
        m.setattr(runtime, "_median_ms", lambda fn, rounds=15: fn() is None)
        choice = runtime.choose(run, runtime.folder_of(run_dir, run.digest))
    texts = ["a green triangle", "a purple square"]
    with monkeypatch.context() as m:
        m.setenv(runtime.RUNTIME_ENV, "torch")
        expected = LoadedRun(run_dir).encode_texts(texts).numpy()
    folder = runtime.folder_of(run_dir, run.digest)
    for backend in runtime.installed_runtimes():
        rt = runtime.TextRuntime(folder, runtime.Choice(backend, ""))
        assert _cosines(rt(texts), expected) >= runtime.MIN_COSINE
    if "openvino" in runtime.installed_runtimes():  # its compiled form is kept for the next start
        assert list((folder / "openvino-cache").glob("*.blob"))
    assert choice.cosine and all(c > 0.999 for c in choice.cosine.values())


def test_torch_when_turned_off_or_not_converted(run_dir, monkeypatch):
    monkeypatch.setenv(runtime.RUNTIME_ENV, "torch")
    assert LoadedRun(run_dir).text_runtime is None
    monkeypatch.setenv(runtime.RUNTIME_ENV, "auto")
    assert runtime.text_runtime(LoadedRun(run_dir), convert=False) is None
    assert LoadedRun(run_dir).text_runtime is None  # a search, an eval, a Python call: no conversion of its own
    assert not runtime.folder_of(run_dir, LoadedRun(run_dir).digest).exists()
    monkeypatch.setenv(runtime.RUNTIME_ENV, "fast")
    with pytest.raises(MmretError, match="MMRET_RUNTIME must be auto or torch, got 'fast'"):
        runtime.runtime_mode()


# ---------------------------------------------------------------------------- a frozen tower in precompute


def test_a_frozen_tower_in_a_runtime_is_kept_by_the_rule_converted_once_and_recorded(example_ds, tmp_path,
                                                                                       monkeypatch):
    from mmret.encoders import convert as convert_mod
    from mmret.encoders import load_image_encoder
    from mmret.features import backend, ensure_features
    from mmret.features import runner as runner_mod

    monkeypatch.setenv(runtime.RUNTIME_ENV, "auto")
    monkeypatch.setenv(backend.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(backend, "TRIAL_SECONDS", -1.0)  # a tiny tower's work never pays a conversion
    vit = load_image_encoder(str(tiny_models.save_tiny_timm_vit(tmp_path / "vit")))
    tried = []
    real = runner_mod.TowerRunner._try_runtime
    monkeypatch.setattr(runner_mod.TowerRunner, "_try_runtime",
                        lambda self, *a: tried.append(self.manifest) or real(self, *a))
    feats = ensure_features(example_ds, vit, workers=0, precision="fp32", batch_size=16)
    assert len(tried) == 1 and list((tmp_path / "cache" / "towers").glob("*/tower.onnx"))
    manifest = json.loads((feats.path / "manifest.json").read_text())
    if manifest.get("backend"):
        assert manifest["backend"] in runtime.BACKENDS and f"{manifest['backend']}: cosine to fp32" in \
            manifest["precision_reason"]
    with monkeypatch.context() as m:  # the same pictures through torch
        m.setenv(runtime.RUNTIME_ENV, "torch")
        shutil.rmtree(feats.path)
        again = ensure_features(example_ds, vit, workers=0, precision="fp32", batch_size=16)
    assert _cosines(np.asarray(feats.pooled, dtype=np.float32), np.asarray(again.pooled, dtype=np.float32)) >= 0.999
    # the converted tower is reused (another dataset, a later run): no second conversion
    shutil.rmtree(again.path)
    monkeypatch.setattr(convert_mod, "to_onnx", lambda *a, **k: pytest.fail("converted again"))
    monkeypatch.setattr(backend, "to_onnx", lambda *a, **k: pytest.fail("converted again"))
    monkeypatch.setattr(backend, "TRIAL_SECONDS", 1e9)  # converted already: tried however little work is left
    last = ensure_features(example_ds, vit, workers=0, precision="fp32", batch_size=16)
    assert len(tried) == 3  # the torch run above looked too, and found the runtimes turned off
    assert json.loads((last.path / "manifest.json").read_text()).get("backend") in (None, *runtime.BACKENDS)
