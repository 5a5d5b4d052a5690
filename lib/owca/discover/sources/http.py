"""HTTP for the orchestrator sources: bounded, verified, retried requests for JSON.

One cycle of discovery asks an orchestrator one or two questions.  Whatever
the orchestrator does (hangs, answers 500, answers garbage, goes away), the
cycle must end in bounded time with one line that says what went wrong:

- every attempt has a socket timeout (`timeout`, for the connection and for
  each read), and the whole cycle a `deadline`: no attempt starts after it,
  each socket wait is cut to the time left, and at the deadline the sockets of
  the attempt in hand are shut down, so a cycle never takes much longer than
  `deadline`: not even against a peer that sends its headers a byte a second,
  each byte well within `timeout` (a timeout per read alone would let it
  stretch one request to minutes);
- transport errors, timeouts, HTTP 5xx and 429, and malformed or truncated
  bodies are retried `retries` times, after an exponential backoff with jitter
  (so that the nodes of a cluster do not hammer a restarting agent in step),
  as long as the deadline leaves room; other answers (401, 403, 404, a
  redirect, a TLS certificate the CA does not vouch for) are not: they will
  not change on their own;
- TLS is verified by default (`ca_bundle` names the CA file to trust), against
  the url's host or `server_name` (sent as SNI too: a kubelet's serving
  certificate names the node, not 127.0.0.1); `verify: false` adds one
  warning at start and nothing per request;
  credentials (a bearer token re-read from `token_file` on each request, so
  that a rotated token is picked up; a user and `password_file`; a client
  certificate) are refused over plain http;
- a body is read up to `max_response_bytes`, so a runaway answer cannot
  exhaust the agent's memory, and an answer nested deeper than the JSON
  parser goes is a malformed answer, not a crash;
- the files named (secrets, certificates) must be regular files of bounded
  size, checked at start and again before each use: a FIFO would block the
  read (or the TLS library's) for ever, a device or a huge file exhaust
  memory;
- proxies and credentials from the environment (HTTP_PROXY, .netrc) are
  ignored: a node-local API is asked directly, with only the configured
  credentials.

A failed request raises DiscoveryError with one line; the client counts
attempts, failures and retries for the source's metrics.
"""
import base64
import json
import logging
import os
import random
import re
import socket
import stat
import sys
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import List, Optional, Set
from urllib.parse import urlsplit

from owca.core import frames
from owca.core.kernel import read_at_most
from owca.plugin import DiscoveryError

log = logging.getLogger("owca.http")

READ_CHUNK = 64 * 1024
# The most a token or password file may hold (a service account token is ~1 KiB).
MAX_SECRET_BYTES = 64 * 1024
# The most a CA bundle, client certificate or key may hold (a system's whole
# CA bundle is ~250 KiB).
MAX_CERTIFICATE_BYTES = 16 * 1024 * 1024
CERTIFICATE_FILES = ("ca_bundle", "client_cert", "client_key")
SECRET_FILES = ("token_file", "password_file")
_HOST_NAME = re.compile(r"(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                        r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?\Z")


@dataclass
class HttpOptions:
    """The HTTP options both orchestrator sources take (docs/discovery.md)."""
    url: str = "http://127.0.0.1"
    # Seconds a connection or one read may wait.
    timeout: float = 5.0
    # Seconds one cycle's requests may take in all, retries included.
    deadline: float = 10.0
    retries: int = 3
    # First backoff in seconds; doubled on each retry, up to backoff_max.
    backoff: float = 0.2
    backoff_max: float = 2.0
    # CA certificates (PEM) to verify the server with; default: the system's.
    ca_bundle: Optional[str] = None
    # false turns TLS verification off (logged at start): for tests only.
    verify: bool = True
    # The name the server's certificate must carry, sent as SNI, when it is not
    # the url's host (a kubelet's certificate names its node: url
    # https://127.0.0.1:10250 with server_name: <node name>).
    server_name: Optional[str] = None
    client_cert: Optional[str] = None
    client_key: Optional[str] = None
    # Bearer token, re-read on every request.
    token_file: Optional[str] = None
    # HTTP basic credentials: the user, and a file holding the password.
    username: Optional[str] = None
    password_file: Optional[str] = None
    max_response_bytes: int = 64 * 1024 * 1024

    def __post_init__(self):
        check_http_options(self)


