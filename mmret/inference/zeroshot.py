"""The run folder that stands for a pretrained CLIP or CLAP evaluated as it is (`--zero-shot clip-b32`):
a config naming the model for both towers and the `zeroshot` method, and an empty checkpoint, so
eval and search treat it as any run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmret.common.paths import slug
from mmret.data.prepared import load_dataset
from mmret.methods import config_for
from mmret.runs import RunConfig, create_run_dir
from mmret.runs.config import DataConfig, EncoderConfig


def zero_shot_run(model: str, dataset: str | None, data_dir: Any = None, runs_dir: Any = None) -> Path:
    """The run folder for `model` on `dataset` (made on first use). Without a dataset the items'
    modality is the one the model's item tower reads (a picture tower unless it says otherwise)."""
    from safetensors.torch import save_file

    from mmret.encoders import tower_modality

    if dataset is not None:
        modality = load_dataset(dataset, data_dir).modality.name
    else:
        modality = tower_modality(model) or "image"
    data = DataConfig(data_dir=data_dir, modality=modality, **({"dataset": dataset} if dataset else {}))
    cfg = RunConfig(name=f"zeroshot-{slug(model)}", runs_dir=runs_dir, data=data,
                    encoders=EncoderConfig(item=model, text=model), method=config_for("zeroshot"))
    path = cfg.runs_dir / cfg.name
    if not (path / "config.json").is_file():
        path = create_run_dir(cfg, latest=False)
    best = path / "checkpoints" / "best.safetensors"
    if not best.is_file():
        best.parent.mkdir(parents=True, exist_ok=True)
        save_file({}, str(best), metadata={"mmret": '{"zero_shot": true}'})
    return path
