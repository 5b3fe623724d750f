/* The SMTP client session (see client.h): a state machine driven by the
 * replies the reply reader (smtp/reply.c) assembles. With PIPELINING
 * (RFC 2920) MAIL, every RCPT and DATA leave in one write and the replies
 * are matched in order; without it each command waits for its reply. */
#include "smtp/client.h"

#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>

#include "core/log.h"
#include "core/timer.h"
#include "tls/tls.h"

#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))

enum {
    C_CONNECTING = 0, C_GREETING, C_EHLO, C_HELO, C_STARTTLS, C_TLS, C_AUTH,
    C_AUTH_LOGIN_USER, C_AUTH_LOGIN_PASS, C_READY, C_RSET, C_MAIL, C_RCPT, C_DATA,
    C_BODY, C_QUIT, C_DEAD,
};

static const char *const state_cmd[] = {
    [C_CONNECTING] = "connect", [C_GREETING] = "greeting", [C_EHLO] = "EHLO",
    [C_HELO] = "HELO", [C_STARTTLS] = "STARTTLS", [C_TLS] = "the TLS handshake",
    [C_AUTH] = "AUTH", [C_AUTH_LOGIN_USER] = "AUTH", [C_AUTH_LOGIN_PASS] = "AUTH",
    [C_READY] = "idle", [C_RSET] = "RSET", [C_MAIL] = "MAIL FROM", [C_RCPT] = "RCPT TO",
    [C_DATA] = "DATA", [C_BODY] = "end of data", [C_QUIT] = "QUIT", [C_DEAD] = "close",
};

static const uint8_t state_stage[] = {
    [C_CONNECTING] = STAGE_CONNECT, [C_GREETING] = STAGE_GREETING, [C_EHLO] = STAGE_EHLO,
    [C_HELO] = STAGE_EHLO, [C_STARTTLS] = STAGE_STARTTLS, [C_TLS] = STAGE_TLS,
    [C_AUTH] = STAGE_AUTH, [C_AUTH_LOGIN_USER] = STAGE_AUTH, [C_AUTH_LOGIN_PASS] = STAGE_AUTH,
    [C_READY] = STAGE_CONNECT, [C_RSET] = STAGE_MAIL, [C_MAIL] = STAGE_MAIL,
    [C_RCPT] = STAGE_RCPT, [C_DATA] = STAGE_DATA, [C_BODY] = STAGE_BODY,
    [C_QUIT] = STAGE_BODY, [C_DEAD] = STAGE_CONNECT,
};

static void client_fail(struct smtp_client *c, const struct smtp_outcome *why);
static void txn_finish(struct smtp_client *c);

static struct smtp_client *of_conn(struct conn *cn) { return container_of(cn, struct smtp_client, conn); }

