/* DKIM signatures (RFC 6376, RFC 8463): key loading, relaxed
 * canonicalization streamed into SHA-256 without copying unchanged bytes,
 * and the DKIM-Signature header field, folded. */
#include "smtp/dkim.h"

#include <errno.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rsa.h>
#include <openssl/x509.h>

/* Key files are a few KiB; a bigger file is not a key. */
#define DKIM_KEY_FILE_MAX (64 * 1024)
/* RFC 5322 §2.1.1: lines SHOULD be at most 78 characters. */
#define DKIM_FOLD_COLUMN 78
#define DKIM_SHA256_LEN 32
/* Base64 length of n bytes, without the NUL. */
#define B64_LEN(n) (((n) + 2) / 3 * 4)
/* RFC 1035 §2.3.4: 255 octets on the wire are 253 characters written out. */
#define DKIM_DNS_NAME_MAX 253
/* RFC 6376 §3.5: t= and x= are 1*12DIGIT. */
#define DKIM_TIME_MAX 999999999999LL
#define DKIM_DNS_LABEL_MAX 63
/* The DNS name queried is <selector>._domainkey.<domain> (RFC 6376 §3.6.2.1). */
static const char DOMAINKEY_INFIX[] = "._domainkey.";

const char *const dkim_default_headers[] = {
    "From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "In-Reply-To",
    "References", "MIME-Version", "Content-Type", "Content-Transfer-Encoding",
    "List-Unsubscribe", "List-Unsubscribe-Post", NULL,
};

/* The fields a reader sees first; an added second From or Subject is the
 * classic way to show different text under a valid signature (RFC 6376
 * §8.15). */
const char *const dkim_default_oversign[] = {"From", "Subject", NULL};

struct dkim_key {
    EVP_PKEY *pkey;
    EVP_MD *sha256;     /* fetched once: an implicit fetch per digest costs */
    enum dkim_algorithm alg;
    int bits;
};

