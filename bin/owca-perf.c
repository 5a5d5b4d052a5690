/*
 * owca-perf - per-cgroup perf counters for owca-measure.
 *
 * owca-measure starts this helper, owns it and talks to it over its stdin
 * and stdout.  The helper opens, per task cgroup and per online CPU, one
 * perf event group in cgroup mode (perf_event_open with PERF_FLAG_PID_CGROUP,
 * read_format GROUP | TOTAL_TIME_ENABLED | TOTAL_TIME_RUNNING), keeps the
 * file descriptors between cycles, and answers one read request with the
 * counts of every task at once.  libc only.
 *
 * Usage: owca-perf [-c CPULIST] EVENT...
 *   CPULIST  the online CPUs, e.g. "0-3,8" (default: 0 .. online count - 1)
 *   EVENT    instructions, cycles, cache-misses, cache-references,
 *            branch-misses, branch-instructions (hardware);
 *            task-clock, context-switches, cpu-migrations, page-faults
 *            (software); NAME=CONFIG for a raw PMU event, CONFIG in hex
 *            (0x...) or decimal, NAME of [a-z0-9_].
 *   The first usable event leads each group; list hardware events first.
 *
 * Wire protocol, version 1
 * ------------------------
 * Requests are text lines on stdin (at most 4096 bytes each).  Replies come
 * in request order on stdout; text lines end with "\n".  Several requests
 * may be written at once: replies are flushed whenever the helper has
 * consumed all the input it was given, and consecutive opens and closes are
 * carried out together, CPU by CPU (the replies say what each one did, as if
 * they had run one after the other).
 *
 * At start, before reading any request, the helper writes its hello:
 *     owca-perf 1 NCPUS
 *     event INDEX NAME                 once per usable event, INDEX from 0
 *     skip NAME ERRNO TEXT             once per event this machine lacks
 *     ready
 * An event is probed by opening it on the helper itself; one that fails
 * (ENOENT, EOPNOTSUPP, EINVAL...) is skipped and the others go on.  If no
 * event is usable the hello still ends with "ready" and every read reports
 * zero values.
 *
 *   open SLOT PATH    open the groups for the cgroup directory PATH (rest of
 *                     the line) under the client's number SLOT (0 .. 2^20-1)
 *                     -> "ok SLOT" or "error SLOT ERRNO TEXT" (EEXIST:
 *                     the slot is in use; ENOENT: no such cgroup)
 *   close SLOT        close that task's descriptors
 *                     -> "ok SLOT" or "error SLOT ENOENT TEXT"
 *   read              -> "values NTASKS NBYTES" then NBYTES of binary
 *                        records, one per open task, in slot order
 *   quit              exit 0 (so does end of input)
 * A line the helper cannot use gets "error - ERRNO TEXT" (EINVAL; E2BIG for
 * a line longer than 4096 bytes) and it goes on.
 * ERRNO is the symbolic errno name (ENOENT, EMFILE, ...) or "E<number>".
 *
 * A values record, native byte order and sizes, no padding:
 *     u32 slot
 *     u16 cpus_counted   CPUs whose group counted while the cgroup ran
 *     u16 cpus_unknown   CPUs whose counts cannot be known: the group never
 *                        got onto the PMU while the cgroup ran there, or the
 *                        read failed
 *     u64 value[NEVENTS] summed over the counted CPUs, each CPU's count
 *                        scaled by time_enabled / time_running
 *     f64 scale_avg      mean and maximum of time_enabled / time_running
 *     f64 scale_max      over the counted CPUs (0 when none counted)
 * Values are cumulative since the task was opened.
 *
 * Descriptors: each open task holds NCPUS x NEVENTS.  On EMFILE/ENFILE the
 * helper raises its soft limit to the hard one, then (with
 * CAP_SYS_RESOURCE) doubles the hard one, and retries; when that fails it
 * opens what fits, one task at a time, the others get "error SLOT EMFILE
 * ...", and the tasks already open go on.
 *
 * Exit: 0 on quit or end of input, 1 when stdout is gone, 2 on bad usage.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <linux/perf_event.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PROTOCOL_VERSION 1
#define MAX_LINE 4096
#define IN_BUFFER 65536
#define MAX_EVENTS 16
#define MAX_CPUS 4096
#define MAX_SLOT (1u << 20)
#define MAX_NOFILE (1u << 20)

struct event {
    char name[64];
    uint32_t type;
    uint64_t config;
};

/* owca-measure's event grammar has the same table (KNOWN_EVENTS in
 * lib/owca/measure/sources/perf/events.py); tests/test_perf.py keeps them equal. */
