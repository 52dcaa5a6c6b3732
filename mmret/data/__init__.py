"""Datasets on disk and what training reads of them: the readers of each source format
(`readers`), the steps that turn them into tables (`tables`), `mmret prepare` (`create`), a
prepared dataset read back (`prepared`), item-caption pairs of a split (`pairs`), and the BPE
tokenizer a from-scratch model trains on the captions (`tokenizer`)."""

from mmret.common.lazy import lazy_names

__getattr__ = lazy_names(globals(), {
    "PrepareConfig": "mmret.data.config",
    "PrepareResult": "mmret.data.create",
    "PreparedDataset": "mmret.data.prepared",
    "READERS": "mmret.data.readers.registry",
    "SPLITS": "mmret.data.readers.base",
    "load_dataset": "mmret.data.prepared",
    "prepare": "mmret.data.create",
    "prepared_names": "mmret.data.prepared",
    "reader_help": "mmret.data.readers",
})
__all__ = ["PrepareConfig", "PrepareResult", "PreparedDataset", "READERS", "SPLITS", "load_dataset", "prepare",
           "prepared_names", "reader_help"]
