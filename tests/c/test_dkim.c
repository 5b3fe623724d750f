/* sources: csrc/smtp/dkim.c */
/* libs: -lcrypto */
/* DKIM signing: relaxed canonicalization against the RFC 6376 §3.4.5
 * example and hand-worked edge cases, the RFC 8463 Appendix A signatures
 * checked through our canonicalization, our own signatures checked by a
 * small verifier written here, the header field's syntax and folding, the
 * configuration checks, and the key files a user will get wrong. */
#include "smtp/dkim.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/bio.h>
#include <openssl/core_names.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/param_build.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

#include "check.h"

#define S(lit) lit, sizeof lit - 1

/* ---- collecting emitted output ------------------------------------------- */

struct sink {
    char *b;
    size_t n, cap;
    int calls;
    const char *first;  /* the first run's pointer */
};

static void sink_emit(void *ctx, const char *p, size_t n)
{
    struct sink *s = ctx;
    if (s->calls++ == 0) s->first = p;
    if (s->n + n > s->cap) {
        size_t cap = (s->n + n) * 2 + 64;
        char *b = realloc(s->b, cap);
        if (b == NULL) abort();
        s->b = b;
        s->cap = cap;
    }
    memcpy(s->b + s->n, p, n);
    s->n += n;
}

static void sink_reset(struct sink *s)
{
    s->n = 0;
    s->calls = 0;
    s->first = NULL;
}

static struct sink out;

static void show(const char *p, size_t n, char *dst, size_t cap)
{
    size_t o = 0;
    for (size_t i = 0; i < n && o + 5 < cap; i++) {
        unsigned char c = (unsigned char)p[i];
        if (c == '\r') o += (size_t)snprintf(dst + o, cap - o, "\\r");
        else if (c == '\n') o += (size_t)snprintf(dst + o, cap - o, "\\n");
        else if (c == '\t') o += (size_t)snprintf(dst + o, cap - o, "\\t");
        else if (c < 32 || c > 126) o += (size_t)snprintf(dst + o, cap - o, "\\x%02x", c);
        else dst[o++] = (char)c;
    }
    dst[o] = '\0';
}

static int body_is(const char *in, size_t n, const char *want, size_t wn, int line)
{
    sink_reset(&out);
    dkim_canon_body(in, n, sink_emit, &out);
    if (out.n == wn && memcmp(out.b ? out.b : "", want, wn) == 0) return 1;
    char a[400], b[400];
    show(out.b ? out.b : "", out.n, a, sizeof a);
    show(want, wn, b, sizeof b);
    fprintf(stderr, "line %d: body canon gave \"%s\", want \"%s\"\n", line, a, b);
    return 0;
}
#define BODY(in, want) CHECK(body_is(S(in), S(want), __LINE__), "body %s", #in)

static int header_is(const char *in, size_t n, int crlf, const char *want, size_t wn, int line)
{
    sink_reset(&out);
    int rc = dkim_canon_header(in, n, crlf, sink_emit, &out);
    if (rc == 0 && out.n == wn && memcmp(out.b, want, wn) == 0) return 1;
    char a[400], b[400];
    show(out.b ? out.b : "", out.n, a, sizeof a);
    show(want, wn, b, sizeof b);
    fprintf(stderr, "line %d: header canon rc %d gave \"%s\", want \"%s\"\n", line, rc, a, b);
    return 0;
}
#define HEADER(in, want) CHECK(header_is(S(in), 1, S(want), __LINE__), "header %s", #in)

/* ---- canonicalization vectors --------------------------------------------- */

static void test_body_canon(void)
{
    /* RFC 6376 §3.4.5, relaxed body. */
    BODY(" C \r\nD \t E\r\n\r\n\r\n", " C\r\nD E\r\n");

    /* §3.4.4: an empty body stays empty (sha256 of nothing), unlike
     * "simple" which makes it one CRLF (§3.4.3); so do bodies of empty or
     * all-whitespace lines. */
    BODY("", "");
    BODY("\r\n", "");
    BODY("\r\n\r\n  \r\n\t\r\n", "");
    BODY("   ", "");
    BODY(" \t ", "");

    /* A missing final CRLF is added; trailing WSP on that line goes too. */
    BODY("abc", "abc\r\n");
    BODY("abc  ", "abc\r\n");
    BODY("abc\r\n\r\n  ", "abc\r\n");
    BODY("abc\r\n\r\nx", "abc\r\n\r\nx\r\n");

    /* WSP runs inside a line become one SP; at line ends they go. */
    BODY("a  b\t\tc \t d\r\n", "a b c d\r\n");
    BODY("a b c\r\n", "a b c\r\n");
    BODY("a\tb\r\n", "a b\r\n");
    BODY("\tlead\r\n", " lead\r\n");
    BODY("  lead\r\n", " lead\r\n");
    BODY("trail \t \r\n", "trail\r\n");
    BODY("x \r\n \r\ny\r\n", "x\r\n\r\ny\r\n");

    /* Empty lines inside the body stay; only the ones at the end go. */
    BODY("line\r\n\r\n\r\nnext\r\n\r\n", "line\r\n\r\n\r\nnext\r\n");
    BODY("\r\n\r\nfirst\r\n", "\r\n\r\nfirst\r\n");

    /* Only CRLF ends a line: a bare LF or CR is text, not WSP. */
    BODY("a\nb \r\n", "a\nb\r\n");
    BODY("a \rb\r\n", "a \rb\r\n");
    BODY("a\t\rb\r\n", "a \rb\r\n");
    BODY("a \n", "a \n\r\n");
    BODY("x\r\r\n", "x\r\r\n");
    BODY("\n", "\n\r\n");

    /* 8-bit and NUL bytes pass through. */
    BODY("\xc3\xa9t\xc3\xa9  \xff\r\n", "\xc3\xa9t\xc3\xa9 \xff\r\n");
    BODY("a\0  b\r\n", "a\0 b\r\n");

    /* Many empty lines: inside (emitted in chunks) and at the end. */
    static char big[4000], want[4000];
    size_t n = 0, w = 0;
    memcpy(big + n, "top\r\n", 5), n += 5;
    memcpy(want + w, "top\r\n", 5), w += 5;
    for (int i = 0; i < 100; i++) {
        memcpy(big + n, i % 2 ? "\r\n" : " \r\n", i % 2 ? 2 : 3), n += i % 2 ? 2 : 3;
        memcpy(want + w, "\r\n", 2), w += 2;
    }
    memcpy(big + n, "end\r\n", 5), n += 5;
    memcpy(want + w, "end\r\n", 5), w += 5;
    for (int i = 0; i < 1000; i++) memcpy(big + n, "\r\n", 2), n += 2;
    CHECK(body_is(big, n, want, w, __LINE__), "100 inner, 1000 trailing empty lines");
}

