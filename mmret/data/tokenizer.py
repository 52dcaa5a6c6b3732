"""Text to token ids for models trained from scratch: a byte-level BPE trained on the training
captions, or any transformers tokenizer, behind one small interface.

`tokenize(texts, max_length) -> {"input_ids", "attention_mask"}` (LongTensors (B, n)): every text
starts with a begin token and ends with an end token, is cut to `max_length` tokens with its end
token kept, and the batch is padded to its longest text. `train_bpe` saves the tokenizer as one
`tokenizer.json` (the run folder keeps it); `load_tokenizer` opens that file, a transformers
tokenizer folder, or a hub id (offline: only when it is in the local cache).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor

from mmret.common.io import atomic_path
from mmret.errors import MmretError

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
SPECIAL_TOKENS = (PAD, BOS, EOS)  # ids 0, 1, 2 in a trained BPE
_BYTES = 256  # the byte-level alphabet every BPE vocabulary starts from


WORD = re.compile(r"\w+(?:'\w+)?")  # a word of a caption or a query: letters and digits, with an inner apostrophe


def words(text: str) -> list[str]:
    """The words of a text, lower-cased, in order."""
    return [w.lower() for w in WORD.findall(text)]


def _pad_batch(rows: list[list[int]], pad_id: int) -> dict[str, Tensor]:
    longest = max(len(r) for r in rows)
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), longest), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _check_batch(texts: list[str], max_length: int, least: int) -> None:
    if not texts:
        raise MmretError("nothing to tokenize: the list of texts is empty")
    if max_length < least:
        raise MmretError(f"--max-length must be at least {least}, got {max_length}")


class BpeTokenizer:
    """A `tokenizers.Tokenizer` trained by `train_bpe` (byte-level BPE, <pad> <s> </s>)."""

    def __init__(self, tokenizer, path: Path | None = None) -> None:
        self.tokenizer, self.path = tokenizer, path
        self.vocab_size = tokenizer.get_vocab_size()
        self.pad_id, self.bos_id, self.eos_id = (tokenizer.token_to_id(t) for t in SPECIAL_TOKENS)

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, Tensor]:
        _check_batch(texts, max_length, 2)
        encoded = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        rows = [[self.bos_id, *e.ids[: max_length - 2], self.eos_id] for e in encoded]
        return _pad_batch(rows, self.pad_id)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def standalone(self, max_length: int) -> Any:
        """This tokenizer as a `tokenizers.Tokenizer` alone (see `standalone`)."""
        return standalone(self.tokenizer, max_length, self.pad_id, PAD)

    def save(self, path: str | Path) -> Path:
        """Write `tokenizer.json` (or the given file name) atomically; return its path."""
        path = Path(path)
        path = path / "tokenizer.json" if path.is_dir() else path
        with atomic_path(path) as tmp:
            self.tokenizer.save(str(tmp))
        self.path = path
        return path

    @classmethod
    def load(cls, path: str | Path) -> "BpeTokenizer":
        from tokenizers import Tokenizer

        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise MmretError(f"cannot read tokenizer file {path}: {str(e).splitlines()[0]}") from None
        if any(tokenizer.token_to_id(t) is None for t in SPECIAL_TOKENS):
            raise MmretError(f"{path} is not a tokenizer trained by mmret (it lacks {', '.join(SPECIAL_TOKENS)}); "
                             "to use it through transformers, pass a folder holding it and its tokenizer_config.json")
        return cls(tokenizer, Path(path))


def standalone(backend: Any, max_length: int, pad_id: int, pad_token: str) -> Any:
    """A copy of a `tokenizers.Tokenizer` that truncates to `max_length` tokens (special tokens
    counted, as `tokenize` counts them) and pads a batch to its longest text with `pad_id`: called
    with `encode_batch`, it gives the ids and attention masks `tokenize` gives."""
    from tokenizers import Tokenizer

    copy = Tokenizer.from_str(backend.to_str())
    copy.enable_truncation(max_length)
    copy.enable_padding(pad_id=pad_id, pad_token=pad_token)
    return copy


def train_bpe(captions: Iterable[str], vocab_size: int, path: str | Path | None = None) -> BpeTokenizer:
    """Train a byte-level BPE on `captions` (the training split's) and save it to `path` if given.

    Byte-level: any text encodes with no unknown token and decodes back to exactly itself.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    captions = [c for c in captions if c and c.strip()]
    if not captions:
        raise MmretError("no captions to train the tokenizer on; check the dataset's training split")
    if vocab_size < _BYTES + len(SPECIAL_TOKENS):
        raise MmretError(f"--vocab-size must be at least {_BYTES + len(SPECIAL_TOKENS)} "
                         f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(captions, trainer)
    # the same framing `tokenize` adds, so the file gives the same ids through transformers
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(t, tokenizer.token_to_id(t)) for t in (BOS, EOS)])
    bpe = BpeTokenizer(tokenizer)
    if path is not None:
        bpe.save(path)
    return bpe


class HfTokenizer:
    """Any transformers tokenizer, loaded by hub id or folder."""

    def __init__(self, tokenizer, source: str) -> None:
        self.tokenizer, self.source = tokenizer, source
        self.vocab_size = len(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def tokenize(self, texts: list[str], max_length: int) -> dict[str, Tensor]:
        _check_batch(texts, max_length, 1)
        # pad by hand: some tokenizers (GPT-2's) have no pad token and refuse to pad themselves
        out = self.tokenizer(list(texts), max_length=max_length, truncation=True, padding=False)
        return _pad_batch([list(ids) for ids in out["input_ids"]], self.pad_id)

    def decode(self, ids: Iterable[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def standalone(self, max_length: int) -> Any:
        """This tokenizer as a `tokenizers.Tokenizer` alone (see `standalone`); a slow (Python)
        transformers tokenizer has none."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise MmretError(f"the tokenizer {self.source} has no fast (tokenizers) form to save beside an export")
        return standalone(backend, max_length, self.pad_id, self.tokenizer.pad_token or PAD)


def load_tokenizer(source: str | Path) -> BpeTokenizer | HfTokenizer:
    """A `tokenizer.json` written by `train_bpe`, a transformers tokenizer folder, or a hub id."""
    path = Path(source).expanduser()
    if path.is_file():
        return BpeTokenizer.load(path)
    if path.is_dir() and (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        return BpeTokenizer.load(path / "tokenizer.json")  # a run folder's own BPE
    if not path.is_dir() and (path.is_absolute() or str(source).startswith((".", "~")) or path.suffix == ".json"):
        raise MmretError(f"no tokenizer file or folder at {path}")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path) if path.is_dir() else str(source))
    except (OSError, ValueError) as e:
        where = f"folder {path}" if path.is_dir() else f"hub id {str(source)!r}"
        raise MmretError(f"cannot load a tokenizer from {where}: {str(e).splitlines()[0]}; "
                         "pass a folder that holds a tokenizer, or train a BPE on the captions instead") from None
    return HfTokenizer(tokenizer, str(source))
