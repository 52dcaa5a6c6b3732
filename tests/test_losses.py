"""The symmetric InfoNCE loss against hand-computed values and a brute-force reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmret.training.losses import clip_logits, clip_loss


def test_two_by_two_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logits = 2 * image @ text.T = [[2, 1.2], [0, 1.6]]
    # image→text rows: -log softmax at the diagonal = log(1 + e^-0.8), log(1 + e^-1.6)
    # text→image columns [2, 0] and [1.2, 1.6]: log(1 + e^-2), log(1 + e^-0.4)
    expected = sum(math.log1p(math.exp(-d)) for d in (0.8, 1.6, 2.0, 0.4)) / 4
    assert torch.allclose(clip_logits(image, text, 2.0), torch.tensor([[2.0, 1.2], [0.0, 1.6]]))
    assert clip_loss(image, text, torch.tensor(2.0)).item() == pytest.approx(expected, rel=1e-6)


def test_matches_a_brute_force_loop_and_is_symmetric():
    g = torch.Generator().manual_seed(0)
    image = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    text = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    scale = 14.3
    terms = []
    for i in range(5):
        row = [scale * float(image[i] @ text[j]) for j in range(5)]
        col = [scale * float(image[j] @ text[i]) for j in range(5)]
        terms.append(math.log(sum(map(math.exp, row))) - row[i])
        terms.append(math.log(sum(map(math.exp, col))) - col[i])
    expected = sum(terms) / 10
    assert clip_loss(image, text, scale).item() == pytest.approx(expected, rel=1e-5)
    assert clip_loss(text, image, scale).item() == pytest.approx(expected, rel=1e-5)


def test_aligned_pairs_have_low_loss_and_the_scale_gets_a_gradient():
    emb = torch.eye(4)
    scale = torch.tensor(50.0, requires_grad=True)
    loss = clip_loss(emb, emb, scale)
    assert loss.item() < 1e-10 + 4 * math.exp(-50)
    shuffled = clip_loss(emb, emb[[1, 0, 3, 2]], torch.tensor(50.0))
    assert shuffled.item() > 40  # every positive is now an orthogonal pair
    clip_loss(emb, F.normalize(emb + 0.3, dim=-1), scale).backward()
    assert scale.grad is not None and scale.grad.item() != 0.0
