"""Work done twice, measured the way a user meets it (wall time of fresh `mmret` processes): a
`precompute-embeddings` whose caches are all complete (target <= 2 s), and a cold `mmret search` on a
run over cached features (target <= 3 s) with its text queries in torch and through the inference
runtime the measured rule picked (`mmret.inference.runtime`), beside `python -c "import torch"`.

    python benchmarks/never_twice.py [--root ~/.cache/mmret-offline/data/tuxpaint] \
        [--vision ~/.cache/mmret-offline/models/dinov2-small] [--text ~/.cache/mmret-offline/models/all-minilm-l6-v2]

Everything happens in a temporary folder: prepare the folder dataset, precompute (the first time, timed
too), train a `heads` run for 2 epochs, then the timed cold starts (median of --runs). Prints the CPU and
/proc/loadavg before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import cpu_model, loadavg  # benchmarks/machine.py

OFFLINE = Path.home() / ".cache" / "mmret-offline"




def wall(command: list[str], cwd: Path, env: dict[str, str], runs: int = 1) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if done.returncode:
            raise SystemExit(f"{' '.join(command)} failed: {done.stderr[-800:]}")
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=OFFLINE / "data" / "tuxpaint")
    parser.add_argument("--vision", default=str(OFFLINE / "models" / "dinov2-small"))
    parser.add_argument("--text", default=str(OFFLINE / "models" / "all-minilm-l6-v2"))
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    mmret = [sys.executable, "-m", "mmret"]
    print(f"CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} cores available")
    print(f"loadavg before: {loadavg()}")
    with tempfile.TemporaryDirectory(prefix="mmret-never-twice-") as tmp:
        home = Path(tmp)
        env = dict(os.environ, MMRET_DATA_DIR=str(home / "data"), MMRET_RUNS_DIR=str(home / "runs"))
        towers = ["--vision", args.vision, "--text", args.text]
        wall(mmret + ["prepare", "folder", "--root", str(args.root), "--name", "bench"], home, env)
        precompute = mmret + ["precompute-embeddings", "--dataset", "bench", *towers]
        rows = [("precompute-embeddings, first (encodes)", wall(precompute, home, env), None)]
        rows.append(("precompute-embeddings, all cached", wall(precompute, home, env, args.runs), 2.0))
        wall(mmret + ["train", "--method", "heads", "--dataset", "bench", *towers, "--epochs", "2"], home, env)
        search = mmret + ["search", "a red bird", "-k", "5"]
        torch_env = dict(env, MMRET_RUNTIME="torch")
        rows.append(("search, text side in torch", wall(search, home, torch_env, args.runs), 3.0))
        convert = [sys.executable, "-c", "import mmret; from mmret.inference.runtime import allow_conversion\n"
                   "with allow_conversion(): mmret.load().encode_text(['x'])"]  # what `mmret serve` does at start
        rows.append(("converting the run's text side (as serve starts)", wall(convert, home, env), None))
        rows.append(("search, text side by the runtime's choice", wall(search, home, env, args.runs), 3.0))
        choice = next((home / "runs").glob("*/runtime/*/choice.json"))
        reason = json.loads(choice.read_text())["reason"]
        rows.append(("python -c 'import torch' (for scale)", wall([sys.executable, "-c", "import torch"], home, env,
                                                                  args.runs), None))
    print(f"{'fresh process':<45} {'seconds':>8}  target")
    for label, seconds, target in rows:
        print(f"{label:<45} {seconds:8.2f}  {'' if target is None else f'<= {target:.0f} s'}")
    print(f"runtime choice: {reason}")
    print(f"loadavg after:  {loadavg()}")


if __name__ == "__main__":
    main()
