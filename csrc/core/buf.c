/* Byte buffers and the provided-buffer ring (see buf.h). */
#include "core/buf.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

int bytebuf_reserve(struct bytebuf *b, size_t extra)
{
    if (b->cap - b->len >= extra) return 0;
    if (b->off > 0) {
        size_t used = b->len - b->off;
        memmove(b->data, b->data + b->off, used);
        b->off = 0;
        b->len = used;
        if (b->cap - b->len >= extra) return 0;
    }
    size_t need = b->len + extra;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need) cap *= 2;
    char *d = realloc(b->data, cap);
    if (!d) return -ENOMEM;
    b->data = d;
    b->cap = cap;
    return 0;
}

int bytebuf_append(struct bytebuf *b, const void *p, size_t n)
{
    if (n == 0) return 0;
    if (bytebuf_reserve(b, n) < 0) return -ENOMEM;
    memcpy(b->data + b->len, p, n);
    b->len += n;
    return 0;
}

void bytebuf_consume(struct bytebuf *b, size_t n)
{
    b->off += n;
    if (b->off >= b->len) b->off = b->len = 0;
}

void bytebuf_free(struct bytebuf *b)
{
    free(b->data);
    b->data = NULL;
    b->off = b->len = b->cap = 0;
}

int bufring_init(struct bufring *br, struct io_uring *ring, int bgid,
                 unsigned count, unsigned size)
{
    size_t ring_bytes = count * sizeof(struct io_uring_buf);
    void *r = mmap(NULL, ring_bytes, PROT_READ | PROT_WRITE,
                   MAP_ANONYMOUS | MAP_PRIVATE, -1, 0);
    if (r == MAP_FAILED) return -errno;
    char *base = malloc((size_t)count * size);
    if (!base) {
        munmap(r, ring_bytes);
        return -ENOMEM;
    }
    struct io_uring_buf_reg reg = {
        .ring_addr = (unsigned long)r, .ring_entries = count, .bgid = (unsigned short)bgid};
    int rc = io_uring_register_buf_ring(ring, &reg, 0);
    if (rc < 0) {
        free(base);
        munmap(r, ring_bytes);
        return rc;
    }
    br->ring = r;
    br->base = base;
    br->count = count;
    br->size = size;
    br->bgid = bgid;
    io_uring_buf_ring_init(br->ring);
    int mask = io_uring_buf_ring_mask(count);
    for (unsigned i = 0; i < count; i++)
        io_uring_buf_ring_add(br->ring, base + (size_t)i * size, size, (unsigned short)i, mask, (int)i);
    io_uring_buf_ring_advance(br->ring, (int)count);
    return 0;
}

void bufring_destroy(struct bufring *br, struct io_uring *ring)
{
    if (!br->ring) return;
    io_uring_unregister_buf_ring(ring, br->bgid);
    munmap(br->ring, br->count * sizeof(struct io_uring_buf));
    free(br->base);
    br->ring = NULL;
    br->base = NULL;
}

void bufring_recycle(struct bufring *br, unsigned bid)
{
    io_uring_buf_ring_add(br->ring, bufring_buf(br, bid), br->size, (unsigned short)bid,
                          io_uring_buf_ring_mask(br->count), 0);
    io_uring_buf_ring_advance(br->ring, 1);
}
