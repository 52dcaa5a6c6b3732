"""Sound towers: transformers' Audio Spectrogram Transformer (`ASTModel`, 16 kHz) and CLAP's audio
tower with its projection (`ClapAudioModelWithProjection`, 48 kHz), with their own feature
extractors, built with their weights or, for shapes only, on the meta device.

`AudioEncoder.forward(features) -> EncoderOutput(pooled (B, D), tokens (B, T, Dt))`, where
`features` are what the model's feature extractor makes of a waveform: AST's normalised
log-mel frames (B, 1024, 128), CLAP's (B, 1, 1001, 64). `item_loader()` gives the picklable
path -> features function DataLoader workers run: `mmret.modalities.audio` decodes the file to mono
at the extractor's rate and cuts one window of the length the model reads (10.24 s, 10 s; a random
window of a longer recording for training), then the extractor pads it as the model expects
(AST with zeros, CLAP by repeating the clip). Cutting the window here keeps CLAP's extractor from
its own `rand_trunc`, which would crop with NumPy's unseeded generator at evaluation time too.

Pooling: AST's own (`cls`: the mean of its CLS and distillation tokens) or the mean of its patch
tokens (`mean`); CLAP's projected embedding (`proj`) or the mean of its tokens (`mean`).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from mmret.encoders.base import EncoderOutput, Tower, hf_config, load_hf, quiet_loading
from mmret.encoders.hub import ModelSource
from mmret.encoders.registry import register_family
from mmret.errors import MmretError
from mmret.modalities.audio import AudioDecoder
from mmret.modalities.base import ItemLoader

_logger = logging.getLogger(__name__)

AST = "audio-spectrogram-transformer"
CLAP_TYPES = ("clap", "clap_audio_model")
MODEL_TYPES = (AST, *CLAP_TYPES)
AST_PREFIX = 2  # AST's CLS and distillation tokens come before the patches
# what the published checkpoints' preprocessor_config.json holds where it differs from the class defaults
# (laion/clap-htsat-*: 50 Hz lower edge; unfused: a single spectrogram, no 4-crop fusion)
_PUBLISHED: dict[str, dict[str, Any]] = {"clap": dict(frequency_min=50, truncation="rand_trunc")}


@dataclass(frozen=True)
class AudioPreprocess:
    """What turns a waveform into the model's input: the extractor and the window it reads."""

    extractor: Any = field(compare=False)  # a transformers feature extractor (picklable)
    sample_rate: int
    seconds: float  # the window of sound the model reads
    input_name: str  # the keyword the model takes the features by
    origin: str = field(default="", compare=False)
    note: str = field(default="", compare=False)  # said when the tower encodes: settings that were guessed

    def numbers(self) -> dict:
        settings = {k: v for k, v in self.extractor.to_dict().items()
                    if k not in ("mel_filters", "mel_filters_slaney", "window", "processor_class")}
        return {"sample_rate": self.sample_rate, "seconds": self.seconds, "extractor": settings}


class FeatureTransform:
    """Waveform (N,) at the extractor's rate -> the model's input features for one clip (picklable)."""

    def __init__(self, pre: AudioPreprocess):
        self.extractor, self.sample_rate, self.key = pre.extractor, pre.sample_rate, pre.input_name

    def __call__(self, wave) -> torch.Tensor:
        out = self.extractor(wave, sampling_rate=self.sample_rate, return_tensors="pt")
        return out[self.key][0].float()


class AudioEncoder(Tower):
    """A frozen sound tower; subclasses implement `forward`."""

    modality = "audio"

    def __init__(self, model: nn.Module, source: ModelSource, pre: AudioPreprocess, dim: int, token_dim: int,
                 pooling: str):
        super().__init__(model, source)
        self.preprocessing, self.pooling = pre, pooling
        self.dim, self.token_dim = dim, token_dim
        self.input_name = pre.input_name
        self.input_shape = tuple(FeatureTransform(pre)(_silence(pre)).shape)

    @property
    def notes(self) -> list[str]:
        return [self.preprocessing.note] if self.preprocessing.note else []

    @property
    def spec(self) -> dict:
        """Everything that changes the features; the cache key hashes it."""
        return {"modality": "audio", "library": self.source.library, "model": self.source.id,
                "revision": self.source.revision, "class": type(self.model).__name__, "pooling": self.pooling,
                **self.preprocessing.numbers()}

    def item_loader(self, train: bool = False, hflip: bool = True) -> ItemLoader:
        """Sound file -> input features, decoded and preprocessed (picklable, for workers). `train`
        reads a random window of a longer recording; `hflip` (a picture's) does not apply."""
        pre = self.preprocessing
        return ItemLoader(AudioDecoder(pre.sample_rate, pre.seconds, random_offset=train), FeatureTransform(pre))

    def blank_inputs(self, n: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """`forward`'s keyword inputs for `n` silent clips' worth of features (for shapes)."""
        return {self.input_name: torch.zeros(n, *self.input_shape, device=device)}

    @property
    def num_tokens(self) -> int:
        with torch.inference_mode():
            return self(**self.blank_inputs(1, self.device)).tokens.shape[1]

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, dim={self.dim}, token_dim={self.token_dim}, "
                f"rate={self.preprocessing.sample_rate}, seconds={self.preprocessing.seconds}")


