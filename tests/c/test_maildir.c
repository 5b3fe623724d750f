/* sources: csrc/store/maildir.c csrc/core/fsutil.c */
/* libs: */
/* Maildir delivery: mailbox paths from addresses (case, plus-addressing,
 * names that must not become paths), and delivery into a fresh directory:
 * tmp/ left empty, new/ holding exactly the bytes, the ",S=" size right,
 * unique names. */
#include "store/maildir.h"

#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "check.h"

#define OK(c) CHECK(c, "%s", "")

static int count_dir(const char *path)
{
    DIR *d = opendir(path);
    if (!d) return -1;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d)))
        if (de->d_name[0] != '.') n++;
    closedir(d);
    return n;
}

static void test_paths(void)
{
    char buf[512];
    OK(maildir_path("/r", "alice@example.test", buf, sizeof buf) == 0 &&
          strcmp(buf, "/r/example.test/alice") == 0);
    OK(maildir_path("/r", "Alice+news@EXAMPLE.Test", buf, sizeof buf) == 0 &&
          strcmp(buf, "/r/example.test/alice") == 0);
    OK(maildir_path("/r", "a.b-c_d@x.test", buf, sizeof buf) == 0 &&
          strcmp(buf, "/r/x.test/a.b-c_d") == 0);
    static const char *const bad[] = {
        "noat", "@x.test", "a@", "+tag@x.test", "../etc@x.test", ".hidden@x.test",
        "a/b@x.test", "a@../x", "a@x/y", "a b@x.test", "a\x01@x.test", "a@.x", NULL,
    };
    for (int i = 0; bad[i]; i++) {
        int rc = maildir_path("/r", bad[i], buf, sizeof buf);
        CHECK(rc == -EINVAL, "accepted %s", check_show(bad[i], strlen(bad[i])));
    }
    char longlocal[400];
    memset(longlocal, 'a', 300);
    strcpy(longlocal + 300, "@x.test");
    OK(maildir_path("/r", longlocal, buf, sizeof buf) == -EINVAL);
    OK(maildir_path("/r", "alice@example.test", buf, 10) == -EINVAL);   /* does not fit */
}

static void test_deliver(void)
{
    char root[] = "/tmp/me-maildir-XXXXXX";
    OK(mkdtemp(root) != NULL);
    char dir[600], p[1000], name[300], name2[300];
    snprintf(dir, sizeof dir, "%s/example.test/alice", root);
    const char prefix[] = "Return-Path: <a@b.test>\r\n";
    const char msg[] = "Subject: x\r\n\r\nbody\r\n";
    OK(maildir_deliver(dir, "host.test", prefix, sizeof prefix - 1, msg, sizeof msg - 1,
                          name, sizeof name) == 0);
    OK(maildir_deliver(dir, "host.test", NULL, 0, msg, sizeof msg - 1, name2, sizeof name2) == 0);
    OK(strcmp(name, name2) != 0);
    snprintf(p, sizeof p, "%s/tmp", dir);
    OK(count_dir(p) == 0);
    snprintf(p, sizeof p, "%s/cur", dir);
    OK(count_dir(p) == 0);
    snprintf(p, sizeof p, "%s/new", dir);
    OK(count_dir(p) == 2);
    size_t want = sizeof prefix - 1 + sizeof msg - 1;
    char sz[32];
    snprintf(sz, sizeof sz, ",S=%zu", want);
    OK(strstr(name, sz) != NULL && strstr(name, ".host.test") != NULL);
    snprintf(p, sizeof p, "%s/new/%s", dir, name);
    FILE *f = fopen(p, "rb");
    OK(f != NULL);
    char got[256] = {0};
    size_t n = f ? fread(got, 1, sizeof got, f) : 0;
    if (f) fclose(f);
    OK(n == want && memcmp(got, prefix, sizeof prefix - 1) == 0 &&
          memcmp(got + sizeof prefix - 1, msg, sizeof msg - 1) == 0);
    /* A mailbox that cannot be written: an error, nothing in new/. */
    snprintf(p, sizeof p, "%s/blocked", root);
    FILE *blk = fopen(p, "w");
    if (blk) fclose(blk);
    snprintf(dir, sizeof dir, "%s/blocked/sub", root);
    OK(maildir_deliver(dir, "h", NULL, 0, msg, sizeof msg - 1, name, sizeof name) < 0);
    char cmd[1100];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    OK(system(cmd) == 0);
}

/* The one address -> mailbox rule: lower case, "+tag" dropped, a leading
 * '+' kept, length-bounded input, refusals. */
static void test_mailbox_of(void)
{
    static const struct { const char *in; const char *out; } ok[] = {
        {"Alice@Example.TEST", "alice@example.test"},
        {"alice+news@example.test", "alice@example.test"},
        {"alice+a+b@x.test", "alice@x.test"},
        {"+x@x.test", "+x@x.test"},
        {"a@b@c.test", "a@b@c.test"},
    };
    char buf[64];
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++) {
        int n = mailbox_of(ok[i].in, strlen(ok[i].in), buf, sizeof buf);
        CHECK(n == (int)strlen(ok[i].out) && strcmp(buf, ok[i].out) == 0, "%s -> %s", ok[i].in, buf);
    }
    /* Only len bytes count: the rest of the buffer is not read. */
    const char *tail = "bob+t@x.testGARBAGE";
    OK(mailbox_of(tail, strlen(tail) - 7, buf, sizeof buf) == 10 && strcmp(buf, "bob@x.test") == 0);
    static const char *const bad[] = {"noat", "@x.test", "x@", ""};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        CHECK(mailbox_of(bad[i], strlen(bad[i]), buf, sizeof buf) == -EINVAL, "%s", bad[i]);
    OK(mailbox_of("alice@example.test", 18, buf, 10) == -EINVAL);     /* does not fit */
}

int main(void)
{
    test_mailbox_of();
    test_paths();
    test_deliver();
    return check_summary();
}
