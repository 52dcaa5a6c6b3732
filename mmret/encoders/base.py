"""What every frozen tower shares: its output, freezing, the one-line load errors, the quiet
loading of transformers models, and building with or without weights.

A tower built without weights lives on the meta device: it has every shape, the preprocessing,
the pooling and the spec of the real one but no numbers, costs no memory and reads no weights
file. `with_weights()` turns it into the real tower (the same load, now with weights); memory
probing, parameter counts and a search that needs only one side use such towers.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from typing import Any, Callable, Iterator, NamedTuple

import torch
from torch import nn

from mmret.errors import MmretError

_logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 64  # as EncoderConfig.max_length; longer than nearly every Flickr30k or COCO caption


class EncoderOutput(NamedTuple):
    pooled: torch.Tensor  # (B, D)
    tokens: torch.Tensor  # (B, T, Dt) token states before pooling / projection
    mask: torch.Tensor | None = None  # (B, T) 1 for real tokens (text); None for items


class Tower(nn.Module):
    """Base of every frozen tower: `.model` (the library's module), `.source`, `.name`, and the
    way back to a real tower when this one was built without weights."""

    modality = ""  # image | text | ... (a `mmret.modalities` name, or text)

    def __init__(self, model: nn.Module, source: Any):
        super().__init__()
        self.model = freeze(model)
        self.source = source
        self.name = source.id
        self.reload: Callable[[], "Tower"] | None = None  # set by the loader: the same tower, with weights

    @property
    def is_meta(self) -> bool:
        return any(p.is_meta for p in self.model.parameters())

    def with_weights(self) -> "Tower":
        """This tower if it has weights, else the same tower loaded with them."""
        if not self.is_meta:
            return self
        if self.reload is None:
            raise MmretError(f"{self.name} was built from its architecture only and cannot encode")
        return self.reload()

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def notes(self) -> list[str]:
        """What the user should hear when this tower encodes (e.g. preprocessing settings guessed)."""
        return []


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers prints load reports (e.g. the text weights a vision tower skips) and progress
    bars; keep them out of the user's terminal unless MMRET_DEBUG asks for logs."""
    from transformers.utils import logging as tlog

    level, bars = tlog.get_verbosity(), tlog.is_progress_bar_enabled()
    if not _logger.isEnabledFor(logging.DEBUG):
        tlog.set_verbosity_error()
    tlog.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # torch's weights-only reader warns about any pickle protocol above 2
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            yield
    finally:
        tlog.set_verbosity(level)
        if bars:
            tlog.enable_progress_bar()


def freeze(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def accepts(module: nn.Module, arg: str) -> bool:
    return arg in inspect.signature(module.forward).parameters


def size_pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, (int, float)) else (int(value[-2]), int(value[-1]))


def is_dual(config: dict) -> bool:
    return "vision_config" in config and "text_config" in config


def is_clip(config: dict, tower: str) -> bool:
    """A CLIP checkpoint with a projection for `tower` (vision | text)."""
    kind = config.get("model_type")
    return kind == "clip" or (kind == f"clip_{tower}_model" and "WithProjection" in str(config.get("architectures")))


def check_pooling(pooling: str, model: nn.Module, projection: str, name: str) -> None:
    if pooling not in ("proj", "cls", "mean") or (pooling == "proj" and not hasattr(model, projection)):
        raise MmretError(f"pooling {pooling!r} does not apply to {name}; choose cls or mean")


def hf_config(source: Any) -> Any:
    """The transformers config of a source: its folder's, or the published one it was built from."""
    from transformers import AutoConfig

    if source.folder is not None:
        return AutoConfig.from_pretrained(source.folder)
    values = dict(source.config)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def load_hf(cls: Any, source: Any, config: Any, weights: bool) -> nn.Module:
    """`cls` from the source's folder with its weights, or built from `config` on the meta device."""
    if not weights:
        with torch.device("meta"):
            return cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    import pickle

    try:
        with quiet_loading():
            return cls.from_pretrained(source.folder, config=config)
    except pickle.UnpicklingError:
        raise MmretError(f"cannot load the model in {source.folder}: its pickled weights hold more than tensors and "
                         "were refused unread (weights-only load); use a copy with model.safetensors from a source you "
                         "trust") from None
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise MmretError(f"cannot load the model in {source.folder}: {str(e).splitlines()[0]}") from None
