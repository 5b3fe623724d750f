/* Byte buffers with a hard bound, and the per-worker ring of provided
 * receive buffers that multishot recv fills (an idle connection holds none). */
#ifndef CORE_BUF_H
#define CORE_BUF_H

#include <stddef.h>
#include <liburing.h>

struct bytebuf {
    char *data;
    size_t off;     /* consumed prefix */
    size_t len;     /* end of valid bytes (data[off..len) is live) */
    size_t cap;
};

static inline size_t bytebuf_used(const struct bytebuf *b) { return b->len - b->off; }
static inline char *bytebuf_head(const struct bytebuf *b) { return b->data + b->off; }

/* Room for `extra` more bytes after len, compacting first. 0 or -ENOMEM. */
int bytebuf_reserve(struct bytebuf *b, size_t extra);
int bytebuf_append(struct bytebuf *b, const void *p, size_t n);
/* Drop n bytes from the front; an emptied buffer resets to offset 0. */
void bytebuf_consume(struct bytebuf *b, size_t n);
/* Release the memory (buffers of idle connections are released). */
void bytebuf_free(struct bytebuf *b);

struct bufring {
    struct io_uring_buf_ring *ring;
    char *base;
    unsigned count;   /* power of two */
    unsigned size;    /* bytes per buffer */
    int bgid;
};

int bufring_init(struct bufring *br, struct io_uring *ring, int bgid,
                 unsigned count, unsigned size);
void bufring_destroy(struct bufring *br, struct io_uring *ring);
static inline char *bufring_buf(const struct bufring *br, unsigned bid)
{
    return br->base + (size_t)bid * br->size;
}
/* Give buffer bid back to the kernel. */
void bufring_recycle(struct bufring *br, unsigned bid);

#endif
