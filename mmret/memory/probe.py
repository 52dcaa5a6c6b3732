"""One phase of `mmret train` under `LiveBytes`: the model a configuration trains, built on the
meta device and turned into fake tensors (no weights read or allocated), or loaded on a real
device, and the setup, step and evaluation phases run on it with the training code itself.

The model and its input shapes come from the method (`Method.open` without weights, `build`,
`input_shapes`); a step is the training `Stepper`, configured for each candidate.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from mmret.common.device import DTYPES, grad_scaler
from mmret.memory.live import Breakdown, LiveBytes
from mmret.methods import Inputs, Method, get_method
from mmret.models.embed import embed_source
from mmret.runs import RunConfig
from mmret.runs.config import settle_modality
from mmret.training.sam import SAM
from mmret.training.session import init_heads
from mmret.training.step import Stepper, make_optimizer

CUDA_BLOCK = 512  # the CUDA caching allocator rounds every allocation up to a multiple of this


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


def token_count(encoder: nn.Module) -> int:
    """T of an item tower's token states, from one forward pass on fake tensors."""
    mode = _fake_mode()
    to_fake(encoder, mode)
    with mode, LiveBytes(), torch.no_grad():
        return encoder(**encoder.blank_inputs(1, "cpu")).tokens.shape[1]


def build_model(cfg: RunConfig, device: torch.device | str = "meta") -> tuple[nn.Module, Inputs]:
    """The model `mmret train` builds for `cfg`, and the shapes of its inputs. On the meta device
    (the default) nothing is allocated and no weights are read: the towers come from their configs.
    On a real device the towers are loaded with their weights, as training loads them."""
    method = get_method(cfg.method.method, training=True)
    settle_modality(cfg)  # a sound dataset, or a sound tower, builds a sound tower
    meta = str(device) == "meta"
    cfg = method.shapes_config(cfg) if meta else cfg
    context = method.open(cfg, None, weights=not meta)
    with torch.device("meta") if meta else nullcontext():
        model = method.build(cfg, context)  # tower methods adapt the towers in place (prefix may shorten the text)
    inputs = method.input_shapes(cfg, context, token_count)
    return (model if meta else model.to(device)), inputs


class _Sample:
    """Stands in for a data source: `init_heads` draws its sample, `embed_source` one batch each way.
    Tensors are made when asked for, so a model without input norms never allocates the sample."""

    def __init__(self, items: Callable[[], Any], texts: Callable[[], Any]) -> None:
        self.items, self.texts = items, texts

    def sample(self, seed: int = 0) -> tuple[Any, Any]:
        return self.items(), self.texts()

    def iter_items(self, batch_size: int) -> Iterator[Any]:
        yield self.items()

    def iter_texts(self, batch_size: int) -> Iterator[Any]:
        yield self.texts()


