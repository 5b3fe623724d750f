/* The queue thread (see queue.h): messages, per-destination queues,
 * connections, retries, bounces and outcomes. Everything here runs on the
 * queue's own loop; other threads reach it only through loop_post. */
#include "queue/queue.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "core/fsutil.h"
#include "core/log.h"
#include "core/offload.h"
#include "core/timer.h"
#include "core/worker.h"
#include "dns/resolver.h"
#include "py/bridge.h"
#include "queue/dsn.h"
#include "queue/spool.h"
#include "smtp/client.h"
#include "smtp/dkim.h"
#include "store/maildir.h"
#include "store/store.h"
#include "store/users.h"
#include "tls/tls.h"

#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

/* The queue's own spool directory (send() and bounces): past any worker. */
#define QUEUE_SPOOL_INDEX 99
/* Address space reserved per mapped segment, so records are read in place
 * and pointers into the mapping stay valid as the segment grows: at least
 * the largest segment the spool can write (it rotates past 64 MiB, after a
 * batch of at most 256 records of at most max_message_size each). */
#define SEG_MAP_MIN (8ull << 30)
#define MSG_HASH_BUCKETS 65536
#define DEST_HASH_BUCKETS 4096

enum { R_PENDING = 0, R_DONE, R_LOCAL };
enum { J_READY = 0, J_ACTIVE, J_WAIT, J_HELD };

struct qseg;
struct qdest;
struct qmsg;

struct qrcpt {
    char *addr;
    char *params;
    char *dsn_params;              /* NOTIFY= and ORCPT= only, or NULL */
    char *domain;                  /* lower case, owned */
    uint8_t state;
    uint8_t notify;
};

struct qjob {
    struct qjob *next;             /* in its destination's ready list */
    struct qjob **pprev;
    struct qmsg *m;
    struct qdest *d;
    unsigned n;
    unsigned *idx;                 /* recipient indexes in m->rcpt */
    unsigned attempts;
    uint8_t state;
    struct timer timer;
    struct queue *q;
    struct smtp_outcome last;      /* last temporary failure */
    char last_mx[256];
    bool warned;
};

struct qmsg {
    struct qmsg *hnext;
    char id[SPOOL_ID_LEN + 1];
    struct qseg *seg;
    const char *body;
    size_t body_len;
    char *heap_body;
    uint64_t arrival_ms;
    char *envbuf;
    char *sender;
    char *mail_params;
    char *dsn_mail_params;         /* RET= and ENVID= only, or NULL */
    char *pool;
    char *tags_json;               /* ["a","b"] or NULL */
    unsigned nrcpt;
    struct qrcpt *rcpt;
    unsigned pending;              /* recipients not final (local ones included) */
    unsigned remote_pending;
    unsigned jobs;
    struct qjob **joblist;
    bool held, deleted, utf8, eightbit;
    unsigned holds;                /* bounces not yet durable that report on it */
    bool dkim_done;
    char *dkim;
    size_t dkim_len;
};

struct qseg {
    struct qseg *next;
    struct queue *q;
    int worker;
    uint32_t num;
    const uint8_t *map;
    size_t map_len;
    int dat_fd;
    int log_fd;
    char path[4200];
    struct bytebuf log_pend, log_flight;
    bool log_busy, log_queued;
    struct qseg *log_next;
    struct loop_op log_op;
    uint32_t live, known, total;
    bool sealed, deleted;
};

struct qconn;

struct rate {
    double per_ms, cap, tokens;
    uint64_t last_ms;
};

struct qdest {
    struct qdest *hnext;
    char *name;                    /* the domain (or "[relay]") */
    char *key;                     /* name and pool */
    char *pool;                    /* source pool, or NULL */
    bool relay;
    bool local;                    /* the store: no SMTP, the offload thread writes */
    struct dest_policy pol;        /* copy; strings borrowed from the config */
    struct qjob *ready;            /* FIFO */
    struct qjob **ready_tail;
    unsigned nready;
    unsigned nconn, nconnecting;
    struct qconn *idle;
    struct rate rates[3];
    unsigned nrates;
    struct timer rate_timer;
    struct queue *q;
    uint64_t dead_until_ms;
    struct smtp_outcome dead_why;
    struct smtp_client_cfg ccfg;
    int pol_state;                 /* policy hook: 0 not asked, 1 asking, 2 answered */
    char pol_pool[64];             /* pool named by the policy (static or hook) */
    struct mx_lookup *pol_lookup;
};

struct qconn {
    struct smtp_client cl;
    struct qconn *all_next, **all_pprev;   /* every connection of the queue */
    struct queue *q;
    struct qdest *d;
    struct qconn *next_idle;
    bool idle;
    struct timer idle_timer;
    struct qjob *job;
    struct smtp_txn txn;
    const char **rcpts;
    const char **rparams;
    unsigned rcap;                 /* entries of rcpts, rparams and txn.rcpt_out */
    unsigned msgs;
    struct mx_result *mx;
    struct mx_lookup *lookup;
    unsigned host_i, addr_i;
    bool was_ready;
    bool tried_any;
    bool plain_next;               /* retry this address without TLS (policy "may") */
    bool plain_now;                /* the attempt under way is that retry */
    struct smtp_client_cfg plain_cfg;
    struct smtp_outcome last_fail;
    uint64_t txn_start_ms;
    struct conn_addr from;
    bool has_from;
};

struct qsub {
    struct spool_rec rec;
    struct queue *q;
    /* A bounce: the recipients it reports become final in the state log
     * only once it is itself on disk, so a crash cannot lose it. */
    struct qmsg *m;
    unsigned *fin;
    unsigned nfin;
    char *env;
    char *msg;
    size_t msg_len;
    struct queue_item *item;
    struct qbatch *batch;
};

struct qbatch {
    pthread_mutex_t lock;
    pthread_cond_t cond;
    size_t remaining;
};

struct qcommit {
    struct loop_msg msg;
    int worker;
    uint32_t seg;
    uint64_t offset, len;
    uint32_t nrecords;
    bool sealed;
};

struct qsubmit_msg {
    struct loop_msg msg;
    struct queue_item *items;
    size_t n;
    struct qbatch *batch;
};

struct qctl {
    struct loop_msg msg;
    enum queue_op op;
    const char *id;
    int result;
    struct qbatch *batch;
};

struct queue {
    struct engine *eng;
    const struct me_config *cfg;
    const struct delivery_cfg *dc;
    struct loop loop;
    pthread_t thread;
    bool thread_started;
    pthread_mutex_t start_lock;
    pthread_cond_t start_cond;
    int start_state;               /* 0 starting, 1 running, -1 failed */
    char start_err[256];
    struct spool *spool;
    struct dns_resolver *dns;
    struct qseg *segs;
    struct qmsg *msgs[MSG_HASH_BUCKETS];
    struct qdest *dests[DEST_HASH_BUCKETS];
    struct qseg *log_dirty;
    struct loop_task log_task;
    int events_fd;
    struct bytebuf ev_pend, ev_flight;
    bool ev_busy;
    struct loop_op ev_op;
    struct loop_msg stop_msg;
    atomic_bool stop_posted;
    bool stopping;
    struct timer stop_timer;
    unsigned nconns;
    struct qconn *all_conns;
    uint64_t seq;
    struct tls_ctx *tls_plain;     /* opportunistic, not verifying */
    struct tls_ctx *tls_verify;    /* verifying against the system's CAs (for the policy hook) */
    struct queue_stats st;
    pthread_mutex_t stats_lock;
};

static void dest_kick(struct qdest *d);
static void dest_apply_policy(struct qdest *d);
static bool msg_dkim_start(struct queue *q, struct qmsg *m);
static void local_start(struct queue *q, struct qjob *j);
static void job_ready(struct qjob *j);
static void msg_maybe_final(struct queue *q, struct qmsg *m);
static void maybe_finish_stop(struct queue *q);

static uint64_t wall_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

static uint32_t rnd32(void)
{
    static __thread uint64_t s;
    if (!s) {
        if (getrandom(&s, sizeof s, 0) != sizeof s) s = (uint64_t)wall_ms() | 1;
    }
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return (uint32_t)s;
}

static unsigned hash_str(const char *s)
{
    unsigned h = 2166136261u;
    for (; *s; s++) h = (h ^ (unsigned char)*s) * 16777619u;
    return h;
}

/* ---- appending logs: one write in flight per file keeps lines in order ---- */

static void seg_free(struct qseg *s);

static void seg_mark_dirty(struct qseg *s)
{
    if (s->log_queued) return;
    s->log_queued = true;
    s->log_next = s->q->log_dirty;
    s->q->log_dirty = s;
}

/* Hand the segment's pending lines to the kernel; link: the next SQE of
 * the chain waits for this one. */
static void seg_log_submit(struct qseg *s, bool link)
{
    struct bytebuf tmp = s->log_flight;
    s->log_flight = s->log_pend;
    s->log_pend = tmp;
    struct io_uring_sqe *sqe = loop_sqe(&s->q->loop);
    /* O_APPEND: the offset is ignored and each write lands at the end. */
    io_uring_prep_write(sqe, s->log_fd, bytebuf_head(&s->log_flight),
                        (unsigned)bytebuf_used(&s->log_flight), (uint64_t)-1);
    if (link) sqe->flags |= IOSQE_IO_LINK;
    loop_sqe_set_op(sqe, &s->log_op);
    s->log_busy = true;
}

static void log_write_done(struct loop_op *op, struct io_uring_cqe *cqe)
{
    struct qseg *s = container_of(op, struct qseg, log_op);
    struct queue *q = s->q;
    s->log_busy = false;
    if (cqe->res == -ECANCELED || (cqe->res >= 0 && (size_t)cqe->res < bytebuf_used(&s->log_flight))) {
        /* The chain broke before us, or a short write: what is left goes
         * out again, ahead of lines queued since. */
        if (cqe->res > 0) bytebuf_consume(&s->log_flight, (size_t)cqe->res);
        bytebuf_append(&s->log_flight, bytebuf_head(&s->log_pend), bytebuf_used(&s->log_pend));
        bytebuf_free(&s->log_pend);
        s->log_pend = s->log_flight;
        memset(&s->log_flight, 0, sizeof s->log_flight);
    } else if (cqe->res < 0) {
        log_error("queue", "state log of segment %s: %s", s->path, strerror(-cqe->res));
    }
    bytebuf_free(&s->log_flight);
    if (s->deleted) {
        seg_free(s);
        return;
    }
    if (bytebuf_used(&s->log_pend)) {
        seg_mark_dirty(s);
        loop_defer(&q->loop, &q->log_task);
    }
    maybe_finish_stop(q);
}

/* End of turn: events.jsonl first, then the state logs, linked so that
 * no outcome reaches a state log before its event line reached
 * events.jsonl (after a crash an event may repeat, never go missing). */
static void log_task_run(struct loop_task *t)
{
    struct queue *q = container_of(t, struct queue, log_task);
    if (q->ev_busy) return;   /* ev_write_done runs us again */
    unsigned nseg = 0;
    for (struct qseg *s = q->log_dirty; s; s = s->log_next)
        if (!s->log_busy && bytebuf_used(&s->log_pend) && s->log_fd >= 0) nseg++;
    bool ev = bytebuf_used(&q->ev_pend) > 0 && q->events_fd >= 0;
    if (io_uring_sq_space_left(&q->loop.ring) < nseg + 1) io_uring_submit(&q->loop.ring);
    if (ev) {
        struct bytebuf tmp = q->ev_flight;
        q->ev_flight = q->ev_pend;
        q->ev_pend = tmp;
        struct io_uring_sqe *sqe = loop_sqe(&q->loop);
        io_uring_prep_write(sqe, q->events_fd, bytebuf_head(&q->ev_flight),
                            (unsigned)bytebuf_used(&q->ev_flight), (uint64_t)-1);
        if (nseg) sqe->flags |= IOSQE_IO_LINK;
        loop_sqe_set_op(sqe, &q->ev_op);
        q->ev_busy = true;
    }
    struct qseg *s = q->log_dirty, *keep = NULL;
    q->log_dirty = NULL;
    while (s) {
        struct qseg *next = s->log_next;
        if (!s->log_busy && bytebuf_used(&s->log_pend) && s->log_fd >= 0) {
            s->log_queued = false;
            seg_log_submit(s, --nseg > 0);
        } else if (s->log_busy && bytebuf_used(&s->log_pend)) {
            s->log_next = keep;   /* its write completing brings it back */
            keep = s;
        } else {
            s->log_queued = false;
        }
        s = next;
    }
    q->log_dirty = keep;
}

static void ev_write_done(struct loop_op *op, struct io_uring_cqe *cqe)
{
    struct queue *q = container_of(op, struct queue, ev_op);
    q->ev_busy = false;
    if (cqe->res < 0) {
        log_error("queue", "events.jsonl: %s", strerror(-cqe->res));
    } else if ((size_t)cqe->res < bytebuf_used(&q->ev_flight)) {
        bytebuf_consume(&q->ev_flight, (size_t)cqe->res);
        bytebuf_append(&q->ev_flight, bytebuf_head(&q->ev_pend), bytebuf_used(&q->ev_pend));
        bytebuf_free(&q->ev_pend);
        q->ev_pend = q->ev_flight;
        memset(&q->ev_flight, 0, sizeof q->ev_flight);
    }
    bytebuf_free(&q->ev_flight);
    if (bytebuf_used(&q->ev_pend) || q->log_dirty) loop_defer(&q->loop, &q->log_task);
    maybe_finish_stop(q);
}

