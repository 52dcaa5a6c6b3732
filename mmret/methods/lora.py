"""`lora`: low-rank updates (peft LoRA) on the attention projections of one or both towers.

`--rank`, `--alpha` (default 2 x rank), `--lora-dropout`, `--targets q,k,v`, `--tower`; the two
recipes people copy are `--recipe text-r8` and `--recipe both-r64` (see `mmret.adapters.RECIPES`).
"""

from mmret.methods.towers import register_tower_method

build = register_tower_method("lora", "LoRA (peft) inside one or both towers, with heads over experts", lr=1e-4)