static void set_err(char *err, size_t errlen, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

static void set_err(char *err, size_t errlen, const char *fmt, ...)
{
    if (err == NULL || errlen == 0) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

static int is_wsp(unsigned char c)
{
    return c == ' ' || c == '\t';
}

static unsigned char ascii_lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

static int ascii_caseeq(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (ascii_lower((unsigned char)a[i]) != ascii_lower((unsigned char)b[i])) return 0;
    return 1;
}

/* RFC 5322 §3.6.8: ftext is printable US-ASCII except the colon. */
static int is_ftext(unsigned char c)
{
    return c >= 33 && c <= 126 && c != ':';
}

/* ---- keys ---------------------------------------------------------------- */

/* Called by OpenSSL only for an encrypted key. Without it OpenSSL would
 * prompt on the terminal; a server has nobody to type a passphrase. */
static int no_passphrase(char *buf, int size, int rwflag, void *u)
{
    (void)buf;
    (void)size;
    (void)rwflag;
    *(int *)u = 1;
    return -1;
}

static const char *key_type_name(int id)
{
    switch (id) {
    case EVP_PKEY_RSA_PSS: return "RSA-PSS";
    case EVP_PKEY_EC: return "EC";
    case EVP_PKEY_ED448: return "Ed448";
    case EVP_PKEY_DSA: return "DSA";
    default: return "this";
    }
}

struct dkim_key *dkim_key_from_pem(const char *pem, size_t len, char *err, size_t errlen)
{
    if (pem == NULL || len > DKIM_KEY_FILE_MAX) {
        set_err(err, errlen, "not a PEM private key");
        return NULL;
    }
    struct dkim_key *k = NULL;
    EVP_PKEY *pkey = NULL;
    int asked = 0;
    BIO *bio = BIO_new_mem_buf(pem, (int)len);
    if (bio == NULL) {
        set_err(err, errlen, "out of memory");
        goto out;
    }
    pkey = PEM_read_bio_PrivateKey(bio, NULL, no_passphrase, &asked);
    if (pkey == NULL) {
        if (asked)
            set_err(err, errlen, "the key is encrypted; DKIM keys are read at start and "
                                 "need to be stored without a passphrase");
        else if (memmem(pem, len, "-----BEGIN PUBLIC KEY-----", 26) != NULL)
            set_err(err, errlen, "this is a public key; signing needs the private key");
        else
            set_err(err, errlen, "no PEM private key found");
        goto out;
    }
    int id = EVP_PKEY_get_base_id(pkey);
    int bits = EVP_PKEY_get_bits(pkey);
    enum dkim_algorithm alg;
    if (id == EVP_PKEY_RSA) {
        if (bits < DKIM_RSA_MIN_BITS) {
            set_err(err, errlen, "RSA key of %d bits; DKIM needs at least %d (RFC 8301 §3.2)",
                    bits, DKIM_RSA_MIN_BITS);
            goto out;
        }
        if (bits > DKIM_RSA_MAX_BITS) {
            set_err(err, errlen, "RSA key of %d bits; verifiers only must accept up to %d "
                                 "(RFC 8301 §3.2), use 2048", bits, DKIM_RSA_MAX_BITS);
            goto out;
        }
        alg = DKIM_RSA_SHA256;
    } else if (id == EVP_PKEY_ED25519) {
        alg = DKIM_ED25519_SHA256;
        bits = 256;     /* OpenSSL reports the 253 security bits */
    } else {
        set_err(err, errlen, "%s key type cannot sign DKIM; use RSA (rsa-sha256) or Ed25519 "
                             "(ed25519-sha256)", key_type_name(id));
        goto out;
    }

    k = calloc(1, sizeof *k);
    if (k == NULL) {
        set_err(err, errlen, "out of memory");
        goto out;
    }
    k->sha256 = EVP_MD_fetch(NULL, "SHA2-256", NULL);
    if (k->sha256 == NULL) {
        set_err(err, errlen, "SHA-256 is not available from OpenSSL");
        free(k);
        k = NULL;
        goto out;
    }
    k->pkey = pkey;
    pkey = NULL;
    k->alg = alg;
    k->bits = bits;
out:
    EVP_PKEY_free(pkey);
    BIO_free(bio);
    /* A failed decode leaves errors queued on this thread, where TLS code
     * reading the queue later would find them. */
    ERR_clear_error();
    return k;
}

struct dkim_key *dkim_key_load(const char *pem_path, char *err, size_t errlen)
{
    if (pem_path == NULL) {
        set_err(err, errlen, "no DKIM key file given");
        return NULL;
    }
    FILE *f = fopen(pem_path, "rb");
    if (f == NULL) {
        set_err(err, errlen, "%s: %s", pem_path, strerror(errno));
        return NULL;
    }
    char *buf = malloc(DKIM_KEY_FILE_MAX + 1);
    if (buf == NULL) {
        fclose(f);
        set_err(err, errlen, "%s: out of memory", pem_path);
        return NULL;
    }
    size_t n = fread(buf, 1, DKIM_KEY_FILE_MAX + 1, f);
    int read_err = ferror(f);
    int saved = errno;
    fclose(f);
    struct dkim_key *k = NULL;
    char why[200];
    if (read_err) {
        set_err(err, errlen, "%s: %s", pem_path, strerror(saved));
    } else if (n > DKIM_KEY_FILE_MAX) {
        set_err(err, errlen, "%s: larger than %d bytes, not a key file", pem_path,
                DKIM_KEY_FILE_MAX);
    } else if ((k = dkim_key_from_pem(buf, n, why, sizeof why)) == NULL) {
        set_err(err, errlen, "%s: %s", pem_path, why);
    }
    OPENSSL_cleanse(buf, n);
    free(buf);
    return k;
}

void dkim_key_free(struct dkim_key *k)
{
    if (k == NULL) return;
    EVP_PKEY_free(k->pkey);
    EVP_MD_free(k->sha256);
    free(k);
}

enum dkim_algorithm dkim_key_algorithm(const struct dkim_key *k)
{
    return k->alg;
}

int dkim_key_bits(const struct dkim_key *k)
{
    return k->bits;
}


int dkim_key_dns_record(const struct dkim_key *k, char *out, size_t outcap)
{
    if (k == NULL || out == NULL) return -1;
    /* An RSA-4096 SubjectPublicKeyInfo is 550 bytes. */
    unsigned char der[800];
    size_t dlen = 0;
    const char *type;
    if (k->alg == DKIM_ED25519_SHA256) {
        /* RFC 8463 §4.2: the bare 32-byte key, no ASN.1 around it. */
        type = "ed25519";
        dlen = sizeof der;
        if (EVP_PKEY_get_raw_public_key(k->pkey, der, &dlen) != 1) goto fail;
    } else {
        /* RFC 6376 §3.6.1 names RSAPublicKey, but what its Appendix C
         * and every key tool publish, and verifiers accept, is the
         * SubjectPublicKeyInfo that `openssl rsa -pubout` writes. */
        type = "rsa";
        int n = i2d_PUBKEY(k->pkey, NULL);
        if (n <= 0 || (size_t)n > sizeof der) goto fail;
        unsigned char *p = der;
        if (i2d_PUBKEY(k->pkey, &p) != n) goto fail;
        dlen = (size_t)n;
    }
    char prefix[32];
    int plen = snprintf(prefix, sizeof prefix, "v=DKIM1; k=%s; p=", type);
    size_t total = (size_t)plen + B64_LEN(dlen);
    if (total + 1 > outcap) return -1;
    memcpy(out, prefix, (size_t)plen);
    EVP_EncodeBlock((unsigned char *)out + plen, der, (int)dlen);
    out[total] = '\0';
    return (int)total;
fail:
    ERR_clear_error();
    return -1;
}

/* ---- canonicalization ------------------------------------------------------ */

/* The CR of the first CRLF in [p, end), or end. A lone CR or LF is text. */
static const char *find_crlf(const char *p, const char *end)
{
    const char *q = p;
    while (q < end && (q = memchr(q, '\n', (size_t)(end - q))) != NULL) {
        if (q > p && q[-1] == '\r') return q - 1;
        q++;
    }
    return end;
}

static const char CRLFS[] = "\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n\r\n";

/* RFC 6376 §3.4.4, steps in the order errata 1384 fixed: (a) drop WSP at
 * line ends and shrink inner WSP runs to one SP, then (b) drop empty lines
 * at the end. Bytes that canonicalization leaves alone, including single
 * spaces and line ends, stay in one run; a run is broken only where output
 * differs from input, so a clean body is one emit call. Empty lines are
 * counted and emitted only when a non-empty line follows them. */
void dkim_canon_body(const char *body, size_t len, dkim_emit_fn *emit, void *ctx)
{
    const char *p = body, *end = body + len;
    const char *run = p;    /* [run, p) is canonical and not yet emitted */
    size_t blanks = 0;

    while (p < end) {
        const char *eol = find_crlf(p, end);
        const char *next = eol < end ? eol + 2 : end;
        const char *ce = eol;   /* content end, trailing WSP excluded */
        while (ce > p && is_wsp((unsigned char)ce[-1])) ce--;

        if (ce == p) {          /* empty once (a) is done */
            if (run < p) emit(ctx, run, (size_t)(p - run));
            blanks++;
            run = p = next;
            continue;
        }
        while (blanks > 0) {
            size_t n = blanks < (sizeof CRLFS - 1) / 2 ? blanks : (sizeof CRLFS - 1) / 2;
            emit(ctx, CRLFS, 2 * n);
            blanks -= n;
        }
        for (const char *q = p; q < ce;) {
            if (!is_wsp((unsigned char)*q)) {
                q++;
                continue;
            }
            const char *ws = q;
            while (is_wsp((unsigned char)*q)) q++;  /* stops before ce: ce[-1] is not WSP */
            if (q - ws == 1 && *ws == ' ') continue; /* already canonical */
            if (*ws == ' ') {
                emit(ctx, run, (size_t)(ws + 1 - run));
            } else {
                if (ws > run) emit(ctx, run, (size_t)(ws - run));
                emit(ctx, " ", 1);
            }
            run = q;
        }
        if (eol == end) {
            /* The last line has no CRLF: §3.4.4 adds one. Its trailing
             * WSP was dropped like any line's, which is what a verifier
             * computes from the message as SMTP delivers it, with the CRLF
             * that ends DATA's last line. */
            if (ce > run) emit(ctx, run, (size_t)(ce - run));
            emit(ctx, "\r\n", 2);
            run = end;
        } else if (ce < eol) {
            if (ce > run) emit(ctx, run, (size_t)(ce - run));
            run = eol;          /* the CRLF stays, the WSP before it goes */
        }
        p = next;
    }
    if (run < end) emit(ctx, run, (size_t)(end - run));
}

/* Collects small pieces of header canonical output into bigger emits. */
struct canon_buf {
    char b[512];
    size_t n;
    dkim_emit_fn *emit;
    void *ctx;
};

static void cb_flush(struct canon_buf *c)
{
    if (c->n) c->emit(c->ctx, c->b, c->n);
    c->n = 0;
}

static void cb_put(struct canon_buf *c, char ch)
{
    if (c->n == sizeof c->b) cb_flush(c);
    c->b[c->n++] = ch;
}

/* Length of the field name at the start of f[0..len) and the offset just
 * past its colon, or 0 if there is no "name *WSP :" (RFC 5322 §3.6.8, with
 * the obsolete WSP before the colon of §4.5). */
static size_t field_name(const char *f, size_t len, size_t *after_colon)
{
    size_t i = 0;
    while (i < len && is_ftext((unsigned char)f[i])) i++;
    size_t name_len = i;
    while (i < len && is_wsp((unsigned char)f[i])) i++;
    if (name_len == 0 || i >= len || f[i] != ':') return 0;
    *after_colon = i + 1;
    return name_len;
}

/* RFC 6376 §3.4.2: lower-case the name; unfold (drop CRLF before WSP);
 * every WSP run becomes one SP; no WSP at the end of the value or around
 * the colon. */
int dkim_canon_header(const char *field, size_t len, int crlf, dkim_emit_fn *emit, void *ctx)
{
    if (len >= 2 && field[len - 2] == '\r' && field[len - 1] == '\n') len -= 2;
    size_t v;
    size_t name_len = field_name(field, len, &v);
    if (name_len == 0) return -1;

    struct canon_buf c = {.n = 0, .emit = emit, .ctx = ctx};
    for (size_t i = 0; i < name_len; i++) cb_put(&c, (char)ascii_lower((unsigned char)field[i]));
    cb_put(&c, ':');
    int started = 0, pending = 0;
    for (size_t i = v; i < len; i++) {
        unsigned char ch = (unsigned char)field[i];
        if (ch == '\r' && i + 1 < len && field[i + 1] == '\n') {
            i++;                /* unfold; the WSP after it is a run */
        } else if (is_wsp(ch)) {
            pending = started;
        } else {
            if (pending) cb_put(&c, ' ');
            cb_put(&c, (char)ch);
            started = 1;
            pending = 0;
        }
    }
    if (crlf) {
        cb_put(&c, '\r');
        cb_put(&c, '\n');
    }
    cb_flush(&c);
    return 0;
}

/* Walks the header section one field at a time. */
struct hdr_iter {
    const char *msg;
    size_t len, pos;
    size_t body;        /* valid once done */
    int done;
};

/* The next field as [*start, *end), *end past its CRLF; 0 at the empty
 * line that ends the section or at the end of msg. Continuation lines
 * with no field before them are skipped. */
static int hdr_next(struct hdr_iter *it, size_t *start, size_t *end)
{
    const char *end_p = it->msg + it->len;
    int have = 0;
    while (!it->done) {
        if (it->pos >= it->len) {
            it->done = 1;
            it->body = it->len;
            break;
        }
        const char *line = it->msg + it->pos;
        if (have && !is_wsp((unsigned char)*line)) break;     /* next field starts */
        const char *eol = find_crlf(line, end_p);
        if (eol == line) {      /* the empty line */
            it->done = 1;
            it->body = it->pos + 2;
            break;
        }
        if (!have && !is_wsp((unsigned char)*line)) {
            have = 1;
            *start = it->pos;
        }
        it->pos = (size_t)((eol < end_p ? eol + 2 : end_p) - it->msg);
    }
    if (have) *end = it->pos;
    return have;
}

size_t dkim_body_offset(const char *msg, size_t len)
{
    struct hdr_iter it = {.msg = msg, .len = len};
    size_t s, e;
    while (hdr_next(&it, &s, &e)) {
    }
    return it.body;
}

/* ---- configuration checks ---------------------------------------------------- */

/* RFC 5321 §4.1.2 sub-domain: letters, digits, inner hyphens; labels of at
 * most 63. min_labels 2 for d= (RFC 6376 §3.5 domain-name), 1 for s=. */
static int dns_name_ok(const char *s, int min_labels)
{
    size_t n = strlen(s), label = 0;
    int labels = 0;
    if (n == 0 || n > DKIM_DNS_NAME_MAX) return 0;
    for (size_t i = 0; i <= n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c == '.' || c == '\0') {
            if (label == 0 || label > DKIM_DNS_LABEL_MAX || s[i - 1] == '-') return 0;
            labels++;
            label = 0;
        } else if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                   (c == '-' && label > 0)) {
            label++;
        } else {
            return 0;
        }
    }
    return labels >= min_labels;
}

