"""Where items came from is kept: shards written by the real img2dataset (downloading from a local
`python -m http.server`) keep each sample's `.json` fields through `prepare wds`, and `search --json`
gives each hit's source url; a captions table's extra columns are kept the same way."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest
from typer.testing import CliRunner

from mmret.cli import app
from mmret.data import PrepareConfig, load_dataset, prepare

runner = CliRunner()


@pytest.fixture
def web_server(memorised):
    """The memorised example pictures served over HTTP on a free local port."""
    folder = memorised["data"] / "example" / "images"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=folder,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(f"{url}/00000.png", timeout=1).read()
            break
        except OSError:
            time.sleep(0.1)
    yield url
    proc.terminate()
    proc.wait(10)


def test_img2dataset_shards_keep_their_source_urls_through_prepare_and_search(memorised, web_server, tmp_path,
                                                                           monkeypatch):
    captions = load_dataset("example", memorised["data"]).captions.groupby("item_id").caption.first()
    table = pd.DataFrame({"url": [f"{web_server}/{i}.png" for i in captions.index], "caption": captions.values,
                          "license": ["cc-by-4.0"] * len(captions)})
    table.to_parquet(tmp_path / "urls.parquet")
    download = (f"from img2dataset import download; download(url_list={str(tmp_path / 'urls.parquet')!r}, "
                "input_format='parquet', url_col='url', caption_col='caption', save_additional_columns=['license'], "
                f"output_format='webdataset', output_folder={str(tmp_path / 'shards')!r}, image_size=64, "
                "processes_count=1, thread_count=4, number_sample_per_shard=8, enable_wandb=False)")
    done = subprocess.run([sys.executable, "-c", download], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "WANDB_MODE": "disabled"})
    assert done.returncode == 0, done.stderr[-2000:]
    shards = sorted((tmp_path / "shards").glob("*.tar"))
    assert len(shards) == 2  # 12 pictures, 8 a shard
    data = tmp_path / "data"
    prepared = runner.invoke(app, ["prepare", "wds", "--root", str(tmp_path / "shards" / "{00000..00001}.tar"),
                                   "--name", "web", "--data-dir", str(data)])
    assert prepared.exit_code == 0, prepared.output
    items = load_dataset("web", data).items
    assert {"source_url", "source_sha256", "source_original_width", "source_key", "source_license"} <= set(items)
    assert set(items["source_url"]) == set(table["url"]) and set(items["source_original_width"]) == {64}
    monkeypatch.setenv("MMRET_RUNS_DIR", str(memorised["runs"]))
    found = runner.invoke(app, ["search", captions["00003"], "--run", "memorised", "--checkpoint", "last",
                                "--dataset", "web", "--data-dir", str(data), "--json", "-k", "3"])
    assert found.exit_code == 0, found.output
    hits = json.loads(found.stdout)["results"][0]["images"]
    by_key = dict(zip(items["item_id"], items["source_url"]))
    assert [h["url"] for h in hits] == [by_key[h["image_id"]] for h in hits]
    assert hits[0]["url"] == f"{web_server}/00003.png"  # the memorised caption finds its picture, and where it was


def test_a_captions_table_keeps_its_other_columns(tmp_path):
    import tiny_models

    root = tmp_path / "pictures"
    for i in range(4):
        tiny_models.save_picture(root / f"p{i}.png", seed=i)
    pd.DataFrame({"image": [f"p{i}.png" for i in range(4)] + ["p0.png"],
                  "caption": [f"picture {i}" for i in range(4)] + ["picture zero"],
                  "url": [f"https://example.org/{i}.png" for i in range(4)] + ["https://example.org/other.png"],
                  "width_cm": [10, 20, 30, 40, 50]}).to_csv(root / "captions.csv", index=False)
    prepare(PrepareConfig(source="folder", root=root, name="mine", data_dir=tmp_path / "data"))
    ds = load_dataset("mine", tmp_path / "data")
    sources = ds.sources().set_index("item_id")
    assert sources.loc["p0.png", "url"] == "https://example.org/0.png"  # an item's first row gives its fields
    assert sources["width_cm"].tolist() == ["10", "20", "30", "40"]  # a CSV's columns are text
