/* The per-folder Maildir index (see index.h): the index file's parser and
 * formatter, a scan of new/ and cur/ merged into the loaded index by base
 * name, and the lock -> load -> scan -> save cycle every operation runs. */
#include "store/index.h"

#include "core/fsutil.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define IX_MAGIC "mailengine-index"
#define IX_VERSION "1"
#define IX_TMP_FILE "mailengine-index.tmp"
#define IX_PATH_MAX 4096
/* A directory whose mtime is this close to the clock of the scan that read
 * it may change again within the same timestamp: record it as dirty. */
#define IX_DIRTY_WINDOW_NS 2000000000LL
/* Attempts when another tool renames a file under us (set_flags, expunge). */
#define IX_RETRIES 3

enum { IX_NEW = 0, IX_CUR = 1 };
static const char *const ix_sub[2] = {"new", "cur"};

/* ---- names -------------------------------------------------------------- */

static int is_ctl(unsigned char c) { return c < 0x20 || c == 0x7f; }
static int is_letter(unsigned char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'); }
static int is_digit(unsigned char c) { return c >= '0' && c <= '9'; }

/* A file name we index and can write back on one line. */
static int ix_name_ok(const char *s, size_t n)
{
    if (n == 0 || n > MBOX_INDEX_NAME_MAX || s[0] == '.') return 0;
    for (size_t i = 0; i < n; i++)
        if (s[i] == '/' || is_ctl((unsigned char)s[i])) return 0;
    return 1;
}

/* Length of the base name: the part before the first ":2,". */
static size_t ix_base_len(const char *s, size_t n)
{
    for (const char *p = s; (p = memchr(p, ':', n - (size_t)(p - s))) != NULL; p++)
        if ((size_t)(p - s) + 3 <= n && p[1] == '2' && p[2] == ',') return (size_t)(p - s);
    return n;
}

/* The letters after ":2," sorted and deduplicated (at most FLAGS_MAX). */
static void ix_flags_of(const char *s, size_t n, char out[MBOX_INDEX_FLAGS_MAX + 1])
{
    unsigned char seen[128] = {0};
    size_t b = ix_base_len(s, n);
    for (size_t i = b + 3; i < n; i++)
        if (is_letter((unsigned char)s[i])) seen[(unsigned char)s[i]] = 1;
    size_t o = 0;
    for (int c = 'A'; c <= 'z' && o < MBOX_INDEX_FLAGS_MAX; c++)
        if (seen[c]) out[o++] = (char)c;
    out[o] = 0;
}

/* Unsigned decimal s[0..n): at least one digit, all digits, no overflow. */
static int ix_digits(const char *s, size_t n, uint64_t *v)
{
    uint64_t x = 0;
    if (n == 0) return -1;
    for (size_t i = 0; i < n; i++) {
        if (!is_digit((unsigned char)s[i])) return -1;
        unsigned d = (unsigned)(s[i] - '0');
        if (x > (UINT64_MAX - d) / 10) return -1;
        x = x * 10 + d;
    }
    *v = x;
    return 0;
}

/* ",<key>=<n>" inside the base name (ending at ',', ':' or the base's end). */
static int ix_field_from_name(const char *base, size_t blen, char key, uint64_t *size)
{
    for (size_t i = 0; i + 3 < blen; i++) {
        if (base[i] != ',' || base[i + 1] != key || base[i + 2] != '=') continue;
        size_t j = i + 3;
        while (j < blen && is_digit((unsigned char)base[j])) j++;
        if (j < blen && base[j] != ',' && base[j] != ':') return -1;
        return ix_digits(base + i + 3, j - i - 3, size);
    }
    return -1;
}

/* The size as served (CRLF line ends): ",W=" when the name has it (what
 * Dovecot records as the virtual size), else ",S=" (the file's size; our
 * files are CRLF, so the same). */
static int ix_size_from_name(const char *base, size_t blen, uint64_t *size)
{
    if (ix_field_from_name(base, blen, 'W', size) == 0) return 0;
    return ix_field_from_name(base, blen, 'S', size);
}

/* A file another tool wrote without a size in its name: its size with every
 * bare LF counted as CRLF, as POP3 and IMAP serve it. */
static uint64_t ix_crlf_size(const char *path, uint64_t file_size)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return file_size;
    char buf[65536];
    uint64_t bare = 0;
    char prev = 0;
    for (;;) {
        ssize_t r = read(fd, buf, sizeof buf);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        for (ssize_t i = 0; i < r; i++) {
            if (buf[i] == '\n' && prev != '\r') bare++;
            prev = buf[i];
        }
    }
    close(fd);
    /* A last line without an end is sent with CRLF too. */
    return file_size + bare + (file_size > 0 && prev != '\n' ? 2 : 0);
}

/* The delivery time a Maildir name starts with: "<sec>." */
static int ix_date_from_name(const char *base, size_t blen, int64_t *date)
{
    size_t j = 0;
    while (j < blen && is_digit((unsigned char)base[j])) j++;
    uint64_t v;
    if (j == 0 || j > 18 || j >= blen || base[j] != '.' || ix_digits(base, j, &v) < 0) return -1;
    *date = (int64_t)v;
    return 0;
}

/* ---- the index file: parse and format ------------------------------------ */

