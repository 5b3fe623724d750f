/* sources: csrc/smtp/reply.c */
/* libs: */
/* The SMTP reply reader: single, multi-line and pipelined replies, enhanced
 * status codes, EHLO capabilities, errors and limits at their boundaries;
 * every case is also checked against a line-at-a-time model over the whole
 * input, fed whole, split at every byte and a byte at a time. */
#include "smtp/reply.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

#define S(lit) lit, sizeof(lit) - 1


static int mem_is(const char *p, size_t n, const char *lit)
{
    return n == strlen(lit) && memcmp(p, lit, n) == 0;
}

/* ---- feeding and the model -------------------------------------------- */

#define MAX_REPLIES 128

/* Everything a caller can see from feeding one input. */
struct outcome {
    struct smtp_reply r[MAX_REPLIES];
    size_t nr;                      /* complete replies (only MAX_REPLIES kept) */
    size_t used;                    /* bytes consumed in all */
    enum smtp_reply_status status;
    int broken;                     /* an API promise was broken */
};

static struct outcome want_oc, got_oc;

static void keep(struct outcome *o, const struct smtp_reply *r)
{
    if (o->nr < MAX_REPLIES) o->r[o->nr] = *r;
    o->nr++;
}

/* Feed in[0..n) to a fresh reader in pieces cut at cuts[0..ncuts), as a
 * session would: after each complete reply, the rest of the piece again. */
static void run(const char *in, size_t n, size_t max_line, unsigned max_lines,
                const size_t *cuts, size_t ncuts, struct outcome *o)
{
    static struct smtp_reply cur;
    struct smtp_reply_parser p;
    size_t pos = 0;

    o->nr = 0;
    o->used = 0;
    o->broken = 0;
    /* The reply struct needs no initialising by the caller. */
    memset(&cur, 0x5a, sizeof cur);
    smtp_reply_init(&p, max_line, max_lines);
    for (size_t k = 0; k <= ncuts && p.status == SMTP_REPLY_OK; k++) {
        size_t end = k < ncuts ? cuts[k] : n, len = end - pos, off = 0;
        /* Exact-size copies so ASan sees any read past them. */
        char *piece = malloc(len ? len : 1);
        memcpy(piece, in + pos, len);
        for (;;) {
            int complete = -1;
            size_t used = smtp_reply_feed(&p, piece + off, len - off, &cur, &complete);
            if (used > len - off || (complete != 0 && complete != 1)) {
                o->broken = 1;
                break;
            }
            off += used;
            o->used += used;
            if (complete) {
                if (p.status != SMTP_REPLY_OK || used == 0 || piece[off - 1] != '\n')
                    o->broken = 1;
                keep(o, &cur);
                if (off == len) break;
                continue;
            }
            if (p.status == SMTP_REPLY_OK && off != len) o->broken = 1;
            break;
        }
        free(piece);
        pos = end;
    }
    o->status = p.status;
}

/* RFC 3463 class "." subject "." detail on a first line's text, written
 * as a token check rather than a scan: the token runs to the first SP. */
static void model_enhanced(const char *t, size_t n, unsigned code, struct smtp_enhanced *e)
{
    size_t tok = 0, dots[2], nd = 0;

    e->cls = e->subject = e->detail = 0;
    while (tok < n && t[tok] != ' ') tok++;
    for (size_t i = 0; i < tok; i++) {
        if (t[i] == '.') {
            if (nd == 2) return;
            dots[nd++] = i;
        } else if (t[i] < '0' || t[i] > '9') {
            return;
        }
    }
    if (nd != 2 || dots[0] != 1) return;
    size_t sl = dots[1] - dots[0] - 1, dl = tok - dots[1] - 1;
    if (sl < 1 || sl > 3 || dl < 1 || dl > 3) return;
    unsigned cls = (unsigned)(t[0] - '0');
    if ((cls != 2 && cls != 4 && cls != 5) || cls != code / 100) return;
    e->cls = cls;
    for (size_t i = dots[0] + 1; i < dots[1]; i++) e->subject = e->subject * 10 + (unsigned)(t[i] - '0');
    for (size_t i = dots[1] + 1; i < tok; i++) e->detail = e->detail * 10 + (unsigned)(t[i] - '0');
}

/* The rules of reply.h over the whole input, a line at a time with
 * look-ahead: each line's first offending byte is found, the length limit
 * winning a tie, and the text is cut from whole lines. */
static void model(const char *in, size_t n, size_t max_line, unsigned max_lines,
                  struct outcome *o)
{
    static struct smtp_reply r;
    size_t pos = 0;

    if (!max_line) max_line = SMTP_REPLY_DEFAULT_MAX_LINE;
    if (!max_lines) max_lines = SMTP_REPLY_DEFAULT_MAX_LINES;
    o->nr = 0;
    o->used = 0;
    o->broken = 0;
    o->status = SMTP_REPLY_OK;
    while (pos < n) {
        unsigned lines = 0;
        size_t total = 0, first_len = 0;
        const char *first = NULL;

        memset(&r, 0, sizeof r);
        for (;;) {
            const char *lf = memchr(in + pos, '\n', n - pos);
            size_t len = lf ? (size_t)(lf - in) - pos + 1 : n - pos;   /* LF included */
            const char *l = in + pos;
            size_t err_at = (size_t)-1;
            enum smtp_reply_status err = SMTP_REPLY_OK;

            lines++;
            for (size_t j = 0; j < len && j < 5 && err_at == (size_t)-1; j++) {
                char c = l[j];
                if (j == 0 && (c < '2' || c > '5')) err = SMTP_REPLY_ERR_SYNTAX;
                else if ((j == 1 || j == 2) && (c < '0' || c > '9')) err = SMTP_REPLY_ERR_SYNTAX;
                else if (j < 3 && lines > 1 && c != (char)('0' + (j == 0 ? r.code / 100 :
                                                     j == 1 ? r.code / 10 % 10 : r.code % 10)))
                    err = SMTP_REPLY_ERR_CODE_MISMATCH;
                else if (j == 3 && c != ' ' && c != '-' && c != '\r' && c != '\n')
                    err = SMTP_REPLY_ERR_SYNTAX;
                else if (j == 3 && c == '-' && lines >= max_lines)
                    err = SMTP_REPLY_ERR_TOO_MANY_LINES;
                else if (j == 4 && l[3] == '\r' && c != '\n')
                    err = SMTP_REPLY_ERR_SYNTAX;
                else if (j == 3 && c == '\n')
                    break;
                if (err != SMTP_REPLY_OK) err_at = j;
            }
            if (len > max_line && max_line <= err_at) {
                err_at = max_line;
                err = SMTP_REPLY_ERR_LINE_TOO_LONG;
            }
            if (err != SMTP_REPLY_OK) {
                o->status = err;
                o->used = pos + err_at + 1;
                return;
            }
            if (!lf) {                   /* a reply not yet complete */
                o->used = n;
                return;
            }
            if (lines == 1) r.code = (unsigned)((l[0] - '0') * 100 + (l[1] - '0') * 10 + (l[2] - '0'));

            /* The text: after "DDD" and its separator, without the line end. */
            size_t tstart = 4, tend = len - 1;
            if (l[3] == '\n') {                 /* "DDD\n" */
                tstart = tend = 3;
                r.flags |= SMTP_REPLY_BARE_LF;
            } else if (l[3] == '\r') {          /* "DDD\r\n" */
                tstart = tend = 3;
            } else if (tend > 4 && l[tend - 1] == '\r') {
                tend--;
            } else {
                r.flags |= SMTP_REPLY_BARE_LF;
            }
            if (tstart < tend && memchr(l + tstart, '\r', tend - tstart)) r.flags |= SMTP_REPLY_BARE_CR;
            if (lines > 1) {
                if (total < SMTP_REPLY_TEXT_MAX) r.text[total] = '\n';
                total++;
            }
            for (size_t j = tstart; j < tend; j++, total++)
                if (total < SMTP_REPLY_TEXT_MAX) r.text[total] = l[j];
            if (lines == 1) {
                first = l + tstart;
                first_len = tend - tstart;
            }
            pos += len;
            if (l[3] != '-') break;
        }
        r.nlines = lines;
        r.text_len = total < SMTP_REPLY_TEXT_MAX ? total : SMTP_REPLY_TEXT_MAX;
        if (total > SMTP_REPLY_TEXT_MAX) r.flags |= SMTP_REPLY_TRUNCATED;
        r.text[r.text_len] = 0;
        model_enhanced(first, first_len, r.code, &r.enhanced);
        keep(o, &r);
        o->used = pos;
    }
}

