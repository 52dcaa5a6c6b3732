"""What one picture costs in memory, whatever its shape: a thin strip (1 x 1,000,000 pixels took the
server to 6.8 GB when the resize scaled the shorter side of the whole picture) next to square and
ordinary pictures, for an upload to `mmret serve` and for a dataset picture through the DINOv2-small
preprocessing and model.

Upload: a real `mmret serve` process (a `heads` run over DINOv2-small and MiniLM-L6 from
~/.cache/mmret-offline/models, the set-up of benchmarks/serve.py), started afresh for each picture
so nothing an earlier picture left in the allocator hides a peak. After start-up and one ordinary
upload (its steady state: "idle"), the server's peak resident size is reset (`/proc/PID/clear_refs`)
and the picture is sent while a second client sends an ordinary 640 x 480 upload 50 ms later;
the figure is the server's peak (VmHWM) over its idle resident size (VmRSS), with both uploads'
status and latency, and the ordinary upload's usual latency (median of 5 alone) beside them.

Dataset picture: a fresh process loads DINOv2-small and its loader (`item_loader`: the guard, the
decode, the preprocessing precompute and evaluation use), runs one ordinary picture through both,
resets its peak, then loads the picture from a file and encodes it: peak over idle again, for the
evaluation transform, and separately for the training transform (a random resized crop).

The bound stated: <= 300 MB over idle for any aspect ratio up to the pixel limits. What is left
scales with the decoded pixels (3 bytes each; the server's --max-pixels, 40 M by default, keeps an
upload under ~120 MB of them), never with the shape. Prints the CPU and load average.

    flock /tmp/mmret-heavy.lock python benchmarks/thin_pictures.py [--work DIR]
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
from machine import cpu_model, loadavg  # benchmarks/machine.py

OFFLINE = Path.home() / ".cache" / "mmret-offline" / "models"
BOUND_MB = 300
NORMAL = (640, 480)
# (width, height): ordinary, square at the server's --max-pixels (40 M), the plain-resize limit (16:1) and
# just past it, thin strips up to the aspect limit (1:1000), and strips past it (refused by their header)
UPLOADS = [(640, 480), (6324, 6324), (256, 4096), (256, 4400), (20, 20_000), (65, 65_000), (1, 20_000),
           (1, 1_000_000)]
DATASET = [(640, 480), (6324, 6324), (256, 4096), (256, 4400), (20, 20_000), (65, 65_000), (1, 20_000)]


def picture(width: int, height: int) -> bytes:
    """A PNG of `width` x `height` with content in every pixel (stripes that compress well, so a big
    picture stays under the upload limit), as bytes."""
    from PIL import Image

    x, y = np.arange(width, dtype=np.uint16)[None, :], np.arange(height, dtype=np.uint16)[:, None]
    rgb = np.stack([(x * 7 + y * 3) % 256, (x * 5 + y) % 256, (x + y * 11) % 256], axis=-1).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(rgb).save(out, format="PNG", compress_level=6)
    return out.getvalue()


def status_kb(pid: int | str, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak(pid: int | str) -> None:
    """The peak resident size (VmHWM) starts again from the current one (Linux >= 4.0)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


# ---------------------------------------------------------------------------- uploads


