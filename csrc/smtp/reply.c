/* SMTP reply reader (see reply.h): RFC 5321 §4.2 replies, one byte state
 * machine with a fast path over line text, and the EHLO keyword list of
 * §4.1.1.1. Replies cannot smuggle anything, so a bare LF is taken as a
 * line end; everything else that breaks the grammar ends the session. */
#include "smtp/reply.h"

#include <errno.h>
#include <string.h>

/* The enhanced code must fit in the text buffer to be seen at all. */
_Static_assert(SMTP_REPLY_TEXT_MAX >= 16, "text buffer too small for 5.999.999");

enum {
    RS_START = 0,   /* between replies: the next byte starts a new one */
    RS_CODE,        /* in the three digits of a line (line_len 0..2 before the byte) */
    RS_SEP,         /* after the digits: SP, "-", CR or LF */
    RS_SEP_CR,      /* "DDD\r": only LF may follow */
    RS_TEXT,        /* in the text of a line */
    RS_TEXT_CR,     /* in the text, last byte a CR not yet copied */
    RS_ERROR,
};

void smtp_reply_init(struct smtp_reply_parser *p, size_t max_line, unsigned max_lines)
{
    p->status = SMTP_REPLY_OK;
    p->max_line = max_line ? max_line : SMTP_REPLY_DEFAULT_MAX_LINE;
    p->max_lines = max_lines ? max_lines : SMTP_REPLY_DEFAULT_MAX_LINES;
    p->state = RS_START;
    p->lines = 0;
    p->final = 0;
    p->line_len = 0;
}

const char *smtp_reply_status_str(enum smtp_reply_status st)
{
    switch (st) {
    case SMTP_REPLY_OK: return "ok";
    case SMTP_REPLY_ERR_SYNTAX: return "malformed reply line";
    case SMTP_REPLY_ERR_CODE_MISMATCH: return "reply code changed within a multi-line reply";
    case SMTP_REPLY_ERR_LINE_TOO_LONG: return "reply line too long";
    case SMTP_REPLY_ERR_TOO_MANY_LINES: return "too many lines in one reply";
    }
    return "unknown reply status";
}

/* Append to the text, keeping what fits. text_len is checked rather than
 * trusted, so a caller that swaps `out` mid-reply gets garbage, not an
 * overflow. */
static void text_add(struct smtp_reply *r, const char *s, size_t k)
{
    size_t room = r->text_len < SMTP_REPLY_TEXT_MAX ? SMTP_REPLY_TEXT_MAX - r->text_len : 0;

    if (k > room) {
        r->flags |= SMTP_REPLY_TRUNCATED;
        k = room;
    }
    memcpy(r->text + r->text_len, s, k);
    r->text_len += k;
}

/* RFC 3463 §2 at the start of the first line's text: class "." 1*3digit
 * "." 1*3digit, then SP or the end of the line (RFC 2034 §4 puts one or
 * more spaces after it). RFC 2034 §4 also makes the class agree with the
 * reply code, so "550 2.0.0" carries no usable enhanced code. */
static void parse_enhanced(struct smtp_reply *r)
{
    const char *s = r->text;
    size_t n = r->text_len < SMTP_REPLY_TEXT_MAX ? r->text_len : SMTP_REPLY_TEXT_MAX, i;
    unsigned part[3];

    if (n == 0 || (s[0] != '2' && s[0] != '4' && s[0] != '5')) return;
    if ((unsigned)(s[0] - '0') != r->code / 100) return;
    part[0] = (unsigned)(s[0] - '0');
    i = 1;
    for (int k = 1; k < 3; k++) {
        size_t start;
        if (i >= n || s[i] != '.') return;
        start = ++i;
        part[k] = 0;
        while (i < n && i - start < 3 && s[i] >= '0' && s[i] <= '9')
            part[k] = part[k] * 10 + (unsigned)(s[i++] - '0');
        if (i == start) return;
    }
    /* A fourth digit or anything but SP makes it something else. */
    if (i < n && s[i] != ' ') return;
    r->enhanced.cls = part[0];
    r->enhanced.subject = part[1];
    r->enhanced.detail = part[2];
}

static void reply_start(struct smtp_reply *r)
{
    r->code = 0;
    r->enhanced.cls = r->enhanced.subject = r->enhanced.detail = 0;
    r->nlines = 0;
    r->flags = 0;
    r->text_len = 0;
    r->text[0] = '\0';
}

/* A line ended (its LF consumed). Returns 1 when the reply is complete. */
static int line_end(struct smtp_reply_parser *p, struct smtp_reply *r)
{
    if (p->lines == 1) parse_enhanced(r);
    p->line_len = 0;
    if (p->final) {
        r->nlines = p->lines;
        r->text[r->text_len < SMTP_REPLY_TEXT_MAX ? r->text_len : SMTP_REPLY_TEXT_MAX] = '\0';
        p->state = RS_START;
        return 1;
    }
    text_add(r, "\n", 1);
    p->state = RS_CODE;
    return 0;
}

