/* sources: csrc/store/quota.c csrc/core/fsutil.c */
/* libs: */
/* Maildir++ quota: the maildirsize parser (limits, deltas, torn lines,
 * garbage), recalculation across INBOX and ".Folder"s, appends that sum
 * up, the rewrite of a file that grew past 5120 bytes or carries other
 * limits, when an over-quota file is not trusted, and quota_check at the
 * byte and the message limit. */
#include "store/quota.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "check.h"

#define OK(c) CHECK(c, "%s", "")

static char top[64];
static int seq;

static void mk(const char *root, const char *rel)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", root, rel);
    mkdir(path, 0700);
}

static size_t slurp(const char *root, const char *rel, char *buf, size_t cap)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", root, rel);
    FILE *f = fopen(path, "r");
    if (!f) return (size_t)-1;
    size_t n = fread(buf, 1, cap - 1, f);
    fclose(f);
    buf[n] = 0;
    return n;
}

static void new_maildir(char *root, size_t cap, const char *const *folders)
{
    snprintf(root, cap, "%s/u%d", top, ++seq);
    mkdir(root, 0700);
    mk(root, "tmp");
    mk(root, "new");
    mk(root, "cur");
    for (; folders && *folders; folders++) {
        char rel[256];
        mk(root, *folders);
        snprintf(rel, sizeof rel, "%s/new", *folders);
        mk(root, rel);
        snprintf(rel, sizeof rel, "%s/cur", *folders);
        mk(root, rel);
    }
}

static const struct {
    const char *text;
    int ok;
    uint64_t lbytes, lmsgs;
    int64_t bytes, msgs;
    size_t lines;
} cases[] = {
    {"1000S,10C\n", 1, 1000, 10, 0, 0, 0},
    {"1000S\n", 1, 1000, 0, 0, 0, 0},
    {"10C\n", 1, 0, 10, 0, 0, 0},
    {"10C,1000S\n", 1, 1000, 10, 0, 0, 0},
    {"0S\n", 1, 0, 0, 0, 0, 0},
    {"\n5 1\n", 1, 0, 0, 5, 1, 1},
    {"1000S,10C\n100 1\n-50 -1\n", 1, 1000, 10, 50, 0, 2},
    {"1000S\n   12    3  \n\t7\t1\n", 1, 1000, 0, 19, 4, 2},   /* Courier pads lines */
    {"1000S\n+5 +1\n", 1, 1000, 0, 5, 1, 1},
    {"1000S\n10 1\n5 ", 1, 1000, 0, 10, 1, 1},                  /* torn append */
    {"1000S\n10 1\ngarbage", 1, 1000, 0, 10, 1, 1},
    {"18446744073709551615S\n9223372036854775807 0\n", 1, UINT64_MAX, 0, INT64_MAX, 0, 1},
    {"", 0, 0, 0, 0, 0, 0},
    {"1000S", 0, 0, 0, 0, 0, 0},                                 /* no limits line yet */
    {"garbage\n", 0, 0, 0, 0, 0, 0},
    {"1000X\n", 0, 0, 0, 0, 0, 0},
    {"S\n", 0, 0, 0, 0, 0, 0},
    {"1000\n", 0, 0, 0, 0, 0, 0},
    {"1000S,\n", 0, 0, 0, 0, 0, 0},
    {",10C\n", 0, 0, 0, 0, 0, 0},
    {"1000S 10C\n", 0, 0, 0, 0, 0, 0},
    {"-1000S\n", 0, 0, 0, 0, 0, 0},
    {"1000S\r\n", 0, 0, 0, 0, 0, 0},
    {"18446744073709551616S\n", 0, 0, 0, 0, 0, 0},
    {"1000S\n10\n", 0, 0, 0, 0, 0, 0},
    {"1000S\n10 1 2\n", 0, 0, 0, 0, 0, 0},
    {"1000S\n\n", 0, 0, 0, 0, 0, 0},
    {"1000S\nx y\n", 0, 0, 0, 0, 0, 0},
    {"1000S\n10 - 1\n", 0, 0, 0, 0, 0, 0},
    {"1000S\n10 1x\n", 0, 0, 0, 0, 0, 0},
    {"1000S\n-10 -1\n", 0, 0, 0, 0, 0, 0},                       /* a negative total */
    {"1000S\n10 1\n-20 0\n", 0, 0, 0, 0, 0, 0},
    {"1000S\n9223372036854775807 1\n1 0\n", 0, 0, 0, 0, 0, 0},   /* overflow */
    {"1000S\n9223372036854775808 1\n", 0, 0, 0, 0, 0, 0},
};

