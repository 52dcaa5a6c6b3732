"""SAM around AdamW against a reference written out by hand from the two formulas, on the
two-parameter problem L(w) = 0.5 * w1^2 + 2 * w2^2 (gradient (w1, 4 w2)), starting at w = (1, 0.5).

One update, by hand (rho = 0.5, AdamW lr = 0.1, weight decay 0.1, betas 0.9 / 0.999, eps 1e-8):
    g       = (1, 2),  ||g|| = sqrt(5)
    e_w     = rho * g / ||g|| = (0.2236068, 0.4472136)
    g_sam   = grad at w + e_w = (1.2236068, 3.7888544)
    w       <- w * (1 - lr * wd) = (0.99, 0.495)                        decoupled weight decay
    m, v    = 0.1 * g_sam, 0.001 * g_sam^2;  m_hat = g_sam, v_hat = g_sam^2
    w       <- w - lr * m_hat / (sqrt(v_hat) + eps) = (0.89, 0.395)     (Adam's first step is ~sign)
The second update is where the magnitudes of g_sam count; `_reference` carries the same arithmetic
on for any number of steps, and after two steps gives (0.7813647, 0.2916054) with SAM versus
(0.7815719, 0.2923387) for plain AdamW.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from mmret.errors import MmretError
from mmret.training.sam import SAM, frozen_norm_stats

W0 = (1.0, 0.5)
RHO, LR, WD, BETAS, EPS = 0.5, 0.1, 0.1, (0.9, 0.999), 1e-8


def _grad(w):
    return [w[0], 4.0 * w[1]]


def _reference(steps: int, rho: float = RHO) -> list[float]:
    """SAM (Foret et al. 2021, eq. 2-3) + AdamW (Loshchilov & Hutter) in plain Python floats."""
    w, m, v = list(W0), [0.0, 0.0], [0.0, 0.0]
    b1, b2 = BETAS
    for t in range(1, steps + 1):
        g = _grad(w)
        norm = math.sqrt(sum(x * x for x in g))
        e = [rho * x / norm for x in g]
        g = _grad([wi + ei for wi, ei in zip(w, e)])  # the gradient at the perturbed point ...
        w = [wi * (1 - LR * WD) for wi in w]  # ... applied at the original weights
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g)]
        w = [wi - LR * (mi / (1 - b1**t)) / (math.sqrt(vi / (1 - b2**t)) + EPS) for wi, mi, vi in zip(w, m, v)]
    return w


def test_reference_matches_the_numbers_worked_by_hand():
    assert _reference(1) == pytest.approx([0.89, 0.395], abs=1e-8)
    assert _reference(2) == pytest.approx([0.7813647, 0.2916054], abs=1e-7)
    assert _reference(2, rho=0.0) == pytest.approx([0.7815719, 0.2923387], abs=1e-7)


class TwoParams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.tensor(W0[0]))
        self.w2 = nn.Parameter(torch.tensor(W0[1]))

    def loss(self) -> torch.Tensor:
        # written as a matmul so that autocast really runs it in low precision
        w = torch.stack([self.w1, self.w2])
        return 0.5 * w @ (torch.diag(torch.tensor([1.0, 4.0], device=w.device)) @ w)


def _run(steps: int, autocast=None, scaler=None, device="cpu", max_grad_norm=None):
    model = TwoParams().to(device)
    sam = SAM(torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, betas=BETAS, eps=EPS), RHO, scaler)
    dtypes = []

    def closure():
        with autocast or torch.autocast(device, enabled=False):
            loss = model.loss()
        dtypes.append(loss.dtype)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss

    for _ in range(steps):
        _, stepped = sam.step(closure, max_grad_norm=max_grad_norm)
        assert stepped
    return [model.w1.item(), model.w2.item()], dtypes


def test_fp32_update_matches_hand_reference():
    w, _ = _run(2)
    assert w == pytest.approx(_reference(2), abs=1e-6)
    assert w != pytest.approx(_reference(2, rho=0.0), abs=1e-5)  # plain AdamW lands elsewhere


def test_first_and_second_step_by_hand_in_a_loop():
    model = TwoParams()
    sam = SAM(torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD, betas=BETAS, eps=EPS), RHO)
    model.loss().backward()
    assert sam.first_step()
    assert [model.w1.item(), model.w2.item()] == pytest.approx([1.0 + 0.2236068, 0.5 + 0.4472136], abs=1e-6)
    assert model.w1.grad is None  # cleared for the second backward
    model.loss().backward()
    assert sam.second_step()
    assert [model.w1.item(), model.w2.item()] == pytest.approx(_reference(1), abs=1e-6)
    with pytest.raises(RuntimeError, match="needs a first_step"):
        sam.second_step()


def test_bf16_autocast_update_matches_reference_loosely():
    w, dtypes = _run(2, autocast=torch.autocast("cpu", dtype=torch.bfloat16))
    assert set(dtypes) == {torch.bfloat16}  # the loss really was computed in bf16
    assert w == pytest.approx(_reference(2), abs=1e-4)  # seen: within 2.2e-5
    assert w != pytest.approx(_reference(2, rho=0.0), abs=1e-4)  # plain AdamW is 2e-4 / 7e-4 away


def test_grad_scaler_path_on_cpu_unscales_once_and_matches():
    """GradScaler works on CPU too: the same bookkeeping as fp16 on CUDA, with fp32 numbers.
    A second unscale_ in one update would raise inside torch, so passing means it happened once."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1)
    w, _ = _run(2, scaler=scaler)
    assert w == pytest.approx(_reference(2), abs=1e-6)
    assert scaler.get_scale() == 2.0**14  # stepped and updated once per update: grew twice
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    w, _ = _run(2, scaler=scaler, max_grad_norm=1e6)  # explicit unscale_ before clipping
    assert w == pytest.approx(_reference(2), abs=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 with GradScaler needs CUDA")
def test_fp16_grad_scaler_on_cuda():
    scaler = torch.amp.GradScaler("cuda")
    w, dtypes = _run(2, autocast=torch.autocast("cuda", dtype=torch.float16), scaler=scaler, device="cuda")
    assert set(dtypes) == {torch.float16}
    assert w == pytest.approx(_reference(2), abs=1e-4)  # fp16 keeps 3 more mantissa bits than bf16
    assert scaler.get_scale() == 65536.0  # no overflow: nothing skipped, no growth yet


def _poisoned(model: TwoParams, bad_call: int, scaler=None):
    calls = []

    def closure():
        calls.append(1)
        loss = model.loss() * (float("inf") if len(calls) == bad_call else 1.0)
        (scaler.scale(loss) if scaler is not None else loss).backward()
        return loss

    return closure


@pytest.mark.parametrize("bad_call", [1, 2])
@pytest.mark.parametrize("use_scaler", [False, True])
def test_non_finite_gradients_skip_the_update(bad_call, use_scaler):
    model = TwoParams()
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WD)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12) if use_scaler else None
    sam = SAM(optimizer, RHO, scaler)
    _, stepped = sam.step(_poisoned(model, bad_call, scaler))
    assert not stepped
    assert (model.w1.item(), model.w2.item()) == W0  # bit for bit: not moved, ascent reverted
    assert optimizer.state_dict()["state"] == {}  # AdamW never stepped
    if scaler is not None:
        assert scaler.get_scale() == 2.0**11  # backed off once
    _, stepped = sam.step(_poisoned(model, 0, scaler))  # and the next update works
    assert stepped and model.w1.item() != W0[0]


