"""A Kubernetes API server's answers to `PATCH /api/v1/nodes/NAME/status`, on loopback.

A real HTTP(S) server holding recorded Node objects (tests/fixtures/kubeapi_nodes/)
that answers as the API documents (API conventions, "HTTP Status codes" and "Response
Status Kind"; the PATCH operation's media types):

- 415 UnsupportedMediaType unless the body is application/json-patch+json,
  application/merge-patch+json or application/strategic-merge-patch+json;
- 401 Unauthorized without a known bearer token; 403 Forbidden when the token's user
  is a node (system:node:NAME) patching another node's status, as the node authorizer
  and NodeRestriction allow a kubelet only its own Node;
- 404 NotFound for a node it does not hold;
- 409 Conflict when a merge patch names a metadata.resourceVersion that is not the
  node's (the optimistic-concurrency precondition);
- 422 Invalid for an extended resource whose quantity is not a non-negative integer;
- 200 with the whole patched Node otherwise: RFC 7386 merge, or RFC 6902 add/replace/
  remove with JSON Pointer escapes (`~1` for `/`), and a new resourceVersion;
- on demand (`answers`, consumed first): any status with its headers, such as 429 with
  Retry-After (API Priority and Fairness) or 500/503.

Every error body is a Status object.  What it cannot cover: the real server's
strategic merge (answered as a merge patch here), admission plug-ins other than the node
restriction, the kubelet rewriting its own status meanwhile, HTTP/2, and watch caches.
"""
import copy
import http.server
import json
import re
import threading
from typing import Dict, List, Optional, Tuple

PATCH_TYPES = ("application/json-patch+json", "application/merge-patch+json",
               "application/strategic-merge-patch+json")
_PATH = re.compile(r"/api/v1/nodes/([^/]+)/status\Z")
_INTEGER = re.compile(r"[0-9]+\Z")


def status(code: int, reason: str, message: str, details=None) -> dict:
    out = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code}
    if details is not None:
        out["details"] = details
    return out


def merge(target, patch):
    """RFC 7386."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge(out.get(k), v)
    return out


def json_patch(doc, ops):
    """RFC 6902 add, replace, remove (what a node status PATCH needs)."""
    doc = copy.deepcopy(doc)
    for op in ops:
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"].split("/")[1:]]
        parent = doc
        for p in parts[:-1]:
            parent = parent[p]
        if op["op"] in ("add", "replace"):
            if op["op"] == "replace" and parts[-1] not in parent:
                raise KeyError(op["path"])
            parent[parts[-1]] = op["value"]
        elif op["op"] == "remove":
            del parent[parts[-1]]
        else:
            raise KeyError(op["op"])
    return doc


class KubeApiServer:
    def __init__(self, nodes: List[dict], tokens: Dict[str, str], tls=None):
        """`tokens`: bearer token -> user (`system:node:NAME`, or `admin`)."""
        self.nodes = {n["metadata"]["name"]: copy.deepcopy(n) for n in nodes}
        self.tokens = dict(tokens)
        self.tls = tls
        self.answers: List[Tuple[int, dict]] = []   # (status, headers) to give first
        self.requests: List[dict] = []
        self.lock = threading.Lock()
        self.httpd = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.httpd.server_address[1]}"

    def start(self) -> "KubeApiServer":
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.httpd.daemon_threads = True
        if self.tls is not None:
            self.httpd.socket = self.tls.wrap_socket(self.httpd.socket, server_side=True)
        threading.Thread(target=self.httpd.serve_forever, daemon=True,
                         kwargs={"poll_interval": 0.05}).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, method: str, path: str, headers, body: bytes) -> Tuple[int, dict, dict]:
        with self.lock:
            self.requests.append({"method": method, "path": path, "headers": dict(headers),
                                  "body": body})
            if self.answers:
                code, extra = self.answers.pop(0)
                return code, extra, status(code, http.HTTPStatus(code).phrase.replace(" ", ""),
                                           http.HTTPStatus(code).phrase)
            return self._patch(method, path, headers, body)

    def _patch(self, method, path, headers, body) -> Tuple[int, dict, dict]:
        auth = headers.get("Authorization", "")
        user = self.tokens.get(auth[len("Bearer "):]) if auth.startswith("Bearer ") else None
        if user is None:
            return 401, {}, status(401, "Unauthorized", "Unauthorized")
        m = _PATH.match(path)
        if method != "PATCH" or not m:
            return 404, {}, status(404, "NotFound", "the server could not find the requested "
                                                    "resource")
        name = m.group(1)
        if user.startswith("system:node:") and user != f"system:node:{name}":
            return 403, {}, status(403, "Forbidden", f'nodes "{name}" is forbidden: User '
                                   f'"{user}" cannot patch resource "nodes/status" in API '
                                   f'group "" at the cluster scope: node \'{user[12:]}\' '
                                   f'cannot modify node \'{name}\'',
                                   {"name": name, "kind": "nodes"})
        media = headers.get("Content-Type", "").split(";")[0].strip()
        if media not in PATCH_TYPES:
            return 415, {}, status(415, "UnsupportedMediaType", "415: Unsupported Media Type")
        node = self.nodes.get(name)
        if node is None:
            return 404, {}, status(404, "NotFound", f'nodes "{name}" not found',
                                   {"name": name, "kind": "nodes"})
        try:
            patch = json.loads(body)
            if media == "application/json-patch+json":
                patched = json_patch(node, patch)
            else:
                version = ((patch.get("metadata") or {}).get("resourceVersion")
                           if isinstance(patch, dict) else None)
                if version is not None and version != node["metadata"]["resourceVersion"]:
                    return 409, {}, status(
                        409, "Conflict", f'Operation cannot be fulfilled on nodes "{name}": the '
                        f'object has been modified; please apply your changes to the latest '
                        f'version and try again', {"name": name, "kind": "nodes"})
                patched = merge(node, patch)
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            return 400, {}, status(400, "BadRequest", f"the patch could not be applied: {e}")
        for part in ("capacity", "allocatable"):
            for resource, value in (patched.get("status", {}).get(part) or {}).items():
                if "/" in resource and not (isinstance(value, str) and _INTEGER.match(value)):
                    return 422, {}, status(422, "Invalid", f'Node "{name}" is invalid: '
                                           f'status.{part}.{resource}: Invalid value: '
                                           f'{value!r}: must be an integer')
        patched["metadata"]["resourceVersion"] = str(int(node["metadata"]["resourceVersion"])
                                                     + 1)
        self.nodes[name] = patched
        return 200, {}, patched


def _handler(server: KubeApiServer):
    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _serve(self):
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            code, extra, answer = server.answer(self.command, self.path, self.headers, body)
            data = json.dumps(answer).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for k, v in extra.items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)

        do_PATCH = do_GET = do_PUT = do_POST = _serve

    return Handler


def only(nodes: List[dict], name: str) -> Optional[dict]:
    return next((n for n in nodes if n["metadata"]["name"] == name), None)
