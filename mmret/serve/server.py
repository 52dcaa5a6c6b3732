"""Running the app: uvicorn on a socket bound first (so port 0 gives a known free port, and the
address is known before the first request), in the foreground for `mmret serve` or in a
background thread for tests and benchmarks."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from mmret.errors import MmretError


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise MmretError(f"cannot listen on {host}:{port}: {e.strerror}; choose another --port or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def header_deadline(seconds: float) -> type:
    """uvicorn's HTTP protocol with a deadline for the request line and headers: they must arrive
    within `seconds` of the connection opening or of the previous response ending, else the
    connection is closed. uvicorn alone waits for them without end, so a client sending a header a
    byte at a time (slowloris) would hold its connection, and enough of them the server."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as Base
    except ImportError:  # httptools comes with the serve extra; h11 is uvicorn's own fallback
        from uvicorn.protocols.http.h11_impl import H11Protocol as Base

    class HeaderDeadline(Base):
        _timer: Any = None
        _waiting: Any = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._timer is not None:
                self._timer.cancel()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._timer is not None:
                self._timer.cancel()
            self._waiting = self.cycle  # a request whose headers are complete has a new cycle
            self._timer = self.loop.call_later(seconds, self._expired)

        def _expired(self) -> None:
            if self.cycle is self._waiting and not self.transport.is_closing():
                self.transport.close()

    return HeaderDeadline


def uvicorn_server(app: Any, header_timeout_s: float = 10.0) -> Any:
    """A uvicorn server for `app` that leaves logging to mmret (one line per request) and closes a
    connection whose request headers take longer than `header_timeout_s`."""
    import uvicorn

    config = uvicorn.Config(app, log_config=None, access_log=False, server_header=False, lifespan="off",
                            timeout_keep_alive=30, timeout_graceful_shutdown=5, http=header_deadline(header_timeout_s))
    return uvicorn.Server(config)


def run(app: Any, sock: socket.socket, header_timeout_s: float = 10.0) -> None:
    """Serve until interrupted (Ctrl-C, SIGTERM)."""
    uvicorn_server(app, header_timeout_s).run(sockets=[sock])


class LiveServer:
    """The app served on 127.0.0.1 (or `host`) in a background thread: `url` once started."""

    def __init__(self, app: Any, host: str = "127.0.0.1", port: int = 0, header_timeout_s: float = 10.0):
        self.sock = bind(host, port)
        self.url = url_of(self.sock)
        self.server = uvicorn_server(app, header_timeout_s)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()
