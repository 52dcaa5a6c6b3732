"""`--format sentence-transformers`: the text side as a folder `SentenceTransformer(folder)` loads:
the text tower (a transformers model: frozen, fine-tuned, or with its LoRA merged into its weights),
its pooling (mean over real tokens, or the first token), the head as `Dense` layers (the input norm
folded into the first one), and `Normalize`.

What cannot be written that way is refused in one line: a tower trained from scratch (mmret's own
Linformer or CLIP modules), prefix and adapter layers (mmret's own modules inside the tower, which
sentence-transformers' `Transformer` cannot hold), and a CLIP or CLAP's projected text embedding
(pooling `proj`: sentence-transformers pools token states, and the projection sits after them)."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmret.errors import MmretError
from mmret.export.registry import Exporter, register_export

USAGE = '''```python
from sentence_transformers import SentenceTransformer

model = SentenceTransformer(".")  # this folder
queries = model.encode(["a dog on the beach"])  # (1, dim), normalized; the item side: --format onnx
```'''


def _st_modules() -> Any:
    try:
        from sentence_transformers.sentence_transformer import modules  # sentence-transformers 6
    except ImportError:
        from sentence_transformers import models as modules
    return modules


def text_side(model: Any) -> tuple[Any, nn.Module]:
    """(the text tower with its weights, the trained part after it) of a run whose text side is a
    transformers tower followed by a head."""
    from mmret.encoders import TextEncoder
    from mmret.models.towers import EncoderTower

    ctx, dual = model.run.model(("text",))
    frozen = model.run.method.frozen_tower(model.config, ctx, "text", model.device)
    side = getattr(dual, "text_tower", None)  # a model trained from scratch has its own layout
    encoder, head = (frozen[0], side) if frozen else (getattr(side, "encoder", None), getattr(side, "head", None))
    if not isinstance(encoder, TextEncoder) or (not frozen and not isinstance(side, EncoderTower)):
        raise MmretError(f"run {model.name} ({model.method}) has no transformers text tower (a model trained from "
                         "scratch is mmret's own): sentence-transformers cannot load it; use --format onnx")
    if encoder.pooling not in ("mean", "cls"):
        raise MmretError(f"the text tower of run {model.name} ({encoder.name}) ends in its own projection (pooling "
                         f"{encoder.pooling}), which sentence-transformers' pooling cannot hold; use --format onnx")
    if getattr(encoder.model, "mmret_method", None) in ("prefix", "adapter"):
        raise MmretError(f"run {model.name} puts {encoder.model.mmret_method} layers inside its text tower: they are "
                         "mmret's own modules, which sentence-transformers cannot load; use --format onnx")
    return encoder, head


def merged(inner: nn.Module) -> nn.Module:
    """A copy of a tower with every peft LoRA layer merged into its base layer and unwrapped."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = copy.deepcopy(inner)
    for name, module in list(out.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent) if parent else out, child, module.get_base_layer())
    for attr in ("peft_config", "mmret_method"):
        if attr in out.__dict__:
            delattr(out, attr)
    return out


def dense_layers(head: nn.Module | None) -> list[tuple[torch.Tensor, torch.Tensor, nn.Module]]:
    """The head as (weight, bias, activation) of Linear layers: an `InputNorm` before them folded
    into the first (W·(x·s + t) + b = (W·diag(s))·x + (W·t + b))."""
    from mmret.models.heads import InputNorm, ProjectionHead

    parts = list(head) if isinstance(head, nn.Sequential) else [head] if head is not None else []
    norm = next((p for p in parts if isinstance(p, InputNorm)), None)
    proj = next((p for p in parts if isinstance(p, ProjectionHead)), None)
    if proj is None or any(not isinstance(p, (InputNorm, ProjectionHead, nn.Identity)) for p in parts):
        raise MmretError("the text side's head is not an input norm and a projection head; use --format onnx")
    linears = [m for m in proj.hidden if isinstance(m, nn.Linear)] + [proj.proj]
    out = []
    for i, layer in enumerate(linears):
        weight, bias = layer.weight.detach().float().cpu(), layer.bias.detach().float().cpu()
        if i == 0 and norm is not None:
            scale, shift = norm.scale.detach().float().cpu(), norm.shift.detach().float().cpu()
            weight, bias = weight * scale[None, :], bias + weight @ shift
        out.append((weight, bias, nn.GELU() if i < len(linears) - 1 else nn.Identity()))
    return out


def write(model: Any, folder: Path) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    modules = _st_modules()
    encoder, head = text_side(model)
    hf = folder / ".transformer"
    merged(encoder.model).save_pretrained(str(hf))
    encoder.tokenizer.save_pretrained(str(hf))
    parts: list[nn.Module] = [modules.Transformer(str(hf), max_seq_length=encoder.max_length),
                              modules.Pooling(encoder.dim, pooling_mode=encoder.pooling)]
    for weight, bias, act in dense_layers(head):
        parts.append(modules.Dense(weight.shape[1], weight.shape[0], activation_function=act, init_weight=weight,
                                   init_bias=bias))
    parts.append(modules.Normalize())
    SentenceTransformer(modules=parts, device="cpu").save(str(folder))
    shutil.rmtree(hf)
    return {"files": {"modules.json": "the text side as sentence-transformers modules: the tower (config.json, "
                                      "model.safetensors, tokenizer files), 1_Pooling, the head as Dense layers, "
                                      "Normalize"}, "usage": USAGE}


register_export(Exporter("sentence-transformers", "the text side as a sentence-transformers folder", write))
