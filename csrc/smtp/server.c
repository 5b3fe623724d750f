/* The SMTP receiver (RFC 5321 with PIPELINING, SIZE, 8BITMIME,
 * ENHANCEDSTATUSCODES, STARTTLS, SMTPUTF8, CHUNKING, AUTH and DSN): one
 * state machine per session over core/conn, policy from the configuration,
 * Python hooks through the bridge, and the spool as the only place a
 * message is acknowledged from. */
#include <arpa/inet.h>
#include <errno.h>
#include <stdarg.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#include "core/base64.h"
#include "core/conn.h"
#include "core/log.h"
#include "core/offload.h"
#include "core/worker.h"
#include "py/bridge.h"
#include "queue/spool.h"
#include "smtp/parse.h"
#include "store/aliases.h"
#include "store/maildir.h"
#include "store/store.h"
#include "store/users.h"
#include "tls/tls.h"

#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

/* RFC 4954 §4: a SASL response line may be up to 12288 octets. */
#define SMTP_AUTH_LINE_MAX 12288

enum smtp_state {
    ST_CMD = 0,      /* reading commands */
    ST_DATA,         /* reading the DATA stream */
    ST_BDAT,         /* reading a BDAT chunk */
    ST_AUTH,         /* waiting for a SASL response line */
    ST_WAIT,         /* a hook, the spool, a password check or a delay */
    ST_TLS,          /* STARTTLS handshake */
};

enum { DELAYED_535 = 1, DELAYED_421 = 2 };

enum auth_step { AUTH_NONE = 0, AUTH_PLAIN_WAIT, AUTH_LOGIN_USER, AUTH_LOGIN_PASS };

enum {
    TXN_SMTPUTF8 = 1u << 0,
    TXN_8BIT = 1u << 1,
    TXN_FAILED = 1u << 2,        /* BDAT: a chunk failed; rest is consumed and refused */
    TXN_TOO_BIG = 1u << 3,
    TXN_BDAT = 1u << 4,
    TXN_NOMEM = 1u << 5,         /* out of memory: refuse for now, not for ever */
};

struct smtp_session {
    struct conn conn;                 /* first: conn <-> session */
    struct session_link link;
    struct worker *w;
    struct listener_cfg *lc;
    enum smtp_state state;
    uint32_t serial;
    bool discarding;                  /* skipping the rest of an over-long line */
    bool esmtp;
    bool authed;
    bool quitting;
    bool closed;                      /* conn gone; free once nothing is pending */
    bool pending;                     /* a hook, spool write or job refers to us */
    bool counted_ip;
    bool refused;                     /* connect hook said 554: only QUIT works */
    enum auth_step auth_step;
    unsigned errors;
    unsigned auth_failures;
    unsigned nrcpt;
    unsigned last_rcpt_lines;         /* envelope lines the last RCPT added (aliases) */
    uint64_t declared_size;           /* MAIL FROM SIZE=, 0 when not given */
    uint32_t txn_flags;
    uint64_t session_deadline;        /* timer_now_ms() based */
    size_t bdat_left;
    bool bdat_last;
    char *helo;
    char *auth_user;
    char *auth_login_user;            /* LOGIN: user while waiting for the password */
    struct bytebuf env;               /* envelope lines of the open transaction */
    struct bytebuf msg;               /* message being received */
    struct bytebuf rcvd;              /* the Received: header */
    struct smtp_data_scan scan;
    struct spool_rec rec;
    void (*after_hook)(struct smtp_session *s, struct hook_req *r);
    uint8_t delayed_reply;            /* AUTH failure reply held back by the delay */
};

static void session_reply(struct smtp_session *s, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static inline struct me_config *cfg_of(struct smtp_session *s) { return s->w->eng->cfg; }

static void session_reply(struct smtp_session *s, const char *fmt, ...)
{
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf - 2, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n > sizeof buf - 3) n = sizeof buf - 3;
    buf[n++] = '\r';
    buf[n++] = '\n';
    conn_write(&s->conn, buf, (size_t)n);
}

static void arm_timeout(struct smtp_session *s, uint64_t ms)
{
    uint64_t now = timer_now_ms();
    if (s->session_deadline && now + ms > s->session_deadline)
        ms = s->session_deadline > now ? s->session_deadline - now : 1;
    conn_set_timeout(&s->conn, ms);
}

/* A transient error that ends the session: 421 then close. */
static void session_close_421(struct smtp_session *s, const char *enh, const char *text)
{
    session_reply(s, "421 %s %s %s", enh, cfg_of(s)->hostname, text);
    conn_close(&s->conn);
}

static void count_error(struct smtp_session *s)
{
    if (++s->errors >= cfg_of(s)->limits.max_errors)
        session_close_421(s, "4.7.0", "Error: too many errors");
}

static void txn_reset(struct smtp_session *s)
{
    bytebuf_free(&s->env);
    bytebuf_free(&s->msg);
    bytebuf_free(&s->rcvd);
    s->nrcpt = 0;
    s->declared_size = 0;
    s->txn_flags = 0;
    s->bdat_left = 0;
    s->bdat_last = false;
}

static bool txn_open(const struct smtp_session *s) { return bytebuf_used(&s->env) > 0; }

static int env_add(struct smtp_session *s, char key, const char *a, size_t alen, const char *b,
                   size_t blen)
{
    char k[2] = {key, ' '};
    if (bytebuf_append(&s->env, k, 2) < 0 || bytebuf_append(&s->env, a, alen) < 0) return -1;
    if (b && blen && (bytebuf_append(&s->env, "\t", 1) < 0 || bytebuf_append(&s->env, b, blen) < 0))
        return -1;
    return bytebuf_append(&s->env, "\n", 1);
}

/* ---- hooks ---- */

static bool hook_wanted(struct smtp_session *s, enum hook_kind k)
{
    return (cfg_of(s)->hooks & (1u << k)) != 0;
}

static void session_free(struct smtp_session *s);
static void smtp_drain_one(struct session_link *l, bool force);
static void session_input_resume(struct smtp_session *s);

static void hook_done(struct hook_req *r)
{
    struct smtp_session *s = r->owner;
    s->pending = false;
    if (s->w->loop.dead || (!s->closed && conn_closing(&s->conn))) {
        /* The worker has ended, or the connection is on its way out (its
         * on_close will free us): nothing to answer. */
        hook_req_free(r);
        if (s->closed) session_free(s);
        return;
    }
    if (s->closed) {
        hook_req_free(r);
        session_free(s);
        return;
    }
    void (*after)(struct smtp_session *, struct hook_req *) = s->after_hook;
    s->after_hook = NULL;
    s->state = ST_CMD;
    after(s, r);
    hook_req_free(r);
    if (!conn_closing(&s->conn) && s->state == ST_CMD) session_input_resume(s);
}

static void session_args(struct smtp_session *s, const char **args, size_t *lens, char *idbuf,
                         char *ipbuf)
{
    snprintf(idbuf, 32, "%02x%08x", s->w->id, s->serial);
    conn_addr_str(&s->conn.peer, ipbuf, 64);
    args[HARG_SESSION_ID] = idbuf;
    lens[HARG_SESSION_ID] = strlen(idbuf);
    args[HARG_PEER_IP] = ipbuf;
    lens[HARG_PEER_IP] = strlen(ipbuf);
    args[HARG_LISTENER] = s->lc->name;
    lens[HARG_LISTENER] = strlen(s->lc->name);
    args[HARG_HELO] = s->helo;
    lens[HARG_HELO] = s->helo ? strlen(s->helo) : 0;
    args[HARG_AUTH_USER] = s->auth_user;
    lens[HARG_AUTH_USER] = s->auth_user ? strlen(s->auth_user) : 0;
}

/* Post a hook; `after` runs with the reply. Returns 0, or -1 if the
 * request could not be made (the caller answers 451). */
static int hook_call(struct smtp_session *s, enum hook_kind k, const char *a1, size_t l1,
                     const char *a2, size_t l2, const char *a3, size_t l3,
                     void (*after)(struct smtp_session *, struct hook_req *))
{
    const char *args[HARG_COUNT] = {0};
    size_t lens[HARG_COUNT] = {0};
    char idbuf[32], ipbuf[64];
    session_args(s, args, lens, idbuf, ipbuf);
    args[HARG_1] = a1, lens[HARG_1] = l1;
    args[HARG_2] = a2, lens[HARG_2] = l2;
    args[HARG_3] = a3, lens[HARG_3] = l3;
    struct hook_req *r = hook_req_new(k, args, lens);
    if (!r) return -1;
    r->loop = &s->w->loop;
    r->done = hook_done;
    r->owner = s;
    r->peer_port = s->conn.peer.port;
    r->tls = conn_is_tls(&s->conn);
    if (k == HOOK_DATA) {
        r->data = bytebuf_head(&s->msg);
        r->data_len = bytebuf_used(&s->msg);
    }
    s->after_hook = after;
    s->pending = true;
    s->state = ST_WAIT;
    conn_suspend(&s->conn);
    bridge_submit(s->w->eng->bridge, r);
    return 0;
}

