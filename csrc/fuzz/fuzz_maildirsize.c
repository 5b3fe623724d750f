/* sources: csrc/store/quota.c csrc/core/fsutil.c */
/* libs: */
/* The maildirsize parser on arbitrary bytes (other tools, and users with
 * shell access, write that file). It must agree, verdict and sums, with a
 * naive model written from quota.h (128-bit sums, so the model cannot
 * overflow where the parser must notice), and the limits line the module
 * writes must read back as the limits it was written from. */
#include "store/quota.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define REQUIRE(c) do { if (!(c)) abort(); } while (0)

typedef __int128 i128;

static int digit(char c) { return c >= '0' && c <= '9'; }
static int blank(char c) { return c == ' ' || c == '\t'; }

/* A run of digits as a 128-bit value, saturated well above 2^64. */
static i128 digits_value(const char *p, size_t n)
{
    i128 v = 0;
    for (size_t i = 0; i < n; i++) {
        v = v * 10 + (p[i] - '0');
        if (v > ((i128)1 << 70)) v = (i128)1 << 70;
    }
    return v;
}

static int model_limits(const char *p, size_t n, struct quota_limits *lim)
{
    lim->bytes = lim->messages = 0;
    if (n == 0) return 0;
    size_t start = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i < n && p[i] != ',') continue;
        size_t tl = i - start;
        const char *t = p + start;
        if (tl < 2) return -1;
        for (size_t k = 0; k + 1 < tl; k++)
            if (!digit(t[k])) return -1;
        i128 v = digits_value(t, tl - 1);
        if (v > (i128)UINT64_MAX) return -1;
        if (t[tl - 1] == 'S') lim->bytes = (uint64_t)v;
        else if (t[tl - 1] == 'C') lim->messages = (uint64_t)v;
        else return -1;
        start = i + 1;
    }
    return 0;
}

/* One signed number token: [+-]digits. */
static int model_number(const char *t, size_t n, i128 *v)
{
    int neg = 0;
    if (n && (t[0] == '+' || t[0] == '-')) neg = t[0] == '-', t++, n--;
    if (n == 0) return -1;
    for (size_t k = 0; k < n; k++)
        if (!digit(t[k])) return -1;
    i128 x = digits_value(t, n);
    if (neg) x = -x;
    if (x > INT64_MAX || x < INT64_MIN) return -1;
    *v = x;
    return 0;
}

static int model(const char *s, size_t len, struct quota_limits *lim, int64_t *b, int64_t *c, size_t *lines)
{
    if (memchr(s, 0, len)) return -1;
    const char *nl = memchr(s, '\n', len);
    if (!nl || model_limits(s, (size_t)(nl - s), lim) < 0) return -1;
    i128 sb = 0, sc = 0;
    size_t n = 0;
    const char *p = nl + 1, *end = s + len;
    while (p < end) {
        const char *le = memchr(p, '\n', (size_t)(end - p));
        if (!le) break;
        /* Exactly two blank-separated tokens. */
        const char *tok[3];
        size_t tl[3], nt = 0;
        for (const char *q = p; q < le;) {
            while (q < le && blank(*q)) q++;
            if (q == le) break;
            const char *st = q;
            while (q < le && !blank(*q)) q++;
            if (nt < 3) {
                tok[nt] = st;
                tl[nt] = (size_t)(q - st);
            }
            nt++;
        }
        i128 x, y;
        if (nt != 2 || model_number(tok[0], tl[0], &x) < 0 || model_number(tok[1], tl[1], &y) < 0) return -1;
        sb += x;
        sc += y;
        if (sb > INT64_MAX || sb < INT64_MIN || sc > INT64_MAX || sc < INT64_MIN) return -1;
        n++;
        p = le + 1;
    }
    if (sb < 0 || sc < 0) return -1;
    *b = (int64_t)sb;
    *c = (int64_t)sc;
    *lines = n;
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *text = malloc(size ? size : 1);
    if (!text) return 0;
    memcpy(text, data, size);

    struct quota_limits lim = {0, 0}, mlim = {0, 0};
    int64_t b = 0, c = 0, mb = 0, mc = 0;
    size_t lines = 0, mlines = 0;
    int rc = quota_parse_lines(text, size, &lim, &b, &c, &lines);
    int mrc = model(text, size, &mlim, &mb, &mc, &mlines);
    REQUIRE(rc == 0 || rc == -EINVAL);
    REQUIRE((rc == 0) == (mrc == 0));
    if (rc == 0) {
        REQUIRE(lim.bytes == mlim.bytes && lim.messages == mlim.messages);
        REQUIRE(b == mb && c == mc && lines == mlines && b >= 0 && c >= 0);
        struct quota_limits l2;
        int64_t b2, c2;
        REQUIRE(quota_parse(text, size, &l2, &b2, &c2) == 0 && b2 == b && c2 == c);

        /* What we would write for these limits reads back as them. */
        char line[64];
        size_t n = quota_format_limits(&lim, line, sizeof line);
        REQUIRE(n > 0 && n < sizeof line && line[n - 1] == '\n');
        REQUIRE(quota_parse(line, n, &l2, &b2, &c2) == 0);
        REQUIRE(l2.bytes == lim.bytes && l2.messages == lim.messages && b2 == 0 && c2 == 0);
    }
    free(text);
    return 0;
}