static const struct event known_events[] = {
    {"instructions", PERF_TYPE_HARDWARE, PERF_COUNT_HW_INSTRUCTIONS},
    {"cycles", PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES},
    {"cache-misses", PERF_TYPE_HARDWARE, PERF_COUNT_HW_CACHE_MISSES},
    {"cache-references", PERF_TYPE_HARDWARE, PERF_COUNT_HW_CACHE_REFERENCES},
    {"branch-misses", PERF_TYPE_HARDWARE, PERF_COUNT_HW_BRANCH_MISSES},
    {"branch-instructions", PERF_TYPE_HARDWARE, PERF_COUNT_HW_BRANCH_INSTRUCTIONS},
    {"task-clock", PERF_TYPE_SOFTWARE, PERF_COUNT_SW_TASK_CLOCK},
    {"context-switches", PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CONTEXT_SWITCHES},
    {"cpu-migrations", PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_MIGRATIONS},
    {"page-faults", PERF_TYPE_SOFTWARE, PERF_COUNT_SW_PAGE_FAULTS},
};

struct task {
    int *fds;    /* ncpus x nevents; the group leader of CPU i is fds[i * nevents] */
    int closing; /* a close request for it waits in the batch */
};

/* Opens and closes are batched: consecutive requests are carried out CPU by
 * CPU with the helper pinned to that CPU, so that the kernel installs and
 * removes each event locally instead of sending an IPI per event (measured on
 * a 2-vCPU VM: 12 instead of 44 us per task to open, 7 instead of 28 to
 * close).  Replies still come in request order. */
struct request {
    int open;
    uint32_t slot;
    const char *path; /* into the input buffer, valid until the batch is done */
    int cgroup_fd;
    int *fds;
    int err; /* errno of the first failure, 0 if none */
    int err_event, err_cpu;
};
#define MAX_BATCH 128

static struct event events[MAX_EVENTS];
static int nevents;
static int cpus[MAX_CPUS];
static int ncpus;
static struct task **tasks; /* indexed by slot */
static uint32_t tasks_cap;
static uint32_t tasks_open;
static struct task pending_open; /* tasks[slot] while its open waits in the batch */
static struct request batch[MAX_BATCH];
static int batch_len;
static cpu_set_t allowed_cpus;
static int can_pin;

static struct {
    char *buf;
    size_t len, cap;
} out;

static void die(const char *msg) {
    fprintf(stderr, "owca-perf: %s\n", msg);
    exit(1);
}

static void out_reserve(size_t extra) {
    if (out.len + extra <= out.cap) return;
    size_t cap = out.cap ? out.cap : 65536;
    while (cap < out.len + extra) cap *= 2;
    char *buf = realloc(out.buf, cap);
    if (!buf) die("out of memory");
    out.buf = buf;
    out.cap = cap;
}

static void out_printf(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n < 0) die("vsnprintf failed");
    out_reserve((size_t)n + 1);
    va_start(ap, fmt);
    vsnprintf(out.buf + out.len, (size_t)n + 1, fmt, ap);
    va_end(ap);
    out.len += (size_t)n;
}

static void out_bytes(const void *p, size_t n) {
    out_reserve(n);
    memcpy(out.buf + out.len, p, n);
    out.len += n;
}

static void out_flush(void) {
    size_t done = 0;
    while (done < out.len) {
        ssize_t n = write(STDOUT_FILENO, out.buf + done, out.len - done);
        if (n < 0 && errno == EINTR) continue;
        if (n <= 0) {
            /* The reader went away: nobody is left to answer. */
            fprintf(stderr, "owca-perf: stdout closed: %s\n", strerror(errno));
            exit(1);
        }
        done += (size_t)n;
    }
    out.len = 0;
}

static const char *errno_name(int e) {
    static char unknown[16];
    switch (e) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case ESRCH: return "ESRCH";
    case EINTR: return "EINTR";
    case EIO: return "EIO";
    case E2BIG: return "E2BIG";
    case EBADF: return "EBADF";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EBUSY: return "EBUSY";
    case EEXIST: return "EEXIST";
    case ENODEV: return "ENODEV";
    case ENOTDIR: return "ENOTDIR";
    case EINVAL: return "EINVAL";
    case ENFILE: return "ENFILE";
    case EMFILE: return "EMFILE";
    case ENOSPC: return "ENOSPC";
    case ERANGE: return "ERANGE";
    case ENOSYS: return "ENOSYS";
    case ENAMETOOLONG: return "ENAMETOOLONG";
    case EOPNOTSUPP: return "EOPNOTSUPP";
    default:
        snprintf(unknown, sizeof unknown, "E%d", e);
        return unknown;
    }
}

