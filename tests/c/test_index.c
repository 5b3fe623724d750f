/* sources: csrc/store/index.c csrc/core/fsutil.c */
/* libs: -lpthread */
/* The per-folder Maildir index: UIDs for new files in name order, renames,
 * removals and additions by other tools, set_flags and expunge on the
 * files, the mtime shortcut, rebuild of a corrupt index with a larger
 * UIDVALIDITY, several threads syncing at once, and the file parser on a
 * table of good and bad inputs. */
#include "store/index.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "check.h"

#define OK(c) CHECK(c, "%s", "")

static char top[64];
static int folder_seq;

static void new_folder(char *dir, size_t cap)
{
    snprintf(dir, cap, "%s/f%d", top, ++folder_seq);
}

static int exists(const char *dir, const char *rel)
{
    char path[512];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", dir, rel);
    return stat(path, &st) == 0;
}

static int is_dir(const char *dir, const char *rel)
{
    char path[512];
    struct stat st;
    snprintf(path, sizeof path, "%s/%s", dir, rel);
    return stat(path, &st) == 0 && S_ISDIR(st.st_mode);
}

static int mv(const char *dir, const char *from, const char *to)
{
    char a[512], b[512];
    snprintf(a, sizeof a, "%s/%s", dir, from);
    snprintf(b, sizeof b, "%s/%s", dir, to);
    return rename(a, b);
}

static int rm(const char *dir, const char *rel)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, rel);
    return unlink(path);
}

/* Put new/ and cur/ well in the past, as after a quiet while. */
static void age_dirs(const char *dir, time_t when)
{
    static const char *const subs[] = {"new", "cur"};
    for (int i = 0; i < 2; i++) {
        char path[512];
        struct timespec ts[2] = {{when, 0}, {when, 0}};
        snprintf(path, sizeof path, "%s/%s", dir, subs[i]);
        utimensat(AT_FDCWD, path, ts, 0);
    }
}

static void index_stat(const char *dir, struct stat *st)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, MBOX_INDEX_FILE);
    if (stat(path, st) < 0) memset(st, 0, sizeof *st);
}

static void test_empty(void)
{
    char dir[256];
    struct mbox_index ix = {0};
    new_folder(dir, sizeof dir);
    time_t t0 = time(NULL);
    OK(mbox_index_sync(dir, &ix) == 0);
    time_t t1 = time(NULL);
    OK(ix.n == 0 && ix.e == NULL);
    OK(ix.uidnext == 1);
    CHECK(ix.uidvalidity >= (uint32_t)t0 && ix.uidvalidity <= (uint32_t)t1, "uidvalidity %u", ix.uidvalidity);
    OK(ix.highestmodseq >= 1);
    OK(is_dir(dir, "tmp") && is_dir(dir, "new") && is_dir(dir, "cur"));
    OK(exists(dir, MBOX_INDEX_FILE));
    OK(mbox_index_find(&ix, 1) == NULL);
    mbox_index_free(&ix);
    OK(ix.e == NULL && ix.n == 0);
}