static int same_reply(const struct smtp_reply *a, const struct smtp_reply *b)
{
    return a->code == b->code && a->enhanced.cls == b->enhanced.cls &&
           a->enhanced.subject == b->enhanced.subject &&
           a->enhanced.detail == b->enhanced.detail && a->nlines == b->nlines &&
           a->flags == b->flags && a->text_len == b->text_len &&
           a->text_len <= SMTP_REPLY_TEXT_MAX && memcmp(a->text, b->text, a->text_len) == 0 &&
           a->text[a->text_len] == 0 && b->text[b->text_len] == 0;
}

static int same(const struct outcome *a, const struct outcome *b)
{
    if (a->broken || b->broken || a->nr != b->nr || a->used != b->used || a->status != b->status)
        return 0;
    for (size_t k = 0; k < a->nr && k < MAX_REPLIES; k++)
        if (!same_reply(&a->r[k], &b->r[k])) return 0;
    return 1;
}

static void report(const char *what, const char *in, size_t n,
                   const struct outcome *got, const struct outcome *want)
{
    fprintf(stderr, "  %s: in \"%s\"\n", what, check_show(in, n));
    const struct outcome *oc[2] = { got, want };
    for (int w = 0; w < 2; w++) {
        const struct outcome *o = oc[w];
        fprintf(stderr, "    %s: %zu replies, used %zu, status %d%s\n", w ? "want" : "got ",
                o->nr, o->used, o->status, o->broken ? ", API broken" : "");
        for (size_t k = 0; k < o->nr && k < 4; k++)
            fprintf(stderr, "      %u %u.%u.%u lines %u flags %u \"%s\"\n", o->r[k].code,
                    o->r[k].enhanced.cls, o->r[k].enhanced.subject, o->r[k].enhanced.detail,
                    o->r[k].nlines, o->r[k].flags, check_show(o->r[k].text, o->r[k].text_len));
    }
}

/* Whole, at every single cut, at every pair of cuts (short inputs) and a
 * byte at a time; all must give the model's answer. Returns mismatches. */
static int check_all_splits(const char *in, size_t n, size_t max_line, unsigned max_lines,
                            int pairs)
{
    static size_t cuts[1 << 16];
    int bad = 0;

    model(in, n, max_line, max_lines, &want_oc);
    run(in, n, max_line, max_lines, NULL, 0, &got_oc);
    if (!same(&got_oc, &want_oc)) {
        report("whole", in, n, &got_oc, &want_oc);
        bad++;
    }
    for (size_t c = 0; c <= n && bad < 3; c++) {
        cuts[0] = c;
        run(in, n, max_line, max_lines, cuts, 1, &got_oc);
        if (!same(&got_oc, &want_oc)) {
            fprintf(stderr, "  cut at %zu\n", c);
            report("split", in, n, &got_oc, &want_oc);
            bad++;
        }
    }
    for (size_t c = 0; pairs && c <= n && bad < 3; c++) {
        for (size_t d = c; d <= n && bad < 3; d++) {
            cuts[0] = c;
            cuts[1] = d;
            run(in, n, max_line, max_lines, cuts, 2, &got_oc);
            if (!same(&got_oc, &want_oc)) {
                fprintf(stderr, "  cuts at %zu, %zu\n", c, d);
                report("split2", in, n, &got_oc, &want_oc);
                bad++;
            }
        }
    }
    if (n <= sizeof cuts / sizeof cuts[0]) {
        for (size_t c = 0; c + 1 < n; c++) cuts[c] = c + 1;
        run(in, n, max_line, max_lines, cuts, n ? n - 1 : 0, &got_oc);
        if (bad < 3 && !same(&got_oc, &want_oc)) {
            report("bytewise", in, n, &got_oc, &want_oc);
            bad++;
        }
    }
    return bad;
}

/* Feed whole with the given limits into `oc` and check every split. */
static struct outcome oc;

static void feed_case(const char *in, size_t n, size_t max_line, unsigned max_lines)
{
    run(in, n, max_line, max_lines, NULL, 0, &oc);
    CHECK(!oc.broken, "\"%s\": API promise broken", check_show(in, n));
    CHECK(check_all_splits(in, n, max_line, max_lines, n <= 64) == 0,
          "\"%s\": splits or model disagree", check_show(in, n));
}

/* One complete reply taking all of in[0..n). */
static void reply_case(const char *in, size_t n, unsigned code, const char *text,
                       unsigned nlines, uint32_t flags)
{
    feed_case(in, n, 0, 0);
    CHECK(oc.status == SMTP_REPLY_OK && oc.nr == 1 && oc.used == n,
          "\"%s\": status %d, %zu replies, used %zu of %zu", check_show(in, n), oc.status, oc.nr,
          oc.used, n);
    if (oc.nr != 1) return;
    const struct smtp_reply *r = &oc.r[0];
    CHECK(r->code == code, "\"%s\": code %u, want %u", check_show(in, n), r->code, code);
    CHECK(mem_is(r->text, r->text_len, text) && r->text[r->text_len] == 0,
          "\"%s\": text \"%s\", want \"%s\"", check_show(in, n), check_show(r->text, r->text_len),
          check_show(text, strlen(text)));
    CHECK(r->nlines == nlines, "\"%s\": %u lines, want %u", check_show(in, n), r->nlines, nlines);
    CHECK(r->flags == flags, "\"%s\": flags %u, want %u", check_show(in, n), r->flags, flags);
}

/* An input that fails with `st` after consuming `used` bytes, `nr`
 * complete replies before it. */
