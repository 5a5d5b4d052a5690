"""FileStorage with `overwrite`: the file a textfile collector reads holds one whole
cycle (its metrics, anomalies and allocations), replaced by one atomic rename per cycle.
Real files; owca-ship as a real process for the end to end."""
import os
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kafka_broker import ShipProcess, allocations, anomalies, measurements
from owca.ship.exposition import Formatter
from owca.plugin import Cycle
from owca.ship.storages.local import FileStorage

CATEGORY_OF = {"measurements": "metrics", "anomalies": "anomalies",
               "allocations": "allocations"}


def cycle_of(frame) -> Cycle:
    return Cycle(CATEGORY_OF[frame["kind"]], frame["seq"], frame["ts"], frame["host"],
                 Formatter().format(frame).render())


def names_in(text: str) -> set:
    return {s.name for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_file_is_replaced_once_per_whole_cycle(tmp_path):
    path = tmp_path / "owca.prom"
    storage = FileStorage(path=str(path), overwrite=True)
    replaced = []           # (after which frame, the file's inode: a rename gives a new one)
    for seq in (1, 2, 3):
        for frame in (measurements(seq), anomalies(seq), allocations(seq)):
            storage.store(cycle_of(frame))
            inode = os.stat(path).st_ino if path.exists() else None
            if inode is not None and (not replaced or replaced[-1][1] != inode):
                replaced.append(((seq, frame["kind"]), inode))
            if path.exists():
                text = path.read_text()
                assert {"platform_mem_usage_bytes", "anomaly", "allocations_total"} <= \
                    names_in(text), text
    # The first cycle is known whole when the second begins; the later ones as soon as
    # their last category (allocations, as the first cycle taught) has come.
    assert [after for after, _ in replaced] == [(2, "measurements"), (2, "allocations"),
                                               (3, "allocations")]
    text = path.read_text()
    assert text.startswith("# owca cycle seq=3 host=node-1 "
                           "categories=metrics,anomalies,allocations\n")
    samples = [s for f in text_string_to_metric_families(text) for s in f.samples]
    assert not [s for s in samples if s.timestamp is not None]  # the collector refuses them
    assert {s.value for s in samples if s.name == "platform_mem_usage_bytes"} == {5003}
    assert not (tmp_path / "owca.prom.tmp").exists()
    storage.close()


def test_a_cycle_with_a_category_missing_is_written_when_the_next_begins(tmp_path):
    path = tmp_path / "owca.prom"
    storage = FileStorage(path=str(path), overwrite=True)
    for frame in (measurements(1), anomalies(1), measurements(2), anomalies(2),
                  measurements(3)):                       # cycle 3's anomalies never come
        storage.store(cycle_of(frame))
    assert path.read_text().startswith("# owca cycle seq=2 ")
    storage.store(cycle_of(measurements(4)))
    assert path.read_text().startswith("# owca cycle seq=3 host=node-1 categories=metrics\n")
    storage.store(cycle_of(anomalies(4)))                 # cycle 4 is whole again
    assert path.read_text().startswith("# owca cycle seq=4 host=node-1 "
                                       "categories=metrics,anomalies\n")
    storage.store(cycle_of(measurements(5)))
    storage.close()                                       # the stop writes what it has
    assert path.read_text().startswith("# owca cycle seq=5 host=node-1 categories=metrics\n")


@pytest.mark.integration
def test_owca_ship_s_textfile_never_shows_part_of_a_cycle(tmp_path):
    """A reader polling the file while owca-ship writes 200 cycles sees, every time,
    the metrics, the anomalies and the allocations of one cycle together."""
    path = tmp_path / "owca.prom"
    config = tmp_path / "owca.yaml"
    config.write_text(f"ship:\n  storages:\n    - !FileStorage {{path: {path}, "
                      f"overwrite: true}}\n")
    ship = ShipProcess(str(config), str(tmp_path / "ship.log"))
    seen, bad, done = set(), [], threading.Event()

    def reader():
        while not done.is_set():
            try:
                text = path.read_text()
            except FileNotFoundError:
                continue
            seen.add(text.split(" ", 4)[3])
            if not {"task_cpu_usage_seconds_total", "anomaly", "allocations_total"} <= \
                    names_in(text):
                bad.append(text)

    watcher = threading.Thread(target=reader)
    watcher.start()
    try:
        for seq in range(1, 201):
            ship.send(measurements(seq), anomalies(seq), allocations(seq))
        assert ship.finish() == 0, ship.log()
    finally:
        done.set()
        watcher.join(30)
        ship.close()
    assert not bad, bad[0]
    assert len(seen) > 1 and path.read_text().startswith("# owca cycle seq=200 ")
