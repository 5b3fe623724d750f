/* The POP3 server (RFC 1939, CAPA RFC 2449, STLS RFC 2595, AUTH PLAIN
 * RFC 5034) over the mailbox store (store/store.h: the Maildir store, or
 * the user's Python one). The session runs on its worker's loop;
 * everything that touches the store or hashes a password runs on an
 * offload thread while the session is suspended. The maildrop is the
 * INBOX as it was at login; deletions happen only in the UPDATE state
 * (QUIT); one session per mailbox at a time. */
#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include "core/base64.h"
#include "core/conn.h"
#include "core/log.h"
#include "core/offload.h"
#include "core/timer.h"
#include "core/worker.h"
#include "pop3/parse.h"
#include "py/bridge.h"
#include "queue/queue.h"
#include "store/maildir.h"
#include "store/store.h"
#include "store/users.h"

#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

#define POP3_MAX_ERRORS 20
#define POP3_MAX_AUTH_FAILURES 3

enum { P_AUTH = 0, P_TRANS, P_WAIT, P_DONE };

struct pop3_session {
    struct conn conn;             /* first: the conn callbacks cast back */
    struct session_link link;
    struct worker *w;
    struct listener_cfg *lc;
    int state;
    bool pending, closed, counted;
    bool auth_plain_wait;         /* "AUTH PLAIN" sent alone: the response comes next */
    unsigned errors, auth_failures;
    char *user;
    char *mailbox;                /* the store's user (lower case, no +tag): the lock key */
    bool locked;
    struct store_mbox *mb;        /* the maildrop: INBOX at login */
    bool *deleted;                /* per message of mb */
};

/* ---- one session per mailbox (RFC 1939 §8 leaves it to the server; we
 * lock like most servers do, answering [IN-USE], RFC 2449 §8.1.2) ---- */

static pthread_mutex_t lock_mu = PTHREAD_MUTEX_INITIALIZER;
static char **locked_dirs;
static size_t nlocked, caplocked;

static bool mailbox_lock(const char *dir)
{
    bool ok = true;
    pthread_mutex_lock(&lock_mu);
    for (size_t i = 0; i < nlocked; i++)
        if (strcmp(locked_dirs[i], dir) == 0) ok = false;
    if (ok && nlocked == caplocked) {
        size_t cap = caplocked ? caplocked * 2 : 16;
        char **p = realloc(locked_dirs, cap * sizeof *p);
        if (p) {
            locked_dirs = p;
            caplocked = cap;
        } else {
            ok = false;
        }
    }
    if (ok) {
        locked_dirs[nlocked] = strdup(dir);
        if (locked_dirs[nlocked]) nlocked++;
        else ok = false;
    }
    pthread_mutex_unlock(&lock_mu);
    return ok;
}

static void mailbox_unlock(const char *dir)
{
    pthread_mutex_lock(&lock_mu);
    for (size_t i = 0; i < nlocked; i++)
        if (strcmp(locked_dirs[i], dir) == 0) {
            free(locked_dirs[i]);
            locked_dirs[i] = locked_dirs[--nlocked];
            break;
        }
    pthread_mutex_unlock(&lock_mu);
}

/* ---- replies ---- */

static void reply(struct pop3_session *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void reply(struct pop3_session *s, const char *fmt, ...)
{
    char buf[600];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n > sizeof buf - 3) n = (int)sizeof buf - 3;
    buf[n++] = '\r';
    buf[n++] = '\n';
    conn_write(&s->conn, buf, (size_t)n);
}

static void count_error(struct pop3_session *s)
{
    if (++s->errors >= POP3_MAX_ERRORS) {
        reply(s, "-ERR too many errors, closing");
        conn_close(&s->conn);
    }
}

static const struct me_config *cfg_of(const struct pop3_session *s) { return s->w->eng->cfg; }

/* RFC 1939 §3: the autologout timer (limits.pop3_idle_timeout). */
static uint64_t idle_ms(const struct pop3_session *s) { return cfg_of(s)->limits.pop3_idle_timeout_ms; }

