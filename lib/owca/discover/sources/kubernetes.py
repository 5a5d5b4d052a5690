"""Tasks from a Kubernetes kubelet, through its pods endpoint (GET /pods).

The kubelet answers a PodList: `items[] {metadata {uid, name, namespace,
labels, annotations}, spec {containers[], initContainers[], overhead,
priorityClassName, nodeName}, status {phase, qosClass, podIP, containerStatuses[]
{name, containerID "<runtime>://<id>", state {running?}}},
initContainerStatuses[] (the same)}}`; each container spec has `resources
{requests, limits}` of Kubernetes quantities, an init container
`restartPolicy` (Always: a sidecar).  Absent and null lists are empty.

Every pod in phase Running is a task (or, with `task: container`, each of its
running containers is):

    id            the pod UID (container mode: <pod UID>/<container name>)
    name          <namespace>/<pod name> (container mode: .../<container name>)
    cgroup_path   the pod's cgroup, as the kubelet lays it out for its cgroup
                  driver and the pod's QoS class (container mode: the
                  container's cgroup); subcgroup_paths: its containers'
    labels        the pod's labels and (prefixed annotation_) annotations, keys
                  sanitised; pod_name, namespace, qos_class, node_name,
                  priority_class, pod_ip (status.podIP, where it is an
                  address), container_name (container mode); priority
    resources     requests: cpus (cores), mem_bytes, disk_bytes (ephemeral
                  storage), other resources under their sanitised names;
                  limits: the same names prefixed limit_ (absent when some
                  container has no limit: the pod is then unlimited)

Cgroup layout (kubelet with --cgroup-root=/; the same paths under cgroup v1,
in each controller's hierarchy, and under cgroup v2):

    driver    QoS         pod cgroup
    cgroupfs  Guaranteed  /kubepods/pod<uid>
    cgroupfs  Burstable   /kubepods/burstable/pod<uid>
    cgroupfs  BestEffort  /kubepods/besteffort/pod<uid>
    systemd   Guaranteed  /kubepods.slice/kubepods-pod<uid_>.slice
    systemd   Burstable   /kubepods.slice/kubepods-burstable.slice/
                            kubepods-burstable-pod<uid_>.slice
    systemd   BestEffort  /kubepods.slice/kubepods-besteffort.slice/
                            kubepods-besteffort-pod<uid_>.slice

(<uid_>: the UID with '-' as '_', since systemd reads '-' in a slice name as
nesting).  A container's cgroup is below its pod's: cgroupfs `<id>` (CRI-O:
`crio-<id>`), systemd `docker-<id>.scope`, `cri-containerd-<id>.scope` or
`crio-<id>.scope`.
"""
import fnmatch
import ipaddress
import re
import sys
from dataclasses import dataclass, field
from decimal import Context, Decimal, MAX_EMAX, MIN_EMIN
from typing import Dict, List, Literal, Optional, Set, Tuple

from owca.core import frames
from owca.plugin import DiscoveryError
from owca.discover.sources.cgroup import cgroup_exists
from owca.core.frames import sanitize_label_name
from owca.discover.sources.orchestrator import (InvalidEntry, OrchestratorSource, add_labels,
                                                check_type, clamped, need, optional,
                                                path_component, task_id)
from owca.core.priority import QOS_CLASSES, QOS_LABEL, PriorityRule

PODS_PATH = "/pods"

# Kubernetes resource name -> the name in the frame (others: sanitised).
RESOURCE_NAMES = {"cpu": "cpus", "memory": "mem_bytes", "ephemeral-storage": "disk_bytes"}
# Resources counted in bytes: whole numbers.
BYTE_RESOURCES = ("memory", "ephemeral-storage", "storage")

# Container runtime (the scheme of a containerID) -> its cgroup name, per driver.
CONTAINER_CGROUP = {
    "docker": {"cgroupfs": "{}", "systemd": "docker-{}.scope"},
    "containerd": {"cgroupfs": "{}", "systemd": "cri-containerd-{}.scope"},
    "cri-o": {"cgroupfs": "crio-{}", "systemd": "crio-{}.scope"},
}
CONTAINER_ID = re.compile(r"([a-z0-9-]+)://([A-Za-z0-9]{1,128})\Z")
POD_UID = re.compile(r"[A-Za-z0-9][A-Za-z0-9-]{0,127}\Z")