/* Files other tools deliver, then everything another MUA does to them. */
static void test_lifecycle(void)
{
    char dir[256];
    struct mbox_index ix = {0};
    new_folder(dir, sizeof dir);
    OK(mbox_index_sync(dir, &ix) == 0);
    uint32_t uv = ix.uidvalidity;

    /* Written out of name order; the name (delivery time first) decides. */
    check_put(dir, "new/1700000003.M3P1Q3.host,S=12", "hello world\n");
    check_put(dir, "new/1700000001.M1P1Q1.host,S=12", "hello world\n");
    check_put(dir, "new/1700000002.M2P1Q2.host,S=12", "hello world\n");
    check_put(dir, "new/1700000001.M0P1Q9.host,S=12", "hello world\n");
    check_put(dir, "new/.hidden", "not a message\n");
    char sub[512];
    snprintf(sub, sizeof sub, "%s/new/subdir", dir);
    mkdir(sub, 0700);
    snprintf(sub, sizeof sub, "%s/.Junk", dir);   /* a Maildir++ folder: not ours */
    mkdir(sub, 0700);
    snprintf(sub, sizeof sub, "%s/.Junk/new", dir);
    mkdir(sub, 0700);
    check_put(dir, ".Junk/new/1700000000.M9P9Q9.host,S=3", "ab\n");

    OK(mbox_index_sync(dir, &ix) == 0);
    CHECK(ix.n == 4, "n=%zu", ix.n);
    static const char *const order[] = {
        "new/1700000001.M0P1Q9.host,S=12", "new/1700000001.M1P1Q1.host,S=12",
        "new/1700000002.M2P1Q2.host,S=12", "new/1700000003.M3P1Q3.host,S=12",
    };
    for (size_t i = 0; i < 4 && i < ix.n; i++) {
        CHECK(ix.e[i].uid == i + 1, "uid %u", ix.e[i].uid);
        CHECK(strcmp(ix.e[i].name, order[i]) == 0, "%zu: %s", i, ix.e[i].name);
        OK(ix.e[i].size == 12);
        OK(ix.e[i].flags[0] == 0);
        OK(ix.e[i].modseq >= 1 && ix.e[i].modseq <= ix.highestmodseq);
    }
    if (ix.n == 4) {
        OK(ix.e[0].internal_date == 1700000001 && ix.e[3].internal_date == 1700000003);
    }
    OK(ix.uidnext == 5);
    OK(ix.uidvalidity == uv);
    OK(mbox_index_find(&ix, 3) && strcmp(mbox_index_find(&ix, 3)->name, order[2]) == 0);
    OK(mbox_index_find(&ix, 5) == NULL && mbox_index_find(&ix, 0) == NULL);

    /* Nothing changed: the index file stays as it is. */
    struct stat before, after;
    index_stat(dir, &before);
    struct mbox_index again = {0};
    OK(mbox_index_sync(dir, &again) == 0);
    index_stat(dir, &after);
    OK(before.st_ino != 0 && before.st_ino == after.st_ino);
    OK(before.st_mtim.tv_sec == after.st_mtim.tv_sec && before.st_mtim.tv_nsec == after.st_mtim.tv_nsec);
    OK(again.uidvalidity == uv && again.n == ix.n && again.uidnext == ix.uidnext);
    OK(again.highestmodseq == ix.highestmodseq);
    for (size_t i = 0; i < again.n && i < ix.n; i++)
        OK(again.e[i].uid == ix.e[i].uid && strcmp(again.e[i].name, ix.e[i].name) == 0);
    mbox_index_free(&again);

    /* A MUA reads message 2: new/x -> cur/x:2,S. Same UID, new modseq. */
    uint64_t ms2 = ix.e[1].modseq, hms = ix.highestmodseq;
    OK(mv(dir, "new/1700000001.M1P1Q1.host,S=12", "cur/1700000001.M1P1Q1.host,S=12:2,S") == 0);
    OK(mbox_index_sync(dir, &ix) == 0);
    const struct mbox_entry *e = mbox_index_find(&ix, 2);
    OK(e && strcmp(e->name, "cur/1700000001.M1P1Q1.host,S=12:2,S") == 0);
    OK(e && strcmp(e->flags, "S") == 0);
    OK(e && e->modseq > ms2 && e->modseq == ix.highestmodseq);
    OK(ix.highestmodseq > hms);
    OK(ix.n == 4 && ix.uidnext == 5);

    /* Moved to cur/ without a flag change: same UID, same modseq. */
    uint64_t ms1 = ix.e[0].modseq;
    hms = ix.highestmodseq;
    OK(mv(dir, "new/1700000001.M0P1Q9.host,S=12", "cur/1700000001.M0P1Q9.host,S=12:2,") == 0);
    OK(mbox_index_sync(dir, &ix) == 0);
    e = mbox_index_find(&ix, 1);
    OK(e && strcmp(e->name, "cur/1700000001.M0P1Q9.host,S=12:2,") == 0 && e->flags[0] == 0);
    OK(e && e->modseq == ms1);
    OK(ix.highestmodseq == hms);

    /* Flags written unsorted by another tool are read sorted. */
    OK(mv(dir, "cur/1700000001.M1P1Q1.host,S=12:2,S", "cur/1700000001.M1P1Q1.host,S=12:2,SRF") == 0);
    OK(mbox_index_sync(dir, &ix) == 0);
    e = mbox_index_find(&ix, 2);
    OK(e && strcmp(e->flags, "FRS") == 0 && strcmp(e->name, "cur/1700000001.M1P1Q1.host,S=12:2,SRF") == 0);

    /* Removed by another tool: gone, and UIDs do not go back. */
    hms = ix.highestmodseq;
    OK(rm(dir, "new/1700000003.M3P1Q3.host,S=12") == 0);
    OK(mbox_index_sync(dir, &ix) == 0);
    OK(ix.n == 3 && mbox_index_find(&ix, 4) == NULL);
    OK(ix.uidnext == 5);
    OK(ix.highestmodseq > hms);

    /* A later delivery gets the next UID; a name without ",S=" or a
     * leading time takes size and date from the file, the size as served
     * (each bare LF counted as CRLF). */
    check_put(dir, "new/odd-name", "12345\n");
    time_t now = time(NULL);
    OK(mbox_index_sync(dir, &ix) == 0);
    e = mbox_index_find(&ix, 5);
    OK(e && strcmp(e->name, "new/odd-name") == 0);
    OK(e && e->size == 7);
    OK(e && e->internal_date >= now - 5 && e->internal_date <= now + 5);
    OK(ix.uidnext == 6 && ix.n == 4);


    /* Delivery time decides before the name does: 999999999 (9 digits)
     * came before 1000000000, although it sorts after it as text. */
    check_put(dir, "new/1000000000.M1P1Q1.host,S=1", "\n");
    check_put(dir, "new/999999999.M1P1Q1.host,S=1", "\n");
    OK(mbox_index_sync(dir, &ix) == 0);
    e = mbox_index_find(&ix, 6);
    OK(e && strcmp(e->name, "new/999999999.M1P1Q1.host,S=1") == 0 && e->internal_date == 999999999);
    e = mbox_index_find(&ix, 7);
    OK(e && strcmp(e->name, "new/1000000000.M1P1Q1.host,S=1") == 0);

    /* One base in new/ and cur/ at once (a tool that links, then
     * unlinks): one message, seen at its destination. */
    check_put(dir, "new/1700000010.dup,S=1", "\n");
    check_put(dir, "cur/1700000010.dup,S=1:2,S", "\n");
    OK(mbox_index_sync(dir, &ix) == 0);
    OK(ix.n == 7 && ix.uidnext == 9);
    e = mbox_index_find(&ix, 8);
    OK(e && strcmp(e->name, "cur/1700000010.dup,S=1:2,S") == 0);
    OK(rm(dir, "cur/1700000010.dup,S=1:2,S") == 0);
    OK(mbox_index_sync(dir, &ix) == 0);
    e = mbox_index_find(&ix, 8);
    OK(e && strcmp(e->name, "new/1700000010.dup,S=1") == 0 && ix.n == 7);

    /* Both sides of a rebuild keep the UIDVALIDITY. */
    OK(ix.uidvalidity == uv);
    mbox_index_free(&ix);
}

