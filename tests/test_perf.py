"""owca-perf (bin/owca-perf.c) and its Python side (lib/owca/measure/sources/perf/).

The parsers are tested on a recorded helper session, and the helper's event
table and wire format, read out of its C source, against the Python side's.
Everything else runs the real helper on real cgroups with real processes, in
the hierarchy that carries perf_event here; one short test mounts the
perf_event v1 controller in a temporary directory (tests/perf_mounts.py) and
releases it afterwards, so that perf_event goes back to the cgroup2 hierarchy;
cpuacct comes from the host's v1 mount.  Tests that need a hardware PMU are
skipped where the machine has none (a VM without PMU passthrough answers ENOENT).
"""
import json
import logging
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cgroup_helpers import (TestCgroup, needs_v1, needs_v2, new_name, read_int, v1_cgroup,
                            v1_missing, v2_cgroup)
from conftest import tool_command, tool_env
from owca.core import frames
from owca.core.paths import DEFAULT_PATHS
from owca.measure.sources.perf.counters import (PerfCounters, default_cgroup_root,
                                                parse_proc_cgroups, perf_event_hierarchy)
from owca.measure.sources.perf.events import (HARDWARE, KNOWN_EVENTS, MAX_EVENTS, RAW,
                                              RAW_EVENT, SOFTWARE, parse_events)
from owca.measure.sources.perf.helper import (BUILT_HELPER, HELPER_NAME, PROTOCOL_VERSION,
                                              Helper, HelperGone, Record, Reply, find_helper,
                                              parse_hello, parse_reply, parse_values,
                                              parse_values_header, record_struct)
from owca.measure.sources.perf.metrics import DERIVED_METRICS, counter_metrics, derive
from perf_mounts import mount_perf_event_v1, unmount_perf_event_v1

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / 'bin' / 'owca-perf.c'
FIXTURES = Path(__file__).resolve().parent / 'fixtures' / 'perf_session'
CFLAGS = ['-O2', '-Wall', '-Wextra', '-Werror', '-std=gnu11']

BURN = 'while True: pass'
SLEEP_100HZ = 'import time\nwhile True: time.sleep(0.01)'

needs_root = pytest.mark.skipif(os.geteuid() != 0,
                                reason='needs root: mounts perf_event, creates cgroups')


# -- parsers, on the recorded session and literal strings ------------------------------

def split_session(data):
    hello_end = data.index(b'ready\n') + len(b'ready\n')
    hello, rest = data[:hello_end].decode(), data[hello_end:]
    lines = []
    for _ in range(3):
        line, rest = rest.split(b'\n', 1)
        lines.append(line.decode())
    header, rest = rest.split(b'\n', 1)
    ntasks, nbytes = parse_values_header(header.decode())
    return hello, lines, (ntasks, nbytes), rest[:nbytes], rest[nbytes:].decode().splitlines()


@pytest.mark.skipif(sys.byteorder != 'little', reason='the sample was recorded little-endian')
def test_parsers_decode_the_recorded_session():
    expected = json.loads((FIXTURES / 'expected.json').read_text())
    hello, open_lines, header, blob, after = split_session((FIXTURES / 'stdout.bin').read_bytes())

    parsed = parse_hello(hello)
    assert parsed.version == expected['hello']['version']
    assert parsed.ncpus == expected['hello']['ncpus']
    assert parsed.events == expected['hello']['events']
    assert [list(s) for s in parsed.skipped] == expected['hello']['skipped']
    assert [list(parse_reply(line)) for line in open_lines] == expected['open_replies']
    assert list(header) == expected['values_header']
    records = parse_values(blob, len(parsed.events), header[0])
    assert [r._asdict() | {'values': list(r.values)} for r in records] == expected['records']
    assert [list(parse_reply(line)) for line in after] == expected['after_read']


def test_parse_hello_rejects_what_is_not_a_hello():
    with pytest.raises(HelperGone):
        parse_hello('owca-perf 1 2\nevent 0 task-clock\n')  # no "ready"
    with pytest.raises(HelperGone):
        parse_hello('something else 1\nready\n')
    with pytest.raises(HelperGone):
        parse_hello('owca-perf 1 2\nevent 1 task-clock\nready\n')  # index out of order


def test_parse_reply_and_values_reject_garbage():
    assert parse_reply('ok 12') == Reply(12, None, '')
    assert parse_reply('error - EINVAL unknown request') == \
        Reply(None, 'EINVAL', 'unknown request')
    for line in ('ok', 'ok x', 'fine 1', 'error 1', ''):
        with pytest.raises(HelperGone):
            parse_reply(line)
    with pytest.raises(HelperGone):
        parse_values_header('values 2')
    with pytest.raises(HelperGone):
        parse_values(b'\0' * 39, 2, 1)