struct name_slot {
    const char *name;
    size_t len;
    int oversign;
    size_t count;       /* instances in the message */
};

/* headers and oversign merged, each name once, headers' order first. On
 * failure returns -1 with a sentence in err. */
static int collect_names(const struct dkim_signer *s, struct name_slot *slots, size_t *nslots,
                         char *err, size_t errlen)
{
    const char *const *lists[2] = {
        s->headers ? s->headers : dkim_default_headers,
        s->oversign ? s->oversign : dkim_default_oversign,
    };
    size_t n = 0;
    int from = 0;
    for (int l = 0; l < 2; l++) {
        for (const char *const *h = lists[l]; *h != NULL; h++) {
            size_t len = strlen(*h);
            const char *what = l ? "oversign" : "headers";
            if (len == 0 || len > DKIM_NAME_MAX) {
                set_err(err, errlen, "%s: header field name '%.80s' must have 1 to %d characters",
                        what, *h, DKIM_NAME_MAX);
                return -1;
            }
            for (size_t i = 0; i < len; i++) {
                if (!is_ftext((unsigned char)(*h)[i])) {
                    set_err(err, errlen, "%s: '%s' is not a header field name (RFC 5322 §3.6.8)",
                            what, *h);
                    return -1;
                }
            }
            size_t j = 0;
            while (j < n && !(slots[j].len == len && ascii_caseeq(slots[j].name, *h, len))) j++;
            if (j == n) {
                if (n == DKIM_MAX_HEADERS) {
                    set_err(err, errlen, "headers and oversign name more than %d header fields",
                            DKIM_MAX_HEADERS);
                    return -1;
                }
                slots[n++] = (struct name_slot){.name = *h, .len = len};
            }
            if (l == 1) slots[j].oversign = 1;
            if (l == 0 && len == 4 && ascii_caseeq(*h, "from", 4)) from = 1;
        }
    }
    if (!from) {
        set_err(err, errlen, "headers: From must be signed (RFC 6376 §5.4)");
        return -1;
    }
    *nslots = n;
    return 0;
}