/* Answer a hook's Reject/TempFail; true if it did (the hook said no). */
static bool hook_refused(struct smtp_session *s, struct hook_req *r)
{
    if (r->action == HOOK_ACCEPT) return false;
    int code = r->code;
    if (r->action == HOOK_REJECT && (code < 500 || code > 599)) code = 550;
    if (r->action == HOOK_TEMPFAIL && (code < 400 || code > 499)) code = 451;
    const char *text = r->text[0] ? r->text
                       : r->action == HOOK_REJECT ? "5.7.1 Rejected by policy"
                                                  : "4.7.1 Try again later";
    session_reply(s, "%d %s", code, text);
    if (code == 421) conn_close(&s->conn);
    return true;
}

static void emit_received(struct smtp_session *s, const char *id)
{
    if (!hook_wanted(s, EVENT_RECEIVED)) return;
    const char *args[HARG_COUNT] = {0};
    size_t lens[HARG_COUNT] = {0};
    char idbuf[32], ipbuf[64], size[32];
    session_args(s, args, lens, idbuf, ipbuf);
    snprintf(size, sizeof size, "%zu", bytebuf_used(&s->msg) + bytebuf_used(&s->rcvd));
    args[HARG_1] = id, lens[HARG_1] = strlen(id);
    args[HARG_2] = bytebuf_head(&s->env), lens[HARG_2] = bytebuf_used(&s->env);
    args[HARG_3] = size, lens[HARG_3] = strlen(size);
    struct hook_req *r = hook_req_new(EVENT_RECEIVED, args, lens);
    if (!r) return;
    r->peer_port = s->conn.peer.port;
    r->tls = conn_is_tls(&s->conn);
    bridge_submit(s->w->eng->bridge, r);
}

/* ---- greeting and EHLO ---- */

static void send_greeting(struct smtp_session *s)
{
    session_reply(s, "220 %s ESMTP mailengine", cfg_of(s)->hostname);
}

static void after_connect(struct smtp_session *s, struct hook_req *r)
{
    if (r->action == HOOK_REJECT) {
        /* RFC 5321 §3.1: a 554 greeting, then 503 to everything but QUIT. */
        session_reply(s, "554 %s", r->text[0] ? r->text : "5.7.1 Service unavailable");
        s->refused = true;
        return;
    }
    if (r->action == HOOK_TEMPFAIL) {
        session_reply(s, "421 %s", r->text[0] ? r->text : "4.7.0 Service not available, try later");
        conn_close(&s->conn);
        return;
    }
    send_greeting(s);
}

static bool auth_offered(struct smtp_session *s)
{
    return s->lc->kind != LISTENER_MX;
}

static bool tls_offered(struct smtp_session *s)
{
    return cfg_of(s)->tls && !s->conn.tls;
}

static void send_ehlo(struct smtp_session *s)
{
    struct me_config *cfg = cfg_of(s);
    if (!s->esmtp) {
        session_reply(s, "250 %s", cfg->hostname);
        return;
    }
    session_reply(s, "250-%s", cfg->hostname);
    session_reply(s, "250-PIPELINING");
    session_reply(s, "250-SIZE %zu", cfg->limits.max_message_size);
    if (tls_offered(s)) session_reply(s, "250-STARTTLS");
    if (auth_offered(s) && !s->authed && (conn_is_tls(&s->conn) || cfg->allow_plain_auth))
        session_reply(s, "250-AUTH PLAIN LOGIN");
    session_reply(s, "250-ENHANCEDSTATUSCODES");
    session_reply(s, "250-8BITMIME");
    session_reply(s, "250-DSN");
    session_reply(s, "250-SMTPUTF8");
    session_reply(s, "250 CHUNKING");
}

static void after_helo(struct smtp_session *s, struct hook_req *r)
{
    if (hook_refused(s, r)) {
        free(s->helo);
        s->helo = NULL;
        return;
    }
    send_ehlo(s);
}

static void cmd_helo(struct smtp_session *s, const struct smtp_cmd *c, bool esmtp)
{
    txn_reset(s);
    free(s->helo);
    s->helo = strndup(c->arg, c->arg_len);
    s->esmtp = esmtp;
    if (hook_wanted(s, HOOK_HELO)) {
        if (hook_call(s, HOOK_HELO, c->arg, c->arg_len, esmtp ? "EHLO" : "HELO", 4, NULL, 0,
                      after_helo) < 0)
            session_reply(s, "451 4.3.0 Error: out of memory");
        return;
    }
    send_ehlo(s);
}

/* ---- MAIL and RCPT ---- */

static bool is_hex_upper(char ch) { return (ch >= '0' && ch <= '9') || (ch >= 'A' && ch <= 'F'); }

static bool xtext_ok(const char *p, size_t n)
{
    /* RFC 3461 §4: printable ASCII but '+' and '='; "+XX" is a hex escape. */
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)p[i];
        if (ch == '+') {
            if (i + 2 >= n || !is_hex_upper(p[i + 1]) || !is_hex_upper(p[i + 2])) return false;
            i += 2;
            continue;
        }
        if (ch < 33 || ch > 126 || ch == '=') return false;
    }
    return true;
}

static void after_mail(struct smtp_session *s, struct hook_req *r)
{
    if (hook_refused(s, r)) {
        txn_reset(s);
        return;
    }
    session_reply(s, "250 2.1.0 Ok");
}

static void cmd_mail(struct smtp_session *s, const struct smtp_cmd *c)
{
    struct me_config *cfg = cfg_of(s);
    if (!s->helo) {
        session_reply(s, "503 5.5.1 Error: send HELO/EHLO first");
        count_error(s);
        return;
    }
    if (txn_open(s)) {
        session_reply(s, "503 5.5.1 Error: nested MAIL command");
        count_error(s);
        return;
    }
    if (s->lc->kind != LISTENER_MX && !s->authed) {
        session_reply(s, "530 5.7.0 Authentication required");
        count_error(s);
        return;
    }
    uint32_t flags = 0;
    uint64_t size = 0;
    unsigned bad = 0;
    for (unsigned i = 0; i < c->nparams; i++) {
        const struct smtp_param *p = &c->params[i];
        bad = i;
        if (smtp_param_is(p, "SIZE")) {
            if (!p->val || p->val_len == 0 || p->val_len > 19) goto bad_param;
            unsigned long long v = 0;
            for (size_t k = 0; k < p->val_len; k++) {
                if (p->val[k] < '0' || p->val[k] > '9') goto bad_param;
                v = v * 10 + (unsigned)(p->val[k] - '0');
            }
            if (v > cfg->limits.max_message_size) {
                session_reply(s, "552 5.3.4 Message size exceeds fixed limit");
                return;
            }
            size = v;
        } else if (smtp_param_is(p, "BODY")) {
            if (!p->val) goto bad_param;
            if (p->val_len == 8 && strncasecmp(p->val, "8BITMIME", 8) == 0) flags |= TXN_8BIT;
            else if (!(p->val_len == 4 && strncasecmp(p->val, "7BIT", 4) == 0)) goto bad_param;
        } else if (smtp_param_is(p, "SMTPUTF8")) {
            if (p->val) goto bad_param;
            flags |= TXN_SMTPUTF8;
        } else if (smtp_param_is(p, "RET")) {
            if (!p->val || !((p->val_len == 4 && strncasecmp(p->val, "FULL", 4) == 0) ||
                             (p->val_len == 4 && strncasecmp(p->val, "HDRS", 4) == 0)))
                goto bad_param;
        } else if (smtp_param_is(p, "ENVID")) {
            if (!p->val || p->val_len > 100 || !xtext_ok(p->val, p->val_len)) goto bad_param;
        } else if (smtp_param_is(p, "AUTH")) {
            if (!p->val) goto bad_param;   /* RFC 4954 §5: kept, not trusted */
        } else {
            session_reply(s, "555 5.5.4 Unsupported option: %.*s", (int)p->key_len, p->key);
            count_error(s);
            return;
        }
    }
    if (!(flags & TXN_SMTPUTF8) && smtp_addr_is_utf8(c->addr, c->addr_len)) {
        session_reply(s, "553 5.6.7 Non-ASCII address needs SMTPUTF8");
        count_error(s);
        return;
    }
    if (c->addr_len > 0 && smtp_addr_at(c->addr, c->addr_len) <= 0) {
        session_reply(s, "501 5.1.7 Bad sender address syntax");
        count_error(s);
        return;
    }
    /* Envelope: the id line is filled in at spool time; reserve it now so
     * the envelope is written in one piece. */
    char idline[2 + SPOOL_ID_LEN + 1];
    memset(idline, '0', sizeof idline);
    if (bytebuf_append(&s->env, "I ", 2) < 0 || bytebuf_append(&s->env, idline, SPOOL_ID_LEN) < 0 ||
        bytebuf_append(&s->env, "\n", 1) < 0)
        goto oom;
    const char *params = c->nparams ? c->params[0].key : NULL;
    size_t plen = params ? (size_t)(c->arg + c->arg_len - params) : 0;
    if (env_add(s, 'F', c->addr, c->addr_len, params, plen) < 0) goto oom;
    s->txn_flags = flags;
    s->declared_size = size;
    if (hook_wanted(s, HOOK_MAIL)) {
        if (hook_call(s, HOOK_MAIL, c->addr, c->addr_len, params, plen, NULL, 0, after_mail) < 0)
            goto oom;
        return;
    }
    session_reply(s, "250 2.1.0 Ok");
    return;
bad_param:
    session_reply(s, "501 5.5.4 Bad parameter: %.*s", (int)c->params[bad].key_len, c->params[bad].key);
    count_error(s);
    txn_reset(s);
    return;
oom:
    txn_reset(s);
    session_reply(s, "451 4.3.0 Error: out of memory");
}

