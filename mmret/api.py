"""The Python API: a trained run, or a pretrained CLIP or CLAP, as one model object to embed with
and to search with. `mmret search`, `eval`, `serve` and `export` are its first users.

    import mmret

    model = mmret.load("runs/my-run")                      # a run folder or name; None: the newest run
    texts = model.encode_text(["a dog on the beach"])      # (1, D) float32 numpy, normalized
    pictures = model.encode_images(["beach.jpg", pil_image, uint8_array])
    print(texts @ pictures.T)                              # cosine similarities
    hits = model.search("a dog on the beach", k=5)         # over the run's dataset (its gallery)

`mmret.load_zero_shot("clip-b32")` gives the same object for a pretrained model used as it is.
Embeddings are L2-normalized float32 numpy arrays, or torch tensors with `output="torch"`. Items
come as file paths, as items held in memory (pictures: PIL images or uint8 arrays (H, W, 3);
sounds: (waveform, sample_rate) pairs), or as tensors `model.preprocess` made; `model.tokenizer`
turns captions into the text side's token ids. Every error is an `MmretError` with one line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch

from mmret.common.progress import NULL, Reporter
from mmret.errors import MmretError
from mmret.inference.embeddings import Embeddings, write_run_embeddings
from mmret.inference.inputs import as_items, preprocess_item
from mmret.inference.loaded import LoadedRun
from mmret.inference.search import Gallery, SearchResult, search
from mmret.modalities import Modality, get_modality

Output = Literal["numpy", "torch"]
DEFAULT_BATCH = 64  # items or captions per forward pass
ENCODE = {"image": "images", "audio": "audio"}  # modality -> the encode_* method that takes its items


class Preprocess:
    """One item (a path, an item held in memory) -> the tensor the model reads, as open_clip's
    `preprocess`; `torch.stack` a list of them and pass the batch to `encode_images`/`encode_audio`."""

    def __init__(self, modality: Modality, loader: Any):
        self.modality, self.loader = modality, loader

    def __call__(self, item: Any) -> torch.Tensor:
        return preprocess_item(self.modality, self.loader, item)

    def __repr__(self) -> str:
        return f"Preprocess({self.modality.plural}: {self.loader.transform!r})"


class Model:
    """A run's model, loaded once; see the module docstring. Build it with `mmret.load` or
    `mmret.load_zero_shot`."""

    def __init__(self, run: LoadedRun, *, dataset: str | None = None, data_dir: Path | None = None):
        self.run = run
        self.dataset = dataset or run.cfg.data.dataset  # the gallery `search` uses unless told another
        self.data_dir = data_dir
        self._galleries: dict[tuple, Gallery] = {}

    def __repr__(self) -> str:
        return (f"mmret.Model(run={self.name!r}, method={self.method!r}, items={self.modality.plural!r}, "
                f"device={str(self.device)!r})")

    # -- what the model is
    @property
    def name(self) -> str:
        return self.run.name

    @property
    def run_dir(self) -> Path:
        return self.run.run_dir

    @property
    def config(self) -> Any:
        """The run's `RunConfig` (as `runs/<run>/config.json` holds it)."""
        return self.run.cfg

    @property
    def method(self) -> str:
        return self.run.cfg.method.method

    @property
    def modality(self) -> Modality:
        """What the model's items are: pictures (`image`) or sounds (`audio`)."""
        return self.run.modality

    @property
    def device(self) -> torch.device:
        return self.run.device

    @property
    def dim(self) -> int:
        """The width of the embeddings."""
        return int(self.run.model(("text",))[1].embed_dim)

    @property
    def preprocess(self) -> Preprocess:
        """One item -> the tensor `encode_images` / `encode_audio` take (see `Preprocess`)."""
        return Preprocess(self.modality, self.run.item_loader())

    @property
    def tokenizer(self) -> Callable[[list[str]], dict[str, torch.Tensor]]:
        """Captions -> {"input_ids", "attention_mask"} (B, L), as the run's text side reads them."""
        return self.run.tokenizer()

    # -- embeddings
    def encode_text(self, texts: str | Sequence[str], *, batch_size: int = DEFAULT_BATCH,
                    output: Output = "numpy") -> np.ndarray | torch.Tensor:
        """(N, D) normalized embeddings of captions (a single string gives one row)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise MmretError("encode_text takes strings; give items to encode_images or encode_audio")
        return self._batched(self.run.encode_texts, texts, batch_size, output)

    def encode_images(self, images: Any, *, batch_size: int = DEFAULT_BATCH,
                      output: Output = "numpy") -> np.ndarray | torch.Tensor:
        """(N, D) normalized embeddings of pictures: file paths, PIL images, uint8 arrays (H, W, 3), or
        tensors from `preprocess` ((3, H, W) each, or one (B, 3, H, W) batch); a single one or a list."""
        return self._items("image", images, batch_size, output)

    def encode_audio(self, sounds: Any, *, batch_size: int = DEFAULT_BATCH,
                     output: Output = "numpy") -> np.ndarray | torch.Tensor:
        """(N, D) normalized embeddings of sounds: file paths or (waveform, sample_rate) pairs (mono
        (N,), or (channels, N)), resampled and cut to the window the model reads; one or a list."""
        return self._items("audio", sounds, batch_size, output)

    def encode_items(self, items: Any, *, batch_size: int = DEFAULT_BATCH,
                     output: Output = "numpy") -> np.ndarray | torch.Tensor:
        """`encode_images` or `encode_audio`, whichever the model's items are."""
        return self._items(self.modality.name, items, batch_size, output)

    def _items(self, modality: str, items: Any, batch_size: int, output: Output) -> np.ndarray | torch.Tensor:
        if modality != self.modality.name:
            asked = get_modality(modality)
            raise MmretError(f"run {self.name} embeds {self.modality.plural}, not {asked.plural}: use "
                             f"encode_{ENCODE[self.modality.name]}")
        return self._batched(self.run.encode_items, as_items(items), batch_size, output)

    def _batched(self, encode: Callable[[list], torch.Tensor], rows: list, batch_size: int,
                 output: Output) -> np.ndarray | torch.Tensor:
        if output not in ("numpy", "torch"):
            raise MmretError(f"output must be numpy or torch, got {output!r}")
        if batch_size < 1:
            raise MmretError(f"batch_size must be at least 1, got {batch_size}")
        parts = [encode(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
        out = torch.cat(parts) if parts else torch.zeros(0, 0)
        return out if output == "torch" else out.numpy()

    # -- a dataset's items, embedded and searched
    def embed_split(self, dataset: str | None = None, split: str = "test", *, batch_size: int = 256,
                    reporter: Reporter = NULL, data_dir: Path | None = None) -> Embeddings:
        """The model's embeddings of a split (or `all`) of a prepared dataset, written once to
        `runs/<run>/embeddings/<ds>-<split>/` and read back memory-mapped."""
        return write_run_embeddings(self.run, dataset or self.dataset, split, batch_size=batch_size,
                                    reporter=reporter, data_dir=data_dir or self.data_dir)

    def gallery(self, dataset: str | None = None, split: str = "all", *, index: str = "exact",
                rebuild_index: bool = False, reporter: Reporter = NULL, data_dir: Path | None = None) -> Gallery:
        """The gallery of a dataset split (default: every item of the model's dataset), opened once."""
        key = (dataset or self.dataset, split, index, data_dir or self.data_dir)
        if rebuild_index or key not in self._galleries:
            self._galleries[key] = Gallery.open(self.run, key[0], split, index=index, rebuild_index=rebuild_index,
                                                reporter=reporter, data_dir=key[3])
        return self._galleries[key]

    def search(self, queries: str | Sequence[str] = (), *, item: Any = None, k: int = 10, dataset: str | None = None,
               split: str = "all", index: str = "exact", rebuild_index: bool = False, reporter: Reporter = NULL,
               data_dir: Path | None = None, query_modality: str | None = None) -> SearchResult:
        """The best `k` items of a gallery for each text query (and for `item`, a picture or a sound
        given as `encode_items` takes it: the nearest items and the captions that fit it).
        `result.results[i].items` are the hits of query i, best first."""
        texts = [queries] if isinstance(queries, str) else list(queries)
        return search(self.run, texts, item=item, dataset=dataset or self.dataset, split=split, k=k, index=index,
                      rebuild_index=rebuild_index, reporter=reporter, data_dir=data_dir or self.data_dir,
                      query_modality=query_modality)


def load(run: str | Path | None = None, *, checkpoint: str = "best", device: str = "auto",
         runs_dir: str | Path | None = None, data_dir: str | Path | None = None) -> Model:
    """A trained run as a `Model`: a run folder, a run name under `runs_dir` (default ./runs or
    $MMRET_RUNS_DIR), or None / "latest" for the newest run; its `best` or `last` checkpoint."""
    from mmret.runs import resolve_run

    if checkpoint not in ("best", "last"):
        raise MmretError(f"checkpoint must be best or last, got {checkpoint!r}")
    return Model(LoadedRun(resolve_run(run, runs_dir), which=checkpoint, device=device),
                 data_dir=Path(data_dir) if data_dir else None)


def load_zero_shot(model: str, dataset: str | None = None, *, device: str = "auto",
                   runs_dir: str | Path | None = None, data_dir: str | Path | None = None) -> Model:
    """A pretrained CLIP or CLAP used as it is (a preset such as clip-b32 or clap-htsat, a hub id or a
    model folder), as `--zero-shot` uses it; `dataset` is the gallery `search` and `embed_split` use."""
    from mmret.inference.zeroshot import zero_shot_run

    run_dir = zero_shot_run(model, dataset, data_dir, runs_dir)
    return Model(LoadedRun(run_dir, device=device), dataset=dataset, data_dir=Path(data_dir) if data_dir else None)
