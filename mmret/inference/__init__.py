"""Using a trained run: `loaded` (one run loaded once: encode queries, embed a split),
`embeddings` (a run's final embeddings of a split, on disk), `metrics` (retrieval metrics, pure
tensor functions), `evaluate` (`mmret eval`), `search` (a gallery loaded once, for `mmret search`
and `mmret serve`) over an index (`index`: the cached folder and FAISS; `exact`: exact top-k),
and `zeroshot` (a pretrained CLIP as a run).
This face imports nothing, so importing `mmret.inference.metrics` stays cheap."""
