"""The node's headroom as extended resources on its Kubernetes Node (docs/headroom.md).

`!KubernetesNodeStatusStorage` reads `headroom_cpu_cores` and `headroom_memory_bytes`
out of each allocations cycle (owca-allocate's `headroom:` puts them there) and PATCHes
`/api/v1/nodes/<node_name>/status` so that `status.capacity` and `status.allocatable`
carry them under configurable resource names: CPU in milli-cores (`owca.io/be-cpu:
"1500"`), memory in bytes, both whole numbers as extended resources must be.

What the API server answers never reaches the pipeline: store() only notes the
latest value; a thread of its own sends the PATCH, bounded by `timeout`, and
- sends only when a value moved by more than its step (or to or from zero), at most
  once per `min_interval` seconds, and again every `resync` seconds (the kubelet may
  have rewritten the status);
- after a 429 (or 503) waits what its Retry-After says; after a 409 tries again at the
  next cycle; after any other failure (401, 403, 404, 415, 422, 5xx, no answer) backs
  off, doubling from `min_interval` up to `max_backoff`; each failure is one log line
  (repeats of the same failure are not logged again until a PATCH succeeds) and a count
  in `owca_ship_node_status_patches_total{result}`;
- publishes zero when no headroom came for `stale_after` seconds (owca-allocate or the
  stages before it stopped), and says so in the log.

The credentials are the node's: a bearer token file (a service account's, or any the
node holds) re-read on every request, or a client certificate (the kubelet's), over
TLS verified against `ca_bundle` (or the system's CAs); never over plain http.
"""
import json
import logging
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple
from urllib.parse import quote, urlsplit

from owca.core import frames
from owca.core.kernel import read_at_most
from owca.plugin import Cycle, Storage

log = logging.getLogger("owca.ship.kubernetes_node")

