/* SMTP grammar (see parse.h): command lines per RFC 5321 §4.1 and the DATA
 * scanner per §4.5.2. The scanner is written so that no byte sequence makes
 * us see an end of data that a strict peer would not (SMTP smuggling). */
#include "smtp/parse.h"

#include <string.h>

/* ---- line framing ---------------------------------------------------- */

/* `max` counts the CRLF, as the 512-octet command line of RFC 5321
 * §4.5.3.1.4 does. */
enum smtp_line_result smtp_line_find(const char *p, size_t n, size_t max,
                                     size_t *line_len, size_t *consumed)
{
    size_t lim = n < max ? n : max;
    const char *lf = lim ? memchr(p, '\n', lim) : NULL;

    if (!lf) {
        *line_len = 0;
        if (n < max) {
            *consumed = 0;
            return SMTP_LINE_NEED_MORE;
        }
        /* Only the bytes we looked at may go: an LF past `max` ends the
         * overlong line and the caller must still see what follows it. */
        *consumed = lim;
        return SMTP_LINE_TOO_LONG;
    }
    size_t i = (size_t)(lf - p);
    *consumed = i + 1;
    if (i == 0 || p[i - 1] != '\r') {
        *line_len = i;
        return SMTP_LINE_BARE_LF;
    }
    *line_len = i - 1;
    /* RFC 5321 §2.3.8: CR and LF only ever appear together as CRLF. */
    if (i > 1 && memchr(p, '\r', i - 1)) return SMTP_LINE_BARE_CR;
    return SMTP_LINE_OK;
}

/* ---- commands -------------------------------------------------------- */

/* ASCII only: the C library's tolower() follows the locale. */
static unsigned char ascii_lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c | 0x20) : c;
}

/* a[0..n) equals the lower-case literal `lit` ignoring ASCII case. */
static int ascii_ieq(const char *a, const char *lit, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (ascii_lower((unsigned char)a[i]) != (unsigned char)lit[i]) return 0;
    return 1;
}

static int is_ctl(unsigned char c) { return c < 0x20 || c == 0x7f; }

static int is_alnum(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z');
}

static int has_ctl(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (is_ctl((unsigned char)p[i])) return 1;
    return 0;
}

/* Dot-string characters: atext and "." (RFC 5321 §4.1.2, RFC 5322 §3.2.3),
 * plus any non-ASCII byte (RFC 6531 §3.3). */
static int is_local_char(unsigned char c)
{
    if (c >= 0x80) return 1;
    if (c <= 0x20 || c == 0x7f) return 0;
    switch (c) {
    case '(': case ')': case '<': case '>': case '[': case ']':
    case ':': case ';': case '@': case '\\': case ',': case '"':
        return 0;
    }
    return 1;
}

/* Letters, digits and hyphens (RFC 5321 §4.1.2 Ldh-str), dots between
 * labels, U-labels as raw UTF-8 (RFC 6531), and "_", which real host names
 * carry often enough that refusing it only hurts. */
static int is_domain_char(unsigned char c)
{
    return is_alnum(c) || c == '-' || c == '.' || c == '_' || c >= 0x80;
}

/* Domain or address literal at s[i..n); returns the index after it, or 0 if
 * there is none (a domain never starts at index 0 of an argument). */
static size_t scan_domain(const char *s, size_t n, size_t i)
{
    size_t start = i;

    if (i < n && s[i] == '[') {
        /* RFC 5321 §4.1.3: IPv4, "IPv6:" and tagged literals. The grammar's
         * dcontent would also let "<", ">" and quotes through, which no
         * real literal has and which would garble every header we write
         * the address into, so only what those three forms use is taken. */
        for (i++; i < n && s[i] != ']'; i++) {
            unsigned char c = (unsigned char)s[i];
            if (!is_alnum(c) && c != '.' && c != ':' && c != '-') return 0;
        }
        if (i >= n || i == start + 1) return 0;
        return i + 1;
    }
    while (i < n && is_domain_char((unsigned char)s[i])) i++;
    return i > start ? i : 0;
}

