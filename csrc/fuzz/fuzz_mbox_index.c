/* sources: csrc/store/index.c csrc/core/fsutil.c */
/* libs: */
/* The index file parser on arbitrary bytes (the file sits in a user's
 * Maildir, where anyone with shell access can write it). Whatever it
 * accepts must satisfy every promise of index.h: UIDs ascending below
 * uidnext, modseqs in range, names that stay inside new/ or cur/, flags
 * that are what the name says; the formatter must give back the very same
 * bytes (the format is canonical), every UID must be found by
 * mbox_index_find(), and the text cut after any of its lines must parse as
 * the entries before the cut. */
#include "store/index.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define REQUIRE(c) do { if (!(c)) abort(); } while (0)

static int is_letter(unsigned char c) { return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z'); }

/* The flags a name carries, written from index.h's words, not the code's. */
static void model_flags(const char *name, char *out)
{
    const char *info = strstr(name, ":2,");
    int seen[256] = {0};
    if (info)
        for (const char *p = info + 3; *p; p++)
            if (is_letter((unsigned char)*p)) seen[(unsigned char)*p] = 1;
    size_t o = 0;
    for (int c = 0; c < 256 && o < MBOX_INDEX_FLAGS_MAX; c++)
        if (seen[c]) out[o++] = (char)c;
    out[o] = 0;
}

static void check_index(const struct mbox_index *ix)
{
    REQUIRE(ix->uidvalidity >= 1 && ix->uidnext >= 1 && ix->highestmodseq >= 1);
    REQUIRE((ix->n == 0) == (ix->e == NULL));
    for (size_t i = 0; i < ix->n; i++) {
        const struct mbox_entry *e = &ix->e[i];
        REQUIRE(e->uid >= 1 && e->uid < ix->uidnext);
        REQUIRE(i == 0 || e->uid > ix->e[i - 1].uid);
        REQUIRE(e->modseq >= 1 && e->modseq <= ix->highestmodseq);
        REQUIRE(strncmp(e->name, "new/", 4) == 0 || strncmp(e->name, "cur/", 4) == 0);
        size_t l = strlen(e->name + 4);
        REQUIRE(l >= 1 && l <= MBOX_INDEX_NAME_MAX && e->name[4] != '.');
        for (size_t k = 4; e->name[k]; k++) {
            unsigned char c = (unsigned char)e->name[k];
            REQUIRE(c != '/' && c >= 0x20 && c != 0x7f);
        }
        size_t fl = strnlen(e->flags, sizeof e->flags);
        REQUIRE(fl < sizeof e->flags);
        for (size_t k = 0; k < fl; k++)
            REQUIRE(is_letter((unsigned char)e->flags[k]) && (k == 0 || e->flags[k] > e->flags[k - 1]));
        char want[MBOX_INDEX_FLAGS_MAX + 1];
        model_flags(e->name + 4, want);
        REQUIRE(strcmp(want, e->flags) == 0);
        REQUIRE(mbox_index_find(ix, e->uid) == e);
        /* Between two UIDs there is nothing to find. */
        if (i > 0 && e->uid - ix->e[i - 1].uid > 1) REQUIRE(mbox_index_find(ix, e->uid - 1) == NULL);
    }
    REQUIRE(mbox_index_find(ix, 0) == NULL);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* An exact-size copy, so ASan sees any read past the end. */
    char *text = malloc(size ? size : 1);
    if (!text) return 0;
    memcpy(text, data, size);

    struct mbox_index ix = {0};
    int64_t nm, cm;
    int rc = mbox_index_parse(text, size, &ix, &nm, &cm);
    REQUIRE(rc == 0 || rc == -EINVAL || rc == -ENOMEM);
    if (rc != 0) {
        REQUIRE(ix.e == NULL && ix.n == 0);
        free(text);
        return 0;
    }
    REQUIRE(memchr(text, 0, size) == NULL);
    check_index(&ix);

    size_t len;
    char *out = mbox_index_format(&ix, nm, cm, &len);
    REQUIRE(out && len == size && memcmp(out, text, size) == 0);
    free(out);

    /* Cut after the line in the middle: the entries before it. */
    size_t lines = 0, want = ix.n / 2, cut = 0;
    for (size_t k = 0; k < size; k++) {
        if (text[k] != '\n') continue;
        if (lines++ == want) {
            cut = k + 1;
            break;
        }
    }
    struct mbox_index part = {0};
    int64_t nm2, cm2;
    REQUIRE(cut > 0 && mbox_index_parse(text, cut, &part, &nm2, &cm2) == 0);
    REQUIRE(part.n == want && nm2 == nm && cm2 == cm && part.uidnext == ix.uidnext);
    for (size_t k = 0; k < want; k++)
        REQUIRE(part.e[k].uid == ix.e[k].uid && strcmp(part.e[k].name, ix.e[k].name) == 0 &&
                part.e[k].size == ix.e[k].size && part.e[k].internal_date == ix.e[k].internal_date);
    mbox_index_free(&part);
    mbox_index_free(&ix);
    REQUIRE(ix.e == NULL && ix.n == 0);
    free(text);
    return 0;
}