static int parse_event(const char *spec, struct event *ev) {
    for (size_t i = 0; i < sizeof known_events / sizeof known_events[0]; i++) {
        if (!strcmp(spec, known_events[i].name)) {
            *ev = known_events[i];
            return 0;
        }
    }
    const char *eq = strchr(spec, '=');
    if (!eq || eq == spec || (size_t)(eq - spec) >= sizeof ev->name) return -1;
    for (const char *p = spec; p < eq; p++)
        if (!((*p >= 'a' && *p <= 'z') || (*p >= '0' && *p <= '9') || *p == '_')) return -1;
    char *end;
    errno = 0;
    unsigned long long config = strtoull(eq + 1, &end, 0);
    if (errno || end == eq + 1 || *end || eq[1] == '-') return -1;
    memset(ev, 0, sizeof *ev);
    memcpy(ev->name, spec, (size_t)(eq - spec));
    ev->type = PERF_TYPE_RAW;
    ev->config = config;
    return 0;
}

static int parse_cpulist(const char *s) {
    ncpus = 0;
    while (*s) {
        char *end;
        long lo = strtol(s, &end, 10), hi;
        if (end == s || lo < 0) return -1;
        hi = lo;
        if (*end == '-') {
            s = end + 1;
            hi = strtol(s, &end, 10);
            if (end == s || hi < lo) return -1;
        }
        for (long c = lo; c <= hi; c++) {
            if (ncpus == MAX_CPUS) return -1;
            cpus[ncpus++] = (int)c;
        }
        if (*end == ',') end++;
        else if (*end) return -1;
        s = end;
    }
    return ncpus ? 0 : -1;
}

static int perf_open(const struct event *ev, int leader, pid_t pid, int cpu, unsigned long flags) {
    struct perf_event_attr attr;
    memset(&attr, 0, sizeof attr);
    attr.size = sizeof attr;
    attr.type = ev->type;
    attr.config = ev->config;
    attr.read_format = PERF_FORMAT_GROUP | PERF_FORMAT_TOTAL_TIME_ENABLED | PERF_FORMAT_TOTAL_TIME_RUNNING;
    /* Enabled from the start: an ioctl to enable the group later would cost
     * one more cross-CPU call per group.  Members join the counting group
     * microseconds after its leader, which no delta between cycles sees. */
    return (int)syscall(__NR_perf_event_open, &attr, pid, cpu, leader, flags | PERF_FLAG_FD_CLOEXEC);
}

/* Returns 1 when the open file limit could be raised. */
static int raise_nofile(void) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl)) return 0;
    if (rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
    } else {
        if (rl.rlim_max >= MAX_NOFILE) return 0;
        rl.rlim_max = rl.rlim_max * 2 > MAX_NOFILE ? MAX_NOFILE : rl.rlim_max * 2;
        rl.rlim_cur = rl.rlim_max;
    }
    if (setrlimit(RLIMIT_NOFILE, &rl)) return 0;
    fprintf(stderr, "owca-perf: raised the open file limit to %llu\n", (unsigned long long)rl.rlim_cur);
    return 1;
}

/* Whether to retry after error e; errno keeps e when not. */
static int out_of_fds(int e) {
    int retry = (e == EMFILE || e == ENFILE) && raise_nofile();
    errno = e;
    return retry;
}

static void close_fds(int *fds, int n) {
    for (int i = n - 1; i >= 0; i--)
        if (fds[i] >= 0) close(fds[i]);
}

static void probe_events(int nspecs, char **specs) {
    out_printf("owca-perf %d %d\n", PROTOCOL_VERSION, ncpus);
    for (int i = 0; i < nspecs; i++) {
        struct event ev;
        if (parse_event(specs[i], &ev)) {
            fprintf(stderr, "owca-perf: unknown event %s\n", specs[i]);
            exit(2);
        }
        if (nevents == MAX_EVENTS) {
            fprintf(stderr, "owca-perf: at most %d events\n", MAX_EVENTS);
            exit(2);
        }
        /* On the helper itself: a PMU that lacks the event says so here. */
        int fd = perf_open(&ev, -1, 0, -1, 0);
        if (fd < 0) {
            int e = errno;
            out_printf("skip %s %s %s\n", ev.name, errno_name(e), strerror(e));
            continue;
        }
        close(fd);
        out_printf("event %d %s\n", nevents, ev.name);
        events[nevents++] = ev;
    }
    out_printf("ready\n");
}

