/* sources: csrc/pop3/parse.c */
/* libs: */
/* POP3 line framing and command parsing on arbitrary bytes: every pointer
 * handed back lies inside the input, lengths are bounded, and what OK
 * promises about arity, numbers and bytes holds. */
#include "pop3/parse.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define REQUIRE(c) do { if (!(c)) abort(); } while (0)

static int within(const char *p, size_t n, const char *base, size_t len)
{
    return p >= base && n <= len && (size_t)(p - base) <= len - n;
}

static int is_ctl(unsigned char c) { return c < 0x20 || c == 0x7f; }

static int is_digits(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] < '0' || p[i] > '9') return 0;
    return 1;
}

static int all_zero(const char *p, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (p[i] != '0') return 0;
    return 1;
}

static void arity(enum pop3_cmd c, unsigned *min, unsigned *max, unsigned *numeric)
{
    *numeric = 0;
    switch (c) {
    case POP3_USER: case POP3_PASS: *min = *max = 1; return;
    case POP3_APOP: *min = *max = 2; return;
    case POP3_AUTH: *min = 1; *max = 2; return;
    case POP3_LIST: case POP3_UIDL: *min = 0; *max = 1; *numeric = 1; return;
    case POP3_RETR: case POP3_DELE: *min = *max = 1; *numeric = 1; return;
    case POP3_TOP: *min = *max = 2; *numeric = 3; return;
    default: *min = *max = 0; return;
    }
}

static void check_command(const char *line, size_t len)
{
    struct pop3_command c;
    enum pop3_parse_status st = pop3_parse(line, len, &c);

    REQUIRE(st <= POP3_ERR_TOO_LONG);
    REQUIRE(c.cmd <= POP3_QUIT);
    REQUIRE(strlen(pop3_cmd_name(c.cmd)) >= 1 && strlen(pop3_cmd_name(c.cmd)) <= 4);
    REQUIRE((st == POP3_ERR_TOO_LONG) == (len > POP3_LINE_MAX - 2));
    REQUIRE(st != POP3_ERR_EMPTY || len == 0);
    if (st == POP3_ERR_UNKNOWN || st == POP3_ERR_EMPTY || st == POP3_ERR_TOO_LONG)
        REQUIRE(c.cmd == POP3_UNKNOWN);
    if (st != POP3_OK) {
        REQUIRE(c.nargs == 0 && c.rest == NULL && c.rest_len == 0);
        REQUIRE(c.arg[0] == NULL && c.arg[1] == NULL);
        return;
    }
    REQUIRE(c.cmd != POP3_UNKNOWN);
    REQUIRE(len >= 3 && line[0] != ' ');

    /* The keyword is the command's name, in any case (RFC 1939 §3). */
    const char *name = pop3_cmd_name(c.cmd);
    size_t kl = strlen(name);
    REQUIRE(len >= kl && (len == kl || line[kl] == ' '));
    for (size_t i = 0; i < kl; i++)
        REQUIRE((line[i] & ~0x20) == name[i]);

    unsigned min, max, numeric;
    arity(c.cmd, &min, &max, &numeric);
    REQUIRE(c.nargs >= min && c.nargs <= max && c.nargs <= POP3_ARG_MAX);
    for (unsigned k = 0; k < c.nargs; k++) {
        REQUIRE(c.arg_len[k] > 0 && within(c.arg[k], c.arg_len[k], line, len));
        REQUIRE(c.arg[k] > line + kl);
        if (k > 0) REQUIRE(c.arg[k] >= c.arg[k - 1] + c.arg_len[k - 1] + 1);
        if (c.cmd != POP3_PASS) {
            REQUIRE(memchr(c.arg[k], ' ', c.arg_len[k]) == NULL);
            REQUIRE(c.arg[k][-1] == ' ');
            size_t end = (size_t)(c.arg[k] - line) + c.arg_len[k];
            REQUIRE(end == len || line[end] == ' ');
        }
        if (c.cmd != POP3_PASS && c.cmd != POP3_AUTH) REQUIRE(c.arg_len[k] <= POP3_ARG_LEN_MAX);
        unsigned long v = pop3_number(c.arg[k], c.arg_len[k]);
        if (numeric >> k & 1) {
            REQUIRE(c.arg_len[k] <= 9 && is_digits(c.arg[k], c.arg_len[k]));
            REQUIRE(v <= 999999999UL);
            REQUIRE((v == 0) == all_zero(c.arg[k], c.arg_len[k]));
        } else if (!is_digits(c.arg[k], c.arg_len[k]) || c.arg_len[k] > 9) {
            REQUIRE(v == 0);
        }
    }
    for (unsigned k = c.nargs; k < POP3_ARG_MAX; k++) REQUIRE(c.arg[k] == NULL && c.arg_len[k] == 0);

    if (c.cmd == POP3_PASS || c.cmd == POP3_AUTH) {
        REQUIRE(c.rest == line + kl + 1 && c.rest_len == len - kl - 1 && c.rest_len > 0);
    } else {
        REQUIRE(c.rest == NULL && c.rest_len == 0);
    }
    if (c.cmd == POP3_PASS) REQUIRE(c.arg[0] == c.rest && c.arg_len[0] == c.rest_len);
    /* Only a TAB in a password gets past. */
    for (size_t i = 0; i < len; i++) {
        unsigned char b = (unsigned char)line[i];
        if (is_ctl(b)) REQUIRE(c.cmd == POP3_PASS && b == '\t' && i > kl);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *p = (const char *)data;

    /* The whole input as one command, CR, LF and all. */
    check_command(p, size);

    /* Frame it into lines the way a session would. */
    size_t off = 0;
    while (off < size) {
        size_t len = (size_t)-1, n = size - off;
        size_t used = pop3_line_end(p + off, n, &len);
        if (used == 0) {
            REQUIRE(len == 0 && memchr(p + off, '\n', n) == NULL);
            check_command(p + off, n);
            break;
        }
        REQUIRE(used <= n && p[off + used - 1] == '\n');
        REQUIRE(memchr(p + off, '\n', used - 1) == NULL);
        REQUIRE(len == used - 1 || (len == used - 2 && p[off + len] == '\r'));
        if (len == used - 1 && len > 0) REQUIRE(p[off + len - 1] != '\r');
        check_command(p + off, len);
        off += used;
    }
    return 0;
}
