"""Embedding a whole source with a model: every item and every caption, normalized, float32 on
the CPU. Validation during training and a run's final embeddings both come from here."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from mmret.models.batch import call, to_device


@torch.inference_mode()
def embed_source(model: nn.Module, source: Any, batch_size: int, device: torch.device,
                 autocast: Callable[[], Any], advance: Callable[[int], Any] | None = None,
                 items: Any = None, captions: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalized embeddings of every item and every caption of a source (or of the `items` and
    `captions` rows, a range or an array: batches start at the first of them), as float32 on the
    CPU; `advance(rows)` is told after each batch (a progress bar). No rows give a (0, D) tensor
    ((0, 0) when D is unknown)."""
    was_training = model.training
    model.eval()

    def embed(encode: Callable, batches: Any) -> list[torch.Tensor]:
        out = []
        for x in batches:
            out.append(call(encode, to_device(x, device)).float().cpu())
            if advance is not None:
                advance(len(out[-1]))
        return out

    with autocast():
        item_parts = embed(model.encode_item, _rows(source.iter_items, batch_size, items))
        texts = embed(model.encode_text, _rows(source.iter_texts, batch_size, captions))
    model.train(was_training)
    dim = next((t.shape[1] for t in item_parts + texts), 0)
    return tuple(torch.cat(parts) if parts else torch.zeros(0, dim) for parts in (item_parts, texts))


def _rows(iterate: Callable, batch_size: int, rows: Any):
    return iterate(batch_size) if rows is None else iterate(batch_size, rows)  # a stand-in source may take no rows


def move_real(module: nn.Module, device: torch.device | str) -> nn.Module:
    """`module.to(device)` for every part that has real tensors; parts built on the meta device (a
    tower a query does not need) stay where they are. In place; returns the module."""
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    if not any(t.is_meta for t in tensors):
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = nn.Parameter(p.to(device), requires_grad=p.requires_grad)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = b.to(device)
    for child in module.children():
        move_real(child, device)
    return module
