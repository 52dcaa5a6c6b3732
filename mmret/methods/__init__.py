"""Training methods, one module each, registered by name for `mmret train --method`.

A method says what trains and what stays frozen, and what it reads: `features` methods train a
small part over cached frozen-tower outputs (the towers never run during training); `pixels`
methods run images and tokens through the towers at every step because the towers themselves
are adapted. `build` returns the `DualEncoder` whose trainable parameters are the method's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from mmret.errors import MmretError


@dataclass(frozen=True)
class FeatureDims:
    """Widths of the cached features a features-method is built over."""

    image_dim: int  # pooled image feature D
    image_token_dim: int  # image token state width Dt
    text_dim: int  # pooled caption feature D


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    inputs: str  # features | pixels
    lr: float  # default peak learning rate
    build: Callable[..., nn.Module]  # (RunConfig, FeatureDims or towers) -> DualEncoder
    image_tokens: bool = False  # features methods: read image token states, not pooled features
    context: Callable[[Any], Any] | None = None  # pixels methods: RunConfig -> what `build` takes
    inputs_for: Callable[..., tuple] | None = None  # pixels methods: -> (train transform, eval transform, tokenize)
    trainable: bool = True  # False for a pretrained model evaluated as is (zero-shot)
    save_context: Callable[[Any, Any], None] | None = None  # keep what the context built (a tokenizer) in the run


METHODS: dict[str, Method] = {}


def register_method(name: str, *, help: str, inputs: str, lr: float, image_tokens: bool = False,
                    context: Callable | None = None, inputs_for: Callable | None = None,
                    trainable: bool = True, save_context: Callable | None = None) -> Callable:
    def wrap(build: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        METHODS[name] = Method(name, help, inputs, lr, build, image_tokens, context, inputs_for, trainable,
                               save_context)
        return build

    return wrap


def get_method(name: str, training: bool = False) -> Method:
    if name not in METHODS or (training and not METHODS[name].trainable):
        names = [m.name for m in METHODS.values() if m.trainable or not training]
        raise MmretError(f"unknown method {name!r}; choose one of {', '.join(names)}")
    return METHODS[name]


def method_help() -> str:
    return "; ".join(f"{m.name}: {m.help}" for m in METHODS.values() if m.trainable)


def build_model(cfg: Any, context: Any) -> nn.Module:
    return get_method(cfg.method.method).build(cfg, context)


# importing registers; the order is the order `--help` lists them in
from mmret.methods import heads  # noqa: E402, F401
from mmret.methods import bridge  # noqa: E402, F401
from mmret.methods import lora  # noqa: E402, F401
from mmret.methods import prefix  # noqa: E402, F401
from mmret.methods import adapter  # noqa: E402, F401
from mmret.methods import full  # noqa: E402, F401
from mmret.methods import scratch  # noqa: E402, F401
from mmret.methods import zeroshot  # noqa: E402, F401
