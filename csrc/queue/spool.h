/* The spool: the single durability point. Each worker appends records
 * (envelope + message) to its own segment files; records appended in the
 * same loop turn share one fdatasync (group commit) and each caller hears
 * back only once that sync completed. Per-message outcomes go to a state
 * log beside the segment. Layout: DATA/spool/wNN/SEG.dat and SEG.log. */
#ifndef QUEUE_SPOOL_H
#define QUEUE_SPOOL_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#include "core/loop.h"

#define SPOOL_ID_LEN 18

struct spool;

struct spool_rec {
    struct spool_rec *next;
    char id[SPOOL_ID_LEN + 1];      /* set by spool_append */
    uint8_t hdr[32];                /* private: the record header */
    struct iovec iov[4];            /* iov[0] is the header; caller fills 1..n */
    int niov;                       /* caller: number of its iovecs + 1 */
    void (*done)(struct spool_rec *r, int err);  /* on the loop thread */
    /* private: where the record went */
    uint32_t seg;
    uint64_t offset, len;
};

/* Told on the loop thread, before each record's done: the record is on
 * stable storage at (segment, offset, length). And when a segment is
 * retired: no record will be added to it; nrecords were committed. */
typedef void (*spool_committed_fn)(void *arg, const struct spool_rec *r, uint32_t seg,
                                   uint64_t offset, uint64_t len);
typedef void (*spool_sealed_fn)(void *arg, uint32_t seg, uint32_t nrecords);

/* Open the worker's spool directory and start a new segment. NULL with a
 * message in err on failure. */
struct spool *spool_open(struct loop *l, const char *data_dir, int worker,
                         char *err, size_t errlen);
void spool_close(struct spool *s);
void spool_set_hooks(struct spool *s, spool_committed_fn committed, spool_sealed_fn sealed,
                     void *arg);

/* Give r an id (usable at once, e.g. in a Received: header written into
 * r's own iovecs afterwards) ... */
void spool_assign_id(struct spool *s, struct spool_rec *r);
/* ... then queue it for the next group commit. done(r, 0) follows once the
 * record is on stable storage, or done(r, -errno). */
void spool_append(struct spool *s, struct spool_rec *r);
/* Records written but not yet acknowledged (for a draining stop). */
size_t spool_inflight(const struct spool *s);

/* ---- reading, from any thread or process ---- */

struct spool_entry {
    const char *id;
    uint64_t arrival_ms;
    const char *env; size_t env_len;   /* envelope lines, see docs/internals.md */
    const char *msg; size_t msg_len;   /* the message, Received: header first */
    const char *segment;               /* path of the segment file */
};

/* Call cb for every record not yet final. cb returns 0 to go on, 1 to
 * stop. Returns the number of live records, or -errno. */
typedef int (*spool_scan_cb)(const struct spool_entry *e, void *arg);
long spool_scan(const char *data_dir, spool_scan_cb cb, void *arg);

/* The records of a segment image in memory, in order, stopping at the
 * first that does not check out (a torn tail) or when fn returns non-zero.
 * e->segment is NULL. Returns the length of the valid prefix. A pure
 * parser: it reads only base[0..size). */
size_t spool_records_walk(const void *base, size_t size, spool_scan_cb fn, void *arg);

/* Mark the message final (deleted) in its segment's state log.
 * 0, -ENOENT if no live record has that id, or -errno. */
int spool_delete(const char *data_dir, const char *id);
/* Append "<letter> <id>" to the message's state log (H hold, U release;
 * the queue reads them at start). Same results as spool_delete. */
int spool_mark(const char *data_dir, const char *id, char letter);

/* Start-up: drop segments whose records are all final, and report how
 * many live records remain (or -errno). Torn tails (a record never
 * acknowledged) are ignored by every reader. */
long spool_recover(const char *data_dir);

/* Every segment under DATA/spool, in worker then segment order: fn(path of
 * the .dat, path of its .log, arg); a non-zero return stops the walk and
 * is returned. -errno when the spool cannot be read; 0 without a spool. */
typedef int (*spool_segment_fn)(const char *dat, const char *log, void *arg);
int spool_for_each_segment(const char *data_dir, spool_segment_fn fn, void *arg);

uint32_t spool_crc32c(uint32_t crc, const void *p, size_t n);

#endif