static int check_signer(const struct dkim_signer *s, struct name_slot *slots, size_t *nslots,
                        char *err, size_t errlen)
{
    if (s == NULL) {
        set_err(err, errlen, "no signer");
        return -1;
    }
    if (s->key == NULL) {
        set_err(err, errlen, "key: no key loaded");
        return -1;
    }
    if (s->domain == NULL || !dns_name_ok(s->domain, 2)) {
        set_err(err, errlen, "domain: '%.80s' is not a domain name like example.com (d=, "
                "RFC 6376 §3.5)", s->domain ? s->domain : "");
        return -1;
    }
    if (s->selector == NULL || !dns_name_ok(s->selector, 1)) {
        set_err(err, errlen, "selector: '%.80s' must be letters, digits, hyphens and dots "
                "(s=, RFC 6376 §3.1)", s->selector ? s->selector : "");
        return -1;
    }
    if (strlen(s->selector) + sizeof DOMAINKEY_INFIX - 1 + strlen(s->domain) > DKIM_DNS_NAME_MAX) {
        set_err(err, errlen, "selector: %s%s%s is longer than a DNS name may be", s->selector,
                DOMAINKEY_INFIX, s->domain);
        return -1;
    }
    return collect_names(s, slots, nslots, err, errlen);
}

int dkim_signer_check(const struct dkim_signer *s, char *err, size_t errlen)
{
    struct name_slot slots[DKIM_MAX_HEADERS];
    size_t n;
    return check_signer(s, slots, &n, err, errlen);
}

