/* sources: csrc/smtp/parse.c */
/* libs: */
/* Command-line framing and parsing on arbitrary bytes: every pointer handed
 * back lies inside the input, lengths add up, and what OK promises holds. */
#include "smtp/parse.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define REQUIRE(c) do { if (!(c)) abort(); } while (0)

static int within(const char *p, size_t n, const char *base, size_t len)
{
    return p >= base && n <= len && (size_t)(p - base) <= len - n;
}

static int is_ctl(unsigned char c) { return c < 0x20 || c == 0x7f; }

static void check_command(const char *line, size_t len)
{
    struct smtp_cmd cmd;
    enum smtp_parse_status st = smtp_parse_command(line, len, &cmd);

    REQUIRE(st <= SMTP_PARSE_TOO_MANY_PARAMS);
    REQUIRE(cmd.verb <= SMTP_VERB_AUTH);
    REQUIRE((st == SMTP_PARSE_UNKNOWN) == (cmd.verb == SMTP_VERB_UNKNOWN));
    REQUIRE(within(cmd.arg, cmd.arg_len, line, len));
    if (cmd.arg_len) REQUIRE(cmd.arg[0] != ' ' && cmd.arg[cmd.arg_len - 1] != ' ');
    REQUIRE(cmd.nparams <= SMTP_MAX_PARAMS);
    if (st != SMTP_PARSE_OK) {
        REQUIRE(cmd.addr == NULL && cmd.nparams == 0);
        return;
    }
    if (cmd.verb == SMTP_VERB_MAIL || cmd.verb == SMTP_VERB_RCPT) {
        REQUIRE(cmd.addr != NULL);
        REQUIRE(within(cmd.addr, cmd.addr_len, cmd.arg, cmd.arg_len));
        REQUIRE(cmd.verb == SMTP_VERB_MAIL || cmd.addr_len > 0);
        int quoted = cmd.addr_len && cmd.addr[0] == '"';
        for (size_t i = 0; i < cmd.addr_len; i++) {
            unsigned char c = (unsigned char)cmd.addr[i];
            REQUIRE(!is_ctl(c));
            if (!quoted) REQUIRE(c != ' ' && c != '<' && c != '>');
        }
        long at = smtp_addr_at(cmd.addr, cmd.addr_len);
        REQUIRE(at >= -1 && at < (long)cmd.addr_len);
        if (at >= 0) REQUIRE(cmd.addr[at] == '@' && (size_t)at + 1 < cmd.addr_len);
        REQUIRE(smtp_addr_is_utf8(cmd.addr, cmd.addr_len) == 0 ||
                smtp_addr_is_utf8(cmd.addr, cmd.addr_len) == 1);
        for (unsigned k = 0; k < cmd.nparams; k++) {
            const struct smtp_param *p = &cmd.params[k];
            REQUIRE(p->key_len > 0 && within(p->key, p->key_len, cmd.arg, cmd.arg_len));
            REQUIRE(p->key > cmd.addr);
            if (p->val) {
                REQUIRE(p->val_len > 0 && within(p->val, p->val_len, cmd.arg, cmd.arg_len));
                REQUIRE(p->val == p->key + p->key_len + 1 && p->val[-1] == '=');
                REQUIRE(memchr(p->val, ' ', p->val_len) == NULL);
            } else {
                REQUIRE(p->val_len == 0);
            }
            REQUIRE(memchr(p->key, ' ', p->key_len) == NULL);
            REQUIRE(memchr(p->key, '=', p->key_len) == NULL);
            REQUIRE(smtp_param_is(p, "SIZE") == 0 || p->key_len == 4);
            if (k > 0) REQUIRE(p->key > cmd.params[k - 1].key);
        }
    } else {
        REQUIRE(cmd.addr == NULL && cmd.nparams == 0);
        for (size_t i = 0; i < cmd.arg_len; i++) REQUIRE(!is_ctl((unsigned char)cmd.arg[i]));
    }
    if (cmd.verb == SMTP_VERB_DATA || cmd.verb == SMTP_VERB_QUIT ||
        cmd.verb == SMTP_VERB_RSET || cmd.verb == SMTP_VERB_STARTTLS)
        REQUIRE(cmd.arg_len == 0);
    if (cmd.verb == SMTP_VERB_HELO || cmd.verb == SMTP_VERB_EHLO ||
        cmd.verb == SMTP_VERB_AUTH || cmd.verb == SMTP_VERB_BDAT)
        REQUIRE(cmd.arg_len > 0);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *p = (const char *)data;
    /* The first byte picks the line limit: the real 512 below 0x80, else a
     * small one, so that short inputs reach TOO_LONG. */
    size_t max = size && data[0] >= 0x80 ? 1 + (size_t)data[0] % 128 : 512;
    size_t off = size ? 1 : 0;

    /* The whole input as one command, CR, LF and all. */
    check_command(p, size);

    /* Frame it into lines the way a session would. */
    while (off < size) {
        size_t len = (size_t)-1, used = (size_t)-1, n = size - off;
        enum smtp_line_result r = smtp_line_find(p + off, n, max, &len, &used);

        REQUIRE(r <= SMTP_LINE_TOO_LONG);
        if (r == SMTP_LINE_NEED_MORE) {
            REQUIRE(n < max && memchr(p + off, '\n', n) == NULL);
            check_command(p + off, n);
            break;
        }
        REQUIRE(used >= 1 && used <= n && used <= max);
        if (r == SMTP_LINE_TOO_LONG) {
            REQUIRE(memchr(p + off, '\n', used) == NULL);
            off += used;
            const char *lf = memchr(p + off, '\n', size - off);
            off = lf ? (size_t)(lf - p) + 1 : size;
            continue;
        }
        REQUIRE(p[off + used - 1] == '\n');
        REQUIRE(memchr(p + off, '\n', used - 1) == NULL);
        if (r == SMTP_LINE_BARE_LF) {
            REQUIRE(len == used - 1 && (len == 0 || p[off + len - 1] != '\r'));
        } else {
            REQUIRE(len == used - 2 && p[off + len] == '\r');
            REQUIRE((r == SMTP_LINE_BARE_CR) == (memchr(p + off, '\r', len) != NULL));
        }
        check_command(p + off, len);
        off += used;
    }
    return 0;
}
