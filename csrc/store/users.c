/* Password hashes (PBKDF2-SHA256 in passlib's format, crypt(3) SHA-512 as
 * Dovecot writes it, {PLAIN}) and the user table: open addressing keyed by
 * the ASCII-lower-cased address. */
#include "store/users.h"

#include "store/maildir.h"

#include <crypt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/rand.h>

/* OWASP's 2023 figure for PBKDF2-HMAC-SHA256. */
#define USERS_PBKDF2_DEFAULT_ROUNDS 210000u
/* A stored hash is configuration, but a typo of a few digits must not make
 * every login burn minutes of CPU: ten times the default is the ceiling. */
#define USERS_PBKDF2_MAX_ROUNDS 10000000u
#define USERS_PBKDF2_SALT_LEN 16
#define USERS_PBKDF2_HASH_LEN 32
/* passlib accepts salts up to 1024 bytes. */
#define USERS_PBKDF2_SALT_MAX 1024
/* crypt(3) SHA-512: rounds 1000..999999999 are legal, but cost grows with
 * rounds times password length; the default is 5000. */
#define USERS_SHA512_MAX_ROUNDS 10000000ul
#define USERS_SHA512_SALT_MAX 16
#define USERS_SHA512_HASH_LEN 86
/* Longer passwords are refused before hashing: SHA512-CRYPT costs
 * O(length x rounds), and no human types 4 KiB. */
#define USERS_PASSWORD_MAX 4096

#define USERS_INITIAL_CAP 16

static const char PBKDF2_PREFIX[] = "$pbkdf2-sha256$";
static const char SCHEME_PBKDF2[] = "{PBKDF2-SHA256}";
static const char SCHEME_SHA512[] = "{SHA512-CRYPT}";
static const char SCHEME_PLAIN[] = "{PLAIN}";

/* ---- adapted base64 (passlib: '.' for '+', no padding) ---------------- */

static const char AB64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789./";

static int ab64_value(unsigned char c)
{
    if (c >= 'A' && c <= 'Z') return c - 'A';
    if (c >= 'a' && c <= 'z') return c - 'a' + 26;
    if (c >= '0' && c <= '9') return c - '0' + 52;
    if (c == '.') return 62;
    if (c == '/') return 63;
    return -1;
}

/* out needs room for (n * 4 + 2) / 3 characters and a NUL. */
static size_t ab64_encode(const unsigned char *in, size_t n, char *out)
{
    size_t o = 0, i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = AB64[v >> 18];
        out[o++] = AB64[(v >> 12) & 63];
        out[o++] = AB64[(v >> 6) & 63];
        out[o++] = AB64[v & 63];
    }
    if (n - i == 1) {
        uint32_t v = (uint32_t)in[i] << 16;
        out[o++] = AB64[v >> 18];
        out[o++] = AB64[(v >> 12) & 63];
    } else if (n - i == 2) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8;
        out[o++] = AB64[v >> 18];
        out[o++] = AB64[(v >> 12) & 63];
        out[o++] = AB64[(v >> 6) & 63];
    }
    out[o] = '\0';
    return o;
}

/* Decoded length of n characters, or -1 if no unpadded base64 has that
 * length (a lone trailing character carries less than a byte). */
static long ab64_decoded_len(size_t n)
{
    if (n % 4 == 1) return -1;
    return (long)(n / 4 * 3 + (n % 4 ? n % 4 - 1 : 0));
}

/* Decode exactly n characters into out (room for ab64_decoded_len(n)).
 * Returns the byte count or -1 on a character outside the alphabet. Unused
 * low bits of the last character are ignored, as passlib does. */
static long ab64_decode(const char *s, size_t n, unsigned char *out)
{
    long len = ab64_decoded_len(n);
    if (len < 0) return -1;
    uint32_t acc = 0;
    int bits = 0;
    long o = 0;
    for (size_t i = 0; i < n; i++) {
        int v = ab64_value((unsigned char)s[i]);
        if (v < 0) return -1;
        acc = (acc << 6 | (uint32_t)v) & 0xffffff;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            out[o++] = (unsigned char)(acc >> bits);
        }
    }
    return o;
}