# Kubernetes quantities: a decimal number, then a binary or decimal SI suffix,
# or a decimal exponent (`1E` is 10^18, `1E3` is 1000).
_QUANTITY = re.compile(r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
                       r"(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]{1,9})?\Z")
_SUFFIX = {"n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": Decimal(1),
           "k": Decimal("1e3"), "M": Decimal("1e6"), "G": Decimal("1e9"), "T": Decimal("1e12"),
           "P": Decimal("1e15"), "E": Decimal("1e18"), "Ki": Decimal(2 ** 10),
           "Mi": Decimal(2 ** 20), "Gi": Decimal(2 ** 30), "Ti": Decimal(2 ** 40),
           "Pi": Decimal(2 ** 50), "Ei": Decimal(2 ** 60)}
# Exact for every quantity a float can hold; exponents never overflow.
_EXACT = Context(prec=40, Emax=MAX_EMAX, Emin=MIN_EMIN)
_FLOAT_MAX = Decimal(sys.float_info.max)


@dataclass
class KubernetesDiscovery(OrchestratorSource):
    # The read-only port (off on current clusters); the secure port is
    # https://127.0.0.1:10250 with server_name (the node's name), ca_bundle, token_file.
    url: str = "http://127.0.0.1:10255"
    # A task per pod (its containers are sub-cgroups) or per container.
    task: Literal["pod", "container"] = "pod"
    # The kubelet's --cgroup-driver; auto: systemd when kubepods.slice exists.
    cgroup_driver: Literal["auto", "cgroupfs", "systemd"] = "auto"
    # The kubelet's --cgroup-root.
    cgroup_root: str = "/"
    # Only pods of these namespaces (default: all).
    namespaces: List[str] = field(default_factory=list)
    # Annotations copied into labels (as annotation_<key>): shell-style patterns.
    annotations: List[str] = field(default_factory=lambda: ["*"])
    # Guaranteed pods are HP.
    priority: PriorityRule = field(
        default_factory=lambda: PriorityRule(qos_classes=["Guaranteed"]))

    def __post_init__(self):
        super().__post_init__()
        try:
            self._root = root_components(self.cgroup_root)
        except InvalidEntry as e:
            raise ValueError(str(e)) from None

    def driver(self, paths) -> str:
        if self.cgroup_driver != "auto":
            return self.cgroup_driver
        systemd = cgroup_path(self._root + ["kubepods"], "systemd")
        return "systemd" if cgroup_exists(paths, systemd) else "cgroupfs"

    def fetch(self, client, until, paths):
        answer = client.get_json(PODS_PATH, until)
        return parse_pods(answer, task=self.task, driver=self.driver(paths),
                          root=self._root, namespaces=self.namespaces,
                          annotations=self.annotations)


def parse_quantity(text) -> float:
    """A Kubernetes quantity (`100m`, `64Mi`, `1.5`, `2e3`, `1G`, `1Ei`) as a number.

    Computed exactly, then an int when whole (`1Ei` is 2^60 bytes, not a float
    near it), else a float.  A quantity beyond what a float holds (`1e999`) is
    out of range; one beyond MAX_RESOURCE is returned as is, for the caller to
    clamp and report.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return text
    m = _QUANTITY.match(text.strip()) if isinstance(text, str) else None
    if not m:
        raise InvalidEntry(f"{text!r:.40} is not a quantity")
    number, suffix = Decimal(m.group(1)), m.group(2) or ""
    if suffix in _SUFFIX:
        value = _EXACT.multiply(number, _SUFFIX[suffix])
    else:
        value = number.scaleb(int(suffix[1:]), _EXACT)
    if abs(value) > _FLOAT_MAX:
        raise InvalidEntry(f"{text!r:.40} is out of range")
    return int(value) if value == value.to_integral_value() else float(value)


def root_components(cgroup_root: str) -> List[str]:
    """The kubelet's --cgroup-root as path components ('/' has none)."""
    parts = [p for p in cgroup_root.split("/") if p]
    for p in parts:
        path_component(p, "cgroup_root")
    return parts


def cgroup_path(components: List[str], driver: str) -> str:
    """The kubelet's cgroup name (a list of components) as a path for its driver.

    cgroupfs joins the components; systemd makes each a slice whose name
    repeats its parents' (`a.slice/a-b.slice/a-b-c.slice`), '-' in a component
    escaped as '_'.
    """
    if driver == "cgroupfs":
        return "/" + "/".join(components)
    slices, prefix = [], ""
    for c in components:
        prefix = f"{prefix}-{c.replace('-', '_')}" if prefix else c.replace("-", "_")
        slices.append(prefix + ".slice")
    return "/" + "/".join(slices)