/* Canonical unsigned decimal: no sign, no leading zero. */
static int ix_u64(const char *s, size_t n, uint64_t *v)
{
    if (n > 1 && s[0] == '0') return -1;
    return ix_digits(s, n, v);
}

/* Canonical signed decimal: optional '-', no leading zero, no "-0". */
static int ix_i64(const char *s, size_t n, int64_t *v)
{
    int neg = n > 0 && s[0] == '-';
    uint64_t m;
    if (neg) s++, n--;
    if (ix_u64(s, n, &m) < 0) return -1;
    if (neg) {
        if (m == 0 || m > (uint64_t)INT64_MAX + 1) return -1;
        *v = m == (uint64_t)INT64_MAX + 1 ? INT64_MIN : -(int64_t)m;
    } else {
        if (m > (uint64_t)INT64_MAX) return -1;
        *v = (int64_t)m;
    }
    return 0;
}

/* Split the next space-terminated field off [*p, end). */
static int ix_field(const char **p, const char *end, const char **f, size_t *n)
{
    const char *sp = memchr(*p, ' ', (size_t)(end - *p));
    if (!sp) return -1;
    *f = *p;
    *n = (size_t)(sp - *p);
    *p = sp + 1;
    return 0;
}

static int ix_parse_header(const char *p, const char *end, struct mbox_index *ix,
                           int64_t *new_mt, int64_t *cur_mt)
{
    const char *f;
    size_t n;
    uint64_t uv, un, hm;
    if (ix_field(&p, end, &f, &n) < 0 || n != strlen(IX_MAGIC) || memcmp(f, IX_MAGIC, n) != 0) return -1;
    if (ix_field(&p, end, &f, &n) < 0 || n != 1 || f[0] != IX_VERSION[0]) return -1;
    if (ix_field(&p, end, &f, &n) < 0 || ix_u64(f, n, &uv) < 0 || uv == 0 || uv > UINT32_MAX) return -1;
    if (ix_field(&p, end, &f, &n) < 0 || ix_u64(f, n, &un) < 0 || un == 0 || un > UINT32_MAX) return -1;
    if (ix_field(&p, end, &f, &n) < 0 || ix_u64(f, n, &hm) < 0 || hm == 0) return -1;
    if (ix_field(&p, end, &f, &n) < 0 || ix_i64(f, n, new_mt) < 0) return -1;
    if (ix_i64(p, (size_t)(end - p), cur_mt) < 0) return -1;
    ix->uidvalidity = (uint32_t)uv;
    ix->uidnext = (uint32_t)un;
    ix->highestmodseq = hm;
    return 0;
}

/* One message line [p, end) into e, its name written at *names. */
static int ix_parse_entry(const char *p, const char *end, const struct mbox_index *ix, uint32_t prev,
                          struct mbox_entry *e, char **names)
{
    const char *f;
    size_t n;
    uint64_t uid, v;
    if (ix_field(&p, end, &f, &n) < 0 || ix_u64(f, n, &uid) < 0) return -1;
    if (uid == 0 || uid <= prev || uid >= ix->uidnext) return -1;
    e->uid = (uint32_t)uid;
    if (ix_field(&p, end, &f, &n) < 0 || ix_u64(f, n, &v) < 0 || v == 0 || v > ix->highestmodseq) return -1;
    e->modseq = v;
    if (ix_field(&p, end, &f, &n) < 0 || ix_u64(f, n, &e->size) < 0) return -1;
    if (ix_field(&p, end, &f, &n) < 0 || ix_i64(f, n, &e->internal_date) < 0) return -1;
    if (ix_field(&p, end, &f, &n) < 0 || n != 1 || (f[0] != 'n' && f[0] != 'c')) return -1;
    int where = f[0] == 'c' ? IX_CUR : IX_NEW;
    const char *fl;
    size_t fln;
    if (ix_field(&p, end, &fl, &fln) < 0 || fln == 0 || fln > MBOX_INDEX_FLAGS_MAX) return -1;
    if (!(fln == 1 && fl[0] == '-')) {
        for (size_t i = 0; i < fln; i++)
            if (!is_letter((unsigned char)fl[i]) || (i > 0 && fl[i] <= fl[i - 1])) return -1;
    } else {
        fln = 0;
    }
    size_t nlen = (size_t)(end - p);
    if (!ix_name_ok(p, nlen)) return -1;
    ix_flags_of(p, nlen, e->flags);
    if (strlen(e->flags) != fln || memcmp(e->flags, fl, fln) != 0) return -1;
    char *out = *names;
    memcpy(out, ix_sub[where], 3);
    out[3] = '/';
    memcpy(out + 4, p, nlen);
    out[4 + nlen] = 0;
    e->name = out;
    *names = out + nlen + 5;
    return 0;
}

