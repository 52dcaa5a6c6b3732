"""probe-memory: how much memory one training step of a configuration needs, and which
configuration fits a memory budget.

The candidates are every micro-batch size (the batch, its half, quarter, ... down to 1), every
precision (fp32, bf16, fp16) and, for methods that run the towers, gradient checkpointing on and
off. Whether the frozen towers' outputs are cached is decided by the method, as `mmret train`
does it: heads and bridge always train from cached features, so their estimate has no towers at
all; lora, prefix, adapter, full and scratch run pixels and tokens through the towers at every
step (train has no cache for a frozen tower's outputs, so no such candidate is offered).

Two ways to get the numbers:

- `measure` (a CUDA GPU): real training steps on synthetic batches of the right shapes, peak from
  `torch.cuda.max_memory_allocated`, out-of-memory errors caught; a binary search finds the
  largest micro-batch per (precision, checkpointing) that fits with the safety margin.
- `estimate` (no GPU, or planning for another one): the towers are built from their configs on the
  meta device (no weights are read or allocated), turned into fake tensors
  (`torch._subclasses.fake_tensor.FakeTensorMode`: shapes, dtypes and storages, no data), and one
  step of `mmret.train.train_step` runs under `LiveBytes`, a dispatch mode that counts the bytes of
  every tensor storage while it is alive (weak references see the frees) and keeps the largest
  total. Every candidate is its own step (with gradient caching: one micro-batch's step plus what
  grows with the batch, see `Probe.step`). Kernels are the CPU's (fake
  tensors carry the CPU's autocast rules and attention kernels); a CUDA allocator rounds every
  block up to 512 bytes, which the estimate adds.

Each candidate's peak is the largest of three phases of `mmret train`: setting up the input norms
(a sample of training inputs on the device, before the optimizer has state), one optimizer step at
steady state (AdamW moments exist, gradients are allocated during backward), and the evaluation
pass over a whole batch with the gradients of the last step still alive. It is split into weights
(parameters and buffers, frozen or not, as stored), gradients, optimizer state, activations (the
batch's inputs and every tensor made in the forward pass still alive at the peak: what backward
keeps) and workspace (temporaries of backward, of the optimizer step, and activations recomputed
under gradient checkpointing).

A candidate fits when its peak plus `MARGIN` stays within the budget less what the CUDA context
takes outside PyTorch's allocator (measured on a GPU; `CUDA_CONTEXT_GIB` assumed otherwise). The
recommendation is the fastest that fits: mixed precision before fp32 (tensor cores), then the
fewest forward passes per step (gradient caching with a micro-batch below the batch and gradient
checkpointing each add one), then the largest micro-batch.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import math
import weakref
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mmret.config import RunConfig
from mmret.errors import MmretError
from mmret.progress import NULL, Reporter

_logger = logging.getLogger(__name__)

GiB = 2**30
MARGIN = 0.10  # headroom on top of a peak: allocator fragmentation, and the estimate's own error
CUDA_CONTEXT_GIB = 0.5  # what the CUDA context (kernels, cuBLAS/cuDNN handles) takes outside the allocator
CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to a multiple of this
CATEGORIES = ("weights", "gradients", "optimizer", "activations", "workspace")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ESTIMATED = ("estimated: one training step per candidate on fake tensors (no weights allocated), live tensor "
             "bytes counted at the dispatcher")


# ---------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Candidate:
    micro_batch: int  # pairs per forward pass (the batch size: no gradient caching)
    precision: str  # fp32 | bf16 | fp16
    grad_checkpointing: bool
    cached: bool  # the frozen towers' outputs come from the feature cache (heads, bridge)

    def passes(self, batch_size: int) -> int:
        """Forward passes per step: gradient caching and checkpointing each add one."""
        return 1 + (self.micro_batch < batch_size) + self.grad_checkpointing


@dataclass
class Breakdown:
    """Bytes alive at a peak, by what they hold; `total` is the peak."""

    weights: int = 0
    gradients: int = 0
    optimizer: int = 0
    activations: int = 0
    workspace: int = 0

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.workspace

    @classmethod
    def of(cls, counts: dict[str, int]) -> "Breakdown":
        return cls(**{k: int(counts.get(k, 0)) for k in CATEGORIES})


@dataclass
class Row:
    candidate: Candidate
    step: Breakdown | None  # the training step's peak, split; None: out of memory (measured)
    phases: dict[str, int | None]  # peak bytes of each phase: setup, step, eval (None: out of memory)
    fits: bool

    @property
    def peak(self) -> int | None:
        """The largest phase's peak; None when a phase ran out of memory."""
        values = list(self.phases.values())
        return None if any(v is None for v in values) else max(values)

    @property
    def phase(self) -> str:
        """Where the peak is: setup | step | eval (or the phase that ran out of memory)."""
        missing = [k for k, v in self.phases.items() if v is None]
        return missing[0] if missing else max(self.phases, key=lambda k: self.phases[k])


@dataclass
class MemoryReport:
    method: str
    batch_size: int
    vram: float  # the budget in GiB
    usable: int  # bytes a peak plus the margin may take
    how: str  # estimated ... | measured ...
    rows: list[Row]
    best: Row | None
    config: RunConfig  # the run configuration, with the best candidate's settings when one fits
    notes: list[str] = field(default_factory=list)


def needed(peak: int) -> int:
    """Bytes a peak claims from the budget: the peak plus the safety margin."""
    return math.ceil(peak * (1 + MARGIN))


# ---------------------------------------------------------------------------- live tensor bytes


def _storages(out: Any) -> Iterator[torch.UntypedStorage]:
    for t in tree_flatten(out)[0]:
        if isinstance(t, torch.Tensor):
            yield t.untyped_storage()


def _is_fake(args: tuple) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return any(isinstance(a, FakeTensor) for a in args)