def pod_cgroup_path(uid: str, qos: str, driver: str, root: List[str]) -> str:
    components = list(root) + ["kubepods"]
    if qos != "Guaranteed":
        components.append(qos.lower())
    return cgroup_path(components + ["pod" + uid], driver)


def container_cgroup_path(pod_path: str, container_id: str, driver: str) -> str:
    """The cgroup of a container, from its `<runtime>://<id>` status field."""
    m = CONTAINER_ID.match(container_id)
    if not m:
        raise InvalidEntry(f"containerID {container_id!r:.90} is not <runtime>://<id>")
    runtime, cid = m.groups()
    names = CONTAINER_CGROUP.get(runtime)
    if names is None:
        raise InvalidEntry(f"container runtime {runtime!r} has no known cgroup layout "
                           f"(known: {', '.join(CONTAINER_CGROUP)})")
    return f"{pod_path}/{names[driver].format(cid)}"


def qos_class(spec: dict, where: str) -> str:
    """The pod's QoS class computed from its containers, as the kubelet does.

    Only cpu and memory count, and only quantities above zero: a pod whose
    containers all ask for `cpu: 0` is BestEffort.  Guaranteed needs every
    container (init containers included) to set both limits, and the pod's
    summed requests to equal its summed limits.  A request left out defaults
    to the limit, as the API server fills it in.
    """
    requests: Dict[str, float] = {}
    limits: Dict[str, float] = {}
    guaranteed = True
    containers = _containers(spec, where) + _containers(spec, where, "initContainers")
    for c in containers:
        resources = optional(c, "resources", dict, where, {})
        req = optional(resources, "requests", dict, where, {})
        lim = optional(resources, "limits", dict, where, {})
        found = set()
        for name in ("cpu", "memory"):
            if lim.get(name) is not None and parse_quantity(lim[name]) > 0:
                found.add(name)
                limits[name] = limits.get(name, 0) + parse_quantity(lim[name])
            text = req.get(name) if req.get(name) is not None else lim.get(name)
            if text is not None and parse_quantity(text) > 0:
                requests[name] = requests.get(name, 0) + parse_quantity(text)
        if found != {"cpu", "memory"}:
            guaranteed = False
    if not requests and not limits:
        return "BestEffort"
    if guaranteed and all(limits.get(n) == v for n, v in requests.items()) \
            and len(requests) == len(limits):
        return "Guaranteed"
    return "Burstable"


def is_sidecar(container: dict) -> bool:
    """An init container that runs beside the app ones (restartPolicy: Always)."""
    return container.get("restartPolicy") == "Always"


def _containers(spec: dict, where: str, key: str = "containers") -> list:
    items = optional(spec, key, list, where, [])
    for i, c in enumerate(items):
        check_type(c, dict, f"{where}.{key}[{i}]")
    return items


def _quantities(mapping: dict, where: str, problems: List[str]) -> Dict[str, float]:
    out = {}
    for name, text in mapping.items():
        value = parse_quantity(text)
        if not value >= 0 or value == float("inf"):
            raise InvalidEntry(f"{where}.{name}: expected a quantity >= 0, got {text!r:.40}")
        out[name] = clamped(value, f"{where}.{name} {text!r:.40}", problems)
    return out


def _container_resources(c: dict, where: str, problems: List[str]
                         ) -> Tuple[Dict[str, float], Dict[str, float]]:
    resources = optional(c, "resources", dict, where, {})
    return (_quantities(optional(resources, "requests", dict, where, {}), where + ".requests",
                        problems),
            _quantities(optional(resources, "limits", dict, where, {}), where + ".limits",
                        problems))


