"""Sounds as people have them: any of wav, flac, ogg (Vorbis, Opus) or mp3, any sample rate, any
number of channels, seconds or hours long, sometimes broken.

Files are read with libsndfile (`soundfile`) and resampled with libsoxr (`soxr`, its "HQ"
quality), two well-kept C libraries; torchaudio is not needed (and its own loaders now defer to
ffmpeg or soundfile anyway). Both come with `pip install -e ".[audio]"`.

`probe_audio` reads the header: sample rate, channels and length, and notes what is odd but usable
(many channels, a rate far from the encoders', hours of sound, a WAV header longer than the file).
With `full=True` it decodes everything, block by block, and refuses what a header cannot show: a
file that stops decoding part-way (truncated), one that holds fewer frames than its header says,
and silence. `load_audio` gives what an encoder takes: mono (channels averaged), resampled, at most
one window long (from the start, or from a random offset for training), so an hours-long file
costs no more than a short one. Both raise `AudioError` with a short reason.

What happens to each kind of bad file (each gets one line in `prepare`'s summary):

    empty, not audio, no frames       left out by prepare
    truncated                         WAV: the frames present are used (noted); with --check-audio left out.
                                      FLAC/MP3: decoded up to the damage; with --check-audio left out.
                                      OGG: its header is unreadable, left out
    silent                            kept (encoders give finite features); with --check-audio left out
    hours long                        kept; one window is read (noted)
    8 channels                        averaged to mono (noted)
    8 kHz, 192 kHz                    resampled to the encoder's rate (noted)
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import numpy as np

from mmret.errors import MmretError
from mmret.modalities.base import ItemError, Modality, register_modality

_logger = logging.getLogger(__name__)

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".oga", ".opus", ".mp3")
SILENCE = 1e-4  # peak amplitude below this (-80 dBFS) is silence
LOW_RATE, HIGH_RATE = 16_000, 96_000  # rates outside these are noted: resampled far
LONG_SECONDS = 600.0  # longer recordings are noted: only one window of them is read
_BLOCK = 1 << 14  # frames decoded at a time when a whole file is read
_HEADER_MISMATCH = re.compile(r"data\s*:\s*(\d+)\s*\(should be (\d+)\)")


class AudioError(ItemError):
    """A sound file that cannot be used; the message is the reason."""


def _libs() -> tuple[Any, Any]:
    try:
        import soundfile
        import soxr
    except (ImportError, OSError) as e:
        raise MmretError(f"reading sound files needs soundfile and soxr ({e}); "
                         "install them with: pip install -e \".[audio]\"") from None
    return soundfile, soxr


_C_STDERR = threading.Lock()


def _mp3(source: Any) -> bool:
    """Whether the file starts as an MP3 does (an ID3 tag, or an MPEG audio frame's sync bits)."""
    if not hasattr(source, "read"):
        with open(source, "rb") as f:
            head = f.read(3)
    else:
        source.seek(0)
        head = source.read(3)
        source.seek(0)
    return head.startswith(b"ID3") or (len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0)


@contextmanager
def _c_notes_to_log(source: Any) -> Iterator[None]:
    """libsndfile's MP3 decoder (libmpg123) writes its notes about a damaged stream ("Illegal
    Audio-MPEG-Header", "Xing stream size off") to the C-level stderr, past Python: for an MP3 they
    are caught there (file descriptor 2, pointed at an unnamed temporary file for the call) and go to
    the debug log, so a command still ends in its one line. One MP3 at a time, so no thread loses them."""
    if not _mp3(source):
        yield
        return
    with _C_STDERR:
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile() as caught:
            os.dup2(caught.fileno(), 2)
            try:
                yield
            finally:
                os.dup2(saved, 2)
                os.close(saved)
                caught.seek(0)
                notes = caught.read().decode("utf-8", errors="replace").splitlines()
    for note in notes:
        if note.strip():
            _logger.debug("libsndfile: %s", note.strip())


def _check_file(source: Any) -> None:
    if hasattr(source, "read"):  # an open binary file: a member of a tar shard, read in memory
        empty = source.seek(0, 2) == 0
        source.seek(0)
    else:
        if not Path(source).is_file():
            raise AudioError("file not found")
        empty = Path(source).stat().st_size == 0
    if empty:
        raise AudioError("empty file (0 bytes)")


def _opened(source: Any) -> Any:
    """What soundfile opens: a path as a string, an open binary file rewound to its start."""
    if hasattr(source, "read"):
        source.seek(0)
        return source
    return str(source)


@dataclass(frozen=True)
class AudioInfo:
    sample_rate: int
    channels: int
    frames: int
    truncated: str = ""  # libsndfile's note that the header promises more than the file holds

    @property
    def seconds(self) -> float:
        return self.frames / self.sample_rate


def read_info(source: str | Path | BinaryIO) -> AudioInfo:
    """The header of a sound file, a path or an open binary file (nothing decoded)."""
    sf, _ = _libs()
    _check_file(source)
    try:
        with _c_notes_to_log(source):
            info = sf.info(_opened(source))
    except (RuntimeError, TypeError) as e:
        raise AudioError(f"not a sound file libsndfile can read ({_first_line(e)})") from None
    if info.samplerate <= 0 or info.channels <= 0:
        raise AudioError(f"header says {info.samplerate} Hz and {info.channels} channels")
    if info.frames <= 0:
        raise AudioError("no audio frames")
    match = _HEADER_MISMATCH.search(info.extra_info or "")
    truncated = ""
    if match and int(match[2]) < int(match[1]):
        have = info.frames / info.samplerate
        truncated = (f"the header promises {have * int(match[1]) / max(1, int(match[2])):.2f} s, "
                     f"the file holds {have:.2f} s")
    return AudioInfo(int(info.samplerate), int(info.channels), int(info.frames), truncated)


def _first_line(e: Exception) -> str:
    return (str(e) or type(e).__name__).splitlines()[0].replace("Error : ", "")


def _notes(info: AudioInfo) -> list[tuple[str, str]]:
    notes = []
    if info.truncated:
        notes.append(("truncated audio", f"{info.truncated}; the sound present is used"))
    if info.channels > 2:
        notes.append(("many channels", f"{info.channels} channels, averaged to mono"))
    if info.sample_rate < LOW_RATE:
        notes.append(("low sample rate", f"{info.sample_rate} Hz: resampled up; nothing above "
                                         f"{info.sample_rate // 2} Hz is in the recording"))
    if info.sample_rate > HIGH_RATE:
        notes.append(("high sample rate", f"{info.sample_rate} Hz: resampled down to the encoder's rate"))
    if info.seconds > LONG_SECONDS:
        notes.append(("long audio", f"{_duration(info.seconds)} long: encoders read one window of it"))
    return notes


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"


def _blocks(f: Any, frames: int, size: int):
    """Blocks of at most `size` frames until `frames` are read or the file ends (soundfile's own
    `blocks` trusts the header's length and pads a short read with stale data)."""
    while frames > 0:
        block = f.read(min(size, frames), dtype="float32", always_2d=True)
        if not len(block):
            return
        frames -= len(block)
        yield block


def _scan(source: Any, info: AudioInfo) -> None:
    """Decode the whole file block by block (bounded memory): truncation and silence."""
    sf, _ = _libs()
    if info.truncated:
        raise AudioError(f"truncated: {info.truncated}")
    frames, peak = 0, 0.0
    try:
        with _c_notes_to_log(source), sf.SoundFile(_opened(source)) as f:
            for block in _blocks(f, info.frames, _BLOCK):
                frames += len(block)
                peak = max(peak, float(np.abs(block).max()))
    except RuntimeError as e:
        raise AudioError(f"truncated or corrupt: decoding stops after {frames / info.sample_rate:.2f} of "
                         f"{info.seconds:.2f} s ({_first_line(e)})") from None
    if frames < 0.99 * info.frames:
        raise AudioError(f"truncated: {frames / info.sample_rate:.2f} of the {info.seconds:.2f} s its header "
                         "promises decode")
    if not np.isfinite(peak):
        raise AudioError("holds NaN or infinite samples")
    if peak < SILENCE:
        raise AudioError("silent: no sample above -80 dBFS")


def probe_audio(source: str | Path | BinaryIO, full: bool = False) -> AudioInfo:
    """The header of a sound file; `full` decodes everything and refuses truncated or silent files."""
    info = read_info(source)
    if full:
        _scan(source, info)
    return info


def _read(source: Any, start: int, frames: int) -> tuple[np.ndarray, int]:
    """(frames, channels) float32 from `start`, and the file's rate. A decoding error part-way keeps
    the blocks decoded before it (a truncated FLAC or MP3 plays up to the damage)."""
    sf, _ = _libs()
    try:
        with _c_notes_to_log(source), sf.SoundFile(_opened(source)) as f:
            rate = f.samplerate
            f.seek(start)
            try:
                return f.read(frames, dtype="float32", always_2d=True), rate
            except RuntimeError:
                pass
        parts = []
        with _c_notes_to_log(source), sf.SoundFile(_opened(source)) as f:
            f.seek(start)
            try:
                for block in _blocks(f, frames, 4096):
                    parts.append(block)
            except RuntimeError:
                pass
        return (np.concatenate(parts) if parts else np.zeros((0, 1), np.float32)), rate
    except RuntimeError as e:
        raise AudioError(f"cannot decode: {_first_line(e)}") from None


def _random_start(total: int, want: int) -> int:
    import torch  # the generator the DataLoader worker seeded for this item

    return int(torch.randint(0, total - want + 1, ()).item()) if total > want else 0


def load_audio(source: str | Path | BinaryIO, sample_rate: int | None = None, seconds: float | None = None,
               random_offset: bool = False) -> np.ndarray:
    """A mono float32 waveform (N,) of a sound file (a path or an open binary file) at `sample_rate`
    (None: the file's), at most `seconds` long (None: all of it): from the start, or from a random
    offset (seeded by torch) for training."""
    _, soxr = _libs()
    info = read_info(source)
    want = info.frames if seconds is None else min(info.frames, math.ceil(seconds * info.sample_rate))
    start = _random_start(info.frames, want) if random_offset else 0
    data, rate = _read(source, start, want)
    if not len(data) and start:  # an MP3 whose header promised more than it holds
        data, rate = _read(source, 0, want)
    if not len(data):
        raise AudioError("no audio frames could be decoded")
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    wave = np.nan_to_num(wave, nan=0.0, posinf=1.0, neginf=-1.0)
    if sample_rate and rate != sample_rate:
        wave = soxr.resample(wave, rate, sample_rate, quality="HQ")
    if seconds is not None:
        wave = wave[:round(seconds * (sample_rate or rate))]
    return np.ascontiguousarray(wave, dtype=np.float32)


@dataclass(frozen=True)
class AudioDecoder:
    """sound file (a path or an open binary file) -> mono waveform at `sample_rate`, at most
    `seconds` long (picklable, for workers)."""

    sample_rate: int
    seconds: float | None = None
    random_offset: bool = False  # training: a random window of a longer recording

    def __call__(self, source: str | Path | BinaryIO) -> np.ndarray:
        return load_audio(source, self.sample_rate, self.seconds, self.random_offset)

    def wave(self, wave: Any, rate: int) -> np.ndarray:
        """A waveform held in memory, as `__call__` gives a file's (from its start): mono, at
        `sample_rate`, at most `seconds` long."""
        return fit_wave(wave, rate, self.sample_rate, self.seconds)


def fit_wave(wave: Any, rate: int, sample_rate: int, seconds: float | None = None) -> np.ndarray:
    """(N,) samples, or (channels, N) as torchaudio gives them, or (N, channels) as soundfile does
    (told apart by which side is longer) -> mono float32 at `sample_rate`, at most `seconds` long."""
    _, soxr = _libs()
    data = np.asarray(wave.detach().cpu() if hasattr(wave, "detach") else wave, dtype=np.float32)
    if data.ndim == 2:
        data = data.mean(axis=0 if data.shape[0] < data.shape[1] else 1)
    if data.ndim != 1 or not len(data):
        raise AudioError(f"a waveform must be (samples,) or (channels, samples), got shape {data.shape}")
    if not isinstance(rate, (int, np.integer)) or rate <= 0:
        raise AudioError(f"the sample rate must be a positive whole number of Hz, got {rate!r}")
    if seconds is not None:
        data = data[:math.ceil(seconds * rate)]
    data = np.nan_to_num(data, nan=0.0, posinf=1.0, neginf=-1.0)
    if rate != sample_rate:
        data = soxr.resample(data, int(rate), sample_rate, quality="HQ")
    if seconds is not None:
        data = data[:round(seconds * sample_rate)]
    return np.ascontiguousarray(data, dtype=np.float32)


def _accept(sound: Any, decode: Any) -> np.ndarray:
    """A (waveform, sample rate) pair, through the loader's decoder (an `AudioDecoder`)."""
    if not (isinstance(sound, tuple) and len(sound) == 2):
        raise AudioError(f"a sound in memory is a (waveform, sample_rate) pair, got {type(sound).__name__}")
    return decode.wave(*sound)


def _probe_columns(source: Path | BinaryIO, full: bool) -> dict[str, Any]:
    info = probe_audio(source, full)
    return {"sample_rate": info.sample_rate, "channels": info.channels,
            "duration_ms": min(round(info.seconds * 1000), 2**31 - 1), "notes": _notes(info)}


def _listening_page(rows: list, path: Path, roots: Any) -> None:
    from mmret.modalities.listening import listening_page

    listening_page(rows, path, roots, load_audio)


def thumbnail(source: str | Path | BinaryIO, size: int) -> np.ndarray:
    """(H, W, 3) uint8: the log-mel spectrogram of the first 10 s in colour, at most `size` pixels a
    side, for embedding maps and failure galleries (`source`: a path or an open binary file)."""
    from mmret.modalities.listening import spectrogram_rgb

    return spectrogram_rgb(source, load_audio, size)


AUDIO = register_modality(Modality(
    name="audio", plural="audio", short="a", noun="sound", unit="clip", extensions=AUDIO_EXTENSIONS,
    probe=_probe_columns, decode=load_audio, columns=("sample_rate", "channels", "duration_ms"),
    results_sheet=_listening_page, thumbnail=thumbnail, sheet_name="listening page", map_at=(10,), accept=_accept,
    given_as="a file path or a (waveform, sample_rate) pair"))
