/* Workers and listeners (see worker.h): each worker thread owns a loop,
 * a spool and one SO_REUSEPORT socket per listener with multishot accept. */
#include "core/worker.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/log.h"
#include "core/offload.h"
#include "queue/queue.h"
#include "queue/spool.h"
#include "store/store.h"

#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

unsigned engine_ip_slot(const struct conn_addr *a)
{
    /* FNV-1a over the address bytes. */
    uint32_t h = 2166136261u;
    size_t n = a->family == AF_INET6 ? 16 : 4;
    for (size_t i = 0; i < n; i++) h = (h ^ a->addr[i]) * 16777619u;
    return h % ENGINE_IP_SLOTS;
}

static int listen_socket(const char *host, int port, bool probe, char *err, size_t errlen)
{
    struct addrinfo hints = {.ai_family = AF_UNSPEC, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_PASSIVE | AI_NUMERICSERV};
    struct addrinfo *res = NULL;
    char portstr[16];
    snprintf(portstr, sizeof portstr, "%d", port);
    int rc = getaddrinfo(host && *host ? host : NULL, portstr, &hints, &res);
    if (rc != 0) {
        snprintf(err, errlen, "cannot resolve listen address %s: %s", host, gai_strerror(rc));
        return -1;
    }
    if (probe) {
        /* SO_REUSEPORT would let us share a port with another engine run by
         * the same user; a plain bind first tells us the port is free. */
        int pfd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        int one = 1;
        if (pfd >= 0) setsockopt(pfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (pfd < 0 || bind(pfd, res->ai_addr, res->ai_addrlen) < 0) {
            snprintf(err, errlen, "cannot listen on %s:%d: %s", host, port, strerror(errno));
            if (pfd >= 0) close(pfd);
            freeaddrinfo(res);
            return -1;
        }
        close(pfd);
    }
    int fd = socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(err, errlen, "socket: %s", strerror(errno));
        freeaddrinfo(res);
        return -1;
    }
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_REUSEPORT, &one, sizeof one);
    /* Inherited by every accepted socket: replies are written once per
     * loop turn, so Nagle would only add delay. */
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (bind(fd, res->ai_addr, res->ai_addrlen) < 0 || listen(fd, 4096) < 0) {
        snprintf(err, errlen, "cannot listen on %s:%d: %s", host, port, strerror(errno));
        close(fd);
        freeaddrinfo(res);
        return -1;
    }
    freeaddrinfo(res);
    return fd;
}

static void accept_arm(struct listener *ls)
{
    struct io_uring_sqe *sqe = loop_sqe(&ls->w->loop);
    io_uring_prep_multishot_accept(sqe, ls->fd, NULL, NULL, SOCK_CLOEXEC);
    loop_sqe_set_op(sqe, &ls->accept_op);
    ls->armed = true;
}

static void accept_retry(struct timer *t)
{
    struct listener *ls = container_of(t, struct listener, retry);
    if (!ls->armed && !ls->w->draining) accept_arm(ls);
}

static void on_accept(struct loop_op *op, struct io_uring_cqe *cqe)
{
    struct listener *ls = container_of(op, struct listener, accept_op);
    int res = cqe->res;
    if (!(cqe->flags & IORING_CQE_F_MORE)) ls->armed = false;
    if (res >= 0) {
        if (ls->w->draining) close(res);
        else if (ls->cfg->kind == LISTENER_POP3 || ls->cfg->kind == LISTENER_POP3S)
            pop3_session_start(ls->w, ls->cfg, res);
        else smtp_session_start(ls->w, ls->cfg, res);
    } else if (res == -EMFILE || res == -ENFILE || res == -ENOBUFS || res == -ENOMEM) {
        /* Out of descriptors or memory: pause accepting for a moment
         * instead of spinning; waiting clients stay in the backlog. */
        if (!timer_armed(&ls->retry))
            log_warn("accept", "%s: %s; pausing accepts for 100 ms", ls->cfg->name, strerror(-res));
        ls->retry.fn = accept_retry;
        if (!ls->armed) timer_arm(&ls->w->loop.timers, &ls->retry, 100);
        return;
    } else if (res != -ECANCELED && res != -EAGAIN && res != -EINTR) {
        log_warn("accept", "%s: %s", ls->cfg->name, strerror(-res));
    }
    if (!ls->armed && !ls->w->draining) accept_arm(ls);
}