/* RFC 3461 §4.1: NEVER alone, or a list of SUCCESS, FAILURE, DELAY. */
static bool notify_ok(const char *v, size_t n)
{
    if (n == 5 && strncasecmp(v, "NEVER", 5) == 0) return true;
    const char *end = v + n;
    while (v < end) {
        const char *comma = memchr(v, ',', (size_t)(end - v));
        size_t len = comma ? (size_t)(comma - v) : (size_t)(end - v);
        if (!((len == 7 && strncasecmp(v, "SUCCESS", 7) == 0) ||
              (len == 7 && strncasecmp(v, "FAILURE", 7) == 0) ||
              (len == 5 && strncasecmp(v, "DELAY", 5) == 0)))
            return false;
        v += len + (comma ? 1 : 0);
        if (comma && v == end) return false;
    }
    return n > 0;
}

/* Take back the envelope lines added for the last RCPT (one, or one per
 * target of an alias). */
static void rcpt_undo(struct smtp_session *s)
{
    for (unsigned k = 0; k < s->last_rcpt_lines && bytebuf_used(&s->env) > 0; k++) {
        char *env = bytebuf_head(&s->env);
        size_t i = bytebuf_used(&s->env) - 1;
        while (i > 0 && env[i - 1] != '\n') i--;
        s->env.len = s->env.off + i;
        s->nrcpt--;
    }
    s->last_rcpt_lines = 0;
}

static void after_rcpt(struct smtp_session *s, struct hook_req *r)
{
    if (hook_refused(s, r)) {
        rcpt_undo(s);
        return;
    }
    session_reply(s, "250 2.1.5 Ok");
}


/* The envelope lines of an aliased recipient: one per final address, each
 * with the RCPT's parameters and, unless the client gave one, ORCPT naming
 * the address it asked for (RFC 3461 §4.2), so reports name it too. */
static int rcpt_add_aliased(struct smtp_session *s, const char *addr, size_t alen,
                            const char *params, size_t plen, const struct alias_result *res)
{
    char p[1400];
    size_t pl = 0;
    if (plen && plen < 700) {
        memcpy(p, params, plen);
        pl = plen;
    }
    bool has_orcpt = false;
    for (size_t i = 0; i + 6 <= pl; i++)
        if ((i == 0 || p[i - 1] == ' ') && strncasecmp(p + i, "ORCPT=", 6) == 0) has_orcpt = true;
    if (!has_orcpt) {
        char x[700];
        if (aliases_xtext(addr, alen, x, sizeof x) >= 0) {
            int n = snprintf(p + pl, sizeof p - pl, "%sORCPT=rfc822;%s", pl ? " " : "", x);
            if (n > 0 && (size_t)n < sizeof p - pl) pl += (size_t)n;
        }
    }
    for (unsigned i = 0; i < res->n; i++) {
        if (env_add(s, 'R', res->addr[i], strlen(res->addr[i]), p, pl) < 0) return -1;
        s->nrcpt++;
        s->last_rcpt_lines++;
    }
    return 0;
}

/* ---- RCPT: mailbox quota (RFC 2034/3463 4.2.2, mailbox full) ---- */

#define QUOTA_CHECK_MAX 8             /* local users with a quota checked per RCPT */

struct quota_job {
    struct offload_job job;
    struct smtp_session *s;
    unsigned n;
    char user[QUOTA_CHECK_MAX][320];
    struct store_quota q[QUOTA_CHECK_MAX];
    uint64_t size;
    int full;                         /* index+1 of the first full mailbox */
    char *addr, *params;              /* the RCPT, for the hook that follows */
    size_t alen, plen;
};

static void rcpt_accepted(struct smtp_session *s, const char *addr, size_t alen, const char *params,
                          size_t plen)
{
    if (hook_wanted(s, HOOK_RCPT)) {
        if (hook_call(s, HOOK_RCPT, addr, alen, params, plen, NULL, 0, after_rcpt) < 0) {
            rcpt_undo(s);
            session_reply(s, "451 4.3.0 Error: out of memory");
        }
        return;
    }
    session_reply(s, "250 2.1.5 Ok");
}

static void quota_job_work(struct offload_job *oj)
{
    struct quota_job *qj = container_of(oj, struct quota_job, job);
    struct store *st = qj->s->w->eng->store;
    for (unsigned i = 0; i < qj->n && !qj->full; i++)
        if (st->ops->quota_check(st, qj->user[i], &qj->q[i], qj->size) == -EDQUOT) qj->full = (int)i + 1;
}

static void quota_job_done(struct loop *l, struct loop_msg *m)
{
    (void)l;
    struct quota_job *qj = container_of(m, struct quota_job, job.msg);
    struct smtp_session *s = qj->s;
    s->pending = false;
    if (s->closed || s->w->loop.dead || conn_closing(&s->conn)) {
        if (s->closed) session_free(s);
    } else {
        s->state = ST_CMD;
        if (qj->full) {
            rcpt_undo(s);
            session_reply(s, "452 4.2.2 <%.*s>: Recipient address rejected: Mailbox full",
                          (int)(qj->alen > 256 ? 256 : qj->alen), qj->addr);
        } else {
            rcpt_accepted(s, qj->addr, qj->alen, qj->params, qj->plen);
        }
        if (!conn_closing(&s->conn) && s->state == ST_CMD) session_input_resume(s);
    }
    free(qj->addr);
    free(qj->params);
    free(qj);
}

/* The local users with a quota among the envelope lines the RCPT just
 * added; true when a check went to the offload thread (it answers). */