class LiveBytes(TorchDispatchMode):
    """Counts the bytes of every tensor storage alive, by category, and the largest total.

    Storages existing on entry are registered as weights (the model's parameters and buffers),
    gradients and optimizer state; every storage an operation returns afterwards is new: made in
    backward (the autograd engine is running) or in the optimizer's step it counts as workspace,
    otherwise as activations, and a gradient that autograd stores into `.grad` moves to gradients.
    A weak reference per storage takes its bytes off when it is freed. `peak` is the largest total
    seen and `at_peak` its split; `at_backward` is the split when backward starts (what the forward
    pass left alive for it).

    On fake tensors, reading a value (`.item()`, `bool(t)`) has no data to read: it answers 1, so
    a loss passes its finiteness check and an all-ones mask reads as all ones.
    """

    def __init__(self, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None,
                 block: int = 1) -> None:
        super().__init__()
        self.block = block  # round each storage up to this (the CUDA allocator's 512)
        self.bytes = dict.fromkeys(CATEGORIES, 0)
        self.live: dict[int, tuple[weakref.ref, str, int]] = {}
        self.peak, self.at_peak, self.at_backward = 0, dict(self.bytes), None
        self.category = "activations"  # of new storages outside backward
        self._hooks: list[Any] = []
        if model is not None:
            self._register_model(model)
        if optimizer is not None:
            self._register_optimizer(optimizer)
        self._mark_peak()

    # -- registration ---------------------------------------------------
    def add(self, storage: torch.UntypedStorage, category: str) -> None:
        key = id(storage)
        if key in self.live:
            return
        nbytes = -(-storage.nbytes() // self.block) * self.block
        self.live[key] = (weakref.ref(storage, lambda _, k=key: self._free(k)), category, nbytes)
        self.bytes[category] += nbytes

    def move(self, storage: torch.UntypedStorage, category: str) -> None:
        entry = self.live.get(id(storage))
        if entry is None:
            self.add(storage, category)
        elif entry[1] != category:
            self.bytes[entry[1]] -= entry[2]
            self.bytes[category] += entry[2]
            self.live[id(storage)] = (entry[0], category, entry[2])

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.bytes[entry[1]] -= entry[2]

    def _register_model(self, model: nn.Module) -> None:
        for t in [*model.parameters(), *model.buffers()]:
            self.add(t.untyped_storage(), "weights")
        for p in model.parameters():
            if p.grad is not None:
                self.add(p.grad.untyped_storage(), "gradients")
            if p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._on_grad))

    def _register_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        for state in optimizer.state.values():
            for value in state.values():
                if isinstance(value, torch.Tensor):
                    self.add(value.untyped_storage(), "optimizer")
        # the step's temporaries (foreach AdamW keeps a whole copy of the moments for a moment)
        self._hooks.append(optimizer.register_step_pre_hook(lambda *_: setattr(self, "category", "workspace")))
        self._hooks.append(optimizer.register_step_post_hook(lambda *_: setattr(self, "category", "activations")))

    def _on_grad(self, param: torch.Tensor) -> None:
        self.move(param.grad.untyped_storage(), "gradients")

    # -- accounting -----------------------------------------------------
    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def _mark_peak(self) -> None:
        total = self.total
        if total > self.peak:
            self.peak, self.at_peak = total, dict(self.bytes)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default and _is_fake(args):
            return {torch.bool: True}.get(args[0].dtype, 1.0 if args[0].is_floating_point() else 1)
        out = func(*args, **(kwargs or {}))
        in_backward = torch._C._current_graph_task_id() != -1
        if in_backward and self.at_backward is None:
            self.at_backward = dict(self.bytes)
        category = "workspace" if in_backward else self.category
        for storage in _storages(out):
            self.add(storage, category)
        self._mark_peak()
        return out

    def __exit__(self, *exc: Any) -> None:
        for hook in self._hooks:
            hook.remove()
        super().__exit__(*exc)

    def breakdown(self) -> Breakdown:
        return Breakdown.of(self.at_peak)


# ---------------------------------------------------------------------------- towers without weights


@dataclass(frozen=True)
class Architecture:
    """What a preset tower is built from when only its shapes matter (the presets of `mmret.encoders`)."""

    library: str  # timm | transformers
    name: str  # timm model name, or transformers model_type
    options: dict = field(default_factory=dict)  # create_model arguments (timm) or config values (transformers)
    pooling: str | None = None  # as the preset pools (None: the library's default)
    image_size: int = 224  # the side the preset's preprocessing crops to


_CLIP_TEXT = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                  num_attention_heads=8, max_position_embeddings=77)
_CLIP_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                    image_size=224)
# the published configs of the checkpoints each preset stands for
ARCHITECTURES: dict[str, Architecture] = {
    "dino-vits16": Architecture("timm", "vit_small_patch16_224"),
    "dinov2-vits14": Architecture("transformers", "dinov2", dict(
        hidden_size=384, num_hidden_layers=12, num_attention_heads=6, patch_size=14, image_size=518, mlp_ratio=4,
        layerscale_value=1.0), "cls"),
    "distilbert": Architecture("transformers", "distilbert", {}, "cls"),  # DistilBertConfig() is distilbert-base
    "minilm": Architecture("transformers", "bert", dict(
        hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536), "mean"),
    "clip-b32": Architecture("transformers", "clip", dict(
        text_config=_CLIP_TEXT, vision_config={**_CLIP_VISION, "patch_size": 32}, projection_dim=512), "proj"),
    "clip-b16": Architecture("transformers", "clip", dict(
        text_config=_CLIP_TEXT, vision_config={**_CLIP_VISION, "patch_size": 16}, projection_dim=512), "proj"),
}


