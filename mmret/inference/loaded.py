"""One trained run, loaded once for inference: its config read once, its checkpoint hashed once,
and a model built for the sides a task needs, so a text query builds only the text tower (and,
for a method over cached features, loads only the frozen text tower's weights).

Everything inference does with a run goes through `LoadedRun`: encoding captions or item files
(search queries), and embedding a dataset split (eval and the search gallery).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from mmret.common.device import autocast_context, pick_device
from mmret.common.digest import file_digest
from mmret.common.progress import NULL, Reporter
from mmret.data.prepared import load_dataset, run_tables
from mmret.errors import MmretError
from mmret.methods import SIDES, get_method
from mmret.models.batch import call
from mmret.models.embed import embed_source, move_real
from mmret.runs import checkpoint_path, load_run_config
from mmret.runs.checkpoint import load_weights


class LoadedRun:
    """The run in `run_dir` with its `which` checkpoint (best | last), run on `device`."""

    def __init__(self, run_dir: Path, *, which: str = "best", device: str = "auto"):
        self.run_dir, self.which = Path(run_dir), which
        self.cfg = load_run_config(self.run_dir)
        self.method = get_method(self.cfg.method.method)
        self.checkpoint = checkpoint_path(self.run_dir, which)
        self.digest = file_digest(self.checkpoint)  # identifies the checkpoint's bytes
        self.device = pick_device(device)
        self._built: dict[frozenset, tuple[Any, nn.Module]] = {}

    @property
    def name(self) -> str:
        return self.run_dir.name

    def model(self, need: tuple[str, ...] = SIDES) -> tuple[Any, nn.Module]:
        """(context, model) with the towers of the `need` sides real; reused for any task that
        needs no more than an earlier one."""
        for sides, built in self._built.items():
            if sides >= set(need):
                return built
        ctx = self.method.open(self.cfg, None, self.run_dir, need=tuple(need))
        model = self.method.build(self.cfg, ctx)
        load_weights(model, self.checkpoint)
        built = (ctx, move_real(model.eval(), self.device))
        self._built[frozenset(need)] = built
        return built

    @torch.inference_mode()
    def encode(self, side: str, queries: list) -> torch.Tensor:
        """(Q, D) normalized float32 embeddings of captions (`text`) or item files (`item`)."""
        ctx, model = self.model((side,))
        inputs = self.method.query_inputs(self.cfg, ctx, side, self.device)(list(queries))
        encode = model.encode_text if side == "text" else model.encode_item
        return call(encode, inputs).float().cpu()

    def trained_on(self, paths: Sequence[str]) -> int | None:
        """How many of the item files `paths` the run trained on (None for a run that was not
        trained, or whose dataset is gone): a run scored on its own training items looks better than
        it is. Files are compared by real path, so the same picture under another dataset counts."""
        cfg = self.cfg
        if not self.method.trainable:
            return None
        try:
            train = run_tables(cfg, load_dataset(cfg.data.dataset, cfg.data.data_dir)).split("train")
        except MmretError:
            return None
        seen = {os.path.realpath(p) for p in train.items["path"]}
        return sum(os.path.realpath(p) in seen for p in paths)

    @functools.cached_property
    def vocabulary(self) -> set[str] | None:
        """The words this run's text side learned, when it learned no others (see `Method.vocabulary`)."""
        return self.method.vocabulary(self.cfg, self.model(("text",))[0])

    def unknown_words(self, text: str) -> list[str]:
        """The words of a text query this run never learned (none for a pretrained text tower)."""
        from mmret.data.tokenizer import words

        return [] if self.vocabulary is None else [w for w in words(text) if w not in self.vocabulary]

    def encode_texts(self, texts: list[str]) -> torch.Tensor:
        return self.encode("text", texts)

    def encode_items(self, paths: list[str | Path]) -> torch.Tensor:
        return self.encode("item", paths)

    def source(self, dataset: Any, split: str, reporter: Reporter = NULL) -> Any:
        """The source of one split of a prepared dataset, as this run's method reads it."""
        ctx, _ = self.model(SIDES)
        (source,) = self.method.sources(self.cfg, ctx, dataset, (split,), self.device, reporter)
        return source

    def embed_rows(self, source: Any, *, item_rows: Any = None, caption_rows: Any = None, batch_size: int = 256,
                   reporter: Reporter = NULL, label: str = "") -> tuple[torch.Tensor, torch.Tensor]:
        """(item embeddings, caption embeddings) of the given rows of a source (None: every row)."""
        _, model = self.model(SIDES)
        total = sum(n if rows is None else len(rows) for n, rows in
                    ((source.num_items, item_rows), (source.num_captions, caption_rows)))
        with reporter.task(f"embedding {label}".strip(), total=total, unit="rows") as task:
            return embed_source(model, source, batch_size, self.device, lambda: autocast_context(self.device, "fp32"),
                                task.advance, items=item_rows, captions=caption_rows)

    def embed(self, dataset: Any, split: str, batch_size: int = 256,
              reporter: Reporter = NULL) -> tuple[Any, torch.Tensor, torch.Tensor]:
        """(source, item embeddings, caption embeddings) of one split of a prepared dataset."""
        source = self.source(dataset, split, reporter)
        return (source, *self.embed_rows(source, batch_size=batch_size, reporter=reporter,
                                         label=f"{dataset.name}-{split}"))