static bool rcpt_quota_start(struct smtp_session *s, const char *addr, size_t alen, const char *params,
                             size_t plen)
{
    struct me_config *cfg = cfg_of(s);
    struct store *st = s->w->eng->store;
    if (!st || s->last_rcpt_lines == 0) return false;
    struct quota_job *qj = NULL;
    const char *env = bytebuf_head(&s->env), *end = env + bytebuf_used(&s->env);
    const char *p = end;
    for (unsigned k = 0; k < s->last_rcpt_lines && p > env; k++) {
        const char *ls = p - 1;
        while (ls > env && ls[-1] != '\n') ls--;
        const char *a = ls + 2, *ae = a;
        while (ae < p && *ae != '\t' && *ae != '\n') ae++;
        p = ls;
        const char *at = memrchr(a, '@', (size_t)(ae - a));
        char user[320];
        struct store_quota q;
        int ul;
        if (!at || !config_is_local_domain(cfg, at + 1, (size_t)(ae - at - 1)) ||
            (ul = mailbox_of(a, (size_t)(ae - a), user, sizeof user)) < 0)
            continue;
        users_quota(cfg->users, user, (size_t)ul, &q.bytes, &q.messages);
        /* The Maildir store has only the configured quotas; a Python store
         * may have its own (check_quota), so it is asked for everyone. */
        if (!(q.bytes || q.messages) && strcmp(st->ops->name, "maildir") == 0) continue;
        if (!qj && !(qj = calloc(1, sizeof *qj))) return false;
        if (qj->n == QUOTA_CHECK_MAX) break;
        snprintf(qj->user[qj->n], sizeof qj->user[0], "%s", user);
        qj->q[qj->n++] = q;
    }
    if (!qj) return false;
    qj->addr = strndup(addr, alen);
    qj->params = params ? strndup(params, plen) : NULL;
    if (!qj->addr || (params && !qj->params)) {
        free(qj->addr);
        free(qj->params);
        free(qj);
        return false;               /* unchecked: delivery still enforces it */
    }
    qj->alen = alen;
    qj->plen = plen;
    qj->s = s;
    qj->size = s->declared_size;
    qj->job.loop = &s->w->loop;
    qj->job.work = quota_job_work;
    qj->job.msg.fn = quota_job_done;
    qj->job.outstanding = &s->w->eng->offload_jobs;
    s->pending = true;
    s->state = ST_WAIT;
    conn_suspend(&s->conn);
    offload_submit(&qj->job);
    return true;
}

static void cmd_rcpt(struct smtp_session *s, const struct smtp_cmd *c)
{
    struct me_config *cfg = cfg_of(s);
    if (!txn_open(s)) {
        session_reply(s, "503 5.5.1 Error: need MAIL command");
        count_error(s);
        return;
    }
    if (s->nrcpt >= cfg->limits.max_recipients) {
        session_reply(s, "452 4.5.3 Error: too many recipients");
        return;
    }
    unsigned bad = 0;
    for (unsigned i = 0; i < c->nparams; i++) {
        const struct smtp_param *p = &c->params[i];
        bad = i;
        if (smtp_param_is(p, "NOTIFY")) {
            if (!p->val || !notify_ok(p->val, p->val_len)) goto bad_param;
        } else if (smtp_param_is(p, "ORCPT")) {
            if (!p->val || !memchr(p->val, ';', p->val_len)) goto bad_param;
        } else {
            session_reply(s, "555 5.5.4 Unsupported option: %.*s", (int)p->key_len, p->key);
            count_error(s);
            return;
        }
    }
    const char *addr = c->addr;
    size_t alen = c->addr_len;
    char pm[300];
    long at = smtp_addr_at(addr, alen);
    if (at < 0) {
        /* RFC 5321 §4.5.1: <postmaster> without a domain must be accepted. */
        if (alen == 10 && strncasecmp(addr, "postmaster", 10) == 0) {
            const char *dom = cfg->ndomains ? cfg->domains[0] : cfg->hostname;
            snprintf(pm, sizeof pm, "postmaster@%s", dom);
            addr = pm;
            alen = strlen(pm);
            at = 10;
        } else {
            session_reply(s, "501 5.1.3 Bad recipient address syntax");
            count_error(s);
            return;
        }
    }
    if (!(s->txn_flags & TXN_SMTPUTF8) && smtp_addr_is_utf8(addr, alen)) {
        session_reply(s, "553 5.6.7 Non-ASCII address needs SMTPUTF8");
        count_error(s);
        return;
    }
    const char *domain = addr + at + 1;
    size_t dlen = alen - (size_t)at - 1;
    const char *params = c->nparams ? c->params[0].key : NULL;
    size_t plen = params ? (size_t)(c->arg + c->arg_len - params) : 0;
    s->last_rcpt_lines = 0;
    bool aliased = false;
    if (config_is_local_domain(cfg, domain, dlen)) {
        if (cfg->aliases) {
            /* On the worker's stack (some 20 KB): no allocation per RCPT. */
            struct alias_result resbuf, *res = &resbuf;
            int rc = aliases_resolve(cfg->aliases, addr, alen, users_is_mailbox, cfg->users, res);
            if (rc == 1 && cfg->reject_unknown_local && users_count(cfg->users) > 0) {
                /* What an alias leads to in a local domain must be a user
                 * too (or postmaster), else a domain alias or a mistyped
                 * target makes mailboxes nobody can read. */
                for (unsigned i = 0; i < res->n; i++) {
                    const char *t = res->addr[i], *tat = strrchr(t, '@');
                    if (tat && config_is_local_domain(cfg, tat + 1, strlen(tat + 1)) &&
                        !users_is_mailbox(cfg->users, t, strlen(t)) &&
                        !(tat - t == 10 && strncasecmp(t, "postmaster", 10) == 0)) {
                        session_reply(s, "550 5.1.1 <%.*s>: Recipient address rejected: User unknown",
                                      (int)(alen > 256 ? 256 : alen), addr);
                        return;
                    }
                }
            }
            if (rc == 1 && s->nrcpt + res->n > cfg->limits.max_recipients) {
                session_reply(s, "452 4.5.3 Error: too many recipients");
                return;
            }
            if (rc == 1 && rcpt_add_aliased(s, addr, alen, params, plen, res) < 0) {
                rcpt_undo(s);
                rc = -ENOMEM;
            }
            if (rc == -ELOOP || rc == -E2BIG) {
                session_reply(s, "550 5.4.6 <%.*s>: Recipient address rejected: alias %s",
                              (int)(alen > 256 ? 256 : alen), addr,
                              rc == -ELOOP ? "loop" : "expands to too many recipients");
                return;
            }
            if (rc < 0 && rc != -EINVAL) {
                session_reply(s, "451 4.3.0 Error: out of memory");
                return;
            }
            aliased = rc == 1;
        }
        if (!aliased && cfg->reject_unknown_local && users_count(cfg->users) > 0 &&
            !users_is_mailbox(cfg->users, addr, alen) &&
            !(at == 10 && strncasecmp(addr, "postmaster", 10) == 0)) {
            session_reply(s, "550 5.1.1 <%.*s>: Recipient address rejected: User unknown",
                          (int)(alen > 256 ? 256 : alen), addr);
            return;
        }
    } else if (!s->authed && !config_is_trusted(cfg, &s->conn.peer)) {
        session_reply(s, "554 5.7.1 <%.*s>: Relay access denied", (int)(alen > 256 ? 256 : alen),
                      addr);
        return;
    }
    if (!aliased) {
        if (env_add(s, 'R', addr, alen, params, plen) < 0) {
            session_reply(s, "451 4.3.0 Error: out of memory");
            return;
        }
        s->nrcpt++;
        s->last_rcpt_lines = 1;
    }
    if (rcpt_quota_start(s, addr, alen, params, plen)) return;
    rcpt_accepted(s, addr, alen, params, plen);
    return;
bad_param:
    session_reply(s, "501 5.5.4 Bad parameter: %.*s", (int)c->params[bad].key_len, c->params[bad].key);
    count_error(s);
}

/* ---- end of message: checks, data hook, spool ---- */

static void spool_done(struct spool_rec *rec, int err)
{
    struct smtp_session *s = container_of(rec, struct smtp_session, rec);
    s->pending = false;
    if (err == 0) emit_received(s, rec->id);
    if (s->closed) {
        session_free(s);
        return;
    }
    s->state = ST_CMD;
    if (err == 0) session_reply(s, "250 2.0.0 Ok: queued as %s", rec->id);
    else session_reply(s, "451 4.3.0 Error: queue file write error");
    txn_reset(s);
    session_input_resume(s);
}

static const char *received_proto(struct smtp_session *s)
{
    /* RFC 3848 protocol names. */
    bool tls = conn_is_tls(&s->conn), a = s->authed;
    if (s->txn_flags & TXN_SMTPUTF8)
        return tls ? (a ? "UTF8SMTPSA" : "UTF8SMTPS") : (a ? "UTF8SMTPA" : "UTF8SMTP");
    if (!s->esmtp) return "SMTP";
    return tls ? (a ? "ESMTPSA" : "ESMTPS") : (a ? "ESMTPA" : "ESMTP");
}