static void error_case(const char *in, size_t n, size_t max_line, unsigned max_lines,
                       enum smtp_reply_status st, size_t used, size_t nr)
{
    feed_case(in, n, max_line, max_lines);
    CHECK(oc.status == st, "\"%s\": status %d, want %d", check_show(in, n), oc.status, st);
    CHECK(oc.used == used, "\"%s\": used %zu, want %zu", check_show(in, n), oc.used, used);
    CHECK(oc.nr == nr, "\"%s\": %zu replies, want %zu", check_show(in, n), oc.nr, nr);
}

/* ---- replies ---------------------------------------------------------- */

static void test_single_line(void)
{
    reply_case(S("220 mx.example.org ESMTP Postfix\r\n"), 220, "mx.example.org ESMTP Postfix", 1, 0);
    reply_case(S("250 2.1.0 Ok\r\n"), 250, "2.1.0 Ok", 1, 0);
    reply_case(S("354 End data with <CR><LF>.<CR><LF>\r\n"), 354,
               "End data with <CR><LF>.<CR><LF>", 1, 0);
    reply_case(S("421 4.3.2 Service shutting down\r\n"), 421, "4.3.2 Service shutting down", 1, 0);
    reply_case(S("599 x\r\n"), 599, "x", 1, 0);
    reply_case(S("200 x\r\n"), 200, "x", 1, 0);
    /* No text at all, with and without the space (RFC 5321 §4.2). */
    reply_case(S("250\r\n"), 250, "", 1, 0);
    reply_case(S("250 \r\n"), 250, "", 1, 0);
    /* The text is kept as sent: extra spaces, tabs, 8-bit, NUL. */
    reply_case(S("250  two spaces \r\n"), 250, " two spaces ", 1, 0);
    reply_case(S("250 a\tb\r\n"), 250, "a\tb", 1, 0);
    reply_case(S("550 5.1.1 Unbekannter Empf\xc3\xa4nger\r\n"), 550,
               "5.1.1 Unbekannter Empf\xc3\xa4nger", 1, 0);
    {
        static const char nul[] = "250 a\0b\r\n";
        run(nul, sizeof nul - 1, 0, 0, NULL, 0, &oc);
        CHECK(oc.nr == 1 && oc.r[0].text_len == 3 && memcmp(oc.r[0].text, "a\0b", 4) == 0,
              "NUL kept in text");
        CHECK(check_all_splits(nul, sizeof nul - 1, 0, 0, 1) == 0, "NUL splits");
    }
    /* Not complete yet: all consumed, nothing out. */
    static const char *partial[] = { "2", "25", "250", "250 ", "250 ok", "250 ok\r",
                                     "250-a\r\n", "250-a\r\n250", "250-a\r\n250 b\r" };
    for (size_t k = 0; k < sizeof partial / sizeof partial[0]; k++) {
        feed_case(partial[k], strlen(partial[k]), 0, 0);
        CHECK(oc.status == SMTP_REPLY_OK && oc.nr == 0 && oc.used == strlen(partial[k]),
              "\"%s\": partial: status %d, %zu replies, used %zu", check_show(partial[k], strlen(partial[k])),
              oc.status, oc.nr, oc.used);
    }
    feed_case(S(""), 0, 0);
    CHECK(oc.status == SMTP_REPLY_OK && oc.nr == 0 && oc.used == 0, "empty input");
}

static void test_multi_line(void)
{
    reply_case(S("250-mx.example.org\r\n250-PIPELINING\r\n250 8BITMIME\r\n"), 250,
               "mx.example.org\nPIPELINING\n8BITMIME", 3, 0);
    reply_case(S("550-5.7.1 Message rejected as spam.\r\n"
                 "550-5.7.1 See https://postmaster.example.net/550-5.7.1\r\n"
                 "550 5.7.1 for details\r\n"), 550,
               "5.7.1 Message rejected as spam.\n"
               "5.7.1 See https://postmaster.example.net/550-5.7.1\n"
               "5.7.1 for details", 3, 0);
    /* The greeting may span lines too (RFC 5321 §4.2). */
    reply_case(S("220-mx.example.org ESMTP\r\n220-No UCE\r\n220 \r\n"), 220,
               "mx.example.org ESMTP\nNo UCE\n", 3, 0);
    /* Empty continuation lines, and a last line that is just the code. */
    reply_case(S("250-\r\n250 x\r\n"), 250, "\nx", 2, 0);
    reply_case(S("250-a\r\n250\r\n"), 250, "a\n", 2, 0);
    reply_case(S("250-a\r\n250-\r\n250-\r\n250 b\r\n"), 250, "a\n\n\nb", 4, 0);
    /* A "-" inside the text is only text. */
    reply_case(S("250 a-b\r\n"), 250, "a-b", 1, 0);
    reply_case(S("250-a\r\n250 250-b\r\n"), 250, "a\n250-b", 2, 0);
}

static void test_pipelined(void)
{
    static const char in[] = "250 2.1.0 Sender ok\r\n"
                             "250-2.1.5 Recipient ok\r\n250 2.1.5 (really)\r\n"
                             "354 End data with <CR><LF>.<CR><LF>\r\n"
                             "550 5.1.1 <x@example.org>: Recipient address rejected\r\n";
    feed_case(in, sizeof in - 1, 0, 0);
    CHECK(oc.status == SMTP_REPLY_OK && oc.nr == 4 && oc.used == sizeof in - 1,
          "pipelined: status %d, %zu replies, used %zu", oc.status, oc.nr, oc.used);
    if (oc.nr == 4) {
        CHECK(oc.r[0].code == 250 && mem_is(oc.r[0].text, oc.r[0].text_len, "2.1.0 Sender ok"),
              "reply 1");
        CHECK(oc.r[1].code == 250 && oc.r[1].nlines == 2 && oc.r[1].enhanced.detail == 5 &&
              mem_is(oc.r[1].text, oc.r[1].text_len, "2.1.5 Recipient ok\n2.1.5 (really)"),
              "reply 2");
        CHECK(oc.r[2].code == 354 && oc.r[2].enhanced.cls == 0, "reply 3");
        CHECK(oc.r[3].code == 550 && oc.r[3].enhanced.cls == 5 && oc.r[3].enhanced.subject == 1 &&
              oc.r[3].enhanced.detail == 1, "reply 4");
    }

    /* Each call stops right after its reply. */
    struct smtp_reply_parser p;
    static struct smtp_reply r;
    int complete;
    smtp_reply_init(&p, 0, 0);
    size_t used = smtp_reply_feed(&p, S("250 a\r\n251 b\r\n25"), &r, &complete);
    CHECK(used == 7 && complete && r.code == 250, "first of three: used %zu", used);
    used = smtp_reply_feed(&p, S("251 b\r\n25"), &r, &complete);
    CHECK(used == 7 && complete && r.code == 251, "second of three: used %zu", used);
    used = smtp_reply_feed(&p, S("25"), &r, &complete);
    CHECK(used == 2 && !complete && p.status == SMTP_REPLY_OK, "third begun: used %zu", used);
    used = smtp_reply_feed(&p, S("2 c\r\n"), &r, &complete);
    CHECK(used == 5 && complete && r.code == 252 && mem_is(r.text, r.text_len, "c"), "third");
    /* An empty call changes nothing, also not the reply just completed. */
    used = smtp_reply_feed(&p, NULL, 0, &r, &complete);
    CHECK(used == 0 && !complete && r.code == 252 && p.status == SMTP_REPLY_OK, "empty call");
}