static bool secure_enough(const struct pop3_session *s)
{
    return conn_is_tls(&s->conn) || cfg_of(s)->allow_plain_auth;
}

/* The mailbox is free for the next session as soon as this one is done
 * with it: before the QUIT's +OK, so a client that logs in again right
 * after does not meet [IN-USE]. */
static void release_mailbox(struct pop3_session *s)
{
    if (s->locked) mailbox_unlock(s->mailbox);
    s->locked = false;
}

static void session_free(struct pop3_session *s)
{
    release_mailbox(s);
    if (s->mb) s->mb->st->ops->close(s->mb);
    free(s->deleted);
    free(s->user);
    free(s->mailbox);
    free(s);
}

/* ---- offload jobs ---- */

enum { JOB_AUTH = 0, JOB_SCAN, JOB_READ, JOB_UPDATE };

struct pop3_job {
    struct offload_job job;
    struct pop3_session *s;
    int kind;
    /* auth */
    const char *hash;
    char *password;
    int ok;
    /* open */
    struct store_mbox *mb;
    int err;
    /* read */
    uint32_t uid;
    long top_lines;               /* -1: whole message */
    struct bytebuf out;           /* "+OK", the message as sent, "." */
};

/* A message as it goes on the wire: CRLF lines (a bare LF from a file
 * another tool wrote becomes CRLF), dot-stuffed (RFC 1939 §3), the final
 * "." line; top_lines >= 0 keeps the header and that many lines of the
 * body (§7 TOP). */
static int wire_format(const char *raw, size_t len, long top_lines, struct bytebuf *out)
{
    bool in_body = false;
    long body_lines = 0;
    size_t i = 0;
    while (i < len) {
        const char *nl = memchr(raw + i, '\n', len - i);
        size_t end = nl ? (size_t)(nl - raw) : len;
        size_t n = end - i;
        if (n > 0 && raw[i + n - 1] == '\r') n--;
        if (top_lines >= 0 && in_body && body_lines >= top_lines) break;
        if (raw[i] == '.' && bytebuf_append(out, ".", 1) < 0) return -ENOMEM;
        if (bytebuf_append(out, raw + i, n) < 0 || bytebuf_append(out, "\r\n", 2) < 0) return -ENOMEM;
        if (!in_body && n == 0) in_body = true;
        else if (in_body) body_lines++;
        i = nl ? end + 1 : len;
    }
    return bytebuf_append(out, ".\r\n", 3) < 0 ? -ENOMEM : 0;
}

static void job_work(struct offload_job *oj)
{
    struct pop3_job *j = container_of(oj, struct pop3_job, job);
    struct pop3_session *s = j->s;
    struct store *st = s->w->eng->store;
    switch (j->kind) {
    case JOB_AUTH:
        j->ok = users_verify_password(j->hash, j->password) == 1;
        break;
    case JOB_SCAN:
        j->err = st->ops->open(st, s->mailbox, "INBOX", &j->mb);
        break;
    case JOB_READ: {
        char *raw = NULL;
        size_t rawlen = 0;
        j->err = st->ops->read(s->mb, j->uid, &raw, &rawlen);
        /* The whole answer in one buffer, sized for the message and some
         * stuffing, that the connection then takes without a copy. */
        static const char ok[] = "+OK message follows\r\n";
        if (j->err == 0 && (j->err = bytebuf_reserve(&j->out, sizeof ok + rawlen + rawlen / 16 + 8)) == 0 &&
            (j->err = bytebuf_append(&j->out, ok, sizeof ok - 1)) == 0)
            j->err = wire_format(raw, rawlen, j->top_lines, &j->out);
        free(raw);
        break;
    }
    case JOB_UPDATE: {
        uint32_t *uids = malloc((s->mb->n ? s->mb->n : 1) * sizeof *uids);
        size_t n = 0;
        if (!uids) {
            j->err = -ENOMEM;
            break;
        }
        for (size_t i = 0; i < s->mb->n; i++)
            if (s->deleted[i]) uids[n++] = s->mb->msgs[i].uid;
        j->err = st->ops->expunge(s->mb, uids, n);
        free(uids);
        break;
    }
    default:
        break;
    }
}