@dataclass
class Probe:
    """A model with its optimizer, on fake tensors (`mode`) or on a real device, and the shapes of
    its inputs; each method runs one phase of `mmret train` under `LiveBytes`."""

    cfg: RunConfig
    model: nn.Module
    inputs: Inputs
    device: torch.device
    mode: Any = None  # FakeTensorMode, or None for real tensors
    norm_rows: tuple[int, int] = (0, 0)  # item and caption rows of the input-norm sample at setup
    target: str = "cuda"  # the device a fake probe stands in for: cuda | cpu
    method: Method | None = None
    optimizer: torch.optim.Optimizer | None = None
    stepper: Stepper | None = None  # the step of the last `configure`

    def __post_init__(self) -> None:
        self.method = get_method(self.cfg.method.method, training=True)
        tc = self.cfg.train
        # on CUDA AdamW runs its foreach implementation, which holds a whole extra copy of the
        # moments while it steps; a fake probe standing in for a GPU runs that one too
        foreach = True if self.mode is not None and self.target == "cuda" else None
        self.optimizer = make_optimizer(self.model, tc.lr or self.method.lr, tc.weight_decay, foreach)

    @property
    def block(self) -> int:
        cuda = self.device.type == "cuda" or (self.mode is not None and self.target == "cuda")
        return CUDA_BLOCK if cuda else 1

    @contextmanager
    def tracked(self, optimizer: bool = True) -> Iterator[LiveBytes]:
        with self.mode or nullcontext(), LiveBytes(self.model, self.optimizer if optimizer else None,
                                                   self.block) as live:
            yield live

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def setup(self) -> Breakdown:
        """`init_heads`: a sample of training inputs through the input norms, before any optimizer state."""
        items, texts = self.norm_rows
        if not (items and texts):
            with self.tracked(optimizer=False) as live:
                pass
            return live.breakdown()
        # the sources hand the sample over on the CPU and init_heads moves only what a tower encodes,
        # a chunk at a time: the sample exists before tracking starts, so only that work is counted
        with self.mode or nullcontext():
            sample = _Sample(lambda x=self.inputs.items(items, self.device): x,
                             lambda x=self.inputs.texts(texts, self.device): x)
        with self.tracked(optimizer=False) as live:
            init_heads(self.model, sample, self.device, 0)
        return live.breakdown()

    def warm_up(self) -> None:
        """Give AdamW its moments, as after a first step, so a tracked step is a steady-state one."""
        with self.tracked(optimizer=False):
            for p in self.trainable():
                p.grad = torch.zeros_like(p)
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def autocast(self, precision: str) -> Callable[[], Any]:
        """Autocast entered directly, so that a CPU without native bf16 can stand in for a GPU."""
        if precision == "fp32":
            return nullcontext
        return lambda: torch.autocast(self.device.type, dtype=DTYPES[precision])

    def configure(self, precision: str, batch_size: int, micro_batch: int | None, keep_grads: bool = False) -> Stepper:
        """The step `mmret train` would take with these settings (GradScaler for fp16 on CUDA)."""
        tc = dataclasses.replace(self.cfg.train, precision=precision, batch_size=batch_size, micro_batch=micro_batch)
        # fake steps run no scaler: its state is a few scalars and unscaling works in place
        scaler = grad_scaler(self.device if self.mode is None else torch.device("cpu"), precision)
        self.stepper = Stepper(model=self.model, optimizer=self.optimizer, train=tc, peak_lr=tc.lr or self.method.lr,
                               total_steps=1, device=self.device, precision=precision, scaler=scaler,
                               sam=SAM(self.optimizer, tc.sam_rho, scaler, keep_grads) if tc.sam else None,
                               batch_transform=self.method.batch_transform(self.cfg), keep_grads=keep_grads,
                               autocast=self.autocast(precision))
        return self.stepper

    def step(self, precision: str, micro_batch: int) -> Breakdown:
        """One training step over a whole batch at this micro-batch size, at steady state.

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
        mixed = 2 if self.method.batch_transform(self.cfg) is not None else 1
        memory.activations += (batch - micro_batch) * self.inputs.row_bytes() * mixed
        return memory

    def _step_at(self, precision: str, batch: int, micro_batch: int, grads_alive: bool = False) -> Breakdown:
        step = self.configure(precision, batch, micro_batch, keep_grads=grads_alive)
        self.optimizer.zero_grad(set_to_none=True)
        if grads_alive:
            self._allocate_grads()
        self.model.train()
        with self.tracked() as live:
            step(*self.inputs.make(batch, self.device), 0)
        return live.breakdown()

    def _allocate_grads(self) -> None:
        with self.mode or nullcontext():
            for p in self.trainable():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)

    def evaluate(self, precision: str) -> Breakdown:
        """`embed_source` over one batch, with the last step's gradients still alive (as in training)."""
        batch = self.cfg.train.batch_size
        self._allocate_grads()
        with self.tracked() as live:
            source = _Sample(lambda: self.inputs.items(batch, self.device),
                             lambda: self.inputs.texts(batch, self.device))
            embed_source(self.model, source, batch, self.device, self.autocast(precision))
        return live.breakdown()


def fake_probe(cfg: RunConfig, norm_rows: tuple[int, int] = (0, 0), target: str = "cuda") -> Probe:
    """A `Probe` of `cfg`'s model on fake tensors (built on the meta device, no weights anywhere),
    standing in for a `target` GPU (foreach AdamW, 512-byte blocks) or CPU."""
    model, inputs = build_model(cfg)
    mode = _fake_mode()
    to_fake(model, mode)
    return Probe(cfg, model, inputs, torch.device("cpu"), mode, norm_rows, target)