def check_http_options(o: HttpOptions) -> None:
    """Refuse, at start, options that cannot work or would leak credentials."""
    parts = urlsplit(o.url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"url: expected http(s)://host[:port][/prefix], got {o.url!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ValueError("url: no query, fragment or credentials in the url "
                         "(use token_file or username and password_file)")
    for name in ("timeout", "deadline", "backoff", "backoff_max"):
        if not getattr(o, name) > 0:
            raise ValueError(f"{name}: expected a positive number of seconds")
    if o.retries < 0:
        raise ValueError("retries: expected 0 or more")
    if o.max_response_bytes < 1024:
        raise ValueError("max_response_bytes: expected 1024 or more")
    if o.token_file and o.username:
        raise ValueError("give either token_file or username, not both")
    if bool(o.username) != bool(o.password_file):
        raise ValueError("username and password_file go together")
    if o.client_key and not o.client_cert:
        raise ValueError("client_key needs client_cert")
    if o.ca_bundle and not o.verify:
        raise ValueError("ca_bundle with verify: false: choose one")
    if o.server_name is not None:
        if parts.scheme != "https":
            raise ValueError("server_name: only with an https url")
        if not _HOST_NAME.match(o.server_name):
            raise ValueError(f"server_name: expected a DNS name, got {o.server_name!r:.80}")
    credentials = o.token_file or o.username or o.client_cert
    if credentials and parts.scheme != "https":
        raise ValueError(f"credentials would cross the network in clear: use an https url, "
                         f"not {o.url!r}")
    for name in CERTIFICATE_FILES + SECRET_FILES:
        path = getattr(o, name)
        if path is not None:
            check_file(path, name)
            if not os.access(path, os.R_OK):
                raise ValueError(f"{name}: cannot read {path!r}")
    if o.ca_bundle:
        _check_ca_bundle(o.ca_bundle)


class FileProblem(ValueError):
    """A file option that names no usable file; the message says which and why."""


def check_file(path: str, option: str) -> os.stat_result:
    """The file's status, when it is a regular file of at most its option's size.

    Looked at, not opened: opening a FIFO waits for a writer, and opening some
    devices does something.
    """
    try:
        status = os.stat(path)
    except OSError as e:
        raise FileProblem(f"{option}: cannot read {path!r}: {e.strerror}") from None
    return _checked_status(status, path, option)


def _checked_status(status: os.stat_result, path: str, option: str) -> os.stat_result:
    if not stat.S_ISREG(status.st_mode):
        raise FileProblem(f"{option}: {path} is not a regular file")
    limit = MAX_SECRET_BYTES if option in SECRET_FILES else MAX_CERTIFICATE_BYTES
    if status.st_size > limit:
        raise FileProblem(f"{option}: {path} is larger than {limit} bytes")
    return status


