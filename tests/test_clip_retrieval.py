"""clip-retrieval's own client against a real `mmret serve` process: `ClipClient` queries by text,
picture and embedding get the ids `mmret search` gives, in its order; its urls fetch the pictures;
and the body clip-retrieval's clients send (JSON with no Content-Type, or text/plain) is read.

`ClipClient` is clip-retrieval's `clip_client.py`, installed with the package (the dev extra
installs clip-retrieval without its dependencies) and loaded from that file: the package's
`__init__` starts importing its whole back end (flask, faiss, open_clip models through all_clip,
and clip-anytorch, which needs setuptools' pkg_resources), none of which the client uses; the
client itself imports only `requests`."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

import mmret
from mmret.cli import app

REPO = Path(__file__).resolve().parents[1]


def clip_client_module():
    """clip-retrieval's clip_client module, from the installed package's file."""
    spec = importlib.util.find_spec("clip_retrieval")  # locates the package without running its __init__
    assert spec is not None, "clip-retrieval is not installed: run the README's install command"
    path = Path(next(iter(spec.submodule_search_locations))) / "clip_client.py"
    module_spec = importlib.util.spec_from_file_location("clip_retrieval_clip_client", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def server(memorised):
    """`mmret serve` in a process of its own, on a free port, serving the memorised run."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MMRET_RUNS_DIR": str(memorised["runs"]),
           "MMRET_DATA_DIR": str(memorised["data"]), "COLUMNS": "300"}
    proc = subprocess.Popen([sys.executable, "-m", "mmret", "serve", "--run", "memorised", "--checkpoint", "last",
                             "--port", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url, seen, deadline = None, [], time.monotonic() + 240
    while url is None and time.monotonic() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        seen.append(line)
        found = re.search(r"at (http://127\.0\.0\.1:\d+)/", line)
        url = found.group(1) if found else None
    if url is None:
        proc.kill()
        pytest.fail("mmret serve did not start: " + "".join(seen)[-2000:])
    yield url
    proc.terminate()
    proc.wait(30)


def search_ids(memorised, monkeypatch, *args) -> list[str]:
    monkeypatch.setenv("MMRET_RUNS_DIR", str(memorised["runs"]))
    out = CliRunner().invoke(app, ["search", *args, "--run", "memorised", "--checkpoint", "last", "--json", "-k", "5"])
    assert out.exit_code == 0, out.output
    return [h["image_id"] for h in json.loads(out.stdout)["results"][0]["images"]]


def test_clip_clients_queries_give_what_mmret_search_gives(server, memorised, monkeypatch):
    client_module = clip_client_module()
    client = client_module.ClipClient(url=f"{server}/knn-service", indice_name="example", num_images=5,
                                      deduplicate=False, use_safety_model=False, use_violence_detector=False)
    caption = "a yellow triangle above a yellow square"
    by_text = client.query(text=caption)
    assert [r["image_id"] for r in by_text] == search_ids(memorised, monkeypatch, caption)
    assert all(isinstance(r["id"], int) for r in by_text) and by_text[0]["image_id"] == "00000"
    picture = memorised["data"] / "example" / "images" / "00004.png"
    by_picture = client.query(image=str(picture))
    expected = search_ids(memorised, monkeypatch, "--image", str(picture))
    assert [r["image_id"] for r in by_picture] == expected and expected[0] == "00004"
    embedding = mmret.load(memorised["run"], checkpoint="last").encode_images(picture)[0].tolist()
    assert [r["image_id"] for r in client.query(embedding_input=embedding)] == expected
    assert requests.get(by_picture[0]["url"], timeout=30).content == picture.read_bytes()  # absolute urls
    captions = client_module.ClipClient(url=f"{server}/knn-service", indice_name="example", num_images=3,
                                        modality=client_module.Modality.TEXT).query(text=caption)
    assert captions[0]["caption"] == caption and captions[0]["image_id"] == "00000"


@pytest.mark.parametrize("content_type", [None, "text/plain;charset=UTF-8"])
def test_raw_http_without_a_json_content_type(server, memorised, monkeypatch, content_type):
    """What ClipClient (no Content-Type) and clip-front's fetch (text/plain) send."""
    caption = "a purple circle above a yellow triangle"
    body = json.dumps({"text": caption, "image": None, "modality": "image", "num_images": 5, "num_result_ids": 5,
                       "indice_name": "example", "deduplicate": False}).encode()
    host, port = server.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    headers = {"Content-Type": content_type} if content_type else {}  # http.client adds no Content-Type itself
    connection.request("POST", "/knn-service", body=body, headers=headers)
    answer = connection.getresponse()
    assert answer.status == 200
    hits = json.loads(answer.read())
    connection.close()
    assert [h["image_id"] for h in hits] == search_ids(memorised, monkeypatch, caption)
    meta = urllib.request.Request(f"{server}/metadata", data=json.dumps({"ids": [hits[0]["id"]],
                                                                         "indice_name": "example"}).encode())
    with urllib.request.urlopen(meta, timeout=60) as answer:
        assert json.loads(answer.read())[0]["metadata"]["image_id"] == hits[0]["image_id"]
