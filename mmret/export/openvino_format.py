"""`--format openvino`: both sides as OpenVINO IR (`text.xml`/`.bin`, `image.xml`/`.bin`), converted
from the ONNX graphs of `graphs` with weights kept in float32, and `openvino_config.json` holding
the compile setting that keeps float32 on CPUs with bfloat16 units (OpenVINO's default there)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmret.common.io import write_json
from mmret.encoders.convert import RUNTIME, to_openvino
from mmret.export.graphs import graphs
from mmret.export.registry import Exporter, register_export

USAGE = '''```python
import json, numpy as np, openvino as ov
from tokenizers import Tokenizer

core = ov.Core()
settings = json.load(open("openvino_config.json"))  # float32 even on CPUs with bfloat16 units
text = core.compile_model("text.xml", "CPU", settings)
tokens = Tokenizer.from_file("tokenizer.json").encode_batch(["a dog on the beach"])
ids = np.array([t.ids for t in tokens], dtype=np.int64)
mask = np.array([t.attention_mask for t in tokens], dtype=np.int64)
query = text({"input_ids": ids, "attention_mask": mask})[0]  # (1, dim), normalized
image = core.compile_model("image.xml", "CPU", settings)  # pixel_values as preprocessor_config.json says
```'''


def write(model: Any, folder: Path) -> dict[str, Any]:
    files = {}
    for name, about in graphs(model, folder).items():
        if not name.endswith(".onnx"):
            files[name] = about
            continue
        onnx = folder / name
        to_openvino(onnx, onnx.with_suffix(".xml"))
        onnx.unlink()
        files[onnx.with_suffix(".xml").name] = about.replace(".onnx", "")
        files[onnx.with_suffix(".bin").name] = "its weights, float32"
    write_json(folder / "openvino_config.json", RUNTIME)
    files["openvino_config.json"] = "compile_model settings: float32 inference"
    return {"files": files, "usage": USAGE}


register_export(Exporter("openvino", "both sides as OpenVINO IR (float32), tokenizer and preprocessing beside",
                         write))