def test_parse_events_orders_hardware_first_and_names_metrics():
    events = parse_events(['task-clock', 'instructions', 'stalled_mem_loads=0x140014a3',
                           'cycles'])
    assert [e.name for e in events] == ['instructions', 'stalled_mem_loads', 'cycles',
                                        'task-clock']
    assert [e.metric for e in events] == ['task_instructions', 'task_stalled_mem_loads',
                                          'task_cycles', 'task_task_clock_seconds']
    assert events[1].spec == 'stalled_mem_loads=0x140014a3'
    assert events[3].scale == 1e-9


@pytest.mark.parametrize('specs, reason', [
    (['instruction'], 'unknown perf event'),
    (['Stalls=0x1'], 'unknown perf event'),
    (['stalls=0xzz'], 'unknown perf event'),
    (['stalls=0x10000000000000000'], 'unknown perf event'),
    (['stalls=18446744073709551616'], 'does not fit in 64 bits'),
    (['cycles', 'cycles'], 'given twice'),
    (['cycles', 'cycles=0x3c'], 'given twice'),
    ([1], 'must be a string'),
])
def test_parse_events_rejects_bad_config(specs, reason):
    with pytest.raises(ValueError, match=reason):
        parse_events(specs)


def test_counter_metrics_are_absent_rather_than_an_undercount():
    events = parse_events(['instructions', 'task-clock'])
    whole = Record(0, 2, 0, (5000, 2_000_000_000), 1.25, 1.5)
    assert counter_metrics(whole, events) == {
        'task_instructions': 5000, 'task_task_clock_seconds': 2.0,
        'task_scaling_factor_avg': 1.25, 'task_scaling_factor_max': 1.5}
    assert counter_metrics(Record(0, 1, 1, (5000, 1), 1.0, 1.0), events) == {}
    never_ran = counter_metrics(Record(0, 0, 0, (0, 0), 0.0, 0.0), events)
    assert never_ran == {'task_instructions': 0, 'task_task_clock_seconds': 0.0}


def test_derive_from_deltas():
    previous = {'task_instructions': 1000, 'task_cycles': 2000, 'task_cache_misses': 10,
                'task_cache_references': 100}
    current = {'task_instructions': 5000, 'task_cycles': 4000, 'task_cache_misses': 30,
               'task_cache_references': 180}
    assert derive(previous, current, 2.0) == {
        'task_ipc': 2.0, 'task_ips': 2000.0, 'task_cache_hit_ratio': 0.75,
        'task_cache_misses_per_kilo_instructions': 5.0}


def test_derive_leaves_out_what_it_cannot_compute():
    previous = {'task_instructions': 1000, 'task_cycles': 2000}
    # cycles did not move: no IPC; no cache events: no cache ratios
    assert derive(previous, {'task_instructions': 1000, 'task_cycles': 2000}, 1.0) == \
        {'task_ips': 0.0}
    # a counter went backwards (helper restarted): nothing from it
    assert derive(previous, {'task_instructions': 10, 'task_cycles': 3000}, 1.0) == {}
    # software events only: no ratios at all
    assert derive({'task_task_clock_seconds': 1.0}, {'task_task_clock_seconds': 2.0},
                  1.0) == {}


# -- the helper's C source and the Python side, kept in step ------------------------------

def c_header_comment():
    """The comment at the top of bin/owca-perf.c, where the wire format is written."""
    text = SOURCE.read_text()
    return text[text.index('/*'):text.index('*/')]


def c_define(name):
    return int(re.search(r'^#define %s (\d+)$' % name, SOURCE.read_text(), re.M).group(1))


def c_known_events():
    """The helper's known_events table: [(name, perf type, perf config)]."""
    table = re.search(r'known_events\[\] = \{\n(.*?)\n\};', SOURCE.read_text(), re.S).group(1)
    entries = re.findall(r'^\s*\{"([^"]+)", (\w+), (\w+)\},$', table, re.M)
    assert len(entries) == len(table.splitlines()), 'an entry this test cannot read: %s' % table
    return entries


