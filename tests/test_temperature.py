"""The three temperatures: one call shape, starting values, bounds, and where gradients go."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmret.errors import MmretError
from mmret.models.temperature import (
    DynamicTemperature,
    FixedTemperature,
    LearnedTemperature,
    build_temperature,
    logit_scale_for,
)


def _clip_loss(item_emb, text_emb, logit_scale):
    # the symmetric InfoNCE written out here so this test does not depend on mmret.losses
    logits = logit_scale * item_emb @ text_emb.t()
    labels = torch.arange(len(logits))
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2


def _batch(seed: int = 0, b: int = 8, d: int = 16):
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(b, d, generator=g), dim=-1).requires_grad_(),
            F.normalize(torch.randn(b, d, generator=g), dim=-1).requires_grad_())


@pytest.mark.parametrize("kind", ["learned", "fixed", "dynamic"])
def test_every_kind_starts_at_init_tau(kind):
    torch.manual_seed(0)
    temp = build_temperature(kind, init_tau=0.05)
    img, txt = _batch()
    scale = logit_scale_for(temp, img, txt)
    assert scale.shape == ()
    # dynamic: small random output weights move it a little from 1/0.05 = 20
    assert scale.item() == pytest.approx(20.0, rel=0.05 if kind == "dynamic" else 1e-6)


def test_learned_scale_is_clamped_and_clamp_restores_the_parameter():
    temp = LearnedTemperature(init_tau=0.07, max_scale=100.0)
    assert temp().item() == pytest.approx(1 / 0.07, rel=1e-6)
    with torch.no_grad():
        temp.log_scale.fill_(10.0)
    assert temp().item() == pytest.approx(100.0, rel=1e-5)
    temp.clamp_()
    assert temp.log_scale.item() == pytest.approx(math.log(100.0), rel=1e-6)
    with torch.no_grad():
        temp.log_scale.fill_(-3.0)
    temp.clamp_()
    assert temp().item() == pytest.approx(1.0)


def test_learned_gets_gradient_and_fixed_has_no_parameter():
    img, txt = _batch()
    learned = LearnedTemperature()
    _clip_loss(img, txt, logit_scale_for(learned, img, txt)).backward()
    assert learned.log_scale.grad is not None and learned.log_scale.grad.abs() > 0
    fixed = FixedTemperature(init_tau=0.1)
    assert list(fixed.parameters()) == []
    assert fixed(None).item() == pytest.approx(10.0, rel=1e-6)


def test_dynamic_mlp_gets_gradients():
    torch.manual_seed(0)
    temp = DynamicTemperature(init_tau=0.07, max_scale=100.0, hidden_dim=8)
    img, txt = _batch()
    loss = _clip_loss(img, txt, logit_scale_for(temp, img, txt))
    loss.backward()
    for name, p in temp.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # the similarity is detached: the temperature adds no gradient path into the embeddings
    img2, txt2 = _batch()  # the same values again
    scale = logit_scale_for(temp, img2, txt2).detach()
    grad_with_constant_scale = torch.autograd.grad(_clip_loss(img2, txt2, scale), img2)[0]
    assert torch.allclose(img.grad, grad_with_constant_scale, atol=1e-6)


def test_dynamic_scale_follows_the_spread_and_stays_in_range():
    torch.manual_seed(0)
    temp = DynamicTemperature(init_tau=0.07, max_scale=100.0, hidden_dim=8)
    with torch.no_grad():  # a steep MLP so the output can be pushed to both ends
        temp.fc2.weight.fill_(50.0)
    wide = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    flat = torch.full((2, 2), 0.3)
    scales = [temp(s).item() for s in (wide, flat)]
    assert scales[0] != pytest.approx(scales[1])
    assert max(scales) == pytest.approx(100.0, rel=1e-5)  # saturated at the bound (up to fp32 exp rounding)
    for s in scales:
        assert 1.0 <= s <= 100.0 * (1 + 1e-6)
    with pytest.raises(ValueError, match="needs the batch similarity"):
        temp(None)


def test_bad_options_are_clear_errors():
    with pytest.raises(MmretError, match="unknown --temperature 'cosine'"):
        build_temperature("cosine")
    with pytest.raises(MmretError, match="--temperature-init must be in"):
        build_temperature("learned", init_tau=0.0)
    with pytest.raises(MmretError, match="--temperature-max-scale"):
        build_temperature("learned", init_tau=0.001, max_scale=100.0)
    with pytest.raises(MmretError, match="dynamic temperature needs"):
        build_temperature("dynamic", init_tau=1.0)