/* Path "<" [A-d-l ":"] Mailbox ">" or "<>" at s[*pos] == '<' (RFC 5321
 * §4.1.2). The source route is checked and dropped, as §3.6.1 and
 * appendix C allow; the mailbox is returned as written. */
static int parse_path(const char *s, size_t n, size_t *pos,
                      const char **addr, size_t *addr_len)
{
    size_t i = *pos + 1;

    if (i < n && s[i] == '>') {
        *addr = s + i;
        *addr_len = 0;
        *pos = i + 1;
        return 0;
    }
    if (i < n && s[i] == '@') {
        for (;;) {
            i = scan_domain(s, n, i + 1);
            if (!i || i >= n) return -1;
            if (s[i] == ':') break;
            if (s[i] != ',' || i + 1 >= n || s[i + 1] != '@') return -1;
            i++;
        }
        i++;
    }

    size_t start = i;
    if (i < n && s[i] == '"') {
        /* RFC 5321 §4.1.2 Quoted-string; qtextSMTP extended by RFC 6531 */
        for (i++; i < n && s[i] != '"'; i++) {
            unsigned char c = (unsigned char)s[i];
            if (c == '\\') {
                if (++i >= n) return -1;
                c = (unsigned char)s[i];
                if (c < 32 || c > 126) return -1;   /* quoted-pairSMTP */
            } else if (is_ctl(c)) {
                return -1;
            }
        }
        if (i >= n) return -1;
        i++;
    } else {
        while (i < n && is_local_char((unsigned char)s[i])) i++;
        if (i == start) return -1;
    }
    /* "@domain" may be missing: RCPT TO:<Postmaster> (RFC 5321 §4.1.1.3). */
    if (i < n && s[i] == '@') {
        i = scan_domain(s, n, i + 1);
        if (!i) return -1;
    }
    if (i >= n || s[i] != '>') return -1;
    *addr = s + start;
    *addr_len = i - start;
    *pos = i + 1;
    return 0;
}

/* esmtp-param = esmtp-keyword ["=" esmtp-value] (RFC 5321 §4.1.2), the
 * value widened to UTF-8 by RFC 6531 §3.3. */
static int parse_param(const char *t, size_t n, struct smtp_param *p)
{
    size_t k = 0;

    if (n == 0 || !is_alnum((unsigned char)t[0])) return -1;
    while (k < n && (is_alnum((unsigned char)t[k]) || t[k] == '-')) k++;
    p->key = t;
    p->key_len = k;
    p->val = NULL;
    p->val_len = 0;
    if (k == n) return 0;
    if (t[k] != '=' || k + 1 == n) return -1;
    for (size_t i = k + 1; i < n; i++) {
        unsigned char c = (unsigned char)t[i];
        if (c < 33 || c == '=' || c == 0x7f) return -1;
    }
    p->val = t + k + 1;
    p->val_len = n - k - 1;
    return 0;
}

/* MAIL FROM:<path> / RCPT TO:<path>, then parameters separated by spaces.
 * `arg` has no leading or trailing spaces. */