/* Unchanged bytes go out as runs pointing into the input. */
static void test_body_runs(void)
{
    const char clean[] = "Hello there,\r\nthis body is clean.\r\nBye.\r\n";
    sink_reset(&out);
    dkim_canon_body(S(clean), sink_emit, &out);
    CHECK(out.calls == 1 && out.first == clean, "clean body in one run: %d calls", out.calls);

    const char para[] = "Hi.\r\n\r\nWe lost the game. Are you hungry yet?\r\n\r\nJoe.\r\n";
    sink_reset(&out);
    dkim_canon_body(S(para), sink_emit, &out);
    CHECK(out.calls == 5, "two empty lines cost four more runs: %d", out.calls);

    const char spaced[] = "a  b  c\r\n";
    sink_reset(&out);
    dkim_canon_body(S(spaced), sink_emit, &out);
    CHECK(out.calls == 3 && out.first == spaced, "double spaces: %d runs", out.calls);
}

static void test_header_canon(void)
{
    /* RFC 6376 §3.4.5, relaxed headers. */
    HEADER("A: X\r\n", "a:X\r\n");
    HEADER("B : Y\t\r\n\tZ  \r\n", "b:Y Z\r\n");
    /* §3.4.2's own example of the name. */
    HEADER("SUBJect: AbC\r\n", "subject:AbC\r\n");

    HEADER("Subject:\r\n  folded   value \r\n", "subject:folded value\r\n");
    HEADER("Subject: one\r\n two\r\n\t three\r\n", "subject:one two three\r\n");
    HEADER("To: a@example.com,\r\n\tb@example.com\r\n", "to:a@example.com, b@example.com\r\n");
    HEADER("X-Empty:\r\n", "x-empty:\r\n");
    HEADER("X-Empty:   \t\r\n", "x-empty:\r\n");
    HEADER("X-Fold:\r\n \r\n \r\n", "x-fold:\r\n");
    HEADER("Message-ID\t: <x@y>\r\n", "message-id:<x@y>\r\n");
    HEADER("To: a@b", "to:a@b\r\n");
    HEADER("Subject: caf\xc3\xa9  \xff ok\r\n", "subject:caf\xc3\xa9 \xff ok\r\n");
    /* A colon in the value is the value's. */
    HEADER("X-Time: 12:30 : 45\r\n", "x-time:12:30 : 45\r\n");
    /* Bare LF inside a value is not a fold. */
    HEADER("X-Odd: a\nb\r\n", "x-odd:a\nb\r\n");
    CHECK(header_is(S("To: a@b\r\n"), 0, S("to:a@b"), __LINE__), "without CRLF");

    sink_reset(&out);
    CHECK(dkim_canon_header(S("no colon here\r\n"), 1, sink_emit, &out) == -1 && out.n == 0,
          "no colon");
    CHECK(dkim_canon_header(S(": value\r\n"), 1, sink_emit, &out) == -1, "no name");
    CHECK(dkim_canon_header(S(" Lead: x\r\n"), 1, sink_emit, &out) == -1, "continuation");
    CHECK(dkim_canon_header(S("Bad Name: x\r\n"), 1, sink_emit, &out) == -1, "space in name");
    CHECK(dkim_canon_header(S(""), 1, sink_emit, &out) == -1, "empty");
    CHECK(dkim_canon_header(S("Na\xe9me: x"), 1, sink_emit, &out) == -1, "8-bit name");
    CHECK(out.n == 0, "nothing emitted on failure");
}

static void test_body_offset(void)
{
    CHECK(dkim_body_offset(S("A: b\r\n\r\nbody")) == 8, "plain");
    CHECK(dkim_body_offset(S("A: b\r\n c\r\n\r\n")) == 12, "folded");
    CHECK(dkim_body_offset(S("A: b\r\n")) == 6, "header only");
    CHECK(dkim_body_offset(S("A: b")) == 4, "header only, no CRLF");
    CHECK(dkim_body_offset(S("\r\nbody")) == 2, "no header");
    CHECK(dkim_body_offset(S("")) == 0, "empty");
    CHECK(dkim_body_offset(S("A: b\n\nbody")) == 10, "bare LF ends nothing");
    CHECK(dkim_body_offset(S(" cont\r\nA: b\r\n\r\nx")) == 15, "leading continuation");
}

/* ---- base64 and a small verifier ------------------------------------------ */

static size_t b64_decode(const char *in, size_t n, unsigned char *dst, size_t cap)
{
    char clean[2048];
    size_t m = 0;
    for (size_t i = 0; i < n && m < sizeof clean; i++)
        if (in[i] != ' ' && in[i] != '\t' && in[i] != '\r' && in[i] != '\n') clean[m++] = in[i];
    if (m % 4 != 0 || m / 4 * 3 > cap) return 0;
    int r = EVP_DecodeBlock(dst, (const unsigned char *)clean, (int)m);
    if (r < 0) return 0;
    size_t pad = 0;
    while (pad < 2 && m > pad && clean[m - 1 - pad] == '=') pad++;
    return (size_t)r - pad;
}

/* The value of tag `name` in the unfolded tag list, WSP-trimmed. */
static int tag_value(const char *list, const char *name, char *dst, size_t cap)
{
    const char *p = list;
    size_t nl = strlen(name);
    while (*p) {
        while (*p == ' ' || *p == '\t') p++;
        const char *eq = strchr(p, '=');
        const char *semi = strchr(p, ';');
        if (semi == NULL) semi = p + strlen(p);
        if (eq != NULL && eq < semi) {
            const char *ne = eq;
            while (ne > p && (ne[-1] == ' ' || ne[-1] == '\t')) ne--;
            if ((size_t)(ne - p) == nl && memcmp(p, name, nl) == 0) {
                const char *v = eq + 1, *ve = semi;
                while (v < ve && (*v == ' ' || *v == '\t')) v++;
                while (ve > v && (ve[-1] == ' ' || ve[-1] == '\t')) ve--;
                if ((size_t)(ve - v) >= cap) return -1;
                memcpy(dst, v, (size_t)(ve - v));
                dst[ve - v] = '\0';
                return 0;
            }
        }
        p = *semi ? semi + 1 : semi;
    }
    return -1;
}

static void emit_md(void *ctx, const char *p, size_t n)
{
    EVP_DigestUpdate(ctx, p, n);
}

/* Where the i-th field of the header section starts and ends. */
struct fields {
    size_t start[128], end[128];
    size_t n;
};

/* Past the CRLF that ends the line at i, or len. */
static size_t line_end(const char *msg, size_t len, size_t i)
{
    for (; i + 1 < len; i++)
        if (msg[i] == '\r' && msg[i + 1] == '\n') return i + 2;
    return len;
}

static void split_fields(const char *msg, size_t len, struct fields *f)
{
    f->n = 0;
    size_t i = 0;
    while (i < len && !(i + 1 < len && msg[i] == '\r' && msg[i + 1] == '\n')) {
        size_t s = i;
        do i = line_end(msg, len, i);
        while (i < len && (msg[i] == ' ' || msg[i] == '\t'));
        if (msg[s] != ' ' && msg[s] != '\t' && f->n < 128) {
            f->start[f->n] = s;
            f->end[f->n] = i;
            f->n++;
        }
    }
}

