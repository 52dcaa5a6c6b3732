"""Adapting a loaded pretrained tower in place: LoRA, prompt tokens, bottleneck adapters, or all
weights, so that only the method's parameters train (`requires_grad=True`) and everything else
stays frozen. Checkpoints save exactly the trainable tensors, so a run keeps only the adapter.

    apply_peft(encoder, "lora", cfg)        # cfg: MethodConfig (rank, alpha, targets, tower, ...)
    merge_lora(encoder)                     # fold LoRA into the base weights for eval / search
    set_grad_checkpointing(encoder, True)   # recompute block activations in backward

What each method puts inside `encoder.model` (a transformers or timm module), and why:

- `lora`: peft's LoRA, injected with `peft.inject_adapter_in_model`, which keeps the model's own
  class and forward (a `PeftModel` wrapper would not: timm's `forward_features` and the CLIP
  towers' projected outputs must stay reachable). `targets` ("q,v", "q,k,v,o", "mlp") are mapped
  to each architecture's module names by `target_modules`:

      target  CLIP       BERT-like / HF ViT         DINOv2 (transformers 5 | 4)   DistilBERT  timm ViT
      q k v   q_proj...  query key value            q_proj... | query...           q_lin...    qkv
      o       out_proj   attention.output.dense     o_proj | attention.output.dense out_lin    attn.proj
      mlp     mlp.fc1/2  intermediate/output.dense  mlp.fc1/2                      ffn.lin1/2  mlp.fc1/2

  timm fuses q, k and v into ONE Linear `qkv` (D -> 3D). Any of q, k, v selects it, and LoRA then
  adapts the fused matrix: A is r x D and B is 3D x r, so r * 4D per block whatever subset of q, k,
  v was asked for. Separate projections cost r * 2D each: "q,v" is r * 4D per block too (but the
  fused update also moves k), "q,k,v" is r * 6D. A warning says so when the subset is partial.

- `prefix`: learned virtual tokens at the input of every transformer block ("deep" prompt tuning,
  VPT-deep for images; the per-layer counterpart of prefix tuning), P tokens x width per block.
  This is a small module of ours, not peft's: peft's prompt learning for encoders
  (`PeftModelForFeatureExtraction`) prepends prompts to `inputs_embeds` and calls the model
  without `input_ids`, which CLIP's text tower rejects (it pools at the end-of-text token found
  in `input_ids`); it puts the prompts before [CLS], so CLS pooling would read a prompt; it
  lengthens `last_hidden_state` past the caller's attention mask; its prefix tuning feeds
  `past_key_values`, which encoder-only towers do not read; and it has no image (`pixel_values`)
  path at all. Here, text prompts sit right after the first token ([CLS] / start-of-text): the
  input ids are lengthened by P placeholders (copies of the first id, so CLIP's end-of-text
  search is unchanged), whose word embeddings are replaced by the learned tokens; image prompts
  are inserted after the class (and register) tokens at the first block's input. Blocks after
  the first replace the previous block's prompt outputs with their own tokens. Prompt positions
  are dropped from `last_hidden_state` again, so `tokens` and pooling see the usual T positions.
  Text prompts use positions, so `max_length + P` must fit the model's position embeddings
  (`encoder.max_length` is lowered, with a warning, when it would not).

- `adapter`: bottleneck adapters (Houlsby et al. 2019): x + fc2(GELU(fc1(x))), fc2 zero-initialised
  so the tower starts unchanged, after the attention output projection and after the MLP output
  of every block, hooked onto those Linear layers (`<linear>.mmret_adapter`). Our own module:
  AdapterHub's `adapters` (1.3.0, the newest on PyPI) pins transformers~=4.57.6 and would
  downgrade the transformers 5 this project runs on; it also has no timm support.

- `full`: every tower weight trains (the reference row of the parameter table).

Hooks are bound methods of the modules that own the new parameters, so `copy.deepcopy` of a tower
carries them correctly. `adapt_model(model, modality, method, cfg)` is the same thing on a bare
model (e.g. built on the meta device to count parameters without weights).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from typing import Any

import torch
from torch import Tensor, nn

from mmret.config import MethodConfig
from mmret.errors import MmretError

_logger = logging.getLogger(__name__)

METHODS = ("lora", "prefix", "adapter", "full")
TARGETS = ("q", "k", "v", "o", "mlp")
PROMPT_INIT_STD = 0.02  # as the towers' own token embeddings are initialised

# Named recipes a user picks with one flag; keys are MethodConfig fields.
RECIPES: dict[str, dict[str, Any]] = {
    "text-r8": dict(method="lora", tower="text", rank=8, alpha=16.0, targets="q,v", lora_dropout=0.1),
    "both-r64": dict(method="lora", tower="both", rank=64, alpha=128.0, targets="q,k,v", lora_dropout=0.1),
}
RECIPE_HELP = {
    "text-r8": "LoRA r=8, alpha=16 on q and v of the text tower only, dropout 0.1",
    "both-r64": "LoRA r=64, alpha=128 on q, k and v of both towers, dropout 0.1",
}

# target -> the names of that Linear across architectures (matched at the end of a module name)
_TARGET_PATTERNS: dict[str, tuple[str, ...]] = {
    "q": (r"q_proj", r"query", r"q_lin", r"attn\.qkv"),
    "k": (r"k_proj", r"key", r"k_lin", r"attn\.qkv"),
    "v": (r"v_proj", r"value", r"v_lin", r"attn\.qkv"),
    "o": (r"out_proj", r"attention\.o_proj", r"attention\.output\.dense", r"out_lin", r"attn\.proj"),
    "mlp": (r"mlp\.fc[12]", r"intermediate\.dense", r"(?<!attention\.)output\.dense", r"ffn\.lin[12]"),
}
_MLP_OUT = (r"mlp\.fc2", r"(?<!attention\.)output\.dense", r"ffn\.lin2")
_BLOCK = re.compile(r"(^|\.)(layers?|blocks)\.\d+$")  # CLIP layers.N, BERT/DINOv2 layer.N, timm blocks.N


# ---------------------------------------------------------------------------- recipes


def recipe_values(name: str, given: dict[str, Any] | None = None) -> dict[str, Any]:
    """A recipe's settings with the user's own flags (`given`, None: not given) on top.

    A rank given without an alpha drops the recipe's alpha, so alpha follows the rank (2 x rank).
    """
    if name not in RECIPES:
        raise MmretError(f"unknown --recipe {name!r}; choose one of {', '.join(RECIPES)}")
    given = {k: v for k, v in (given or {}).items() if v is not None}
    values = {**RECIPES[name], **given}
    if "rank" in given and "alpha" not in given:
        values["alpha"] = None
    return values


def apply_recipe(cfg: MethodConfig, name: str) -> MethodConfig:
    """`cfg` with recipe `name` applied (validated again)."""
    return dataclasses.replace(cfg, **recipe_values(name))


# ---------------------------------------------------------------------------- target names


def parse_targets(targets: str) -> list[str]:
    keys = [t.strip().lower() for t in targets.split(",") if t.strip()]
    bad = [t for t in keys if t not in TARGETS]
    if bad or not keys:
        raise MmretError(f"--targets {targets!r}: use a comma-separated list of {', '.join(TARGETS)} (e.g. q,v)")
    return keys


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(rf"(^|\.){p}$", name) for p in patterns)


def target_modules(model: nn.Module, targets: str) -> list[str]:
    """Full names of the Linear layers that `targets` ("q,v", "q,k,v,o", "mlp", ...) stand for in
    this architecture; a fused timm `qkv` appears once however many of q, k, v select it."""
    keys = parse_targets(targets)
    linears = _linear_names(model)
    names = [n for n in linears if any(_matches(n, _TARGET_PATTERNS[k]) for k in keys)]
    if not names:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise MmretError(f"--targets {targets} matches no layer of {type(model).__name__} (its Linear layers "
                         f"end in: {', '.join(leaves) or 'none'}); valid targets are {', '.join(TARGETS)} "
                         "for CLIP, BERT-like, DistilBERT, DINOv2 and timm ViT towers")
    fused = [n for n in names if n.endswith("qkv")]
    if fused and set(keys) & {"q", "k", "v"} != {"q", "k", "v"}:
        _logger.warning("%s fuses q, k and v into one Linear (qkv): --targets %s adapts all three together",
                        type(model).__name__, targets)
    return names


# ---------------------------------------------------------------------------- lora


def add_lora(model: nn.Module, cfg: MethodConfig) -> nn.Module:
    """peft LoRA on the target Linear layers, in place; only lora_A / lora_B train."""
    from peft import LoraConfig, inject_adapter_in_model

    names = target_modules(model, cfg.targets)
    config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.lora_dropout,
                        target_modules=names, bias="none")
    return inject_adapter_in_model(config, model)


def merge_lora(encoder: nn.Module) -> int:
    """Fold every LoRA update into its base weight and put the plain layer back, so the tower runs
    at base speed with the same outputs. Returns the number of merged layers (0: no LoRA here).
    Load trained weights before merging: a merged tower has no LoRA parameters left."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    model = getattr(encoder, "model", encoder)
    names = [n for n, m in model.named_modules() if isinstance(m, BaseTunerLayer)]
    for name in names:
        layer = model.get_submodule(name)
        layer.merge(safe_merge=True)  # raises on NaN/inf in the merged weight
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    if names and hasattr(model, "peft_config"):
        del model.peft_config
    return len(names)


