"""Using a trained run: `loaded` (one run loaded once: encode queries, embed a split),
`embeddings` (a run's final embeddings of a split, on disk), `search` (a gallery loaded once, for
`mmret search` and `mmret serve`) over an index (`index`: the cached folder and FAISS; `exact`:
exact top-k), and `zeroshot` (a pretrained CLIP or CLAP as a run). Scoring runs is
`mmret.evaluation`'s. This face imports nothing, so importing one module stays cheap."""
