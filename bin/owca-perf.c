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
 * consumed all the input it was given.
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
 *                     -> "ok SLOT" or "error SLOT ERRNO TEXT"
 *   close SLOT        close that task's descriptors
 *                     -> "ok SLOT" or "error SLOT ENOENT TEXT"
 *   read              -> "values NTASKS NBYTES" then NBYTES of binary
 *                        records, one per open task, in slot order
 *   quit              exit 0 (so does end of input)
 * A line the helper cannot use gets "error - ERRNO TEXT" and it goes on.
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
 * CAP_SYS_RESOURCE) doubles the hard one, and retries; when that fails the
 * task gets "error SLOT EMFILE ..." and the tasks already open go on.
 *
 * Exit: 0 on quit or end of input, 1 when stdout is gone, 2 on bad usage.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <errno.h>
#include <fcntl.h>
#include <linux/perf_event.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#define PROTOCOL_VERSION 1
#define MAX_LINE 4096
#define MAX_EVENTS 16
#define MAX_CPUS 4096
#define MAX_SLOT (1u << 20)
#define MAX_NOFILE (1u << 20)

struct event {
    char name[64];
    uint32_t type;
    uint64_t config;
};

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
    int *fds; /* ncpus x nevents; the group leader of CPU i is fds[i * nevents] */
};

static struct event events[MAX_EVENTS];
static int nevents;
static int cpus[MAX_CPUS];
static int ncpus;
static struct task **tasks; /* indexed by slot */
static uint32_t tasks_cap;
static uint32_t tasks_open;

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
    /* The leader starts disabled so that the whole group starts at once. */
    attr.disabled = leader < 0;
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

static void open_task(uint32_t slot, const char *path) {
    if (slot < tasks_cap && tasks[slot]) {
        out_printf("error %u EEXIST slot in use\n", slot);
        return;
    }
    int cg;
    do {
        cg = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    } while (cg < 0 && out_of_fds(errno));
    if (cg < 0) {
        int e = errno;
        out_printf("error %u %s cgroup: %s\n", slot, errno_name(e), strerror(e));
        return;
    }
    int nfds = ncpus * nevents;
    int *fds = malloc(sizeof(int) * (size_t)(nfds ? nfds : 1));
    if (!fds) die("out of memory");
    for (int i = 0; i < nfds; i++) fds[i] = -1;
    for (int c = 0; c < ncpus; c++) {
        for (int e = 0; e < nevents; e++) {
            int leader = e ? fds[c * nevents] : -1;
            int fd;
            do {
                fd = perf_open(&events[e], leader, cg, cpus[c], PERF_FLAG_PID_CGROUP);
            } while (fd < 0 && out_of_fds(errno));
            if (fd < 0) {
                int err = errno;
                out_printf("error %u %s event %s on cpu %d: %s\n", slot, errno_name(err), events[e].name, cpus[c],
                           strerror(err));
                close_fds(fds, nfds);
                free(fds);
                close(cg);
                return;
            }
            fds[c * nevents + e] = fd;
        }
    }
    close(cg);
    for (int c = 0; c < ncpus && nevents; c++) ioctl(fds[c * nevents], PERF_EVENT_IOC_ENABLE, 0);
    if (slot >= tasks_cap) {
        uint32_t cap = tasks_cap ? tasks_cap : 256;
        while (cap <= slot) cap *= 2;
        struct task **grown = realloc(tasks, sizeof *tasks * cap);
        if (!grown) die("out of memory");
        memset(grown + tasks_cap, 0, sizeof *tasks * (cap - tasks_cap));
        tasks = grown;
        tasks_cap = cap;
    }
    struct task *t = malloc(sizeof *t);
    if (!t) die("out of memory");
    t->fds = fds;
    tasks[slot] = t;
    tasks_open++;
    out_printf("ok %u\n", slot);
}

static void close_task(uint32_t slot) {
    if (slot >= tasks_cap || !tasks[slot]) {
        out_printf("error %u ENOENT no such slot\n", slot);
        return;
    }
    close_fds(tasks[slot]->fds, ncpus * nevents);
    free(tasks[slot]->fds);
    free(tasks[slot]);
    tasks[slot] = NULL;
    tasks_open--;
    out_printf("ok %u\n", slot);
}