def test_the_helper_knows_the_events_of_the_python_grammar_and_no_others():
    in_c = c_known_events()
    in_python = [(e.name, e.perf_type, e.perf_config) for e in KNOWN_EVENTS]
    assert len(set(in_c)) == len(in_c) and len(set(in_python)) == len(in_python)
    assert sorted(set(in_c) - set(in_python)) == [], \
        'bin/owca-perf.c knows events that events.KNOWN_EVENTS lacks (or types/configs differ)'
    assert sorted(set(in_python) - set(in_c)) == [], \
        'events.KNOWN_EVENTS has events that bin/owca-perf.c lacks (or types/configs differ)'
    # The grammar takes each by name, and orders groups by its type.
    for name, perf_type, _ in in_c:
        assert [e.spec for e in parse_events([name])] == [name]
        assert perf_type in (HARDWARE, SOFTWARE)


def test_the_helpers_usage_lists_the_events_of_its_table():
    usage = re.search(r'EVENT +(.*?)\(hardware\);(.*?)\(software\)', c_header_comment(), re.S)
    hardware, software = (re.findall(r'[a-z][a-z-]*', group) for group in usage.groups())
    assert hardware == [e.name for e in KNOWN_EVENTS if e.perf_type == HARDWARE]
    assert software == [e.name for e in KNOWN_EVENTS if e.perf_type == SOFTWARE]


def test_raw_events_and_the_event_count_are_limited_as_in_the_helper():
    source = SOURCE.read_text()
    assert re.search(r'ev->type = (\w+);', source).group(1) == RAW
    name_size = int(re.search(r'struct event \{\n\s+char name\[(\d+)\];', source).group(1))
    assert RAW_EVENT.match('a' * (name_size - 1) + '=1')  # and its NUL
    assert not RAW_EVENT.match('a' * name_size + '=1')
    assert c_define('MAX_EVENTS') == MAX_EVENTS
    parse_events(['r%d=1' % i for i in range(MAX_EVENTS)])
    with pytest.raises(ValueError, match='at most %d perf events' % MAX_EVENTS):
        parse_events(['r%d=1' % i for i in range(MAX_EVENTS + 1)])


def test_the_wire_format_written_in_the_helper_is_the_parsers():
    header = c_header_comment()
    assert int(re.search(r'Wire protocol, version (\d+)', header).group(1)) == PROTOCOL_VERSION
    assert c_define('PROTOCOL_VERSION') == PROTOCOL_VERSION
    name, version = re.search(r'^ \*\s+(\S+) (\d+) NCPUS$', header, re.M).groups()
    assert (name, int(version)) == (HELPER_NAME, PROTOCOL_VERSION)

    record = header[header.index('A values record'):header.index('Values are cumulative')]
    assert 'native byte order and sizes, no padding' in record  # struct's "="
    fields = re.findall(r'^ \*\s+(u16|u32|u64|f64) (\w+)(\[NEVENTS\])?', record, re.M)
    code = {'u16': 'H', 'u32': 'I', 'u64': 'Q', 'f64': 'd'}
    for nevents in (0, 1, MAX_EVENTS):
        written = '=' + ''.join(('%d' % nevents if array else '') + code[kind]
                                for kind, _, array in fields)
        assert record_struct(nevents).format == written
    assert [name + ('s' if array else '') for _, name, array in fields] == list(Record._fields)


def test_find_helper_looks_in_build_of_this_source_tree():
    assert BUILT_HELPER == REPO / 'build' / HELPER_NAME


def test_parse_proc_cgroups():
    text = ('#subsys_name\thierarchy\tnum_cgroups\tenabled\n'
            'cpu\t1\t12\t1\nperf_event\t0\t4\t1\n')
    assert parse_proc_cgroups(text) == {'cpu': (1, 12, 1), 'perf_event': (0, 4, 1)}
    assert parse_proc_cgroups('') == {}


def test_configured_helper_must_be_executable(tmp_path):
    script = tmp_path / 'owca-perf'
    script.write_text('')
    with pytest.raises(FileNotFoundError, match='not an executable'):
        find_helper(str(script))


# -- the real helper ---------------------------------------------------------------------

def test_helper_compiles_without_warnings(tmp_path):
    cc = shutil.which('cc')
    if cc is None:
        pytest.skip('no C compiler')
    result = subprocess.run([cc, *CFLAGS, '-o', str(tmp_path / 'owca-perf'), str(SOURCE)],
                            capture_output=True, text=True)
    assert result.returncode == 0 and result.stderr == ''


@pytest.fixture(scope='session')
def helper_binary(tmp_path_factory):
    cc = shutil.which('cc')
    if cc is None:
        pytest.skip('no C compiler to build the helper')
    binary = tmp_path_factory.mktemp('helper') / 'owca-perf'
    subprocess.run([cc, *CFLAGS, '-o', str(binary), str(SOURCE)], check=True)
    return str(binary)


