/* sources: csrc/smtp/reply.c */
/* libs: */
/* The SMTP reply reader on arbitrary bytes: fed whole, in pieces cut where
 * the input says, and a byte at a time, it must give the same replies,
 * status and consumption; every reply must match the bytes it came from
 * (code, lines, text, flags, bounds), and the EHLO reader must stay inside
 * the text and set only what it documents. */
#include "smtp/reply.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define REQUIRE(c) do { if (!(c)) abort(); } while (0)

#define MAX_KEPT 256

struct summary {
    unsigned code, cls, subject, detail, nlines;
    uint32_t flags;
    size_t text_len;
    uint64_t text_hash;
};

struct outcome {
    struct summary r[MAX_KEPT];
    size_t nr, used;
    enum smtp_reply_status status;
};

static struct outcome whole, split;
static struct smtp_reply cur;
static char model_text[SMTP_REPLY_TEXT_MAX];

static uint64_t fnv(const char *p, size_t n)
{
    uint64_t h = 1469598103934665603u;
    for (size_t i = 0; i < n; i++) h = (h ^ (unsigned char)p[i]) * 1099511628211u;
    return h;
}

static void check_ehlo(const struct smtp_reply *r)
{
    struct smtp_ehlo_caps caps;
    const uint32_t all_ext = SMTP_EXT_PIPELINING | SMTP_EXT_SIZE | SMTP_EXT_8BITMIME |
                             SMTP_EXT_SMTPUTF8 | SMTP_EXT_STARTTLS | SMTP_EXT_CHUNKING |
                             SMTP_EXT_DSN | SMTP_EXT_ENHANCEDSTATUSCODES | SMTP_EXT_AUTH;
    const uint32_t all_auth = SMTP_AUTH_PLAIN | SMTP_AUTH_LOGIN | SMTP_AUTH_OTHER;

    memset(&caps, 0xa5, sizeof caps);
    int rc = smtp_reply_ehlo_parse(r, &caps);
    if (r->code != 250) {
        REQUIRE(rc == -EINVAL && caps.ext == 0 && caps.auth == 0 && caps.size == 0);
        return;
    }
    REQUIRE(rc == 0);
    REQUIRE((caps.ext & ~all_ext) == 0 && (caps.auth & ~all_auth) == 0);
    if (!(caps.ext & SMTP_EXT_AUTH)) REQUIRE(caps.auth == 0);
    if (!(caps.ext & SMTP_EXT_SIZE)) REQUIRE(caps.size == 0);
    /* Only lines after the first count, so one line gives nothing. */
    if (!memchr(r->text, '\n', r->text_len < SMTP_REPLY_TEXT_MAX ? r->text_len
                                                                  : SMTP_REPLY_TEXT_MAX))
        REQUIRE(caps.ext == 0);
}

/* A complete reply against the bytes raw[0..n) it was read from. */
static void check_reply(const struct smtp_reply *r, const char *raw, size_t n,
                        size_t max_line, unsigned max_lines)
{
    uint32_t flags = 0;
    size_t total = 0, pos = 0;
    unsigned lines = 0;

    REQUIRE(n >= 4 && raw[n - 1] == '\n');
    REQUIRE(r->code >= 200 && r->code <= 599);
    REQUIRE(r->code == (unsigned)((raw[0] - '0') * 100 + (raw[1] - '0') * 10 + (raw[2] - '0')));
    REQUIRE(r->text_len <= SMTP_REPLY_TEXT_MAX && r->text[r->text_len] == '\0');

    /* Rebuild the text from the lines. */
    while (pos < n) {
        const char *l = raw + pos;
        const char *lf = memchr(l, '\n', n - pos);
        REQUIRE(lf != NULL);
        size_t len = (size_t)(lf - l) + 1, ts = 4, te = len - 1;
        lines++;
        REQUIRE(len <= max_line && len >= 4);
        REQUIRE(memcmp(l, raw, 3) == 0);
        REQUIRE((l[3] == '-') == (pos + len < n));
        if (l[3] == '\n') {
            ts = te = 3;
            flags |= SMTP_REPLY_BARE_LF;
        } else if (l[3] == '\r') {
            REQUIRE(len == 5);
            ts = te = 3;
        } else {
            REQUIRE(l[3] == ' ' || l[3] == '-');
            if (te > 4 && l[te - 1] == '\r') te--;
            else flags |= SMTP_REPLY_BARE_LF;
        }
        if (ts < te && memchr(l + ts, '\r', te - ts)) flags |= SMTP_REPLY_BARE_CR;
        if (lines > 1) {
            if (total < SMTP_REPLY_TEXT_MAX) model_text[total] = '\n';
            total++;
        }
        for (size_t j = ts; j < te; j++, total++)
            if (total < SMTP_REPLY_TEXT_MAX) model_text[total] = l[j];
        pos += len;
    }
    if (total > SMTP_REPLY_TEXT_MAX) flags |= SMTP_REPLY_TRUNCATED;
    REQUIRE(r->nlines == lines && lines >= 1 && lines <= max_lines);
    REQUIRE(r->flags == flags);
    REQUIRE(r->text_len == (total < SMTP_REPLY_TEXT_MAX ? total : SMTP_REPLY_TEXT_MAX));
    REQUIRE(memcmp(r->text, model_text, r->text_len) == 0);

    const struct smtp_enhanced *e = &r->enhanced;
    if (e->cls == 0) {
        REQUIRE(e->subject == 0 && e->detail == 0);
    } else {
        REQUIRE(e->cls == r->code / 100 && (e->cls == 2 || e->cls == 4 || e->cls == 5));
        REQUIRE(e->subject <= 999 && e->detail <= 999);
        REQUIRE(r->text_len >= 5 && r->text[0] == (char)('0' + e->cls) && r->text[1] == '.');
    }
    check_ehlo(r);
}