/* ---- parsing ----------------------------------------------------------- */

/* Decimal without sign or leading zero (passlib refuses zero-padded
 * rounds), within [min, max]; *end is set past the digits. */
static int parse_rounds(const char *s, unsigned long min, unsigned long max,
                        unsigned long *out, const char **end)
{
    if (*s < '1' || *s > '9') return -1;
    unsigned long v = 0;
    while (*s >= '0' && *s <= '9') {
        v = v * 10 + (unsigned long)(*s - '0');
        if (v > max) return -1;
        s++;
    }
    if (v < min) return -1;
    *out = v;
    *end = s;
    return 0;
}

struct pbkdf2_parsed {
    unsigned long rounds;
    unsigned char salt[USERS_PBKDF2_SALT_MAX];
    size_t salt_len;
    unsigned char hash[USERS_PBKDF2_HASH_LEN];
};

/* s starts at "$pbkdf2-sha256$". */
static int pbkdf2_parse(const char *s, struct pbkdf2_parsed *p)
{
    if (strncmp(s, PBKDF2_PREFIX, sizeof PBKDF2_PREFIX - 1) != 0) return -1;
    s += sizeof PBKDF2_PREFIX - 1;
    if (parse_rounds(s, 1, USERS_PBKDF2_MAX_ROUNDS, &p->rounds, &s) < 0 || *s != '$') return -1;
    const char *salt = ++s;
    const char *dollar = strchr(salt, '$');
    if (dollar == NULL) return -1;
    size_t salt_chars = (size_t)(dollar - salt);
    long salt_len = ab64_decoded_len(salt_chars);
    if (salt_len < 0 || salt_len > USERS_PBKDF2_SALT_MAX) return -1;
    if (ab64_decode(salt, salt_chars, p->salt) != salt_len) return -1;
    p->salt_len = (size_t)salt_len;
    const char *hash = dollar + 1;
    size_t hash_chars = strlen(hash);
    if (ab64_decoded_len(hash_chars) != USERS_PBKDF2_HASH_LEN) return -1;
    if (ab64_decode(hash, hash_chars, p->hash) != USERS_PBKDF2_HASH_LEN) return -1;
    return 0;
}

static int crypt_char(unsigned char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
           c == '.' || c == '/';
}

/* "$6$[rounds=N$]salt$hash": salt of at most 16 and hash of exactly 86
 * characters from crypt's alphabet. */
static int sha512_crypt_valid(const char *s)
{
    if (strncmp(s, "$6$", 3) != 0) return -1;
    s += 3;
    if (strncmp(s, "rounds=", 7) == 0) {
        unsigned long rounds;
        if (parse_rounds(s + 7, 1000, USERS_SHA512_MAX_ROUNDS, &rounds, &s) < 0 || *s != '$')
            return -1;
        s++;
    }
    size_t n = 0;
    while (s[n] != '$' && s[n] != '\0') {
        if (!crypt_char((unsigned char)s[n])) return -1;
        n++;
    }
    if (s[n] != '$' || n > USERS_SHA512_SALT_MAX) return -1;
    s += n + 1;
    for (n = 0; s[n] != '\0'; n++)
        if (!crypt_char((unsigned char)s[n])) return -1;
    return n == USERS_SHA512_HASH_LEN ? 0 : -1;
}

/* Dovecot reads the {SCHEME} part case-insensitively. */
static int has_scheme(const char *s, const char *scheme)
{
    return strncasecmp(s, scheme, strlen(scheme)) == 0;
}

enum users_kind { USERS_UNKNOWN = 0, USERS_PBKDF2, USERS_SHA512, USERS_PLAIN };

/* Which format stored is in, with *body past any {SCHEME} prefix. Only
 * the prefix is looked at here; the body is validated by its own parser. */
