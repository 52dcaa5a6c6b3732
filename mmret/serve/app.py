"""The ASGI app: a thin FastAPI layer over one `SearchService`.

    GET  /                       the search page (static files shipped in the package)
    GET  /api/health             {"status": "ok"} (no key needed)
    GET  /api/info               the loaded run and gallery, and the limits
    POST /api/search             {"text": ...} or {"id": ...}, with "k"
    POST /api/search/upload      multipart: file (an item of the gallery's kind), k
    POST /knn-service            clip-retrieval's back end: its request and answer (see `knn`)
    POST /metadata               clip-retrieval's metadata of result ids
    GET  /indices-list           clip-retrieval's list of galleries (this one)
    GET  /media/{id}             a gallery item's file, by id only
    GET  /thumbnails/{id}        its thumbnail, made once and cached
    GET  /docs, /redoc, /openapi.json

Every error is a small JSON body, `{"error": "one line"}`, with a 4xx status for a bad request
(400 malformed JSON, 401 key, 404 unknown id, 413 too large, 415 not an item, 422 out of the
limits, 503 busy) and 500 for a fault of the server, which is logged and never stops it. Request
bodies are limited before they are read (`BodyLimit`); each request is logged on one line.
"""

# no `from __future__ import annotations`: FastAPI reads the request models from the annotations
# of handlers defined inside `create_app`, which string annotations would hide from it
import hmac
import io
import logging
import mimetypes
import os
import time
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Depends, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from mmret.common.version import __version__
from mmret.errors import MmretError
from mmret.serve.guards import add_guards
from mmret.serve.knn import add_knn_routes
from mmret.serve.schemas import CaptionHit, Health, ItemHit, Query, SearchResponse, error_responses, request_models
from mmret.serve.service import Answer, ApiError, SearchService

_logger = logging.getLogger("mmret.serve")

STATIC = {"app.js": "text/javascript", "style.css": "text/css", "index.html": "text/html",
          "favicon.svg": "image/svg+xml"}
JSON_LIMIT = 1024 * 1024  # bytes of a JSON request without a picture in it (a long query gets its own message)
NO_STORE = {"Cache-Control": "no-store"}


def create_app(service: SearchService) -> Any:
    from fastapi_offline import FastAPIOffline  # the docs pages without a CDN: nothing is fetched at run time

    cfg = service.cfg
    models = request_models(cfg, service.gallery.dim)
    app = FastAPIOffline(title="mmret serve", version=__version__, summary=(
        f"Search {service.gallery.dataset} ({service.gallery.n_items:,} {service.modality.plural}) with the run "
        f"{service.gallery.run.name}"))
    app.state.service = service
    keyed = [Depends(_key_checker(cfg.api_key))] if cfg.api_key else []

    def to_response(kind: str, value: str, k: int, answer: Answer) -> SearchResponse:
        return SearchResponse(query=Query(kind=kind, value=value), modality=service.modality.name, k=k,
                              results=[ItemHit(rank=h.rank, id=h.item_id, score=h.score, captions=h.captions,
                                               **_links(h.item_id)) for h in answer.items],
                              captions=[CaptionHit(rank=h.rank, caption=h.captions[0], score=h.score, id=h.item_id,
                                                   **_links(h.item_id)) for h in answer.captions],
                              ms=answer.ms)

    @app.get("/", include_in_schema=False)
    async def page() -> Response:
        return _static("index.html")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str) -> Response:
        if name not in STATIC:
            raise ApiError(404, "no such file")
        return _static(name)

    @app.get("/api/health", response_model=Health, tags=["server"], responses=error_responses(cfg))
    async def health() -> dict:
        """Whether the server is up (no key needed)."""
        return {"status": "ok"}

    @app.get("/api/info", dependencies=keyed, tags=["server"], responses=error_responses(cfg))
    async def info() -> dict:
        """The loaded run and gallery, and the limits of this server."""
        return service.info()

    @app.post("/api/search", response_model=SearchResponse, dependencies=keyed, tags=["search"],
              responses=error_responses(cfg, 400, 403, 404, 413, 422, 503))
    async def search(body: models.SearchRequest) -> SearchResponse:
        """Items for a text, or more like a gallery item (by id), with the captions that fit it."""
        if (body.text is None) == (body.id is None):
            raise ApiError(422, "give exactly one of text and id")
        if body.text is not None:
            return to_response("text", body.text, body.k, await service.text(body.text, body.k))
        return to_response("id", body.id, body.k, await service.similar(body.id, body.k))

    @app.post("/api/search/upload", response_model=SearchResponse, dependencies=keyed, tags=["search"],
              responses=error_responses(cfg, 400, 403, 413, 415, 422, 503))
    async def search_upload(file: UploadFile = File(..., description="an item of the gallery's kind",
                                                    json_schema_extra={"minLength": 1}),  # an empty one is refused
                            k: int = Form(cfg.k, ge=1, le=cfg.max_k)) -> SearchResponse:
        """Items and captions for an uploaded item (a picture for a gallery of pictures)."""
        path = await _save(service, file)
        try:
            return to_response("upload", file.filename or "upload", k, await service.upload(path, k))
        finally:
            path.unlink(missing_ok=True)

    @app.get("/media/{item:path}", dependencies=keyed, tags=["media"], response_class=FileResponse,
             responses=error_responses(cfg, 403, 404, 422))
    async def media(item: str) -> Response:
        """A gallery item's file, by its id."""
        source = await run_in_threadpool(service.media, item)
        kind = mimetypes.guess_type(str(source.name))[0] or "application/octet-stream"
        return _opened_file(source, kind, _media_headers(cfg))

    @app.get("/thumbnails/{item:path}", dependencies=keyed, tags=["media"], response_class=FileResponse,
             responses=error_responses(cfg, 403, 404, 415, 422))
    async def thumbnail(item: str) -> Response:
        """A small JPEG of a gallery item, made on first request and kept."""
        path = await run_in_threadpool(service.thumbnail, item)
        return FileResponse(path, media_type="image/jpeg", headers=_media_headers(cfg))

    add_knn_routes(app, service, models, keyed)
    _add_error_handlers(app)
    app.add_middleware(BodyLimit, upload_limit=cfg.max_upload_bytes)
    add_guards(app, cfg)  # the key, the origins, the Host names: in front of every route
    app.add_middleware(RequestLog)
    return app


