"""Prometheus names and units (issue 32, item 7): what a scraper sees follows Prometheus'
naming conventions (https://prometheus.io/docs/practices/naming/), values are in base
units, the names of release 0.1 stay one release as deprecated aliases, docs/metrics.md's
tables give the scraped names, and owca-ship says where it listens."""
import os
import re
import subprocess
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, tool_command, tool_env
from kafka_broker import ShipProcess, wait_until
from owca.core import metrics
from owca.core.metrics import COUNTER, REGISTRY
from owca.ship.exposition import Formatter

USER_HZ = os.sysconf("SC_CLK_TCK")     # what /proc/stat counts in (man 5 proc)

# The frame of docs/protocol.md, with the metrics this item renamed.
FRAME = {"v": 1, "kind": "measurements", "ts": 1764062400.131, "host": "node7", "seq": 42,
         "platform": {"platform_topology_cpus": 2,
                      "platform_cpu_usage": {"0": 249303, "1": 49876}},
         "tasks": {"/owca/web": {"name": "web", "cgroup_path": "/owca/web",
                                 "labels": {"priority": "hp"}, "resources": {"cpus": 2},
                                 "metrics": {"task_cpu_usage_seconds": 12.5,
                                             "task_last_seen": 1764062400.1,
                                             "task_pressure_avg10_percent":
                                                 {"cpu": {"some": 12.34}}}}},
         "metrics": []}
ANOMALIES = {"v": 1, "kind": "anomalies", "ts": 1764062400.131, "host": "node7", "seq": 42,
             "anomalies": [], "metrics": [{"name": "anomaly_count", "value": 3, "labels": {},
                                           "type": "gauge"}]}