static void outcome_local(struct smtp_outcome *o, int stage, int temp, unsigned code,
                          const char *enh, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
static void outcome_local(struct smtp_outcome *o, int stage, int temp, unsigned code,
                          const char *enh, const char *fmt, ...)
{
    memset(o, 0, sizeof *o);
    o->code = code;
    o->stage = (uint8_t)stage;
    o->temp = temp ? 1 : 0;
    snprintf(o->enh, sizeof o->enh, "%s", enh);
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(o->text, sizeof o->text, fmt, ap);
    va_end(ap);
}

static void outcome_reply(struct smtp_outcome *o, const struct smtp_reply *r, int stage)
{
    memset(o, 0, sizeof *o);
    o->code = r->code;
    o->stage = (uint8_t)stage;
    /* Anything but a 5xx leaves the door open: 4xx by definition, and an
     * unexpected 2xx/3xx where a refusal was due is a broken server. */
    o->temp = r->code < 500 || r->code > 599;
    if (r->enhanced.cls)
        snprintf(o->enh, sizeof o->enh, "%u.%u.%u", r->enhanced.cls, r->enhanced.subject,
                 r->enhanced.detail);
    /* The enhanced code is kept apart; the text is what follows it. */
    const char *txt = r->text;
    size_t tl = r->text_len, el = strlen(o->enh);
    if (el && tl > el && memcmp(txt, o->enh, el) == 0 && txt[el] == ' ') {
        txt += el + 1;
        tl -= el + 1;
    }
    size_t n = tl < sizeof o->text - 1 ? tl : sizeof o->text - 1;
    for (size_t i = 0; i < n; i++) {
        unsigned char ch = (unsigned char)txt[i];
        /* Replies end up in logs, events and bounces: no control bytes. */
        o->text[i] = (ch < 0x20 && ch != '\n' && ch != '\t') || ch == 0x7f ? '?' : (char)ch;
    }
    o->text[n] = 0;
}

static void expect_reply(struct smtp_client *c)
{
    conn_set_timeout(&c->conn, c->cfg->reply_timeout_ms ? c->cfg->reply_timeout_ms : 300000);
}

static void send_ehlo(struct smtp_client *c)
{
    memset(&c->caps, 0, sizeof c->caps);
    conn_printf(&c->conn, "EHLO %s\r\n", c->cfg->helo);
    c->state = C_EHLO;
    expect_reply(c);
}

static void go_ready(struct smtp_client *c)
{
    c->state = C_READY;
    conn_set_timeout(&c->conn, 0);
    c->ops->ready(c);
}

static void b64(const char *in, size_t n, char *out)
{
    EVP_EncodeBlock((unsigned char *)out, (const unsigned char *)in, (int)n);
}

static void auth_or_ready(struct smtp_client *c)
{
    const struct smtp_client_cfg *cfg = c->cfg;
    if (cfg->tls == CLIENT_TLS_REQUIRED && !conn_is_tls(&c->conn)) {
        struct smtp_outcome o;
        outcome_local(&o, STAGE_STARTTLS, 1, 0, "4.7.4",
                      "TLS is required, but %s did not offer STARTTLS", c->host);
        client_fail(c, &o);
        return;
    }
    if (!cfg->auth_user) {
        go_ready(c);
        return;
    }
    struct smtp_outcome o;
    if (!(c->caps.ext & SMTP_EXT_AUTH) || !(c->caps.auth & (SMTP_AUTH_PLAIN | SMTP_AUTH_LOGIN))) {
        outcome_local(&o, STAGE_AUTH, 1, 0, "4.7.0",
                      "%s offers no AUTH PLAIN or LOGIN, and credentials are configured", c->host);
        client_fail(c, &o);
        return;
    }
    size_t ul = strlen(cfg->auth_user), pl = strlen(cfg->auth_pass ? cfg->auth_pass : "");
    if (ul > 255 || pl > 255) {
        outcome_local(&o, STAGE_AUTH, 1, 0, "4.7.0", "relay credentials are too long");
        client_fail(c, &o);
        return;
    }
    if (c->caps.auth & SMTP_AUTH_PLAIN) {
        /* RFC 4616: authzid NUL authcid NUL passwd. */
        char raw[520], enc[700];
        raw[0] = 0;
        memcpy(raw + 1, cfg->auth_user, ul);
        raw[1 + ul] = 0;
        memcpy(raw + 2 + ul, cfg->auth_pass ? cfg->auth_pass : "", pl);
        b64(raw, 2 + ul + pl, enc);
        conn_printf(&c->conn, "AUTH PLAIN %s\r\n", enc);
        c->state = C_AUTH;
    } else {
        conn_printf(&c->conn, "AUTH LOGIN\r\n");
        c->state = C_AUTH_LOGIN_USER;
    }
    expect_reply(c);
}

/* ---- transactions ---- */

static bool addr_is_ascii(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s >= 0x80) return false;
    return true;
}

