/* sources: csrc/queue/dsn.c csrc/core/buf.c */
/* libs: -luring */
/* A command-line face on queue/dsn.c for tests/test_dsn.py, which parses
 * what it builds with Python's email package and for docs/bounces.md:
 *
 *   dsn_dump SCENARIO [MAX_RETURN] < ORIGINAL
 *
 * reads the original message from stdin, builds the report SCENARIO
 * describes (failed, hdrs, delayed, delivered, mixed, utf8, longdiag) and
 * writes it to stdout; the DSN_OUT_* flags go to stderr as "flags=N".
 * Not a unit test itself: no test_ prefix, so tests/test_c_units.py leaves
 * it alone. */
#include "queue/dsn.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Fixed times so the output is the same on every run. */
#define NOW 1717243200                 /* Sat, 1 Jun 2024 12:00:00 +0000 */
#define MS(t) ((uint64_t)(t) * 1000)

static int usage(void)
{
    fprintf(stderr, "usage: dsn_dump failed|hdrs|delayed|delivered|mixed|utf8|longdiag "
                    "[MAX_RETURN] < ORIGINAL\n");
    return 2;
}

static char *read_all(FILE *f, size_t *len)
{
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    while (buf) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) break;
        char *bigger = realloc(buf, cap * 2);
        if (!bigger) {
            free(buf);
            return NULL;
        }
        buf = bigger;
        cap *= 2;
    }
    *len = n;
    return buf;
}

int main(int argc, char **argv)
{
    if (argc < 2 || argc > 3) return usage();
    const char *sc = argv[1];
    size_t orig_len = 0;
    char *orig = read_all(stdin, &orig_len);
    if (!orig) return 1;

    static char longdiag[6000];
    struct dsn_rcpt r[3] = {
        {.final_rcpt = "bob@dest.test", .orcpt = "rfc822;bob@dest.test", .action = DSN_FAILED,
         .status = "5.1.1", .remote_mta = "mx1.dest.test",
         .diagnostic = "550-5.1.1 The email account that you tried to reach does not exist.\n"
                       "550 5.1.1 Please check the address: <bob@dest.test>",
         .last_attempt_ms = MS(NOW - 60)},
        {.final_rcpt = "carol@nowhere.test", .action = DSN_FAILED, .status = "5.4.4",
         .diagnostic = "No mail server for nowhere.test (null MX)", .diag_type = "X-mailengine",
         .last_attempt_ms = MS(NOW - 30)},
        {0},
    };
    struct dsn_msg m = {
        .reporting_mta = "mail.example.test",
        .to = "alice@example.test",
        .envid = "QQ+2B314159",
        .queue_id = "6b04822b0000000001",
        .arrival_ms = MS(NOW - 3600),
        .rcpts = r,
        .nrcpt = 2,
        .orig = orig,
        .orig_len = orig_len,
        .max_return = argc == 3 ? strtoul(argv[2], NULL, 10) : 0,
        .now = NOW,
        .message_id_seed = "6b04822b0000000001.1",
    };

    if (strcmp(sc, "failed") == 0) {
    } else if (strcmp(sc, "hdrs") == 0) {
        m.ret_hdrs = 1;
    } else if (strcmp(sc, "delayed") == 0) {
        r[0] = (struct dsn_rcpt){.final_rcpt = "bob@dest.test", .action = DSN_DELAYED,
                                 .status = "4.4.1", .remote_mta = "mx1.dest.test",
                                 .diagnostic = "421 4.4.1 Connection timed out",
                                 .last_attempt_ms = MS(NOW - 60),
                                 .will_retry_until_ms = MS(NOW + 4 * 86400)};
        m.nrcpt = 1;
    } else if (strcmp(sc, "delivered") == 0) {
        r[0] = (struct dsn_rcpt){.final_rcpt = "bob@dest.test", .orcpt = "rfc822;bob@dest.test",
                                 .action = DSN_DELIVERED, .status = "2.0.0",
                                 .remote_mta = "mx1.dest.test",
                                 .diagnostic = "250 2.0.0 OK queued as 4XyZ",
                                 .last_attempt_ms = MS(NOW - 60)};
        m.nrcpt = 1;
    } else if (strcmp(sc, "mixed") == 0) {
        r[1] = (struct dsn_rcpt){.final_rcpt = "dave@slow.test", .action = DSN_DELAYED,
                                 .status = "4.2.2", .remote_mta = "mx.slow.test",
                                 .diagnostic = "452 4.2.2 Mailbox full",
                                 .will_retry_until_ms = MS(NOW + 86400)};
        r[2] = (struct dsn_rcpt){.final_rcpt = "erin@fine.test", .action = DSN_RELAYED,
                                 .status = "2.0.0", .remote_mta = "mx.fine.test"};
        m.nrcpt = 3;
    } else if (strcmp(sc, "utf8") == 0) {
        r[0].final_rcpt = "j\xc3\xb6rg@d\xc3\xa9st.test";
        r[0].orcpt = "utf-8;j\xc3\xb6rg@d\xc3\xa9st.test";
        r[0].diagnostic = "550 5.1.1 <j\xc3\xb6rg@d\xc3\xa9st.test>: unbekannt";
        m.nrcpt = 1;
    } else if (strcmp(sc, "longdiag") == 0) {
        /* One 5000-octet line without blanks and a line of many words. */
        size_t n = 0;
        n += (size_t)snprintf(longdiag, sizeof longdiag, "550 5.7.1 ");
        for (int i = 0; i < 5000; i++) longdiag[n++] = (char)('a' + i % 26);
        longdiag[n++] = '\n';
        for (int i = 0; i < 60 && n + 20 < sizeof longdiag; i++)
            n += (size_t)snprintf(longdiag + n, sizeof longdiag - n, "word%d ", i);
        longdiag[n] = '\0';
        r[0].diagnostic = longdiag;
        m.nrcpt = 1;
    } else {
        free(orig);
        return usage();
    }

    struct bytebuf out = {0};
    unsigned flags = 0;
    int rc = dsn_build_flags(&m, &out, &flags);
    if (rc < 0) {
        fprintf(stderr, "dsn_build: %d\n", rc);
        free(orig);
        return 1;
    }
    fwrite(bytebuf_head(&out), 1, bytebuf_used(&out), stdout);
    fprintf(stderr, "flags=%u\n", flags);
    bytebuf_free(&out);
    free(orig);
    return 0;
}
