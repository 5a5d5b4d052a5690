"""The spool: order, bounds, resumption, and what a kill leaves behind (real files)."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from owca.ship import spool as spool_mod
from owca.ship.spool import (CORRUPT, FULL, TOO_LARGE, CorruptRecord, Spool, SpoolError,
                             decode_record, encode_record, parse_name, record_name)

from conftest import ROOT
from small_fs import small_fs  # noqa: F401  (a fixture)


def records_on_disk(directory):
    return sorted(n for n in os.listdir(directory) if parse_name(n) is not None)


def drain(spool):
    """Every record's meta, taking and delivering them in turn."""
    out = []
    while True:
        record = spool.take(timeout=0)
        if record is None:
            return out
        out.append(record.meta)
        spool.release(record, delivered=True)


def fill(spool, seqs, size=10):
    for seq in seqs:
        spool.append({"seq": seq}, b"x" * size)


# -- the record format, on literal bytes -----------------------------------------------

def test_record_round_trip():
    data = encode_record({"seq": 7, "topic": "t"}, b"m 1 1000\n")
    assert data[:4] == b"OWSP" and data[4] == 1
    assert decode_record(data) == ({"seq": 7, "topic": "t"}, b"m 1 1000\n")


@pytest.mark.parametrize("damage, reason", [
    (lambda d: d[:10], "shorter than a header"),
    (lambda d: d[:-1], "torn write"),
    (lambda d: d + b"x", "torn write"),
    (lambda d: b"XXXX" + d[4:], "bad magic"),
    (lambda d: d[:4] + b"\x02" + d[5:], "unknown record version 2"),
    (lambda d: d[:-1] + bytes([d[-1] ^ 1]), "checksum mismatch"),
])
def test_damaged_records_are_recognised(damage, reason):
    data = encode_record({"seq": 1}, b"payload")
    with pytest.raises(CorruptRecord, match=reason):
        decode_record(damage(data))


def test_record_names_sort_in_append_order():
    assert record_name(42) == "00000000000000000042.rec"
    assert parse_name(record_name(42)) == 42
    assert sorted([record_name(10), record_name(9)]) == [record_name(9), record_name(10)]
    for other in ("lock", ".42.tmp", "42.rec", "0000000000000000004x.rec"):
        assert parse_name(other) is None


# -- order and resumption ---------------------------------------------------------------

def test_records_come_out_in_order_and_survive_a_restart(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1 << 20, max_records=100)
    fill(s, range(1, 6))
    first = s.take()
    assert first.meta == {"seq": 1} and first.payload == b"x" * 10
    s.release(first, delivered=True)
    second = s.take()
    s.release(second, delivered=False)   # not delivered: stays at the head
    s.close()
    assert len(records_on_disk(tmp_path)) == 4

    s = Spool(str(tmp_path), max_bytes=1 << 20, max_records=100)
    assert s.depth() == (4, 4 * len(encode_record({"seq": 2}, b"x" * 10)))
    fill(s, [6])                         # new ids continue after the old ones
    assert [m["seq"] for m in drain(s)] == [2, 3, 4, 5, 6]
    assert records_on_disk(tmp_path) == [] and s.depth() == (0, 0)
    s.close()


def test_take_waits_for_a_record_and_wake_releases_it(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1 << 20, max_records=10)
    assert s.take(timeout=0.05) is None
    got = []
    waiter = threading.Thread(target=lambda: got.append(s.take(timeout=30)))
    waiter.start()
    fill(s, [1])
    waiter.join(30)
    assert got and got[0].meta == {"seq": 1}
    s.release(got[0], delivered=False)

    got.clear()
    s.release(s.take(), delivered=True)
    waiter = threading.Thread(target=lambda: got.append(s.take(timeout=30)))
    waiter.start()
    time.sleep(0.05)
    s.wake()
    waiter.join(30)
    assert got == [None]
    s.close()


# -- bounds ---------------------------------------------------------------------------