def pod_resources(spec: dict, where: str, only: Optional[str] = None,
                  problems: Optional[List[str]] = None) -> Dict[str, float]:
    """Requests and limits of a pod (or of its container `only`), frame-named.

    As the kubelet and the scheduler count them: init containers run in
    order, a one-shot one to completion before the next starts, and a sidecar
    (restartPolicy: Always) keeps running from its start on.  So a one-shot
    init container needs its own resources plus those of the sidecars started
    before it; the pod needs the larger of that and the sum of its app
    containers and all its sidecars; then its overhead.  A limit counts only
    when every container that runs throughout (app and sidecar) sets it.
    Sums are rounded to the quantities' precision (milli-units; bytes).
    A quantity or a sum above MAX_RESOURCE is clamped to it, and said in
    `problems`.
    """
    if problems is None:
        problems = []
    apps = list(enumerate(_containers(spec, where)))
    inits = list(enumerate(_containers(spec, where, "initContainers")))
    if only is not None:
        apps = [(i, c) for i, c in apps if c.get("name") == only]
        inits = [(i, c) for i, c in inits if c.get("name") == only and is_sidecar(c)]
    requests: Dict[str, float] = {}
    limits: Dict[str, float] = {}
    unlimited: Set[str] = set()

    def add(into, more):
        for name, v in more.items():
            into[name] = into.get(name, 0) + v

    for i, c in apps:
        req, lim = _container_resources(c, f"{where}.containers[{i}]", problems)
        add(requests, req)
        add(limits, lim)
        unlimited.update(n for n in ("cpu", "memory", "ephemeral-storage") if n not in lim)
    init_requests: Dict[str, float] = {}
    init_limits: Dict[str, float] = {}
    sidecar_requests: Dict[str, float] = {}
    sidecar_limits: Dict[str, float] = {}
    for i, c in inits:
        req, lim = _container_resources(c, f"{where}.initContainers[{i}]", problems)
        if is_sidecar(c):
            add(requests, req)
            add(limits, lim)
            add(sidecar_requests, req)
            add(sidecar_limits, lim)
            unlimited.update(n for n in ("cpu", "memory", "ephemeral-storage") if n not in lim)
            req, lim = sidecar_requests, sidecar_limits
        else:
            req, lim = dict(req), dict(lim)
            add(req, sidecar_requests)
            add(lim, sidecar_limits)
        for name, v in req.items():
            init_requests[name] = max(init_requests.get(name, 0), v)
        for name, v in lim.items():
            init_limits[name] = max(init_limits.get(name, 0), v)
    if only is None:
        for name, v in init_requests.items():
            requests[name] = max(requests.get(name, 0), v)
        for name, v in init_limits.items():
            if name in limits:
                limits[name] = max(limits[name], v)
        for name, v in _quantities(optional(spec, "overhead", dict, where, {}),
                                   where + ".overhead", problems).items():
            requests[name] = requests.get(name, 0) + v
            if name in limits:
                limits[name] += v
    out = {}
    for name, v in requests.items():
        out[resource_name(name)] = quantity_precision(
            name, clamped(v, f"{where}: the sum of the requests of {name}", problems))
    for name, v in limits.items():
        if name not in unlimited:
            out["limit_" + resource_name(name)] = quantity_precision(
                name, clamped(v, f"{where}: the sum of the limits of {name}", problems))
    return out


def resource_name(name: str) -> str:
    return RESOURCE_NAMES.get(name) or sanitize_label_name(name)


def quantity_precision(name: str, value: float):
    """A sum of quantities at the precision Kubernetes keeps them.

    Byte resources are whole bytes; every other resource (cpu) in milli-units,
    the kubelet's own precision for cpu.  Adding floats (`100m` + `48m`)
    otherwise shows noise (0.14800000000000002).
    """
    if name in BYTE_RESOURCES or name.startswith("hugepages-"):
        return int(round(value))
    rounded = round(value, 3)
    return int(rounded) if float(rounded).is_integer() else rounded


def parse_pods(answer, task: str = "pod", driver: str = "cgroupfs", root=(),
               namespaces=(), annotations=("*",)):
    """(tasks, problems): the running pods (or containers) of a kubelet's PodList."""
    # The kubelet encodes a node with no pods as "items": null.
    if not isinstance(answer, dict) or "items" not in answer \
            or not isinstance(answer["items"], (list, type(None))):
        raise DiscoveryError(f"/pods answer: expected a PodList with items, got "
                             f"{type(answer).__name__} {str(answer)[:60]!r}")
    if answer.get("kind", "PodList") != "PodList":
        raise DiscoveryError(f"/pods answer: kind is {answer.get('kind')!r:.40}, not PodList")
    tasks: List[dict] = []
    problems: List[str] = []
    for i, pod in enumerate(answer["items"] or []):
        where = f"items[{i}]"
        try:
            if not isinstance(pod, dict):
                raise InvalidEntry(f"{where}: expected a pod object")
            status = optional(pod, "status", dict, where, {})
            if status.get("phase") != "Running":
                continue
            meta = need(pod, "metadata", dict, where)
            if namespaces and meta.get("namespace") not in namespaces:
                continue
            where = f"pod {meta.get('namespace')}/{meta.get('name')}"[:160]
            tasks.extend(_pod_tasks(pod, meta, status, task, driver, list(root), annotations,
                                    f"kubernetes: {where}", problems))
        except InvalidEntry as e:
            problems.append(f"kubernetes: {where} left out: {e}")
    return tasks, problems