/* With new/ and cur/ quiet for a while, a sync trusts their mtimes and
 * reads neither; a change of mtime makes it look again. */
/* Within one second, unpadded numbers in the names (microseconds, the
 * delivery counter) order as numbers, not as text. */
static void test_same_second_order(void)
{
    char dir[256];
    struct mbox_index ix = {0};
    new_folder(dir, sizeof dir);
    static const char *const order[] = {
        "new/1700000001.M99999P7Q1.host,S=3", "new/1700000001.M123456P7Q2.host,S=3",
        "new/1700000001.M123456P7Q10.host,S=3", "new/1700000001.M0123457P7Q3.host,S=3",
        "new/1700000001.M123457P7Q3.host,S=3",
    };
    OK(mbox_index_sync(dir, &ix) == 0);                 /* creates new/ and cur/ */
    for (size_t i = 5; i-- > 0;) check_put(dir, order[i], "ab\n");
    OK(mbox_index_sync(dir, &ix) == 0);
    CHECK(ix.n == 5, "n=%zu", ix.n);
    for (size_t i = 0; i < 5 && i < ix.n; i++)
        CHECK(strcmp(ix.e[i].name, order[i]) == 0 && ix.e[i].uid == i + 1, "%zu: %s uid %u", i,
              ix.e[i].name, ix.e[i].uid);
    mbox_index_free(&ix);
}

static void test_mtime_shortcut(void)
{
    char dir[256];
    struct mbox_index ix = {0};
    new_folder(dir, sizeof dir);
    OK(mbox_index_sync(dir, &ix) == 0);
    check_put(dir, "new/1700000000.A.host,S=2", "a\n");
    time_t old = time(NULL) - 100;
    age_dirs(dir, old);
    OK(mbox_index_sync(dir, &ix) == 0);
    OK(ix.n == 1);

    /* A file slipped in while the mtime still reads as before. */
    check_put(dir, "new/1700000001.B.host,S=2", "b\n");
    age_dirs(dir, old);
    struct stat before, after;
    index_stat(dir, &before);
    OK(mbox_index_sync(dir, &ix) == 0);
    index_stat(dir, &after);
    CHECK(ix.n == 1, "n=%zu: new/ was read although its mtime had not changed", ix.n);
    OK(before.st_ino == after.st_ino);

    /* Its mtime moves: found. */
    age_dirs(dir, old + 1);
    OK(mbox_index_sync(dir, &ix) == 0);
    OK(ix.n == 2 && mbox_index_find(&ix, 2) && strcmp(mbox_index_find(&ix, 2)->name, "new/1700000001.B.host,S=2") == 0);

    /* A recent mtime is never trusted: several changes share one tick. */
    check_put(dir, "new/1700000002.C.host,S=2", "c\n");
    OK(mbox_index_sync(dir, &ix) == 0);
    OK(ix.n == 3);
    /* Another file lands within the same tick as the one the last sync
     * saw (played here by putting new/'s mtime back). */
    struct stat st;
    char path[512];
    snprintf(path, sizeof path, "%s/new", dir);
    stat(path, &st);
    check_put(dir, "new/1700000003.D.host,S=2", "d\n");
    struct timespec ts[2] = {st.st_atim, st.st_mtim};
    utimensat(AT_FDCWD, path, ts, 0);
    OK(mbox_index_sync(dir, &ix) == 0);
    CHECK(ix.n == 4, "n=%zu: a recent mtime was trusted", ix.n);
    mbox_index_free(&ix);
}

