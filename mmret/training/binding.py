"""A run bound into another run's space takes that run's text side frozen (see `mmret.runs.space`):
the text tower's weights the anchor trained are loaded into this run's text tower, which then
never trains (no gradient, and it stays in eval mode, so its dropout never fires) while the item
side learns to meet it. Its checkpoint keeps those weights (`runs.checkpoint.BOUND`), so the run
opens on its own and embeds a caption to the same bytes as the run it was bound to."""

from __future__ import annotations

import types
from pathlib import Path

from torch import nn

from mmret.errors import MmretError
from mmret.runs import checkpoint_path
from mmret.runs.checkpoint import BOUND, current_names, read_tensors, trainable_state

TEXT = "text_tower."


def _stay_in_eval(module: nn.Module) -> None:
    """`module` in eval mode for good: `model.train()` reaches its children through `train`."""
    module.eval()
    module.train = types.MethodType(lambda self, mode=True: self, module)


def bind_text_side(model: nn.Module, run_dir: Path) -> None:
    """Load the text tower of `run_dir`'s best checkpoint into `model.text_tower` and freeze it; one
    line when the two text sides are not the same shapes (another method or head settings)."""
    theirs = {k[len(TEXT):]: v for k, v in current_names(read_tensors(checkpoint_path(run_dir, "best"))).items()
              if k.startswith(TEXT)}
    mine = trainable_state(model.text_tower)
    differ = sorted(set(theirs) ^ set(mine)) or [k for k in sorted(mine) if mine[k].shape != theirs[k].shape]
    if differ:
        raise MmretError(f"run {run_dir.name}'s text side does not fit this run's ({TEXT}{differ[0]} differs): bind "
                         "with the method and head settings that run trained its text side with")
    model.text_tower.load_state_dict(theirs, strict=False)
    for name, param in model.text_tower.named_parameters():
        if name in mine:
            param.requires_grad_(False)
            setattr(param, BOUND, True)
    _stay_in_eval(model.text_tower)
