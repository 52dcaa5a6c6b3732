"""One trained run, loaded once for inference: its config read once, its checkpoint hashed once,
and a model built for the sides a task needs, so a text query builds only the text tower (and,
for a method over cached features, loads only the frozen text tower's weights).

Everything inference does with a run goes through `LoadedRun`: encoding captions or items (search
queries, and the Python API's `mmret.load`), and embedding a dataset split (eval and the search
gallery).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from mmret.common.device import autocast_context, pick_device
from mmret.common.digest import file_digest
from mmret.common.progress import NULL, Reporter
from mmret.data.prepared import load_dataset, run_tables
from mmret.errors import MmretError
from mmret.inference.inputs import item_batch
from mmret.methods import SIDES, get_method
from mmret.modalities import ItemLoader, Modality, get_modality
from mmret.models.batch import call
from mmret.models.embed import embed_source, move_real
from mmret.models.fused import FusedSide
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
        self._loader: ItemLoader | None = None

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

    @property
    def modality(self) -> Modality:
        """What the run's items are."""
        return get_modality(self.cfg.data.modality)

    def item_loader(self) -> ItemLoader:
        """One query item (a file, or its `decode`d form) -> the preprocessed tensor the model reads."""
        if self._loader is None:
            ctx, _ = self.model(("item",))
            self._loader = self.method.query_loader(self.cfg, ctx)
        return self._loader

    def tokenizer(self) -> Callable[[list[str]], dict[str, torch.Tensor]]:
        """Captions -> the token ids and attention mask the run's text side reads."""
        ctx, _ = self.model(("text",))
        return self.method.tokenizer(self.cfg, ctx)

    def standalone_tokenizer(self) -> Any:
        """The same tokenizer as a `tokenizers.Tokenizer` that needs nothing of mmret (for exports)."""
        ctx, _ = self.model(("text",))
        return self.method.standalone_tokenizer(self.cfg, ctx)

    @torch.inference_mode()
    def encode(self, side: str, queries: Any) -> torch.Tensor:
        """(Q, D) normalized float32 embeddings of captions (`text`) or of items (`item`): files,
        items held in memory, or preprocessed tensors (see `mmret.inference.inputs`)."""
        ctx, model = self.model((side,))
        if side == "text":
            inputs = self.method.query_inputs(self.cfg, ctx, side, self.device)(list(queries))
            return call(model.encode_text, inputs).float().cpu()
        batch = item_batch(self.modality, self.item_loader(), list(queries))
        inputs = self.method.query_inputs(self.cfg, ctx, side, self.device)(batch)
        return call(model.encode_item, inputs).float().cpu()

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

    def encode_items(self, items: list[Any]) -> torch.Tensor:
        return self.encode("item", items)

    def fused(self, side: str) -> FusedSide:
        """One side from its raw inputs (pixels or features; token ids and mask) to the normalized
        embedding, as one module in eval mode on the run's device (what exports convert)."""
        ctx, model = self.model(SIDES)
        frozen = self.method.frozen_tower(self.cfg, ctx, side, self.device)
        item_input = self.method.item_input(self.cfg, ctx)
        fused = FusedSide(model, side, *(frozen or (None, "pooled")), item_input=item_input)
        return fused.eval()

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
