"""Projection heads: the trainable part that maps a pooled encoder output into the shared space.

A head is linear (`layers=1`) or an MLP (`layers>=2`: Linear → GELU → Dropout repeated, then a
final Linear). Two heads over cached frozen features are the cheapest method ("heads", the
locked-image baseline); a head also sits on top of a LoRA/adapter tower or the text side of the
bridge method. `Mlp` is shared with the bridge blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mmret.errors import MmretError


def check_dims(owner: str, **dims: int) -> None:
    """Raise a one-line MmretError naming the first dimension that is not a positive integer."""
    for name, value in dims.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise MmretError(f"{owner}: {name} must be a positive integer, got {value!r}")


def check_dropout(owner: str, dropout: float) -> None:
    if not 0.0 <= dropout < 1.0:
        raise MmretError(f"{owner}: dropout must be in [0, 1), got {dropout}")


class Mlp(nn.Module):
    """fc1 → act → drop → fc2 (timm `layers/mlp.py`); dropout after the activation only."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        check_dims("Mlp", in_dim=in_dim, hidden_dim=hidden_dim, out_dim=out_dim)
        check_dropout("Mlp", dropout)
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        x = self.drop(self.act(self.fc1(x)))  # (..., H)
        return self.fc2(x)  # (..., out_dim)


class ProjectionHead(nn.Module):
    """Pooled features (B, in_dim) → (B, out_dim); not normalised (the dual encoder does that).

    layers=1: one Linear. layers=L>=2: L-1 blocks of Linear → GELU → Dropout at `hidden_dim`
    (default: in_dim), then a Linear to out_dim. Parameters:
    layers=1: in*out + out; layers=L: in*h + h + (L-2)*(h*h + h) + h*out + out.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 512,
        layers: int = 1,
        hidden_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        hidden_dim = in_dim if hidden_dim is None else hidden_dim
        check_dims("projection head", in_dim=in_dim, out_dim=out_dim, layers=layers, hidden_dim=hidden_dim)
        check_dropout("projection head", dropout)
        self.in_dim, self.out_dim, self.layers = in_dim, out_dim, layers
        blocks: list[nn.Module] = []
        width = in_dim
        for _ in range(layers - 1):
            blocks += [nn.Linear(width, hidden_dim), nn.GELU(), nn.Dropout(dropout)]
            width = hidden_dim
        self.hidden = nn.Sequential(*blocks)  # empty (identity) for a linear head
        self.proj = nn.Linear(width, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_dim:
            raise MmretError(
                f"projection head expects features of width {self.in_dim}, got {tuple(x.shape)}; "
                "were the cached features made by another encoder?"
            )
        return self.proj(self.hidden(x))  # (B, out_dim)


class InputNorm(nn.Module):
    """Per-channel `x * scale + shift` at a tower's input, initialised from training data so that
    each channel starts with zero mean and unit variance.

    Outputs of a frozen tower share a large common component (the features of two unrelated
    pictures can have cosine similarity above 0.9); a head over raw features then sees mostly
    that component and learns slowly. Standardising removes it from the first step. The scale and
    shift keep training (no weight decay: they are vectors) and are saved with the head.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        check_dims("input norm", dim=dim)
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))

    @torch.no_grad()
    def init_from(self, sample: Tensor) -> None:
        """Standardise with the statistics of `sample`, (N, D) or (N, T, D) training features."""
        x = sample.reshape(-1, sample.shape[-1]).float()
        std = x.std(0).clamp_min(1e-6)
        self.scale.copy_(1.0 / std)
        self.shift.copy_(-x.mean(0) / std)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale + self.shift  # (..., D)


def init_input_norms(tower: nn.Module, sample: Tensor) -> int:
    """Initialise every `InputNorm` in `tower` from `sample`; returns how many there were. A tower
    whose parts read different views of its input (the residual bridge) does it itself."""
    if callable(getattr(tower, "init_input_norms", None)):
        return tower.init_input_norms(sample)
    norms = [m for m in tower.modules() if isinstance(m, InputNorm)]
    for norm in norms:
        norm.init_from(sample)
    return len(norms)
