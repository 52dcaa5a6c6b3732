"""The temperature of the contrastive loss, in three kinds behind one interface.

Every kind is an `nn.Module` called as `module(similarity) -> logit_scale`: `similarity` is the
batch's (B, B) cosine-similarity matrix *before* any scaling, `logit_scale` a scalar tensor (1/tau)
to multiply it by. `learned` and `fixed` ignore the matrix (it may be None); `dynamic` reads it.

- `learned`: CLIP's single parameter, log(1/tau), kept in [0, log(max_scale)].
- `fixed`: a constant 1/tau with no parameter.
- `dynamic`: a small MLP maps the log-variance of the batch's similarity matrix to the batch's
  log-scale, bounded to the same range.

The range is enforced both ways CLIP needs: `forward` never returns a scale outside it, and the
training loop calls `clamp_()` after each optimizer step so the learned parameter never drifts
past the bound, where a clamped forward would give it no gradient to come back with.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mmret.errors import MmretError

TEMPERATURES = {
    "learned": "one learned parameter, CLIP's log-scale clamped to [1, max scale]",
    "fixed": "a constant temperature, no parameter",
    "dynamic": "a small MLP maps the spread (variance) of each batch's similarities to its temperature",
}
_EPS_VAR = 1e-6  # keeps log(variance) finite for a batch of identical similarities (e.g. B = 1)


class Temperature(nn.Module):
    """Base of the three kinds: `forward(similarity) -> logit_scale` (a scalar tensor)."""

    needs_similarity = False  # True when forward reads the similarity matrix

    def __init__(self, init_tau: float, max_scale: float) -> None:
        super().__init__()
        self.max_log_scale = math.log(max_scale)
        self.init_log_scale = math.log(1.0 / init_tau)

    def clamp_(self) -> None:
        """Bring parameters back into range after an optimizer step (no-op unless overridden)."""


class LearnedTemperature(Temperature):
    def __init__(self, init_tau: float = 0.07, max_scale: float = 100.0) -> None:
        super().__init__(init_tau, max_scale)
        self.log_scale = nn.Parameter(torch.tensor(self.init_log_scale))

    def forward(self, similarity: Tensor | None = None) -> Tensor:
        return self.log_scale.clamp(0.0, self.max_log_scale).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        self.log_scale.clamp_(0.0, self.max_log_scale)


class FixedTemperature(Temperature):
    def __init__(self, init_tau: float = 0.07, max_scale: float = 100.0) -> None:
        super().__init__(init_tau, max_scale)
        # a buffer so it follows .to(device); not persistent: the config holds its value
        self.register_buffer("log_scale", torch.tensor(self.init_log_scale), persistent=False)

    def forward(self, similarity: Tensor | None = None) -> Tensor:
        return self.log_scale.exp()


class DynamicTemperature(Temperature):
    """log-scale = log(max_scale) * sigmoid(fc2(act(fc1(log var(similarity))))).

    A sigmoid bounds the output instead of a hard clamp: a clamped MLP output past the bound
    would pass no gradient and freeze the MLP. The similarity matrix is detached: the encoders
    should lower the loss by ranking better, not by reshaping the spread that sets the temperature.
    """

    needs_similarity = True

    def __init__(self, init_tau: float = 0.07, max_scale: float = 100.0, hidden_dim: int = 32) -> None:
        super().__init__(init_tau, max_scale)
        self.fc1 = nn.Linear(1, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, 1)
        # start at init_tau for any input: small output weights, bias at the matching logit
        nn.init.normal_(self.fc2.weight, std=0.02)
        fraction = self.init_log_scale / self.max_log_scale
        nn.init.constant_(self.fc2.bias, math.log(fraction / (1.0 - fraction)))

    def forward(self, similarity: Tensor | None = None) -> Tensor:
        if similarity is None:
            raise ValueError("the dynamic temperature needs the batch similarity matrix")
        spread = similarity.detach().float().var(unbiased=False)
        x = torch.log(spread + _EPS_VAR).reshape(1, 1)  # (1, 1)
        z = self.fc2(self.act(self.fc1(x))).float()  # (1, 1)
        return (self.max_log_scale * torch.sigmoid(z)).exp().reshape(())


def build_temperature(kind: str = "learned", init_tau: float = 0.07, max_scale: float = 100.0,
                      hidden_dim: int = 32) -> Temperature:
    """The temperature module named `kind`, starting at `init_tau`, scale bounded by `max_scale`."""
    if kind not in TEMPERATURES:
        raise MmretError(f"unknown --temperature {kind!r}; choose one of {', '.join(TEMPERATURES)}")
    if not 0.0 < init_tau <= 1.0:
        raise MmretError(f"--temperature-init must be in (0, 1], got {init_tau}")
    if max_scale <= 1.0 or 1.0 / init_tau > max_scale:
        raise MmretError(f"--temperature-max-scale must exceed 1 and be at least 1/--temperature-init "
                         f"({1.0 / init_tau:.4g}), got {max_scale}")
    if kind == "learned":
        return LearnedTemperature(init_tau, max_scale)
    if kind == "fixed":
        return FixedTemperature(init_tau, max_scale)
    if hidden_dim < 1:
        raise MmretError(f"--temperature-hidden must be at least 1, got {hidden_dim}")
    if not 1.0 < 1.0 / init_tau < max_scale:  # the sigmoid reaches neither end of its range
        raise MmretError(f"the dynamic temperature needs 1/--temperature-max-scale < --temperature-init < 1, "
                         f"got {init_tau} with max scale {max_scale}")
    return DynamicTemperature(init_tau, max_scale, hidden_dim)


def logit_scale_for(temperature: Temperature, item_emb: Tensor, text_emb: Tensor) -> Tensor:
    """The logit scale for a batch of normalized embeddings (B, D), (B, D): what `ClipLoss` takes."""
    similarity = item_emb @ text_emb.t() if temperature.needs_similarity else None  # (B, B)
    return temperature(similarity)