static void test_set_flags(void)
{
    char dir[256];
    struct mbox_index ix = {0};
    new_folder(dir, sizeof dir);
    OK(mbox_index_sync(dir, &ix) == 0);
    check_put(dir, "new/1700000000.M1P1Q1.host,S=2", "a\n");
    check_put(dir, "new/1700000001.M1P1Q2.host,S=2", "b\n");
    OK(mbox_index_sync(dir, &ix) == 0);
    OK(ix.n == 2);

    uint64_t hms = ix.highestmodseq;
    OK(mbox_index_set_flags(dir, &ix, 1, "SFRS") == 0);
    struct mbox_entry *e = mbox_index_find(&ix, 1);
    OK(e && strcmp(e->flags, "FRS") == 0);
    OK(e && strcmp(e->name, "cur/1700000000.M1P1Q1.host,S=2:2,FRS") == 0);
    OK(exists(dir, "cur/1700000000.M1P1Q1.host,S=2:2,FRS"));
    OK(!exists(dir, "new/1700000000.M1P1Q1.host,S=2"));
    OK(e && e->modseq == hms + 1 && ix.highestmodseq == hms + 1);

    /* What was saved is what a fresh reader sees. */
    struct mbox_index other = {0};
    OK(mbox_index_sync(dir, &other) == 0);
    e = mbox_index_find(&other, 1);
    OK(e && strcmp(e->flags, "FRS") == 0 && e->modseq == hms + 1);
    OK(other.uidnext == 3 && other.n == 2);
    mbox_index_free(&other);

    /* The same flags again: nothing moves. */
    OK(mbox_index_set_flags(dir, &ix, 1, "RSF") == 0);
    OK(ix.highestmodseq == hms + 1);
    /* Clearing the flags. */
    OK(mbox_index_set_flags(dir, &ix, 1, "") == 0);
    e = mbox_index_find(&ix, 1);
    OK(e && e->flags[0] == 0 && strcmp(e->name, "cur/1700000000.M1P1Q1.host,S=2:2,") == 0);
    OK(exists(dir, "cur/1700000000.M1P1Q1.host,S=2:2,"));
    OK(ix.highestmodseq == hms + 2);

    OK(mbox_index_set_flags(dir, &ix, 9, "S") == -ENOENT);
    OK(mbox_index_set_flags(dir, &ix, 2, "S1") == -EINVAL);
    OK(mbox_index_set_flags(dir, &ix, 2, "S\\") == -EINVAL);
    OK(exists(dir, "new/1700000001.M1P1Q2.host,S=2"));

    /* Another tool renamed the file, and the index does not know yet (the
     * directory's mtime reads as before): set_flags finds it anyway. */
    time_t old = time(NULL) - 100;
    age_dirs(dir, old);
    OK(mbox_index_sync(dir, &ix) == 0);
    OK(mv(dir, "new/1700000001.M1P1Q2.host,S=2", "new/1700000001.M1P1Q2.host,S=2:2,T") == 0);
    age_dirs(dir, old);
    OK(mbox_index_set_flags(dir, &ix, 2, "D") == 0);
    OK(exists(dir, "cur/1700000001.M1P1Q2.host,S=2:2,D"));
    OK(!exists(dir, "new/1700000001.M1P1Q2.host,S=2:2,T"));
    e = mbox_index_find(&ix, 2);
    OK(e && strcmp(e->flags, "D") == 0);
    OK(ix.n == 2 && ix.uidnext == 3);
    mbox_index_free(&ix);
}

