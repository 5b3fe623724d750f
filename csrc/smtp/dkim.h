/* DKIM signing (RFC 6376) with rsa-sha256 and ed25519-sha256 (RFC 8463),
 * relaxed/relaxed canonicalization. Outbound delivery hands a whole message
 * to dkim_sign() and prepends the header field it writes; only
 * dkim_key_load() touches the file system. */
#ifndef SMTP_DKIM_H
#define SMTP_DKIM_H

#include <stddef.h>
#include <time.h>

/* ---- limits ------------------------------------------------------------ */

/* Header field names the signer is configured with (headers and oversign
 * together, duplicates counted once). */
#define DKIM_MAX_HEADERS 32
/* Longest configured header field name. */
#define DKIM_NAME_MAX 64
/* Instances of configured names one message may have; dkim_sign() refuses
 * a message with more. */
#define DKIM_MAX_SIGNED_FIELDS 64
/* RSA modulus sizes accepted: RFC 8301 §3.2 forbids signing with fewer than
 * 1024 bits, and only up to 4096 must every verifier handle. */
#define DKIM_RSA_MIN_BITS 1024
#define DKIM_RSA_MAX_BITS 4096
/* Enough room for any header field dkim_sign() writes within the limits
 * above; a typical one is 500 to 800 bytes. */
#define DKIM_SIGNATURE_MAX 8192
/* Enough room for any DNS record text dkim_key_dns_record() writes. */
#define DKIM_DNS_RECORD_MAX 1024

/* ---- keys ---------------------------------------------------------------- */

enum dkim_algorithm {
    DKIM_RSA_SHA256 = 1,   /* a=rsa-sha256, RFC 6376 §3.3 */
    DKIM_ED25519_SHA256,   /* a=ed25519-sha256, RFC 8463 §3 */
};

/* A private key ready to sign. Immutable once loaded: worker threads may
 * share one. */
struct dkim_key;

/* Load an unencrypted PEM private key: RSA of DKIM_RSA_MIN_BITS to
 * DKIM_RSA_MAX_BITS ("BEGIN PRIVATE KEY" PKCS#8 or "BEGIN RSA PRIVATE
 * KEY"), or Ed25519 (PKCS#8, as `openssl genpkey -algorithm ED25519`
 * writes it). NULL on failure with a sentence naming the file in err. */
struct dkim_key *dkim_key_load(const char *pem_path, char *err, size_t errlen);
/* The same from PEM text in memory. */
struct dkim_key *dkim_key_from_pem(const char *pem, size_t len, char *err, size_t errlen);
void dkim_key_free(struct dkim_key *k);

enum dkim_algorithm dkim_key_algorithm(const struct dkim_key *k);
/* Modulus size for RSA, 256 for Ed25519. */
int dkim_key_bits(const struct dkim_key *k);
/* The TXT record to publish at <selector>._domainkey.<domain>:
 * "v=DKIM1; k=rsa; p=<base64 SubjectPublicKeyInfo>" or
 * "v=DKIM1; k=ed25519; p=<base64 of the 32-byte key>" (RFC 8463 §4.2).
 * Returns its length (NUL written too), or -1 if it does not fit. */
int dkim_key_dns_record(const struct dkim_key *k, char *out, size_t outcap);

/* ---- signing ------------------------------------------------------------- */

/* What to sign with. Zeroed fields take the defaults, so
 *     struct dkim_signer s = {.domain = "example.com", .selector = "mail", .key = k};
 * is a complete configuration. Lists are NULL-terminated; names are
 * matched case-insensitively and emitted in h= as spelled here. */
struct dkim_signer {
    const char *domain;            /* d=, e.g. "example.com" */
    const char *selector;          /* s=, e.g. "mail2025" */
    const struct dkim_key *key;
    /* Header fields signed when present; NULL: dkim_default_headers.
     * Must name From (RFC 6376 §5.4). */
    const char *const *headers;
    /* Names listed once more in h= than they occur, so that an instance
     * added later breaks the signature (RFC 6376 §5.4.2, §8.15). NULL:
     * dkim_default_oversign; an empty list ({NULL}) for none. */
    const char *const *oversign;
    int timestamp;                 /* nonzero: t= the signing time */
    unsigned long expire;          /* nonzero: x= signing time + this many seconds */
};

/* From, To, Cc, Subject, Date, Message-ID, Reply-To, In-Reply-To,
 * References, MIME-Version, Content-Type, Content-Transfer-Encoding,
 * List-Unsubscribe, List-Unsubscribe-Post. */
extern const char *const dkim_default_headers[];
/* From, Subject. */
extern const char *const dkim_default_oversign[];

/* 0 if s can sign, or -1 with a sentence naming the bad field in err.
 * For configuration time; dkim_sign() checks the same things silently. */
int dkim_signer_check(const struct dkim_signer *s, char *err, size_t errlen);

/* Sign msg (header section, empty line, body; lines end in CRLF) at time
 * now. Writes the whole "DKIM-Signature: ...\r\n" field to out, folded at
 * 78 columns with CRLF TAB, to be prepended to msg unchanged; returns its
 * length (a NUL follows it), or -1 if s is invalid, out is too small
 * (DKIM_SIGNATURE_MAX always suffices) or the key fails.
 *
 * Each configured name is signed as many times as it occurs, bottom-up
 * (RFC 6376 §5.4.2), plus once for oversigned names; From is always in h=.
 * A message with more than DKIM_MAX_SIGNED_FIELDS instances of configured
 * names is not signed (-1).
 *
 * Only CRLF ends a line; a bare CR or LF is an ordinary byte (SMTP refuses
 * them). A body whose last line lacks its CRLF is signed as if it had one,
 * which is how SMTP carries it: the CRLF before the final "." ends the last
 * line of text (RFC 5321 §4.1.1.4; RFC 6376 §3.4.4 adds a CRLF too). */
int dkim_sign(const struct dkim_signer *s, const char *msg, size_t len, time_t now,
              char *out, size_t outcap);

/* ---- canonicalization, for tests and the fuzzer --------------------------- */

/* Receives canonical output in runs. */
typedef void dkim_emit_fn(void *ctx, const char *p, size_t n);

/* Relaxed body canonicalization (RFC 6376 §3.4.4) of body[0..len), emitted
 * in runs that point into body wherever the bytes are unchanged. An empty
 * or all-blank body emits nothing. */
void dkim_canon_body(const char *body, size_t len, dkim_emit_fn *emit, void *ctx);

/* Relaxed header canonicalization (RFC 6376 §3.4.2) of one whole header
 * field as it stands in a message (name, colon, value with its folded
 * continuation lines; the final CRLF may be included or not). Emits
 * "name:value" plus CRLF when crlf is nonzero. -1 (nothing emitted) if the
 * field does not start with a field name and colon. */
int dkim_canon_header(const char *field, size_t len, int crlf, dkim_emit_fn *emit, void *ctx);

/* Offset of the body in msg: just past the first empty line, or len if
 * there is none (a message of header fields only). */
size_t dkim_body_offset(const char *msg, size_t len);

#endif