# ---------------------------------------------------------------------------- prompt tokens


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


def add_prompts(model: nn.Module, modality: str, num_tokens: int) -> PromptTokens:
    """Deep prompt tokens inside `model` (see the module docstring); returns the new module."""
    blocks = transformer_blocks(model)
    is_timm = callable(getattr(model, "forward_features", None))
    if modality == "text":
        start = 1  # right after [CLS] / start-of-text
    elif is_timm:  # after the class token and any register tokens
        start = model.num_prefix_tokens
    else:
        start = 1 + getattr(model.config, "num_register_tokens", 0)
    prompt = PromptTokens(len(blocks), num_tokens, _model_width(model), int(start))
    model.mmret_prompt = prompt.to(next(model.parameters()).device)
    for i, block in enumerate(blocks):
        if i or modality == "image":
            block.register_forward_pre_hook(functools.partial(prompt.before_block, i, i == 0), with_kwargs=True)
    if modality == "text":
        model.register_forward_pre_hook(prompt.lengthen_text, with_kwargs=True)
        model.get_input_embeddings().register_forward_hook(prompt.after_word_embeddings)
    (model.norm if is_timm else model).register_forward_hook(prompt.strip_output)
    return prompt


def text_position_limit(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def _prompted_text_length(encoder: nn.Module, num_tokens: int) -> int:
    """The largest max_length (at most the encoder's) that leaves room for P prompt positions."""
    limit = text_position_limit(encoder.model)
    if limit is None or encoder.max_length + num_tokens <= limit:
        return encoder.max_length
    if limit - num_tokens < 2:
        raise MmretError(f"--prefix-tokens {num_tokens} leaves no room for text in {encoder.name}'s {limit} "
                         f"positions; use at most {limit - 2} prefix tokens")
    return limit - num_tokens


# ---------------------------------------------------------------------------- bottleneck adapters


class BottleneckAdapter(nn.Module):
    """x + fc2(act(fc1(x))) on (..., in_dim), fc2 zero-initialised: the identity at the start."""

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, in_dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(x)))  # (..., in_dim)

    def after(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        return self(out)


def add_adapters(model: nn.Module, hidden_dim: int) -> list[str]:
    """An adapter after the attention output projection and the MLP output of every block;
    returns the names of the Linear layers that carry one."""
    names = [n for n in _linear_names(model) if _matches(n, _TARGET_PATTERNS["o"] + _MLP_OUT)]
    if not names:
        raise MmretError(f"adapter: found no attention or MLP output layers in {type(model).__name__}; "
                         "adapters need a ViT, CLIP or BERT-like tower")
    for name in names:
        linear = model.get_submodule(name)
        adapter = BottleneckAdapter(linear.out_features, hidden_dim)
        linear.mmret_adapter = adapter.to(device=linear.weight.device, dtype=linear.weight.dtype)
        linear.register_forward_hook(adapter.after)
    return names


# ---------------------------------------------------------------------------- the entry points


def covers(tower: str, modality: str) -> bool:
    """Whether `--tower text|vision|both` adapts the tower of `modality` (image | text)."""
    return tower == "both" or tower == {"image": "vision", "text": "text"}[modality]


def adapt_model(model: nn.Module, modality: str, method: str, cfg: MethodConfig) -> nn.Module:
    """Apply `method` inside a bare transformers/timm tower of `modality`, in place; returns it.
    Ignores `cfg.tower` (apply_peft decides that)."""
    if method not in METHODS:
        raise MmretError(f"method {method!r} does not adapt a pretrained tower; choose one of {', '.join(METHODS)}")
    if getattr(model, "mmret_method", None):
        raise MmretError(f"this tower is already adapted with {model.mmret_method}; load a fresh one")
    model.requires_grad_(method == "full")
    if method == "lora":
        add_lora(model, cfg)
    elif method == "prefix":
        add_prompts(model, modality, cfg.prefix_tokens)
    elif method == "adapter":
        add_adapters(model, cfg.adapter_dim)
    model.mmret_method = method
    return model


def apply_peft(encoder: nn.Module, method: str, cfg: MethodConfig) -> nn.Module:
    """Adapt an `ImageEncoder` / `TextEncoder` in place with lora | prefix | adapter | full; a
    tower that `cfg.tower` does not cover stays frozen. Returns the encoder, whose forward still
    gives `EncoderOutput(pooled, tokens, mask)`."""
    if method not in METHODS:
        raise MmretError(f"method {method!r} does not adapt a pretrained tower; choose one of {', '.join(METHODS)}")
    if not covers(cfg.tower, encoder.modality):
        _logger.info("%s tower %s stays frozen (--tower %s)", encoder.modality, encoder.name, cfg.tower)
        return encoder
    prompted = method == "prefix" and encoder.modality == "text"
    length = _prompted_text_length(encoder, cfg.prefix_tokens) if prompted else None  # raises before any change
    adapt_model(encoder.model, encoder.modality, method, cfg)
    if length is not None and length < encoder.max_length:
        _logger.warning("%s reads at most %d positions: max_length lowered from %d to %d to make room for %d "
                        "prompt tokens", encoder.name, length + cfg.prefix_tokens, encoder.max_length, length,
                        cfg.prefix_tokens)
        encoder.max_length = length
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    _logger.info("%s tower %s: %s, %d trainable parameters", encoder.modality, encoder.name, method, trainable)
    return encoder


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