static void job_done(struct loop *l, struct loop_msg *lm);

static struct pop3_job *job_new(struct pop3_session *s, int kind)
{
    struct pop3_job *j = calloc(1, sizeof *j);
    if (!j) return NULL;
    j->s = s;
    j->kind = kind;
    j->top_lines = -1;
    j->job.loop = &s->w->loop;
    j->job.work = job_work;
    j->job.msg.fn = job_done;
    j->job.outstanding = &s->w->eng->offload_jobs;
    return j;
}

static void job_submit(struct pop3_session *s, struct pop3_job *j)
{
    s->pending = true;
    s->state = P_WAIT;
    conn_suspend(&s->conn);
    offload_submit(&j->job);
}

static void job_free(struct pop3_job *j)
{
    if (j->password) {
        explicit_bzero(j->password, strlen(j->password));
        free(j->password);
    }
    if (j->mb) j->mb->st->ops->close(j->mb);
    bytebuf_free(&j->out);
    free(j);
}

static void auth_result(struct pop3_session *s, bool ok);
static void scan_result(struct pop3_session *s, struct pop3_job *j);

static void job_done(struct loop *l, struct loop_msg *lm)
{
    struct pop3_job *j = container_of(lm, struct pop3_job, job.msg);
    struct pop3_session *s = j->s;
    s->pending = false;
    if (s->closed || l->dead || conn_closing(&s->conn)) {
        /* A QUIT's deletions were done; anything else is moot now. */
        bool closed = s->closed;
        job_free(j);
        if (closed) session_free(s);
        return;
    }
    switch (j->kind) {
    case JOB_AUTH:
        s->state = P_AUTH;
        auth_result(s, j->ok);
        break;
    case JOB_SCAN:
        scan_result(s, j);
        break;
    case JOB_READ:
        s->state = P_TRANS;
        if (j->err) reply(s, "-ERR message is gone (deleted by another client?)");
        else conn_write_buf(&s->conn, &j->out);
        break;
    case JOB_UPDATE:
        s->state = P_DONE;
        release_mailbox(s);
        if (j->err) reply(s, "-ERR some deleted messages not removed");
        else reply(s, "+OK mailengine POP3 server signing off");
        conn_close(&s->conn);
        break;
    }
    job_free(j);
    /* A step may have started the next job (login -> scan): stay suspended. */
    if (!conn_closing(&s->conn) && !s->pending) conn_resume(&s->conn);
}

/* ---- authorization ---- */

/* The user table, on the offload thread. */
static void auth_builtin(struct pop3_session *s, const char *user, size_t ulen, const char *pass,
                         size_t plen)
{
    const struct me_config *cfg = cfg_of(s);
    const char *hash = users_find(cfg->users, user, ulen);
    struct pop3_job *j = job_new(s, JOB_AUTH);
    if (!s->user || !j || !(j->password = strndup(pass, plen))) {
        if (j) job_free(j);
        reply(s, "-ERR [SYS/TEMP] out of memory");
        return;
    }
    /* An unknown user costs the same time as a wrong password: verify
     * against a fixed hash so the answer does not tell them apart. */
    static const char dummy[] = "{PLAIN}\x01not-a-password";
    j->hash = hash ? hash : dummy;
    job_submit(s, j);
}

/* The auth hook's answer (the same hook as SMTP AUTH's): authenticated,
 * refused, or Accept/None to let the user table decide. */
