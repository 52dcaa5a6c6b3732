"""probe-memory: how much memory one training step of a configuration needs, and which
configuration fits a memory budget (see `mmret.memory.plan`)."""

from mmret.memory.live import CATEGORIES, Breakdown, LiveBytes
from mmret.memory.plan import (
    Candidate,
    MemoryReport,
    NothingFits,
    Row,
    describe,
    largest_fitting,
    measured,
    micro_batches,
    needed,
    probe_memory,
    recommend,
    save_config,
    size_text,
    smallest_row,
)
from mmret.memory.probe import Probe, build_model, fake_probe

__all__ = ["CATEGORIES", "Breakdown", "Candidate", "LiveBytes", "MemoryReport", "NothingFits", "Probe", "Row",
           "build_model", "describe", "fake_probe", "largest_fitting", "measured", "micro_batches", "needed",
           "probe_memory", "recommend", "save_config", "size_text", "smallest_row"]