int mbox_index_parse(const char *text, size_t len, struct mbox_index *ix,
                     int64_t *new_mtime_ns, int64_t *cur_mtime_ns)
{
    struct mbox_index r = {0};
    int64_t nm, cm;
    const char *end = text + len;
    if (len == 0 || text[len - 1] != '\n') return -EINVAL;
    const char *nl = memchr(text, '\n', len);
    if ((size_t)(nl - text) + 1 > MBOX_INDEX_LINE_MAX) return -EINVAL;
    if (ix_parse_header(text, nl, &r, &nm, &cm) < 0) return -EINVAL;

    /* Every remaining line is one message: count them to size one block
     * holding the entries and then their names ("new/" + name + NUL each,
     * fewer bytes than the line that carries it, plus 5). */
    const char *body = nl + 1;
    size_t n = 0;
    for (const char *q = body; q < end; q++) {
        q = memchr(q, '\n', (size_t)(end - q));
        n++;
    }
    if (n > 0) {
        size_t head = n * sizeof(struct mbox_entry);
        char *blk = malloc(head + (size_t)(end - body) + 5 * n);
        if (!blk) return -ENOMEM;
        r.e = (struct mbox_entry *)(void *)blk;
        char *names = blk + head;
        uint32_t prev = 0;
        const char *q = body;
        for (size_t i = 0; i < n; i++) {
            const char *le = memchr(q, '\n', (size_t)(end - q));
            if ((size_t)(le - q) + 1 > MBOX_INDEX_LINE_MAX ||
                ix_parse_entry(q, le, &r, prev, &r.e[i], &names) < 0) {
                free(blk);
                return -EINVAL;
            }
            prev = r.e[i].uid;
            q = le + 1;
        }
        r.n = n;
    }
    *ix = r;
    *new_mtime_ns = nm;
    *cur_mtime_ns = cm;
    return 0;
}

char *mbox_index_format(const struct mbox_index *ix, int64_t new_mtime_ns, int64_t cur_mtime_ns,
                        size_t *len)
{
    /* The numbers and separators of a line take at most 10+20+20+20+1+6+2 bytes. */
    size_t cap = 160 + ix->n * (MBOX_INDEX_FLAGS_MAX + 96);
    for (size_t i = 0; i < ix->n; i++) cap += strlen(ix->e[i].name);
    char *buf = malloc(cap);
    if (!buf) return NULL;
    size_t o = (size_t)snprintf(buf, cap, "%s %s %u %u %llu %lld %lld\n", IX_MAGIC, IX_VERSION,
                                ix->uidvalidity, ix->uidnext, (unsigned long long)ix->highestmodseq,
                                (long long)new_mtime_ns, (long long)cur_mtime_ns);
    for (size_t i = 0; i < ix->n; i++) {
        const struct mbox_entry *e = &ix->e[i];
        o += (size_t)snprintf(buf + o, cap - o, "%u %llu %llu %lld %c %s %s\n", e->uid,
                              (unsigned long long)e->modseq, (unsigned long long)e->size,
                              (long long)e->internal_date, e->name[0] == 'c' ? 'c' : 'n',
                              e->flags[0] ? e->flags : "-", e->name + 4);
    }
    *len = o;
    return buf;
}

/* ---- the in-memory index ----------------------------------------------- */

struct mbox_entry *mbox_index_find(const struct mbox_index *ix, uint32_t uid)
{
    size_t lo = 0, hi = ix->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (ix->e[mid].uid == uid) return &ix->e[mid];
        if (ix->e[mid].uid < uid) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

void mbox_index_free(struct mbox_index *ix)
{
    free(ix->e);   /* one block: the entries, then their names */
    memset(ix, 0, sizeof *ix);
}

/* Copy src[0..n) (names anywhere) into one fresh block at *out. */
static int ix_pack(const struct mbox_entry *src, size_t n, struct mbox_entry **out)
{
    *out = NULL;
    if (n == 0) return 0;
    size_t names = 0;
    for (size_t i = 0; i < n; i++) names += strlen(src[i].name) + 1;
    size_t head = n * sizeof *src;
    char *blk = malloc(head + names);
    if (!blk) return -ENOMEM;
    struct mbox_entry *e = (struct mbox_entry *)(void *)blk;
    char *p = blk + head;
    for (size_t i = 0; i < n; i++) {
        size_t l = strlen(src[i].name) + 1;
        e[i] = src[i];
        memcpy(p, src[i].name, l);
        e[i].name = p;
        p += l;
    }
    *out = e;
    return 0;
}

/* ---- files --------------------------------------------------------------- */

static int ix_path(char *buf, const char *dir, const char *rel)
{
    int n = snprintf(buf, IX_PATH_MAX, "%s/%s", dir, rel);
    return n < 0 || n >= IX_PATH_MAX ? -ENAMETOOLONG : 0;
}

static int64_t ix_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static uint32_t ix_now_uidvalidity(void)
{
    time_t t = time(NULL);
    if (t < 1) return 1;
    if ((uint64_t)t > UINT32_MAX) return UINT32_MAX;
    return (uint32_t)t;
}

/* The folder's lock: an fd holding flock(LOCK_EX), or -errno. */
static int ix_lock(const char *dir)
{
    char path[IX_PATH_MAX];
    int rc = ix_path(path, dir, MBOX_INDEX_LOCK_FILE);
    if (rc < 0) return rc;
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    if (fd < 0 && errno == ENOENT) {
        if ((rc = fs_mkdir_p(dir)) < 0) return rc;
        fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
    }
    if (fd < 0) return -errno;
    while (flock(fd, LOCK_EX) < 0) {
        if (errno == EINTR) continue;
        rc = -errno;
        close(fd);
        return rc;
    }
    return fd;
}

/* The whole file at path into a malloc'd buffer (NUL-terminated). */
static int ix_read_file(const char *path, char **buf, size_t *len)
{
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int rc = -errno;
        close(fd);
        return rc;
    }
    size_t cap = (size_t)st.st_size + 1, n = 0;
    char *b = malloc(cap);
    if (!b) {
        close(fd);
        return -ENOMEM;
    }
    for (;;) {
        if (n + 1 == cap) {   /* it grew since fstat: not ours, but read it all */
            char *nb = realloc(b, cap * 2);
            if (!nb) {
                free(b);
                close(fd);
                return -ENOMEM;
            }
            b = nb;
            cap *= 2;
        }
        ssize_t r = read(fd, b + n, cap - 1 - n);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0) {
            int rc = -errno;
            free(b);
            close(fd);
            return rc;
        }
        if (r == 0) break;
        n += (size_t)r;
    }
    close(fd);
    b[n] = 0;
    *buf = b;
    *len = n;
    return 0;
}