static int name_is(const char *field, size_t flen, const char *name)
{
    size_t n = strlen(name);
    if (flen <= n || strncasecmp(field, name, n) != 0) return 0;
    size_t i = n;
    while (i < flen && (field[i] == ' ' || field[i] == '\t')) i++;
    return i < flen && field[i] == ':';
}

/* Check sig (a whole DKIM-Signature field, CRLF at the end optional)
 * against msg, which does not contain it. bottom_up 0 picks repeated
 * fields top-down instead, which must fail where it matters. */
static int verify(const char *sig, size_t siglen, const char *msg, size_t len, EVP_PKEY *pub,
                  int bottom_up)
{
    if (siglen >= 2 && sig[siglen - 2] == '\r') siglen -= 2;
    /* Unfold, and drop "DKIM-Signature:". */
    static char flat[DKIM_SIGNATURE_MAX];
    size_t fl = 0;
    const char *colon = memchr(sig, ':', siglen);
    if (colon == NULL) return 0;
    for (size_t i = (size_t)(colon + 1 - sig); i < siglen && fl + 1 < sizeof flat; i++) {
        if (sig[i] == '\r' && i + 1 < siglen && sig[i + 1] == '\n') i++;
        else flat[fl++] = sig[i];
    }
    flat[fl] = '\0';

    char bh[100], hlist[4096], b[2048], a[40];
    if (tag_value(flat, "bh", bh, sizeof bh) || tag_value(flat, "h", hlist, sizeof hlist) ||
        tag_value(flat, "b", b, sizeof b) || tag_value(flat, "a", a, sizeof a))
        return 0;

    /* Body hash. */
    size_t body = dkim_body_offset(msg, len);
    unsigned char dg[32], want[64];
    unsigned dl;
    EVP_MD_CTX *md = EVP_MD_CTX_new();
    EVP_DigestInit_ex(md, EVP_sha256(), NULL);
    dkim_canon_body(msg + body, len - body, emit_md, md);
    EVP_DigestFinal_ex(md, dg, &dl);
    if (b64_decode(bh, strlen(bh), want, sizeof want) != 32 || memcmp(dg, want, 32) != 0) {
        EVP_MD_CTX_free(md);
        return 0;
    }

    /* Header hash: h= names, instances picked bottom-up (RFC 6376 §5.4.2). */
    struct fields f;
    split_fields(msg, len, &f);
    int used[128] = {0};
    EVP_DigestInit_ex(md, EVP_sha256(), NULL);
    for (char *save = NULL, *name = strtok_r(hlist, ":", &save); name != NULL;
         name = strtok_r(NULL, ":", &save)) {
        while (*name == ' ' || *name == '\t') name++;
        size_t nl = strlen(name);
        while (nl > 0 && (name[nl - 1] == ' ' || name[nl - 1] == '\t')) name[--nl] = '\0';
        for (size_t k = 0; k < f.n; k++) {
            size_t i = bottom_up ? f.n - 1 - k : k;
            if (!used[i] && name_is(msg + f.start[i], f.end[i] - f.start[i], name)) {
                used[i] = 1;
                dkim_canon_header(msg + f.start[i], f.end[i] - f.start[i], 1, emit_md, md);
                break;
            }
        }
    }
    /* The signature field itself, b= value removed (RFC 6376 §3.7): it is
     * the last tag in every field checked here. */
    size_t bpos = siglen;
    for (size_t i = siglen; i-- > 2;) {
        if (sig[i] == '=' && sig[i - 1] == 'b' &&
            (sig[i - 2] == ' ' || sig[i - 2] == '\t' || sig[i - 2] == ';')) {
            bpos = i + 1;
            break;
        }
    }
    dkim_canon_header(sig, bpos, 0, emit_md, md);
    EVP_DigestFinal_ex(md, dg, &dl);
    EVP_MD_CTX_free(md);

    unsigned char sigbytes[1024];
    size_t sl = b64_decode(b, strlen(b), sigbytes, sizeof sigbytes);
    int ok = 0;
    if (strcmp(a, "ed25519-sha256") == 0) {
        EVP_MD_CTX *c = EVP_MD_CTX_new();
        ok = EVP_DigestVerifyInit_ex(c, NULL, NULL, NULL, NULL, pub, NULL) == 1 &&
             EVP_DigestVerify(c, sigbytes, sl, dg, 32) == 1;
        EVP_MD_CTX_free(c);
    } else if (strcmp(a, "rsa-sha256") == 0) {
        EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_pkey(NULL, pub, NULL);
        ok = EVP_PKEY_verify_init(c) == 1 && EVP_PKEY_CTX_set_rsa_padding(c, RSA_PKCS1_PADDING) == 1 &&
             EVP_PKEY_CTX_set_signature_md(c, EVP_sha256()) == 1 &&
             EVP_PKEY_verify(c, sigbytes, sl, dg, 32) == 1;
        EVP_PKEY_CTX_free(c);
    }
    ERR_clear_error();
    return ok;
}

/* ---- RFC 8463 Appendix A ---------------------------------------------------- */

/* A.2 keys; A.3 signed message, byte for byte (continuation lines start
 * with one space), split into its two signature fields and the message. */
static const char RFC_ED_SEED[] = "nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=";
static const char RFC_ED_PUB[] = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";
static const char RFC_RSA_PUB[] =
    "MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDkHlOQoBTzWRiGs5V6NpP3idY6Wk08a5qhdR6wy5bdOKb2jLQiY/"
    "J16JYi0Qvx/byYzCNb3W91y3FutACDfzwQ/BC/e/8uBsCR+yz1Lxj+PL6lHvqMKrM3rG4hstT5QjvHO9PzoxZyVYLz"
    "BfO2EeC3Ip3G+2kryOTIKT+l/K4w3QIDAQAB";
static const char RFC_SIG_ED[] =
    "DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n"
    " d=football.example.com; i=@football.example.com;\r\n"
    " q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n"
    " subject : date : message-id : from : subject : date;\r\n"
    " bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    " b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\r\n"
    " Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==\r\n";
static const char RFC_SIG_RSA[] =
    "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed;\r\n"
    " d=football.example.com; i=@football.example.com;\r\n"
    " q=dns/txt; s=test; t=1528637909; h=from : to : subject :\r\n"
    " date : message-id : from : subject : date;\r\n"
    " bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    " b=F45dVWDfMbQDGHJFlXUNB2HKfbCeLRyhDXgFpEL8GwpsRe0IeIixNTe3\r\n"
    " DhCVlUrSjV4BwcVcOF6+FF3Zo9Rpo1tFOeS9mPYQTnGdaSGsgeefOsk2Jz\r\n"
    " dA+L10TeYt9BgDfQNZtKdN1WO//KgIqXP7OdEFE4LjFYNcUxZQ4FADY+8=\r\n";
static const char RFC_MSG[] =
    "From: Joe SixPack <joe@football.example.com>\r\n"
    "To: Suzie Q <suzie@shopping.example.net>\r\n"
    "Subject: Is dinner ready?\r\n"
    "Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
    "Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
    "\r\n"
    "Hi.\r\n"
    "\r\n"
    "We lost the game.  Are you hungry yet?\r\n"
    "\r\n"
    "Joe.\r\n";