static int parse_slot(const char *s, const char **rest, uint32_t *slot) {
    if (*s < '0' || *s > '9') return -1;
    uint64_t v = 0;
    while (*s >= '0' && *s <= '9') {
        v = v * 10 + (uint64_t)(*s++ - '0');
        if (v >= MAX_SLOT) return -1;
    }
    if (*s && *s != ' ') return -1;
    *slot = (uint32_t)v;
    *rest = *s ? s + 1 : s;
    return 0;
}

/* Runs the next calls on that CPU, where it may: the kernel then touches the
 * CPU's perf context directly.  Best effort: a CPU outside the helper's
 * affinity (a cpuset) is simply not pinned to. */
static void pin_begin(void) {
    can_pin = !sched_getaffinity(0, sizeof allowed_cpus, &allowed_cpus);
}

static void pin(int cpu) {
    if (!can_pin || cpu >= CPU_SETSIZE || !CPU_ISSET(cpu, &allowed_cpus)) return;
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(cpu, &one);
    sched_setaffinity(0, sizeof one, &one);
}

static void pin_end(void) {
    if (can_pin) sched_setaffinity(0, sizeof allowed_cpus, &allowed_cpus);
}

static void grow_tasks(uint32_t slot) {
    if (slot < tasks_cap) return;
    uint32_t cap = tasks_cap ? tasks_cap : 256;
    while (cap <= slot) cap *= 2;
    struct task **grown = realloc(tasks, sizeof *tasks * cap);
    if (!grown) die("out of memory");
    memset(grown + tasks_cap, 0, sizeof *tasks * (cap - tasks_cap));
    tasks = grown;
    tasks_cap = cap;
}

static void open_groups_on_cpu(struct request *r, int c) {
    int nfds = ncpus * nevents;
    for (int e = 0; e < nevents; e++) {
        int leader = e ? r->fds[c * nevents] : -1;
        int fd;
        do {
            fd = perf_open(&events[e], leader, r->cgroup_fd, cpus[c], PERF_FLAG_PID_CGROUP);
        } while (fd < 0 && out_of_fds(errno));
        if (fd < 0) {
            r->err = errno;
            r->err_event = e;
            r->err_cpu = cpus[c];
            close_fds(r->fds, nfds);
            return;
        }
        r->fds[c * nevents + e] = fd;
    }
}

static void close_groups_on_cpu(struct task *t, int c) {
    close_fds(t->fds + c * nevents, nevents);
}

