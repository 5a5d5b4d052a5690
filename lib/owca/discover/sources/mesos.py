"""Tasks from a Mesos agent, through its operator API (POST /api/v1).

Two calls per cycle:

- GET_CONTAINERS: the containers the agent runs, each with its executor and
  framework: `get_containers.containers[] {container_id.value,
  executor_id.value, framework_id.value}`;
- GET_STATE: the tasks, with labels and resources:
  `get_state.get_tasks.launched_tasks[] {task_id.value, name, state,
  framework_id.value, executor_id.value?, labels.labels[] {key, value?},
  resources[] {name, type, scalar.value, role?, allocation_info.role?,
  revocable?}, statuses[] {container_status.container_id {value, parent?}}}`
  and `get_state.get_frameworks.frameworks[].framework_info {id.value, name}`.

A task in TASK_RUNNING becomes one task dict:

    id            the Mesos task id
    name          the task's name
    cgroup_path   /<cgroups_root>/<container id> (the Mesos containerizer's
                  layout; a task of a task group with its own nested cgroup:
                  /<cgroups_root>/<executor container>/mesos/<task container>)
    labels        the task's labels (keys sanitised), and framework_id,
                  framework_name, executor_id, container_id,
                  role (of its resources), revocable (true/false), priority
    resources     cpus (cores), mem_bytes, disk_bytes, gpus, and any other
                  scalar resource under its sanitised name

A command task has no executor id of its own: its executor (the command
executor) has the task's id.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Set, Tuple

from owca.plugin import DiscoveryError
from owca.discover.sources.cgroup import cgroup_exists
from owca.core.frames import sanitize_label_name
from owca.discover.sources.orchestrator import (InvalidEntry, OrchestratorSource, add_labels,
                                                clamped, need, optional, path_component,
                                                task_id)
from owca.core.priority import ROLE_LABEL, PriorityRule

API_PATH = "/api/v1"
RUNNING = "TASK_RUNNING"
MiB = 1024 * 1024

# Mesos resource name -> (resource name in the frame, factor to its unit).
RESOURCES = {"cpus": ("cpus", 1), "mem": ("mem_bytes", MiB), "disk": ("disk_bytes", MiB),
             "gpus": ("gpus", 1)}

# Containers of a key (framework id, executor id).
Containers = Dict[Tuple[str, str], str]


@dataclass
class MesosDiscovery(OrchestratorSource):
    url: str = "http://127.0.0.1:5051"
    # The agent's --cgroups_root.
    cgroups_root: str = "mesos"
    # Tasks with no revocable resources are HP.
    priority: PriorityRule = field(
        default_factory=lambda: PriorityRule(label="revocable", hp_values=["false"]))

    def __post_init__(self):
        super().__post_init__()
        for part in self.cgroups_root.strip("/").split("/"):
            try:
                path_component(part, "cgroups_root")
            except InvalidEntry as e:
                raise ValueError(str(e)) from None

    def fetch(self, client, until, paths):
        containers = client.post_json(API_PATH, {"type": "GET_CONTAINERS"}, until)
        state = client.post_json(API_PATH, {"type": "GET_STATE"}, until)
        by_executor, problems = parse_containers(containers)
        tasks, more = parse_state(state, by_executor, self.cgroups_root)
        for task in tasks:
            shared = task.pop("executor_cgroup_path", None)
            # With the agent's default (share_cgroups), a nested container
            # lives in its executor's cgroup: measure that one.
            if shared and not cgroup_exists(paths, task["cgroup_path"]) \
                    and cgroup_exists(paths, shared):
                task["cgroup_path"] = shared
        return tasks, problems + more


def _answer(answer, call: str) -> dict:
    """The body of a call's answer, or DiscoveryError when its shape is wrong."""
    key = call.lower()
    if not isinstance(answer, dict) or not isinstance(answer.get(key), dict):
        raise DiscoveryError(f"{call} answer: expected an object with {key!r}, got "
                             f"{type(answer).__name__} {str(answer)[:60]!r}")
    if answer.get("type", call) != call:
        raise DiscoveryError(f"{call} answer: type is {answer.get('type')!r:.40}")
    return answer[key]


def _list(obj: dict, key: str, where: str) -> list:
    value = obj.get(key)
    if value is None:  # absent or null: empty
        return []
    if not isinstance(value, list):
        raise DiscoveryError(f"{where}.{key}: expected a list, got {type(value).__name__}")
    return value


def _value(obj, key: str, where: str) -> str:
    """The string of a Mesos id message `{"value": "..."}`."""
    return need(need(obj, key, dict, where), "value", str, f"{where}.{key}")


def parse_containers(answer) -> Tuple[Containers, List[str]]:
    """Executor containers by (framework id, executor id), from GET_CONTAINERS."""
    body = _answer(answer, "GET_CONTAINERS")
    found, problems = {}, []
    for i, c in enumerate(_list(body, "containers", "get_containers")):
        where = f"GET_CONTAINERS containers[{i}]"
        try:
            container_id = need(c, "container_id", dict, where)
            if "parent" in container_id or "executor_id" not in c:
                continue  # nested or standalone: not an executor's container
            cid = path_component(_value(c, "container_id", where), where + ".container_id")
            found[(_value(c, "framework_id", where), _value(c, "executor_id", where))] = cid
        except InvalidEntry as e:
            problems.append(f"mesos: container left out: {e}")
    return found, problems


