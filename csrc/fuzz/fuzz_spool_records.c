/* sources: csrc/queue/spool.c csrc/core/fsutil.c csrc/core/log.c csrc/core/loop.c csrc/core/buf.c csrc/core/timer.c */
/* libs: -luring */
/* The spool record reader on arbitrary bytes: a segment file may hold any
 * torn or damaged tail after a crash, and start-up must read it safely.
 * Every entry handed out must lie inside the image, and the valid prefix
 * must read the same when the image is cut right after it. */
#include "queue/spool.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define REQUIRE(c) do { if (!(c)) abort(); } while (0)

struct bounds {
    const char *lo, *hi;
    size_t count;
};

static int check_entry(const struct spool_entry *e, void *arg)
{
    struct bounds *b = arg;
    REQUIRE(e->env >= b->lo && e->env + e->env_len <= b->hi);
    REQUIRE(e->msg >= e->env + e->env_len && e->msg + e->msg_len <= b->hi);
    REQUIRE(strlen(e->id) == SPOOL_ID_LEN);
    REQUIRE(e->segment == NULL);
    b->count++;
    return 0;
}

/* Wrap the input as one well-formed record too, so the fuzzer reaches the
 * envelope and callback paths, not only the header checks. */
static size_t make_record(const uint8_t *data, size_t size, uint8_t *out)
{
    char env[64];
    int n = snprintf(env, sizeof env, "I 0123456789abcdef01\nF a@b\n");
    uint32_t env_len = (uint32_t)n;
    uint64_t msg_len = size, arrival = 1;
    uint32_t magic = 0x3151454dU;
    memcpy(out, &magic, 4);
    memcpy(out + 4, &env_len, 4);
    memcpy(out + 8, &msg_len, 8);
    memcpy(out + 16, &arrival, 8);
    uint32_t crc = spool_crc32c(spool_crc32c(0, env, env_len), data, size);
    memcpy(out + 24, &crc, 4);
    uint32_t hcrc = spool_crc32c(0, out, 28);
    memcpy(out + 28, &hcrc, 4);
    memcpy(out + 32, env, env_len);
    memcpy(out + 32 + env_len, data, size);
    return 32 + env_len + size;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct bounds b = {(const char *)data, (const char *)data + size, 0};
    size_t valid = spool_records_walk(data, size, check_entry, &b);
    REQUIRE(valid <= size);
    struct bounds b2 = {(const char *)data, (const char *)data + valid, 0};
    REQUIRE(spool_records_walk(data, valid, check_entry, &b2) == valid);
    REQUIRE(b2.count == b.count);

    uint8_t *img = malloc(size + 128);
    REQUIRE(img);
    size_t len = make_record(data, size, img);
    struct bounds b3 = {(const char *)img, (const char *)img + len, 0};
    REQUIRE(spool_records_walk(img, len, check_entry, &b3) == len);
    REQUIRE(b3.count == 1);
    free(img);
    return 0;
}
