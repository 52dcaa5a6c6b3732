"""Two mmret processes on one machine: one `mmret quickstart` alone, then two started together, each
in its own folder, wall time of each fresh process. A fair share of the cores is 2x on a machine the two
fill; the target is each of the two at most 2.5x the one alone. Also one quick start beside a pure-Python
busy loop (a neighbour that is not mmret).

    python benchmarks/contention.py [--epochs 15] [--env OMP_WAIT_POLICY=ACTIVE ...]

`--env` sets variables for the mmret processes (to compare waiting policies or thread counts in one run);
run it with another checkout's PYTHONPATH to measure that code's behaviour. Prints the CPU and
/proc/loadavg before and after.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model, loadavg  # benchmarks/machine.py

BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"




def start(folder: Path, epochs: int | None, env: dict[str, str]) -> subprocess.Popen:
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "mmret", "quickstart", "--data-dir", str(folder / "data"),
               "--runs-dir", str(folder / "runs")] + ([] if epochs is None else ["--epochs", str(epochs)])
    return subprocess.Popen(command, cwd=folder, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def finish(process: subprocess.Popen, began: float) -> float:
    _, err = process.communicate()
    if process.returncode:
        raise SystemExit(f"quickstart failed ({process.returncode}): {err.decode(errors='replace')[-500:]}")
    return time.perf_counter() - began


def together(root: Path, n: int, epochs: int | None, env: dict[str, str]) -> list[float]:
    began = time.perf_counter()
    processes = [start(root / f"p{i}", epochs, env) for i in range(n)]
    return [finish(p, began) for p in processes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=None, help="quickstart epochs (default: its own)")
    parser.add_argument("--env", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--no-busy", action="store_true", help="skip the run beside a busy loop")
    args = parser.parse_args()
    env = dict(os.environ, **dict(kv.split("=", 1) for kv in args.env))
    print(f"CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} cores available")
    print(f"loadavg before: {loadavg()}")
    where = subprocess.check_output([sys.executable, "-c", "import mmret; print(mmret.__file__)"], env=env, text=True,
                                    cwd=tempfile.gettempdir())  # as the quick starts run: not from this checkout
    print(f"env: {' '.join(args.env) or '(none set)'}; mmret from {Path(where.strip()).parent}")
    with tempfile.TemporaryDirectory(prefix="mmret-contention-") as tmp:
        root = Path(tmp)
        alone = together(root / "alone", 1, args.epochs, env)[0]
        rows = [("one alone", alone, None)]
        pair = together(root / "pair", 2, args.epochs, env)
        rows += [(f"two together, process {i + 1}", t, t / alone) for i, t in enumerate(pair)]
        if not args.no_busy:
            busy = subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=10 * alone)])
            beside = together(root / "busy", 1, args.epochs, env)[0]
            busy.kill()
            busy.wait()
            rows.append(("beside a Python busy loop", beside, beside / alone))
    print(f"{'quickstart':<32} {'seconds':>8} {'x alone':>8}")
    for label, seconds, ratio in rows:
        print(f"{label:<32} {seconds:8.1f} {'' if ratio is None else f'{ratio:7.2f}x':>8}")
    print(f"worst of the two: {max(pair) / alone:.2f}x alone (target <= 2.5x; a fair share is 2x)")
    print(f"loadavg after:  {loadavg()}")


if __name__ == "__main__":
    main()