def parse_state(answer, containers: Containers, cgroups_root: str = "mesos"):
    """(tasks, problems): the running tasks of GET_STATE that have a container."""
    body = _answer(answer, "GET_STATE")
    get_tasks = {} if body.get("get_tasks") is None else body["get_tasks"]
    if not isinstance(get_tasks, dict):
        raise DiscoveryError("GET_STATE answer: get_tasks is not an object")
    frameworks = _framework_names(body)
    root = "/" + cgroups_root.strip("/")
    tasks: List[dict] = []
    problems: List[str] = []
    for i, t in enumerate(_list(get_tasks, "launched_tasks", "get_tasks")):
        where = f"launched_tasks[{i}]"
        try:
            if not isinstance(t, dict) or t.get("state") != RUNNING:
                continue
            tasks.append(_task(t, containers, frameworks, root, where, problems))
        except InvalidEntry as e:
            ident = t.get("task_id", {}).get("value") if isinstance(t.get("task_id"), dict) \
                else None
            problems.append(f"mesos: task {ident!r:.80} left out: {e}")
    return tasks, problems


def _framework_names(body: dict) -> Dict[str, str]:
    names = {}
    frameworks = body.get("get_frameworks", {})
    for f in (frameworks.get("frameworks") or []) if isinstance(frameworks, dict) else []:
        info = f.get("framework_info") if isinstance(f, dict) else None
        try:
            names[_value(info, "id", "framework_info")] = need(info, "name", str,
                                                               "framework_info")
        except InvalidEntry:
            continue  # a name is a nicety; the task is still listed
    return names


def _task(t: dict, containers: Containers, frameworks: Dict[str, str], root: str,
          where: str, problems: List[str]) -> dict:
    tid = task_id(_value(t, "task_id", where), where + ".task_id")
    framework = _value(t, "framework_id", where)
    executor = _value(t, "executor_id", where) if t.get("executor_id") is not None else tid
    docker = optional(t, "container", dict, where, {}).get("type") == "DOCKER"
    if docker:
        raise InvalidEntry("it runs in the Docker containerizer (container.type DOCKER), "
                           "whose cgroups are Docker's, not the agent's: not supported; "
                           "run it in the Mesos containerizer (docs/discovery.md)")
    container = containers.get((framework, executor))
    if container is None:
        raise InvalidEntry(f"the agent lists no container for its executor {executor!r:.80}")
    cgroup_path = f"{root}/{container}"
    # The name is optional, and may be empty: the id stands in (docs/protocol.md).
    task: Dict[str, Any] = {"id": tid, "name": optional(t, "name", str, where, tid) or tid,
                            "cgroup_path": cgroup_path, "labels": {}, "resources": {}}
    nested = _nested_container(t, container, where)
    if nested:
        task["cgroup_path"] = f"{cgroup_path}/mesos/{nested}"
        task["executor_cgroup_path"] = cgroup_path
    labels = task["labels"]
    pairs = [(label.get("key"), "" if label.get("value") is None else label["value"])
             if isinstance(label, dict)
             else (None, None) for label in optional(optional(t, "labels", dict, where, {}),
                                                     "labels", list, where, [])]
    # A bad label costs only itself, not the task.
    for line in add_labels(labels, pairs, f"mesos: task {tid!r:.80}"):
        problems.append(line)
    resources, roles, revocable = _resources(t, where, f"mesos: task {tid!r:.80}", problems)
    task["resources"] = resources
    builtin = {
        "framework_id": framework,
        "framework_name": frameworks.get(framework, ""), "executor_id": executor,
        "container_id": container, ROLE_LABEL: ",".join(sorted(roles)),
        "revocable": "true" if revocable else "false"}
    labels.update((k, v) for k, v in builtin.items() if v)
    return task


def _nested_container(t: dict, container: str, where: str):
    """The task's own nested container under `container`, from its latest status."""
    statuses = optional(t, "statuses", list, where, [])
    if not statuses:
        return None
    status = statuses[-1]
    cid = status.get("container_status", {}).get("container_id") \
        if isinstance(status, dict) and isinstance(status.get("container_status"), dict) \
        else None
    if not isinstance(cid, dict) or not isinstance(cid.get("parent"), dict):
        return None
    if cid["parent"].get("value") != container:
        return None  # deeper nesting: measured as the executor's container
    return path_component(cid.get("value"), where + ".statuses[-1].container_id")


def _resources(t: dict, where: str, task: str, problems: List[str]):
    """(resources, roles, revocable) of the task's scalar resources; a sum above
    MAX_RESOURCE (1e308 MB overflows to infinity in bytes) is clamped to it."""
    resources: Dict[str, float] = {}
    roles: Set[str] = set()
    revocable = False
    for j, r in enumerate(optional(t, "resources", list, where, [])):
        at = f"{where}.resources[{j}]"
        name = need(r, "name", str, at)
        if r.get("type") != "SCALAR":
            continue  # ports, ranges, sets: not quantities
        value = need(need(r, "scalar", dict, at), "value", (int, float), at + ".scalar")
        if not value >= 0 or value == float("inf"):
            raise InvalidEntry(f"{at}.scalar.value: expected a finite number >= 0, got {value}")
        key, factor = RESOURCES.get(name, (sanitize_label_name(name), 1))
        resources[key] = resources.get(key, 0) + value * factor
        info = optional(r, "allocation_info", dict, at, {})
        role = optional(info, "role", str, at + ".allocation_info") or optional(r, "role", str, at)
        if role:
            roles.add(role)
        revocable = revocable or r.get("revocable") is not None
    return ({k: _precision(k, clamped(v, f"{task}: resources {k}", problems))
             for k, v in resources.items()}, roles, revocable)


def _precision(key: str, value: float):
    """A sum of Mesos scalars at the precision Mesos keeps them.

    Mesos stores scalars as fixed-point numbers with three decimal digits;
    MB become whole bytes.  Adding floats (0.1 + 0.048) otherwise shows noise.
    """
    if key.endswith("_bytes"):
        return int(round(value))
    rounded = round(value, 3)
    return int(rounded) if float(rounded).is_integer() else rounded