static void seg_log_line(struct qseg *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void seg_log_line(struct qseg *s, const char *fmt, ...)
{
    char line[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n <= 0 || (size_t)n >= sizeof line) return;
    bytebuf_append(&s->log_pend, line, (size_t)n);
    seg_mark_dirty(s);
    loop_defer(&s->q->loop, &s->q->log_task);
}

/* ---- segments ---- */

static struct qseg *seg_find(struct queue *q, int worker, uint32_t num)
{
    for (struct qseg *s = q->segs; s; s = s->next)
        if (s->worker == worker && s->num == num && !s->deleted) return s;
    return NULL;
}

static struct qseg *seg_open(struct queue *q, int worker, uint32_t num)
{
    struct qseg *s = seg_find(q, worker, num);
    if (s) return s;
    s = calloc(1, sizeof *s);
    if (!s) return NULL;
    s->q = q;
    s->worker = worker;
    s->num = num;
    s->log_fd = -1;
    s->log_op.fn = log_write_done;
    snprintf(s->path, sizeof s->path, "%s/spool/w%02d/%08x", q->cfg->data_dir, worker, num);
    char p[4300];
    snprintf(p, sizeof p, "%s.dat", s->path);
    s->dat_fd = open(p, O_RDONLY | O_CLOEXEC);
    if (s->dat_fd < 0) {
        log_error("queue", "cannot open %s: %s", p, strerror(errno));
        free(s);
        return NULL;
    }
    /* Reserve address space for the segment's whole life: records appended
     * later are readable through this same mapping, so pointers into it
     * stay valid. Only what is read is ever faulted in. */
    size_t reserve = (size_t)SEG_MAP_MIN;
    size_t need = (64u << 20) + 256 * (q->cfg->limits.max_message_size + (1u << 20));
    if (need > reserve) reserve = need;
    struct stat st;
    if (fstat(s->dat_fd, &st) == 0 && (size_t)st.st_size + (1u << 30) > reserve)
        reserve = (size_t)st.st_size + (1u << 30);
    void *m = mmap(NULL, reserve, PROT_READ, MAP_SHARED | MAP_NORESERVE, s->dat_fd, 0);
    if (m == MAP_FAILED) {
        log_error("queue", "cannot map %s: %s", p, strerror(errno));
        close(s->dat_fd);
        free(s);
        return NULL;
    }
    s->map = m;
    s->map_len = reserve;
    snprintf(p, sizeof p, "%s.log", s->path);
    s->log_fd = open(p, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (s->log_fd < 0) log_error("queue", "cannot open %s: %s", p, strerror(errno));
    s->next = q->segs;
    q->segs = s;
    return s;
}

static void seg_free(struct qseg *s)
{
    struct queue *q = s->q;
    for (struct qseg **pp = &q->segs; *pp; pp = &(*pp)->next)
        if (*pp == s) {
            *pp = s->next;
            break;
        }
    for (struct qseg **pp = &q->log_dirty; *pp; pp = &(*pp)->log_next)
        if (*pp == s) {
            *pp = s->log_next;
            break;
        }
    if (s->map) munmap((void *)s->map, s->map_len);
    if (s->dat_fd >= 0) close(s->dat_fd);
    if (s->log_fd >= 0) close(s->log_fd);
    bytebuf_free(&s->log_pend);
    bytebuf_free(&s->log_flight);
    free(s);
}

/* A sealed segment whose records are all final goes away. */
static void seg_maybe_delete(struct qseg *s)
{
    if (!s->sealed || s->live > 0 || s->known < s->total || s->deleted) return;
    char p[4300];
    snprintf(p, sizeof p, "%s.dat", s->path);
    unlink(p);
    snprintf(p, sizeof p, "%s.log", s->path);
    unlink(p);
    log_debug("queue", "segment %s done: deleted", s->path);
    s->deleted = true;
    if (!s->log_busy) seg_free(s);
}

/* ---- events ---- */

static void json_str(struct bytebuf *b, const char *s)
{
    bytebuf_append(b, "\"", 1);
    for (; s && *s; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\') {
            char e[2] = {'\\', (char)ch};
            bytebuf_append(b, e, 2);
        } else if (ch == '\n') {
            bytebuf_append(b, "\\n", 2);
        } else if (ch < 0x20 || ch == 0x7f) {
            char e[8];
            snprintf(e, sizeof e, "\\u%04x", ch);
            bytebuf_append(b, e, 6);
        } else {
            bytebuf_append(b, (const char *)&ch, 1);
        }
    }
    bytebuf_append(b, "\"", 1);
}

static const char *ev_names[] = {"delivered", "deferred", "bounced", "expired", "delayed"};
enum { EV_DELIVERED = 0, EV_DEFERRED, EV_BOUNCED, EV_EXPIRED, EV_DELAYED };

static void emit_event(struct queue *q, int type, struct qmsg *m, unsigned ri, const char *mx,
                       const struct conn_addr *ip, const struct smtp_outcome *o, unsigned attempt,
                       uint64_t duration_ms)
{
    /* The line is built where it waits for events.jsonl; Python gets a
     * copy of it. */
    struct bytebuf *b = &q->ev_pend;
    size_t start = bytebuf_used(b);   /* relative: an append may compact the buffer */
    char num[64];
    uint64_t now = wall_ms();
    snprintf(num, sizeof num, "{\"time\": %llu.%03u, \"type\": ", (unsigned long long)(now / 1000),
             (unsigned)(now % 1000));
    bytebuf_append(b, num, strlen(num));
    json_str(b, ev_names[type]);
    bytebuf_append(b, ", \"queue_id\": ", 14);
    json_str(b, m->id);
    bytebuf_append(b, ", \"recipient\": ", 15);
    json_str(b, m->rcpt[ri].addr);
    bytebuf_append(b, ", \"sender\": ", 12);
    json_str(b, m->sender);
    bytebuf_append(b, ", \"mx\": ", 8);
    if (mx && *mx) json_str(b, mx);
    else bytebuf_append(b, "null", 4);
    bytebuf_append(b, ", \"ip\": ", 8);
    if (ip && ip->family) {
        char a[64];
        json_str(b, conn_addr_str(ip, a, sizeof a));
    } else {
        bytebuf_append(b, "null", 4);
    }
    snprintf(num, sizeof num, ", \"code\": %u, \"enhanced\": ", o ? o->code : 0);
    bytebuf_append(b, num, strlen(num));
    if (o && o->enh[0]) json_str(b, o->enh);
    else bytebuf_append(b, "null", 4);
    bytebuf_append(b, ", \"text\": ", 10);
    json_str(b, o ? o->text : "");
    snprintf(num, sizeof num, ", \"attempt\": %u, \"duration\": %.3f, \"tags\": ", attempt,
             (double)duration_ms / 1000.0);
    bytebuf_append(b, num, strlen(num));
    if (m->tags_json) bytebuf_append(b, m->tags_json, strlen(m->tags_json));
    else bytebuf_append(b, "[]", 2);
    bytebuf_append(b, "}\n", 2);
    if (bytebuf_used(b) == start) return;   /* out of memory */
    loop_defer(&q->loop, &q->log_task);
    if (q->dc->events_to_python && q->eng->bridge) {
        const char *args[HARG_COUNT] = {0};
        size_t lens[HARG_COUNT] = {0};
        args[HARG_1] = bytebuf_head(b) + start;
        lens[HARG_1] = bytebuf_used(b) - start - 1;
        struct hook_req *r = hook_req_new(EVENT_DELIVERY, args, lens);
        if (r) bridge_submit(q->eng->bridge, r);
    }
    pthread_mutex_lock(&q->stats_lock);
    switch (type) {
    case EV_DELIVERED: q->st.delivered++; break;
    case EV_DEFERRED: q->st.deferred++; break;
    case EV_BOUNCED: q->st.bounced++; break;
    case EV_EXPIRED: q->st.expired++; break;
    default: break;
    }
    pthread_mutex_unlock(&q->stats_lock);
}

/* ---- messages ---- */

static struct qmsg *msg_find(struct queue *q, const char *id)
{
    for (struct qmsg *m = q->msgs[hash_str(id) % MSG_HASH_BUCKETS]; m; m = m->hnext)
        if (strcmp(m->id, id) == 0) return m;
    return NULL;
}

static void msg_unlink(struct queue *q, struct qmsg *m)
{
    for (struct qmsg **pp = &q->msgs[hash_str(m->id) % MSG_HASH_BUCKETS]; *pp; pp = &(*pp)->hnext)
        if (*pp == m) {
            *pp = m->hnext;
            return;
        }
}

static void msg_free(struct qmsg *m)
{
    for (unsigned i = 0; i < m->nrcpt; i++) {
        free(m->rcpt[i].domain);
        free(m->rcpt[i].dsn_params);
    }
    free(m->dsn_mail_params);
    free(m->rcpt);
    free(m->joblist);
    free(m->envbuf);
    free(m->heap_body);
    free(m->tags_json);
    free(m->dkim);
    free(m);
}

static bool is_local_domain(const struct queue *q, const char *dom)
{
    return config_is_local_domain(q->cfg, dom, strlen(dom));
}

static bool has_8bit(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)p[i] & 0x80) return true;
    return false;
}

/* The words of params whose keyword is one of keys (RFC 3461 parameters
 * are the only ones passed on: SIZE, BODY and SMTPUTF8 are the client's
 * own to set for the next hop). NULL when there are none. */
static char *params_only(const char *params, const char *const *keys)
{
    if (!params || !*params) return NULL;
    size_t len = strlen(params);
    char *out = malloc(len + 1);
    if (!out) return NULL;
    size_t n = 0;
    const char *p = params;
    while (*p) {
        while (*p == ' ') p++;
        const char *e = strchr(p, ' ');
        size_t wl = e ? (size_t)(e - p) : strlen(p);
        for (const char *const *k = keys; wl && *k; k++) {
            size_t kl = strlen(*k);
            if (wl > kl && p[kl] == '=' && strncasecmp(p, *k, kl) == 0) {
                if (n) out[n++] = ' ';
                memcpy(out + n, p, wl);
                n += wl;
                break;
            }
        }
        p += wl;
    }
    out[n] = 0;
    if (n == 0) {
        free(out);
        return NULL;
    }
    return out;
}

static const char *const dsn_mail_keys[] = {"RET", "ENVID", NULL};
static const char *const dsn_rcpt_keys[] = {"NOTIFY", "ORCPT", NULL};

/* Parse the envelope (see docs/internals.md) into m. */
static int msg_parse_env(struct qmsg *m, const char *env, size_t len)
{
    m->envbuf = malloc(len + 1);
    if (!m->envbuf) return -ENOMEM;
    memcpy(m->envbuf, env, len);
    m->envbuf[len] = 0;
    unsigned nr = 0;
    for (size_t i = 0; i + 1 < len; i++)
        if ((i == 0 || env[i - 1] == '\n') && env[i] == 'R' && env[i + 1] == ' ') nr++;
    m->rcpt = calloc(nr ? nr : 1, sizeof *m->rcpt);
    if (!m->rcpt) return -ENOMEM;
    struct bytebuf tags = {0};
    char *p = m->envbuf;
    while (*p) {
        char *nl = strchr(p, '\n');
        if (nl) *nl = 0;
        if (p[0] && p[1] == ' ') {
            char *v = p + 2;
            char *tab = strchr(v, '\t');
            if (tab) *tab = 0;
            char *params = tab ? tab + 1 : NULL;
            switch (p[0]) {
            case 'F':
                m->sender = v;
                m->mail_params = params;
                m->dsn_mail_params = params_only(params, dsn_mail_keys);
                break;
            case 'R': {
                struct qrcpt *r = &m->rcpt[m->nrcpt++];
                r->addr = v;
                r->params = params;
                r->dsn_params = params_only(params, dsn_rcpt_keys);
                r->notify = (uint8_t)dsn_notify_of(params ? params : "");
                const char *at = strrchr(v, '@');
                r->domain = strdup(at ? at + 1 : "");
                if (!r->domain) return -ENOMEM;
                for (char *c = r->domain; *c; c++)
                    if (*c >= 'A' && *c <= 'Z') *c = (char)(*c + 32);
                break;
            }
            case 'G':
                m->pool = v;
                break;
            case 'T':
                bytebuf_append(&tags, bytebuf_used(&tags) ? ", " : "[", bytebuf_used(&tags) ? 2 : 1);
                json_str(&tags, v);
                break;
            default:
                break;
            }
        }
        if (!nl) break;
        p = nl + 1;
    }
    if (bytebuf_used(&tags)) {
        bytebuf_append(&tags, "]", 1);
        m->tags_json = strndup(bytebuf_head(&tags), bytebuf_used(&tags));
    }
    bytebuf_free(&tags);
    if (!m->sender) m->sender = "";
    return 0;
}

/* ---- destinations ---- */

static const struct dest_policy *policy_for(const struct queue *q, const char *domain)
{
    const struct delivery_cfg *dc = q->dc;
    for (size_t i = 0; i < dc->ndests; i++)
        if (strcasecmp(dc->dests[i].domain, domain) == 0) return &dc->dests[i];
    /* A rule for "example.com" also covers its subdomains when written ".example.com". */
    for (size_t i = 0; i < dc->ndests; i++) {
        const char *dd = dc->dests[i].domain;
        size_t dl = strlen(dd), l = strlen(domain);
        if (dd[0] == '.' && l > dl && strcasecmp(domain + l - dl, dd) == 0) return &dc->dests[i];
    }
    return &dc->def;
}

static void rate_init(struct rate *r, double count, double period_ms)
{
    r->per_ms = count / period_ms;
    /* Bursts of at most a tenth of the period's allowance (at least one). */
    r->cap = count / 10.0 < 1.0 ? 1.0 : count / 10.0;
    r->tokens = r->cap;
    r->last_ms = timer_now_ms();
}

static void on_rate_timer(struct timer *t)
{
    struct qdest *d = container_of(t, struct qdest, rate_timer);
    dest_kick(d);
}

/* One queue per destination and source pool: connections carry one
 * pool's address, so messages of different pools never share one. */
static struct qdest *dest_get(struct queue *q, const char *name, const char *pool, bool relay)
{
    char key[600];
    snprintf(key, sizeof key, "%s%s%s", name, pool ? "\x01" : "", pool ? pool : "");
    unsigned h = hash_str(key) % DEST_HASH_BUCKETS;
    for (struct qdest *d = q->dests[h]; d; d = d->hnext)
        if (strcmp(d->key, key) == 0) return d;
    struct qdest *d = calloc(1, sizeof *d);
    if (!d) return NULL;
    d->name = strdup(name);
    d->key = strdup(key);
    d->pool = pool ? strdup(pool) : NULL;
    if (!d->name || !d->key || (pool && !d->pool)) {
        free(d->name);
        free(d->key);
        free(d->pool);
        free(d);
        return NULL;
    }
    d->q = q;
    d->relay = relay;
    d->ready_tail = &d->ready;
    d->pol = *policy_for(q, relay ? "" : name);
    snprintf(d->pol_pool, sizeof d->pol_pool, "%s", d->pol.pool ? d->pol.pool : "");
    d->rate_timer.fn = on_rate_timer;
    const struct delivery_cfg *dc = q->dc;
    d->ccfg.helo = q->cfg->hostname;
    d->ccfg.connect_timeout_ms = dc->connect_timeout_ms;
    d->ccfg.reply_timeout_ms = dc->reply_timeout_ms;
    if (relay) {
        d->ccfg.tls = dc->relay_tls;
        d->ccfg.tls_ctx = dc->relay_tls_ctx ? dc->relay_tls_ctx : q->tls_plain;
        d->ccfg.auth_user = dc->relay_user;
        d->ccfg.auth_pass = dc->relay_pass;
    } else {
        d->ccfg.tls = d->pol.tls;
        d->ccfg.tls_ctx = d->pol.tls_ctx ? d->pol.tls_ctx : q->tls_plain;
    }
    dest_apply_policy(d);
    d->hnext = q->dests[h];
    q->dests[h] = d;
    return d;
}

