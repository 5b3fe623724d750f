/* The Maildir store (store.h): Maildir++ per user under ROOT/<domain>/<local>
 * (INBOX is that directory, folders are ".Name" inside it with a
 * "maildirfolder" marker), delivery through tmp/ -> new/ (maildir.c), UIDs,
 * flags and modseqs from the per-folder index (index.c), the Maildir++
 * quota file (quota.c). */
#include "store/store.h"

#include "core/fsutil.h"
#include "store/index.h"
#include "store/maildir.h"
#include "store/quota.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#define PATH_CAP 4400

struct mailstore {
    struct store st;
    char *root;
    char *host;
};

struct mailstore_mbox {
    struct store_mbox mb;         /* first: the store_mbox pointer casts back */
    struct mbox_index ix;
    char *dir;
};

int store_folder_dir(const char *folder, char *buf, size_t cap)
{
    if (!folder || !*folder || strcasecmp(folder, "INBOX") == 0) {
        if (cap) buf[0] = 0;
        return 0;
    }
    size_t n = strlen(folder);
    if (n > STORE_FOLDER_MAX || n + 2 > cap) return -EINVAL;
    buf[0] = '.';
    char prev = '.';
    for (size_t i = 0; i < n; i++) {
        char ch = folder[i] == '/' ? '.' : folder[i];
        /* Empty levels ("a..b", ".a", "a."), control bytes and '~'-style
         * tricks are refused; anything else printable is a name. */
        if ((unsigned char)ch < 0x20 || ch == 0x7f || (ch == '.' && prev == '.')) return -EINVAL;
        buf[i + 1] = ch;
        prev = ch;
    }
    if (prev == '.') return -EINVAL;
    buf[n + 1] = 0;
    return 0;
}