static void keep(struct outcome *o, const struct smtp_reply *r)
{
    if (o->nr < MAX_KEPT) {
        struct summary *s = &o->r[o->nr];
        s->code = r->code;
        s->cls = r->enhanced.cls;
        s->subject = r->enhanced.subject;
        s->detail = r->enhanced.detail;
        s->nlines = r->nlines;
        s->flags = r->flags;
        s->text_len = r->text_len;
        s->text_hash = fnv(r->text, r->text_len);
    }
    o->nr++;
}

/* Feed in[0..n) in pieces: step(k) gives the length of piece k (0: the
 * rest at once). Each complete reply is checked against its bytes when
 * `check` is set. */
static void feed(const char *in, size_t n, size_t max_line, unsigned max_lines,
                 const uint8_t *steps, size_t nsteps, int bytewise, int check,
                 struct outcome *o)
{
    struct smtp_reply_parser p;
    size_t pos = 0, reply_start = 0, k = 0;

    o->nr = 0;
    o->used = 0;
    memset(&cur, 0x5a, sizeof cur);
    smtp_reply_init(&p, max_line, max_lines);
    while (pos < n && p.status == SMTP_REPLY_OK) {
        size_t len = n - pos;
        if (bytewise) len = 1;
        else if (nsteps) len = 1 + steps[k++ % nsteps] % 64;
        if (len > n - pos) len = n - pos;
        size_t off = 0;
        while (off < len) {
            int complete = -1;
            size_t used = smtp_reply_feed(&p, in + pos + off, len - off, &cur, &complete);
            REQUIRE(used <= len - off && (complete == 0 || complete == 1));
            off += used;
            o->used += used;
            if (complete) {
                REQUIRE(used >= 1 && p.status == SMTP_REPLY_OK);
                if (check)
                    check_reply(&cur, in + reply_start, pos + off - reply_start,
                                p.max_line, p.max_lines);
                keep(o, &cur);
                reply_start = pos + off;
                continue;
            }
            if (p.status == SMTP_REPLY_OK) {
                REQUIRE(off == len);
            } else {
                REQUIRE(used >= 1);
                /* Nothing more after an error. */
                REQUIRE(smtp_reply_feed(&p, in, n, &cur, &complete) == 0 && complete == 0);
            }
            break;
        }
        pos += len;
    }
    o->status = p.status;
    REQUIRE(o->used <= n);
    if (p.status == SMTP_REPLY_OK) REQUIRE(o->used == n);
}

static int same(const struct outcome *a, const struct outcome *b)
{
    if (a->nr != b->nr || a->used != b->used || a->status != b->status) return 0;
    for (size_t k = 0; k < a->nr && k < MAX_KEPT; k++)
        if (memcmp(&a->r[k], &b->r[k], sizeof a->r[k]) != 0) return 0;
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* Three bytes of settings: the line limit (small ones reach it), the
     * lines limit, and how the split pieces are sized. */
    if (size < 3) return 0;
    size_t max_line = data[0] >= 0x80 ? 1 + (size_t)data[0] % 64 : 0;
    unsigned max_lines = data[1] >= 0x80 ? 1 + (unsigned)data[1] % 8 : 0;
    const char *in = (const char *)data + 3;
    size_t n = size - 3;

    feed(in, n, max_line, max_lines, NULL, 0, 0, 1, &whole);

    /* Pieces sized by the input's own bytes, from an offset the third
     * settings byte picks, then a byte at a time. */
    const uint8_t *steps = n ? data + 3 + data[2] % n : data + 2;
    size_t nsteps = n ? n - data[2] % n : 1;
    feed(in, n, max_line, max_lines, steps, nsteps, 0, 0, &split);
    REQUIRE(same(&whole, &split));
    feed(in, n, max_line, max_lines, NULL, 0, 1, 0, &split);
    REQUIRE(same(&whole, &split));

    /* The EHLO reader on any text at all, cut or not. */
    size_t tl = n < SMTP_REPLY_TEXT_MAX ? n : SMTP_REPLY_TEXT_MAX;
    memset(&cur, 0, sizeof cur);
    cur.code = 250;
    memcpy(cur.text, in, tl);
    cur.text_len = tl;
    cur.flags = data[2] & 1 ? SMTP_REPLY_TRUNCATED : 0;
    check_ehlo(&cur);
    return 0;
}
