"""The symmetric InfoNCE loss against hand-computed values and a brute-force reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mmret.training.losses import ClipLoss

clip_loss = ClipLoss()  # one process, the diagonal as the only positives, plain InfoNCE


def test_two_by_two_by_hand():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    text = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # logits = 2 * image @ text.T = [[2, 1.2], [0, 1.6]]
    # image→text rows: -log softmax at the diagonal = log(1 + e^-0.8), log(1 + e^-1.6)
    # text→image columns [2, 0] and [1.2, 1.6]: log(1 + e^-2), log(1 + e^-0.4)
    expected = sum(math.log1p(math.exp(-d)) for d in (0.8, 1.6, 2.0, 0.4)) / 4
    assert torch.allclose(clip_loss.logits(image, text, 2.0)[0], torch.tensor([[2.0, 1.2], [0.0, 1.6]]))
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


# --- captions shared by pictures, and HN-NCE ---------------------------------------------------


def test_shared_captions_are_positives_and_the_diagonal_alone_is_the_plain_loss():
    g = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(4, 6, generator=g), dim=-1)
    text = F.normalize(torch.randn(4, 6, generator=g), dim=-1)
    eye = torch.eye(4, dtype=torch.bool)
    plain = clip_loss(image, text, 10.0).item()
    assert clip_loss(image, text, 10.0, positives=eye).item() == pytest.approx(plain, rel=1e-6)
    pos = eye.clone()
    pos[0, 1] = pos[1, 0] = True  # pictures 0 and 1 share their caption's text
    # by hand: row i's loss is log(sum over the row) - log(sum over its positives)
    logits = 10.0 * image @ text.T
    terms = []
    for m, p in ((logits, pos), (logits.T, pos.T)):
        for i in range(4):
            terms.append(torch.logsumexp(m[i], 0) - torch.logsumexp(m[i][p[i]], 0))
    expected = torch.stack(terms).mean().item()
    assert clip_loss(image, text, 10.0, positives=pos).item() == pytest.approx(expected, rel=1e-5)


def test_a_shared_caption_is_never_pushed_away():
    """Moving picture 0 towards picture 1's caption (the same text) raises the plain loss but not
    the loss that counts the pair as right."""
    image = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]], requires_grad=True)
    text = torch.eye(3)
    pos = torch.eye(3, dtype=torch.bool)
    pos[0, 1] = pos[1, 0] = True
    plain = torch.autograd.grad(clip_loss(image, text, 5.0), image)[0]
    shared = torch.autograd.grad(clip_loss(image, text, 5.0, positives=pos), image)[0]
    # d loss / d (image_0 · text_1): positive in the plain loss (a negative pulled down), <= 0 when shared
    assert plain[0, 1] > 0
    assert shared[0, 1] <= 0


def test_hn_nce_weights_by_hand():
    image = F.normalize(torch.tensor([[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [0.0, 0.5, 1.0]]), dim=-1)
    text = F.normalize(torch.tensor([[0.9, 0.1, 0.2], [0.3, 1.0, 0.0], [0.2, 0.1, 1.0]]), dim=-1)
    scale, beta = 5.0, 0.5
    logits = scale * image @ text.T
    terms = []
    for m in (logits, logits.T):
        for i in range(3):
            neg = [m[i, j] for j in range(3) if j != i]
            w = torch.softmax(beta * torch.stack(neg), 0) * len(neg)  # weights that average 1
            denom = torch.exp(m[i, i]) + sum(wj * torch.exp(n) for wj, n in zip(w, neg))
            terms.append(torch.log(denom) - m[i, i])
    expected = torch.stack(terms).mean().item()
    hn_nce = ClipLoss(hn_beta=beta)(image, text, scale).item()
    assert hn_nce == pytest.approx(expected, rel=1e-5)
    assert hn_nce > clip_loss(image, text, scale).item()  # hard ones weigh more
