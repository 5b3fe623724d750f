/* Maildir++ quota (see quota.h): the maildirsize parser, the scan that
 * recalculates it, and the append that records a change. */
#include "store/quota.h"

#include "core/fsutil.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define QUOTA_PATH_MAX 4096
/* Scans of a Maildir that keeps changing under us before we give up on
 * writing the result (it would be stale the moment it lands). */
#define QUOTA_SCAN_TRIES 3

static int q_digit(char c) { return c >= '0' && c <= '9'; }
static int q_blank(char c) { return c == ' ' || c == '\t'; }

/* ---- the parser ---------------------------------------------------------- */

static int q_u64(const char *s, size_t n, uint64_t *v)
{
    uint64_t x = 0;
    if (n == 0) return -1;
    for (size_t i = 0; i < n; i++) {
        if (!q_digit(s[i])) return -1;
        unsigned d = (unsigned)(s[i] - '0');
        if (x > (UINT64_MAX - d) / 10) return -1;
        x = x * 10 + d;
    }
    *v = x;
    return 0;
}

/* "<n>S,<n>C" in either order, either part optional; empty: no limits. */
static int q_parse_limits(const char *s, size_t n, struct quota_limits *lim)
{
    lim->bytes = lim->messages = 0;
    const char *p = s, *end = s + n;
    while (n > 0) {
        const char *comma = memchr(p, ',', (size_t)(end - p));
        const char *te = comma ? comma : end;
        uint64_t v;
        if (te - p < 2 || q_u64(p, (size_t)(te - p - 1), &v) < 0) return -1;
        if (te[-1] == 'S') lim->bytes = v;
        else if (te[-1] == 'C') lim->messages = v;
        else return -1;
        if (!comma) break;
        p = comma + 1;
    }
    return 0;
}

/* An optionally signed decimal at *p, advancing past it. */
static int q_i64(const char **p, const char *end, int64_t *v)
{
    const char *s = *p;
    int neg = 0;
    if (s < end && (*s == '-' || *s == '+')) neg = *s++ == '-';
    const char *d = s;
    uint64_t m = 0;
    while (s < end && q_digit(*s)) {
        unsigned dig = (unsigned)(*s - '0');
        if (m > ((uint64_t)INT64_MAX + 1 - dig) / 10) return -1;
        m = m * 10 + dig;
        s++;
    }
    if (s == d || (!neg && m > (uint64_t)INT64_MAX)) return -1;
    *v = !neg ? (int64_t)m : m == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)m;
    *p = s;
    return 0;
}

/* "<bytes> <count>" with blanks around and between. */
static int q_parse_delta(const char *p, const char *end, int64_t *b, int64_t *c)
{
    while (p < end && q_blank(*p)) p++;
    if (q_i64(&p, end, b) < 0) return -1;
    if (p == end || !q_blank(*p)) return -1;
    while (p < end && q_blank(*p)) p++;
    if (q_i64(&p, end, c) < 0) return -1;
    while (p < end && q_blank(*p)) p++;
    return p == end ? 0 : -1;
}

int quota_parse_lines(const char *text, size_t len, struct quota_limits *lim, int64_t *bytes,
                      int64_t *messages, size_t *lines)
{
    if (memchr(text, 0, len)) return -EINVAL;
    const char *end = text + len, *nl = memchr(text, '\n', len);
    struct quota_limits l;
    if (!nl || q_parse_limits(text, (size_t)(nl - text), &l) < 0) return -EINVAL;
    int64_t b = 0, c = 0;
    size_t n = 0;
    for (const char *p = nl + 1; p < end;) {
        const char *le = memchr(p, '\n', (size_t)(end - p));
        if (!le) break;   /* a torn append: not ours to count yet */
        int64_t db, dc;
        if (q_parse_delta(p, le, &db, &dc) < 0 || __builtin_add_overflow(b, db, &b) ||
            __builtin_add_overflow(c, dc, &c))
            return -EINVAL;
        n++;
        p = le + 1;
    }
    if (b < 0 || c < 0) return -EINVAL;
    *lim = l;
    *bytes = b;
    *messages = c;
    if (lines) *lines = n;
    return 0;
}

