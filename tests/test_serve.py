"""`mmret serve` on a tiny run and a dozen pictures: every endpoint's happy path, and every limit
(path traversal in all its spellings, a 50 MB upload, a text file sent as a picture, k of 0, -1
and 10^9, a 100,000-character query, malformed JSON, too many pixels, a missing API key) answered
by the right 4xx with a one-line JSON error, after which the server still answers."""

from __future__ import annotations

import base64
import io
import json
import logging
import socket
import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from mmret.cli import app as cli
from mmret.data import load_dataset
from mmret.inference.search import Gallery, near_duplicates
from mmret.serve.app import create_app
from mmret.serve.config import ServeConfig
from mmret.serve.server import LiveServer
from mmret.serve.service import SearchService
from mmret.serve.worker import BatchWorker, Busy

KEY = "s3cret-key-for-tests"


@pytest.fixture(scope="module")
def gallery(memorised):
    return Gallery.open(memorised["run"], split="all", which="last")  # last: the memorised weights


@pytest.fixture(scope="module")
def service(gallery, memorised):
    service = SearchService(gallery, ServeConfig(memorised["run"], which="last"))
    service.warm_up()
    yield service
    service.close()


@pytest.fixture(scope="module")
def client(service):
    return TestClient(create_app(service), base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def train(memorised):
    """The memorised pictures: id, file and first caption."""
    ds = load_dataset("example", memorised["data"]).split("train")
    first = ds.captions.groupby("item_id").caption.first()
    return ds.items.assign(caption=ds.items.item_id.map(first)).reset_index(drop=True)


def alive(client) -> None:
    """The server still answers a real query."""
    r = client.post("/api/search", json={"text": "a red circle", "k": 2})
    assert r.status_code == 200 and len(r.json()["results"]) == 2


def refused(r, status: int, starts: str = "") -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and "\n" not in body["error"] and body["error"].startswith(starts), body
    return body["error"]


# ---------------------------------------------------------------------------- happy paths


def test_health_and_info(client, memorised):
    assert client.get("/api/health").json() == {"status": "ok"}
    info = client.get("/api/info").json()
    assert {k: info[k] for k in ("run", "method", "dataset", "split", "modality", "items", "captions", "index")} == {
        "run": "memorised", "method": "heads", "dataset": "example", "split": "all", "modality": "image",
        "items": 12, "captions": 60, "index": "exact"}
    assert info["limits"] == {"max_k": 1000, "max_query_chars": 1000, "max_upload_bytes": 20 * 1024 * 1024,
                              "max_pixels": 40_000_000}


def test_a_caption_finds_its_picture_first(client, train):
    for row in train.itertuples():
        body = client.post("/api/search", json={"text": row.caption, "k": 3}).json()
        assert body["query"] == {"kind": "text", "value": row.caption} and body["modality"] == "image"
        first = body["results"][0]
        assert first["id"] == row.item_id and row.caption in first["captions"]
        assert first["url"] == f"/media/{row.item_id}" and first["thumbnail"] == f"/thumbnails/{row.item_id}"
        assert [h["rank"] for h in body["results"]] == [1, 2, 3] and body["captions"] == []
        assert body["results"][0]["score"] >= body["results"][1]["score"] >= body["results"][2]["score"]


def test_more_like_this_leaves_the_item_out_and_gives_its_captions(client, train, gallery):
    item = train.item_id.iloc[0]
    body = client.post("/api/search", json={"id": item, "k": 11}).json()
    assert body["query"] == {"kind": "id", "value": item}
    ids = [h["id"] for h in body["results"]]
    assert item not in ids and len(ids) == 11 and set(ids) == set(gallery.ids) - {item}
    assert body["captions"][0]["id"] == item  # its own captions fit it best (memorised)


def test_an_uploaded_picture_finds_itself_and_its_captions(client, train):
    row = train.iloc[2]
    with open(row.path, "rb") as f:
        r = client.post("/api/search/upload", files={"file": ("mine.png", f, "image/png")}, data={"k": "4"})
    body = r.json()
    assert r.status_code == 200 and body["query"] == {"kind": "upload", "value": "mine.png"}
    assert body["results"][0]["id"] == row.item_id and len(body["results"]) == 4
    assert body["captions"][0]["id"] == row.item_id and body["captions"][0]["caption"]


def test_knn_service_follows_clip_retrievals_shape(client, train, gallery):
    row = train.iloc[1]
    by_text = client.post("/knn-service", json={"text": row.caption, "modality": "image", "num_images": 3,
                                                 "indice_name": "example", "use_safety_model": True})
    assert by_text.status_code == 200
    hits = by_text.json()
    assert [set(h) for h in hits] == [{"id", "similarity", "caption", "url", "thumbnail", "image_id"}] * 3
    first = hits[0]
    assert first["image_id"] == row.item_id and first["id"] == gallery.row_of[row.item_id]  # an integer row
    assert first["url"] == f"http://127.0.0.1/media/{row.item_id}"  # absolute: requests.get(url) works
    assert client.get(first["url"]).content == open(row.path, "rb").read()
    picture = base64.b64encode(open(row.path, "rb").read()).decode()
    by_picture = client.post("/knn-service", json={"image": picture, "modality": "image", "num_images": 2}).json()
    assert by_picture[0]["image_id"] == row.item_id
    # "" is no text, as clip_back reads it (clip-front sends text "" beside a picture)
    assert client.post("/knn-service", json={"text": "", "image": picture, "num_images": 2}).json() == by_picture
    captions = client.post("/knn-service", json={"image": picture, "modality": "text", "num_images": 2}).json()
    assert captions[0]["image_id"] == row.item_id and captions[0]["caption"] in gallery.captions_of[first["id"]]
    emb = gallery.vectors([gallery.row_of[row.item_id]])[0]
    by_vector = client.post("/knn-service", json={"embedding_input": (emb * 3).tolist(), "num_images": 1}).json()
    assert by_vector[0]["image_id"] == row.item_id
    assert client.get("/indices-list").json() == ["example"]
    refused(client.post("/knn-service", json={"text": "x", "indice_name": "other"}), 404, "no index 'other'")
    refused(client.post("/knn-service", json={"image_url": "http://example.com/a.jpg"}), 422,
            "image_url is not supported")
    refused(client.post("/knn-service", json={"embedding_input": [0.0] * 32}), 422, "embedding_input must be 32")
    refused(client.post("/knn-service", json={"image": "not base64!"}), 400, "image must be base64")
    refused(client.post("/knn-service", json={"text": ""}), 422, "give exactly one of text, image")


@pytest.mark.parametrize("headers", [{}, {"content-type": "text/plain;charset=UTF-8"},
                                     {"content-type": "application/x-www-form-urlencoded"}])
def test_knn_service_reads_json_whatever_the_content_type(client, train, headers):
    """ClipClient posts `data=json.dumps(...)` with no Content-Type, clip-front's fetch says text/plain."""
    body = json.dumps({"text": train.caption.iloc[2], "modality": "image", "num_images": 2}).encode()
    r = client.post("/knn-service", content=body, headers=headers)
    assert r.status_code == 200 and r.json()[0]["image_id"] == train.item_id.iloc[2]
    ids = json.dumps({"ids": [r.json()[0]["id"]], "indice_name": "example"}).encode()
    meta = client.post("/metadata", content=ids, headers=headers)
    assert meta.status_code == 200 and meta.json()[0]["metadata"]["image_id"] == train.item_id.iloc[2]
    refused(client.post("/knn-service", content=b"{not json", headers=headers), 400, "malformed JSON")


def test_knn_service_past_num_images_and_metadata(client, gallery):
    """num_result_ids results, the first num_images with caption and url, the rest as ids that
    /metadata describes (clip-front's paging), up to --max-knn."""
    r = client.post("/knn-service", json={"text": "a red circle", "num_images": 3, "num_result_ids": 10}).json()
    assert len(r) == 10 and all(set(h) == {"id", "similarity"} for h in r[3:]) and "url" in r[2]
    assert [h["similarity"] for h in r] == sorted((h["similarity"] for h in r), reverse=True)
    meta = client.post("/metadata", json={"ids": [h["id"] for h in r[3:]], "indice_name": "example"}).json()
    assert [m["id"] for m in meta] == [h["id"] for h in r[3:]]
    assert meta[0]["metadata"]["caption"] == gallery.captions_of[r[3]["id"]][0]
    assert meta[0]["metadata"]["url"].endswith(f"/media/{gallery.ids[r[3]['id']]}")
    refused(client.post("/metadata", json={"ids": [12]}), 404, "no row 12 in the gallery: ids are rows 0 to 11")
    refused(client.post("/knn-service", json={"text": "x", "num_images": 10_001}), 422, "num_images: Input should")
    assert len(client.post("/knn-service", json={"text": "x", "num_images": 5000}).json()) == 12  # all there are


def test_deduplicate_leaves_out_near_copies(client, gallery):
    """Two results within 0.94 cosine are one picture to clip-retrieval: `deduplicate` keeps the better."""
    query = gallery.vectors([0])[0]
    plain = client.post("/knn-service", json={"embedding_input": query.tolist(), "num_images": 12}).json()
    deduplicated = client.post("/knn-service", json={"embedding_input": query.tolist(), "num_images": 12,
                                                      "deduplicate": True}).json()
    rows = [h["id"] for h in plain]
    vectors = gallery.vectors(rows)
    dropped = near_duplicates(vectors, 0.94)
    assert [h["id"] for h in deduplicated] == [r for i, r in enumerate(rows) if i not in dropped]
    assert deduplicated[0]["id"] == 0


def test_near_duplicates_are_connected_components():
    """As clip_back's: a chain a~b~c drops b and c even when a and c are far apart."""
    a = np.array([1.0, 0.0, 0.0])
    b = np.array([np.cos(0.3), np.sin(0.3), 0.0])  # cos(a, b) = 0.955
    c = np.array([np.cos(0.6), np.sin(0.6), 0.0])  # cos(b, c) = 0.955, cos(a, c) = 0.825
    d = np.array([0.0, 0.0, 1.0])
    assert near_duplicates(np.stack([a, d, b, c]), 0.94) == {2, 3}
    assert near_duplicates(np.stack([c, b, a]), 0.94, block=1) == {1, 2}


def test_media_and_thumbnails_by_id(client, train, service):
    row = train.iloc[0]
    media = client.get(f"/media/{row.item_id}")
    assert media.status_code == 200 and media.headers["content-type"] == "image/png"
    assert media.content == open(row.path, "rb").read()
    first = client.get(f"/thumbnails/{row.item_id}")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(first.content))
    assert thumb.format == "JPEG" and max(thumb.size) <= 256
    (made,) = [p for p in service.thumbnails.folder.iterdir() if p.stat().st_size == len(first.content)]
    stamp = made.stat().st_mtime_ns
    assert client.get(f"/thumbnails/{row.item_id}").content == first.content
    assert made.stat().st_mtime_ns == stamp  # made once, then served from the cache