def _config_folder(name: str) -> Path:
    """A local folder holding `name`'s config.json: the folder itself, or the hub's config files only."""
    from mmret.encoders import _CONFIG_FILES, _HUB_ID, _hub_timeouts, _snapshot

    path = Path(name).expanduser()
    if path.is_dir():
        return path.absolute()
    if not _HUB_ID.match(name):
        raise MmretError(f"unknown encoder {name!r}: use a preset ({', '.join(ARCHITECTURES)}), a hub id such as "
                         "owner/name, or a local model folder")
    repo_id, _, revision = name.partition("@")
    for local_only in (True, False):
        try:
            with _hub_timeouts():
                return _snapshot(repo_id, revision or None, local_only, _CONFIG_FILES)
        except Exception as e:  # noqa: BLE001 - any hub failure means the same thing here
            _logger.debug("config of %s (local_only=%s): %s", repo_id, local_only, e)
    raise MmretError(f"cannot read the architecture of {name!r}: its config.json is neither in the local Hugging Face "
                     "cache nor reachable on the hub; pass a preset or a local model folder (weights not needed)")


def _architecture(name: str) -> tuple[Architecture, Path | None]:
    """The architecture of a preset, `timm:NAME`, local folder or hub id, and its folder if any."""
    from mmret.encoders import ENCODERS, _read_config

    if name in ARCHITECTURES:
        return ARCHITECTURES[name], None
    if name.startswith("timm:"):
        return Architecture("timm", name[len("timm:"):]), None
    folder = _config_folder(ENCODERS[name].source if name in ENCODERS else name)  # a preset added since
    config = _read_config(folder)
    if "architecture" in config:
        return Architecture("timm", f"local-dir:{folder}"), folder
    if "model_type" not in config:
        raise MmretError(f"{folder / 'config.json'} names neither a transformers model_type nor a timm architecture")
    return Architecture("transformers", config["model_type"]), folder


def _hf_config(arch: Architecture, folder: Path | None) -> Any:
    from transformers import AutoConfig

    if folder is not None:
        return AutoConfig.from_pretrained(folder)
    return AutoConfig.for_model(arch.name, **arch.options)


def _source(name: str, arch: Architecture) -> Any:
    from mmret.encoders import ModelSource

    return ModelSource(name, arch.library, "architecture only")


def _is_clip(arch: Architecture, folder: Path | None, tower: str) -> bool:
    from mmret.encoders import _is_clip as is_clip
    from mmret.encoders import _read_config

    return is_clip(_read_config(folder) if folder else {"model_type": arch.name}, tower)


def skeleton_image_encoder(name: str) -> nn.Module:
    """The image tower `name` (preset, `timm:NAME`, folder or hub id) on the meta device: the same
    wrapper, pooling and input size as `load_image_encoder` gives, without reading any weights."""
    arch, folder = _architecture(name)
    with torch.device("meta"):
        return _timm_image(name, arch) if arch.library == "timm" else _hf_image(name, arch, folder)


def _timm_image(name: str, arch: Architecture) -> nn.Module:
    import timm

    from mmret.encoders import TimmImageEncoder, preprocess_from_timm

    try:
        model = timm.create_model(arch.name, pretrained=False, num_classes=0, **arch.options)
    except (RuntimeError, ValueError, KeyError, OSError, TypeError) as e:
        raise MmretError(f"cannot build timm model {name!r}: {str(e).splitlines()[0]}") from None
    pool = getattr(model, "global_pool", None)
    pool = pool if isinstance(pool, str) else type(pool).__name__
    dim = getattr(model, "head_hidden_size", None) or model.num_features
    return TimmImageEncoder(model, _source(name, arch), preprocess_from_timm(model), dim, model.num_features,
                            f"timm:{pool}")


def _hf_image(name: str, arch: Architecture, folder: Path | None) -> nn.Module:
    from transformers import AutoModel, CLIPVisionModelWithProjection

    from mmret.encoders import ImagePreprocess, TransformersImageEncoder, _accepts, _size_pair, preprocess_from_hf

    config = _hf_config(arch, folder)
    clip = _is_clip(arch, folder, "vision")
    if clip:
        vision = config.vision_config if arch.name == "clip" else config
        vision.projection_dim = getattr(config, "projection_dim", vision.projection_dim)
        model, pooling = CLIPVisionModelWithProjection(vision), arch.pooling or "proj"
    else:
        vision, model, pooling = config, AutoModel.from_config(config), arch.pooling or "cls"
    if folder is not None:
        pre = preprocess_from_hf(folder, "clip" if clip else arch.name)
    else:
        side = arch.image_size
        pre = ImagePreprocess((side, side), side, "bicubic", (0.5,) * 3, (0.5,) * 3, "architecture only")
    dim = vision.projection_dim if pooling == "proj" else vision.hidden_size
    native = getattr(vision, "image_size", None)
    interpolate = bool(native) and _size_pair(native) != pre.size and _accepts(model, "interpolate_pos_encoding")
    return TransformersImageEncoder(model, _source(name, arch), pre, dim, vision.hidden_size, pooling,
                                    interpolate=interpolate)


def skeleton_text_encoder(name: str, max_length: int | None = None) -> nn.Module:
    """The text tower `name` on the meta device (no tokenizer: token ids are made up to `max_length`)."""
    from transformers import AutoModel, CLIPTextModelWithProjection

    from mmret.encoders import DEFAULT_MAX_LENGTH, TextEncoder, _sentence_transformers_pooling

    arch, folder = _architecture(name)
    if arch.library != "transformers":
        raise MmretError(f"{name} is a timm image model, not a text encoder")
    config = _hf_config(arch, folder)
    with torch.device("meta"):
        if _is_clip(arch, folder, "text"):
            text = config.text_config if arch.name == "clip" else config
            text.projection_dim = getattr(config, "projection_dim", text.projection_dim)
            model, pooling = CLIPTextModelWithProjection(text), arch.pooling or "proj"
        else:
            text, model = config, AutoModel.from_config(config)
            pooling = arch.pooling or (folder and _sentence_transformers_pooling(folder)) or "mean"
    limits = [getattr(text, "max_position_embeddings", None), _tokenizer_limit(folder)]
    max_length = min([max_length or DEFAULT_MAX_LENGTH] + [x for x in limits if x and x < 1_000_000])
    dim = text.projection_dim if pooling == "proj" else text.hidden_size
    return TextEncoder(model, None, _source(name, arch), dim, text.hidden_size, pooling, max_length)