static void send_mail(struct smtp_client *c)
{
    struct smtp_txn *t = c->txn;
    char params[512];
    size_t pl = 0;
    params[0] = 0;
#define ADDP(...) pl += (size_t)snprintf(params + pl, pl < sizeof params ? sizeof params - pl : 0, __VA_ARGS__)
    if (c->caps.ext & SMTP_EXT_SIZE) ADDP(" SIZE=%zu", t->body_len + t->prefix_len);
    if (t->eightbit && (c->caps.ext & SMTP_EXT_8BITMIME)) ADDP(" BODY=8BITMIME");
    if (t->utf8) ADDP(" SMTPUTF8");
    if (t->mail_params && *t->mail_params && (c->caps.ext & SMTP_EXT_DSN)) ADDP(" %s", t->mail_params);
#undef ADDP
    if (pl >= sizeof params) params[sizeof params - 1] = 0;
    conn_printf(&c->conn, "MAIL FROM:<%s>%s\r\n", t->sender, params);
}

static void send_rcpt(struct smtp_client *c, unsigned i)
{
    struct smtp_txn *t = c->txn;
    const char *p = t->rcpt_params ? t->rcpt_params[i] : NULL;
    bool dsn = p && *p && (c->caps.ext & SMTP_EXT_DSN);
    conn_printf(&c->conn, "RCPT TO:<%s>%s%s\r\n", t->rcpts[i], dsn ? " " : "", dsn ? p : "");
}

/* RFC 5321 §4.5.2: a line starting with "." gets one more. */
static void write_stuffed(struct conn *cn, const char *p, size_t n, bool *bol)
{
    while (n > 0) {
        if (*bol && p[0] == '.') conn_write(cn, ".", 1);
        const char *nl = memchr(p, '\n', n);
        size_t len = nl ? (size_t)(nl - p) + 1 : n;
        /* Runs of lines that need nothing go out in one piece. */
        while (nl && len < n && p[len] != '.') {
            const char *next = memchr(p + len, '\n', n - len);
            if (!next) {
                len = n;
                nl = NULL;
                break;
            }
            len = (size_t)(next - p) + 1;
            nl = next;
        }
        conn_write(cn, p, len);
        *bol = p[len - 1] == '\n';
        p += len;
        n -= len;
    }
}

static void send_body(struct smtp_client *c)
{
    struct smtp_txn *t = c->txn;
    bool bol = true;
    if (t->prefix_len) write_stuffed(&c->conn, t->prefix, t->prefix_len, &bol);
    write_stuffed(&c->conn, t->body, t->body_len, &bol);
    size_t n = t->body_len;
    bool crlf = n >= 2 && t->body[n - 2] == '\r' && t->body[n - 1] == '\n';
    if (n == 0 && t->prefix_len) crlf = true;
    conn_write(&c->conn, crlf ? ".\r\n" : "\r\n.\r\n", crlf ? 3 : 5);
}

static void txn_task(struct loop_task *tk);

void smtp_client_send(struct smtp_client *c, struct smtp_txn *t)
{
    c->txn = t;
    c->txns++;
    c->rcpt_i = 0;
    c->sent_rcpts = 0;
    t->accepted = 0;
    memset(&t->msg_out, 0, sizeof t->msg_out);
    for (unsigned i = 0; i < t->nrcpt; i++) memset(&t->rcpt_out[i], 0, sizeof t->rcpt_out[i]);
    bool utf8_needed = t->utf8 || !addr_is_ascii(t->sender);
    for (unsigned i = 0; !utf8_needed && i < t->nrcpt; i++) utf8_needed = !addr_is_ascii(t->rcpts[i]);
    t->utf8 = utf8_needed;
    /* Refusals decided here finish from a task, so the owner never hears
     * back from inside its own call. */
    if (t->utf8 && !(c->caps.ext & SMTP_EXT_SMTPUTF8)) {
        /* RFC 6531 §3.4: no downgrade; the message cannot go this way. */
        outcome_local(&t->msg_out, STAGE_LOCAL, 0, 0, "5.6.7",
                      "%s does not support SMTPUTF8, and the envelope needs it", c->host);
        c->state = C_MAIL;
        c->task.fn = txn_task;
        loop_defer(c->conn.loop, &c->task);
        return;
    }
    if (c->caps.size && t->body_len + t->prefix_len > c->caps.size) {
        outcome_local(&t->msg_out, STAGE_LOCAL, 0, 0, "5.3.4",
                      "message size %zu exceeds the limit of %llu bytes of %s",
                      t->body_len + t->prefix_len, (unsigned long long)c->caps.size, c->host);
        c->state = C_MAIL;
        c->task.fn = txn_task;
        loop_defer(c->conn.loop, &c->task);
        return;
    }
    if (c->need_rset) {
        conn_printf(&c->conn, "RSET\r\n");
        c->need_rset = false;
        c->state = C_RSET;
        if (!c->pipelining) {
            expect_reply(c);
            return;
        }
    } else {
        c->state = C_MAIL;
    }
    send_mail(c);
    if (c->pipelining) {
        for (unsigned i = 0; i < t->nrcpt; i++) send_rcpt(c, i);
        c->sent_rcpts = t->nrcpt;
        conn_printf(&c->conn, "DATA\r\n");
    }
    expect_reply(c);
}