struct store_msg *store_mbox_find(const struct store_mbox *mb, uint32_t uid)
{
    size_t lo = 0, hi = mb->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (mb->msgs[mid].uid == uid) return &mb->msgs[mid];
        if (mb->msgs[mid].uid < uid) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

static int user_dir(const struct mailstore *ms, const char *user, char *buf, size_t cap)
{
    return maildir_path(ms->root, user, buf, cap);
}

static int folder_path(const struct mailstore *ms, const char *user, const char *folder, char *buf,
                       size_t cap)
{
    char sub[STORE_FOLDER_MAX + 2];
    int rc = user_dir(ms, user, buf, cap);
    if (rc < 0) return rc;
    if ((rc = store_folder_dir(folder, sub, sizeof sub)) < 0) return rc;
    if (!sub[0]) return 0;
    size_t n = strlen(buf);
    if (n + 1 + strlen(sub) >= cap) return -EINVAL;
    snprintf(buf + n, cap - n, "/%s", sub);
    return 0;
}

/* A Maildir++ folder carries an empty "maildirfolder" file (Courier's and
 * Dovecot's marker, and what their quota code looks for). */
static void mark_folder(const char *dir)
{
    char p[PATH_CAP + 16];
    snprintf(p, sizeof p, "%s/maildirfolder", dir);
    if (access(p, F_OK) == 0) return;
    if (fs_mkdir_p(dir) < 0) return;
    int fd = open(p, O_WRONLY | O_CREAT | O_CLOEXEC, 0600);
    if (fd >= 0) close(fd);
}

static bool has_quota(const struct store_quota *q)
{
    return q && (q->bytes || q->messages);
}

static int ms_deliver(struct store *st, const char *user, const char *folder, const struct store_quota *q,
                      const char *prefix, size_t plen, const char *msg, size_t len, char *id, size_t idcap)
{
    struct mailstore *ms = (struct mailstore *)st;
    char root[PATH_CAP], dir[PATH_CAP], name[300];
    int rc = user_dir(ms, user, root, sizeof root);
    if (rc < 0 || (rc = folder_path(ms, user, folder, dir, sizeof dir)) < 0) return rc;
    struct quota_limits lim = {q ? q->bytes : 0, q ? q->messages : 0};
    if (has_quota(q)) {
        if (fs_mkdir_p(root) < 0) return -errno;
        if ((rc = quota_check(root, &lim, plen + len)) < 0) return rc;
    }
    if (strcmp(root, dir) != 0) mark_folder(dir);
    rc = maildir_deliver(dir, ms->host, prefix, plen, msg, len, name, sizeof name);
    if (rc < 0) return rc;
    if (has_quota(q)) quota_add(root, &lim, (int64_t)(plen + len), 1);
    else quota_add(root, NULL, (int64_t)(plen + len), 1);   /* another tool's maildirsize */
    if (id && idcap) {
        size_t n = strcspn(name, ":");
        if (n >= idcap) n = idcap - 1;
        memcpy(id, name, n);
        id[n] = 0;
    }
    return 0;
}

static int ms_quota_check(struct store *st, const char *user, const struct store_quota *q, uint64_t size)
{
    struct mailstore *ms = (struct mailstore *)st;
    if (!has_quota(q)) return 0;
    char root[PATH_CAP];
    int rc = user_dir(ms, user, root, sizeof root);
    if (rc < 0) return rc;
    struct stat sb;
    if (stat(root, &sb) < 0) return errno == ENOENT ? 0 : -errno;   /* nothing stored yet */
    struct quota_limits lim = {q->bytes, q->messages};
    return quota_check(root, &lim, size);
}

/* The snapshot of the index, in the store's terms, pointing into the
 * index's own strings (m->ix is kept as long as the snapshot is). UIDL-style
 * ids are the file's base name (before ":2,"), which another client
 * renaming the file does not change. */
static int fill_snapshot(struct mailstore_mbox *m)
{
    struct store_msg *msgs = m->ix.n ? calloc(m->ix.n, sizeof *msgs) : NULL;
    if (m->ix.n && !msgs) return -ENOMEM;
    for (size_t i = 0; i < m->ix.n; i++) {
        const struct mbox_entry *e = &m->ix.e[i];
        struct store_msg *s = &msgs[i];
        s->uid = e->uid;
        s->modseq = e->modseq;
        s->size = e->size;
        s->internal_date = e->internal_date;
        s->flags = e->flags;
        s->id = e->name + 4;              /* past "new/" or "cur/" */
        size_t n = strcspn(s->id, ":");
        s->id_len = (uint8_t)(n > 70 ? 70 : n ? n : 1);
    }
    free(m->mb.msgs);
    m->mb.msgs = msgs;
    m->mb.n = m->ix.n;
    m->mb.uidvalidity = m->ix.uidvalidity;
    m->mb.uidnext = m->ix.uidnext;
    m->mb.highestmodseq = m->ix.highestmodseq;
    return 0;
}

static int ms_open(struct store *st, const char *user, const char *folder, struct store_mbox **out)
{
    struct mailstore *ms = (struct mailstore *)st;
    struct mailstore_mbox *m = calloc(1, sizeof *m);
    if (!m) return -ENOMEM;
    m->mb.st = st;
    char dir[PATH_CAP];
    int rc = folder_path(ms, user, folder, dir, sizeof dir);
    if (rc == 0 && !(m->dir = strdup(dir))) rc = -ENOMEM;
    if (rc == 0) rc = mbox_index_sync(m->dir, &m->ix);
    if (rc == 0) rc = fill_snapshot(m);
    if (rc < 0) {
        mbox_index_free(&m->ix);
        free(m->mb.msgs);
        free(m->dir);
        free(m);
        return rc;
    }
    *out = &m->mb;
    return 0;
}

static int read_file(const char *path, char **data, size_t *len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct stat sb;
    if (fstat(fd, &sb) < 0) {
        int e = -errno;
        close(fd);
        return e;
    }
    size_t cap = (size_t)sb.st_size, n = 0;
    char *buf = malloc(cap + 1);
    if (!buf) {
        close(fd);
        return -ENOMEM;
    }
    for (;;) {
        if (n == cap) {
            /* The file grew (it should not): read what is there. */
            char *nb = realloc(buf, cap * 2 + 4096);
            if (!nb) {
                free(buf);
                close(fd);
                return -ENOMEM;
            }
            buf = nb;
            cap = cap * 2 + 4095;
        }
        ssize_t r = read(fd, buf + n, cap - n);
        if (r < 0) {
            if (errno == EINTR) continue;
            int e = -errno;
            free(buf);
            close(fd);
            return e;
        }
        if (r == 0) break;
        n += (size_t)r;
    }
    close(fd);
    *data = buf;
    *len = n;
    return 0;
}

static int ms_read(struct store_mbox *mb, uint32_t uid, char **data, size_t *len)
{
    struct mailstore_mbox *m = (struct mailstore_mbox *)mb;
    const struct mbox_entry *e = mbox_index_find(&m->ix, uid);
    if (!e) return -ENOENT;
    char path[PATH_CAP + 300];
    snprintf(path, sizeof path, "%s/%s", m->dir, e->name);
    int rc = read_file(path, data, len);
    if (rc != -ENOENT) return rc;
    /* Renamed by another client (flags) since the snapshot: find it again
     * by its UID in a fresh index. The snapshot (and m->ix, which its
     * strings point into) stays as the session saw it. */
    struct mbox_index fresh = {0};
    if (mbox_index_sync(m->dir, &fresh) < 0) return -ENOENT;
    e = mbox_index_find(&fresh, uid);
    rc = -ENOENT;
    if (e) {
        snprintf(path, sizeof path, "%s/%s", m->dir, e->name);
        rc = read_file(path, data, len);
    }
    mbox_index_free(&fresh);
    return rc;
}

static int ms_expunge(struct store_mbox *mb, const uint32_t *uids, size_t n)
{
    struct mailstore_mbox *m = (struct mailstore_mbox *)mb;
    int64_t bytes = 0, count = 0;
    for (size_t i = 0; i < n; i++) {
        const struct mbox_entry *e = mbox_index_find(&m->ix, uids[i]);
        if (e) {
            bytes += (int64_t)e->size;
            count++;
        }
    }
    /* On a partial failure the index still drops what went, and the
     * snapshot follows it; the first error is returned. */
    int rc = mbox_index_expunge(m->dir, &m->ix, uids, n);
    /* Keep a Maildir++ quota file (ours or another tool's) in step. */
    if (count) {
        char root[PATH_CAP];
        snprintf(root, sizeof root, "%s", m->dir);
        char *slash = strrchr(root, '/');
        if (slash && slash[1] == '.') *slash = 0;   /* a folder: its user's root */
        quota_add(root, NULL, -bytes, -count);
    }
    int frc = fill_snapshot(m);
    return rc < 0 ? rc : frc;
}

static int ms_set_flags(struct store_mbox *mb, uint32_t uid, const char *flags)
{
    struct mailstore_mbox *m = (struct mailstore_mbox *)mb;
    int rc = mbox_index_set_flags(m->dir, &m->ix, uid, flags);
    return rc < 0 ? rc : fill_snapshot(m);
}

static void ms_close(struct store_mbox *mb)
{
    struct mailstore_mbox *m = (struct mailstore_mbox *)mb;
    if (!m) return;
    mbox_index_free(&m->ix);
    free(m->mb.msgs);
    free(m->dir);
    free(m);
}

static void ms_destroy(struct store *st)
{
    struct mailstore *ms = (struct mailstore *)st;
    if (!ms) return;
    free(ms->root);
    free(ms->host);
    free(ms);
}

static const struct store_ops mailstore_ops = {
    .name = "maildir",
    .deliver = ms_deliver,
    .quota_check = ms_quota_check,
    .open = ms_open,
    .read = ms_read,
    .expunge = ms_expunge,
    .set_flags = ms_set_flags,
    .close = ms_close,
    .destroy = ms_destroy,
};

struct store *mailstore_new(const char *root, const char *host)
{
    struct mailstore *ms = calloc(1, sizeof *ms);
    if (!ms) return NULL;
    ms->st.ops = &mailstore_ops;
    ms->root = strdup(root);
    ms->host = strdup(host && *host ? host : "localhost");
    if (!ms->root || !ms->host) {
        ms_destroy(&ms->st);
        return NULL;
    }
    return &ms->st;
}
