/* sources: csrc/smtp/dkim.c */
/* libs: -lcrypto */
/* DKIM on arbitrary message bytes. The body and header canonicalizations
 * must agree with naive models written from RFC 6376 §3.4.2 and §3.4.4,
 * and every signature dkim_sign() writes (with a fixed Ed25519 key) must be
 * well formed and verify against hashes recomputed from the models, with
 * the instances h= names picked bottom-up (§5.4.2).
 *
 * Input: one option byte, then the message. Option bits: 1 no oversigning,
 * 2 t= and x=, 4 a short custom header list. */
#include "smtp/dkim.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/evp.h>
#include <openssl/pem.h>

#define REQUIRE(c) do { if (!(c)) abort(); } while (0)

static struct dkim_key *key;
static EVP_PKEY *pub;

static void init_key(void)
{
    unsigned char seed[32];
    for (int i = 0; i < 32; i++) seed[i] = (unsigned char)(i * 7 + 1);
    EVP_PKEY *k = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, seed, sizeof seed);
    REQUIRE(k != NULL);
    BIO *b = BIO_new(BIO_s_mem());
    REQUIRE(b != NULL && PEM_write_bio_PrivateKey(b, k, NULL, NULL, 0, NULL, NULL) == 1);
    char *pem;
    long n = BIO_get_mem_data(b, &pem);
    char err[200];
    key = dkim_key_from_pem(pem, (size_t)n, err, sizeof err);
    REQUIRE(key != NULL);
    BIO_free(b);
    pub = k;
}

/* ---- a growable byte buffer -------------------------------------------- */

struct buf {
    char *p;
    size_t n, cap;
};

