/* The C unit tests' one assertion and their closing line. */
#ifndef TESTS_C_CHECK_H
#define TESTS_C_CHECK_H

#include <stddef.h>
#include <stdio.h>

static int passed, failed;

#define CHECK(cond, ...)                                                    \
    do {                                                                    \
        if (cond) {                                                         \
            passed++;                                                       \
        } else {                                                            \
            failed++;                                                       \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                   \
            fputc('\n', stderr);                                            \
        }                                                                   \
    } while (0)

/* Printable rendering of bytes for failure messages (four rotating
 * buffers, so one message can show several values). */
static inline const char *check_show(const char *p, size_t n)
{
    static char buf[4][512];
    static int which;
    char *b = buf[which++ & 3];
    size_t o = 0;
    for (size_t i = 0; i < n && o + 8 < sizeof buf[0]; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c == '\r') o += (size_t)sprintf(b + o, "\\r");
        else if (c == '\n') o += (size_t)sprintf(b + o, "\\n");
        else if (c < 0x20 || c >= 0x7f) o += (size_t)sprintf(b + o, "\\x%02x", c);
        else b[o++] = (char)c;
    }
    if (o + 8 >= sizeof buf[0]) o += (size_t)sprintf(b + o, "...");
    b[o] = 0;
    return b;
}

/* A scratch directory "/tmp/<name>.XXXXXX" into buf (cap bytes), and its
 * removal with everything under it. */
#include <ftw.h>
#include <stdlib.h>

static inline int check_tmpdir(char *buf, size_t cap, const char *name)
{
    snprintf(buf, cap, "/tmp/%s.XXXXXX", name);
    if (mkdtemp(buf)) return 0;
    perror("mkdtemp");
    return -1;
}

static inline int check_rm_one(const char *path, const struct stat *st, int flag, struct FTW *ftw)
{
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

static inline void check_rmtree(const char *dir)
{
    nftw(dir, check_rm_one, 16, FTW_DEPTH | FTW_PHYS);
}

/* Write body into dir/rel (a test fixture); exit 2 when it cannot. */
static inline void check_put(const char *dir, const char *rel, const char *body)
{
    char path[512];
    snprintf(path, sizeof path, "%s/%s", dir, rel);
    FILE *f = fopen(path, "w");
    if (!f) {
        fprintf(stderr, "cannot write %s\n", path);
        exit(2);
    }
    fputs(body, f);
    fclose(f);
}

/* "N passed, M failed" as the last line; the exit status says the same. */
static inline int check_summary(void)
{
    printf("%d passed, %d failed\n", passed, failed);
    return failed ? 1 : 0;
}

#endif