static void test_line_ends(void)
{
    /* A bare LF ends a line, flagged. */
    reply_case(S("250 ok\n"), 250, "ok", 1, SMTP_REPLY_BARE_LF);
    reply_case(S("250\n"), 250, "", 1, SMTP_REPLY_BARE_LF);
    reply_case(S("250-a\n250 b\r\n"), 250, "a\nb", 2, SMTP_REPLY_BARE_LF);
    reply_case(S("250-a\r\n250 b\n"), 250, "a\nb", 2, SMTP_REPLY_BARE_LF);
    reply_case(S("250-\n250 \n"), 250, "\n", 2, SMTP_REPLY_BARE_LF);
    /* A bare CR in the text stays text, flagged. */
    reply_case(S("250 a\rb\r\n"), 250, "a\rb", 1, SMTP_REPLY_BARE_CR);
    reply_case(S("250 a\r\r\n"), 250, "a\r", 1, SMTP_REPLY_BARE_CR);
    reply_case(S("250 \r\r\r\n"), 250, "\r\r", 1, SMTP_REPLY_BARE_CR);
    reply_case(S("250 a\r\n"), 250, "a", 1, 0);
    reply_case(S("250 a\r\rb\n"), 250, "a\r\rb", 1, SMTP_REPLY_BARE_CR | SMTP_REPLY_BARE_LF);
    reply_case(S("250 a\r\n"), 250, "a", 1, 0);
    /* CR then LF as the last line's end with a bare LF elsewhere. */
    reply_case(S("250-a\rb\n250 c\r\n"), 250, "a\rb\nc", 2,
               SMTP_REPLY_BARE_CR | SMTP_REPLY_BARE_LF);
    /* Flags are per reply. */
    feed_case(S("250 a\n250 b\r\n"), 0, 0);
    CHECK(oc.nr == 2 && oc.r[0].flags == SMTP_REPLY_BARE_LF && oc.r[1].flags == 0,
          "flags per reply");
}

/* ---- enhanced status codes -------------------------------------------- */

static void enh_case(const char *in, unsigned cls, unsigned subject, unsigned detail)
{
    feed_case(in, strlen(in), 0, 0);
    CHECK(oc.nr == 1 && oc.r[0].enhanced.cls == cls && oc.r[0].enhanced.subject == subject &&
          oc.r[0].enhanced.detail == detail, "\"%s\": enhanced %u.%u.%u, want %u.%u.%u",
          check_show(in, strlen(in)), oc.nr ? oc.r[0].enhanced.cls : 99,
          oc.nr ? oc.r[0].enhanced.subject : 99, oc.nr ? oc.r[0].enhanced.detail : 99,
          cls, subject, detail);
}

static void test_enhanced(void)
{
    /* Present (RFC 3463 §2, RFC 2034 §4). */
    enh_case("250 2.0.0 Ok\r\n", 2, 0, 0);
    enh_case("550 5.1.1 <nobody@example.org>: Recipient address rejected\r\n", 5, 1, 1);
    enh_case("451 4.7.1 Try again later\r\n", 4, 7, 1);
    enh_case("552 5.3.4 Message size exceeds fixed limit\r\n", 5, 3, 4);
    enh_case("550 5.999.999 x\r\n", 5, 999, 999);
    enh_case("550 5.000.000 x\r\n", 5, 0, 0);
    enh_case("550 5.01.1 x\r\n", 5, 1, 1);
    enh_case("550 5.1.1\r\n", 5, 1, 1);          /* nothing after it */
    enh_case("550 5.1.1  two spaces\r\n", 5, 1, 1);
    enh_case("550 5.1.1\n", 5, 1, 1);
    enh_case("550-5.7.1 first\r\n550-5.7.2 second\r\n550 5.7.3 third\r\n", 5, 7, 1);
    enh_case("250 2.1.5\r\n", 2, 1, 5);
    /* Absent. */
    enh_case("250 Ok\r\n", 0, 0, 0);
    enh_case("250\r\n", 0, 0, 0);
    enh_case("220 mx.example.org ESMTP\r\n", 0, 0, 0);
    enh_case("250 2\r\n", 0, 0, 0);
    /* Only the first line counts. */
    enh_case("550-User unknown\r\n550 5.1.1 User unknown\r\n", 0, 0, 0);
    /* Malformed: each is no enhanced code at all. */
    static const char *bad[] = {
        "550 5.1 x\r\n", "550 5.1.\r\n", "550 5..1 x\r\n", "550 .1.1 x\r\n",
        "550 5.1.1x\r\n", "550 5.1.1.1 x\r\n", "550 5.1234.1 x\r\n", "550 5.1.1234 x\r\n",
        "550 51.1.1 x\r\n", "550 5,1,1 x\r\n", "550 5.a.1 x\r\n", "550 5.1.a x\r\n",
        "550 5.1.1\tx\r\n", "550  5.1.1 x\r\n", "550 5.1.1-x\r\n", "550 5.-1.1 x\r\n",
        /* classes other than 2, 4, 5, and a class that disagrees with the code */
        "550 6.1.1 x\r\n", "550 3.1.1 x\r\n", "354 3.0.0 go ahead\r\n", "550 2.0.0 x\r\n",
        "250 5.1.1 x\r\n", "450 5.1.1 x\r\n", "550 4.1.1 x\r\n",
    };
    for (size_t k = 0; k < sizeof bad / sizeof bad[0]; k++) enh_case(bad[k], 0, 0, 0);
}

/* ---- errors ----------------------------------------------------------- */