static enum smtp_parse_status parse_path_cmd(struct smtp_cmd *cmd,
                                             const char *kw, size_t kwlen,
                                             int null_ok)
{
    const char *s = cmd->arg;
    size_t n = cmd->arg_len, i;

    if (n < kwlen || !ascii_ieq(s, kw, kwlen)) return SMTP_PARSE_SYNTAX;
    i = kwlen;
    while (i < n && s[i] == ' ') i++;    /* "FROM: <a@b>", common in the wild */
    if (i >= n || s[i] != '<') return SMTP_PARSE_BAD_ADDR;
    if (parse_path(s, n, &i, &cmd->addr, &cmd->addr_len) < 0)
        return SMTP_PARSE_BAD_ADDR;
    /* RFC 5321 §4.1.1.3: a forward-path is never null. */
    if (cmd->addr_len == 0 && !null_ok) return SMTP_PARSE_BAD_ADDR;
    /* Anything glued to the ">" belongs to a malformed path. */
    if (i < n && s[i] != ' ') return SMTP_PARSE_BAD_ADDR;

    while (i < n) {
        while (i < n && s[i] == ' ') i++;
        size_t start = i;
        while (i < n && s[i] != ' ') i++;
        if (cmd->nparams == SMTP_MAX_PARAMS) return SMTP_PARSE_TOO_MANY_PARAMS;
        if (parse_param(s + start, i - start, &cmd->params[cmd->nparams]) < 0)
            return SMTP_PARSE_SYNTAX;
        cmd->nparams++;
    }
    return SMTP_PARSE_OK;
}

/* "AUTH" SP sasl-mech [SP initial-response] (RFC 4954 §4); the mechanism
 * name is 1..20 of upper-case letters, digits, "-" and "_" (RFC 4422 §3.1),
 * matched case-insensitively here; the response is base64 or "=". */
static enum smtp_parse_status check_auth(const char *s, size_t n)
{
    size_t i = 0;

    while (i < n && s[i] != ' ') {
        unsigned char c = (unsigned char)s[i];
        if (!is_alnum(c) && c != '-' && c != '_') return SMTP_PARSE_SYNTAX;
        i++;
    }
    if (i == 0 || i > 20) return SMTP_PARSE_SYNTAX;
    while (i < n && s[i] == ' ') i++;
    for (; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (!is_alnum(c) && c != '+' && c != '/' && c != '=') return SMTP_PARSE_SYNTAX;
    }
    return SMTP_PARSE_OK;
}

enum arg_rule { ARG_NONE, ARG_OPTIONAL, ARG_REQUIRED };

static const struct verb_def {
    char name[9];           /* lower case */
    unsigned char len;
    enum smtp_verb verb;
    enum arg_rule arg;
} verb_defs[] = {
    { "mail", 4, SMTP_VERB_MAIL, ARG_REQUIRED },
    { "rcpt", 4, SMTP_VERB_RCPT, ARG_REQUIRED },
    { "data", 4, SMTP_VERB_DATA, ARG_NONE },
    { "bdat", 4, SMTP_VERB_BDAT, ARG_REQUIRED },
    { "ehlo", 4, SMTP_VERB_EHLO, ARG_REQUIRED },
    { "helo", 4, SMTP_VERB_HELO, ARG_REQUIRED },
    { "rset", 4, SMTP_VERB_RSET, ARG_NONE },
    { "noop", 4, SMTP_VERB_NOOP, ARG_OPTIONAL },
    { "quit", 4, SMTP_VERB_QUIT, ARG_NONE },
    { "vrfy", 4, SMTP_VERB_VRFY, ARG_REQUIRED },
    { "expn", 4, SMTP_VERB_EXPN, ARG_REQUIRED },
    { "help", 4, SMTP_VERB_HELP, ARG_OPTIONAL },
    { "auth", 4, SMTP_VERB_AUTH, ARG_REQUIRED },
    { "starttls", 8, SMTP_VERB_STARTTLS, ARG_NONE },
};

enum smtp_parse_status smtp_parse_command(const char *line, size_t len,
                                          struct smtp_cmd *cmd)
{
    const struct verb_def *def = NULL;
    size_t vlen = 0, a, e;

    cmd->verb = SMTP_VERB_UNKNOWN;
    cmd->arg = line;
    cmd->arg_len = 0;
    cmd->addr = NULL;
    cmd->addr_len = 0;
    cmd->nparams = 0;
    if (len == 0) return SMTP_PARSE_UNKNOWN;

