/* Connection lifecycle and buffered I/O over the worker's io_uring (see conn.h). */
#include "core/conn.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/log.h"
#include "tls/tls.h"

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24   /* linux/in.h; glibc lacks it */
#endif

#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

/* Input the protocol has not used yet may grow to this while it is
 * suspended before we stop reading from the socket. */
#define CONN_IN_PAUSE_BYTES (256 * 1024)
/* Hard bound on unused input while not suspended: protocols consume or
 * discard lines well before this. */
#define CONN_IN_MAX_BYTES (1024 * 1024)
#define CONN_IN_HELD_MAX_BYTES (32 * 1024 * 1024)
#define CONN_TLS_CHUNK 16384
/* Output waiting for a peer that does not read: past this, stop taking its
 * input until it has read most of it. */
#define CONN_OUT_PAUSE_BYTES (256 * 1024)
#define CONN_SLICE_BYTES 16384

static void conn_flush_run(struct loop_task *t);
static void input_resume(struct conn *c);
static void hold_input(struct conn *c);
static void conn_maybe_finish(struct conn *c);
static void conn_abort(struct conn *c);

/* One plaintext scratch buffer per worker thread for TLS reads. */
static __thread char tls_scratch[CONN_TLS_CHUNK];

static void recv_arm(struct conn *c)
{
    struct io_uring_sqe *sqe = loop_sqe(c->loop);
    io_uring_prep_recv_multishot(sqe, c->fd, NULL, 0, 0);
    sqe->flags |= IOSQE_BUFFER_SELECT;
    sqe->buf_group = LOOP_BUF_GROUP;
    loop_sqe_set_op(sqe, &c->recv_op);
    c->flags |= CONN_RECV_ARMED;
}

static void recv_cancel(struct conn *c)
{
    if (!(c->flags & CONN_RECV_ARMED) || (c->flags & CONN_CANCELLING)) return;
    struct io_uring_sqe *sqe = loop_sqe(c->loop);
    io_uring_prep_cancel(sqe, &c->recv_op, 0);
    loop_sqe_set_op(sqe, NULL);
    c->flags |= CONN_CANCELLING;
}

static void schedule_flush(struct conn *c) { loop_defer(c->loop, &c->flush_task); }

static size_t out_backlog(const struct conn *c)
{
    return bytebuf_used(&c->out) + bytebuf_used(&c->flight) + bytebuf_used(&c->tls_pt);
}

/* Input stops while the protocol is suspended or the peer is not reading
 * what we send. */
static bool input_held(const struct conn *c) { return c->flags & (CONN_SUSPENDED | CONN_OUT_FULL); }

/* The peer sent EOF: once no buffered input can still become a command,
 * close (after sending what is queued). */
static void eof_check(struct conn *c)
{
    if ((c->flags & CONN_INPUT_EOF) && !input_held(c) && !conn_closing(c)) conn_close(c);
}

/* Hand plaintext to the protocol, keeping what it does not use. */
static void deliver(struct conn *c, const char *p, size_t n)
{
    bool buffered = false;
    if (!(c->flags & CONN_OUT_FULL) && out_backlog(c) > CONN_OUT_PAUSE_BYTES)
        c->flags |= CONN_OUT_FULL;
    if (bytebuf_used(&c->in) > 0 || input_held(c)) {
        if (bytebuf_append(&c->in, p, n) < 0) {
            conn_abort(c);
            return;
        }
        if (input_held(c)) {
            hold_input(c);
            return;
        }
        p = bytebuf_head(&c->in);
        n = bytebuf_used(&c->in);
        buffered = true;
    }
    if (n == 0) return;
    bool had_tls = c->tls != NULL;
    /* Input goes to the protocol in slices, so a burst of pipelined
     * commands cannot produce more than a slice's worth of replies past
     * the output bound before we stop. */
    size_t used = 0, slice = CONN_SLICE_BYTES;
    while (used < n) {
        if (out_backlog(c) > CONN_OUT_PAUSE_BYTES) {
            c->flags |= CONN_OUT_FULL;
            break;
        }
        size_t len = n - used < slice ? n - used : slice;
        bool gave_all = used + len == n;
        size_t k = c->proto->on_data(c, p + used, len);
        used += k;
        if (conn_closing(c) || (c->tls && !had_tls)) {
            /* Closing, or STARTTLS just began: whatever followed is void. */
            bytebuf_free(&c->in);
            return;
        }
        if (c->flags & CONN_SUSPENDED) break;
        if (k < len) {
            if (gave_all) break;      /* the rest is an incomplete line */
            slice = len * 2;          /* a line crosses the slice: widen it */
        } else {
            slice = CONN_SLICE_BYTES;
        }
    }
    if (buffered) {
        bytebuf_consume(&c->in, used);
        if (bytebuf_used(&c->in) == 0) bytebuf_free(&c->in);
    } else if (used < n) {
        if (bytebuf_append(&c->in, p + used, n - used) < 0) {
            conn_abort(c);
            return;
        }
    }
    if (input_held(c)) {
        hold_input(c);
    } else if (bytebuf_used(&c->in) > CONN_IN_MAX_BYTES) {
        /* The protocol bounds its lines well below this. */
        log_warn("conn", "input backlog over %d bytes: closing", CONN_IN_MAX_BYTES);
        conn_abort(c);
    }
}

