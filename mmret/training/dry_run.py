"""`mmret train --dry-run`: the parameter table and the resolved config, without computing
features, reading weights or training. The towers are built on the meta device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mmret.data.prepared import load_dataset
from mmret.errors import MmretError
from mmret.methods import get_method
from mmret.models import PartCount, parameter_table
from mmret.runs import RunConfig
from mmret.runs.config import settle_modality


@dataclass
class DryRun:
    method: str
    rows: list  # PartCount rows: the frozen towers, the model's parts, and the total
    config: dict


def dry_run(cfg: RunConfig) -> DryRun:
    """The parameter table (frozen towers outside the model first) and the resolved config."""
    method = get_method(cfg.method.method, training=True)
    settle_modality(cfg)  # the dataset's, or what the item tower takes when the dataset is not prepared
    try:
        dataset = load_dataset(cfg.data.dataset, cfg.data.data_dir)
    except MmretError:
        dataset = None  # the counts do not depend on the data (a BPE vocabulary is then its configured size)
    context = method.open(cfg, dataset, weights=False)
    with torch.device("meta"):
        model = method.build(cfg, context)
    frozen = [PartCount(part.label, part.parameters, 0) for part in method.frozen_parts(cfg, context)]
    kind = cfg.data.modality  # the item side's parts are named after what it reads ("audio.encoder")
    parts = [PartCount(kind + p.part[4:] if p.part.startswith("item") else p.part, p.total, p.trainable)
             for p in parameter_table(model)]
    total = PartCount("total", parts[-1].total + sum(r.total for r in frozen), parts[-1].trainable)
    return DryRun(method.name, frozen + parts[:-1] + [total], cfg.to_dict())