static enum users_kind users_kind_of(const char *stored, const char **body)
{
    if (has_scheme(stored, SCHEME_PLAIN)) {
        *body = stored + sizeof SCHEME_PLAIN - 1;
        return USERS_PLAIN;
    }
    enum users_kind want = USERS_UNKNOWN;
    if (has_scheme(stored, SCHEME_PBKDF2)) {
        stored += sizeof SCHEME_PBKDF2 - 1;
        want = USERS_PBKDF2;
    } else if (has_scheme(stored, SCHEME_SHA512)) {
        stored += sizeof SCHEME_SHA512 - 1;
        want = USERS_SHA512;
    }
    *body = stored;
    enum users_kind got = USERS_UNKNOWN;
    if (strncmp(stored, PBKDF2_PREFIX, sizeof PBKDF2_PREFIX - 1) == 0) got = USERS_PBKDF2;
    else if (strncmp(stored, "$6$", 3) == 0) got = USERS_SHA512;
    /* A scheme that disagrees with the body ("{SHA512-CRYPT}$pbkdf2-...")
     * is a configuration mistake, not a hash. */
    if (want != USERS_UNKNOWN && want != got) return USERS_UNKNOWN;
    return got;
}

int users_hash_is_known(const char *stored)
{
    if (stored == NULL) return 0;
    const char *body;
    struct pbkdf2_parsed p;
    switch (users_kind_of(stored, &body)) {
    case USERS_PBKDF2:
        return pbkdf2_parse(body, &p) == 0;
    case USERS_SHA512:
        return sha512_crypt_valid(body) == 0;
    case USERS_PLAIN:
        return 1;
    default:
        return 0;
    }
}

/* ---- hashing and verification ----------------------------------------- */

int users_hash_password(const char *password, unsigned rounds, char *out, size_t outlen)
{
    if (password == NULL || out == NULL) return -1;
    size_t pwlen = strlen(password);
    if (pwlen > USERS_PASSWORD_MAX) return -1;
    if (rounds == 0) rounds = USERS_PBKDF2_DEFAULT_ROUNDS;
    if (rounds > USERS_PBKDF2_MAX_ROUNDS) return -1;

    unsigned char salt[USERS_PBKDF2_SALT_LEN], dk[USERS_PBKDF2_HASH_LEN];
    if (RAND_bytes(salt, sizeof salt) != 1) return -1;
    if (PKCS5_PBKDF2_HMAC(password, (int)pwlen, salt, sizeof salt, (int)rounds, EVP_sha256(),
                          sizeof dk, dk) != 1)
        return -1;

    char salt64[(USERS_PBKDF2_SALT_LEN * 4 + 2) / 3 + 1];
    char hash64[(USERS_PBKDF2_HASH_LEN * 4 + 2) / 3 + 1];
    ab64_encode(salt, sizeof salt, salt64);
    ab64_encode(dk, sizeof dk, hash64);
    OPENSSL_cleanse(dk, sizeof dk);

    char buf[128];
    int n = snprintf(buf, sizeof buf, "%s%u$%s$%s", PBKDF2_PREFIX, rounds, salt64, hash64);
    int rc = -1;
    /* out is written only when the whole string fits. */
    if (n > 0 && (size_t)n < outlen) {
        memcpy(out, buf, (size_t)n + 1);
        rc = 0;
    }
    OPENSSL_cleanse(hash64, sizeof hash64);
    OPENSSL_cleanse(buf, sizeof buf);
    return rc;
}

static int pbkdf2_verify(const char *body, const char *password, size_t pwlen)
{
    struct pbkdf2_parsed p;
    if (pbkdf2_parse(body, &p) < 0) return -1;
    unsigned char dk[USERS_PBKDF2_HASH_LEN];
    int ok = PKCS5_PBKDF2_HMAC(password, (int)pwlen, p.salt, (int)p.salt_len, (int)p.rounds,
                               EVP_sha256(), sizeof dk, dk) == 1 &&
             CRYPTO_memcmp(dk, p.hash, sizeof dk) == 0;
    OPENSSL_cleanse(dk, sizeof dk);
    return ok;
}

