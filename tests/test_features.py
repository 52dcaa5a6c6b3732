"""The feature cache and `mmret precompute-embeddings`, on tiny random towers and the 60-picture
example dataset: cached rows equal a direct forward pass, valid caches are reused, stale ones
never, a killed run resumes to the same arrays, bad images fail alone; plus precision selection."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import tiny_models
import torch
from typer.testing import CliRunner

from mmret.cli import app
from mmret.common import device as dev
from mmret.data import PrepareConfig, load_dataset, prepare
from mmret.encoders import load_image_encoder, load_text_encoder
from mmret.errors import MmretError
from mmret.features import FeatureCache, cache_rows, ensure_features, feature_key, open_features
from mmret.features import encode as features
from mmret.features import runner as runner_mod
from mmret.modalities.image import load_rgb

runner = CliRunner()


@pytest.fixture(scope="module")
def towers(tmp_path_factory):
    root = tmp_path_factory.mktemp("towers")
    return {"timm": tiny_models.save_tiny_timm_vit(root / "timm"), "clip": tiny_models.save_tiny_clip(root / "clip"),
            "minilm": tiny_models.save_tiny_bert(root / "minilm", pooling_config="mean")}


@pytest.fixture
def vit(towers):
    return load_image_encoder(str(towers["timm"]))


def _direct_images(encoder, paths) -> tuple[np.ndarray, np.ndarray]:
    transform = encoder.transform()
    with torch.inference_mode():
        out = encoder(torch.stack([transform(load_rgb(p)) for p in paths]))
    return out.pooled.numpy(), out.tokens.numpy()


def test_cached_image_features_equal_a_direct_forward_pass(example_ds, vit):
    feats = ensure_features(example_ds, vit, "images", tokens=True, precision="fp32", workers=1, batch_size=16)
    rows = cache_rows(example_ds, "images")
    assert feats.pooled.dtype == np.float16 and isinstance(feats.pooled, np.memmap)
    assert feats.pooled.shape == (60, 32) and feats.tokens.shape == (60, 17, 32) and feats.mask is None
    assert feats.ids.tolist() == rows["item_id"].tolist() and feats.valid.all()
    assert feats.splits.tolist() == ["train"] * 48 + ["val"] * 6 + ["test"] * 6  # grouped by split
    pooled, tokens = _direct_images(vit, rows["path"])
    np.testing.assert_allclose(feats.pooled, pooled, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(feats.tokens, tokens, rtol=2e-3, atol=2e-3)
    s = feats.stats
    assert (s.encoded, s.reused, s.failed, s.precision, s.batch_size) == (60, 0, 0, "fp32", 16)
    manifest = json.loads((feats.path / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["encoder"]["model"] == "timm"
    assert feats.path.parent == example_ds.path / "features" and feats.path.name == feats.key


def test_cached_caption_features_equal_a_direct_forward_pass(example_ds, towers):
    text = load_text_encoder(str(towers["clip"]))
    feats = ensure_features(example_ds, text, "captions", tokens=True, precision="fp32")
    rows = cache_rows(example_ds, "captions")
    assert feats.ids.tolist() == rows["caption_id"].tolist() and len(feats) == 300
    batch = text.tokenize(rows["caption"].tolist(), pad_to_max_length=True)
    with torch.inference_mode():
        out = text(**batch)
    assert feats.tokens.shape == (300, 40, 32) and feats.mask.shape == (300, 40)
    np.testing.assert_array_equal(feats.mask, batch["attention_mask"].numpy())
    np.testing.assert_allclose(feats.pooled, out.pooled.numpy(), rtol=2e-3, atol=2e-3)
    real = feats.mask.astype(bool)
    np.testing.assert_allclose(feats.tokens[real], out.tokens.numpy()[real], rtol=2e-3, atol=2e-3)
    test = feats.select("test")
    assert len(test) == 30 and set(test.splits) == {"test"}
    np.testing.assert_array_equal(test.pooled, feats.pooled[270:])


def test_a_second_run_encodes_nothing_and_rewrites_nothing(example_ds, vit, monkeypatch):
    first = ensure_features(example_ds, vit, "images", precision="fp32", workers=0)
    stamps = {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()}

    def no_forward(*args, **kwargs):
        raise AssertionError("the encoder ran although the cache was complete")

    monkeypatch.setattr(features, "_forward", no_forward)
    monkeypatch.setattr(runner_mod, "forward", no_forward)  # what TowerRunner calls
    again = ensure_features(example_ds, vit, "images", workers=0)
    assert (again.stats.encoded, again.stats.reused) == (0, 60) and again.path == first.path
    assert {p.name: p.stat().st_mtime_ns for p in first.path.iterdir()} == stamps
    np.testing.assert_array_equal(again.pooled, first.pooled)
    assert open_features(example_ds, vit, "images") is not None


def test_a_token_cache_serves_pooled_requests(example_ds, vit):
    with_tokens = ensure_features(example_ds, vit, "images", tokens=True, precision="fp32", workers=0)
    pooled_only = ensure_features(example_ds, vit, "images", tokens=False, workers=0)
    assert pooled_only.stats.encoded == 0 and pooled_only.path == with_tokens.path and pooled_only.tokens is None


def test_a_changed_image_size_makes_a_new_key(example_ds, towers, vit):
    big = load_image_encoder(str(towers["timm"]), image_size=48)
    assert feature_key(vit, example_ds) != feature_key(big, example_ds)
    a = ensure_features(example_ds, vit, "images", precision="fp32", workers=0)
    b = ensure_features(example_ds, big, "images", precision="fp32", workers=0)
    assert a.path != b.path and b.stats.encoded == 60
    assert not np.allclose(a.pooled, b.pooled, atol=1e-3)
    assert sorted(p.name for p in (example_ds.path / "features").iterdir()) == sorted([a.key, b.key])


def test_other_weights_pooling_or_length_make_new_keys(example_ds, towers, tmp_path):
    text = load_text_encoder(str(towers["minilm"]))
    keys = {feature_key(text, example_ds, "captions"),
            feature_key(load_text_encoder(str(towers["minilm"]), max_length=16), example_ds, "captions"),
            feature_key(load_text_encoder(str(towers["minilm"]), pooling="cls"), example_ds, "captions"),
            feature_key(load_text_encoder(str(tiny_models.save_tiny_bert(tmp_path / "m", seed=3))), example_ds,
                        "captions"),
            feature_key(text, example_ds, "captions", tokens=True)}
    assert len(keys) == 5


def test_a_reprepared_dataset_never_meets_a_stale_cache(example_ds, vit, data_dir):
    old = ensure_features(example_ds, vit, "images", precision="fp32", workers=0)
    prepare(PrepareConfig(source="example", count=60, seed=1, force=True, data_dir=data_dir))
    fresh = load_dataset("example", data_dir)
    assert feature_key(vit, fresh) != old.key
    new = ensure_features(fresh, vit, "images", precision="fp32", workers=0)
    assert new.stats.encoded == 60
    same_table = load_dataset("example", data_dir)
    same_table.info["created"] = "2001-01-01T00:00:00+00:00"  # same rows, prepared at another time
    assert feature_key(vit, same_table) != new.key


def test_a_killed_run_resumes_and_ends_with_the_same_arrays(example_ds, vit, monkeypatch, tmp_path):
    commits = []
    real_commit = FeatureCache.commit

    def dying_commit(self, shard, failed):
        if len(commits) == 2:
            raise KeyboardInterrupt  # the process is killed after two shards reached the disk
        commits.append(shard)
        real_commit(self, shard, failed)

    monkeypatch.setattr(FeatureCache, "commit", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        ensure_features(example_ds, vit, "images", tokens=True, precision="fp32", workers=0, batch_size=8,
                        shard_rows=16)
    path = example_ds.path / "features" / feature_key(vit, example_ds, "images", tokens=True)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["status"] == "building" and manifest["done"] == [0, 1] and len(manifest["shards"]) == 5
    assert open_features(example_ds, vit, "images", tokens=True) is None  # half a cache is never served
    monkeypatch.setattr(FeatureCache, "commit", real_commit)
    resumed = ensure_features(example_ds, vit, "images", tokens=True, workers=0, batch_size=8, shard_rows=16)
    assert (resumed.stats.encoded, resumed.stats.reused) == (60 - 32, 32)
    pooled, tokens = _direct_images(vit, cache_rows(example_ds, "images")["path"])
    np.testing.assert_allclose(resumed.pooled, pooled, rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(resumed.tokens, tokens, rtol=2e-3, atol=2e-3)


def test_one_split_now_the_rest_later(example_ds, vit):
    test = ensure_features(example_ds, vit, "images", split="test", precision="fp32", workers=0, shard_rows=16)
    assert (test.stats.encoded, len(test), set(test.splits)) == (6, 6, {"test"})
    assert open_features(example_ds, vit, "images", split="all") is None
    assert open_features(example_ds, vit, "images", split="test") is not None
    everything = ensure_features(example_ds, vit, "images", workers=0, shard_rows=16)
    assert (everything.stats.encoded, everything.stats.reused) == (54, 6)
    np.testing.assert_array_equal(everything.select("test").pooled, test.pooled)


def test_bad_images_fail_alone_with_a_reason(example_ds, vit):
    rows = cache_rows(example_ds, "images")
    broken, garbage = rows["path"][3], rows["path"][50]
    data = Path(broken).read_bytes()
    Path(broken).write_bytes(data[: len(data) // 3])  # truncated download
    Path(garbage).write_bytes(b"<html>404 not found</html>")
    feats = ensure_features(example_ds, vit, "images", tokens=True, precision="fp32", workers=0)
    assert feats.stats.failed == 2 and feats.valid.sum() == 58
    bad_ids = {rows["item_id"][3], rows["item_id"][50]}
    assert set(feats.failed) == bad_ids
    assert "cannot decode" in feats.failed[rows["item_id"][3]] and "not an image" in feats.failed[rows["item_id"][50]]
    assert np.isnan(feats.pooled[[3, 50]]).all() and np.isnan(feats.tokens[[3, 50]]).all()
    assert np.isfinite(feats.pooled[feats.valid]).all()
    again = ensure_features(example_ds, vit, "images", workers=0)
    assert again.stats.encoded == 0 and set(again.failed) == bad_ids  # the failures stay on record
    assert set(again.select("val").failed) == {rows["item_id"][50]}


def test_a_second_writer_is_refused(example_ds, vit):
    import fcntl

    path = example_ds.path / "features" / feature_key(vit, example_ds)
    path.mkdir(parents=True)
    with open(path / ".lock", "w") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(MmretError, match=f"another mmret process is writing {path}; wait for it to finish"):
            ensure_features(example_ds, vit, "images", workers=0)


# ---------------------------------------------------------------------------- precision


def test_device_and_precision_errors():
    if not torch.cuda.is_available():
        with pytest.raises(MmretError, match="--device cuda: no CUDA GPU is visible to torch; use --device cpu"):
            dev.pick_device("cuda")
        assert dev.pick_device("auto").type == "cpu"
    with pytest.raises(MmretError, match="--precision fp16 needs a CUDA GPU"):
        dev.check_precision(torch.device("cpu"), "fp16")
    with pytest.raises(MmretError, match="unknown --precision 'fp8'"):
        dev.check_precision(torch.device("cpu"), "fp8")
    from mmret.training.step import training_precision

    assert training_precision(torch.device("cpu"), "auto", runs_towers=False) == "fp32"
    assert not dev.grad_scaler(torch.device("cpu"), "bf16").is_enabled()


def test_autocast_context_runs_matmuls_in_bf16():
    cpu = torch.device("cpu")
    if not dev.bf16_supported(cpu):
        pytest.skip("no native bf16 on this CPU")
    a = torch.randn(4, 4)
    with dev.autocast_context(cpu, "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    with dev.autocast_context(cpu, "fp32"):
        assert (a @ a).dtype == torch.float32


def _busy(seconds: float) -> None:
    """Burn CPU time: the precision check times CPU work, which sleeping is not."""
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_precision_is_chosen_by_cosine_and_speed(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(dev, "bf16_supported", lambda d: True)
    ref = torch.randn(8, 16)
    noisy = {"fp32": ref, "bf16": ref + 0.2 * torch.randn(8, 16)}  # cosine well below 0.999
    choice = dev.choose_inference_precision(lambda p: noisy[p], cpu)
    assert choice.precision == "fp32" and choice.cosine < 0.999 and "cosine to fp32 only" in choice.reason
    close = {"fp32": ref, "bf16": ref * (1 + 1e-4)}

    def fast_bf16(p):
        _busy(0.04 if p == "fp32" else 0.01)
        return close[p]

    choice = dev.choose_inference_precision(fast_bf16, cpu)
    assert choice.precision == "bf16" and choice.cosine > 0.999 and choice.speedup > 1.5

    def slow_bf16(p):
        _busy(0.01 if p == "fp32" else 0.04)
        return close[p]

    choice = dev.choose_inference_precision(slow_bf16, cpu)
    assert choice.precision == "fp32" and "accurate (cosine 1.0000) but not faster" in choice.reason
    assert dev.choose_inference_precision(lambda p: 1 / 0, cpu, requested="fp32").precision == "fp32"
    monkeypatch.setattr(dev, "bf16_supported", lambda d: False)
    assert dev.choose_inference_precision(lambda p: 1 / 0, cpu).reason == "fp32: this CPU has no native bf16"


def test_the_chosen_precision_is_recorded_and_kept_on_resume(example_ds, vit, monkeypatch):
    calls = []

    def choose(run, device, requested, warmup=None):
        calls.append(requested)
        run("fp32")
        return dev.PrecisionChoice("fp32", "fp32: chosen by the test")

    monkeypatch.setattr(runner_mod, "choose_inference_precision", choose)
    real_commit = FeatureCache.commit

    def dying_commit(self, shard, failed):
        real_commit(self, shard, failed)
        raise KeyboardInterrupt

    monkeypatch.setattr(FeatureCache, "commit", dying_commit)
    with pytest.raises(KeyboardInterrupt):
        ensure_features(example_ds, vit, "images", workers=0, shard_rows=16)
    monkeypatch.setattr(FeatureCache, "commit", real_commit)
    feats = ensure_features(example_ds, vit, "images", workers=0, shard_rows=16)
    assert calls == ["auto"]  # decided once, on the first batch; the resumed run kept it
    assert (feats.stats.precision, feats.stats.precision_reason) == ("fp32", "fp32: chosen by the test")
    assert feats.manifest["precision"] == "fp32"


def test_compiled_tower_gives_the_same_features(example_ds, vit):
    try:
        import torch._inductor  # noqa: F401
    except ImportError:
        pytest.skip("no inductor")
    feats = ensure_features(example_ds, vit, "images", precision="fp32", workers=0, batch_size=32, compile=True)
    assert feats.stats.compiled  # 60 rows = 32 + 28: the short batch was padded, not recompiled
    assert "compiled, cosine to fp32" in feats.stats.precision_reason
    pooled, _ = _direct_images(vit, cache_rows(example_ds, "images")["path"])
    np.testing.assert_allclose(feats.pooled, pooled, rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------------- the command


def _invoke(*args: str):
    return runner.invoke(app, ["precompute-embeddings", *args], env={"COLUMNS": "160"})  # a wide terminal


def test_command_encodes_then_reuses(example_ds, towers):
    args = ["--dataset", "example", "--vision", str(towers["timm"]), "--text", str(towers["minilm"]),
            "--workers", "0", "--precision", "fp32"]
    result = _invoke(*args, "--tokens")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "example: frozen features on cpu" in out
    assert "(60, 32)" in out and "(60, 17, 32)" in out and "(300, 32)" in out and "(300, 64, 32)" in out
    assert "│ images   │   timm │       60 / 0 │  (60, 32) │  (60, 17, 32) │      fp32 │" in out
    assert "│ captions │ minilm │      300 / 0 │ (300, 32) │ (300, 64, 32) │      fp32 │" in out
    assert "images precision: fp32: requested" in out
    again = _invoke(*args)
    assert again.exit_code == 0 and "0 / 60" in again.stdout and "0 / 300" in again.stdout
    features_dir = example_ds.path / "features"
    assert len([p for p in features_dir.iterdir() if p.is_dir()]) == 2  # beside them, the towers' remembered specs


@pytest.mark.parametrize("args,line", [
    (["--dataset", "example", "--vision", "nosuch"],
     "error: unknown image encoder 'nosuch': use a preset (dino-vits16, dinov2-vits14, clip-b32, clip-b16), "
     "a hub id such as owner/name, or a local model folder"),
    (["--dataset", "example", "--text", "dino-vits16"],
     "error: 'dino-vits16' is a image encoder, not an text encoder; text presets: distilbert, minilm, clip-b32, "
     "clip-b16, clap-htsat"),
    (["--dataset", "example"],
     "error: pass an item tower (pictures: --vision, sounds: --audio) and/or --text: there is nothing to encode"),
    (["--dataset", "example", "--vision", "clip-b32", "--precision", "fp16", "--device", "cpu"],
     "error: --precision fp16 needs a CUDA GPU (CPUs compute float16 slowly and without loss scaling); "
     "use --precision bf16 or fp32 on the CPU"),
    (["--dataset", "example", "--vision", "clip-b32", "--batch-size", "lots"],
     "error: --batch-size must be a positive number or auto, got 'lots'"),
])
def test_command_error_lines(example_ds, args, line):
    result = _invoke(*args)
    assert (result.exit_code, result.stderr.strip()) == (1, line)


def test_command_missing_dataset(data_dir):
    result = _invoke("--dataset", "nope", "--vision", "dino-vits16")
    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: no prepared dataset 'nope' in {data_dir}; run `mmret prepare` first"


def test_command_offline_hub_id(example_ds, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    result = _invoke("--dataset", "example", "--vision", "dinov2-vits14")
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        "error: model 'facebook/dinov2-small' is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; "
        "download it on a connected machine, or pass the path of a local model folder instead")
    assert not (example_ds.path / "features").exists()  # failed before any work
