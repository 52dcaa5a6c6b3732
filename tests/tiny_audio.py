"""Sounds and sound towers for tests: generated recordings in several formats and rates, the bad
files people meet, Clotho and AudioCaps laid out as they are distributed, and tiny random AST and
CLAP models saved with `save_pretrained` (with their feature extractors and, for CLAP, a
tokenizer), loaded by path through the same code a hub id takes.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import tiny_models
import torch

KINDS = ("rising", "falling", "low", "high", "noise", "pulses")
CAPTIONS = {
    "rising": ["a whistle rising in pitch", "a tone sweeping upwards", "a siren going up"],
    "falling": ["a whistle falling in pitch", "a tone sweeping down", "a slide whistle going down"],
    "low": ["a low steady hum", "a deep drone", "a low buzzing tone"],
    "high": ["a high steady beep", "a shrill tone", "a high pitched whine"],
    "noise": ["white noise hissing", "static from a radio", "rushing water noise"],
    "pulses": ["a clock ticking", "short clicks repeating", "a metronome, tick, tick"],
}
FORMATS = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "ogg": ("OGG", "VORBIS"),
           "mp3": ("MP3", "MPEG_LAYER_III")}


def waveform(kind: str, seconds: float, rate: int, seed: int = 0) -> np.ndarray:
    """A mono float32 signal of `kind` (see KINDS, or "silent") in [-0.5, 0.5]."""
    t = np.arange(round(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    top = min(4000.0, rate / 2.5)
    if kind == "rising":
        f = 200 + (top - 200) * t / seconds
    elif kind == "falling":
        f = top - (top - 200) * t / seconds
    elif kind in ("low", "high"):
        f = np.full_like(t, 150.0 if kind == "low" else min(2500.0, rate / 3))
    elif kind == "noise":
        return (0.3 * rng.standard_normal(len(t))).clip(-0.5, 0.5).astype(np.float32)
    elif kind == "pulses":
        return (0.5 * ((t * 8) % 1 < 0.02) * np.sin(2 * np.pi * 1000 * t)).astype(np.float32)
    elif kind == "silent":
        return np.zeros(len(t), np.float32)
    else:
        raise ValueError(kind)
    phase = 2 * np.pi * np.cumsum(f) / rate
    return (0.4 * np.sin(phase) + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


def write_sound(path: str | Path, kind: str = "rising", seconds: float = 1.0, rate: int = 16000,
                channels: int = 1, seed: int = 0) -> Path:
    """A generated sound file; the format comes from the ending (wav, flac, ogg, mp3)."""
    import soundfile as sf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    wave = waveform(kind, seconds, rate, seed)
    data = np.stack([wave * (1 - 0.1 * c) for c in range(channels)], axis=1) if channels > 1 else wave
    fmt, subtype = FORMATS[path.suffix.lstrip(".").lower()]
    sf.write(str(path), data, rate, format=fmt, subtype=subtype)
    return path


def sound_folder(root: str | Path, n: int = 24, seconds: float = 1.0) -> Path:
    """`n` captioned sounds in folder layout (`x.ogg` + `x.txt`), formats and rates mixed."""
    root = Path(root)
    rates = (8000, 16000, 22050, 44100, 48000)
    for i in range(n):
        kind, ext = KINDS[i % len(KINDS)], list(FORMATS)[i % len(FORMATS)]
        rate = rates[i % len(rates)] if ext != "mp3" else 16000
        path = write_sound(root / kind / f"{kind}-{i:02d}.{ext}", kind, seconds, rate, 1 + (i % 3 == 0), seed=i)
        path.with_suffix(".txt").write_text("\n".join(CAPTIONS[kind][:2]) + "\n", encoding="utf-8")
    return root


def clotho(root: str | Path, clips: dict[str, int] | None = None, seconds: float = 1.5) -> Path:
    """Clotho's layout: clotho_captions_{development,validation,evaluation}.csv (file_name,
    caption_1..caption_5, captions quoted when they hold commas) and the sounds in matching folders."""
    root = Path(root)
    clips = clips or {"development": 12, "validation": 4, "evaluation": 4}
    n = 0
    for split, count in clips.items():
        rows = []
        for _ in range(count):
            kind = KINDS[n % len(KINDS)]
            name = f"{kind.title()} Sound {n:03d}.wav"  # Clotho names hold spaces and capitals
            write_sound(root / split / name, kind, seconds, 44100, seed=n)
            c0, c1, c2 = CAPTIONS[kind]
            rows.append([name, c0, f"{c1} number {n}", c2, f"{c0}, close by", f"{c1}, recorded outdoors"])
            n += 1
        with open(root / f"clotho_captions_{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["file_name"] + [f"caption_{i}" for i in range(1, 6)])
            writer.writerows(rows)
    return root


def audiocaps(root: str | Path, seconds: float = 1.0) -> tuple[Path, dict[str, int]]:
    """AudioCaps' layout: train/val/test.csv (audiocap_id,youtube_id,start_time,caption; one row per
    caption), clips named by YouTube id in the layouts download tools write, and some clips missing.
    Returns the root and how many clips of each split are missing."""
    root = Path(root)
    layouts = ["{id}.wav", "Y{id}.flac", "{id}_{start}.ogg", "Y{id}_{start}.000_{end}.000.wav"]
    missing, cap_id = {}, 1000
    for split, (count, per_clip, absent) in {"train": (10, 1, 2), "val": (4, 5, 1), "test": (4, 5, 1)}.items():
        rows = []
        for i in range(count):
            youtube_id, start, kind = f"{split[:2]}{i:03d}abcXY", 10 * i, KINDS[i % len(KINDS)]
            if i >= absent:  # the first `absent` clips were never downloaded
                name = layouts[i % len(layouts)].format(id=youtube_id, start=start, end=start + 10)
                write_sound(root / "audio" / split / name, kind, seconds, 16000 if i % 2 else 32000, seed=i)
            for j in range(per_clip):
                rows.append([cap_id, youtube_id, start, CAPTIONS[kind][j % 3] + ("" if j < 3 else f" again {j}")])
                cap_id += 1
        missing[split] = absent
        with open(root / f"{split}.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["audiocap_id", "youtube_id", "start_time", "caption"])
            writer.writerows(rows)
    return root, missing


def bad_files(root: str | Path) -> dict[str, Path]:
    """Every kind of bad sound file the issue names, each with a caption beside it."""
    import soundfile as sf

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    files = {"good": write_sound(root / "good.wav", "rising", 1.0, 16000)}
    (root / "empty.wav").write_bytes(b"")
    files["empty"] = root / "empty.wav"
    (root / "not_audio.mp3").write_text("this is a text file, not a recording\n" * 20)
    files["not_audio"] = root / "not_audio.mp3"
    for ext in ("wav", "flac", "ogg", "mp3"):
        full = write_sound(root / f"whole.{ext}", "falling", 2.0, 16000)
        data = full.read_bytes()
        (root / f"truncated_{ext}.{ext}").write_bytes(data[: len(data) // 2])
        full.unlink()
        files[f"truncated_{ext}"] = root / f"truncated_{ext}.{ext}"
    files["silent"] = write_sound(root / "silent.flac", "silent", 1.0, 16000)
    files["eight_channels"] = write_sound(root / "eight_channels.wav", "low", 1.0, 16000, channels=8)
    files["rate_8k"] = write_sound(root / "rate_8k.wav", "high", 1.0, 8000)
    files["rate_192k"] = write_sound(root / "rate_192k.flac", "noise", 1.0, 192000)
    # two hours: 5 s of sound, then silence, which FLAC stores in a few hundred kilobytes
    with sf.SoundFile(str(root / "hours_long.flac"), "w", 8000, 1, format="FLAC", subtype="PCM_16") as f:
        f.write(waveform("pulses", 5.0, 8000))
        zeros = np.zeros(8000 * 600, np.float32)
        for _ in range(12):
            f.write(zeros)
    files["hours_long"] = root / "hours_long.flac"
    for path in files.values():
        path.with_suffix(".txt").write_text(f"the {path.stem.replace('_', ' ')} sound\n", encoding="utf-8")
    return files


# ---------------------------------------------------------------------------- tiny towers


def save_tiny_ast(folder: str | Path, seed: int = 0, classification: bool = False, spread: float = 1.0) -> Path:
    """A 2-layer AST over 128 frames x 32 mel bins (1.3 s at 16 kHz; 2 + 2 x 12 tokens), with its
    feature extractor. `classification` saves an `ASTForAudioClassification`, as the published
    AudioSet checkpoint is."""
    import warnings

    from transformers import ASTConfig, ASTFeatureExtractor, ASTForAudioClassification, ASTModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    config = ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       max_length=128, num_mel_bins=32, num_labels=5)
    model = ASTForAudioClassification(config) if classification else ASTModel(config)
    tiny_models._spread(model, spread, "layers")
    model.save_pretrained(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ASTFeatureExtractor(max_length=128, num_mel_bins=32).save_pretrained(folder)
    return folder


def clap_config():
    from transformers import ClapConfig

    text = dict(vocab_size=len(tiny_models.vocab()), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                intermediate_size=64, max_position_embeddings=48, pad_token_id=0, bos_token_id=2, eos_token_id=3,
                type_vocab_size=1)
    audio = dict(hidden_size=32, patch_embeds_hidden_size=16, depths=[1, 1], num_attention_heads=[2, 2], window_size=4,
                 spec_size=64, num_mel_bins=16, patch_size=4, patch_stride=[4, 4])
    return ClapConfig(text_config=text, audio_config=audio, projection_dim=16)


def save_tiny_clap(folder: str | Path, seed: int = 0) -> Path:
    """A CLAP with a 2-stage Swin audio tower over 1 s at 48 kHz (16 mel bins) and a 2-layer RoBERTa,
    projected to 16, with its feature extractor and a WordPiece tokenizer (loadable by AutoTokenizer)."""
    from transformers import ClapFeatureExtractor, ClapModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    ClapModel(clap_config()).save_pretrained(folder)
    ClapFeatureExtractor(feature_size=16, sampling_rate=48000, hop_length=480, max_length_s=1, fft_window_size=1024,
                         frequency_min=50, frequency_max=14000, truncation="rand_trunc").save_pretrained(folder)
    tiny_models._save_bert_tokenizer(folder, model_max_length=40)
    return folder