static bool worker_accepting(const struct worker *w)
{
    for (size_t i = 0; i < w->nlisteners; i++)
        if (w->listeners[i].armed) return true;
    return false;
}

static void worker_check_drained(struct worker *w)
{
    /* The ring holds each listening socket until its accept is cancelled:
     * wait for that, so the port is free when stop returns. */
    if (w->nsessions == 0 && (!w->spool || spool_inflight(w->spool) == 0) && !worker_accepting(w))
        loop_stop(&w->loop);
}

/* Drain timer: closes what is left when the deadline passes, and checks
 * once per tick whether the worker is idle. */
struct drain_timer {
    struct timer t;
    struct worker *w;
};

static void drain_tick(struct timer *t)
{
    struct drain_timer *dt = (struct drain_timer *)t;
    struct worker *w = dt->w;
    bool late = timer_now_ms() >= w->eng->stop_deadline_ms;
    sessions_drain(w, late);
    worker_check_drained(w);
    timer_arm(&w->loop.timers, t, 50);
}

static __thread struct drain_timer drain_timer;

static void on_stop_msg(struct loop *l, struct loop_msg *m)
{
    struct worker *w = container_of(m, struct worker, stop_msg);
    (void)l;
    if (w->draining) return;
    w->draining = true;
    for (size_t i = 0; i < w->nlisteners; i++) {
        struct listener *ls = &w->listeners[i];
        if (ls->armed) {
            struct io_uring_sqe *sqe = loop_sqe(&w->loop);
            io_uring_prep_cancel(sqe, &ls->accept_op, 0);
            loop_sqe_set_op(sqe, NULL);
        }
    }
    drain_timer.w = w;
    drain_timer.t.fn = drain_tick;
    drain_tick(&drain_timer.t);
}

static void worker_committed(void *arg, const struct spool_rec *r, uint32_t seg, uint64_t off,
                             uint64_t len)
{
    (void)r;
    struct worker *w = arg;
    queue_record_committed(w->eng->queue, w->id, seg, off, len);
}

static void worker_sealed(void *arg, uint32_t seg, uint32_t nrecords)
{
    struct worker *w = arg;
    queue_segment_sealed(w->eng->queue, w->id, seg, nrecords);
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;
    struct engine *e = w->eng;
    int rc = loop_init(&w->loop, w->id, 4096, 512, 16384);
    if (rc < 0) {
        snprintf(w->init_err, sizeof w->init_err, "io_uring setup failed: %s", strerror(-rc));
    } else {
        w->loop.owner = w;
        w->spool = spool_open(&w->loop, e->cfg->data_dir, w->id, w->init_err, sizeof w->init_err);
        if (!w->spool) {
            rc = -1;
            loop_destroy(&w->loop);
        } else if (e->queue) {
            spool_set_hooks(w->spool, worker_committed, worker_sealed, w);
        }
    }
    pthread_mutex_lock(&e->start_lock);
    w->init_rc = rc;
    e->started++;
    pthread_cond_broadcast(&e->start_cond);
    pthread_mutex_unlock(&e->start_lock);
    if (rc < 0) return NULL;
    w->stop_msg.fn = on_stop_msg;
    for (size_t i = 0; i < w->nlisteners; i++) accept_arm(&w->listeners[i]);
    loop_run(&w->loop);
    /* Anything still open is closed without ceremony: the process is
     * stopping and the spool holds every acknowledged message. */
    sessions_drain(w, true);
    for (int spin = 0; spin < 200 && (w->nsessions > 0 || spool_inflight(w->spool) > 0 ||
                                      worker_accepting(w)); spin++) {
        atomic_store(&w->loop.stop, false);
        struct __kernel_timespec ts = {.tv_nsec = 10 * 1000000L};
        struct io_uring_cqe *cqe;
        io_uring_submit_and_wait_timeout(&w->loop.ring, &cqe, 1, &ts, NULL);
        unsigned head, n = 0;
        io_uring_for_each_cqe(&w->loop.ring, head, cqe) {
            struct loop_op *op = io_uring_cqe_get_data(cqe);
            if (op) op->fn(op, cqe);
            n++;
        }
        io_uring_cq_advance(&w->loop.ring, n);
        timer_wheel_advance(&w->loop.timers);
        while (w->loop.tasks) {
            struct loop_task *t = w->loop.tasks;
            w->loop.tasks = t->next;
            if (!w->loop.tasks) w->loop.tasks_tail = &w->loop.tasks;
            t->queued = false;
            t->fn(t);
        }
    }
    for (size_t i = 0; i < w->nlisteners; i++) close(w->listeners[i].fd);
    spool_close(w->spool);
    w->spool = NULL;
    loop_destroy(&w->loop);
    atomic_fetch_sub(&e->running_workers, 1);
    return NULL;
}