/* A token from every configured rate, or the wait until one is due. */
static uint64_t rate_wait_ms(struct qdest *d)
{
    uint64_t now = timer_now_ms(), wait = 0;
    for (unsigned i = 0; i < d->nrates; i++) {
        struct rate *r = &d->rates[i];
        r->tokens += (double)(now - r->last_ms) * r->per_ms;
        if (r->tokens > r->cap) r->tokens = r->cap;
        r->last_ms = now;
        if (r->tokens < 1.0) {
            uint64_t w = (uint64_t)ceil((1.0 - r->tokens) / r->per_ms);
            if (w > wait) wait = w;
        }
    }
    return wait;
}

static void rate_take(struct qdest *d)
{
    for (unsigned i = 0; i < d->nrates; i++) d->rates[i].tokens -= 1.0;
}

static void ready_push(struct qdest *d, struct qjob *j)
{
    j->next = NULL;
    j->pprev = d->ready_tail;
    *d->ready_tail = j;
    d->ready_tail = &j->next;
    d->nready++;
}

static void ready_remove(struct qdest *d, struct qjob *j)
{
    *j->pprev = j->next;
    if (j->next) j->next->pprev = j->pprev;
    else d->ready_tail = j->pprev;
    j->next = NULL;
    j->pprev = NULL;
    d->nready--;
}

static struct qjob *ready_pop(struct qdest *d)
{
    struct qjob *j = d->ready;
    if (j) ready_remove(d, j);
    return j;
}

/* ---- jobs ---- */

static void job_timer(struct timer *t)
{
    struct qjob *j = container_of(t, struct qjob, timer);
    if (j->state == J_WAIT) job_ready(j);
}

static void job_free(struct qjob *j)
{
    struct qmsg *m = j->m;
    timer_cancel(&j->q->loop.timers, &j->timer);
    if (j->pprev) ready_remove(j->d, j);
    for (unsigned i = 0; i < m->jobs; i++)
        if (m->joblist[i] == j) {
            m->joblist[i] = m->joblist[--m->jobs];
            break;
        }
    free(j->idx);
    free(j);
}

static void job_ready(struct qjob *j)
{
    if (j->m->held) {
        j->state = J_HELD;
        return;
    }
    j->state = J_READY;
    ready_push(j->d, j);
    dest_kick(j->d);
}

/* A new job: held when delivery is off, waiting while its destination is
 * known dead, else ready. */
static void job_place(struct queue *q, struct qjob *j)
{
    uint64_t now = timer_now_ms();
    if (!q->dc->enabled) {
        j->state = J_HELD;
    } else if (j->d->dead_until_ms > now) {
        j->state = J_WAIT;
        timer_arm(&q->loop.timers, &j->timer, j->d->dead_until_ms - now);
    } else {
        job_ready(j);
    }
}

static uint64_t backoff_ms(const struct delivery_cfg *dc, unsigned attempts)
{
    /* Doubling from the minimum up to the maximum, as Postfix does with
     * minimal_backoff_time and maximal_backoff_time. */
    uint64_t d = dc->retry_min_ms;
    for (unsigned i = 1; i < attempts && d < dc->retry_max_ms; i++) d *= 2;
    if (d > dc->retry_max_ms) d = dc->retry_max_ms;
    return d;
}

/* Append a DSN to the queue's own spool for the given recipients. */
static struct qsub *send_dsn(struct queue *q, struct qmsg *m, const unsigned *ri, unsigned n,
                             const struct smtp_outcome *outs, const char *const *mxs, int action,
                             const char *status);

static void rcpt_final(struct queue *q, struct qmsg *m, unsigned ri);

/* Recipients of one message that one DSN reports. */
struct dsn_batch {
    unsigned n, cap;
    unsigned *ri;
    struct smtp_outcome *outs;
    const char **mxs;
};

static void batch_init(struct dsn_batch *b, unsigned cap)
{
    memset(b, 0, sizeof *b);
    if (cap == 0) return;
    b->ri = calloc(cap, sizeof *b->ri);
    b->outs = calloc(cap, sizeof *b->outs);
    b->mxs = calloc(cap, sizeof *b->mxs);
    if (b->ri && b->outs && b->mxs) b->cap = cap;
    else log_error("queue", "out of memory: a bounce is not sent");
}

static void batch_add(struct dsn_batch *b, unsigned i, const struct smtp_outcome *o, const char *mx)
{
    if (b->n >= b->cap) return;
    b->ri[b->n] = i;
    b->outs[b->n] = *o;
    b->mxs[b->n] = mx;
    b->n++;
}

/* Send the DSN (when there is anything to report) and free the batch. */
static struct qsub *batch_send(struct queue *q, struct qmsg *m, struct dsn_batch *b, int action,
                               const char *status)
{
    struct qsub *sub = b->n ? send_dsn(q, m, b->ri, b->n, b->outs, b->mxs, action, status) : NULL;
    free(b->ri);
    free(b->outs);
    free(b->mxs);
    memset(b, 0, sizeof *b);
    return sub;
}

/* The recipient is final now; its state-log line waits for the bounce
 * that reports it (sub), when there is one. */
static void rcpt_final_after(struct queue *q, struct qmsg *m, unsigned ri, struct qsub *sub)
{
    if (!sub || !sub->fin) {
        rcpt_final(q, m, ri);
        return;
    }
    if (m->rcpt[ri].state == R_DONE) return;
    m->rcpt[ri].state = R_DONE;
    m->pending--;
    m->remote_pending--;
    sub->fin[sub->nfin++] = ri;
    if (!sub->m) {
        sub->m = m;
        m->holds++;
    }
}


/* Every pending recipient of j fails for good with o: events, one DSN,
 * final state; j goes away. */
static void job_fail(struct queue *q, struct qjob *j, int ev, const struct smtp_outcome *o,
                     const char *mx, const struct smtp_outcome *dsn_o)
{
    if (!dsn_o) dsn_o = o;
    struct qmsg *m = j->m;
    struct dsn_batch b;
    batch_init(&b, j->n);
    for (unsigned k = 0; k < j->n; k++) {
        unsigned i = j->idx[k];
        if (m->rcpt[i].state != R_PENDING) continue;
        emit_event(q, ev, m, i, mx, NULL, o, j->attempts, 0);
        batch_add(&b, i, dsn_o, mx);
    }
    /* RFC 3463: 4.4.7, delivery time expired, whatever the last reply was. */
    struct qsub *sub = batch_send(q, m, &b, DSN_FAILED, ev == EV_EXPIRED ? "4.4.7" : NULL);
    for (unsigned k = 0; k < j->n; k++) rcpt_final_after(q, m, j->idx[k], sub);
    job_free(j);
    msg_maybe_final(q, m);
}

static void rcpt_final(struct queue *q, struct qmsg *m, unsigned ri)
{
    (void)q;
    if (m->rcpt[ri].state == R_DONE) return;
    m->rcpt[ri].state = R_DONE;
    m->pending--;
    m->remote_pending--;
    if (m->seg) seg_log_line(m->seg, "R %s %u\n", m->id, ri);
}

/* The job's remaining recipients wait for the next attempt, or expire. */
static void job_defer(struct queue *q, struct qjob *j, const struct smtp_outcome *o, const char *mx)
{
    struct qmsg *m = j->m;
    const struct delivery_cfg *dc = q->dc;
    if (o) {
        j->last = *o;
        snprintf(j->last_mx, sizeof j->last_mx, "%s", mx ? mx : "");
    }
    uint64_t now = wall_ms();
    uint64_t delay = backoff_ms(dc, j->attempts);
    uint64_t expires = m->arrival_ms + dc->lifetime_ms;
    if (now >= expires) {
        /* RFC 5321 §4.5.4.1: give up and tell the sender. */
        /* The event says 4.4.7 (delivery time expired); the bounce quotes
         * the last reply as it was, with Status 4.4.7. */
        struct smtp_outcome ex = j->last, last = j->last;
        ex.temp = 0;
        snprintf(ex.enh, sizeof ex.enh, "4.4.7");
        job_fail(q, j, EV_EXPIRED, &ex, j->last_mx, &last);
        return;
    }
    if (dc->delay_warning_ms && !j->warned && now >= m->arrival_ms + dc->delay_warning_ms) {
        j->warned = true;
        struct dsn_batch b;
        batch_init(&b, j->n);
        for (unsigned k = 0; k < j->n; k++) {
            unsigned i = j->idx[k];
            if (m->rcpt[i].state != R_PENDING) continue;
            emit_event(q, EV_DELAYED, m, i, j->last_mx, NULL, &j->last, j->attempts, 0);
            if (m->rcpt[i].notify & DSN_NOTIFY_DELAY) batch_add(&b, i, &j->last, j->last_mx);
        }
        batch_send(q, m, &b, DSN_DELAYED, NULL);
    }
    /* The last attempt falls on the expiry time, not past it. */
    if (now + delay > expires) delay = expires - now;
    j->state = J_WAIT;
    timer_arm(&q->loop.timers, &j->timer, delay ? delay : 1);
}

static void msg_maybe_final(struct queue *q, struct qmsg *m)
{
    if (m->pending > 0 && !m->deleted) return;
    if (m->jobs > 0) return;          /* a transaction still refers to it */
    if (m->holds > 0) return;         /* a bounce about it is not on disk yet */
    if (m->seg) {
        seg_log_line(m->seg, "D %s\n", m->id);
        m->seg->live--;
        seg_maybe_delete(m->seg);
    }
    msg_unlink(q, m);
    pthread_mutex_lock(&q->stats_lock);
    q->st.messages--;
    pthread_mutex_unlock(&q->stats_lock);
    msg_free(m);
}

/* Group the message's pending remote recipients by destination. */
static void msg_schedule(struct queue *q, struct qmsg *m)
{
    const struct delivery_cfg *dc = q->dc;
    unsigned max_r = 0;
    for (unsigned i = 0; i < m->nrcpt; i++) {
        struct qrcpt *r = &m->rcpt[i];
        if (r->state != R_PENDING) continue;
        if (is_local_domain(q, r->domain) && !dc->mail_dir) {
            /* No store configured: local mail stays queued. */
            r->state = R_LOCAL;
            m->remote_pending--;
            continue;
        }
    }
    m->joblist = calloc(m->nrcpt ? m->nrcpt : 1, sizeof *m->joblist);
    if (!m->joblist) return;
    bool *taken = calloc(m->nrcpt ? m->nrcpt : 1, sizeof *taken);
    if (!taken) return;
    for (unsigned i = 0; i < m->nrcpt; i++) {
        if (taken[i] || m->rcpt[i].state != R_PENDING) continue;
        bool local = is_local_domain(q, m->rcpt[i].domain);
        const char *key = local ? "[local]" : dc->relay_host ? "[relay]" : m->rcpt[i].domain;
        struct qdest *d = local ? dest_get(q, key, NULL, false)
                                : dest_get(q, key, m->pool, dc->relay_host != NULL);
        if (!d) continue;
        d->local = local;
        /* Local: one job per recipient (Postfix's local_destination_
         * recipient_limit is 1 too), each on its mailbox's offload thread. */
        max_r = local ? 1 : d->pol.max_recipients ? d->pol.max_recipients : 50;
        struct qjob *j = NULL;
        for (unsigned k = i; k < m->nrcpt; k++) {
            if (taken[k] || m->rcpt[k].state != R_PENDING) continue;
            bool klocal = is_local_domain(q, m->rcpt[k].domain);
            if (klocal != local) continue;
            if (!local && !dc->relay_host && strcmp(m->rcpt[k].domain, m->rcpt[i].domain) != 0) continue;
            if (!j || j->n >= max_r) {
                if (j) {
                    m->joblist[m->jobs++] = j;
                    job_place(q, j);
                }
                j = calloc(1, sizeof *j);
                if (!j) break;
                j->idx = calloc(max_r, sizeof *j->idx);
                if (!j->idx) {
                    free(j);
                    j = NULL;
                    break;
                }
                j->m = m;
                j->d = d;
                j->q = q;
                j->timer.fn = job_timer;
            }
            j->idx[j->n++] = k;
            taken[k] = true;
        }
        if (j) {
            m->joblist[m->jobs++] = j;
            job_place(q, j);
        }
    }
    free(taken);
}

/* A durable record becomes a queued message. */
static void msg_add(struct queue *q, struct qseg *seg, const char *env, size_t env_len,
                    const char *body, size_t body_len, uint64_t arrival_ms,
                    const uint32_t *done_rcpts, size_t ndone, bool held)
{
    if (env_len < 2 + SPOOL_ID_LEN || env[0] != 'I') return;
    struct qmsg *m = calloc(1, sizeof *m);
    if (!m) {
        log_error("queue", "out of memory: a message stays in the spool until restart");
        return;
    }
    memcpy(m->id, env + 2, SPOOL_ID_LEN);
    m->seg = seg;
    m->body = body;
    m->body_len = body_len;
    m->arrival_ms = arrival_ms;
    if (msg_parse_env(m, env, env_len) < 0) {
        msg_free(m);
        return;
    }
    m->pending = m->remote_pending = m->nrcpt;
    for (size_t i = 0; i < ndone; i++)
        if (done_rcpts[i] < m->nrcpt && m->rcpt[done_rcpts[i]].state == R_PENDING) {
            m->rcpt[done_rcpts[i]].state = R_DONE;
            m->pending--;
            m->remote_pending--;
        }
    m->held = held;
    m->eightbit = has_8bit(body, body_len);
    m->utf8 = has_8bit(m->sender, strlen(m->sender));
    for (unsigned i = 0; !m->utf8 && i < m->nrcpt; i++)
        m->utf8 = has_8bit(m->rcpt[i].addr, strlen(m->rcpt[i].addr));
    unsigned h = hash_str(m->id) % MSG_HASH_BUCKETS;
    m->hnext = q->msgs[h];
    q->msgs[h] = m;
    if (seg) seg->live++;
    pthread_mutex_lock(&q->stats_lock);
    q->st.messages++;
    pthread_mutex_unlock(&q->stats_lock);
    if (!msg_dkim_start(q, m)) msg_schedule(q, m);
    msg_maybe_final(q, m);
}

