/* Delivery Status Notifications (RFC 3464) in a multipart/report (RFC 6522):
 * one bounce, delay or success report written whole into a byte buffer,
 * and the RFC 3461 envelope parameters that shape it. No I/O. */
#include "queue/dsn.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* RFC 5322 §2.1.1: a line SHOULD be at most 78 characters and MUST be at
 * most 998 octets, CRLF excluded. */
#define DSN_LINE_SOFT 78
#define DSN_LINE_HARD 998
/* Where a word too long for any line is cut: under the hard limit with
 * room to spare for an indent. */
#define DSN_CUT 900
/* RFC 1035 §2.3.4 (written out). */
#define DSN_HOST_MAX 253
#define DSN_ID_MAX 128
#define DSN_TYPE_MAX 64
/* RFC 2046 §5.1.1: boundaries are at most 70 characters; the base leaves
 * room for the ".xxxxxxxx" a collision adds. */
#define DSN_BOUNDARY_BASE_MAX 58
#define DSN_BOUNDARY_MAX 70
/* Room for one formatted field or sentence; every input put through it is
 * bounded well under this. */
#define DSN_FMT_MAX 2048

static const char DSN_FROM_NAME[] = "Mail Delivery System";

/* ---- output with a sticky error ---- */

struct w {
    struct bytebuf *b;
    int err;
};

static void put(struct w *w, const void *p, size_t n)
{
    if (w->err == 0 && bytebuf_append(w->b, p, n) < 0) w->err = -ENOMEM;
}

static void put_str(struct w *w, const char *s) { put(w, s, strlen(s)); }

static void put_fmt(struct w *w, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void put_fmt(struct w *w, const char *fmt, ...)
{
    char tmp[DSN_FMT_MAX];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof tmp) {
        if (w->err == 0) w->err = -EINVAL;
        return;
    }
    put(w, tmp, (size_t)n);
}

/* ---- characters ---- */

/* Length of the well-formed UTF-8 sequence at p (RFC 3629 §4: no
 * overlongs, no surrogates, nothing past U+10FFFF), or 0. */
static size_t u8_len(const unsigned char *p, size_t n)
{
    if (n == 0) return 0;
    unsigned char c = p[0];
    if (c < 0x80) return 1;
    size_t len;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) len = 2;
    else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        if (c == 0xE0) lo = 0xA0;
        if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        if (c == 0xF0) lo = 0x90;
        if (c == 0xF4) hi = 0x8F;
    } else
        return 0;
    if (n < len) return 0;
    if (p[1] < lo || p[1] > hi) return 0;
    for (size_t i = 2; i < len; i++)
        if (p[i] < 0x80 || p[i] > 0xBF) return 0;
    return len;
}

static bool is_ctl(unsigned char c) { return c < 0x20 || c == 0x7F; }

static bool is_ascii(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s >= 0x80) return false;
    return true;
}

/* Text we put on a line as it is: 1..max octets, no control characters,
 * well-formed UTF-8 (or ASCII only). */
static bool text_ok(const char *s, size_t max, bool utf8)
{
    size_t n = strlen(s);
    if (n == 0 || n > max) return false;
    const unsigned char *p = (const unsigned char *)s;
    for (size_t i = 0; i < n;) {
        if (is_ctl(p[i])) return false;
        if (p[i] < 0x80) {
            i++;
            continue;
        }
        size_t k = utf8 ? u8_len(p + i, n - i) : 0;
        if (k == 0) return false;
        i += k;
    }
    return true;
}

/* A host name or address literal as Reporting-MTA and Remote-MTA carry it
 * ("dns" names are ASCII, RFC 3464 §2.1, with A-labels for IDNs). */
static bool host_ok(const char *s)
{
    size_t n = strlen(s);
    if (n == 0 || n > DSN_HOST_MAX) return false;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '-' || c == '.' || c == '_' || c == '[' || c == ']' || c == ':'))
            return false;
    }
    return true;
}

/* RFC 5322 §3.2.3 atext. */
static bool is_atext(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           (c != 0 && strchr("!#$%&'*+-/=?^_`{|}~", c) != NULL);
}

/* Address and diagnostic types are atoms (RFC 3464 §2.1). */
static bool atom_ok(const char *s, size_t n)
{
    if (n == 0 || n > DSN_TYPE_MAX) return false;
    for (size_t i = 0; i < n; i++)
        if (!is_atext((unsigned char)s[i])) return false;
    return true;
}

/* RFC 3463 §2: class "." subject "." detail, 1*3 digits for the latter. */
static bool status_ok(const char *s, char *cls)
{
    if (!s || (s[0] != '2' && s[0] != '4' && s[0] != '5') || s[1] != '.') return false;
    *cls = s[0];
    const char *p = s + 2;
    for (int part = 0; part < 2; part++) {
        int digits = 0;
        while (*p >= '0' && *p <= '9') {
            p++;
            digits++;
        }
        if (digits < 1 || digits > 3) return false;
        if (part == 0 && *p++ != '.') return false;
    }
    return *p == '\0';
}

static int hexval(char c)
{
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
}

long dsn_xtext_decode(const char *in, char *buf, size_t cap)
{
    if (!in || !buf || cap == 0) return -1;
    size_t o = 0;
    for (const char *p = in; *p; p++) {
        char c = *p;
        if (c == '+') {
            /* RFC 3461 §4: upper-case hex is what senders must write;
             * lower case is read too (be liberal in what we accept). */
            int hi = hexval(p[1]), lo = hi < 0 ? -1 : hexval(p[2]);
            if (hi < 0 || lo < 0) goto bad;
            c = (char)(hi << 4 | lo);
            p += 2;
        }
        if (o + 1 >= cap) goto bad;
        buf[o++] = c;
    }
    buf[o] = '\0';
    return (long)o;
bad:
    buf[0] = '\0';
    return -1;
}