static int build_received(struct smtp_session *s, const char *id)
{
    struct me_config *cfg = cfg_of(s);
    char ip[64], date[64], tlsinfo[160] = "";
    conn_addr_str(&s->conn.peer, ip, sizeof ip);
    time_t now = time(NULL);
    struct tm tm;
    gmtime_r(&now, &tm);
    strftime(date, sizeof date, "%a, %d %b %Y %H:%M:%S +0000", &tm);
    if (conn_is_tls(&s->conn))
        snprintf(tlsinfo, sizeof tlsinfo, "\r\n\t(using %s with cipher %s)",
                 conn_tls_version(&s->conn), conn_tls_cipher(&s->conn));
    /* "for" only with a single recipient: naming one of several would leak
     * the others' existence (RFC 5321 §7.2). */
    char forpart[300] = "";
    if (s->nrcpt == 1) {
        const char *env = bytebuf_head(&s->env);
        const char *r = memmem(env, bytebuf_used(&s->env), "\nR ", 3);
        if (r) {
            r += 3;
            size_t n = strcspn(r, "\t\n");
            if (n < 256) snprintf(forpart, sizeof forpart, "\r\n\tfor <%.*s>", (int)n, r);
        }
    }
    char hdr[1200];
    int n = snprintf(hdr, sizeof hdr, "Received: from %.200s ([%s])%s\r\n\tby %s (mailengine) with %s id %s%s;\r\n\t%s\r\n",
                     s->helo ? s->helo : "unknown", ip, tlsinfo, cfg->hostname, received_proto(s), id,
                     forpart, date);
    if (n < 0 || (size_t)n >= sizeof hdr) n = (int)strlen(hdr);
    bytebuf_free(&s->rcvd);
    return bytebuf_append(&s->rcvd, hdr, (size_t)n);
}

/* The message is complete: give it its queue id and finish the envelope
 * (the data hook sees it as it will be spooled). */
static int envelope_finish(struct smtp_session *s)
{
    struct spool_rec *rec = &s->rec;
    memset(rec, 0, sizeof *rec);
    spool_assign_id(s->w->spool, rec);
    char *env = bytebuf_head(&s->env);
    memcpy(env + 2, rec->id, SPOOL_ID_LEN);
    char ip[64], line[128];
    conn_addr_str(&s->conn.peer, ip, sizeof ip);
    int n = snprintf(line, sizeof line, "%u", s->conn.peer.port);
    if (env_add(s, 'C', ip, strlen(ip), line, (size_t)n) < 0 ||
        (s->helo && env_add(s, 'H', s->helo, strlen(s->helo), NULL, 0) < 0) ||
        (s->auth_user && env_add(s, 'A', s->auth_user, strlen(s->auth_user), NULL, 0) < 0) ||
        env_add(s, 'L', s->lc->name, strlen(s->lc->name), NULL, 0) < 0 ||
        env_add(s, 'P', received_proto(s), strlen(received_proto(s)), NULL, 0) < 0 ||
        build_received(s, rec->id) < 0)
        return -1;
    return 0;
}

static void spool_message(struct smtp_session *s)
{
    struct spool_rec *rec = &s->rec;
    rec->iov[1].iov_base = bytebuf_head(&s->env);
    rec->iov[1].iov_len = bytebuf_used(&s->env);
    rec->iov[2].iov_base = bytebuf_head(&s->rcvd);
    rec->iov[2].iov_len = bytebuf_used(&s->rcvd);
    rec->iov[3].iov_base = bytebuf_head(&s->msg);
    rec->iov[3].iov_len = bytebuf_used(&s->msg);
    rec->niov = 4;
    rec->done = spool_done;
    s->pending = true;
    s->state = ST_WAIT;
    conn_suspend(&s->conn);
    spool_append(s->w->spool, rec);
}

static void after_data(struct smtp_session *s, struct hook_req *r)
{
    if (hook_refused(s, r)) {
        txn_reset(s);
        return;
    }
    spool_message(s);
}

static void message_complete(struct smtp_session *s, uint32_t scan_flags)
{
    if (s->txn_flags & TXN_NOMEM) {
        session_reply(s, "451 4.3.0 Error: insufficient system resources");
        txn_reset(s);
        return;
    }
    if (s->txn_flags & TXN_TOO_BIG) {
        session_reply(s, "552 5.3.4 Error: message size exceeds fixed limit");
        txn_reset(s);
        return;
    }
    if (scan_flags & (SMTP_DATA_BARE_LF | SMTP_DATA_BARE_CR)) {
        /* RFC 5321 §2.3.8: CR and LF only as CRLF (SMTP smuggling). */
        session_reply(s, "550 5.6.0 Error: message contains bare %s (see RFC 5321 section 2.3.8)",
                      scan_flags & SMTP_DATA_BARE_LF ? "<LF>" : "<CR>");
        txn_reset(s);
        return;
    }
    if (scan_flags & SMTP_DATA_LONG_LINE) {
        session_reply(s, "552 5.3.4 Error: message line longer than %zu octets",
                      cfg_of(s)->limits.max_text_line);
        txn_reset(s);
        return;
    }
    if (envelope_finish(s) < 0) {
        session_reply(s, "451 4.3.0 Error: out of memory");
        txn_reset(s);
        return;
    }
    if (hook_wanted(s, HOOK_DATA)) {
        const char *env = bytebuf_head(&s->env);
        if (hook_call(s, HOOK_DATA, env, bytebuf_used(&s->env), NULL, 0, NULL, 0, after_data) < 0) {
            session_reply(s, "451 4.3.0 Error: out of memory");
            txn_reset(s);
        }
        return;
    }
    spool_message(s);
}

static void cmd_data(struct smtp_session *s, const struct smtp_cmd *c)
{
    (void)c;
    if (!txn_open(s)) {
        session_reply(s, "503 5.5.1 Error: need MAIL command");
        count_error(s);
        return;
    }
    if (s->nrcpt == 0) {
        session_reply(s, "554 5.5.1 Error: no valid recipients");
        count_error(s);
        return;
    }
    if (s->txn_flags & TXN_BDAT) {
        session_reply(s, "503 5.5.1 Error: DATA after BDAT");
        count_error(s);
        return;
    }
    smtp_data_init(&s->scan, cfg_of(s)->limits.max_text_line);
    s->state = ST_DATA;
    arm_timeout(s, cfg_of(s)->limits.data_timeout_ms);
    session_reply(s, "354 End data with <CR><LF>.<CR><LF>");
}

static size_t data_input(struct smtp_session *s, const char *p, size_t n)
{
    struct me_config *cfg = cfg_of(s);
    static __thread char discard[16384];
    size_t used = 0;
    int done = 0;
    while (used < n && !done) {
        size_t chunk = n - used, out_n = 0;
        char *out;
        if (!(s->txn_flags & TXN_TOO_BIG)) {
            if (bytebuf_reserve(&s->msg, chunk) < 0) {
                s->txn_flags |= TXN_TOO_BIG | TXN_NOMEM;
                bytebuf_free(&s->msg);
                continue;
            }
            out = s->msg.data + s->msg.len;
        } else {
            if (chunk > sizeof discard) chunk = sizeof discard;
            out = discard;
        }
        size_t k = smtp_data_scan(&s->scan, p + used, chunk, out, &out_n, &done);
        used += k;
        if (!(s->txn_flags & TXN_TOO_BIG)) {
            s->msg.len += out_n;
            if (bytebuf_used(&s->msg) > cfg->limits.max_message_size) {
                s->txn_flags |= TXN_TOO_BIG;
                bytebuf_free(&s->msg);
            }
        }
    }
    if (done) {
        s->state = ST_CMD;
        arm_timeout(s, cfg->limits.command_timeout_ms);
        message_complete(s, s->scan.flags);
    } else {
        arm_timeout(s, cfg->limits.data_timeout_ms);
    }
    return used;
}

static void bdat_chunk_end(struct smtp_session *s);

static void cmd_bdat(struct smtp_session *s, const struct smtp_cmd *c)
{
    /* RFC 3030: BDAT size [LAST]. The chunk is always consumed, even when
     * it will be refused, or the stream would lose its framing. */
    const char *a = c->arg, *end = c->arg + c->arg_len;
    unsigned long long size = 0;
    const char *q = a;
    while (q < end && *q >= '0' && *q <= '9' && q - a < 19) size = size * 10 + (unsigned)(*q++ - '0');
    bool last = false;
    bool ok = q > a;
    if (ok && q < end) {
        while (q < end && *q == ' ') q++;
        if (end - q == 4 && strncasecmp(q, "LAST", 4) == 0) last = true;
        else ok = false;
    }
    if (!ok) {
        /* Without a valid size the stream cannot be framed: close. */
        session_reply(s, "501 5.5.4 Syntax: BDAT size [LAST]");
        conn_close(&s->conn);
        return;
    }
    s->bdat_left = (size_t)size;
    s->bdat_last = last;
    if (!txn_open(s) || s->nrcpt == 0) s->txn_flags |= TXN_FAILED;
    s->txn_flags |= TXN_BDAT;
    s->state = ST_BDAT;
    arm_timeout(s, cfg_of(s)->limits.data_timeout_ms);
    if (size == 0) bdat_chunk_end(s);   /* no bytes will come to finish it */
}

