"""Bottleneck adapters (Houlsby et al. 2019): x + fc2(GELU(fc1(x))), fc2 zero-initialised so the
tower starts unchanged, after the attention output projection and after the MLP output of every
block, hooked onto those Linear layers (`<linear>.mmret_adapter`).

Our own module: AdapterHub's `adapters` (1.3.0, the newest on PyPI) pins transformers~=4.57.6 and
would downgrade the transformers 5 this project runs on; it also has no timm support.
"""

from __future__ import annotations

from torch import Tensor, nn

from mmret.errors import MmretError
from mmret.models.tuners.lora import MLP_OUT, TARGET_PATTERNS, linear_names, matches


class BottleneckAdapter(nn.Module):
    """x + fc2(act(fc1(x))) on (..., in_dim), fc2 zero-initialised: the identity at the start."""

    def __init__(self, in_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, in_dim)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(self.act(self.fc1(x)))  # (..., in_dim)

    def after(self, module: nn.Module, args: tuple, out: Tensor) -> Tensor:
        return self(out)


def add_adapters(model: nn.Module, hidden_dim: int) -> list[str]:
    """An adapter after the attention output projection and the MLP output of every block;
    returns the names of the Linear layers that carry one."""
    names = [n for n in linear_names(model) if matches(n, TARGET_PATTERNS["o"] + MLP_OUT)]
    if not names:
        raise MmretError(f"adapter: found no attention or MLP output layers in {type(model).__name__}; "
                         "adapters need a ViT, CLIP or BERT-like tower")
    for name in names:
        linear = model.get_submodule(name)
        adapter = BottleneckAdapter(linear.out_features, hidden_dim)
        linear.mmret_adapter = adapter.to(device=linear.weight.device, dtype=linear.weight.dtype)
        linear.register_forward_hook(adapter.after)
    return names