/* ---- DKIM ---- */

static const char *from_domain(const char *msg, size_t len, char *out, size_t cap)
{
    size_t hdr_end = dkim_body_offset(msg, len);
    for (size_t i = 0; i + 5 < hdr_end; i++) {
        if ((i == 0 || msg[i - 1] == '\n') && strncasecmp(msg + i, "From:", 5) == 0) {
            const char *e = memchr(msg + i, '\n', hdr_end - i);
            size_t l = e ? (size_t)(e - (msg + i)) : hdr_end - i;
            const char *at = NULL;
            for (size_t k = 5; k < l; k++)
                if (msg[i + k] == '@') at = msg + i + k;
            if (!at) return NULL;
            size_t n = 0;
            for (const char *p = at + 1; p < msg + i + l && n + 1 < cap; p++) {
                char ch = *p;
                if (ch == '>' || ch == ' ' || ch == '\r' || ch == ';' || ch == ',' || ch == ')') break;
                out[n++] = (char)(ch >= 'A' && ch <= 'Z' ? ch + 32 : ch);
            }
            out[n] = 0;
            return n ? out : NULL;
        }
    }
    return NULL;
}

/* The key for m: its From: domain's or a parent's (relaxed alignment, as
 * DMARC reads it), or NULL. */
static const struct dkim_domain *dkim_key_for(const struct queue *q, const struct qmsg *m)
{
    const struct delivery_cfg *dc = q->dc;
    if (dc->ndkim == 0) return NULL;
    char dom[256];
    const char *fd = from_domain(m->body, m->body_len, dom, sizeof dom);
    if (!fd) return NULL;
    size_t fl = strlen(fd);
    for (size_t i = 0; i < dc->ndkim; i++) {
        const struct dkim_domain *k = &dc->dkim[i];
        size_t dl = strlen(k->domain);
        if (strcasecmp(fd, k->domain) == 0 ||
            (fl > dl && fd[fl - dl - 1] == '.' && strcasecmp(fd + fl - dl, k->domain) == 0))
            return k;
    }
    return NULL;
}

/* Signing (an RSA signature costs about a millisecond) runs on the offload
 * thread, once per message, before its first attempt is scheduled. */
struct sign_job {
    struct offload_job job;
    struct queue *q;
    struct qmsg *m;
    const struct dkim_domain *k;
    char *out;
    int len;
};

static void sign_work(struct offload_job *oj)
{
    struct sign_job *sj = container_of(oj, struct sign_job, job);
    const struct dkim_domain *k = sj->k;
    struct dkim_signer s = {.domain = k->domain, .selector = k->selector, .key = k->key,
                            .headers = (const char *const *)k->headers, .timestamp = 1};
    sj->len = dkim_sign(&s, sj->m->body, sj->m->body_len, time(NULL), sj->out, DKIM_SIGNATURE_MAX);
}

static void sign_done(struct loop *l, struct loop_msg *lm)
{
    struct sign_job *sj = container_of(lm, struct sign_job, job.msg);
    if (l->dead) {
        /* The queue is gone; the message is read again at the next start. */
        free(sj->out);
        free(sj);
        return;
    }
    struct queue *q = sj->q;
    struct qmsg *m = sj->m;
    if (sj->len >= 0) {
        m->dkim = sj->out;
        m->dkim_len = (size_t)sj->len;
    } else {
        log_warn("queue", "%s: DKIM signing for %s failed; sending unsigned", m->id, sj->k->domain);
        free(sj->out);
    }
    free(sj);
    m->holds--;
    if (!m->deleted) msg_schedule(q, m);
    msg_maybe_final(q, m);
}

/* True when signing was started: the message is scheduled when it ends. */
static bool msg_dkim_start(struct queue *q, struct qmsg *m)
{
    m->dkim_done = true;
    const struct dkim_domain *k = dkim_key_for(q, m);
    if (!k || m->remote_pending == 0) return false;
    struct sign_job *sj = calloc(1, sizeof *sj);
    char *out = malloc(DKIM_SIGNATURE_MAX);
    if (!sj || !out) {
        log_warn("queue", "%s: out of memory for DKIM signing; sending unsigned", m->id);
        free(sj);
        free(out);
        return false;
    }
    sj->q = q;
    sj->m = m;
    sj->k = k;
    sj->out = out;
    sj->job.msg.fn = sign_done;
    sj->job.loop = &q->loop;
    sj->job.work = sign_work;
    sj->job.outstanding = &q->eng->offload_jobs;
    m->holds++;
    offload_submit(&sj->job);
    return true;
}

/* ---- connections ---- */

static const struct smtp_client_ops qc_ops;

static void qc_idle_timer(struct timer *t)
{
    struct qconn *qc = container_of(t, struct qconn, idle_timer);
    if (qc->idle) {
        struct qdest *d = qc->d;
        for (struct qconn **pp = &d->idle; *pp; pp = &(*pp)->next_idle)
            if (*pp == qc) {
                *pp = qc->next_idle;
                break;
            }
        qc->idle = false;
        smtp_client_quit(&qc->cl);
    }
}

static void qc_free(struct qconn *qc)
{
    struct queue *q = qc->q;
    *qc->all_pprev = qc->all_next;
    if (qc->all_next) qc->all_next->all_pprev = qc->all_pprev;
    timer_cancel(&q->loop.timers, &qc->idle_timer);
    if (qc->lookup) mx_lookup_cancel(qc->lookup);
    free(qc->mx);
    free(qc->rcpts);
    free(qc->rparams);
    free(qc->txn.rcpt_out);
    free(qc);
}

/* Every ready job of d waits (connection-level failure) or bounces. */
static void dest_fail_ready(struct qdest *d, const struct smtp_outcome *o, const char *mx)
{
    struct queue *q = d->q;
    struct qjob *list = d->ready;
    d->ready = NULL;
    d->ready_tail = &d->ready;
    d->nready = 0;
    while (list) {
        struct qjob *j = list;
        list = j->next;
        j->next = NULL;
        j->pprev = NULL;
        struct qmsg *m = j->m;
        j->attempts++;
        if (o->temp) {
            for (unsigned k = 0; k < j->n; k++)
                if (m->rcpt[j->idx[k]].state == R_PENDING)
                    emit_event(q, EV_DEFERRED, m, j->idx[k], mx, NULL, o, j->attempts, 0);
            job_defer(q, j, o, mx);
        } else {
            job_fail(q, j, EV_BOUNCED, o, mx, NULL);
        }
    }
}

static void qc_try_next(struct qconn *qc);

static void qc_connect_failed(struct qconn *qc)
{
    struct qdest *d = qc->d;
    const char *mx = qc->mx && qc->mx->nhosts ? qc->mx->hosts[0].name : d->name;
    /* Set-up failures (refused, 4xx or 5xx greeting, TLS) keep the mail:
     * another attempt may meet a working host. */
    qc->last_fail.temp = 1;
    /* No established connection (the others, if any, are still trying):
     * treat the destination as down, or failing connections would be
     * replaced by new ones for as long as mail waits. */
    if (d->nconn - 1 - d->nconnecting == 0) {
        /* No connection to this destination works: everything waiting for
         * it waits for the next retry, and new arrivals do too for a while. */
        d->dead_until_ms = timer_now_ms() + (qc->q->dc->retry_min_ms < 60000 ? qc->q->dc->retry_min_ms : 60000);
        d->dead_why = qc->last_fail;
        dest_fail_ready(d, &qc->last_fail, mx);
    }
}

static void qc_on_lookup(void *arg, const struct mx_result *r)
{
    struct qconn *qc = arg;
    struct qdest *d = qc->d;
    qc->lookup = NULL;
    if (r->status != MX_OK) {
        struct smtp_outcome o;
        memset(&o, 0, sizeof o);
        o.stage = STAGE_CONNECT;
        o.temp = r->status == MX_TEMP;
        snprintf(o.enh, sizeof o.enh, "%s",
                 r->status == MX_NULL ? "5.1.10" : r->status == MX_TEMP ? "4.4.3" : "5.1.2");
        if (r->status == MX_NULL)
            snprintf(o.text, sizeof o.text, "%s does not accept mail (null MX, RFC 7505)", d->name);
        else if (r->status == MX_TEMP)
            snprintf(o.text, sizeof o.text, "cannot resolve %s: %s", d->name, r->detail);
        else
            snprintf(o.text, sizeof o.text, "no mail host for %s: %s", d->name, r->detail);
        qc->last_fail = o;
        d->nconnecting--;
        if (o.temp) qc_connect_failed(qc);
        else dest_fail_ready(d, &o, NULL);
        d->nconn--;
        qc->q->nconns--;
        qc_free(qc);
        maybe_finish_stop(d->q);
        dest_kick(d);
        return;
    }
    qc->mx = malloc(sizeof *r);
    if (!qc->mx) {
        d->nconnecting--;
        d->nconn--;
        qc->q->nconns--;
        qc_free(qc);
        return;
    }
    memcpy(qc->mx, r, sizeof *r);
    qc->host_i = 0;
    qc->addr_i = 0;
    qc_try_next(qc);
}

/* Connect to the next address of the MX list (hosts in order, each host's
 * addresses in order); when none is left, the attempt failed. */
static void qc_try_next(struct qconn *qc)
{
    struct qdest *d = qc->d;
    struct queue *q = qc->q;
    const struct mx_result *mx = qc->mx;
    while (qc->host_i < mx->nhosts) {
        const struct mx_host *h = &mx->hosts[qc->host_i];
        if (h->status != 0 || qc->addr_i >= h->naddr) {
            qc->host_i++;
            qc->addr_i = 0;
            continue;
        }
        const struct mx_addr *a = &h->addr[qc->addr_i++];
        struct conn_addr to = {.family = a->family,
                               .port = (uint16_t)(d->relay ? q->dc->relay_port : q->dc->remote_port)};
        memcpy(to.addr, a->addr, 16);
        qc->tried_any = true;
        memset(&qc->cl, 0, sizeof qc->cl);
        /* An address literal ([192.0.2.1]) is named by its address: that
         * is what TLS can check (no SNI for an IP, RFC 6066 §3). */
        char ipname[64];
        const char *hname = h->name;
        if (hname[0] == '[') hname = conn_addr_str(&to, ipname, sizeof ipname);
        const struct smtp_client_cfg *ccfg = &d->ccfg;
        qc->plain_now = qc->plain_next;
        qc->plain_next = false;
        if (qc->plain_now) {
            qc->plain_cfg = d->ccfg;
            qc->plain_cfg.tls = CLIENT_TLS_NONE;
            ccfg = &qc->plain_cfg;
        }
        int rc = smtp_client_start(&qc->cl, &q->loop, &to, qc->has_from ? &qc->from : NULL, hname,
                                   ccfg, &qc_ops, qc);
        if (rc == 0) return;
        memset(&qc->last_fail, 0, sizeof qc->last_fail);
        qc->last_fail.temp = 1;
        snprintf(qc->last_fail.enh, sizeof qc->last_fail.enh, "4.4.1");
        snprintf(qc->last_fail.text, sizeof qc->last_fail.text, "cannot connect to %s: %s", h->name,
                 strerror(-rc));
    }
    /* Out of addresses. */
    if (!qc->tried_any) {
        memset(&qc->last_fail, 0, sizeof qc->last_fail);
        qc->last_fail.temp = 1;
        snprintf(qc->last_fail.enh, sizeof qc->last_fail.enh, "4.4.3");
        snprintf(qc->last_fail.text, sizeof qc->last_fail.text, "no usable address for %s", d->name);
    }
    d->nconnecting--;
    qc_connect_failed(qc);
    d->nconn--;
    q->nconns--;
    qc_free(qc);
    maybe_finish_stop(q);
    dest_kick(d);
}

static void qc_open(struct qdest *d)
{
    struct queue *q = d->q;
    struct qconn *qc = calloc(1, sizeof *qc);
    if (!qc) return;
    qc->q = q;
    qc->d = d;
    qc->idle_timer.fn = qc_idle_timer;
    qc->all_next = q->all_conns;
    if (q->all_conns) q->all_conns->all_pprev = &qc->all_next;
    qc->all_pprev = &q->all_conns;
    q->all_conns = qc;
    d->nconn++;
    d->nconnecting++;
    q->nconns++;
    /* The source address: the pool of the first message waiting, if any. */
    /* The message's own pool, else the destination policy's. */
    const char *pool = d->pool ? d->pool : d->pol_pool[0] ? d->pol_pool : NULL;
    const struct delivery_cfg *dc = q->dc;
    for (size_t i = 0; pool && i < dc->npools; i++) {
        if (strcmp(dc->pools[i].name, pool) == 0 && dc->pools[i].naddrs) {
            qc->from = dc->pools[i].addrs[rnd32() % dc->pools[i].naddrs];
            qc->has_from = true;
        }
    }
    if (!qc->has_from) {
        for (size_t i = 0; i < dc->npools; i++)
            if (strcmp(dc->pools[i].name, "default") == 0 && dc->pools[i].naddrs) {
                qc->from = dc->pools[i].addrs[rnd32() % dc->pools[i].naddrs];
                qc->has_from = true;
            }
    }
    int rc = d->relay ? host_lookup(q->dns, dc->relay_host, qc_on_lookup, qc, &qc->lookup)
                      : mx_lookup(q->dns, d->name, qc_on_lookup, qc, &qc->lookup);
    if (rc < 0) {
        struct mx_result r;
        memset(&r, 0, sizeof r);
        r.status = MX_NOHOST;
        snprintf(r.detail, sizeof r.detail, "invalid domain name");
        qc_on_lookup(qc, &r);
    }
}