static void bdat_chunk_end(struct smtp_session *s)
{
    s->state = ST_CMD;
    arm_timeout(s, cfg_of(s)->limits.command_timeout_ms);
    if (s->txn_flags & TXN_FAILED) {
        if (!txn_open(s)) session_reply(s, "503 5.5.1 Error: need MAIL command");
        else if (s->nrcpt == 0) session_reply(s, "554 5.5.1 Error: no valid recipients");
        else session_reply(s, "554 5.5.0 Error: transaction failed");
        count_error(s);
        if (s->bdat_last) txn_reset(s);
        return;
    }
    if (s->txn_flags & TXN_TOO_BIG) {
        if (s->txn_flags & TXN_NOMEM) session_reply(s, "451 4.3.0 Error: insufficient system resources");
        else session_reply(s, "552 5.3.4 Error: message size exceeds fixed limit");
        /* The rest of this transaction's chunks are consumed and refused. */
        s->txn_flags |= TXN_FAILED;
        if (s->bdat_last) txn_reset(s);
        return;
    }
    if (!s->bdat_last) {
        session_reply(s, "250 2.0.0 Ok: %zu octets", bytebuf_used(&s->msg));
        return;
    }
    message_complete(s, 0);
}

static size_t bdat_input(struct smtp_session *s, const char *p, size_t n)
{
    size_t k = n < s->bdat_left ? n : s->bdat_left;
    if (!(s->txn_flags & (TXN_TOO_BIG | TXN_FAILED))) {
        if (bytebuf_used(&s->msg) + k > cfg_of(s)->limits.max_message_size) {
            s->txn_flags |= TXN_TOO_BIG;
            bytebuf_free(&s->msg);
        } else if (bytebuf_append(&s->msg, p, k) < 0) {
            s->txn_flags |= TXN_TOO_BIG | TXN_NOMEM;
            bytebuf_free(&s->msg);
        }
    }
    s->bdat_left -= k;
    if (s->bdat_left == 0) bdat_chunk_end(s);
    else arm_timeout(s, cfg_of(s)->limits.data_timeout_ms);
    return k;
}

/* ---- AUTH (RFC 4954) ---- */

struct auth_job {
    struct offload_job job;
    struct smtp_session *s;
    const char *hash;
    char *password;
    int ok;
};

static void auth_finish(struct smtp_session *s, const char *user, size_t ulen, bool ok);

static void auth_job_work(struct offload_job *j)
{
    struct auth_job *a = (struct auth_job *)j;
    a->ok = users_verify_password(a->hash, a->password) == 1;
}

static void auth_job_done(struct loop *l, struct loop_msg *m)
{
    (void)l;
    struct auth_job *a = (struct auth_job *)m;
    struct smtp_session *s = a->s;
    s->pending = false;
    explicit_bzero(a->password, strlen(a->password));
    free(a->password);
    if (s->closed || s->w->loop.dead || conn_closing(&s->conn)) {
        bool closed = s->closed;
        free(a);
        if (closed) session_free(s);
        return;
    }
    if (s->closed) {
        free(a);
        session_free(s);
        return;
    }
    s->state = ST_CMD;
    auth_finish(s, s->auth_login_user, strlen(s->auth_login_user), a->ok);
    free(a);
}

static void auth_builtin(struct smtp_session *s, const char *user, size_t ulen, const char *pass,
                         size_t plen);

/* The auth hook decides: AUTHENTICATED (True) logs in, ACCEPT (None or
 * Accept()) leaves it to the user table, REJECT/TEMPFAIL answer as told. */
static void after_auth_hook(struct smtp_session *s, struct hook_req *r)
{
    const char *user = r->args[HARG_2];
    size_t ulen = r->arg_lens[HARG_2];
    switch (r->action) {
    case HOOK_AUTHENTICATED:
        auth_finish(s, user, ulen, true);
        break;
    case HOOK_ACCEPT:
        auth_builtin(s, user, ulen, r->args[HARG_3], r->arg_lens[HARG_3]);
        break;
    case HOOK_REJECT:
        if (r->code == 0 || r->code == 535) {
            auth_finish(s, user, ulen, false);
            break;
        }
        s->auth_failures++;
        hook_refused(s, r);
        if (s->auth_failures >= cfg_of(s)->limits.max_auth_failures)
            session_close_421(s, "4.7.0", "Error: too many authentication failures");
        break;
    default:
        hook_refused(s, r);
    }
    explicit_bzero((char *)r->args[HARG_3], r->arg_lens[HARG_3]);
}

static void auth_delay_fire(struct smtp_session *s);

static void auth_finish(struct smtp_session *s, const char *user, size_t ulen, bool ok)
{
    struct me_config *cfg = cfg_of(s);
    if (ok) {
        s->authed = true;
        free(s->auth_user);
        s->auth_user = strndup(user, ulen);
        free(s->auth_login_user);
        s->auth_login_user = NULL;
        session_reply(s, "235 2.7.0 Authentication successful");
        session_input_resume(s);
        return;
    }
    free(s->auth_login_user);
    s->auth_login_user = NULL;
    s->auth_failures++;
    log_info("smtp", "authentication failed (%u)", s->auth_failures);
    /* Slow down guessing: each failure waits longer before its answer. */
    s->delayed_reply = s->auth_failures >= cfg->limits.max_auth_failures ? DELAYED_421 : DELAYED_535;
    uint64_t delay = cfg->limits.auth_fail_delay_ms * s->auth_failures;
    if (delay == 0) {
        auth_delay_fire(s);
        return;
    }
    s->state = ST_WAIT;
    conn_suspend(&s->conn);
    conn_set_timeout(&s->conn, delay);
}

static void auth_delay_fire(struct smtp_session *s)
{
    uint8_t which = s->delayed_reply;
    s->delayed_reply = 0;
    s->state = ST_CMD;
    if (which == DELAYED_421) {
        session_close_421(s, "4.7.0", "Error: too many authentication failures");
        return;
    }
    session_reply(s, "535 5.7.8 Error: authentication failed");
    arm_timeout(s, cfg_of(s)->limits.command_timeout_ms);
    session_input_resume(s);
}

static void auth_check(struct smtp_session *s, const char *mech, const char *user, size_t ulen,
                       const char *pass, size_t plen)
{
    free(s->auth_login_user);
    s->auth_login_user = NULL;
    if (hook_wanted(s, HOOK_AUTH)) {
        if (hook_call(s, HOOK_AUTH, mech, strlen(mech), user, ulen, pass, plen, after_auth_hook) < 0)
            session_reply(s, "454 4.7.0 Temporary authentication failure");
        return;
    }
    auth_builtin(s, user, ulen, pass, plen);
}

/* Check against the user table on the offload thread: the hash is slow
 * on purpose and must not stall the worker. */
static void auth_builtin(struct smtp_session *s, const char *user, size_t ulen, const char *pass,
                         size_t plen)
{
    struct me_config *cfg = cfg_of(s);
    free(s->auth_login_user);
    s->auth_login_user = strndup(user, ulen);
    if (!s->auth_login_user) {
        session_reply(s, "454 4.7.0 Temporary authentication failure");
        return;
    }
    const char *hash = users_find(cfg->users, user, ulen);
    if (!hash) {
        auth_finish(s, user, ulen, false);
        return;
    }
    struct auth_job *a = calloc(1, sizeof *a);
    if (!a || !(a->password = strndup(pass, plen))) {
        free(a);
        session_reply(s, "454 4.7.0 Temporary authentication failure");
        return;
    }
    a->s = s;
    a->hash = hash;
    a->job.loop = &s->w->loop;
    a->job.work = auth_job_work;
    a->job.msg.fn = auth_job_done;
    a->job.outstanding = &s->w->eng->offload_jobs;
    s->pending = true;
    s->state = ST_WAIT;
    conn_suspend(&s->conn);
    offload_submit(&a->job);
}

