"""`adapter`: bottleneck adapters after the attention and the MLP of every block (`--adapter-dim`)."""

from mmret.methods.towers import register_tower_method

build = register_tower_method("adapter", "bottleneck adapters after attention and MLP in every block", lr=5e-4)