/* Rates and client settings follow d->pol. */
static void dest_apply_policy(struct qdest *d)
{
    d->nrates = 0;
    if (d->pol.rate_per_second > 0) rate_init(&d->rates[d->nrates++], d->pol.rate_per_second, 1000.0);
    if (d->pol.rate_per_minute > 0) rate_init(&d->rates[d->nrates++], d->pol.rate_per_minute, 60000.0);
    if (d->pol.rate_per_hour > 0) rate_init(&d->rates[d->nrates++], d->pol.rate_per_hour, 3600000.0);
    if (d->pol.max_connections == 0) d->pol.max_connections = 1;
    if (d->pol.max_messages_per_connection == 0) d->pol.max_messages_per_connection = ~0u;
    if (!d->relay) {
        d->ccfg.tls = d->pol.tls;
        d->ccfg.tls_ctx = d->pol.tls_ctx ? d->pol.tls_ctx : d->q->tls_plain;
    }
}

/* The hook's answer: "key=value" words (see mailengine/engine.py). A key
 * it leaves out keeps the static policy's value. */
static void policy_reply(struct hook_req *r)
{
    struct qdest *d = r->owner;
    if (r->loop->dead) {
        hook_req_free(r);
        return;
    }
    if (r->action == HOOK_ACCEPT && r->text[0]) {
        char buf[sizeof r->text];
        snprintf(buf, sizeof buf, "%s", r->text);
        char *save = NULL;
        for (char *w = strtok_r(buf, " ", &save); w; w = strtok_r(NULL, " ", &save)) {
            char *eq = strchr(w, '=');
            if (!eq) continue;
            *eq = 0;
            const char *v = eq + 1;
            double x = strtod(v, NULL);
            if (strcmp(w, "max_connections") == 0 && x >= 1) d->pol.max_connections = (unsigned)x;
            else if (strcmp(w, "max_messages_per_connection") == 0 && x >= 1) d->pol.max_messages_per_connection = (unsigned)x;
            else if (strcmp(w, "max_recipients") == 0 && x >= 1) d->pol.max_recipients = (unsigned)x;
            else if (strcmp(w, "rate_per_second") == 0) d->pol.rate_per_second = x;
            else if (strcmp(w, "rate_per_minute") == 0) d->pol.rate_per_minute = x;
            else if (strcmp(w, "rate_per_hour") == 0) d->pol.rate_per_hour = x;
            else if (strcmp(w, "pool") == 0) snprintf(d->pol_pool, sizeof d->pol_pool, "%s", v);
            else if (strcmp(w, "tls") == 0)
                d->pol.tls = strcmp(v, "none") == 0 ? CLIENT_TLS_NONE
                             : strcmp(v, "required") == 0 ? CLIENT_TLS_REQUIRED : CLIENT_TLS_MAY;
            else if (strcmp(w, "tls_verify") == 0 && x >= 1 &&
                     !(d->pol.tls_ctx && tls_ctx_verifies(d->pol.tls_ctx))) {
                /* The hook can turn certificate checks on (the system's
                 * CAs), never off: a configured check stays, and so does a
                 * configured CA file (its checks are the configuration's
                 * to ask for). */
                if (d->pol.tls_ca_file)
                    log_warn("queue", "%s: the policy hook asks for certificate checks, but the configured "
                             "policy names a CA file without tls_verify; the configured policy applies", d->name);
                else if (!d->q->tls_verify)
                    log_warn("queue", "%s: the policy hook asks for certificate checks, but no verifying TLS "
                             "context could be made at start; not checking", d->name);
                else
                    d->pol.tls_ctx = d->q->tls_verify;
            }
        }
        dest_apply_policy(d);
    }
    hook_req_free(r);
    d->pol_state = 2;
    dest_kick(d);
}

static void policy_lookup_done(void *arg, const struct mx_result *res)
{
    struct qdest *d = arg;
    struct queue *q = d->q;
    d->pol_lookup = NULL;
    char hosts[1024] = "";
    size_t hl = 0;
    for (unsigned i = 0; res->status == MX_OK && i < res->nhosts && hl < sizeof hosts - 1; i++)
        hl += (size_t)snprintf(hosts + hl, sizeof hosts - hl, "%s%s", hl ? " " : "", res->hosts[i].name);
    if (hl >= sizeof hosts) hl = sizeof hosts - 1;
    const char *args[HARG_COUNT] = {0};
    size_t lens[HARG_COUNT] = {0};
    args[HARG_1] = d->name;
    lens[HARG_1] = strlen(d->name);
    args[HARG_2] = hosts;
    lens[HARG_2] = hl;
    struct hook_req *r = hook_req_new(HOOK_POLICY, args, lens);
    if (!r) {
        d->pol_state = 2;
        dest_kick(d);
        return;
    }
    r->loop = &q->loop;
    r->done = policy_reply;
    r->owner = d;
    bridge_submit(q->eng->bridge, r);
}

/* Hand ready jobs to idle connections; open connections while jobs wait
 * and the policy allows. */
static void dest_kick(struct qdest *d)
{
    struct queue *q = d->q;
    if (q->stopping) return;
    if (d->local) {
        struct qjob *j;
        while ((j = ready_pop(d))) local_start(q, j);
        return;
    }
    if (q->dc->policy_hook && !d->relay && d->pol_state != 2) {
        /* Ask Python once per destination, with its MX hosts, before the
         * first connection. */
        if (d->pol_state == 0) {
            d->pol_state = 1;
            if (mx_lookup(q->dns, d->name, policy_lookup_done, d, &d->pol_lookup) < 0) {
                struct mx_result r;
                memset(&r, 0, sizeof r);
                r.status = MX_NOHOST;
                policy_lookup_done(d, &r);
            }
        }
        return;
    }
    while (d->ready && d->idle) {
        uint64_t w = rate_wait_ms(d);
        if (w) {
            if (!timer_armed(&d->rate_timer)) timer_arm(&q->loop.timers, &d->rate_timer, w);
            return;
        }
        struct qconn *qc = d->idle;
        d->idle = qc->next_idle;
        qc->idle = false;
        timer_cancel(&q->loop.timers, &qc->idle_timer);
        qc_ops.ready(&qc->cl);
    }
    uint64_t now = timer_now_ms();
    if (d->dead_until_ms > now) {
        /* Look again when the destination may be back (a job's own timer
         * may fire a tick before that). */
        if (d->ready && !timer_armed(&d->rate_timer))
            timer_arm(&q->loop.timers, &d->rate_timer, d->dead_until_ms - now);
        return;
    }
    while (d->nready > d->nconnecting && d->nconn < d->pol.max_connections) {
        if (d->nrates && rate_wait_ms(d)) {
            if (!timer_armed(&d->rate_timer)) timer_arm(&q->loop.timers, &d->rate_timer, rate_wait_ms(d));
            return;
        }
        qc_open(d);
    }
}

static void qc_start_job(struct qconn *qc, struct qjob *j)
{
    struct qmsg *m = j->m;
    qc->job = j;
    j->state = J_ACTIVE;
    j->attempts++;
    /* The per-recipient arrays are kept for the connection's next message:
     * no allocation per message once they are big enough. */
    struct smtp_outcome *outs = qc->txn.rcpt_out;
    if (j->n > qc->rcap) {
        free(qc->rcpts);
        free(qc->rparams);
        free(outs);
        qc->rcpts = calloc(j->n, sizeof *qc->rcpts);
        qc->rparams = calloc(j->n, sizeof *qc->rparams);
        outs = calloc(j->n, sizeof *outs);
        qc->rcap = qc->rcpts && qc->rparams && outs ? j->n : 0;
    }
    memset(&qc->txn, 0, sizeof qc->txn);
    qc->txn.rcpt_out = outs;
    if (!qc->rcap) {
        /* Give it back and let the connection go. */
        j->attempts--;
        job_ready(j);
        qc->job = NULL;
        smtp_client_quit(&qc->cl);
        return;
    }
    for (unsigned k = 0; k < j->n; k++) {
        qc->rcpts[k] = m->rcpt[j->idx[k]].addr;
        qc->rparams[k] = m->rcpt[j->idx[k]].dsn_params;
    }
    qc->txn.sender = m->sender;
    qc->txn.mail_params = m->dsn_mail_params;
    qc->txn.nrcpt = j->n;
    qc->txn.rcpts = qc->rcpts;
    qc->txn.rcpt_params = qc->rparams;
    qc->txn.prefix = m->dkim;
    qc->txn.prefix_len = m->dkim_len;
    qc->txn.body = m->body;
    qc->txn.body_len = m->body_len;
    qc->txn.utf8 = m->utf8;
    qc->txn.eightbit = m->eightbit;
    qc->msgs++;
    qc->txn_start_ms = timer_now_ms();
    rate_take(qc->d);
    smtp_client_send(&qc->cl, &qc->txn);
}

static void qc_ready(struct smtp_client *cl)
{
    struct qconn *qc = cl->owner;
    struct qdest *d = qc->d;
    struct queue *q = qc->q;
    if (!qc->was_ready) {
        qc->was_ready = true;
        d->nconnecting--;
        d->dead_until_ms = 0;
    }
    if (q->stopping || qc->msgs >= d->pol.max_messages_per_connection) {
        smtp_client_quit(cl);
        return;
    }
    if (d->ready && rate_wait_ms(d) == 0) {
        qc_start_job(qc, ready_pop(d));
        return;
    }
    if (d->ready && !timer_armed(&d->rate_timer)) timer_arm(&q->loop.timers, &d->rate_timer, rate_wait_ms(d));
    /* Nothing to send now: keep the connection a little in case more
     * comes (a connection cache, as Postfix keeps one for 2 s). */
    qc->idle = true;
    qc->next_idle = d->idle;
    d->idle = qc;
    timer_arm(&q->loop.timers, &qc->idle_timer, q->dc->idle_ms ? q->dc->idle_ms : 2000);
}

/* A finished attempt of j: outs[k] is recipient j->idx[k]'s outcome.
 * Delivered and bounced recipients become final (one DSN for the
 * bounces); the rest wait for the next attempt. */
/* A new job of j's message and destination for these recipients (one job
 * per recipient at most, so the message's job list has room). */
static struct qjob *job_split(struct queue *q, struct qjob *j, const unsigned *idx, unsigned n)
{
    struct qmsg *m = j->m;
    if (m->jobs >= m->nrcpt) return NULL;
    struct qjob *nj = calloc(1, sizeof *nj);
    if (!nj || !(nj->idx = calloc(n, sizeof *nj->idx))) {
        free(nj);
        return NULL;
    }
    memcpy(nj->idx, idx, n * sizeof *idx);
    nj->n = n;
    nj->m = m;
    nj->d = j->d;
    nj->q = q;
    nj->attempts = j->attempts;
    /* Its history too: a delay notice already sent is not sent again. */
    nj->warned = j->warned;
    nj->last = j->last;
    memcpy(nj->last_mx, j->last_mx, sizeof nj->last_mx);
    nj->timer.fn = job_timer;
    m->joblist[m->jobs++] = nj;
    return nj;
}

/* RFC 5321 §4.5.3.1.10: "452 too many recipients" asks for the rest in
 * another transaction, not for a retry later. */
static bool too_many_recipients(const struct smtp_outcome *o)
{
    if (!o->temp || o->stage != STAGE_RCPT || o->code != 452) return false;
    if (strcmp(o->enh, "4.5.3") == 0) return true;
    return strcasestr(o->text, "too many recipients") != NULL;
}

static void job_outcomes(struct queue *q, struct qjob *j, const struct smtp_outcome *outs,
                         const char *mx, const struct conn_addr *ip, uint64_t dur)
{
    struct qmsg *m = j->m;
    if (m->deleted) {
        job_free(j);
        msg_maybe_final(q, m);
        return;
    }
    struct dsn_batch b;
    batch_init(&b, j->n);
    unsigned ntemp = 0, nbounced = 0;
    unsigned *bounced = malloc(j->n * sizeof *bounced);
    unsigned *deferred = malloc(j->n * sizeof *deferred);
    if (!bounced || !deferred) {
        free(bounced);
        free(deferred);
        /* Give the job back; it is tried again (a duplicate is better
         * than a lost outcome). */
        batch_send(q, m, &b, DSN_FAILED, NULL);
        j->state = J_WAIT;
        job_defer(q, j, NULL, mx);
        return;
    }
    const struct smtp_outcome *temp_o = NULL;
    /* Recipients the server took in this transaction: when some were, a
     * 452 "too many recipients" for the others sends them again at once. */
    unsigned accepted = 0, over_limit = 0;
    if (!j->d->local)
        for (unsigned k = 0; k < j->n; k++) {
            if (outs[k].stage > STAGE_RCPT || (outs[k].code >= 200 && outs[k].code < 300)) accepted++;
            if (too_many_recipients(&outs[k])) over_limit++;
        }
    bool resend = accepted > 0 && over_limit > 0;
    unsigned nresend = 0;
    const struct smtp_outcome *limit_o = NULL;
    for (unsigned k = 0; k < j->n; k++) {
        unsigned i = j->idx[k];
        const struct smtp_outcome *o = &outs[k];
        if (resend && too_many_recipients(o)) {
            j->idx[nresend++] = i;
            limit_o = o;
            continue;
        }
        if (o->code >= 200 && o->code < 300) {
            emit_event(q, EV_DELIVERED, m, i, mx, ip, o, j->attempts, dur);
            rcpt_final(q, m, i);
        } else if (!o->temp) {
            emit_event(q, EV_BOUNCED, m, i, mx, ip, o, j->attempts, dur);
            batch_add(&b, i, o, mx);
            bounced[nbounced++] = i;
        } else {
            emit_event(q, EV_DEFERRED, m, i, mx, ip, o, j->attempts, dur);
            deferred[ntemp++] = i;
            temp_o = o;
        }
    }
    struct qsub *sub = batch_send(q, m, &b, DSN_FAILED, NULL);
    for (unsigned k = 0; k < nbounced; k++) rcpt_final_after(q, m, bounced[k], sub);
    free(bounced);
    struct qjob *dj = NULL;
    if (nresend && ntemp && !(dj = job_split(q, j, deferred, ntemp))) {
        /* No room for a second job: everything waits together. */
        for (unsigned k = 0; k < nresend; k++) {
            emit_event(q, EV_DEFERRED, m, j->idx[k], mx, ip, limit_o, j->attempts, dur);
            deferred[ntemp++] = j->idx[k];
        }
        if (!temp_o) temp_o = limit_o;
        nresend = 0;
    }
    if (nresend) {
        /* The server's limit is known now: later transactions to this
         * destination carry no more than it took. */
        if (accepted < j->d->pol.max_recipients || !j->d->pol.max_recipients) j->d->pol.max_recipients = accepted;
        log_info("queue", "%s: %s took %u recipients; %u more go in the next transaction", m->id, mx,
                 accepted, nresend);
        if (dj) {
            /* The deferred ones wait in a job of their own. */
            dj->state = J_WAIT;
            job_defer(q, dj, temp_o, mx);
        }
        free(deferred);
        j->n = nresend;
        j->attempts--;
        job_ready(j);
        return;
    }
    memcpy(j->idx, deferred, ntemp * sizeof *deferred);
    free(deferred);
    j->n = ntemp;
    if (ntemp) {
        j->state = J_WAIT;
        job_defer(q, j, temp_o, mx);
    } else {
        job_free(j);
        msg_maybe_final(q, m);
    }
}

