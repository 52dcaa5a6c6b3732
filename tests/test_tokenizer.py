"""The BPE tokenizer trained on captions, and transformers tokenizers, behind `tokenize`."""

from __future__ import annotations

import huggingface_hub.constants
import pytest
import torch

from mmret.data.tokenizer import BpeTokenizer, HfTokenizer, load_tokenizer, train_bpe
from mmret.errors import MmretError

UNSEEN = ["A Café with ÜBER-long   spacing!", "日本語のキャプション 🎉", "tab\tand\nnewline"]


@pytest.fixture
def captions(example_ds):
    return example_ds.split("train").captions["caption"].tolist()


@pytest.fixture
def bpe(captions, tmp_path):
    return train_bpe(captions, vocab_size=300, path=tmp_path / "run" / "tokenizer.json")


def test_round_trip_of_training_and_unseen_text(bpe, captions):
    assert 259 < bpe.vocab_size <= 300  # merges were learned beyond the 256 bytes + 3 specials
    for text in captions[:20] + UNSEEN:
        batch = bpe.tokenize([text], max_length=200)
        assert bpe.decode(batch["input_ids"][0].tolist()) == text


def test_merges_shorten_the_training_captions(bpe, captions):
    batch = bpe.tokenize(captions[:50], max_length=200)
    tokens = batch["attention_mask"].sum().item() - 2 * 50
    assert tokens < sum(len(c.encode()) for c in captions[:50]) / 2  # far fewer tokens than bytes


def test_tokenize_frames_pads_and_truncates(bpe):
    batch = bpe.tokenize(["a red circle", "a blue square above a green triangle on the left"], max_length=6)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.dtype == mask.dtype == torch.long
    assert ids.shape == mask.shape and ids.shape[1] <= 6
    short = int(mask[0].sum())
    assert ids[0, 0] == bpe.bos_id and ids[0, short - 1] == bpe.eos_id
    assert (ids[0, short:] == bpe.pad_id).all() and (mask[0, short:] == 0).all()
    assert ids.shape[1] == 6 and mask[1].all() and ids[1, -1] == bpe.eos_id  # cut, end token kept
    longest = bpe.tokenize(["a red circle"], max_length=64)["input_ids"]
    assert longest.shape[1] == short  # a batch pads only to its longest text


def test_saves_and_reloads_identically(bpe, tmp_path):
    path = tmp_path / "run" / "tokenizer.json"
    assert path.is_file() and not list(path.parent.glob(".*.tmp"))  # written atomically
    again = load_tokenizer(path)
    assert isinstance(again, BpeTokenizer) and again.vocab_size == bpe.vocab_size
    texts = ["a purple square left of an orange circle"] + UNSEEN
    for key, value in bpe.tokenize(texts, 16).items():
        assert torch.equal(again.tokenize(texts, 16)[key], value)
    resaved = again.save(tmp_path / "copy.json")
    assert resaved.read_text() == path.read_text()
    assert isinstance(load_tokenizer(path.parent), BpeTokenizer)  # a run folder holding it


def test_transformers_folder_gives_the_same_ids(bpe, tmp_path):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_file=str(bpe.path), bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")
    fast.save_pretrained(tmp_path / "hf")
    hf = load_tokenizer(tmp_path / "hf")
    assert isinstance(hf, HfTokenizer) and hf.vocab_size == bpe.vocab_size
    texts = ["a red circle above a blue square", "a green triangle"]
    for key, value in bpe.tokenize(texts, 32).items():
        assert torch.equal(hf.tokenize(texts, 32)[key], value)


def test_hub_id_offline_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail at once, no retries
    with pytest.raises(MmretError, match=r"cannot load a tokenizer from hub id .bert-base-uncased.") as e:
        load_tokenizer("bert-base-uncased")
    assert "\n" not in str(e.value)


def test_bad_inputs_are_clear_errors(tmp_path, bpe):
    with pytest.raises(MmretError, match="--vocab-size must be at least 259"):
        train_bpe(["a b c"], vocab_size=100)
    with pytest.raises(MmretError, match="no captions"):
        train_bpe(["", "   "], vocab_size=300)
    with pytest.raises(MmretError, match="--max-length must be at least 2"):
        bpe.tokenize(["a"], max_length=1)
    with pytest.raises(MmretError, match="nothing to tokenize"):
        bpe.tokenize([], max_length=8)
    with pytest.raises(MmretError, match="no tokenizer file or folder at"):
        load_tokenizer(tmp_path / "missing" / "tokenizer.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(MmretError, match="cannot read tokenizer file"):
        load_tokenizer(broken)
