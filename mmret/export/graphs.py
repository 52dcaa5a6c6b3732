"""The two sides of a run as ONNX graphs, with what turns raw inputs into their inputs beside them:
`text.onnx` (input_ids, attention_mask -> text_embeds) with `tokenizer.json`, and `image.onnx`
(pixel_values -> image_embeds) with `preprocessor_config.json`. Each graph is the whole side, a
frozen tower and its head fused (`LoadedRun.fused`), and ends in the normalized embedding, so
onnxruntime, OpenVINO or anything else that opens ONNX embeds without mmret.

`preprocessor_config.json` holds the picture preprocessing in transformers' `CLIPImageProcessor`
terms: decode to RGB (transparency on white), resize the shorter side to `size.shortest_edge`
(the longer one to `int(edge * long / short)`) with `resample` (PIL's numbering), crop the centre
`crop_size`, scale by 1/255, subtract `image_mean` and divide by `image_std`, channels first.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmret.common.io import write_json
from mmret.encoders.convert import to_onnx
from mmret.errors import MmretError

EXAMPLE_TEXTS = ["a caption to trace the graph with", "two"]  # a batch of 2: torch.export keeps 0 and 1 fixed
PIL_RESAMPLE = {"nearest": 0, "lanczos": 1, "bilinear": 2, "bicubic": 3, "box": 4, "hamming": 5}


def text_graph(model: Any, folder: Path) -> dict[str, str]:
    """`text.onnx` and `tokenizer.json`; returns {file: what it is}."""
    tokens = model.tokenizer(EXAMPLE_TEXTS)
    to_onnx(model.run.fused("text"), {k: tokens[k].cpu() for k in ("input_ids", "attention_mask")},
            folder / "text.onnx", output="text_embeds", dynamic={"input_ids": (0, 1), "attention_mask": (0, 1)})
    model.run.standalone_tokenizer().save(str(folder / "tokenizer.json"))
    return {"text.onnx": "input_ids, attention_mask (batch, length) int64 -> text_embeds (batch, dim), normalized",
            "tokenizer.json": "the tokenizer (tokenizers library), truncation and padding set as mmret's"}


def picture_preprocessing(loader: Any) -> dict[str, Any]:
    """The picture transform's numbers as transformers' CLIPImageProcessor reads them."""
    pre = getattr(loader.transform, "pre", None)
    if pre is None or pre.interpolation not in PIL_RESAMPLE:
        raise MmretError("this run's picture preprocessing is not a resize, crop and normalize that an export can "
                         "describe")
    size = {"shortest_edge": pre.resize} if isinstance(pre.resize, int) else {"height": pre.resize[0],
                                                                              "width": pre.resize[1]}
    return {"image_processor_type": "CLIPImageProcessor", "do_convert_rgb": True, "do_resize": True, "size": size,
            "resample": PIL_RESAMPLE[pre.interpolation], "do_center_crop": True,
            "crop_size": {"height": pre.size[0], "width": pre.size[1]}, "do_rescale": True,
            "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(pre.mean), "image_std": list(pre.std)}


def item_graph(model: Any, folder: Path) -> dict[str, str]:
    """`image.onnx` and `preprocessor_config.json` for a run over pictures."""
    if model.modality.name != "image":
        raise MmretError(f"run {model.name} embeds {model.modality.plural}: ONNX and OpenVINO exports take runs over "
                         "pictures (a sound's input features come from its tower's own feature extractor); use "
                         "--format peft or sentence-transformers, or mmret.load in Python")
    loader = model.run.item_loader()
    config = picture_preprocessing(loader)
    blank = np.full((config["crop_size"]["height"], config["crop_size"]["width"], 3), 128, dtype=np.uint8)
    pixels = torch.stack([model.preprocess(blank)] * 2)
    to_onnx(model.run.fused("item"), {"pixel_values": pixels}, folder / "image.onnx", output="image_embeds",
            dynamic={"pixel_values": (0,)})
    write_json(folder / "preprocessor_config.json", config)
    return {"image.onnx": f"pixel_values (batch, 3, {pixels.shape[2]}, {pixels.shape[3]}) float32 -> image_embeds "
                          "(batch, dim), normalized",
            "preprocessor_config.json": "how a picture becomes pixel_values (CLIPImageProcessor's keys)"}


def graphs(model: Any, folder: Path) -> dict[str, str]:
    """Both sides' graphs and what they need beside them."""
    return {**item_graph(model, folder), **text_graph(model, folder)}
