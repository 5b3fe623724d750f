/* POP3 command lines (RFC 1939 §3, §5-§7; RFC 2449 §5; RFC 2595 §4;
 * RFC 5034 §4) and line framing. Pure: no I/O, no allocation, every result
 * points into the caller's bytes. */
#include "pop3/parse.h"

#include <string.h>

enum arg_kind {
    ARGS_WORDS,   /* space-separated words of at most 40 octets */
    ARGS_PASS,    /* the whole rest is one argument */
    ARGS_AUTH,    /* mechanism [initial-response], no length limit */
};

struct cmd_spec {
    char name[5];
    enum pop3_cmd cmd;
    unsigned char min, max;   /* arity */
    unsigned char numeric;    /* bit i: argument i is a number */
    enum arg_kind kind;
};

/* Indexed by enum pop3_cmd. */
static const struct cmd_spec specs[] = {
    {"?",    POP3_UNKNOWN, 0, 0, 0, ARGS_WORDS},
    {"USER", POP3_USER, 1, 1, 0, ARGS_WORDS},   /* RFC 1939 §7 */
    {"PASS", POP3_PASS, 1, 1, 0, ARGS_PASS},    /* RFC 1939 §7 */
    {"APOP", POP3_APOP, 2, 2, 0, ARGS_WORDS},   /* RFC 1939 §7: name digest */
    {"AUTH", POP3_AUTH, 1, 2, 0, ARGS_AUTH},    /* RFC 5034 §4 */
    {"STLS", POP3_STLS, 0, 0, 0, ARGS_WORDS},   /* RFC 2595 §4 */
    {"CAPA", POP3_CAPA, 0, 0, 0, ARGS_WORDS},   /* RFC 2449 §5 */
    {"STAT", POP3_STAT, 0, 0, 0, ARGS_WORDS},   /* RFC 1939 §5 */
    {"LIST", POP3_LIST, 0, 1, 1, ARGS_WORDS},
    {"RETR", POP3_RETR, 1, 1, 1, ARGS_WORDS},
    {"DELE", POP3_DELE, 1, 1, 1, ARGS_WORDS},
    {"NOOP", POP3_NOOP, 0, 0, 0, ARGS_WORDS},
    {"RSET", POP3_RSET, 0, 0, 0, ARGS_WORDS},
    {"TOP",  POP3_TOP,  2, 2, 3, ARGS_WORDS},   /* RFC 1939 §7: msg n */
    {"UIDL", POP3_UIDL, 0, 1, 1, ARGS_WORDS},   /* RFC 1939 §7 */
    {"QUIT", POP3_QUIT, 0, 0, 0, ARGS_WORDS},   /* RFC 1939 §4, §6 */
};

#define NSPECS (sizeof specs / sizeof specs[0])

static int is_ctl(unsigned char c) { return c < 0x20 || c == 0x7f; }

static unsigned char upper(unsigned char c) { return c >= 'a' && c <= 'z' ? (unsigned char)(c - 32) : c; }

/* RFC 1939 §3: keywords are case-insensitive, three or four characters. */
static enum pop3_cmd keyword(const char *p, size_t n)
{
    if (n < 3 || n > 4) return POP3_UNKNOWN;
    for (size_t k = 1; k < NSPECS; k++) {
        const char *name = specs[k].name;
        if (strlen(name) != n) continue;
        size_t i = 0;
        while (i < n && upper((unsigned char)p[i]) == (unsigned char)name[i]) i++;
        if (i == n) return specs[k].cmd;
    }
    return POP3_UNKNOWN;
}

static int is_number(const char *p, size_t n)
{
    if (n == 0 || n > POP3_NUMBER_DIGITS) return 0;
    for (size_t i = 0; i < n; i++)
        if (p[i] < '0' || p[i] > '9') return 0;
    return 1;
}