static void test_errors(void)
{
    const enum smtp_reply_status SYN = SMTP_REPLY_ERR_SYNTAX, MIS = SMTP_REPLY_ERR_CODE_MISMATCH;

    /* Not three digits then SP, "-" or the line end; the offending byte is
     * the last one consumed. */
    error_case(S("\r\n"), 0, 0, SYN, 1, 0);
    error_case(S("\n"), 0, 0, SYN, 1, 0);
    error_case(S("25 ok\r\n"), 0, 0, SYN, 3, 0);
    error_case(S("25\r\n"), 0, 0, SYN, 3, 0);
    error_case(S("2500 ok\r\n"), 0, 0, SYN, 4, 0);
    error_case(S("250x\r\n"), 0, 0, SYN, 4, 0);
    error_case(S("250\tok\r\n"), 0, 0, SYN, 4, 0);
    error_case(S("250\rX"), 0, 0, SYN, 5, 0);
    error_case(S("250\r\r\n"), 0, 0, SYN, 5, 0);
    error_case(S(" 250 ok\r\n"), 0, 0, SYN, 1, 0);
    error_case(S("abc ok\r\n"), 0, 0, SYN, 1, 0);
    error_case(S("2a0 ok\r\n"), 0, 0, SYN, 2, 0);
    error_case(S("25a ok\r\n"), 0, 0, SYN, 3, 0);
    error_case(S("HTTP/1.1 400 Bad Request\r\n"), 0, 0, SYN, 1, 0);
    error_case(S("+OK POP3 ready\r\n"), 0, 0, SYN, 1, 0);
    /* First digits outside 2..5 (RFC 5321 §4.2). */
    error_case(S("150 ok\r\n"), 0, 0, SYN, 1, 0);
    error_case(S("050 ok\r\n"), 0, 0, SYN, 1, 0);
    error_case(S("650 ok\r\n"), 0, 0, SYN, 1, 0);
    error_case(S("999 ok\r\n"), 0, 0, SYN, 1, 0);
    /* Second and third digit are any digit. */
    reply_case(S("299 ok\r\n"), 299, "ok", 1, 0);
    reply_case(S("590 ok\r\n"), 590, "ok", 1, 0);
    /* Continuation lines follow the same grammar. */
    error_case(S("250-a\r\n\r\n"), 0, 0, SYN, 8, 0);
    error_case(S("250-a\r\nfoo\r\n"), 0, 0, SYN, 8, 0);
    error_case(S("250-a\r\n25x b\r\n"), 0, 0, SYN, 10, 0);
    error_case(S("250-a\r\n250x\r\n"), 0, 0, SYN, 11, 0);
    error_case(S("250-a\r\n 250 b\r\n"), 0, 0, SYN, 8, 0);
    /* The code changes between lines (RFC 5321 §4.2.1). */
    error_case(S("250-a\r\n251 b\r\n"), 0, 0, MIS, 10, 0);
    error_case(S("250-a\r\n350 b\r\n"), 0, 0, MIS, 8, 0);
    error_case(S("250-a\r\n240 b\r\n"), 0, 0, MIS, 9, 0);
    error_case(S("250-a\r\n250-b\r\n550 c\r\n"), 0, 0, MIS, 15, 0);
    error_case(S("250-a\n251 b\n"), 0, 0, MIS, 9, 0);
    /* A syntax error beats a mismatch on the same byte. */
    error_case(S("250-a\r\n650 b\r\n"), 0, 0, SYN, 8, 0);
    /* After good replies: those stand, then the error. */
    error_case(S("250 ok\r\nXYZ\r\n"), 0, 0, SYN, 9, 1);
    error_case(S("250 ok\r\n354 go\r\n250-a\r\n251 b\r\n"), 0, 0, MIS, 26, 2);
    /* A lone CR is not a line end; nothing is complete. */
    feed_case(S("250 ok\r250 ok\r"), 0, 0);
    CHECK(oc.status == SMTP_REPLY_OK && oc.nr == 0, "CR is not a line end");

    /* Once failed, the reader takes nothing more. */
    struct smtp_reply_parser p;
    static struct smtp_reply r;
    int complete = -1;
    smtp_reply_init(&p, 0, 0);
    CHECK(smtp_reply_feed(&p, S("25x 250 ok\r\n"), &r, &complete) == 3 && !complete &&
          p.status == SMTP_REPLY_ERR_SYNTAX, "fails at the x");
    complete = -1;
    CHECK(smtp_reply_feed(&p, S("250 ok\r\n"), &r, &complete) == 0 && complete == 0 &&
          p.status == SMTP_REPLY_ERR_SYNTAX, "nothing after the error");
    /* init starts over (as after STARTTLS). */
    smtp_reply_init(&p, 0, 0);
    CHECK(smtp_reply_feed(&p, S("250 ok\r\n"), &r, &complete) == 8 && complete == 1 &&
          p.status == SMTP_REPLY_OK, "init after an error");

    /* Names for logs. */
    CHECK(strcmp(smtp_reply_status_str(SMTP_REPLY_OK), "ok") == 0, "status_str ok");
    for (int st = SMTP_REPLY_ERR_SYNTAX; st <= SMTP_REPLY_ERR_TOO_MANY_LINES; st++)
        CHECK(strcmp(smtp_reply_status_str((enum smtp_reply_status)st), "unknown reply status") != 0,
              "status_str %d", st);
    CHECK(strcmp(smtp_reply_status_str((enum smtp_reply_status)99), "unknown reply status") == 0,
          "status_str 99");
}

/* ---- limits ----------------------------------------------------------- */

static char big[3 * 8192 + 1024];

/* "DDD" sep, `len` copies of `fill`, then `end`, appended at big + o. */
static size_t put_line(size_t o, const char *code_sep, size_t len, char fill, const char *end)
{
    size_t k = strlen(code_sep), e = strlen(end);
    memcpy(big + o, code_sep, k);
    memset(big + o + k, fill, len);
    memcpy(big + o + k + len, end, e);
    return o + k + len + e;
}

static void test_line_limit(void)
{
    struct smtp_reply_parser p;
    const enum smtp_reply_status LONG = SMTP_REPLY_ERR_LINE_TOO_LONG;

    smtp_reply_init(&p, 0, 0);
    CHECK(p.max_line == SMTP_REPLY_DEFAULT_MAX_LINE && p.max_line == 4096 &&
          p.max_lines == SMTP_REPLY_DEFAULT_MAX_LINES && p.max_lines == 100 &&
          p.status == SMTP_REPLY_OK, "defaults");
    smtp_reply_init(&p, 512, 7);
    CHECK(p.max_line == 512 && p.max_lines == 7, "chosen limits");

    /* max_line counts every octet, code and CRLF included: "250 abcd\r\n" is 10. */
    reply_case(S("250 abcd\r\n"), 250, "abcd", 1, 0);
    feed_case(S("250 abcd\r\n"), 10, 0);
    CHECK(oc.status == SMTP_REPLY_OK && oc.nr == 1, "10 octets, max 10");
    error_case(S("250 abcd\r\n"), 9, 0, LONG, 10, 0);          /* the LF is octet 10 */
    error_case(S("250 abcde\r\n"), 10, 0, LONG, 11, 0);
    error_case(S("250 abcdefgh"), 10, 0, LONG, 11, 0);         /* found before any line end */
    error_case(S("250 abcdefghij\r\n"), 10, 0, LONG, 11, 0);
    /* A bare LF line is one octet shorter. */
    feed_case(S("250 abcde\n"), 10, 0);
    CHECK(oc.status == SMTP_REPLY_OK && oc.nr == 1 && oc.r[0].flags == SMTP_REPLY_BARE_LF,
          "bare LF line of 10, max 10");
    /* A pending CR counts when it arrives. */
    error_case(S("250 abcde\rx"), 10, 0, LONG, 11, 0);
    feed_case(S("250 abcde\r"), 10, 0);
    CHECK(oc.status == SMTP_REPLY_OK && oc.nr == 0 && oc.used == 10, "CR as octet 10 waits");
    /* Per line: the count starts over on the next line, also after a bare LF. */
    feed_case(S("250-abcd\r\n250-abcd\r\n250 abcd\r\n"), 10, 0);
    CHECK(oc.status == SMTP_REPLY_OK && oc.nr == 1 && oc.r[0].nlines == 3, "three lines of 10");
    error_case(S("250-abcd\r\n250 abcde\r\n"), 10, 0, LONG, 21, 0);
    error_case(S("250-abcde\n250 abcde\r\n"), 10, 0, LONG, 21, 0);
    /* Tiny limits still hold. */
    error_case(S("250\r\n"), 4, 0, LONG, 5, 0);
    error_case(S("250\r\n"), 1, 0, LONG, 2, 0);
    feed_case(S("250\n"), 4, 0);
    CHECK(oc.status == SMTP_REPLY_OK && oc.nr == 1, "\"250\\n\", max 4");
    /* A syntax error before the limit is what is reported. */
    error_case(S("25x abcdefghij\r\n"), 10, 0, SMTP_REPLY_ERR_SYNTAX, 3, 0);
    /* The length wins on the same byte. */
    error_case(S("25x"), 2, 0, LONG, 3, 0);

    /* The default: 4096 octets pass, 4097 do not. */
    size_t o = put_line(0, "250 ", 4090, 'x', "\r\n");
    feed_case(big, o, 0, 0);
    CHECK(o == 4096 && oc.status == SMTP_REPLY_OK && oc.nr == 1 && oc.r[0].text_len == 4090 &&
          oc.r[0].flags == 0, "4096 octets: status %d", oc.status);
    o = put_line(0, "250 ", 4091, 'x', "\r\n");
    error_case(big, o, 0, 0, LONG, 4097, 0);
    o = put_line(0, "250 ", 4091, 'x', "\n");
    feed_case(big, o, 0, 0);
    CHECK(o == 4096 && oc.status == SMTP_REPLY_OK && oc.nr == 1, "4096 octets with bare LF");
    /* 512, RFC 5321 §4.5.3.1.5, as a caller might choose. */
    o = put_line(0, "250 ", 506, 'y', "\r\n");
    feed_case(big, o, 512, 0);
    CHECK(o == 512 && oc.status == SMTP_REPLY_OK && oc.nr == 1, "512 octets, max 512");
    o = put_line(0, "250 ", 507, 'y', "\r\n");
    error_case(big, o, 512, 0, LONG, 513, 0);
}

