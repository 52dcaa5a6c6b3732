"""A sound as a picture: its log-mel spectrogram scaled to [0, 1], low frequencies at the bottom.

What the spectrogram-image route feeds an image tower (`spectrogram:NAME`, see
`mmret.encoders.spectrogram`), and what the listening page draws beside each hit. The short-time
Fourier transform, the mel filter bank and the window come from `transformers.audio_utils`, the
NumPy code transformers' own audio feature extractors (Whisper, CLAP, AST without torchaudio) run.

Loudness is relative: the loudest mel bin of the clip is 1 and `top_db` below it is 0, so a quiet
and a loud recording of the same sound give the same picture, and silence gives a black one (no
NaN: power is floored before the logarithm).
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class MelSettings:
    """How a waveform becomes a log-mel picture (AST's front end: 25 ms windows every 10 ms, 128 mel bins)."""

    sample_rate: int = 16_000
    seconds: float = 10.0  # the window a clip is cut or repeated to
    n_mels: int = 128
    win_ms: float = 25.0
    hop_ms: float = 10.0
    fmin: float = 20.0
    fmax: float | None = None  # None: half the sample rate
    top_db: float = 80.0  # the dynamic range mapped to [0, 1]

    def numbers(self) -> dict:
        return asdict(self)

    @property
    def samples(self) -> int:
        return round(self.seconds * self.sample_rate)


@functools.lru_cache(maxsize=8)
def _filters(settings: MelSettings) -> tuple[np.ndarray, np.ndarray, int, int, int]:
    from transformers.audio_utils import mel_filter_bank, window_function

    win = round(settings.win_ms * settings.sample_rate / 1000)
    hop = round(settings.hop_ms * settings.sample_rate / 1000)
    n_fft = 1 << (win - 1).bit_length()
    fmax = settings.fmax or settings.sample_rate / 2
    mel = mel_filter_bank(num_frequency_bins=n_fft // 2 + 1, num_mel_filters=settings.n_mels,
                          min_frequency=settings.fmin, max_frequency=fmax, sampling_rate=settings.sample_rate,
                          norm="slaney", mel_scale="slaney")
    return window_function(win, "hann"), mel, win, hop, n_fft


def repeat_to(wave: np.ndarray, samples: int) -> np.ndarray:
    """Cut to `samples`, or repeat a shorter clip until it fills them (CLAP's "repeatpad")."""
    if len(wave) >= samples or not len(wave):
        return wave[:samples] if len(wave) else np.zeros(samples, np.float32)
    return np.tile(wave, -(-samples // len(wave)))[:samples]


def log_mel(wave: np.ndarray, settings: MelSettings = MelSettings()) -> np.ndarray:
    """(n_mels, frames) power in dB of a mono waveform at `settings.sample_rate`."""
    from transformers.audio_utils import spectrogram

    window, mel, win, hop, n_fft = _filters(settings)
    wave = np.asarray(wave, dtype=np.float64)
    if len(wave) < win:
        wave = np.pad(wave, (0, win - len(wave)))
    power = spectrogram(wave, window, frame_length=win, hop_length=hop, fft_length=n_fft, power=2.0,
                        mel_filters=mel, mel_floor=1e-10)
    return 10.0 * np.log10(np.maximum(power, 1e-10))


def mel_picture(wave: np.ndarray, settings: MelSettings = MelSettings(), fill: bool = True) -> np.ndarray:
    """(n_mels, frames) float32 in [0, 1], low frequencies in the last row. With `fill` the clip is
    first cut or repeated to `settings.seconds`, so every picture spans the same time."""
    if fill:
        wave = repeat_to(np.asarray(wave, dtype=np.float32), settings.samples)
    db = log_mel(wave, settings)
    top = db.max()
    picture = np.clip((db - (top - settings.top_db)) / settings.top_db, 0.0, 1.0) if top > -100.0 else np.zeros_like(db)
    return np.ascontiguousarray(picture[::-1], dtype=np.float32)