static void auth_hook_done(struct hook_req *r)
{
    struct pop3_session *s = r->owner;
    s->pending = false;
    if (s->closed || s->w->loop.dead || conn_closing(&s->conn)) {
        bool closed = s->closed;
        explicit_bzero((char *)r->args[HARG_3], r->arg_lens[HARG_3]);
        hook_req_free(r);
        if (closed) session_free(s);
        return;
    }
    s->state = P_AUTH;
    switch (r->action) {
    case HOOK_AUTHENTICATED:
        auth_result(s, true);
        break;
    case HOOK_ACCEPT:
        auth_builtin(s, r->args[HARG_2], r->arg_lens[HARG_2], r->args[HARG_3], r->arg_lens[HARG_3]);
        break;
    case HOOK_TEMPFAIL:
        reply(s, "-ERR [SYS/TEMP] %s", r->text[0] ? r->text : "try again later");
        break;
    default:
        auth_result(s, false);
    }
    explicit_bzero((char *)r->args[HARG_3], r->arg_lens[HARG_3]);
    hook_req_free(r);
    if (!conn_closing(&s->conn) && !s->pending) conn_resume(&s->conn);
}

static void start_auth(struct pop3_session *s, const char *mech, const char *user, size_t ulen,
                       const char *pass, size_t plen)
{
    const struct me_config *cfg = cfg_of(s);
    free(s->user);
    s->user = strndup(user, ulen);
    if (!s->user) {
        reply(s, "-ERR [SYS/TEMP] out of memory");
        return;
    }
    if (!(cfg->hooks & (1u << HOOK_AUTH)) || !s->w->eng->bridge) {
        auth_builtin(s, user, ulen, pass, plen);
        return;
    }
    const char *args[HARG_COUNT] = {0};
    size_t lens[HARG_COUNT] = {0};
    char idbuf[32], ipbuf[64];
    snprintf(idbuf, sizeof idbuf, "%02xp%07x", s->w->id, (unsigned)(uintptr_t)s & 0xfffffff);
    conn_addr_str(&s->conn.peer, ipbuf, sizeof ipbuf);
    args[HARG_SESSION_ID] = idbuf, lens[HARG_SESSION_ID] = strlen(idbuf);
    args[HARG_PEER_IP] = ipbuf, lens[HARG_PEER_IP] = strlen(ipbuf);
    args[HARG_LISTENER] = s->lc->name, lens[HARG_LISTENER] = strlen(s->lc->name);
    args[HARG_1] = mech, lens[HARG_1] = strlen(mech);
    args[HARG_2] = user, lens[HARG_2] = ulen;
    args[HARG_3] = pass, lens[HARG_3] = plen;
    struct hook_req *r = hook_req_new(HOOK_AUTH, args, lens);
    if (!r) {
        reply(s, "-ERR [SYS/TEMP] out of memory");
        return;
    }
    r->loop = &s->w->loop;
    r->done = auth_hook_done;
    r->owner = s;
    r->peer_port = s->conn.peer.port;
    r->tls = conn_is_tls(&s->conn);
    s->pending = true;
    s->state = P_WAIT;
    conn_suspend(&s->conn);
    bridge_submit(s->w->eng->bridge, r);
}

static void auth_result(struct pop3_session *s, bool ok)
{
    if (!ok) {
        s->auth_failures++;
        /* RFC 3206 [AUTH]: the credentials, not the system, are at fault. */
        reply(s, "-ERR [AUTH] authentication failed");
        if (s->auth_failures >= POP3_MAX_AUTH_FAILURES) conn_close(&s->conn);
        return;
    }
    char mailbox[320];
    if (!s->w->eng->store) {
        reply(s, "-ERR [SYS/TEMP] no mailbox store is configured");
        return;
    }
    if (mailbox_of(s->user, strlen(s->user), mailbox, sizeof mailbox) < 0) {
        reply(s, "-ERR [SYS/PERM] this user has no mailbox");
        return;
    }
    if (!mailbox_lock(mailbox)) {
        reply(s, "-ERR [IN-USE] mailbox in use by another session");
        return;
    }
    s->mailbox = strdup(mailbox);
    s->locked = s->mailbox != NULL;
    if (!s->mailbox) {
        mailbox_unlock(mailbox);
        reply(s, "-ERR [SYS/TEMP] out of memory");
        return;
    }
    struct pop3_job *j = job_new(s, JOB_SCAN);
    if (!j) {
        reply(s, "-ERR [SYS/TEMP] out of memory");
        return;
    }
    job_submit(s, j);
}

