"""Datasets on disk and what training reads of them: the readers of each source format
(`readers`), the steps that turn them into tables (`tables`), `mmret prepare` (`create`), a
prepared dataset read back (`prepared`), item-caption pairs of a split (`pairs`), and the BPE
tokenizer a from-scratch model trains on the captions (`tokenizer`)."""

from mmret.common.lazy import lazy_names

__getattr__ = lazy_names(globals(), {
    "PrepareConfig": "mmret.data.config",
    "PrepareResult": "mmret.data.create",
    "PreparedDataset": "mmret.data.prepared",
    "READERS": "mmret.data.readers.base",
    "READER_HELP": "mmret.data.readers.base",
    "SPLITS": "mmret.data.readers.base",
    "load_dataset": "mmret.data.prepared",
    "prepare": "mmret.data.create",
    "prepared_names": "mmret.data.prepared",
})
__all__ = sorted(["PrepareConfig", "PrepareResult", "PreparedDataset", "READERS", "READER_HELP", "SPLITS", "load_dataset", "prepare", "prepared_names"])
