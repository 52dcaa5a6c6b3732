"""Tiny random-initialised towers saved the way real checkpoints are, for tests.

Each `save_tiny_*` builds a model from a config (no download), writes it to a folder with the
library's own save function (transformers `save_pretrained`, timm `save_for_hf`) plus a tokenizer
or image-processor config where the real model has one, and returns the folder. Tests then load
it by path through `load_image_encoder` / `load_text_encoder`, the same code a hub id takes.
Models are a few hundred kilobytes and run in milliseconds.
"""

from __future__ import annotations

from pathlib import Path

import torch

# words of the built-in `example` captions, so the tiny tokenizers split them into whole words
WORDS = """a an the of and is on in at to with it its one two there are here this that shape shapes
red green blue yellow purple orange circle square triangle above below left right top bottom then
next beside under over picture image photo small big shown sits placed side first second""".split()
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
IMAGE_SIZE = 32
HIDDEN = 32


def vocab() -> list[str]:
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list("0123456789.,'-")
    return SPECIALS + WORDS + letters + ["##" + c for c in letters]


def _save_bert_tokenizer(folder: Path, model_max_length: int = 64) -> None:
    # the vocabulary goes in as a dict: transformers 5 silently ignores `vocab_file=` and would
    # leave a tokenizer that knows only the special tokens (every word [UNK])
    import inspect

    from transformers import BertTokenizerFast

    words = vocab()
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(words) + "\n", encoding="utf-8")
    source = ({"vocab": {w: i for i, w in enumerate(words)}}
              if "vocab" in inspect.signature(BertTokenizerFast).parameters
              else {"vocab_file": str(vocab_file)})  # transformers 4
    tok = BertTokenizerFast(**source, do_lower_case=True, model_max_length=model_max_length)
    tok.save_pretrained(folder)
    if tok.tokenize("a red circle") != ["a", "red", "circle"]:
        raise RuntimeError(f"tiny tokenizer is broken: {tok.tokenize('a red circle')}")


def _seed(seed: int) -> None:
    torch.manual_seed(seed)


@torch.no_grad()
def _spread(model: torch.nn.Module, factor: float, where: str) -> None:
    """Scale the weight matrices of the blocks (names containing `where`): with `factor` > 1 the
    blocks' updates outweigh the constant class token, so different inputs give clearly different
    outputs (a randomly initialised tower otherwise maps every input to nearly the same vector)."""
    if factor != 1.0:
        for name, weight in model.named_parameters():
            if where in name and weight.ndim == 2:
                weight.mul_(factor)


def save_tiny_bert(folder: str | Path, kind: str = "bert", pooling_config: str | None = None, seed: int = 0,
                   spread: float = 1.0) -> Path:
    """A 2-layer BERT (`kind="bert"`) or DistilBERT (`kind="distilbert"`) with a WordPiece tokenizer.

    `pooling_config` ("mean" | "cls") also writes a sentence-transformers `1_Pooling/config.json`,
    as all-MiniLM-L6-v2 has.
    """
    from transformers import BertConfig, BertModel, DistilBertConfig, DistilBertModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _seed(seed)
    n = len(vocab())
    if kind == "distilbert":
        model = DistilBertModel(DistilBertConfig(vocab_size=n, dim=HIDDEN, n_layers=2, n_heads=2, hidden_dim=64,
                                                 max_position_embeddings=64, pad_token_id=0))
    else:
        model = BertModel(BertConfig(vocab_size=n, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, pad_token_id=0))
    _spread(model, spread, "layer")
    model.save_pretrained(folder)
    _save_bert_tokenizer(folder)
    if pooling_config:
        (folder / "1_Pooling").mkdir(exist_ok=True)
        (folder / "1_Pooling" / "config.json").write_text(
            f'{{"word_embedding_dimension": {HIDDEN}, '
            f'"pooling_mode_cls_token": {str(pooling_config == "cls").lower()}, '
            f'"pooling_mode_mean_tokens": {str(pooling_config == "mean").lower()}}}', encoding="utf-8")
    return folder