static void test_expunge(void)
{
    char dir[256];
    struct mbox_index ix = {0};
    new_folder(dir, sizeof dir);
    OK(mbox_index_sync(dir, &ix) == 0);
    check_put(dir, "new/1700000000.a.host,S=2", "a\n");
    check_put(dir, "new/1700000001.b.host,S=2", "b\n");
    check_put(dir, "new/1700000002.c.host,S=2", "c\n");
    check_put(dir, "new/1700000003.d.host,S=2", "d\n");
    OK(mbox_index_sync(dir, &ix) == 0);
    OK(mbox_index_set_flags(dir, &ix, 3, "S") == 0);

    uint64_t hms = ix.highestmodseq;
    const uint32_t gone[] = {3, 1, 42};
    OK(mbox_index_expunge(dir, &ix, gone, 3) == 0);
    OK(ix.n == 2 && mbox_index_find(&ix, 1) == NULL && mbox_index_find(&ix, 3) == NULL);
    OK(mbox_index_find(&ix, 2) && mbox_index_find(&ix, 4));
    OK(!exists(dir, "new/1700000000.a.host,S=2") && !exists(dir, "cur/1700000002.c.host,S=2:2,S"));
    OK(exists(dir, "new/1700000001.b.host,S=2") && exists(dir, "new/1700000003.d.host,S=2"));
    CHECK(ix.highestmodseq == hms + 1, "highestmodseq %llu, was %llu", (unsigned long long)ix.highestmodseq,
          (unsigned long long)hms);
    OK(ix.uidnext == 5);

    /* A file already gone is fine. */
    OK(rm(dir, "new/1700000001.b.host,S=2") == 0);
    const uint32_t two = 2;
    OK(mbox_index_expunge(dir, &ix, &two, 1) == 0);
    OK(ix.n == 1 && mbox_index_find(&ix, 2) == NULL);

    /* Renamed behind the index's back: still removed, not resurrected. */
    time_t old = time(NULL) - 100;
    age_dirs(dir, old);
    OK(mbox_index_sync(dir, &ix) == 0);
    OK(mv(dir, "new/1700000003.d.host,S=2", "cur/1700000003.d.host,S=2:2,S") == 0);
    age_dirs(dir, old);
    const uint32_t four = 4;
    OK(mbox_index_expunge(dir, &ix, &four, 1) == 0);
    OK(!exists(dir, "cur/1700000003.d.host,S=2:2,S"));
    OK(ix.n == 0);
    OK(mbox_index_sync(dir, &ix) == 0);
    OK(ix.n == 0 && ix.uidnext == 5);

    OK(mbox_index_expunge(dir, &ix, NULL, 0) == 0);
    mbox_index_free(&ix);
}

static void test_corrupt(void)
{
    char dir[256];
    struct mbox_index ix = {0};
    new_folder(dir, sizeof dir);
    OK(mbox_index_sync(dir, &ix) == 0);
    check_put(dir, "new/1700000000.a.host,S=2", "a\n");
    check_put(dir, "cur/1700000001.b.host,S=2:2,S", "b\n");
    OK(mbox_index_sync(dir, &ix) == 0);
    OK(ix.n == 2);

    /* The first line still tells the old UIDVALIDITY: the new one is larger. */
    uint32_t far = (uint32_t)time(NULL) + 100000;
    char text[256];
    snprintf(text, sizeof text, "mailengine-index 1 %u 9 9 0 0\n1 1 2 3 n - x\nbroken\n", far);
    check_put(dir, MBOX_INDEX_FILE, text);
    OK(mbox_index_sync(dir, &ix) == 0);
    CHECK(ix.uidvalidity > far, "uidvalidity %u, old %u", ix.uidvalidity, far);
    OK(ix.n == 2 && ix.uidnext == 3);
    OK(ix.n == 2 && ix.e[0].uid == 1 && strcmp(ix.e[0].name, "new/1700000000.a.host,S=2") == 0);
    OK(ix.n == 2 && ix.e[1].uid == 2 && strcmp(ix.e[1].flags, "S") == 0);
    uint32_t rebuilt = ix.uidvalidity;
    struct mbox_index again = {0};
    OK(mbox_index_sync(dir, &again) == 0);
    OK(again.uidvalidity == rebuilt && again.n == 2);
    mbox_index_free(&again);

    /* Nothing readable at all: the clock. */
    check_put(dir, MBOX_INDEX_FILE, "\x01\x02 garbage");
    time_t t0 = time(NULL);
    OK(mbox_index_sync(dir, &ix) == 0);
    OK(ix.uidvalidity >= (uint32_t)t0 && ix.uidvalidity <= (uint32_t)time(NULL) + 1);
    OK(ix.n == 2);
    mbox_index_free(&ix);
}

/* ---- several threads ------------------------------------------------------ */