/* Replace the index file: tmp file, fsync, rename, fsync of the folder. */
static int ix_save(const char *dir, const struct mbox_index *ix, const int64_t mt[2])
{
    char tmp[IX_PATH_MAX], fin[IX_PATH_MAX];
    int rc = ix_path(tmp, dir, IX_TMP_FILE);
    if (rc == 0) rc = ix_path(fin, dir, MBOX_INDEX_FILE);
    if (rc < 0) return rc;
    size_t len;
    char *text = mbox_index_format(ix, mt[IX_NEW], mt[IX_CUR], &len);
    if (!text) return -ENOMEM;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
    if (fd < 0) {
        rc = -errno;
        free(text);
        return rc;
    }
    for (size_t done = 0; done < len;) {
        ssize_t w = write(fd, text + done, len - done);
        if (w < 0 && errno == EINTR) continue;
        if (w < 0) {
            rc = -errno;
            break;
        }
        done += (size_t)w;
    }
    free(text);
    if (rc == 0 && fsync(fd) < 0) rc = -errno;
    if (close(fd) < 0 && rc == 0) rc = -errno;
    if (rc == 0 && rename(tmp, fin) < 0) rc = -errno;
    if (rc < 0) {
        unlink(tmp);
        return rc;
    }
    return fs_fsync_dir(dir);
}

/* ---- scanning and merging ---------------------------------------------- */

/* One regular file seen in new/ or cur/. */
struct ix_file {
    char *name;           /* "new/<name>" or "cur/<name>" (in the scan's arena) */
    size_t off;           /* its offset there, until the arena stops moving */
    uint32_t blen;        /* base length, after the "new/" prefix */
    int have_stat;
    uint64_t file_size;
    int64_t file_mtime;
};

struct ix_scan {
    char *arena;
    size_t alen, acap;
    struct ix_file *f;
    size_t n, cap;
};

static void ix_scan_free(struct ix_scan *s)
{
    free(s->arena);
    free(s->f);
}

static int ix_scan_dir(const char *dir, int which, struct ix_scan *s)
{
    char path[IX_PATH_MAX];
    int rc = ix_path(path, dir, ix_sub[which]);
    if (rc < 0) return rc;
    DIR *d = opendir(path);
    if (!d) return errno == ENOENT ? 0 : -errno;
    int dfd = dirfd(d);
    struct dirent *de;
    while ((de = fs_readdir(d, &rc))) {
        size_t l = strlen(de->d_name);
        if (!ix_name_ok(de->d_name, l)) continue;   /* dot-files, names we cannot record */
        struct ix_file f = {0};
        if (de->d_type == DT_UNKNOWN) {
            struct stat st;
            if (fstatat(dfd, de->d_name, &st, AT_SYMLINK_NOFOLLOW) < 0 || !S_ISREG(st.st_mode)) continue;
            f.have_stat = 1;
            f.file_size = (uint64_t)st.st_size;
            f.file_mtime = (int64_t)st.st_mtim.tv_sec;
        } else if (de->d_type != DT_REG) {
            continue;
        }
        if (s->alen + l + 5 > s->acap) {
            size_t nc = s->acap ? s->acap * 2 : 16384;
            while (nc < s->alen + l + 5) nc *= 2;
            char *na = realloc(s->arena, nc);
            if (!na) {
                rc = -ENOMEM;
                break;
            }
            s->arena = na;
            s->acap = nc;
        }
        if (s->n == s->cap) {
            size_t nc = s->cap ? s->cap * 2 : 256;
            struct ix_file *nf = realloc(s->f, nc * sizeof *nf);
            if (!nf) {
                rc = -ENOMEM;
                break;
            }
            s->f = nf;
            s->cap = nc;
        }
        char *p = s->arena + s->alen;
        memcpy(p, ix_sub[which], 3);
        p[3] = '/';
        memcpy(p + 4, de->d_name, l + 1);
        f.off = s->alen;
        f.blen = (uint32_t)ix_base_len(de->d_name, l);
        s->alen += l + 5;
        s->f[s->n++] = f;
    }
    closedir(d);
    return rc;
}

/* A name to sort by base: entries of the index and files of a scan alike. */
struct ix_key {
    const char *name;   /* "new/..." or "cur/..." */
    uint32_t blen;
    uint32_t idx;
};

