"""Deep prompt tuning: P learned tokens at the input of every transformer block of a tower
(VPT-deep for pictures; the per-layer counterpart of prefix tuning for text).

This is a small module of ours, not peft's: peft's prompt learning for encoders
(`PeftModelForFeatureExtraction`) prepends prompts to `inputs_embeds` and calls the model
without `input_ids`, which CLIP's text tower rejects (it pools at the end-of-text token found
in `input_ids`); it puts the prompts before [CLS], so CLS pooling would read a prompt; it
lengthens `last_hidden_state` past the caller's attention mask; its prefix tuning feeds
`past_key_values`, which encoder-only towers do not read; and it has no image (`pixel_values`)
path at all. Here, text prompts sit right after the first token ([CLS] / start-of-text): the
input ids are lengthened by P placeholders (copies of the first id, so CLIP's end-of-text
search is unchanged), whose word embeddings are replaced by the learned tokens; picture (and
AST sound) prompts are inserted after the tokens that precede the patches, at the first block's
input: the class token, a ViT's register tokens, and AST's distillation token (AST pools the mean
of its first two positions, so a prompt there would be pooled). CLAP's audio tower is a Swin
transformer with windowed attention and no sequence to prompt: `prefix` refuses it. Blocks after
the first replace the previous block's prompt outputs with their own tokens. Prompt positions
are dropped from `last_hidden_state` again, so `tokens` and pooling see the usual T positions.
Text prompts use positions, so `max_length + P` must fit the model's position embeddings
(`prompted_text_length` says how long captions may then be).

Hooks are bound methods of the module that owns the new parameters, so `copy.deepcopy` of a
tower carries them correctly.
"""

from __future__ import annotations

import functools
import re
from typing import Any

import torch
from torch import Tensor, nn

from mmret.errors import MmretError

PROMPT_INIT_STD = 0.02  # as the towers' own token embeddings are initialised
# tokens before the patches, by transformers model type (default 1: the class token). AST has two:
# CLS and the distillation token (DeiT's), which its pooler averages: prompts go after both
PREFIX_TOKENS = {"audio-spectrogram-transformer": 2}
WINDOWED = ("clap_audio_model",)  # Swin-style towers: attention inside local windows, no global sequence
_BLOCK = re.compile(r"(^|\.)(layers?|blocks)\.\d+$")  # CLIP layers.N, BERT/DINOv2 layer.N, timm blocks.N


def _split_call(args: tuple, kwargs: dict, name: str) -> tuple[Tensor, Any]:
    """The tensor argument `name` of a module call, wherever it was passed, and a setter for it."""
    if name in kwargs:
        return kwargs[name], lambda x: (args, {**kwargs, name: x})
    return args[0], lambda x: ((x, *args[1:]), kwargs)


