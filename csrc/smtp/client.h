/* The SMTP client (RFC 5321 as the sending side): one connection to one
 * server address, set up (greeting, EHLO, STARTTLS, AUTH) and then given
 * transactions one at a time by its owner, with per-recipient results.
 * It knows nothing of the queue: its owner picks addresses, retries the
 * next MX, and decides when to reuse or close the connection. */
#ifndef SMTP_CLIENT_H
#define SMTP_CLIENT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/conn.h"
#include "smtp/reply.h"

struct tls_ctx;

enum smtp_client_tls {
    CLIENT_TLS_NONE = 0,       /* never STARTTLS */
    CLIENT_TLS_MAY,            /* STARTTLS when offered (opportunistic) */
    CLIENT_TLS_REQUIRED,       /* STARTTLS or fail (temporarily) */
    CLIENT_TLS_IMPLICIT,       /* TLS from the first byte (port 465) */
};

struct smtp_client_cfg {
    const char *helo;              /* our name in EHLO */
    enum smtp_client_tls tls;
    struct tls_ctx *tls_ctx;       /* client context: verifying or not */
    const char *auth_user;         /* AUTH PLAIN/LOGIN when set (smarthost) */
    const char *auth_pass;
    uint64_t connect_timeout_ms;
    uint64_t reply_timeout_ms;     /* each reply, and the body's final reply */
};

/* Where a failure happened; the owner words bounces and events from it. */
enum smtp_stage {
    STAGE_CONNECT = 0, STAGE_GREETING, STAGE_EHLO, STAGE_STARTTLS, STAGE_TLS,
    STAGE_AUTH, STAGE_MAIL, STAGE_RCPT, STAGE_DATA, STAGE_BODY, STAGE_LOCAL,
};

/* A reply or a local reason. temp: retry later (4xx, network, timeout);
 * otherwise permanent (5xx). */
struct smtp_outcome {
    unsigned code;                 /* 0 when no reply was read */
    char enh[16];                  /* "5.1.1", or "" */
    char text[512];                /* reply text (lines joined by '\n'), or our reason */
    uint8_t temp;
    uint8_t stage;                 /* enum smtp_stage */
};

/* One transaction. The owner keeps it alive until txn_done. */
struct smtp_txn {
    const char *sender;            /* "" for the null sender */
    const char *mail_params;       /* DSN RET=/ENVID= to pass on, or NULL */
    unsigned nrcpt;
    const char *const *rcpts;
    const char *const *rcpt_params;/* NOTIFY=/ORCPT= per recipient, or NULL */
    const char *prefix;            /* prepended header (DKIM-Signature), or NULL */
    size_t prefix_len;
    const char *body;              /* the message, CRLF lines, not dot-stuffed */
    size_t body_len;
    bool utf8;                     /* the envelope needs SMTPUTF8 */
    bool eightbit;                 /* the message has 8-bit bytes */
    /* results, filled by the client */
    struct smtp_outcome *rcpt_out; /* nrcpt entries, owner-allocated */
    struct smtp_outcome msg_out;   /* the final reply (or the reason nothing was sent) */
    unsigned accepted;             /* recipients the DATA outcome applies to */
};

struct smtp_client;
struct smtp_client_ops {
    /* Set up, or done with the last transaction: give it one, or quit. */
    void (*ready)(struct smtp_client *c);
    /* t's results are filled in: rcpt_out[i] for each recipient (refused
     * ones their RCPT reply, accepted ones the final reply). */
    void (*txn_done)(struct smtp_client *c, struct smtp_txn *t);
    /* The session could not be set up or was lost before a transaction
     * (closed follows). A transaction in flight ends with txn_done. */
    void (*failed)(struct smtp_client *c, const struct smtp_outcome *why);
    /* Gone: the owner may free c now. */
    void (*closed)(struct smtp_client *c);
};

struct smtp_client {
    struct conn conn;
    const struct smtp_client_ops *ops;
    const struct smtp_client_cfg *cfg;
    void *owner;
    char host[256];                /* the server's name (MX host), for logs and TLS */
    struct conn_addr addr;
    struct smtp_ehlo_caps caps;
    struct smtp_reply_parser rp;
    struct smtp_reply reply;
    int state;
    unsigned rcpt_i;               /* recipient whose reply comes next */
    unsigned sent_rcpts;           /* recipients written (non-pipelined mode) */
    bool pipelining;
    bool tls_done;
    bool need_rset;                /* the last transaction did not end cleanly */
    bool failed_reported;
    bool quitting;
    bool msg_failed;               /* the transaction failed as a whole (MAIL, lost, local) */
    bool discard;                  /* a "." is ending a DATA nobody wanted */
    struct loop_task task;         /* finishes locally refused transactions */
    unsigned txns;                 /* transactions started on this connection */
    struct smtp_txn *txn;
    uint64_t started_ms;
};

/* Connect to `to` (from `from` when set) and set the session up; ops->ready
 * or ops->failed follows. -errno when no socket could be made (nothing
 * else follows then). */
int smtp_client_start(struct smtp_client *c, struct loop *l, const struct conn_addr *to,
                      const struct conn_addr *from, const char *host,
                      const struct smtp_client_cfg *cfg, const struct smtp_client_ops *ops,
                      void *owner);
/* Only from ready: run t (pipelined when the server offers it). */
void smtp_client_send(struct smtp_client *c, struct smtp_txn *t);
/* QUIT and close; closed follows. */
void smtp_client_quit(struct smtp_client *c);
/* Close at once (stop, timeouts of the owner); closed follows. */
void smtp_client_abort(struct smtp_client *c);
bool smtp_client_is_tls(const struct smtp_client *c);

#endif