static void scan_result(struct pop3_session *s, struct pop3_job *j)
{
    if (j->err < 0 || !j->mb) {
        s->state = P_AUTH;
        log_warn("pop3", "cannot open the mailbox of %s: %s", s->mailbox, strerror(-j->err));
        reply(s, "-ERR [SYS/TEMP] cannot open the mailbox");
        mailbox_unlock(s->mailbox);
        s->locked = false;
        return;
    }
    s->deleted = calloc(j->mb->n ? j->mb->n : 1, sizeof *s->deleted);
    if (!s->deleted) {
        s->state = P_AUTH;
        reply(s, "-ERR [SYS/TEMP] out of memory");
        mailbox_unlock(s->mailbox);
        s->locked = false;
        return;
    }
    s->mb = j->mb;
    j->mb = NULL;
    s->state = P_TRANS;
    uint64_t total = 0;
    for (size_t i = 0; i < s->mb->n; i++) total += s->mb->msgs[i].size;
    reply(s, "+OK %s has %zu messages (%llu octets)", s->user, s->mb->n, (unsigned long long)total);
}

static void b64_plain(struct pop3_session *s, const char *b64, size_t len)
{
    unsigned char buf[1024];
    if (len == 0 || len > 1300) {
        reply(s, "-ERR [AUTH] bad response");
        count_error(s);
        return;
    }
    long n = b64_decode(b64, len, (char *)buf, sizeof buf);
    if (n < 0) {
        reply(s, "-ERR [AUTH] cannot decode response");
        count_error(s);
        return;
    }
    /* RFC 4616: [authzid] NUL authcid NUL passwd */
    const unsigned char *z1 = memchr(buf, 0, (size_t)n);
    const unsigned char *z2 = z1 ? memchr(z1 + 1, 0, (size_t)(buf + n - (z1 + 1))) : NULL;
    if (!z1 || !z2) {
        reply(s, "-ERR [AUTH] malformed PLAIN response");
        count_error(s);
        return;
    }
    const char *user = (const char *)z1 + 1;
    size_t ulen = (size_t)(z2 - z1 - 1);
    if (z1 != buf && ((size_t)(z1 - buf) != ulen || memcmp(buf, user, ulen) != 0)) {
        reply(s, "-ERR [AUTH] authorization identity not allowed");
        return;
    }
    start_auth(s, "PLAIN", user, ulen, (const char *)z2 + 1, (size_t)(buf + n - (z2 + 1)));
    explicit_bzero(buf, sizeof buf);
}

/* ---- commands ---- */

static void capa(struct pop3_session *s)
{
    const struct me_config *cfg = cfg_of(s);
    reply(s, "+OK capability list follows");
    reply(s, "TOP");
    reply(s, "UIDL");
    reply(s, "RESP-CODES");
    reply(s, "AUTH-RESP-CODE");
    reply(s, "PIPELINING");
    if (s->state == P_AUTH) {
        if (secure_enough(s)) {
            reply(s, "USER");
            reply(s, "SASL PLAIN");
        }
        if (cfg->tls && !s->conn.tls) reply(s, "STLS");
    }
    reply(s, "IMPLEMENTATION mailengine");
    reply(s, ".");
}

/* RFC 1939 §7: a unique-id is 1 to 70 characters 0x21-0x7E; anything else
 * the store's id holds (a space in a file name) becomes '_'. */
static const char *uidl_of(const struct store_msg *m, char *buf)
{
    size_t n = m->id_len ? m->id_len : 1;
    for (size_t k = 0; k < n; k++) {
        unsigned char ch = m->id_len ? (unsigned char)m->id[k] : '_';
        buf[k] = ch >= 0x21 && ch <= 0x7e ? (char)ch : '_';
    }
    buf[n] = 0;
    return buf;
}

