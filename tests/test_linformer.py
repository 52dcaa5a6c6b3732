"""The Linformer text encoder: exact standard attention in the identity case, padding, shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mmret.errors import MmretError
from mmret.models.linformer import LinformerEncoder, LinformerSelfAttention

WIDTH, HEADS, N = 16, 4, 6


def _identity_linformer() -> LinformerSelfAttention:
    attn = LinformerSelfAttention(WIDTH, HEADS, seq_len=N, k=N)
    with torch.no_grad():
        attn.proj_e.copy_(torch.eye(N))
        attn.proj_f.copy_(torch.eye(N))
    return attn.eval()


def _mha_like(attn: LinformerSelfAttention) -> nn.MultiheadAttention:
    mha = nn.MultiheadAttention(WIDTH, HEADS, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(attn.in_proj.weight)
        mha.in_proj_bias.copy_(attn.in_proj.bias)
        mha.out_proj.weight.copy_(attn.out_proj.weight)
        mha.out_proj.bias.copy_(attn.out_proj.bias)
    return mha.eval()


def test_identity_projection_equals_multihead_attention():
    torch.manual_seed(0)
    attn = _identity_linformer()
    x = torch.randn(3, N, WIDTH)
    expected, _ = _mha_like(attn)(x, x, x, need_weights=False)
    assert torch.allclose(attn(x), expected, atol=1e-5)


def test_identity_projection_equals_masked_attention():
    torch.manual_seed(1)
    attn = _identity_linformer()
    x = torch.randn(3, N, WIDTH)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    expected, _ = _mha_like(attn)(x, x, x, key_padding_mask=~mask, need_weights=False)
    assert torch.allclose(attn(x, mask), expected, atol=1e-5)


def test_identity_projection_equals_sdpa_by_hand():
    """The same check against torch's SDPA on heads split by hand, with the layer's own weights."""
    torch.manual_seed(2)
    attn = _identity_linformer()
    x = torch.randn(2, N, WIDTH)
    q, k, v = attn.in_proj(x).chunk(3, dim=-1)
    heads = lambda t: t.view(2, N, HEADS, WIDTH // HEADS).transpose(1, 2)  # noqa: E731
    out = F.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).reshape(2, N, WIDTH)
    assert torch.allclose(attn(x), attn.out_proj(out), atol=1e-5)


def test_random_projection_differs_from_full_attention():
    """With a real k < n projection the layer is not plain attention (the check above can fail)."""
    torch.manual_seed(3)
    attn = LinformerSelfAttention(WIDTH, HEADS, seq_len=N, k=2).eval()
    x = torch.randn(2, N, WIDTH)
    expected, _ = _mha_like(attn)(x, x, x, need_weights=False)
    assert not torch.allclose(attn(x), expected, atol=1e-3)


def _encoder(**kw) -> LinformerEncoder:
    torch.manual_seed(0)
    args = dict(vocab_size=50, max_length=12, width=16, depth=2, heads=2, k=4) | kw
    return LinformerEncoder(**args).eval()


def test_encoder_shapes_and_padding_invariance():
    enc = _encoder()
    ids = torch.randint(3, 50, (2, 7))
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    out = enc(ids, mask)
    assert out.shape == (2, 16)
    assert enc.token_states(ids, mask).shape == (2, 7, 16)
    # other pad ids, and padding the batch further out, change nothing for the real tokens
    other = ids.clone()
    other[1, 4:] = 0
    longer_ids = torch.cat([other, torch.full((2, 5), 7)], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(2, 5, dtype=torch.long)], dim=1)
    assert torch.allclose(enc(other, mask), out, atol=1e-6)
    assert torch.allclose(enc(longer_ids, longer_mask), out, atol=1e-6)
    # and the text alone, unpadded, gives the same vector
    assert torch.allclose(enc(ids[1:, :4], mask[1:, :4]), out[1:], atol=1e-6)


def test_padding_content_matters_without_mask():
    """The invariance above comes from the mask: without it the pad tokens do change the output."""
    enc = _encoder()
    ids = torch.randint(3, 50, (1, 7))
    other = ids.clone()
    other[0, 4:] = 0
    assert not torch.allclose(enc(ids), enc(other), atol=1e-4)


def test_encoder_backward_reaches_every_parameter():
    enc = _encoder(dropout=0.1).train()
    ids = torch.randint(3, 50, (4, 12))
    mask = torch.ones(4, 12, dtype=torch.long)
    mask[2:, 8:] = 0
    enc(ids, mask).pow(2).sum().backward()
    missing = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    # E/F columns past a batch's length get no gradient, but every tensor gets some
    assert missing == []


def test_all_padding_text_gives_finite_output():
    enc = _encoder()
    out = enc(torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 5, dtype=torch.long))
    assert torch.isfinite(out).all()


def test_bf16_autocast_runs():
    enc = _encoder()
    ids = torch.randint(3, 50, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(ids, torch.ones_like(ids))
    assert torch.allclose(out.float(), enc(ids, torch.ones_like(ids)), atol=0.1)


def test_too_long_text_is_a_clear_error():
    enc = _encoder()
    with pytest.raises(MmretError, match="longer than the encoder's maximum of 12"):
        enc(torch.zeros(1, 13, dtype=torch.long))


def test_width_must_divide_by_heads():
    with pytest.raises(MmretError, match="divisible"):
        LinformerSelfAttention(10, 3, seq_len=4, k=4)