def _silence(pre: AudioPreprocess):
    import numpy as np

    return np.zeros(round(pre.seconds * pre.sample_rate), dtype=np.float32)


class ASTEncoder(AudioEncoder):
    """`ASTModel`: tokens are `last_hidden_state` (CLS, distillation, then the patches)."""

    def forward(self, input_values: torch.Tensor) -> EncoderOutput:
        out = self.model(input_values=input_values)
        tokens = out.last_hidden_state  # (B, 2 + patches, Dt)
        pooled = out.pooler_output if self.pooling == "cls" else tokens[:, AST_PREFIX:].mean(dim=1)  # (B, D)
        return EncoderOutput(pooled, tokens)


class ClapAudioEncoder(AudioEncoder):
    """`ClapAudioModelWithProjection`: tokens are the final Swin feature map, flattened."""

    def forward(self, input_features: torch.Tensor) -> EncoderOutput:
        # windows are cut to the model's length, so no clip is "longer" (fusion models see 4 equal crops)
        longer = torch.zeros(len(input_features), 1, dtype=torch.bool, device=input_features.device)
        out = self.model(input_features=input_features, is_longer=longer)
        tokens = out.last_hidden_state.flatten(2).transpose(1, 2)  # (B, C, F, T) -> (B, F*T, C)
        pooled = out.audio_embeds if self.pooling == "proj" else tokens.mean(dim=1)  # (B, D)
        return EncoderOutput(pooled, tokens)


def _extractor(source: ModelSource, kind: str) -> tuple[Any, str, str]:
    """The folder's feature extractor, or the published settings for its type; with where the
    settings came from and, when a folder lacks them, a note saying so."""
    import transformers

    with warnings.catch_warnings():  # AST's 128 kaldi mel filters from 257 FFT bins: some are empty, by design
        warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
        if source.folder is not None and (source.folder / "preprocessor_config.json").is_file():
            with quiet_loading():
                return transformers.AutoFeatureExtractor.from_pretrained(source.folder), "preprocessor_config.json", ""
        family = "clap" if kind in CLAP_TYPES else "ast"
        cls = transformers.ClapFeatureExtractor if family == "clap" else transformers.ASTFeatureExtractor
        origin = f"{cls.__name__} with the published {family} settings (no preprocessor_config.json)"
        note = f"{source.folder.name}: no preprocessor_config.json; using {origin}" if source.folder else ""
        return cls(**_PUBLISHED.get(family, {})), origin, note


def _window(extractor: Any) -> float:
    """Seconds of sound the extractor keeps: AST's `max_length` frames of 25 ms every 10 ms,
    CLAP's `nb_max_samples`."""
    rate = extractor.sampling_rate
    if hasattr(extractor, "nb_max_samples"):
        return extractor.nb_max_samples / rate
    hop, win = round(0.010 * rate), round(0.025 * rate)
    return ((extractor.max_length - 1) * hop + win) / rate


def build_audio_encoder(source: ModelSource, weights: bool = True, pooling: str | None = None,
                        image_size: int | None = None) -> AudioEncoder:
    from transformers import ASTModel, ClapAudioModelWithProjection

    if image_size is not None:
        raise MmretError(f"--image-size sets a picture tower's input; {source.id} reads sounds (its window and "
                         "mel bins come from its feature extractor)")

    if source.library != "transformers":
        raise MmretError(f"{source.id} is a timm image model; an image tower reads sounds as spectrograms: "
                         f"pass spectrogram:{source.id}")
    kind = source.config.get("model_type")
    if kind not in MODEL_TYPES:
        raise MmretError(f"{source.id} ({kind}) is not a sound model mmret knows (AST or CLAP); an image tower "
                         f"reads sounds as spectrograms: pass spectrogram:{source.id}")
    config = hf_config(source)
    extractor, origin, note = _extractor(source, kind)
    if kind == AST:
        model = load_hf(ASTModel, source, config, weights)
        pooling = pooling or "cls"
        if pooling not in ("cls", "mean"):
            raise MmretError(f"pooling {pooling!r} does not apply to {source.id}; choose cls or mean")
        pre = AudioPreprocess(extractor, extractor.sampling_rate, _window(extractor), "input_values", origin, note)
        return ASTEncoder(model, source, pre, config.hidden_size, config.hidden_size, pooling)
    audio = config.audio_config if kind == "clap" else config
    audio.projection_dim = getattr(config, "projection_dim", audio.projection_dim)  # kept on the top config
    model = load_hf(ClapAudioModelWithProjection, source, audio, weights)
    pooling = pooling or "proj"
    if pooling not in ("proj", "mean"):
        raise MmretError(f"pooling {pooling!r} does not apply to {source.id}; choose proj or mean")
    pre = AudioPreprocess(extractor, extractor.sampling_rate, _window(extractor), "input_features", origin, note)
    width = int(audio.patch_embeds_hidden_size * 2 ** (len(audio.depths) - 1))
    return ClapAudioEncoder(model, source, pre, audio.projection_dim if pooling == "proj" else width, width, pooling)


register_family("audio", build_audio_encoder, model_types=MODEL_TYPES)