@pytest.fixture(scope='session')
def software_events(helper_binary):
    helper = Helper([helper_binary, 'task-clock', 'context-switches'])
    helper.close()
    if helper.hello.events != ['task-clock', 'context-switches']:
        pytest.skip('perf_event_open refuses software events here: %s' % (helper.hello.skipped,))
    return helper.hello


@pytest.fixture(scope='session')
def hardware_pmu(helper_binary):
    """Whether this machine counts hardware events (None) or why not."""
    helper = Helper([helper_binary, 'instructions', 'cycles'])
    helper.close()
    if helper.hello.skipped:
        return 'no hardware PMU here: %s' % ', '.join(
            '%s: %s' % (s.name, s.errno) for s in helper.hello.skipped)
    return None


def perf_event_hierarchy_id():
    return perf_event_hierarchy(DEFAULT_PATHS)[0]

@pytest.fixture(scope='module')
def perf_root(software_events):
    """Where the tests' task cgroups go for perf: where owca-measure finds the
    perf_event hierarchy (cgroup2 on this kind of machine).  Mounting
    perf_event as v1 binds the controller to v1 host-wide while it is mounted
    (cgroup2 fds then get ENOENT, and containers started meanwhile mount it
    too), so only one short test below does that."""
    if os.geteuid() != 0:
        pytest.skip('needs root to create cgroups')
    try:
        return default_cgroup_root(DEFAULT_PATHS)
    except ValueError as e:
        pytest.skip(str(e))


@needs_v2
def test_cgroup2_carries_perf_events_where_perf_event_is_not_bound_to_v1(perf_root):
    if perf_event_hierarchy_id() != 0:
        pytest.skip('perf_event is bound to a cgroup v1 hierarchy here')
    assert perf_root == DEFAULT_PATHS.cgroup_v2_root


@needs_root
@needs_v2
def test_counts_in_a_perf_event_v1_hierarchy_mounted_for_the_test(helper_binary, software_events,
                                                                  tmp_path):
    if perf_event_hierarchy_id() != 0:
        pytest.skip('perf_event is bound to v1 already: the other tests count there')
    mountpoint = str(tmp_path)
    mount_perf_event_v1(mountpoint)
    try:
        v1 = TestCgroup(new_name('owca-test-perf'), {})
        v1.dirs['perf_event'] = os.path.join(mountpoint, v1.path.lstrip('/'))
        os.mkdir(v1.dirs['perf_event'])
        counting = PerfCounters(['task-clock'], helper_path=helper_binary,
                                cgroup_root=mountpoint)
        try:
            v1.start_python(BURN)
            with v2_cgroup() as v2:
                counting.update({'v1': v1.path})
                read_until(counting, 'v1', 'task_task_clock_seconds', 0.1)
                # While perf_event is bound to v1, a cgroup2 directory is refused.
                on_v2 = PerfCounters(['task-clock'], helper_path=helper_binary,
                                     cgroup_root=DEFAULT_PATHS.cgroup_v2_root)
                try:
                    on_v2.update({'v2': v2.path})
                    assert on_v2.failed_tasks == {'v2': 'ENOENT'}
                finally:
                    on_v2.close()
        finally:
            counting.close()
            v1.cleanup()
    finally:
        assert unmount_perf_event_v1(mountpoint, DEFAULT_PATHS), \
            'perf_event is still bound to cgroup v1: %s' % (perf_event_hierarchy(DEFAULT_PATHS),)


# Hang guard for the waits below: long enough for a busy machine, short of CI's limit.
GUARD_SECONDS = 120


def read_until(counting, name, metric, minimum):
    """The task's metrics once `metric` has reached `minimum`: on a loaded machine a
    child runs late, so the tests wait for the work they count rather than a time."""
    deadline = time.monotonic() + GUARD_SECONDS
    while True:
        metrics = counting.read().get(name, {})
        if metrics.get(metric, 0) >= minimum:
            return metrics
        assert time.monotonic() < deadline, '%s of %s stayed below %s: %s' % (
            metric, name, minimum, metrics)
        time.sleep(0.1)


