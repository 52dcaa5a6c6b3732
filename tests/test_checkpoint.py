"""Checkpoints: trainable weights only, exact optimizer and RNG round trip, no pickle."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from mmret.errors import MmretError
from mmret.runs.checkpoint import load_state, load_weights, read_meta, save_state, save_weights, trainable_state


def model_with_frozen_part():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    for p in model[0].parameters():
        p.requires_grad_(False)
    return model


def test_only_trainable_parameters_and_their_buffers_are_saved(tmp_path):
    model = model_with_frozen_part()
    assert set(trainable_state(model)) == {"1.weight", "1.bias", "1.running_mean", "1.running_var",
                                           "1.num_batches_tracked", "2.weight", "2.bias"}
    save_weights(model, tmp_path / "w.safetensors", {"step": 3})
    assert read_meta(tmp_path / "w.safetensors") == {"step": 3}
    assert (tmp_path / "w.safetensors").read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle


def test_weights_reload_into_a_fresh_model(tmp_path):
    model = model_with_frozen_part()
    with torch.no_grad():
        model[2].weight.add_(1.0)
    save_weights(model, tmp_path / "w.safetensors", {})
    fresh = model_with_frozen_part()
    load_weights(fresh, tmp_path / "w.safetensors")
    assert torch.equal(fresh[2].weight, model[2].weight)


def test_weights_of_another_configuration_are_refused(tmp_path):
    save_weights(model_with_frozen_part(), tmp_path / "w.safetensors", {})
    other = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3), nn.Linear(3, 1))
    with pytest.raises(MmretError, match="does not fit this model"):
        load_weights(other, tmp_path / "w.safetensors")


def step(model, opt):
    x = torch.randn(5, 4)
    loss = model(x).square().mean() + torch.rand(()) * 0
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def test_optimizer_and_rng_resume_exactly(tmp_path):
    model = model_with_frozen_part()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        step(model, opt)
    save_weights(model, tmp_path / "w.safetensors", {"step": 3})
    save_state(opt, tmp_path / "s.safetensors", {"step": 3})
    expected = [step(model, opt) for _ in range(3)] + [random.random(), float(np.random.rand())]

    model2 = model_with_frozen_part()
    opt2 = torch.optim.AdamW([p for p in model2.parameters() if p.requires_grad], lr=0.5)
    load_weights(model2, tmp_path / "w.safetensors")
    meta = load_state(opt2, tmp_path / "s.safetensors")
    assert meta["step"] == 3 and opt2.param_groups[0]["lr"] == 0.1
    got = [step(model2, opt2) for _ in range(3)] + [random.random(), float(np.random.rand())]
    assert got == expected