static void test_parse(void)
{
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        struct quota_limits lim = {7, 7};
        int64_t b = -7, m = -7;
        size_t lines = 99;
        const char *t = cases[i].text;
        int rc = quota_parse_lines(t, strlen(t), &lim, &b, &m, &lines);
        CHECK(cases[i].ok ? rc == 0 : rc == -EINVAL, "case %zu rc %d: %s", i, rc, check_show(t, strlen(t)));
        if (rc == 0 && cases[i].ok)
            CHECK(lim.bytes == cases[i].lbytes && lim.messages == cases[i].lmsgs && b == cases[i].bytes &&
                      m == cases[i].msgs && lines == cases[i].lines,
                  "case %zu: %llu %llu %lld %lld %zu", i, (unsigned long long)lim.bytes,
                  (unsigned long long)lim.messages, (long long)b, (long long)m, lines);
        if (rc != 0) OK(lim.bytes == 7 && b == -7);   /* nothing written on failure */
    }
    static const char nul[] = "1000S\n10 1\n\0 0\n";
    struct quota_limits lim;
    int64_t b, m;
    OK(quota_parse(nul, sizeof nul - 1, &lim, &b, &m) == -EINVAL);
    OK(quota_parse("10C\n3 1\n", 8, &lim, &b, &m) == 0 && lim.messages == 10 && b == 3 && m == 1);

    /* The limits line we write reads back as the same limits. */
    static const struct quota_limits lims[] = {{0, 0}, {1000, 0}, {0, 10}, {1000, 10}, {UINT64_MAX, UINT64_MAX}};
    static const char *const lines[] = {"0S\n", "1000S\n", "10C\n", "1000S,10C\n", NULL};
    for (size_t i = 0; i < sizeof lims / sizeof lims[0]; i++) {
        char buf[64];
        size_t n = quota_format_limits(&lims[i], buf, sizeof buf);
        OK(n == strlen(buf));
        if (lines[i]) CHECK(strcmp(buf, lines[i]) == 0, "%s", buf);
        OK(quota_parse(buf, n, &lim, &b, &m) == 0 && lim.bytes == lims[i].bytes &&
           lim.messages == lims[i].messages);
    }
}

