"""Running a frozen tower over batches as fast as the machine allows, in the cache's precision.

A tower runs in one of three forms:
  eager     the tower as loaded, under autocast for bf16/fp16 (`mmret.common.device`);
  compiled  torch.compile with the inductor backend and its weights frozen as constants, so that
            oneDNN prepacks them for AMX / AVX-512 and fuses the pointwise work into the matrix
            multiplies, at a fixed batch size (a short last batch is padded); for bf16 the tower's
            weights are cast to bfloat16 first, so attention runs as a bfloat16 SDPA kernel;
  runtime   the tower in an inference runtime (`mmret.features.backend`): OpenVINO or ONNX Runtime
            for fp32/bf16, OpenVINO's int8 model quantised by NNCF for int8;
  int8      the linear layers quantised to int8 (PT2E quantisation with torchao's
            X86InductorQuantizer: int8 weights per channel, activations quantised per batch),
            compiled the same way, the rest in bfloat16 where that is native; oneDNN runs the int8
            products on AMX or VNNI.

What is chosen, all on the first batch of a run, against its float32 output:
  precision  `auto` tries bf16 against fp32 (`choose_inference_precision`: cosine >= 0.999 and
             faster); an explicit precision is used as asked (its cosine is recorded);
  compile    True compiles; None (auto) compiles on a CPU when the eager work left would take
             longer than `AUTO_COMPILE_SECONDS`, since a compile costs a minute or two once;
  int8       asked for: the runtime's int8 (NNCF, calibrated on real items of the dataset) when OpenVINO
             and NNCF are installed, the tower's pooled output is all that is cached and compile is not
             forced, kept when it passes the rule (`mmret.common.device.agrees`: cosine to fp32, on this
             batch) and is faster than torch's eager bf16 (torch's own int8 measured 1.05x its compiled
             bf16 on a 2-core EPYC, so eager bf16 stands in for it without a compile); what was measured
             is saved beside the quantised model, so a later start reuses the verdict. Otherwise torch's
             PT2E int8, always compiled, used as asked. Under `auto` PT2E int8 is also tried once the compiled tower
             runs, when the work left is at least `INT8_TRIAL_RATIO` times the compile that a
             trial costs, and kept only when its cosine to fp32 is >= 0.999 and it is faster.
A compiled or quantised form that fails, or disagrees with fp32, leaves the run in the last
form that worked.

Why this int8 path (DINOv2-S, one thread of a shared, busy 2-core AMX machine, so roughly;
model GFLOP/s per CPU second, worst cosine to fp32). Full model: bf16 compiled 484 (0.9994);
PT2E static int8 with X86InductorQuantizer 388 (0.67: per-tensor activation scales clip DINOv2's
outliers); torchao's int8 dynamic-activation config 235 (0.995); torch.ao quantize_dynamic
(fbgemm) 127 (0.92). A 2-layer cut: bf16 compiled 392-478, PT2E dynamic int8 with bf16 for the
rest 333 (fp32 for the rest 202), ONNX Runtime dynamic quantisation 160 (MLAS, no AMX). PT2E
dynamic's worst cosine on Tux Paint pictures was 0.997, the best of the int8 paths. So int8 is
PT2E dynamic: the most accurate, on oneDNN's AMX int8 kernels, and inside torch (no export to
another runtime). On this CPU it is still slower than bf16: ViT-S's 384-wide products are too
small for int8 to gain much (oneDNN's int8 GEMMs at its shapes ran 0.6-1.6x its bf16 ones) while
attention, GELU and the quantisation itself remain, so `auto` keeps bf16 here. Nor does it pass
the retrieval check (`benchmarks/int8_recall.py`, Tux Paint, one heads run): cosine to fp32 0.9946
on the first batch, and Recall@1/5/10 up to 1.12 points below the same run on bf16 features.
OpenVINO's int8 from NNCF (static activation scales, `benchmarks/int8_recall.py --form runtime`, 2-core
EPYC with VNNI, no AMX) ran 1.51x OpenVINO's bf16 but at cosine 0.9773 and up to 2.04 points of recall,
so the rule sends `--precision int8` on DINOv2-S to PT2E; a tower that quantises better keeps it.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from typing import Any, Callable, Iterable

import torch

from mmret.common import device as _device
from mmret.common.device import (
    PrecisionChoice,
    agrees,
    autocast_context,
    choose_inference_precision,
    cosine_bound,
    min_cosine,
    synchronize,
)

_logger = logging.getLogger(__name__)

AUTO_COMPILE_SECONDS = 300.0  # eager work left (CPU) above which compiling pays for itself
INT8_TRIAL_RATIO = 10.0  # auto tries int8 only when the work left is this many compiles long


def forward(tower: Any, inputs: dict, device: torch.device, precision: str) -> Any:
    """One eager batch in `precision` (int8 has no eager form: it runs as fp32 here)."""
    with torch.inference_mode(), autocast_context(device, "fp32" if precision == "int8" else precision):
        return tower(**inputs)


def _clock(device: torch.device) -> float:
    """CPU time on a CPU (other programs on shared cores inflate it far less than wall time)."""
    synchronize(device)
    return time.perf_counter() if device.type == "cuda" else time.process_time()


class _Cast(torch.nn.Module):
    """A tower whose floating-point inputs are cast to its own dtype (bfloat16 weights)."""

    def __init__(self, tower: torch.nn.Module, dtype: torch.dtype):
        super().__init__()
        self.tower, self.dtype = tower, dtype

    def forward(self, **inputs: torch.Tensor) -> Any:
        return self.tower(**{k: v.to(self.dtype) if v.is_floating_point() else v for k, v in inputs.items()})


def quantize_int8(tower: torch.nn.Module, inputs: dict) -> torch.nn.Module:
    """The tower with int8 linear layers (PT2E quantisation for the x86 inductor backend: weights
    per output channel, activations per batch, so no calibration set), traced on `inputs`; run it
    through torch.compile (with freezing) to get oneDNN's int8 kernels.

    Dynamic rather than static activation scales: on DINOv2-S over Tux Paint pictures, static
    scales calibrated on a batch gave a worst cosine to fp32 of 0.94 (the MLP's second layer sees
    outliers a fixed scale clips), dynamic ones 0.997."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    # linear layers only: they hold nearly all of a transformer's work, and quantised convolutions
    # fail to compile for some towers (no fake kernel for onednn.qconv_prepack)
    config = get_default_x86_inductor_quantization_config(is_dynamic=True)
    quantizer = X86InductorQuantizer().set_module_type_qconfig(torch.nn.Linear, config)
    with torch.no_grad():
        graph = torch.export.export(tower, (), dict(inputs)).module()
        prepared = prepare_pt2e(graph, quantizer)
        prepared(**inputs)  # weight observers see the weights
        return convert_pt2e(prepared)


