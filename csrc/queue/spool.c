/* Durable spool with group commit (see spool.h). Record layout, little
 * endian: magic "MEQ1", u32 env_len, u64 msg_len, u64 arrival_ms,
 * u32 crc32c(env | msg), u32 header crc32c of the first 28 bytes; then the
 * envelope, then the message. A reader stops at the first record that does
 * not check out: that is a torn tail nobody was told was safe. */
#include "queue/spool.h"

#include <dirent.h>
#include <stdbool.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/fsutil.h"
#include "core/log.h"

#define SPOOL_MAGIC 0x3151454dU         /* "MEQ1" little endian */
#define SPOOL_SEGMENT_MAX (64u << 20)
#define SPOOL_BATCH_MAX 256

struct spool {
    struct loop *loop;
    char dir[4096];
    int worker;
    int fd;
    uint32_t seg;
    uint64_t offset;
    uint32_t id_time;
    uint32_t id_counter;
    struct spool_rec *pending, **pending_tail;
    size_t npending;
    struct spool_rec *batch;          /* in flight */
    size_t nbatch;
    int retired_fd;                   /* previous segment, closed after its sync */
    struct loop_op sync_op;
    struct loop_task commit_task;
    uint32_t seg_committed;           /* records of the current segment on disk */
    bool opened;                      /* a segment of this run exists */
    uint32_t open_seg;                /* its number */
    spool_committed_fn committed;
    spool_sealed_fn sealed;
    void *hook_arg;
};

/* ---- CRC-32C (Castagnoli) ---- */

static uint32_t crc_table[256];

static void crc_table_init(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++) c = c & 1 ? (c >> 1) ^ 0x82f63b78U : c >> 1;
        crc_table[i] = c;
    }
}

