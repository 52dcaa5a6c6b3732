"""Where and in what precision tensors are computed: one place that every encoding and training
path asks, so CUDA (AMP fp16 + GradScaler, or bf16) and CPU (fp32, or bf16 where it is both
accurate and faster) are chosen the same way everywhere.

Precision names: `auto` (decide here), `fp32`, `bf16`, `fp16` (CUDA only), and for encoding with
frozen towers only `int8` (CPU, see `mmret.features.runner`). For inference,
`choose_inference_precision` runs a real batch in float32 and in the reduced precision and keeps
the reduced one only when every pooled output stays within a cosine similarity of 0.999 of the
float32 one (and, on the CPU, only when it also takes less CPU time: bf16 kernels are not faster
for every model on every processor).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

import torch

from mmret.errors import MmretError

_logger = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
INFERENCE_PRECISIONS = PRECISIONS + ("int8",)  # int8: frozen towers' encoding on the CPU only
DEVICES = ("auto", "cpu", "cuda")
COSINE_THRESHOLD = 0.999
# The one rule every reduced form of a frozen tower is kept by: its smallest cosine to float32 on a real
# batch is at least this (and it is faster). int8 keeps the float bound: the int8 forms measured so far
# that fell below it also moved retrieval (`benchmarks/int8_recall.py`, Tux Paint over DINOv2-S: torch's
# PT2E int8 at cosine 0.9946 on the first batch moved Recall@K by up to 1.12 points, OpenVINO's NNCF int8 at
# 0.9773 by up to 2.04; the check allows 0.5).
MIN_COSINE = {"bf16": COSINE_THRESHOLD, "fp16": COSINE_THRESHOLD, "int8": COSINE_THRESHOLD}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` is the first CUDA GPU when there is one (for one of several processes torchrun or
    srun started on a machine, the GPU of its local rank), else the CPU."""
    requested = (requested or "auto").lower()
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MmretError(f"--device {requested}: no CUDA GPU is visible to torch; use --device cpu")
        local = os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID")
        if requested == "cuda" and local is not None and local.isdigit():
            return torch.device("cuda", int(local) % torch.cuda.device_count())
        return torch.device(requested)
    if requested == "cpu":
        return torch.device("cpu")
    raise MmretError(f"unknown --device {requested!r}; choose one of {', '.join(DEVICES)}")


def check_precision(device: torch.device, precision: str, inference: bool = False) -> str:
    """Validate a precision name for a device (fp16 needs CUDA; int8 is for `inference` on a CPU
    with int8 dot-product instructions, through torchao)."""
    names = INFERENCE_PRECISIONS if inference else PRECISIONS
    if precision not in names:
        raise MmretError(f"unknown --precision {precision!r}; choose one of {', '.join(names)}")
    if precision == "int8":
        if not int8_supported(device):
            raise MmretError(f"--precision int8 needs a CPU with AVX512-VNNI or AMX int8 instructions, not this "
                             f"{device.type}; use --precision bf16 or fp32")
        if not int8_installed():
            raise MmretError("--precision int8 quantises with torchao or NNCF: pip install 'mmret[int8]' or "
                             "'mmret[export]'")
    if precision == "fp16" and device.type != "cuda":
        raise MmretError("--precision fp16 needs a CUDA GPU (CPUs compute float16 slowly and "
                         "without loss scaling); use --precision bf16 or fp32 on the CPU")
    if precision == "bf16" and not bf16_supported(device):
        raise MmretError(f"--precision bf16 is not supported on this {device.type}; use --precision fp32")
    return precision


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # without native bf16 instructions oneDNN emulates it, which is slower than float32
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def int8_supported(device: torch.device) -> bool:
    """int8 products oneDNN runs fast: AMX int8 tiles or AVX512-VNNI (older CPUs emulate them slowly)."""
    if device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    cpu = getattr(torch, "cpu", None)
    return bool(cpu is not None and (cpu._is_amx_tile_supported() or cpu._is_vnni_supported()))


def int8_installed() -> bool:
    """An int8 quantiser: torchao (torch's PT2E) or NNCF with OpenVINO (the runtime's own)."""
    return torch_int8_installed() or runtime_int8_installed()


def torch_int8_installed() -> bool:
    """torchao, which torch's PT2E int8 quantises with."""
    import importlib.util

    return importlib.util.find_spec("torchao") is not None


