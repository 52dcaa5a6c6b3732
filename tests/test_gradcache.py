"""Gradient caching gives the gradients of one full-batch loss; plain accumulation does not."""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial

import pytest
import torch
from tiny_models import bridge_model, heads_model
from torch import nn

from mmret.errors import MmretError
from mmret.models import DualEncoder, ProjectionHead
from mmret.models.batch import slice_batch
from mmret.models.temperature import build_temperature
from mmret.training import gradcache
from mmret.training.gradcache import accumulate_step, contrastive_step, full_step
from mmret.training.losses import ClipLoss

B, MICRO = 10, 3  # uneven on purpose: micro-batches of 3, 3, 3, 1


def grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def reference(model, images, texts, micro, autocast=nullcontext):
    """One loss over the whole batch, backward through a graph that holds every micro-batch.

    The forwards run micro-batch by micro-batch so dropout draws what gradcache's first pass
    draws; without dropout this equals one forward of the whole batch (checked below).
    """
    model.zero_grad()
    item_parts, text_parts = [], []
    with autocast():
        for a in range(0, gradcache.batch_size(images), micro):
            item_parts.append(model.encode_item(slice_batch(images, a, a + micro)))
            text_parts.append(model.encode_text(slice_batch(texts, a, a + micro)))
        item_emb, text_emb = torch.cat(item_parts), torch.cat(text_parts)
        loss = ClipLoss()(item_emb, text_emb, model.logit_scale_for(item_emb, text_emb))
    loss.backward()
    return loss.detach(), grads(model)


def run(step, model, images, texts, micro=MICRO, **kw):
    model.zero_grad()
    loss = step(model, images, texts, micro, **kw)
    return loss, grads(model)


def assert_same(a: dict, b: dict) -> None:
    """Equal up to float32 round-off (a few 1e-7 here); gradients are of order 1."""
    assert a.keys() == b.keys()
    for name in a:
        atol = 1e-6 * max(b[name].abs().max().item(), 1.0)
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=atol, msg=name)


def flat(g: dict) -> torch.Tensor:
    return torch.cat([t.flatten().float() for _, t in sorted(g.items())])


def rel_diff(a: dict, b: dict) -> float:
    """|a - b| / |b| over all gradients at once (a per-tensor ratio is noise for a ~0 gradient)."""
    assert a.keys() == b.keys()
    return ((flat(a) - flat(b)).norm() / flat(b).norm()).item()


def heads_case(dropout: float = 0.1):
    torch.manual_seed(0)
    model = heads_model(item_dim=12, text_dim=9, embed_dim=8, layers=2, hidden_dim=16, dropout=dropout)
    return model.train(), torch.randn(B, 12), torch.randn(B, 9)


def bridge_case(dropout: float = 0.1):
    torch.manual_seed(0)
    model = bridge_model(12, 9, embed_dim=8, text_layers=2, dropout=dropout,
                         num_queries=3, depth=2, width=16, heads=4, mlp_ratio=2)
    tokens = torch.randn(B, 5, 12)
    mask = torch.ones(B, 5, dtype=torch.long)
    mask[::2, 3:] = 0  # every other row has two padded tokens
    return model.train(), {"tokens": tokens, "mask": mask}, torch.randn(B, 9)


@pytest.mark.parametrize("case", [heads_case, bridge_case], ids=["mlp-heads", "bridge-dict"])
def test_cached_step_equals_full_batch_step_with_dropout(case):
    model, images, texts = case()
    torch.manual_seed(1)
    ref_loss, ref = reference(model, images, texts, MICRO)
    after_ref = torch.rand(3)
    torch.manual_seed(1)
    loss, got = run(contrastive_step, model, images, texts)
    assert torch.equal(torch.rand(3), after_ref)  # the step draws as many numbers as the reference
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert "temperature.log_scale" in got and got["temperature.log_scale"].abs().item() > 0
    assert_same(got, ref)


@pytest.mark.parametrize("case", [heads_case, bridge_case], ids=["mlp-heads", "bridge-dict"])
def test_without_dropout_cached_step_equals_one_forward_of_the_whole_batch(case):
    model, images, texts = case(dropout=0.0)
    model.zero_grad()
    ref_loss = full_step(model, images, texts)
    ref = grads(model)
    loss, got = run(contrastive_step, model, images, texts, micro=4)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert_same(got, ref)


def test_plain_accumulation_gives_different_gradients():
    model, images, texts = heads_case(dropout=0.0)
    model.zero_grad()
    full_step(model, images, texts)
    ref = grads(model)
    _, cached = run(contrastive_step, model, images, texts)
    _, accumulated = run(accumulate_step, model, images, texts)
    assert rel_diff(cached, ref) < 1e-5
    assert rel_diff(accumulated, ref) > 0.05  # it sees 2-3 negatives per pair, not 9
    # with one micro-batch holding the whole batch it is the same objective
    _, whole = run(accumulate_step, model, images, texts, micro=B)
    assert_same(whole, ref)


def test_rng_replay_is_what_makes_dropout_agree(monkeypatch):
    model, images, texts = heads_case(dropout=0.3)
    torch.manual_seed(1)
    _, ref = reference(model, images, texts, MICRO)
    monkeypatch.setattr(gradcache.RngState, "replay", lambda self: nullcontext())
    torch.manual_seed(1)
    _, got = run(contrastive_step, model, images, texts)
    assert rel_diff(got, ref) > 1e-3