int quota_parse(const char *text, size_t len, struct quota_limits *lim, int64_t *bytes, int64_t *messages)
{
    return quota_parse_lines(text, len, lim, bytes, messages, NULL);
}

size_t quota_format_limits(const struct quota_limits *lim, char *buf, size_t cap)
{
    int n;
    /* As Dovecot writes it: "0S" rather than an empty line when unlimited. */
    if (lim->messages == 0)
        n = snprintf(buf, cap, "%lluS\n", (unsigned long long)lim->bytes);
    else if (lim->bytes == 0)
        n = snprintf(buf, cap, "%lluC\n", (unsigned long long)lim->messages);
    else
        n = snprintf(buf, cap, "%lluS,%lluC\n", (unsigned long long)lim->bytes,
                     (unsigned long long)lim->messages);
    return n < 0 ? 0 : (size_t)n < cap ? (size_t)n : cap - 1;
}

/* ---- recalculation ------------------------------------------------------- */

static int q_path(char *buf, const char *a, const char *b)
{
    int n = snprintf(buf, QUOTA_PATH_MAX, "%s/%s", a, b);
    return n < 0 || n >= QUOTA_PATH_MAX ? -ENAMETOOLONG : 0;
}

/* ",S=<n>" in a message file name, ending at ',', ':' or the name's end. */
static int q_size_from_name(const char *name, uint64_t *size)
{
    const char *p = strstr(name, ",S=");
    if (!p) return -1;
    p += 3;
    size_t n = 0;
    while (q_digit(p[n])) n++;
    if (p[n] != 0 && p[n] != ',' && p[n] != ':') return -1;
    return q_u64(p, n, size);
}

static int64_t q_mtime_ns(const struct stat *st)
{
    return (int64_t)st->st_mtim.tv_sec * 1000000000LL + st->st_mtim.tv_nsec;
}

/* What a scan read, and the mtimes of the directories it read (to tell
 * whether they changed while it ran). */
struct q_scan {
    uint64_t bytes, count;
    int have_root;        /* root was there to read */
    char **dirs;
    int64_t *mt;
    size_t n, cap;
};

static void q_scan_free(struct q_scan *s)
{
    for (size_t i = 0; i < s->n; i++) free(s->dirs[i]);
    free(s->dirs);
    free(s->mt);
    memset(s, 0, sizeof *s);
}

static int q_note_dir(struct q_scan *s, const char *path, int64_t mt)
{
    if (s->n == s->cap) {
        size_t nc = s->cap ? s->cap * 2 : 16;
        char **nd = realloc(s->dirs, nc * sizeof *nd);
        if (!nd) return -ENOMEM;
        s->dirs = nd;
        int64_t *nm = realloc(s->mt, nc * sizeof *nm);
        if (!nm) return -ENOMEM;
        s->mt = nm;
        s->cap = nc;
    }
    if (!(s->dirs[s->n] = strdup(path))) return -ENOMEM;
    s->mt[s->n++] = mt;
    return 0;
}