/* While input is held, completions already posted before our cancel takes
 * effect still arrive (at most the buffer ring's worth per turn). */
static void hold_input(struct conn *c)
{
    if (bytebuf_used(&c->in) > CONN_IN_PAUSE_BYTES && !(c->flags & CONN_RECV_PAUSED)) {
        c->flags |= CONN_RECV_PAUSED;
        recv_cancel(c);
        io_uring_submit(&c->loop->ring);   /* stop the flow now, not at end of turn */
    }
    if (bytebuf_used(&c->in) > CONN_IN_HELD_MAX_BYTES) {
        log_warn("conn", "held input over %d bytes: closing", CONN_IN_HELD_MAX_BYTES);
        conn_abort(c);
    }
}

static void tls_move_out(struct conn *c)
{
    size_t pending;
    while ((pending = tls_conn_pending_out(c->tls)) > 0) {
        if (bytebuf_reserve(&c->out, pending) < 0) {
            conn_abort(c);
            return;
        }
        size_t got = tls_conn_take_out(c->tls, c->out.data + c->out.len, pending);
        if (got == 0) break;
        c->out.len += got;
    }
}

static void tls_pump(struct conn *c)
{
    if (c->flags & CONN_TLS_HANDSHAKE) {
        int r = tls_conn_handshake(c->tls);
        tls_move_out(c);
        schedule_flush(c);
        if (r < 0) {
            log_info("tls", "handshake failed: %s", tls_conn_error(c->tls));
            c->proto->on_tls(c, 0);
            conn_close(c);
            return;
        }
        if (r == 0) return;
        c->flags &= ~CONN_TLS_HANDSHAKE;
        c->proto->on_tls(c, 1);
        if (conn_closing(c)) return;
    }
    for (;;) {
        struct tls_conn *t = c->tls;
        ssize_t k = tls_conn_read(t, tls_scratch, sizeof tls_scratch);
        if (k > 0) {
            deliver(c, tls_scratch, (size_t)k);
            if (conn_closing(c) || c->tls != t) break;
            continue;
        }
        if (k < 0) {
            c->flags |= CONN_PEER_EOF;
            conn_close(c);
        }
        break;
    }
    if (c->tls && tls_conn_pending_out(c->tls) > 0) {
        tls_move_out(c);
        schedule_flush(c);
    }
}

static void on_recv(struct loop_op *op, struct io_uring_cqe *cqe)
{
    struct conn *c = container_of(op, struct conn, recv_op);
    int res = cqe->res;
    unsigned flags = cqe->flags;
    if (!(flags & IORING_CQE_F_MORE)) c->flags &= ~(CONN_RECV_ARMED | CONN_CANCELLING);
    if (res > 0 && (flags & IORING_CQE_F_BUFFER)) {
        unsigned bid = flags >> IORING_CQE_BUFFER_SHIFT;
        if (!conn_closing(c)) {
            const char *data = bufring_buf(&c->loop->bufs, bid);
            if (c->tls) {
                if (tls_conn_feed(c->tls, data, (size_t)res) < 0) conn_abort(c);
                else tls_pump(c);
            } else {
                deliver(c, data, (size_t)res);
            }
        }
        bufring_recycle(&c->loop->bufs, bid);
    } else if (res == 0) {
        /* A half-close: the peer may still read the replies to what it
         * sent, so finish that first. */
        c->flags |= CONN_INPUT_EOF;
        eof_check(c);
    } else if (res < 0 && res != -ENOBUFS && res != -ECANCELED) {
        c->flags |= CONN_PEER_EOF;
        conn_abort(c);
    }
    if (!(c->flags & CONN_RECV_ARMED)) {
        if (conn_closing(c)) conn_maybe_finish(c);
        else if (!(c->flags & (CONN_RECV_PAUSED | CONN_PEER_EOF | CONN_INPUT_EOF))) recv_arm(c);
    }
}

