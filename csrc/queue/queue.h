/* The queue: one thread with its own loop that knows every message in the
 * spool, keeps one queue per destination, resolves MX, runs the SMTP
 * client connections, retries with backoff, bounces, and reports every
 * recipient's outcome (state log, events.jsonl, Python). Workers hand it
 * each record once it is durable; Python submits through it. */
#ifndef QUEUE_QUEUE_H
#define QUEUE_QUEUE_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/conn.h"
#include "core/loop.h"

struct engine;
struct tls_ctx;
struct dkim_key;

/* ---- configuration (built from mailengine/config.py's dict) ---- */

struct dest_policy {
    char *domain;                 /* NULL for the default */
    unsigned max_connections;
    unsigned max_messages_per_connection;
    unsigned max_recipients;      /* per transaction */
    double rate_per_second, rate_per_minute, rate_per_hour;   /* 0: no limit */
    int tls;                      /* enum smtp_client_tls: NONE, MAY, REQUIRED */
    bool tls_verify;
    char *tls_ca_file;
    struct tls_ctx *tls_ctx;      /* built from the three above */
    char *pool;                   /* source pool for messages that name none, or NULL */
};

struct source_pool {
    char *name;
    struct conn_addr *addrs;
    size_t naddrs;
};

struct dkim_domain {
    char *domain;                 /* signing domain, matched against From: */
    char *selector;
    struct dkim_key *key;
    char **headers;               /* NULL-terminated, or NULL for the default */
};

struct delivery_cfg {
    bool enabled;                 /* false: queue only (nothing leaves) */
    char *mail_dir;               /* Maildir store root for local delivery, or NULL: none */
    char *store_dir;              /* Maildir store root for POP3 (set even without local delivery) */
    char *dns_servers;            /* NULL: /etc/resolv.conf */
    int remote_port;              /* port of MX hosts (25) */
    char *relay_host;             /* smarthost, or NULL */
    int relay_port;
    char *relay_user, *relay_pass;
    int relay_tls;                /* enum smtp_client_tls */
    bool relay_tls_verify;
    char *relay_ca_file;
    struct tls_ctx *relay_tls_ctx;
    uint64_t retry_min_ms, retry_max_ms, lifetime_ms, delay_warning_ms;
    uint64_t connect_timeout_ms, reply_timeout_ms, idle_ms;
    size_t bounce_max_return;
    struct dest_policy def;
    struct dest_policy *dests;
    size_t ndests;
    struct source_pool *pools;
    size_t npools;
    struct dkim_domain *dkim;
    size_t ndkim;
    bool policy_hook;             /* destination_policy registered in Python */
    bool events_to_python;        /* delivery events go to the bridge */
};

void delivery_cfg_free(struct delivery_cfg *dc);

/* ---- life cycle (the engine calls these) ---- */

struct queue;
/* Recover the spool (every live record becomes queued), open the queue's
 * own spool and start its thread. NULL with a message in err. */
struct queue *queue_start(struct engine *e, char *err, size_t errlen);
/* Stop taking new work; QUIT connections; finish within the engine's
 * stop deadline. Thread-safe, idempotent. */
void queue_request_stop(struct queue *q);
void queue_join(struct queue *q);
void queue_free(struct queue *q);

/* ---- from worker loops: a record became durable / a segment is full ---- */
void queue_record_committed(struct queue *q, int worker, uint32_t seg, uint64_t offset,
                            uint64_t len);
void queue_segment_sealed(struct queue *q, int worker, uint32_t seg, uint32_t nrecords);

/* ---- from Python threads (they block; call without the GIL) ---- */

struct queue_item {
    char *env;                    /* envelope lines after "I" (F, R..., G, T), malloc'd */
    size_t env_len;
    char *msg;                    /* CRLF message, malloc'd */
    size_t msg_len;
    char id[24];                  /* out */
    int err;                      /* out: 0 or -errno */
};
/* Write every item to the spool (one group commit for the lot) and queue
 * them. Returns once all are durable (or failed). */
void queue_submit(struct queue *q, struct queue_item *items, size_t n);

enum queue_op { QOP_HOLD = 1, QOP_RELEASE, QOP_RETRY, QOP_DELETE, QOP_FLUSH };
/* Apply op to the message id (NULL or "" with QOP_FLUSH/HOLD/RELEASE: every
 * message). Returns the number of messages affected, or -ENOENT. */
int queue_control(struct queue *q, enum queue_op op, const char *id);

struct queue_stats {
    uint64_t messages, recipients_pending, active_connections;
    uint64_t delivered, deferred, bounced, expired;
};
void queue_get_stats(struct queue *q, struct queue_stats *st);

#endif
