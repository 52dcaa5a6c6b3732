"""Projection heads, the querying bridge, the dual encoder, its parameter table, and latent mixup."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import bridge_model, heads_model
from torch import nn

from mmret.errors import MmretError
from mmret.models import (
    DualEncoder,
    ProjectionHead,
    QueryBridge,
    count_part,
    parameter_table,
)
from mmret.models.mixup import latent_mixup, mix, sample_mixup
from mmret.models.temperature import build_temperature


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- heads ---------------------------------------------------------------------------------------


def test_linear_head_shape_and_parameter_count():
    head = ProjectionHead(in_dim=12, out_dim=5)
    assert head(torch.randn(3, 12)).shape == (3, 5)
    assert n_params(head) == 12 * 5 + 5 == 65


def test_mlp_head_parameter_count_by_hand():
    # layers=3, hidden 7: Linear(12→7), GELU, Dropout, Linear(7→7), GELU, Dropout, Linear(7→5)
    head = ProjectionHead(in_dim=12, out_dim=5, layers=3, hidden_dim=7, dropout=0.1)
    expected = (12 * 7 + 7) + (7 * 7 + 7) + (7 * 5 + 5)
    assert n_params(head) == expected == 187
    assert head(torch.randn(4, 12)).shape == (4, 5)
    # hidden width defaults to the input width
    assert n_params(ProjectionHead(6, 4, layers=2)) == (6 * 6 + 6) + (6 * 4 + 4) == 70


def test_head_rejects_bad_settings_and_wrong_feature_width():
    with pytest.raises(MmretError, match="layers must be a positive integer"):
        ProjectionHead(8, 4, layers=0)
    with pytest.raises(MmretError, match="dropout must be in"):
        ProjectionHead(8, 4, dropout=1.0)
    with pytest.raises(MmretError, match=r"expects features of width 8, got \(2, 9\)"):
        ProjectionHead(8, 4)(torch.randn(2, 9))


# --- bridge --------------------------------------------------------------------------------------


def bridge_formula(in_dim: int, width: int, out: int, queries: int, depth: int, ratio: float) -> int:
    w, h = width, int(width * ratio)
    attention = 4 * w * w + 4 * w  # q, k, v, out projections with biases
    block = 2 * attention + 3 * 2 * w + (w * h + h + h * w + w)  # self + cross, 3 LayerNorms, MLP
    input_proj = in_dim * w + w if in_dim != w else 0
    return queries * w + input_proj + 2 * w + depth * block + 2 * w + (w * out + out)


def test_bridge_parameter_count_by_hand():
    bridge = QueryBridge(in_dim=20, out_dim=8, num_queries=3, depth=2, width=16, heads=4, mlp_ratio=2)
    assert n_params(bridge) == bridge_formula(20, 16, 8, 3, 2, 2) == 7272
    same_width = QueryBridge(in_dim=16, out_dim=8, num_queries=3, depth=1, width=16, heads=4, mlp_ratio=2)
    assert isinstance(same_width.input_proj, nn.Identity)
    assert n_params(same_width) == bridge_formula(16, 16, 8, 3, 1, 2)


def test_bridge_defaults_and_shapes():
    bridge = QueryBridge(in_dim=384)
    assert (bridge.queries.shape, len(bridge.blocks), bridge.width, bridge.out_dim) == ((32, 384), 2, 384, 512)
    assert bridge.blocks[0].self_attn.heads == 6 and bridge.blocks[0].mlp.fc1.out_features == 4 * 384
    assert n_params(bridge) == bridge_formula(384, 384, 512, 32, 2, 4.0)
    small = QueryBridge(in_dim=10, out_dim=6, num_queries=2, depth=1, width=8, heads=2)
    assert small(torch.randn(3, 5, 10)).shape == (3, 6)


def test_bridge_mask_hides_padded_tokens():
    torch.manual_seed(0)
    bridge = QueryBridge(in_dim=10, out_dim=6, num_queries=2, depth=2, width=8, heads=2).eval()
    tokens = torch.randn(2, 5, 10)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    changed = tokens.clone()
    changed[0, 3:] = torch.randn(2, 10) * 5  # only padded positions of row 0 change
    out, out_changed = bridge(tokens, mask), bridge(changed, mask)
    assert torch.allclose(out, out_changed, atol=1e-6)
    assert not torch.allclose(bridge(tokens), bridge(changed), atol=1e-3)  # without the mask they count
    assert torch.allclose(out[0], bridge(tokens[:1, :3]).squeeze(0), atol=1e-5)  # = the unpadded row


def test_bridge_rejects_bad_settings_and_pooled_input():
    with pytest.raises(MmretError, match="width 10 must be divisible by heads 4"):
        QueryBridge(in_dim=8, width=10, heads=4)
    with pytest.raises(MmretError, match="cache the encoder's token states"):
        QueryBridge(in_dim=8, width=8, heads=2)(torch.randn(2, 8))


# --- dual encoder --------------------------------------------------------------------------------


class DictTower(nn.Module):
    """A tower called with keyword tensors, like a tokenizer batch."""

    def __init__(self, dim: int, out: int) -> None:
        super().__init__()
        self.head = ProjectionHead(dim, out)

    def forward(self, features: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return self.head(features * weight[:, None])


def test_dual_encoder_embeddings_are_normalised_and_one_size():
    model = heads_model(item_dim=12, text_dim=7, embed_dim=6, layers=2, hidden_dim=9)
    out = model(torch.randn(4, 12), torch.randn(4, 7))
    assert out.item_emb.shape == out.text_emb.shape == (4, 6)
    assert torch.allclose(out.item_emb.norm(dim=-1), torch.ones(4), atol=1e-6)
    assert torch.allclose(out.text_emb.norm(dim=-1), torch.ones(4), atol=1e-6)
    raw = model.encode_item(torch.ones(2, 12), normalize=False)
    assert not torch.allclose(raw.norm(dim=-1), torch.ones(2))
    assert torch.allclose(model.encode_item(torch.ones(2, 12)), raw / raw.norm(dim=-1, keepdim=True))


def test_dual_encoder_passes_dicts_as_keywords():
    model = DualEncoder(DictTower(5, 4), ProjectionHead(3, 4), embed_dim=4)
    feats, weight = torch.randn(2, 5), torch.tensor([1.0, 2.0])
    emb = model.encode_item({"features": feats, "weight": weight}, normalize=False)
    assert torch.allclose(emb, model.item_tower.head(feats * weight[:, None]))


def test_dual_encoder_rejects_a_tower_of_the_wrong_size():
    model = DualEncoder(ProjectionHead(5, 3), ProjectionHead(5, 4), embed_dim=4)
    with pytest.raises(MmretError, match=r"item tower returned shape \(2, 3\), expected \(batch, 4\)"):
        model.encode_item(torch.randn(2, 5))


def test_logit_scale_init_and_clamping():
    model = heads_model(4, 4, embed_dim=4)
    emb = torch.eye(4)
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07), rel=1e-6)
    assert model.logit_scale_for(emb, emb).item() == pytest.approx(1 / 0.07, rel=1e-5)
    assert model(torch.randn(2, 4), torch.randn(2, 4)).logit_scale.item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.logit_scale_for(emb, emb).item() == pytest.approx(100.0, rel=1e-5)  # capped in the forward
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == pytest.approx(math.log(100.0), rel=1e-6)
    with torch.no_grad():
        model.logit_scale.fill_(-1.0)
    model.clamp_logit_scale_()
    assert model.logit_scale.item() == 0.0
    fixed = DualEncoder(ProjectionHead(4, 4), ProjectionHead(4, 4), 4, build_temperature("fixed", 0.05))
    assert fixed.logit_scale_for(emb, emb).item() == pytest.approx(20.0, rel=1e-5)
    assert not any(p.requires_grad for p in fixed.temperature.parameters())


def test_parameter_table_counts_parts_and_frozen_weights():
    model = bridge_model(20, 6, embed_dim=8, text_layers=1, num_queries=3, depth=2, width=16, heads=4, mlp_ratio=2)
    for p in model.text_tower.parameters():
        p.requires_grad_(False)
    rows = {r.part: r for r in parameter_table(model)}
    assert list(rows) == ["item", "text", "temperature", "total"]
    assert rows["item"].total == rows["item"].trainable == 7272
    assert (rows["text"].total, rows["text"].trainable) == (6 * 8 + 8, 0)
    assert (rows["temperature"].total, rows["temperature"].trainable) == (1, 1)
    assert (rows["total"].total, rows["total"].trainable) == (7272 + 56 + 1, 7272 + 1)
    assert rows["total"].percent_trainable == pytest.approx(100 * 7273 / 7329)
    assert count_part(nn.Linear(3, 2)).total == 8


def test_named_parts_lists_the_sub_parts_of_a_tower_that_has_them():
    class Tower(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.head = nn.Linear(3, 5), ProjectionHead(5, 4)

        def forward(self, x):
            return self.head(self.encoder(x))

        def named_parts(self):
            return {"encoder": self.encoder, "head": self.head}

    model = DualEncoder(Tower(), ProjectionHead(2, 4), embed_dim=4)
    assert list(model.named_parts()) == ["item.encoder", "item.head", "text", "temperature"]


def test_state_dict_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(0)
    model = bridge_model(10, 6, embed_dim=8, num_queries=2, depth=1, width=8, heads=2).eval()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    torch.manual_seed(1)
    again = bridge_model(10, 6, embed_dim=8, num_queries=2, depth=1, width=8, heads=2).eval()
    again.load_state_dict(load_file(tmp_path / "w.safetensors"))
    tokens, text = torch.randn(3, 4, 10), torch.randn(3, 6)
    assert torch.equal(model(tokens, text).item_emb, again(tokens, text).item_emb)
    assert "temperature.log_scale" in model.state_dict()


# --- latent mixup --------------------------------------------------------------------------------


def test_mixup_shares_lambda_and_permutation_across_modalities():
    n = 8
    images = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)  # row i holds i
    texts = -torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2)  # row i holds -i
    mixed_img, mixed_txt, lam, perm = latent_mixup(images, texts, 1.0, torch.Generator().manual_seed(3))
    # the same mix on both sides means mixed caption i is exactly minus mixed image i
    assert torch.allclose(mixed_txt[:, 0], -mixed_img[:, 0])
    assert torch.allclose(mixed_img[:, 0], lam * torch.arange(n) + (1 - lam) * perm.float())
    assert 0.0 < lam < 1.0 and sorted(perm.tolist()) == list(range(n)) and perm.tolist() != list(range(n))


def test_mixup_is_identity_at_lambda_one_and_seeded():
    x = torch.randn(6, 4)
    assert torch.equal(mix(x, 1.0, torch.randperm(6)), x)
    a = sample_mixup(6, 0.4, torch.Generator().manual_seed(7))
    b = sample_mixup(6, 0.4, torch.Generator().manual_seed(7))
    c = sample_mixup(6, 0.4, torch.Generator().manual_seed(8))
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and a[0] != c[0]


def test_mixup_lambda_follows_beta():
    g = torch.Generator().manual_seed(0)
    uniform = [sample_mixup(2, 1.0, g)[0] for _ in range(2000)]  # Beta(1, 1) is uniform
    assert sum(uniform) / 2000 == pytest.approx(0.5, abs=0.03)
    assert sum(u < 0.25 for u in uniform) / 2000 == pytest.approx(0.25, abs=0.03)
    peaked = [sample_mixup(2, 0.1, g)[0] for _ in range(2000)]  # mass near 0 and 1
    assert sum(min(u, 1 - u) < 0.05 for u in peaked) / 2000 > 0.6


def test_mixup_of_token_states_unites_masks_and_refuses_token_ids():
    tokens = {"tokens": torch.randn(4, 3, 2), "mask": torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1], [1, 0, 0]])}
    perm = torch.tensor([1, 2, 3, 0])
    mixed = mix(tokens, 0.3, perm)
    assert torch.allclose(mixed["tokens"], 0.3 * tokens["tokens"] + 0.7 * tokens["tokens"][perm])
    assert mixed["mask"].tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 1], [1, 0, 0]]
    with pytest.raises(MmretError, match="cannot mix 'input_ids'"):
        mix({"input_ids": torch.tensor([[1, 2], [3, 4]])}, 0.5, torch.tensor([1, 0]))
    with pytest.raises(MmretError, match="as many items as captions"):
        latent_mixup(torch.randn(3, 2), torch.randn(4, 2), 1.0, torch.Generator())
    with pytest.raises(MmretError, match="--mixup-alpha must be positive"):
        sample_mixup(3, 0.0, torch.Generator())


def test_token_pool_averages_the_patch_grid_and_keeps_the_class_token():
    from mmret.models.bridge import QueryBridge, pool_patch_grid

    x = torch.randn(2, 1 + 16, 3)
    y = pool_patch_grid(x, 2)
    grid = x[:, 1:].reshape(2, 4, 4, 3)
    assert y.shape == (2, 1 + 4, 3) and torch.equal(y[:, 0], x[:, 0])
    assert torch.allclose(y[:, 1], grid[:, :2, :2].mean(dim=(1, 2)))
    assert pool_patch_grid(torch.randn(1, 197, 4), 2).shape == (1, 50, 4)  # 14x14 -> 7x7, ceil
    with pytest.raises(MmretError, match="square patch grid"):
        pool_patch_grid(torch.randn(1, 20, 4), 2)
    bridge = QueryBridge(3, 8, num_queries=2, depth=1, width=4, heads=2, token_pool=2)
    assert bridge(x).shape == (2, 8)