static void test_lines_limit(void)
{
    const enum smtp_reply_status MANY = SMTP_REPLY_ERR_TOO_MANY_LINES;

    feed_case(S("250-a\r\n250-b\r\n250 c\r\n"), 0, 3);
    CHECK(oc.status == SMTP_REPLY_OK && oc.nr == 1 && oc.r[0].nlines == 3, "3 lines, max 3");
    /* Refused at the "-" that promises line 4. */
    error_case(S("250-a\r\n250-b\r\n250-c\r\n250 d\r\n"), 0, 3, MANY, 18, 0);
    error_case(S("250-a\r\n250-b\r\n250-"), 0, 3, MANY, 18, 0);
    error_case(S("250-a\r\n"), 0, 1, MANY, 4, 0);
    feed_case(S("250 a\r\n250 b\r\n"), 0, 1);
    CHECK(oc.status == SMTP_REPLY_OK && oc.nr == 2, "one-line replies, max 1");
    /* The count is per reply. */
    feed_case(S("250-a\r\n250 b\r\n250-c\r\n250 d\r\n"), 0, 2);
    CHECK(oc.status == SMTP_REPLY_OK && oc.nr == 2, "two replies of 2, max 2");
    /* A code mismatch on the line past the limit comes too late: the "-"
     * already failed. */
    error_case(S("250-a\r\n251 b\r\n"), 0, 1, MANY, 4, 0);

    /* The default: 100 lines pass, 101 do not. */
    size_t o = 0;
    for (int k = 0; k < 99; k++) o = put_line(o, "250-", 3, 'l', "\r\n");
    size_t before_last = o;
    o = put_line(o, "250 ", 3, 'z', "\r\n");
    feed_case(big, o, 0, 0);
    CHECK(oc.status == SMTP_REPLY_OK && oc.nr == 1 && oc.r[0].nlines == 100 &&
          oc.r[0].text_len == 100 * 4 - 1, "100 lines: status %d", oc.status);
    o = put_line(before_last, "250-", 3, 'l', "\r\n");
    o = put_line(o, "250 ", 3, 'z', "\r\n");
    error_case(big, o, 0, 0, MANY, before_last + 4, 0);
}

static void test_text_limit(void)
{
    /* One line: 4096 octets of text fit, 4097 are cut (max_line raised). */
    size_t o = put_line(0, "250 ", 4096, 't', "\r\n");
    feed_case(big, o, 8192, 0);
    CHECK(oc.nr == 1 && oc.r[0].text_len == 4096 && oc.r[0].flags == 0 &&
          oc.r[0].text[4096] == 0, "4096 octets of text");
    o = put_line(0, "250 ", 4097, 't', "\r\n");
    feed_case(big, o, 8192, 0);
    CHECK(oc.nr == 1 && oc.r[0].text_len == 4096 && oc.r[0].flags == SMTP_REPLY_TRUNCATED &&
          oc.r[0].text[4095] == 't' && oc.r[0].text[4096] == 0, "4097 octets of text");
    /* Two lines: the "\n" between them counts. */
    o = put_line(0, "250-", 2047, 'a', "\r\n");
    o = put_line(o, "250 ", 2048, 'b', "\r\n");
    feed_case(big, o, 0, 0);
    CHECK(oc.nr == 1 && oc.r[0].text_len == 4096 && oc.r[0].flags == 0 &&
          oc.r[0].text[2047] == '\n' && oc.r[0].text[4095] == 'b', "2047 + 1 + 2048");
    o = put_line(0, "250-", 2047, 'a', "\r\n");
    o = put_line(o, "250 ", 2049, 'b', "\r\n");
    feed_case(big, o, 0, 0);
    CHECK(oc.nr == 1 && oc.r[0].text_len == 4096 && oc.r[0].flags == SMTP_REPLY_TRUNCATED &&
          oc.r[0].text[4095] == 'b', "2047 + 1 + 2049");
    /* The separator itself is the octet that does not fit. */
    o = put_line(0, "250-", 4096, 'a', "\r\n");
    o = put_line(o, "250 ", 1, 'b', "\r\n");
    feed_case(big, o, 8192, 0);
    CHECK(oc.nr == 1 && oc.r[0].text_len == 4096 && oc.r[0].flags == SMTP_REPLY_TRUNCATED &&
          oc.r[0].text[4095] == 'a' && oc.r[0].nlines == 2, "separator cut");
    /* A truncated reply does not spill into the next. */
    o = put_line(0, "250 ", 5000, 'x', "\r\n");
    o = put_line(o, "251 ", 2, 'y', "\r\n");
    feed_case(big, o, 8192, 0);
    CHECK(oc.nr == 2 && oc.r[1].code == 251 && mem_is(oc.r[1].text, oc.r[1].text_len, "yy") &&
          oc.r[1].flags == 0, "after a truncated reply");
    /* Many lines, a lot of text: cut, with the enhanced code still read. */
    o = 0;
    for (int k = 0; k < 99; k++) o = put_line(o, k ? "550-" : "550-5.7.1 ", 100, 'm', "\r\n");
    o = put_line(o, "550 ", 10, 'e', "\r\n");
    feed_case(big, o, 0, 0);
    CHECK(oc.nr == 1 && oc.r[0].nlines == 100 && oc.r[0].text_len == 4096 &&
          oc.r[0].flags == SMTP_REPLY_TRUNCATED && oc.r[0].enhanced.cls == 5 &&
          oc.r[0].enhanced.subject == 7 && oc.r[0].enhanced.detail == 1, "long 550");
}