static EVP_PKEY *ed_public(const char *b64)
{
    unsigned char raw[64];
    if (b64_decode(b64, strlen(b64), raw, sizeof raw) != 32) return NULL;
    return EVP_PKEY_new_raw_public_key(EVP_PKEY_ED25519, NULL, raw, 32);
}

static EVP_PKEY *spki_public(const char *b64)
{
    unsigned char der[1024];
    size_t n = b64_decode(b64, strlen(b64), der, sizeof der);
    const unsigned char *p = der;
    return n ? d2i_PUBKEY(NULL, &p, (long)n) : NULL;
}

static void test_rfc8463_vectors(void)
{
    EVP_PKEY *ed = ed_public(RFC_ED_PUB), *rsa = spki_public(RFC_RSA_PUB);
    CHECK(ed != NULL && rsa != NULL, "RFC public keys decode");
    CHECK(verify(S(RFC_SIG_ED), S(RFC_MSG), ed, 1), "RFC 8463 A.3 ed25519 signature verifies "
                                                    "over our canonicalization");
    CHECK(verify(S(RFC_SIG_RSA), S(RFC_MSG), rsa, 1), "RFC 8463 A.3 rsa signature verifies");
    /* The verifier can say no. */
    static char changed[sizeof RFC_MSG];
    memcpy(changed, RFC_MSG, sizeof RFC_MSG);
    changed[strstr(changed, "dinner") - changed] = 'D';
    CHECK(!verify(S(RFC_SIG_ED), changed, sizeof RFC_MSG - 1, ed, 1), "changed header fails");
    memcpy(changed, RFC_MSG, sizeof RFC_MSG);
    changed[strstr(changed, "hungry") - changed] = 'H';
    CHECK(!verify(S(RFC_SIG_RSA), changed, sizeof RFC_MSG - 1, rsa, 1), "changed body fails");
    CHECK(!verify(S(RFC_SIG_ED), S(RFC_MSG), rsa, 1), "wrong key fails");
    EVP_PKEY_free(ed);
    EVP_PKEY_free(rsa);
}

/* ---- keys --------------------------------------------------------------------- */

static char dir[256];

static char *pem_of(EVP_PKEY *k, int traditional, size_t *len)
{
    BIO *b = BIO_new(BIO_s_mem());
    int ok = traditional ? PEM_write_bio_PrivateKey_traditional(b, k, NULL, NULL, 0, NULL, NULL)
                         : PEM_write_bio_PrivateKey(b, k, NULL, NULL, 0, NULL, NULL);
    char *data;
    long n = BIO_get_mem_data(b, &data);
    char *copy = ok && n > 0 ? malloc((size_t)n + 1) : NULL;
    if (copy) {
        memcpy(copy, data, (size_t)n);
        copy[n] = '\0';
        *len = (size_t)n;
    }
    BIO_free(b);
    return copy;
}

static struct dkim_key *key_of(EVP_PKEY *k)
{
    size_t n;
    char *pem = pem_of(k, 0, &n), err[200];
    struct dkim_key *dk = pem ? dkim_key_from_pem(pem, n, err, sizeof err) : NULL;
    if (dk == NULL) fprintf(stderr, "key_of: %s\n", pem ? err : "no PEM");
    free(pem);
    return dk;
}

static void write_file(const char *path, const char *data, size_t n)
{
    FILE *f = fopen(path, "wb");
    if (f == NULL) abort();
    if (n && fwrite(data, 1, n, f) != n) abort();
    fclose(f);
}

/* Load path and expect failure with `want` in the message. */
static void load_fails(const char *name, const char *data, size_t n, const char *want)
{
    char path[400], err[300] = "";
    snprintf(path, sizeof path, "%s/%s", dir, name);
    if (data) write_file(path, data, n);
    struct dkim_key *k = dkim_key_load(path, err, sizeof err);
    CHECK(k == NULL, "%s loads", name);
    CHECK(strstr(err, want) != NULL && strstr(err, path) != NULL, "%s: error \"%s\" lacks \"%s\"",
          name, err, want);
    CHECK(ERR_peek_error() == 0, "%s: OpenSSL error queue left dirty", name);
    dkim_key_free(k);
}

static void load_key_fails(const char *name, EVP_PKEY *k, const char *want)
{
    size_t n = 0;
    char *pem = k ? pem_of(k, 0, &n) : NULL;
    CHECK(pem != NULL, "%s: no PEM written", name);
    load_fails(name, pem, n, want);
    free(pem);
}

/* An RSA key whose modulus has `bits` bits, built instead of generated:
 * the loader only looks at its size. */
static EVP_PKEY *fake_rsa(int bits)
{
    BIGNUM *n = BN_new(), *e = BN_new(), *d = BN_new(), *x = BN_new();
    BN_set_bit(n, bits - 1);
    BN_set_bit(n, 0);
    BN_set_word(e, 65537);
    BN_set_word(d, 12345);
    BN_set_word(x, 7);
    OSSL_PARAM_BLD *bld = OSSL_PARAM_BLD_new();
    OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_N, n);
    OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_E, e);
    OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_D, d);
    /* The PKCS#8 encoder wants the CRT parts present, not right. */
    OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_FACTOR1, x);
    OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_FACTOR2, x);
    OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_EXPONENT1, x);
    OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_EXPONENT2, x);
    OSSL_PARAM_BLD_push_BN(bld, OSSL_PKEY_PARAM_RSA_COEFFICIENT1, x);
    OSSL_PARAM *params = OSSL_PARAM_BLD_to_param(bld);
    EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_name(NULL, "RSA", NULL);
    EVP_PKEY *k = NULL;
    if (EVP_PKEY_fromdata_init(c) != 1 || EVP_PKEY_fromdata(c, &k, EVP_PKEY_KEYPAIR, params) != 1)
        k = NULL;
    EVP_PKEY_CTX_free(c);
    OSSL_PARAM_free(params);
    OSSL_PARAM_BLD_free(bld);
    BN_free(n);
    BN_free(e);
    BN_free(d);
    BN_free(x);
    return k;
}