#define TH_FILES 240
#define TH_SYNCERS 4

static char th_dir[256];
static volatile int th_done;
static pthread_mutex_t th_mu = PTHREAD_MUTEX_INITIALIZER;
static uint32_t th_uid_of[TH_FILES];   /* file number -> UID seen */
static int th_conflicts, th_errors;
static uint32_t th_uidvalidity;

static void *th_adder(void *arg)
{
    (void)arg;
    unsigned seed = 7;
    for (int k = 0; k < TH_FILES; k++) {
        /* Leading times out of creation order, so name order is not. */
        char rel[128];
        snprintf(rel, sizeof rel, "new/%u.M%dP9Q1.host,S=2", 1700000000u + (unsigned)(rand_r(&seed) % 97), k);
        check_put(th_dir, rel, "x\n");
        if (k % 8 == 0) usleep(1000);
    }
    th_done = 1;
    return NULL;
}

static void th_observe(const struct mbox_index *ix)
{
    pthread_mutex_lock(&th_mu);
    if (th_uidvalidity == 0) th_uidvalidity = ix->uidvalidity;
    if (ix->uidvalidity != th_uidvalidity) th_conflicts++;
    for (size_t i = 0; i < ix->n; i++) {
        int k;
        const char *m = strstr(ix->e[i].name, ".M");
        if (!m || sscanf(m, ".M%dP", &k) != 1 || k < 0 || k >= TH_FILES) {
            th_conflicts++;
            continue;
        }
        if (th_uid_of[k] == 0) th_uid_of[k] = ix->e[i].uid;
        else if (th_uid_of[k] != ix->e[i].uid) th_conflicts++;
        if (i > 0 && ix->e[i].uid <= ix->e[i - 1].uid) th_conflicts++;
    }
    pthread_mutex_unlock(&th_mu);
}

static void *th_syncer(void *arg)
{
    unsigned seed = (unsigned)(uintptr_t)arg;
    struct mbox_index ix = {0};
    while (!th_done) {
        int rc = mbox_index_sync(th_dir, &ix);
        if (rc == 0 && ix.n > 0 && rand_r(&seed) % 4 == 0) {
            uint32_t uid = ix.e[rand_r(&seed) % ix.n].uid;
            rc = mbox_index_set_flags(th_dir, &ix, uid, rand_r(&seed) % 2 ? "S" : "FS");
            if (rc == -ENOENT) rc = 0;
        }
        if (rc < 0) {
            pthread_mutex_lock(&th_mu);
            th_errors++;
            pthread_mutex_unlock(&th_mu);
            break;
        }
        th_observe(&ix);
    }
    mbox_index_free(&ix);
    return NULL;
}

static void test_threads(void)
{
    struct mbox_index ix = {0};
    new_folder(th_dir, sizeof th_dir);
    OK(mbox_index_sync(th_dir, &ix) == 0);
    pthread_t add, sy[TH_SYNCERS];
    pthread_create(&add, NULL, th_adder, NULL);
    for (int i = 0; i < TH_SYNCERS; i++) pthread_create(&sy[i], NULL, th_syncer, (void *)(uintptr_t)(i + 1));
    pthread_join(add, NULL);
    for (int i = 0; i < TH_SYNCERS; i++) pthread_join(sy[i], NULL);
    OK(mbox_index_sync(th_dir, &ix) == 0);
    th_observe(&ix);
    CHECK(th_errors == 0, "%d errors", th_errors);
    CHECK(th_conflicts == 0, "%d observations disagree (UIDVALIDITY, or a file under two UIDs)", th_conflicts);
    CHECK(ix.n == TH_FILES, "n=%zu", ix.n);
    CHECK(ix.uidnext == TH_FILES + 1, "uidnext %u: UIDs were handed out twice", ix.uidnext);
    int seen[TH_FILES + 1] = {0}, dup = 0;
    for (size_t i = 0; i < ix.n; i++) {
        if (ix.e[i].uid >= 1 && ix.e[i].uid <= TH_FILES) dup += seen[ix.e[i].uid]++;
        else dup++;
    }
    OK(dup == 0);
    mbox_index_free(&ix);
}

/* ---- the parser ------------------------------------------------------------ */

#define HDR "mailengine-index 1 7 10 20 -1 123\n"

