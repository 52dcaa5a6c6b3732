"""What every benchmark prints beside its figures: the CPU it ran on and how loaded the machine was
(the scripts import it as `from machine import ...`, run from this folder as `python benchmarks/X.py`)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name, as /proc/cpuinfo gives it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def loadavg() -> str:
    """/proc/loadavg as it reads now (1, 5 and 15-minute load, running/total tasks, last pid)."""
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"