static int ix_key_cmp(const void *a, const void *b)
{
    const struct ix_key *x = a, *y = b;
    size_t m = x->blen < y->blen ? x->blen : y->blen;
    int c = memcmp(x->name + 4, y->name + 4, m);
    if (c) return c;
    if (x->blen != y->blen) return x->blen < y->blen ? -1 : 1;
    c = strcmp(x->name, y->name);   /* cur/ before new/: the later place of a moving file */
    if (c) return c;
    return x->idx < y->idx ? -1 : x->idx > y->idx;
}

static int ix_same_base(const struct ix_key *x, const struct ix_key *y)
{
    return x->blen == y->blen && memcmp(x->name + 4, y->name + 4, x->blen) == 0;
}

/* A file that gets a UID, with what we know of it. */
struct ix_newfile {
    const char *name;
    uint32_t blen;
    uint64_t size;
    int64_t date;
};

/* Names in delivery order: runs of digits compare as numbers, so within
 * one second "M99999" (microseconds) comes before "M123456" and "Q9"
 * before "Q10", as the unpadded Maildir names of every writer need. */
static int ix_name_order_cmp(const char *a, const char *b)
{
    while (*a && *b) {
        if (is_digit((unsigned char)*a) && is_digit((unsigned char)*b)) {
            while (*a == '0') a++;
            while (*b == '0') b++;
            size_t na = 0, nb = 0;
            while (is_digit((unsigned char)a[na])) na++;
            while (is_digit((unsigned char)b[nb])) nb++;
            if (na != nb) return na < nb ? -1 : 1;
            int c = memcmp(a, b, na);
            if (c) return c;
            a += na;
            b += nb;
            continue;
        }
        if (*a != *b) return (unsigned char)*a < (unsigned char)*b ? -1 : 1;
        a++;
        b++;
    }
    return *a ? 1 : *b ? -1 : 0;
}

static int ix_newfile_cmp(const void *a, const void *b)
{
    const struct ix_newfile *x = a, *y = b;
    if (x->date != y->date) return x->date < y->date ? -1 : 1;
    int c = ix_name_order_cmp(x->name + 4, y->name + 4);
    return c ? c : strcmp(x->name + 4, y->name + 4);
}

/* The size and internal date of a new file, from its name where it says,
 * else from stat(). 1 when the file is gone or not a regular file. */
static int ix_describe(const char *dir, const struct ix_file *f, struct ix_newfile *nf)
{
    const char *base = f->name + 4;
    nf->name = f->name;
    nf->blen = f->blen;
    int need = 0;
    if (ix_size_from_name(base, f->blen, &nf->size) < 0) need = 1;
    if (ix_date_from_name(base, f->blen, &nf->date) < 0) need |= 2;
    if (!need) return 0;
    uint64_t size = f->file_size;
    int64_t mtime = f->file_mtime;
    if (!f->have_stat) {
        char path[IX_PATH_MAX];
        struct stat st;
        int rc = ix_path(path, dir, f->name);
        if (rc < 0) return rc;
        if (lstat(path, &st) < 0) return errno == ENOENT ? 1 : -errno;
        if (!S_ISREG(st.st_mode)) return 1;
        size = (uint64_t)st.st_size;
        mtime = (int64_t)st.st_mtim.tv_sec;
    }
    if (need & 1) {
        char path[IX_PATH_MAX];
        nf->size = ix_path(path, dir, f->name) < 0 ? size : ix_crlf_size(path, size);
    }
    if (need & 2) nf->date = mtime;
    return 0;
}

/* An index with what it recorded of new/ and cur/. */
struct ix_snap {
    struct mbox_index ix;
    int64_t mt[2];
};

/* Merge a scan of the directories marked in rescan[] into s (replaced on
 * success). *changed is set when the message list changed. -EOVERFLOW when
 * the UIDs ran out. */