static const struct {
    const char *text;
    int ok;
} parse_cases[] = {
    {HDR, 1},
    {"mailengine-index 1 7 1 1 0 0\n", 1},
    {HDR "1 1 0 0 n - a\n", 1},
    {HDR "1 3 100 1700000000 c FS 1700000000.x,S=100:2,FS\n9 20 1 -5 c - b:2,\n", 1},
    {HDR "1 3 1 1 c - with space\n", 1},
    {HDR "1 3 1 1 c S x:2,S,1\n", 1},               /* non-letters after ":2," are not flags */
    {HDR "1 3 1 1 n Sa y:2,aS\n", 1},
    {"", 0},
    {"\n", 0},
    {"mailengine-index 1 7 10 20 -1 123", 0},        /* no newline */
    {"mailengine-index 2 7 10 20 -1 123\n", 0},
    {"mailengine-indey 1 7 10 20 -1 123\n", 0},
    {"mailengine-index 1 0 10 20 -1 123\n", 0},      /* UIDVALIDITY 0 */
    {"mailengine-index 1 7 0 20 -1 123\n", 0},       /* uidnext 0 */
    {"mailengine-index 1 7 10 0 -1 123\n", 0},       /* highestmodseq 0 */
    {"mailengine-index 1 07 10 20 -1 123\n", 0},     /* leading zero */
    {"mailengine-index 1 +7 10 20 -1 123\n", 0},
    {"mailengine-index 1 7 10 20 -0 123\n", 0},
    {"mailengine-index 1 4294967296 10 20 -1 123\n", 0},
    {"mailengine-index 1 7 10 20 -1\n", 0},          /* a field short */
    {"mailengine-index 1 7 10 20 -1 123 5\n", 0},    /* one too many */
    {"mailengine-index 1 7 10 20 -1  123\n", 0},     /* two spaces */
    {"mailengine-index 1 7 10 20 -1 99999999999999999999\n", 0},
    {HDR "0 1 1 1 n - a\n", 0},                      /* UID 0 */
    {HDR "10 1 1 1 n - a\n", 0},                     /* not below uidnext */
    {HDR "2 1 1 1 n - a\n2 1 1 1 n - b\n", 0},       /* not ascending */
    {HDR "3 1 1 1 n - a\n2 1 1 1 n - b\n", 0},
    {HDR "1 0 1 1 n - a\n", 0},                      /* modseq 0 */
    {HDR "1 21 1 1 n - a\n", 0},                     /* above highestmodseq */
    {HDR "1 1 -1 1 n - a\n", 0},                     /* negative size */
    {HDR "1 1 1 1 x - a\n", 0},                      /* neither n nor c */
    {HDR "1 1 1 1 cc - a\n", 0},
    {HDR "1 1 1 1 c SF a:2,FS\n", 0},                /* flags not sorted */
    {HDR "1 1 1 1 c SS a:2,S\n", 0},                 /* repeated */
    {HDR "1 1 1 1 c S a:2,F\n", 0},                  /* not what the name says */
    {HDR "1 1 1 1 c - a:2,F\n", 0},
    {HDR "1 1 1 1 c S a\n", 0},
    {HDR "1 1 1 1 c S1 a:2,S1\n", 0},                /* not a letter */
    {HDR "1 1 1 1 n - a/b\n", 0},                    /* a path */
    {HDR "1 1 1 1 n - a\x01" "b\n", 0},              /* a control byte */
    {HDR "1 1 1 1 n - a\x7f\n", 0},
    {HDR "1 1 1 1 n - a\r\n", 0},
    {HDR "1 1 1 1 n - .hidden\n", 0},
    {HDR "1 1 1 1 n - \n", 0},                       /* no name */
    {HDR "1 1 1 1 n -\n", 0},
    {HDR "1 1 1 1 n\n", 0},
    {HDR "1 1 1 1 n - a\n\n", 0},                    /* an empty line */
    {HDR "1 1 1 1 n - a", 0},                        /* torn */
    {HDR "1 1 99999999999999999999 1 n - a\n", 0},
    {HDR "1 1 1 9223372036854775808 n - a\n", 0},
    {HDR "4294967296 1 1 1 n - a\n", 0},
};

