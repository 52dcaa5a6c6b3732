"""The Python API (`mmret.load`, `mmret.load_zero_shot`): the README's example run as written, items
given as paths, PIL images, pixel arrays, preprocessed tensors or (waveform, rate) pairs giving the
same embeddings, the other modality refused in one line, and `search` giving what `mmret search`
gives (one path)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tiny_audio
import tiny_models
import torch
from PIL import Image
from typer.testing import CliRunner

import mmret
from mmret.cli import app

README = Path(__file__).resolve().parents[1] / "README.md"
REPO = README.parent


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MMRET_")}
    return {**env, "PYTHONPATH": str(REPO), **extra}


def readme_python() -> str:
    """The README's Python example: the first ```python block."""
    return re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)


def test_the_readme_example_is_five_lines_and_runs_as_written(memorised):
    """In a folder holding data/ and runs/ (as after the quick start), the example prints the caption's
    similarity to the two pictures, and the picture it describes scores higher."""
    code = readme_python()
    assert len([line for line in code.splitlines() if line.strip()]) == 5
    out = subprocess.run([sys.executable, "-c", code], cwd=memorised["root"], env=_clean_env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    scores = [float(x) for x in re.findall(r"-?\d+\.\d+", out.stdout)]
    assert len(scores) == 2 and scores[0] > scores[1], out.stdout


def test_import_mmret_stays_cheap():
    code = "import sys, mmret; print(sorted(m for m in ('torch', 'numpy', 'pandas') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], env=_clean_env(), capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "[]", out.stderr
    assert mmret.__version__ and callable(mmret.load) and callable(mmret.load_zero_shot)


@pytest.fixture(scope="module")
def model(memorised):
    return mmret.load(memorised["run"], checkpoint="last")


def test_a_picture_as_path_pil_image_array_or_tensor_gives_one_embedding(model, memorised, tmp_path):
    paths = [str(memorised["data"] / "example" / "images" / f"0000{i}.png") for i in range(3)]
    by_path = model.encode_images(paths)
    assert by_path.shape == (3, 32) and by_path.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(by_path, axis=1), 1.0, atol=1e-5)
    pictures = [Image.open(p) for p in paths]
    arrays = np.stack([np.asarray(p.convert("RGB")) for p in pictures])  # (3, H, W, 3): a batch of pixel arrays
    tensors = torch.stack([model.preprocess(p) for p in pictures])  # (3, 3, H, W), as open_clip's preprocess
    for same in (model.encode_images(pictures), model.encode_images(arrays), model.encode_images(tensors),
                 model.encode_images(list(tensors)), model.encode_items(paths)):
        np.testing.assert_allclose(same, by_path, atol=1e-6)
    np.testing.assert_allclose(model.encode_images(paths[0]), by_path[:1], atol=1e-6)  # one item, not a list
    # transparency is composited on white for a file and for an array alike
    rgba = np.zeros((40, 40, 4), dtype=np.uint8)
    rgba[5:20, 5:30] = (200, 30, 30, 255)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_allclose(model.encode_images(rgba), model.encode_images(tmp_path / "rgba.png"), atol=1e-6)
    as_torch = model.encode_images(paths, output="torch", batch_size=2)
    assert isinstance(as_torch, torch.Tensor) and torch.allclose(as_torch, torch.from_numpy(by_path), atol=1e-6)


def test_text_embeddings_and_the_tokenizer(model):
    texts = model.encode_text(["a red circle above a blue square", "a green triangle"])
    assert texts.shape == (2, model.dim) == (2, 32)
    np.testing.assert_allclose(model.encode_text("a green triangle"), texts[1:], atol=1e-6)
    tokens = model.tokenizer(["a red circle"])
    assert set(tokens) == {"input_ids", "attention_mask"} and tokens["input_ids"].shape[0] == 1


