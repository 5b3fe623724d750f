/* Maildir delivery (see maildir.h): tmp -> fsync -> rename into new ->
 * fsync of new/, the order the Maildir convention relies on. */
#include "store/maildir.h"

#include "core/fsutil.h"

#include <errno.h>
#include <stdbool.h>
#include <fcntl.h>
#include <stdatomic.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <unistd.h>

int mailbox_of(const char *addr, size_t len, char *buf, size_t cap)
{
    const char *at = memrchr(addr, '@', len);
    if (!at || at == addr || (size_t)(at - addr) + 1 >= len) return -EINVAL;
    size_t o = 0;
    bool tag = false;
    for (const char *p = addr; p < addr + len; p++) {
        if (p < at && *p == '+' && p != addr) tag = true;   /* user+tag is user */
        if (p == at) tag = false;
        if (tag) continue;
        if (o + 1 >= cap) return -EINVAL;
        buf[o++] = (char)(*p >= 'A' && *p <= 'Z' ? *p + 32 : *p);
    }
    buf[o] = 0;
    return (int)o;
}

int maildir_path(const char *root, const char *address, char *buf, size_t cap)
{
    char mbox[520];
    int n = mailbox_of(address, strlen(address), mbox, sizeof mbox);
    if (n < 0 || mbox[0] == '+') return -EINVAL;
    char *at = strrchr(mbox, '@');
    *at = 0;
    const char *local = mbox, *domain = at + 1;
    size_t ll = strlen(local), dl = strlen(domain);
    if (ll == 0 || ll > 254 || dl > 254 || local[0] == '.' || domain[0] == '.') return -EINVAL;
    for (size_t i = 0; i < ll; i++)
        if ((unsigned char)local[i] < 0x21 || local[i] == '/' || local[i] == 0x7f) return -EINVAL;
    for (size_t i = 0; i < dl; i++)
        if ((unsigned char)domain[i] < 0x21 || domain[i] == '/' || domain[i] == 0x7f) return -EINVAL;
    int w = snprintf(buf, cap, "%s/%s/%s", root, domain, local);
    return w < 0 || (size_t)w >= cap ? -EINVAL : 0;
}

int maildir_deliver(const char *dir, const char *host, const char *prefix, size_t plen,
                    const char *msg, size_t len, char *name, size_t namecap)
{
    static atomic_uint counter;
    char sub[4200], tmp[4400], fin[4400];
    static const char *const subs[] = {"tmp", "new", "cur"};
    for (int i = 0; i < 3; i++) {
        snprintf(sub, sizeof sub, "%s/%s", dir, subs[i]);
        struct stat st;
        if (stat(sub, &st) == 0) continue;
        int rc = fs_mkdir_p(sub);
        if (rc < 0) return rc;
    }
    struct timeval tv;
    gettimeofday(&tv, NULL);
    size_t size = plen + len;
    char base[256];
    /* Unique per host: time, microseconds, pid and a counter (the
     * convention's "M", "P" and "Q" parts). */
    snprintf(base, sizeof base, "%lld.M%ldP%dQ%u.%s", (long long)tv.tv_sec, (long)tv.tv_usec,
             (int)getpid(), atomic_fetch_add(&counter, 1) + 1, host && *host ? host : "localhost");
    for (char *p = base; *p; p++)
        if (*p == '/' || *p == ':') *p = '_';
    snprintf(tmp, sizeof tmp, "%s/tmp/%s", dir, base);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
    if (fd < 0) return -errno;
    struct iovec iov[2] = {{(void *)prefix, prefix ? plen : 0}, {(void *)msg, len}};
    size_t done = 0;
    int rc = 0;
    while (done < size) {
        struct iovec v[2];
        int nv = 0;
        size_t skip = done;
        for (int i = 0; i < 2; i++) {
            if (skip >= iov[i].iov_len) {
                skip -= iov[i].iov_len;
                continue;
            }
            v[nv].iov_base = (char *)iov[i].iov_base + skip;
            v[nv].iov_len = iov[i].iov_len - skip;
            nv++;
            skip = 0;
        }
        ssize_t w = writev(fd, v, nv);
        if (w < 0) {
            if (errno == EINTR) continue;
            rc = -errno;
            break;
        }
        done += (size_t)w;
    }
    if (rc == 0 && fsync(fd) < 0) rc = -errno;
    if (close(fd) < 0 && rc == 0) rc = -errno;
    if (rc == 0) {
        snprintf(fin, sizeof fin, "%s/new/%s,S=%zu", dir, base, size);
        if (rename(tmp, fin) < 0) rc = -errno;
    }
    if (rc < 0) {
        unlink(tmp);
        return rc;
    }
    snprintf(sub, sizeof sub, "%s/new", dir);
    rc = fs_fsync_dir(sub);
    if (rc == 0 && name) snprintf(name, namecap, "%s,S=%zu", base, size);
    return rc;
}