def test_page_docs_and_openapi_need_nothing_from_elsewhere(client):
    page = client.get("/")
    assert page.status_code == 200 and '<script src="/static/app.js"' in page.text
    for name in ("app.js", "style.css"):
        asset = client.get(f"/static/{name}")
        assert asset.status_code == 200 and "http://" not in asset.text and "https://" not in asset.text
    docs = client.get("/docs")
    assert (docs.status_code == 200 and "cdn" not in docs.text
            and "/static-offline-docs/swagger-ui-bundle.js" in docs.text)
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/api/search", "/api/search/upload", "/knn-service", "/api/info", "/api/health"} <= set(spec["paths"])
    request = spec["components"]["schemas"]["SearchRequest"]["properties"]
    assert request["k"]["maximum"] == 1000 and request["text"]["anyOf"][0]["maxLength"] == 1000


def test_one_log_line_per_request(client, caplog):
    with caplog.at_level(logging.INFO, logger="mmret.serve"):
        client.get("/api/health")
        client.post("/api/search", json={"text": "x", "k": 0})
    lines = [r.getMessage() for r in caplog.records if r.name == "mmret.serve"]
    assert len(lines) == 2
    method, path, status, ms, unit = lines[0].split()
    assert (method, path, status, unit) == ("GET", "/api/health", "200", "ms") and float(ms) >= 0
    assert lines[1].startswith("POST /api/search 422 ")


