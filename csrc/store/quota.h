/* Maildir++ quota: the `maildirsize` file in a user's root Maildir, as
 * Courier, maildrop, Exim and Dovecot's "maildir" quota backend keep it
 * (https://www.courier-mta.org/imap/README.maildirquota.html). Blocking
 * file I/O: callers run it on a background thread.
 *
 *   <bytes>S,<count>C          the limits (either part may be missing; 0 or
 *                              missing: unlimited; "0S" when neither is set)
 *   <bytes> <count>            then deltas, possibly negative, added up
 *   ...
 *
 * Writers append one delta line with O_APPEND and take no lock; the file is
 * recalculated from the messages (and replaced by rename) when it is
 * missing, unreadable, 5120 bytes or more, carries other limits, or says the
 * user is over quota while holding more than one delta line or being older
 * than 15 minutes (the convention's guard against drifted sums). */
#ifndef STORE_QUOTA_H
#define STORE_QUOTA_H

#include <stddef.h>
#include <stdint.h>

#define QUOTA_FILE "maildirsize"
#define QUOTA_FILE_MAX 5120            /* bytes: at this size the file is recalculated */
#define QUOTA_STALE_SECS (15 * 60)     /* an over-quota file older than this is recalculated */

struct quota_limits { uint64_t bytes, messages; };   /* 0: unlimited */

/* Usage of the whole user Maildir at root (INBOX new/ and cur/ plus every
 * ".Folder"'s new/ and cur/): from maildirsize when it can be trusted (see
 * above), else recalculated by scanning (size from ",S=" in names, else
 * stat()) and the file rewritten atomically with lim's line and one total
 * line. 0 or -errno. */
int quota_usage(const char *root, const struct quota_limits *lim, uint64_t *bytes, uint64_t *messages);

/* 0 when adding one message of `size` bytes stays within lim, -EDQUOT when
 * it would not (limits of 0 never refuse), or -errno. */
int quota_check(const char *root, const struct quota_limits *lim, uint64_t size);

/* Record a change that has happened (delivery: +size +1, expunge: -size -1)
 * as one append of "<bytes> <count>\n" with O_APPEND. When maildirsize is
 * missing it is created by a recalculation instead, which already counts
 * the change; with lim NULL a missing file is left missing (a file another
 * tool keeps is kept in step, none is started). 0 or -errno. */
int quota_add(const char *root, const struct quota_limits *lim, int64_t bytes, int64_t messages);

/* The maildirsize parser (pure): the limits line and the sum of the delta
 * lines. A last line without "\n" is a torn append and is ignored. -EINVAL
 * when the limits line is missing or malformed, a delta line is not two
 * integers (spaces and tabs around them are fine), a NUL byte appears, a
 * sum overflows, or a total is negative. */
int quota_parse(const char *text, size_t len, struct quota_limits *lim, int64_t *bytes, int64_t *messages);

/* quota_parse(), also giving the number of delta lines read. */
int quota_parse_lines(const char *text, size_t len, struct quota_limits *lim, int64_t *bytes,
                      int64_t *messages, size_t *lines);

/* The limits line for lim, "\n" included, into buf (at least 48 bytes):
 * its length. */
size_t quota_format_limits(const struct quota_limits *lim, char *buf, size_t cap);

#endif