static void txn_task(struct loop_task *tk)
{
    struct smtp_client *c = container_of(tk, struct smtp_client, task);
    if (c->txn && !conn_closing(&c->conn)) {
        c->msg_failed = true;
        txn_finish(c);
    }
}

/* Every recipient gets its outcome; the transaction is handed back. With
 * msg_failed (MAIL refused, or refused before sending) msg_out is everyone's;
 * otherwise recipients keep their own RCPT refusal and the accepted ones
 * (and any never answered) get msg_out. */
static void txn_finish(struct smtp_client *c)
{
    struct smtp_txn *t = c->txn;
    if (!t) return;
    for (unsigned i = 0; i < t->nrcpt; i++) {
        struct smtp_outcome *o = &t->rcpt_out[i];
        if (c->msg_failed || o->code == 0 || (o->code >= 200 && o->code < 300))
            *o = t->msg_out;
    }
    if (c->msg_failed) t->accepted = 0;
    c->txn = NULL;
    c->msg_failed = false;
    if (c->state != C_DEAD && !conn_closing(&c->conn)) c->state = C_READY;
    conn_set_timeout(&c->conn, 0);
    c->ops->txn_done(c, t);
    if (c->state == C_READY && !c->txn && !conn_closing(&c->conn) && !c->quitting) c->ops->ready(c);
}

/* The session is lost with a transaction in flight: every recipient
 * without a final answer is deferred. */
static void txn_lost(struct smtp_client *c, const char *why)
{
    struct smtp_txn *t = c->txn;
    if (!t) return;
    /* A refusal already heard stands (a MAIL refusal for everyone, a RCPT
     * refusal for its recipient); the rest never got a final answer. */
    if (!c->msg_failed) {
        outcome_local(&t->msg_out, state_stage[c->state], 1, 0, "4.4.2", "%s", why);
        t->accepted = 0;
    }
    c->state = C_DEAD;
    txn_finish(c);
}

/* RFC 5321 §3.8: 421 means the server is closing; the transaction ends
 * with what we know and the connection goes. Otherwise the transaction
 * just ends. */
static void txn_end(struct smtp_client *c, unsigned code)
{
    if (code == 421) c->state = C_DEAD;
    txn_finish(c);
    if (code == 421) smtp_client_abort(c);
}

