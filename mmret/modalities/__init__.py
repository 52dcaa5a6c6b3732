"""What differs between the kinds of items a caption can describe (a picture, a sound): which
files hold them, how to read one, what a prepared table records about it, and how results are
shown. Everything else in mmret handles an item through its `Modality` and its encoder, and
never asks which kind it is.

A modality is registered once (`register_modality`); a prepared dataset names its modality in
`dataset.json` (`image` when the field is absent, as in datasets prepared before it existed).
Modules: `image` (pictures), `audio` (sounds: decoding and probing), `spectrogram` (a sound as a
log-mel picture), `listening` (search results over sounds as an HTML page).
"""

from mmret.modalities.base import (  # noqa: I001  (image registers before audio: MODALITIES keeps that order)
    MODALITIES, ItemError, ItemLoader, Modality, SheetItem, get_modality, register_modality,
)
from mmret.modalities import image  # noqa: F401  (registers the image modality)
from mmret.modalities import audio  # noqa: F401  (registers the audio modality)

__all__ = ["MODALITIES", "ItemError", "ItemLoader", "Modality", "SheetItem", "get_modality", "register_modality"]