def scraped(text: str) -> dict:
    """{(name, labels without host): value} of an exposition text, as Prometheus' own
    parser reads it."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "host"))
            out[(s.name, labels)] = s.value
    return out


@pytest.mark.unit
def test_every_exposed_name_says_its_unit_and_kind():
    """Counters end in `_total` and nothing else does; a value in seconds, bytes or a share
    of a whole (a 0-1 ratio) has the unit in its name; a time since the epoch is a
    `_timestamp_seconds`; no name is in percent or in ticks (the deprecated aliases
    aside)."""
    wrong = []
    for name, spec in REGISTRY.items():
        exposed, unit = spec.exposed_name, spec.unit
        if (spec.type == COUNTER) != exposed.endswith("_total"):
            wrong.append(f"{name}: {spec.type} {exposed}")
        if unit == "seconds since the epoch":
            if not exposed.endswith("_timestamp_seconds"):
                wrong.append(f"{name}: a timestamp as {exposed}")
        elif unit == "seconds" and "_seconds" not in exposed:
            wrong.append(f"{name}: seconds as {exposed}")
        if unit == "bytes" and "_bytes" not in exposed:
            wrong.append(f"{name}: bytes as {exposed}")
        if unit == "ratio (0-1)" and not exposed.endswith("_ratio"):
            wrong.append(f"{name}: a ratio as {exposed}")
        if "percent" in unit or "tick" in unit or "_percent" in exposed:
            wrong.append(f"{name}: {unit} as {exposed}")
    assert wrong == []


@pytest.mark.unit
def test_platform_cpu_usage_is_scraped_in_seconds_and_its_old_name_in_ticks():
    text = Formatter().format(FRAME).render()
    got = scraped(text)
    # prometheus_client's parser gives a counter's samples their family name + _total.
    assert got[("platform_cpu_usage_seconds_total", (("cpu", "0"),))] == 249303 / USER_HZ
    assert got[("platform_cpu_usage_seconds_total", (("cpu", "1"),))] == 49876 / USER_HZ
    # The deprecated name writes the frame's own figure, as release 0.1 did.
    assert 'platform_cpu_usage_total{host="node7",cpu="0"} 249303 1764062400131\n' in text
    assert "# TYPE platform_cpu_usage_total counter\n" in text


@pytest.mark.unit
def test_renamed_task_metrics_and_their_aliases():
    got = scraped(Formatter().format(FRAME).render())
    task = (("priority", "hp"), ("task_id", "/owca/web"), ("task_name", "web"))
    assert got[("task_last_seen_timestamp_seconds", task)] == 1764062400.1
    assert got[("task_last_seen", task)] == 1764062400.1
    stall = tuple(sorted(task + (("resource", "cpu"), ("stall", "some"))))
    assert got[("task_pressure_avg10_ratio", stall)] == pytest.approx(0.1234, abs=1e-15)
    assert got[("task_pressure_avg10_percent", stall)] == 12.34
    assert not [key for key in got if key[0] == "platform_cpu_usage"]


@pytest.mark.unit
def test_the_anomaly_count_is_a_gauge_named_as_one():
    text = Formatter().format(ANOMALIES).render()
    assert "# TYPE anomalies gauge\n" in text and "# TYPE anomalies_found gauge\n" in text
    got = scraped(text)
    assert got[("anomalies", ())] == 3 and got[("anomalies_found", ())] == 3
    assert "Deprecated: use anomalies; removed in release 0.3." in text


@pytest.mark.unit
def test_without_deprecated_names_only_the_new_ones_are_written():
    formatter = Formatter(deprecated_names=False)
    text = formatter.format(FRAME).render() + formatter.format(ANOMALIES).render()
    names = {key[0] for key in scraped(text)}
    assert {"platform_cpu_usage_seconds_total", "task_last_seen_timestamp_seconds",
            "task_pressure_avg10_ratio", "anomalies"} <= names
    assert names.isdisjoint(metrics.deprecated()) and "Deprecated" not in text


@pytest.mark.unit
def test_a_value_no_float_holds_is_counted_not_divided():
    frame = dict(FRAME, platform={"platform_cpu_usage": {"0": 10 ** 400, "1": "x", "2": 5}},
                 tasks={})
    block = Formatter().format(frame)
    assert block.bad_values == 2
    assert scraped(block.render())[("platform_cpu_usage_seconds_total", (("cpu", "2"),))] == \
        5 / USER_HZ


@pytest.mark.integration
def test_the_exposition_with_aliases_passes_promtool():
    promtool = __import__("shutil").which("promtool")
    if promtool is None:
        pytest.skip("no promtool command (Debian package prometheus, requirements/apt.txt)")
    formatter = Formatter()
    text = formatter.format(FRAME).render() + formatter.format(ANOMALIES).render()
    checked = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                             capture_output=True, timeout=60)
    assert (checked.returncode, checked.stdout + checked.stderr) == (0, b"")


@pytest.mark.unit
def test_metrics_md_tables_give_the_scraped_names():
    """Each metric's row starts with the name a Prometheus server scrapes, not the frame's."""
    with open(os.path.join(ROOT, "docs", "metrics.md")) as f:
        rows = [line for line in f if line.startswith("| `")]
    first = {re.match(r"\| `([^`]+)`", row).group(1) for row in rows}
    assert {spec.exposed_name for spec in REGISTRY.values()} <= first
    assert "platform_cpu_usage_seconds_total" in first and "anomalies" in first


@pytest.mark.integration
def test_ship_says_where_it_listens(tmp_path):
    """With port 0 the kernel picks the port: the logged one is the one that answers."""
    config = tmp_path / "ship.yaml"
    config.write_text("ship:\n  storages:\n    - !PrometheusStorage {port: 0}\n")
    log = tmp_path / "ship.log"
    ship = ShipProcess(str(config), str(log))
    try:
        found = []

        def logged():
            found[:] = re.findall(r"listening on 127\.0\.0\.1:(\d+), metrics at "
                                  r"http://127\.0\.0\.1:(\d+)/metrics", log.read_text())
            return found
        wait_until(logged, timeout=60, what="owca-ship to log its address")
        ((port, same),) = found
        assert port == same and int(port) > 0
        with pytest.raises(urllib.error.HTTPError) as answer:   # no cycle yet: 503
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert answer.value.code == 503
        assert ship.finish() == 0
    finally:
        ship.close()


@pytest.mark.integration
def test_check_config_takes_deprecated_names(tmp_path):
    config = tmp_path / "ship.yaml"
    config.write_text("ship:\n  deprecated_names: false\n")
    checked = subprocess.run(tool_command("ship", "--check-config", "-c", str(config)),
                             capture_output=True, env=tool_env(), timeout=60)
    assert checked.returncode == 0, checked.stderr


@pytest.mark.unit
def test_the_shipped_prometheus_rules_use_no_deprecated_name():
    directory = os.path.join(ROOT, "configs", "prometheus")
    for name in sorted(os.listdir(directory)) + ["../prometheus.yaml"]:
        with open(os.path.join(directory, name)) as f:
            text = f.read()
        used = {old for old in metrics.deprecated() if re.search(rf"\b{old}\b", text)}
        assert used == set(), name


@pytest.mark.unit
def test_a_plug_in_metric_named_like_a_deprecated_name_keeps_it():
    """One family per name: the plug-in's sample, not a second `anomalies_found`."""
    frame = dict(ANOMALIES, metrics=ANOMALIES["metrics"] + [
        {"name": "anomalies_found", "value": 7, "labels": {}, "type": "gauge"}])
    text = Formatter().format(frame).render()
    assert text.count("# TYPE anomalies_found ") == 1
    got = scraped(text)
    assert got[("anomalies_found", ())] == 7 and got[("anomalies", ())] == 3