static void on_reply(struct smtp_client *c)
{
    const struct smtp_reply *r = &c->reply;
    struct smtp_outcome o;
    unsigned code = r->code;
    switch (c->state) {
    case C_GREETING:
        if (code / 100 == 2) {
            send_ehlo(c);
        } else {
            outcome_reply(&o, r, STAGE_GREETING);
            client_fail(c, &o);
        }
        return;
    case C_EHLO:
        if (code == 250) {
            smtp_reply_ehlo_parse(r, &c->caps);
            c->pipelining = (c->caps.ext & SMTP_EXT_PIPELINING) != 0;
            if (!conn_is_tls(&c->conn) && c->cfg->tls_ctx &&
                (c->cfg->tls == CLIENT_TLS_MAY || c->cfg->tls == CLIENT_TLS_REQUIRED) &&
                (c->caps.ext & SMTP_EXT_STARTTLS)) {
                conn_printf(&c->conn, "STARTTLS\r\n");
                c->state = C_STARTTLS;
                expect_reply(c);
                return;
            }
            auth_or_ready(c);
        } else if (code >= 500 && code != 554 && !conn_is_tls(&c->conn)) {
            /* RFC 5321 §3.2: a server without EHLO gets HELO. */
            conn_printf(&c->conn, "HELO %s\r\n", c->cfg->helo);
            c->state = C_HELO;
            expect_reply(c);
        } else {
            outcome_reply(&o, r, STAGE_EHLO);
            client_fail(c, &o);
        }
        return;
    case C_HELO:
        if (code == 250) {
            auth_or_ready(c);
        } else {
            outcome_reply(&o, r, STAGE_EHLO);
            client_fail(c, &o);
        }
        return;
    case C_STARTTLS:
        if (code == 220) {
            c->state = C_TLS;
            if (conn_start_tls_client(&c->conn, c->cfg->tls_ctx, c->host) < 0) {
                outcome_local(&o, STAGE_TLS, 1, 0, "4.7.5", "cannot set up TLS for %s", c->host);
                client_fail(c, &o);
                return;
            }
            expect_reply(c);
        } else if (c->cfg->tls == CLIENT_TLS_REQUIRED) {
            outcome_reply(&o, r, STAGE_STARTTLS);
            o.temp = 1;
            client_fail(c, &o);
        } else {
            auth_or_ready(c);   /* opportunistic: go on in the clear */
        }
        return;
    case C_AUTH:
        if (code == 235) {
            go_ready(c);
        } else {
            /* A refused login is a configuration problem: keep the mail. */
            outcome_reply(&o, r, STAGE_AUTH);
            o.temp = 1;
            client_fail(c, &o);
        }
        return;
    case C_AUTH_LOGIN_USER:
    case C_AUTH_LOGIN_PASS:
        if (code == 334) {
            const char *v = c->state == C_AUTH_LOGIN_USER ? c->cfg->auth_user
                                                          : (c->cfg->auth_pass ? c->cfg->auth_pass : "");
            char enc[400];
            b64(v, strlen(v), enc);
            conn_printf(&c->conn, "%s\r\n", enc);
            c->state = c->state == C_AUTH_LOGIN_USER ? C_AUTH_LOGIN_PASS : C_AUTH;
            expect_reply(c);
        } else {
            outcome_reply(&o, r, STAGE_AUTH);
            o.temp = 1;
            client_fail(c, &o);
        }
        return;
    case C_READY:
        /* Unsolicited: typically 421 before the server closes an idle
         * connection (RFC 5321 §3.8). */
        log_debug("smtp-client", "%s: %u while idle: closing", c->host, code);
        smtp_client_abort(c);
        return;
    case C_RSET:
        c->state = C_MAIL;
        if (!c->pipelining) {
            send_mail(c);
            expect_reply(c);
        }
        return;
    case C_MAIL:
        if (code / 100 != 2) {
            outcome_reply(&c->txn->msg_out, r, STAGE_MAIL);
            c->msg_failed = true;
            if (code == 421 || !c->pipelining) {
                txn_end(c, code);
                return;
            }
        } else if (!c->pipelining) {
            send_rcpt(c, 0);
            c->sent_rcpts = 1;
        }
        c->state = C_RCPT;
        c->rcpt_i = 0;
        expect_reply(c);
        return;
    case C_RCPT: {
        struct smtp_txn *t = c->txn;
        unsigned i = c->rcpt_i++;
        if (i < t->nrcpt) {
            outcome_reply(&t->rcpt_out[i], r, STAGE_RCPT);
            if (code / 100 == 2) t->accepted++;
        }
        if (code == 421) {
            /* Recipients refused before keep their answer; the others wait. */
            if (!c->msg_failed) {
                outcome_reply(&t->msg_out, r, STAGE_RCPT);
                t->accepted = 0;
            }
            txn_end(c, code);
            return;
        }
        if (c->rcpt_i < t->nrcpt) {
            if (!c->pipelining) {
                send_rcpt(c, c->rcpt_i);
                c->sent_rcpts++;
            }
            expect_reply(c);
            return;
        }
        c->state = C_DATA;
        if (!c->pipelining) {
            if (t->accepted == 0 || c->msg_failed) {
                /* Every recipient refused: the transaction is open on the
                 * server until RSET. */
                c->need_rset = true;
                outcome_local(&t->msg_out, STAGE_RCPT, 0, 0, "", "no recipient accepted");
                txn_finish(c);
                return;
            }
            conn_printf(&c->conn, "DATA\r\n");
        }
        expect_reply(c);
        return;
    }
    case C_DATA: {
        struct smtp_txn *t = c->txn;
        if (code == 354) {
            if (t->accepted == 0 || c->msg_failed) {
                /* RFC 2920 §3.1: DATA went ahead anyway; end it empty. */
                conn_write(&c->conn, ".\r\n", 3);
                c->discard = true;
            } else {
                send_body(c);
            }
            c->state = C_BODY;
            expect_reply(c);
            return;
        }
        if (!c->msg_failed) {
            outcome_reply(&t->msg_out, r, STAGE_DATA);
            if (t->accepted == 0) {
                /* The server had nothing to take; each recipient keeps
                 * its own RCPT refusal. */
                t->msg_out.code = 0;
            }
        }
        c->need_rset = true;
        txn_end(c, code);
        return;
    }
    case C_BODY: {
        struct smtp_txn *t = c->txn;
        if (c->discard) {
            c->discard = false;
            c->need_rset = true;
        } else {
            outcome_reply(&t->msg_out, r, STAGE_BODY);
        }
        txn_end(c, code);
        return;
    }
    case C_QUIT:
        conn_close(&c->conn);
        return;
    default:
        return;
    }
}

