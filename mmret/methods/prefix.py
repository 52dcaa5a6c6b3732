"""`prefix`: learned prompt tokens at the input of every block of the towers (deep prompt tuning;
see `mmret.adapters` for why this is our own small module rather than peft's)."""

from mmret.methods.towers import register_tower_method

build = register_tower_method("prefix", "learned prompt tokens in every block of the towers (deep prompt tuning)", lr=1e-3)