static void test_recalc(void)
{
    char root[256], buf[256];
    static const char *const folders[] = {".Junk", ".Trash", NULL};
    new_maildir(root, sizeof root, folders);
    check_put(root, "new/1700000000.M1P1Q1.host,S=100", "x");              /* 100 by name */
    check_put(root, "cur/1700000001.M1P1Q2.host,S=50:2,S", "x");           /* 50 by name */
    check_put(root, "cur/1700000002.plain:2,S", "0123456789");             /* 10 by stat */
    check_put(root, ".Junk/new/1700000003.M1P1Q3.host,S=1000", "x");
    check_put(root, ".Junk/cur/1700000004.M1P1Q4.host,S=7:2,", "x");
    check_put(root, ".Trash/cur/1700000005.plain", "abc");                  /* 3 by stat */
    check_put(root, "tmp/1700000006.half-written,S=99999", "x");           /* not delivered */
    check_put(root, "new/.hidden,S=99999", "x");
    mk(root, "new/subdir");
    mk(root, "notafolder");
    mk(root, "notafolder/new");
    check_put(root, "notafolder/new/1.x,S=99999", "x");
    mk(root, ".Empty");                                               /* a folder with no new/ or cur/ */
    check_put(root, ".stray-file", "x");

    const struct quota_limits lim = {100000, 100};
    uint64_t b = 0, m = 0;
    OK(quota_usage(root, &lim, &b, &m) == 0);
    CHECK(b == 100 + 50 + 10 + 1000 + 7 + 3 && m == 6, "%llu bytes %llu messages", (unsigned long long)b,
          (unsigned long long)m);
    size_t n = slurp(root, QUOTA_FILE, buf, sizeof buf);
    CHECK(n != (size_t)-1 && strcmp(buf, "100000S,100C\n1170 6\n") == 0, "%s", check_show(buf, n));

    /* The file is trusted now: a message slipped in without an append is
     * not seen... */
    check_put(root, "new/1700000007.M1P1Q7.host,S=30", "x");
    OK(quota_usage(root, &lim, &b, &m) == 0 && b == 1170 && m == 6);
    /* ...until the limits change, which rewrites the file. */
    const struct quota_limits other = {0, 50};
    OK(quota_usage(root, &other, &b, &m) == 0 && b == 1200 && m == 7);
    n = slurp(root, QUOTA_FILE, buf, sizeof buf);
    CHECK(strcmp(buf, "50C\n1200 7\n") == 0, "%s", check_show(buf, n));
    const struct quota_limits none = {0, 0};
    OK(quota_usage(root, &none, &b, &m) == 0 && b == 1200 && m == 7);
    n = slurp(root, QUOTA_FILE, buf, sizeof buf);
    CHECK(strcmp(buf, "0S\n1200 7\n") == 0, "%s", check_show(buf, n));

    /* A damaged file is recalculated. */
    check_put(root, QUOTA_FILE, "0S\n12 x\n");
    OK(quota_usage(root, &none, &b, &m) == 0 && b == 1200 && m == 7);
    /* A header and no total: recalculated. */
    check_put(root, QUOTA_FILE, "0S\n");
    OK(quota_usage(root, &none, &b, &m) == 0 && b == 1200 && m == 7);
    /* A torn append is left out. */
    check_put(root, QUOTA_FILE, "0S\n1200 7\n55");
    OK(quota_usage(root, &none, &b, &m) == 0 && b == 1200 && m == 7);

    /* No Maildir yet: nothing used, nothing created. */
    char missing[300];
    snprintf(missing, sizeof missing, "%s/nobody", top);
    OK(quota_usage(missing, &lim, &b, &m) == 0 && b == 0 && m == 0);
    struct stat st;
    OK(stat(missing, &st) < 0 && errno == ENOENT);
    OK(quota_check(missing, &lim, 10) == 0);
}

static void test_add(void)
{
    char root[256], buf[512];
    new_maildir(root, sizeof root, NULL);
    const struct quota_limits lim = {1000, 10};
    uint64_t b, m;

    /* No file yet: the append becomes a recalculation, which already sees
     * the delivered message (counted once, not twice). */
    check_put(root, "new/1700000000.a,S=40", "x");
    OK(quota_add(root, &lim, 40, 1) == 0);
    size_t n = slurp(root, QUOTA_FILE, buf, sizeof buf);
    CHECK(strcmp(buf, "1000S,10C\n40 1\n") == 0, "%s", check_show(buf, n));

    check_put(root, "new/1700000001.b,S=25", "x");
    OK(quota_add(root, &lim, 25, 1) == 0);
    check_put(root, "new/1700000002.c,S=5", "x");
    OK(quota_add(root, &lim, 5, 1) == 0);
    n = slurp(root, QUOTA_FILE, buf, sizeof buf);
    CHECK(strcmp(buf, "1000S,10C\n40 1\n25 1\n5 1\n") == 0, "%s", check_show(buf, n));
    OK(quota_usage(root, &lim, &b, &m) == 0 && b == 70 && m == 3);

    unlink(strcat(strcpy(buf, root), "/new/1700000001.b,S=25"));
    OK(quota_add(root, &lim, -25, -1) == 0);
    OK(quota_usage(root, &lim, &b, &m) == 0 && b == 45 && m == 2);
    n = slurp(root, QUOTA_FILE, buf, sizeof buf);
    CHECK(strcmp(buf, "1000S,10C\n40 1\n25 1\n5 1\n-25 -1\n") == 0, "%s", check_show(buf, n));
    OK(quota_add(root, &lim, 0, 0) == 0);
    OK(slurp(root, QUOTA_FILE, buf, sizeof buf) == n);

    /* Past 5120 bytes the file is rewritten (here its sum had drifted: the
     * scan is what counts). */
    int failed_adds = 0;
    for (int i = 0; i < 1200; i++) failed_adds += quota_add(root, &lim, i % 2 ? -1 : 2, 0) != 0;
    OK(failed_adds == 0);
    n = slurp(root, QUOTA_FILE, buf, sizeof buf);
    OK(n == sizeof buf - 1);   /* big */
    OK(quota_usage(root, &lim, &b, &m) == 0);
    CHECK(b == 45 && m == 2, "%llu %llu", (unsigned long long)b, (unsigned long long)m);
    n = slurp(root, QUOTA_FILE, buf, sizeof buf);
    CHECK(strcmp(buf, "1000S,10C\n45 2\n") == 0, "%s", check_show(buf, n));

    /* Just under the size, the appends are still summed. */
    char big[QUOTA_FILE_MAX + 64];
    size_t o = (size_t)snprintf(big, sizeof big, "1000S,10C\n45 2\n");
    while (o + 4 < QUOTA_FILE_MAX) o += (size_t)snprintf(big + o, sizeof big - o, "0 0\n");
    big[o] = 0;
    check_put(root, QUOTA_FILE, big);
    check_put(root, "new/1700000009.z,S=1", "x");   /* not appended: shows whether the file was used */
    OK(quota_usage(root, &lim, &b, &m) == 0 && b == 45 && m == 2);
    o += (size_t)snprintf(big + o, sizeof big - o, "0 0\n");   /* now 5120 or more */
    check_put(root, QUOTA_FILE, big);
    OK(quota_usage(root, &lim, &b, &m) == 0 && b == 46 && m == 3);
}

