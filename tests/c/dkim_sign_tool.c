/* sources: csrc/smtp/dkim.c */
/* libs: -lcrypto */
/* A command-line face on smtp/dkim.c for tests/test_dkim.py, which checks
 * what it signs with dkimpy:
 *
 *   dkim_sign_tool sign KEY DOMAIN SELECTOR MESSAGE [--now N] [--timestamp]
 *                  [--expire SECS] [--headers A,B,...] [--oversign A,B,...|-]
 *       writes the DKIM-Signature field followed by MESSAGE to stdout
 *   dkim_sign_tool dns KEY
 *       writes the TXT record to publish for KEY
 *
 * Not a unit test itself: no test_ prefix, so tests/test_c_units.py leaves
 * it alone. */
#include "smtp/dkim.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TOOL_MAX_NAMES DKIM_MAX_HEADERS

static int usage(void)
{
    fprintf(stderr, "usage: dkim_sign_tool sign KEY DOMAIN SELECTOR MESSAGE [--now N] "
                    "[--timestamp] [--expire SECS] [--headers A,B] [--oversign A,B|-]\n"
                    "       dkim_sign_tool dns KEY\n");
    return 2;
}

/* Split a comma list in place into a NULL-terminated array; "-" is empty. */
static int split_names(char *s, const char **names, size_t cap)
{
    size_t n = 0;
    if (strcmp(s, "-") != 0) {
        for (char *tok = strtok(s, ","); tok != NULL; tok = strtok(NULL, ",")) {
            if (n + 1 >= cap) return -1;
            names[n++] = tok;
        }
    }
    names[n] = NULL;
    return 0;
}

static char *read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (f == NULL) return NULL;
    size_t cap = 1 << 16, n = 0;
    char *buf = malloc(cap);
    while (buf != NULL) {
        n += fread(buf + n, 1, cap - n, f);
        if (n < cap) break;
        char *bigger = realloc(buf, cap * 2);
        if (bigger == NULL) {
            free(buf);
            buf = NULL;
            break;
        }
        buf = bigger;
        cap *= 2;
    }
    if (buf != NULL && ferror(f)) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *len = n;
    return buf;
}

static int cmd_dns(const char *key_path)
{
    char err[300], rec[DKIM_DNS_RECORD_MAX];
    struct dkim_key *k = dkim_key_load(key_path, err, sizeof err);
    if (k == NULL) {
        fprintf(stderr, "dkim_sign_tool: %s\n", err);
        return 1;
    }
    int n = dkim_key_dns_record(k, rec, sizeof rec);
    dkim_key_free(k);
    if (n < 0) {
        fprintf(stderr, "dkim_sign_tool: no DNS record\n");
        return 1;
    }
    printf("%s\n", rec);
    return 0;
}

static int cmd_sign(int argc, char **argv)
{
    if (argc < 6) return usage();
    const char *headers[TOOL_MAX_NAMES + 1], *oversign[TOOL_MAX_NAMES + 1];
    struct dkim_signer s = {.domain = argv[3], .selector = argv[4]};
    time_t now = time(NULL);
    for (int i = 6; i < argc; i++) {
        if (strcmp(argv[i], "--timestamp") == 0) {
            s.timestamp = 1;
        } else if (strcmp(argv[i], "--now") == 0 && i + 1 < argc) {
            now = (time_t)strtoll(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--expire") == 0 && i + 1 < argc) {
            s.expire = strtoul(argv[++i], NULL, 10);
        } else if (strcmp(argv[i], "--headers") == 0 && i + 1 < argc) {
            if (split_names(argv[++i], headers, TOOL_MAX_NAMES + 1) < 0) return usage();
            s.headers = headers;
        } else if (strcmp(argv[i], "--oversign") == 0 && i + 1 < argc) {
            if (split_names(argv[++i], oversign, TOOL_MAX_NAMES + 1) < 0) return usage();
            s.oversign = oversign;
        } else {
            return usage();
        }
    }

    char err[300];
    struct dkim_key *k = dkim_key_load(argv[2], err, sizeof err);
    if (k == NULL) {
        fprintf(stderr, "dkim_sign_tool: %s\n", err);
        return 1;
    }
    s.key = k;
    if (dkim_signer_check(&s, err, sizeof err) < 0) {
        fprintf(stderr, "dkim_sign_tool: %s\n", err);
        dkim_key_free(k);
        return 1;
    }
    size_t len;
    char *msg = read_file(argv[5], &len);
    if (msg == NULL) {
        perror(argv[5]);
        dkim_key_free(k);
        return 1;
    }
    char out[DKIM_SIGNATURE_MAX];
    int n = dkim_sign(&s, msg, len, now, out, sizeof out);
    int rc = 1;
    if (n < 0) {
        fprintf(stderr, "dkim_sign_tool: dkim_sign failed\n");
    } else if (fwrite(out, 1, (size_t)n, stdout) == (size_t)n &&
               fwrite(msg, 1, len, stdout) == len && fflush(stdout) == 0) {
        rc = 0;
    }
    free(msg);
    dkim_key_free(k);
    return rc;
}

int main(int argc, char **argv)
{
    if (argc >= 3 && strcmp(argv[1], "dns") == 0) return cmd_dns(argv[2]);
    if (argc >= 2 && strcmp(argv[1], "sign") == 0) return cmd_sign(argc, argv);
    return usage();
}