static int sha512_verify(const char *body, const char *password)
{
    if (sha512_crypt_valid(body) < 0) return -1;
    /* ~32 KiB: too big for a worker's stack, and it must start zeroed. */
    struct crypt_data *cd = calloc(1, sizeof *cd);
    if (cd == NULL) return 0;
    int ok = 0;
    const char *h = crypt_r(password, body, cd);
    /* Failures come back as NULL or a string starting with '*', neither of
     * which can equal a validated "$6$" hash. */
    if (h != NULL) {
        size_t n = strlen(body);
        ok = strlen(h) == n && CRYPTO_memcmp(h, body, n) == 0;
    }
    OPENSSL_cleanse(cd, sizeof *cd);
    free(cd);
    return ok;
}

/* Digests make the comparison independent of both lengths. */
static int plain_verify(const char *want, const char *password, size_t pwlen)
{
    unsigned char a[EVP_MAX_MD_SIZE], b[EVP_MAX_MD_SIZE];
    unsigned alen = 0, blen = 0;
    int ok = EVP_Digest(want, strlen(want), a, &alen, EVP_sha256(), NULL) == 1 &&
             EVP_Digest(password, pwlen, b, &blen, EVP_sha256(), NULL) == 1 && alen == blen &&
             CRYPTO_memcmp(a, b, alen) == 0;
    OPENSSL_cleanse(b, sizeof b);
    return ok;
}

int users_verify_password(const char *stored, const char *password)
{
    if (stored == NULL) return -1;
    const char *body;
    enum users_kind kind = users_kind_of(stored, &body);
    if (kind == USERS_UNKNOWN) return -1;
    if (password == NULL) return 0;
    size_t pwlen = strlen(password);
    /* Still report an unknown format as such, so test it first. */
    if (pwlen > USERS_PASSWORD_MAX) return users_hash_is_known(stored) ? 0 : -1;
    switch (kind) {
    case USERS_PBKDF2:
        return pbkdf2_verify(body, password, pwlen);
    case USERS_SHA512:
        return sha512_verify(body, password);
    case USERS_PLAIN:
        return plain_verify(body, password, pwlen);
    default:
        return -1;
    }
}

/* ---- the table ---------------------------------------------------------- */

struct users_slot {
    char *name;     /* NULL: empty */
    char *hash;
    size_t name_len;
    uint64_t h;
    uint64_t quota_bytes, quota_messages;   /* 0: unlimited */
};

struct users {
    struct users_slot *slots;
    size_t cap;     /* a power of two */
    size_t count;
};

static unsigned char ascii_lower(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') ? (unsigned char)(c + 32) : c;
}

/* FNV-1a over the lower-cased bytes. Names come from configuration, not
 * from the network, so there is nobody to pick colliding keys. */
static uint64_t users_hash_name(const char *name, size_t len)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < len; i++) {
        h ^= ascii_lower((unsigned char)name[i]);
        h *= 0x100000001b3ull;
    }
    return h;
}

static int users_name_eq(const struct users_slot *s, uint64_t h, const char *name, size_t len)
{
    if (s->h != h || s->name_len != len) return 0;
    for (size_t i = 0; i < len; i++)
        if (ascii_lower((unsigned char)s->name[i]) != ascii_lower((unsigned char)name[i]))
            return 0;
    return 1;
}

/* Linear probing; the load limit guarantees an empty slot. */
static size_t users_probe(const struct users_slot *slots, size_t cap, uint64_t h,
                          const char *name, size_t len)
{
    size_t mask = cap - 1;
    size_t i = (size_t)h & mask;
    while (slots[i].name != NULL && !users_name_eq(&slots[i], h, name, len)) i = (i + 1) & mask;
    return i;
}

struct users *users_new(void)
{
    struct users *u = calloc(1, sizeof *u);
    if (u == NULL) return NULL;
    u->slots = calloc(USERS_INITIAL_CAP, sizeof *u->slots);
    if (u->slots == NULL) {
        free(u);
        return NULL;
    }
    u->cap = USERS_INITIAL_CAP;
    return u;
}