__attribute__((target("sse4.2"))) static uint32_t crc32c_hw(uint32_t crc, const uint8_t *p, size_t n)
{
    uint64_t c = crc;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        c = __builtin_ia32_crc32di(c, v);
        p += 8;
        n -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (n--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}

uint32_t spool_crc32c(uint32_t crc, const void *data, size_t n)
{
    static int hw = -1;
    const uint8_t *p = data;
    crc = ~crc;
    if (hw < 0) {
        crc_table_init();
        __builtin_cpu_init();
        hw = __builtin_cpu_supports("sse4.2") ? 1 : 0;
    }
    if (hw) return ~crc32c_hw(crc, p, n);
    while (n--) crc = crc_table[(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return ~crc;
}

static void put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static uint32_t get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static uint64_t now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Highest segment number in dir, or 0. */
static uint32_t max_segment(const char *dir)
{
    uint32_t max = 0;
    DIR *d = opendir(dir);
    if (!d) return 0;
    struct dirent *de;
    while ((de = readdir(d))) {
        unsigned v;
        if (sscanf(de->d_name, "%8x.dat", &v) == 1 && v > max) max = v;
    }
    closedir(d);
    return max;
}

static int segment_open_next(struct spool *s)
{
    char path[4200];
    s->seg++;
    snprintf(path, sizeof path, "%s/%08x.dat", s->dir, s->seg);
    int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return -errno;
    /* The new name must itself survive a crash before records in it are
     * acknowledged. */
    int rc = fs_fsync_dir(s->dir);
    if (rc < 0) {
        close(fd);
        unlink(path);
        return rc;
    }
    if (s->fd >= 0) {
        if (s->retired_fd >= 0) close(s->retired_fd);
        s->retired_fd = s->fd;
    }
    /* Every record of the old segment was reported before this (batches
     * complete before the next begins), so the count is final. */
    if (s->opened && s->sealed) s->sealed(s->hook_arg, s->open_seg, s->seg_committed);
    s->opened = true;
    s->open_seg = s->seg;
    s->fd = fd;
    s->offset = 0;
    s->seg_committed = 0;
    return 0;
}

static void commit_run(struct loop_task *t);

/* Queue ids are epoch | worker | counter. The epoch is the start time in
 * seconds, but never one an earlier start of this worker used, so a quick
 * restart (a crash loop) cannot repeat an id. */
static int id_epoch_next(struct spool *s)
{
    char path[4200], tmp[4210], buf[32];
    snprintf(path, sizeof path, "%s/epoch", s->dir);
    snprintf(tmp, sizeof tmp, "%s/epoch.tmp", s->dir);
    uint32_t epoch = (uint32_t)time(NULL), last = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd >= 0) {
        ssize_t n = read(fd, buf, sizeof buf - 1);
        close(fd);
        if (n > 0) {
            buf[n] = 0;
            last = (uint32_t)strtoul(buf, NULL, 16);
        }
    }
    if (epoch <= last) epoch = last + 1;
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return -errno;
    int n = snprintf(buf, sizeof buf, "%08x\n", epoch);
    int rc = 0;
    if (write(fd, buf, (size_t)n) != n || fdatasync(fd) < 0) rc = errno ? -errno : -EIO;
    close(fd);
    if (rc == 0 && rename(tmp, path) < 0) rc = -errno;
    if (rc == 0) rc = fs_fsync_dir(s->dir);
    if (rc == 0) s->id_time = epoch;
    return rc;
}

static void on_sync(struct loop_op *op, struct io_uring_cqe *cqe)
{
    struct spool *s = (struct spool *)((char *)op - offsetof(struct spool, sync_op));
    int err = cqe->res < 0 ? cqe->res : 0;
    if (err) log_error("spool", "worker %d: segment %08x write/sync failed: %s", s->worker, s->seg,
                       strerror(-err));
    struct spool_rec *r = s->batch;
    s->batch = NULL;
    s->nbatch = 0;
    if (s->retired_fd >= 0) {
        close(s->retired_fd);
        s->retired_fd = -1;
    }
    if (err) {
        /* Whatever reached the file after the failure point is a torn
         * tail that readers stop at: nothing may follow it there. */
        if (s->fd >= 0) close(s->fd);
        s->fd = -1;
        int rc = segment_open_next(s);
        if (rc < 0) log_error("spool", "worker %d: cannot open a new segment: %s", s->worker, strerror(-rc));
    }
    while (r) {
        struct spool_rec *next = r->next;
        if (!err) {
            s->seg_committed++;
            if (s->committed) s->committed(s->hook_arg, r, r->seg, r->offset, r->len);
        }
        r->done(r, err);
        r = next;
    }
    if (s->pending) loop_defer(s->loop, &s->commit_task);
}

static void commit_run(struct loop_task *t)
{
    struct spool *s = (struct spool *)((char *)t - offsetof(struct spool, commit_task));
    if (s->batch || !s->pending) return;   /* the sync in flight restarts us */
    if (s->offset >= SPOOL_SEGMENT_MAX || s->fd < 0) {
        /* Rotate, or retry after a failure left us without a segment. */
        int rc = segment_open_next(s);
        if (rc < 0) log_error("spool", "worker %d: cannot open a new segment: %s", s->worker, strerror(-rc));
    }
    if (s->fd < 0) {
        struct spool_rec *r = s->pending;
        s->pending = NULL;
        s->pending_tail = &s->pending;
        s->npending = 0;
        while (r) {
            struct spool_rec *next = r->next;
            r->done(r, -EIO);
            r = next;
        }
        return;
    }
    /* The writes and their fsync form one linked chain, which must go to
     * the kernel in a single submission: a chain cut by a submit would let
     * the fsync succeed without the writes before the cut. */
    size_t want = s->npending < SPOOL_BATCH_MAX ? s->npending : SPOOL_BATCH_MAX;
    if (io_uring_sq_space_left(&s->loop->ring) < want + 1) io_uring_submit(&s->loop->ring);
    struct spool_rec **tail = &s->batch;
    size_t n = 0;
    while (s->pending && n < want) {
        struct spool_rec *r = s->pending;
        s->pending = r->next;
        r->next = NULL;
        *tail = r;
        tail = &r->next;
        n++;
        struct io_uring_sqe *sqe = loop_sqe(s->loop);
        io_uring_prep_writev(sqe, s->fd, r->iov, (unsigned)r->niov, s->offset);
        sqe->flags |= IOSQE_IO_LINK;
        loop_sqe_set_op(sqe, NULL);
        r->seg = s->seg;
        r->offset = s->offset;
        for (int i = 0; i < r->niov; i++) s->offset += r->iov[i].iov_len;
        r->len = s->offset - r->offset;
    }
    if (!s->pending) s->pending_tail = &s->pending;
    s->npending -= n;
    s->nbatch = n;
    /* One sync for the whole turn's records; a failed or short write
     * breaks the link and fails the sync with it. */
    struct io_uring_sqe *sqe = loop_sqe(s->loop);
    io_uring_prep_fsync(sqe, s->fd, IORING_FSYNC_DATASYNC);
    loop_sqe_set_op(sqe, &s->sync_op);
}

struct spool *spool_open(struct loop *l, const char *data_dir, int worker, char *err, size_t errlen)
{
    struct spool *s = calloc(1, sizeof *s);
    if (!s) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    s->loop = l;
    s->worker = worker;
    s->fd = -1;
    s->retired_fd = -1;
    s->pending_tail = &s->pending;
    s->sync_op.fn = on_sync;
    s->commit_task.fn = commit_run;
    snprintf(s->dir, sizeof s->dir, "%s/spool/w%02d", data_dir, worker);
    int rc = fs_mkdir_p(s->dir);
    if (rc == 0) {
        s->seg = max_segment(s->dir);
        rc = segment_open_next(s);
    }
    if (rc < 0) {
        snprintf(err, errlen, "spool directory %s: %s", s->dir, strerror(-rc));
        free(s);
        return NULL;
    }
    rc = id_epoch_next(s);
    if (rc < 0) {
        snprintf(err, errlen, "spool directory %s: cannot record the id epoch: %s", s->dir,
                 strerror(-rc));
        close(s->fd);
        free(s);
        return NULL;
    }
    return s;
}

void spool_close(struct spool *s)
{
    if (!s) return;
    if (s->fd >= 0) close(s->fd);
    if (s->retired_fd >= 0) close(s->retired_fd);
    free(s);
}

void spool_set_hooks(struct spool *s, spool_committed_fn committed, spool_sealed_fn sealed,
                     void *arg)
{
    s->committed = committed;
    s->sealed = sealed;
    s->hook_arg = arg;
}

void spool_assign_id(struct spool *s, struct spool_rec *r)
{
    snprintf(r->id, sizeof r->id, "%08x%02x%08x", s->id_time, s->worker & 0xff, s->id_counter++);
}

void spool_append(struct spool *s, struct spool_rec *r)
{
    size_t env_len = r->iov[1].iov_len, msg_len = 0;
    uint32_t crc = spool_crc32c(0, r->iov[1].iov_base, env_len);
    for (int i = 2; i < r->niov; i++) {
        crc = spool_crc32c(crc, r->iov[i].iov_base, r->iov[i].iov_len);
        msg_len += r->iov[i].iov_len;
    }
    uint8_t *h = r->hdr;
    put32(h, SPOOL_MAGIC);
    put32(h + 4, (uint32_t)env_len);
    put64(h + 8, msg_len);
    put64(h + 16, now_ms());
    put32(h + 24, crc);
    put32(h + 28, spool_crc32c(0, h, 28));
    r->iov[0].iov_base = h;
    r->iov[0].iov_len = sizeof r->hdr;
    r->next = NULL;
    *s->pending_tail = r;
    s->pending_tail = &r->next;
    s->npending++;
    loop_defer(s->loop, &s->commit_task);
}

size_t spool_inflight(const struct spool *s) { return s->npending + s->nbatch; }

/* ---- reading ---- */

/* The envelope's first line is "I <id>". */
static int env_id(const char *env, size_t len, char *id)
{
    if (len < 2 + SPOOL_ID_LEN || env[0] != 'I' || env[1] != ' ') return -1;
    memcpy(id, env + 2, SPOOL_ID_LEN);
    id[SPOOL_ID_LEN] = 0;
    return 0;
}

/* Ids marked final in a segment's state log ("D <id>\n" lines). */
struct idset {
    char (*ids)[SPOOL_ID_LEN + 1];
    size_t n, cap;
};

static void idset_load(struct idset *set, const char *logpath)
{
    set->ids = NULL;
    set->n = set->cap = 0;
    FILE *f = fopen(logpath, "re");
    if (!f) return;
    char line[128];
    while (fgets(line, sizeof line, f)) {
        if (line[0] != 'D' || line[1] != ' ' || strlen(line) < 2 + SPOOL_ID_LEN) continue;
        if (set->n == set->cap) {
            size_t cap = set->cap ? set->cap * 2 : 16;
            void *p = realloc(set->ids, cap * sizeof *set->ids);
            if (!p) break;
            set->ids = p;
            set->cap = cap;
        }
        memcpy(set->ids[set->n], line + 2, SPOOL_ID_LEN);
        set->ids[set->n][SPOOL_ID_LEN] = 0;
        set->n++;
    }
    fclose(f);
}

static int idset_has(const struct idset *set, const char *id)
{
    for (size_t i = 0; i < set->n; i++)
        if (memcmp(set->ids[i], id, SPOOL_ID_LEN) == 0) return 1;
    return 0;
}

/* Walk one segment: calls cb on live records; counts live and total. */
size_t spool_records_walk(const void *image, size_t size, spool_scan_cb fn, void *arg)
{
    const uint8_t *base = image;
    size_t off = 0;
    while (size - off >= 32) {
        const uint8_t *h = base + off;
        if (get32(h) != SPOOL_MAGIC || get32(h + 28) != spool_crc32c(0, h, 28)) break;
        size_t env_len = get32(h + 4);
        uint64_t msg_len = get64(h + 8);
        if (env_len > size - off - 32 || msg_len > size - off - 32 - env_len) break;
        const char *env = (const char *)h + 32;
        const char *msg = env + env_len;
        uint32_t crc = spool_crc32c(spool_crc32c(0, env, env_len), msg, msg_len);
        if (crc != get32(h + 24)) break;
        off += 32 + env_len + msg_len;
        char id[SPOOL_ID_LEN + 1];
        if (env_id(env, env_len, id) < 0) continue;
        struct spool_entry e = {.id = id, .arrival_ms = get64(h + 16), .env = env,
                                .env_len = env_len, .msg = msg, .msg_len = msg_len};
        if (fn(&e, arg)) break;
    }
    return off;
}

struct segment_walk {
    const struct idset *done;
    const char *path;
    spool_scan_cb cb;
    void *arg;
    long *live, *total;
    int stop;
};

static int segment_record(const struct spool_entry *e, void *arg)
{
    struct segment_walk *sw = arg;
    (*sw->total)++;
    if (idset_has(sw->done, e->id)) return 0;
    (*sw->live)++;
    if (!sw->cb) return 0;
    struct spool_entry copy = *e;
    copy.segment = sw->path;
    sw->stop = sw->cb(&copy, sw->arg);
    return sw->stop;
}

/* Walk one segment: calls cb on live records; counts live and total. */
static int scan_segment(const char *datpath, const char *logpath, spool_scan_cb cb, void *arg,
                        long *live, long *total)
{
    int fd = open(datpath, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno == ENOENT ? 0 : -errno;
    struct stat st;
    if (fstat(fd, &st) < 0) {
        close(fd);
        return -errno;
    }
    if (st.st_size == 0) {
        close(fd);
        return 0;
    }
    const uint8_t *base = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    close(fd);
    if (base == MAP_FAILED) return -errno;
    struct idset done;
    idset_load(&done, logpath);
    struct segment_walk sw = {.done = &done, .path = datpath, .cb = cb, .arg = arg,
                              .live = live, .total = total};
    spool_records_walk(base, (size_t)st.st_size, segment_record, &sw);
    free(done.ids);
    munmap((void *)base, (size_t)st.st_size);
    return sw.stop;
}

int spool_for_each_segment(const char *data_dir, spool_segment_fn fn, void *arg)
{
    char spooldir[4096];
    snprintf(spooldir, sizeof spooldir, "%s/spool", data_dir);
    struct dirent **workers = NULL;
    int nw = scandir(spooldir, &workers, NULL, alphasort);
    if (nw < 0) return errno == ENOENT ? 0 : -errno;
    int rc = 0;
    for (int i = 0; i < nw; i++) {
        if (rc == 0 && workers[i]->d_name[0] == 'w') {
            char wdir[4400];
            snprintf(wdir, sizeof wdir, "%s/%s", spooldir, workers[i]->d_name);
            struct dirent **segs = NULL;
            int ns = scandir(wdir, &segs, NULL, alphasort);
            for (int j = 0; j < ns; j++) {
                size_t len = strlen(segs[j]->d_name);
                if (rc == 0 && len == 12 && strcmp(segs[j]->d_name + 8, ".dat") == 0) {
                    char dat[4800], log[4800];
                    snprintf(dat, sizeof dat, "%s/%s", wdir, segs[j]->d_name);
                    snprintf(log, sizeof log, "%s/%.8s.log", wdir, segs[j]->d_name);
                    rc = fn(dat, log, arg);
                }
                free(segs[j]);
            }
            free(segs);
        }
        free(workers[i]);
    }
    free(workers);
    return rc;
}

struct scan_ctx {
    spool_scan_cb cb;
    void *arg;
    long live, total;
};

static int scan_one(const char *dat, const char *log, void *arg)
{
    struct scan_ctx *sc = arg;
    long total = 0;
    return scan_segment(dat, log, sc->cb, sc->arg, &sc->live, &total);
}

long spool_scan(const char *data_dir, spool_scan_cb cb, void *arg)
{
    struct scan_ctx sc = {.cb = cb, .arg = arg};
    int rc = spool_for_each_segment(data_dir, scan_one, &sc);
    if (rc < 0) return rc;
    return sc.live;
}

struct find_ctx {
    const char *id;
    char segment[4800];
    int found;
};

static int find_cb(const struct spool_entry *e, void *arg)
{
    struct find_ctx *fc = arg;
    if (strcmp(e->id, fc->id) != 0) return 0;
    snprintf(fc->segment, sizeof fc->segment, "%s", e->segment);
    fc->found = 1;
    return 1;
}

int spool_mark(const char *data_dir, const char *id, char letter)
{
    if (strlen(id) != SPOOL_ID_LEN) return -ENOENT;
    struct find_ctx fc = {.id = id};
    long rc = spool_scan(data_dir, find_cb, &fc);
    if (rc < 0) return (int)rc;
    if (!fc.found) return -ENOENT;
    char log[4800];
    size_t len = strlen(fc.segment);
    snprintf(log, sizeof log, "%.*s.log", (int)(len - 4), fc.segment);
    bool existed = access(log, F_OK) == 0;
    int fd = open(log, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd < 0) return -errno;
    char line[64];
    int n = snprintf(line, sizeof line, "%c %s\n", letter, id);
    int res = 0;
    if (write(fd, line, (size_t)n) != n) res = -EIO;
    if (res == 0 && fdatasync(fd) < 0) res = -errno;
    close(fd);
    if (res == 0 && !existed) {
        /* A new log's name must survive a crash too. */
        char dir[4800];
        snprintf(dir, sizeof dir, "%s", log);
        char *slash = strrchr(dir, '/');
        if (slash) *slash = 0;
        res = fs_fsync_dir(dir);
    }
    return res;
}

struct recover_ctx {
    long live;
};

static int recover_one(const char *dat, const char *log, void *arg)
{
    struct recover_ctx *rc = arg;
    long live = 0, total = 0;
    int r = scan_segment(dat, log, NULL, NULL, &live, &total);
    if (r < 0) return r;
    if (live == 0) {
        /* Every record is final (or the segment holds only a torn tail). */
        unlink(dat);
        unlink(log);
    }
    rc->live += live;
    return 0;
}

long spool_recover(const char *data_dir)
{
    struct recover_ctx rc = {0};
    int r = spool_for_each_segment(data_dir, recover_one, &rc);
    return r < 0 ? r : rc.live;
}

int spool_delete(const char *data_dir, const char *id) { return spool_mark(data_dir, id, 'D'); }
