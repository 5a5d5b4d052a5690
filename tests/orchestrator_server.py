"""What the discovery tests share: a replaying orchestrator, a test CA, cgroup trees.

`ReplayServer` is a real HTTP(S) server on loopback that stands in for a Mesos
agent or a kubelet: it serves the recorded answers (tests/fixtures/mesos_*/,
tests/fixtures/kubelet_*/) over a real socket, optionally TLS with a CA made
for the test run (`make_pki`, the `pki` fixture), and misbehaves on demand:
hangs, answers 500, answers garbage, cuts an answer short, dribbles its answer
(headers included) a byte a second, goes away and comes back on the same port.
`fake_cgroupfs` lays out directories like the v1 or v2 hierarchies for the
existence check (the real hierarchies are the end-to-end test's); `golden`
compares with an expected file, or rewrites it under OWCA_UPDATE_GOLDEN=1
(review the diff).
"""
import http.server
import json
import os
import socket
import ssl
import subprocess
import threading
import time

import pytest

# What the server does with a request, besides replaying the route's answer.
NORMAL, HANG, ERROR_500, GARBAGE, TRUNCATE, CLOSE = (
    "normal", "hang", "500", "garbage", "truncate", "close")
# How long a hung request waits before the server closes it (unless stopped).
HANG_SECONDS = 60
# DRIBBLE: the whole answer, status line and headers first, one byte per this many
# seconds (a peer that each read's timeout never catches).
DRIBBLE = "dribble"
DRIBBLE_SECONDS = 1.0


class ReplayServer:
    """Routes: `"GET /pods"` or `"POST /api/v1 GET_STATE"` -> answer body (bytes or object)."""

    def __init__(self, routes: dict, tls: ssl.SSLContext = None, port: int = 0):
        self.routes = dict(routes)
        self.tls = tls
        self.port = port
        self.mode = NORMAL
        self.hang = set()  # route keys that hang whatever the mode
        self.requests = []  # (method, path, call type, headers) of each request
        # The Authorization header it requires (as an agent with authentication
        # on does): any other answer is 401 with a challenge.
        self.authorization = None
        self.released = threading.Event()
        # Hung requests that waited out their whole hang: a client that gave up on
        # its own deadline leaves this at 0, whatever the machine's load.
        self.hangs_outlasted = 0
        # Dribbled answers sent to their last byte: a client that kept to its
        # deadline hung up before (an answer of ~150 bytes takes minutes).
        self.dribbles_outlasted = 0
        self.connections = set()
        self.httpd = None
        self.thread = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> "ReplayServer":
        self.released.clear()
        self.httpd = _QuietServer(("127.0.0.1", self.port), _handler(self))
        if self.tls is not None:
            self.httpd.socket = self.tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True,
                                       kwargs={"poll_interval": 0.05})
        self.thread.start()
        return self

    def stop(self) -> None:
        """Go away: the port refuses connections until start() again."""
        self.released.set()
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.thread.join(5)
            self.httpd = None
        for connection in list(self.connections):  # kept-alive ones too, as a dying agent
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def answer(self, method: str, path: str, call: str):
        key = f"{method} {path}" + (f" {call}" if call else "")
        body = self.routes.get(key)
        if body is None:
            return 404, b'{"message": "not found"}'
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        return 200, body


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that hangs up (as the tests make it do) is not news


