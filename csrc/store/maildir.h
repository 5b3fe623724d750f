/* Maildir delivery: a message goes into tmp/, is synced, and is renamed
 * into new/ (then new/ is synced), so a reader never sees half a message
 * and a crash leaves at most a stray file in tmp/. Blocking file I/O: the
 * queue runs it on the offload thread. Layout: Maildir++ per user under
 * ROOT/<domain>/<local part>/ (INBOX is that directory; folders, later,
 * are ".Name" inside it), as Dovecot reads with maildir:ROOT/%d/%n. */
#ifndef STORE_MAILDIR_H
#define STORE_MAILDIR_H

#include <stddef.h>

/* The mailbox an address names: lower case, "+tag" dropped from the local
 * part (a leading '+' is not a tag). addr is len bytes (no NUL needed);
 * the result goes NUL-terminated into buf. Its length, or -EINVAL (no '@',
 * an empty part, or it does not fit). The one rule for SMTP's user check,
 * aliases, delivery and POP3 logins. */
int mailbox_of(const char *addr, size_t len, char *buf, size_t cap);

/* The mailbox directory of address (lower-cased; "+tag" removed from the
 * local part) under root, into buf. -EINVAL when the address cannot name
 * a directory safely (no '@', empty parts, '/', a leading '.', control
 * bytes, too long). */
int maildir_path(const char *root, const char *address, char *buf, size_t cap);

/* Write prefix (extra header lines, may be NULL) then msg into the Maildir
 * at dir (tmp, new and cur are created when missing), file name
 * "<sec>.M<usec>P<pid>Q<n>.<host>,S=<size>". 0, or -errno; on failure
 * nothing is left in new/. The name (relative to new/) goes to name. */
int maildir_deliver(const char *dir, const char *host, const char *prefix, size_t plen,
                    const char *msg, size_t len, char *name, size_t namecap);

#endif
