/* The per-folder index of a Maildir: stable UIDs, flags and modseqs for
 * IMAP and POP3, kept right while other tools (mutt, Dovecot, scripts) add,
 * rename and remove files behind our back. Blocking file I/O: callers run
 * it on a background thread. Writers serialize on flock(DIR/mailengine-index.lock).
 *
 * The index file DIR/mailengine-index is text, replaced atomically (tmp
 * file, fsync, rename) and only when something changed:
 *
 *   mailengine-index 1 <uidvalidity> <uidnext> <highestmodseq> <new_mtime_ns> <cur_mtime_ns>
 *   <uid> <modseq> <size> <internal_date> <n|c> <flags|-> <file name>
 *   ...
 *
 * Fields are separated by one space; every line ends with "\n" and is at
 * most MBOX_INDEX_LINE_MAX bytes. Numbers are decimal without leading
 * zeros or '+' (the two mtimes and internal_date may be negative). UIDs are
 * >= 1, strictly ascending and below uidnext; modseqs are between 1 and
 * highestmodseq. <n|c> says whether the file is in new/ or cur/; <file name>
 * is its exact name there (the rest of the line: it may hold spaces, not
 * '/' or control bytes, and does not start with '.'). <flags> is what the
 * name says after ":2,": its ASCII letters sorted and deduplicated, "-"
 * when none; the parser checks that the two agree. A recorded mtime of -1
 * (MBOX_INDEX_MTIME_DIRTY) means "rescan next time". */
#ifndef STORE_INDEX_H
#define STORE_INDEX_H

#include <stddef.h>
#include <stdint.h>

#define MBOX_INDEX_FILE "mailengine-index"
#define MBOX_INDEX_LOCK_FILE "mailengine-index.lock"
#define MBOX_INDEX_LINE_MAX 512      /* bytes of one index line, "\n" included */
#define MBOX_INDEX_NAME_MAX 255      /* bytes of a file name in new/ or cur/ */
#define MBOX_INDEX_FLAGS_MAX 31      /* flag letters kept per message */
#define MBOX_INDEX_MTIME_DIRTY (-1)  /* recorded directory mtime: rescan next time */

struct mbox_entry {
    uint32_t uid;
    uint64_t modseq;
    uint64_t size;          /* from ",S=<n>" in the name when present, else the file's size */
    int64_t internal_date;  /* seconds: the leading time in the name ("<sec>.xxx"), else the file's mtime */
    char *name;             /* current file name relative to the folder: "new/<file>" or "cur/<file>", the file
                               as it is named there (normally "cur/<base>:2,<flags>"); owned by the index (one
                               block with e[]), freed by mbox_index_free() */
    char flags[MBOX_INDEX_FLAGS_MAX + 1]; /* Maildir flag letters after ":2," (sorted ASCII, e.g. "FRS"), "" when none */
};

struct mbox_index {
    uint32_t uidvalidity, uidnext;
    uint64_t highestmodseq;
    size_t n;
    struct mbox_entry *e;   /* ascending uid */
};

/* Bring ix up to date with the folder at dir (dir, tmp/, new/ and cur/ are
 * created when missing), under the folder's lock (exclusive, blocking):
 * load the index, rescan new/ or cur/ when its mtime differs from the one
 * recorded (or the recorded one was within 2 s of the clock when it was
 * taken), give new files UIDs in name order, drop vanished files, follow
 * renames by base name (the part before ":2,"; new/ -> cur/ keeps the UID;
 * a change of flags bumps that entry's modseq), and save when anything
 * changed. A corrupt index is rebuilt from the files with a larger
 * UIDVALIDITY (and still returns 0). ix may hold a previous snapshot or be
 * zeroed; on success it is replaced, on failure left as it was.
 * 0 or -errno. */
int mbox_index_sync(const char *dir, struct mbox_index *ix);

/* Set uid's flags to `flags` (ASCII letters; stored sorted and
 * deduplicated): after a sync under the lock, rename the file to
 * cur/<base>:2,<flags> (from new/ too), give it modseq ++highestmodseq when
 * the flags changed, save. A file renamed meanwhile by another tool is
 * looked up again. ix is replaced as by mbox_index_sync(), also when the
 * answer is -ENOENT (uid not there). -EINVAL for a character that is not a
 * letter or more than MBOX_INDEX_FLAGS_MAX distinct letters. */
int mbox_index_set_flags(const char *dir, struct mbox_index *ix, uint32_t uid, const char *flags);

/* Remove the files of these uids and their entries (highestmodseq bumped
 * once); a uid or a file already gone is fine, a file renamed meanwhile by
 * another tool is found again. ix is replaced as by mbox_index_sync().
 * 0 or -errno; when some file could not be removed (other than already
 * gone), its entry stays, the others are removed, ix is replaced and the
 * first such error is returned. */
int mbox_index_expunge(const char *dir, struct mbox_index *ix, const uint32_t *uids, size_t n);

/* The entry of uid, NULL when none (binary search). */
struct mbox_entry *mbox_index_find(const struct mbox_index *ix, uint32_t uid);

/* Free what ix holds and zero it (a zeroed ix is fine). */
void mbox_index_free(struct mbox_index *ix);

/* The index file parser (pure): text[0..len) into ix (overwritten, not
 * freed: pass a zeroed or freed one) and the recorded mtimes. 0, -EINVAL on
 * anything malformed, -ENOMEM. */
int mbox_index_parse(const char *text, size_t len, struct mbox_index *ix,
                     int64_t *new_mtime_ns, int64_t *cur_mtime_ns);

/* The index file text of ix with these recorded mtimes (what
 * mbox_index_parse() reads back): a malloc'd buffer, its length in *len;
 * NULL when out of memory. */
char *mbox_index_format(const struct mbox_index *ix, int64_t new_mtime_ns, int64_t cur_mtime_ns,
                        size_t *len);

#endif
