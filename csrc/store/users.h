/* The user table: address -> password hash, shared by SMTP AUTH, POP3 and
 * IMAP. Hashes are salted and slow (PBKDF2-SHA256 through OpenSSL); Dovecot's
 * SHA512-CRYPT is accepted too so a Dovecot user list can be moved as is. */
#ifndef STORE_USERS_H
#define STORE_USERS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Hash a password as "$pbkdf2-sha256$ROUNDS$SALT$HASH" (passlib's format:
 * adapted base64 without padding, 16 random salt bytes, 32-byte hash).
 * rounds 0 means the default (210000). 0 on success, -1 on failure. */
int users_hash_password(const char *password, unsigned rounds,
                        char *out, size_t outlen);

/* 1 if password matches stored, 0 if not, -1 if stored is not a known
 * format. Known: "$pbkdf2-sha256$...", "{PBKDF2-SHA256}$pbkdf2-sha256$...",
 * "$6$..." and "{SHA512-CRYPT}$6$..." (crypt(3) SHA-512, rounds= honoured),
 * "{PLAIN}text" (for tests and migration only). Comparison is constant-time. */
int users_verify_password(const char *stored, const char *password);

/* 1 if stored is in a known format (checked at configuration time). */
int users_hash_is_known(const char *stored);

struct users;   /* open-addressing table, keys compared case-insensitively */

struct users *users_new(void);
void users_free(struct users *u);
/* Add or replace. 0, or -1 on allocation failure. */
int users_add(struct users *u, const char *name, const char *hash);
/* The stored hash, or NULL. name need not be NUL-terminated. */
const char *users_find(const struct users *u, const char *name, size_t len);
size_t users_count(const struct users *u);
/* Is addr (not NUL-terminated) a user, also as user+tag@domain
 * (plus-addressing: the tag is for the user's own filing)? table is a
 * struct users (void * so it serves as aliases_resolve's is_user). */
bool users_is_mailbox(void *table, const char *addr, size_t len);
/* A user's mailbox quota (0: unlimited); -1 when the user is unknown. */
int users_set_quota(struct users *u, const char *name, uint64_t bytes, uint64_t messages);
/* true when name is a user; its quota goes to bytes and messages. */
bool users_quota(const struct users *u, const char *name, size_t len, uint64_t *bytes, uint64_t *messages);

#endif