/* lim NULL: a file another tool keeps is kept in step; none is started. */
static void test_add_existing_only(void)
{
    char root[256], buf[256];
    new_maildir(root, sizeof root, NULL);
    check_put(root, "new/1700000000.a,S=40", "x");
    OK(quota_add(root, NULL, 40, 1) == 0);
    OK(slurp(root, QUOTA_FILE, buf, sizeof buf) == (size_t)-1);  /* still none */
    check_put(root, QUOTA_FILE, "500S\n0 0\n");
    OK(quota_add(root, NULL, 40, 1) == 0 && quota_add(root, NULL, -40, -1) == 0);
    size_t n = slurp(root, QUOTA_FILE, buf, sizeof buf);
    CHECK(strcmp(buf, "500S\n0 0\n40 1\n-40 -1\n") == 0, "%s", check_show(buf, n));
}

static void test_check(void)
{
    char root[256];
    new_maildir(root, sizeof root, NULL);
    check_put(root, "new/1700000000.a,S=60", "x");
    check_put(root, "new/1700000001.b,S=30", "x");

    const struct quota_limits bytes = {100, 0};
    OK(quota_check(root, &bytes, 10) == 0);           /* 90 + 10 = 100: at the limit */
    OK(quota_check(root, &bytes, 11) == -EDQUOT);
    OK(quota_check(root, &bytes, UINT64_MAX) == -EDQUOT);
    OK(quota_check(root, &bytes, 0) == 0);

    const struct quota_limits count = {0, 3};
    OK(quota_check(root, &count, 1000000) == 0);      /* a third message fits */
    check_put(root, "new/1700000002.c,S=1", "x");
    OK(quota_add(root, &count, 1, 1) == 0);
    OK(quota_check(root, &count, 0) == -EDQUOT);      /* a fourth does not */

    const struct quota_limits both = {1000, 10};
    OK(quota_check(root, &both, 909) == 0);
    OK(quota_check(root, &both, 910) == -EDQUOT);
    const struct quota_limits none = {0, 0};
    OK(quota_check(root, &none, UINT64_MAX) == 0);

    /* Over quota by a file of several appends: not trusted, recalculated. */
    check_put(root, QUOTA_FILE, "100S\n50 1\n60 1\n");
    OK(quota_check(root, &bytes, 5) == 0);            /* the files hold 91 */
    /* Over quota by one fresh total line: trusted. */
    check_put(root, QUOTA_FILE, "100S\n110 2\n");
    OK(quota_check(root, &bytes, 5) == -EDQUOT);
    /* ...unless it is older than 15 minutes. */
    char path[512];
    snprintf(path, sizeof path, "%s/%s", root, QUOTA_FILE);
    struct timespec ts[2] = {{time(NULL) - QUOTA_STALE_SECS - 60, 0}, {time(NULL) - QUOTA_STALE_SECS - 60, 0}};
    utimensat(AT_FDCWD, path, ts, 0);
    OK(quota_check(root, &bytes, 5) == 0);
}

int main(void)
{
    if (check_tmpdir(top, sizeof top, "test_quota") < 0) return 2;
    test_parse();
    test_recalc();
    test_add();
    test_add_existing_only();
    test_check();
    check_rmtree(top);
    return check_summary();
}