class PromptTokens(nn.Module):
    """P learned tokens per transformer block, occupying sequence positions [start, start + P)."""

    def __init__(self, num_blocks: int, num_tokens: int, dim: int, start: int) -> None:
        super().__init__()
        self.num_tokens, self.start = num_tokens, start
        self.tokens = nn.Parameter(torch.randn(num_blocks, num_tokens, dim) * PROMPT_INIT_STD)  # (N, P, D)

    def put(self, h: Tensor, block: int, insert: bool) -> Tensor:
        """h (B, T, D) -> (B, T + P, D) when inserting, else the P prompt positions overwritten."""
        s, p = self.start, self.tokens[block].to(h.dtype).expand(h.shape[0], -1, -1)  # (B, P, D)
        rest = h[:, s:] if insert else h[:, s + self.num_tokens:]
        return torch.cat([h[:, :s], p, rest], dim=1)

    def strip(self, h: Tensor) -> Tensor:
        """(B, T + P, D) -> (B, T, D): the prompt positions dropped."""
        return torch.cat([h[:, :self.start], h[:, self.start + self.num_tokens:]], dim=1)

    # hooks ---------------------------------------------------------------
    def before_block(self, block: int, insert: bool, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        h, with_h = _split_call(args, kwargs, "hidden_states")
        return with_h(self.put(h, block, insert))

    def after_word_embeddings(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        return self.put(out, 0, insert=False)  # the placeholder ids' embeddings become block 0's prompt

    def lengthen_text(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        """input_ids / attention_mask (B, L) -> (B, L + P): P copies of the first id after it."""
        ids, with_ids = _split_call(args, kwargs, "input_ids")
        args, kwargs = with_ids(torch.cat([ids[:, :1], ids[:, :1].expand(-1, self.num_tokens), ids[:, 1:]], 1))
        mask = kwargs.get("attention_mask")
        if mask is not None:
            ones = mask.new_ones(mask.shape[0], self.num_tokens)
            kwargs = {**kwargs, "attention_mask": torch.cat([mask[:, :1], ones, mask[:, 1:]], 1)}
        return args, kwargs

    def strip_output(self, module: nn.Module, args: tuple, out: Any) -> Any:
        if isinstance(out, Tensor):  # timm's final norm
            return self.strip(out)
        out.last_hidden_state = self.strip(out.last_hidden_state)
        return out


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks (CLIP `encoder.layers.N`, BERT/DINOv2 `layer.N`, timm `blocks.N`), in order."""
    blocks = [m for n, m in model.named_modules() if _BLOCK.search(n)]
    if not blocks:
        raise MmretError(f"prefix: found no transformer blocks in {type(model).__name__}; "
                         "prompt tokens need a ViT, CLIP or BERT-like tower")
    return blocks


def _model_width(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    width = getattr(config, "hidden_size", None) or getattr(config, "dim", None) or getattr(model, "embed_dim", None)
    if not width:
        raise MmretError(f"prefix: cannot tell the token width of {type(model).__name__}")
    return int(width)


def _check_sequence_model(model: nn.Module) -> None:
    """Prompt tokens join a sequence every block attends over; a windowed hierarchical tower has none."""
    if getattr(getattr(model, "config", None), "model_type", "") in WINDOWED:
        raise MmretError(f"prefix: {type(model).__name__} is a Swin transformer (CLAP's HTSAT): its blocks attend "
                         "inside local windows of a patch grid that shrinks stage by stage, so there is no sequence "
                         "to add prompt tokens to; adapt it with --method lora or adapter, or prompt only the text "
                         "tower (--tower text)")


def add_prompts(model: nn.Module, modality: str, num_tokens: int) -> PromptTokens:
    """Deep prompt tokens inside `model` (see the module docstring); returns the new module."""
    _check_sequence_model(model)
    blocks = transformer_blocks(model)
    is_timm = callable(getattr(model, "forward_features", None))
    if modality == "text":
        start = 1  # right after [CLS] / start-of-text
    elif is_timm:  # after the class token and any register tokens
        start = model.num_prefix_tokens
    else:  # after the class token (and AST's distillation token) and any register tokens
        start = PREFIX_TOKENS.get(model.config.model_type, 1) + getattr(model.config, "num_register_tokens", 0)
    prompt = PromptTokens(len(blocks), num_tokens, _model_width(model), int(start))
    model.mmret_prompt = prompt.to(next(model.parameters()).device)
    for i, block in enumerate(blocks):
        if i or modality != "text":  # an item tower (a picture or a sound) gets its prompts at block 0 too
            block.register_forward_pre_hook(functools.partial(prompt.before_block, i, i == 0), with_kwargs=True)
    if modality == "text":
        model.register_forward_pre_hook(prompt.lengthen_text, with_kwargs=True)
        model.get_input_embeddings().register_forward_hook(prompt.after_word_embeddings)
    (model.norm if is_timm else model).register_forward_hook(prompt.strip_output)
    return prompt


def text_position_limit(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def prompted_text_length(encoder: nn.Module, num_tokens: int) -> int:
    """The largest max_length (at most the encoder's) that leaves room for P prompt positions."""
    limit = text_position_limit(encoder.model)
    if limit is None or encoder.max_length + num_tokens <= limit:
        return encoder.max_length
    if limit - num_tokens < 2:
        raise MmretError(f"--prefix-tokens {num_tokens} leaves no room for text in {encoder.name}'s {limit} "
                         f"positions; use at most {limit - 2} prefix tokens")
    return limit - num_tokens