def _pod_tasks(pod, meta, status, task, driver, root, annotations, pod_where, problems):
    """The pod's task(s); field errors name the field (metadata.uid), problems the pod."""
    uid = need(meta, "uid", str, "metadata")
    if not POD_UID.match(uid):
        raise InvalidEntry(f"metadata.uid: {uid!r:.80} is not a pod UID")
    namespace = need(meta, "namespace", str, "metadata")
    name = need(meta, "name", str, "metadata")
    spec = need(pod, "spec", dict, "pod")
    where = "spec"
    qos = optional(status, "qosClass", str, "status") or qos_class(spec, where)
    if qos not in QOS_CLASSES:
        raise InvalidEntry(f"qosClass {qos!r:.40} is not one of {', '.join(QOS_CLASSES)}")
    pod_path = pod_cgroup_path(uid.replace("-", "_") if driver == "systemd" else uid,
                               qos, driver, root)
    labels: Dict[str, str] = {}
    problems.extend(add_labels(labels, optional(meta, "labels", dict, "metadata", {}).items(),
                               pod_where))
    shown = [(k, v) for k, v in optional(meta, "annotations", dict, "metadata", {}).items()
             if any(fnmatch.fnmatchcase(str(k), p) for p in annotations)]
    # Annotations may be long (last-applied-configuration): such ones are not
    # labels, and not problems either.
    problems.extend(add_labels(
        labels, [(k, v) for k, v in shown
                 if not isinstance(v, str) or len(v) <= frames.MAX_LABEL_VALUE_LENGTH],
        pod_where, prefix="annotation_"))
    builtin = {"pod_name": name, "namespace": namespace, QOS_LABEL: qos,
               "node_name": optional(spec, "nodeName", str, where, ""),
               "priority_class": optional(spec, "priorityClassName", str, where, ""),
               "pod_ip": _pod_ip(status, pod_where, problems)}
    labels.update((k, v) for k, v in builtin.items() if v)
    running = _running_containers(status, pod_path, driver, pod_where, problems)
    clamps: List[str] = []
    if task == "pod":
        tasks = [{"id": uid, "name": f"{namespace}/{name}", "cgroup_path": pod_path,
                  "subcgroup_paths": [path for _, path in running],
                  "labels": labels, "resources": pod_resources(spec, where, problems=clamps)}]
    else:
        tasks = [{"id": task_id(f"{uid}/{cname}", "container id"),
                  "name": f"{namespace}/{name}/{cname}",
                  "cgroup_path": path, "labels": {**labels, "container_name": cname},
                  "resources": pod_resources(spec, where, only=cname, problems=clamps)}
                 for cname, path in running]
    problems.extend(f"{pod_where}: {line}" for line in clamps)
    return tasks


def _pod_ip(status, pod_where, problems) -> str:
    """status.podIP as an address (where owca-measure reads the pod's own service
    levels, docs/control.md); an address that is not one is left out, one problem."""
    text = status.get("podIP")
    if text is None or text == "":
        return ""
    try:
        return str(ipaddress.ip_address(text if isinstance(text, str) else ""))
    except ValueError:
        problems.append(f"{pod_where}: status.podIP {text!r:.60} is not an IP address")
        return ""


def _running_containers(status, pod_path, driver, pod_where, problems):
    """(name, cgroup path) of the pod's running containers, app ones first, then
    the running init containers (sidecars); the others are skipped."""
    out = []
    for key in ("containerStatuses", "initContainerStatuses"):
        for i, cs in enumerate(optional(status, key, list, "status", [])):
            at = f"status.{key}[{i}]"
            try:
                cname = need(cs, "name", str, at)
                state = optional(cs, "state", dict, at, {})
                if state.get("running") is None:
                    continue
                out.append((cname, container_cgroup_path(
                    pod_path, need(cs, "containerID", str, at), driver)))
            except InvalidEntry as e:
                problems.append(f"{pod_where}: container left out: {e}")
    return out