/* ---- envelope parameters ---- */

/* Find keyword in params: 1 with its value in *val and *len (*val NULL
 * for a keyword without "="), or 0 if absent. */
static int param_find(const char *params, const char *keyword, const char **val, size_t *len)
{
    if (!params || !keyword) return 0;
    size_t klen = strlen(keyword);
    const char *p = params;
    for (;;) {
        while (*p == ' ' || *p == '\t') p++;
        if (*p == '\0') return 0;
        const char *tok = p;
        while (*p && *p != ' ' && *p != '\t') p++;
        const char *eq = memchr(tok, '=', (size_t)(p - tok));
        size_t keylen = eq ? (size_t)(eq - tok) : (size_t)(p - tok);
        if (keylen == klen && strncasecmp(tok, keyword, klen) == 0) {
            *val = eq ? eq + 1 : NULL;
            *len = eq ? (size_t)(p - eq - 1) : 0;
            return 1;
        }
    }
}

unsigned dsn_notify_of(const char *rcpt_params)
{
    const unsigned dflt = DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY;  /* RFC 3461 §4.1 */
    const char *v;
    size_t n;
    if (!param_find(rcpt_params, "NOTIFY", &v, &n) || !v) return dflt;
    unsigned flags = 0;
    bool never = false;
    const char *end = v + n;
    while (v < end) {
        const char *comma = memchr(v, ',', (size_t)(end - v));
        size_t len = comma ? (size_t)(comma - v) : (size_t)(end - v);
        if (len == 7 && strncasecmp(v, "SUCCESS", 7) == 0) flags |= DSN_NOTIFY_SUCCESS;
        else if (len == 7 && strncasecmp(v, "FAILURE", 7) == 0) flags |= DSN_NOTIFY_FAILURE;
        else if (len == 5 && strncasecmp(v, "DELAY", 5) == 0) flags |= DSN_NOTIFY_DELAY;
        else if (len == 5 && strncasecmp(v, "NEVER", 5) == 0) never = true;
        v += len + (comma ? 1 : 0);
    }
    if (flags) return flags;
    return never ? DSN_NOTIFY_NEVER : dflt;
}

int dsn_ret_hdrs_of(const char *mail_params)
{
    const char *v;
    size_t n;
    /* RFC 3461 §4.3: RET=FULL or RET=HDRS. */
    return param_find(mail_params, "RET", &v, &n) && v && n == 4 && strncasecmp(v, "HDRS", 4) == 0;
}

int dsn_param(const char *params, const char *keyword, char *buf, size_t cap)
{
    if (!buf || cap == 0) return -1;
    buf[0] = '\0';
    const char *v;
    size_t n;
    if (!param_find(params, keyword, &v, &n) || !v || n >= cap) return -1;
    memcpy(buf, v, n);
    buf[n] = '\0';
    return 0;
}

/* ---- the pieces of one report ---- */

/* ORCPT split into its address type and decoded address (RFC 3461 §4.2,
 * §6.3 (d)). When the xtext does not decode to plain text the value is
 * kept as received: still a faithful *text (RFC 3464 §2.1). */
struct orcpt {
    char type[DSN_TYPE_MAX + 1];
    char addr[DSN_ORCPT_MAX + 1];
};

static int orcpt_split(const char *v, struct orcpt *o)
{
    if (!text_ok(v, DSN_ORCPT_MAX, true)) return -EINVAL;
    const char *semi = strchr(v, ';');
    if (!semi || !atom_ok(v, (size_t)(semi - v))) return -EINVAL;
    memcpy(o->type, v, (size_t)(semi - v));
    o->type[semi - v] = '\0';
    const char *raw = semi + 1;
    while (*raw == ' ') raw++;
    if (*raw == '\0') return -EINVAL;
    if (dsn_xtext_decode(raw, o->addr, sizeof o->addr) <= 0 || !text_ok(o->addr, DSN_ORCPT_MAX, true))
        snprintf(o->addr, sizeof o->addr, "%s", raw);
    return 0;
}

/* Reply text made safe to quote: CR, LF and CRLF become one "\n" line
 * separator, other controls (TAB aside) '?', and octets that are not
 * well-formed UTF-8, or any non-ASCII when the report is ASCII, '?' per
 * character. At most DSN_DIAG_MAX octets; a cut is marked. */
static int diag_clean(const char *in, bool utf8, char **out, size_t *outlen)
{
    static const char cut_mark[] = " [...]";
    size_t n = strlen(in);
    char *o = malloc(DSN_DIAG_MAX + sizeof cut_mark);
    if (!o) return -ENOMEM;
    const unsigned char *p = (const unsigned char *)in;
    size_t i = 0, k = 0;
    while (i < n) {
        unsigned char c = p[i];
        size_t take = 1, emit = 1;
        char ch = (char)c;
        if (c == '\r' || c == '\n') {
            take = (c == '\r' && i + 1 < n && p[i + 1] == '\n') ? 2 : 1;
            ch = '\n';
        } else if (c != '\t' && is_ctl(c)) {
            ch = '?';
        } else if (c >= 0x80) {
            size_t len = u8_len(p + i, n - i);
            take = len ? len : 1;
            /* C1 controls (U+0080..U+009F, 0xC2 0x80..0x9F) are controls too */
            bool c1 = len == 2 && c == 0xC2 && p[i + 1] < 0xA0;
            if (utf8 && len && !c1) emit = len;
            else ch = '?';
        }
        if (k + emit > DSN_DIAG_MAX) break;
        if (emit == 1) o[k] = ch;
        else memcpy(o + k, p + i, emit);
        k += emit;
        i += take;
    }
    if (i < n) {
        memcpy(o + k, cut_mark, sizeof cut_mark - 1);
        k += sizeof cut_mark - 1;
    }
    o[k] = '\0';
    *out = o;
    *outlen = k;
    return 0;
}