static size_t fail(struct smtp_reply_parser *p, enum smtp_reply_status st, size_t used)
{
    p->status = st;
    p->state = RS_ERROR;
    return used;
}

size_t smtp_reply_feed(struct smtp_reply_parser *p, const char *in, size_t n,
                       struct smtp_reply *out, int *complete)
{
    size_t i = 0;

    *complete = 0;
    if (p->status != SMTP_REPLY_OK || p->state == RS_ERROR) return 0;

    while (i < n) {
        if (p->state == RS_START) {
            reply_start(out);
            p->lines = 0;
            p->final = 0;
            p->line_len = 0;
            p->state = RS_CODE;
        }
        if (p->state == RS_TEXT) {
            /* Copy the run up to the next CR or LF, but no further than
             * the line may go; the byte that stops it is handled below. */
            size_t room = p->max_line - p->line_len, k = 0;
            size_t lim = n - i < room ? n - i : room;
            while (k < lim && in[i + k] != '\r' && in[i + k] != '\n') k++;
            if (k) {
                text_add(out, in + i, k);
                p->line_len += k;
                i += k;
                continue;
            }
        }

        unsigned char c = (unsigned char)in[i++];
        /* Every octet of the line counts, its CR and LF too (§4.5.3.1.5). */
        if (++p->line_len > p->max_line)
            return fail(p, SMTP_REPLY_ERR_LINE_TOO_LONG, i);

        switch (p->state) {
        case RS_CODE: {
            size_t pos = p->line_len - 1;
            /* RFC 5321 §4.2: Reply-code = %x32-35 %x30-35 %x30-39. The
             * first digit is held to 2..5, since it decides what the client
             * does (§4.2.1); the second is let through as any digit. */
            int ok = pos == 0 ? (c >= '2' && c <= '5') : (c >= '0' && c <= '9');
            if (!ok) return fail(p, SMTP_REPLY_ERR_SYNTAX, i);
            if (pos == 0) p->lines++;
            if (p->lines == 1) {
                out->code = out->code * 10 + (unsigned)(c - '0');
            } else {
                /* §4.2.1: every line of a multi-line reply has the same code. */
                unsigned want = pos == 0 ? out->code / 100 : pos == 1 ? out->code / 10 % 10
                                                                      : out->code % 10;
                if ((unsigned)(c - '0') != want)
                    return fail(p, SMTP_REPLY_ERR_CODE_MISMATCH, i);
            }
            if (pos == 2) p->state = RS_SEP;
            break;
        }

        case RS_SEP:
            if (c == ' ') {
                p->final = 1;
                p->state = RS_TEXT;
            } else if (c == '-') {
                /* Another line must follow this one: refuse it now. */
                if (p->lines >= p->max_lines)
                    return fail(p, SMTP_REPLY_ERR_TOO_MANY_LINES, i);
                p->final = 0;
                p->state = RS_TEXT;
            } else if (c == '\r') {
                p->final = 1;
                p->state = RS_SEP_CR;
            } else if (c == '\n') {
                /* "DDD" and a line end is always a last line. */
                out->flags |= SMTP_REPLY_BARE_LF;
                p->final = 1;
                line_end(p, out);
                *complete = 1;
                return i;
            } else {
                return fail(p, SMTP_REPLY_ERR_SYNTAX, i);
            }
            break;

        case RS_SEP_CR:
            if (c != '\n') return fail(p, SMTP_REPLY_ERR_SYNTAX, i);
            line_end(p, out);
            *complete = 1;
            return i;

        case RS_TEXT:
            /* Only CR and LF get here: the run above took the rest (or the
             * length check above fired). */
            if (c == '\r') {
                p->state = RS_TEXT_CR;
            } else {
                out->flags |= SMTP_REPLY_BARE_LF;
                if (line_end(p, out)) {
                    *complete = 1;
                    return i;
                }
            }
            break;

        case RS_TEXT_CR:
            if (c == '\n') {
                if (line_end(p, out)) {
                    *complete = 1;
                    return i;
                }
                break;
            }
            /* The CR before this byte was bare: it is text after all. */
            out->flags |= SMTP_REPLY_BARE_CR;
            text_add(out, "\r", 1);
            if (c != '\r') {
                char b = (char)c;
                text_add(out, &b, 1);
                p->state = RS_TEXT;
            }
            break;

        default:    /* RS_START and RS_ERROR are not reached here */
            return fail(p, SMTP_REPLY_ERR_SYNTAX, i);
        }
    }
    return i;
}

/* ---- EHLO ------------------------------------------------------------- */

/* ASCII only: the C library's tolower() follows the locale. */
static unsigned char ascii_lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c | 0x20) : c;
}