/* A refused recipient (no accepted ones) keeps its own RCPT reply: the
 * message-level outcome then carries code 0 and is not copied over. */

static size_t on_data(struct conn *cn, const char *p, size_t n)
{
    struct smtp_client *c = of_conn(cn);
    size_t used = 0;
    while (used < n && !conn_closing(cn)) {
        int complete = 0;
        size_t k = smtp_reply_feed(&c->rp, p + used, n - used, &c->reply, &complete);
        used += k;
        if (c->rp.status != SMTP_REPLY_OK) {
            struct smtp_outcome o;
            outcome_local(&o, state_stage[c->state], 1, 0, "4.5.0",
                          "unreadable reply from %s (%s) after %s", c->host,
                          smtp_reply_status_str(c->rp.status), state_cmd[c->state]);
            if (c->txn) txn_lost(c, o.text);
            else client_fail(c, &o);
            smtp_client_abort(c);
            return n;
        }
        if (!complete) break;
        on_reply(c);
        if (c->state == C_TLS) {
            /* Nothing pipelined before the handshake counts (RFC 3207 §4.2). */
            return n;
        }
    }
    return n;
}

static void on_tls(struct conn *cn, int ok)
{
    struct smtp_client *c = of_conn(cn);
    if (!ok) {
        struct smtp_outcome o;
        outcome_local(&o, STAGE_TLS, 1, 0, "4.7.5", "TLS handshake with %s failed: %s", c->host,
                      cn->tls ? tls_conn_error(cn->tls) : "error");
        client_fail(c, &o);
        return;
    }
    c->tls_done = true;
    if (c->cfg->tls == CLIENT_TLS_IMPLICIT) {
        c->state = C_GREETING;
        expect_reply(c);
        return;
    }
    send_ehlo(c);
}

static void on_timeout(struct conn *cn)
{
    struct smtp_client *c = of_conn(cn);
    char why[400];
    snprintf(why, sizeof why, "timeout waiting for the reply to %s from %s", state_cmd[c->state], c->host);
    if (c->txn) {
        txn_lost(c, why);
    } else if (c->state != C_READY && c->state != C_QUIT) {
        struct smtp_outcome o;
        outcome_local(&o, state_stage[c->state], 1, 0, "4.4.2", "%s", why);
        client_fail(c, &o);
    }
    smtp_client_abort(c);
}

