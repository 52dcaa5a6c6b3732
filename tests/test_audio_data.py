"""Sounds on disk: decoding (mono, resampled, one window), every kind of bad file the issue names
through `prepare` (one line each, left out or handled), and Clotho, AudioCaps and folders of sounds
prepared from their real layouts."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
import tiny_audio
import torch

from mmret.data import PrepareConfig, load_dataset, prepare
from mmret.errors import MmretError
from mmret.modalities import get_modality
from mmret.modalities.audio import AudioDecoder, AudioError, load_audio, probe_audio


@pytest.fixture(scope="module")
def bad(tmp_path_factory):
    return tiny_audio.bad_files(tmp_path_factory.mktemp("bad") / "sounds")


@pytest.mark.parametrize("ext, rate", [("wav", 8000), ("flac", 22050), ("ogg", 44100), ("mp3", 16000), ("wav", 48000)])
def test_any_format_and_rate_decodes_to_mono_at_the_asked_rate(tmp_path, ext, rate):
    path = tiny_audio.write_sound(tmp_path / f"x.{ext}", "low", 2.0, rate, channels=2)
    wave = load_audio(path, 16000)
    assert wave.dtype == np.float32 and wave.ndim == 1
    assert abs(len(wave) - 32000) <= 1200  # mp3 adds an encoder delay of a few hundred samples
    spectrum = np.abs(np.fft.rfft(wave[4000:20000]))
    assert abs(np.argmax(spectrum) * 16000 / 16000 - 150) < 5  # the 150 Hz tone survives decoding and resampling


def test_channels_are_averaged_and_a_window_is_cut(tmp_path):
    import soundfile as sf

    left, right = np.full(16000, 0.5, np.float32), np.full(16000, -0.1, np.float32)
    sf.write(tmp_path / "st.wav", np.stack([left, right], 1), 16000, subtype="FLOAT")
    wave = load_audio(tmp_path / "st.wav", seconds=0.25)
    assert len(wave) == 4000 and np.allclose(wave, 0.2)


def test_a_random_window_follows_the_torch_seed(tmp_path):
    path = tiny_audio.write_sound(tmp_path / "long.flac", "rising", 6.0, 16000)
    decode = AudioDecoder(16000, 1.0, random_offset=True)
    torch.manual_seed(3)
    a = decode(path)
    torch.manual_seed(3)
    assert np.array_equal(a, decode(path)) and len(a) == 16000
    starts = set()
    for seed in range(6):
        torch.manual_seed(seed)
        starts.add(round(float(decode(path)[:200].std()), 5))
    assert len(starts) > 1  # different windows of a rising sweep differ
    assert np.array_equal(AudioDecoder(16000, 1.0)(path), load_audio(path, 16000)[:16000])  # eval: the start


def test_probe_reads_the_header_and_full_decodes(bad):
    info = probe_audio(bad["good"])
    assert (info.sample_rate, info.channels, info.frames) == (16000, 1, 16000)
    with pytest.raises(AudioError, match="empty file"):
        probe_audio(bad["empty"])
    with pytest.raises(AudioError, match="not a sound file libsndfile can read"):
        probe_audio(bad["not_audio"])
    with pytest.raises(AudioError, match="silent"):
        probe_audio(bad["silent"], full=True)
    for ext in ("wav", "flac", "mp3"):
        with pytest.raises(AudioError, match="truncated"):
            probe_audio(bad[f"truncated_{ext}"], full=True)


def test_an_hours_long_file_costs_one_window(bad):
    start = time.perf_counter()
    info = probe_audio(bad["hours_long"])
    wave = load_audio(bad["hours_long"], 16000, 10.0)
    assert info.seconds == pytest.approx(2 * 3600 + 5) and len(wave) == 160000
    assert time.perf_counter() - start < 5  # two hours at 8 kHz would be 58 M samples to decode


def test_prepare_reports_every_bad_file_once_and_keeps_what_is_usable(bad, data_dir):
    result = prepare(PrepareConfig(source="folder", root=bad["good"].parent, name="bad", data_dir=data_dir,
                                   val=0.0, test=0.0))
    by_file = {}
    for p in result.problems:
        by_file.setdefault(p.item.rsplit("/", 1)[-1].split(".")[0], []).append((p.kind, p.reason))
    assert by_file["empty"] == [("broken audio", "empty file (0 bytes)")]
    assert by_file["not_audio"][0][0] == "broken audio"
    assert by_file["truncated_ogg"][0][0] == "broken audio"  # Vorbis cut in half: its header is unreadable
    assert by_file["truncated_wav"] == [("truncated audio", "the header promises 2.00 s, the file holds 1.00 s; "
                                                             "the sound present is used")]
    assert by_file["eight_channels"] == [("many channels", "8 channels, averaged to mono")]
    assert by_file["rate_8k"][0][0] == "low sample rate" and by_file["rate_192k"][0][0] == "high sample rate"
    assert [k for k, _ in by_file["hours_long"]] == ["low sample rate", "long audio"]
    assert all(len(lines) == 1 for name, lines in by_file.items() if name != "hours_long")
    ds = load_dataset("bad", data_dir)
    assert ds.modality.name == "audio" and result.modality == "audio"
    kept = set(ds.items["item_id"].str.split(".").str[0])
    assert kept == {"good", "truncated_wav", "truncated_flac", "truncated_mp3", "silent", "eight_channels",
                    "rate_8k", "rate_192k", "hours_long"}
    row = ds.items.set_index("item_id").loc["eight_channels.wav"]
    assert (row.sample_rate, row.channels, row.duration_ms) == (16000, 8, 1000)
    for path in ds.items["path"]:  # everything kept decodes to a finite window
        wave = AudioDecoder(16000, 2.0)(path)
        assert len(wave) and np.isfinite(wave).all()


def test_check_audio_leaves_out_truncated_and_silent_files(bad, data_dir):
    result = prepare(PrepareConfig(source="folder", root=bad["good"].parent, name="checked", data_dir=data_dir,
                                   check_items=True, val=0.0, test=0.0))
    kept = set(load_dataset("checked", data_dir).items["item_id"].str.split(".").str[0])
    assert kept == {"good", "eight_channels", "rate_8k", "rate_192k", "hours_long"}
    reasons = {p.item.rsplit("/", 1)[-1]: p.reason for p in result.problems if p.kind == "broken audio"}
    assert reasons["silent.flac"] == "silent: no sample above -80 dBFS"
    assert reasons["truncated_flac.flac"].startswith("truncated or corrupt: decoding stops after")
    assert reasons["truncated_mp3.mp3"].startswith("truncated: ")
    assert result.counts["total"]["dropped items"] == 7  # empty, not audio, four truncated, silent


def test_a_folder_of_sounds_is_prepared_with_its_own_table(tmp_path, data_dir):
    root = tiny_audio.sound_folder(tmp_path / "sounds", n=12)
    result = prepare(PrepareConfig(source="folder", root=root, name="sounds", data_dir=data_dir))
    assert result.counts["total"] == {"items": 12, "captions": 24, "dropped items": 0}
    folder = data_dir / "sounds"
    assert sorted(p.name for p in folder.iterdir()) == ["audio.parquet", "captions.parquet", "dataset.json"]
    table = pd.read_parquet(folder / "audio.parquet")
    assert list(table.columns) == ["audio_id", "path", "split", "sample_rate", "channels", "duration_ms"]
    assert "audio_id" in pd.read_parquet(folder / "captions.parquet").columns
    ds = load_dataset("sounds", data_dir)  # in memory the key is item_id, whatever the modality
    assert "item_id" in ds.items.columns and "item_id" in ds.captions.columns
    assert set(ds.items.sample_rate) == {8000, 16000, 22050, 44100, 48000}


def test_a_captions_table_with_an_audio_column(tmp_path, data_dir):
    root = tmp_path / "t"
    for i, kind in enumerate(("low", "high", "noise")):
        tiny_audio.write_sound(root / "clips" / f"{i}.flac", kind)
    pd.DataFrame({"audio": ["clips/0.flac", "clips/1.flac", "clips/2.flac", "clips/0.flac"],
                  "caption": ["a hum", "a beep", "a hiss", "a low drone"]}).to_csv(root / "captions.csv", index=False)
    prepare(PrepareConfig(source="folder", root=root, name="table", data_dir=data_dir, val=0.0, test=0.0))
    ds = load_dataset("table", data_dir)
    assert ds.modality.name == "audio" and len(ds.items) == 3 and len(ds.captions) == 4


def test_clotho_in_its_real_layout(tmp_path, data_dir):
    root = tiny_audio.clotho(tmp_path / "clotho", {"development": 6, "validation": 3, "evaluation": 3})
    (root / "evaluation" / "Noise Sound 010.wav").unlink()  # listed but not on disk
    result = prepare(PrepareConfig(source="clotho", root=root, data_dir=data_dir))
    ds = load_dataset("clotho", data_dir)
    assert {s: result.counts[s]["items"] for s in ("train", "val", "test")} == {"train": 6, "val": 3, "test": 2}
    assert result.counts["test"]["dropped items"] == 1
    assert ds.captions.groupby("item_id").size().eq(5).all()
    assert "Low Sound 002" in set(ds.items.item_id)
    assert ds.captions.caption.str.contains(", recorded outdoors").sum() == 11  # the quoted comma survives
    assert result.split_note.startswith("Clotho's own split: development as train")
    missing = [p for p in result.problems if p.kind == "missing audio"]
    assert [(p.item, p.split) for p in missing] == [("Noise Sound 010.wav", "test")]


def test_audiocaps_finds_clips_by_youtube_id_and_reports_the_missing(tmp_path, data_dir):
    root, missing = tiny_audio.audiocaps(tmp_path / "audiocaps")
    result = prepare(PrepareConfig(source="audiocaps", root=root, data_dir=data_dir))
    ds = load_dataset("audiocaps", data_dir)
    counts = {s: result.counts[s]["items"] for s in ("train", "val", "test")}
    assert counts == {"train": 8, "val": 3, "test": 3}
    assert {s: result.counts[s]["dropped items"] for s in counts} == missing
    per_clip = ds.captions.groupby("item_id").size()
    assert per_clip[ds.items.set_index("item_id").split.eq("val").pipe(lambda s: s[s].index)].eq(5).all()
    assert {p.kind for p in result.problems} == {"missing audio"}
    assert len(result.problems) == sum(missing.values())  # one line per missing clip, not per caption
    assert set(ds.items.path.str.rsplit(".", n=1).str[-1]) == {"wav", "flac", "ogg"}


def test_audio_sources_without_their_files_say_what_they_expect(tmp_path, data_dir):
    (tmp_path / "empty").mkdir()
    with pytest.raises(MmretError, match="expected clotho_captions_development.csv"):
        prepare(PrepareConfig(source="clotho", root=tmp_path / "empty", data_dir=data_dir))
    with pytest.raises(MmretError, match="expected train.csv, val.csv and test.csv"):
        prepare(PrepareConfig(source="audiocaps", root=tmp_path / "empty", data_dir=data_dir))


def test_a_folder_mixing_pictures_and_sounds_is_refused(tmp_path, data_dir):
    from PIL import Image

    root = tmp_path / "mixed"
    tiny_audio.write_sound(root / "a.wav").with_suffix(".txt").write_text("a sound")
    Image.new("RGB", (8, 8)).save(root / "b.png")
    (root / "b.txt").write_text("a picture")
    with pytest.raises(MmretError, match="holds both images and audio"):
        prepare(PrepareConfig(source="folder", root=root, data_dir=data_dir))


def test_the_audio_modality_names_its_metrics_and_files():
    audio = get_modality("audio")
    assert (audio.short, audio.table, audio.id_column, audio.map_at) == ("a", "audio.parquet", "audio_id", (10,))
    image = get_modality("image")
    assert (image.short, image.table, image.id_column, image.map_at) == ("i", "images.parquet", "image_id", ())