/* Add up the messages of one new/ or cur/ directory. */
static int q_sum_dir(const char *path, struct q_scan *s)
{
    DIR *d = opendir(path);
    if (!d) return errno == ENOENT || errno == ENOTDIR ? 0 : -errno;
    struct stat st;
    int rc = fstat(dirfd(d), &st) < 0 ? -errno : q_note_dir(s, path, q_mtime_ns(&st));
    struct dirent *de;
    while (rc == 0 && (de = fs_readdir(d, &rc))) {
        if (de->d_name[0] == '.') continue;
        if (de->d_type != DT_REG && de->d_type != DT_UNKNOWN) continue;
        uint64_t size;
        if (de->d_type == DT_REG && q_size_from_name(de->d_name, &size) == 0) {
            s->bytes += size;
            s->count++;
            continue;
        }
        if (fstatat(dirfd(d), de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0) {
            if (errno != ENOENT) rc = -errno;   /* gone meanwhile: not counted */
            continue;
        }
        if (!S_ISREG(st.st_mode)) continue;
        if (q_size_from_name(de->d_name, &size) < 0) size = (uint64_t)st.st_size;
        s->bytes += size;
        s->count++;
    }
    closedir(d);
    return rc;
}

static int q_sum_folder(const char *folder, struct q_scan *s)
{
    char path[QUOTA_PATH_MAX];
    int rc = q_path(path, folder, "new");
    if (rc == 0) rc = q_sum_dir(path, s);
    if (rc == 0) rc = q_path(path, folder, "cur");
    if (rc == 0) rc = q_sum_dir(path, s);
    return rc;
}

/* INBOX (root itself) and every Maildir++ folder ".Name" in it. Root's
 * own mtime is not watched: index and lock files come and go there. */
static int q_scan_root(const char *root, struct q_scan *s)
{
    DIR *d = opendir(root);
    if (!d) return errno == ENOENT ? 0 : -errno;
    s->have_root = 1;
    struct stat st;
    int rc = q_sum_folder(root, s);
    struct dirent *de;
    while (rc == 0 && (de = fs_readdir(d, &rc))) {
        const char *nm = de->d_name;
        if (nm[0] != '.' || nm[1] == 0 || (nm[1] == '.' && nm[2] == 0)) continue;
        if (de->d_type == DT_UNKNOWN) {
            if (fstatat(dirfd(d), nm, &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISDIR(st.st_mode)) continue;
        } else if (de->d_type != DT_DIR) {
            continue;
        }
        char folder[QUOTA_PATH_MAX];
        rc = q_path(folder, root, nm);
        if (rc == 0) rc = q_sum_folder(folder, s);
    }
    closedir(d);
    return rc;
}

/* 1 when every directory the scan read still has the mtime it had. */
static int q_scan_stable(const struct q_scan *s)
{
    for (size_t i = 0; i < s->n; i++) {
        struct stat st;
        if (stat(s->dirs[i], &st) < 0 || q_mtime_ns(&st) != s->mt[i]) return 0;
    }
    return 1;
}

/* Replace maildirsize with lim's line and one total line. No fsync: a file
 * lost or torn in a crash only costs a recalculation. */
static int q_write(const char *root, const struct quota_limits *lim, uint64_t bytes, uint64_t count)
{
    static atomic_uint seq;
    char tmp[QUOTA_PATH_MAX], fin[QUOTA_PATH_MAX], name[64], text[128];
    snprintf(name, sizeof name, "%s.tmp.%d.%u", QUOTA_FILE, (int)getpid(), atomic_fetch_add(&seq, 1));
    int rc = q_path(tmp, root, name);
    if (rc == 0) rc = q_path(fin, root, QUOTA_FILE);
    if (rc < 0) return rc;
    size_t n = quota_format_limits(lim, text, sizeof text);
    n += (size_t)snprintf(text + n, sizeof text - n, "%llu %llu\n", (unsigned long long)bytes,
                          (unsigned long long)count);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) return -errno;
    ssize_t w;
    do w = write(fd, text, n);
    while (w < 0 && errno == EINTR);
    if (w < 0) rc = -errno;
    else if ((size_t)w != n) rc = -EIO;
    if (close(fd) < 0 && rc == 0) rc = -errno;
    if (rc == 0 && rename(tmp, fin) < 0) rc = -errno;
    if (rc < 0) unlink(tmp);
    return rc;
}

static int q_recalc(const char *root, const struct quota_limits *lim, uint64_t *bytes, uint64_t *messages)
{
    struct q_scan s = {0};
    int stable = 0, rc = 0;
    for (int i = 0; i < QUOTA_SCAN_TRIES && !stable; i++) {
        q_scan_free(&s);
        if ((rc = q_scan_root(root, &s)) < 0) break;
        stable = q_scan_stable(&s);
    }
    int exists = s.have_root;
    *bytes = s.bytes;
    *messages = s.count;
    q_scan_free(&s);
    if (rc < 0) return rc;
    /* A Maildir that keeps changing: answer, but write nothing stale (the
     * next caller recalculates). No Maildir yet: nothing to write into. */
    if (!stable || !exists) return 0;
    return q_write(root, lim, *bytes, *messages);
}

/* ---- the API ------------------------------------------------------------- */

int quota_usage(const char *root, const struct quota_limits *lim, uint64_t *bytes, uint64_t *messages)
{
    char path[QUOTA_PATH_MAX], buf[QUOTA_FILE_MAX + 1];
    int rc = q_path(path, root, QUOTA_FILE);
    if (rc < 0) return rc;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0 && errno != ENOENT) return -errno;
    if (fd >= 0) {
        size_t n = 0;
        struct stat st;
        int ok = fstat(fd, &st) == 0;
        while (ok && n < sizeof buf) {
            ssize_t r = read(fd, buf + n, sizeof buf - n);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) {
                ok = r == 0;
                break;
            }
            n += (size_t)r;
        }
        close(fd);
        struct quota_limits fl;
        int64_t b, m;
        size_t lines;
        if (ok && n < QUOTA_FILE_MAX && quota_parse_lines(buf, n, &fl, &b, &m, &lines) == 0 &&
            lines > 0 && fl.bytes == lim->bytes && fl.messages == lim->messages) {
            int over = (lim->bytes && (uint64_t)b > lim->bytes) ||
                       (lim->messages && (uint64_t)m > lim->messages);
            /* Over quota is when a drifted sum hurts: trust only a fresh
             * file holding just the recalculated total. */
            if (!over || (lines == 1 && st.st_mtime >= time(NULL) - QUOTA_STALE_SECS)) {
                *bytes = (uint64_t)b;
                *messages = (uint64_t)m;
                return 0;
            }
        }
    }
    return q_recalc(root, lim, bytes, messages);
}