/* One line of cleaned text: [*s, end) up to the next "\n", trimmed of
 * blanks at both ends; advances *s past it. */
static void next_line(const char **s, const char *end, const char **ls, size_t *ln)
{
    const char *p = *s;
    const char *nl = memchr(p, '\n', (size_t)(end - p));
    const char *e = nl ? nl : end;
    *s = nl ? nl + 1 : end;
    while (p < e && (*p == ' ' || *p == '\t')) p++;
    while (e > p && (e[-1] == ' ' || e[-1] == '\t')) e--;
    *ls = p;
    *ln = (size_t)(e - p);
}

/* Characters, not octets, are what a reader sees as columns. */
static size_t u8_cols(const char *s, size_t n)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        if (((unsigned char)s[i] & 0xC0) != 0x80) c++;
    return c;
}

/* Back a cut at p[cut] off to the start of a UTF-8 character. */
static size_t u8_cut(const char *p, size_t cut)
{
    while (cut > 0 && ((unsigned char)p[cut] & 0xC0) == 0x80) cut--;
    return cut;
}

/* Human-readable text: words of [s, s+n) on lines that start with indent,
 * at most DSN_LINE_SOFT columns unless one word is longer; a word too
 * long for DSN_CUT octets is cut. Blanks collapse to one space. */
static void put_wrapped(struct w *w, const char *s, size_t n, const char *indent)
{
    size_t ind = strlen(indent), col = 0, bytes = 0;
    bool open = false;
    size_t i = 0;
    while (i < n) {
        while (i < n && (s[i] == ' ' || s[i] == '\t')) i++;
        if (i >= n) break;
        size_t j = i;
        while (j < n && s[j] != ' ' && s[j] != '\t') j++;
        size_t wb = j - i, wc = u8_cols(s + i, wb);
        if (open && col + 1 + wc > DSN_LINE_SOFT) {
            put(w, "\r\n", 2);
            open = false;
        }
        if (!open) {
            put_str(w, indent);
            col = bytes = ind;
            open = true;
        } else {
            put(w, " ", 1);
            col++;
            bytes++;
        }
        const char *word = s + i;
        while (bytes + wb > DSN_CUT) {
            size_t cut = u8_cut(word, DSN_CUT - bytes);
            if (cut == 0) cut = DSN_CUT - bytes;
            put(w, word, cut);
            put(w, "\r\n", 2);
            put_str(w, indent);
            col = bytes = ind;
            word += cut;
            wb -= cut;
        }
        put(w, word, wb);
        col += u8_cols(word, wb);
        bytes += wb;
        i = j;
    }
    if (open) put(w, "\r\n", 2);
}

static void put_wrapped_fmt(struct w *w, const char *indent, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void put_wrapped_fmt(struct w *w, const char *indent, const char *fmt, ...)
{
    char tmp[DSN_FMT_MAX];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n < 0 || (size_t)n >= sizeof tmp) {
        if (w->err == 0) w->err = -EINVAL;
        return;
    }
    put_wrapped(w, tmp, (size_t)n, indent);
}

/* Diagnostic-Code (RFC 3464 §2.3.6) from cleaned text: the reply's lines
 * joined by folding whitespace (RFC 5322 §2.2.3: CRLF before a blank), long
 * lines folded before a blank too, so unfolding gives the lines back
 * separated by a space. Runs of blanks become one space, so no folded line
 * is blanks alone (RFC 5322 §3.2.2). A word too long for any line is cut
 * with CRLF SP, the one place unfolding adds a blank that was not sent. */
static void put_diag_field(struct w *w, const char *type, const char *s, size_t n)
{
    put_fmt(w, "Diagnostic-Code: %s; ", type);
    size_t col = strlen("Diagnostic-Code: ; ") + strlen(type), bytes = col;
    bool content = true, first = true;  /* "Diagnostic-Code: x;" is content */
    const char *p = s, *end = s + n;
    while (p < end) {
        const char *ls;
        size_t ln;
        next_line(&p, end, &ls, &ln);
        if (ln == 0) continue;
        if (!first) {
            put(w, "\r\n ", 3);
            col = bytes = 1;
            content = false;
        }
        first = false;
        size_t i = 0;
        while (i < ln) {
            bool blank = false;
            while (i < ln && (ls[i] == ' ' || ls[i] == '\t')) {
                i++;
                blank = true;
            }
            size_t k = i;
            while (k < ln && ls[k] != ' ' && ls[k] != '\t') k++;
            const char *word = ls + i;
            size_t wb = k - i, wc = u8_cols(word, wb);
            if (blank) {
                if (content && (col + 1 + wc > DSN_LINE_SOFT || bytes + 1 + wb > DSN_CUT)) {
                    put(w, "\r\n", 2);
                    col = bytes = 0;
                }
                put(w, " ", 1);
                col++;
                bytes++;
            }
            while (bytes + wb > DSN_CUT) {
                size_t cut = u8_cut(word, DSN_CUT - bytes);
                if (cut == 0) cut = DSN_CUT - bytes;
                put(w, word, cut);
                put(w, "\r\n ", 3);
                col = bytes = 1;
                word += cut;
                wb -= cut;
            }
            put(w, word, wb);
            col += u8_cols(word, wb);
            bytes += wb;
            content = true;
            i = k;
        }
    }
    put(w, "\r\n", 2);
}

/* RFC 6533 §3 utf-8-addr-unitext: UTF-8 as it is, and the ASCII that
 * xtext reserves (controls, SP, '\', '+', '=') as \x{HH}. */