def stop(pid):
    """SIGSTOP a child and wait until it stands still: counters read while it stays
    stopped all cover the same run of it, however late this process reads them."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + GUARD_SECONDS
    while True:
        with open('/proc/%d/stat' % pid) as f:
            if f.read().rsplit(')', 1)[1].split()[0] == 'T':
                return
        assert time.monotonic() < deadline, 'pid %d did not stop' % pid
        time.sleep(0.01)


def ctxt_switches(pid):
    """The kernel's own count of a process's context switches (/proc/PID/status)."""
    with open('/proc/%d/status' % pid) as f:
        fields = dict(line.split(':', 1) for line in f)
    return sum(int(fields[k]) for k in ('voluntary_ctxt_switches',
                                        'nonvoluntary_ctxt_switches'))


@pytest.fixture
def tasks(perf_root):
    """make(code, cpuacct=False) -> (cgroup path, TestCgroup): a Python child
    running `code` in a new cgroup of the perf hierarchy (and of cpuacct)."""
    made = []

    def make(code, cpuacct=False):
        cg = TestCgroup(new_name('owca-test-perf'), {})
        made.append(cg)
        cg.dirs['perf_event'] = os.path.join(perf_root, cg.path.lstrip('/'))
        if cpuacct:
            missing = v1_missing(controllers=('cpuacct',))
            if missing:
                pytest.skip('no cgroup v1 cpuacct to compare with: %s' % missing)
            cg.dirs['cpuacct'] = DEFAULT_PATHS.cgroup_v1('cpuacct', cg.path)
        for d in cg.dirs.values():
            os.mkdir(d)
        cg.start_python(code)
        return cg.path, cg

    yield make
    for cg in reversed(made):
        cg.cleanup()


@pytest.fixture
def counters(helper_binary, perf_root):
    made = []

    def make(events=('task-clock', 'context-switches'), **kwargs):
        counting = PerfCounters(list(events), helper_path=helper_binary,
                                cgroup_root=perf_root, **kwargs)
        made.append(counting)
        return counting

    yield make
    for counting in made:
        counting.close()


@needs_root
def test_task_clock_matches_cpuacct_usage(tasks, counters):
    name, cg = tasks(BURN, cpuacct=True)
    counting = counters()
    counting.update({'burner': name})
    time.sleep(0.2)
    burner = cg.children[0].pid
    stop(burner)
    first, usage_first = counting.read()['burner'], read_int(cg.file('cpuacct', 'cpuacct.usage'))
    os.kill(burner, signal.SIGCONT)
    # Half a CPU-second of burning, however long a busy machine takes to give it.
    deadline = time.monotonic() + GUARD_SECONDS
    while read_int(cg.file('cpuacct', 'cpuacct.usage')) - usage_first < 0.5e9:
        assert time.monotonic() < deadline, 'the burner got no CPU for %d s' % GUARD_SECONDS
        time.sleep(0.1)
    stop(burner)
    second, usage_second = counting.read()['burner'], read_int(cg.file('cpuacct', 'cpuacct.usage'))
    os.kill(burner, signal.SIGCONT)

    task_clock = second['task_task_clock_seconds'] - first['task_task_clock_seconds']
    usage = (usage_second - usage_first) / 1e9
    assert task_clock == pytest.approx(usage, rel=0.05)
    assert second['task_scaling_factor_avg'] == pytest.approx(1.0)
    assert not any(m in second for m in DERIVED_METRICS)  # no hardware inputs


@needs_root
def test_context_switches_of_a_task_waking_100_times_a_second(tasks, counters):
    name, cg = tasks(SLEEP_100HZ)
    pid = cg.children[0].pid
    counting = counters()
    counting.update({'sleeper': name})
    time.sleep(0.3)
    stop(pid)
    first, kernel_first = counting.read()['sleeper'], ctxt_switches(pid)
    os.kill(pid, signal.SIGCONT)
    # A hundred wakeups, as many as the kernel counts for the process itself.
    read_until(counting, 'sleeper', 'task_context_switches', first['task_context_switches'] + 100)
    stop(pid)
    second, kernel = counting.read()['sleeper'], ctxt_switches(pid) - kernel_first
    os.kill(pid, signal.SIGCONT)
    counted = second['task_context_switches'] - first['task_context_switches']
    # Both read while it is stopped: the same run of it, give or take the switches
    # the stop itself adds.
    assert kernel * 0.9 - 5 <= counted <= kernel + 5, (counted, kernel)


@needs_root
def test_missing_hardware_event_is_warned_once_and_the_others_flow(
        tasks, counters, hardware_pmu, caplog):
    if hardware_pmu is None:
        pytest.skip('this machine counts instructions: nothing is missing')
    name, _ = tasks(BURN)
    caplog.set_level(logging.WARNING, logger='owca.measure.sources.perf')
    counting = counters(['instructions', 'task-clock'])
    counting.update({'burner': name})
    metrics = read_until(counting, 'burner', 'task_task_clock_seconds', 1e-9)
    warnings = [r.getMessage() for r in caplog.records if 'instructions' in r.getMessage()]
    assert len(warnings) == 1 and 'not available' in warnings[0]
    assert metrics['task_task_clock_seconds'] > 0
    assert 'task_instructions' not in metrics and 'task_ipc' not in metrics


@needs_root
def test_hardware_counters_and_ratios(tasks, counters, hardware_pmu):
    if hardware_pmu is not None:
        pytest.skip(hardware_pmu)
    name, _ = tasks(BURN)
    counting = counters(['instructions', 'cycles', 'cache-misses', 'cache-references',
                         'task-clock'])
    counting.update({'burner': name})
    time.sleep(0.2)
    counting.read()
    time.sleep(0.5)
    metrics = counting.read()['burner']
    assert metrics['task_instructions'] > 0 and metrics['task_cycles'] > 0
    assert 0 < metrics['task_ipc'] < 10
    assert metrics['task_ips'] > 1e6
    assert metrics['task_cache_hit_ratio'] <= 1
    assert metrics['task_scaling_factor_max'] >= 1


@needs_root
def test_killed_helper_is_restarted_and_metrics_come_back(tasks, counters, caplog):
    name, _ = tasks(BURN)
    counting = counters()
    counting.update({'burner': name})
    assert 'burner' in counting.read()
    old_pid = counting.helper.pid
    os.kill(old_pid, signal.SIGKILL)
    caplog.set_level(logging.WARNING, logger='owca.measure.sources.perf')
    assert counting.read() == {}  # the cycle of the death: absent, not wrong
    assert counting.restarts == 1 and counting.helper.pid != old_pid
    assert any('restarting' in r.getMessage() for r in caplog.records)
    read_until(counting, 'burner', 'task_task_clock_seconds', 0.05)


@needs_root
def test_helper_restarted_while_thousands_of_files_are_open(tasks, counters):
    """owca-measure holds its tasks' cgroup files open: a helper restarted at
    1000 tasks gets pipe descriptors above 1024, past what select() takes."""
    name, _ = tasks(BURN)
    counting = counters()
    counting.update({'burner': name})
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2048:
        pytest.skip('needs a hard RLIMIT_NOFILE of 2048 for 1100 files, have %d' % hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    try:
        os.kill(counting.helper.pid, signal.SIGKILL)
        assert counting.read() == {}
        assert counting.helper is not None and counting.helper.process.stdout.fileno() > 1024
        read_until(counting, 'burner', 'task_task_clock_seconds', 0.05)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@needs_root
def test_hung_helper_is_replaced_within_the_timeout(tasks, counters):
    name, _ = tasks(SLEEP_100HZ)
    counting = counters(timeout=2.0)
    counting.update({'sleeper': name})
    assert 'sleeper' in counting.read()
    stopped, restarts = counting.helper.pid, counting.restarts
    os.kill(stopped, signal.SIGSTOP)
    # The read gives up after its timeout (a stopped helper would otherwise hold it for
    # ever): the cycle has no counts, and the helper is replaced.
    assert counting.read() == {}
    assert counting.helper.pid != stopped and counting.restarts == restarts + 1
    with pytest.raises(ProcessLookupError):
        os.kill(stopped, 0)  # killed and reaped, not left behind
    assert 'sleeper' in counting.read()


@needs_root
def test_removed_cgroup_costs_that_task_only(tasks, counters, perf_root):
    kept, _ = tasks(SLEEP_100HZ)
    removed, removed_task = tasks(SLEEP_100HZ)
    counting = counters()
    counting.update({'kept': kept, 'removed': removed})
    assert set(counting.read()) == {'kept', 'removed'}
    removed_task.cleanup()  # its process exits and its cgroup goes, while counted
    assert 'kept' in counting.read()
    counting.update({'kept': kept, 'removed': removed, 'never': new_name('owca-test-perf')})
    assert counting.failed_tasks == {'never': 'ENOENT'}
    assert 'kept' in counting.read()
    counting.update({'kept': kept})
    assert set(counting.read()) == {'kept'} and counting.failed_tasks == {}


def open_fds(pid):
    return len(os.listdir(DEFAULT_PATHS.proc(str(pid), 'fd')))


@needs_root
def test_tasks_that_go_have_their_descriptors_closed(tasks, counters):
    names = [tasks(SLEEP_100HZ)[0] for _ in range(3)]
    counting = counters()
    counting.update({})
    baseline = open_fds(counting.helper.pid)
    counting.update({n: n for n in names})
    per_task = len(counting.active_events) * counting.helper.hello.ncpus
    assert open_fds(counting.helper.pid) == baseline + 3 * per_task
    counting.update({names[0]: names[0]})
    assert open_fds(counting.helper.pid) == baseline + per_task
    counting.update({})
    assert open_fds(counting.helper.pid) == baseline


def helper_fds(counters):
    """(descriptors an idle helper holds, descriptors each counted task adds)."""
    counting = counters()
    counting.update({})
    return open_fds(counting.helper.pid), \
        len(counting.active_events) * counting.helper.hello.ncpus


@needs_root
def test_low_soft_fd_limit_is_raised(tasks, counters):
    prlimit = shutil.which('prlimit')
    if prlimit is None:
        pytest.skip('no prlimit (util-linux) to start the helper under a low limit')
    names = [tasks(SLEEP_100HZ)[0] for _ in range(12)]
    baseline, per_task = helper_fds(counters)
    hard = max(4096, baseline + (len(names) + 1) * per_task)  # room for all on any CPU count
    counting = counters(wrapper=[prlimit, '--nofile=16:%d' % hard, '--'])
    counting.update({n: n for n in names})
    assert counting.failed_tasks == {}
    assert set(counting.read()) == set(names)


@needs_root
def test_fd_limit_that_cannot_be_raised_is_reported(tasks, counters, caplog):
    prlimit, setpriv = shutil.which('prlimit'), shutil.which('setpriv')
    if prlimit is None or setpriv is None:
        pytest.skip('no prlimit/setpriv (util-linux) to start the helper under a hard limit')
    names = [tasks(SLEEP_100HZ)[0] for _ in range(12)]
    # A limit with room for four tasks' descriptors (one per event and CPU), whatever the
    # CPU count; without CAP_SYS_RESOURCE the helper cannot raise it.
    baseline, per_task = helper_fds(counters)
    limit = baseline + 4 * per_task + per_task // 2
    caplog.set_level(logging.WARNING, logger='owca.measure.sources.perf')
    counting = counters(wrapper=[setpriv, '--bounding-set', '-sys_resource', '--inh-caps',
                                 '-sys_resource', prlimit, '--nofile=%d:%d' % (limit, limit),
                                 '--'])
    counting.update({n: n for n in names})
    failed = counting.failed_tasks
    counted = counting.read()
    assert failed and set(failed.values()) == {'EMFILE'}
    assert len(counted) == 4 and set(counted) | set(failed) == set(names)
    assert any('%d tasks could not be counted' % len(failed) in r.getMessage()
               and 'EMFILE' in r.getMessage() for r in caplog.records)
    # Tasks that go free descriptors: the next update counts as many others.
    gone = sorted(counted)[:2]
    counting.update({n: n for n in names if n not in gone})
    assert len(counting.failed_tasks) == len(failed) - 2
    assert len(counting.read()) == len(counted)


@needs_root
def test_helper_is_clean_under_valgrind_with_tasks_coming_and_going(
        tasks, helper_binary):
    valgrind = shutil.which('valgrind')
    if valgrind is None:
        pytest.skip('valgrind is not installed')
    started = [tasks(SLEEP_100HZ) for _ in range(4)]
    path = [cg.dirs['perf_event'] for _, cg in started]
    helper = Helper([valgrind, '-q', '--error-exitcode=99', '--leak-check=full',
                     '--show-leak-kinds=all', '--errors-for-leak-kinds=all',
                     helper_binary, 'task-clock', 'context-switches', 'page-faults'],
                    timeout=60)
    try:
        opens = helper.request(['open %d %s' % (i, p) for i, p in enumerate(path[:3])])
        assert [r.errno for r in opens] == [None] * 3
        assert len(helper.read()) == 3
        replies = helper.request(['close 1', 'open 1 %s' % path[3], 'open 9 %s-gone' % path[0],
                                  'close 0', 'open 0', 'close 5', 'nonsense', 'x' * 5000,
                                  'open 1048576 %s' % path[0]])
        assert [r.errno for r in replies] == [None, None, 'ENOENT', None, 'EINVAL', 'ENOENT',
                                              'EINVAL', 'E2BIG', 'EINVAL']
        assert [r.slot for r in helper.read()] == [1, 2]
        # one batch, carried out in request order
        replies = helper.request(['close 2', 'open 2 %s' % path[2], 'open 2 %s' % path[2],
                                  'close 2', 'close 2', 'open 2 %s' % path[2]])
        assert [(r.slot, r.errno) for r in replies] == [
            (2, None), (2, None), (2, 'EEXIST'), (2, None), (2, 'ENOENT'), (2, None)]
        assert [r.slot for r in helper.read()] == [1, 2]
        started[3][1].cleanup()  # slot 1's cgroup goes while it is open
        assert [r.slot for r in helper.read()] == [1, 2]
        assert helper.request(['close 1'])[0].errno is None
    finally:
        helper.close()
    assert helper.process.returncode == 0  # 99: valgrind found an error or a leak


@needs_root
def test_helper_exits_at_end_of_input_with_tasks_open(tasks, helper_binary):
    valgrind = shutil.which('valgrind')
    if valgrind is None:
        pytest.skip('valgrind is not installed')
    _, cg = tasks(SLEEP_100HZ)
    helper = Helper([valgrind, '-q', '--error-exitcode=99', '--leak-check=full',
                     '--errors-for-leak-kinds=all', helper_binary, 'task-clock'],
                    timeout=60)
    assert helper.request(['open 0 %s' % cg.dirs['perf_event']])[0].errno is None
    helper.process.stdin.close()
    assert helper.process.wait(timeout=60) == 0
    helper.process.stdout.close()


# -- through owca-measure -----------------------------------------------------------------

def measure_config(tmp_path, **measure):
    path = tmp_path / 'owca.yaml'
    path.write_text(yaml.safe_dump({'measure': measure}))
    return str(path)


def child_pids(pid):
    with open(DEFAULT_PATHS.proc(str(pid), 'task', str(pid), 'children')) as f:
        return [int(p) for p in f.read().split()]


@needs_root
@needs_v1
def test_owca_measure_goes_on_when_its_helper_is_killed(perf_root, helper_binary, tmp_path):
    config = measure_config(tmp_path, perf_events=['task-clock', 'context-switches'],
                            perf_helper=helper_binary, perf_cgroup_root=perf_root)
    with v1_cgroup() as cg:
        cg.dirs['perf_event'] = os.path.join(perf_root, cg.path.lstrip('/'))
        os.mkdir(cg.dirs['perf_event'])
        cg.start_python(SLEEP_100HZ)
        measure = subprocess.Popen(tool_command('measure', '--config', config),
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=tool_env())

        def cycle(seq):
            task = {'id': 't', 'name': 't', 'cgroup_path': cg.path, 'labels': {},
                    'resources': {}}
            measure.stdin.write(frames.encode(frames.tasks_frame(seq, [task])))
            measure.stdin.flush()
            frame = json.loads(measure.stdout.readline())
            own = {s['name']: s['value'] for s in frame['metrics']}
            return frame['tasks']['t']['metrics'], own

        try:
            first, _ = cycle(1)
            assert 'task_task_clock_seconds' in first
            helper_pid, = child_pids(measure.pid)
            os.kill(helper_pid, signal.SIGKILL)
            second, own = cycle(2)
            assert 'task_cpu_usage_seconds' in second  # the rest of the cycle went on
            assert not any(m in second for m in ('task_task_clock_seconds',
                                                 'task_context_switches'))
            assert own['owca_perf_helper_restarts_total'] == 1
            time.sleep(0.1)
            third, _ = cycle(3)
            assert third['task_context_switches'] > 0
            assert child_pids(measure.pid) != [helper_pid]
        finally:
            measure.stdin.close()
            assert measure.wait(20) == 0
            stderr = measure.stderr.read().decode()
            measure.stdout.close()
            measure.stderr.close()
    assert 'restarting it' in stderr


@pytest.mark.parametrize('measure, reason', [
    ({'perf_events': ['task-clock', 'instruction']}, "unknown perf event 'instruction'"),
    ({'perf_events': ['task-clock'], 'perf_helper': '/nonexistent/owca-perf',
      'perf_cgroup_root': '/nonexistent'},
     'perf helper /nonexistent/owca-perf is not an executable file'),
])
def test_owca_measure_refuses_a_perf_configuration_it_cannot_use(tmp_path, measure, reason):
    config = measure_config(tmp_path, **measure)
    done = subprocess.run(tool_command('measure', '--config', config, '--once'),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          env=tool_env(), timeout=60)
    assert done.returncode == 2
    assert reason in done.stderr and done.stderr.count('\n') == 1
