"""Embed captions and pictures with an mmret export and nothing of mmret: only onnxruntime or
OpenVINO, numpy, PIL and tokenizers, as a user of the export would (the tests run it in a process
of its own and check that no mmret module was imported).

    python standalone_embed.py EXPORT_DIR onnx|openvino CAPTIONS_JSON PICTURES_JSON -> JSON on stdout:
    {"text": [[...]], "images": [[...]]}
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from tokenizers import Tokenizer


def pixels(path: str, config: dict) -> np.ndarray:
    """A picture as preprocessor_config.json says: RGB on white, shorter side resized, centre crop,
    scaled and normalized, channels first."""
    img = ImageOps.exif_transpose(Image.open(path))
    if img.mode in ("RGBA", "LA", "P"):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    img = img.convert("RGB")
    w, h = img.size
    edge = config["size"]["shortest_edge"]
    size = (edge, int(edge * h / w)) if w <= h else (int(edge * w / h), edge)
    img = img.resize(size, resample=config["resample"])
    th, tw = config["crop_size"]["height"], config["crop_size"]["width"]
    top, left = int(round((img.height - th) / 2.0)), int(round((img.width - tw) / 2.0))
    x = np.asarray(img.crop((left, top, left + tw, top + th)), dtype=np.float32) * np.float32(config["rescale_factor"])
    x = (x - np.array(config["image_mean"], np.float32)) / np.array(config["image_std"], np.float32)
    return x.transpose(2, 0, 1)


def runner(folder: Path, runtime: str, name: str):
    if runtime == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(folder / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        return lambda feeds: session.run(None, feeds)[0]
    import openvino as ov

    settings = json.loads((folder / "openvino_config.json").read_text())
    compiled = ov.Core().compile_model(str(folder / f"{name}.xml"), "CPU", settings)
    return lambda feeds: compiled(feeds)[0]


def main(folder: Path, runtime: str, captions: list[str], pictures: list[str]) -> dict:
    tokens = Tokenizer.from_file(str(folder / "tokenizer.json")).encode_batch(captions)
    feeds = {"input_ids": np.array([t.ids for t in tokens], dtype=np.int64),
             "attention_mask": np.array([t.attention_mask for t in tokens], dtype=np.int64)}
    text = runner(folder, runtime, "text")(feeds)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    images = runner(folder, runtime, "image")({"pixel_values": np.stack([pixels(p, config) for p in pictures])})
    return {"text": text.tolist(), "images": images.tolist(), "ids": feeds["input_ids"].tolist(),
            "mask": feeds["attention_mask"].tolist()}


if __name__ == "__main__":
    out = main(Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4]))
    out["mmret_imported"] = sorted(m for m in sys.modules if m == "mmret" or m.startswith("mmret."))
    print(json.dumps(out))
