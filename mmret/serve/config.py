"""What `mmret serve` is told: which run and gallery, where to listen, and the request limits."""

from __future__ import annotations

import ipaddress
from dataclasses import KW_ONLY, dataclass
from pathlib import Path
from urllib.parse import urlsplit

from mmret.errors import MmretError
from mmret.inference.index import INDEX_KINDS


@dataclass
class ServeConfig:
    run_dir: Path  # the run whose model searches (a trained run, or a zero-shot run folder)
    _: KW_ONLY  # the other settings by name: too many to pass in order
    dataset: str | None = None  # the gallery's dataset (default: the run's)
    split: str = "all"  # the gallery's split
    index: str = "exact"  # exact | ivf | hnsw
    rebuild_index: bool = False
    which: str = "best"  # checkpoint: best | last
    device: str = "auto"
    host: str = "127.0.0.1"  # anything but a loopback address exposes the gallery, and is said loudly
    port: int = 8000  # 0: any free port
    allow_host: tuple[str, ...] = ()  # Host names answered besides the bound address and localhost
    cors: tuple[str, ...] = ()  # origins whose web pages may send requests (CORS); others' POSTs are refused
    api_key: str | None = None  # required by every route but the page and /api/health when set
    header_timeout_s: float = 10.0  # a request's line and headers must arrive within this; else the connection closes
    k: int = 24  # results the page asks for
    max_k: int = 1000  # the most results one request may ask for
    max_knn: int = 10_000  # the most results one /knn-service request may ask for (clip-front's download asks 10,000)
    max_query_chars: int = 1000  # the longest text query
    max_upload_mb: float = 20.0  # the largest uploaded query item
    max_pixels: int = 40_000_000  # the largest uploaded picture (width x height), checked before decoding
    thumbnail_px: int = 256  # thumbnails fit in this square
    max_batch: int = 32  # text queries encoded in one forward pass
    max_waiting: int = 256  # queries waiting for the model before the server answers 503
    timeout_s: float = 60.0  # a query not answered by then gets 503

    def __post_init__(self) -> None:
        self.run_dir = Path(self.run_dir)
        self.allow_host, self.cors = tuple(self.allow_host), tuple(self.cors)
        for name in self.allow_host:
            if not name or "/" in name or "*" in name[1:] or (name.startswith("*") and not name.startswith("*.")):
                raise MmretError(f"--allow-host {name!r} must be a host name, an address or a pattern such as "
                                 "*.example.com")
        for origin in self.cors:
            parts = urlsplit(origin)
            if parts.scheme not in ("http", "https") or not parts.netloc or parts.path not in ("", "/"):
                raise MmretError(f"--cors {origin!r} must be an origin such as https://example.com or "
                                 "http://localhost:3000 (scheme, host and port; no path)")
        if self.index not in INDEX_KINDS:
            raise MmretError(f"--index must be one of {', '.join(INDEX_KINDS)}, got {self.index!r}")
        if not 0 <= self.port <= 65535:
            raise MmretError(f"--port must be between 0 and 65535, got {self.port}")
        if self.api_key is not None and len(self.api_key) < 8:
            raise MmretError("--api-key must be at least 8 characters long")
        for name in ("k", "max_k", "max_knn", "max_query_chars", "max_pixels", "thumbnail_px", "max_batch",
                     "max_waiting"):
            if getattr(self, name) < 1:
                raise MmretError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.k > self.max_k:
            raise MmretError(f"-k ({self.k}) cannot exceed --max-k ({self.max_k})")
        if not self.max_upload_mb > 0 or not self.timeout_s > 0 or not self.header_timeout_s > 0:
            raise MmretError("--max-upload-mb and the timeouts must be positive")
        if self.thumbnail_px > 2048:
            raise MmretError(f"--thumbnail-px must be at most 2048, got {self.thumbnail_px}")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def local_only(self) -> bool:
        """Whether only this machine can connect (a loopback address)."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:
            return False
