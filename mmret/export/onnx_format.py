"""`--format onnx`: both sides as ONNX graphs (see `graphs`), for onnxruntime or any ONNX runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mmret.export.graphs import graphs
from mmret.export.registry import Exporter, register_export

USAGE = '''```python
import numpy as np, onnxruntime as ort
from tokenizers import Tokenizer

text = ort.InferenceSession("text.onnx")
tokens = Tokenizer.from_file("tokenizer.json").encode_batch(["a dog on the beach"])
ids = np.array([t.ids for t in tokens], dtype=np.int64)
mask = np.array([t.attention_mask for t in tokens], dtype=np.int64)
query = text.run(None, {"input_ids": ids, "attention_mask": mask})[0]  # (1, dim), normalized
image = ort.InferenceSession("image.onnx")  # pixel_values made as preprocessor_config.json says
```'''


def write(model: Any, folder: Path) -> dict[str, Any]:
    return {"files": graphs(model, folder), "usage": USAGE}


register_export(Exporter("onnx", "both sides as ONNX graphs (pixels or token ids in, normalized embedding out), "
                                 "tokenizer and preprocessing beside", write))
