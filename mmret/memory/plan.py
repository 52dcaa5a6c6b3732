"""probe-memory: how much memory one training step of a configuration needs, and which
configuration fits a memory budget.

The candidates are every micro-batch size (the batch, its half, quarter, ... down to 1), every
precision (fp32, bf16, fp16) and, for methods that run the towers, gradient checkpointing on and
off. Whether the frozen towers' outputs are cached is decided by the method, as `mmret train`
does it: heads and bridge always train from cached features, so their estimate has no towers at
all; lora, prefix, adapter, full and scratch run items and tokens through the towers at every
step, except for a tower `--tower` leaves frozen, whose outputs come from the cache.

Modules: `live` (the live-bytes tracker), `probe` (the model and one tracked phase), and this
one's `plan` (the candidates, measuring or estimating them, the recommendation).

Two ways to get the numbers:

- `measure` (a CUDA GPU): real training steps on synthetic batches of the right shapes, peak from
  `torch.cuda.max_memory_allocated`, out-of-memory errors caught; a binary search finds the
  largest micro-batch per (precision, checkpointing) that fits with the safety margin.
- `estimate` (no GPU, or planning for another one): the towers are built from their configs on the
  meta device (no weights are read or allocated), turned into fake tensors
  (`torch._subclasses.fake_tensor.FakeTensorMode`: shapes, dtypes and storages, no data), and one
  step of the training `Stepper` runs under `LiveBytes`, a dispatch mode that counts the bytes of
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
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from mmret.common.device import bf16_supported, pick_device
from mmret.common.io import write_json
from mmret.common.progress import NULL, Reporter
from mmret.data.prepared import load_dataset
from mmret.errors import MmretError
from mmret.memory.live import Breakdown
from mmret.memory.probe import Probe, build_model, fake_probe
from mmret.methods import get_method
from mmret.runs import RunConfig

GiB = 2**30
MARGIN = 0.10  # headroom on top of a peak: allocator fragmentation, and the estimate's own error
CUDA_CONTEXT_GIB = 0.5  # what the CUDA context (kernels, cuBLAS/cuDNN handles) takes outside the allocator
ESTIMATED = ("estimated: one training step per candidate on fake tensors (no weights allocated), live tensor "
             "bytes counted at the dispatcher")


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


def micro_batches(batch_size: int) -> list[int]:
    """The micro-batch sizes tried: the batch, then halving (rounded up) down to 1."""
    sizes, m = [], batch_size
    while True:
        sizes.append(m)
        if m == 1:
            return sizes
        m = -(-m // 2)



def _norm_rows(cfg: RunConfig, method: Any) -> tuple[int, int]:
    """Item and caption rows `init_heads` samples: up to its cap, fewer for a small training split."""
    cap = method.sample_size
    try:
        train = load_dataset(cfg.data.dataset, cfg.data.data_dir).split("train")
    except MmretError:
        return cap, cap
    return min(cap, len(train.items)), min(cap, len(train.captions))


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


def _estimate_rows(cfg: RunConfig, method: Any, usable: int, reporter: Reporter) -> list[Row]:
    """Every candidate, each from steps on fake tensors. fp16 keeps tensors of bf16's sizes, so
    the bf16 rows stand for both."""
    sizes = micro_batches(cfg.train.batch_size)
    checkpointing = checkpoint_settings(cfg, method)[0]
    cached = bool(method.cached_sides(cfg))
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


def checkpoint_settings(cfg: RunConfig, method: Any) -> tuple[tuple[bool, ...], str | None]:
    """The gradient-checkpointing settings to try, and why checkpointing is left out when it is: a
    tower whose transformers class cannot checkpoint (CLAP's) is found by building the model for
    it on the meta device, as training would."""
    if not method.checkpointable:
        return (False,), None
    try:
        build_model(_with_train(cfg, grad_checkpointing=True))
    except MmretError as e:
        return (False,), str(e).split(";")[0]
    return (False, True), None


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
        probe.optimizer.zero_grad(set_to_none=True)
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
    precisions = precisions or (("fp32", "bf16", "fp16") if bf16_supported(device) else ("fp32", "fp16"))
    checkpointing = checkpoint_settings(cfg, method)[0]
    norm, rows, cached = _norm_rows(cfg, method), [], bool(method.cached_sides(cfg))
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


# ---------------------------------------------------------------------------- the plan


def probe_memory(cfg: RunConfig, vram: float, reserve: float | None = None, how: str = "auto",
                 reporter: Reporter = NULL) -> MemoryReport:
    """Find the training configuration of `cfg` that fits `vram` GB (2^30 bytes) and runs fastest.

    `how`: `measure` (real steps on CUDA), `estimate` (fake tensors, no GPU needed), or `auto`
    (measure when a CUDA GPU is visible). `reserve`: GB kept for the CUDA context and other
    processes (default: measured on a GPU, `CUDA_CONTEXT_GIB` otherwise). Raises `NothingFits`
    (an MmretError naming the smallest requirement and what would cut it) when nothing fits.
    """
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
    notes += method.memory_notes(cfg)
    why = checkpoint_settings(cfg, method)[1]
    if why:
        notes.append(f"gradient checkpointing is not tried: {why}")
    if not measure:
        notes.append("fp16 keeps tensors of the same sizes as bf16: the bf16 rows stand for both")
    notes.append("phases: setup puts a sample of training inputs on the device to start the input norms of the "
                 f"heads, if any (up to {method.sample_size} rows); eval embeds whole batches with the last "
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
    cuts = []
    if row is not None and row.phase == "eval":
        cuts.append(f"a smaller --batch-size than {cfg.train.batch_size} (evaluation runs whole batches)")
    if row is not None and row.phase == "setup":
        cuts.append("--no-input-norm (its setup sample sits on the device)")
    return cuts + method.memory_cuts(cfg)


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Write `cfg` as `mmret train --config` reads it (RunConfig JSON), without this machine's data
    and runs folders, so the file works where training will run."""
    data = cfg.to_dict()
    data.pop("runs_dir", None)
    data["data"].pop("data_dir", None)
    path = Path(path)
    write_json(path, data)
    return path