/* Close and free every listener socket still open (a failed start). */
static void close_listeners(struct engine *e)
{
    for (int i = 0; i < e->nworkers; i++) {
        struct worker *w = &e->workers[i];
        if (!w->listeners) continue;
        for (size_t j = 0; j < w->nlisteners; j++)
            if (w->listeners[j].fd > 0) close(w->listeners[j].fd);
        free(w->listeners);
        w->listeners = NULL;
    }
    free(e->workers);
}

void sessions_drain(struct worker *w, bool force)
{
    struct session_link *l = w->sessions.next;
    while (l != &w->sessions) {
        struct session_link *next = l->next;
        l->drain(l, force);
        l = next;
    }
}

static void stop_queue_now(struct engine *e)
{
    if (!e->queue) return;
    e->stop_deadline_ms = 0;
    queue_request_stop(e->queue);
    queue_join(e->queue);
    /* Signing jobs still out post back to the queue's loop: let them. */
    while (atomic_load(&e->offload_jobs) > 0) usleep(1000);
    queue_free(e->queue);
    e->queue = NULL;
}

static void drop_store(struct engine *e)
{
    if (e->store) e->store->ops->destroy(e->store);
    e->store = NULL;
}

int engine_start(struct engine *e, char *err, size_t errlen)
{
    struct me_config *cfg = e->cfg;
    e->nworkers = cfg->workers;
    e->workers = calloc((size_t)e->nworkers, sizeof *e->workers);
    if (!e->workers) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    pthread_mutex_init(&e->start_lock, NULL);
    pthread_cond_init(&e->start_cond, NULL);
    long live = spool_recover(cfg->data_dir);
    if (live < 0) {
        snprintf(err, errlen, "spool recovery in %s failed: %s", cfg->data_dir, strerror((int)-live));
        free(e->workers);
        e->workers = NULL;
        return -1;
    }
    if (live > 0) log_info("spool", "%ld queued message(s) recovered", live);
    /* Every socket is opened before any thread starts, so a port in use
     * is reported at once and nothing is left half-started. */
    for (int i = 0; i < e->nworkers; i++) {
        struct worker *w = &e->workers[i];
        w->eng = e;
        w->id = i;
        w->sessions.next = w->sessions.prev = &w->sessions;
        w->nlisteners = cfg->nlisteners;
        w->listeners = calloc(cfg->nlisteners ? cfg->nlisteners : 1, sizeof *w->listeners);
        if (!w->listeners) {
            snprintf(err, errlen, "out of memory");
            goto fail;
        }
        for (size_t j = 0; j < cfg->nlisteners; j++) {
            struct listener *ls = &w->listeners[j];
            ls->w = w;
            ls->cfg = &cfg->listeners[j];
            ls->accept_op.fn = on_accept;
            ls->fd = listen_socket(ls->cfg->host, ls->cfg->port, i == 0, err, errlen);
            if (ls->fd < 0) goto fail;
        }
    }
    if (!e->store && cfg->delivery && (cfg->delivery->store_dir || cfg->delivery->mail_dir)) {
        const struct delivery_cfg *dc = cfg->delivery;
        e->store = mailstore_new(dc->store_dir ? dc->store_dir : dc->mail_dir, cfg->hostname);
        if (!e->store) {
            snprintf(err, errlen, "out of memory for the mailbox store");
            goto fail;
        }
    }
    if (offload_start() < 0) {
        snprintf(err, errlen, "cannot start the offload thread");
        goto fail;
    }
    if (cfg->delivery) {
        /* The queue reads the spool before any worker adds a segment (its
         * DKIM signing uses the offload thread, started just before). */
        e->queue = queue_start(e, err, errlen);
        if (!e->queue) {
            offload_stop();
            goto fail;
        }
    }
    atomic_store(&e->running_workers, e->nworkers);
    int created = 0;
    for (int i = 0; i < e->nworkers; i++) {
        if (pthread_create(&e->workers[i].thread, NULL, worker_main, &e->workers[i]) != 0) {
            snprintf(err, errlen, "cannot start worker thread %d", i);
            break;
        }
        created++;
    }
    pthread_mutex_lock(&e->start_lock);
    while (e->started < created) pthread_cond_wait(&e->start_cond, &e->start_lock);
    pthread_mutex_unlock(&e->start_lock);
    int failed = created < e->nworkers;
    for (int i = 0; i < created; i++) {
        if (e->workers[i].init_rc < 0) {
            if (!failed) snprintf(err, errlen, "worker %d: %s", i, e->workers[i].init_err);
            failed = 1;
        }
    }
    if (failed) {
        e->nworkers = created;
        e->stop_deadline_ms = 0;
        for (int i = 0; i < created; i++)
            if (e->workers[i].init_rc == 0) loop_stop(&e->workers[i].loop);
        for (int i = 0; i < created; i++) pthread_join(e->workers[i].thread, NULL);
        for (int i = 0; i < created; i++)
            if (e->workers[i].loop.inbox_fd >= 0) loop_close_inbox(&e->workers[i].loop);
        stop_queue_now(e);
        offload_stop();
        drop_store(e);
        /* Workers that ran closed their own sockets; the rest are ours. */
        for (int i = 0; i < created; i++)
            if (e->workers[i].init_rc == 0) e->workers[i].nlisteners = 0;
        e->nworkers = cfg->workers;
        close_listeners(e);
        e->workers = NULL;
        e->nworkers = 0;
        return -1;
    }
    return 0;
fail:
    stop_queue_now(e);
    drop_store(e);
    close_listeners(e);
    e->workers = NULL;
    e->nworkers = 0;
    return -1;
}

