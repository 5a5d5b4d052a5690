#!/usr/bin/env python3
"""A small HTTP service that publishes its latency as a Prometheus histogram, the way
production services do: the lab's HP whose SLI owca-measure's sli source reads from the
service itself (docs/control.md, "Service levels a service already publishes").

GET / answers a 4 KiB page; each request's time in the service, from its request line
read to its answer flushed, is observed in `http_request_duration_seconds` (a classic
histogram with buckets 10 % apart, so that a quantile interpolated inside one is within
a few percent).  The metrics are served on their own port (--metrics-port), so that the
load generator's requests are the only ones in the histogram.

Usage: histogram_service.py --port PORT --metrics-port PORT [--bind ADDR]
Needs prometheus_client (Debian's python3-prometheus-client).
"""
import argparse
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import Histogram, start_http_server

BUCKETS = [25e-6 * 1.1 ** i for i in range(100)]   # 25 us .. 0.3 s, then +Inf
LATENCY = Histogram("http_request_duration_seconds", "Time in the service per request.",
                    ["handler"], buckets=BUCKETS)
PAGE = b"x" * 4096


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"   # keep-alive, as wrk's connections expect

    def parse_request(self):
        self.started = time.perf_counter()
        return super().parse_request()

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)
        self.wfile.flush()
        LATENCY.labels(handler="/").observe(time.perf_counter() - self.started)

    def log_message(self, *args):
        pass


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--bind", default="127.0.0.1")
    args = parser.parse_args()
    LATENCY.labels(handler="/")   # exposed from the start, with zero counts
    start_http_server(args.metrics_port, addr=args.bind)
    server = ThreadingHTTPServer((args.bind, args.port), Handler)
    server.daemon_threads = True
    server.serve_forever()


if __name__ == "__main__":
    main()