static void test_key_load(void)
{
    char path[400], err[300];

    /* Good keys: Ed25519 PKCS#8, RSA PKCS#8 and traditional, 1024 bits. */
    EVP_PKEY *ed = EVP_PKEY_Q_keygen(NULL, NULL, "ED25519");
    EVP_PKEY *r1024 = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)1024);
    CHECK(ed && r1024, "keygen");
    size_t n;
    char *pem = pem_of(ed, 0, &n);
    snprintf(path, sizeof path, "%s/ed.pem", dir);
    write_file(path, pem, n);
    free(pem);
    struct dkim_key *k = dkim_key_load(path, err, sizeof err);
    CHECK(k != NULL, "ed25519 loads: %s", err);
    if (k) {
        CHECK(dkim_key_algorithm(k) == DKIM_ED25519_SHA256 && dkim_key_bits(k) == 256, "ed25519");
        dkim_key_free(k);
    }
    pem = pem_of(r1024, 1, &n);
    CHECK(pem && strstr(pem, "BEGIN RSA PRIVATE KEY") != NULL, "traditional PEM written");
    snprintf(path, sizeof path, "%s/rsa1024.pem", dir);
    write_file(path, pem, n);
    free(pem);
    k = dkim_key_load(path, err, sizeof err);
    CHECK(k != NULL, "RSA 1024 traditional loads: %s", err);
    if (k) {
        CHECK(dkim_key_algorithm(k) == DKIM_RSA_SHA256 && dkim_key_bits(k) == 1024, "rsa 1024");
        dkim_key_free(k);
    }

    /* What users get wrong. */
    snprintf(path, sizeof path, "%s/missing.pem", dir);
    CHECK(dkim_key_load(path, err, sizeof err) == NULL && strstr(err, "No such file") &&
              strstr(err, path),
          "missing file: %s", err);
    load_fails("empty.pem", "", 0, "no PEM private key found");
    load_fails("garbage.pem", S("hello\nworld\n"), "no PEM private key found");
    load_fails("truncated.pem", S("-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEI\n"),
               "no PEM private key found");

    BIO *b = BIO_new(BIO_s_mem());
    PEM_write_bio_PUBKEY(b, ed);
    char *data;
    long dn = BIO_get_mem_data(b, &data);
    load_fails("public.pem", data, (size_t)dn, "public key");
    BIO_free(b);

    b = BIO_new(BIO_s_mem());
    PEM_write_bio_PKCS8PrivateKey(b, ed, EVP_aes_256_cbc(), NULL, 0, NULL, (void *)"secret");
    dn = BIO_get_mem_data(b, &data);
    load_fails("encrypted.pem", data, (size_t)dn, "encrypted");
    BIO_free(b);

    EVP_PKEY *r512 = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)512);
    load_key_fails("rsa512.pem", r512, "512 bits");
    EVP_PKEY *huge = fake_rsa(4104);
    CHECK(huge != NULL, "fake RSA key");
    load_key_fails("rsa4104.pem", huge, "4104 bits");
    EVP_PKEY *ec = EVP_PKEY_Q_keygen(NULL, NULL, "EC", "P-256");
    load_key_fails("ec.pem", ec, "EC key type cannot sign");
    EVP_PKEY *ed448 = EVP_PKEY_Q_keygen(NULL, NULL, "ED448");
    load_key_fails("ed448.pem", ed448, "Ed448");

    snprintf(path, sizeof path, "%s/sub", dir);
    mkdir(path, 0700);
    load_fails("sub", NULL, 0, "Is a directory");

    char *big = malloc(70000);
    memset(big, 'A', 70000);
    load_fails("big.pem", big, 70000, "not a key file");
    free(big);

    CHECK(dkim_key_load(NULL, err, sizeof err) == NULL, "NULL path");
    CHECK(dkim_key_from_pem(NULL, 0, err, sizeof err) == NULL, "NULL pem");
    CHECK(dkim_key_load(path, NULL, 0) == NULL, "no err buffer");
    dkim_key_free(NULL);

    EVP_PKEY_free(ed);
    EVP_PKEY_free(r1024);
    EVP_PKEY_free(r512);
    EVP_PKEY_free(huge);
    EVP_PKEY_free(ec);
    EVP_PKEY_free(ed448);
}

static void test_dns_record(void)
{
    unsigned char seed[64];
    CHECK(b64_decode(RFC_ED_SEED, strlen(RFC_ED_SEED), seed, sizeof seed) == 32, "seed");
    EVP_PKEY *ed = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, seed, 32);
    struct dkim_key *k = key_of(ed);
    char rec[DKIM_DNS_RECORD_MAX];
    int n = k ? dkim_key_dns_record(k, rec, sizeof rec) : -1;
    CHECK(n > 0 && strcmp(rec, "v=DKIM1; k=ed25519; p=11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=") == 0,
          "RFC 8463 A.2 record: %s", n > 0 ? rec : "-");
    CHECK(k && dkim_key_dns_record(k, rec, (size_t)n) == -1, "no room for the NUL");
    CHECK(k && dkim_key_dns_record(k, rec, (size_t)n + 1) == n, "exact room");
    dkim_key_free(k);
    EVP_PKEY_free(ed);

    EVP_PKEY *rsa = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048);
    k = key_of(rsa);
    n = k ? dkim_key_dns_record(k, rec, sizeof rec) : -1;
    /* A 2048-bit SubjectPublicKeyInfo is 294 bytes: 392 base64 characters. */
    static const char spki2048[] = "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A";
    CHECK(n == 18 + 392 && strncmp(rec, spki2048, sizeof spki2048 - 1) == 0,
          "RSA record: %d %.60s", n, rec);
    EVP_PKEY *back = spki_public(rec + 18);
    CHECK(back != NULL && EVP_PKEY_eq(back, rsa) == 1, "record decodes to the key");
    EVP_PKEY_free(back);
    dkim_key_free(k);
    EVP_PKEY_free(rsa);
}

/* ---- signing ------------------------------------------------------------------ */

/* The field's shape: CRLF only as folds (each followed by TAB) and at the
 * end, lines of at most 78 characters, the tags in our order. */
static int syntax_ok(const char *h, int n, char *why, size_t wl)
{
    if (n < 20 || strncmp(h, "DKIM-Signature: v=1; a=", 23) != 0) {
        snprintf(why, wl, "prefix");
        return 0;
    }
    if ((size_t)n != strlen(h) || h[n - 2] != '\r' || h[n - 1] != '\n') {
        snprintf(why, wl, "end");
        return 0;
    }
    int col = 0;
    for (int i = 0; i < n; i++) {
        if (h[i] == '\r') {
            if (h[i + 1] != '\n' || (i + 2 < n && h[i + 2] != '\t')) {
                snprintf(why, wl, "CR at %d not a fold", i);
                return 0;
            }
            if (col > 78) {
                snprintf(why, wl, "line of %d characters", col);
                return 0;
            }
            col = 0;
            i++;
        } else if (h[i] == '\n' || (unsigned char)h[i] < 9 || (unsigned char)h[i] > 126) {
            snprintf(why, wl, "byte %d", i);
            return 0;
        } else {
            col++;
        }
    }
    /* Tag order, unfolded. */
    static char flat[DKIM_SIGNATURE_MAX];
    size_t fl = 0;
    for (int i = 15; i < n - 2; i++) {
        if (h[i] == '\r') i++;     /* the TAB after the fold stays */
        else flat[fl++] = h[i];
    }
    flat[fl] = '\0';
    const char *order[] = {"v=", "a=", "c=", "d=", "s=", "t=", "x=", "h=", "bh=", "b="};
    const char *p = flat;
    for (size_t t = 0; t < sizeof order / sizeof *order; t++) {
        const char *at = p;
        while ((at = strstr(at, order[t])) != NULL && at[-1] != ' ' && at[-1] != '\t') at++;
        if (at == NULL && (t == 5 || t == 6)) continue;
        if (at == NULL) {
            snprintf(why, wl, "tag %s", order[t]);
            return 0;
        }
        p = at;
    }
    return 1;
}