static void put_unitext(struct w *w, const char *a)
{
    for (const unsigned char *p = (const unsigned char *)a; *p; p++) {
        if (*p < 0x80 && (is_ctl(*p) || *p == ' ' || *p == '\\' || *p == '+' || *p == '='))
            put_fmt(w, "\\x{%02X}", *p);
        else
            put(w, p, 1);
    }
}

/* "Name: type; address": rfc822 for ASCII, RFC 6533 utf-8 otherwise. */
static void put_addr_field(struct w *w, const char *name, const char *type, const char *addr)
{
    if (is_ascii(addr) || strcasecmp(type, "rfc822") != 0) {
        put_fmt(w, "%s: %s; %s\r\n", name, type, addr);
        return;
    }
    put_fmt(w, "%s: utf-8; ", name);
    put_unitext(w, addr);
    put(w, "\r\n", 2);
}

/* RFC 5322 §3.3 date-time in UTC, with English names whatever the locale. */
static int fmt_date(time_t t, char *buf, size_t cap)
{
    static const char *const days[] = {"Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"};
    static const char *const months[] = {"Jan", "Feb", "Mar", "Apr", "May", "Jun",
                                         "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"};
    struct tm tm;
    /* RFC 5322 §3.3: four-digit years, 1900 or later. */
    if (!gmtime_r(&t, &tm) || tm.tm_wday < 0 || tm.tm_wday > 6 || tm.tm_mon < 0 || tm.tm_mon > 11 ||
        tm.tm_year < 0 || tm.tm_year > 9999 - 1900)
        return -EINVAL;
    snprintf(buf, cap, "%s, %d %s %04d %02d:%02d:%02d +0000", days[tm.tm_wday], tm.tm_mday,
             months[tm.tm_mon], tm.tm_year + 1900, tm.tm_hour, tm.tm_min, tm.tm_sec);
    return 0;
}

static int fmt_date_ms(uint64_t ms, char *buf, size_t cap)
{
    return fmt_date((time_t)(ms / 1000), buf, cap);
}

/* The shape of the original: where its header ends and what may be
 * returned as it is. A line over 998 octets, a NUL or a bare CR or LF has
 * no place in a message/rfc822 part (RFC 2046 §5.2.1 allows only 7bit and
 * 8bit, RFC 2045 §2.7-2.8). */
struct orig_shape {
    size_t hdr_len;      /* up to and including the last header line's CRLF */
    bool hdr_ok, all_ok;
    bool hdr_8bit, any_8bit;
};

static void scan_orig(const char *p, size_t n, struct orig_shape *s)
{
    *s = (struct orig_shape){.hdr_len = n, .hdr_ok = true, .all_ok = true};
    bool in_hdr = true;
    size_t i = 0;
    while (i < n) {
        size_t j = i;
        bool bad = false, eight = false;
        while (j < n && p[j] != '\r' && p[j] != '\n') {
            unsigned char c = (unsigned char)p[j];
            if (c == 0) bad = true;
            else if (c >= 0x80) eight = true;
            j++;
        }
        size_t next = n;
        if (j < n) {
            if (p[j] == '\r' && j + 1 < n && p[j + 1] == '\n') next = j + 2;
            else {
                bad = true;
                next = j + 1;
            }
        }
        if (j - i > DSN_LINE_HARD) bad = true;
        if (in_hdr && j == i && next == j + 2) {
            /* RFC 5322 §2.1: the empty line ends the header */
            s->hdr_len = i;
            in_hdr = false;
            i = next;
            continue;
        }
        if (bad) {
            s->all_ok = false;
            if (in_hdr) s->hdr_ok = false;
        }
        if (eight) {
            s->any_8bit = true;
            if (in_hdr) s->hdr_8bit = true;
        }
        i = next;
    }
}

/* What the third part holds, and why (for the text part). */
enum ret_what { RET_NONE, RET_FULL, RET_HDRS };
enum ret_why {
    WHY_FULL,         /* the whole message */
    WHY_ASKED,        /* RET=HDRS */
    WHY_NOT_FAILURE,  /* delay and success reports carry the header only */
    WHY_TOO_BIG,      /* over max_return */
    WHY_BAD_BODY,     /* lines that cannot be returned unchanged */
    WHY_BAD_HEADER,
    WHY_NO_HEADER,    /* the message starts with its empty line */
    WHY_MISSING,      /* no original given */
};

struct ret_plan {
    enum ret_what what;
    enum ret_why why;
    const char *p;
    size_t n;
    bool eightbit, global;
};

static void plan_return(const struct dsn_msg *d, bool any_failed, struct ret_plan *r)
{
    *r = (struct ret_plan){.what = RET_NONE, .why = WHY_MISSING};
    if (!d->orig || d->orig_len == 0) return;
    struct orig_shape s;
    scan_orig(d->orig, d->orig_len, &s);
    enum ret_why why;
    if (!any_failed) why = WHY_NOT_FAILURE;   /* RFC 3461 §4.3: RET is about failures */
    else if (d->ret_hdrs) why = WHY_ASKED;
    else if (d->max_return && d->orig_len > d->max_return) why = WHY_TOO_BIG;
    else if (!s.all_ok) why = WHY_BAD_BODY;
    else {
        *r = (struct ret_plan){.what = RET_FULL, .why = WHY_FULL, .p = d->orig, .n = d->orig_len,
                               .eightbit = s.any_8bit, .global = s.hdr_8bit};
        return;
    }
    if (s.hdr_len == 0 || !s.hdr_ok) {
        r->why = s.hdr_len == 0 ? WHY_NO_HEADER : WHY_BAD_HEADER;
        return;
    }
    if (d->max_return && s.hdr_len > d->max_return) {
        r->why = WHY_TOO_BIG;
        return;
    }
    *r = (struct ret_plan){.what = RET_HDRS, .why = why, .p = d->orig, .n = s.hdr_len,
                           .eightbit = s.hdr_8bit, .global = s.hdr_8bit};
}