/* The message a command's argument numbers (1-based), or NULL (answered). */
static struct store_msg *msg_arg(struct pop3_session *s, const struct pop3_command *c, unsigned i)
{
    unsigned long n = pop3_number(c->arg[i], c->arg_len[i]);
    if (n < 1 || n > s->mb->n || s->deleted[n - 1]) {
        reply(s, "-ERR no such message");
        return NULL;
    }
    return &s->mb->msgs[n - 1];
}

static void cmd_auth_state(struct pop3_session *s, const struct pop3_command *c)
{
    const struct me_config *cfg = cfg_of(s);
    switch (c->cmd) {
    case POP3_CAPA:
        capa(s);
        return;
    case POP3_QUIT:
        reply(s, "+OK bye");
        conn_close(&s->conn);
        return;
    case POP3_NOOP:
        reply(s, "-ERR not logged in");   /* NOOP is a TRANSACTION command (RFC 1939 §5) */
        return;
    case POP3_STLS:
        if (!cfg->tls || s->conn.tls) {
            reply(s, "-ERR STLS not available");
            return;
        }
        reply(s, "+OK begin TLS negotiation");
        /* RFC 2595 §4: what was pipelined after STLS is discarded. */
        conn_start_tls(&s->conn, cfg->tls);
        free(s->user);
        s->user = NULL;
        return;
    case POP3_USER:
        if (!secure_enough(s)) {
            reply(s, "-ERR [AUTH] plain-text login needs TLS first (STLS)");
            return;
        }
        free(s->user);
        s->user = strndup(c->arg[0], c->arg_len[0]);
        reply(s, "+OK send PASS");
        return;
    case POP3_PASS:
        if (!s->user) {
            reply(s, "-ERR USER first");
            count_error(s);
            return;
        }
        if (!secure_enough(s)) {
            reply(s, "-ERR [AUTH] plain-text login needs TLS first (STLS)");
            return;
        }
        {
            char *u = s->user;
            s->user = NULL;
            start_auth(s, "USER", u, strlen(u), c->rest, c->rest_len);
            free(u);
        }
        return;
    case POP3_AUTH: {
        if (c->nargs < 1 || c->arg_len[0] != 5 || strncasecmp(c->arg[0], "PLAIN", 5) != 0) {
            reply(s, "-ERR unsupported authentication mechanism");
            return;
        }
        if (!secure_enough(s)) {
            reply(s, "-ERR [AUTH] plain-text login needs TLS first (STLS)");
            return;
        }
        if (c->nargs == 2) {
            b64_plain(s, c->arg[1], c->arg_len[1]);
        } else {
            s->auth_plain_wait = true;
            reply(s, "+ ");
        }
        return;
    }
    case POP3_APOP:
        reply(s, "-ERR APOP not supported");
        return;
    default:
        reply(s, "-ERR not allowed before login");
        count_error(s);
        return;
    }
}