static void on_connect(struct conn *cn, int err)
{
    struct smtp_client *c = of_conn(cn);
    if (err < 0) {
        struct smtp_outcome o;
        char ip[64];
        outcome_local(&o, STAGE_CONNECT, 1, 0, "4.4.1", "connect to %s[%s]:%u: %s", c->host,
                      conn_addr_str(&c->addr, ip, sizeof ip), c->addr.port, strerror(-err));
        client_fail(c, &o);
        return;
    }
    if (c->cfg->tls == CLIENT_TLS_IMPLICIT) {
        c->state = C_TLS;
        if (conn_start_tls_client(cn, c->cfg->tls_ctx, c->host) < 0) {
            struct smtp_outcome o;
            outcome_local(&o, STAGE_TLS, 1, 0, "4.7.5", "cannot set up TLS for %s", c->host);
            client_fail(c, &o);
            return;
        }
    } else {
        c->state = C_GREETING;
    }
    expect_reply(c);
}

static void on_close(struct conn *cn)
{
    struct smtp_client *c = of_conn(cn);
    if (c->txn) txn_lost(c, "lost connection");
    if (!c->failed_reported && c->state < C_READY) {
        struct smtp_outcome o;
        char ip[64];
        outcome_local(&o, state_stage[c->state], 1, 0, "4.4.2",
                      "lost connection with %s[%s] during %s", c->host,
                      conn_addr_str(&c->addr, ip, sizeof ip), state_cmd[c->state]);
        c->failed_reported = true;
        c->ops->failed(c, &o);
    }
    c->state = C_DEAD;
    c->ops->closed(c);
}

static const struct conn_proto client_proto = {
    .on_data = on_data,
    .on_tls = on_tls,
    .on_timeout = on_timeout,
    .on_close = on_close,
    .on_connect = on_connect,
};

/* The session cannot be used: tell the owner once, then close. */
static void client_fail(struct smtp_client *c, const struct smtp_outcome *why)
{
    if (!c->failed_reported && !c->txn) {
        c->failed_reported = true;
        c->ops->failed(c, why);
    }
    if (!conn_closing(&c->conn)) {
        if (c->state > C_CONNECTING && c->state != C_TLS && why->code != 421 && why->code != 0)
            conn_printf(&c->conn, "QUIT\r\n");
        c->state = C_DEAD;
        conn_close(&c->conn);
    }
}

int smtp_client_start(struct smtp_client *c, struct loop *l, const struct conn_addr *to,
                      const struct conn_addr *from, const char *host,
                      const struct smtp_client_cfg *cfg, const struct smtp_client_ops *ops,
                      void *owner)
{
    int rc = conn_connect(&c->conn, l, to, from, &client_proto);
    if (rc < 0) return rc;
    c->ops = ops;
    c->cfg = cfg;
    c->owner = owner;
    c->addr = *to;
    snprintf(c->host, sizeof c->host, "%s", host);
    memset(&c->caps, 0, sizeof c->caps);
    smtp_reply_init(&c->rp, 0, 0);
    c->state = C_CONNECTING;
    c->started_ms = timer_now_ms();
    conn_set_timeout(&c->conn, cfg->connect_timeout_ms ? cfg->connect_timeout_ms : 30000);
    return 0;
}

void smtp_client_quit(struct smtp_client *c)
{
    if (conn_closing(&c->conn)) return;
    c->quitting = true;
    if (c->state == C_READY) {
        conn_printf(&c->conn, "QUIT\r\n");
        c->state = C_QUIT;
        /* The 221 is a courtesy: close after a short wait at most. */
        conn_set_timeout(&c->conn, 2000);
        return;
    }
    smtp_client_abort(c);
}

void smtp_client_abort(struct smtp_client *c)
{
    if (conn_closing(&c->conn)) return;
    if (c->state != C_DEAD && c->state != C_QUIT) c->state = C_DEAD;
    conn_close(&c->conn);
}

bool smtp_client_is_tls(const struct smtp_client *c) { return conn_is_tls(&c->conn); }