void engine_request_stop(struct engine *e, uint64_t timeout_ms)
{
    /* Each worker's stop message is one node: post it once only. */
    if (atomic_exchange(&e->stop_posted, true)) return;
    e->stop_deadline_ms = timer_now_ms() + timeout_ms;
    for (int i = 0; i < e->nworkers; i++) loop_post(&e->workers[i].loop, &e->workers[i].stop_msg);
    if (e->queue) queue_request_stop(e->queue);
}

void engine_join(struct engine *e)
{
    if (e->joined) return;
    for (int i = 0; i < e->nworkers; i++) pthread_join(e->workers[i].thread, NULL);
    /* A password check still running would post to our loops: wait for
     * it (checks take milliseconds; the loops' inboxes stay valid). */
    /* The queue next: it may still hand signing jobs to the offload thread. */
    queue_join(e->queue);
    while (atomic_load(&e->offload_jobs) > 0) usleep(1000);
    if (e->nworkers > 0 || e->queue) offload_stop();
    e->joined = true;
}

void engine_free(struct engine *e)
{
    /* Replies that arrived after a worker ended are run now: they find
     * their loop dead and only free what they hold. */
    for (int i = 0; i < e->nworkers; i++) {
        loop_close_inbox(&e->workers[i].loop);
        free(e->workers[i].listeners);
    }
    free(e->workers);
    e->workers = NULL;
    e->nworkers = 0;
    queue_free(e->queue);
    e->queue = NULL;
    /* Last: the late replies run above may have closed store mailboxes. */
    drop_store(e);
}