/* SASL PLAIN (RFC 4616): authzid NUL authcid NUL passwd. */
static void auth_plain_response(struct smtp_session *s, const char *b64, size_t len)
{
    char buf[SMTP_AUTH_LINE_MAX];
    long n = len == 1 && b64[0] == '=' ? 0 : b64_decode(b64, len, buf, sizeof buf);
    if (n < 0) {
        session_reply(s, "501 5.5.2 Error: cannot decode response");
        count_error(s);
        return;
    }
    char *z = buf, *end = buf + n;
    char *u = memchr(z, 0, (size_t)(end - z));
    char *p = u ? memchr(u + 1, 0, (size_t)(end - u - 1)) : NULL;
    if (!u || !p) {
        session_reply(s, "535 5.7.8 Error: authentication failed: malformed PLAIN response");
        count_error(s);
        return;
    }
    u++;
    p++;
    /* The authorization identity (z) is not used: we act only as the
     * authenticated user. */
    auth_check(s, "PLAIN", u, (size_t)(p - 1 - u), p, (size_t)(end - p));
    explicit_bzero(buf, sizeof buf);
}

static void auth_line(struct smtp_session *s, const char *line, size_t len)
{
    enum auth_step step = s->auth_step;
    s->auth_step = AUTH_NONE;
    s->state = ST_CMD;
    if (len == 1 && line[0] == '*') {
        session_reply(s, "501 5.7.0 Error: authentication aborted");
        free(s->auth_login_user);
        s->auth_login_user = NULL;
        return;
    }
    if (step == AUTH_PLAIN_WAIT) {
        auth_plain_response(s, line, len);
        return;
    }
    char buf[SMTP_AUTH_LINE_MAX];
    long n = b64_decode(line, len, buf, sizeof buf);
    if (n < 0) {
        session_reply(s, "501 5.5.2 Error: cannot decode response");
        count_error(s);
        return;
    }
    if (step == AUTH_LOGIN_USER) {
        free(s->auth_login_user);
        s->auth_login_user = strndup(buf, (size_t)n);
        s->auth_step = AUTH_LOGIN_PASS;
        s->state = ST_AUTH;
        session_reply(s, "334 UGFzc3dvcmQ6");
        return;
    }
    char *user = s->auth_login_user;
    s->auth_login_user = NULL;
    if (!user) {
        session_reply(s, "454 4.7.0 Temporary authentication failure");
        return;
    }
    auth_check(s, "LOGIN", user, strlen(user), buf, (size_t)n);
    free(user);
    explicit_bzero(buf, sizeof buf);
}

static void cmd_auth(struct smtp_session *s, const struct smtp_cmd *c)
{
    struct me_config *cfg = cfg_of(s);
    if (!auth_offered(s)) {
        session_reply(s, "503 5.5.1 Error: authentication not enabled");
        count_error(s);
        return;
    }
    if (!s->helo) {
        session_reply(s, "503 5.5.1 Error: send HELO/EHLO first");
        count_error(s);
        return;
    }
    if (s->authed) {
        session_reply(s, "503 5.5.1 Error: already authenticated");
        count_error(s);
        return;
    }
    if (txn_open(s)) {
        session_reply(s, "503 5.5.1 Error: MAIL transaction in progress");
        count_error(s);
        return;
    }
    if (!conn_is_tls(&s->conn) && !cfg->allow_plain_auth) {
        session_reply(s, "538 5.7.11 Encryption required for requested authentication mechanism");
        count_error(s);
        return;
    }
    const char *a = c->arg, *end = c->arg + c->arg_len;
    const char *sp = memchr(a, ' ', c->arg_len);
    size_t mlen = sp ? (size_t)(sp - a) : c->arg_len;
    const char *ir = sp ? sp + 1 : NULL;
    size_t irlen = ir ? (size_t)(end - ir) : 0;
    if (mlen == 5 && strncasecmp(a, "PLAIN", 5) == 0) {
        if (ir) {
            auth_plain_response(s, ir, irlen);
        } else {
            s->auth_step = AUTH_PLAIN_WAIT;
            s->state = ST_AUTH;
            session_reply(s, "334 ");
        }
    } else if (mlen == 5 && strncasecmp(a, "LOGIN", 5) == 0) {
        if (ir) {
            char buf[SMTP_AUTH_LINE_MAX];
            long n = b64_decode(ir, irlen, buf, sizeof buf);
            if (n < 0) {
                session_reply(s, "501 5.5.2 Error: cannot decode response");
                count_error(s);
                return;
            }
            free(s->auth_login_user);
            s->auth_login_user = strndup(buf, (size_t)n);
            s->auth_step = AUTH_LOGIN_PASS;
            session_reply(s, "334 UGFzc3dvcmQ6");
        } else {
            s->auth_step = AUTH_LOGIN_USER;
            session_reply(s, "334 VXNlcm5hbWU6");
        }
        s->state = ST_AUTH;
    } else {
        session_reply(s, "504 5.5.4 Error: unsupported authentication mechanism");
        count_error(s);
    }
}

/* ---- STARTTLS (RFC 3207) ---- */

static void cmd_starttls(struct smtp_session *s)
{
    struct me_config *cfg = cfg_of(s);
    if (!cfg->tls) {
        session_reply(s, "502 5.5.1 Error: command not implemented");
        count_error(s);
        return;
    }
    if (s->conn.tls) {
        session_reply(s, "554 5.5.1 Error: TLS already active");
        count_error(s);
        return;
    }
    session_reply(s, "220 2.0.0 Ready to start TLS");
    if (conn_start_tls(&s->conn, cfg->tls) < 0) {
        session_close_421(s, "4.7.0", "Error: TLS not available");
        return;
    }
    /* RFC 3207 §4.2: forget everything learnt before the handshake,
     * including a login (plaintext could have been injected). */
    txn_reset(s);
    free(s->helo);
    s->helo = NULL;
    s->esmtp = false;
    s->authed = false;
    free(s->auth_user);
    s->auth_user = NULL;
    free(s->auth_login_user);
    s->auth_login_user = NULL;
    s->auth_step = AUTH_NONE;
    s->state = ST_TLS;
}

/* ---- command dispatch ---- */

static void handle_command(struct smtp_session *s, const char *line, size_t len)
{
    struct me_config *cfg = cfg_of(s);
    struct smtp_cmd c;
    arm_timeout(s, cfg->limits.command_timeout_ms);
    enum smtp_parse_status st = smtp_parse_command(line, len, &c);
    if (s->refused) {
        if (st == SMTP_PARSE_OK && c.verb == SMTP_VERB_QUIT) {
            session_reply(s, "221 2.0.0 Bye");
            conn_close(&s->conn);
        } else {
            session_reply(s, "503 5.5.1 Error: no service here, only QUIT");
            count_error(s);
        }
        return;
    }
    if (st == SMTP_PARSE_UNKNOWN) {
        session_reply(s, "500 5.5.2 Error: command not recognized");
        count_error(s);
        return;
    }
    if (st != SMTP_PARSE_OK) {
        switch (c.verb) {
        case SMTP_VERB_MAIL:
            session_reply(s, st == SMTP_PARSE_BAD_ADDR ? "501 5.1.7 Bad sender address syntax"
                                                       : "501 5.5.4 Syntax: MAIL FROM:<address>");
            break;
        case SMTP_VERB_RCPT:
            session_reply(s, st == SMTP_PARSE_BAD_ADDR ? "501 5.1.3 Bad recipient address syntax"
                                                       : "501 5.5.4 Syntax: RCPT TO:<address>");
            break;
        case SMTP_VERB_HELO:
        case SMTP_VERB_EHLO:
            session_reply(s, "501 5.5.4 Syntax: %s hostname", c.verb == SMTP_VERB_HELO ? "HELO" : "EHLO");
            break;
        default:
            session_reply(s, "501 5.5.4 Syntax error in parameters or arguments");
        }
        count_error(s);
        return;
    }
    switch (c.verb) {
    case SMTP_VERB_HELO: cmd_helo(s, &c, false); break;
    case SMTP_VERB_EHLO: cmd_helo(s, &c, true); break;
    case SMTP_VERB_MAIL: cmd_mail(s, &c); break;
    case SMTP_VERB_RCPT: cmd_rcpt(s, &c); break;
    case SMTP_VERB_DATA: cmd_data(s, &c); break;
    case SMTP_VERB_BDAT: cmd_bdat(s, &c); break;
    case SMTP_VERB_RSET:
        txn_reset(s);
        session_reply(s, "250 2.0.0 Ok");
        break;
    case SMTP_VERB_NOOP: session_reply(s, "250 2.0.0 Ok"); break;
    case SMTP_VERB_QUIT:
        session_reply(s, "221 2.0.0 Bye");
        s->quitting = true;
        conn_close(&s->conn);
        break;
    case SMTP_VERB_VRFY:
        session_reply(s, "252 2.0.0 Cannot VRFY user, but will accept message and attempt delivery");
        break;
    case SMTP_VERB_EXPN:
        session_reply(s, "502 5.5.1 Error: command not implemented");
        break;
    case SMTP_VERB_HELP:
        session_reply(s, "214 2.0.0 Commands: HELO EHLO MAIL RCPT DATA BDAT RSET NOOP QUIT VRFY HELP STARTTLS AUTH");
        break;
    case SMTP_VERB_STARTTLS: cmd_starttls(s); break;
    case SMTP_VERB_AUTH: cmd_auth(s, &c); break;
    default:
        session_reply(s, "500 5.5.2 Error: command not recognized");
        count_error(s);
    }
}