/* ---- EHLO ------------------------------------------------------------- */

static struct smtp_ehlo_caps caps;

static int ehlo(const char *in)
{
    run(in, strlen(in), 0, 0, NULL, 0, &oc);
    if (oc.nr != 1 || oc.status != SMTP_REPLY_OK) {
        fprintf(stderr, "  \"%s\" is not one reply\n", check_show(in, strlen(in)));
        return -999;
    }
    memset(&caps, 0x5a, sizeof caps);
    return smtp_reply_ehlo_parse(&oc.r[0], &caps);
}

static void ehlo_case(const char *in, uint32_t ext, uint32_t auth, uint64_t size)
{
    int rc = ehlo(in);
    CHECK(rc == 0, "\"%s\": rc %d", check_show(in, strlen(in)), rc);
    CHECK(caps.ext == ext && caps.auth == auth && caps.size == size,
          "\"%s\": ext %#x auth %#x size %llu, want %#x %#x %llu", check_show(in, strlen(in)),
          caps.ext, caps.auth, (unsigned long long)caps.size, ext, auth,
          (unsigned long long)size);
}

static void test_ehlo(void)
{
    /* Postfix, as it answers a client it offers everything to. */
    ehlo_case("250-mail.example.org\r\n"
              "250-PIPELINING\r\n"
              "250-SIZE 10240000\r\n"
              "250-VRFY\r\n"
              "250-ETRN\r\n"
              "250-STARTTLS\r\n"
              "250-AUTH PLAIN LOGIN\r\n"
              "250-AUTH=PLAIN LOGIN\r\n"
              "250-ENHANCEDSTATUSCODES\r\n"
              "250-8BITMIME\r\n"
              "250-DSN\r\n"
              "250-SMTPUTF8\r\n"
              "250 CHUNKING\r\n",
              SMTP_EXT_PIPELINING | SMTP_EXT_SIZE | SMTP_EXT_STARTTLS | SMTP_EXT_AUTH |
              SMTP_EXT_ENHANCEDSTATUSCODES | SMTP_EXT_8BITMIME | SMTP_EXT_DSN |
              SMTP_EXT_SMTPUTF8 | SMTP_EXT_CHUNKING,
              SMTP_AUTH_PLAIN | SMTP_AUTH_LOGIN, 10240000);
    /* Exchange: a greeting with the client's address, AUTH twice, the
     * second in the old "AUTH=" form, and keywords we do not track. */
    ehlo_case("250-EX01.contoso.example Hello [192.0.2.10]\r\n"
              "250-SIZE 37748736\r\n"
              "250-PIPELINING\r\n"
              "250-DSN\r\n"
              "250-ENHANCEDSTATUSCODES\r\n"
              "250-STARTTLS\r\n"
              "250-X-ANONYMOUSTLS\r\n"
              "250-AUTH NTLM\r\n"
              "250-AUTH=LOGIN\r\n"
              "250-X-EXPS GSSAPI NTLM\r\n"
              "250-8BITMIME\r\n"
              "250-BINARYMIME\r\n"
              "250-CHUNKING\r\n"
              "250 XRDST\r\n",
              SMTP_EXT_SIZE | SMTP_EXT_PIPELINING | SMTP_EXT_DSN |
              SMTP_EXT_ENHANCEDSTATUSCODES | SMTP_EXT_STARTTLS | SMTP_EXT_AUTH |
              SMTP_EXT_8BITMIME | SMTP_EXT_CHUNKING,
              SMTP_AUTH_LOGIN | SMTP_AUTH_OTHER, 37748736);
    /* Only the old form. */
    ehlo_case("250-x\r\n250 AUTH=LOGIN PLAIN\r\n", SMTP_EXT_AUTH,
              SMTP_AUTH_LOGIN | SMTP_AUTH_PLAIN, 0);
    /* A submission service with more mechanisms than we name. */
    ehlo_case("250-smtp.example.com at your service, [203.0.113.5]\r\n"
              "250-SIZE 35882577\r\n"
              "250-8BITMIME\r\n"
              "250-AUTH LOGIN PLAIN XOAUTH2 PLAIN-CLIENTTOKEN OAUTHBEARER XOAUTH\r\n"
              "250-ENHANCEDSTATUSCODES\r\n"
              "250-PIPELINING\r\n"
              "250-CHUNKING\r\n"
              "250 SMTPUTF8\r\n",
              SMTP_EXT_SIZE | SMTP_EXT_8BITMIME | SMTP_EXT_AUTH |
              SMTP_EXT_ENHANCEDSTATUSCODES | SMTP_EXT_PIPELINING | SMTP_EXT_CHUNKING |
              SMTP_EXT_SMTPUTF8,
              SMTP_AUTH_LOGIN | SMTP_AUTH_PLAIN | SMTP_AUTH_OTHER, 35882577);
    /* SIZE without a value, and SIZE 0: no limit given (RFC 1870 §4). */
    ehlo_case("250-mx.example.net\r\n250 SIZE\r\n", SMTP_EXT_SIZE, 0, 0);
    ehlo_case("250-mx.example.net\r\n250 SIZE 0\r\n", SMTP_EXT_SIZE, 0, 0);
    ehlo_case("250-mx.example.net\r\n250-SIZE   2048   \r\n250 DSN\r\n",
              SMTP_EXT_SIZE | SMTP_EXT_DSN, 0, 2048);
    ehlo_case("250-x\r\n250 SIZE 18446744073709551615\r\n", SMTP_EXT_SIZE, 0, UINT64_MAX);
    ehlo_case("250-x\r\n250 SIZE 18446744073709551616\r\n", SMTP_EXT_SIZE, 0, UINT64_MAX);
    ehlo_case("250-x\r\n250 SIZE 99999999999999999999999999\r\n", SMTP_EXT_SIZE, 0, UINT64_MAX);
    ehlo_case("250-x\r\n250 SIZE abc\r\n", SMTP_EXT_SIZE, 0, 0);
    ehlo_case("250-x\r\n250 SIZE 12k\r\n", SMTP_EXT_SIZE, 0, 0);
    ehlo_case("250-x\r\n250 SIZE -1\r\n", SMTP_EXT_SIZE, 0, 0);
    /* Any case; a leading space; bare LF line ends. */
    ehlo_case("250-x\r\n250-pipelining\r\n250-Size 1000\r\n250-StartTLS\r\n250 auth=login\r\n",
              SMTP_EXT_PIPELINING | SMTP_EXT_SIZE | SMTP_EXT_STARTTLS | SMTP_EXT_AUTH,
              SMTP_AUTH_LOGIN, 1000);
    ehlo_case("250-x\r\n250-auth plain Login cram-md5\r\n250  8bitmime\r\n",
              SMTP_EXT_AUTH | SMTP_EXT_8BITMIME, SMTP_AUTH_PLAIN | SMTP_AUTH_LOGIN | SMTP_AUTH_OTHER, 0);
    ehlo_case("250-x\n250-PIPELINING\n250 STARTTLS\n", SMTP_EXT_PIPELINING | SMTP_EXT_STARTTLS, 0, 0);
    /* AUTH with no mechanisms still says AUTH. */
    ehlo_case("250-x\r\n250 AUTH\r\n", SMTP_EXT_AUTH, 0, 0);
    ehlo_case("250-x\r\n250 AUTH=\r\n", SMTP_EXT_AUTH, 0, 0);
    /* Near misses are not keywords. */
    ehlo_case("250-x\r\n250-PIPELININGX\r\n250-XSIZE 5\r\n250-AUTHX PLAIN\r\n"
              "250-STARTTLS-NOT\r\n250-SIZE=5\r\n250-PIPELINING=1\r\n250-8BIT MIME\r\n"
              "250 DSNX\r\n", 0, 0, 0);
    ehlo_case("250-x\r\n250-PLAIN LOGIN\r\n250 \r\n", 0, 0, 0);
    /* The first line is the server's name, whatever it says. */
    ehlo_case("250 PIPELINING\r\n", 0, 0, 0);
    ehlo_case("250-STARTTLS\r\n250 DSN\r\n", SMTP_EXT_DSN, 0, 0);
    ehlo_case("250 mail.example.org Hello\r\n", 0, 0, 0);

    /* Not a 250: nothing, and an error. */
    CHECK(ehlo("500 5.5.1 Command unrecognized\r\n") == -EINVAL && caps.ext == 0 &&
          caps.auth == 0 && caps.size == 0, "500");
    CHECK(ehlo("502-x\r\n502 PIPELINING\r\n") == -EINVAL && caps.ext == 0, "502");
    CHECK(ehlo("251-x\r\n251 PIPELINING\r\n") == -EINVAL && caps.ext == 0, "251");

    /* A truncated reply: the cut last line is not read, the rest is. */
    size_t o = 0;
    o = put_line(o, "250-", 10, 'h', "\r\n");
    o = put_line(o, "250-PIPELINING", 0, 0, "\r\n");
    for (int k = 0; k < 41; k++) o = put_line(o, "250-X-", 94, 'p', "\r\n");
    o = put_line(o, "250-X-", 82, 'q', "\r\n");
    o = put_line(o, "250-SIZE 12345678", 0, 0, "\r\n");   /* "SIZE 1234567" at the cut */
    o = put_line(o, "250 STARTTLS", 0, 0, "\r\n");
    run(big, o, 0, 0, NULL, 0, &oc);
    size_t cut_text = 11 + 11 + 41 * 97 + 85;              /* text before the SIZE line */
    CHECK(oc.nr == 1 && (oc.r[0].flags & SMTP_REPLY_TRUNCATED) &&
          cut_text + 7 < SMTP_REPLY_TEXT_MAX && cut_text + 17 > SMTP_REPLY_TEXT_MAX,
          "the cut falls in the SIZE line (%zu)", cut_text);
    CHECK(smtp_reply_ehlo_parse(&oc.r[0], &caps) == 0 && caps.ext == SMTP_EXT_PIPELINING &&
          caps.size == 0, "truncated EHLO: ext %#x size %llu", caps.ext,
          (unsigned long long)caps.size);
    /* Without the flag the last line is read. */
    static struct smtp_reply r;
    memset(&r, 0, sizeof r);
    r.code = 250;
    r.text_len = (size_t)sprintf(r.text, "x\nSIZE 12");
    CHECK(smtp_reply_ehlo_parse(&r, &caps) == 0 && caps.size == 12, "untruncated last line");
    r.flags = SMTP_REPLY_TRUNCATED;
    CHECK(smtp_reply_ehlo_parse(&r, &caps) == 0 && caps.ext == 0, "truncated last line");
    /* A text_len out of range is clamped, not followed. */
    r.flags = 0;
    r.text_len = (size_t)-1;
    CHECK(smtp_reply_ehlo_parse(&r, &caps) == 0, "text_len clamped");
}

