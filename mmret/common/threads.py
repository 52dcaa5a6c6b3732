"""How many CPU threads mmret uses, and how they wait, so two mmret processes on one machine each slow
by about their share of the cores instead of collapsing.

OpenMP threads that spin while they wait for work (GNU OpenMP, which torch uses, spins a while before
sleeping) steal the cores a second process needs, and a parallel region is as slow as its slowest
thread: with two processes each holding a pool as large as the machine, every region waits for a
thread the other process has descheduled, and two processes at once took 5.5x as long as one alone
instead of 2x. So, unless the user chose otherwise:
- waiting threads sleep (`OMP_WAIT_POLICY=PASSIVE`, set before torch loads its OpenMP runtime);
- the pools are as large as the cores this process may run on (its CPU affinity and cgroup quota, not
  the machine's count);
- mmret processes share the cores: each one registers (a file named by its pid in a folder of the
  temporary directory), and `rebalance()`, called between batches, sizes torch's pool to this
  process's share of the cores among the mmret processes that are busy (that used CPU time lately).

`mmret --threads N` (or `MMRET_THREADS`) fixes the pools' size; `OMP_NUM_THREADS` and `OMP_WAIT_POLICY`
set by the user are left alone. Nothing here imports torch.
"""

from __future__ import annotations

import atexit
import contextlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

THREADS_ENV = "MMRET_THREADS"
REBALANCE_SECONDS = 2.0  # how often the share is looked at again (a look costs a directory listing)
BUSY_SHARE = 0.2  # a process that used at least this share of one core since the last look is busy


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
    if chosen_threads() is None:
        _SEATS.take()
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


class _Seats:
    """The mmret processes of this user on this machine, and how busy each was since the last look."""

    def __init__(self) -> None:
        self.folder = Path(tempfile.gettempdir()) / f"mmret-processes-{os.getuid() if hasattr(os, 'getuid') else 0}"
        self.mine: Path | None = None
        self.seen: dict[int, float] = {}  # pid -> CPU seconds at the last look
        self.last = 0.0  # when the last look was (monotonic seconds)
        self.threads: int | None = None  # what the last look set

    def take(self) -> None:
        if self.mine is not None:
            return
        try:
            self.folder.mkdir(mode=0o700, exist_ok=True)
            self.mine = self.folder / str(os.getpid())
            self.mine.touch()
        except OSError:  # no shared temporary folder: this process only sizes its pool by its cores
            self.mine = None
            return
        atexit.register(self.leave)

    def leave(self) -> None:
        if self.mine is not None:
            self.mine.unlink(missing_ok=True)
            self.mine = None

    def busy(self) -> int:
        """How many registered processes (this one counted) are busy; forgets the ones that ended."""
        now = time.monotonic()
        interval, self.last = now - self.last, now
        busy, seen = 0, {}
        for entry in os.listdir(self.folder):
            pid = int(entry) if entry.isdigit() else -1
            used = _cpu_seconds(pid)
            if used is None:
                (self.folder / entry).unlink(missing_ok=True)
                continue
            seen[pid] = used
            before = self.seen.get(pid)
            # at the first look, or for a newcomer, every process counts as busy: it is starting work
            if pid == os.getpid() or before is None or used - before >= BUSY_SHARE * interval:
                busy += 1
        self.seen = seen
        return max(1, busy)


def _cpu_seconds(pid: int) -> float | None:
    """CPU time a live process has used (its threads, user and system), or None when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


_SEATS = _Seats()


def rebalance() -> int | None:
    """Size torch's pool to this process's share of the cores among the busy mmret processes (at most
    every REBALANCE_SECONDS; cheap to call each batch). Returns the size set, or None when nothing was
    looked at (too soon, a size the user fixed, or no registry)."""
    if _SEATS.mine is None:  # the user fixed the size (a seat is taken only when they did not)
        return None
    if time.monotonic() - _SEATS.last < REBALANCE_SECONDS and _SEATS.threads is not None:
        return None
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        share = max(1, available_cores() // _SEATS.busy())
    except OSError:
        return None
    if share != torch.get_num_threads():
        torch.set_num_threads(share)
    _SEATS.threads = share
    return share