static int ix_merge(const char *dir, struct ix_snap *s, const int rescan[2], struct ix_scan *sc,
                    int *changed)
{
    struct mbox_index *ix = &s->ix;
    size_t ne = ix->n, nf = sc->n;
    int rc = 0;
    struct ix_key *ek = malloc((ne + 1) * sizeof *ek);
    struct ix_key *fk = malloc((nf + 1) * sizeof *fk);
    struct mbox_entry *work = malloc((ne + nf + 1) * sizeof *work);
    unsigned char *state = calloc(ne + 1, 1);   /* 1: gone, 2: flags changed */
    struct ix_newfile *nw = malloc((nf + 1) * sizeof *nw);
    size_t nnew = 0;
    if (!ek || !fk || !work || !state || !nw) {
        rc = -ENOMEM;
        goto out;
    }
    for (size_t i = 0; i < ne; i++) {
        work[i] = ix->e[i];
        size_t l = strlen(ix->e[i].name + 4);
        ek[i] = (struct ix_key){ix->e[i].name, (uint32_t)ix_base_len(ix->e[i].name + 4, l), (uint32_t)i};
    }
    for (size_t j = 0; j < nf; j++) fk[j] = (struct ix_key){sc->f[j].name, sc->f[j].blen, (uint32_t)j};
    qsort(ek, ne, sizeof *ek, ix_key_cmp);
    qsort(fk, nf, sizeof *fk, ix_key_cmp);

    /* Walk both lists base by base. */
    size_t i = 0, j = 0;
    while (i < ne || j < nf) {
        const struct ix_key *k;
        if (i < ne && j < nf) {
            k = ix_key_cmp(&ek[i], &fk[j]) <= 0 ? &ek[i] : &fk[j];
            /* the smaller base; equal bases group together below */
            if (ix_same_base(&ek[i], &fk[j])) k = &ek[i];
        } else {
            k = i < ne ? &ek[i] : &fk[j];
        }
        size_t i2 = i, j2 = j;
        while (i2 < ne && ix_same_base(&ek[i2], k)) i2++;
        while (j2 < nf && ix_same_base(&fk[j2], k)) j2++;
        if (i2 == i) {
            /* Not in the index: a new message (the copy in cur/ when the
             * same base shows in both places mid-move). */
            int r = ix_describe(dir, &sc->f[fk[j].idx], &nw[nnew]);
            if (r < 0) {
                rc = r;
                goto out;
            }
            if (r == 0) nnew++;
        }
        for (size_t a = i; a < i2; a++) {
            struct mbox_entry *e = &work[ek[a].idx];
            if (!rescan[e->name[0] == 'c' ? IX_CUR : IX_NEW]) continue;   /* its place was not read */
            /* The file with its recorded name, else (first entry of this base
             * only) any file of this base: a rename by another tool. */
            size_t pick = j2;
            for (size_t b = j; b < j2; b++)
                if (strcmp(fk[b].name, e->name) == 0) pick = b;
            if (pick == j2 && a == i && j2 > j) pick = j;
            if (pick == j2) {
                state[ek[a].idx] = 1;
                *changed = 1;
                continue;
            }
            const char *nm = fk[pick].name;
            if (strcmp(nm, e->name) != 0) {
                char fl[MBOX_INDEX_FLAGS_MAX + 1];
                ix_flags_of(nm + 4, strlen(nm + 4), fl);
                if (strcmp(fl, e->flags) != 0) {
                    memcpy(e->flags, fl, sizeof fl);
                    state[ek[a].idx] = 2;
                }
                e->name = (char *)nm;
                *changed = 1;
            }
        }
        i = i2;
        j = j2;
    }

    /* New modseqs in UID order: one per flag change, one for all that
     * vanished, one shared by all arrivals. */
    size_t out = 0;
    int vanished = 0;
    for (size_t a = 0; a < ne; a++) {
        if (state[a] == 1) {
            vanished = 1;
            continue;
        }
        if (state[a] == 2) work[a].modseq = ++ix->highestmodseq;
        work[out++] = work[a];
    }
    if (vanished) ix->highestmodseq++;
    if (nnew > 0) {
        if ((uint64_t)ix->uidnext + nnew > UINT32_MAX) {
            rc = -EOVERFLOW;
            goto out;
        }
        qsort(nw, nnew, sizeof *nw, ix_newfile_cmp);
        uint64_t ms = ++ix->highestmodseq;
        for (size_t a = 0; a < nnew; a++) {
            struct mbox_entry *e = &work[out++];
            memset(e, 0, sizeof *e);
            e->uid = ix->uidnext++;
            e->modseq = ms;
            e->size = nw[a].size;
            e->internal_date = nw[a].date;
            e->name = (char *)nw[a].name;
            ix_flags_of(nw[a].name + 4, strlen(nw[a].name + 4), e->flags);
        }
        *changed = 1;
    }
    struct mbox_entry *packed;
    if ((rc = ix_pack(work, out, &packed)) < 0) goto out;
    free(ix->e);
    ix->e = packed;
    ix->n = out;
out:
    free(ek);
    free(fk);
    free(work);
    free(state);
    free(nw);
    return rc;
}

/* An empty index for a folder whose index is missing or unusable. */
static void ix_fresh(struct ix_snap *s, uint32_t uidvalidity)
{
    memset(s, 0, sizeof *s);
    s->ix.uidvalidity = uidvalidity;
    s->ix.uidnext = 1;
    s->ix.highestmodseq = 1;
    s->mt[IX_NEW] = s->mt[IX_CUR] = MBOX_INDEX_MTIME_DIRTY;
}

/* The UIDVALIDITY a damaged index still shows on its first line, or 0. */
static uint32_t ix_old_uidvalidity(const char *text, size_t len)
{
    const char *end = text + len, *p = text, *f;
    size_t n;
    uint64_t v;
    const char *nl = memchr(text, '\n', len);
    if (nl) end = nl;
    if (ix_field(&p, end, &f, &n) < 0 || n != strlen(IX_MAGIC) || memcmp(f, IX_MAGIC, n) != 0) return 0;
    if (ix_field(&p, end, &f, &n) < 0) return 0;
    const char *sp = memchr(p, ' ', (size_t)(end - p));
    if (ix_digits(p, (size_t)((sp ? sp : end) - p), &v) < 0 || v == 0 || v > UINT32_MAX) return 0;
    return (uint32_t)v;
}

static uint32_t ix_next_uidvalidity(uint32_t old)
{
    uint32_t now = ix_now_uidvalidity();
    if (old == 0 || old == UINT32_MAX) return now;
    return old + 1 > now ? old + 1 : now;
}