/* Hashes may be {PLAIN} passwords: wipe before freeing. */
static void users_free_hash(char *hash)
{
    if (hash == NULL) return;
    OPENSSL_cleanse(hash, strlen(hash));
    free(hash);
}

void users_free(struct users *u)
{
    if (u == NULL) return;
    for (size_t i = 0; i < u->cap; i++) {
        free(u->slots[i].name);
        users_free_hash(u->slots[i].hash);
    }
    free(u->slots);
    free(u);
}

static int users_grow(struct users *u)
{
    if (u->cap > SIZE_MAX / 2 / sizeof *u->slots) return -1;
    size_t cap = u->cap * 2;
    struct users_slot *slots = calloc(cap, sizeof *slots);
    if (slots == NULL) return -1;
    for (size_t i = 0; i < u->cap; i++) {
        const struct users_slot *s = &u->slots[i];
        if (s->name == NULL) continue;
        /* Names are unique, so the first empty slot is the place. */
        size_t j = (size_t)s->h & (cap - 1);
        while (slots[j].name != NULL) j = (j + 1) & (cap - 1);
        slots[j] = *s;
    }
    free(u->slots);
    u->slots = slots;
    u->cap = cap;
    return 0;
}

int users_add(struct users *u, const char *name, const char *hash)
{
    if (u == NULL || name == NULL || hash == NULL) return -1;
    size_t len = strlen(name);
    uint64_t h = users_hash_name(name, len);
    char *hash_copy = strdup(hash);
    if (hash_copy == NULL) return -1;

    size_t i = users_probe(u->slots, u->cap, h, name, len);
    if (u->slots[i].name != NULL) {
        /* Replace: the first spelling of the name is kept. */
        users_free_hash(u->slots[i].hash);
        u->slots[i].hash = hash_copy;
        return 0;
    }
    char *name_copy = strdup(name);
    if (name_copy == NULL) {
        users_free_hash(hash_copy);
        return -1;
    }
    /* Grow at 70% load, before inserting, so a failed grow changes nothing. */
    if ((u->count + 1) * 10 > u->cap * 7) {
        if (users_grow(u) < 0) {
            free(name_copy);
            users_free_hash(hash_copy);
            return -1;
        }
        i = users_probe(u->slots, u->cap, h, name, len);
    }
    u->slots[i] = (struct users_slot){.name = name_copy, .hash = hash_copy, .name_len = len, .h = h};
    u->count++;
    return 0;
}

const char *users_find(const struct users *u, const char *name, size_t len)
{
    if (u == NULL || (name == NULL && len > 0)) return NULL;
    uint64_t h = users_hash_name(name, len);
    size_t i = users_probe(u->slots, u->cap, h, name, len);
    return u->slots[i].hash; /* NULL for the empty slot */
}

int users_set_quota(struct users *u, const char *name, uint64_t bytes, uint64_t messages)
{
    if (u == NULL || name == NULL) return -1;
    size_t len = strlen(name);
    size_t i = users_probe(u->slots, u->cap, users_hash_name(name, len), name, len);
    if (u->slots[i].name == NULL) return -1;
    u->slots[i].quota_bytes = bytes;
    u->slots[i].quota_messages = messages;
    return 0;
}

bool users_quota(const struct users *u, const char *name, size_t len, uint64_t *bytes, uint64_t *messages)
{
    *bytes = *messages = 0;
    if (u == NULL || u->cap == 0) return false;
    size_t i = users_probe(u->slots, u->cap, users_hash_name(name, len), name, len);
    if (u->slots[i].name == NULL) return false;
    *bytes = u->slots[i].quota_bytes;
    *messages = u->slots[i].quota_messages;
    return true;
}

bool users_is_mailbox(void *table, const char *addr, size_t len)
{
    const struct users *u = table;
    if (users_find(u, addr, len)) return true;
    char mbox[600];
    int n = mailbox_of(addr, len, mbox, sizeof mbox);
    return n > 0 && (size_t)n != len && users_find(u, mbox, (size_t)n) != NULL;
}

size_t users_count(const struct users *u)
{
    return u == NULL ? 0 : u->count;
}
