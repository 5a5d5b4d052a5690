/*
 * floor_same_work.c - the floor of owca-measure's cycle on the same work.
 *
 * It reads exactly the files owca-measure reads for each task, at the same
 * cadence, and counts the same perf events for each task's cgroup, with
 * nothing around the reads: no parsing, no frames.  The list comes from
 * owca-measure itself (Measure.files_read(), written to a plan file by
 * benchmarks/measure_cycle.py), so the two cannot drift apart.
 *
 * Plan file, one item a line:
 *   f EVERY PHASE KEPT PATH   a file read on cycle r when EVERY is 1 or
 *                             (r + PHASE) % EVERY == 0 (cycles counted from 1,
 *                             as owca-measure counts a reader's reads); KEPT 1:
 *                             held open and pread at offset 0 (as owca-measure
 *                             holds it), 0: opened, read and closed each time
 *   p CGROUP_DIR              one perf group per online CPU on that cgroup
 *                             (PERF_FLAG_PID_CGROUP): the events of -e, the
 *                             first the leader, read_format GROUP|TIME_*; one
 *                             read() per group and cycle, as the helper does
 *
 * Cycle 1 opens everything and reads every file (owca-measure's first cycle);
 * then -w warm-up cycles and -c measured ones, -g ms apart.  CPU time is
 * CLOCK_PROCESS_CPUTIME_ID (user + system).  Prints one JSON object:
 * open_ms, cycle_ms / files_ms / perf_ms {median, min, max}, files, groups.
 *
 * Build: cc -O2 -o build/floor_same_work benchmarks/floor_same_work.c
 * Run:   floor_same_work -f PLAN [-e task-clock,context-switches] [-c 20] [-w 3] [-g 100]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/perf_event.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

struct file_item { char *path; int every, phase, kept, fd; };

struct event_name { const char *name; uint32_t type; uint64_t config; };
static const struct event_name EVENTS[] = {
    {"task-clock", PERF_TYPE_SOFTWARE, PERF_COUNT_SW_TASK_CLOCK},
    {"cpu-clock", PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_CLOCK},
    {"context-switches", PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CONTEXT_SWITCHES},
    {"cpu-migrations", PERF_TYPE_SOFTWARE, PERF_COUNT_SW_CPU_MIGRATIONS},
    {"page-faults", PERF_TYPE_SOFTWARE, PERF_COUNT_SW_PAGE_FAULTS},
    {"cycles", PERF_TYPE_HARDWARE, PERF_COUNT_HW_CPU_CYCLES},
    {"instructions", PERF_TYPE_HARDWARE, PERF_COUNT_HW_INSTRUCTIONS},
    {"cache-misses", PERF_TYPE_HARDWARE, PERF_COUNT_HW_CACHE_MISSES},
    {"cache-references", PERF_TYPE_HARDWARE, PERF_COUNT_HW_CACHE_REFERENCES},
};

static double cpu_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static void die(const char *what, const char *detail) {
    fprintf(stderr, "floor_same_work: %s: %s\n", what, detail);
    exit(1);
}

static int by_value(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static void summary(const char *name, double *v, int n, int last) {
    qsort(v, n, sizeof(double), by_value);
    double median = n % 2 ? v[n / 2] : (v[n / 2 - 1] + v[n / 2]) / 2;
    printf("\"%s\": {\"median\": %.4f, \"min\": %.4f, \"max\": %.4f}%s", name, median, v[0],
           v[n - 1], last ? "" : ", ");
}

static char buf[1 << 16];

static void read_file(struct file_item *f) {
    if (f->kept) {
        if (f->fd < 0) {
            f->fd = open(f->path, O_RDONLY | O_CLOEXEC);
            if (f->fd < 0)
                return;   /* gone since the listing: owca-measure would not read it either */
        }
        if (pread(f->fd, buf, sizeof buf, 0) < 0 && errno != ESRCH && errno != ENODEV)
            die(f->path, strerror(errno));
        return;
    }
    int fd = open(f->path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    if (read(fd, buf, sizeof buf) < 0 && errno != ENODEV)
        die(f->path, strerror(errno));
    close(fd);
}