/* ---- everything at once ----------------------------------------------- */

/* All sequences of up to 6 tokens, each with two sets of limits, against
 * the model at every split. */
static void test_exhaustive(void)
{
    static const char *tok[] = { "250", "251", "5", " ", "-", "\r", "\n", "5.1.1" };
    const size_t ntok = sizeof tok / sizeof tok[0];
    char in[64];
    int bad = 0;
    size_t count = 0;

    for (size_t len = 1; len <= 6 && bad < 3; len++) {
        size_t idx[6] = { 0 };
        for (;;) {
            size_t n = 0;
            for (size_t k = 0; k < len; k++) {
                size_t l = strlen(tok[idx[k]]);
                memcpy(in + n, tok[idx[k]], l);
                n += l;
            }
            bad += check_all_splits(in, n, 0, 0, 0);
            bad += check_all_splits(in, n, 6, 2, 0);
            count++;
            size_t k = 0;
            while (k < len && ++idx[k] == ntok) idx[k++] = 0;
            if (k == len || bad >= 3) break;
        }
    }
    CHECK(bad == 0, "%d mismatches in %zu token sequences", bad, count);
    printf("exhaustive: %zu token sequences\n", count);
}

/* Longer inputs: mostly well-formed replies with damage here and there. */
static void test_random(void)
{
    static char in[4096];
    uint64_t seed = 0x9e3779b97f4a7c15u;
    int bad = 0;

    for (int round = 0; round < 3000 && bad < 3; round++) {
        size_t n = 0, target = 16 + (size_t)(round % 300);
        while (n + 16 < target) {
            seed = seed * 6364136223846793005u + 1442695040888963407u;
            unsigned r = (unsigned)(seed >> 33);
            static const char *codes[] = { "250", "220", "354", "421", "550", "251", "199" };
            const char *code = codes[r % 7 < 5 ? (r >> 3) % 5 : 5 + (r >> 3) % 2];
            memcpy(in + n, code, 3);
            n += 3;
            in[n++] = r % 5 == 0 ? ' ' : r % 5 == 1 ? ' ' : r % 5 == 2 ? '-' : r % 5 == 3 ? '-' : "\r\n\tx"[(r >> 5) % 4];
            if (r % 4 == 0) {
                memcpy(in + n, "5.1.1 ", 6);
                n += 6;
            }
            for (unsigned k = (r >> 7) % 9; k > 0; k--) {
                unsigned q = (r >> 11) + k * 7;
                in[n++] = q % 23 == 0 ? '\r' : q % 29 == 0 ? '\n' : (char)('a' + q % 26);
            }
            if ((r >> 13) % 7 == 0) in[n++] = '\n';
            else if ((r >> 13) % 31 != 1) in[n++] = '\r', in[n++] = '\n';
        }
        bad += check_all_splits(in, n, 4 + (size_t)(round % 40), 1 + (unsigned)(round % 5), 0);
        bad += check_all_splits(in, n, 0, 0, 0);
    }
    CHECK(bad == 0, "%d mismatches in random inputs", bad);
}

int main(void)
{
    test_single_line();
    test_multi_line();
    test_pipelined();
    test_line_ends();
    test_enhanced();
    test_errors();
    test_line_limit();
    test_lines_limit();
    test_text_limit();
    test_ehlo();
    test_exhaustive();
    test_random();

    return check_summary();
}
