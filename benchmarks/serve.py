"""How fast `mmret serve` answers text queries over a gallery of 100,000 float16 embeddings, next to
the same queries through the library in one process and next to the cold `mmret search` command.

Set-up (in --work, reused by later runs): a `heads` run over the real MiniLM-L6 text tower and
DINOv2-small (trained for one epoch on 40 example pictures: the numbers do not depend on how good
it is), and a gallery without captions of --items synthetic pictures whose embeddings are random
unit vectors of the run's size, written where `precompute-embeddings --run` writes them, with the
manifest the real code checks. Nothing is mocked from there on: the server is `mmret serve` in its
own process on 127.0.0.1, and the clients are threads of this process, each with one keep-alive
connection, sending bounded numbers of `POST /api/search` requests.

It prints, all measured in this run:
  library    `Gallery.search_texts([query], k)` in this process, one query at a time;
  server     1, 4 and 16 concurrent clients: p50 / p95 / p99 latency, requests/s, failed requests;
  overhead   server p50 at one client / library p50 (target <= 1.3x), taken in alternating rounds
             so that a change in the machine's load hits both alike;
  cold       `mmret search QUERY --run R --dataset D` as a new process (median of --cold runs).
Targets: zero failed requests; at 4 clients p50 <= 30 ms and p99 <= 150 ms; overhead <= 1.3x.
The load average is printed before and after: on a shared machine the figures are noisy.

    python benchmarks/serve.py [--items 100000] [--requests 400] [--k 10] [--work DIR]
"""

from __future__ import annotations

import os

# On shared cores, OpenMP threads that spin while waiting burn the time they wait for (see
# benchmarks/search.py); the server process gets the same setting through its environment.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import http.client  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

OFFLINE = Path.home() / ".cache" / "mmret-offline" / "models"
GALLERY = "synthetic"
QUERIES = [f"a {c} {s} {p} a {c2} {s2}" for c in ("red", "blue", "green", "yellow", "purple")
           for s in ("circle", "square", "triangle", "dog", "house")
           for p in ("above", "beside", "below", "left of")
           for c2, s2 in (("orange", "star"),)]  # 100 distinct captions


def build_run(work: Path, text: str, vision: str) -> Path:
    from mmret import training
    from mmret.data import PrepareConfig, prepare
    from mmret.runs import RunConfig, with_overrides

    run = work / "runs" / "bench-heads"
    if (run / "checkpoints" / "best.safetensors").is_file():
        return run
    if not (work / "data" / "example").is_dir():
        prepare(PrepareConfig(source="example", count=40, data_dir=work / "data"))
    cfg = with_overrides(RunConfig(), dict(method="heads", dataset="example", item=vision, text=text,
                                           data_dir=work / "data", runs_dir=work / "runs", epochs=1, batch_size=16,
                                           embed_dim=512, patience=0, name="bench-heads"))
    return training.train(cfg).run_dir