static size_t smtp_on_data(struct conn *c, const char *p, size_t n)
{
    struct smtp_session *s = (struct smtp_session *)c;
    struct me_config *cfg = cfg_of(s);
    size_t used = 0;
    while (used < n && !conn_closing(c)) {
        if (s->state == ST_DATA) {
            used += data_input(s, p + used, n - used);
            continue;
        }
        if (s->state == ST_BDAT) {
            used += bdat_input(s, p + used, n - used);
            continue;
        }
        if (s->state == ST_WAIT || s->state == ST_TLS) {
            /* Input during a handshake is the peer's TLS bytes, never ours;
             * pipelined input while waiting is kept by conn. */
            if (s->state == ST_TLS) return n;
            break;
        }
        if (s->discarding) {
            const char *lf = memchr(p + used, '\n', n - used);
            if (!lf) return n;
            used = (size_t)(lf - p) + 1;
            s->discarding = false;
            if (s->state == ST_AUTH) {
                /* RFC 4954 §4: an over-long response ends the exchange. */
                s->state = ST_CMD;
                s->auth_step = AUTH_NONE;
                free(s->auth_login_user);
                s->auth_login_user = NULL;
                session_reply(s, "500 5.5.6 Error: authentication exchange line is too long");
                count_error(s);
                continue;
            }
            session_reply(s, "500 5.5.2 Error: line too long");
            count_error(s);
            continue;
        }
        size_t max = s->state == ST_AUTH ? SMTP_AUTH_LINE_MAX : cfg->limits.max_command_line;
        size_t line_len, consumed;
        enum smtp_line_result r = smtp_line_find(p + used, n - used, max, &line_len, &consumed);
        if (r == SMTP_LINE_NEED_MORE) break;
        const char *line = p + used;
        used += consumed;
        if (r == SMTP_LINE_TOO_LONG) {
            s->discarding = true;
            continue;
        }
        if (r == SMTP_LINE_BARE_LF || r == SMTP_LINE_BARE_CR) {
            session_reply(s, "500 5.5.2 Error: bare %s received in command",
                          r == SMTP_LINE_BARE_LF ? "<LF>" : "<CR>");
            if (s->state == ST_AUTH) {
                s->state = ST_CMD;
                s->auth_step = AUTH_NONE;
            }
            count_error(s);
            continue;
        }
        if (s->state == ST_AUTH) auth_line(s, line, line_len);
        else handle_command(s, line, line_len);
        if (s->conn.flags & CONN_SUSPENDED) break;
        if (s->state == ST_TLS) return n;   /* anything pipelined after STARTTLS is void */
    }
    return used;
}

static void session_input_resume(struct smtp_session *s)
{
    conn_resume(&s->conn);
}

static void smtp_on_tls(struct conn *c, int ok)
{
    struct smtp_session *s = (struct smtp_session *)c;
    if (!ok) return;
    arm_timeout(s, cfg_of(s)->limits.command_timeout_ms);
    if (s->state == ST_TLS) {
        s->state = ST_CMD;
    } else if (s->lc->kind == LISTENER_SMTPS) {
        /* Implicit TLS: the session starts now, connect hook included. */
        if (hook_wanted(s, HOOK_CONNECT)) {
            if (hook_call(s, HOOK_CONNECT, NULL, 0, NULL, 0, NULL, 0, after_connect) < 0)
                session_close_421(s, "4.3.0", "Error: out of memory");
            return;
        }
        send_greeting(s);
    }
}

static void smtp_on_timeout(struct conn *c)
{
    struct smtp_session *s = (struct smtp_session *)c;
    if (s->state == ST_WAIT && !s->pending && s->delayed_reply) {
        /* The auth-failure delay ended. */
        auth_delay_fire(s);
        return;
    }
    if (s->state == ST_WAIT && s->pending) {
        /* Waiting on our own side (hook, spool): not the client's fault.
         * Look again in a second (not clamped to the session deadline,
         * which may have passed while we waited). */
        conn_set_timeout(&s->conn, 1000);
        return;
    }
    session_close_421(s, "4.4.2", "Error: timeout exceeded");
}

static void session_unlink(struct smtp_session *s)
{
    s->link.prev->next = s->link.next;
    s->link.next->prev = s->link.prev;
    s->link.next = s->link.prev = &s->link;
}

static void session_free(struct smtp_session *s)
{
    txn_reset(s);
    free(s->helo);
    free(s->auth_user);
    free(s->auth_login_user);
    free(s);
}

static void smtp_on_close(struct conn *c)
{
    struct smtp_session *s = (struct smtp_session *)c;
    struct engine *e = s->w->eng;
    timer_cancel(&c->loop->timers, &c->timer);
    session_unlink(s);
    s->w->nsessions--;
    atomic_fetch_sub(&e->conns_total, 1);
    if (s->counted_ip) atomic_fetch_sub(&e->conns_per_ip[engine_ip_slot(&c->peer)], 1);
    s->closed = true;
    if (!s->pending) session_free(s);
}

static const struct conn_proto smtp_proto = {
    .on_data = smtp_on_data,
    .on_tls = smtp_on_tls,
    .on_timeout = smtp_on_timeout,
    .on_close = smtp_on_close,
};

void smtp_session_start(struct worker *w, struct listener_cfg *lc, int fd)
{
    struct engine *e = w->eng;
    struct me_config *cfg = e->cfg;
    struct smtp_session *s = calloc(1, sizeof *s);
    if (!s) {
        close(fd);
        return;
    }
    static __thread uint32_t serial;
    s->w = w;
    s->lc = lc;
    s->serial = ++serial;
    bool implicit = lc->kind == LISTENER_SMTPS;
    conn_init(&s->conn, &w->loop, fd, &smtp_proto, implicit ? cfg->tls : NULL);
    s->link.drain = smtp_drain_one;
    s->link.next = w->sessions.next;
    s->link.prev = &w->sessions;
    w->sessions.next->prev = &s->link;
    w->sessions.next = &s->link;
    w->nsessions++;
    if (cfg->limits.session_timeout_ms)
        s->session_deadline = timer_now_ms() + cfg->limits.session_timeout_ms;
    arm_timeout(s, cfg->limits.command_timeout_ms);

    unsigned total = atomic_fetch_add(&e->conns_total, 1) + 1;
    if (w->draining) {
        session_close_421(s, "4.3.2", "Service shutting down");
        return;
    }
    if (cfg->limits.max_connections && total > cfg->limits.max_connections) {
        session_close_421(s, "4.7.0", "Error: too many connections");
        return;
    }
    if (!config_is_trusted(cfg, &s->conn.peer)) {
        unsigned slot = engine_ip_slot(&s->conn.peer);
        unsigned per = atomic_fetch_add(&e->conns_per_ip[slot], 1) + 1u;
        s->counted_ip = true;
        if (cfg->limits.max_connections_per_ip && per > cfg->limits.max_connections_per_ip) {
            session_close_421(s, "4.7.0", "Error: too many connections from your address");
            return;
        }
    }
    if (implicit) return;   /* greeting after the handshake */
    if (hook_wanted(s, HOOK_CONNECT)) {
        if (hook_call(s, HOOK_CONNECT, NULL, 0, NULL, 0, NULL, 0, after_connect) < 0)
            session_close_421(s, "4.3.0", "Error: out of memory");
        return;
    }
    send_greeting(s);
}

static void smtp_drain_one(struct session_link *l, bool force)
{
    struct smtp_session *s = container_of(l, struct smtp_session, link);
    bool busy = s->state == ST_DATA || s->state == ST_BDAT || s->pending;
    if (!conn_closing(&s->conn) && (force || !busy)) session_close_421(s, "4.3.2", "Service shutting down");
}
