"""A run's text side (its frozen or trained text tower and head, fused) through an inference runtime:
OpenVINO or ONNX Runtime, whichever passes the measured rule, else torch.

A text query is one short sequence through a small transformer, where torch's per-operator overhead
is most of the time (MiniLM, one query: 8.8 ms in torch, 3.8 ms in OpenVINO on a 2-core EPYC; under
load 194 ms vs 8.6 ms); a runtime also imports in a fraction of the time transformers takes. The
side is converted once per checkpoint (`mmret.encoders.convert.to_onnx`, the export's converter)
into `RUN/runtime/text-<checkpoint digest>/` with its tokenizer (`tokenizers`), and a runtime is
kept only if, on a batch of the run's own captions, every embedding has cosine >= 0.999 to torch's
float32 one AND one query is faster; the decision and its numbers are written to `choice.json`, so
later starts neither convert nor measure again. Any failure falls back to torch with its reason.

`MMRET_RUNTIME=torch` turns it off; the runtimes come with the `export` extra.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from mmret.common.io import atomic_dir, write_json
from mmret.common.threads import compute_threads
from mmret.encoders.convert import BACKENDS, RUNTIME_ENV, installed_runtimes, runtime_mode, runtime_session
from mmret.errors import MmretError

__all__ = ["BACKENDS", "RUNTIME_ENV", "Choice", "TextRuntime", "allow_conversion", "choose", "folder_of",
           "text_runtime"]

_logger = logging.getLogger(__name__)

MIN_COSINE = 0.999
FORMAT = 1
EXAMPLE_TEXTS = ["a caption to trace the graph with", "two"]  # a batch of 2: torch.export keeps 0 and 1 fixed


@dataclass
class Choice:
    backend: str  # openvino | onnxruntime | torch
    reason: str  # one line, e.g. "openvino: cosine 0.99998 to torch float32, 3.8 ms vs 8.8 ms a query"
    cosine: dict[str, float] = field(default_factory=dict)  # backend -> min cosine to torch float32
    ms: dict[str, float] = field(default_factory=dict)  # backend (and torch) -> median ms for one query
    pretrained_words: bool = True  # the run knows words beyond its captions (no unknown-word notes needed)
    format: int = FORMAT


_converting = threading.local()  # True inside `allow_conversion()`


@contextlib.contextmanager
def allow_conversion() -> Iterator[None]:
    """Text queries inside this block may convert the run's text side for a runtime (about 20 s on a
    2-core CPU). Only a process that answers many queries pays that back: `mmret serve` converts at
    start; a search, an eval or a Python call uses a runtime already converted, and torch otherwise."""
    before = getattr(_converting, "allowed", False)
    _converting.allowed = True
    try:
        yield
    finally:
        _converting.allowed = before


def folder_of(run_dir: Path, digest: str) -> Path:
    return Path(run_dir) / "runtime" / f"text-{digest[:16]}"


class TextRuntime:
    """Texts -> (Q, D) normalized float32 embeddings through the converted text side."""

    def __init__(self, folder: Path, choice: Choice):
        from tokenizers import Tokenizer

        self.folder, self.choice = folder, choice
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.run = runtime_session(choice.backend, folder / "text.onnx", compute_threads())

    def inputs(self, texts: list[str]) -> dict[str, np.ndarray]:
        encoded = self.tokenizer.encode_batch(list(texts))
        return {"input_ids": np.array([e.ids for e in encoded], dtype=np.int64),
                "attention_mask": np.array([e.attention_mask for e in encoded], dtype=np.int64)}

    def __call__(self, texts: list[str]) -> np.ndarray:
        return np.asarray(self.run(self.inputs(texts)), dtype=np.float32)


def read_choice(folder: Path) -> Choice | None:
    try:
        data = json.loads((folder / "choice.json").read_text(encoding="utf-8"))
        choice = Choice(**data)
    except (OSError, ValueError, TypeError):
        return None
    return choice if choice.format == FORMAT else None


def text_runtime(run: Any, convert: bool = True) -> TextRuntime | None:
    """The runtime for `run`'s text queries (a `LoadedRun`), or None for torch: converted and measured
    on first use when `convert`, the recorded decision afterwards."""
    if runtime_mode() == "torch":
        return None
    folder = folder_of(run.run_dir, run.digest)
    choice = read_choice(folder)
    if choice is None:
        if not convert or not getattr(_converting, "allowed", False) or not installed_runtimes():
            return None
        try:
            choice = choose(run, folder)
        except Exception as e:  # noqa: BLE001 - the query is answered all the same, by torch
            _logger.warning("text queries run in torch: converting %s failed (%s)", run.name,
                            (str(e) or repr(e)).splitlines()[0])
            return None
    if choice.backend == "torch":
        return None
    try:
        return TextRuntime(folder, choice)
    except Exception as e:  # noqa: BLE001 - a runtime that no longer opens (an upgrade): torch answers
        _logger.warning("text queries run in torch: %s cannot open %s (%s)", choice.backend, folder, e)
        return None


def _texts(run: Any, n: int = 32) -> list[str]:
    """A real batch: the run's own captions (its dataset's), else the tracing examples."""
    from mmret.data.prepared import load_dataset

    try:
        captions = load_dataset(run.cfg.data.dataset, run.cfg.data.data_dir).captions["caption"]
        return [str(c) for c in captions.head(n)] or EXAMPLE_TEXTS
    except MmretError:
        return EXAMPLE_TEXTS


def _median_ms(fn: Callable[[], Any], rounds: int = 15) -> float:
    fn()  # warm up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def _cosines(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-12
    return float((num / den).min())


def choose(run: Any, folder: Path) -> Choice:
    """Convert the run's text side, measure each installed runtime against torch float32 on a real
    batch and one query, and record the decision in `folder`."""
    import torch

    from mmret.encoders.convert import to_onnx

    fused = run.fused("text")
    tokenize = run.tokenizer()
    texts = _texts(run)
    pretrained_words = run.method.vocabulary(run.cfg, run.model(("text",))[0]) is None
    with atomic_dir(folder, replace=True) as tmp:
        try:
            example = tokenize(EXAMPLE_TEXTS)
            to_onnx(fused, {k: example[k].cpu() for k in ("input_ids", "attention_mask")}, tmp / "text.onnx",
                    output="text_embeds", dynamic={"input_ids": (0, 1), "attention_mask": (0, 1)})
            run.standalone_tokenizer().save(str(tmp / "tokenizer.json"))
        except Exception as e:  # noqa: BLE001 - no runtime for this run: torch answers, and we say why once
            choice = Choice("torch", f"torch: the text side does not convert ({str(e).splitlines()[0][:200]})",
                            pretrained_words=pretrained_words)
            write_json(tmp / "choice.json", asdict(choice))
            return choice
        with torch.inference_mode():
            device = next(iter(fused.parameters())).device
            def reference(batch: list[str]) -> np.ndarray:
                t = tokenize(batch)
                return fused(t["input_ids"].to(device), t["attention_mask"].to(device)).float().cpu().numpy()
            expected = reference(texts)
            ms = {"torch": _median_ms(lambda: reference(texts[:1]))}
        cosine: dict[str, float] = {}
        for backend in installed_runtimes():
            try:
                runtime = TextRuntime(tmp, Choice(backend, ""))
                cosine[backend] = _cosines(runtime(texts), expected)
                ms[backend] = _median_ms(lambda: runtime(texts[:1]))
            except Exception as e:  # noqa: BLE001 - one runtime failing leaves the others
                _logger.info("%s cannot run %s: %s", backend, folder.name, e)
        passed = [b for b in cosine if cosine[b] >= MIN_COSINE and ms[b] < ms["torch"]]
        best = min(passed, key=ms.get) if passed else "torch"
        shown = ", ".join(f"{b} cosine {cosine[b]:.5f} {ms[b]:.1f} ms" for b in cosine)
        reason = (f"{best}: cosine {cosine[best]:.5f} to torch float32 >= {MIN_COSINE}, {ms[best]:.1f} ms vs torch "
                  f"{ms['torch']:.1f} ms a query" if best != "torch" else
                  f"torch ({ms['torch']:.1f} ms a query): no runtime both >= {MIN_COSINE} cosine and faster "
                  f"({shown or 'none installed'})")
        choice = Choice(best, reason, cosine, ms, pretrained_words)
        write_json(tmp / "choice.json", asdict(choice))
    return choice
