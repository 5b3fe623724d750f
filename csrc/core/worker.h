/* The engine in C: configuration, worker threads (one loop each), their
 * listener sockets, and the counters they share lock-free. */
#ifndef CORE_WORKER_H
#define CORE_WORKER_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>

#include "core/config.h"
#include "core/loop.h"

struct bridge;
struct spool;
struct queue;
struct engine;
struct worker;

struct listener {
    struct loop_op accept_op;
    struct worker *w;
    struct listener_cfg *cfg;
    int fd;
    bool armed;
    struct timer retry;      /* re-arm after running out of descriptors */
};

/* Sessions a worker owns, so stop() can reach every one. */
struct session_link {
    struct session_link *prev, *next;
    /* Stopping: close the session now (force), or when it is idle. */
    void (*drain)(struct session_link *l, bool force);
};

struct worker {
    struct loop loop;
    struct engine *eng;
    int id;
    pthread_t thread;
    struct spool *spool;
    struct listener *listeners;
    size_t nlisteners;
    struct session_link sessions;     /* list head */
    size_t nsessions;
    struct loop_msg stop_msg;
    bool draining;
    int init_rc;
    char init_err[256];
};

#define ENGINE_IP_SLOTS 65536

struct store;

struct engine {
    struct me_config *cfg;
    struct worker *workers;
    int nworkers;
    struct bridge *bridge;
    struct queue *queue;              /* delivery; NULL when not configured */
    struct store *store;              /* mailboxes (store/store.h); NULL: none */
    atomic_uint conns_total;
    /* Connections per client address, hashed: a collision can only make
     * the limit stricter for the two addresses that share a slot. */
    atomic_ushort conns_per_ip[ENGINE_IP_SLOTS];
    atomic_int running_workers;
    pthread_mutex_t start_lock;
    pthread_cond_t start_cond;
    int started;
    uint64_t stop_deadline_ms;        /* CLOCK_MONOTONIC; draining stop */
    bool joined;
    atomic_bool stop_posted;
    atomic_int offload_jobs;          /* password checks not yet posted back */
};

/* Open listeners, start workers; 0, or -1 with err. */
int engine_start(struct engine *e, char *err, size_t errlen);
/* Ask every worker to stop taking connections and finish what is in
 * flight, for at most timeout_ms; then close what remains. */
void engine_request_stop(struct engine *e, uint64_t timeout_ms);
/* Wait for the workers (call without the GIL). Worker memory stays until
 * engine_free, so replies to requests still out are safe. */
void engine_join(struct engine *e);
/* After engine_join, once nothing can reply any more. */
void engine_free(struct engine *e);

unsigned engine_ip_slot(const struct conn_addr *a);

/* Protocol entry points used by the accept loop. */
void smtp_session_start(struct worker *w, struct listener_cfg *lc, int fd);
void pop3_session_start(struct worker *w, struct listener_cfg *lc, int fd);
/* Worker is stopping: close idle sessions now, busy ones later (force: all). */
void sessions_drain(struct worker *w, bool force);

#endif