/* ---- the signature header field ---------------------------------------------- */

struct sig_writer {
    char *out;
    size_t cap, len;
    size_t col;         /* characters on the current line */
    int overflow;
};

static void w_put(struct sig_writer *w, const char *s, size_t n)
{
    if (w->overflow || n > w->cap - w->len) {
        w->overflow = 1;
        return;
    }
    memcpy(w->out + w->len, s, n);
    w->len += n;
    w->col += n;
}

static void w_str(struct sig_writer *w, const char *s)
{
    w_put(w, s, strlen(s));
}

/* RFC 6376 §3.2: FWS may stand around tags, so a fold is CRLF TAB. */
static void w_fold(struct sig_writer *w)
{
    w_put(w, "\r\n\t", 3);
    w->col = 1;
}

/* Before a token of n characters: a space, or a fold if it would not fit. */
static void w_sep(struct sig_writer *w, size_t n)
{
    if (w->col + 1 + n > DKIM_FOLD_COLUMN) w_fold(w);
    else w_put(w, " ", 1);
}

/* "name=value;" as one token; values here (d=, s=, t=) cannot be split. */
static void w_tag(struct sig_writer *w, const char *name, const char *value)
{
    w_sep(w, strlen(name) + 1 + strlen(value) + 1);
    w_str(w, name);
    w_put(w, "=", 1);
    w_str(w, value);
    w_put(w, ";", 1);
}