/* Per recipient, what both parts need. What came from elsewhere (the
 * remote server's status and text, the MX name from DNS, the sender's
 * ORCPT) is made safe or left out here rather than failing the report:
 * a bounce lost to a remote server's odd reply would be worse. */
struct rprep {
    char *diag;
    size_t diag_len;
    const char *status;     /* r->status, or the action's X.0.0 */
    const char *remote;     /* r->remote_mta if it is a host name, or NULL */
    bool has_orcpt;
    struct orcpt orcpt;
};

static const char *diag_type_of(const struct dsn_rcpt *r)
{
    return r->diag_type ? r->diag_type : "smtp";
}

/* Which paragraph a recipient belongs to, gravest first. */
static int group_of(enum dsn_action a)
{
    return a == DSN_FAILED ? 0 : a == DSN_DELAYED ? 1 : 2;
}

static const char *const ACTION_NAME[] = {
    [DSN_FAILED] = "failed",       [DSN_DELAYED] = "delayed", [DSN_DELIVERED] = "delivered",
    [DSN_RELAYED] = "relayed",     [DSN_EXPANDED] = "expanded",
};

/* What the caller itself vouches for: our names, the envelope as
 * spooled, the shape of the request. */
static int validate(const struct dsn_msg *d)
{
    if (!d->reporting_mta || !host_ok(d->reporting_mta)) return -EINVAL;
    if (!d->to || !text_ok(d->to, DSN_ADDR_MAX, true)) return -EINVAL;
    if (d->postmaster && !text_ok(d->postmaster, DSN_ADDR_MAX, true)) return -EINVAL;
    if (d->queue_id && !text_ok(d->queue_id, DSN_ID_MAX, false)) return -EINVAL;
    if (!d->message_id_seed || !text_ok(d->message_id_seed, DSN_ID_MAX, false)) return -EINVAL;
    if (!d->rcpts || d->nrcpt == 0) return -EINVAL;
    if (!d->orig && d->orig_len > 0) return -EINVAL;
    for (size_t i = 0; i < d->nrcpt; i++) {
        const struct dsn_rcpt *r = &d->rcpts[i];
        if ((unsigned)r->action > DSN_EXPANDED) return -EINVAL;
        if (!r->final_rcpt || !text_ok(r->final_rcpt, DSN_ADDR_MAX, true)) return -EINVAL;
        if (!r->status) return -EINVAL;
        if (r->diag_type && !atom_ok(r->diag_type, strlen(r->diag_type))) return -EINVAL;
    }
    return 0;
}

/* RFC 3464 §2.3.4 with RFC 3463 §2: the status class must agree with the
 * action (2 for the successes, 4 or 5 otherwise). A remote server that
 * sent a malformed or contrary code gets X.0.0 "other" (RFC 3463 §3.1)
 * in its place; its own words stay in the Diagnostic-Code. */
static const char *status_for(const struct dsn_rcpt *r)
{
    char cls;
    bool success = group_of(r->action) == 2;
    if (status_ok(r->status, &cls) && (cls == '2') == success) return r->status;
    return success ? "2.0.0" : r->action == DSN_DELAYED ? "4.0.0" : "5.0.0";
}

/* ---- the three parts ---- */

static void put_return_note(struct w *w, const struct dsn_msg *d, const struct ret_plan *rp)
{
    const char *s = NULL;
    switch (rp->why) {
    case WHY_FULL: s = "A copy of your message is attached."; break;
    case WHY_ASKED: s = "The header of your message is attached; you asked for the header only."; break;
    case WHY_NOT_FAILURE: s = "The header of your message is attached."; break;
    case WHY_TOO_BIG:
        put_wrapped_fmt(w, "",
                        rp->what == RET_HDRS
                            ? "Only the header of your message is attached: the message is larger "
                              "than the %zu bytes returned at most."
                            : "Your message is not attached: even its header is larger than the "
                              "%zu bytes returned at most.",
                        d->max_return);
        return;
    case WHY_BAD_BODY:
        s = "Only the header of your message is attached: its body has lines that cannot be "
            "returned unchanged (over 998 bytes, NUL, or a bare CR or LF).";
        break;
    case WHY_BAD_HEADER:
        s = "Your message is not attached: its header has lines that cannot be returned "
            "unchanged.";
        break;
    case WHY_NO_HEADER: s = "Your message is not attached: it has no header to return."; break;
    case WHY_MISSING: s = "Your message is not attached: its content is no longer available."; break;
    }
    put_wrapped(w, s, strlen(s), "");
}