def build_gallery(work: Path, run_dir: Path, items: int, seed: int = 0) -> None:
    """A prepared dataset of `items` pictures without captions, and the run's embeddings of it."""
    from mmret.common.io import atomic_dir, write_json
    from mmret.data import load_dataset
    from mmret.inference.embeddings import identity
    from mmret.inference.loaded import LoadedRun

    folder = work / "data" / GALLERY
    run = LoadedRun(run_dir)
    target = run_dir / "embeddings" / f"{GALLERY}-all"
    if (folder / "dataset.json").is_file() and (target / "manifest.json").is_file():
        return
    ids = [f"s{i:07d}.jpg" for i in range(items)]
    with atomic_dir(folder, replace=True) as tmp:
        pd.DataFrame({"image_id": ids, "path": ids, "split": "test", "width": np.int32(64),
                      "height": np.int32(64)}).to_parquet(tmp / "images.parquet", index=False)
        pd.DataFrame({"caption_id": pd.Series([], dtype="int64"), "image_id": pd.Series([], dtype=str),
                      "caption": pd.Series([], dtype=str), "split": pd.Series([], dtype=str)}).to_parquet(
            tmp / "captions.parquet", index=False)
        write_json(tmp / "dataset.json", {"name": GALLERY, "source": "synthetic", "modality": "image",
                                          "created": time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())})
    ds = load_dataset(GALLERY, work / "data")
    dim = run.cfg.method.embed_dim
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((items, dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    with atomic_dir(target, replace=True) as tmp:
        np.save(tmp / "items.npy", vectors.astype(np.float16))
        np.save(tmp / "captions.npy", np.zeros((0, dim), np.float16))
        pd.DataFrame({"item_id": ids, "path": ds.items.path}).to_parquet(tmp / "items.parquet", index=False)
        pd.DataFrame({"caption_id": pd.Series([], dtype="int64"), "item": pd.Series([], dtype="int64"),
                      "caption": pd.Series([], dtype=str)}).to_parquet(tmp / "captions.parquet", index=False)
        write_json(tmp / "manifest.json", {**identity(run, ds, "all"), "dataset": GALLERY, "run": run.name,
                                           "dim": dim, "items": items, "captions": 0})


# ---------------------------------------------------------------------------- the server


def start_server(work: Path, run_dir: Path, index: str) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, MMRET_RUNS_DIR=str(work / "runs"), MMRET_DATA_DIR=str(work / "data"))
    command = [sys.executable, "-m", "mmret", "serve", "--run", str(run_dir), "--dataset", GALLERY, "--port", "0",
               "--index", index]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    deadline = time.monotonic() + 600
    for line in proc.stdout:
        found = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
        if found:
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep draining
            return proc, found.group(1)
        if time.monotonic() > deadline:
            break
    proc.kill()
    raise SystemExit("the server did not start")


class Client:
    """One keep-alive HTTP/1.1 connection (the standard library's: the client's own cost stays small)."""

    def __init__(self, url: str):
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)

    def search(self, text: str, k: int) -> tuple[float, float, bool]:
        """(latency, the server's own time for the query, whether it answered right), ms."""
        body = json.dumps({"text": text, "k": k})
        start = time.perf_counter()
        try:
            self.conn.request("POST", "/api/search", body, {"Content-Type": "application/json"})
            response = self.conn.getresponse()
            answer = json.loads(response.read())
            ok, inner = response.status == 200 and len(answer["results"]) == k, answer.get("ms", 0.0)
        except (OSError, http.client.HTTPException, ValueError, KeyError):
            self.conn.close()
            ok, inner = False, 0.0
        return 1000 * (time.perf_counter() - start), inner, ok


def load(url: str, clients: int, requests: int, k: int) -> dict:
    """`requests` queries shared by `clients` threads sending one after another on their connection."""
    latencies, inside, failures = [], [], [0]
    lock = threading.Lock()

    def worker(index: int) -> None:
        client = Client(url)
        mine, theirs = [], []
        for n in range(index, requests, clients):
            ms, inner, ok = client.search(QUERIES[n % len(QUERIES)], k)
            mine.append(ms)
            theirs.append(inner)
            if not ok:
                with lock:
                    failures[0] += 1
        with lock:
            latencies.extend(mine)
            inside.extend(theirs)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return summary(latencies) | {"rps": requests / wall, "failed": failures[0], "requests": requests, "ms": latencies,
                                 "inside": float(np.median(inside))}


def summary(ms: list[float]) -> dict:
    q = np.percentile(ms, [50, 95, 99])
    return {"p50": float(q[0]), "p95": float(q[1]), "p99": float(q[2])}


def library_times(gallery, queries: list[str], k: int) -> list[float]:
    out = []
    for text in queries:
        start = time.perf_counter()
        gallery.search_texts([text], k)
        out.append(1000 * (time.perf_counter() - start))
    return out