    /* RFC 5321 §4.1.1: verb, then SP, then the argument. */
    while (vlen < len && line[vlen] != ' ') vlen++;
    for (size_t k = 0; k < sizeof verb_defs / sizeof verb_defs[0]; k++) {
        if (verb_defs[k].len == vlen && ascii_ieq(line, verb_defs[k].name, vlen)) {
            def = &verb_defs[k];
            break;
        }
    }
    a = vlen;
    while (a < len && line[a] == ' ') a++;
    e = len;
    while (e > a && line[e - 1] == ' ') e--;
    cmd->arg = line + a;
    cmd->arg_len = e - a;
    if (!def) return SMTP_PARSE_UNKNOWN;
    cmd->verb = def->verb;

    if (cmd->arg_len == 0)
        return def->arg == ARG_REQUIRED ? SMTP_PARSE_SYNTAX : SMTP_PARSE_OK;
    if (def->arg == ARG_NONE) return SMTP_PARSE_SYNTAX;

    enum smtp_parse_status st;
    switch (def->verb) {
    case SMTP_VERB_MAIL:
        st = parse_path_cmd(cmd, "from:", 5, 1);
        break;
    case SMTP_VERB_RCPT:
        st = parse_path_cmd(cmd, "to:", 3, 0);
        break;
    case SMTP_VERB_AUTH:
        st = check_auth(cmd->arg, cmd->arg_len);
        break;
    default:
        /* HELO, EHLO, BDAT, VRFY, EXPN, NOOP, HELP: the session reads the
         * text; it only has to be free of control characters. */
        st = has_ctl(cmd->arg, cmd->arg_len) ? SMTP_PARSE_SYNTAX : SMTP_PARSE_OK;
        break;
    }
    if (st != SMTP_PARSE_OK) {
        cmd->addr = NULL;
        cmd->addr_len = 0;
        cmd->nparams = 0;
    }
    return st;
}

int smtp_param_is(const struct smtp_param *p, const char *key)
{
    size_t n = strlen(key);

    if (p->key_len != n) return 0;
    for (size_t i = 0; i < n; i++)
        if (ascii_lower((unsigned char)p->key[i]) != ascii_lower((unsigned char)key[i]))
            return 0;
    return 1;
}

int smtp_addr_is_utf8(const char *addr, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if ((unsigned char)addr[i] >= 0x80) return 1;
    return 0;
}

long smtp_addr_at(const char *addr, size_t len)
{
    size_t i = 0;

    /* A quoted local part may hold "@" itself; the separator follows it. */
    if (len > 0 && addr[0] == '"') {
        for (i = 1; i < len && addr[i] != '"'; i++)
            if (addr[i] == '\\') i++;
        if (i >= len) return -1;
        i++;
    }
    const char *at = i < len ? memchr(addr + i, '@', len - i) : NULL;
    return at ? (long)(at - addr) : -1;
}

/* ---- DATA stream ------------------------------------------------------ */

enum {
    DS_BOL = 0,   /* at the start of a line (after a real CRLF) */
    DS_TEXT,      /* inside a line */
    DS_CR,        /* inside a line, last byte a CR (already copied out) */
    DS_DOT,       /* line began with ".", which was dropped */
    DS_DOT_CR,    /* line began with ".\r", neither copied out */
    DS_DONE,
};

void smtp_data_init(struct smtp_data_scan *s, size_t max_line)
{
    s->state = DS_BOL;
    s->flags = 0;
    s->line_len = 0;
    s->max_line = max_line;
}

/* Line length counts the octets of the line as sent, stuffing dot included,
 * CRLF excluded (RFC 5321 §4.5.3.1.6 counts 998 + CRLF). */
static inline void data_line_add(struct smtp_data_scan *s, size_t k, size_t max)
{
    s->line_len += k;
    if (s->line_len > max) s->flags |= SMTP_DATA_LONG_LINE;
}