def upload(url: str, data: bytes) -> tuple[int, float, str]:
    """(status, ms, the error line or '') of one POST /api/search/upload."""
    host, port = url.removeprefix("http://").split(":")
    boundary = uuid.uuid4().hex
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"p.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    conn = http.client.HTTPConnection(host, int(port), timeout=300)
    start = time.perf_counter()
    conn.request("POST", "/api/search/upload", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    response = conn.getresponse()
    answer = response.read()
    ms = 1000 * (time.perf_counter() - start)
    conn.close()
    error = json.loads(answer).get("error", "") if response.status != 200 else ""
    return response.status, ms, error


def start_server(work: Path, run_dir: Path) -> tuple[subprocess.Popen, str]:
    """`mmret serve` over the run's own dataset, on a free port; (process, its URL) once it listens."""
    env = dict(os.environ, MMRET_RUNS_DIR=str(work / "runs"), MMRET_DATA_DIR=str(work / "data"))
    command = [sys.executable, "-m", "mmret", "serve", "--run", str(run_dir), "--port", "0", "--checkpoint", "last"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    for line in proc.stdout:
        found = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
        if found:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
            return proc, found.group(1)
    raise SystemExit("the server did not start")


def measure_upload(work: Path, run_dir: Path, size: tuple[int, int], normal: bytes) -> dict:
    data = picture(*size)
    proc, url = start_server(work, run_dir)
    try:
        started = status_kb(proc.pid, "VmRSS")
        warm = [upload(url, normal)[1] for _ in range(6)][1:]  # the first also warms the model up
        reset_peak(proc.pid)
        idle = status_kb(proc.pid, "VmRSS")
        beside: list = []
        other = threading.Thread(target=lambda: (time.sleep(0.05), beside.append(upload(url, normal))))
        other.start()
        status, ms, error = upload(url, data)
        other.join()
        peak = status_kb(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(30)
    return {"size": size, "file_kb": len(data) / 1024, "status": status, "ms": ms, "error": error,
            "peak_over_idle_mb": (peak - idle) / 1024, "idle_mb": idle / 1024, "started_mb": started / 1024,
            "usual_ms": statistics.median(warm), "beside_status": beside[0][0], "beside_ms": beside[0][1]}


# ---------------------------------------------------------------------------- dataset pictures


def dataset_child(folder: str, name: str, train: bool) -> None:
    """(In a fresh process.) The peak of loading and encoding one picture file, as precompute does."""
    import torch

    from mmret.common.paths import Roots
    from mmret.encoders import load_image_encoder
    from mmret.modalities.base import ItemError

    encoder = load_image_encoder(str(OFFLINE / "dinov2-small"))
    loader = encoder.item_loader(train=train).reading(Roots.of(folder))

    def encode(path: str) -> None:
        with torch.inference_mode():
            encoder(pixels=loader(path)[None])

    encode(str(Path(folder) / "normal.png"))
    reset_peak("self")
    idle = status_kb("self", "VmRSS")
    start = time.perf_counter()
    try:
        encode(str(Path(folder) / name))
        outcome = "encoded"
    except ItemError as e:
        outcome = f"refused: {e}"
    ms = 1000 * (time.perf_counter() - start)
    print(json.dumps({"peak_over_idle_mb": (status_kb("self", "VmHWM") - idle) / 1024, "idle_mb": idle / 1024,
                      "ms": ms, "outcome": outcome}))


def measure_dataset(work: Path, size: tuple[int, int], train: bool) -> dict:
    folder = work / "pictures"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"{size[0]}x{size[1]}.png"
    if not (folder / name).is_file():
        (folder / name).write_bytes(picture(*size))
    if not (folder / "normal.png").is_file():
        (folder / "normal.png").write_bytes(picture(*NORMAL))
    out = subprocess.run([sys.executable, __file__, "--child", str(folder), name] + (["--train"] if train else []),
                         check=True, capture_output=True, text=True).stdout
    return {"size": size, **json.loads(out.strip().splitlines()[-1])}


# ---------------------------------------------------------------------------- the table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/mmret-bench-thin"))
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--train", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return dataset_child(*args.child, train=args.train)
    from serve import build_run  # benchmarks/serve.py: a heads run over the offline towers

    print(f"CPU: {cpu_model()}, {len(os.sched_getaffinity(0))} cores; load average before: {loadavg()}")
    run_dir = build_run(args.work, str(OFFLINE / "all-minilm-l6-v2"), str(OFFLINE / "dinov2-small"))
    normal = picture(*NORMAL)
    worst = 0.0
    print("\nupload to mmret serve (a fresh server each; peak over the idle server; a 640 x 480 upload sent 50 ms "
          "later beside it)")
    print(f"{'picture':>16} {'file':>9} {'status':>6} {'ms':>8} {'peak MB':>8}   {'beside':>6} {'ms':>6} "
          f"{'usual ms':>8}  error")
    for size in UPLOADS:
        r = measure_upload(args.work, run_dir, size, normal)
        worst = max(worst, r["peak_over_idle_mb"])
        print(f"{size[0]:>7,} x {size[1]:<,} {r['file_kb']:>7.0f}KB {r['status']:>6} {r['ms']:>8.0f} "
              f"{r['peak_over_idle_mb']:>8.1f}   {r['beside_status']:>6} {r['beside_ms']:>6.0f} {r['usual_ms']:>8.0f}"
              f"  {r['error']}")
    print(f"(idle server: {r['idle_mb']:.0f} MB resident)")
    for train in (False, True):
        print(f"\ndataset picture through DINOv2-small's loader and model ({'training' if train else 'evaluation'} "
              "transform; a fresh process each; peak over idle)")
        print(f"{'picture':>16} {'ms':>8} {'peak MB':>8}  outcome")
        for size in DATASET:
            r = measure_dataset(args.work, size, train)
            worst = max(worst, r["peak_over_idle_mb"])
            print(f"{size[0]:>7,} x {size[1]:<,} {r['ms']:>8.0f} {r['peak_over_idle_mb']:>8.1f}  {r['outcome']}")
    print(f"\nworst peak over idle: {worst:.1f} MB (bound {BOUND_MB} MB: {'met' if worst <= BOUND_MB else 'MISSED'})")
    print(f"load average after: {loadavg()}")


if __name__ == "__main__":
    main()