static void build_text(struct w *w, const struct dsn_msg *d, const struct rprep *prep,
                       const struct ret_plan *rp)
{
    static const char *const intro[] = {
        "Your message could not be delivered to the recipients below, and no further "
        "attempts will be made.",
        "Delivery of your message to the recipients below has been delayed. It is still "
        "queued and will be tried again; you do not need to send it again.",
        "Your message was delivered, or passed on for delivery, to the recipients below.",
    };
    char date[64];
    put_wrapped_fmt(w, "", "This is the mail delivery system at %s.", d->reporting_mta);
    for (int g = 0; g < 3; g++) {
        bool any = false;
        for (size_t i = 0; i < d->nrcpt; i++) any |= group_of(d->rcpts[i].action) == g;
        if (!any) continue;
        put(w, "\r\n", 2);
        put_wrapped(w, intro[g], strlen(intro[g]), "");
        for (size_t i = 0; i < d->nrcpt; i++) {
            const struct dsn_rcpt *r = &d->rcpts[i];
            if (group_of(r->action) != g) continue;
            const char *what = r->action == DSN_FAILED    ? "delivery failed"
                               : r->action == DSN_DELAYED ? "delivery delayed"
                               : r->action == DSN_RELAYED ? "passed on to a system that sends no delivery reports"
                               : r->action == DSN_EXPANDED
                                   ? "delivered to a list or alias, which passes it on"
                                   : "delivered";
            put(w, "\r\n", 2);
            put_wrapped_fmt(w, "", "<%s>: %s (status %s)", r->final_rcpt, what, prep[i].status);
            if (prep[i].has_orcpt && strcmp(prep[i].orcpt.addr, r->final_rcpt) != 0)
                put_wrapped_fmt(w, "    ", "Originally addressed to: %s", prep[i].orcpt.addr);
            if (prep[i].diag_len > 0) {
                if (strcasecmp(diag_type_of(r), "smtp") != 0)
                    put_wrapped_fmt(w, "    ", "Reason:");
                else if (prep[i].remote)
                    put_wrapped_fmt(w, "    ", "The server %s answered:", prep[i].remote);
                else
                    put_wrapped_fmt(w, "    ", "The remote server answered:");
                const char *p = prep[i].diag, *end = p + prep[i].diag_len;
                while (p < end) {
                    const char *ls;
                    size_t ln;
                    next_line(&p, end, &ls, &ln);
                    put_wrapped(w, ls, ln, "        ");
                }
            } else if (prep[i].remote) {
                put_wrapped_fmt(w, "    ", "Remote server: %s", prep[i].remote);
            }
            if (r->last_attempt_ms && fmt_date_ms(r->last_attempt_ms, date, sizeof date) == 0)
                put_wrapped_fmt(w, "    ", "Last attempt: %s", date);
            if (r->action == DSN_DELAYED && r->will_retry_until_ms &&
                fmt_date_ms(r->will_retry_until_ms, date, sizeof date) == 0)
                put_wrapped_fmt(w, "    ", "Will keep trying until: %s", date);
        }
    }
    put(w, "\r\n", 2);
    put_return_note(w, d, rp);
    if (d->queue_id) {
        put(w, "\r\n", 2);
        put_wrapped_fmt(w, "", "Queue id: %s", d->queue_id);
    }
}

static int build_status(struct w *w, const struct dsn_msg *d, const struct rprep *prep)
{
    char date[64], buf[DSN_ENVID_MAX + 1];
    /* RFC 3464 §2.2, in its order. */
    if (d->envid && text_ok(d->envid, DSN_ENVID_MAX, false)) {
        /* RFC 3461 §6.3 (a): decoded; kept as sent if it decodes to
         * something that is not plain printable text. An ENVID that is
         * not printable ASCII of at most 100 characters (RFC 3461 §4.4)
         * cannot have come through our server and is left out. */
        const char *v = d->envid;
        if (dsn_xtext_decode(d->envid, buf, sizeof buf) > 0 && text_ok(buf, DSN_ENVID_MAX, false))
            v = buf;
        put_fmt(w, "Original-Envelope-Id: %s\r\n", v);
    }
    put_fmt(w, "Reporting-MTA: dns; %s\r\n", d->reporting_mta);
    if (d->arrival_ms) {
        if (fmt_date_ms(d->arrival_ms, date, sizeof date) < 0) return -EINVAL;
        put_fmt(w, "Arrival-Date: %s\r\n", date);
    }
    if (d->queue_id) put_fmt(w, "X-Mailengine-Queue-ID: %s\r\n", d->queue_id);
    for (size_t i = 0; i < d->nrcpt; i++) {
        const struct dsn_rcpt *r = &d->rcpts[i];
        put(w, "\r\n", 2);   /* RFC 3464 §2.1: a blank line before each recipient */
        /* RFC 3461 §6.3 (d): Original-Recipient exactly when ORCPT was given. */
        if (prep[i].has_orcpt)
            put_addr_field(w, "Original-Recipient", prep[i].orcpt.type, prep[i].orcpt.addr);
        put_addr_field(w, "Final-Recipient", "rfc822", r->final_rcpt);
        put_fmt(w, "Action: %s\r\n", ACTION_NAME[r->action]);
        put_fmt(w, "Status: %s\r\n", prep[i].status);
        if (prep[i].remote) put_fmt(w, "Remote-MTA: dns; %s\r\n", prep[i].remote);
        if (prep[i].diag_len > 0) put_diag_field(w, diag_type_of(r), prep[i].diag, prep[i].diag_len);
        if (r->last_attempt_ms) {
            if (fmt_date_ms(r->last_attempt_ms, date, sizeof date) < 0) return -EINVAL;
            put_fmt(w, "Last-Attempt-Date: %s\r\n", date);
        }
        /* RFC 3464 §2.3.9: only for delayed recipients. */
        if (r->action == DSN_DELAYED && r->will_retry_until_ms) {
            if (fmt_date_ms(r->will_retry_until_ms, date, sizeof date) < 0) return -EINVAL;
            put_fmt(w, "Will-Retry-Until: %s\r\n", date);
        }
    }
    return 0;
}

/* Every line ends in CRLF, none passes 998 octets, no NUL: the promise for
 * all we generate (RFC 5322 §2.1.1, §2.3). */
static bool lines_ok(const char *p, size_t n)
{
    size_t col = 0;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (c == '\r') {
            if (i + 1 >= n || p[i + 1] != '\n') return false;
            i++;
            col = 0;
        } else if (c == '\n' || c == '\0') {
            return false;
        } else if (++col > DSN_LINE_HARD) {
            return false;
        }
    }
    return col == 0;
}