/* Load the index of dir into s: 1 when it was missing or rebuilt (so it
 * must be saved), 0 when read as it was, or -errno. */
static int ix_load(const char *dir, struct ix_snap *s)
{
    char path[IX_PATH_MAX];
    char *text = NULL;
    size_t len = 0;
    int rc = ix_path(path, dir, MBOX_INDEX_FILE);
    if (rc < 0) return rc;
    rc = ix_read_file(path, &text, &len);
    if (rc == -ENOENT) {
        ix_fresh(s, ix_now_uidvalidity());
        return 1;
    }
    if (rc < 0) return rc;
    memset(s, 0, sizeof *s);
    rc = mbox_index_parse(text, len, &s->ix, &s->mt[IX_NEW], &s->mt[IX_CUR]);
    if (rc == -EINVAL) {
        ix_fresh(s, ix_next_uidvalidity(ix_old_uidvalidity(text, len)));
        rc = 1;
    }
    free(text);
    return rc;
}

static int ix_ensure_dirs(const char *dir)
{
    static const char *const subs[] = {"tmp", "new", "cur"};
    char path[IX_PATH_MAX];
    for (int i = 0; i < 3; i++) {
        int rc = ix_path(path, dir, subs[i]);
        if (rc == 0) rc = fs_mkdir_p(path);
        if (rc < 0) return rc;
    }
    return 0;
}

/* The sync step, lock held: s is filled with the folder's current index,
 * saved when it changed. force rescans both directories. */
static int ix_sync_locked(const char *dir, struct ix_snap *s, int force)
{
    int must_save = ix_load(dir, s);
    if (must_save < 0) return must_save;
    int rc = 0;
    for (int attempt = 0;; attempt++) {
        char path[IX_PATH_MAX];
        struct stat st[2];
        int missing = must_save && attempt == 0;   /* a new index: make sure of tmp/ too */
        for (int d = 0; d < 2; d++) {
            if ((rc = ix_path(path, dir, ix_sub[d])) < 0) goto fail;
            if (stat(path, &st[d]) < 0) {
                if (errno != ENOENT) {
                    rc = -errno;
                    goto fail;
                }
                missing = 1;
            }
        }
        if (missing) {
            if ((rc = ix_ensure_dirs(dir)) < 0) goto fail;
            for (int d = 0; d < 2; d++) {
                ix_path(path, dir, ix_sub[d]);
                if (stat(path, &st[d]) < 0) {
                    rc = -errno;
                    goto fail;
                }
            }
        }
        /* Take the clock after stat() and before readdir(): a change after
         * the read in the same timestamp tick must not look like "seen". */
        int64_t now = ix_now_ns();
        int rescan[2];
        int64_t mt[2];
        for (int d = 0; d < 2; d++) {
            int64_t m = (int64_t)st[d].st_mtim.tv_sec * 1000000000LL + st[d].st_mtim.tv_nsec;
            rescan[d] = force || s->mt[d] == MBOX_INDEX_MTIME_DIRTY || s->mt[d] != m;
            mt[d] = !rescan[d] ? s->mt[d] : m >= now - IX_DIRTY_WINDOW_NS ? MBOX_INDEX_MTIME_DIRTY : m;
        }
        if (!rescan[IX_NEW] && !rescan[IX_CUR] && !must_save) return 0;

        struct ix_scan sc = {0};
        int changed = must_save;
        for (int d = 0; d < 2 && rc == 0; d++)
            if (rescan[d]) rc = ix_scan_dir(dir, d, &sc);
        if (rc == 0) {
            for (size_t k = 0; k < sc.n; k++) sc.f[k].name = sc.arena + sc.f[k].off;
            rc = ix_merge(dir, s, rescan, &sc, &changed);
        }
        if (rc == -EOVERFLOW && attempt == 0) {
            /* UIDs ran out: IMAP's answer is a new UIDVALIDITY. */
            ix_scan_free(&sc);
            uint32_t uv = ix_next_uidvalidity(s->ix.uidvalidity);
            mbox_index_free(&s->ix);
            ix_fresh(s, uv);
            must_save = 1;
            force = 1;
            rc = 0;
            continue;
        }
        if (rc == 0 && (changed || mt[0] != s->mt[0] || mt[1] != s->mt[1])) {
            s->mt[0] = mt[0];
            s->mt[1] = mt[1];
            rc = ix_save(dir, &s->ix, s->mt);
        }
        ix_scan_free(&sc);   /* after the save: merged names point into it until packed */
        if (rc < 0) goto fail;
        return 0;
    }
fail:
    mbox_index_free(&s->ix);
    return rc;
}

int mbox_index_sync(const char *dir, struct mbox_index *ix)
{
    int fd = ix_lock(dir);
    if (fd < 0) return fd;
    struct ix_snap s;
    int rc = ix_sync_locked(dir, &s, 0);
    close(fd);
    if (rc < 0) return rc;
    mbox_index_free(ix);
    *ix = s.ix;
    return 0;
}

