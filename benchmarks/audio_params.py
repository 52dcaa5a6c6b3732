"""Parameter counts of the sound towers under every method that adapts them.

The `ast-audioset` tower (transformers' `ASTModel` with the published config of
MIT/ast-finetuned-audioset-10-10-0.4593) and CLAP's audio tower (`clap-htsat`:
`ClapAudioModelWithProjection`, HTSAT-unfused) are built on the meta device from the presets'
published configs, so no weights are read or downloaded, and adapted with each method's
`tune_model`, exactly as training adapts them. Counted: the tower's parameters, those that train,
and for AST a closed form of what each method adds:

  lora r8 q,v      LoRA r=8 on q and v: 12 blocks x 2 x r x (768 + 768)
  lora r64 q,k,v   LoRA r=64 on q, k and v: 12 x 3 x r x (768 + 768)
  prefix 16        16 prompt tokens at every block: 12 x 16 x 768
  adapter 64       bottleneck adapters after attention and MLP: 24 x (768 x 64 + 64 + 64 x 768 + 768)
  full             every weight

CLAP's audio tower is a Swin transformer: prefix does not apply (no sequence to prompt), LoRA and
adapters go into its 12 blocks of widths 96 to 768.

    python benchmarks/audio_params.py
"""

from __future__ import annotations

from mmret.encoders import load_tower
from mmret.errors import MmretError
from mmret.methods import MethodConfig, config_for, get_method

SETTINGS = {
    "lora r8 q,v": ("lora", dict(rank=8, targets="q,v")),
    "lora r64 q,k,v": ("lora", dict(rank=64, targets="q,k,v")),
    "prefix 16": ("prefix", dict(prefix_tokens=16)),
    "adapter 64": ("adapter", dict(adapter_dim=64)),
    "full": ("full", {}),
}
AST_ADDS = {  # closed forms for AST (12 blocks, width 768, MLP 3072)
    "lora r8 q,v": 12 * 2 * 8 * (768 + 768),
    "lora r64 q,k,v": 12 * 3 * 64 * (768 + 768),
    "prefix 16": 12 * 16 * 768,
    "adapter 64": 24 * (768 * 64 + 64 + 64 * 768 + 768),
    "full": 0,
}


def adapted(preset: str, method: str, options: dict) -> tuple[int, int] | str:
    """(parameters, trainable) of the preset's audio tower adapted by `method`, or why it cannot be."""
    tower = load_tower(preset, "audio", meta=True)
    cfg = config_for(method, **{k: getattr(MethodConfig(), k) for k in ("embed_dim", "dropout")}, **options)
    try:
        get_method(method).tune_model(tower.model, "audio", cfg)
    except MmretError as e:
        return str(e).split(":")[0] + ": does not apply"
    params = list(tower.model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


def main() -> None:
    for preset, label in (("ast-audioset", "AST (ast-audioset)"),
                          ("clap-htsat", "CLAP HTSAT audio tower (clap-htsat)")):
        base = sum(p.numel() for p in load_tower(preset, "audio", meta=True).model.parameters())
        print(f"{label}: {base:,} parameters")
        print("| method | tower parameters | trainable | % of the tower | closed form |")
        print("|---|---|---|---|---|")
        for name, (method, options) in SETTINGS.items():
            counts = adapted(preset, method, options)
            if isinstance(counts, str):
                print(f"| {name} | - | - | - | {counts} |")
                continue
            total, trainable = counts
            check = ""
            if preset == "ast-audioset":
                want = AST_ADDS[name] or base
                check = f"{want:,} ({'matches' if want == trainable else 'DIFFERS'})"
            print(f"| {name} | {total:,} | {trainable:,} | {100 * trainable / base:.3f}% | {check} |")
        print()


if __name__ == "__main__":
    main()
