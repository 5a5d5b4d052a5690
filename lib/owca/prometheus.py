"""Storage `prometheus`: an HTTP endpoint serving the latest cycle, for a Prometheus
server to scrape.

    ship:
      storages:
        - !PrometheusStorage {listen_address: 0.0.0.0, port: 9477}

GET `path` (default /metrics) answers the latest cycle of each category the
storage keeps (metrics, anomalies, allocations), as Prometheus text exposition
0.0.4.  owca-ship renders every cycle once, for every storage; this endpoint
only serves those bytes, so a scrape costs a memory copy (and a gzip, once
per cycle, when the scraper asks for it) and never waits for the pipeline.
The standard library's threading HTTP server answers concurrent scrapes; the
body is replaced whole when a cycle arrives, so a scrape sees one cycle, never
a mix of two.

Timestamps are left out unless `timestamps: true`: Prometheus then stamps
samples with the scrape time and marks series stale when they go, which is
what an exporter's scrape is expected to give.  Until the first cycle, or when
the latest is older than `stale_after_seconds`, the endpoint answers 503.
"""
import functools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Iterable, Optional

from owca import frames
from owca.config import register
from owca.storage import CATEGORIES, Cycle, Storage, StorageError

log = logging.getLogger("owca.prometheus")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def family_name(line: str) -> str:
    """The metric a line of exposition text belongs to ('' for other comments)."""
    if line.startswith("#"):
        parts = line.split(None, 3)
        return parts[2] if len(parts) >= 3 and parts[1] in ("HELP", "TYPE") else ""
    for i, ch in enumerate(line):
        if ch in "{ \n":
            return line[:i]
    return line


def merge(texts: Iterable[str]) -> str:
    """Several exposition texts as one: a metric family that an earlier text gives is
    left out of the later ones, so that no family appears twice."""
    out = []
    seen = set()
    for text in texts:
        names = set()
        for line in text.splitlines(keepends=True):
            name = family_name(line)
            if name and name in seen:
                continue
            names.add(name)
            out.append(line)
        seen |= names
    return "".join(out)


def strip_timestamps(text: str) -> str:
    """Exposition text as rendered by owca.exposition, each sample line ending in a
    timestamp, without the timestamps."""
    out = []
    for line in text.splitlines(keepends=True):
        if line.startswith("#") or not line.strip():
            out.append(line)
        else:
            out.append(line.rstrip("\n").rpartition(" ")[0] + "\n")
    return "".join(out)


@functools.lru_cache(maxsize=None)
def _http_classes():
    """The HTTP handler and servers, built on first use: http.server and what
    it pulls in cost owca-ship several MB that only this storage needs."""
    import http.server
    import socket

    class _Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"   # keep-alive: Prometheus reuses its connection
        server_version = "owca-ship"
        timeout = 30                    # a client that stalls gives its thread back

        def do_GET(self):
            self._reply(with_body=True)

        def do_HEAD(self):
            self._reply(with_body=False)

        def _reply(self, with_body: bool):
            storage = self.server.storage
            if self.path.split("?", 1)[0] != storage.path:
                return self._send(404, b"not found; metrics are at " + storage.path.encode() +
                                  b"\n", "text/plain; charset=utf-8", with_body)
            wants_gzip = "gzip" in self.headers.get("Accept-Encoding", "")
            status, body, encoding = storage.response(wants_gzip)
            self._send(status, body, CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8",
                       with_body, encoding)

        def _send(self, status, body, content_type, with_body, encoding=None):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            if encoding:
                self.send_header("Content-Encoding", encoding)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def log_message(self, fmt, *args):
            log.debug("scrape from %s: " + fmt, self.address_string(), *args)


    class _Server(http.server.ThreadingHTTPServer):
        daemon_threads = True


    class _Server6(_Server):
        address_family = socket.AF_INET6

    return _Handler, _Server, _Server6


@register
@dataclass(kw_only=True)
class PrometheusStorage(Storage):
    """The latest cycle over HTTP, for a Prometheus server to scrape."""
    listen_address: str = "127.0.0.1"
    port: int = 9477
    path: str = "/metrics"
    timestamps: bool = False
    stale_after_seconds: Optional[float] = None

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: expected 0..65535, got {self.port}")
        if not self.path.startswith("/"):
            raise ValueError(f"path: expected an absolute path, got {self.path!r}")
        if self.stale_after_seconds is not None and not self.stale_after_seconds > 0:
            raise ValueError("stale_after_seconds: expected a positive number of seconds")
        self._lock = threading.Lock()
        self._texts = {}            # category -> latest exposition text
        self._body = None           # what a scrape gets, rendered once per cycle
        self._gzipped = None
        self._updated = 0.0
        self._server = None
        self.scrapes = 0

    def start(self) -> None:
        handler, server, server6 = _http_classes()
        server_class = server6 if ":" in self.listen_address else server
        try:
            self._server = server_class((self.listen_address, self.port), handler)
        except OSError as e:
            raise StorageError(f"cannot listen on {self.listen_address}:{self.port}: "
                               f"{e.strerror}") from None
        self._server.storage = self
        self.port = self._server.server_address[1]   # the one chosen, with port 0
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="owca-prometheus", daemon=True)
        self._thread.start()

    def store(self, cycle: Cycle) -> None:
        texts = dict(self._texts)
        texts[cycle.category] = cycle.text
        text = merge(texts[c] for c in CATEGORIES if c in texts)
        if not self.timestamps:
            text = strip_timestamps(text)
        body = text.encode()
        with self._lock:
            self._texts = texts
            self._body, self._gzipped = body, None
            self._updated = time.monotonic()

    def response(self, wants_gzip: bool):
        """(status, body, content encoding) for a scrape."""
        with self._lock:
            self.scrapes += 1
            body, updated = self._body, self._updated
            if body is None:
                return 503, b"no cycle shipped yet\n", None
            age = time.monotonic() - updated
            if self.stale_after_seconds is not None and age > self.stale_after_seconds:
                return 503, f"the latest cycle is {age:.0f} s old\n".encode(), None
            if not wants_gzip:
                return 200, body, None
            if self._gzipped is None:
                import gzip
                self._gzipped = gzip.compress(body, compresslevel=1)
            return 200, self._gzipped, "gzip"

    def samples(self):
        return [frames.sample("owca_ship_scrapes_total", self.scrapes,
                              {"storage": type(self).__name__}, "counter")]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