static int sign_ok(const struct dkim_signer *s, const char *msg, size_t len, time_t now,
                   char *sig, size_t cap, EVP_PKEY *pub)
{
    int n = dkim_sign(s, msg, len, now, sig, cap);
    char why[100] = "";
    if (n <= 0) {
        fprintf(stderr, "dkim_sign failed\n");
        return 0;
    }
    if (!syntax_ok(sig, n, why, sizeof why)) {
        fprintf(stderr, "bad syntax (%s):\n%s", why, sig);
        return 0;
    }
    if (!verify(sig, (size_t)n, msg, len, pub, 1)) {
        fprintf(stderr, "does not verify:\n%s", sig);
        return 0;
    }
    return n;
}

/* The value of tag name in a signature field, unfolded, or NULL. */
static const char *tag(const char *sig, const char *name)
{
    static char flat[DKIM_SIGNATURE_MAX], val[DKIM_SIGNATURE_MAX];
    size_t fl = 0;
    const char *colon = strchr(sig, ':');
    for (const char *p = colon ? colon + 1 : sig; *p && fl + 1 < sizeof flat; p++)
        if (*p != '\r' && *p != '\n') flat[fl++] = *p;
    flat[fl] = '\0';
    return tag_value(flat, name, val, sizeof val) == 0 ? val : NULL;
}

/* h= of a signature, unfolded. */
static const char *h_of(const char *sig)
{
    static char h[4096];
    const char *p = strstr(sig, " h=");
    if (p == NULL) p = strstr(sig, "\th=");
    if (p == NULL) return "";
    size_t n = 0;
    for (p += 3; *p && *p != ';' && n + 1 < sizeof h; p++)
        if (*p != '\r' && *p != '\n' && *p != '\t') h[n++] = *p;
    h[n] = '\0';
    return h;
}

static void test_sign_rfc_message(void)
{
    unsigned char seed[64];
    b64_decode(RFC_ED_SEED, strlen(RFC_ED_SEED), seed, sizeof seed);
    EVP_PKEY *ed = EVP_PKEY_new_raw_private_key(EVP_PKEY_ED25519, NULL, seed, 32);
    struct dkim_key *k = key_of(ed);
    struct dkim_signer s = {.domain = "football.example.com", .selector = "brisbane", .key = k,
                            .timestamp = 1};
    char sig[DKIM_SIGNATURE_MAX], again[DKIM_SIGNATURE_MAX];
    int n = sign_ok(&s, S(RFC_MSG), 1528637909, sig, sizeof sig, ed);
    CHECK(n > 0, "RFC message signs and verifies");
    static const char first[] = "DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n"
                                "\td=football.example.com; s=brisbane; t=1528637909; h=From:";
    CHECK(strncmp(sig, first, sizeof first - 1) == 0, "first lines:\n%s", sig);
    CHECK(tag(sig, "bh") && strcmp(tag(sig, "bh"), "2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=") == 0,
          "RFC 8463 body hash:\n%s", sig);
    CHECK(strstr(sig, ";\r\n\tb=") != NULL, "b= starts a line:\n%s", sig);
    CHECK(strcmp(h_of(sig), "From:From:To:Subject:Subject:Date:Message-ID") == 0, "h=%s",
          h_of(sig));
    /* Ed25519 is deterministic. */
    CHECK(dkim_sign(&s, S(RFC_MSG), 1528637909, again, sizeof again) == n &&
              strcmp(sig, again) == 0,
          "same input, same signature");
    dkim_key_free(k);
    EVP_PKEY_free(ed);
}

static EVP_PKEY *rsa2048;
static struct dkim_key *rsa_key;

static void test_sign_repeated_and_missing(void)
{
    char sig[DKIM_SIGNATURE_MAX];
    struct dkim_signer s = {.domain = "example.com", .selector = "sel", .key = rsa_key};

    /* Two To fields, Received (not signed), names in odd case. */
    static const char rep[] = "Received: from a by b; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                              "to: first@example.com\r\n"
                              "FROM: Sender <sender@example.com>\r\n"
                              "Received: from c by d; Mon, 1 Jan 2024 00:00:01 +0000\r\n"
                              "To: second@example.com\r\n"
                              "subject: repeated\r\n"
                              "\r\n"
                              "body\r\n";
    int n = sign_ok(&s, S(rep), 0, sig, sizeof sig, rsa2048);
    CHECK(n > 0, "repeated headers sign and verify");
    CHECK(strcmp(h_of(sig), "From:From:To:To:Subject:Subject") == 0, "h=%s", h_of(sig));
    CHECK(tag(sig, "t") == NULL && tag(sig, "x") == NULL, "no t= or x= unless asked");
    CHECK(!verify(sig, (size_t)n, S(rep), rsa2048, 0), "top-down order does not verify");

    /* Changing what was signed breaks it; adding an oversigned field too. */
    static char changed[sizeof rep + 64];
    memcpy(changed, rep, sizeof rep);
    changed[strstr(changed, "first") - changed] = 'F';
    CHECK(!verify(sig, (size_t)n, changed, sizeof rep - 1, rsa2048, 1), "changed To");
    int m = snprintf(changed, sizeof changed, "Subject: added\r\n%s", rep);
    CHECK(!verify(sig, (size_t)n, changed, (size_t)m, rsa2048, 1), "added Subject");
    m = snprintf(changed, sizeof changed, "X-Ok: 1\r\n%s", rep);
    CHECK(verify(sig, (size_t)n, changed, (size_t)m, rsa2048, 1), "unsigned field added: ok");
    m = snprintf(changed, sizeof changed, "To: third@example.com\r\n%s", rep);
    CHECK(verify(sig, (size_t)n, changed, (size_t)m, rsa2048, 1),
          "To is not oversigned: one added above the signed ones passes");

    /* No oversigning. */
    const char *none[] = {NULL};
    struct dkim_signer plain = s;
    plain.oversign = none;
    CHECK(sign_ok(&plain, S(rep), 0, sig, sizeof sig, rsa2048) > 0, "no oversign");
    CHECK(strcmp(h_of(sig), "From:To:To:Subject") == 0, "h=%s", h_of(sig));

    /* Only From present: the rest of the list is absent, From and Subject
     * still oversigned. */
    static const char only[] = "From: a@example.com\r\n\r\nx\r\n";
    CHECK(sign_ok(&s, S(only), 0, sig, sizeof sig, rsa2048) > 0, "From only");
    CHECK(strcmp(h_of(sig), "From:From:Subject") == 0, "h=%s", h_of(sig));

    /* No From at all: still named once (RFC 6376 §5.4). */
    static const char nofrom[] = "To: a@example.com\r\n\r\nx\r\n";
    CHECK(sign_ok(&plain, S(nofrom), 0, sig, sizeof sig, rsa2048) > 0, "no From");
    CHECK(strcmp(h_of(sig), "From:To") == 0, "h=%s", h_of(sig));

    /* Custom list, matched case-insensitively, emitted as configured. */
    const char *custom[] = {"from", "X-Custom", NULL};
    const char *over[] = {"x-custom", NULL};
    struct dkim_signer cs = s;
    cs.headers = custom;
    cs.oversign = over;
    static const char xc[] = "X-CUSTOM: 1\r\nFrom: a@example.com\r\nx-custom: 2\r\n\r\n";
    CHECK(sign_ok(&cs, S(xc), 0, sig, sizeof sig, rsa2048) > 0, "custom list");
    CHECK(strcmp(h_of(sig), "from:X-Custom:X-Custom:X-Custom") == 0, "h=%s", h_of(sig));

    /* Oversign names not in headers are signed too (their instances would
     * be hashed by a verifier anyway). */
    const char *over2[] = {"Subject", "X-Extra", NULL};
    cs.headers = NULL;
    cs.oversign = over2;
    static const char xe[] = "From: a@example.com\r\nX-Extra: e\r\n\r\nb\r\n";
    CHECK(sign_ok(&cs, S(xe), 0, sig, sizeof sig, rsa2048) > 0, "oversign-only name");
    CHECK(strcmp(h_of(sig), "From:Subject:X-Extra:X-Extra") == 0, "h=%s", h_of(sig));
}