def save_tiny_clip(folder: str | Path, seed: int = 0, projection_dim: int = 16) -> Path:
    """A CLIP with 2-layer towers (32 px images, 8 px patches: 17 tokens) and a projection of 16.

    The tokenizer is WordPiece rather than CLIP's BPE (it only has to be loadable by AutoTokenizer);
    the text config's eos_token_id is its [SEP], so pooling picks the end-of-text token as in CLIP.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _seed(seed)
    layers = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab()), max_position_embeddings=40, bos_token_id=2, eos_token_id=3,
                         pad_token_id=0, **layers),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, **layers), projection_dim=projection_dim)
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                       crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}).save_pretrained(folder)
    _save_bert_tokenizer(folder, model_max_length=40)
    return folder


def save_tiny_dinov2(folder: str | Path, seed: int = 0, with_processor: bool = False) -> Path:
    """A 2-layer DINOv2 (8 px patches). Like the offline dinov2-small folder it has no
    preprocessor_config.json unless `with_processor` (then resize 40, crop 32, ImageNet statistics)."""
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    _seed(seed)
    Dinov2Model(Dinov2Config(image_size=IMAGE_SIZE, patch_size=8, hidden_size=HIDDEN, num_hidden_layers=2,
                             num_attention_heads=2, mlp_ratio=2)).save_pretrained(folder)
    if with_processor:
        BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                          image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(folder)
    return folder


def save_tiny_timm_vit(folder: str | Path, seed: int = 0, spread: float = 1.0) -> Path:
    """timm's vit_small_patch16_224.dino architecture shrunk to 2 layers of width 32 on 32 px images
    (8 px patches: 17 tokens), saved with `timm.models.save_for_hf` (config.json + model.safetensors)."""
    import timm
    from timm.models import save_for_hf

    folder = Path(folder)
    _seed(seed)
    args = dict(img_size=IMAGE_SIZE, patch_size=8, embed_dim=HIDDEN, depth=2, num_heads=2)
    model = timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0, **args)
    _spread(model, spread, "blocks")
    save_for_hf(model, str(folder), model_args=args, safe_serialization=True)
    return folder


def save_picture(path: str | Path, size: int = 40, seed: int = 0) -> Path:
    """A small random-colour PNG picture."""
    import numpy as np
    from PIL import Image

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def save_all(root: str | Path) -> dict[str, Path]:
    """Every tiny tower under `root`: {"timm", "bert", "distilbert", "minilm", "clip", "dinov2"}."""
    root = Path(root)
    return {
        "timm": save_tiny_timm_vit(root / "tiny-timm-vit"),
        "bert": save_tiny_bert(root / "tiny-bert"),
        "distilbert": save_tiny_bert(root / "tiny-distilbert", kind="distilbert"),
        "minilm": save_tiny_bert(root / "tiny-minilm", pooling_config="mean"),
        "clip": save_tiny_clip(root / "tiny-clip"),
        "dinov2": save_tiny_dinov2(root / "tiny-dinov2"),
    }


def save_timm_weights(name: str, path: str | Path, seed: int = 0) -> Path:
    """Random weights of a registered timm architecture (e.g. `test_vit`, `test_resnet`: a few hundred
    thousand parameters), headless, in one safetensors file: the "timm name + weights file" case."""
    import timm
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def install_in_hub_cache(folder: str | Path, cache_dir: str | Path, repo_id: str,
                         commit: str = "0123456789abcdef0123456789abcdef01234567") -> Path:
    """Lay a model folder out as huggingface_hub's cache does (`models--org--name/refs/main`,
    `snapshots/<commit>/`), so a hub id resolves to it with no network. Returns the snapshot folder."""
    import shutil

    repo = Path(cache_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


# ---------------------------------------------------------------------------- dual encoders for tests

from typing import Any  # noqa: E402

from mmret.models import DualEncoder, ProjectionHead, QueryBridge  # noqa: E402
from mmret.models.temperature import Temperature  # noqa: E402


def heads_model(
    item_dim: int,
    text_dim: int,
    embed_dim: int = 512,
    layers: int = 1,
    hidden_dim: int | None = None,
    dropout: float = 0.0,
    temperature: Temperature | None = None,
) -> DualEncoder:
    """The "heads" method: a projection head on each side over cached pooled features."""
    return DualEncoder(
        ProjectionHead(item_dim, embed_dim, layers, hidden_dim, dropout),
        ProjectionHead(text_dim, embed_dim, layers, hidden_dim, dropout),
        embed_dim,
        temperature,
    )


def bridge_model(item_dim: int, text_dim: int, embed_dim: int = 512, text_layers: int = 1,
                 dropout: float = 0.0, temperature: Temperature | None = None, **bridge: Any) -> DualEncoder:
    """The "bridge" method: a querying bridge over cached item tokens, a head over pooled text.

    `bridge` holds QueryBridge's other settings (num_queries, depth, width, heads, mlp_ratio).
    """
    return DualEncoder(
        QueryBridge(item_dim, embed_dim, dropout=dropout, **bridge),
        ProjectionHead(text_dim, embed_dim, text_layers, dropout=dropout),
        embed_dim,
        temperature,
    )


def train_memorised(root: Path) -> dict:
    """A 12-picture example dataset (five captions each) under `root` and a heads run over a tiny
    ViT and BERT that memorises it, so a picture's own caption finds it first."""
    from mmret import training
    from mmret.data import PrepareConfig, prepare
    from mmret.runs import RunConfig, with_overrides

    data, runs = root / "data", root / "runs"
    prepare(PrepareConfig(source="example", count=12, val=0.2, test=0.2, data_dir=data))
    vit = save_tiny_timm_vit(root / "vit", spread=20.0)  # a random ViT that tells pictures apart
    bert = save_tiny_bert(root / "bert", pooling_config="mean")
    cfg = with_overrides(RunConfig(), dict(method="heads", dataset="example", item=str(vit), text=str(bert),
                                           data_dir=data, runs_dir=runs, epochs=60, batch_size=8, lr=1e-2,
                                           dropout=0.0, embed_dim=32, patience=0, name="memorised"))
    run = training.train(cfg).run_dir
    return {"root": root, "data": data, "runs": runs, "run": run, "vit": vit, "bert": bert}