/* ---- boundary ---- */

struct span {
    const char *p;
    size_t n;
};

/* Count every occurrence (overlapping ones too) of pat in the spans; with
 * used, also mark the counter a ".%08x" after an occurrence carries. */
static size_t scan_occ(const struct span *sp, size_t nsp, const char *pat, size_t plen,
                       unsigned char *used, size_t nused)
{
    size_t count = 0;
    for (size_t s = 0; s < nsp; s++) {
        const char *p = sp[s].p, *end = sp[s].p + sp[s].n;
        while (p && (size_t)(end - p) >= plen) {
            const char *hit = memmem(p, (size_t)(end - p), pat, plen);
            if (!hit) break;
            count++;
            /* ".%08x" after the base: mark that counter as taken */
            const char *x = hit + plen;
            if (used && end - x >= 9 && x[0] == '.') {
                size_t v = 0;
                bool hex = true;
                for (int k = 1; k <= 8; k++) {
                    int h = hexval(x[k]);
                    if (h < 0) {
                        hex = false;
                        break;
                    }
                    v = v << 4 | (size_t)h;
                }
                if (hex && v < nused) used[v / 8] |= (unsigned char)(1u << (v % 8));
            }
            p = hit + 1;
        }
    }
    return count;
}

/* RFC 2046 §5.1.1: the boundary must not occur in any part. The base comes
 * from the seed; if the content holds "--base", the smallest ".%08x"
 * counter no occurrence carries is added. There are k occurrences, so one
 * of 0..k is free: one pass to count, one to mark, linear in the content. */
static int pick_boundary(const char *seed, const struct span *sp, size_t nsp, char *out)
{
    char base[DSN_BOUNDARY_BASE_MAX + 1];
    size_t n = (size_t)snprintf(base, sizeof base, "=_");
    for (const char *s = seed; *s && n < DSN_BOUNDARY_BASE_MAX; s++) {
        char c = *s;
        /* RFC 2046 §5.1.1 bcharsnospace */
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  strchr("'()+_,-./:=?", c) != NULL;
        base[n++] = ok ? c : '_';
    }
    base[n] = '\0';
    char pat[DSN_BOUNDARY_BASE_MAX + 3];
    int plen = snprintf(pat, sizeof pat, "--%s", base);
    size_t k = scan_occ(sp, nsp, pat, (size_t)plen, NULL, 0);
    if (k == 0) {
        memcpy(out, base, n + 1);
        return 0;
    }
    size_t nused = k + 1;
    unsigned char *used = calloc(nused / 8 + 1, 1);
    if (!used) return -ENOMEM;
    scan_occ(sp, nsp, pat, (size_t)plen, used, nused);
    size_t v = 0;
    while (used[v / 8] & (1u << (v % 8))) v++;
    free(used);
    snprintf(out, DSN_BOUNDARY_MAX + 1, "%s.%08zx", base, v);
    return 0;
}

/* ---- the message ---- */

/* Message-ID left side: RFC 5322 §3.6.4 id-left is dot-atom-text. */
static void put_id_left(struct w *w, const char *seed)
{
    size_t n = strlen(seed);
    for (size_t i = 0; i < n; i++) {
        char c = seed[i];
        bool ok = c == '.' ? (i > 0 && i + 1 < n && seed[i - 1] != '.') : is_atext((unsigned char)c);
        put(w, ok ? &c : "_", 1);
    }
}

