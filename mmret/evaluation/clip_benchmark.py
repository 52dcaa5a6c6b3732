"""Results in CLIP_benchmark's JSON schema (`mmret eval --format clip-benchmark`), so mmret runs
sit in the same tables as the models people compare against.

CLIP_benchmark's `cli.py` writes one file per (dataset, model, pretrained, language, task):
`{"dataset", "model", "pretrained", "task", "metrics", "language"}`, named
`{dataset}_{pretrained}_{model}_{language}_{task}.json`, and `clip_benchmark build *.json` joins
such files into one CSV. The metrics are the same numbers as mmret's own JSON under
CLIP_benchmark's names: `image_retrieval_recall@K` is text→image Recall@K (`t2i_rK`: a caption
finds its picture), `text_retrieval_recall@K` image→text (`i2t_rK`); classification gives `acc1`,
`acc5`, `mean_per_class_recall`; the linear probe `lp_acc1`, `lp_acc5`, `lp_mean_per_class_recall`.

Task names are CLIP_benchmark's (`zeroshot_retrieval`, `zeroshot_classification`,
`linear_probe`) whether or not the run was trained on the dataset: "zeroshot" there names the
protocol (no fitting on the test data), and a run trained on the same dataset's train split
follows it too. A dataset prepared from a source CLIP_benchmark also reads (Flickr30k, Flickr8k,
COCO) and scored on its test split carries CLIP_benchmark's dataset name, and so does a
CLIP_benchmark webdataset set (`wds/<name>`, as its `--dataset wds/<name>` writes it); any other
keeps its mmret name, with the split added when it is not test.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from mmret.common.io import write_json

TASKS = {"retrieval": "zeroshot_retrieval", "classification": "zeroshot_classification",
         "linear-probe": "linear_probe"}
KNOWN_DATASETS = {"flickr30k": "flickr30k", "flickr8k": "flickr8k", "coco": "mscoco_captions"}


def dataset_name(name: str, source: str | None, split: str, wds: bool = False) -> str:
    """CLIP_benchmark's name for a test split it also reads (a CLIP_benchmark webdataset set: `wds/<name>`)."""
    if split == "test" and wds:
        return f"wds/{name}"
    if split == "test" and source in KNOWN_DATASETS:
        return KNOWN_DATASETS[source]
    return name if split == "test" else f"{name}-{split}"


def model_names(cfg: Any, run_name: str, trained: bool, which: str = "best") -> tuple[str, str]:
    """(model, pretrained) for a run: its method and towers, and the run that holds its weights
    (a pretrained model evaluated as it is: its name, and `zero-shot`)."""
    short = [Path(str(x)).name for x in (cfg.encoders.item, cfg.encoders.text)]
    if not trained:
        return short[0], "zero-shot"
    towers = short[0] if short[0] == short[1] else f"{short[0]}-{short[1]}"
    return f"mmret-{cfg.method.method}-{towers}", run_name if which == "best" else f"{run_name}@{which}"


def topk_recalls(item_emb: Any, text_emb: Any, text_item: Any, ks: tuple[int, ...], item: str = "i",
                 batch_size: int = 64) -> dict[str, float]:
    """Recall@k both ways as CLIP_benchmark's `zeroshot_retrieval.evaluate` computes it, ties
    included: captions grouped by their item in the items' order (the order its loader yields
    them), one float32 score matrix `texts @ items.T` (and its transpose for item -> text), and for
    each k and each block of `batch_size` query rows (its `batchify`) `torch.topk`, a hit when a
    right answer is among the k indices it returns. Among equal scores topk picks by position,
    where mmret's own rule counts a tie against the query; without ties the two agree. Like
    CLIP_benchmark it holds the whole score matrix (COCO's 5K test: 500 MB)."""
    import torch
    import torch.nn.functional as F

    # normalized again in float32, as its evaluate normalizes what the model returns
    items, texts = (F.normalize(torch.as_tensor(x).float(), dim=-1) for x in (item_emb, text_emb))
    text_item = torch.as_tensor(text_item).long()
    order = torch.sort(text_item, stable=True).indices  # each item's captions together, in their order
    texts, text_item = texts[order], text_item[order]
    scores = texts @ items.T  # (n_text, n_item), as CLIP_benchmark's one product
    rows = torch.arange(len(items))
    out = {}
    for k in ks:
        t2x = [(scores[a:a + batch_size].topk(min(k, len(items)), dim=1).indices == text_item[a:a + batch_size, None])
               .any(1) for a in range(0, len(texts), batch_size)]
        x2t = [(text_item[scores.T[a:a + batch_size].topk(min(k, len(texts)), dim=1).indices]
                == rows[a:a + batch_size, None]).any(1) for a in range(0, len(items), batch_size)]
        out[f"t2{item}_r{k}"] = torch.cat(t2x).float().mean().item()
        out[f"{item}2t_r{k}"] = torch.cat(x2t).float().mean().item()
    return out


def retrieval_metrics(metrics: dict[str, float], ks: tuple[int, ...]) -> dict[str, float]:
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = metrics[f"t2i_r{k}"]
        out[f"text_retrieval_recall@{k}"] = metrics[f"i2t_r{k}"]
    return out


def record(task: str, dataset: str, *, model: str, pretrained: str, metrics: dict[str, Any],
           language: str = "en", **extra: Any) -> dict[str, Any]:
    """One result as CLIP_benchmark's `cli.py` dumps it (`extra`: its optional classnames/templates)."""
    return {"dataset": dataset, "model": model, "pretrained": pretrained, "task": TASKS[task],
            "metrics": metrics, "language": language, **extra}


def file_name(rec: dict[str, Any]) -> str:
    """CLIP_benchmark's default output name (`{dataset}_{pretrained}_{model}_{language}_{task}.json`),
    the dataset with `/` made `_` as CLIP_benchmark does (`wds/x` -> `wds_x`), every other part its last path
    component; anything but letters, digits, `.`, `_` and `-` made `-`."""
    parts = [rec["dataset"].replace("/", "_"), rec["pretrained"], rec["model"], rec["language"], rec["task"]]
    return "_".join(re.sub(r"[^A-Za-z0-9._-]+", "-", str(p).rstrip("/").split("/")[-1]) for p in parts) + ".json"


def write_record(run_dir: Path, rec: dict[str, Any]) -> Path:
    path = run_dir / "eval" / "clip_benchmark" / file_name(rec)
    write_json(path, rec)
    return path