/* s[0..n) equals the lower-case literal `lit` ignoring ASCII case. */
static int token_is(const char *s, size_t n, const char *lit)
{
    if (n != strlen(lit)) return 0;
    for (size_t i = 0; i < n; i++)
        if (ascii_lower((unsigned char)s[i]) != (unsigned char)lit[i]) return 0;
    return 1;
}

static int is_space(char c) { return c == ' ' || c == '\t'; }

/* The next space-separated token of s[*i..n), or length 0 at the end. */
static size_t next_token(const char *s, size_t n, size_t *i, const char **tok)
{
    size_t k = *i;

    while (k < n && is_space(s[k])) k++;
    *tok = s + k;
    size_t start = k;
    while (k < n && !is_space(s[k])) k++;
    *i = k;
    return k - start;
}

/* RFC 1870 §4: size-param = 1*20DIGIT. A value past 2^64-1 is taken as
 * the largest we can hold; anything not a number as no limit given. */
static uint64_t parse_size(const char *s, size_t n)
{
    uint64_t v = 0;

    for (size_t i = 0; i < n; i++) {
        unsigned d = (unsigned)(unsigned char)s[i] - '0';
        if (d > 9) return 0;
        if (v > (UINT64_MAX - d) / 10) v = UINT64_MAX;
        else v = v * 10 + d;
    }
    return v;
}

static const struct ehlo_keyword {
    const char *name;   /* lower case */
    uint32_t bit;
} ehlo_keywords[] = {
    { "pipelining", SMTP_EXT_PIPELINING },
    { "size", SMTP_EXT_SIZE },
    { "8bitmime", SMTP_EXT_8BITMIME },
    { "smtputf8", SMTP_EXT_SMTPUTF8 },
    { "starttls", SMTP_EXT_STARTTLS },
    { "chunking", SMTP_EXT_CHUNKING },
    { "dsn", SMTP_EXT_DSN },
    { "enhancedstatuscodes", SMTP_EXT_ENHANCEDSTATUSCODES },
    { "auth", SMTP_EXT_AUTH },
};

/* One ehlo-line (RFC 5321 §4.1.1.1): keyword, then parameters after SP.
 * "AUTH=" and mechanisms is the obsolete pre-RFC 2554 form that old
 * Outlook Express and Exchange clients look for; servers still send it
 * next to "AUTH", and some send only it. */
static void ehlo_line(const char *s, size_t n, struct smtp_ehlo_caps *caps)
{
    size_t i = 0, k;
    const char *tok;

    while (i < n && is_space(s[i])) i++;
    k = i;
    while (k < n && !is_space(s[k]) && s[k] != '=') k++;
    const char *kw = s + i;
    size_t kwlen = k - i;
    uint32_t bit = 0;
    for (size_t j = 0; j < sizeof ehlo_keywords / sizeof ehlo_keywords[0]; j++) {
        if (token_is(kw, kwlen, ehlo_keywords[j].name)) {
            bit = ehlo_keywords[j].bit;
            break;
        }
    }
    if (!bit) return;
    /* Only AUTH has a "=" form; "SIZE=5" is no keyword we know. */
    if (k < n && s[k] == '=' && bit != SMTP_EXT_AUTH) return;
    if (k < n) k++;     /* the SP or "=" */
    caps->ext |= bit;

    if (bit == SMTP_EXT_SIZE) {
        size_t len = next_token(s, n, &k, &tok);
        caps->size = parse_size(tok, len);
    } else if (bit == SMTP_EXT_AUTH) {
        size_t len;
        while ((len = next_token(s, n, &k, &tok)) > 0) {
            if (token_is(tok, len, "plain")) caps->auth |= SMTP_AUTH_PLAIN;
            else if (token_is(tok, len, "login")) caps->auth |= SMTP_AUTH_LOGIN;
            else caps->auth |= SMTP_AUTH_OTHER;
        }
    }
}

int smtp_reply_ehlo_parse(const struct smtp_reply *r, struct smtp_ehlo_caps *caps)
{
    size_t n = r->text_len < SMTP_REPLY_TEXT_MAX ? r->text_len : SMTP_REPLY_TEXT_MAX;
    const char *s = r->text;

    caps->ext = 0;
    caps->auth = 0;
    caps->size = 0;
    if (r->code != 250) return -EINVAL;

    /* Line 1 is the server's name and greeting. */
    const char *nl = memchr(s, '\n', n);
    if (!nl) return 0;
    size_t i = (size_t)(nl - s) + 1;
    while (i < n) {
        nl = memchr(s + i, '\n', n - i);
        if (!nl && (r->flags & SMTP_REPLY_TRUNCATED)) break;
        size_t end = nl ? (size_t)(nl - s) : n;
        ehlo_line(s + i, end - i, caps);
        i = end + 1;
    }
    return 0;
}
