"""What a training method is: one object that owns everything in which methods differ.

A method says what it reads (cached frozen-tower outputs, or files and tokens), which side is read
from the feature cache, how to build its model and from what (`open` gives that context: the
frozen towers, their widths, a tokenizer), how a search query becomes the model's input, which
parts are frozen, and the input shapes memory probing needs. Each method has its own config
dataclass (as peft gives each tuner its own), holding what it shares with every method
(`MethodConfig`) and its own settings. Everything outside `mmret.methods` asks the method; nothing
there branches on which method it is.

A method registers itself (`mmret.methods.registry.register_method`) when its module is imported;
`mmret.methods.catalog` names the built-in ones and imports them when one is first asked for. A
method defined anywhere (a test file, a plugin) registers the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from mmret.methods.config import MethodConfig

if TYPE_CHECKING:  # torch is imported by the methods themselves, so that the registry's names cost nothing
    import torch
    from torch import nn


@dataclass(frozen=True)
class FeatureDims:
    """Widths of the cached features a features-method is built over."""

    item_dim: int  # pooled item feature D
    item_token_dim: int  # item token state width Dt
    text_dim: int  # pooled caption feature D


@dataclass(frozen=True)
class Inputs:
    """The shapes of one training pair as the method reads it (for memory probing)."""

    item: tuple[int, ...]  # one item row: pooled feature (D,), token states (T, Dt), pixels (3, H, W), ...
    text: tuple[int, ...] | None  # one caption's pooled feature (D,), or None for token ids
    length: int = 0  # token ids per caption (padded to the longest allowed: the worst case)
    vocab: int = 2  # ids are drawn below this

    def make(self, n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, Any]:
        """A batch of `n` pairs: random values of the right shapes (token ids below `vocab`, no padding)."""
        return self.items(n, device), self.texts(n, device)

    def items(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        import torch

        return torch.randn(n, *self.item, device=device)

    def texts(self, n: int, device: torch.device | str = "cpu") -> Any:
        import torch

        if self.text is not None:
            return torch.randn(n, *self.text, device=device)
        ids = torch.randint(0, self.vocab, (n, self.length), device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def row_bytes(self) -> int:
        text = 4 * math.prod(self.text) if self.text is not None else 2 * 8 * self.length
        return 4 * math.prod(self.item) + text


@dataclass(frozen=True)
class FrozenPart:
    """A pretrained tower that is not part of the trained model (its outputs are cached)."""

    label: str  # e.g. "image encoder (dinov2-small, frozen)": the tower's modality names it
    parameters: int


SIDES = ("item", "text")  # the item side (a picture or a sound) and the caption side


class Method:
    """Base of every method. Subclasses set the class attributes and implement `open`, `sources`,
    `build`, `query_loader`, `tokenizer` and `item_input`; the rest has defaults that fit most."""

    name: str = ""
    help: str = ""  # one line for `--method`'s help (a built-in's is in `mmret.methods.catalog`, read without torch)
    lr: float = 1e-3  # default peak learning rate
    config: type[MethodConfig] = MethodConfig
    trainable: bool = True  # False for a pretrained model evaluated as is (zero-shot)
    runs_towers: bool = False  # pretrained towers (or whole models) run at every step
    towers: bool = True  # built on pretrained towers (--vision / --audio and --text, or --model)
    checkpointable: bool = False  # --grad-checkpointing changes something
    sample_size: int = 128  # rows `init_heads` draws from a training source to start the input norms

    # -- what the model is built from, and what it reads
    def open(self, cfg: Any, dataset: Any = None, run_dir: Any = None, *, weights: bool = True,
             need: tuple[str, ...] = SIDES) -> Any:
        """What `build` takes: frozen towers (on the meta device unless needed with `weights`), their
        widths, a tokenizer. `dataset` (the run's tables, or None) is where a tokenizer may be
        trained; `run_dir` where a saved one is found."""
        raise NotImplementedError

    def sources(self, cfg: Any, ctx: Any, dataset: Any, splits: tuple[str, ...], device: torch.device,
                reporter: Any) -> list[Any]:
        """A source for each of `splits` of `dataset` (see `mmret.data.pairs`); feature caches
        the method reads are computed on the way."""
        raise NotImplementedError

    def build(self, cfg: Any, ctx: Any) -> nn.Module:
        """The model: `encode_item`, `encode_text`, `logit_scale_for`, `clamp_logit_scale_`."""
        raise NotImplementedError

    def save(self, ctx: Any, run_dir: Any) -> None:
        """Keep in a new run's folder what `open` made that the run needs again (a tokenizer)."""

    def cached_sides(self, cfg: Any) -> tuple[str, ...]:
        """The sides whose frozen towers never run in training: their outputs come from the cache."""
        return ()

    # -- search queries, the Python API and exports
    def query_loader(self, cfg: Any, ctx: Any) -> Any:
        """The `ItemLoader` that turns one query item (a file; its `decode` and `transform` also
        serve items given in memory) into the preprocessed tensor the item side reads."""
        raise NotImplementedError

    def tokenizer(self, cfg: Any, ctx: Any) -> Callable[[list[str]], dict[str, torch.Tensor]]:
        """Captions -> the text side's token ids and attention mask (B, L)."""
        raise NotImplementedError

    def standalone_tokenizer(self, cfg: Any, ctx: Any) -> Any:
        """The same tokenizer as a `tokenizers.Tokenizer` that needs nothing of mmret: the same ids,
        truncation and padding (exports save it as tokenizer.json)."""
        raise NotImplementedError

    def item_input(self, cfg: Any, ctx: Any) -> str:
        """The keyword the item side's raw batch (what `query_loader` makes, stacked) goes in by."""
        raise NotImplementedError

    def frozen_tower(self, cfg: Any, ctx: Any, side: str, device: torch.device) -> tuple[nn.Module, str] | None:
        """For a side whose frozen tower stands outside the model (its outputs are cached): the tower
        with its weights on `device`, and which of its outputs the model reads (pooled | tokens)."""
        return None

    def query_inputs(self, cfg: Any, ctx: Any, side: str, device: torch.device) -> Callable[[Any], Any]:
        """A function to the model's input for `side`: from captions (`text`), or from a stacked
        batch of preprocessed items, (B, ...) as `query_loader` makes them (`item`)."""
        from mmret.methods.queries import encode_with_tower

        frozen = self.frozen_tower(cfg, ctx, side, device)
        tokenize = self.tokenizer(cfg, ctx) if side == "text" else None
        name = self.item_input(cfg, ctx) if side == "item" else None

        def inputs(queries: Any) -> Any:
            raw = ({k: v.to(device) for k, v in tokenize(list(queries)).items()} if tokenize is not None
                   else {name: queries.to(device)})
            return getattr(encode_with_tower(frozen[0], raw, device), frozen[1]) if frozen is not None else raw

        return inputs

    def vocabulary(self, cfg: Any, ctx: Any) -> set[str] | None:
        """The words a run's text side learned, when it learned no others (a model trained from
        scratch knows only the words of its training captions), lower-cased; None for a pretrained
        text tower, which knows words beyond them."""
        return None

    # -- memory probing and the parameter table
    def input_shapes(self, cfg: Any, ctx: Any, num_tokens: Callable[[nn.Module], int]) -> Inputs:
        """The shapes of one training pair; `num_tokens(tower)` counts an item tower's token states."""
        raise NotImplementedError

    def shapes_config(self, cfg: Any) -> Any:
        """`cfg` as built for shapes alone (memory probing): nothing that would fetch weights."""
        return cfg

    def batch_transform(self, cfg: Any) -> Callable | None:
        """An augmentation of each training batch, `(items, texts, generator) -> (items, texts)`, or None."""
        return None

    def frozen_parts(self, cfg: Any, ctx: Any) -> list[FrozenPart]:
        """Frozen towers outside the model, for the parameter table."""
        return []

    def memory_cuts(self, cfg: Any) -> list[str]:
        """What this method could change to need less memory, for the nothing-fits line."""
        return []

    def memory_notes(self, cfg: Any) -> list[str]:
        """What the memory estimate leaves out and why."""
        return []
