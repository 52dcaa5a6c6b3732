"""Datasets on disk and what training reads of them: the readers of each source format
(`readers`), the steps that turn them into tables (`tables`), `mmret prepare` (`create`), a
prepared dataset read back (`prepared`), item-caption pairs of a split (`pairs`), and the BPE
tokenizer a from-scratch model trains on the captions (`tokenizer`)."""

from mmret.data.create import PrepareConfig, PrepareResult, prepare
from mmret.data.prepared import PreparedDataset, load_dataset, prepared_names
from mmret.data.readers import READER_HELP, READERS, SPLITS

__all__ = ["PrepareConfig", "PrepareResult", "PreparedDataset", "READERS", "READER_HELP", "SPLITS", "load_dataset",
           "prepare", "prepared_names"]