def runtime_int8_installed() -> bool:
    """NNCF, OpenVINO and the ONNX converter: the runtime's own int8 (`mmret.features.backend.quantize`)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("nncf", "openvino", "onnxscript"))


def cosine_bound(precision: str) -> float:
    """The smallest cosine to float32 a `precision` form may have and be kept (`MIN_COSINE`)."""
    return MIN_COSINE.get(precision, COSINE_THRESHOLD)


def agrees(precision: str, cosine: float) -> bool:
    """The rule of `MIN_COSINE`: a `precision` form whose smallest cosine to float32 is `cosine` may be kept
    (False for NaN)."""
    return bool(cosine >= cosine_bound(precision))


def reduced_precision(device: torch.device) -> str | None:
    """The reduced precision worth trying on a device, or None: bf16 where native, fp16 on old GPUs."""
    if bf16_supported(device):
        return "bf16"
    return "fp16" if device.type == "cuda" else None


def autocast_context(device: torch.device, precision: str) -> ContextManager:
    """Autocast for bf16/fp16 (matmuls in low precision, reductions in float32); a no-op for fp32."""
    check_precision(device, precision)
    if precision in ("fp32", "auto"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """Loss scaling is needed for fp16 only; for the others the scaler is a pass-through."""
    return torch.amp.GradScaler(device.type, enabled=(precision == "fp16" and device.type == "cuda"))


def default_workers(device: torch.device) -> int:
    """Decoding workers: on the CPU leave the cores to the model but one; on a GPU use more. The cores are
    those this process may use (a worker process runs one torch thread)."""
    from mmret.common.threads import available_cores

    cpus = available_cores()
    return min(8, cpus) if device.type == "cuda" else min(4, max(1, cpus - 1))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest row-wise cosine similarity between two (B, D) outputs, computed in float32."""
    a, b = a.float().flatten(1), b.float().flatten(1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12).min())


@dataclass
class PrecisionChoice:
    precision: str  # what will be used: fp32 | bf16 | fp16
    reason: str  # one line for the summary, e.g. "bf16: cosine 0.9996 to fp32, 1.8x faster"
    cosine: float | None = None  # min cosine of the reduced precision's pooled outputs to fp32
    speedup: float | None = None  # fp32 time / reduced time on the same batch
    timings: dict[str, float] = field(default_factory=dict)


def _timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """Run `fn` and measure it: wall time on a GPU; on the CPU the process's CPU time, which other
    programs competing for the cores inflate far less than wall time."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    synchronize(device)
    start = clock()
    out = fn()
    synchronize(device)
    return out, clock() - start


def choose_inference_precision(forward: Callable[[str], torch.Tensor], device: torch.device,
                               requested: str = "auto", threshold: float = COSINE_THRESHOLD,
                               warmup: Callable[[str], Any] | None = None) -> PrecisionChoice:
    """Decide the precision of an inference run by trying it on a real batch.

    `forward(precision)` encodes the batch and returns its pooled output (B, D); `warmup(precision)`
    (a tiny batch) lets one-time kernel setup happen before timing. An explicit `requested` other
    than `auto` is used as is.
    """
    check_precision(device, requested)
    if requested != "auto":
        return PrecisionChoice(requested, f"{requested}: requested")
    low = reduced_precision(device)
    if low is None:
        return PrecisionChoice("fp32", "fp32: this CPU has no native bf16")
    for p in ("fp32", low):
        if warmup is not None:
            warmup(p)
    ref, t32 = _timed(lambda: forward("fp32"), device)
    out, tlow = _timed(lambda: forward(low), device)
    cos, speedup = min_cosine(ref, out), t32 / max(tlow, 1e-9)
    timings = {"fp32": t32, low: tlow}
    if not cos >= threshold:  # also catches NaN from an overflow
        return PrecisionChoice("fp32", f"fp32: {low} cosine to fp32 only {cos:.4f} < {threshold}", cos, speedup,
                               timings)
    if device.type == "cpu" and speedup <= 1.0:
        return PrecisionChoice("fp32", f"fp32: {low} is accurate (cosine {cos:.4f}) but not faster here "
                               f"({speedup:.2f}x)", cos, speedup, timings)
    return PrecisionChoice(low, f"{low}: cosine to fp32 {cos:.4f} >= {threshold}, {speedup:.2f}x faster",
                           cos, speedup, timings)