@pytest.mark.parametrize("kind", ["fixed", "dynamic"])
def test_other_temperatures(kind):
    # dynamic: the scale is read from the whole batch's similarity matrix, not a micro-batch's
    torch.manual_seed(0)
    model = DualEncoder(ProjectionHead(6, 4, layers=2, dropout=0.2), ProjectionHead(5, 4), 4, build_temperature(kind))
    images, texts = torch.randn(B, 6), torch.randn(B, 5)
    torch.manual_seed(1)
    ref_loss, ref = reference(model, images, texts, MICRO)
    torch.manual_seed(1)
    loss, got = run(contrastive_step, model, images, texts)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert_same(got, ref)
    assert any(n.startswith("temperature.") for n in got) == (kind == "dynamic")


def test_batchnorm_running_statistics_move_once_per_micro_batch():
    torch.manual_seed(0)
    tower = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.GELU(), nn.Linear(8, 4))
    model = DualEncoder(tower, ProjectionHead(5, 4), 4).train()
    images, texts = torch.randn(B, 6), torch.randn(B, 5)
    _, ref = reference(model, images, texts, 4)
    ref_stats = {k: v.clone() for k, v in tower[1].state_dict().items()}
    tower[1].reset_running_stats()
    _, got = run(contrastive_step, model, images, texts, micro=4)
    assert_same(got, ref)
    assert tower[1].num_batches_tracked.item() == 3  # micro-batches of 4, 4, 2: each counted once
    for k, v in tower[1].state_dict().items():
        torch.testing.assert_close(v, ref_stats[k])


def test_bf16_autocast_runs_and_agrees_loosely():
    model, images, texts = bridge_case(dropout=0.0)
    model.zero_grad()
    full_step(model, images, texts)
    ref = grads(model)
    bf16 = partial(torch.autocast, "cpu", dtype=torch.bfloat16)
    loss, got = run(contrastive_step, model, images, texts, autocast=bf16)
    assert torch.isfinite(loss)
    assert rel_diff(got, ref) < 0.05
    assert torch.nn.functional.cosine_similarity(flat(got), flat(ref), dim=0) > 0.99
    # a context manager instance (what mmret.device.autocast_context returns) is re-entered per forward
    _, again = run(contrastive_step, model, images, texts, autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    assert_same(again, got)


def test_grad_scaler_factor_reaches_every_gradient_once():
    # GradScaler runs on CPU in fp32 too, which checks the bookkeeping without a GPU
    model, images, texts = bridge_case(dropout=0.1)
    torch.manual_seed(1)
    _, ref = reference(model, images, texts, MICRO)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    torch.manual_seed(1)
    loss, got = run(contrastive_step, model, images, texts, scaler=scaler)
    assert_same({n: g / 1024.0 for n, g in got.items()}, ref)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler.unscale_(opt)
    assert_same(grads(model), ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 + GradScaler needs CUDA")
def test_fp16_with_grad_scaler_on_cuda():
    model, images, texts = bridge_case(dropout=0.1)
    model = model.cuda()
    images = {k: v.cuda() for k, v in images.items()}
    texts = texts.cuda()
    torch.manual_seed(1)
    _, ref = reference(model, images, texts, MICRO)
    scaler = torch.amp.GradScaler("cuda", init_scale=256.0)
    fp16 = partial(torch.autocast, "cuda", dtype=torch.float16)
    torch.manual_seed(1)
    loss, _ = run(contrastive_step, model, images, texts, scaler=scaler, autocast=fp16)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    scaler.unscale_(opt)
    assert torch.isfinite(loss)
    assert rel_diff(grads(model), ref) < 0.1


def test_bad_batches_end_in_one_clear_error():
    model, images, texts = heads_case()
    with pytest.raises(MmretError, match="--micro-batch must be at least 1, got 0"):
        contrastive_step(model, images, texts, 0)
    with pytest.raises(MmretError, match="as many items as captions, got 10 and 9"):
        contrastive_step(model, images, texts[:9], 3)
    with pytest.raises(MmretError, match="different numbers of rows"):
        gradcache.batch_size({"tokens": torch.zeros(3, 2), "mask": torch.zeros(4, 2)})


@pytest.mark.parametrize("hn_beta", [0.0, 0.5])
def test_cached_step_is_exact_with_shared_caption_positives_and_hn_nce(hn_beta):
    model, images, texts = heads_case(dropout=0.0)
    pos = torch.eye(B, dtype=torch.bool)
    pos[0, 4] = pos[4, 0] = pos[2, 9] = pos[9, 2] = True  # pairs across micro-batches share a caption
    loss_fn = ClipLoss(hn_beta=hn_beta)
    model.zero_grad()
    ref_loss = full_step(model, images, texts, loss_fn=loss_fn, positives=pos)
    ref = grads(model)
    loss, got = run(contrastive_step, model, images, texts, micro=4, loss_fn=loss_fn, positives=pos)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    assert_same(got, ref)
    plain_loss, _ = run(contrastive_step, model, images, texts, micro=4, loss_fn=loss_fn)
    assert plain_loss.item() != pytest.approx(loss.item(), rel=1e-4)  # the positives changed the objective
    acc_loss, _ = run(accumulate_step, model, images, texts, micro=5, loss_fn=loss_fn, positives=pos)
    assert torch.isfinite(acc_loss)  # plain accumulation slices the positives with the micro-batches