/* A header field of a configured name, in message order. */
struct signed_field {
    size_t start, end;
    unsigned slot;
};

struct digest_sink {
    EVP_MD_CTX *md;
    int failed;
};

static void emit_digest(void *ctx, const char *p, size_t n)
{
    struct digest_sink *d = ctx;
    if (!d->failed && EVP_DigestUpdate(d->md, p, n) != 1) d->failed = 1;
}

/* How many times a name appears in h= (RFC 6376 §5.4.2): once per
 * instance, one more to oversign, and From at least once so that h= always
 * names it (§5.4), even for a message without one. */
static size_t h_entries(const struct name_slot *sl)
{
    size_t n = sl->count + (sl->oversign ? 1 : 0);
    if (n == 0 && sl->len == 4 && ascii_caseeq(sl->name, "from", 4)) n = 1;
    return n;
}

static int sign_digest(const struct dkim_key *k, const unsigned char *digest,
                       unsigned char *sig, size_t *siglen)
{
    int ok = 0;
    if (k->alg == DKIM_ED25519_SHA256) {
        /* RFC 8463 §3: PureEdDSA over the SHA-256 hash of the header
         * data, not over the data itself. */
        EVP_MD_CTX *c = EVP_MD_CTX_new();
        ok = c != NULL && EVP_DigestSignInit_ex(c, NULL, NULL, NULL, NULL, k->pkey, NULL) == 1 &&
             EVP_DigestSign(c, sig, siglen, digest, DKIM_SHA256_LEN) == 1;
        EVP_MD_CTX_free(c);
    } else {
        /* RFC 6376 §3.3.2: RSASSA-PKCS1-v1_5 with SHA-256; the context
         * wraps the digest in its DigestInfo. */
        EVP_PKEY_CTX *c = EVP_PKEY_CTX_new_from_pkey(NULL, k->pkey, NULL);
        ok = c != NULL && EVP_PKEY_sign_init(c) == 1 &&
             EVP_PKEY_CTX_set_rsa_padding(c, RSA_PKCS1_PADDING) == 1 &&
             EVP_PKEY_CTX_set_signature_md(c, k->sha256) == 1 &&
             EVP_PKEY_sign(c, sig, siglen, digest, DKIM_SHA256_LEN) == 1;
        EVP_PKEY_CTX_free(c);
    }
    return ok ? 0 : -1;
}

