"""`mmret export`: a trained run written in a format other programs open without mmret, as views
of the one loaded model (`mmret.load`).

- `peft`: each LoRA-adapted tower as a standard adapter folder (`adapter_config.json`,
  `adapter_model.safetensors`) that `peft.PeftModel.from_pretrained(base, folder)` opens, the
  heads beside it;
- `onnx`, `openvino`: each side as one graph from pixels (or token ids and a mask) to the
  normalized embedding, its frozen tower and head fused in, with the tokenizer (`tokenizer.json`)
  and the picture preprocessing (`preprocessor_config.json`) beside;
- `sentence-transformers`: the text side as a folder `SentenceTransformer(folder)` loads.

Every export holds a model card (README.md: the run's config, data and scores) and `mmret.json`.
`registry` is the table of formats; each format's module registers itself (`peft_adapter`,
`onnx_format`, `openvino_format`, `sbert`), sharing `card` and `graphs`; `catalog`, above them,
names the built-in ones and runs an export.
"""

from mmret.common.lazy import lazy_names

__getattr__ = lazy_names(globals(), {"EXPORTS": "mmret.export.registry", "Exporter": "mmret.export.registry",
                                     "export_run": "mmret.export.catalog", "format_names": "mmret.export.catalog",
                                     "register_export": "mmret.export.registry"})
__all__ = ["EXPORTS", "Exporter", "export_run", "format_names", "register_export"]