def _tokenizer_limit(folder: Path | None) -> int | None:
    path = folder / "tokenizer_config.json" if folder else None
    if path is None or not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8")).get("model_max_length")


def skeleton_towers(cfg: RunConfig) -> Any:
    """`mmret.methods.towers.load_towers` without weights: both towers on the meta device."""
    from mmret.methods.towers import Towers, frozen_side

    vision = cfg.encoders.model or cfg.encoders.vision
    text = cfg.encoders.model or cfg.encoders.text
    return Towers(skeleton_image_encoder(vision), skeleton_text_encoder(text, cfg.encoders.max_length),
                  frozen_side(cfg))


# ---------------------------------------------------------------------------- the model and its inputs


@dataclass(frozen=True)
class Inputs:
    """The shapes of one training pair as the method reads it."""

    image: tuple[int, ...]  # one image row: pooled feature (D,), token states (T, Dt), or pixels (3, H, W)
    text: tuple[int, ...] | None  # one caption's pooled feature (D,), or None for token ids
    length: int = 0  # token ids per caption (padded to the longest allowed: the worst case)
    vocab: int = 2  # ids are drawn below this

    def make(self, n: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, Any]:
        """A batch of `n` pairs: random values of the right shapes (token ids below `vocab`, no padding)."""
        return self.images(n, device), self.texts(n, device)

    def images(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        return torch.randn(n, *self.image, device=device)

    def texts(self, n: int, device: torch.device | str = "cpu") -> Any:
        if self.text is not None:
            return torch.randn(n, *self.text, device=device)
        ids = torch.randint(0, self.vocab, (n, self.length), device=device)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def row_bytes(self) -> int:
        text = 4 * math.prod(self.text) if self.text is not None else 2 * 8 * self.length
        return 4 * math.prod(self.image) + text


def to_fake(module: nn.Module, mode: Any, device: str = "cpu") -> nn.Module:
    """Replace every parameter and buffer of a meta-device module by a fake tensor on `device`
    (same shape, stride, dtype, requires_grad; tied tensors stay tied). In place; returns it."""
    memo: dict[int, torch.Tensor] = {}
    with mode:
        for m in module.modules():
            for registry, is_param in ((m._parameters, True), (m._buffers, False)):
                for name, t in registry.items():
                    if t is None:
                        continue
                    if id(t) not in memo:
                        new = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
                        memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if is_param else new
                    registry[name] = memo[id(t)]
    return module


def _fake_mode() -> Any:
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def _token_count(encoder: nn.Module) -> int:
    """T of an image tower's token states, from one fake forward pass."""
    mode = _fake_mode()
    to_fake(encoder, mode)
    with mode, LiveBytes(), torch.no_grad():
        return encoder(torch.zeros(1, 3, *encoder.image_size)).tokens.shape[1]


def _features_context(cfg: RunConfig, method: Any) -> tuple[Any, Inputs]:
    from mmret.methods import FeatureDims

    image = skeleton_image_encoder(cfg.encoders.vision)
    text = skeleton_text_encoder(cfg.encoders.text, cfg.encoders.max_length)
    rows = (_token_count(image), image.token_dim) if method.image_tokens else (image.dim,)
    return FeatureDims(image.dim, image.token_dim, text.dim), Inputs(rows, (text.dim,))


def _scratch_context(cfg: RunConfig) -> tuple[Any, Inputs]:
    from mmret.methods.scratch import ScratchContext

    m = cfg.method
    if m.tokenizer == "bpe":
        vocab = m.vocab_size
    else:
        from mmret.tokenizer import load_tokenizer

        vocab = load_tokenizer(m.tokenizer).vocab_size
    context = ScratchContext(SimpleNamespace(vocab_size=vocab), False)
    return context, Inputs((3, m.image_size, m.image_size), None, cfg.encoders.max_length, vocab)


def build_model(cfg: RunConfig, device: torch.device | str = "meta") -> tuple[nn.Module, Inputs]:
    """The model `mmret train` builds for `cfg`, and the shapes of its inputs. On the meta device
    (the default) nothing is allocated and no weights are read: the towers come from their configs.
    On a real device the towers are loaded with their weights, as training loads them."""
    from mmret.methods import get_method
    from mmret.methods.towers import load_towers

    method = get_method(cfg.method.method, training=True)
    if method.inputs == "features":
        context, inputs = _features_context(cfg, method)
    elif method.name == "scratch":
        cfg = dataclasses.replace(cfg, method=dataclasses.replace(cfg.method, pretrained_image=False))  # shapes only
        context, inputs = _scratch_context(cfg)
    else:
        context = skeleton_towers(cfg) if str(device) == "meta" else load_towers(cfg)
        inputs = None
    with torch.device("meta") if str(device) == "meta" else nullcontext():
        model = method.build(cfg, context)  # tower methods adapt the towers in place (prefix may shorten the text)
    if inputs is None:
        text, side = context.text, getattr(context, "cached", None)  # a frozen side reads cached pooled features
        image_row = (context.image.dim,) if side == "image" else (3, *context.image.image_size)
        inputs = Inputs(image_row, (text.dim,) if side == "text" else None, text.max_length,
                        text.model.config.vocab_size)
    return model.to(device) if str(device) != "meta" else model, inputs


def checkpointable(method: Any) -> bool:
    """Whether `--grad-checkpointing` changes anything: only the methods that adapt pretrained towers."""
    return method.inputs == "pixels" and method.name != "scratch"


def norm_sample(method: Any) -> int:
    """The most rows `init_heads` draws to start the input norms: its sources' `sample` default."""
    import inspect

    from mmret.pairs import FeatureSource, PixelSource

    source = FeatureSource if method.inputs == "features" else PixelSource
    return inspect.signature(source.sample).parameters["n"].default


def _norm_rows(cfg: RunConfig, method: Any) -> tuple[int, int]:
    """Image and caption rows `init_heads` samples: up to its cap, fewer for a small training split."""
    from mmret.datasets import load_dataset

    cap = norm_sample(method)
    try:
        train = load_dataset(cfg.data.dataset, cfg.data.data_dir).split("train")
    except MmretError:
        return cap, cap
    return min(cap, len(train.images)), min(cap, len(train.captions))


# ---------------------------------------------------------------------------- one step, tracked


def micro_batches(batch_size: int) -> list[int]:
    """The micro-batch sizes tried: the batch, then halving (rounded up) down to 1."""
    sizes, m = [], batch_size
    while True:
        sizes.append(m)
        if m == 1:
            return sizes
        m = -(-m // 2)


def _fixed(images: Any, texts: Any) -> "_Sample":
    return _Sample(lambda: images, lambda: texts)


class _Sample:
    """Stands in for a data source: `init_heads` draws its sample, `embed_source` one batch each way.
    Tensors are made when asked for, so a model without input norms never allocates the sample."""

    def __init__(self, images: Callable[[], Any], texts: Callable[[], Any]) -> None:
        self.images, self.texts = images, texts

    def sample(self, seed: int = 0) -> tuple[Any, Any]:
        return self.images(), self.texts()

    def iter_images(self, batch_size: int) -> Iterator[Any]:
        yield self.images()

    def iter_texts(self, batch_size: int) -> Iterator[Any]:
        yield self.texts()


def _probe_session_class() -> type:
    from mmret.train import Session

    class ProbeSession(Session):
        """A training session without data (`train_step` needs only the model, optimizer and config),
        entering autocast directly so that a CPU without native bf16 can stand in for a GPU."""

        def autocast(self):
            if self.precision == "fp32":
                return nullcontext()
            return torch.autocast(self.device.type, dtype=_DTYPES[self.precision])

    return ProbeSession


@dataclass
class Probe:
    """A model with its optimizer, on fake tensors (`mode`) or on a real device, and the shapes of
    its inputs; each method runs one phase of `mmret train` under `LiveBytes`."""

    cfg: RunConfig
    model: nn.Module
    inputs: Inputs
    device: torch.device
    mode: Any = None  # FakeTensorMode, or None for real tensors
    norm_rows: tuple[int, int] = (0, 0)  # image and caption rows of the input-norm sample at setup
    target: str = "cuda"  # the device a fake probe stands in for: cuda | cpu
    session: Any = None

    def __post_init__(self) -> None:
        from mmret.methods import get_method
        from mmret.train import LoopState, param_groups

        method = get_method(self.cfg.method.method, training=True)
        tc = self.cfg.train
        # on CUDA AdamW runs its foreach implementation, which holds a whole extra copy of the
        # moments while it steps; a fake probe standing in for a GPU runs that one too
        foreach = True if self.mode is not None and self.target == "cuda" else None
        optimizer = torch.optim.AdamW(param_groups(self.model, tc.weight_decay), lr=tc.lr or method.lr,
                                      betas=(0.9, 0.98), eps=1e-6, foreach=foreach)
        self.session = _probe_session_class()(
            cfg=self.cfg, run_dir=Path("."), device=self.device, precision="fp32", method=method, data=None,
            model=self.model, optimizer=optimizer, scaler=None, state=LoopState(), steps_per_epoch=1, total_steps=1)

    @property
    def block(self) -> int:
        cuda = self.device.type == "cuda" or (self.mode is not None and self.target == "cuda")
        return CUDA_BLOCK if cuda else 1

    @contextmanager
    def tracked(self, optimizer: bool = True) -> Iterator[LiveBytes]:
        with self.mode or nullcontext(), LiveBytes(self.model, self.session.optimizer if optimizer else None,
                                                   self.block) as live:
            yield live

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def setup(self) -> Breakdown:
        """`init_heads`: a sample of training inputs through the input norms, before any optimizer state."""
        from mmret.train import init_heads

        images, texts = self.norm_rows
        if not (images and texts):
            with self.tracked(optimizer=False) as live:
                pass
            return live.breakdown()
        # the sources hand the sample over on the CPU and init_heads moves only what a tower encodes,
        # a chunk at a time: the sample exists before tracking starts, so only that work is counted
        with self.mode or nullcontext():
            sample = _fixed(self.inputs.images(images, self.device), self.inputs.texts(texts, self.device))
        with self.tracked(optimizer=False) as live:
            init_heads(self.model, sample, self.device, 0)
        return live.breakdown()

    def warm_up(self) -> None:
        """Give AdamW its moments, as after a first step, so a tracked step is a steady-state one."""
        with self.tracked(optimizer=False):
            for p in self.trainable():
                p.grad = torch.zeros_like(p)
            self.session.optimizer.step()
        self.session.optimizer.zero_grad(set_to_none=True)

    def configure(self, precision: str, batch_size: int, micro_batch: int | None) -> None:
        """Set the session up as `mmret train` would for these settings (GradScaler for fp16 on CUDA)."""
        from mmret.device import grad_scaler
        from mmret.sam import SAM

        s, tc = self.session, self.cfg.train
        s.precision = precision
        s.cfg = dataclasses.replace(s.cfg, train=dataclasses.replace(
            s.cfg.train, precision=precision, batch_size=batch_size, micro_batch=micro_batch))
        # fake steps run no scaler: its state is a few scalars and unscaling works in place
        s.scaler = grad_scaler(self.device if self.mode is None else torch.device("cpu"), precision)
        s.sam = SAM(s.optimizer, tc.sam_rho, s.scaler) if tc.sam else None

    def step(self, precision: str, micro_batch: int) -> Breakdown:
        """One `train_step` over a whole batch at this micro-batch size, at steady state.

        With a micro-batch below the batch, every micro-batch after the first runs its graph with
        all gradients already allocated (they accumulate), and what else grows with the batch at a
        fixed micro-batch is the batch's inputs (twice with mixup) and, with gradient caching, its
        cached embeddings (B x D and their gradients, fp32). On fake tensors such a step therefore
        runs over ONE micro-batch with the gradients allocated beforehand, and the rest is added:
        a fake step costs the same whatever the batch, instead of B / micro-batch forward passes.
        Real tensors run the whole batch.
        """
        batch = self.cfg.train.batch_size
        if self.mode is None or micro_batch == batch:
            return self._step_at(precision, batch, micro_batch)
        memory = self._step_at(precision, micro_batch, micro_batch, grads_alive=True)
        if self.cfg.train.accumulation == "cache":
            memory.activations += 16 * batch * self.cfg.method.embed_dim
        mixed = 2 if self.cfg.method.mixup > 0 else 1
        memory.activations += (batch - micro_batch) * self.inputs.row_bytes() * mixed
        return memory

    def _step_at(self, precision: str, batch: int, micro_batch: int, grads_alive: bool = False) -> Breakdown:
        from mmret.train import train_step

        self.configure(precision, batch, micro_batch)
        optimizer = self.session.optimizer
        optimizer.zero_grad(set_to_none=True)
        if grads_alive:
            self._allocate_grads()
            optimizer.zero_grad = lambda *args, **kwargs: None  # train_step's own zero_grad would free them
        self.model.train()
        try:
            with self.tracked() as live:
                train_step(self.session, *self.inputs.make(batch, self.device))
        finally:
            optimizer.__dict__.pop("zero_grad", None)
        return live.breakdown()

    def _allocate_grads(self) -> None:
        with self.mode or nullcontext():
            for p in self.trainable():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

    def evaluate(self, precision: str) -> Breakdown:
        """`embed_source` over one batch, with the last step's gradients still alive (as in training)."""
        from mmret.train import embed_source

        batch = self.cfg.train.batch_size
        self.configure(precision, batch, None)
        self._allocate_grads()
        with self.tracked() as live:
            source = _Sample(lambda: self.inputs.images(batch, self.device),
                             lambda: self.inputs.texts(batch, self.device))
            embed_source(self.model, source, batch, self.device, self.session.autocast)
        return live.breakdown()


def fake_probe(cfg: RunConfig, norm_rows: tuple[int, int] = (0, 0), target: str = "cuda") -> Probe:
    """A `Probe` of `cfg`'s model on fake tensors (built on the meta device, no weights anywhere),
    standing in for a `target` GPU (foreach AdamW, 512-byte blocks) or CPU."""
    model, inputs = build_model(cfg)
    mode = _fake_mode()
    to_fake(model, mode)
    return Probe(cfg, model, inputs, torch.device("cpu"), mode, norm_rows, target)


# ---------------------------------------------------------------------------- the candidates


def size_text(n: float) -> str:
    """Bytes as GB (2^30) above a tenth of one, else MB (2^20)."""
    return f"{n / GiB:.2f} GB" if abs(n) >= GiB / 10 else f"{n / 2**20:.1f} MB"


def describe(c: Candidate, batch_size: int) -> str:
    parts = [f"micro-batch {c.micro_batch} of {batch_size}", c.precision]
    if c.grad_checkpointing:
        parts.append("gradient checkpointing")
    parts.append("cached features" if c.cached else "towers run every step")
    return ", ".join(parts)


def _row(candidate: Candidate, phases: dict[str, Breakdown | None], usable: int) -> Row:
    """A candidate fits when its largest phase, plus the margin, fits the usable bytes."""
    row = Row(candidate, phases["step"], {k: None if m is None else m.total for k, m in phases.items()}, False)
    row.fits = row.peak is not None and needed(row.peak) <= usable
    return row


def _speed(row: Row, batch_size: int) -> tuple:
    """Sort key, fastest first: mixed precision (bf16 before fp16), the fewest forward passes per
    step, the largest micro-batch."""
    c = row.candidate
    return {"bf16": 0, "fp16": 1, "fp32": 2}[c.precision], c.passes(batch_size), -c.micro_batch


def recommend(rows: list[Row], batch_size: int) -> Row | None:
    """The fastest row that fits, or None."""
    fitting = [r for r in rows if r.fits]
    return min(fitting, key=lambda r: _speed(r, batch_size)) if fitting else None


def smallest_row(rows: list[Row], batch_size: int) -> Row | None:
    """The row with the smallest known peak (the fastest among equals), or None."""
    known = [r for r in rows if r.peak is not None]
    return min(known, key=lambda r: (r.peak, _speed(r, batch_size))) if known else None


def _cached(cfg: RunConfig, method: Any) -> bool:
    """Whether training reads frozen towers' outputs from the feature cache (all of them, or the one
    tower that `--tower` leaves frozen)."""
    from mmret.methods.towers import frozen_side

    return method.inputs == "features" or (method.name != "scratch" and frozen_side(cfg) is not None)


def _estimate_rows(cfg: RunConfig, method: Any, usable: int, reporter: Reporter) -> list[Row]:
    """Every candidate, each from steps on fake tensors. fp16 keeps tensors of bf16's sizes, so
    the bf16 rows stand for both."""
    sizes = micro_batches(cfg.train.batch_size)
    checkpointing = (False, True) if checkpointable(method) else (False,)
    cached = _cached(cfg, method)
    norm, rows = _norm_rows(cfg, method), []
    with reporter.task("estimating peak memory", total=len(checkpointing) * 2 * len(sizes), unit="steps") as task:
        for ckpt in checkpointing:
            probe = fake_probe(_with_train(cfg, grad_checkpointing=ckpt), norm)
            setup = probe.setup()
            probe.warm_up()
            for precision in ("fp32", "bf16"):
                evaluation = probe.evaluate(precision)
                for m in sizes:
                    phases = {"setup": setup, "step": probe.step(precision, m), "eval": evaluation}
                    rows.append(_row(Candidate(m, precision, ckpt, cached), phases, usable))
                    task.advance()
    return rows


def _with_train(cfg: RunConfig, **changes: Any) -> RunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **changes))


