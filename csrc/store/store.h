/* The mailbox store behind local delivery, POP3 and (later) IMAP: a table
 * of blocking operations, run off the worker loops (on the offload
 * threads). Two backends: the Maildir store in C (store/mailstore.c) and a
 * Python object (py/pystore.c) for mail kept in the user's own system.
 *
 * Names: a user is the canonical mailbox address (lower case, no "+tag",
 * see mailbox_of in store/maildir.h); a folder is "INBOX" or a name such as "Junk" or
 * "Archive.2024" ('.' separates levels, as Maildir++ and Dovecot's
 * default Maildir layout have it; '/' in a name is read as '.').
 * Flags are Maildir letters, sorted: D (draft), F (flagged), P (passed),
 * R (replied), S (seen), T (trashed, IMAP's \Deleted). */
#ifndef STORE_STORE_H
#define STORE_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define STORE_ID_MAX 72           /* a message's stable id (POP3 UIDL) and NUL, in buffers */
#define STORE_FOLDER_MAX 200

/* 48 bytes: a POP3 session holds one per message of its maildrop. The
 * strings belong to the snapshot (valid until it is closed or refreshed). */
struct store_msg {
    uint32_t uid;
    uint8_t id_len;               /* 1-70 */
    uint64_t modseq;
    uint64_t size;                /* octets as served (CRLF line ends) */
    int64_t internal_date;        /* seconds since the epoch */
    const char *flags;            /* Maildir letters, NUL-terminated */
    const char *id;               /* stable id (POP3 UIDL), id_len bytes, not NUL-terminated;
                                     may hold bytes a protocol must replace (spaces) */
};

struct store_quota {
    uint64_t bytes, messages;     /* 0: unlimited */
};

struct store;

/* An open folder: a snapshot, private to one session (IMAP's SELECT,
 * POP3's maildrop). Backends embed it first in their own struct. */
struct store_mbox {
    struct store *st;
    uint32_t uidvalidity, uidnext;
    uint64_t highestmodseq;
    size_t n;
    struct store_msg *msgs;       /* ascending uid */
};

struct store_ops {
    const char *name;
    /* Store prefix (extra header lines, may be empty) then msg as a new
     * message of user's folder (created when missing). The message's id
     * goes to id. 0; -EDQUOT over quota; -EINVAL a name that cannot be a
     * mailbox; other -errno are temporary. */
    int (*deliver)(struct store *st, const char *user, const char *folder, const struct store_quota *q,
                   const char *prefix, size_t plen, const char *msg, size_t len, char *id, size_t idcap);
    /* 0 when one more message of size bytes fits user's quota, -EDQUOT
     * when it does not. */
    int (*quota_check)(struct store *st, const char *user, const struct store_quota *q, uint64_t size);
    /* Open user's folder (an empty INBOX when nothing was ever stored). */
    int (*open)(struct store *st, const char *user, const char *folder, struct store_mbox **out);
    /* The whole message of uid, malloc'd, as stored. -ENOENT when it is gone. */
    int (*read)(struct store_mbox *mb, uint32_t uid, char **data, size_t *len);
    /* Remove these messages (gone already is fine) and update the snapshot. */
    int (*expunge)(struct store_mbox *mb, const uint32_t *uids, size_t n);
    /* Replace uid's flags. */
    int (*set_flags)(struct store_mbox *mb, uint32_t uid, const char *flags);
    void (*close)(struct store_mbox *mb);
    void (*destroy)(struct store *st);
};

struct store {
    const struct store_ops *ops;
};

/* The Maildir store rooted at root (ROOT/<domain>/<local>/, see
 * store/maildir.h); host goes into file names. NULL on allocation failure. */
struct store *mailstore_new(const char *root, const char *host);

/* Folder name checks and the Maildir++ directory name (".Junk",
 * ".Archive.2024"; "" for INBOX). -EINVAL for names that cannot be folders
 * (empty levels, leading '.', control bytes, too long). */
int store_folder_dir(const char *folder, char *buf, size_t cap);

/* Binary search of a snapshot. */
struct store_msg *store_mbox_find(const struct store_mbox *mb, uint32_t uid);

#endif