int main(int argc, char **argv) {
    const char *plan = NULL, *events = "task-clock,context-switches";
    int cycles = 20, warmup = 3, gap_ms = 100, opt;
    while ((opt = getopt(argc, argv, "f:e:c:w:g:")) != -1) {
        switch (opt) {
        case 'f': plan = optarg; break;
        case 'e': events = optarg; break;
        case 'c': cycles = atoi(optarg); break;
        case 'w': warmup = atoi(optarg); break;
        case 'g': gap_ms = atoi(optarg); break;
        default: die("usage", "-f PLAN [-e EVENTS] [-c N] [-w N] [-g MS]");
        }
    }
    if (!plan || cycles < 1)
        die("usage", "-f PLAN [-e EVENTS] [-c N] [-w N] [-g MS]");

    struct perf_event_attr attrs[16];
    int nevents = 0;
    char *list = strdup(events);
    for (char *name = strtok(list, ","); name; name = strtok(NULL, ",")) {
        size_t i;
        for (i = 0; i < sizeof EVENTS / sizeof EVENTS[0]; i++)
            if (!strcmp(EVENTS[i].name, name))
                break;
        if (i == sizeof EVENTS / sizeof EVENTS[0] || nevents == 16)
            die("unknown or too many events", name);
        struct perf_event_attr *a = &attrs[nevents++];
        memset(a, 0, sizeof *a);
        a->size = sizeof *a;
        a->type = EVENTS[i].type;
        a->config = EVENTS[i].config;
        a->read_format = PERF_FORMAT_GROUP | PERF_FORMAT_TOTAL_TIME_ENABLED
                         | PERF_FORMAT_TOTAL_TIME_RUNNING;
        a->disabled = nevents == 1;   /* the leader enables the group */
    }

    FILE *in = fopen(plan, "r");
    if (!in)
        die(plan, strerror(errno));
    struct file_item *files = NULL;
    char **groups_dirs = NULL;
    int nfiles = 0, ncgroups = 0, cap_f = 0, cap_g = 0;
    char line[8192];
    while (fgets(line, sizeof line, in)) {
        line[strcspn(line, "\n")] = 0;
        if (line[0] == 'f') {
            struct file_item f = {.fd = -1};
            int used = 0;
            if (sscanf(line, "f %d %d %d %n", &f.every, &f.phase, &f.kept, &used) < 3 || !used)
                die("bad plan line", line);
            f.path = strdup(line + used);
            if (nfiles == cap_f)
                files = realloc(files, (cap_f = cap_f * 2 + 64) * sizeof *files);
            files[nfiles++] = f;
        } else if (line[0] == 'p' && line[1] == ' ') {
            if (ncgroups == cap_g)
                groups_dirs = realloc(groups_dirs, (cap_g = cap_g * 2 + 64) * sizeof(char *));
            groups_dirs[ncgroups++] = strdup(line + 2);
        } else if (line[0]) {
            die("bad plan line", line);
        }
    }
    fclose(in);

    long ncpus = sysconf(_SC_NPROCESSORS_ONLN);
    int ngroups = ncgroups * ncpus;
    int *leaders = malloc((ngroups + 1) * sizeof(int));
    int *all_fds = malloc((ngroups * nevents + 1) * sizeof(int));
    int nall = 0;

    /* cycle 1: open everything, read every file once */
    double opened = cpu_ms();
    for (int g = 0; g < ncgroups; g++) {
        int cg = open(groups_dirs[g], O_RDONLY | O_CLOEXEC);
        if (cg < 0)
            die(groups_dirs[g], strerror(errno));
        for (long cpu = 0; cpu < ncpus; cpu++) {
            int leader = -1;
            for (int e = 0; e < nevents; e++) {
                int fd = syscall(SYS_perf_event_open, &attrs[e], cg, (int)cpu, leader,
                                 PERF_FLAG_PID_CGROUP | PERF_FLAG_FD_CLOEXEC);
                if (fd < 0)
                    die("perf_event_open", strerror(errno));
                all_fds[nall++] = fd;
                if (leader < 0)
                    leader = fd;
            }
            leaders[g * ncpus + cpu] = leader;
            ioctl(leader, PERF_EVENT_IOC_ENABLE, PERF_IOC_FLAG_GROUP);
        }
        close(cg);
    }
    for (int i = 0; i < nfiles; i++)
        read_file(&files[i]);
    for (int i = 0; i < ngroups; i++)
        if (read(leaders[i], buf, sizeof buf) < 0)
            die("read perf group", strerror(errno));
    double open_ms = cpu_ms() - opened;

    double *cyc = malloc(cycles * sizeof(double)), *fil = malloc(cycles * sizeof(double)),
           *prf = malloc(cycles * sizeof(double));
    struct timespec gap = {gap_ms / 1000, (gap_ms % 1000) * 1000000L};
    int files_read = 0;
    for (int k = 0; k < warmup + cycles; k++) {
        int r = 2 + k;   /* owca-measure's read count: the opening cycle was read 1 */
        nanosleep(&gap, NULL);
        double t0 = cpu_ms();
        int n = 0;
        for (int i = 0; i < nfiles; i++) {
            struct file_item *f = &files[i];
            if (f->every == 1 || (r + f->phase) % f->every == 0) {
                read_file(f);
                n++;
            }
        }
        double t1 = cpu_ms();
        for (int i = 0; i < ngroups; i++)
            if (read(leaders[i], buf, sizeof buf) < 0)
                die("read perf group", strerror(errno));
        double t2 = cpu_ms();
        if (k >= warmup) {
            cyc[k - warmup] = t2 - t0;
            fil[k - warmup] = t1 - t0;
            prf[k - warmup] = t2 - t1;
            files_read += n;
        }
    }
    printf("{\"files\": %d, \"cgroups\": %d, \"groups\": %d, \"files_read_per_cycle\": %.1f, "
           "\"open_ms\": %.4f, ", nfiles, ncgroups, ngroups, (double)files_read / cycles,
           open_ms);
    summary("cycle_ms", cyc, cycles, 0);
    summary("files_ms", fil, cycles, 0);
    summary("perf_ms", prf, cycles, 1);
    printf("}\n");
    for (int i = 0; i < nall; i++)
        close(all_fds[i]);
    return 0;
}
