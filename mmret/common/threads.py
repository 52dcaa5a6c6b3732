"""How many CPU threads mmret uses, and how they wait, so two mmret processes on one machine each slow
by about their share of the cores instead of collapsing.

OpenMP threads that spin while they wait for work (GNU OpenMP, which torch uses, spins a while before
sleeping) steal the cores a second process needs; with each process holding a pool as large as the
machine, two processes at once took 5.5x as long as one alone instead of 2x. So, unless the user chose
otherwise: waiting threads sleep (`OMP_WAIT_POLICY=PASSIVE`, set before torch loads its OpenMP runtime),
and the pools are as large as the cores this process may run on (its CPU affinity and cgroup quota, not
the machine's count). `mmret --threads N` (or `MMRET_THREADS`) sets the pools' size; `OMP_NUM_THREADS`
and `OMP_WAIT_POLICY` set by the user are left alone. Nothing here imports torch.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from pathlib import Path
from typing import Iterator

THREADS_ENV = "MMRET_THREADS"


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity, capped by a cgroup v2 CPU quota (a container
    limited to 2 CPUs on a 64-core host sees 64 in `os.cpu_count()`)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cores)


def chosen_threads() -> int | None:
    """The thread count the user asked for (`--threads`/`MMRET_THREADS`, else `OMP_NUM_THREADS`), or None."""
    for name in (THREADS_ENV, "OMP_NUM_THREADS"):
        value = os.environ.get(name, "").split(",")[0].strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    return None


def compute_threads() -> int:
    """The size of every compute pool (torch's intra-op pool, an inference runtime's): what the user chose,
    else the cores available."""
    return chosen_threads() or available_cores()


def share_the_machine(threads: int | None = None) -> int:
    """Set the waiting policy and the pools' size for this process and its children (call it before torch
    is imported: OpenMP reads the variables when it loads; after, an explicit `threads` resizes torch's
    pool). Returns the thread count."""
    if threads is not None:
        if threads < 1:
            from mmret.errors import MmretError

            raise MmretError(f"--threads must be at least 1, got {threads}")
        os.environ[THREADS_ENV] = str(threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    n = compute_threads()
    os.environ.setdefault("OMP_NUM_THREADS", str(n))
    if threads is not None:
        os.environ["OMP_NUM_THREADS"] = str(n)
    torch = sys.modules.get("torch")  # already loaded (the Python API, a test): resize only when asked to
    if threads is not None and torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(n)
    return n


@contextlib.contextmanager
def children_threads(threads: int | None) -> Iterator[None]:
    """Child processes started inside this block use `threads` threads each (both variables: OpenMP reads
    one, a child mmret's `--threads` default the other); this process's environment is restored after."""
    names = (THREADS_ENV, "OMP_NUM_THREADS")
    before = {name: os.environ.get(name) for name in names}
    if threads is not None:
        os.environ.update({name: str(threads) for name in names})
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