static void send_submit(struct conn *c)
{
    struct io_uring_sqe *sqe = loop_sqe(c->loop);
    io_uring_prep_send(sqe, c->fd, bytebuf_head(&c->flight), bytebuf_used(&c->flight),
                       MSG_NOSIGNAL);
    loop_sqe_set_op(sqe, &c->send_op);
    c->flags |= CONN_SENDING;
}

static void on_send(struct loop_op *op, struct io_uring_cqe *cqe)
{
    struct conn *c = container_of(op, struct conn, send_op);
    c->flags &= ~CONN_SENDING;
    if (cqe->res < 0) {
        bytebuf_free(&c->flight);
        c->flags |= CONN_PEER_EOF;
        conn_abort(c);
        conn_maybe_finish(c);
        return;
    }
    bytebuf_consume(&c->flight, (size_t)cqe->res);
    if (bytebuf_used(&c->flight) > 0) {
        send_submit(c);
        return;
    }
    bytebuf_free(&c->flight);
    if (bytebuf_used(&c->out) > 0) {
        struct bytebuf tmp = c->flight;
        c->flight = c->out;
        c->out = tmp;
        send_submit(c);
    } else if (conn_closing(c)) {
        conn_maybe_finish(c);
        return;
    }
    if ((c->flags & CONN_OUT_FULL) && out_backlog(c) < CONN_OUT_PAUSE_BYTES / 4) {
        /* The peer reads again: go on with its input. */
        c->flags &= ~CONN_OUT_FULL;
        input_resume(c);
    }
}

static void conn_flush_run(struct loop_task *t)
{
    struct conn *c = container_of(t, struct conn, flush_task);
    if (c->flags & CONN_CLOSED) {
        /* Last step of a close: nothing of ours refers to c any more. */
        c->proto->on_close(c);
        return;
    }
    if (c->tls && bytebuf_used(&c->tls_pt) > 0 && !(c->flags & CONN_TLS_HANDSHAKE)) {
        if (tls_conn_write(c->tls, bytebuf_head(&c->tls_pt), bytebuf_used(&c->tls_pt)) < 0) {
            bytebuf_free(&c->tls_pt);
            conn_abort(c);
        } else {
            bytebuf_free(&c->tls_pt);
            tls_move_out(c);
        }
    }
    if (c->tls && (c->flags & CONN_CLOSING) &&
        !(c->flags & (CONN_TLS_BYE | CONN_TLS_HANDSHAKE | CONN_PEER_EOF))) {
        /* RFC 8446 §6.1: end with close_notify after the last reply. */
        c->flags |= CONN_TLS_BYE;
        tls_conn_shutdown(c->tls);
        tls_move_out(c);
    }
    if (!(c->flags & CONN_SENDING) && bytebuf_used(&c->out) > 0) {
        struct bytebuf tmp = c->flight;
        c->flight = c->out;
        c->out = tmp;
        send_submit(c);
    }
    if (conn_closing(c)) conn_maybe_finish(c);
}

static void on_timer(struct timer *t)
{
    struct conn *c = container_of(t, struct conn, timer);
    if (conn_closing(c)) {
        /* The peer would not take our last words in time: a send stuck on
         * a zero window ends with the socket shut down. */
        shutdown(c->fd, SHUT_RDWR);
        conn_abort(c);
        conn_maybe_finish(c);
        return;
    }
    c->proto->on_timeout(c);
}

void conn_init(struct conn *c, struct loop *l, int fd, const struct conn_proto *proto,
               struct tls_ctx *tls_ctx)
{
    memset(c, 0, sizeof *c);
    c->loop = l;
    c->fd = fd;
    c->proto = proto;
    c->recv_op.fn = on_recv;
    c->send_op.fn = on_send;
    c->flush_task.fn = conn_flush_run;
    c->timer.fn = on_timer;
    /* TCP_NODELAY comes from the listening socket (Linux passes it on to
     * accepted sockets); only the peer's address costs a syscall here. */
    struct sockaddr_storage ss;
    socklen_t sl = sizeof ss;
    if (getpeername(fd, (struct sockaddr *)&ss, &sl) == 0) conn_addr_from_sockaddr(&c->peer, &ss);
    if (tls_ctx) {
        c->tls = tls_conn_new(tls_ctx, 1, NULL);
        if (c->tls) c->flags |= CONN_TLS_HANDSHAKE;
    }
    recv_arm(c);
}