def _handler(server: ReplayServer):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # the test's output stays the test's
            pass

        def setup(self):
            super().setup()
            server.connections.add(self.connection)

        def finish(self):
            server.connections.discard(self.connection)
            super().finish()

        def do_GET(self):
            self._serve(None)

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            try:
                call = json.loads(self.rfile.read(length)).get("type")
            except ValueError:
                call = None
            self._serve(call)

        def _serve(self, call):
            server.requests.append((self.command, self.path, call, dict(self.headers)))
            mode = server.mode
            key = f"{self.command} {self.path}" + (f" {call}" if call else "")
            if mode == HANG or key in server.hang:
                if not server.released.wait(HANG_SECONDS):
                    server.hangs_outlasted += 1
                self.close_connection = True
                return
            if mode == CLOSE:
                self.close_connection = True
                return
            if mode == DRIBBLE:
                self._dribble(*server.answer(self.command, self.path, call))
                return
            if server.authorization is not None \
                    and self.headers.get("Authorization") != server.authorization:
                self.send_response(401, "Unauthorized")
                self.send_header("WWW-Authenticate", 'Basic realm="mesos"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if mode == ERROR_500:
                self._send(500, b'{"message": "internal error"}', "Internal Server Error")
                return
            status, body = server.answer(self.command, self.path, call)
            if mode == GARBAGE:
                body = b'{"items": [{"metadata": {"uid": "a"' + b"\x00\xff<html>"
            if mode == TRUNCATE:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[:len(body) // 2])
                self.wfile.flush()
                self.close_connection = True
                return
            self._send(status, body)

        def _dribble(self, status, body):
            self.close_connection = True
            head = (f"HTTP/1.1 {status} {self.responses[status][0]}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                    f"\r\n").encode()
            for i, byte in enumerate(head + body):
                if i and server.released.wait(DRIBBLE_SECONDS):
                    return
                try:
                    self.connection.sendall(bytes([byte]))
                except OSError:
                    return  # the client gave up
            server.dribbles_outlasted += 1

        def _send(self, status, body, reason=None):
            self.send_response(status, reason)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    return Handler


def make_pki(directory: str) -> dict:
    """A test CA, a server certificate for 127.0.0.1 signed by it, a client
    certificate, and an unrelated CA; made with the openssl CLI (EC keys: fast).
    Returns the paths by name: ca, server_cert, server_key, client_cert,
    client_key, other_ca.
    """
    os.makedirs(directory, exist_ok=True)
    p = {name: os.path.join(directory, name + ".pem") for name in (
        "ca", "ca_key", "server_cert", "server_key", "client_cert", "client_key",
        "other_ca", "other_ca_key")}
    ext = os.path.join(directory, "server.ext")
    with open(ext, "w") as f:
        f.write("subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                "extendedKeyUsage=serverAuth\n")
    client_ext = os.path.join(directory, "client.ext")
    with open(client_ext, "w") as f:
        f.write("extendedKeyUsage=clientAuth\n")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)

    for ca, key, cn in (("ca", "ca_key", "owca test CA"), ("other_ca", "other_ca_key", "other CA")):
        openssl("req", "-x509", *ec, "-keyout", p[key], "-out", p[ca], "-days", "2",
                "-subj", f"/CN={cn}")
    for cert, key, cn, extfile in (("server_cert", "server_key", "127.0.0.1", ext),
                                   ("client_cert", "client_key", "owca-agent", client_ext)):
        csr = os.path.join(directory, cert + ".csr")
        openssl("req", "-new", *ec, "-keyout", p[key], "-out", csr, "-subj", f"/CN={cn}")
        openssl("x509", "-req", "-in", csr, "-CA", p["ca"], "-CAkey", p["ca_key"],
                "-CAcreateserial", "-out", p[cert], "-days", "2", "-extfile", extfile)
    return p


def make_kubelet_serving_cert(directory: str, node: str) -> dict:
    """A kubelet's self-made serving certificate: what a kubelet without
    --tls-cert-file writes to /var/lib/kubelet/pki/kubelet.crt on its first
    start.  A CA named `<node>-ca@<time>` signs a certificate `<node>@<time>`
    whose only name is the node's (DNS:<node>), not 127.0.0.1; kubelet.crt holds
    both, so it serves as the certificate chain and as the ca_bundle.
    Returns the paths: crt (the chain), key.
    """
    os.makedirs(directory, exist_ok=True)
    p = {name: os.path.join(directory, name) for name in (
        "ca.crt", "ca.key", "leaf.crt", "leaf.csr", "kubelet.crt", "kubelet.key", "ext")}
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    stamp = "1714637645"
    with open(p["ext"], "w") as f:
        f.write(f"subjectAltName=DNS:{node}\nextendedKeyUsage=serverAuth\n"
                "keyUsage=digitalSignature,keyEncipherment\n")
    run = [["req", "-x509", *ec, "-keyout", p["ca.key"], "-out", p["ca.crt"], "-days", "2",
            "-subj", f"/CN={node}-ca@{stamp}"],
           ["req", "-new", *ec, "-keyout", p["kubelet.key"], "-out", p["leaf.csr"],
            "-subj", f"/CN={node}@{stamp}"],
           ["x509", "-req", "-in", p["leaf.csr"], "-CA", p["ca.crt"], "-CAkey", p["ca.key"],
            "-CAcreateserial", "-out", p["leaf.crt"], "-days", "2", "-extfile", p["ext"]]]
    for args in run:
        subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)
    with open(p["kubelet.crt"], "w") as out:
        for part in ("leaf.crt", "ca.crt"):
            with open(p[part]) as f:
                out.write(f.read())
    return {"crt": p["kubelet.crt"], "key": p["kubelet.key"]}


def kubelet_tls(cert: dict, server_names: list) -> ssl.SSLContext:
    """A TLS context serving the kubelet's certificate; records the SNI of each handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert["crt"], cert["key"])
    ctx.sni_callback = lambda _sock, name, _ctx: server_names.append(name)
    return ctx


def server_tls(pki: dict, require_client_cert: bool = False) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(pki["server_cert"], pki["server_key"])
    if require_client_cert:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(pki["ca"])
    return ctx


def wait_until(predicate, timeout: float = 10.0, step: float = 0.02):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(step)
    return False


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(str(tmp_path_factory.mktemp("pki")))


def load_json(*path):
    with open(os.path.join(*path)) as f:
        return json.load(f)


def golden(path: str, actual) -> None:
    if os.environ.get("OWCA_UPDATE_GOLDEN"):
        with open(path, "w") as f:
            json.dump(actual, f, indent=2)
            f.write("\n")
    assert actual == load_json(path)


def fake_cgroupfs(root, cgroup_paths, version: str) -> str:
    """Directories laid out like a v1 (cpu, cpuacct, memory) or a v2 hierarchy."""
    if version == "v2":
        os.makedirs(root, exist_ok=True)
        open(os.path.join(root, "cgroup.controllers"), "w").close()
    for p in cgroup_paths:
        parts = p.strip("/").split("/")
        if version == "v2":
            for depth in range(1, len(parts) + 1):  # every v2 cgroup has cgroup.procs
                os.makedirs(os.path.join(root, *parts[:depth]), exist_ok=True)
                open(os.path.join(root, *parts[:depth], "cgroup.procs"), "w").close()
        else:
            for controller in ("cpu", "cpuacct", "memory"):
                os.makedirs(os.path.join(root, controller, *parts), exist_ok=True)
    return str(root)