static void test_parse_table(void)
{
    for (size_t i = 0; i < sizeof parse_cases / sizeof parse_cases[0]; i++) {
        const char *t = parse_cases[i].text;
        size_t len = strlen(t);
        struct mbox_index ix = {0};
        int64_t nm = 0, cm = 0;
        int rc = mbox_index_parse(t, len, &ix, &nm, &cm);
        CHECK(parse_cases[i].ok ? rc == 0 : rc == -EINVAL, "case %zu rc %d: %s", i, rc, check_show(t, len));
        if (rc == 0) {
            /* What the formatter writes back is the same text. */
            size_t olen;
            char *out = mbox_index_format(&ix, nm, cm, &olen);
            CHECK(out && olen == len && memcmp(out, t, len) == 0, "case %zu round trip: %s", i,
                  out ? check_show(out, olen) : "NULL");
            free(out);
        }
        mbox_index_free(&ix);
    }

    /* A NUL inside the text (strlen would hide it). */
    static const char nul[] = HDR "1 1 1 1 n - a\0b\n";
    struct mbox_index ix = {0};
    int64_t nm, cm;
    OK(mbox_index_parse(nul, sizeof nul - 1, &ix, &nm, &cm) == -EINVAL);

    /* Values of a good one. */
    static const char good[] = HDR "1 3 100 1700000000 c FS 1700000000.x,S=100:2,FS\n9 20 1 -5 n - b\n";
    OK(mbox_index_parse(good, sizeof good - 1, &ix, &nm, &cm) == 0);
    OK(ix.uidvalidity == 7 && ix.uidnext == 10 && ix.highestmodseq == 20 && nm == -1 && cm == 123);
    OK(ix.n == 2);
    if (ix.n == 2) {
        OK(ix.e[0].uid == 1 && ix.e[0].modseq == 3 && ix.e[0].size == 100 && ix.e[0].internal_date == 1700000000);
        OK(strcmp(ix.e[0].name, "cur/1700000000.x,S=100:2,FS") == 0 && strcmp(ix.e[0].flags, "FS") == 0);
        OK(ix.e[1].uid == 9 && ix.e[1].internal_date == -5 && strcmp(ix.e[1].name, "new/b") == 0);
        OK(ix.e[1].flags[0] == 0);
        OK(mbox_index_find(&ix, 9) == &ix.e[1] && mbox_index_find(&ix, 5) == NULL);
    }
    mbox_index_free(&ix);

    /* An over-long line. */
    char big[1200];
    int o = snprintf(big, sizeof big, "%s1 1 1 1 n - ", HDR);
    memset(big + o, 'x', 600);
    big[o + 600] = '\n';
    OK(mbox_index_parse(big, (size_t)o + 601, &ix, &nm, &cm) == -EINVAL);
    /* The longest name that fits a line is fine. */
    o = snprintf(big, sizeof big, "%s1 1 1 1 n - ", HDR);
    memset(big + o, 'y', MBOX_INDEX_NAME_MAX);
    big[o + MBOX_INDEX_NAME_MAX] = '\n';
    OK(mbox_index_parse(big, (size_t)o + MBOX_INDEX_NAME_MAX + 1, &ix, &nm, &cm) == 0);
    mbox_index_free(&ix);
    memset(big + o, 'y', MBOX_INDEX_NAME_MAX + 1);
    big[o + MBOX_INDEX_NAME_MAX + 1] = '\n';
    OK(mbox_index_parse(big, (size_t)o + MBOX_INDEX_NAME_MAX + 2, &ix, &nm, &cm) == -EINVAL);
}

/* ---- size --------------------------------------------------------------- */

/* Many messages: UIDs in name order, and a quiet re-sync reads no directory. */
static void test_many(void)
{
    char dir[256];
    struct mbox_index ix = {0};
    new_folder(dir, sizeof dir);
    OK(mbox_index_sync(dir, &ix) == 0);
    enum { N = 3000 };
    for (int k = N - 1; k >= 0; k--) {
        char rel[128];
        snprintf(rel, sizeof rel, "%s/1700%06d.M1P1Q1.host,S=2:2,S", k % 2 ? "cur" : "new", k);
        check_put(dir, rel, "x\n");
    }
    OK(mbox_index_sync(dir, &ix) == 0);
    OK(ix.n == N && ix.uidnext == N + 1);
    int ordered = 1;
    for (size_t i = 0; i < ix.n; i++) {
        char want[64];
        snprintf(want, sizeof want, "1700%06zu.M1P1Q1.host", i);
        if (ix.e[i].uid != i + 1 || strncmp(ix.e[i].name + 4, want, strlen(want)) != 0) ordered = 0;
    }
    OK(ordered);
    age_dirs(dir, time(NULL) - 100);
    OK(mbox_index_sync(dir, &ix) == 0);
    struct stat before, after;
    index_stat(dir, &before);
    OK(mbox_index_sync(dir, &ix) == 0);
    index_stat(dir, &after);
    OK(before.st_ino == after.st_ino && ix.n == N);
    mbox_index_free(&ix);
}

int main(void)
{
    if (check_tmpdir(top, sizeof top, "test_index") < 0) return 2;
    test_empty();
    test_lifecycle();
    test_same_second_order();
    test_mtime_shortcut();
    test_set_flags();
    test_expunge();
    test_corrupt();
    test_threads();
    test_parse_table();
    test_many();
    check_rmtree(top);
    return check_summary();
}
