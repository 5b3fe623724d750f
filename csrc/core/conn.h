/* A connection: the only thing protocol code talks to. It reads (multishot
 * recv into the worker's buffer ring, so an idle connection pins no buffer),
 * hands plaintext to the protocol, queues replies and flushes them once per
 * loop turn, runs TLS over memory BIOs, and closes cleanly. Protocol code
 * never calls io_uring itself. */
#ifndef CORE_CONN_H
#define CORE_CONN_H

#include <netinet/in.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "core/buf.h"
#include "core/loop.h"
#include "core/timer.h"

struct conn;
struct tls_ctx;
struct tls_conn;

struct conn_proto {
    /* Plaintext input p[0..n). Return how many bytes were used; the rest
     * is kept and offered again with more input, or on conn_resume(). */
    size_t (*on_data)(struct conn *c, const char *p, size_t n);
    /* TLS handshake finished (ok 1) or failed (ok 0; the conn is closing). */
    void (*on_tls)(struct conn *c, int ok);
    /* The deadline set by conn_set_timeout passed. */
    void (*on_timeout)(struct conn *c);
    /* The connection is gone (socket closed, no more I/O); the protocol
     * frees its state, now or once its own pending work returns. */
    void (*on_close)(struct conn *c);
    /* Outbound only: the connect finished (0) or failed (-errno; the
     * protocol closes the conn). Reading starts after a success. */
    void (*on_connect)(struct conn *c, int err);
};

enum {
    CONN_RECV_ARMED   = 1u << 0,
    CONN_SENDING      = 1u << 1,
    CONN_CLOSING      = 1u << 2,
    CONN_CLOSED       = 1u << 3,
    CONN_SUSPENDED    = 1u << 4,
    CONN_TLS_HANDSHAKE = 1u << 5,
    CONN_RECV_PAUSED  = 1u << 6,   /* recv cancelled while input is backed up */
    CONN_PEER_EOF     = 1u << 7,
    CONN_CANCELLING   = 1u << 8,
    CONN_TLS_BYE      = 1u << 9,   /* our close_notify is queued */
    CONN_INPUT_EOF    = 1u << 10,  /* the peer half-closed: no more input */
    CONN_OUT_FULL     = 1u << 11,  /* too much unsent output: input held */
    CONN_CONNECTING   = 1u << 12,  /* outbound connect in flight (on send_op) */
};

struct conn_addr {
    uint8_t family;     /* AF_INET or AF_INET6 */
    uint16_t port;      /* host order */
    uint8_t addr[16];
};

struct conn {
    struct loop *loop;
    const struct conn_proto *proto;
    int fd;
    uint32_t flags;
    struct loop_op recv_op;
    struct loop_op send_op;
    struct loop_task flush_task;
    struct timer timer;
    struct bytebuf in;       /* plaintext not yet used by the protocol */
    struct bytebuf out;      /* bytes for the wire, not yet sent */
    struct bytebuf flight;   /* bytes in the send in flight */
    struct bytebuf tls_pt;   /* plaintext waiting to be encrypted */
    struct tls_conn *tls;
    struct conn_addr peer;
    void *data;              /* the protocol's, for outbound conns */
};

/* Set up c for an accepted socket and start reading. tls_ctx non-NULL
 * starts with a TLS handshake (implicit TLS). */
void conn_init(struct conn *c, struct loop *l, int fd, const struct conn_proto *proto,
               struct tls_ctx *tls_ctx);

/* Outbound: a new non-blocking socket connected to `to`, bound first to
 * `from` when it is non-NULL (a source address of a pool). on_connect
 * follows; a deadline set with conn_set_timeout covers the connect too.
 * 0, or -errno when no socket could be made (nothing to close then). */
int conn_connect(struct conn *c, struct loop *l, const struct conn_addr *to,
                 const struct conn_addr *from, const struct conn_proto *proto);

/* Queue bytes for the peer (encrypted when TLS is on); sent at end of turn. */
void conn_write(struct conn *c, const void *p, size_t n);
/* conn_write of b's bytes, taking b over (left empty): when nothing else
 * waits to be written on a plain connection the buffer itself is queued,
 * without a copy. */
void conn_write_buf(struct conn *c, struct bytebuf *b);
void conn_printf(struct conn *c, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* Begin a server-side TLS handshake now: input already buffered is
 * discarded (RFC 3207 §4.2: nothing pipelined before the handshake
 * counts). Output queued before this call still goes out in plaintext. */
int conn_start_tls(struct conn *c, struct tls_ctx *ctx);
/* Begin a client-side handshake now (after STARTTLS's 220, or at once
 * for implicit TLS); sni names the server (and is what a verifying
 * context checks the certificate against). Input already buffered is
 * discarded. */
int conn_start_tls_client(struct conn *c, struct tls_ctx *ctx, const char *sni);
bool conn_is_tls(const struct conn *c);
const char *conn_tls_version(const struct conn *c);
const char *conn_tls_cipher(const struct conn *c);

/* Stop handing input to the protocol until conn_resume. */
void conn_suspend(struct conn *c);
void conn_resume(struct conn *c);

/* Deadline for on_timeout; 0 cancels. */
void conn_set_timeout(struct conn *c, uint64_t ms);

/* Flush what is queued, then close. on_close follows. */
void conn_close(struct conn *c);
static inline bool conn_closing(const struct conn *c)
{
    return (c->flags & (CONN_CLOSING | CONN_CLOSED)) != 0;
}

/* "192.0.2.1" / "2001:db8::1" into buf (at least 46 bytes). */
const char *conn_addr_str(const struct conn_addr *a, char *buf, size_t len);
void conn_addr_from_sockaddr(struct conn_addr *a, const void *sa);
struct sockaddr_storage;
/* The reverse: fills ss, returns its length. */
unsigned conn_addr_to_sockaddr(const struct conn_addr *a, struct sockaddr_storage *ss);

#endif
