"""Sharing the machine: the pools are as large as the cores this process may use, waiting threads sleep
unless the user chose otherwise, `mmret --threads N` sets the pools, and `--nproc` children split the cores."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from mmret.cli import app
from mmret.common import threads

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def clean_env(monkeypatch):
    for name in (threads.THREADS_ENV, "OMP_NUM_THREADS", "OMP_WAIT_POLICY"):
        monkeypatch.setenv(name, "")  # recorded as it was, so what the code under test sets is undone after
        monkeypatch.delenv(name)
    before = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(before)


def test_available_cores_follow_the_affinity_and_the_cgroup_quota(clean_env, tmp_path):
    clean_env.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    quota = tmp_path / "cpu.max"
    real = Path

    def fake_path(p, *rest):
        return quota if str(p) == "/sys/fs/cgroup/cpu.max" else real(p, *rest)

    clean_env.setattr(threads, "Path", fake_path)
    quota.write_text("max 100000\n")
    assert threads.available_cores() == 6
    quota.write_text("250000 100000\n")  # 2.5 CPUs of quota: 3 threads
    assert threads.available_cores() == 3
    quota.unlink()
    assert threads.available_cores() == 6


def test_defaults_are_passive_waiting_and_the_available_cores(clean_env):
    clean_env.setattr(threads, "available_cores", lambda: 3)
    assert threads.share_the_machine() == 3
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE" and os.environ["OMP_NUM_THREADS"] == "3"


def test_the_users_choice_is_kept(clean_env):
    clean_env.setenv("OMP_WAIT_POLICY", "ACTIVE")
    clean_env.setenv("OMP_NUM_THREADS", "1")
    assert threads.share_the_machine() == 1
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
    assert threads.share_the_machine(2) == 2 and torch.get_num_threads() == 2  # --threads wins over OMP_NUM_THREADS


def test_threads_option_sets_the_pool_and_refuses_zero(clean_env):
    result = runner.invoke(app, ["--threads", "1", "search", "--help"])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    result = runner.invoke(app, ["--threads", "0", "search", "--help"])
    assert result.exit_code == 1 and result.stderr == "error: --threads must be at least 1, got 0\n"


def test_a_fresh_command_starts_torch_with_passive_waiting_and_the_threads_asked():
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "MMRET_THREADS")}
    code = ("import sys; from mmret.cli import app; sys.argv = ['mmret', '--threads', '1', 'search', '--help']\n"
            "try:\n    app()\nexcept SystemExit:\n    pass\n"
            "import os, torch; print(torch.get_num_threads(), os.environ['OMP_WAIT_POLICY'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.split()[-2:] == ["1", "PASSIVE"]


def test_children_split_the_cores_and_the_parent_is_restored(clean_env):
    clean_env.setenv("OMP_NUM_THREADS", "4")
    with threads.children_threads(2):
        assert os.environ["OMP_NUM_THREADS"] == os.environ[threads.THREADS_ENV] == "2"
    assert os.environ["OMP_NUM_THREADS"] == "4" and threads.THREADS_ENV not in os.environ


@pytest.fixture
def seats(clean_env, tmp_path):
    fresh = threads._Seats()
    fresh.folder = tmp_path / "processes"
    clean_env.setattr(threads, "_SEATS", fresh)
    clean_env.setattr(threads, "available_cores", lambda: 4)
    clean_env.setattr(threads, "REBALANCE_SECONDS", 0.0)
    fresh.take()
    yield fresh
    fresh.leave()


def _neighbour(seats, code: str) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", code])
    (seats.folder / str(process.pid)).touch()
    return process


def test_busy_mmret_processes_share_the_cores_and_idle_or_ended_ones_do_not(seats):
    busy = _neighbour(seats, "while True: pass")
    idle = _neighbour(seats, "import time; time.sleep(60)")
    try:
        assert threads.rebalance() == 1 and torch.get_num_threads() == 1  # at first sight all three count
        import time

        time.sleep(1.0)  # the busy loop uses about a core meanwhile, the sleeper none
        assert threads.rebalance() == 2 and torch.get_num_threads() == 2
        busy.kill()
        busy.wait()
        assert threads.rebalance() == 4 and not (seats.folder / str(busy.pid)).exists()  # an ended one is forgotten
    finally:
        for p in (busy, idle):
            p.kill()
            p.wait()


def test_no_seat_when_the_user_fixed_the_threads(clean_env, tmp_path):
    fresh = threads._Seats()
    fresh.folder = tmp_path / "processes"
    clean_env.setattr(threads, "_SEATS", fresh)
    threads.share_the_machine(1)
    assert fresh.mine is None and threads.rebalance() is None and not fresh.folder.exists()
    clean_env.delenv(threads.THREADS_ENV)
    clean_env.delenv("OMP_NUM_THREADS")
    threads.share_the_machine()
    assert fresh.mine == fresh.folder / str(os.getpid()) and fresh.mine.is_file()
    fresh.leave()
    assert not (fresh.folder / str(os.getpid())).exists()