def _opened_file(source: Any, kind: str, headers: dict[str, str]) -> Response:
    """A response with the bytes of a file already opened through the guard, never reopened by a
    path a link could redirect: a file on Linux through its descriptor's /proc/self/fd entry (which
    reopens that very file, and keeps FileResponse's byte ranges for seeking in a sound), else the
    bytes read from the open file (a tar member's are in memory already)."""
    if not hasattr(source, "fileno") or isinstance(source, io.BytesIO) or not os.path.isdir("/proc/self/fd"):
        with source:
            return Response(source.read(), media_type=kind, headers=headers)
    return _DescriptorResponse(source, media_type=kind, headers=headers)


class _DescriptorResponse(FileResponse):
    """FileResponse of an open file, served from its descriptor and closed when the response ends
    (also when the client goes away)."""

    def __init__(self, source: Any, **kwargs: Any):
        fd = source.fileno()
        super().__init__(f"/proc/self/fd/{fd}", stat_result=os.fstat(fd), **kwargs)
        self.source = source

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.source.close()


def _links(item: str) -> dict[str, str]:
    quoted = quote(item, safe="")
    return {"url": f"/media/{quoted}", "thumbnail": f"/thumbnails/{quoted}"}


def _media_headers(cfg: Any) -> dict[str, str]:
    scope = "private" if cfg.api_key else "public"
    return {"Cache-Control": f"{scope}, max-age=3600", "X-Content-Type-Options": "nosniff"}


def _static(name: str) -> Response:
    data = resources.files("mmret.serve").joinpath("static", name).read_bytes()
    return Response(data, media_type=STATIC[name], headers={"Cache-Control": "no-cache",
                                                            "X-Content-Type-Options": "nosniff"})


def _key_checker(key: str):
    """A dependency that wants the key in `X-API-Key` or `Authorization: Bearer KEY`."""
    expected = key.encode()

    async def check(request: Request) -> None:
        given = request.headers.get("x-api-key") or ""
        auth = request.headers.get("authorization") or ""
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not hmac.compare_digest(given.encode(), expected):
            raise ApiError(401, "this server wants an API key: send it as X-API-Key or Authorization: Bearer KEY")

    return check


async def _save(service: SearchService, file: UploadFile) -> Path:
    """The upload in a temporary file, refused past the byte limit (the body limit has already
    stopped larger requests; this counts the file itself)."""
    limit, size, chunks = service.cfg.max_upload_bytes, 0, []
    while chunk := await file.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"the upload is over the limit of {limit:,} bytes")
        chunks.append(chunk)
    if size == 0:
        raise ApiError(422, "the upload is empty")
    return await run_in_threadpool(service.save_upload, chunks, Path(file.filename or "").suffix)


# ---------------------------------------------------------------------------- errors


def _error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    line = " ".join(str(message).split())  # one line, whatever the message held
    return JSONResponse({"error": line}, status_code=status, headers={**NO_STORE, **(headers or {})})


def _validation_line(exc: RequestValidationError) -> tuple[int, str]:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return 400, f"malformed JSON: {first.get('ctx', {}).get('error', 'cannot parse the body')}"
    where = ".".join(str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path", "form"))
    message = first.get("msg", "invalid request")
    return 422, f"{where}: {message}" if where else message


def _add_error_handlers(app: Any) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(*_validation_line(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, exc.detail, getattr(exc, "headers", None))

    @app.exception_handler(MmretError)
    async def mmret_error(request: Request, exc: MmretError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def crash(request: Request, exc: Exception) -> JSONResponse:
        _logger.exception("%s %s failed", request.method, request.url.path)
        return _error(500, "internal error: the server's log has the details")


# ---------------------------------------------------------------------------- middleware


class BodyTooLarge(HTTPException):
    """Raised while the body is read, so FastAPI passes it on as it is (it turns other errors of
    body reading into a 400)."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over the limit of {limit:,} bytes")


class BodyLimit:
    """Refuse request bodies past a limit before reading them: a declared Content-Length at once,
    a chunked body as soon as it passes the limit. Uploads get `upload_limit` (base64 pictures
    in `/knn-service` a third more), everything else `JSON_LIMIT`."""

    def __init__(self, app: Any, upload_limit: int):
        self.app, self.upload_limit = app, upload_limit

    def limit(self, path: str) -> int:
        if path == "/api/search/upload":
            return self.upload_limit + 64 * 1024  # the multipart envelope around the file
        if path == "/knn-service":
            return self.upload_limit * 4 // 3 + 64 * 1024
        return JSON_LIMIT

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit(scope["path"])
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            return await _error(413, f"the request body is over the limit of {limit:,} bytes")(scope, receive, send)
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)


class RequestLog:
    """One log line per request: method, path, status, milliseconds."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500

        async def watched(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watched)
        finally:
            path = scope["path"].encode("unicode_escape").decode("ascii")[:300]  # no control characters in the log
            _logger.info("%s %s %d %.1f ms", scope["method"], path, status, 1000 * (time.perf_counter() - start))