# ---------------------------------------------------------------------------- measuring on a GPU


def largest_fitting(lo: int, hi: int, fits: Callable[[int], bool]) -> int | None:
    """The largest n in [lo, hi] with `fits(n)`, for a `fits` true up to some n and false above;
    None when even `lo` does not fit. Tries `hi` first (the common case ends there), then bisects:
    about log2(hi - lo) calls."""
    if fits(hi):
        return hi
    if lo == hi or not fits(lo):
        return None
    while hi - lo > 1:  # fits(lo) and not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _free(device: torch.device, probe: Probe | None = None) -> None:
    if probe is not None:
        probe.session.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def measured(fn: Callable[[], Breakdown], device: torch.device) -> Breakdown | None:
    """Run one tracked phase on real tensors; None when it ran out of memory. On a GPU the split
    comes from `LiveBytes` and the total from `torch.cuda.max_memory_allocated`: what the allocator
    counted beyond live tensors (kernel workspaces, rounding) goes to workspace."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    out_of_memory = False
    try:
        memory = fn()
    except torch.OutOfMemoryError:
        out_of_memory = True  # freed below, once the exception no longer holds the step's tensors
    if out_of_memory:
        _free(device)
        return None
    if cuda:
        torch.cuda.synchronize(device)
        memory.workspace += max(0, torch.cuda.max_memory_allocated(device) - memory.total)
    return memory


def cuda_budget(device: torch.device, vram: float, reserve: float | None) -> tuple[int, int, int]:
    """(usable bytes, reserved bytes, device total): the budget (at most the device) less what the
    CUDA context and other processes hold outside this process's allocator (measured, unless given)."""
    torch.cuda.init()
    free, total = torch.cuda.mem_get_info(device)
    held = total - free - torch.cuda.memory_reserved(device) if reserve is None else int(reserve * GiB)
    return min(int(vram * GiB), total) - held, held, total