static void qc_txn_done(struct smtp_client *cl, struct smtp_txn *t)
{
    struct qconn *qc = cl->owner;
    struct qjob *j = qc->job;
    qc->job = NULL;
    if (!j) return;
    job_outcomes(qc->q, j, t->rcpt_out, cl->host, &cl->addr, timer_now_ms() - qc->txn_start_ms);
}

/* ---- local delivery into the mailbox store ---- */

/* One local recipient of a job: what the deliver hook said, if there is
 * one (else: INBOX). */
struct local_rcpt {
    struct local_job *lj;
    int action;                    /* HOOK_ACCEPT, HOOK_REJECT, HOOK_TEMPFAIL */
    unsigned code;
    char text[512];                /* folder (accept) or reply text, as the hook reply holds */
};

struct local_job {
    struct offload_job job;
    struct queue *q;
    struct qjob *j;
    uint64_t start_ms;
    unsigned hooks_pending;
    struct local_rcpt *rc;
    struct smtp_outcome outs[];
};

/* "5.7.1 text" -> enh "5.7.1" and the text; else a default code. */
static void outcome_from_reply(struct smtp_outcome *o, unsigned code, const char *text, bool temp)
{
    o->temp = temp;
    o->code = code ? code : temp ? 451 : 550;
    const char *t = text;
    size_t n = strspn(t, "0123456789.");
    if (n >= 5 && n < sizeof o->enh && t[0] == (temp ? '4' : '5') && t[1] == '.' && (t[n] == ' ' || !t[n])) {
        memcpy(o->enh, t, n);
        o->enh[n] = 0;
        t += n;
        while (*t == ' ') t++;
    } else {
        snprintf(o->enh, sizeof o->enh, "%s", temp ? "4.3.0" : "5.7.1");
    }
    snprintf(o->text, sizeof o->text, "%s", *t ? t : temp ? "deferred by the deliver hook"
                                                        : "refused by the deliver hook");
}

static void local_work(struct offload_job *oj)
{
    struct local_job *lj = container_of(oj, struct local_job, job);
    struct qjob *j = lj->j;
    struct qmsg *m = j->m;
    struct store *st = lj->q->eng->store;
    for (unsigned k = 0; k < j->n; k++) {
        const char *addr = m->rcpt[j->idx[k]].addr;
        struct smtp_outcome *o = &lj->outs[k];
        const struct local_rcpt *rc = &lj->rc[k];
        o->stage = STAGE_LOCAL;
        if (rc->action == HOOK_REJECT || rc->action == HOOK_TEMPFAIL) {
            /* A 4xx code defers whatever the verb (Reject(450, ...)). */
            bool temp = rc->action == HOOK_TEMPFAIL || (rc->code >= 400 && rc->code < 500);
            unsigned code = rc->code;
            if (temp && (code < 400 || code > 499)) code = 451;
            if (!temp && (code < 500 || code > 599)) code = 550;
            outcome_from_reply(o, code, rc->text, temp);
            continue;
        }
        char user[320], prefix[1200], id[STORE_ID_MAX];
        if (mailbox_of(addr, strlen(addr), user, sizeof user) < 0) {
            o->temp = 0;
            snprintf(o->enh, sizeof o->enh, "5.1.3");
            snprintf(o->text, sizeof o->text, "%s cannot name a mailbox", addr);
            continue;
        }
        struct store_quota quota = {0, 0};
        users_quota(lj->q->cfg->users, user, strlen(user), &quota.bytes, &quota.messages);
        /* RFC 5321 §4.4: the final delivery records the envelope sender;
         * Delivered-To: is what local delivery agents add (loop detection). */
        int pl = snprintf(prefix, sizeof prefix, "Return-Path: <%s>\r\nDelivered-To: %s\r\n",
                          m->sender, addr);
        if (pl < 0 || (size_t)pl >= sizeof prefix) pl = 0;
        const char *folder = rc->action == HOOK_ACCEPT && rc->text[0] ? rc->text : "INBOX";
        char fdir[STORE_FOLDER_MAX + 2];
        if (store_folder_dir(folder, fdir, sizeof fdir) < 0) {
            /* Checked here for every store, the Python one included. */
            log_warn("queue", "%s: the deliver hook named folder \"%.200s\" for %s, which cannot be "
                     "a folder; delivering to INBOX", m->id, folder, user);
            folder = "INBOX";
        }
        int r = st->ops->deliver(st, user, folder, &quota, prefix, (size_t)pl, m->body, m->body_len,
                                 id, sizeof id);
        if (r == 0) {
            o->code = 250;
            snprintf(o->enh, sizeof o->enh, "2.0.0");
            snprintf(o->text, sizeof o->text, "delivered to %.200s as %s", folder, id);
        } else if (r == -EDQUOT) {
            /* RFC 3463 4.2.2: mailbox full. Deferred; the queue's lifetime
             * ends it in a bounce, as with any temporary failure. */
            o->temp = 1;
            o->code = 452;
            snprintf(o->enh, sizeof o->enh, "4.2.2");
            snprintf(o->text, sizeof o->text, "mailbox of %s is full (over quota)", user);
        } else if (r == -EINVAL) {
            o->temp = 0;
            snprintf(o->enh, sizeof o->enh, "5.1.3");
            snprintf(o->text, sizeof o->text, "%s cannot name a mailbox", addr);
        } else {
            o->temp = 1;
            snprintf(o->enh, sizeof o->enh, "%s", r == -ENOSPC ? "4.3.1" : "4.3.0");
            snprintf(o->text, sizeof o->text, "cannot write to the mailbox of %s: %s", addr,
                     strerror(-r));
        }
    }
}

static void local_done(struct loop *l, struct loop_msg *lm)
{
    struct local_job *lj = container_of(lm, struct local_job, job.msg);
    if (!l->dead) job_outcomes(lj->q, lj->j, lj->outs, "local", NULL, timer_now_ms() - lj->start_ms);
    free(lj->rc);
    free(lj);
}

static void local_submit(struct local_job *lj)
{
    lj->job.msg.fn = local_done;
    lj->job.loop = &lj->q->loop;
    lj->job.work = local_work;
    lj->job.outstanding = &lj->q->eng->offload_jobs;
    /* The thread follows the recipient's mailbox (a local job has one
     * recipient): messages to one mailbox are stored in the order they
     * are submitted, as readers of INBOX expect, while other mailboxes go
     * on in parallel. */
    struct qmsg *m = lj->j->m;
    char box[320];
    const char *first = lj->j->n ? m->rcpt[lj->j->idx[0]].addr : m->id;
    if (mailbox_of(first, strlen(first), box, sizeof box) < 0) snprintf(box, sizeof box, "%s", first);
    offload_submit_keyed(&lj->job, hash_str(box));
}

/* The deliver hook's answer for one recipient; the last one sends the job
 * to the store. */
static void deliver_reply(struct hook_req *r)
{
    struct local_rcpt *rc = r->owner;
    struct local_job *lj = rc->lj;
    if (r->loop->dead) {
        hook_req_free(r);
        if (--lj->hooks_pending == 0) {
            free(lj->rc);
            free(lj);
        }
        return;
    }
    rc->action = r->action == HOOK_REJECT || r->action == HOOK_TEMPFAIL ? r->action : HOOK_ACCEPT;
    rc->code = (unsigned)r->code;
    snprintf(rc->text, sizeof rc->text, "%s", r->text);
    hook_req_free(r);
    if (--lj->hooks_pending == 0) local_submit(lj);
}

static void local_start(struct queue *q, struct qjob *j)
{
    struct local_job *lj = calloc(1, sizeof *lj + j->n * sizeof lj->outs[0]);
    struct local_rcpt *rc = lj ? calloc(j->n, sizeof *rc) : NULL;
    if (!lj || !rc || !q->eng->store) {
        free(lj);
        free(rc);
        j->state = J_WAIT;
        timer_arm(&q->loop.timers, &j->timer, 1000);
        return;
    }
    j->state = J_ACTIVE;
    j->attempts++;
    lj->q = q;
    lj->j = j;
    lj->rc = rc;
    lj->start_ms = timer_now_ms();
    for (unsigned k = 0; k < j->n; k++) rc[k].lj = lj;
    if (!(q->cfg->hooks & (1u << HOOK_DELIVER)) || !q->eng->bridge) {
        local_submit(lj);
        return;
    }
    /* deliver(user, message) -> folder or Reject: one call per recipient,
     * the message bytes shared (the job keeps the message alive). */
    lj->hooks_pending = j->n + 1;
    struct qmsg *m = j->m;
    for (unsigned k = 0; k < j->n; k++) {
        char user[320];
        const char *addr = m->rcpt[j->idx[k]].addr;
        if (mailbox_of(addr, strlen(addr), user, sizeof user) < 0) snprintf(user, sizeof user, "%s", addr);
        const char *args[HARG_COUNT] = {0};
        size_t lens[HARG_COUNT] = {0};
        args[HARG_1] = user;
        lens[HARG_1] = strlen(user);
        args[HARG_2] = addr;
        lens[HARG_2] = strlen(addr);
        args[HARG_3] = m->id;
        lens[HARG_3] = strlen(m->id);
        struct hook_req *r = hook_req_new(HOOK_DELIVER, args, lens);
        if (!r) {
            rc[k].action = HOOK_TEMPFAIL;
            rc[k].code = 451;
            snprintf(rc[k].text, sizeof rc[k].text, "4.3.0 out of memory for the deliver hook");
            lj->hooks_pending--;
            continue;
        }
        r->data = m->body;
        r->data_len = m->body_len;
        r->loop = &q->loop;
        r->done = deliver_reply;
        r->owner = &rc[k];
        bridge_submit(q->eng->bridge, r);
    }
    if (--lj->hooks_pending == 0) local_submit(lj);
}

static void qc_failed(struct smtp_client *cl, const struct smtp_outcome *why)
{
    struct qconn *qc = cl->owner;
    qc->last_fail = *why;
    log_debug("queue", "%s: %s", qc->d->name, why->text);
}

static void qc_closed(struct smtp_client *cl)
{
    struct qconn *qc = cl->owner;
    struct qdest *d = qc->d;
    struct queue *q = qc->q;
    if (qc->idle) {
        for (struct qconn **pp = &d->idle; *pp; pp = &(*pp)->next_idle)
            if (*pp == qc) {
                *pp = qc->next_idle;
                break;
            }
        qc->idle = false;
    }
    if (qc->job) {
        /* The client finishes a transaction before closing; this is a
         * job it never started. */
        struct qjob *j = qc->job;
        qc->job = NULL;
        j->attempts--;
        job_ready(j);
    }
    if (!qc->was_ready && !q->stopping) {
        /* Opportunistic TLS (policy "may", no certificate check asked
         * for) that failed in the handshake: the same address again in
         * plaintext, as Postfix does, rather than keep the mail from a
         * server with a broken TLS set-up. With tls_verify a server that
         * offers TLS must pass the check: no fallback. */
        if (qc->last_fail.stage == STAGE_TLS && d->ccfg.tls == CLIENT_TLS_MAY && !qc->plain_now &&
            qc->addr_i > 0 && !(d->ccfg.tls_ctx && tls_ctx_verifies(d->ccfg.tls_ctx)) &&
            !d->ccfg.auth_user) {
            log_info("queue", "%s: %s; trying %s again without TLS", d->name, qc->last_fail.text,
                     qc->mx && qc->host_i < qc->mx->nhosts ? qc->mx->hosts[qc->host_i].name : d->name);
            qc->plain_next = true;
            qc->addr_i--;
        }
        /* Set-up failed at this address: the next one (or the same one in
         * plaintext). */
        qc_try_next(qc);
        return;
    }
    if (!qc->was_ready) d->nconnecting--;
    d->nconn--;
    q->nconns--;
    qc_free(qc);
    maybe_finish_stop(q);
    dest_kick(d);
}

static const struct smtp_client_ops qc_ops = {
    .ready = qc_ready,
    .txn_done = qc_txn_done,
    .failed = qc_failed,
    .closed = qc_closed,
};

/* ---- bounces ---- */

static void sub_done(struct spool_rec *r, int err);