static void put(struct buf *b, const char *p, size_t n)
{
    if (b->n + n > b->cap) {
        b->cap = (b->n + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        REQUIRE(b->p != NULL);
    }
    if (n) memcpy(b->p + b->n, p, n);
    b->n += n;
}

static void emit_buf(void *ctx, const char *p, size_t n)
{
    put(ctx, p, n);
}

static int wsp(char c)
{
    return c == ' ' || c == '\t';
}

static char lower(char c)
{
    return c >= 'A' && c <= 'Z' ? (char)(c + 32) : c;
}

/* ---- models --------------------------------------------------------------- */

/* §3.4.4 literally: cut into CRLF lines (an unterminated last line is a
 * line), shrink WSP runs, drop trailing WSP, then drop empty lines at the
 * end and put a CRLF after each line. */
static void model_body(const char *b, size_t n, struct buf *out)
{
    struct buf lines = {0};     /* canonical lines, each followed by '\n' as a separator */
    size_t nonempty_end = 0;    /* out length through the last non-empty line */
    size_t i = 0;
    out->n = 0;
    while (i < n) {
        size_t s = i;
        while (i < n && !(b[i] == '\r' && i + 1 < n && b[i + 1] == '\n')) i++;
        size_t e = i;
        i = i < n ? i + 2 : n;
        size_t start = lines.n;
        for (size_t k = s; k < e; k++) {
            if (wsp(b[k])) {
                while (k + 1 < e && wsp(b[k + 1])) k++;
                put(&lines, " ", 1);
            } else {
                put(&lines, b + k, 1);
            }
        }
        if (lines.n > start && lines.p[lines.n - 1] == ' ') lines.n--;
        put(&lines, "\r\n", 2);
        if (lines.n - 2 > start) nonempty_end = lines.n;
    }
    put(out, lines.p, nonempty_end);
    free(lines.p);
}

/* A field name as §3.6.8 of RFC 5322 has it, WSP allowed before the colon;
 * 0 if none. */
static size_t model_name(const char *f, size_t n, size_t *value)
{
    size_t i = 0;
    while (i < n && (unsigned char)f[i] >= 33 && (unsigned char)f[i] <= 126 && f[i] != ':') i++;
    size_t len = i;
    while (i < n && wsp(f[i])) i++;
    if (len == 0 || i >= n || f[i] != ':') return 0;
    *value = i + 1;
    return len;
}

/* §3.4.2 literally, on a field without its final CRLF. */
static int model_header(const char *f, size_t n, int crlf, struct buf *out)
{
    size_t v;
    size_t nl = model_name(f, n, &v);
    out->n = 0;
    if (nl == 0) return -1;
    for (size_t i = 0; i < nl; i++) {
        char c = lower(f[i]);
        put(out, &c, 1);
    }
    put(out, ":", 1);
    struct buf val = {0};
    for (size_t i = v; i < n; i++) {       /* unfold */
        if (f[i] == '\r' && i + 1 < n && f[i + 1] == '\n') i++;
        else put(&val, f + i, 1);
    }
    size_t a = 0, z = val.n;
    while (a < z && wsp(val.p[a])) a++;
    while (z > a && wsp(val.p[z - 1])) z--;
    for (size_t i = a; i < z; i++) {
        if (wsp(val.p[i])) {
            while (wsp(val.p[i + 1])) i++;
            put(out, " ", 1);
        } else {
            put(out, val.p + i, 1);
        }
    }
    if (crlf) put(out, "\r\n", 2);
    free(val.p);
    return 0;
}

struct field {
    size_t s, e;        /* e past the final CRLF */
};

/* Fields of the header section and where the body starts. */
static size_t model_fields(const char *m, size_t n, struct field **fs, size_t *nf)
{
    size_t i = 0, cap = 0;
    *fs = NULL;
    *nf = 0;
    while (i < n) {
        size_t s = i;
        while (i < n && !(m[i] == '\r' && i + 1 < n && m[i + 1] == '\n')) i++;
        size_t next = i < n ? i + 2 : n;
        if (i == s && i < n) return next;               /* the empty line */
        if (wsp(m[s])) {                                /* continuation */
            if (*nf > 0 && (*fs)[*nf - 1].e == s) (*fs)[*nf - 1].e = next;
        } else {
            if (*nf == cap) {
                cap = cap * 2 + 16;
                *fs = realloc(*fs, cap * sizeof **fs);
                REQUIRE(*fs != NULL);
            }
            (*fs)[(*nf)++] = (struct field){s, next};
        }
        i = next;
    }
    return n;
}

/* ---- checking a signature ---------------------------------------------------- */

static size_t b64_decode(const char *in, size_t n, unsigned char *out, size_t cap)
{
    char clean[1024];
    size_t m = 0;
    for (size_t i = 0; i < n; i++)
        if (!wsp(in[i]) && in[i] != '\r' && in[i] != '\n') {
            REQUIRE(m < sizeof clean);
            clean[m++] = in[i];
        }
    REQUIRE(m % 4 == 0 && m / 4 * 3 <= cap);
    int r = EVP_DecodeBlock(out, (unsigned char *)clean, (int)m);
    REQUIRE(r >= 0);
    size_t pad = 0;
    while (pad < 2 && m > pad && clean[m - 1 - pad] == '=') pad++;
    return (size_t)r - pad;
}

/* Value of tag t in an unfolded tag list ("v=1; a=..."). */
static const char *tag(const char *list, const char *t, size_t *len)
{
    size_t tl = strlen(t);
    for (const char *p = list; *p;) {
        while (*p == ' ' || *p == '\t') p++;
        const char *semi = strchr(p, ';');
        if (semi == NULL) semi = p + strlen(p);
        if (strncmp(p, t, tl) == 0 && p[tl] == '=') {
            *len = (size_t)(semi - (p + tl + 1));
            return p + tl + 1;
        }
        p = *semi ? semi + 1 : semi;
    }
    return NULL;
}

static int name_eq(const char *a, size_t an, const char *b, size_t bn)
{
    if (an != bn) return 0;
    for (size_t i = 0; i < an; i++)
        if (lower(a[i]) != lower(b[i])) return 0;
    return 1;
}

static void check_signature(const char *sig, size_t sn, const char *m, size_t n,
                            const char *const *names, size_t nnames, const int *oversign)
{
    /* Shape: CRLF only as "CRLF TAB" folds and at the end, short lines. */
    REQUIRE(sn > 16 && memcmp(sig, "DKIM-Signature: ", 16) == 0);
    REQUIRE(sig[sn] == '\0' && sig[sn - 2] == '\r' && sig[sn - 1] == '\n');
    static char flat[DKIM_SIGNATURE_MAX];
    size_t fl = 0, col = 0;
    for (size_t i = 15; i < sn - 2; i++) {
        REQUIRE(sig[i] != '\n' && (unsigned char)sig[i] >= 9 && (unsigned char)sig[i] <= 126);
        if (sig[i] == '\r') {
            REQUIRE(sig[i + 1] == '\n' && sig[i + 2] == '\t');
            REQUIRE(col <= 78);
            col = 0;
            i++;
        } else {
            flat[fl++] = sig[i];
            col++;
        }
    }
    flat[fl] = '\0';

    /* h= is what the models say it should be. */
    size_t hl, bhl, bl;
    const char *h = tag(flat, "h", &hl), *bh = tag(flat, "bh", &bhl), *b = tag(flat, "b", &bl);
    REQUIRE(h && bh && b);
    struct field *fs;
    size_t nf;
    size_t body = model_fields(m, n, &fs, &nf);
    REQUIRE(dkim_body_offset(m, n) == body);
    struct buf want_h = {0};
    for (size_t j = 0; j < nnames; j++) {
        size_t count = 0;
        for (size_t i = 0; i < nf; i++) {
            size_t v, nl = model_name(m + fs[i].s, fs[i].e - fs[i].s, &v);
            if (nl && name_eq(m + fs[i].s, nl, names[j], strlen(names[j]))) count++;
        }
        if (oversign[j]) count++;
        if (count == 0 && name_eq(names[j], strlen(names[j]), "From", 4)) count = 1;
        for (size_t c = 0; c < count; c++) {
            if (want_h.n) put(&want_h, ":", 1);
            put(&want_h, names[j], strlen(names[j]));
        }
    }
    /* h= as written, less the TABs of its folds */
    char *hcopy = malloc(hl + 1);
    REQUIRE(hcopy != NULL);
    size_t hn = 0;
    for (size_t i = 0; i < hl; i++)
        if (!wsp(h[i])) hcopy[hn++] = h[i];
    hcopy[hn] = '\0';
    REQUIRE(want_h.n == hn && memcmp(want_h.p, hcopy, hn) == 0);
    free(want_h.p);

    /* bh= */
    struct buf canon = {0};
    unsigned char dg[32], got[64];
    unsigned dl;
    model_body(m + body, n - body, &canon);
    REQUIRE(EVP_Digest(canon.p ? canon.p : "", canon.n, dg, &dl, EVP_sha256(), NULL) == 1);
    REQUIRE(b64_decode(bh, bhl, got, sizeof got) == 32 && memcmp(got, dg, 32) == 0);

    /* b=: rebuild the header hash from the models. */
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    REQUIRE(md && EVP_DigestInit_ex(md, EVP_sha256(), NULL) == 1);
    char *used = calloc(nf + 1, 1);
    REQUIRE(used != NULL);
    char *save = NULL;
    for (char *nm = strtok_r(hcopy, ":", &save); nm; nm = strtok_r(NULL, ":", &save)) {
        for (size_t k = nf; k-- > 0;) {
            size_t v, nl = model_name(m + fs[k].s, fs[k].e - fs[k].s, &v);
            if (!used[k] && nl && name_eq(m + fs[k].s, nl, nm, strlen(nm))) {
                used[k] = 1;
                size_t e = fs[k].e;
                if (e - fs[k].s >= 2 && m[e - 2] == '\r' && m[e - 1] == '\n') e -= 2;
                REQUIRE(model_header(m + fs[k].s, e - fs[k].s, 1, &canon) == 0);
                REQUIRE(EVP_DigestUpdate(md, canon.p, canon.n) == 1);
                break;
            }
        }
    }
    /* b= is the last tag and starts the last line. */
    const char *bstart = NULL;
    for (size_t i = sn - 2; i-- > 3;)
        if (sig[i - 3] == '\n' && sig[i - 2] == '\t' && sig[i - 1] == 'b' && sig[i] == '=') {
            bstart = sig + i + 1;
            break;
        }
    REQUIRE(bstart != NULL);
    REQUIRE(model_header(sig, (size_t)(bstart - sig), 0, &canon) == 0);
    REQUIRE(EVP_DigestUpdate(md, canon.p, canon.n) == 1);
    REQUIRE(EVP_DigestFinal_ex(md, dg, &dl) == 1);
    EVP_MD_CTX_free(md);

    unsigned char s64[64 + 3];
    REQUIRE(b64_decode(b, bl, s64, sizeof s64) == 64);
    EVP_MD_CTX *vc = EVP_MD_CTX_new();
    REQUIRE(vc && EVP_DigestVerifyInit_ex(vc, NULL, NULL, NULL, NULL, pub, NULL) == 1);
    REQUIRE(EVP_DigestVerify(vc, s64, 64, dg, 32) == 1);
    EVP_MD_CTX_free(vc);

    free(used);
    free(hcopy);
    free(canon.p);
    free(fs);
}

/* ---- the target ----------------------------------------------------------- */

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    if (key == NULL) init_key();
    if (size == 0) return 0;
    unsigned opt = data[0];
    const char *m = (const char *)data + 1;
    size_t n = size - 1;

    /* Canonicalization against the models, on the whole input as a body
     * and on each header field. */
    struct buf got = {0}, want = {0};
    dkim_canon_body(m, n, emit_buf, &got);
    model_body(m, n, &want);
    REQUIRE(got.n == want.n && (got.n == 0 || memcmp(got.p, want.p, got.n) == 0));

    struct field *fs;
    size_t nf;
    model_fields(m, n, &fs, &nf);
    for (size_t i = 0; i < nf; i++) {
        for (int crlf = 0; crlf < 2; crlf++) {
            got.n = 0;
            size_t e = fs[i].e;
            int rc = dkim_canon_header(m + fs[i].s, e - fs[i].s, crlf, emit_buf, &got);
            if (e - fs[i].s >= 2 && m[e - 2] == '\r' && m[e - 1] == '\n') e -= 2;
            int wrc = model_header(m + fs[i].s, e - fs[i].s, crlf, &want);
            REQUIRE(rc == wrc);
            REQUIRE(rc < 0 ? got.n == 0
                           : got.n == want.n && memcmp(got.p, want.p, got.n) == 0);
        }
    }

    /* Sign and check. */
    static const char *const custom[] = {"From", "X-A", "x-b", NULL};
    static const char *const none[] = {NULL};
    struct dkim_signer s = {.domain = "example.com", .selector = "fuzz", .key = key};
    if (opt & 1) s.oversign = none;
    if (opt & 2) {
        s.timestamp = 1;
        s.expire = 86400;
    }
    if (opt & 4) s.headers = custom;

    const char *names[2 * DKIM_MAX_HEADERS];
    int over[2 * DKIM_MAX_HEADERS] = {0};
    size_t nn = 0;
    const char *const *lists[2] = {s.headers ? s.headers : dkim_default_headers,
                                   s.oversign ? s.oversign : dkim_default_oversign};
    for (int l = 0; l < 2; l++) {
        for (const char *const *p = lists[l]; *p; p++) {
            size_t j = 0;
            while (j < nn && !name_eq(names[j], strlen(names[j]), *p, strlen(*p))) j++;
            if (j == nn) names[nn++] = *p;
            if (l == 1) over[j] = 1;
        }
    }
    size_t signable = 0;
    for (size_t i = 0; i < nf; i++) {
        size_t v, nl = model_name(m + fs[i].s, fs[i].e - fs[i].s, &v);
        for (size_t j = 0; nl && j < nn; j++)
            if (name_eq(m + fs[i].s, nl, names[j], strlen(names[j]))) {
                signable++;
                break;
            }
    }

    static char sig[DKIM_SIGNATURE_MAX];
    int r = dkim_sign(&s, m, n, 1700000000, sig, sizeof sig);
    if (signable > DKIM_MAX_SIGNED_FIELDS) {
        REQUIRE(r == -1);
    } else {
        REQUIRE(r > 0);
        check_signature(sig, (size_t)r, m, n, names, nn, over);
    }

    free(fs);
    free(got.p);
    free(want.p);
    return 0;
}
