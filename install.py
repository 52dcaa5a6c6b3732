"""Install mmret and everything its tests need into ./.venv, in one command:

    python3 install.py && . .venv/bin/activate && mmret quickstart

1. Makes the virtual environment `.venv` (when it is not there yet).
2. Chooses PyTorch for this machine: with an NVIDIA GPU (`nvidia-smi` answers), PyPI's build, which
   brings CUDA; without one, PyTorch's CPU build from its own index (a few hundred MB instead of
   several GB of CUDA libraries), when that index answers within 2 seconds; else PyPI's build,
   which also runs on a CPU. A torch already in the environment is kept.
3. `pip install -e ".[dev]"`: mmret, its extras and every test dependency.
4. Two test dependencies whose declared requirements would undo the environment (clip-retrieval
   pins numpy<2 and transformers 4; img2dataset pins pandas<3 and webdataset<0.3) go in pinned and
   without their dependencies; what they import when the tests use them comes with the dev extra.

Each choice is said in one line. Standard library only: this runs before anything is installed.
Options: --cpu or --gpu to decide step 2 yourself, --venv DIR for another environment.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import urllib.request
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CPU_INDEX = "https://download.pytorch.org/whl/cpu"
NO_DEPS = ["clip-retrieval==2.45.0", "img2dataset==1.47.0"]  # see step 4 above


def say(line: str) -> None:
    print(f"install: {line}", flush=True)


def run(*args: str) -> None:
    say(" ".join(args[2:]) if args[1:3] == ("-m", "pip") else " ".join(args))
    subprocess.run(args, check=True)


def has_gpu() -> bool:
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        return subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def answers(url: str, seconds: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=seconds):
            return True
    except Exception:  # DNS, refused, timeout, TLS: not reachable from here
        return False


def has_torch(python: Path) -> str | None:
    found = subprocess.run([str(python), "-c", "import torch; print(torch.__version__)"], capture_output=True,
                           text=True)
    return found.stdout.strip() if found.returncode == 0 else None


def main() -> int:
    parser = argparse.ArgumentParser(description="Install mmret and its test dependencies into a virtual environment.")
    parser.add_argument("--venv", default=".venv", help="the environment's folder (default: .venv)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--cpu", action="store_true", help="PyTorch's CPU build, whatever the machine has")
    which.add_argument("--gpu", action="store_true", help="PyPI's PyTorch (with CUDA), whatever the machine has")
    args = parser.parse_args()

    env = (ROOT / args.venv).absolute()
    if not (env / "bin" / "python").exists():
        say(f"creating the virtual environment {env}")
        venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    pip = (str(python), "-m", "pip")

    installed = has_torch(python)
    if installed:
        say(f"torch {installed} is already installed here: kept")
    elif args.gpu or (not args.cpu and has_gpu()):
        say("an NVIDIA GPU answers (or --gpu): PyTorch from PyPI, with its CUDA libraries")
    elif answers(f"{CPU_INDEX}/"):
        say(f"no NVIDIA GPU: PyTorch's CPU build from {CPU_INDEX} (hundreds of MB, not GBs of CUDA libraries)")
        run(*pip, "install", "torch", "torchvision", "--index-url", CPU_INDEX)
    else:
        say(f"no NVIDIA GPU, but {CPU_INDEX} does not answer from here: PyTorch from PyPI (it brings CUDA "
            "libraries, several GB, and runs on a CPU all the same)")

    run(*pip, "install", "-e", f"{ROOT}[dev]")
    say(f"{', '.join(NO_DEPS)} without their dependencies: their requirements (numpy<2, pandas<3, transformers 4, "
        "webdataset<0.3) would replace what mmret runs on; the tests use clip-retrieval's client and img2dataset's "
        "downloader, whose imports the dev extra brings")
    run(*pip, "install", "--no-deps", *NO_DEPS)
    say(f"done: activate with `. {args.venv}/bin/activate`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