int quota_check(const char *root, const struct quota_limits *lim, uint64_t size)
{
    if (lim->bytes == 0 && lim->messages == 0) return 0;
    uint64_t b, m;
    int rc = quota_usage(root, lim, &b, &m);
    if (rc < 0) return rc;
    if (lim->bytes && (b > lim->bytes || size > lim->bytes - b)) return -EDQUOT;
    if (lim->messages && m >= lim->messages) return -EDQUOT;
    return 0;
}

int quota_add(const char *root, const struct quota_limits *lim, int64_t bytes, int64_t messages)
{
    if (bytes == 0 && messages == 0) return 0;
    char path[QUOTA_PATH_MAX], line[64];
    int rc = q_path(path, root, QUOTA_FILE);
    if (rc < 0) return rc;
    int fd = open(path, O_WRONLY | O_APPEND | O_CLOEXEC);
    if (fd < 0 && errno == ENOENT) {
        if (!lim) return 0;                    /* nobody keeps a quota here */
        uint64_t b, m;
        return q_recalc(root, lim, &b, &m);   /* the scan sees the change already made */
    }
    if (fd < 0) return -errno;
    int n = snprintf(line, sizeof line, "%lld %lld\n", (long long)bytes, (long long)messages);
    ssize_t w;
    do w = write(fd, line, (size_t)n);   /* one write: O_APPEND keeps it whole */
    while (w < 0 && errno == EINTR);
    if (w < 0) rc = -errno;
    else if (w != n) rc = -EIO;
    if (close(fd) < 0 && rc == 0) rc = -errno;
    return rc;
}
