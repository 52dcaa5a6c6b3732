"""A torch module (a tower, with its head fused or not) converted to the files an inference runtime
opens: ONNX through `torch.onnx.export` and OpenVINO IR through `openvino.convert_model`.

`to_onnx` uses the exporter built on `torch.export` (PyTorch's default since 2.9; the TorchScript
one is deprecated and bakes some Python numbers into the graph), with the batch (and a text's
length) as dynamic dimensions. `to_openvino` converts that ONNX file, so both runtimes run the one
graph, and saves the weights in float32 (`compress_to_fp16=False`: OpenVINO's default halves them).
OpenVINO on a CPU with bfloat16 units also computes in bfloat16 unless told otherwise: `RUNTIME`
holds the setting that keeps float32, which a caller passes to `compile_model`.

Exports use these for a run's towers; the inference backends (a frozen tower in precompute, a run's
text queries) use them for a tower alone and open the result with `runtime_session`. Both need the
`export` extra (onnx, onnxscript, onnxruntime, openvino). `MMRET_RUNTIME=torch` keeps the backends off.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from mmret.errors import MmretError

RUNTIME = {"INFERENCE_PRECISION_HINT": "f32"}  # OpenVINO compile_model settings that keep float32 on any CPU
OPSET = 18
RUNTIME_ENV = "MMRET_RUNTIME"  # auto (each backend kept by its measured rule) | torch
BACKENDS = ("openvino", "onnxruntime")  # tried in this order


def _need(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MmretError(f"this conversion needs {module} ({e}); install it with: pip install -e \".[export]\"") \
            from None


def to_onnx(module: nn.Module, inputs: dict[str, torch.Tensor], path: Path, *, output: str,
            dynamic: dict[str, tuple[int, ...]]) -> Path:
    """Write `module(*inputs.values())` as an ONNX graph to `path`: inputs named as `inputs`' keys
    (example tensors of the right dtypes), one output `output`; `dynamic[name]` lists the axes of
    that input that vary (0: the batch, 1: a text's length); axes named alike vary together."""
    _need("onnxscript")
    names = {0: "batch", 1: "length"}
    dims = {axis: torch.export.Dim(names.get(axis, f"axis{axis}")) for axes in dynamic.values() for axis in axes}
    shapes = {"inputs": tuple({axis: dims[axis] for axis in dynamic.get(name, ())} for name in inputs)}
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the exporter's notes on axis names and deprecations
            program = torch.onnx.export(module.eval(), tuple(inputs.values()), dynamo=True, input_names=list(inputs),
                                        output_names=[output], dynamic_shapes=shapes, opset_version=OPSET,
                                        verbose=False)
            program.save(str(path))
    except MmretError:
        raise
    except Exception as e:  # the exporter's own errors name the operator it could not convert
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MmretError(f"cannot convert {type(module).__name__} to ONNX: {first[:300]}") from None
    return path


def to_openvino(onnx_path: Path, path: Path) -> Path:
    """OpenVINO IR (`path` .xml and its .bin) of an ONNX file, weights kept in float32."""
    ov = _need("openvino")
    try:
        model = ov.convert_model(str(onnx_path))
        ov.save_model(model, str(path), compress_to_fp16=False)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MmretError(f"cannot convert {onnx_path.name} to OpenVINO: {first[:300]}") from None
    return path


def runtime_mode() -> str:
    value = os.environ.get(RUNTIME_ENV, "auto").strip().lower() or "auto"
    if value not in ("auto", "torch"):
        raise MmretError(f"{RUNTIME_ENV} must be auto or torch, got {value!r}")
    return value


def installed_runtimes() -> list[str]:
    """The runtimes this environment has (with the converter they need), none when turned off."""
    if runtime_mode() == "torch" or importlib.util.find_spec("onnxscript") is None:
        return []
    return [b for b in BACKENDS if importlib.util.find_spec(b) is not None]


def runtime_session(backend: str, onnx: Path, threads: int) -> Callable[[dict[str, Any]], Any]:
    """An ONNX file opened by `backend` on the CPU with `threads` threads: numpy inputs -> the first
    output (a numpy array). Runs one request at a time (a server calls from several threads); OpenVINO
    keeps its default precision (bfloat16 on CPUs with bfloat16 units): callers check its cosine."""
    import numpy as np

    lock = threading.Lock()
    if backend == "onnxruntime":
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.log_severity_level = 3
        session = ort.InferenceSession(str(onnx), options, providers=["CPUExecutionProvider"])

        def run(feeds: dict[str, Any]) -> Any:
            with lock:
                return session.run(None, feeds)[0]
        return run
    import openvino as ov

    core = ov.Core()
    if os.access(onnx.parent, os.W_OK):  # the compiled form kept beside the file: a second start reads
        # it (0.1 s) instead of compiling again (0.6 s for MiniLM); the folder is the model's own
        # (named by its checkpoint or tower), so the blob is never stale
        core.set_property({"CACHE_DIR": str(onnx.parent / "openvino-cache")})
    compiled = core.compile_model(str(onnx), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run_ov(feeds: dict[str, Any]) -> Any:
        with lock:
            return np.array(request.infer(feeds)[0], copy=True)
    return run_ov