/* Copy the verbatim run in[from..to) to out+o; a no-op when scanning in
 * place and nothing has been dropped yet. */
static inline size_t data_emit(char *out, size_t o, const char *in,
                               size_t from, size_t to)
{
    size_t k = to - from;

    if (k && out + o != in + from) memmove(out + o, in + from, k);
    return o + k;
}

/* The input is copied out in runs: `run` marks where the current verbatim
 * run starts, and a run is cut only where a byte is dropped (a stuffing dot,
 * the end-of-data line) or the call ends. Every byte written out was
 * consumed in the same call, so out never needs more room than n, and out
 * may be in itself. */
size_t smtp_data_scan(struct smtp_data_scan *s, const char *in, size_t n,
                      char *out, size_t *out_n, int *done)
{
    /* max_line 0 means no limit rather than "only empty lines". */
    size_t max = s->max_line ? s->max_line : (size_t)-1;
    size_t i = 0, o = 0, run = 0;

    *done = 0;
    if (s->state == DS_DONE) {
        *out_n = 0;
        *done = 1;
        return 0;
    }
    while (i < n) {
        switch (s->state) {
        case DS_BOL:
            s->line_len = 0;
            if (in[i] == '.') {
                /* RFC 5321 §4.5.2: drop the first dot of the line; it is
                 * either stuffing or the start of the end-of-data line. */
                o = data_emit(out, o, in, run, i);
                run = ++i;
                data_line_add(s, 1, max);
                s->state = DS_DOT;
            } else {
                s->state = DS_TEXT;
            }
            break;

        case DS_DOT:
            if (in[i] == '\r') {
                run = ++i;        /* held back: maybe the end-of-data CRLF */
                s->state = DS_DOT_CR;
            } else {
                s->state = DS_TEXT;
            }
            break;

        case DS_DOT_CR:
            if (in[i] == '\n') {
                run = ++i;
                s->state = DS_DONE;
                *done = 1;
                goto out;
            }
            /* ".\r" then not LF: a bare CR. The held CR stays dropped: the
             * message is refused for it anyway, and emitting it now could
             * need one byte more than this call's input (its dot may have
             * arrived in an earlier call). */
            s->flags |= SMTP_DATA_BARE_CR;
            data_line_add(s, 1, max);
            s->state = DS_TEXT;
            break;

        case DS_CR:
            s->state = DS_TEXT;
            if (in[i] == '\n') {
                i++;
                s->state = DS_BOL;
            } else {
                s->flags |= SMTP_DATA_BARE_CR;
                data_line_add(s, 1, max);
            }
            break;

        case DS_TEXT: {
            const char *p = in + i;
            size_t avail = n - i;
            const char *lf = memchr(p, '\n', avail);
            size_t text, len = lf ? (size_t)(lf - p) : avail;

            if (lf && len > 0 && p[len - 1] == '\r') {
                text = len - 1;           /* CRLF: the line ends */
                s->state = DS_BOL;
                i += len + 1;
            } else if (lf) {
                /* A bare LF ends nothing (RFC 5321 §2.3.8); it is one
                 * more octet of this line. */
                s->flags |= SMTP_DATA_BARE_LF;
                text = len + 1;
                i += len + 1;
            } else if (p[len - 1] == '\r') {
                text = len - 1;           /* CR at the end: wait for its LF */
                s->state = DS_CR;
                i = n;
            } else {
                text = len;
                i = n;
            }
            /* Any CR left inside the text is bare. Once flagged, the
             * message is refused, so stop looking. */
            if (!(s->flags & SMTP_DATA_BARE_CR) && text && memchr(p, '\r', text))
                s->flags |= SMTP_DATA_BARE_CR;
            data_line_add(s, text, max);
            break;
        }

        default:    /* DS_DONE cannot be reached inside the loop */
            goto out;
        }
    }
out:
    o = data_emit(out, o, in, run, i);
    *out_n = o;
    return i;
}
