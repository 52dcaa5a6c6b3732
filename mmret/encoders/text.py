"""Text towers: transformers text models with their tokenizers (CLIP's and CLAP's text towers with
their projections, BERT-likes, sentence-transformers folders with their pooling), built with their
weights or, for shapes only, on the meta device.

`TextEncoder.forward(input_ids (B, L), attention_mask (B, L)) -> EncoderOutput(pooled, tokens, mask)`.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmret.encoders.base import (
    DEFAULT_MAX_LENGTH,
    EncoderOutput,
    Tower,
    accepts,
    check_pooling,
    hf_config,
    is_clip,
    is_dual,
    load_hf,
    quiet_loading,
)
from mmret.encoders.hub import ModelSource
from mmret.encoders.registry import register_family
from mmret.errors import MmretError

_logger = logging.getLogger(__name__)


class TextEncoder(Tower):
    """A frozen transformers text tower with its tokenizer.

    pooled: the CLIP projection (`proj`), the first token (`cls`), or the mean of the real tokens
    (`mean`, mask-aware: padding never counts).
    """

    modality = "text"

    def __init__(self, model: nn.Module, tokenizer: Any, source: ModelSource, dim: int, token_dim: int,
                 pooling: str, max_length: int):
        super().__init__(model, source)
        self.tokenizer, self.pooling = tokenizer, pooling
        self.dim, self.token_dim, self.max_length = dim, token_dim, max_length

    @property
    def spec(self) -> dict:
        return {"modality": "text", "library": self.source.library, "model": self.source.id,
                "revision": self.source.revision, "class": type(self.model).__name__,
                "pooling": self.pooling, "max_length": self.max_length}

    @property
    def vocab_size(self) -> int:
        return self.model.config.vocab_size

    def tokenize(self, texts: list[str], pad_to_max_length: bool = False) -> dict[str, torch.Tensor]:
        """input_ids and attention_mask (B, L), truncated to `max_length`; L is the longest text
        unless `pad_to_max_length` (fixed L = max_length, e.g. for cached token states)."""
        enc = self.tokenizer(list(texts), padding="max_length" if pad_to_max_length else "longest",
                             truncation=True, max_length=self.max_length, return_tensors="pt")
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}

    def standalone_tokenizer(self) -> Any:
        """`tokenize` as a `tokenizers.Tokenizer` that needs nothing else (for exports)."""
        from mmret.data.tokenizer import standalone

        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise MmretError(f"the tokenizer of {self.name} has no fast (tokenizers) form to save beside an export")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return standalone(backend, self.max_length, pad, self.tokenizer.pad_token or "[PAD]")

    def blank_inputs(self, n: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """`forward`'s inputs for `n` empty captions padded to `max_length` (for shapes)."""
        return {k: v.to(device) for k, v in self.tokenize([""] * n, pad_to_max_length=True).items()}

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> EncoderOutput:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask)
        tokens = out.last_hidden_state  # (B, L, Dt)
        if self.pooling == "proj":
            pooled = out.text_embeds  # (B, D)
        elif self.pooling == "mean":
            weights = attention_mask.unsqueeze(-1).to(tokens.dtype)  # (B, L, 1)
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        else:
            pooled = tokens[:, 0]
        return EncoderOutput(pooled, tokens, attention_mask)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, dim={self.dim}, token_dim={self.token_dim}, max_length={self.max_length}"


def _sentence_transformers_pooling(folder: Path | None) -> str | None:
    path = folder / "1_Pooling" / "config.json" if folder is not None else None
    if path is None or not path.is_file():
        return None
    cfg = json.loads(path.read_text(encoding="utf-8"))
    return "mean" if cfg.get("pooling_mode_mean_tokens") else "cls" if cfg.get("pooling_mode_cls_token") else None


def _text_limit(config: Any, tokenizer: Any) -> int:
    positions = getattr(config, "max_position_embeddings", None)
    if positions and getattr(config, "model_type", "") in ("roberta", "clap_text_model"):
        positions -= (getattr(config, "pad_token_id", 1) or 0) + 1  # RoBERTa numbers positions after padding_idx
    limits = [positions, getattr(tokenizer, "model_max_length", None)]
    return min(int(x) for x in limits if x and x < 1_000_000)


def _hf_text_model(source: ModelSource, pooling: str | None, weights: bool) -> tuple[nn.Module, Any, str]:
    """The transformers text model, its (text) config and the pooling it uses."""
    from transformers import AutoModel, ClapTextModelWithProjection, CLIPTextModelWithProjection

    config = hf_config(source)
    if is_clip(source.config, "text"):
        text = config.text_config if source.config["model_type"] == "clip" else config
        text.projection_dim = getattr(config, "projection_dim", text.projection_dim)
        return load_hf(CLIPTextModelWithProjection, source, text, weights), text, pooling or "proj"
    if source.config.get("model_type") in ("clap", "clap_text_model"):  # CLAP's RoBERTa with its projection
        text = config.text_config if source.config["model_type"] == "clap" else config
        text.projection_dim = getattr(config, "projection_dim", text.projection_dim)
        return load_hf(ClapTextModelWithProjection, source, text, weights), text, pooling or "proj"
    if is_dual(source.config):
        raise MmretError(f"{source.id}: model type {source.config['model_type']!r} has two towers and only "
                         "CLIP's and CLAP's are supported; pass a text-only model")
    model = load_hf(AutoModel, source, config, weights)
    if not accepts(model, "input_ids") or accepts(model, "pixel_values"):
        raise MmretError(f"{source.id} ({source.config['model_type']}) is not a text model")
    pooling = pooling or _sentence_transformers_pooling(source.folder)
    if pooling is None:
        _logger.info("%s: no sentence-transformers pooling config; using mask-aware mean pooling", source.id)
    return model, config, pooling or "mean"


def _tokenizer(source: ModelSource) -> Any:
    from transformers import AutoTokenizer

    if source.folder is None:  # built from a published config alone: token ids are made up
        return None
    try:
        with quiet_loading():
            return AutoTokenizer.from_pretrained(source.folder)
    except (OSError, ValueError, TypeError) as e:
        raise MmretError(f"cannot load the tokenizer in {source.folder}: {str(e).splitlines()[0]}") from None


def build_text_encoder(source: ModelSource, weights: bool = True, pooling: str | None = None,
                       max_length: int | None = None) -> TextEncoder:
    if source.library != "transformers":
        raise MmretError(f"{source.id} is a timm image model, not a text encoder")
    model, text, pooling = _hf_text_model(source, pooling, weights)
    check_pooling(pooling, model, "text_projection", source.id)
    tokenizer = _tokenizer(source)
    limit = _text_limit(text, tokenizer)
    if max_length and max_length > limit:
        _logger.warning("%s reads at most %d tokens; max_length %d lowered to %d", source.id, limit, max_length, limit)
    max_length = min(max_length or DEFAULT_MAX_LENGTH, limit)
    dim = text.projection_dim if pooling == "proj" else text.hidden_size
    return TextEncoder(model, tokenizer, source, dim, text.hidden_size, pooling, max_length)


register_family("text", build_text_encoder)
