"""Encoding at the machine's limit (`mmret.features.runner`): the compiled bf16 and the int8 towers
fill the same cache (same key) with features within a stated tolerance of fp32; a machine
without bf16 or int8 falls back cleanly; compiling and int8 are chosen only when they pay and
pass their check. Tiny random towers, the 60-picture example dataset."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import tiny_models
import torch

from mmret.common import device as dev
from mmret.encoders import load_image_encoder, load_text_encoder
from mmret.errors import MmretError
from mmret.features import ensure_features, features_root
from mmret.features import runner as runner_mod

CPU = torch.device("cpu")
# tolerances against the fp32 features, per row: cosine, and the largest difference relative to
# the largest value (bf16 keeps 8 significant bits; int8 weights 7 bits plus a scale per channel)
TOLERANCE = {"bf16": (0.999, 0.02), "int8": (0.99, 0.08)}


@pytest.fixture(scope="module")
def vit_folder(tmp_path_factory):
    return tiny_models.save_tiny_timm_vit(tmp_path_factory.mktemp("vit") / "vit")


@pytest.fixture
def vit(vit_folder):
    return load_image_encoder(str(vit_folder))


def _needs_inductor():
    try:
        import torch._inductor  # noqa: F401
    except ImportError:
        pytest.skip("no inductor")


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _within(feats, reference, precision: str) -> None:
    cosine, relative = TOLERANCE[precision]
    got, want = np.asarray(feats.pooled, dtype=np.float32), np.asarray(reference, dtype=np.float32)
    assert _cosines(got, want).min() >= cosine
    assert np.abs(got - want).max() <= relative * np.abs(want).max()


@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_compiled_and_int8_caches_hold_fp32_features_within_tolerance(example_ds, vit, precision):
    _needs_inductor()
    if precision == "bf16" and not dev.bf16_supported(CPU):
        pytest.skip("no native bf16 on this CPU")
    if precision == "int8" and not (dev.int8_supported(CPU) and dev.int8_installed()):
        pytest.skip("no int8 instructions or no torchao here")
    fp32 = ensure_features(example_ds, vit, "images", precision="fp32", workers=0, compile=False)
    reference, key = np.array(fp32.pooled), fp32.manifest["key"]
    shutil.rmtree(features_root(example_ds) / key)
    feats = ensure_features(example_ds, vit, "images", precision=precision, workers=0, batch_size=32, compile=True)
    assert feats.manifest["key"] == key  # the same cache, whatever ran it
    assert feats.stats.compiled and feats.stats.precision == precision  # 60 rows = 32 + 28: padded, one compile
    assert "compiled, cosine to fp32" in feats.stats.precision_reason
    _within(feats, reference, precision)


def test_without_bf16_or_int8_the_run_falls_back_cleanly(example_ds, vit, monkeypatch):
    _needs_inductor()
    monkeypatch.setattr(dev, "bf16_supported", lambda device: False)
    monkeypatch.setattr(dev, "int8_supported", lambda device: False)
    with pytest.raises(MmretError, match="--precision bf16 is not supported on this cpu; use --precision fp32"):
        dev.check_precision(CPU, "bf16")
    with pytest.raises(MmretError, match="--precision int8 needs a CPU with AVX512-VNNI or AMX int8"):
        ensure_features(example_ds, vit, "images", precision="int8", workers=0)
    monkeypatch.setattr(runner_mod, "AUTO_COMPILE_SECONDS", 0.0)  # auto compiles: the work always pays here
    monkeypatch.setattr(runner_mod, "INT8_TRIAL_RATIO", 0.0)  # and would try int8 if the CPU had it
    monkeypatch.setattr(runner_mod, "quantize_int8", lambda *a: pytest.fail("int8 tried without int8"))
    feats = ensure_features(example_ds, vit, "images", workers=0, batch_size=32)
    assert feats.stats.precision == "fp32" and feats.stats.compiled
    assert feats.stats.precision_reason.startswith("fp32: this CPU has no native bf16; compiled, cosine to fp32")


def test_auto_compiles_only_when_the_work_left_pays(example_ds, vit, monkeypatch):
    monkeypatch.setattr(runner_mod, "AUTO_COMPILE_SECONDS", 1e9)
    monkeypatch.setattr(torch, "compile", lambda *a, **k: pytest.fail("compiled a short job"))
    feats = ensure_features(example_ds, vit, "images", precision="fp32", workers=0)
    assert not feats.stats.compiled


def test_int8_is_an_item_tower_precision(example_ds, tmp_path):
    text = load_text_encoder(str(tiny_models.save_tiny_bert(tmp_path / "bert")))
    with pytest.raises(MmretError, match="unknown --precision 'int8'"):
        dev.check_precision(CPU, "int8")  # not for training
    if not (dev.int8_supported(CPU) and dev.int8_installed()):
        pytest.skip("no int8 here")
    feats = ensure_features(example_ds, text, "captions", precision="int8")
    assert feats.stats.precision in ("fp32", "bf16")  # captions chose automatically


class _Out(tuple):
    """A stand-in for EncoderOutput: (pooled,)."""

    @property
    def pooled(self):
        return self[0]


@pytest.mark.parametrize("cosine_ok,faster,kept", [(True, True, True), (False, True, False), (True, False, False)])
def test_auto_keeps_int8_only_when_it_agrees_and_is_faster(monkeypatch, cosine_ok, faster, kept):
    reference = _Out([torch.randn(4, 8)])
    int8_out = _Out([reference.pooled if cosine_ok else reference.pooled + torch.randn(4, 8)])
    manifest = {"precision": "bf16", "precision_reason": "bf16: chosen"}
    runner = runner_mod.TowerRunner(None, CPU, manifest, True, 4, 1000)
    runner.compiled = "the compiled bf16 tower"

    def start(inputs, ref, precision, record=True):  # as the real one: the int8 tower now runs
        runner.compiled = "the int8 tower"
        return int8_out, 1.0, 0.5 if faster else 2.0

    monkeypatch.setattr(runner, "_start", start)
    out = runner._try_int8({}, reference, reference, seconds=1.0)
    assert (manifest["precision"] == "int8") == kept and (out is int8_out) == kept
    assert (runner.compiled == "the compiled bf16 tower") != kept
    if kept:
        assert manifest["precision_reason"].startswith("int8: cosine to fp32 1.0000 >= 0.999, 2.00x the compiled bf16")


def test_the_item_loader_decodes_in_draft_mode(vit):
    loader = vit.item_loader()
    assert loader.decode.keywords["draft"] == vit.transform().source_side == vit.preprocessing.resize


@pytest.mark.parametrize("kind", ["dinov2", "timm"])
def test_matmul_attention_computes_what_sdpa_does(tmp_path, kind):
    from mmret.models.tuners import use_matmul_attention

    save = tiny_models.save_tiny_dinov2 if kind == "dinov2" else tiny_models.save_tiny_timm_vit
    tower = load_image_encoder(str(save(tmp_path / kind)))
    pixels = torch.randn(3, 3, *tower.image_size)
    with torch.no_grad():
        fused = tower(pixels).tokens
        assert use_matmul_attention(tower) >= 1 and use_matmul_attention(tower) == 0  # switched once
        plain = tower(pixels).tokens
    torch.testing.assert_close(plain, fused, rtol=1e-4, atol=1e-5)


def test_auto_times_each_precision_on_its_own_run(example_ds, vit, monkeypatch):
    """The precision check times a fresh full-batch pass in fp32 and in bf16 (none served from an
    earlier pass, which would make fp32 look free)."""
    monkeypatch.setattr(dev, "bf16_supported", lambda device: True)
    inside, calls = [False], []
    real_choose, real_forward = dev.choose_inference_precision, runner_mod.forward

    def choose(*args, **kwargs):
        inside[0] = True
        try:
            return real_choose(*args, **kwargs)
        finally:
            inside[0] = False

    def forward(tower, inputs, device, precision):
        calls.append((inside[0], precision, len(next(iter(inputs.values())))))
        return real_forward(tower, inputs, device, precision)

    monkeypatch.setattr(runner_mod, "choose_inference_precision", choose)
    monkeypatch.setattr(runner_mod, "forward", forward)
    ensure_features(example_ds, vit, "images", workers=0, compile=False, batch_size=32)
    assert (True, "fp32", 32) in calls and (True, "bf16", 32) in calls


@pytest.mark.parametrize("kind", ["dinov2", "timm", "bert"])
def test_matmul_attention_trains_as_sdpa_does(tmp_path, kind):
    """The switch changes how attention is computed, not what a LoRA step learns: the loss and every
    trainable gradient of one fp32 step agree with SDPA's."""
    from mmret.methods.config import LoraConfig
    from mmret.methods.towers import LoraMethod
    from mmret.models.tuners import use_matmul_attention

    if kind == "bert":
        tower = load_text_encoder(str(tiny_models.save_tiny_bert(tmp_path / kind)))
        inputs = tower.tokenize(["a red kite over the sea", "two cats", "a blue bicycle by a wall"])
    else:
        save = tiny_models.save_tiny_dinov2 if kind == "dinov2" else tiny_models.save_tiny_timm_vit
        tower = load_image_encoder(str(save(tmp_path / kind)))
        inputs = {tower.input_name: torch.randn(3, 3, *tower.image_size, generator=torch.Generator().manual_seed(0))}
    LoraMethod().adapt(tower, LoraConfig(rank=4, targets="q,v", tower="both", lora_dropout=0.0))
    for name, p in tower.named_parameters():  # LoRA's B starts at zero: give the adapters something to do
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02, generator=torch.Generator().manual_seed(1))
    tower.eval()  # no dropout: the two steps must see the same function (gradients flow all the same)

    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        tower.zero_grad(set_to_none=True)
        out = tower(**inputs)
        loss = (out.pooled.square().sum() + out.tokens.square().mean()).float()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in tower.named_parameters() if p.requires_grad}

    fused_loss, fused_grads = step()
    assert use_matmul_attention(tower) >= 1
    plain_loss, plain_grads = step()
    torch.testing.assert_close(plain_loss, fused_loss, rtol=1e-5, atol=1e-5)
    assert plain_grads.keys() == fused_grads.keys() and any("lora_" in n for n in plain_grads)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grad, fused_grads[name], rtol=1e-4, atol=1e-5, msg=name)