static struct qsub *send_dsn(struct queue *q, struct qmsg *m, const unsigned *ri, unsigned n,
                             const struct smtp_outcome *outs, const char *const *mxs, int action,
                             const char *status_override)
{
    struct qsub *queued = NULL;
    /* Never a bounce to the null sender (RFC 5321 §4.5.5, §6.1). */
    if (!m->sender[0]) return NULL;
    struct dsn_rcpt *dr = calloc(n, sizeof *dr);
    char (*status)[16] = calloc(n, sizeof *status);
    char (*diag)[600] = calloc(n, sizeof *diag);
    char (*orcpt)[512] = calloc(n, sizeof *orcpt);
    unsigned k = 0;
    uint64_t now = wall_ms();
    for (unsigned x = 0; dr && status && diag && orcpt && x < n; x++) {
        const struct qrcpt *r = &m->rcpt[ri[x]];
        unsigned want = action == DSN_DELAYED ? DSN_NOTIFY_DELAY : DSN_NOTIFY_FAILURE;
        if (!(r->notify & want)) continue;
        const struct smtp_outcome *o = &outs[x];
        dr[k].final_rcpt = r->addr;
        dr[k].orcpt = dsn_param(r->params ? r->params : "", "ORCPT", orcpt[k], sizeof orcpt[k]) == 0 ? orcpt[k] : NULL;
        dr[k].action = action;
        snprintf(status[k], sizeof status[k], "%s",
                 status_override ? status_override : o->enh[0] ? o->enh : (o->temp ? "4.0.0" : "5.0.0"));
        dr[k].status = status[k];
        dr[k].remote_mta = mxs[x] && mxs[x][0] && o->code ? mxs[x] : NULL;
        if (o->code) {
            snprintf(diag[k], sizeof diag[k], "%u %s%s%s", o->code, o->enh[0] ? o->enh : "",
                     o->enh[0] ? " " : "", o->text);
            dr[k].diag_type = "smtp";
        } else {
            snprintf(diag[k], sizeof diag[k], "%s", o->text);
            dr[k].diag_type = "X-mailengine";
        }
        dr[k].diagnostic = diag[k];
        dr[k].last_attempt_ms = now;
        if (action == DSN_DELAYED) dr[k].will_retry_until_ms = m->arrival_ms + q->dc->lifetime_ms;
        k++;
    }
    if (k > 0) {
        char envid[256], seed[64];
        snprintf(seed, sizeof seed, "%s.%llu", m->id, (unsigned long long)++q->seq);
        struct dsn_msg d = {
            .reporting_mta = q->cfg->hostname,
            .to = m->sender,
            .envid = dsn_param(m->mail_params ? m->mail_params : "", "ENVID", envid, sizeof envid) == 0 ? envid : NULL,
            .queue_id = m->id,
            .arrival_ms = m->arrival_ms,
            .rcpts = dr,
            .nrcpt = k,
            .orig = m->body,
            .orig_len = m->body_len,
            .ret_hdrs = dsn_ret_hdrs_of(m->mail_params ? m->mail_params : ""),
            .max_return = q->dc->bounce_max_return,
            .now = time(NULL),
            .message_id_seed = seed,
        };
        struct bytebuf out = {0};
        struct qsub *s = calloc(1, sizeof *s);
        if (s && dsn_build(&d, &out) == 0) {
            size_t elen = strlen(m->sender) + 64;
            s->env = malloc(elen + SPOOL_ID_LEN + 8);
            s->q = q;
            if (s->env) {
                spool_assign_id(q->spool, &s->rec);
                int el = snprintf(s->env, elen + SPOOL_ID_LEN + 8, "I %s\nF \nR %s\nL bounce\n",
                                  s->rec.id, m->sender);
                s->msg = malloc(bytebuf_used(&out));
                if (s->msg) {
                    memcpy(s->msg, bytebuf_head(&out), bytebuf_used(&out));
                    s->msg_len = bytebuf_used(&out);
                    s->rec.iov[1].iov_base = s->env;
                    s->rec.iov[1].iov_len = (size_t)el;
                    s->rec.iov[2].iov_base = s->msg;
                    s->rec.iov[2].iov_len = s->msg_len;
                    s->rec.niov = 3;
                    s->rec.done = sub_done;
                    s->fin = calloc(n, sizeof *s->fin);
                    spool_append(q->spool, &s->rec);
                    queued = s;
                    s = NULL;
                }
            }
        }
        if (s) {
            log_error("queue", "%s: cannot queue a bounce to %s", m->id, m->sender);
            free(s->env);
            free(s->msg);
            free(s);
        }
        bytebuf_free(&out);
    }
    free(dr);
    free(status);
    free(diag);
    free(orcpt);
    return queued;
}

/* ---- submissions from Python and the queue's own spool ---- */

static void batch_one_done(struct qbatch *b)
{
    pthread_mutex_lock(&b->lock);
    if (--b->remaining == 0) pthread_cond_broadcast(&b->cond);
    pthread_mutex_unlock(&b->lock);
}

static void sub_done(struct spool_rec *r, int err)
{
    struct qsub *s = container_of(r, struct qsub, rec);
    if (err) log_error("queue", "cannot write %s to the spool: %s", r->id, strerror(-err));
    if (s->item) {
        s->item->err = err;
        snprintf(s->item->id, sizeof s->item->id, "%s", err ? "" : r->id);
    }
    struct queue *q = s->q;
    if (s->batch) batch_one_done(s->batch);
    if (s->m) {
        struct qmsg *m = s->m;
        for (unsigned i = 0; i < s->nfin && !m->deleted && m->seg; i++)
            seg_log_line(m->seg, "R %s %u\n", m->id, s->fin[i]);
        m->holds--;
        msg_maybe_final(q, m);
    }
    free(s->fin);
    free(s->env);
    free(s->msg);
    free(s);
    maybe_finish_stop(q);
}

static void on_submit(struct loop *l, struct loop_msg *lm)
{
    struct qsubmit_msg *sm = container_of(lm, struct qsubmit_msg, msg);
    struct queue *q = l->owner;
    for (size_t i = 0; i < sm->n; i++) {
        struct queue_item *it = &sm->items[i];
        struct qsub *s = calloc(1, sizeof *s);
        if (!s || l->dead || !q->spool) {
            free(s);
            it->err = -ENOMEM;
            free(it->env);
            free(it->msg);
            it->env = it->msg = NULL;
            batch_one_done(sm->batch);
            continue;
        }
        s->q = q;
        s->item = it;
        s->batch = sm->batch;
        spool_assign_id(q->spool, &s->rec);
        size_t elen = it->env_len + SPOOL_ID_LEN + 4;
        s->env = malloc(elen);
        if (!s->env) {
            it->err = -ENOMEM;
            free(s);
            batch_one_done(sm->batch);
            continue;
        }
        int n = snprintf(s->env, elen, "I %s\n", s->rec.id);
        memcpy(s->env + n, it->env, it->env_len);
        free(it->env);
        it->env = NULL;
        s->msg = it->msg;
        s->msg_len = it->msg_len;
        it->msg = NULL;
        s->rec.iov[1].iov_base = s->env;
        s->rec.iov[1].iov_len = (size_t)n + it->env_len;
        s->rec.iov[2].iov_base = s->msg;
        s->rec.iov[2].iov_len = s->msg_len;
        s->rec.niov = 3;
        s->rec.done = sub_done;
        spool_append(q->spool, &s->rec);
    }
    free(sm);
}

void queue_submit(struct queue *q, struct queue_item *items, size_t n)
{
    if (n == 0) return;
    struct qbatch b;
    pthread_mutex_init(&b.lock, NULL);
    pthread_cond_init(&b.cond, NULL);
    b.remaining = n;
    struct qsubmit_msg *sm = calloc(1, sizeof *sm);
    if (!sm) {
        for (size_t i = 0; i < n; i++) items[i].err = -ENOMEM;
        return;
    }
    sm->msg.fn = on_submit;
    sm->items = items;
    sm->n = n;
    sm->batch = &b;
    loop_post(&q->loop, &sm->msg);
    pthread_mutex_lock(&b.lock);
    while (b.remaining > 0) pthread_cond_wait(&b.cond, &b.lock);
    pthread_mutex_unlock(&b.lock);
    pthread_mutex_destroy(&b.lock);
    pthread_cond_destroy(&b.cond);
}

/* ---- records from the spools ---- */

static void on_commit(struct loop *l, struct loop_msg *lm)
{
    struct qcommit *c = container_of(lm, struct qcommit, msg);
    struct queue *q = l->owner;
    if (l->dead) {
        free(c);
        return;
    }
    struct qseg *s = seg_open(q, c->worker, c->seg);
    if (!s) {
        free(c);
        return;
    }
    if (c->sealed) {
        s->sealed = true;
        if (s->total != UINT32_MAX) s->total = c->nrecords;
        seg_maybe_delete(s);
        free(c);
        return;
    }
    s->known++;
    const uint8_t *h = s->map + c->offset;
    uint32_t env_len;
    uint64_t msg_len, arrival;
    if (c->offset + c->len > s->map_len) {
        /* Cannot happen with the reservation above; if it did, the segment
         * is kept (never counted complete) and read again at the next start. */
        log_error("queue", "record at %llu of %s lies past the mapped range; it is delivered after a restart",
                  (unsigned long long)c->offset, s->path);
        s->total = UINT32_MAX;
        free(c);
        return;
    }
    memcpy(&env_len, h + 4, 4);
    memcpy(&msg_len, h + 8, 8);
    memcpy(&arrival, h + 16, 8);
    const char *env = (const char *)h + 32;
    msg_add(q, s, env, env_len, env + env_len, (size_t)msg_len, arrival, NULL, 0, false);
    free(c);
}

void queue_record_committed(struct queue *q, int worker, uint32_t seg, uint64_t offset, uint64_t len)
{
    struct qcommit *c = calloc(1, sizeof *c);
    if (!c) {
        log_error("queue", "out of memory: a message waits for the next start");
        return;
    }
    c->msg.fn = on_commit;
    c->worker = worker;
    c->seg = seg;
    c->offset = offset;
    c->len = len;
    loop_post(&q->loop, &c->msg);
}

void queue_segment_sealed(struct queue *q, int worker, uint32_t seg, uint32_t nrecords)
{
    struct qcommit *c = calloc(1, sizeof *c);
    if (!c) return;
    c->msg.fn = on_commit;
    c->worker = worker;
    c->seg = seg;
    c->nrecords = nrecords;
    c->sealed = true;
    loop_post(&q->loop, &c->msg);
}

/* ---- recovery ---- */

struct logstate {
    struct logstate *next;
    char id[SPOOL_ID_LEN + 1];
    bool done, held;
    uint32_t *rcpts;
    size_t nr, cap;
};

#define LOGSTATE_BUCKETS 4096

struct recover_ctx {
    struct queue *q;
    struct qseg *seg;
    struct logstate *tab[LOGSTATE_BUCKETS];
    uint32_t total;
};

static struct logstate *ls_get(struct recover_ctx *rc, const char *id, bool create)
{
    unsigned h = hash_str(id) % LOGSTATE_BUCKETS;
    for (struct logstate *s = rc->tab[h]; s; s = s->next)
        if (strcmp(s->id, id) == 0) return s;
    if (!create) return NULL;
    struct logstate *s = calloc(1, sizeof *s);
    if (!s) return NULL;
    snprintf(s->id, sizeof s->id, "%s", id);
    s->next = rc->tab[h];
    rc->tab[h] = s;
    return s;
}

static void ls_load(struct recover_ctx *rc, const char *path)
{
    FILE *f = fopen(path, "re");
    if (!f) return;
    char line[160];
    while (fgets(line, sizeof line, f)) {
        if (strlen(line) < 2 + SPOOL_ID_LEN || line[1] != ' ') continue;
        char id[SPOOL_ID_LEN + 1];
        memcpy(id, line + 2, SPOOL_ID_LEN);
        id[SPOOL_ID_LEN] = 0;
        struct logstate *s = ls_get(rc, id, true);
        if (!s) break;
        switch (line[0]) {
        case 'D': s->done = true; break;
        case 'H': s->held = true; break;
        case 'U': s->held = false; break;
        case 'R': {
            unsigned idx;
            if (sscanf(line + 2 + SPOOL_ID_LEN, " %u", &idx) != 1) break;
            if (s->nr == s->cap) {
                size_t cap = s->cap ? s->cap * 2 : 4;
                uint32_t *p = realloc(s->rcpts, cap * sizeof *p);
                if (!p) break;
                s->rcpts = p;
                s->cap = cap;
            }
            s->rcpts[s->nr++] = idx;
            break;
        }
        default: break;
        }
    }
    fclose(f);
}

static int recover_record(const struct spool_entry *e, void *arg)
{
    struct recover_ctx *rc = arg;
    rc->total++;
    rc->seg->known++;
    struct logstate *ls = ls_get(rc, e->id, false);
    if (ls && ls->done) return 0;
    msg_add(rc->q, rc->seg, e->env, e->env_len, e->msg, e->msg_len, e->arrival_ms,
            ls ? ls->rcpts : NULL, ls ? ls->nr : 0, ls ? ls->held : false);
    return 0;
}

/* One segment of the spool at start-up: its live records become queued
 * messages (the state log says which recipients are already final). */
static int recover_segment(const char *dat, const char *logpath, void *arg)
{
    struct queue *q = arg;
    int worker;
    unsigned num;
    const char *seg = strrchr(dat, '/');
    const char *wdir = seg ? seg - 1 : NULL;
    while (wdir && wdir > dat && *wdir != '/') wdir--;
    if (!seg || !wdir || sscanf(wdir, "/w%d/", &worker) != 1 || sscanf(seg, "/%8x.dat", &num) != 1)
        return 0;
    struct qseg *s = seg_open(q, worker, num);
    /* A segment that cannot be read is left for the next start (logged). */
    if (!s) return 0;
    struct stat st;
    if (fstat(s->dat_fd, &st) < 0) return 0;
    struct recover_ctx *rc = calloc(1, sizeof *rc);
    if (!rc) return 0;
    rc->q = q;
    rc->seg = s;
    ls_load(rc, logpath);
    size_t len = (size_t)st.st_size < s->map_len ? (size_t)st.st_size : s->map_len;
    spool_records_walk(s->map, len, recover_record, rc);
    s->total = rc->total;
    s->sealed = true;   /* every worker starts a new segment at start-up */
    for (unsigned i = 0; i < LOGSTATE_BUCKETS; i++) {
        struct logstate *x = rc->tab[i];
        while (x) {
            struct logstate *n = x->next;
            free(x->rcpts);
            free(x);
            x = n;
        }
    }
    free(rc);
    seg_maybe_delete(s);
    return 0;
}

/* ---- control ---- */

