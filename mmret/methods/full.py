"""`full`: every weight of the towers trains; the reference row of any comparison."""

from mmret.methods.towers import register_tower_method

build = register_tower_method("full", "full fine-tuning of both towers (the reference row)", lr=1e-5)
