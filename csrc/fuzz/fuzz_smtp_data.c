/* sources: csrc/smtp/parse.c */
/* libs: */
/* The DATA scanner on arbitrary bytes: fed whole, fed in pieces cut where
 * the input says, and fed in place, it must give the same message, flags
 * and end, and agree with a byte-at-a-time model of RFC 5321 §4.5.2. */
#include "smtp/parse.h"
#include "fuzz/smtp_data_model.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define REQUIRE(c) do { if (!(c)) abort(); } while (0)



/* One call on an exact-size copy of in[0..n), so ASan sees any overrun. */
static size_t scan_piece(struct smtp_data_scan *s, const char *in, size_t n,
                         int in_place, struct smtp_data_model *r)
{
    char *piece = malloc(n ? n : 1);
    char *out = in_place ? piece : malloc(n ? n : 1);
    size_t out_n = (size_t)-1;
    int done = -1, was_done = r->done;

    REQUIRE(piece && out);
    if (n) memcpy(piece, in, n);
    size_t used = smtp_data_scan(s, piece, n, out, &out_n, &done);
    REQUIRE(done == 0 || done == 1);
    REQUIRE(used <= n);
    REQUIRE(out_n <= used);
    REQUIRE(done || used == n);
    if (was_done) REQUIRE(done && used == 0 && out_n == 0);   /* nothing after the end */
    if (done && used) REQUIRE(piece[used - 1] == '\n');
    if (out_n) memcpy(r->out + r->out_n, out, out_n);
    r->out_n += out_n;
    r->used += used;
    r->done = done;
    r->flags = s->flags;
    if (!in_place) free(out);
    free(piece);
    return used;
}

/* Feed in[0..n) in pieces ending at the cuts, then the rest. */
static void feed(const char *in, size_t n, size_t max, const size_t *cuts,
                 size_t ncuts, int in_place, struct smtp_data_model *r)
{
    struct smtp_data_scan s;
    size_t pos = 0;
    uint32_t flags = 0;

    smtp_data_init(&s, max);
    r->out_n = r->used = 0;
    r->done = 0;
    for (size_t k = 0; k <= ncuts; k++) {
        size_t end = k < ncuts ? cuts[k] : n;
        if (end < pos) end = pos;
        scan_piece(&s, in + pos, end - pos, in_place, r);
        REQUIRE((r->flags & flags) == flags);      /* flags only ever grow */
        flags = r->flags;
        pos = end;
    }
}

static void same(const struct smtp_data_model *a, const struct smtp_data_model *b)
{
    REQUIRE(a->out_n == b->out_n);
    REQUIRE(memcmp(a->out, b->out, a->out_n) == 0);
    REQUIRE(a->used == b->used);
    REQUIRE(a->flags == b->flags);
    REQUIRE(a->done == b->done);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (size < 3) return 0;
    /* Two bytes of set-up: the line limit and where to cut. */
    size_t max = data[0] % 80;
    unsigned cut_seed = data[1];
    const char *in = (const char *)data + 2;
    size_t n = size - 2;
    struct smtp_data_model whole, model, split;
    char *buf = malloc(3 * n);

    REQUIRE(buf);
    whole.out = buf;
    model.out = buf + n;
    split.out = buf + 2 * n;

    feed(in, n, max, NULL, 0, 0, &whole);
    REQUIRE(whole.out_n <= n && whole.used <= n);
    smtp_data_model_scan(in, n, max, &model);
    same(&whole, &model);

    /* One cut at a place chosen by the input. */
    size_t cut = (size_t)cut_seed * 257 % (n + 1);
    feed(in, n, max, &cut, 1, 0, &split);
    same(&split, &whole);

    /* Many cuts: a pseudo-random walk seeded by the input, in place. */
    size_t cuts[64], ncuts = 0, pos = 0;
    uint32_t x = cut_seed * 2654435761u + (uint32_t)n;
    while (ncuts < 64 && pos < n) {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        pos += x % 9;
        cuts[ncuts++] = pos < n ? pos : n;
    }
    feed(in, n, max, cuts, ncuts, 1, &split);
    same(&split, &whole);

    /* What a clean message promises: every line of it ends in CRLF. */
    if (whole.done && !(whole.flags & (SMTP_DATA_BARE_CR | SMTP_DATA_BARE_LF)) && whole.out_n)
        REQUIRE(whole.out_n >= 2 && memcmp(whole.out + whole.out_n - 2, "\r\n", 2) == 0);

    free(buf);
    return 0;
}
