"""`--method scratch` through the training loop: MiniCLIP and a random-init CLIP learn on the
example dataset, the BPE tokenizer is kept in the run, and a run reloads for embedding."""

from __future__ import annotations

import pandas as pd
import pytest

from mmret import training
from mmret.data import PrepareConfig, prepare
from mmret.errors import MmretError
from mmret.inference.embeddings import write_run_embeddings
from mmret.runs import RunConfig, with_overrides
from mmret.training import loop


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("scratch")
    prepare(PrepareConfig(source="example", count=48, data_dir=root / "data"))
    return root / "data"


def config(data, tmp_path, **options) -> RunConfig:
    base = dict(method="scratch", dataset="example", data_dir=data, runs_dir=tmp_path / "runs", epochs=4, batch_size=16,
                patience=0, image_model="resnet10t", text_width=32, text_depth=1, embed_dim=32, vocab_size=300,
                max_length=24, workers=0, lr=2e-3, image_size=32)
    return with_overrides(RunConfig(), {**base, **options})


def losses(result) -> list[float]:
    return pd.read_parquet(result.run_dir / "metrics.parquet")["train_loss"].tolist()


def test_miniclip_learns_and_keeps_its_tokenizer(data, tmp_path):
    result = training.train(config(data, tmp_path, name="mini"))
    assert losses(result)[-1] < losses(result)[0]
    assert (result.run_dir / "tokenizer.json").is_file()
    emb = write_run_embeddings(result.run_dir, split="test")
    assert emb.items.shape[1] == 32 and len(emb.captions) == 5 * len(emb.items)


@pytest.mark.parametrize("options", [dict(arch="clip-tiny", embed_dim=32), dict(temperature="dynamic", micro_batch=8),
                                     dict(sam=True, sam_rho=0.05)])
def test_scratch_variants_train(data, tmp_path, options):
    result = training.train(config(data, tmp_path, epochs=3, **options))
    assert losses(result)[-1] < losses(result)[0]


def test_scratch_resume_is_exact(data, tmp_path, monkeypatch):
    whole = training.train(config(data, tmp_path, name="whole", epochs=2))
    real = loop.train_step

    def kill_at_step_4(s, images, texts, *negatives):
        if s.state.step == 4:
            raise KeyboardInterrupt
        return real(s, images, texts, *negatives)

    monkeypatch.setattr(loop, "train_step", kill_at_step_4)
    with pytest.raises(training.TrainingInterrupted):
        training.train(config(data, tmp_path, name="killed", epochs=2))
    monkeypatch.setattr(loop, "train_step", real)
    resumed = training.resume(tmp_path / "runs" / "killed")
    cols = ["train_loss", "val_loss", "t2i_r1", "i2t_r5", "mean_recall"]
    pd.testing.assert_frame_equal(pd.read_parquet(whole.run_dir / "metrics.parquet")[cols],
                                  pd.read_parquet(resumed.run_dir / "metrics.parquet")[cols])


def test_imagenet_weights_offline_fail_with_one_line(data, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(MmretError, match="ImageNet weights"):
        training.train(config(data, tmp_path, pretrained_image=True))
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
