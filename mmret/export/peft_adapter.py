"""`--format peft`: each tower a LoRA run adapted as a standard peft adapter folder, which
`peft.PeftModel.from_pretrained(base, folder)` opens over the base model (the tower as transformers
or timm loads it), and each side's head beside it.

LoRA is put inside a tower with `peft.inject_adapter_in_model`, so the adapted module already holds
peft's config and layers; the folder is what `PeftModel.save_pretrained` writes for them: the
config with the base model named, and the LoRA tensors under peft's saved names
(`base_model.model.<module>.lora_A.weight`)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from mmret.errors import MmretError
from mmret.export.registry import Exporter, register_export

USAGE = '''```python
from peft import PeftModel
from transformers import AutoModel  # a timm tower: timm.create_model(name, pretrained=True, num_classes=0)

base = AutoModel.from_pretrained(BASE)  # the model adapter_config.json names as base_model_name_or_path
tower = PeftModel.from_pretrained(base, "text")  # or the item tower's folder
```

The head beside a folder (`<side>_head.safetensors`) maps the tower's pooled output into the shared
space: `x * scale + shift` (its input norm, when the run used one), then the projection's Linear
layers (GELU between them); normalize the result.'''


def base_name(source: Any) -> str:
    """What the adapter names as its base: the hub id, or the local folder's path."""
    from mmret.encoders.hub import HUB_ID

    if source.folder is not None and not HUB_ID.match(source.id):
        return str(source.folder)
    return source.id


def adapter_folder(encoder: Any, folder: Path) -> None:
    """The peft folder of a LoRA-adapted tower."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    inner = encoder.model
    config = copy.deepcopy(inner.peft_config["default"])
    config.base_model_name_or_path = base_name(encoder.source)
    config.inference_mode = True
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    state = {f"base_model.model.{k}": v.detach().contiguous().cpu()
             for k, v in get_peft_model_state_dict(inner).items()}
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def write(model: Any, folder: Path) -> dict[str, Any]:
    from safetensors.torch import save_file

    from mmret.methods import SIDES
    from mmret.models.towers import EncoderTower

    if model.method != "lora":
        raise MmretError(f"--format peft writes LoRA adapters, and run {model.name} was trained with {model.method}: "
                         "no peft adapter sits inside its towers (prefix and adapter layers are mmret's own modules); "
                         "use --format onnx, openvino or sentence-transformers")
    _, dual = model.run.model(SIDES)
    files = {}
    for side, tower in (("item", dual.item_tower), ("text", dual.text_tower)):
        name = "text" if side == "text" else model.modality.name
        head = tower
        if isinstance(tower, EncoderTower):
            adapter_folder(tower.encoder, folder / name)
            files[f"{name}/"] = (f"the LoRA adapter of the {name} tower ({base_name(tower.encoder.source)}): "
                                 "adapter_config.json, adapter_model.safetensors")
            head = tower.head
        state = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
        if state:
            save_file(state, str(folder / f"{name}_head.safetensors"))
            files[f"{name}_head.safetensors"] = f"the {name} side's head over its tower's pooled output"
    return {"files": files, "usage": USAGE}


register_export(Exporter("peft", "each LoRA-adapted tower as a peft adapter folder, the heads beside", write))
