"""`mmret eval`: scoring runs on a dataset split. `config` (its options, checked before anything is
read) and `suite` (one call: a task for one run or several, the pictures asked for, CLIP_benchmark's
schema on request) around the tasks: `retrieval` (Recall@k, MRR, mAP, ... with bootstrap intervals
and paired comparisons of runs), `classification` (zero-shot, with `templates`) and
`linear_probe`; `clip_benchmark` writes results in CLIP_benchmark's JSON schema.
The metrics themselves are `mmret.metrics`'; the pictures `mmret.figures`'."""
