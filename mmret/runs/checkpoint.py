"""Checkpoints in safetensors, never pickle: trainable weights only, plus optimizer, scheduler
and RNG state for an exact resume.

`<stem>.safetensors` holds the trainable parameters (and the buffers of modules that train),
with the step and metrics as metadata; `<stem>.state.safetensors` holds the optimizer tensors
and RNG states, with everything that is not a tensor as JSON metadata. Each file is written
under a temporary name and renamed, and both carry the step so a torn pair is detected.

Checkpoints written before the item side had its own name hold `image_tower.*`; they load under
today's names (`RENAMED`), after their digest is checked against the names they were written with.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from mmret.errors import MmretError
from mmret.common.io import atomic_path, damaged


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that train, and the persistent buffers of modules that own such parameters."""
    state = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    for mod_name, module in model.named_modules():
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        for buf_name, buf in module.named_buffers(recurse=False):
            if buf_name not in module._non_persistent_buffers_set:
                state[f"{mod_name}.{buf_name}" if mod_name else buf_name] = buf.detach()
    return state


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    """A digest of every tensor's name and bytes: a checkpoint changed after it was written is caught."""
    import hashlib

    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        h.update(name.encode() + b"\0")
        t = tensors[name].contiguous().reshape(-1)  # 1-d, so the byte view works for scalars too
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _save(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, Any]) -> None:
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"mmret": json.dumps(meta), "mmret_digest": _digest(tensors)})


def _load(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint, checked against the digest written with them (when it has one)."""
    tensors = _read(path, load_file)
    recorded = _read(path, _recorded_digest)
    if recorded is not None and _digest(tensors) != recorded:
        raise damaged(path, "its tensors do not match the checksum written with them", FIX)
    return tensors


FIX = "use the run's other checkpoint (--checkpoint best or last) or train the run again"
RENAMED = {"image_tower.": "item_tower."}  # an earlier name of a module -> its name now


def current_names(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with every name that starts with an earlier module name (`RENAMED`) renamed."""
    out = {}
    for name, tensor in tensors.items():
        old = next((o for o in RENAMED if name.startswith(o)), None)
        out[RENAMED[old] + name[len(old):] if old else name] = tensor
    return out


def _read(path: Path, fn: Any) -> Any:
    """`fn(path)` on a safetensors file; anything but safetensors with our metadata (a truncated file,
    a pickle put in its place) is a `DamagedFile` naming it. Nothing is ever unpickled."""
    try:
        return fn(str(path))
    except FileNotFoundError:
        raise
    except Exception as e:  # safetensors raises its own SafetensorError, json a ValueError
        raise damaged(path, f"not a readable safetensors checkpoint: {str(e).splitlines()[0][:200]}", FIX) from None


def _meta(file: str) -> dict[str, Any]:
    with safe_open(file, "pt") as f:
        return json.loads((f.metadata() or {}).get("mmret", "{}"))


def _recorded_digest(file: str) -> str | None:
    with safe_open(file, "pt") as f:
        return (f.metadata() or {}).get("mmret_digest")


def read_meta(path: Path) -> dict[str, Any]:
    return _read(path, _meta)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file, checked against the digest written with it (a
    `DamagedFile` when any byte changed), and its metadata readable."""
    read_meta(path)
    return _load(path)


def save_weights(model: nn.Module, path: Path, meta: dict[str, Any]) -> None:
    _save(trainable_state(model), path, meta)


def load_weights(model: nn.Module, path: Path) -> dict[str, Any]:
    """Load trainable weights saved by `save_weights`; every trainable tensor must be present.
    Parts of the model built on the meta device (a tower a query does not need) are left as they are."""
    if not path.is_file():
        raise MmretError(f"no checkpoint at {path}")
    weights = current_names(_load(path))
    expected = trainable_state(model)
    missing, unexpected = set(expected) - set(weights), set(weights) - set(expected)
    if missing or unexpected:
        some = sorted(missing or unexpected)[:3]
        raise MmretError(f"checkpoint {path} does not fit this model ({'missing' if missing else 'unexpected'} "
                         f"{', '.join(some)}); was it made with another configuration?")
    wrong = [k for k in sorted(weights) if not expected[k].is_meta and weights[k].shape != expected[k].shape]
    if wrong:
        k = wrong[0]
        raise MmretError(f"checkpoint {path} does not fit this model ({k} is {tuple(weights[k].shape)} there, "
                         f"{tuple(expected[k].shape)} here); was it made with another configuration?")
    model.load_state_dict({k: v for k, v in weights.items() if not expected[k].is_meta}, strict=False)
    return read_meta(path)


# ---------------------------------------------------------------- optimizer and RNG state


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    np_state = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    py = random.getstate()
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    name, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, state, py_gauss = meta["python"]
    random.setstate((version, tuple(state), py_gauss))
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_state(optimizer: torch.optim.Optimizer, path: Path, meta: dict[str, Any]) -> None:
    """Optimizer tensors and RNG state; `meta` (step, epoch, scaler, best...) goes in as JSON."""
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, slots in opt["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optim.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    rng_tensors, rng_meta = rng_state()
    tensors.update(rng_tensors)
    _save(tensors, path, {**meta, "param_groups": opt["param_groups"], "optim_scalars": scalars, "rng": rng_meta})


def load_state(optimizer: torch.optim.Optimizer, path: Path) -> dict[str, Any]:
    """Restore what `save_state` wrote (optimizer and RNG); returns the JSON metadata."""
    tensors, meta = _load(path), read_meta(path)
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, idx, slot = key.split(".", 2)
            state.setdefault(int(idx), {})[slot] = value
    for key, value in meta["optim_scalars"].items():
        idx, slot = key.split(".", 1)
        state.setdefault(int(idx), {})[slot] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    set_rng_state(tensors, meta["rng"])
    return meta


# ---------------------------------------------------------------- saying which


def checkpoint_line(run_dir: Path, which: str = "best") -> tuple[str, bool]:
    """(one line, whether the run finished): the run, which of its checkpoints a command uses and
    from when, and whether the run finished (a stopped run's best is not the best it would reach).
    A pretrained model evaluated as it is has no training to speak of: it counts as finished."""
    from mmret.runs.folders import checkpoint_path, load_run_config

    meta = read_meta(checkpoint_path(run_dir, which))
    if "epoch" not in meta:
        return f"run {run_dir.name}", True
    score = meta.get("metrics", {}).get("mean_recall")
    line = (f"run {run_dir.name}, its {which} checkpoint (epoch {meta['epoch']}, step {meta.get('step', 0):,}"
            + (f", val mean recall {score:.3f})" if score is not None else ")"))
    state = run_dir / "checkpoints" / "last.state.safetensors"
    loop = read_meta(state).get("loop", {}) if state.is_file() else {}
    if loop.get("finished"):
        return f"{line}; the run ended after {loop.get('epoch', '?')} epochs: {loop['finished']}", True
    epochs = load_run_config(run_dir).train.epochs
    return (f"{line}; the run stopped at epoch {loop.get('epoch', '?')} of {epochs} without finishing "
            f"(`mmret train --resume {run_dir.name}` goes on)"), False