def _measure_rows(cfg: RunConfig, method: Any, device: torch.device, usable: int, reporter: Reporter,
                  precisions: tuple[str, ...] | None = None) -> list[Row]:
    """For each precision the device runs (default: fp32, bf16 where supported, fp16) and each
    checkpointing setting, a binary search over the micro-batch on real steps; every micro-batch
    tried is a row."""
    from mmret.device import bf16_supported

    precisions = precisions or (("fp32", "bf16", "fp16") if bf16_supported(device) else ("fp32", "fp16"))
    checkpointing = (False, True) if checkpointable(method) else (False,)
    norm, rows, cached = _norm_rows(cfg, method), [], _cached(cfg, method)
    with reporter.task("measuring peak memory", total=len(checkpointing) * len(precisions), unit="searches") as task:
        for ckpt in checkpointing:
            ckpt_cfg = _with_train(cfg, grad_checkpointing=ckpt)
            probe, setup = _real_probe(ckpt_cfg, device, norm)
            for precision in precisions:
                if probe is None:  # the weights (or AdamW's moments) alone do not fit
                    rows.append(_row(Candidate(1, precision, ckpt, cached), {"setup": None, "step": None}, usable))
                else:
                    rows += _search(probe, precision, setup, usable, cached)
                task.advance()
            del probe
            _free(device)
    return rows


