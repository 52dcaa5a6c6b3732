"""Save a randomly initialised tower of a preset's published architecture as a model folder.

On a machine without the pretrained weights, this is how an AST (or CLAP) run can still be made,
as a contrast: the folder loads through the same path as the real checkpoint (config.json,
model.safetensors and the published feature extractor), so every command treats it as any model.
A random tower says nothing about what the architecture learns; what it shows is how far heads
over random features get (they tell sounds apart by level and spectral shape, not by meaning).

    python benchmarks/random_tower.py ast-audioset /tmp/ast-random --seed 0
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

from mmret.encoders import ENCODERS, load_tower


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("preset", help="an audio preset: ast-audioset or clap-htsat")
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    preset = ENCODERS[args.preset]
    arch = preset.architecture
    import transformers

    config = transformers.AutoConfig.for_model(arch.name, **arch.values)
    torch.manual_seed(args.seed)
    model = transformers.AutoModel.from_config(config)  # the transformers default initialisation
    model.save_pretrained(args.out)
    tower = load_tower(args.preset, "audio", meta=True)  # the published feature extractor settings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tower.preprocessing.extractor.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: random {type(model).__name__} ({n:,} parameters), seed {args.seed}")


if __name__ == "__main__":
    main()
