"""The server in a hostile browser and network (issue 25, points 2, 4 and the slow headers of 10): a
Host it was not told, a page of another origin posting to it, the API docs behind the key, a gallery
file swapped for a link after prepare, and a client sending its headers a byte at a time."""

from __future__ import annotations

import os
import shutil
import socket
import time

import pytest
from fastapi.testclient import TestClient

from mmret.data import PrepareConfig, prepare
from mmret.inference.search import Gallery
from mmret.serve.app import create_app
from mmret.serve.config import ServeConfig
from mmret.serve.server import LiveServer
from mmret.serve.service import SearchService

KEY = "s3cret-key-for-tests"


def serve(run, **options):
    service = SearchService(Gallery.open(run, split="all", which="last"), ServeConfig(run, which="last", **options))
    return service, TestClient(create_app(service), base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def plain(memorised):
    service, client = serve(memorised["run"])
    yield client
    service.close()


def error(response, status: int, line: str) -> None:
    assert (response.status_code, response.json()) == (status, {"error": line}), response.text


def test_a_host_it_was_not_told_is_refused(plain, memorised):
    assert plain.get("/api/info", headers={"Host": "evil.example"}).status_code == 400  # a DNS-rebinding page
    assert plain.get("/api/info", headers={"Host": "evil.example"}).text == "Invalid host header"
    for host in ("127.0.0.1:8000", "localhost", "[::1]:8000"):
        assert plain.get("/api/info", headers={"Host": host}).status_code == 200, host
    service, client = serve(memorised["run"], allow_host=("search.example", "*.lan.example"))
    try:
        for host in ("search.example", "pc.lan.example:8000"):
            assert client.get("/api/info", headers={"Host": host}).status_code == 200, host
        assert client.get("/api/info", headers={"Host": "evil.example"}).status_code == 400
    finally:
        service.close()


def test_a_page_of_another_origin_cannot_post(plain, memorised, train_picture):
    files = {"file": ("a.png", train_picture, "image/png")}
    refused = "a cross-origin POST from http://evil.example is refused; start the server with --cors ORIGIN to " \
              "allow that page"
    error(plain.post("/api/search/upload", files=files, headers={"Origin": "http://evil.example"}), 403, refused)
    error(plain.post("/api/search", json={"text": "a red circle"}, headers={"Origin": "http://evil.example"}), 403,
          refused)
    error(plain.post("/api/search", json={"text": "a red circle"}, headers={"Sec-Fetch-Site": "cross-site"}), 403,
          "a cross-origin POST from cross-site is refused; start the server with --cors ORIGIN to allow that page")
    error(plain.post("/api/search", json={"text": "a red circle"}, headers={"Origin": "null"}), 403,
          "a cross-origin POST from null is refused; start the server with --cors ORIGIN to allow that page")
    own = plain.post("/api/search", json={"text": "a red circle"}, headers={"Origin": "http://127.0.0.1"})
    assert own.status_code == 200  # the server's own page
    assert plain.post("/api/search/upload", files=files).status_code == 200  # curl and scripts send no Origin
    service, client = serve(memorised["run"], cors=("https://good.example",))
    try:
        ok = client.post("/api/search/upload", files=files, headers={"Origin": "https://good.example"})
        assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == "https://good.example"
        pre = client.options("/api/search", headers={"Origin": "https://good.example",
                                                     "Access-Control-Request-Method": "POST"})
        assert pre.status_code == 200
        error(client.post("/api/search", json={"text": "a"}, headers={"Origin": "https://evil.example"}), 403,
              "a cross-origin POST from https://evil.example is refused; start the server with --cors ORIGIN to "
              "allow that page")
    finally:
        service.close()


def test_the_api_key_covers_the_docs_and_the_schema(memorised):
    service, client = serve(memorised["run"], api_key=KEY)
    try:
        for path in ("/docs", "/redoc", "/openapi.json", "/api/info", "/indices-list", "/media/x", "/thumbnails/x"):
            r = client.get(path)
            error(r, 401, "this server wants an API key: send it as X-API-Key or Authorization: Bearer KEY")
            assert memorised["run"].name not in r.text and "example" not in r.text
        assert client.get("/openapi.json", headers={"X-API-Key": KEY}).status_code == 200
        assert client.get("/docs", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        for path in ("/", "/static/app.js", "/api/health"):  # the page asks for the key; health says nothing
            assert client.get(path).status_code == 200, path
        schema = client.get("/openapi.json", headers={"X-API-Key": KEY}).json()
        search = schema["paths"]["/api/search"]["post"]["responses"]
        assert set(search) == {"200", "400", "401", "403", "404", "413", "422", "500", "503"}
        assert set(schema["paths"]["/media/{item}"]["get"]["responses"]) == {"200", "401", "403", "404", "422",
                                                                              "500"}
    finally:
        service.close()


def test_a_gallery_file_swapped_for_a_link_is_not_served(tmp_path, memorised):
    """/media and /thumbnails read through the dataset's roots when they serve, not only at prepare."""
    data = tmp_path / "data"
    prepare(PrepareConfig(source="example", name="swapped", count=12, data_dir=data))
    secret = tmp_path / "outside" / "secret.png"
    secret.parent.mkdir()
    shutil.copy(next((data / "swapped").rglob("*.png")), secret)
    gallery = Gallery.open(memorised["run"], "swapped", "all", which="last", data_dir=data)
    service = SearchService(gallery, ServeConfig(memorised["run"], which="last"))
    client = TestClient(create_app(service), base_url="http://127.0.0.1")
    try:
        item, path = gallery.ids[0], gallery.paths[0]
        assert client.get(f"/media/{item}").status_code == 200
        os.unlink(path)
        os.symlink(secret, path)
        refused = f"the file of {item!r} cannot be served: resolves to {os.path.realpath(secret)}, outside " \
                  f"{os.path.realpath(data / 'swapped')}"
        error(client.get(f"/media/{item}"), 403, refused)
        error(client.get(f"/thumbnails/{item}"), 403, refused)
    finally:
        service.close()


def test_a_client_sending_its_headers_slowly_is_cut_off(plain, memorised):
    service = SearchService(Gallery.open(memorised["run"], split="all", which="last"),
                            ServeConfig(memorised["run"], which="last"))
    try:
        with LiveServer(create_app(service), header_timeout_s=1.0) as live:
            host, port = live.sock.getsockname()[:2]
            start = time.monotonic()
            with socket.create_connection((host, port)) as slow:
                slow.settimeout(10)
                closed = False
                for byte in b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
                    try:
                        slow.sendall(bytes([byte]))
                    except OSError:  # the server closed the connection
                        closed = True
                        break
                    time.sleep(0.05)
                if not closed:
                    assert slow.recv(1024) == b""  # closed without an answer
            assert time.monotonic() - start < 5
            with socket.create_connection((host, port)) as quick:  # a client in a hurry is answered
                quick.sendall(b"GET /api/health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert quick.recv(1024).startswith(b"HTTP/1.1 200")
    finally:
        service.close()


@pytest.fixture(scope="module")
def train_picture(memorised):
    from mmret.data import load_dataset

    return open(load_dataset("example", memorised["data"]).items.path.iloc[0], "rb").read()