struct record_head {
    uint32_t slot;
    uint16_t cpus_counted;
    uint16_t cpus_unknown;
};

static void read_tasks(void) {
    size_t reclen = sizeof(struct record_head) + sizeof(uint64_t) * (size_t)nevents + 2 * sizeof(double);
    out_printf("values %u %zu\n", tasks_open, reclen * tasks_open);
    out_reserve(reclen * tasks_open);
    /* nr, time_enabled, time_running, then one value per event */
    uint64_t buf[3 + MAX_EVENTS];
    size_t want = sizeof(uint64_t) * (size_t)(3 + nevents);
    for (uint32_t slot = 0; slot < tasks_cap; slot++) {
        struct task *t = tasks[slot];
        if (!t) continue;
        struct record_head head = {slot, 0, 0};
        uint64_t exact[MAX_EVENTS] = {0};
        double scaled[MAX_EVENTS] = {0};
        double scale_sum = 0, scale_max = 0;
        for (int c = 0; c < ncpus && nevents; c++) {
            ssize_t n = read(t->fds[c * nevents], buf, want);
            if (n != (ssize_t)want || buf[0] != (uint64_t)nevents) {
                head.cpus_unknown++;
                continue;
            }
            uint64_t enabled = buf[1], running = buf[2];
            if (!enabled) continue; /* the cgroup never ran on this CPU */
            if (!running) {
                head.cpus_unknown++;
                continue;
            }
            double factor = (double)enabled / (double)running;
            for (int e = 0; e < nevents; e++) {
                if (enabled == running) exact[e] += buf[3 + e];
                else scaled[e] += (double)buf[3 + e] * factor;
            }
            head.cpus_counted++;
            scale_sum += factor;
            if (factor > scale_max) scale_max = factor;
        }
        double scale_avg = head.cpus_counted ? scale_sum / head.cpus_counted : 0;
        out_bytes(&head, sizeof head);
        for (int e = 0; e < nevents; e++) {
            uint64_t v = exact[e] + (uint64_t)(scaled[e] + 0.5);
            out_bytes(&v, sizeof v);
        }
        out_bytes(&scale_avg, sizeof scale_avg);
        out_bytes(&scale_max, sizeof scale_max);
    }
}

static void free_tasks(void) {
    for (uint32_t slot = 0; slot < tasks_cap; slot++)
        if (tasks[slot]) close_task(slot);
    free(tasks);
    tasks = NULL;
    tasks_cap = 0;
}

/* Returns 0 to go on, 1 to quit. */
static int handle_line(char *line) {
    const char *rest;
    uint32_t slot;
    if (!strncmp(line, "open ", 5)) {
        if (parse_slot(line + 5, &rest, &slot) || !*rest) out_printf("error - EINVAL usage: open SLOT PATH\n");
        else open_task(slot, rest);
    } else if (!strncmp(line, "close ", 6)) {
        if (parse_slot(line + 6, &rest, &slot) || *rest) out_printf("error - EINVAL usage: close SLOT\n");
        else close_task(slot);
    } else if (!strcmp(line, "read")) {
        read_tasks();
    } else if (!strcmp(line, "quit")) {
        return 1;
    } else {
        out_printf("error - EINVAL unknown request\n");
    }
    return 0;
}

static void serve(void) {
    static char in[MAX_LINE + 1];
    size_t len = 0;
    int discarding = 0; /* inside a line that was too long */
    for (;;) {
        out_flush();
        ssize_t n = read(STDIN_FILENO, in + len, MAX_LINE - len);
        if (n < 0 && errno == EINTR) continue;
        if (n < 0) die("stdin unreadable");
        if (n == 0) return;
        len += (size_t)n;
        size_t start = 0;
        char *nl;
        while ((nl = memchr(in + start, '\n', len - start))) {
            *nl = 0;
            if (discarding) discarding = 0;
            else if (handle_line(in + start)) {
                out_flush();
                return;
            }
            start = (size_t)(nl - in) + 1;
        }
        memmove(in, in + start, len - start);
        len -= start;
        if (len == MAX_LINE) {
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
    free_tasks();
    free(out.buf);
    return 0;
}