static void test_sign_shapes(void)
{
    char sig[DKIM_SIGNATURE_MAX];
    struct dkim_signer s = {.domain = "example.com", .selector = "sel", .key = rsa_key};

    /* Folded fields, WSP runs, trailing blank lines, 8-bit. */
    static const char folded[] =
        "From: \"A  Person\" <a@example.com>\r\n"
        "To: one@example.com,\r\n\ttwo@example.com,\r\n   three@example.com\r\n"
        "Subject: =?utf-8?q?caf=C3=A9?= \t and\r\n more  \r\n"
        "Content-Type: text/plain; charset=utf-8\r\n"
        "\r\n"
        "caf\xc3\xa9  au lait \t\r\n"
        "\xff\xfe raw bytes\r\n"
        "\r\n\r\n   \r\n\r\n";
    int n = sign_ok(&s, S(folded), 1700000000, sig, sizeof sig, rsa2048);
    CHECK(n > 0, "folded and 8-bit message");

    /* A whitespace-only change to the body keeps the signature. */
    static const char relaxed[] =
        "From: \"A  Person\" <a@example.com>\r\n"
        "To: one@example.com,\r\n\ttwo@example.com,\r\n   three@example.com\r\n"
        "subject:   =?utf-8?q?caf=C3=A9?=  and  more\r\n"
        "Content-Type: text/plain;\r\n charset=utf-8\r\n"
        "\r\n"
        "caf\xc3\xa9\tau   lait\r\n"
        "\xff\xfe raw bytes\r\n";
    CHECK(verify(sig, (size_t)n, S(relaxed), rsa2048, 1), "relaxed changes keep the signature");

    /* Empty body, header-only message, no trailing CRLF. */
    static const char nobody[] = "From: a@example.com\r\nSubject: s\r\n\r\n";
    n = sign_ok(&s, S(nobody), 0, sig, sizeof sig, rsa2048);
    CHECK(n > 0 && strstr(sig, "bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;") != NULL,
          "empty body hashes nothing (RFC 6376 §3.4.4):\n%s", sig);
    static const char headonly[] = "From: a@example.com\r\nSubject: s\r\n";
    CHECK(sign_ok(&s, S(headonly), 0, sig, sizeof sig, rsa2048) > 0 &&
              strstr(sig, "bh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;") != NULL,
          "header-only message");
    static const char noeol[] = "From: a@example.com\r\n\r\nlast line  ";
    static const char witheol[] = "From: a@example.com\r\n\r\nlast line  \r\n";
    n = sign_ok(&s, S(noeol), 0, sig, sizeof sig, rsa2048);
    CHECK(n > 0 && verify(sig, (size_t)n, S(witheol), rsa2048, 1),
          "no final CRLF signs as SMTP will carry it");
    CHECK(sign_ok(&s, "", 0, 0, sig, sizeof sig, rsa2048) > 0, "empty message");
    CHECK(strcmp(h_of(sig), "From:Subject") == 0, "h=%s", h_of(sig));

    /* t= and x=. */
    s.timestamp = 1;
    s.expire = 3600;
    n = sign_ok(&s, S(nobody), 1000, sig, sizeof sig, rsa2048);
    CHECK(n > 0 && tag(sig, "t") && strcmp(tag(sig, "t"), "1000") == 0 && tag(sig, "x") &&
              strcmp(tag(sig, "x"), "4600") == 0 && strstr(sig, "t=1000; x=4600;"),
          "t and x:\n%s", sig);
    s.timestamp = 0;
    n = sign_ok(&s, S(nobody), 1000, sig, sizeof sig, rsa2048);
    CHECK(n > 0 && tag(sig, "t") == NULL && tag(sig, "x") && strcmp(tag(sig, "x"), "4600") == 0,
          "x alone:\n%s", sig);
    CHECK(dkim_sign(&s, S(nobody), -1, sig, sizeof sig) == -1, "negative time with x=");
    /* RFC 6376 §3.5: t= and x= have at most 12 digits. */
    CHECK(dkim_sign(&s, S(nobody), 999999996399, sig, sizeof sig) > 0, "x= of 12 digits");
    CHECK(dkim_sign(&s, S(nobody), 999999996400, sig, sizeof sig) == -1, "x= of 13 digits");
    s.expire = (unsigned long)-1;
    CHECK(dkim_sign(&s, S(nobody), 1000, sig, sizeof sig) == -1, "x= overflows");
    s.expire = 3600;

    /* Long names fold h= at colons; lines stay within 78. */
    const char *longs[] = {"From", "X-A-Rather-Long-Header-Field-Name-Number-One",
                           "X-A-Rather-Long-Header-Field-Name-Number-Two", "Subject", NULL};
    struct dkim_signer ls = {.domain = "example.com", .selector = "sel", .key = rsa_key,
                             .headers = longs};
    static const char lm[] = "From: a@example.com\r\n"
                             "X-A-Rather-Long-Header-Field-Name-Number-One: 1\r\n"
                             "X-A-Rather-Long-Header-Field-Name-Number-Two: 2\r\n"
                             "X-A-Rather-Long-Header-Field-Name-Number-Two: 3\r\n\r\n";
    n = sign_ok(&ls, S(lm), 0, sig, sizeof sig, rsa2048);
    CHECK(n > 0 && strstr(sig, ":\r\n\tX-A-Rather") != NULL, "h= folded at a colon:\n%s", sig);

    /* Every too-small buffer fails cleanly; one byte more than the field
     * (its NUL) is enough. */
    s.expire = 0;
    n = dkim_sign(&s, S(folded), 0, sig, sizeof sig);
    int bad = 0;
    for (int cap = 0; cap <= n; cap++) {
        char *tight = malloc((size_t)cap + 1);
        if (dkim_sign(&s, S(folded), 0, tight, (size_t)cap) != -1) bad++;
        free(tight);
    }
    CHECK(bad == 0, "%d short buffers accepted", bad);
    char *exact = malloc((size_t)n + 1);
    CHECK(dkim_sign(&s, S(folded), 0, exact, (size_t)n + 1) == n && memcmp(exact, sig, (size_t)n) == 0,
          "exact buffer");
    free(exact);

    /* Too many instances of signed names. */
    static char many[100 * 24];
    size_t m = 0;
    m += (size_t)sprintf(many + m, "From: a@example.com\r\n");
    for (int i = 0; i < DKIM_MAX_SIGNED_FIELDS - 1; i++)
        m += (size_t)sprintf(many + m, "To: x%d@example.com\r\n", i);
    m += (size_t)sprintf(many + m, "\r\n");
    CHECK(sign_ok(&s, many, m, 0, sig, sizeof sig, rsa2048) > 0, "%d signed fields",
          DKIM_MAX_SIGNED_FIELDS);
    static const char cc[] = "Cc: y@example.com\r\n";
    size_t at = strlen("From: a@example.com\r\n");
    memmove(many + at + sizeof cc - 1, many + at, m - at);
    memcpy(many + at, cc, sizeof cc - 1);
    CHECK(dkim_sign(&s, many, m + sizeof cc - 1, 0, sig, sizeof sig) == -1, "one more is refused");
}

