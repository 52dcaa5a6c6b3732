"""Putting trainable parameters inside a loaded pretrained tower, so that only they train
(`requires_grad=True`) and everything else stays frozen; checkpoints then save exactly those
tensors, so a run keeps only what it learned.

- `lora`: peft's LoRA on the attention (or MLP) projections, and its merge for evaluation;
- `prompts`: learned prompt tokens at every block (deep prompt tuning), our own module;
- `bottleneck`: Houlsby bottleneck adapters after attention and MLP, our own module.

Which of them a run uses, and on which tower, is the method's business (`mmret.methods.towers`);
this package holds the layers, the injection into a bare transformers/timm module, and what every
tuned tower shares (`tune`, `covers`, `set_grad_checkpointing`, `use_matmul_attention`).
"""

from __future__ import annotations

import logging
from typing import Callable

from torch import nn

from mmret.errors import MmretError

_logger = logging.getLogger(__name__)


def covers(tower: str, modality: str) -> bool:
    """Whether `--tower text|vision|both` adapts the tower of `modality` (text, or an item tower)."""
    return tower == "both" or tower == ("text" if modality == "text" else "vision")


def tune(model: nn.Module, name: str, inject: Callable[[nn.Module], object], train_base: bool = False) -> nn.Module:
    """Freeze (or with `train_base`, unfreeze) a bare tower's own weights, then `inject` the
    method's parameters into it, in place; a tower is tuned once. Returns it."""
    if getattr(model, "mmret_method", None):
        raise MmretError(f"this tower is already adapted with {model.mmret_method}; load a fresh one")
    model.requires_grad_(train_base)
    inject(model)
    model.mmret_method = name
    return model


def set_grad_checkpointing(encoder: nn.Module, on: bool = True) -> None:
    """Recompute each block's activations during backward instead of keeping them (transformers:
    non-reentrant activation checkpointing, active in train mode; timm: `set_grad_checkpointing`)."""
    model = getattr(encoder, "model", encoder)
    try:
        if callable(getattr(model, "set_grad_checkpointing", None)):  # timm
            model.set_grad_checkpointing(on)
        elif on:
            enable = getattr(model, "activation_checkpointing_enable", None)  # transformers >= 5.x
            if enable is not None:
                enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            disable = getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable
            disable()
    except (ValueError, AssertionError, NotImplementedError, AttributeError) as e:
        raise MmretError(f"{type(model).__name__} does not support gradient checkpointing ({e}); "
                         "train without --grad-checkpointing") from None


def use_matmul_attention(model: nn.Module) -> int:
    """Attention as two matrix products around a softmax, instead of the fused SDPA kernel, in every
    transformers or timm tower inside `model`; returns how many it switched.

    For training on a CPU: there the fused kernel's backward (flash attention) is the slowest part
    of a tower step. Measured on DINOv2-S, LoRA q,v, batch 32, bf16 autocast, one thread of a shared
    machine (`benchmarks/tower_step.py --threads 1`): 10.9 s a step with SDPA, 8.6 s with the matrix
    products (an earlier, quieter run: 5.6 s and 3.6 s of CPU time); the
    products keep the (B, heads, T, T) attention weights for backward, which costs memory."""
    switched = 0
    for module in model.modules():
        config = getattr(module, "config", None)
        hf = callable(getattr(module, "set_attn_implementation", None))
        if hf and getattr(config, "_attn_implementation", None) == "sdpa":
            module.set_attn_implementation("eager")  # transformers' own matmul + softmax attention
            switched += 1
        elif isinstance(getattr(module, "fused_attn", None), bool) and module.fused_attn:  # timm Attention
            module.fused_attn = False
            switched += 1
    return switched