static int build(const struct dsn_msg *d, struct bytebuf *out, unsigned *flags)
{
    int rc = validate(d);
    if (rc < 0) return rc;

    struct rprep *prep = calloc(d->nrcpt, sizeof *prep);
    struct bytebuf hdr = {0}, text = {0}, status = {0};
    if (!prep) return -ENOMEM;
    /* RFC 6533: any UTF-8 address makes it an internationalized report. */
    bool utf8 = !is_ascii(d->to) || (d->postmaster && !is_ascii(d->postmaster));
    bool any_failed = false;
    int gravest = 2;
    for (size_t i = 0; i < d->nrcpt; i++) {
        const struct dsn_rcpt *r = &d->rcpts[i];
        prep[i].status = status_for(r);
        prep[i].remote = r->remote_mta && host_ok(r->remote_mta) ? r->remote_mta : NULL;
        /* RFC 3461 §6.3 (d) wants the ORCPT back; one that is not
         * "type;address" (§4.2) has nothing to give and is left out. */
        prep[i].has_orcpt = r->orcpt && orcpt_split(r->orcpt, &prep[i].orcpt) == 0;
        if (!is_ascii(r->final_rcpt) || (prep[i].has_orcpt && !is_ascii(prep[i].orcpt.addr))) utf8 = true;
        if (r->action == DSN_FAILED) any_failed = true;
        if (group_of(r->action) < gravest) gravest = group_of(r->action);
    }
    for (size_t i = 0; i < d->nrcpt; i++) {
        const struct dsn_rcpt *r = &d->rcpts[i];
        if (r->diagnostic) {
            rc = diag_clean(r->diagnostic, utf8, &prep[i].diag, &prep[i].diag_len);
            if (rc < 0) goto done;
            /* nothing left but blanks and separators: no Diagnostic-Code */
            bool blank = true;
            for (size_t k = 0; k < prep[i].diag_len && blank; k++)
                blank = prep[i].diag[k] == ' ' || prep[i].diag[k] == '\t' || prep[i].diag[k] == '\n';
            if (blank) prep[i].diag_len = 0;
        }
    }

    struct ret_plan rp;
    plan_return(d, any_failed, &rp);

    struct w wt = {.b = &text}, ws = {.b = &status}, wh = {.b = &hdr};
    build_text(&wt, d, prep, &rp);
    rc = build_status(&ws, d, prep);
    if (rc == 0) rc = wt.err ? wt.err : ws.err;
    if (rc < 0) goto done;

    char boundary[DSN_BOUNDARY_MAX + 1];
    struct span sp[3] = {{text.data, text.len}, {status.data, status.len}, {rp.p, rp.n}};
    rc = pick_boundary(d->message_id_seed, sp, rp.what == RET_NONE ? 2 : 3, boundary);
    if (rc < 0) goto done;

    unsigned fl = (utf8 ? DSN_OUT_UTF8 | DSN_OUT_8BIT : 0) | (rp.eightbit ? DSN_OUT_8BIT : 0);
    char date[64];
    if (fmt_date(d->now, date, sizeof date) < 0) {
        rc = -EINVAL;
        goto done;
    }
    static const char *const subject[] = {
        "Undelivered Mail Returned to Sender",
        "Delayed Mail (still being retried)",
        "Successful Mail Delivery Report",
    };
    if (d->postmaster) put_fmt(&wh, "From: \"%s\" <%s>\r\n", DSN_FROM_NAME, d->postmaster);
    else put_fmt(&wh, "From: \"%s\" <MAILER-DAEMON@%s>\r\n", DSN_FROM_NAME, d->reporting_mta);
    put_fmt(&wh, "To: <%s>\r\n", d->to);
    put_fmt(&wh, "Subject: %s\r\n", subject[gravest]);
    put_fmt(&wh, "Date: %s\r\n", date);
    put_str(&wh, "Message-ID: <");
    put_id_left(&wh, d->message_id_seed);
    put_fmt(&wh, "@%s>\r\n", d->reporting_mta);
    put_str(&wh, "MIME-Version: 1.0\r\n");
    put_str(&wh, "Auto-Submitted: auto-replied\r\n");   /* RFC 3834 §5 */
    /* RFC 6522 §3: report-type names the second part's subtype; RFC 6533
     * gives the internationalized one. */
    put_fmt(&wh, "Content-Type: multipart/report; report-type=%s;\r\n\tboundary=\"%s\"\r\n",
            utf8 ? "global-delivery-status" : "delivery-status", boundary);
    if (fl & DSN_OUT_8BIT) put_str(&wh, "Content-Transfer-Encoding: 8bit\r\n");
    put_str(&wh, "\r\nThis is a MIME-encapsulated delivery status notification.\r\n");

    put_fmt(&wh, "\r\n--%s\r\nContent-Type: text/plain; charset=%s\r\n", boundary,
            utf8 ? "utf-8" : "us-ascii");
    if (utf8) put_str(&wh, "Content-Transfer-Encoding: 8bit\r\n");
    put_str(&wh, "Content-Description: Notification\r\n\r\n");
    size_t hdr1 = hdr.len;
    put_fmt(&wh, "\r\n--%s\r\nContent-Type: message/%s\r\n", boundary,
            utf8 ? "global-delivery-status" : "delivery-status");
    if (utf8) put_str(&wh, "Content-Transfer-Encoding: 8bit\r\n");
    put_str(&wh, "Content-Description: Delivery report\r\n\r\n");
    size_t hdr2 = hdr.len;
    if (rp.what != RET_NONE) {
        /* RFC 6532 §3.7 message/global and RFC 6533
         * message/global-headers for a header that has UTF-8 in it. */
        const char *ct = rp.what == RET_FULL ? (rp.global ? "message/global" : "message/rfc822")
                                             : (rp.global ? "message/global-headers" : "text/rfc822-headers");
        put_fmt(&wh, "\r\n--%s\r\nContent-Type: %s\r\n", boundary, ct);
        if (rp.eightbit) put_str(&wh, "Content-Transfer-Encoding: 8bit\r\n");
        put_fmt(&wh, "Content-Description: %s\r\n\r\n",
                rp.what == RET_FULL ? "Undelivered message" : "Message header");
    }
    size_t hdr3 = hdr.len;
    put_fmt(&wh, "\r\n--%s--\r\n", boundary);
    if (wh.err) {
        rc = wh.err;
        goto done;
    }
    if (!lines_ok(hdr.data, hdr.len) || !lines_ok(text.data, text.len) ||
        !lines_ok(status.data, status.len)) {
        rc = -EINVAL;
        goto done;
    }

    size_t before = bytebuf_used(out);
    rc = bytebuf_reserve(out, hdr.len + text.len + status.len + rp.n);
    if (rc < 0) goto done;
    struct w wo = {.b = out};
    put(&wo, hdr.data, hdr1);
    put(&wo, text.data, text.len);
    put(&wo, hdr.data + hdr1, hdr2 - hdr1);
    put(&wo, status.data, status.len);
    put(&wo, hdr.data + hdr2, hdr3 - hdr2);
    if (rp.what != RET_NONE) put(&wo, rp.p, rp.n);
    put(&wo, hdr.data + hdr3, hdr.len - hdr3);
    rc = wo.err;
    if (rc < 0) out->len = out->off + before;   /* leave nothing half-written */
    else if (flags) *flags = fl;
done:
    for (size_t i = 0; i < d->nrcpt; i++) free(prep[i].diag);
    free(prep);
    bytebuf_free(&hdr);
    bytebuf_free(&text);
    bytebuf_free(&status);
    return rc;
}

int dsn_build_flags(const struct dsn_msg *d, struct bytebuf *out, unsigned *flags)
{
    if (!d || !out) return -EINVAL;
    if (flags) *flags = 0;
    return build(d, out, flags);
}

int dsn_build(const struct dsn_msg *d, struct bytebuf *out)
{
    return dsn_build_flags(d, out, NULL);
}