static void cmd_trans_state(struct pop3_session *s, const struct pop3_command *c)
{
    switch (c->cmd) {
    case POP3_CAPA:
        capa(s);
        return;
    case POP3_NOOP:
        reply(s, "+OK");
        return;
    case POP3_STAT: {
        size_t n = 0;
        uint64_t total = 0;
        for (size_t i = 0; i < s->mb->n; i++)
            if (!s->deleted[i]) {
                n++;
                total += s->mb->msgs[i].size;
            }
        reply(s, "+OK %zu %llu", n, (unsigned long long)total);
        return;
    }
    case POP3_LIST:
    case POP3_UIDL: {
        /* UIDL (RFC 1939 §7): the store's stable id, for the Maildir
         * store the file's base name, which stays when another client
         * moves the file from new/ to cur/ or changes its flags. */
        bool uidl = c->cmd == POP3_UIDL;
        char ub[STORE_ID_MAX];
        if (c->nargs == 1) {
            struct store_msg *m = msg_arg(s, c, 0);
            if (!m) return;
            size_t i = (size_t)(m - s->mb->msgs) + 1;
            if (uidl) reply(s, "+OK %zu %s", i, uidl_of(m, ub));
            else reply(s, "+OK %zu %llu", i, (unsigned long long)m->size);
            return;
        }
        reply(s, "+OK listing follows");
        for (size_t i = 0; i < s->mb->n; i++) {
            if (s->deleted[i]) continue;
            if (uidl) reply(s, "%zu %s", i + 1, uidl_of(&s->mb->msgs[i], ub));
            else reply(s, "%zu %llu", i + 1, (unsigned long long)s->mb->msgs[i].size);
        }
        reply(s, ".");
        return;
    }
    case POP3_RETR:
    case POP3_TOP: {
        struct store_msg *m = msg_arg(s, c, 0);
        if (!m) return;
        struct pop3_job *j = job_new(s, JOB_READ);
        if (!j) {
            reply(s, "-ERR [SYS/TEMP] out of memory");
            return;
        }
        j->uid = m->uid;
        if (c->cmd == POP3_TOP) j->top_lines = (long)pop3_number(c->arg[1], c->arg_len[1]);
        job_submit(s, j);
        return;
    }
    case POP3_DELE: {
        struct store_msg *m = msg_arg(s, c, 0);
        if (!m) return;
        size_t i = (size_t)(m - s->mb->msgs);
        s->deleted[i] = true;
        reply(s, "+OK message %zu deleted", i + 1);
        return;
    }
    case POP3_RSET:
        memset(s->deleted, 0, (s->mb->n ? s->mb->n : 1) * sizeof *s->deleted);
        reply(s, "+OK");
        return;
    case POP3_QUIT: {
        bool any = false;
        for (size_t i = 0; i < s->mb->n; i++) any |= s->deleted[i];
        if (!any) {
            release_mailbox(s);
            reply(s, "+OK mailengine POP3 server signing off");
            conn_close(&s->conn);
            return;
        }
        /* RFC 1939 §6: the UPDATE state removes what was marked. */
        struct pop3_job *j = job_new(s, JOB_UPDATE);
        if (!j) {
            reply(s, "-ERR [SYS/TEMP] out of memory");
            conn_close(&s->conn);
            return;
        }
        job_submit(s, j);
        return;
    }
    default:
        reply(s, "-ERR not allowed after login");
        count_error(s);
        return;
    }
}

static void on_line(struct pop3_session *s, const char *line, size_t len)
{
    if (s->auth_plain_wait) {
        s->auth_plain_wait = false;
        if (len == 1 && line[0] == '*') {
            reply(s, "-ERR authentication cancelled");   /* RFC 5034 §4 */
            return;
        }
        b64_plain(s, line, len);
        return;
    }
    struct pop3_command c;
    enum pop3_parse_status st = pop3_parse(line, len, &c);
    if (st != POP3_OK) {
        reply(s, "-ERR %s", st == POP3_ERR_UNKNOWN ? "unknown command"
                            : st == POP3_ERR_TOO_LONG ? "line too long"
                            : st == POP3_ERR_EMPTY ? "empty command" : "syntax error");
        count_error(s);
        return;
    }
    if (s->state == P_AUTH) cmd_auth_state(s, &c);
    else cmd_trans_state(s, &c);
}

static size_t pop3_on_data(struct conn *cn, const char *p, size_t n)
{
    struct pop3_session *s = (struct pop3_session *)cn;
    size_t used = 0;
    while (used < n && !conn_closing(cn) && s->state != P_WAIT && !s->pending) {
        size_t ll;
        size_t k = pop3_line_end(p + used, n - used, &ll);
        if (k == 0) {
            if (n - used > POP3_LINE_MAX + 1024) {
                /* Past any command (RFC 2449 §4): drop the connection. */
                reply(s, "-ERR line too long");
                conn_close(cn);
                return n;
            }
            break;
        }
        bool had_tls = cn->tls != NULL;
        on_line(s, p + used, ll);
        used += k;
        if (cn->tls && !had_tls) return n;   /* STLS began: the rest is void */
    }
    /* Closing, the connection's own short wait for the last reply stands. */
    if (!conn_closing(cn)) conn_set_timeout(cn, idle_ms(s));
    return used;
}