int dkim_sign(const struct dkim_signer *s, const char *msg, size_t len, time_t now,
              char *out, size_t outcap)
{
    struct name_slot slots[DKIM_MAX_HEADERS];
    size_t nslots;
    if (check_signer(s, slots, &nslots, NULL, 0) < 0 || out == NULL || (msg == NULL && len > 0))
        return -1;
    if ((s->timestamp || s->expire) &&
        (now < 0 || (long long)now > DKIM_TIME_MAX ||
         (unsigned long long)s->expire > (unsigned long long)(DKIM_TIME_MAX - (long long)now)))
        return -1;
    if (msg == NULL) msg = "";

    /* One pass over the header section: which fields to sign, and where
     * the body starts. */
    struct signed_field fields[DKIM_MAX_SIGNED_FIELDS];
    size_t nfields = 0;
    struct hdr_iter it = {.msg = msg, .len = len};
    size_t fs, fe;
    while (hdr_next(&it, &fs, &fe)) {
        size_t v;
        size_t nl = field_name(msg + fs, fe - fs, &v);
        if (nl == 0) continue;
        for (unsigned j = 0; j < nslots; j++) {
            if (slots[j].len == nl && ascii_caseeq(slots[j].name, msg + fs, nl)) {
                /* Refused rather than signed in part: From could be
                 * among the instances left out. */
                if (nfields == DKIM_MAX_SIGNED_FIELDS) return -1;
                slots[j].count++;
                fields[nfields++] = (struct signed_field){fs, fe, j};
                break;
            }
        }
    }
    size_t body = it.body;

    int rc = -1;
    struct digest_sink d = {.md = EVP_MD_CTX_new()};
    if (d.md == NULL) goto out;

    /* Body hash, RFC 6376 §3.7 */
    unsigned char bh[DKIM_SHA256_LEN];
    unsigned bh_len = 0;
    if (EVP_DigestInit_ex(d.md, s->key->sha256, NULL) != 1) goto out;
    dkim_canon_body(msg + body, len - body, emit_digest, &d);
    if (d.failed || EVP_DigestFinal_ex(d.md, bh, &bh_len) != 1) goto out;

    /* The field up to an empty b= (RFC 6376 §3.5 tags, §3.7 hashing). */
    struct sig_writer w = {.out = out, .cap = outcap};
    w_str(&w, "DKIM-Signature:");
    w_sep(&w, 4);
    w_str(&w, "v=1;");
    w_tag(&w, "a", s->key->alg == DKIM_ED25519_SHA256 ? "ed25519-sha256" : "rsa-sha256");
    w_tag(&w, "c", "relaxed/relaxed");
    w_tag(&w, "d", s->domain);
    w_tag(&w, "s", s->selector);
    char num[32];
    if (s->timestamp) {
        snprintf(num, sizeof num, "%lld", (long long)now);
        w_tag(&w, "t", num);
    }
    if (s->expire) {
        snprintf(num, sizeof num, "%lld", (long long)now + (long long)s->expire);
        w_tag(&w, "x", num);
    }
    /* h=: a fold may follow any colon (RFC 6376 §3.5 sig-h-tag). */
    size_t entries = 0;
    for (unsigned j = 0; j < nslots; j++) {
        size_t times = h_entries(&slots[j]);
        for (size_t t = 0; t < times; t++) {
            size_t need = slots[j].len + 1;
            if (entries == 0) {
                w_sep(&w, 2 + need);
                w_str(&w, "h=");
            } else if (w.col + need > DKIM_FOLD_COLUMN) {
                w_fold(&w);
            }
            w_put(&w, slots[j].name, slots[j].len);
            w_put(&w, ":", 1);
            entries++;
        }
    }
    if (w.overflow) goto out;
    w.out[w.len - 1] = ';';     /* From is always there: the last ':' exists */
    char bh64[B64_LEN(DKIM_SHA256_LEN) + 1];
    EVP_EncodeBlock((unsigned char *)bh64, bh, DKIM_SHA256_LEN);
    w_tag(&w, "bh", bh64);
    w_fold(&w);
    w_str(&w, "b=");
    if (w.overflow) goto out;

    /* Header hash: the signed fields in h= order, each name's instances
     * bottom-up (§5.4.2), then this field with b= empty and no CRLF. */
    unsigned char hh[DKIM_SHA256_LEN];
    unsigned hh_len = 0;
    if (EVP_DigestInit_ex(d.md, s->key->sha256, NULL) != 1) goto out;
    for (unsigned j = 0; j < nslots; j++) {
        for (size_t i = nfields; i-- > 0;) {
            if (fields[i].slot == j)
                dkim_canon_header(msg + fields[i].start, fields[i].end - fields[i].start, 1,
                                  emit_digest, &d);
        }
    }
    dkim_canon_header(w.out, w.len, 0, emit_digest, &d);
    if (d.failed || EVP_DigestFinal_ex(d.md, hh, &hh_len) != 1) goto out;

    unsigned char sig[DKIM_RSA_MAX_BITS / 8];
    size_t siglen = sizeof sig;
    if (sign_digest(s->key, hh, sig, &siglen) < 0) goto out;
    char sig64[B64_LEN(sizeof sig) + 1];
    int n64 = EVP_EncodeBlock((unsigned char *)sig64, sig, (int)siglen);
    /* b= is base64 with FWS allowed anywhere in it (§3.5 sig-b-tag). */
    for (int i = 0; i < n64;) {
        if (w.col >= DKIM_FOLD_COLUMN) w_fold(&w);
        size_t room = DKIM_FOLD_COLUMN - w.col;
        size_t take = (size_t)(n64 - i) < room ? (size_t)(n64 - i) : room;
        w_put(&w, sig64 + i, take);
        i += (int)take;
    }
    w_put(&w, "\r\n", 2);
    if (w.overflow || w.len >= outcap) goto out;
    out[w.len] = '\0';
    rc = (int)w.len;
out:
    EVP_MD_CTX_free(d.md);
    if (rc < 0) ERR_clear_error();
    return rc;
}
