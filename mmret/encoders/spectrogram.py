"""The spectrogram-image route: any picture tower reads sounds as log-mel pictures.

`spectrogram:NAME` (NAME: an image preset, hub id, local folder or `timm:NAME`) is a sound tower
whose items are decoded to mono 16 kHz, cut or repeated to 10 s, turned into a 128-bin log-mel
picture in [0, 1] (`mmret.modalities.spectrogram`), resized to the picture tower's input, copied
to its three channels and normalised with its own mean and standard deviation. The picture tower
then runs as it would on a photo.

Why offer it: it is how AST itself starts (from an ImageNet ViT's weights, its patch embedding
averaged over the three channels), so a pretrained picture tower is a real, if untuned, start for
sounds; and on a machine without a pretrained audio encoder (no AST or CLAP weights to download)
it is the only pretrained route there is. What it cannot do: the picture tower never learned that
one axis is time and the other frequency, and a log-mel picture looks nothing like the photos it
was trained on, so its features separate sounds by broad shape (a click, a tone, noise, rising or
falling pitch) more than by what made them, until a method adapts it (heads over its features,
LoRA, prefix or adapters inside it: the tower's own layer names, as for pictures).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmret.encoders.base import EncoderOutput, Tower
from mmret.encoders.registry import register_wrapper
from mmret.modalities.audio import AudioDecoder
from mmret.modalities.base import ItemLoader
from mmret.modalities.spectrogram import MelSettings, mel_picture

PREFIX = "spectrogram:"
MEL = MelSettings()  # AST's front end: 16 kHz, 25 ms windows every 10 ms, 128 mel bins, 10 s


class SpectrogramTransform:
    """Waveform (N,) at 16 kHz -> (3, H, W) picture for the tower (picklable)."""

    def __init__(self, size: tuple[int, int], mean: tuple[float, ...], std: tuple[float, ...],
                 mel: MelSettings = MEL):
        self.size, self.mel = tuple(size), mel
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, wave) -> torch.Tensor:
        picture = torch.from_numpy(mel_picture(wave, self.mel))[None, None]  # (1, 1, n_mels, frames)
        picture = F.interpolate(picture, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return (picture[0].expand(3, -1, -1) - self.mean) / self.std  # (3, H, W)


class SpectrogramEncoder(Tower):
    """A picture tower over log-mel pictures of sounds. Its `model` is the picture tower's, so the
    tower methods adapt it as they adapt a picture tower."""

    modality = "audio"
    input_name = "pixels"

    def __init__(self, image: nn.Module, mel: MelSettings = MEL):
        nn.Module.__init__(self)  # not Tower's: the picture tower holds the model, registered once
        self.image, self.mel = image, mel
        self.source, self.name, self.reload = image.source, image.name, None
        self.pooling, self.dim, self.token_dim = image.pooling, image.dim, image.token_dim

    @property
    def model(self) -> nn.Module:
        return self.image.model

    @property
    def preprocessing(self) -> Any:
        return self.image.preprocessing

    @property
    def notes(self) -> list[str]:
        return self.image.notes

    @property
    def spec(self) -> dict:
        return {"modality": "audio", "route": "spectrogram", "image": self.image.spec, "mel": self.mel.numbers()}

    def forward(self, pixels: torch.Tensor) -> EncoderOutput:
        return self.image(pixels)

    def item_loader(self, train: bool = False, hflip: bool = True) -> ItemLoader:
        """Sound file -> (3, H, W) picture (picklable). `train` reads a random window of a longer
        recording; pictures of sounds are never flipped (time would run backwards)."""
        pre = self.image.preprocessing
        return ItemLoader(AudioDecoder(self.mel.sample_rate, self.mel.seconds, random_offset=train),
                          SpectrogramTransform(pre.size, pre.mean, pre.std, self.mel))

    def blank_inputs(self, n: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        return self.image.blank_inputs(n, device)

    @property
    def num_tokens(self) -> int:
        return self.image.num_tokens

    def extra_repr(self) -> str:
        return f"name={self.name!r}, over log-mel pictures at {self.mel.sample_rate} Hz, {self.mel.seconds} s"


# `spectrogram:<name>`: the picture tower `<name>` (loaded with the options given) over log-mel pictures
register_wrapper(PREFIX, "audio", SpectrogramEncoder, inner="image")