# ---------------------------------------------------------------------------- limits


@pytest.mark.parametrize("path", [
    "/media/..%2F..%2Fetc%2Fpasswd", "/media/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/media/%252e%252e%252fetc%252fpasswd",
    "/media/%2Fetc%2Fpasswd", "/media/....//....//etc/passwd", "/thumbnails/..%2F..%2Fetc%2Fpasswd",
    "/media/00001%00.png", "/static/..%2Fconfig.py", "/static/%2e%2e%2fservice.py",
])
def test_path_traversal_finds_nothing(client, path):
    r = client.get(path)
    assert r.status_code == 404 and "root:" not in r.text and "import" not in r.text
    refused(r, 404)
    alive(client)


def test_path_traversal_sent_raw_to_the_real_server(service):
    """httpx tidies `..` away; a raw socket sends it as it is."""
    with LiveServer(create_app(service)) as live:
        host, port = live.url.removeprefix("http://").split(":")
        for target in ("/media/../../etc/passwd", "/thumbnails/../../../etc/passwd", "/static/../config.py",
                       "/media/%2e%2e/%2e%2e/etc/passwd"):
            status, body = raw_request(host, int(port),
                                       f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert status == 404 and b"root:" not in body, (target, status, body)
        status, _ = raw_request(host, int(port), "NOT AN HTTP REQUEST\r\n\r\n")
        assert status == 400
        status, body = raw_request(host, int(port), "POST /api/search/upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                                    "Content-Type: multipart/form-data; boundary=b\r\n"
                                                    "Content-Length: 52428800\r\nConnection: close\r\n\r\n")
        assert status == 413 and b"over the limit" in body  # refused before a byte of the body is read
        status, body = raw_request(host, int(port),
                                   "GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        assert status == 200 and body.endswith(b'{"status":"ok"}')


def raw_request(host: str, port: int, text: str) -> tuple[int, bytes]:
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(text.encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_a_50_mb_upload_is_refused(client):
    big = b"\xff\xd8\xff" + b"0" * (50 * 1024 * 1024)
    refused(client.post("/api/search/upload", files={"file": ("big.jpg", big, "image/jpeg")}), 413,
            "the request body is over the limit")
    alive(client)

    def chunks():  # no Content-Length: counted as it arrives
        for _ in range(50):
            yield b"0" * (1024 * 1024)

    refused(client.post("/api/search/upload", content=chunks(),
                        headers={"content-type": "multipart/form-data; boundary=x"}), 413, "the request body is over")
    refused(client.post("/knn-service", json={"image": base64.b64encode(big[:30 * 1024 * 1024]).decode()}), 413)
    alive(client)


def test_a_text_file_sent_as_a_picture(client):
    refused(client.post("/api/search/upload", files={"file": ("cat.jpg", b"just some words\n" * 100, "image/jpeg")}),
            415, "the upload is not a picture mmret can read")
    refused(client.post("/knn-service", json={"image": base64.b64encode(b"words").decode()}), 415)
    refused(client.post("/api/search/upload", files={"file": ("empty.png", b"", "image/png")}), 422,
            "the upload is empty")
    alive(client)


@pytest.mark.parametrize("k", [0, -1, 10**9])
def test_k_out_of_range(client, train, k):
    refused(client.post("/api/search", json={"text": "a red circle", "k": k}), 422, "k: Input should be")
    refused(client.post("/api/search", json={"id": train.item_id.iloc[0], "k": k}), 422, "k: Input should be")
    refused(client.post("/knn-service", json={"text": "a red circle", "num_images": k}), 422,
            "num_images: Input should")
    with open(train.path.iloc[0], "rb") as f:
        refused(client.post("/api/search/upload", files={"file": ("a.png", f, "image/png")}, data={"k": str(k)}),
                422, "k: Input should be")
    alive(client)


def test_a_100000_character_query(client):
    line = refused(client.post("/api/search", json={"text": "a red circle " * 7693, "k": 3}), 422)
    assert line == "text: String should have at most 1000 characters"
    refused(client.post("/knn-service", json={"text": "x" * 100_000}), 422, "text: String should have at most 1000")
    alive(client)


@pytest.mark.parametrize("body", [b"{bad json", b'{"text": "a red circle", "k": 3', b"\xff\xfe", b"[1, 2"])
def test_malformed_json(client, body):
    refused(client.post("/api/search", content=body, headers={"content-type": "application/json"}), 400,
            "malformed JSON")
    alive(client)


@pytest.mark.parametrize("body, status, line", [
    ({"k": 3}, 422, "give exactly one of text and id"),
    ({"text": "a", "id": "00001"}, 422, "give exactly one of text and id"),
    ({"text": "   "}, 422, "the query is empty"),
    ({"text": "a", "colour": "red"}, 422, "colour: Extra inputs are not permitted"),
    ({"text": 3}, 422, "text: Input should be a valid string"),
    ({"id": "../../etc/passwd"}, 404, "no picture '../../etc/passwd' in the gallery"),
    ([1, 2], 422, "Input should be a valid dictionary"),
])
def test_bad_search_requests(client, body, status, line):
    assert refused(client.post("/api/search", json=body), status).startswith(line)
    alive(client)


def test_wrong_routes_and_methods(client):
    refused(client.get("/api/nothing"), 404, "Not Found")
    refused(client.delete("/api/search"), 405, "Method Not Allowed")
    refused(client.get("/api/search"), 405)
    alive(client)


def test_limits_of_another_config_and_the_api_key(gallery, memorised, train):
    cfg = ServeConfig(memorised["run"], which="last", api_key=KEY, max_pixels=100, k=5, max_k=5, max_query_chars=20)
    service = SearchService(gallery, cfg)
    try:
        client = TestClient(create_app(service), base_url="http://127.0.0.1")
        assert client.get("/api/health").status_code == 200 and client.get("/").status_code == 200  # open
        for path in ("/api/info", f"/media/{train.item_id.iloc[0]}", f"/thumbnails/{train.item_id.iloc[0]}",
                     "/indices-list"):
            refused(client.get(path), 401, "this server wants an API key")
            refused(client.get(path, headers={"X-API-Key": "wrong-key-1234"}), 401)
        refused(client.post("/api/search", json={"text": "a"}), 401)
        keyed = {"X-API-Key": KEY}
        assert client.get("/api/info", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        refused(client.post("/api/search", json={"text": "a", "k": 6}, headers=keyed), 422, "k: Input should be less")
        refused(client.post("/api/search", json={"text": "x" * 21}, headers=keyed), 422, "text: String should")
        with open(train.path.iloc[0], "rb") as f:  # 64 x 64 = 4,096 pixels, over 100
            refused(client.post("/api/search/upload", files={"file": ("a.png", f, "image/png")}, headers=keyed), 413,
                    "the upload is too large: 64 x 64 pixels (4,096) is over the limit of 100 pixels")
        ok = client.post("/api/search", json={"text": "a red circle", "k": 5}, headers=keyed)
        assert ok.status_code == 200 and len(ok.json()["results"]) == 5
    finally:
        service.close()


# ---------------------------------------------------------------------------- concurrency


def test_concurrent_queries_get_their_own_answers(service, train):
    """16 clients at once on the real server: every answer is the one its query gets alone."""
    import httpx

    captions = (train.caption.tolist() * 4)[:32]
    with LiveServer(create_app(service)) as live:
        with httpx.Client(base_url=live.url) as c:
            alone = {t: c.post("/api/search", json={"text": t, "k": 3}).json()["results"] for t in set(captions)}
        answers, errors = {}, []

        def ask(i: int, text: str) -> None:
            try:
                with httpx.Client(base_url=live.url, timeout=30) as c:
                    r = c.post("/api/search", json={"text": text, "k": 3})
                    answers[i] = (text, r.json()["results"])
            except Exception as e:  # noqa: BLE001  (reported below)
                errors.append(repr(e))

        threads = [threading.Thread(target=ask, args=(i, t)) for i, t in enumerate(captions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert not errors and len(answers) == len(captions)
    for text, results in answers.values():
        assert [h["id"] for h in results] == [h["id"] for h in alone[text]]
        assert np.allclose([h["score"] for h in results], [h["score"] for h in alone[text]], atol=1e-4)


def test_the_worker_batches_what_waits_and_fails_requests_alone():
    entered, gate, sizes = threading.Event(), threading.Event(), []

    def run(jobs):
        entered.set()
        gate.wait(10)
        sizes.append(len(jobs))
        if "bad" in jobs:
            raise ValueError("bad job")
        return [j.upper() for j in jobs]

    worker = BatchWorker("test", run, max_batch=4, max_waiting=5)
    try:
        futures = [worker.submit("a")]
        assert entered.wait(10)  # the worker holds "a"; what comes now waits
        futures += [worker.submit(j) for j in ("b", "bad", "c", "d", "e")]
        with pytest.raises(Busy):
            worker.submit("one too many")
        gate.set()
        assert [f.result(10) for f in futures if f is not futures[2]] == ["A", "B", "C", "D", "E"]
        with pytest.raises(ValueError, match="bad job"):
            futures[2].result(10)
        # "a" alone; then b, bad, c, d together, which fails and is run one by one; then e
        assert sizes == [1, 4, 1, 1, 1, 1, 1] and worker.largest == 4
    finally:
        worker.close()


def test_after_a_batch_of_several_the_worker_waits_a_little_for_as_many():
    sizes, gate, entered = [], threading.Event(), threading.Event()

    def run(jobs):
        entered.set()
        gate.wait(10)
        sizes.append(len(jobs))
        return jobs

    worker = BatchWorker("test", run, max_batch=8, linger=0.5)
    try:
        alone = [worker.submit("x")]  # a lone client's request is not held back
        time.sleep(0.05)
        alone.append(worker.submit("y"))
        gate.set()
        [f.result(10) for f in alone]
        assert sizes == [1, 1]
        gate.clear()
        entered.clear()
        held = worker.submit("hold")  # three queue behind it and go as one batch of 3
        assert entered.wait(10)
        three = [worker.submit(j) for j in "abc"]
        gate.set()
        [f.result(10) for f in [held, *three]]
        assert sizes[2:] == [1, 3]
        two = [worker.submit("d")]  # after a batch of 3 the worker waits for the second one, 0.05 s later
        time.sleep(0.05)
        two.append(worker.submit("e"))
        assert [f.result(10) for f in two] == ["d", "e"] and sizes[4:] == [2]
    finally:
        worker.close()


# ---------------------------------------------------------------------------- the command


def test_the_command_binds_first_and_warns_when_exposed(memorised, monkeypatch):
    import mmret.serve.server as server

    served = {}
    monkeypatch.setattr(server, "run", lambda app, sock, *_: served.update(app=app, port=sock.getsockname()[1]))
    monkeypatch.setenv("MMRET_RUNS_DIR", str(memorised["runs"]))
    result = CliRunner().invoke(cli, ["serve", "--run", "memorised", "--port", "0", "--checkpoint", "last"])
    assert result.exit_code == 0, result.output
    assert f"at http://127.0.0.1:{served['port']}/" in result.stdout and "WARNING" not in result.stderr
    exposed = CliRunner().invoke(cli, ["serve", "--run", "memorised", "--host", "0.0.0.0", "--port", "0",
                                       "--checkpoint", "last"])
    assert exposed.exit_code == 0, exposed.output
    assert "WARNING: listening on 0.0.0.0, not 127.0.0.1" in exposed.stderr and "--api-key" in exposed.stderr
    short = CliRunner().invoke(cli, ["serve", "--run", "memorised", "--api-key", "short"])
    assert (short.exit_code, short.stderr.strip()) == (1, "error: --api-key must be at least 8 characters long")


def test_a_taken_port_fails_at_once(memorised, monkeypatch):
    monkeypatch.setenv("MMRET_RUNS_DIR", str(memorised["runs"]))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli, ["serve", "--run", "memorised", "--port", str(port)])
    assert result.exit_code == 1 and result.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}: ")
