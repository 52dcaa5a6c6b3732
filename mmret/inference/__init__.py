"""Using a trained run: `loaded` (one run loaded once: encode queries, embed a split),
`embeddings` (a run's final embeddings of a split, on disk), `metrics` (retrieval metrics, pure
tensor functions), `evaluate` (`mmret eval`), `search` (a gallery loaded once, for `mmret search`
and `mmret serve`) over an index (`index`: the cached folder and FAISS; `exact`: exact top-k),
and `zeroshot` (a pretrained CLIP as a run).
The evaluation suite around `evaluate`: `config` and `suite` (`mmret eval`'s options and its one
call), `classify` with `templates` (zero-shot classification), `linear_probe`, `clip_benchmark`
(results in CLIP_benchmark's schema), `maps` and `failures` (pictures drawn by `figures`).
This face imports nothing, so importing `mmret.inference.metrics` stays cheap."""