def cold_search(work: Path, run_dir: Path, k: int, index: str) -> float:
    env = dict(os.environ, MMRET_RUNS_DIR=str(work / "runs"), MMRET_DATA_DIR=str(work / "data"))
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mmret", "search", QUERIES[0], "--run", str(run_dir), "--dataset",
                    GALLERY, "-k", str(k), "--json", "--index", index], check=True, env=env, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--requests", type=int, default=400, help="requests per concurrency level")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3, help="alternating library / one-client rounds")
    parser.add_argument("--cold", type=int, default=3, help="cold `mmret search` runs")
    parser.add_argument("--text", default=str(OFFLINE / "all-minilm-l6-v2"))
    parser.add_argument("--vision", default=str(OFFLINE / "dinov2-small"))
    parser.add_argument("--index", default="exact", choices=["exact", "hnsw", "ivf"],
                        help="the gallery's index (hnsw/ivf: FAISS, built once and cached with the run)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "mmret-bench-serve")
    args = parser.parse_args()

    from mmret.inference.search import Gallery

    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)
    run_dir = build_run(args.work, args.text, args.vision)
    build_gallery(args.work, run_dir, args.items)
    gallery = Gallery.open(run_dir, GALLERY, "all", index=args.index)
    print(f"gallery: {gallery.n_items:,} x {gallery.dim} float16 embeddings, {args.index} index; text tower "
          f"{Path(args.text).name}; k={args.k}", flush=True)
    library_times(gallery, QUERIES[:10], args.k)  # warm
    proc, url = start_server(args.work, run_dir, args.index)
    try:
        load(url, 1, 20, args.k)  # warm
        per_round = max(20, args.requests // args.rounds)
        lib, one = [], []
        for _ in range(args.rounds):  # alternating, so a change of load hits both
            lib += library_times(gallery, QUERIES[:per_round], args.k)
            one.append(load(url, 1, per_round, args.k))
        rows = {"1": _pool(one)}
        for clients in (4, 16):
            rows[str(clients)] = load(url, clients, args.requests, args.k)
    finally:
        proc.terminate()
        proc.wait(30)
    cold = statistics.median(cold_search(args.work, run_dir, args.k, args.index) for _ in range(args.cold))
    library = summary(lib)
    print(f"\n{'':<22}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'req/s':>9}{'failed':>8}{'in server':>11}")
    print(f"{'library, in process':<22}{library['p50']:>9.1f}{library['p95']:>9.1f}{library['p99']:>9.1f}"
          f"{1000 / statistics.mean(lib):>9.1f}{0:>8}{'-':>11}")
    for clients, r in rows.items():
        print(f"{'server, ' + clients + ' client' + ('s' if clients != '1' else ''):<22}{r['p50']:>9.1f}"
              f"{r['p95']:>9.1f}{r['p99']:>9.1f}{r['rps']:>9.1f}{r['failed']:>8}{r['inside']:>11.1f}")
    print("(in server: median time from a query's arrival at the service to its answer, queueing included)")
    print(f"{'cold mmret search':<22}{1000 * cold:>9.0f}  (one query, a new process, median of {args.cold})")
    overhead = rows["1"]["p50"] / library["p50"]
    failed = sum(r["failed"] for r in rows.values())
    four = rows["4"]
    print(f"\nserver overhead at one client: p50 {rows['1']['p50']:.1f} / {library['p50']:.1f} ms = {overhead:.2f}x "
          f"(target <= 1.3x)")
    print(f"targets: failed {failed} (0) {'ok' if failed == 0 else 'MISSED'}; 4 clients p50 {four['p50']:.1f} ms "
          f"(<= 30) {'ok' if four['p50'] <= 30 else 'MISSED'}, p99 {four['p99']:.1f} ms (<= 150) "
          f"{'ok' if four['p99'] <= 150 else 'MISSED'}; overhead {'ok' if overhead <= 1.3 else 'MISSED'}")
    print(f"cold command / warm server p50: {1000 * cold / rows['1']['p50']:.0f}x")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


def _pool(rounds: list[dict]) -> dict:
    """One row from the alternating one-client rounds: percentiles of all their latencies."""
    ms = [x for r in rounds for x in r["ms"]]
    return summary(ms) | {"rps": len(ms) / sum(x / 1000 for x in ms), "failed": sum(r["failed"] for r in rounds),
                          "requests": len(ms), "inside": statistics.median(r["inside"] for r in rounds)}


if __name__ == "__main__":
    main()