def choose_precision(tower: Any, inputs: dict, device: torch.device,
                     requested: str = "auto") -> tuple[PrecisionChoice, dict[str, Any]]:
    """Try a real batch in fp32 and bf16/fp16 (`choose_inference_precision`); returns the choice
    and every output, so that none is computed twice."""
    outputs: dict[str, Any] = {}

    def run(p: str) -> torch.Tensor:
        outputs[p] = forward(tower, inputs, device, p)
        return outputs[p].pooled

    choice = choose_inference_precision(run, device, requested,
                                        warmup=lambda p: forward(tower, _slice(inputs, 2), device, p))
    return choice, outputs


class TowerRunner:
    """Encodes batches in the cache's precision (`manifest["precision"]`, decided here on the first
    batch when None), switching to a compiled or int8 form as the module docstring says."""

    def __init__(self, tower: Any, device: torch.device, manifest: dict, compile: bool | None, batch_size: int,
                 rows_left: int, status: Callable[[str], None] | None = None, pooled_only: bool = False,
                 calibration: Callable[[int], Iterable[dict]] | None = None):
        self.tower, self.device, self.manifest, self.batch_size = tower, device, manifest, batch_size
        self.calibration = calibration  # n -> batches of real inputs spread over the rows (int8's scales)
        self.want_compile, self.rows_left, self.pooled_only = compile, rows_left, pooled_only
        self.compiled: Any = None  # the compiled (or int8) tower, once it runs
        self.runtime: Any = None  # the tower in an inference runtime (`mmret.features.backend`), once kept
        self.status = status or (lambda note: None)
        self.first = True

    @property
    def precision(self) -> str:
        return self.manifest["precision"]

    def __call__(self, inputs: dict) -> Any:
        n = len(next(iter(inputs.values())))
        if self.first:
            self.first = False
            out = self._first_batch(inputs)
        elif self.runtime is not None:
            out = self.runtime(**inputs)
        else:
            out = self._run_compiled(inputs) if self.compiled is not None else self._eager(inputs)
        self.rows_left -= n
        return out

    def _eager(self, inputs: dict) -> Any:
        return forward(self.tower, inputs, self.device, self.precision)

    def _first_batch(self, inputs: dict) -> Any:
        """Decide the precision and the form on this batch; return its output in the chosen one."""
        n = len(next(iter(inputs.values())))
        if self.precision == "int8":
            return self._first_int8(inputs)
        auto = self.precision is None
        outputs: dict[str, Any] = {}
        seconds: dict[str, float] = {}  # CPU time of the eager batch per precision
        if auto:
            choice, outputs = choose_precision(self.tower, inputs, self.device)
            self.manifest["precision"], self.manifest["precision_reason"] = choice.precision, choice.reason
            seconds.update(choice.timings)
            _logger.info("precision for %s: %s", self.tower.name, choice.reason)
        eager = self.precision
        checked = self.want_compile is not False  # a form to check against fp32
        for p in dict.fromkeys(["fp32", eager] if checked else [eager]):
            if p not in seconds:
                start = _clock(self.device)
                outputs[p] = forward(self.tower, inputs, self.device, p)
                seconds[p] = _clock(self.device) - start
        reference = outputs.get("fp32")
        out = outputs[eager]
        if self.pooled_only and self.device.type == "cpu" and self.precision in ("fp32", "bf16"):
            kept = self._try_runtime(inputs, outputs, eager, seconds[eager] * self.rows_left / n)
            if kept is not None:
                return kept
        compile = self.want_compile
        if compile is None:
            compile = self.device.type == "cpu" and seconds[eager] * self.rows_left / n > AUTO_COMPILE_SECONDS
        if compile:
            started = self._start(inputs, reference, self.precision)
            if started is not None:
                out, compile_seconds, batch_seconds = started
                if auto and self._int8_worth_trying(compile_seconds, batch_seconds, n):
                    out = self._try_int8(inputs, reference, out, batch_seconds)
        return out

    def _first_int8(self, inputs: dict) -> Any:
        """int8 asked for: the runtime's when it is kept, else torch's (PT2E), else fp32."""
        out, reference = self._try_runtime_int8(inputs)
        if out is not None:
            return out
        if reference is None:
            reference = forward(self.tower, inputs, self.device, "fp32")
        started = self._start(inputs, reference, "int8")
        if started is not None:
            return started[0]
        self.manifest["precision"] = "fp32"
        self.manifest["precision_reason"] += "; int8 failed, fp32 instead"
        return reference

    def _try_runtime_int8(self, inputs: dict) -> tuple[Any, Any]:
        """The tower quantised by NNCF and run by OpenVINO (`mmret.features.backend.quantize`), kept by the
        rule and when faster than torch's eager bf16 (fp32 without bf16), or as a saved verdict says.
        Returns (its output or None, the fp32 output when it was computed)."""
        from mmret.features import backend

        if not (self.pooled_only and self.device.type == "cpu" and self.want_compile is not True
                and len(inputs) == 1 and backend.int8_installed()):
            return None, None
        bound = cosine_bound("int8")
        decision = backend.int8_decision(self.tower, inputs)
        if decision is not None and decision.get("bound") == bound:  # measured by an earlier start
            if not decision["kept"]:
                self.manifest["precision_reason"] += f"; not the runtime's int8: {decision['reason']}"
                return None, None
            try:
                self.runtime = backend.RuntimeTower("openvino", backend.int8_folder(self.tower, inputs) / "tower.xml")
                out = self.runtime(**inputs)
            except Exception as e:  # noqa: BLE001 - a model that no longer opens: torch's int8
                _logger.warning("the int8 model of %s failed: %s", self.tower.name, str(e).splitlines()[0])
                self.runtime = None
                return None, None
            self.manifest["backend"] = "openvino"
            self.manifest["precision_reason"] += f"; {decision['reason']} (measured before)"
            return out, None
        self.status("quantising to int8 for an inference runtime")
        try:
            candidate = backend.RuntimeTower("openvino", backend.quantize(self.tower, inputs,
                                                                          self.calibration or (lambda n: [inputs])))
            candidate(**inputs)  # the first call builds the runtime's kernels
            start = time.perf_counter()
            out = candidate(**inputs)
            seconds = time.perf_counter() - start
        except Exception as e:  # noqa: BLE001 - no converter, an op NNCF or OpenVINO refuses: torch's int8
            _logger.warning("no runtime int8 for %s: %s", self.tower.name, (str(e) or repr(e)).splitlines()[0])
            return None, None
        finally:
            self.status("")
        reference = forward(self.tower, inputs, self.device, "fp32")
        against = "bf16" if _device.bf16_supported(self.device) else "fp32"
        forward(self.tower, _slice(inputs, 2), self.device, against)  # one-time kernel setup, untimed
        start = time.perf_counter()
        forward(self.tower, inputs, self.device, against)
        torch_seconds = time.perf_counter() - start
        cosine = min_cosine(reference.pooled, out.pooled)
        close = agrees("int8", cosine)
        kept = close and seconds < torch_seconds
        reason = (f"openvino int8 (NNCF): cosine to fp32 {cosine:.4f} {'>=' if close else '<'} "
                  f"{bound}, {torch_seconds / seconds:.2f}x torch {against}")
        backend.record_int8(self.tower, inputs, {"kept": kept, "cosine": cosine, "speedup": torch_seconds / seconds,
                                                 "against": against, "bound": bound, "reason": reason})
        if not kept:
            _logger.info("the runtime's int8 is not kept for %s: %s", self.tower.name, reason)
            self.manifest["precision_reason"] += f"; not the runtime's int8: {reason}"
            return None, reference
        self.runtime = candidate
        self.manifest["backend"] = "openvino"
        self.manifest["precision_reason"] += f"; {reason}"
        return out, reference

    def _try_runtime(self, inputs: dict, outputs: dict, eager: str, seconds_left: float) -> Any:
        """Keep an inference runtime's form of the tower (`mmret.features.backend`) when it agrees with
        fp32 on this batch and is faster than torch's `eager` form; its output, or None."""
        from mmret.features import backend

        if self.want_compile is True or not backend.worth_trying(self.tower, inputs, seconds_left):
            return None
        reference = outputs["fp32"] if "fp32" in outputs else forward(self.tower, inputs, self.device, "fp32")
        self.status("converting for an inference runtime")
        try:
            candidates = backend.runtimes(self.tower, inputs)
        except Exception as e:  # noqa: BLE001 - no converter, an op it cannot convert: torch encodes
            _logger.warning("no inference runtime for %s: %s", self.tower.name, (str(e) or repr(e)).splitlines()[0])
            return None
        finally:
            self.status("")
        start = time.perf_counter()
        forward(self.tower, inputs, self.device, eager)
        torch_seconds, best = time.perf_counter() - start, None
        for candidate in candidates:
            try:
                candidate(**inputs)  # the first call builds the runtime's kernels
                start = time.perf_counter()
                out = candidate(**inputs)
                seconds = time.perf_counter() - start
            except Exception as e:  # noqa: BLE001 - one runtime failing leaves the others and torch
                _logger.warning("%s failed on %s: %s", candidate.backend, self.tower.name, str(e).splitlines()[0])
                continue
            cosine = min_cosine(reference.pooled, out.pooled)
            _logger.info("%s on %s: cosine %.5f, %.2fs vs torch %s %.2fs", candidate.backend, self.tower.name, cosine,
                         seconds, eager, torch_seconds)
            if agrees(eager, cosine) and seconds < torch_seconds and (best is None or seconds < best[2]):
                best = (candidate, out, seconds, cosine)
        if best is None:
            return None
        self.runtime, out, seconds, cosine = best
        self.manifest["backend"] = self.runtime.backend
        bound = cosine_bound(eager)
        self.manifest["precision_reason"] += (f"; {self.runtime.backend}: cosine to fp32 {cosine:.4f} >= {bound}, "
                                              f"{torch_seconds / seconds:.2f}x torch {eager}")
        return out

    def _int8_worth_trying(self, compile_seconds: float, batch_seconds: float, n: int) -> bool:
        work_left = batch_seconds * self.rows_left / max(n, 1)
        worth = work_left > INT8_TRIAL_RATIO * compile_seconds
        return worth and _device.int8_supported(self.device) and _device.torch_int8_installed()  # a PT2E trial

    def _try_int8(self, inputs: dict, reference: Any, out: Any, seconds: float) -> Any:
        """Keep the int8 form when it agrees with fp32 and beats the compiled tower on this batch."""
        kept = self.compiled
        started = self._start(inputs, reference, "int8", record=False)
        if started is None:
            self.compiled = kept
            return out
        int8_out, _, int8_seconds = started
        cosine = min_cosine(reference.pooled, int8_out.pooled)
        if agrees("int8", cosine) and int8_seconds < seconds:
            self.manifest["precision_reason"] = (f"int8: cosine to fp32 {cosine:.4f} >= {cosine_bound('int8')}, "
                                                 f"{seconds / int8_seconds:.2f}x the compiled {self.precision}")
            self.manifest["precision"] = "int8"
            return int8_out
        _logger.info("int8 tried and not kept: cosine %.4f, %.2fx the compiled tower", cosine,
                     seconds / max(int8_seconds, 1e-9))
        self.compiled = kept
        return out

    def _build(self, inputs: dict, precision: str) -> Any:
        if precision == "int8":
            tower = quantize_int8(self.tower, self._padded(inputs))
        elif precision == "bf16" and self.device.type == "cpu":
            tower = _Cast(copy.deepcopy(self.tower).to(torch.bfloat16), torch.bfloat16)
        else:
            tower = self.tower
        return torch.compile(tower, dynamic=False)

    def _start(self, inputs: dict, reference: Any, precision: str, record: bool = True) -> tuple | None:
        """Build and compile the tower's `precision` form and run this batch through it twice (the
        second run is timed). Returns (output, compile seconds, batch seconds), or None when it fails
        or (for the float forms) disagrees with fp32."""
        self.status("compiling" if precision != "int8" else "quantising to int8")
        start = time.perf_counter()
        try:
            self.compiled = self._build(inputs, precision)
            self._run_compiled(inputs, precision)
            compile_seconds = time.perf_counter() - start
            begin = _clock(self.device)
            out = self._run_compiled(inputs, precision)
            seconds = _clock(self.device) - begin
        except Exception as e:  # no C++ compiler, no torchao, an unsupported op, ...: eager still works
            _logger.warning("%s failed, encoding without it: %s", "int8 quantisation" if precision == "int8"
                            else "torch.compile", (str(e) or repr(e)).splitlines()[0])
            self.compiled = None
            return None
        finally:
            self.status("")
        cosine = min_cosine(reference.pooled, out.pooled)
        if precision != "int8" and not agrees(precision, cosine):
            _logger.warning("the compiled tower disagrees with fp32 (cosine %.4f); encoding without it", cosine)
            self.compiled = None
            return None
        if record:
            form = "int8, compiled" if precision == "int8" else "compiled"
            self.manifest["precision_reason"] += f"; {form}, cosine to fp32 {cosine:.4f}"
            if precision == "int8" and not agrees("int8", cosine):
                _logger.warning("int8 features differ from fp32 more than the auto check allows (cosine %.4f)", cosine)
        return out, compile_seconds, seconds

    def _padded(self, inputs: dict) -> dict:
        n = len(next(iter(inputs.values())))
        if n >= self.batch_size:
            return inputs
        return {k: torch.cat([v, v.new_zeros(self.batch_size - n, *v.shape[1:])]) for k, v in inputs.items()}

    def _run_compiled(self, inputs: dict, precision: str | None = None) -> Any:
        n = len(next(iter(inputs.values())))
        precision = precision or self.precision
        run_as = precision if self.device.type == "cuda" else "fp32"  # CPU float forms carry their own dtypes
        if precision == "int8" and _device.bf16_supported(self.device):
            run_as = "bf16"  # what is not int8 runs in bfloat16 (oneDNN's int8-mixed-bf16)
        import torch._inductor.config

        # freezing set globally while compiling: passed as a torch.compile option, the int8 passes miss it
        with torch._inductor.config.patch(freezing=True), warnings.catch_warnings():
            # inductor's int8 folding
            warnings.filterwarnings("ignore", message=".*torch.tensor.*", category=UserWarning)
            out = forward(self.compiled, self._padded(inputs), self.device, run_as)
        return type(out)(*(t[:n].float() if t is not None and t.is_floating_point() else
                           (t[:n] if t is not None else None) for t in out))


def _slice(inputs: dict, n: int) -> dict:
    return {k: v[:n] for k, v in inputs.items()}