/* Opens the cgroups and the groups, closes what is to be closed; no replies. */
static void run_batch(struct request *reqs, int n) {
    int nfds = ncpus * nevents;
    for (int i = 0; i < n; i++) {
        struct request *r = &reqs[i];
        if (!r->open) continue;
        do {
            r->cgroup_fd = open(r->path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        } while (r->cgroup_fd < 0 && out_of_fds(errno));
        if (r->cgroup_fd < 0) {
            r->err = errno;
            continue;
        }
        r->fds = malloc(sizeof(int) * (size_t)(nfds ? nfds : 1));
        if (!r->fds) die("out of memory");
        for (int k = 0; k < nfds; k++) r->fds[k] = -1;
    }
    pin_begin();
    for (int c = 0; c < ncpus; c++) {
        pin(cpus[c]);
        for (int i = 0; i < n; i++) {
            struct request *r = &reqs[i];
            if (r->open && !r->err) open_groups_on_cpu(r, c);
            else if (!r->open) close_groups_on_cpu(tasks[r->slot], c);
        }
    }
    pin_end();
    for (int i = 0; i < n; i++) {
        struct request *r = &reqs[i];
        if (r->open && r->cgroup_fd >= 0) {
            close(r->cgroup_fd);
            r->cgroup_fd = -1;
        }
    }
}

static int out_of_fds_error(int e) {
    return e == EMFILE || e == ENFILE;
}

static void flush_batch(void) {
    if (!batch_len) return;
    run_batch(batch, batch_len);
    /* Under a limit that cannot be raised, the batch's cgroup fds took room:
     * the opens that ran out are tried again one at a time, so that as many
     * tasks are counted as the limit allows. */
    for (int i = 0; i < batch_len; i++) {
        struct request *r = &batch[i];
        if (r->open && out_of_fds_error(r->err)) {
            free(r->fds);
            r->fds = NULL;
            r->err = 0;
            run_batch(r, 1);
        }
    }
    for (int i = 0; i < batch_len; i++) {
        struct request *r = &batch[i];
        if (!r->open) {
            free(tasks[r->slot]->fds);
            free(tasks[r->slot]);
            tasks[r->slot] = NULL;
            tasks_open--;
            out_printf("ok %u\n", r->slot);
            continue;
        }
        if (r->err) {
            free(r->fds);
            tasks[r->slot] = NULL;
            if (r->fds)
                out_printf("error %u %s event %s on cpu %d: %s\n", r->slot, errno_name(r->err),
                           events[r->err_event].name, r->err_cpu, strerror(r->err));
            else
                out_printf("error %u %s cgroup: %s\n", r->slot, errno_name(r->err), strerror(r->err));
            continue;
        }
        struct task *t = calloc(1, sizeof *t);
        if (!t) die("out of memory");
        t->fds = r->fds;
        tasks[r->slot] = t;
        tasks_open++;
        out_printf("ok %u\n", r->slot);
    }
    batch_len = 0;
}

static void add_to_batch(int open, uint32_t slot, const char *path) {
    if (batch_len == MAX_BATCH) flush_batch();
    batch[batch_len++] = (struct request){.open = open, .slot = slot, .path = path, .cgroup_fd = -1};
}

static void request_open(uint32_t slot, const char *path) {
    grow_tasks(slot);
    if (tasks[slot]) {
        flush_batch(); /* a pending close of this slot goes first */
        if (tasks[slot]) {
            out_printf("error %u EEXIST slot in use\n", slot);
            return;
        }
    }
    add_to_batch(1, slot, path);
    tasks[slot] = &pending_open;
}

static void request_close(uint32_t slot) {
    if (slot < tasks_cap && tasks[slot] && (tasks[slot] == &pending_open || tasks[slot]->closing))
        flush_batch(); /* its pending open (or close) goes first */
    if (slot >= tasks_cap || !tasks[slot]) {
        flush_batch();
        out_printf("error %u ENOENT no such slot\n", slot);
        return;
    }
    add_to_batch(0, slot, NULL);
    tasks[slot]->closing = 1;
}

struct record_head {
    uint32_t slot;
    uint16_t cpus_counted;
    uint16_t cpus_unknown;
};

/* One task's counts, summed over its CPUs. */
struct sums {
    uint16_t cpus_counted, cpus_unknown;
    double scale_sum, scale_max;
    uint64_t exact[MAX_EVENTS];
    double scaled[MAX_EVENTS];
};

static void add_group_values(struct sums *sum, const uint64_t *buf, ssize_t n, ssize_t want) {
    if (n != want || buf[0] != (uint64_t)nevents) {
        sum->cpus_unknown++;
        return;
    }
    uint64_t enabled = buf[1], running = buf[2];
    if (!enabled) return; /* the cgroup never ran on this CPU */
    if (!running) {
        sum->cpus_unknown++;
        return;
    }
    double factor = (double)enabled / (double)running;
    for (int e = 0; e < nevents; e++) {
        if (enabled == running) sum->exact[e] += buf[3 + e];
        else sum->scaled[e] += (double)buf[3 + e] * factor;
    }
    sum->cpus_counted++;
    sum->scale_sum += factor;
    if (factor > sum->scale_max) sum->scale_max = factor;
}

/* Not pinned: only a group whose cgroup runs on its CPU right now costs an
 * IPI to read, at most one per CPU, less than moving the helper around. */
static void read_tasks(void) {
    size_t reclen = sizeof(struct record_head) + sizeof(uint64_t) * (size_t)nevents + 2 * sizeof(double);
    /* nr, time_enabled, time_running, then one value per event */
    uint64_t buf[3 + MAX_EVENTS];
    ssize_t want = (ssize_t)(sizeof(uint64_t) * (size_t)(3 + nevents));
    out_printf("values %u %zu\n", tasks_open, reclen * tasks_open);
    out_reserve(reclen * tasks_open);
    for (uint32_t slot = 0; slot < tasks_cap; slot++) {
        struct task *t = tasks[slot];
        if (!t) continue;
        struct sums sum;
        memset(&sum, 0, sizeof sum);
        for (int c = 0; c < ncpus && nevents; c++)
            add_group_values(&sum, buf, read(t->fds[c * nevents], buf, (size_t)want), want);
        struct record_head head = {slot, sum.cpus_counted, sum.cpus_unknown};
        double scale_avg = sum.cpus_counted ? sum.scale_sum / sum.cpus_counted : 0;
        out_bytes(&head, sizeof head);
        for (int e = 0; e < nevents; e++) {
            uint64_t v = sum.exact[e] + (uint64_t)(sum.scaled[e] + 0.5);
            out_bytes(&v, sizeof v);
        }
        out_bytes(&scale_avg, sizeof scale_avg);
        out_bytes(&sum.scale_max, sizeof sum.scale_max);
    }
}

static void close_all_tasks(void) {
    for (uint32_t slot = 0; slot < tasks_cap; slot++)
        if (tasks[slot]) request_close(slot);
    flush_batch();
    free(tasks);
    tasks = NULL;
    tasks_cap = 0;
}

/* Returns 0 to go on, 1 to quit. */
static int handle_line(char *line) {
    const char *rest;
    uint32_t slot;
    if (!strncmp(line, "open ", 5) && !parse_slot(line + 5, &rest, &slot) && *rest) {
        request_open(slot, rest);
        return 0;
    }
    if (!strncmp(line, "close ", 6) && !parse_slot(line + 6, &rest, &slot) && !*rest) {
        request_close(slot);
        return 0;
    }
    flush_batch();
    if (!strncmp(line, "open ", 5)) out_printf("error - EINVAL usage: open SLOT PATH\n");
    else if (!strncmp(line, "close ", 6)) out_printf("error - EINVAL usage: close SLOT\n");
    else if (!strcmp(line, "read")) read_tasks();
    else if (!strcmp(line, "quit")) return 1;
    else out_printf("error - EINVAL unknown request\n");
    return 0;
}

static void serve(void) {
    static char in[IN_BUFFER];
    size_t len = 0;
    int discarding = 0; /* inside a line that was too long */
    for (;;) {
        out_flush();
        ssize_t n = read(STDIN_FILENO, in + len, sizeof in - len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die("stdin unreadable");
        if (n == 0) {
            flush_batch();
            out_flush();
            return;
        }
        len += (size_t)n;
        size_t start = 0;
        char *nl;
        while ((nl = memchr(in + start, '\n', len - start))) {
            *nl = 0;
            if (discarding) {
                discarding = 0;
            } else if ((size_t)(nl - in) - start > MAX_LINE) {
                flush_batch();
                out_printf("error - E2BIG line longer than %d bytes\n", MAX_LINE);
            } else if (handle_line(in + start)) {
                flush_batch();
                out_flush();
                return;
            }
            start = (size_t)(nl - in) + 1;
        }
        flush_batch(); /* before the paths it points to move */
        memmove(in, in + start, len - start);
        len -= start;
        if (len > MAX_LINE) {
            if (!discarding) out_printf("error - E2BIG line longer than %d bytes\n", MAX_LINE);
            discarding = 1;
            len = 0;
        }
    }
}

int main(int argc, char **argv) {
    int opt;
    const char *cpulist = NULL;
    while ((opt = getopt(argc, argv, "c:")) != -1) {
        if (opt == 'c') cpulist = optarg;
        else {
            fprintf(stderr, "usage: owca-perf [-c CPULIST] EVENT...\n");
            return 2;
        }
    }
    if (optind == argc) {
        fprintf(stderr, "usage: owca-perf [-c CPULIST] EVENT...\n");
        return 2;
    }
    if (cpulist) {
        if (parse_cpulist(cpulist)) {
            fprintf(stderr, "owca-perf: bad CPU list %s\n", cpulist);
            return 2;
        }
    } else {
        long n = sysconf(_SC_NPROCESSORS_ONLN);
        for (ncpus = 0; ncpus < n && ncpus < MAX_CPUS; ncpus++) cpus[ncpus] = ncpus;
    }
    /* A closed stdout is reported by write(), not by a signal. */
    signal(SIGPIPE, SIG_IGN);
    probe_events(argc - optind, argv + optind);
    serve();
    out.len = 0; /* replies to closes on the way out go nowhere */
    close_all_tasks();
    out.len = 0;
    free(out.buf);
    return 0;
}
