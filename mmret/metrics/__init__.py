"""Metrics as pure tensor functions, below everything that scores: training's validation and
`mmret eval` both read them. `retrieval` (recalls, MRR, median rank, mAP, RSUM, bootstrap
intervals and paired comparisons) and `classification` (top-k accuracy, mean per-class recall,
the confusion matrix). This face imports nothing, so importing one of them stays cheap."""