def test_ascent_is_reverted_exactly_not_subtracted():
    # values where (w + e) - e != w in fp32, so only a copy-back restores them
    start = torch.tensor([0.1, 0.3])
    model = TwoParams()
    with torch.no_grad():
        model.w1.fill_(start[0])
        model.w2.fill_(start[1])
    g = torch.tensor(_grad(start.tolist()))
    e = RHO * g / g.norm()
    assert not torch.equal((start + e) - e, start)
    sam = SAM(torch.optim.AdamW(model.parameters(), lr=0.0, weight_decay=0.0), RHO)  # a step that moves nothing
    sam.step(lambda: model.loss().backward())
    assert torch.equal(torch.stack([model.w1.detach(), model.w2.detach()]), start)


def test_frozen_norm_stats_keep_running_averages():
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    before = net[1].running_mean.clone(), net[1].num_batches_tracked.clone()
    with frozen_norm_stats(net):
        net(torch.randn(8, 3) + 5.0)
    assert torch.equal(net[1].running_mean, before[0])
    assert torch.equal(net[1].num_batches_tracked, before[1])
    assert net[1].momentum == 0.1
    net(torch.randn(8, 3) + 5.0)
    assert not torch.equal(net[1].running_mean, before[0])  # outside the block they move again


def _bn_net_after_sam(module_arg: bool) -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    x = torch.randn(8, 3)
    sam = SAM(torch.optim.AdamW(net.parameters(), lr=0.01), 0.5)
    sam.step(lambda: net(x).pow(2).sum().backward(), module=net if module_arg else None)
    return net, x


def test_step_keeps_batchnorm_statistics_of_the_first_pass():
    net, x = _bn_net_after_sam(module_arg=True)
    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).train()
    fresh(x)  # one pass at the original weights
    assert torch.allclose(net[1].running_mean, fresh[1].running_mean)
    assert net[1].num_batches_tracked.item() == 1
    unfrozen, _ = _bn_net_after_sam(module_arg=False)  # without `module` the second pass counts too
    assert unfrozen[1].num_batches_tracked.item() == 2
    assert not torch.allclose(unfrozen[1].running_mean, fresh[1].running_mean)


def test_rho_must_be_positive():
    with pytest.raises(MmretError, match="--sam-rho must be positive"):
        SAM(torch.optim.AdamW([nn.Parameter(torch.zeros(1))]), rho=0.0)
