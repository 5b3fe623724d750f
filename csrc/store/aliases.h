/* Virtual aliases for the local domains, in the spirit of Postfix's
 * virtual_alias_maps: an address maps to one or more addresses (local or
 * remote); a "@domain" key is the catch-all for that domain's addresses
 * that are neither users nor aliases; "@domain" -> "@other" maps a whole
 * domain onto another (domain alias: user@domain becomes user@other).
 *
 * Resolution of an address, repeated on every result (at most
 * ALIAS_MAX_DEPTH levels, at most ALIAS_MAX_TARGETS final addresses):
 *   1. an exact alias (the address as given, then without its "+tag");
 *      a target equal to the alias itself is final (the mailbox keeps a
 *      copy, as "me@x: me@x, you@y" does in Postfix);
 *   2. else a user of the user table is final;
 *   3. else the catch-all of its domain;
 *   4. else the address is final as it is.
 * Final addresses are deduplicated. Keys and targets are stored in lower
 * case; lookups are case-insensitive. */
#ifndef STORE_ALIASES_H
#define STORE_ALIASES_H

#include <stdbool.h>
#include <stddef.h>

#define ALIAS_MAX_DEPTH 10
#define ALIAS_MAX_TARGETS 64
#define ALIAS_ADDR_MAX 320

struct aliases;

struct aliases *aliases_new(void);
void aliases_free(struct aliases *a);
/* Add one target to key (keys may have many). -EINVAL when key or target
 * is not an address or "@domain", or when a "@domain" target is given to
 * an address key; -ENOMEM. */
int aliases_add(struct aliases *a, const char *key, const char *target);
size_t aliases_count(const struct aliases *a);

struct alias_result {
    unsigned n;
    char addr[ALIAS_MAX_TARGETS][ALIAS_ADDR_MAX];
};

/* is_user(ctx, addr, len): does a mailbox user exist for addr (which may
 * carry a +tag)? Resolve addr into res: 1 when an alias applied, 0 when
 * none did (addr is final as it is; res is left empty), -ELOOP when the
 * chain is deeper than ALIAS_MAX_DEPTH, -E2BIG beyond ALIAS_MAX_TARGETS,
 * -EINVAL when addr is not an address. */
int aliases_resolve(const struct aliases *a, const char *addr, size_t len,
                    bool (*is_user)(void *ctx, const char *addr, size_t len), void *ctx,
                    struct alias_result *res);

/* RFC 3461 §4 xtext of s into out ("+XX" for '+', '=' and bytes outside
 * 0x21..0x7E). The length written, or -1 when it does not fit. */
int aliases_xtext(const char *s, size_t len, char *out, size_t cap);

#endif
