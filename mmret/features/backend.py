"""A frozen item tower run by an inference runtime (OpenVINO, ONNX Runtime) instead of torch, when that
is measured to agree and be faster.

On CPUs, a runtime's own kernels and graph fusion beat torch on these towers (DINOv2-S, batch 32 at
224 px, 2-core EPYC with AVX-512 bf16: torch bf16 eager 18.7 pictures/s, torch.compile bf16 20.6,
OpenVINO 29.4 at cosine 0.99996 to fp32). The tower's pooled output is converted once per tower
(`mmret.encoders.convert.to_onnx`, the export's converter) into a folder of the user's cache keyed by
the tower's spec (what names its feature caches), the input shape and the torch version, so another
dataset, or a later run, opens it without converting again (`MMRET_CACHE_DIR`, default
~/.cache/mmret). `TowerRunner` tries it on the first batch and keeps it under the rule every precision
follows: cosine >= 0.999 to fp32 on that batch, and faster than the torch form chosen; the result is
recorded in the cache manifest (`backend`, and the reason). Token caches stay in torch.

int8 (`--precision int8`) goes through the runtime's own quantiser: NNCF's post-training quantisation
of the OpenVINO model (int8 weights per channel, activation scales calibrated on `CALIBRATION_ITEMS`
real items of the dataset being encoded, spread over it; SmoothQuant for towers with attention), saved
in `int8/` beside the float conversion. What `TowerRunner` measured of it the first time (cosine to fp32,
speed against torch) is saved there too (`decision.json`), so a later start neither quantises nor
measures again: it opens the int8 model, or goes straight to torch's int8, as decided.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from mmret.common.device import runtime_int8_installed
from mmret.common.io import atomic_dir, read_json, write_json
from mmret.common.paths import slug
from mmret.common.threads import compute_threads
from mmret.encoders.convert import installed_runtimes, runtime_mode, runtime_session, to_onnx

TRIAL_SECONDS = 60.0  # torch work left (CPU seconds) above which converting a tower not converted yet pays
CACHE_ENV = "MMRET_CACHE_DIR"
FORMAT = 1
# Items calibrating int8's activation scales. NNCF's default is 300; on DINOv2-S over Tux Paint 64 and 300
# pictures gave the same agreement with fp32 (mean cosine 0.9926 and 0.9928), quantising in 24 s and 65 s
# on 2 cores: 128 covers more of a dataset's kinds of item at half the cost of 300.
CALIBRATION_ITEMS = 128
INT8 = "int8"  # the quantised model's folder inside the tower's conversion folder


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mmret").expanduser() / "towers"


class _Pooled(nn.Module):
    """The tower's pooled output alone: the graph a pooled cache needs."""

    def __init__(self, tower: nn.Module, input_name: str):
        super().__init__()
        self.tower, self.input_name = tower, input_name

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:  # `to_onnx` names the positional inputs
        return self.tower(**{self.input_name: inputs[0]}).pooled


def converted_folder(tower: Any, inputs: dict) -> Path:
    (name, x), = inputs.items()
    payload = {"spec": tower.spec, "input": name, "shape": list(x.shape[1:]), "dtype": str(x.dtype),
               "torch": torch.__version__, "format": FORMAT}
    key = hashlib.sha256(json.dumps(payload, sort_keys=True, default=list).encode()).hexdigest()[:16]
    return cache_root() / f"{slug(tower.source.id)}-pooled-{key}"


def worth_trying(tower: Any, inputs: dict, seconds_left: float) -> bool:
    """A runtime is installed and either the tower is converted already or the work left pays for it."""
    if len(inputs) != 1 or not installed_runtimes():
        return False
    return (converted_folder(tower, inputs) / "tower.onnx").is_file() or seconds_left > TRIAL_SECONDS


def convert(tower: Any, inputs: dict) -> Path:
    """The tower's pooled graph as ONNX in the user's cache (converted the first time)."""
    folder = converted_folder(tower, inputs)
    onnx = folder / "tower.onnx"
    if not onnx.is_file():
        (name, x), = inputs.items()
        # torch.export traces with autograd's machinery: outside inference mode, on a normal tensor
        with torch.inference_mode(False), atomic_dir(folder, replace=True) as tmp:
            example = x[:2].cpu().float().clone()
            to_onnx(_Pooled(tower, name).eval(), {name: example}, tmp / "tower.onnx", output="pooled",
                    dynamic={name: (0,)})
    return onnx


class RuntimeTower:
    """inputs -> an output with `.pooled` (float32, on the CPU), run by `backend`."""

    def __init__(self, backend: str, onnx: Path):
        self.backend = backend
        self.run = runtime_session(backend, onnx, compute_threads())

    def __call__(self, **inputs: torch.Tensor) -> Any:
        from mmret.encoders.base import EncoderOutput

        feeds = {k: np.ascontiguousarray(v.detach().cpu().float().numpy()) for k, v in inputs.items()}
        pooled = torch.from_numpy(np.asarray(self.run(feeds), dtype=np.float32))
        return EncoderOutput(pooled, None)


def runtimes(tower: Any, inputs: dict) -> list[RuntimeTower]:
    """Each installed runtime opened on the converted tower (converting it first if need be)."""
    onnx = convert(tower, inputs)
    return [RuntimeTower(backend, onnx) for backend in installed_runtimes()]


def int8_folder(tower: Any, inputs: dict) -> Path:
    return converted_folder(tower, inputs) / INT8


def int8_decision(tower: Any, inputs: dict) -> dict | None:
    """What the first start measured of the int8 model (`record_int8`), if it did."""
    path = int8_folder(tower, inputs) / "decision.json"
    return read_json(path) if path.is_file() else None


def record_int8(tower: Any, inputs: dict, decision: dict) -> None:
    write_json(int8_folder(tower, inputs) / "decision.json", decision)


def int8_installed() -> bool:
    """The runtime's int8 can be tried: its packages are installed and runtimes are not turned off."""
    return runtime_mode() != "torch" and runtime_int8_installed()


def quantize(tower: Any, inputs: dict, calibration: Callable[[int], Iterable[dict]]) -> Path:
    """The tower's int8 OpenVINO model (NNCF post-training quantisation), quantised the first time on
    `calibration(CALIBRATION_ITEMS)`: batches of real inputs, of which the first `CALIBRATION_ITEMS` are used."""
    folder = int8_folder(tower, inputs)
    xml = folder / "tower.xml"
    if xml.is_file():
        return xml
    onnx = convert(tower, inputs)
    import nncf
    import openvino as ov

    items = [np.ascontiguousarray(x[i:i + 1].detach().cpu().float().numpy())
             for batch in calibration(CALIBRATION_ITEMS) for x in batch.values() for i in range(len(x))]
    items = items[:CALIBRATION_ITEMS]
    if not items:
        raise ValueError("no item to calibrate int8 on")
    model = ov.Core().read_model(str(onnx))
    # SmoothQuant and the transformer patterns for towers with attention; a convolutional tower takes the defaults
    transformer = any(op.get_type_name() == "Softmax" for op in model.get_ops())
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.WARNING)  # NNCF reports each quantiser it places at INFO
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # and draws progress bars
            quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items),
                                      model_type=nncf.ModelType.TRANSFORMER if transformer else None)
    finally:
        logger.setLevel(level)
    with atomic_dir(folder, replace=True) as tmp:
        ov.save_model(quantized, str(tmp / "tower.xml"), compress_to_fp16=False)
        write_json(tmp / "quantized.json", {"calibration_items": len(items), "nncf": nncf.__version__,
                                            "openvino": ov.__version__, "transformer": transformer})
    return xml