static void pop3_on_tls(struct conn *cn, int ok)
{
    struct pop3_session *s = (struct pop3_session *)cn;
    if (!ok) return;
    if (s->lc->kind == LISTENER_POP3S) reply(s, "+OK mailengine POP3 ready");
}

static void pop3_on_timeout(struct conn *cn)
{
    struct pop3_session *s = (struct pop3_session *)cn;
    if (s->pending) {
        conn_set_timeout(cn, idle_ms(s));
        return;
    }
    /* RFC 1939 §3: an autologout timer; no UPDATE state is entered. */
    release_mailbox(s);
    reply(s, "-ERR autologout: idle for too long");
    conn_close(cn);
}

static void session_unlink(struct pop3_session *s)
{
    s->link.prev->next = s->link.next;
    s->link.next->prev = s->link.prev;
    s->link.next = s->link.prev = &s->link;
}

static void pop3_on_close(struct conn *c)
{
    struct pop3_session *s = (struct pop3_session *)c;
    struct engine *e = s->w->eng;
    timer_cancel(&c->loop->timers, &c->timer);
    session_unlink(s);
    s->w->nsessions--;
    atomic_fetch_sub(&e->conns_total, 1);
    if (s->counted) atomic_fetch_sub(&e->conns_per_ip[engine_ip_slot(&c->peer)], 1);
    s->closed = true;
    if (!s->pending) session_free(s);
}

static const struct conn_proto pop3_proto = {
    .on_data = pop3_on_data,
    .on_tls = pop3_on_tls,
    .on_timeout = pop3_on_timeout,
    .on_close = pop3_on_close,
};

static void pop3_drain_one(struct session_link *l, bool force)
{
    struct pop3_session *s = container_of(l, struct pop3_session, link);
    if (conn_closing(&s->conn) || (s->pending && !force)) return;
    /* RFC 2449 §8.1.2 [SYS/TEMP]: try again later; nothing is deleted. */
    reply(s, "-ERR [SYS/TEMP] server shutting down");
    conn_close(&s->conn);
}

void pop3_session_start(struct worker *w, struct listener_cfg *lc, int fd)
{
    struct engine *e = w->eng;
    struct me_config *cfg = e->cfg;
    struct pop3_session *s = calloc(1, sizeof *s);
    if (!s) {
        close(fd);
        return;
    }
    s->w = w;
    s->lc = lc;
    bool implicit = lc->kind == LISTENER_POP3S;
    conn_init(&s->conn, &w->loop, fd, &pop3_proto, implicit ? cfg->tls : NULL);
    s->link.drain = pop3_drain_one;
    s->link.next = w->sessions.next;
    s->link.prev = &w->sessions;
    w->sessions.next->prev = &s->link;
    w->sessions.next = &s->link;
    w->nsessions++;
    conn_set_timeout(&s->conn, cfg->limits.pop3_idle_timeout_ms);
    unsigned total = atomic_fetch_add(&e->conns_total, 1) + 1;
    if (w->draining || (cfg->limits.max_connections && total > cfg->limits.max_connections)) {
        reply(s, "-ERR [SYS/TEMP] too busy, try later");
        conn_close(&s->conn);
        return;
    }
    if (!config_is_trusted(cfg, &s->conn.peer)) {
        unsigned per = atomic_fetch_add(&e->conns_per_ip[engine_ip_slot(&s->conn.peer)], 1) + 1u;
        s->counted = true;
        if (cfg->limits.max_connections_per_ip && per > cfg->limits.max_connections_per_ip) {
            reply(s, "-ERR [SYS/TEMP] too many connections from your address");
            conn_close(&s->conn);
            return;
        }
    }
    if (!implicit) reply(s, "+OK mailengine POP3 ready");
}