def test_full_spool_drops_the_oldest_and_counts_them(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1 << 20, max_records=3)
    dropped = [s.append({"seq": i}, b"x") for i in range(1, 6)]
    assert dropped == [0, 0, 0, 1, 1]
    assert s.dropped[FULL] == 2
    assert len(records_on_disk(tmp_path)) == 3
    assert [m["seq"] for m in drain(s)] == [3, 4, 5]
    s.close()


def test_byte_bound(tmp_path):
    size = len(encode_record({"seq": 1}, b"x" * 100))
    s = Spool(str(tmp_path), max_bytes=3 * size, max_records=1000)
    fill(s, range(1, 8), size=100)
    assert s.depth() == (3, 3 * size)
    assert s.dropped[FULL] == 4
    assert [m["seq"] for m in drain(s)] == [5, 6, 7]
    s.close()


def test_record_bigger_than_the_spool_is_refused_without_dropping_others(tmp_path):
    s = Spool(str(tmp_path), max_bytes=200, max_records=10)
    fill(s, [1])
    with pytest.raises(SpoolError, match="exceeds the spool's 200 bytes"):
        s.append({"seq": 2}, b"x" * 500)
    assert s.dropped[TOO_LARGE] == 1 and s.dropped[FULL] == 0
    assert [m["seq"] for m in drain(s)] == [1]
    s.close()


def test_the_record_being_sent_is_never_dropped(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1 << 20, max_records=3)
    fill(s, [1, 2, 3])
    held = s.take()
    assert held.meta == {"seq": 1}
    fill(s, [4, 5])                      # drops 2 and 3, keeps 1 that is on its way
    assert s.dropped[FULL] == 2
    s.release(held, delivered=True)
    assert [m["seq"] for m in drain(s)] == [4, 5]
    s.close()


def test_smaller_bounds_at_restart_drop_the_oldest(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1 << 20, max_records=10)
    fill(s, range(1, 9))
    s.close()
    s = Spool(str(tmp_path), max_bytes=1 << 20, max_records=3)
    assert s.dropped[FULL] == 5
    assert [m["seq"] for m in drain(s)] == [6, 7, 8]
    s.close()


# -- what a crash leaves behind ----------------------------------------------------------

def test_torn_and_damaged_files_are_discarded_not_fatal(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1 << 20, max_records=10)
    fill(s, [1, 2, 3])
    s.close()
    names = records_on_disk(tmp_path)
    # A write a SIGKILL cut short: a temporary file that never got its name.
    (tmp_path / ".4.tmp").write_bytes(encode_record({"seq": 4}, b"x" * 10)[:15])
    # A record file that is shorter than it says (a disk that lied), and one whose
    # bytes changed.
    path = tmp_path / names[1]
    path.write_bytes(path.read_bytes()[:-3])
    (tmp_path / "notes.txt").write_text("left by someone\n")

    s = Spool(str(tmp_path), max_bytes=1 << 20, max_records=10)
    assert not (tmp_path / ".4.tmp").exists()
    assert (tmp_path / "notes.txt").exists()   # not ours: left alone
    fill(s, [5])
    assert [m["seq"] for m in drain(s)] == [1, 3, 5]
    assert s.dropped[CORRUPT] == 1
    s.close()


def test_a_second_process_cannot_use_the_same_directory(tmp_path):
    s = Spool(str(tmp_path), max_bytes=1 << 20, max_records=10)
    with pytest.raises(SpoolError, match=f"in use \\(locked by pid {os.getpid()}\\)"):
        Spool(str(tmp_path), max_bytes=1 << 20, max_records=10)
    s.close()
    Spool(str(tmp_path), max_bytes=1 << 20, max_records=10).close()


def test_unusable_directory_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SpoolError, match="spool directory .*file/spool: Not a directory"):
        Spool(str(blocker / "spool"), max_bytes=1 << 20, max_records=10)