static void ctl_apply(struct queue *q, struct qmsg *m, enum queue_op op)
{
    switch (op) {
    case QOP_HOLD:
        if (m->held) return;
        m->held = true;
        if (m->seg) seg_log_line(m->seg, "H %s\n", m->id);
        for (unsigned i = 0; i < m->jobs; i++) {
            struct qjob *j = m->joblist[i];
            if (j->state == J_READY) ready_remove(j->d, j);
            if (j->state == J_WAIT) timer_cancel(&q->loop.timers, &j->timer);
            if (j->state != J_ACTIVE) j->state = J_HELD;
        }
        break;
    case QOP_RELEASE:
    case QOP_RETRY:
    case QOP_FLUSH:
        /* Retry (and flush) wake deferred jobs; only release ends a hold. */
        if (op == QOP_RELEASE) {
            if (!m->held) return;
            if (m->seg) seg_log_line(m->seg, "U %s\n", m->id);
            m->held = false;
        } else if (m->held) {
            return;
        }
        /* With delivery off, jobs stay parked whatever the flags say. */
        if (!q->dc->enabled) break;
        for (unsigned i = 0; i < m->jobs; i++) {
            struct qjob *j = m->joblist[i];
            if (j->state == J_HELD || j->state == J_WAIT) {
                timer_cancel(&q->loop.timers, &j->timer);
                j->d->dead_until_ms = 0;
                job_ready(j);
            }
        }
        break;
    case QOP_DELETE:
        m->deleted = true;
        for (unsigned i = 0; i < m->jobs;) {
            struct qjob *j = m->joblist[i];
            if (j->state != J_ACTIVE) {
                job_free(j);   /* swaps the last into slot i */
                continue;
            }
            i++;
        }
        for (unsigned i = 0; i < m->nrcpt; i++) m->rcpt[i].state = R_DONE;
        m->pending = 0;
        msg_maybe_final(q, m);
        break;
    }
}

static void on_control(struct loop *l, struct loop_msg *lm)
{
    struct qctl *c = container_of(lm, struct qctl, msg);
    struct queue *q = l->owner;
    c->result = 0;
    if (l->dead) {
        c->result = -ESHUTDOWN;
        batch_one_done(c->batch);
        return;
    }
    if (c->id && *c->id) {
        struct qmsg *m = msg_find(q, c->id);
        if (!m || m->deleted) c->result = -ENOENT;
        else {
            ctl_apply(q, m, c->op);
            c->result = 1;
        }
    } else {
        /* Every message: collect first, since DELETE frees as it goes. */
        size_t n = 0, cap = 0;
        struct qmsg **all = NULL;
        for (unsigned h = 0; h < MSG_HASH_BUCKETS; h++)
            for (struct qmsg *m = q->msgs[h]; m; m = m->hnext) {
                if (n == cap) {
                    cap = cap ? cap * 2 : 256;
                    struct qmsg **p = realloc(all, cap * sizeof *p);
                    if (!p) break;
                    all = p;
                }
                all[n++] = m;
            }
        for (size_t i = 0; i < n; i++) ctl_apply(q, all[i], c->op);
        free(all);
        c->result = (int)n;
    }
    batch_one_done(c->batch);
}

int queue_control(struct queue *q, enum queue_op op, const char *id)
{
    struct qbatch b;
    pthread_mutex_init(&b.lock, NULL);
    pthread_cond_init(&b.cond, NULL);
    b.remaining = 1;
    struct qctl c = {.op = op, .id = id, .batch = &b};
    c.msg.fn = on_control;
    loop_post(&q->loop, &c.msg);
    pthread_mutex_lock(&b.lock);
    while (b.remaining > 0) pthread_cond_wait(&b.cond, &b.lock);
    pthread_mutex_unlock(&b.lock);
    pthread_mutex_destroy(&b.lock);
    pthread_cond_destroy(&b.cond);
    return c.result;
}

void queue_get_stats(struct queue *q, struct queue_stats *st)
{
    pthread_mutex_lock(&q->stats_lock);
    *st = q->st;
    st->active_connections = q->nconns;
    pthread_mutex_unlock(&q->stats_lock);
}

/* ---- the thread ---- */

static void spool_committed_hook(void *arg, const struct spool_rec *r, uint32_t seg, uint64_t off,
                                 uint64_t len)
{
    (void)r;
    struct queue *q = arg;
    queue_record_committed(q, QUEUE_SPOOL_INDEX, seg, off, len);
}

static void spool_sealed_hook(void *arg, uint32_t seg, uint32_t nrecords)
{
    queue_segment_sealed(arg, QUEUE_SPOOL_INDEX, seg, nrecords);
}

static void maybe_finish_stop(struct queue *q)
{
    if (!q->stopping) return;
    if (q->nconns > 0 || (q->spool && spool_inflight(q->spool) > 0)) return;
    if (q->ev_busy || bytebuf_used(&q->ev_pend)) return;
    for (struct qseg *s = q->segs; s; s = s->next)
        if (s->log_busy || bytebuf_used(&s->log_pend)) return;
    loop_stop(&q->loop);
}

static void close_all(struct queue *q, bool force)
{
    for (unsigned h = 0; h < DEST_HASH_BUCKETS; h++)
        for (struct qdest *d = q->dests[h]; d; d = d->hnext) {
            while (d->idle) {
                struct qconn *qc = d->idle;
                d->idle = qc->next_idle;
                qc->idle = false;
                timer_cancel(&q->loop.timers, &qc->idle_timer);
                smtp_client_quit(&qc->cl);
            }
        }
    (void)force;
}

static void on_stop_timer(struct timer *t)
{
    struct queue *q = container_of(t, struct queue, stop_timer);
    /* The deadline passed: whatever is still in flight is cut; its
     * recipients stay queued and go out after the next start. */
    log_info("queue", "stop deadline: closing %u connections", q->nconns);
    loop_stop(&q->loop);
}

static void on_stop(struct loop *l, struct loop_msg *m)
{
    (void)m;
    struct queue *q = l->owner;
    if (l->dead) return;
    q->stopping = true;
    close_all(q, false);
    uint64_t now = timer_now_ms();
    uint64_t deadline = q->eng->stop_deadline_ms;
    timer_arm(&q->loop.timers, &q->stop_timer, deadline > now ? deadline - now : 1);
    maybe_finish_stop(q);
}

static void *queue_thread(void *arg)
{
    struct queue *q = arg;
    char err[256] = "";
    int rc = loop_init(&q->loop, 255, 4096, 256, 16384);
    if (rc < 0) snprintf(err, sizeof err, "queue: io_uring setup failed: %s", strerror(-rc));
    if (!err[0]) {
        q->loop.owner = q;
        q->log_task.fn = log_task_run;
        q->ev_op.fn = ev_write_done;
        q->stop_timer.fn = on_stop_timer;
        q->dns = dns_resolver_new(&q->loop, q->dc->dns_servers, err, sizeof err);
    }
    if (!err[0]) {
        spool_for_each_segment(q->cfg->data_dir, recover_segment, q);
        q->spool = spool_open(&q->loop, q->cfg->data_dir, QUEUE_SPOOL_INDEX, err, sizeof err);
        if (q->spool) spool_set_hooks(q->spool, spool_committed_hook, spool_sealed_hook, q);
    }
    pthread_mutex_lock(&q->start_lock);
    if (err[0]) snprintf(q->start_err, sizeof q->start_err, "%s", err);
    q->start_state = err[0] ? -1 : 1;
    pthread_cond_broadcast(&q->start_cond);
    pthread_mutex_unlock(&q->start_lock);
    if (err[0]) {
        if (q->dns) dns_resolver_free(q->dns);
        q->dns = NULL;
        return NULL;
    }
    loop_run(&q->loop);
    /* Connections still open at the deadline are cut: their recipients
     * stay queued. Their ops die with the ring, so their memory can go. */
    while (q->all_conns) {
        struct qconn *qc = q->all_conns;
        if (qc->cl.conn.loop && qc->cl.conn.fd >= 0 && !(qc->cl.conn.flags & CONN_CLOSED))
            close(qc->cl.conn.fd);
        bytebuf_free(&qc->cl.conn.in);
        bytebuf_free(&qc->cl.conn.out);
        bytebuf_free(&qc->cl.conn.flight);
        bytebuf_free(&qc->cl.conn.tls_pt);
        if (qc->cl.conn.tls) tls_conn_free(qc->cl.conn.tls);
        if (qc->job) qc->job->state = J_WAIT;
        qc_free(qc);
    }
    dns_resolver_free(q->dns);
    q->dns = NULL;
    loop_destroy(&q->loop);
    return NULL;
}

struct queue *queue_start(struct engine *e, char *err, size_t errlen)
{
    struct queue *q = calloc(1, sizeof *q);
    if (!q) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    q->eng = e;
    q->cfg = e->cfg;
    q->dc = e->cfg->delivery;
    q->events_fd = -1;
    pthread_mutex_init(&q->start_lock, NULL);
    pthread_cond_init(&q->start_cond, NULL);
    pthread_mutex_init(&q->stats_lock, NULL);
    q->stop_msg.fn = on_stop;
    char p[4200];
    /* The data directory may not exist yet (the spool makes its own
     * subdirectories later). */
    fs_mkdir_p(q->cfg->data_dir);
    snprintf(p, sizeof p, "%s/events.jsonl", q->cfg->data_dir);
    q->events_fd = open(p, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (q->events_fd < 0) {
        snprintf(err, errlen, "cannot open %s: %s", p, strerror(errno));
        free(q);
        return NULL;
    }
    char terr[256];
    q->tls_plain = tls_ctx_new_client(0, NULL, terr, sizeof terr);
    /* For a policy hook that asks for certificate checks: made here, since
     * loading the system's CAs reads files. */
    if (q->dc->policy_hook && !(q->tls_verify = tls_ctx_new_client(1, NULL, terr, sizeof terr)))
        log_warn("queue", "no verifying TLS context for the policy hook: %s", terr);
    if (pthread_create(&q->thread, NULL, queue_thread, q) != 0) {
        snprintf(err, errlen, "cannot start the queue thread");
        close(q->events_fd);
        tls_ctx_free(q->tls_plain);
        free(q);
        return NULL;
    }
    q->thread_started = true;
    pthread_mutex_lock(&q->start_lock);
    while (q->start_state == 0) pthread_cond_wait(&q->start_cond, &q->start_lock);
    pthread_mutex_unlock(&q->start_lock);
    if (q->start_state < 0) {
        snprintf(err, errlen, "%s", q->start_err);
        pthread_join(q->thread, NULL);
        q->thread_started = false;
        queue_free(q);
        return NULL;
    }
    return q;
}

void queue_request_stop(struct queue *q)
{
    if (!q || atomic_exchange(&q->stop_posted, true)) return;
    loop_post(&q->loop, &q->stop_msg);
}

void queue_join(struct queue *q)
{
    if (!q || !q->thread_started) return;
    pthread_join(q->thread, NULL);
    q->thread_started = false;
}

void queue_free(struct queue *q)
{
    if (!q) return;
    if (q->start_state > 0) loop_close_inbox(&q->loop);
    for (unsigned h = 0; h < MSG_HASH_BUCKETS; h++) {
        struct qmsg *m = q->msgs[h];
        while (m) {
            struct qmsg *n = m->hnext;
            for (unsigned i = 0; i < m->jobs; i++) {
                free(m->joblist[i]->idx);
                free(m->joblist[i]);
            }
            msg_free(m);
            m = n;
        }
    }
    for (unsigned h = 0; h < DEST_HASH_BUCKETS; h++) {
        struct qdest *d = q->dests[h];
        while (d) {
            struct qdest *n = d->hnext;
            free(d->name);
            free(d->key);
            free(d->pool);
            free(d);
            d = n;
        }
    }
    while (q->segs) {
        struct qseg *s = q->segs;
        q->segs = s->next;
        s->next = NULL;
        if (s->map) munmap((void *)s->map, s->map_len);
        if (s->dat_fd >= 0) close(s->dat_fd);
        if (s->log_fd >= 0) {
            /* Lines not yet written (a stop at the deadline) are written now. */
            if (bytebuf_used(&s->log_pend)) {
                ssize_t w = write(s->log_fd, bytebuf_head(&s->log_pend), bytebuf_used(&s->log_pend));
                (void)w;
            }
            close(s->log_fd);
        }
        bytebuf_free(&s->log_pend);
        bytebuf_free(&s->log_flight);
        free(s);
    }
    if (q->events_fd >= 0) {
        if (bytebuf_used(&q->ev_pend)) {
            ssize_t w = write(q->events_fd, bytebuf_head(&q->ev_pend), bytebuf_used(&q->ev_pend));
            (void)w;
        }
        close(q->events_fd);
    }
    bytebuf_free(&q->ev_pend);
    bytebuf_free(&q->ev_flight);
    if (q->spool) spool_close(q->spool);
    if (q->tls_plain) tls_ctx_free(q->tls_plain);
    if (q->tls_verify) tls_ctx_free(q->tls_verify);
    pthread_mutex_destroy(&q->start_lock);
    pthread_cond_destroy(&q->start_cond);
    pthread_mutex_destroy(&q->stats_lock);
    free(q);
}

void delivery_cfg_free(struct delivery_cfg *dc)
{
    if (!dc) return;
    free(dc->dns_servers);
    free(dc->mail_dir);
    free(dc->store_dir);
    free(dc->relay_host);
    free(dc->relay_user);
    free(dc->relay_pass);
    free(dc->relay_ca_file);
    if (dc->relay_tls_ctx) tls_ctx_free(dc->relay_tls_ctx);
    struct dest_policy *all[1] = {&dc->def};
    (void)all;
    free(dc->def.domain);
    free(dc->def.tls_ca_file);
    free(dc->def.pool);
    if (dc->def.tls_ctx) tls_ctx_free(dc->def.tls_ctx);
    for (size_t i = 0; i < dc->ndests; i++) {
        free(dc->dests[i].domain);
        free(dc->dests[i].tls_ca_file);
        free(dc->dests[i].pool);
        if (dc->dests[i].tls_ctx) tls_ctx_free(dc->dests[i].tls_ctx);
    }
    free(dc->dests);
    for (size_t i = 0; i < dc->npools; i++) {
        free(dc->pools[i].name);
        free(dc->pools[i].addrs);
    }
    free(dc->pools);
    for (size_t i = 0; i < dc->ndkim; i++) {
        free(dc->dkim[i].domain);
        free(dc->dkim[i].selector);
        if (dc->dkim[i].key) dkim_key_free(dc->dkim[i].key);
        if (dc->dkim[i].headers)
            for (char **h = dc->dkim[i].headers; *h; h++) free(*h);
        free(dc->dkim[i].headers);
    }
    free(dc->dkim);
    free(dc);
}
