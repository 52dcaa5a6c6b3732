"""How fast the command line answers before any real work: `mmret --help`, a command's `--help`,
and an option error, each the wall time of a fresh process (the way a user meets it), median of
several runs, beside `python -c pass` (the interpreter's own start) so the figure is a ratio too.

    python benchmarks/startup.py [--runs 7]

Target: `mmret --help` under 0.5 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

MMRET = [sys.executable, "-m", "mmret"]


def wall(command: list[str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False,
                       cwd=Path(__file__).resolve().parents[1])
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    base = wall([sys.executable, "-c", "pass"], args.runs)
    cases = {
        "mmret --help": MMRET + ["--help"],
        "mmret train --help": MMRET + ["train", "--help"],
        "mmret search --help": MMRET + ["search", "--help"],
        "mmret train --method nope (option error)": MMRET + ["train", "--method", "nope"],
        "mmret prepare folder --val 2 (option error)": MMRET + ["prepare", "folder", "--val", "2"],
        "mmret probe-memory --vram 0 (option error)": MMRET + ["probe-memory", "--vram", "0"],
    }
    print(f"python -c pass: {base:.3f} s (median of {args.runs})")
    for label, command in cases.items():
        t = wall(command, args.runs)
        print(f"{label:<45} {t:6.3f} s  {t / base:5.1f}x the bare interpreter")
    t = wall([sys.executable, "-c", "import torch"], args.runs)
    label = "python -c 'import torch' (for scale)"
    print(f"{label:<45} {t:6.3f} s  (what --help no longer pays)")


if __name__ == "__main__":
    main()