@pytest.mark.parametrize("call, item, message", [
    ("encode_audio", "x.wav", "run memorised embeds images, not audio: use encode_images"),
    ("encode_images", np.zeros((4, 4), dtype=np.float32),
     "cannot read the query picture (ndarray): a pixel array must be uint8 of shape (H, W), (H, W, 3) or "
     "(H, W, 4), got float32 (4, 4)"),
    ("encode_images", "no/such.png", "cannot read the query picture no/such.png: file not found"),
    ("encode_images", 42, "cannot read the query picture (int): not a picture: int"),
    ("encode_text", [1, 2], "encode_text takes strings; give items to encode_images or encode_audio"),
])
def test_what_cannot_be_embedded_is_refused_in_one_line(model, call, item, message):
    with pytest.raises(mmret.MmretError) as e:
        getattr(model, call)(item)
    assert str(e.value) == message


def test_load_refuses_in_one_line(memorised):
    with pytest.raises(mmret.MmretError, match="no run 'nope' in"):
        mmret.load("nope", runs_dir=memorised["runs"])
    with pytest.raises(mmret.MmretError, match="checkpoint must be best or last, got 'newest'"):
        mmret.load(memorised["run"], checkpoint="newest")


def test_search_is_the_path_mmret_search_takes(model, memorised, monkeypatch):
    monkeypatch.setenv("MMRET_RUNS_DIR", str(memorised["runs"]))
    caption = "a yellow triangle above a yellow square"
    found = model.search(caption, k=4)
    hits = found.results[0].items
    assert hits[0].item_id == "00000" and hits[0].right
    cli = CliRunner().invoke(app, ["search", caption, "--run", "memorised", "--checkpoint", "last", "-k", "4",
                                   "--json"])
    assert cli.exit_code == 0, cli.output
    shown = json.loads(cli.stdout)["results"][0]["images"]
    assert [h["image_id"] for h in shown] == [h.item_id for h in hits]
    assert [h["score"] for h in shown] == pytest.approx([h.score for h in hits], abs=1e-6)
    picture = Image.open(memorised["data"] / "example" / "images" / "00003.png")
    by_picture = model.search(item=picture, k=1).results[0]
    assert by_picture.items[0].item_id == "00003" and by_picture.captions


def test_a_pretrained_clip_without_a_dataset(tmp_path):
    clip = tiny_models.save_tiny_clip(tmp_path / "clip")
    model = mmret.load_zero_shot(str(clip), runs_dir=tmp_path / "runs")
    assert (model.method, model.modality.name, model.dim) == ("zeroshot", "image", 16)
    picture = tiny_models.save_picture(tmp_path / "p.png")
    both = model.encode_text(["a red circle"]) @ model.encode_images([picture]).T
    assert both.shape == (1, 1) and -1 <= both[0, 0] <= 1


def test_sounds_as_files_or_waveforms(tmp_path):
    import soundfile

    clap = tiny_audio.save_tiny_clap(tmp_path / "clap")
    model = mmret.load_zero_shot(str(clap), runs_dir=tmp_path / "runs")
    assert model.modality.name == "audio"
    stereo = np.stack([tiny_audio.waveform("rising", 1.5, 44_100), tiny_audio.waveform("noise", 1.5, 44_100)], 1)
    soundfile.write(tmp_path / "s.wav", stereo, 44_100, subtype="FLOAT")
    data, rate = soundfile.read(tmp_path / "s.wav", dtype="float32")  # (N, 2), as soundfile gives it
    by_path = model.encode_audio(tmp_path / "s.wav")
    np.testing.assert_allclose(model.encode_audio((data, rate)), by_path, atol=1e-6)
    np.testing.assert_allclose(model.encode_audio([(data.T.copy(), rate)]), by_path, atol=1e-6)  # (2, N)
    assert not np.allclose(model.encode_audio((data[:, 0].copy(), rate)), by_path, atol=1e-3)  # one channel differs
    with pytest.raises(mmret.MmretError, match=r"embeds audio, not images: use encode_audio"):
        model.encode_images([tmp_path / "s.wav"])
    with pytest.raises(mmret.MmretError, match=r"a sound in memory is a \(waveform, sample_rate\) pair"):
        model.encode_audio([data])