APPENDER = textwrap.dedent("""
    import os, sys
    sys.path.insert(0, os.path.join(sys.argv[2], "lib"))
    from owca.ship.spool import Spool
    s = Spool(sys.argv[1], max_bytes=1 << 30, max_records=1 << 20)
    i = 0
    while True:
        i += 1
        s.append({"seq": i}, os.urandom(20000))
        # Only now is the record acknowledged: say so.
        os.write(1, b"%d\\n" % i)
""")


@pytest.mark.integration
@pytest.mark.parametrize("round_", range(3))
def test_sigkill_during_appends_loses_nothing_acknowledged(tmp_path, round_):
    """A real process appending as fast as it can, killed at an arbitrary moment:
    every append that returned is there, whole, in order; nothing torn remains."""
    proc = subprocess.Popen([sys.executable, "-c", APPENDER, str(tmp_path), ROOT],
                            stdout=subprocess.PIPE)
    acknowledged = 0
    try:
        while acknowledged < 20 + 7 * round_:
            line = proc.stdout.readline()
            assert line, "the appender died"
            acknowledged = int(line)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    # Acknowledgements still in the pipe were given before the kill too.
    for line in proc.stdout.read().split():
        acknowledged = int(line)
    proc.stdout.close()

    s = Spool(str(tmp_path), max_bytes=1 << 30, max_records=1 << 20)
    seqs = [m["seq"] for m in drain(s)]
    assert s.dropped[CORRUPT] == 0
    assert seqs[:acknowledged] == list(range(1, acknowledged + 1))
    # At most the one append in progress got its name without being acknowledged.
    assert len(seqs) - acknowledged in (0, 1)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(spool_mod.TMP_SUFFIX)]
    s.close()


# -- a full filesystem -----------------------------------------------------------------

@pytest.mark.integration
def test_full_filesystem_drops_the_oldest_not_the_newest(small_fs):
    """The spool's filesystem fills long before the spool's own bounds: the oldest
    records make room for the new ones, each counted as disk_full; none is refused."""
    fs = small_fs(1 << 20)
    fs.fill(leave_free=200_000)
    directory = os.path.join(fs.path, "spool")
    s = Spool(directory, max_bytes=1 << 30, max_records=1 << 20)
    for seq in range(1, 101):
        s.append({"seq": seq}, b"x" * 20_000)             # 2 MB in all, on 200 kB
    kept = [m["seq"] for m in drain(s)]
    assert kept and kept == list(range(101 - len(kept), 101))   # the newest, in order
    assert s.dropped[spool_mod.DISK_FULL] == 100 - len(kept)
    assert s.dropped[FULL] == 0
    s.close()


@pytest.mark.integration
def test_free_space_reserve_is_kept(small_fs):
    fs = small_fs(2 << 20)
    fs.fill(leave_free=600_000)
    directory = os.path.join(fs.path, "spool")
    reserve = 300_000
    s = Spool(directory, max_bytes=1 << 30, max_records=1 << 20, min_free_bytes=reserve)
    for seq in range(1, 61):
        s.append({"seq": seq}, b"x" * 20_000)
        assert s.free_bytes() >= reserve
    kept = [m["seq"] for m in drain(s)]
    assert 5 < len(kept) < 20 and kept == list(range(61 - len(kept), 61))
    assert s.dropped[spool_mod.DISK_FULL] == 60 - len(kept)
    s.close()


@pytest.mark.integration
def test_no_room_even_for_one_record_drops_it_counted(small_fs):
    fs = small_fs(1 << 20)
    directory = os.path.join(fs.path, "spool")
    s = Spool(directory, max_bytes=1 << 30, max_records=1 << 20)
    fs.fill(leave_free=0)
    with pytest.raises(spool_mod.SpoolFull, match="no room on its filesystem"):
        s.append({"seq": 1}, b"x" * 20_000)
    assert s.dropped[spool_mod.DISK_FULL] == 1 and len(s) == 0
    assert not [n for n in os.listdir(directory) if n.endswith(spool_mod.TMP_SUFFIX)]
    s.close()