static void test_signer_check(void)
{
    char err[300];
    struct dkim_signer good = {.domain = "mail.example.com", .selector = "s2024-a.x", .key = rsa_key};
    CHECK(dkim_signer_check(&good, err, sizeof err) == 0, "good: %s", err);

    struct {
        const char *domain, *selector, *want;
    } bad[] = {
        {"example", "s", "domain:"},          /* RFC 6376 §3.5: at least two labels */
        {"exa_mple.com", "s", "domain:"},
        {"-a.com", "s", "domain:"},
        {"a-.com", "s", "domain:"},
        {".example.com", "s", "domain:"},
        {"a..com", "s", "domain:"},
        {"example.com.", "s", "domain:"},
        {"exa mple.com", "s", "domain:"},
        {"example.com;x=1", "s", "domain:"},
        {"", "s", "domain:"},
        {"example.com", "", "selector:"},
        {"example.com", "bad selector", "selector:"},
        {"example.com", "s;b=", "selector:"},
        {"example.com", "s_1", "selector:"},
        {"example.com", "a.", "selector:"},
        {"example.com",
         "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "selector:"},
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        struct dkim_signer s = good;
        s.domain = bad[i].domain;
        s.selector = bad[i].selector;
        err[0] = '\0';
        CHECK(dkim_signer_check(&s, err, sizeof err) == -1 && strstr(err, bad[i].want),
              "%s / %s: %s", bad[i].domain, bad[i].selector, err);
        char sig[DKIM_SIGNATURE_MAX];
        CHECK(dkim_sign(&s, S("From: a@b.c\r\n\r\n"), 0, sig, sizeof sig) == -1, "signs %s",
              bad[i].domain);
    }

    /* A DNS name too long in total: selector + ._domainkey. + domain. */
    /* 3 x 61 + 3 = 186, 58, and 12: 256 > 253 */
    static char longdom[300], longsel[100];
    for (int i = 0; i < 3; i++) {
        memset(longdom + i * 61, 'a', 60);
        longdom[i * 61 + 60] = '.';
    }
    memcpy(longdom + 183, "com", 4);
    memset(longsel, 's', 58);
    struct dkim_signer s = good;
    s.domain = longdom;
    s.selector = longsel;
    CHECK(dkim_signer_check(&s, err, sizeof err) == -1 && strstr(err, "DNS name"), "long: %s", err);

    s = good;
    s.key = NULL;
    CHECK(dkim_signer_check(&s, err, sizeof err) == -1 && strstr(err, "key:"), "%s", err);
    CHECK(dkim_signer_check(NULL, err, sizeof err) == -1, "NULL signer");

    const char *nofrom[] = {"To", "Subject", NULL};
    s = good;
    s.headers = nofrom;
    CHECK(dkim_signer_check(&s, err, sizeof err) == -1 && strstr(err, "From must be signed"), "%s",
          err);
    const char *colon[] = {"From", "X:Y", NULL};
    s.headers = colon;
    CHECK(dkim_signer_check(&s, err, sizeof err) == -1 && strstr(err, "headers:"), "%s", err);
    const char *empty[] = {"From", "", NULL};
    s.headers = empty;
    CHECK(dkim_signer_check(&s, err, sizeof err) == -1, "empty name");
    const char *space[] = {"From", "X Y", NULL};
    s.headers = space;
    CHECK(dkim_signer_check(&s, err, sizeof err) == -1, "space in name");
    const char *over_bad[] = {"Bad:Name", NULL};
    s.headers = NULL;
    s.oversign = over_bad;
    CHECK(dkim_signer_check(&s, err, sizeof err) == -1 && strstr(err, "oversign:"), "%s", err);

    static char names[40][16];
    const char *many[41];
    for (int i = 0; i < 40; i++) {
        snprintf(names[i], sizeof names[i], "X-%d", i);
        many[i] = names[i];
    }
    many[0] = "From";
    many[40] = NULL;
    s.headers = many;
    s.oversign = NULL;
    CHECK(dkim_signer_check(&s, err, sizeof err) == -1 && strstr(err, "more than 32"), "%s", err);
    many[DKIM_MAX_HEADERS - 1] = NULL;   /* 31 + Subject from oversign = 32 */
    CHECK(dkim_signer_check(&s, err, sizeof err) == 0, "32 names: %s", err);
    /* Duplicates count once. */
    const char *dup[] = {"From", "from", "FROM", "Subject", NULL};
    s.headers = dup;
    CHECK(dkim_signer_check(&s, err, sizeof err) == 0, "duplicates: %s", err);
    char sig[DKIM_SIGNATURE_MAX];
    CHECK(sign_ok(&s, S("From: a@example.com\r\n\r\n"), 0, sig, sizeof sig, rsa2048) > 0 &&
              strcmp(h_of(sig), "From:From:Subject") == 0,
          "duplicates sign once: %s", h_of(sig));
}

int main(void)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/test_dkim.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        return 1;
    }

    test_body_canon();
    test_body_runs();
    test_header_canon();
    test_body_offset();
    test_rfc8463_vectors();
    test_key_load();
    test_dns_record();
    test_sign_rfc_message();

    rsa2048 = EVP_PKEY_Q_keygen(NULL, NULL, "RSA", (size_t)2048);
    rsa_key = rsa2048 ? key_of(rsa2048) : NULL;
    CHECK(rsa_key != NULL, "RSA 2048 key");
    if (rsa_key) {
        test_sign_repeated_and_missing();
        test_sign_shapes();
        test_signer_check();
    }
    dkim_key_free(rsa_key);
    EVP_PKEY_free(rsa2048);
    free(out.b);

    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
    return check_summary();
}