/* flags as stored: letters only, sorted, deduplicated. */
static int ix_normalize_flags(const char *flags, char out[MBOX_INDEX_FLAGS_MAX + 1])
{
    unsigned char seen[128] = {0};
    for (const char *p = flags; *p; p++) {
        if (!is_letter((unsigned char)*p)) return -EINVAL;
        seen[(unsigned char)*p] = 1;
    }
    size_t o = 0;
    for (int c = 'A'; c <= 'z'; c++) {
        if (!seen[c]) continue;
        if (o == MBOX_INDEX_FLAGS_MAX) return -EINVAL;
        out[o++] = (char)c;
    }
    out[o] = 0;
    return 0;
}

int mbox_index_set_flags(const char *dir, struct mbox_index *ix, uint32_t uid, const char *flags)
{
    char want[MBOX_INDEX_FLAGS_MAX + 1];
    int rc = ix_normalize_flags(flags, want);
    if (rc < 0) return rc;
    int fd = ix_lock(dir);
    if (fd < 0) return fd;
    struct ix_snap s = {0};
    int have = 0;
    for (int attempt = 0; attempt < IX_RETRIES; attempt++) {
        if (have) mbox_index_free(&s.ix);
        have = 0;
        /* A retry follows a rename by someone else: read both places again. */
        if ((rc = ix_sync_locked(dir, &s, attempt > 0)) < 0) break;
        have = 1;
        struct mbox_entry *e = mbox_index_find(&s.ix, uid);
        if (!e) {
            rc = -ENOENT;
            break;
        }
        const char *file = e->name + 4;
        size_t blen = ix_base_len(file, strlen(file));
        char name[MBOX_INDEX_NAME_MAX + 8];
        int n = snprintf(name, sizeof name, "cur/%.*s:2,%s", (int)blen, file, want);
        if (n < 0 || (size_t)n >= sizeof name || n - 4 > MBOX_INDEX_NAME_MAX) {
            rc = -ENAMETOOLONG;
            break;
        }
        if (strcmp(name, e->name) == 0) {
            rc = 0;
            break;
        }
        char from[IX_PATH_MAX], to[IX_PATH_MAX];
        if ((rc = ix_path(from, dir, e->name)) < 0 || (rc = ix_path(to, dir, name)) < 0) break;
        if (rename(from, to) < 0) {
            rc = -errno;
            if (rc == -ENOENT && attempt + 1 < IX_RETRIES) continue;
            break;
        }
        /* The directories' recorded mtimes stay as they were: they now
         * differ, so the next sync reads both places again. */
        char *old = e->name;
        e->name = name;
        if (strcmp(e->flags, want) != 0) {
            memcpy(e->flags, want, sizeof want);
            e->modseq = ++s.ix.highestmodseq;
        }
        struct mbox_entry *packed;
        rc = ix_pack(s.ix.e, s.ix.n, &packed);
        e->name = old;
        if (rc < 0) break;
        free(s.ix.e);
        s.ix.e = packed;
        rc = ix_save(dir, &s.ix, s.mt);
        break;
    }
    close(fd);
    if (have && rc != 0 && rc != -ENOENT) {
        mbox_index_free(&s.ix);
        return rc;
    }
    if (have) {
        mbox_index_free(ix);
        *ix = s.ix;
    }
    return rc;
}

static int ix_uid_cmp(const void *a, const void *b)
{
    uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;
    return x < y ? -1 : x > y;
}

int mbox_index_expunge(const char *dir, struct mbox_index *ix, const uint32_t *uids, size_t n)
{
    uint32_t *want = malloc((n + 1) * sizeof *want);
    if (!want) return -ENOMEM;
    if (n) memcpy(want, uids, n * sizeof *want);
    qsort(want, n, sizeof *want, ix_uid_cmp);
    int fd = ix_lock(dir);
    if (fd < 0) {
        free(want);
        return fd;
    }
    struct ix_snap s = {0};
    int have = 0, rc = 0, err = 0;
    for (int attempt = 0; attempt < IX_RETRIES; attempt++) {
        if (have) mbox_index_free(&s.ix);
        have = 0;
        /* A retry follows a file renamed under us: find it again. */
        if ((rc = ix_sync_locked(dir, &s, attempt > 0)) < 0) break;
        have = 1;
        size_t out = 0, pending = 0;
        int dropped = 0;
        for (size_t i = 0; i < s.ix.n; i++) {
            struct mbox_entry *e = &s.ix.e[i];
            if (!bsearch(&e->uid, want, n, sizeof *want, ix_uid_cmp)) {
                s.ix.e[out++] = *e;
                continue;
            }
            char path[IX_PATH_MAX];
            int r = ix_path(path, dir, e->name);
            if (r == 0 && unlink(path) < 0) r = -errno;
            if (r == 0 || (r == -ENOENT && attempt + 1 == IX_RETRIES)) {
                dropped = 1;
                continue;
            }
            if (r == -ENOENT) pending++;
            else if (!err) err = r;
            s.ix.e[out++] = *e;
        }
        if (dropped) {
            /* Entries moved down within the block: names still point into it. */
            s.ix.n = out;
            s.ix.highestmodseq++;
            if ((rc = ix_save(dir, &s.ix, s.mt)) < 0) break;
        }
        if (!pending) break;
    }
    close(fd);
    free(want);
    if (!have) return rc;
    if (rc < 0) {
        mbox_index_free(&s.ix);
        return rc;
    }
    mbox_index_free(ix);
    *ix = s.ix;
    return err;   /* a file we could not remove (its entry stays) */
}
