"""What stands between the network and the app: which Host names the server answers to, which
origins may send it requests from a web page, and the API key, each an ASGI middleware in front of
every route (those added later included), answering a refusal with the app's one-line JSON error.

    Host        Starlette's TrustedHostMiddleware: the address the server listens on, localhost,
                and `--allow-host` names. A DNS-rebinding page (evil.example resolving to
                127.0.0.1) sends `Host: evil.example` and gets 400, so it can read nothing.
    Origin      a request that changes nothing (GET, HEAD, OPTIONS) goes through; any other
                method sent by a web page of another origin is refused with 403 unless `--cors`
                names that origin (whose requests Starlette's CORSMiddleware then answers, preflight
                included). A browser names the page's origin in `Origin` on every cross-origin
                POST, a multipart form's too, and newer ones say `Sec-Fetch-Site: cross-site`;
                clients that are no browser (curl, scripts) send neither and go through.
    API key     with `--api-key`, every route but the page, its static files and /api/health wants
                the key (X-API-Key or Authorization: Bearer): the JSON API, the media, and the
                API docs with the OpenAPI document, which names the run and the dataset.
"""

from __future__ import annotations

import hmac
import socket
from typing import Any
from urllib.parse import urlsplit

from starlette.responses import JSONResponse

OPEN_PATHS = ("/", "/api/health")  # answered without the key: nothing in them is the gallery's
OPEN_PREFIXES = ("/static/",)
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
KEY_REFUSED = "this server wants an API key: send it as X-API-Key or Authorization: Bearer KEY"


def json_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": " ".join(str(message).split())}, status_code=status,
                        headers={"Cache-Control": "no-store"})


def allowed_hosts(host: str, extra: tuple[str, ...] = ()) -> list[str]:
    """The Host names to answer: localhost, the bound address (for a wildcard address, this machine's
    name and addresses), and `extra` (`--allow-host`, which may be a `*.example.com` pattern)."""
    names = {"localhost", "127.0.0.1", "::1", host.strip("[]")}
    if host.strip("[]") in ("0.0.0.0", "::", ""):
        machine = socket.gethostname()
        names |= {machine, socket.getfqdn()}
        try:
            names |= {str(info[4][0]) for info in socket.getaddrinfo(machine, None)}
        except OSError:  # a machine whose own name does not resolve: its name is all there is
            pass
    names = {f"[{n}]" if ":" in n else n for n in names if n and n not in ("0.0.0.0", "::")}  # as Host writes them
    return sorted(n.lower() for n in names | set(extra))


def given_key(headers: Any) -> str:
    key = headers.get("x-api-key") or ""
    auth = headers.get("authorization") or ""
    if not key and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    return key


class OriginCheck:
    """Refuse a request that may change something (any method but GET, HEAD and OPTIONS) when a web
    page of another origin sent it and `--cors` does not name that origin (see the module docstring)."""

    def __init__(self, app: Any, allowed: tuple[str, ...] = ()):
        self.app, self.allowed = app, {o.rstrip("/").lower() for o in allowed}

    def _cross(self, headers: dict[bytes, bytes]) -> str | None:
        """The foreign origin (or site) that sent the request, None for the server's own page."""
        origin = headers.get(b"origin", b"").decode("latin-1").strip().lower()
        host = headers.get(b"host", b"").decode("latin-1").strip().lower()
        if origin and origin != "null":
            own = urlsplit(origin).netloc == host
            return None if own or origin in self.allowed else origin
        if origin == "null":  # a sandboxed frame or a file:// page
            return "null"
        site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
        return site if site in ("cross-site", "same-site") else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] in SAFE_METHODS:
            return await self.app(scope, receive, send)
        foreign = self._cross(dict(scope["headers"]))
        if foreign is not None:
            return await json_error(403, f"a cross-origin {scope['method']} from {foreign[:100]} is refused; "
                                         "start the server with --cors ORIGIN to allow that page")(scope, receive, send)
        await self.app(scope, receive, send)


class KeyRequired:
    """With an API key, every route but `OPEN_PATHS` / `OPEN_PREFIXES` wants it (compared in
    constant time); the docs and the OpenAPI document included."""

    def __init__(self, app: Any, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or scope["method"] == "OPTIONS" or path in OPEN_PATHS \
                or path.startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        if not hmac.compare_digest(given_key(Headers(scope=scope)).encode(), self.key):
            return await json_error(401, KEY_REFUSED)(scope, receive, send)
        await self.app(scope, receive, send)


def add_guards(app: Any, cfg: Any) -> None:
    """The guards in front of `app`, innermost first: the key, the CORS answers for the origins
    `--cors` names, the refusal of other cross-origin requests, then the Host allow-list."""
    from starlette.middleware.cors import CORSMiddleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware

    if cfg.api_key:
        app.add_middleware(KeyRequired, key=cfg.api_key)
    if cfg.cors:
        app.add_middleware(CORSMiddleware, allow_origins=list(cfg.cors), allow_methods=["GET", "POST"],
                           allow_headers=["Content-Type", "X-API-Key", "Authorization"], max_age=600)
    app.add_middleware(OriginCheck, allowed=tuple(cfg.cors))
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts(cfg.host, tuple(cfg.allow_host)),
                       www_redirect=False)
