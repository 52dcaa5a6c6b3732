"""What every export holds besides its format's files: a model card (`README.md`: what the model is,
how to use the files, the data it was trained on, its scores, its config) and `mmret.json` (the
same as data: the run, the checkpoint's digest, the files), so an export can be traced back to
the run that made it."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from mmret.common.io import atomic_path, write_json
from mmret.common.version import __version__
from mmret.runs.checkpoint import read_meta

HEADLINE = ("r1", "r5", "r10")
SPLIT_ORDER = ["total", "train", "val", "test"]


def scores(model: Any) -> tuple[str, dict[str, float]]:
    """(where they come from, metrics): the run's evaluation on its dataset's test split when
    `mmret eval` wrote one, else the validation scores saved with the checkpoint."""
    test = model.run_dir / "eval" / f"{model.dataset}-test.json"
    if test.is_file():
        try:
            return f"`mmret eval` on the test split of {model.dataset}", json.loads(test.read_text())["metrics"]
        except (OSError, ValueError, KeyError):
            pass
    metrics = read_meta(model.run.checkpoint).get("metrics") or {}
    return f"the validation split of {model.dataset}, when the {model.run.which} checkpoint was saved", metrics


def data_summary(model: Any) -> dict[str, Any]:
    """The dataset's name, source and counts per split, from its dataset.json (when it is still there)."""
    from mmret.common.paths import data_root

    path = data_root(model.config.data.data_dir) / model.dataset / "dataset.json"
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"dataset": model.dataset}
    counts = {split: {k: v for k, v in c.items() if k in ("items", "captions")}
              for split, c in (info.get("counts") or {}).items()}
    return {"dataset": model.dataset, "source": info.get("source"), "counts": counts}


def _table(metrics: dict[str, float], modality: Any) -> str:
    letter, noun = modality.short, modality.noun
    rows = [(f"text → {noun}", "t2" + letter), (f"{noun} → text", letter + "2t")]
    cells = [[f"{metrics[f'{key}_{r}']:.3f}" if f"{key}_{r}" in metrics else "–" for r in HEADLINE] for _, key in rows]
    lines = ["| direction | R@1 | R@5 | R@10 |", "| --- | --- | --- | --- |"]
    return "\n".join(lines + [f"| {name} | {' | '.join(c)} |" for (name, _), c in zip(rows, cells)])


def write_card(model: Any, folder: Path, format: str, about: dict[str, Any]) -> None:
    cfg, modality = model.config, model.modality
    where, metrics = scores(model)
    data = data_summary(model)
    towers = cfg.encoders.model or f"{cfg.encoders.item} ({modality.plural}), {cfg.encoders.text} (text)"
    files = "\n".join(f"- `{name}`: {what}" for name, what in about["files"].items())
    splits = sorted(data.get("counts", {}).items(), key=lambda kv: SPLIT_ORDER.index(kv[0]) if kv[0] in SPLIT_ORDER
                    else len(SPLIT_ORDER))
    counts = "; ".join(f"{split}: {c.get('items', 0):,} {modality.plural}, {c.get('captions', 0):,} captions"
                       for split, c in splits)
    card = f"""# {model.name}

A text–{modality.noun} retrieval model trained with mmret (method `{model.method}`; towers: {towers}),
exported as `{format}`. Captions and {modality.plural} map into one space of {model.dim} dimensions; the
embeddings are L2-normalized, so a dot product is their cosine similarity.

## Files

{files}

## Use

{about["usage"]}

## Data

Trained on `{data['dataset']}`{f" (source: {data['source']})" if data.get("source") else ""}. {counts}

## Scores

On {where}:

{_table(metrics, modality)}

## Config

The run's `config.json`:

```json
{json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=str)}
```
"""
    with atomic_path(folder / "README.md") as tmp:
        tmp.write_text(card, encoding="utf-8")
    write_json(folder / "mmret.json", {
        "format": format, "mmret": __version__, "run": model.name, "method": model.method,
        "modality": modality.name, "dim": model.dim, "checkpoint": model.run.which,
        "checkpoint_digest": model.run.digest, "files": about["files"], "scores": {"from": where, "metrics": metrics},
        "data": data, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})