static void on_connect_done(struct loop_op *op, struct io_uring_cqe *cqe)
{
    struct conn *c = container_of(op, struct conn, send_op);
    c->send_op.fn = on_send;
    c->flags &= ~(CONN_SENDING | CONN_CONNECTING | CONN_CANCELLING);
    if (conn_closing(c)) {
        conn_maybe_finish(c);
        return;
    }
    if (cqe->res < 0) {
        c->proto->on_connect(c, cqe->res);
        return;
    }
    recv_arm(c);
    c->proto->on_connect(c, 0);
}

int conn_connect(struct conn *c, struct loop *l, const struct conn_addr *to,
                 const struct conn_addr *from, const struct conn_proto *proto)
{
    memset(c, 0, sizeof *c);
    int fam = to->family == AF_INET6 ? AF_INET6 : AF_INET;
    int fd = socket(fam, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) return -errno;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (from && from->family == fam) {
        struct sockaddr_storage ss;
        socklen_t sl = conn_addr_to_sockaddr(from, &ss);
        /* The kernel picks the port when the connect needs one. */
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&ss, sl) < 0) {
            int err = -errno;
            close(fd);
            return err;
        }
    }
    c->loop = l;
    c->fd = fd;
    c->proto = proto;
    c->recv_op.fn = on_recv;
    c->send_op.fn = on_connect_done;
    c->flush_task.fn = conn_flush_run;
    c->timer.fn = on_timer;
    c->peer = *to;
    struct sockaddr_storage dst;
    socklen_t dl = conn_addr_to_sockaddr(to, &dst);
    struct io_uring_sqe *sqe = loop_sqe(l);
    io_uring_prep_connect(sqe, fd, (struct sockaddr *)&dst, dl);
    loop_sqe_set_op(sqe, &c->send_op);
    c->flags |= CONN_SENDING | CONN_CONNECTING;
    /* The kernel copies the address when it takes the SQE: submit while
     * dst is still alive. */
    io_uring_submit(&l->ring);
    return 0;
}

void conn_write(struct conn *c, const void *p, size_t n)
{
    if (c->flags & CONN_CLOSED) return;
    struct bytebuf *b = c->tls ? &c->tls_pt : &c->out;
    if (bytebuf_append(b, p, n) < 0) {
        conn_abort(c);
        return;
    }
    schedule_flush(c);
}

void conn_write_buf(struct conn *c, struct bytebuf *b)
{
    if (!(c->flags & CONN_CLOSED) && !c->tls && bytebuf_used(&c->out) == 0) {
        struct bytebuf empty = c->out;
        c->out = *b;
        *b = empty;
        bytebuf_free(b);
        schedule_flush(c);
        return;
    }
    conn_write(c, bytebuf_head(b), bytebuf_used(b));
    bytebuf_free(b);
}

void conn_printf(struct conn *c, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n >= sizeof buf) n = sizeof buf - 1;
    conn_write(c, buf, (size_t)n);
}

int conn_start_tls(struct conn *c, struct tls_ctx *ctx)
{
    struct tls_conn *t = tls_conn_new(ctx, 1, NULL);
    if (!t) return -1;
    c->tls = t;
    c->flags |= CONN_TLS_HANDSHAKE;
    bytebuf_free(&c->in);
    return 0;
}

int conn_start_tls_client(struct conn *c, struct tls_ctx *ctx, const char *sni)
{
    struct tls_conn *t = tls_conn_new(ctx, 0, sni);
    if (!t) return -1;
    c->tls = t;
    c->flags |= CONN_TLS_HANDSHAKE;
    bytebuf_free(&c->in);
    tls_pump(c);   /* the ClientHello goes out now */
    return 0;
}

bool conn_is_tls(const struct conn *c) { return c->tls && !(c->flags & CONN_TLS_HANDSHAKE); }
const char *conn_tls_version(const struct conn *c) { return c->tls ? tls_conn_version(c->tls) : NULL; }
const char *conn_tls_cipher(const struct conn *c) { return c->tls ? tls_conn_cipher(c->tls) : NULL; }

void conn_suspend(struct conn *c) { c->flags |= CONN_SUSPENDED; }

/* Offer buffered input again and read more, unless input is still held. */
static void input_resume(struct conn *c)
{
    if (conn_closing(c) || input_held(c)) return;
    if (bytebuf_used(&c->in) > 0) deliver(c, NULL, 0);
    if (conn_closing(c) || input_held(c)) return;
    if (c->flags & CONN_RECV_PAUSED) {
        c->flags &= ~CONN_RECV_PAUSED;
        if (!(c->flags & (CONN_RECV_ARMED | CONN_INPUT_EOF))) recv_arm(c);
    }
    eof_check(c);
}