def read_small_file(path: str, option: str) -> bytes:
    """The content of a file that check_file accepts, read without ever blocking.

    Checked again on the open descriptor (O_NONBLOCK: a FIFO swapped in since
    the check does not block the open), and read up to the limit only (a file
    that grew since is refused, not read whole).
    """
    check_file(path, option)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as e:
        raise FileProblem(f"{option}: cannot read {path!r}: {e.strerror}") from None
    try:
        _checked_status(os.fstat(fd), path, option)
        limit = MAX_SECRET_BYTES if option in SECRET_FILES else MAX_CERTIFICATE_BYTES
        data = read_at_most(fd, limit)
    except OSError as e:
        raise FileProblem(f"{option}: cannot read {path!r}: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise FileProblem(f"{option}: {path} is larger than {limit} bytes")
    return data


def _check_ca_bundle(path: str) -> None:
    """A CA bundle the TLS library can load: PEM certificates, not any readable file."""
    import ssl  # OpenSSL: only for a configuration that names a CA bundle
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        context.load_verify_locations(cadata=read_small_file(path, "ca_bundle").decode(
            "ascii", "replace"))
    except ssl.SSLError as e:
        raise FileProblem(f"ca_bundle: {path} holds no PEM certificate OpenSSL can load "
                          f"({e.reason or e})") from None


class _Retry(Exception):
    """A failure that may pass: try again if the deadline allows."""


class _Fail(Exception):
    """A failure that will not pass by itself."""


class HttpClient:
    """Requests to one orchestrator endpoint, with the policy above."""

    def __init__(self, options: HttpOptions, source: str):
        self.options = options
        self.source = source
        self.base = options.url.rstrip("/")
        # Imported here: requests (and OpenSSL with it) costs ~20 MB, which
        # owca-discover with a local source does not need.
        import requests
        import urllib3
        self.requests, self.urllib3 = requests, urllib3
        self.session = requests.Session()
        self.session.trust_env = False
        self.session.verify = options.ca_bundle or options.verify
        self.cutter = _Cutter()
        self.session.mount(self.base.split("://", 1)[0] + "://",
                           _transport(requests, urllib3, self.cutter, options.server_name))
        if options.client_cert:
            self.session.cert = (options.client_cert, options.client_key) \
                if options.client_key else options.client_cert
        if not options.verify:
            log.warning("%s: TLS verification is off: the answers of %s are not authenticated",
                        source, options.url)
        self.random = random.Random()
        self.attempts = 0
        self.failures = 0
        self.retries = 0
        self.last_duration: Optional[float] = None

    def deadline(self) -> float:
        """The monotonic time at which this cycle's requests must stop."""
        return time.monotonic() + self.options.deadline

    def get_json(self, path: str, until: float):
        return self.request_json("GET", path, None, until)

    def post_json(self, path: str, body: dict, until: float):
        return self.request_json("POST", path, body, until)

    def request_json(self, method: str, path: str, body, until: float):
        """The decoded JSON answer, or DiscoveryError after the retries."""
        url = self.base + path
        what = f"{method} {url}" + (f" {body['type']}" if isinstance(body, dict)
                                    and "type" in body else "")
        started = time.monotonic()
        attempt = 0
        reason: Optional[_Retry] = None
        while True:
            attempt += 1
            left = until - time.monotonic()
            if left <= 0:
                if reason is None:
                    self.attempts += 1
                    self.failures += 1
                    raise DiscoveryError(f"{what}: deadline reached before the request")
                # The backoff ran into the deadline: the cause worth reporting is
                # the failure that made it wait, not the deadline itself.
                raise self._gave_up(what, reason, attempt - 1, started)
            self.attempts += 1
            if attempt > 1:
                self.retries += 1
            try:
                answer = self._attempt(method, url, body, until, left)
            except _Fail as e:
                self.failures += 1
                raise DiscoveryError(f"{what}: {e}") from None
            except _Retry as e:
                self.failures += 1
                delay = self._backoff(attempt)
                left = until - time.monotonic()
                if attempt > self.options.retries or delay >= left:
                    raise self._gave_up(what, e, attempt, started) from None
                log.debug("%s: %s; retrying in %.2f s", what, e, delay)
                reason = e
                time.sleep(delay)
                continue
            self.last_duration = time.monotonic() - started
            return answer

    @staticmethod
    def _gave_up(what: str, reason: "_Retry", attempts: int, started: float) -> DiscoveryError:
        return DiscoveryError(f"{what}: {reason} ({attempts} attempt"
                              f"{'s' if attempts > 1 else ''} in "
                              f"{time.monotonic() - started:.1f} s)")

    def _backoff(self, attempt: int) -> float:
        # Half fixed, half random: spread out, but never a zero wait.
        ceiling = min(self.options.backoff_max, self.options.backoff * 2 ** (attempt - 1))
        return ceiling / 2 + self.random.uniform(0, ceiling / 2)

    def _headers(self) -> dict:
        headers = {"Accept": "application/json", "Accept-Encoding": "identity"}
        o = self.options
        if o.token_file:
            token = _read_secret(o.token_file, "token_file")
            headers["Authorization"] = f"Bearer {token}"
        elif o.username:
            assert o.password_file, "check_http_options: they go together"
            password = _read_secret(o.password_file, "password_file")
            pair = f"{o.username}:{password}".encode("utf-8")
            headers["Authorization"] = "Basic " + base64.b64encode(pair).decode("ascii")
        return headers

    def _attempt(self, method: str, url: str, body, until: float, left: float):
        for name in CERTIFICATE_FILES:  # the TLS library reads them on each connection
            path = getattr(self.options, name)
            if path is not None:
                try:
                    check_file(path, name)
                except FileProblem as e:
                    raise _Fail(str(e)) from None
        # Each socket wait is bounded by `timeout`, the attempt by the deadline:
        # at the deadline its sockets are shut down, whatever the peer dribbles.
        cut = threading.Event()
        watchdog = threading.Timer(left, self.cutter.cut, (cut,))
        watchdog.daemon = True
        watchdog.start()
        try:
            return self._exchange(method, url, body, until, left, cut)
        finally:
            watchdog.cancel()

    def _exchange(self, method: str, url: str, body, until: float, left: float,
                  cut: threading.Event):
        timeout = min(self.options.timeout, left)
        try:
            with warnings.catch_warnings():
                if not self.options.verify:
                    # Said once at start; urllib3 would add a multi-line
                    # warning on each request.  This request's only.
                    warnings.simplefilter("ignore",
                                          self.urllib3.exceptions.InsecureRequestWarning)
                response = self.session.request(
                    method, url, json=body, headers=self._headers(), stream=True,
                    timeout=(timeout, timeout), allow_redirects=False)
        except self.requests.exceptions.RequestException as e:
            if cut.is_set() or (isinstance(e, self.requests.exceptions.Timeout)
                                and timeout < self.options.timeout):
                raise _Retry(f"no answer before the deadline ({self.options.deadline:g} s)") \
                    from None
            if isinstance(e, self.requests.exceptions.Timeout):
                raise _Retry(f"no answer within {timeout:g} s") from None
            reason = short_reason(e)
            if reason.startswith("TLS") and "CERTIFICATE" in reason.upper():
                raise _Fail(reason) from None  # a certificate does not fix itself
            raise _Retry(reason) from None
        with response:
            status = response.status_code
            if status >= 500 or status == 429:
                raise _Retry(f"HTTP {status} {response.reason}")
            if 300 <= status < 400:
                raise _Fail(f"HTTP {status} redirect to {response.headers.get('Location')!r:.100}"
                            f" not followed")
            if status != 200:
                raise _Fail(f"HTTP {status} {response.reason}")
            data = self._read_body(response, until, cut)
        try:
            return json.loads(data, parse_constant=_no_constants)
        except ValueError as e:
            raise _Retry(f"malformed JSON in a {len(data)}-byte answer: {e}") from None
        except RecursionError:
            # The parser recurses once per level: its bound, not the answer, decides.
            raise _Retry(f"malformed JSON in a {len(data)}-byte answer: nested too deep "
                         f"for the parser (its limit: {sys.getrecursionlimit()} levels)") \
                from None

    def _read_body(self, response, until: float, cut: threading.Event) -> bytes:
        limit = self.options.max_response_bytes
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _Fail(f"answer of {declared} bytes exceeds max_response_bytes ({limit})")
        chunks, size = [], 0
        try:
            while True:
                if time.monotonic() >= until:
                    raise _Retry(f"answer still incomplete at the deadline ({size} bytes read)")
                chunk = response.raw.read1(READ_CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > limit:
                    raise _Fail(f"answer exceeds max_response_bytes ({limit})")
                chunks.append(chunk)
        except (self.urllib3.exceptions.HTTPError, self.requests.exceptions.RequestException,
                OSError) as e:
            if cut.is_set():
                raise _Retry(f"answer still incomplete at the deadline ({size} bytes read)") \
                    from None
            raise _Retry(f"answer cut after {size} bytes: {short_reason(e)}") from None
        if cut.is_set():  # the end of the data may be the shutdown's
            raise _Retry(f"answer still incomplete at the deadline ({size} bytes read)")
        return b"".join(chunks)

    def samples(self) -> list:
        labels = {"source": self.source}
        out = [
            frames.sample("owca_orchestrator_requests_total", self.attempts, labels, "counter"),
            frames.sample("owca_orchestrator_request_failures_total", self.failures, labels,
                          "counter"),
            frames.sample("owca_orchestrator_retries_total", self.retries, labels, "counter"),
        ]
        if self.last_duration is not None:
            out.append(frames.sample("owca_orchestrator_request_duration_seconds",
                                     round(self.last_duration, 6), labels))
        return out


class _Cutter:
    """The sockets of one client's connections, shut down at an attempt's deadline.

    A shutdown wakes a recv blocked in another thread at once (it returns end
    of file), where closing the socket would not.  The client's attempts run
    one at a time, so every socket it holds is the attempt's or an idle one,
    which the pool replaces when it finds it shut.
    """

    def __init__(self):
        self.lock = threading.Lock()
        self.sockets: "weakref.WeakSet[socket.socket]" = weakref.WeakSet()

    def track(self, sock: socket.socket) -> None:
        with self.lock:
            self.sockets.add(sock)

    def cut(self, fired: threading.Event) -> None:
        fired.set()
        with self.lock:
            sockets = list(self.sockets)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed meanwhile, or never connected


def _transport(requests, urllib3, cutter: _Cutter, server_name: Optional[str]):
    """An adapter whose connections' sockets `cutter` can shut down (the TLS
    handshake's included); with `server_name`, it sends that name as SNI and
    verifies the certificate for it."""
    class Tracked:
        def _new_conn(self):
            sock = super()._new_conn()  # type: ignore[misc]
            cutter.track(sock)
            return sock

    class Connection(Tracked, urllib3.connection.HTTPConnection):
        pass

    class TLSConnection(Tracked, urllib3.connection.HTTPSConnection):
        pass

    class Pool(urllib3.HTTPConnectionPool):
        ConnectionCls = Connection

    class TLSPool(urllib3.HTTPSConnectionPool):
        ConnectionCls = TLSConnection

    class Adapter(requests.adapters.HTTPAdapter):
        def init_poolmanager(self, *args, **kwargs):
            if server_name:
                kwargs["server_hostname"] = server_name
            super().init_poolmanager(*args, **kwargs)
            self.poolmanager.pool_classes_by_scheme = {"http": Pool, "https": TLSPool}
    return Adapter()


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def _read_secret(path: str, option: str) -> str:
    try:
        secret = read_small_file(path, option).decode("utf-8").strip()
    except FileProblem as e:
        raise DiscoveryError(str(e)) from None
    except UnicodeDecodeError as e:
        raise DiscoveryError(f"{option}: cannot read {path}: {e}") from None
    if not secret or any(c in secret for c in "\r\n\0"):
        raise DiscoveryError(f"{option}: {path} holds no usable secret (empty, or more "
                             f"than one line)")
    return secret


def short_reason(error: BaseException) -> str:
    """The root cause of a requests/urllib3 error, in a few words.

    Their messages nest the whole chain (`HTTPConnectionPool(host=...): Max
    retries exceeded ... (Caused by NewConnectionError(...: [Errno 111]
    Connection refused'))`); the operator needs the last link.
    """
    import http.client  # both load OpenSSL: only when there is an error to explain
    import ssl
    seen: Set[int] = set()
    todo: List[Optional[BaseException]] = [error]
    while todo:
        e = todo.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ssl.SSLCertVerificationError):
            return f"TLS certificate verify failed: {e.verify_message}"
        if isinstance(e, ssl.SSLError):
            return f"TLS error: {e.reason or e}"
        if isinstance(e, http.client.IncompleteRead):
            return "the connection closed before the end of the answer"
        if isinstance(e, http.client.RemoteDisconnected):
            return "the connection closed without an answer"
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        todo.extend([getattr(e, "reason", None), e.__cause__, e.__context__])
        todo.extend(a for a in e.args if isinstance(a, BaseException))
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text[:200]