MERGE_PATCH = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
MAX_SECRET_BYTES = 64 * 1024
MAX_ANSWER_BYTES = 1024 * 1024
# A resource name as the API validates it: an optional DNS-subdomain prefix and a name.
_RESOURCE = re.compile(r"(?=.{1,316}\Z)([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?"
                       r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?\Z")
_NODE_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?\Z")


def _gauge(text: str, name: str) -> Optional[float]:
    """The value of the unlabelled-but-host series `name` in an exposition block."""
    m = re.search(rf"^{name}(?:{{[^}}\n]*}})? (\S+)", text, re.M)
    if not m:
        return None
    try:
        value = float(m.group(1))
    except ValueError:
        return None
    return value if math.isfinite(value) else None


class PatchFailed(Exception):
    def __init__(self, result: str, message: str, retry_after: Optional[float] = None):
        super().__init__(message)
        self.result = result
        self.retry_after = retry_after


@dataclass(kw_only=True)
class KubernetesNodeStatusStorage(Storage):
    categories: List[str] = field(default_factory=lambda: ["allocations"])
    # The API server, as a pod or a kubelet reaches it.
    url: str = "https://kubernetes.default.svc"
    # The Node's name; default: the frames' host.
    node_name: Optional[str] = None
    token_file: Optional[str] = None
    ca_bundle: Optional[str] = None
    client_cert: Optional[str] = None
    client_key: Optional[str] = None
    verify: bool = True
    timeout: float = 5.0
    patch_type: str = "merge"          # merge (RFC 7386) or json (RFC 6902)
    cpu_resource: str = "owca.io/be-cpu"
    memory_resource: str = "owca.io/be-memory"
    cpu_step_cores: float = 0.25
    memory_step_bytes: float = 256 * 2 ** 20
    min_interval: float = 30.0
    resync: float = 300.0
    max_backoff: float = 600.0
    stale_after: float = 120.0
    # When owca-ship stops, zero is published (one PATCH, bounded by timeout): the
    # headroom is OWCA's promise, and nobody keeps it once OWCA is gone.
    zero_on_stop: bool = True

    def __post_init__(self):
        super().__post_init__()
        parts = urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query:
            raise ValueError(f"url: expected http(s)://host[:port], got {self.url!r}")
        if (self.token_file or self.client_cert) and parts.scheme != "https":
            raise ValueError("credentials would cross the network in clear: use an https url")
        if self.client_key and not self.client_cert:
            raise ValueError("client_key needs client_cert")
        if self.ca_bundle and not self.verify:
            raise ValueError("ca_bundle with verify: false: choose one")
        for name in ("token_file", "ca_bundle", "client_cert", "client_key"):
            path = getattr(self, name)
            if path is not None and not os.path.isfile(path):
                raise ValueError(f"{name}: {path} is not a readable regular file")
        if self.node_name is not None and not _NODE_NAME.match(self.node_name):
            raise ValueError(f"node_name: {self.node_name!r} is not a node name")
        for name in ("cpu_resource", "memory_resource"):
            value = getattr(self, name)
            if not _RESOURCE.match(value) or "/" not in value or \
                    value.split("/")[0].endswith("kubernetes.io"):
                raise ValueError(f"{name}: {value!r} is not an extended resource name "
                                 f"(domain/name, outside kubernetes.io)")
        if self.patch_type not in ("merge", "json"):
            raise ValueError("patch_type: merge or json")
        for name in ("timeout", "min_interval", "resync", "max_backoff", "stale_after"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: a positive number of seconds")
        if self.cpu_step_cores < 0 or self.memory_step_bytes < 0:
            raise ValueError("cpu_step_cores, memory_step_bytes: not negative")
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._session = None
        self._latest: Optional[Tuple[float, float]] = None   # cores, bytes
        self._seen_at: Optional[float] = None                 # monotonic
        self._started_at = time.monotonic()
        self._host: Optional[str] = None
        self._published: Optional[Tuple[int, int]] = None    # milli-cores, bytes
        self._published_at = -math.inf
        self._not_before = -math.inf
        self._failures = 0
        self._last_failure: Optional[str] = None
        self._stale_said = False
        self.results: Dict[str, int] = {}

    # -- the storage interface ---------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kubernetes-node-status",
                                        daemon=True)
        self._thread.start()

    def store(self, cycle: Cycle) -> None:
        cpu = _gauge(cycle.text, "headroom_cpu_cores")
        memory = _gauge(cycle.text, "headroom_memory_bytes")
        if cpu is None or memory is None:
            return
        with self._lock:
            self._latest = (max(0.0, cpu), max(0.0, memory))
            self._seen_at = time.monotonic()
            self._host = cycle.host
        self._wake.set()

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(self.timeout + 1)
            if self._thread.is_alive():
                return   # a PATCH still in flight: it was bounded by timeout, let it be
        if self.zero_on_stop and self._published not in (None, (0, 0)):
            self._not_before = -math.inf
            with self._lock:
                self._latest, self._seen_at = (0.0, 0.0), time.monotonic()
            if self.sync() == "ok":
                log.info("%s: headroom set to zero as owca-ship stops", self._node())

    def samples(self) -> list:
        out = [frames.sample("owca_ship_node_status_patches_total", n,
                             {"storage": type(self).__name__, "result": result}, "counter")
               for result, n in sorted(self.results.items())]
        if self._published is not None:
            for resource, value in zip((self.cpu_resource, self.memory_resource),
                                       self._published, strict=True):
                out.append(frames.sample("owca_ship_node_status_published", value,
                                         {"storage": type(self).__name__,
                                          "resource": resource}))
        return out

    # -- deciding and sending ----------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(1.0)
            self._wake.clear()
            if not self._stop.is_set():
                self.sync()

    def wanted(self, now: float) -> Optional[Tuple[int, int]]:
        """(milli-cores, bytes) to publish now: the latest headroom, zero when none came
        for stale_after, None before the first."""
        with self._lock:
            latest, seen = self._latest, self._seen_at
        since = seen if seen is not None else self._started_at
        if now - since > self.stale_after:
            if not self._stale_said:
                log.warning("no headroom for %.0f s: publishing zero", now - since)
                self._stale_said = True
            return 0, 0
        self._stale_said = False
        if latest is None:
            return None
        return int(latest[0] * 1000), int(latest[1])

    def due(self, wanted: Tuple[int, int], now: float) -> bool:
        if now < self._not_before:
            return False
        if self._published is None or now - self._published_at >= self.resync:
            return True
        (cpu, memory), (old_cpu, old_memory) = wanted, self._published
        if (cpu == 0) != (old_cpu == 0) or (memory == 0) != (old_memory == 0):
            return True
        return abs(cpu - old_cpu) > self.cpu_step_cores * 1000 or \
            abs(memory - old_memory) > self.memory_step_bytes

    def sync(self, now: Optional[float] = None) -> Optional[str]:
        """One decision, and the PATCH it calls for: the result, or None when none was
        sent.  Never raises for what the API server does."""
        now = time.monotonic() if now is None else now
        wanted = self.wanted(now)
        if wanted is None or not self.due(wanted, now):
            return None
        try:
            self._patch(wanted)
        except PatchFailed as e:
            self._failed(e, now)
            return e.result
        except Exception as e:  # noqa: BLE001 a bug or a library's surprise: logged, backed off
            self._failed(PatchFailed("error", f"{type(e).__name__}: {e}"), now)
            return "error"
        self.results["ok"] = self.results.get("ok", 0) + 1
        if self._last_failure is not None:
            log.info("%s: the Node's status takes the headroom again", self._node())
        self._published, self._published_at = wanted, now
        self._not_before = now + self.min_interval
        self._failures, self._last_failure = 0, None
        return "ok"

    def _failed(self, e: PatchFailed, now: float) -> None:
        self.results[e.result] = self.results.get(e.result, 0) + 1
        self._failures += 1
        if e.result == "409":
            wait = 0.0                       # a conflict passes: the next cycle tries again
        elif e.retry_after is not None:
            wait = e.retry_after
        else:
            wait = min(self.max_backoff, self.min_interval * 2 ** (self._failures - 1))
        self._not_before = now + wait
        if e.result != self._last_failure:
            log.error("%s: node status not updated: %s (next try in %.0f s; repeats of this "
                      "failure are not logged)", self._node(), e, wait)
        self._last_failure = e.result

    def _node(self) -> str:
        return self.node_name or (self._host or "")

    def body(self, wanted: Tuple[int, int]):
        values = {self.cpu_resource: str(wanted[0]), self.memory_resource: str(wanted[1])}
        if self.patch_type == "merge":
            return {"status": {"capacity": values, "allocatable": values}}
        # JSON Pointer (RFC 6901): `~` and `/` in a name as `~0` and `~1`.
        return [{"op": "add", "value": value,
                 "path": f"/status/{part}/" + name.replace("~", "~0").replace("/", "~1")}
                for part in ("capacity", "allocatable") for name, value in values.items()]

    def _patch(self, wanted: Tuple[int, int]) -> None:
        node = self._node()
        if not _NODE_NAME.match(node):
            raise PatchFailed("no_node", f"{node!r} is not a node name: set node_name")
        import requests   # loaded only by a configuration that names this storage
        if self._session is None:
            session = requests.Session()
            session.trust_env = False          # no proxy or .netrc: the configured server only
            session.verify = self.ca_bundle or self.verify
            if self.client_cert:
                session.cert = (self.client_cert, self.client_key) if self.client_key \
                    else self.client_cert
            self._session = session
        headers = {"Accept": "application/json",
                   "Content-Type": MERGE_PATCH if self.patch_type == "merge" else JSON_PATCH}
        if self.token_file:
            headers["Authorization"] = "Bearer " + _read_token(self.token_file)
        url = f"{self.url.rstrip('/')}/api/v1/nodes/{quote(node, safe='')}/status"
        try:
            response = self._session.patch(
                url, data=json.dumps(self.body(wanted), separators=(",", ":")).encode(),
                headers=headers, timeout=(self.timeout, self.timeout), allow_redirects=False,
                stream=True)
        except requests.exceptions.RequestException as e:
            raise PatchFailed("no_answer", f"PATCH {url}: {_short(e)}") from None
        with response:
            if response.status_code == 200:
                return
            raw = read_at_most_response(response)
            message = response.reason
            try:
                status = json.loads(raw)
                if isinstance(status, dict) and isinstance(status.get("message"), str):
                    message = status["message"][:300]
            except ValueError:
                pass
            retry_after = None
            if response.status_code in (429, 503):
                retry_after = _retry_after(response.headers.get("Retry-After"))
            raise PatchFailed(str(response.status_code),
                              f"PATCH {url}: HTTP {response.status_code}: {message}",
                              retry_after)


def read_at_most_response(response) -> bytes:
    try:
        return response.raw.read(MAX_ANSWER_BYTES) or b""
    except Exception:  # noqa: BLE001 the body only explains the status
        return b""


def _read_token(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise PatchFailed("token", f"token_file: cannot read {path}: {e.strerror}") from None
    try:
        data = read_at_most(fd, MAX_SECRET_BYTES)
    except OSError as e:
        raise PatchFailed("token", f"token_file: cannot read {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    token = data.decode("utf-8", "replace").strip()
    if not token or len(data) > MAX_SECRET_BYTES or any(c in token for c in "\r\n\0"):
        raise PatchFailed("token", f"token_file: {path} holds no usable token")
    return token


def _retry_after(value: Optional[str]) -> Optional[float]:
    """Retry-After in seconds (RFC 9110 10.2.3: delay-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - time.time())


def _short(e: Optional[BaseException]) -> str:
    """The last link of a requests error's chain, in a few words."""
    import ssl
    first = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ssl.SSLError):
            return f"TLS error: {getattr(e, 'verify_message', None) or e.reason or e}"
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        nested = [a for a in getattr(e, "args", ()) if isinstance(a, BaseException)]
        e = getattr(e, "reason", None) or e.__cause__ or e.__context__ or \
            (nested[0] if nested else None)
    return first