/* Buffered input is offered at once: callers resume as their last step,
 * with their state ready for more input. */
void conn_resume(struct conn *c)
{
    if (!(c->flags & CONN_SUSPENDED)) return;
    c->flags &= ~CONN_SUSPENDED;
    input_resume(c);
}

void conn_set_timeout(struct conn *c, uint64_t ms)
{
    if (c->flags & CONN_CLOSED) return;   /* no timer may outlive the conn */
    if (ms == 0) timer_cancel(&c->loop->timers, &c->timer);
    else timer_arm(&c->loop->timers, &c->timer, ms);
}

void conn_close(struct conn *c)
{
    if (conn_closing(c)) return;
    c->flags |= CONN_CLOSING;
    recv_cancel(c);
    /* Bound the time we wait for the peer to take the last reply. */
    timer_arm(&c->loop->timers, &c->timer, 5000);
    schedule_flush(c);
}

static void conn_abort(struct conn *c)
{
    bytebuf_free(&c->out);
    bytebuf_free(&c->tls_pt);
    if (!conn_closing(c)) {
        c->flags |= CONN_CLOSING;
        recv_cancel(c);
        timer_arm(&c->loop->timers, &c->timer, 5000);
    }
    c->flags |= CONN_PEER_EOF;
    schedule_flush(c);
}

static void conn_maybe_finish(struct conn *c)
{
    if (c->flags & CONN_CLOSED) return;
    if (c->flags & CONN_CONNECTING) {
        /* The connect op still refers to c: cancel it, finish on its CQE. */
        if (!(c->flags & CONN_CANCELLING)) {
            struct io_uring_sqe *sqe = loop_sqe(c->loop);
            io_uring_prep_cancel(sqe, &c->send_op, 0);
            loop_sqe_set_op(sqe, NULL);
            c->flags |= CONN_CANCELLING;
        }
        return;
    }
    if (c->flags & (CONN_SENDING | CONN_RECV_ARMED)) {
        recv_cancel(c);
        return;
    }
    if (bytebuf_used(&c->out) > 0 && !(c->flags & CONN_PEER_EOF)) return;
    c->flags |= CONN_CLOSED;
    timer_cancel(&c->loop->timers, &c->timer);
    close(c->fd);
    c->fd = -1;
    bytebuf_free(&c->in);
    bytebuf_free(&c->out);
    bytebuf_free(&c->flight);
    bytebuf_free(&c->tls_pt);
    if (c->tls) {
        tls_conn_free(c->tls);
        c->tls = NULL;
    }
    /* on_close runs from the flush task, which may already be queued: the
     * protocol frees c there, after which no queued step refers to it. */
    schedule_flush(c);
}

const char *conn_addr_str(const struct conn_addr *a, char *buf, size_t len)
{
    if (!inet_ntop(a->family == AF_INET6 ? AF_INET6 : AF_INET, a->addr, buf, (socklen_t)len))
        snprintf(buf, len, "unknown");
    return buf;
}

unsigned conn_addr_to_sockaddr(const struct conn_addr *a, struct sockaddr_storage *ss)
{
    memset(ss, 0, sizeof *ss);
    if (a->family == AF_INET6) {
        struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
        s6->sin6_family = AF_INET6;
        s6->sin6_port = htons(a->port);
        memcpy(&s6->sin6_addr, a->addr, 16);
        return sizeof *s6;
    }
    struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
    s4->sin_family = AF_INET;
    s4->sin_port = htons(a->port);
    memcpy(&s4->sin_addr, a->addr, 4);
    return sizeof *s4;
}

void conn_addr_from_sockaddr(struct conn_addr *a, const void *sa)
{
    const struct sockaddr *s = sa;
    memset(a, 0, sizeof *a);
    if (s->sa_family == AF_INET6) {
        const struct sockaddr_in6 *s6 = sa;
        /* Report v4-mapped peers as plain IPv4. */
        if (IN6_IS_ADDR_V4MAPPED(&s6->sin6_addr)) {
            a->family = AF_INET;
            memcpy(a->addr, &s6->sin6_addr.s6_addr[12], 4);
        } else {
            a->family = AF_INET6;
            memcpy(a->addr, &s6->sin6_addr, 16);
        }
        a->port = ntohs(s6->sin6_port);
    } else if (s->sa_family == AF_INET) {
        const struct sockaddr_in *s4 = sa;
        a->family = AF_INET;
        memcpy(a->addr, &s4->sin_addr, 4);
        a->port = ntohs(s4->sin_port);
    }
}