def _real_probe(cfg: RunConfig, device: torch.device, norm: tuple[int, int]) -> tuple[Probe | None, Breakdown | None]:
    """The model with its weights on the device, its setup phase measured and AdamW's moments made;
    (None, None) when that alone runs out of memory."""
    try:
        probe = Probe(cfg, *build_model(cfg, device), device, None, norm)
    except torch.OutOfMemoryError:
        probe = None
    if probe is None:
        _free(device)
        return None, None
    setup = measured(probe.setup, device)
    if setup is None or measured(lambda: probe.warm_up() or Breakdown(), device) is None:
        return None, None
    return probe, setup


def _search(probe: Probe, precision: str, setup: Breakdown | None, usable: int, cached: bool) -> list[Row]:
    """The micro-batches a binary search tries for one precision, largest first."""
    evaluation = measured(lambda: probe.evaluate(precision), probe.device)
    rows: dict[int, Row] = {}

    def fits(m: int) -> bool:
        step = measured(lambda: probe.step(precision, m), probe.device)
        candidate = Candidate(m, precision, probe.cfg.train.grad_checkpointing, cached)
        rows[m] = _row(candidate, {"setup": setup, "step": step, "eval": evaluation}, usable)
        _free(probe.device, probe)
        return rows[m].fits

    largest_fitting(1, probe.cfg.train.batch_size, fits)
    return [rows[m] for m in sorted(rows, reverse=True)]


# ---------------------------------------------------------------------------- the probe


def probe_memory(cfg: RunConfig, vram: float, reserve: float | None = None, how: str = "auto",
                 reporter: Reporter = NULL) -> MemoryReport:
    """Find the training configuration of `cfg` that fits `vram` GB (2^30 bytes) and runs fastest.

    `how`: `measure` (real steps on CUDA), `estimate` (fake tensors, no GPU needed), or `auto`
    (measure when a CUDA GPU is visible). `reserve`: GB kept for the CUDA context and other
    processes (default: measured on a GPU, `CUDA_CONTEXT_GIB` otherwise). Raises `NothingFits`
    (an MmretError naming the smallest requirement and what would cut it) when nothing fits.
    """
    from mmret.methods import get_method

    method = get_method(cfg.method.method, training=True)
    _check(vram, reserve, how)
    measure = how == "measure" or (how == "auto" and torch.cuda.is_available())
    if measure:
        rows, usable, held, how_text = _measure(cfg, method, vram, reserve, reporter)
    else:
        held = int((CUDA_CONTEXT_GIB if reserve is None else reserve) * GiB)
        usable = int(vram * GiB) - held
        rows, how_text = _estimate_rows(cfg, method, usable, reporter), ESTIMATED
    best = recommend(rows, cfg.train.batch_size)
    if best is None:
        raise nothing_fits(cfg, method, rows, vram, usable, held)
    return MemoryReport(method.name, cfg.train.batch_size, vram, usable, how_text, rows, best,
                        recommended_config(cfg, best, measure), _notes(cfg, method, held, measure))


