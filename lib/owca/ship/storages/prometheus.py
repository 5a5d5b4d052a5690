"""Storage `prometheus`: an HTTP endpoint serving the latest cycle, for a Prometheus
server to scrape.

    ship:
      storages:
        - !PrometheusStorage {listen_address: 0.0.0.0, port: 9477}

GET `path` (default /metrics) answers the latest cycle of each category the
storage keeps (metrics, anomalies, allocations), every series of each, as one
Prometheus text exposition 0.0.4 (a family several categories carry, such as a
stage's own counters, served once with all its series).  owca-ship renders every
cycle once, for every storage; this endpoint only serves those bytes, so a scrape
costs a memory copy (and a gzip, once per cycle, when the scraper asks for it) and
never waits for the pipeline.
The standard library's threading HTTP server answers concurrent scrapes; the
body is replaced whole when a cycle arrives, so a scrape sees one cycle, never
a mix of two.  prometheus_client's exposition server was measured against it
(benchmarks/prometheus_scrape.py): it renders the families on every scrape and
its gzip negotiation ignores `q=0`; serving bytes rendered once per cycle is
what keeps fifty parallel scrapes prompt.

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
from typing import Optional

from owca.core import frames
from owca.ship.exposition import merge, strip_timestamps
from owca.plugin import CATEGORIES, Cycle, Storage, StorageError

log = logging.getLogger("owca.prometheus")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def accepts_gzip(header: str) -> bool:
    """Whether an Accept-Encoding header accepts gzip (RFC 9110 12.5.3): listed, or
    covered by `*`, with a weight above zero; `gzip;q=0` refuses it."""
    weights = {}
    for item in (header or "").split(","):
        coding, _, params = item.partition(";")
        coding = coding.strip().lower()
        if not coding:
            continue
        weight = 1.0
        for param in params.split(";"):
            key, _, val = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    weight = float(val.strip())
                except ValueError:
                    weight = 0.0
        weights[coding] = weight
    weight = weights.get("gzip", weights.get("x-gzip", weights.get("*", 0.0)))
    return weight > 0


@functools.lru_cache(maxsize=None)
def _http_classes():
    """The HTTP handler and servers, built on first use: http.server and what
    it pulls in cost owca-ship several MB that only this storage needs."""
    import http.server
    import socket
    import sys

    class _Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"   # keep-alive: Prometheus reuses its connection
        server_version = "owca-ship"
        timeout = 30                    # a client that stalls gives its thread back
        server: "_Server"               # which carries the storage it serves

        def do_GET(self):
            self._reply(with_body=True)

        def do_HEAD(self):
            self._reply(with_body=False)

        def _reply(self, with_body: bool):
            storage = self.server.storage
            if self.path.split("?", 1)[0] != storage.path:
                return self._send(404, b"not found; metrics are at " + storage.path.encode() +
                                  b"\n", "text/plain; charset=utf-8", with_body)
            wants_gzip = accepts_gzip(self.headers.get("Accept-Encoding", ""))
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
        # The listen backlog: 5 (the default) refuses a burst of parallel scrapers'
        # connections, and each refused SYN costs its client a second's retransmit.
        request_queue_size = socket.SOMAXCONN
        storage: "PrometheusStorage"    # set by PrometheusStorage.start()

        def handle_error(self, request, client_address):
            # A client that resets or drops its connection is the client's business:
            # one line at debug level, not a traceback on stderr.
            error = sys.exc_info()[1]
            log.debug("scrape from %s failed: %s: %s", client_address[0], type(error).__name__,
                      error)


    class _Server6(_Server):
        address_family = socket.AF_INET6

    return _Handler, _Server, _Server6


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
        host = f"[{self.listen_address}]" if ":" in self.listen_address else self.listen_address
        log.info("prometheus: listening on %s:%d, metrics at http://%s:%d%s",
                 self.listen_address, self.port, host, self.port, self.path)

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