static enum pop3_parse_status fail(struct pop3_command *out, enum pop3_cmd cmd,
                                   enum pop3_parse_status st)
{
    memset(out, 0, sizeof *out);
    out->cmd = cmd;
    return st;
}

enum pop3_parse_status pop3_parse(const char *line, size_t len, struct pop3_command *out)
{
    memset(out, 0, sizeof *out);
    /* RFC 2449 §4: 255 octets with the CRLF. */
    if (len > POP3_LINE_MAX - 2) return POP3_ERR_TOO_LONG;
    if (len == 0) return POP3_ERR_EMPTY;
    if (line[0] == ' ') return POP3_ERR_SYNTAX;

    const char *sp = memchr(line, ' ', len);
    size_t kw_len = sp ? (size_t)(sp - line) : len;
    enum pop3_cmd cmd = keyword(line, kw_len);
    const struct cmd_spec *spec = &specs[cmd];
    /* The rest starts after the keyword and exactly one space. */
    size_t rest_at = sp ? kw_len + 1 : len;

    /* Control bytes, NUL and stray CR included, end the matter, except a TAB
     * a password may hold. */
    for (size_t i = 0; i < len; i++) {
        unsigned char c = (unsigned char)line[i];
        if (is_ctl(c) && !(c == '\t' && spec->kind == ARGS_PASS && i >= rest_at))
            return fail(out, cmd, POP3_ERR_SYNTAX);
    }
    if (cmd == POP3_UNKNOWN) return POP3_ERR_UNKNOWN;

    out->cmd = cmd;
    if (spec->kind == ARGS_PASS) {
        /* RFC 1939 §7 notes: the password may contain spaces; keep it whole. */
        if (rest_at >= len) return fail(out, cmd, POP3_ERR_SYNTAX);
        out->rest = line + rest_at;
        out->rest_len = len - rest_at;
        out->nargs = 1;
        out->arg[0] = out->rest;
        out->arg_len[0] = out->rest_len;
        return POP3_OK;
    }

    unsigned nargs = 0;
    size_t i = rest_at;
    for (;;) {
        while (i < len && line[i] == ' ') i++;   /* lenient: runs of spaces */
        if (i >= len) break;
        size_t start = i;
        while (i < len && line[i] != ' ') i++;
        size_t n = i - start;
        if (nargs >= spec->max) return fail(out, cmd, POP3_ERR_SYNTAX);
        if (spec->kind == ARGS_WORDS && n > POP3_ARG_LEN_MAX) return fail(out, cmd, POP3_ERR_SYNTAX);
        if ((spec->numeric >> nargs & 1) && !is_number(line + start, n))
            return fail(out, cmd, POP3_ERR_SYNTAX);
        out->arg[nargs] = line + start;
        out->arg_len[nargs] = n;
        nargs++;
    }
    if (nargs < spec->min) return fail(out, cmd, POP3_ERR_SYNTAX);
    out->nargs = nargs;
    if (spec->kind == ARGS_AUTH) {
        out->rest = line + rest_at;
        out->rest_len = len - rest_at;
    }
    return POP3_OK;
}

unsigned long pop3_number(const char *p, size_t n)
{
    if (!p || !is_number(p, n)) return 0;
    unsigned long v = 0;
    for (size_t i = 0; i < n; i++) v = v * 10 + (unsigned long)(p[i] - '0');
    return v;
}

const char *pop3_cmd_name(enum pop3_cmd c)
{
    if ((unsigned)c >= NSPECS) return "?";
    return specs[c].name;
}

size_t pop3_line_end(const char *p, size_t n, size_t *line_len)
{
    const char *lf = n ? memchr(p, '\n', n) : NULL;
    if (!lf) {
        *line_len = 0;
        return 0;
    }
    size_t at = (size_t)(lf - p);
    /* RFC 1939 §3: CRLF; a bare LF is accepted too. */
    *line_len = at && p[at - 1] == '\r' ? at - 1 : at;
    return at + 1;
}