def _check(vram: float, reserve: float | None, how: str) -> None:
    if not vram > 0:
        raise MmretError(f"--vram must be a positive number of GB, got {vram}")
    if reserve is not None and reserve < 0:
        raise MmretError(f"--reserve cannot be negative, got {reserve}")
    if how not in ("auto", "measure", "estimate"):
        raise MmretError(f"how must be auto, measure or estimate, got {how!r}")
    if how == "measure" and not torch.cuda.is_available():
        raise MmretError("measuring needs a CUDA GPU and torch sees none; estimate instead")


def _measure(cfg: RunConfig, method: Any, vram: float, reserve: float | None,
             reporter: Reporter) -> tuple[list[Row], int, int, str]:
    from mmret.device import pick_device

    device = pick_device(cfg.train.device if cfg.train.device.startswith("cuda") else "cuda")
    usable, held, total = cuda_budget(device, vram, reserve)
    # the allocator then fails where the budget ends, even on a larger GPU
    torch.cuda.set_per_process_memory_fraction(max(0.0, min(1.0, usable / total)), device)
    try:
        rows = _measure_rows(cfg, method, device, usable, reporter)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
    name = torch.cuda.get_device_name(device)
    how = (f"measured on {device} ({name}): real training steps on synthetic batches, peak from "
           "torch.cuda.max_memory_allocated, binary search over the micro-batch")
    return rows, usable, held, how


def recommended_config(cfg: RunConfig, row: Row, measured_: bool) -> RunConfig:
    """`cfg` with the row's micro-batch, precision and checkpointing. An estimate's bf16 is saved as
    `auto`: on CUDA that is bf16 where the GPU has it, else fp16, which keeps the same tensor sizes."""
    c = row.candidate
    precision = c.precision if measured_ or c.precision == "fp32" else "auto"
    micro = c.micro_batch if c.micro_batch < cfg.train.batch_size else None
    return _with_train(cfg, micro_batch=micro, precision=precision, grad_checkpointing=c.grad_checkpointing)


def _notes(cfg: RunConfig, method: Any, held: int, measure: bool) -> list[str]:
    notes = [f"{size_text(held)} of the budget is kept for the CUDA context ({'measured' if measure else 'assumed'}); "
             f"a configuration fits when its peak plus {MARGIN:.0%} fits in the rest"]
    if method.inputs == "features":
        notes.append(f"{method.name} trains from cached features: the towers never run in training and are not counted")
    elif method.name != "scratch" and cfg.method.tower != "both" and method.name != "full":
        frozen = "vision" if cfg.method.tower == "text" else "text"
        notes.append(f"the frozen {frozen} tower never runs in training: its outputs come from the feature cache "
                     "and it is not counted")
    if not measure:
        notes.append("fp16 keeps tensors of the same sizes as bf16: the bf16 rows stand for both")
    notes.append("phases: setup puts a sample of training inputs on the device to start the input norms of the "
                 f"heads, if any (up to {norm_sample(method)} rows); eval embeds whole batches with the last "
                 "gradients alive")
    return notes


class NothingFits(MmretError):
    """No candidate fits the budget; `rows` holds every candidate tried, `smallest` the least demanding."""

    def __init__(self, message: str, rows: list[Row], smallest: Row | None) -> None:
        super().__init__(message)
        self.rows, self.smallest = rows, smallest


def nothing_fits(cfg: RunConfig, method: Any, rows: list[Row], vram: float, usable: int, held: int) -> NothingFits:
    """One line: the smallest requirement among the candidates and what would cut it further."""
    smallest = smallest_row(rows, cfg.train.batch_size)
    budget = f"nothing fits in {vram:g} GB ({size_text(max(usable, 0))} after {size_text(held)} for the CUDA context)"
    if smallest is None:
        return NothingFits(f"{budget}: even micro-batch 1 ran out of memory; what would cut it: "
                           f"{', '.join(_cuts(cfg, method, None))}", rows, None)
    return NothingFits(f"{budget}: the smallest configuration ({describe(smallest.candidate, cfg.train.batch_size)}) "
                       f"needs {size_text(needed(smallest.peak))} with the {MARGIN:.0%} margin; "
                       f"what would cut it: {', '.join(_cuts(cfg, method, smallest))}", rows, smallest)


def _cuts(cfg: RunConfig, method: Any, row: Row | None) -> list[str]:
    """What is left to try once every micro-batch, precision and checkpointing setting was."""
    m, cuts = cfg.method, []
    if row is not None and row.phase == "eval":
        cuts.append(f"a smaller --batch-size than {cfg.train.batch_size} (evaluation runs whole batches)")
    if row is not None and row.phase == "setup":
        cuts.append("input_norm false in a --config (its setup sample sits on the device)")
    if method.name == "full":
        cuts.append("LoRA instead of full fine-tuning (--method lora)")
    elif method.name == "lora":
        cuts.append(f"a lower --rank than {m.rank}")
    if checkpointable(method) and m.tower == "both":
        cuts.append("adapting one tower (--tower text)")
    if checkpointable(method):
        cuts.append("cached features (--method bridge or heads: the towers never run in training)")
    cuts.append("a shorter --max-length" if method.inputs == "pixels" else f"a smaller --embed-dim than {m.embed_dim}")
    cuts.append("smaller towers" if method.name != "scratch" else "a smaller --arch")
    return cuts


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write `cfg` as `mmret train --config` reads it (RunConfig JSON), without this machine's data
    and runs folders, so the file works where training will run."""
    from mmret.io import write_json

    data = cfg.to_dict()
    data.pop("runs_dir", None)
    data["data"].pop("data_dir", None)
    path = Path(path)
    write_json(path, data)
    return path
