/* Virtual aliases (see aliases.h): an open-addressing table from the
 * lower-cased key to its list of targets. */
#include "store/aliases.h"

#include "store/maildir.h"

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

struct alias_entry {
    char *key;                    /* NULL: empty slot */
    char **targets;
    unsigned n, cap;
};

struct aliases {
    struct alias_entry *slots;
    size_t cap, used;
};

static uint64_t hash_lower(const char *s, size_t n)
{
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (c >= 'A' && c <= 'Z') c += 32;
        h = (h ^ c) * 1099511628211ull;
    }
    return h;
}

static bool key_eq(const char *key, const char *s, size_t n)
{
    return strlen(key) == n && strncasecmp(key, s, n) == 0;
}

struct aliases *aliases_new(void)
{
    return calloc(1, sizeof(struct aliases));
}

void aliases_free(struct aliases *a)
{
    if (!a) return;
    for (size_t i = 0; i < a->cap; i++) {
        struct alias_entry *e = &a->slots[i];
        if (!e->key) continue;
        for (unsigned k = 0; k < e->n; k++) free(e->targets[k]);
        free(e->targets);
        free(e->key);
    }
    free(a->slots);
    free(a);
}

size_t aliases_count(const struct aliases *a)
{
    return a ? a->used : 0;
}

static struct alias_entry *find(const struct aliases *a, const char *s, size_t n)
{
    if (!a || !a->cap) return NULL;
    size_t i = hash_lower(s, n) & (a->cap - 1);
    while (a->slots[i].key) {
        if (key_eq(a->slots[i].key, s, n)) return &a->slots[i];
        i = (i + 1) & (a->cap - 1);
    }
    return NULL;
}

static int grow(struct aliases *a)
{
    size_t nc = a->cap ? a->cap * 2 : 64;
    struct alias_entry *ns = calloc(nc, sizeof *ns);
    if (!ns) return -ENOMEM;
    for (size_t i = 0; i < a->cap; i++) {
        if (!a->slots[i].key) continue;
        size_t j = hash_lower(a->slots[i].key, strlen(a->slots[i].key)) & (nc - 1);
        while (ns[j].key) j = (j + 1) & (nc - 1);
        ns[j] = a->slots[i];
    }
    free(a->slots);
    a->slots = ns;
    a->cap = nc;
    return 0;
}

/* "local@domain" or "@domain": printable, no spaces, one '@', a domain. */
static bool valid(const char *s, bool allow_domain_only)
{
    size_t n = strlen(s);
    const char *at = strrchr(s, '@');
    if (!at || n >= ALIAS_ADDR_MAX || !at[1]) return false;
    if (at == s && !allow_domain_only) return false;
    for (const char *p = s; *p; p++)
        if ((unsigned char)*p <= 0x20 || *p == 0x7f || *p == '<' || *p == '>') return false;
    return strchr(at + 1, '@') == NULL;
}

static char *lower_dup(const char *s)
{
    char *d = strdup(s);
    if (d)
        for (char *p = d; *p; p++)
            if (*p >= 'A' && *p <= 'Z') *p += 32;
    return d;
}

int aliases_add(struct aliases *a, const char *key, const char *target)
{
    if (!a || !valid(key, true) || !valid(target, true)) return -EINVAL;
    if (target[0] == '@' && key[0] != '@') return -EINVAL;
    struct alias_entry *e = find(a, key, strlen(key));
    if (!e) {
        if ((a->used + 1) * 2 > a->cap && grow(a) < 0) return -ENOMEM;
        size_t i = hash_lower(key, strlen(key)) & (a->cap - 1);
        while (a->slots[i].key) i = (i + 1) & (a->cap - 1);
        e = &a->slots[i];
        e->key = lower_dup(key);
        if (!e->key) return -ENOMEM;
        a->used++;
    }
    if (e->n == e->cap) {
        unsigned nc = e->cap ? e->cap * 2 : 2;
        char **t = realloc(e->targets, nc * sizeof *t);
        if (!t) return -ENOMEM;
        e->targets = t;
        e->cap = nc;
    }
    e->targets[e->n] = lower_dup(target);
    if (!e->targets[e->n]) return -ENOMEM;
    e->n++;
    return 0;
}

struct resolve_ctx {
    const struct aliases *a;
    bool (*is_user)(void *ctx, const char *addr, size_t len);
    void *uctx;
    struct alias_result *res;
    bool applied;                 /* an alias or a catch-all was used */
};

static int add_final(struct resolve_ctx *c, const char *addr, size_t len)
{
    if (len >= ALIAS_ADDR_MAX) return -EINVAL;
    for (unsigned i = 0; i < c->res->n; i++)
        if (key_eq(c->res->addr[i], addr, len)) return 0;
    if (c->res->n >= ALIAS_MAX_TARGETS) return -E2BIG;
    char *d = c->res->addr[c->res->n++];
    for (size_t i = 0; i < len; i++) d[i] = (char)(addr[i] >= 'A' && addr[i] <= 'Z' ? addr[i] + 32 : addr[i]);
    d[len] = 0;
    return 0;
}

/* The exact alias of addr: as given, then as the mailbox it names
 * (without "+tag"). */
static const struct alias_entry *exact(const struct aliases *a, const char *addr, size_t len)
{
    const struct alias_entry *e = find(a, addr, len);
    if (e) return e;
    char buf[ALIAS_ADDR_MAX];
    int n = mailbox_of(addr, len, buf, sizeof buf);
    return n > 0 && (size_t)n != len ? find(a, buf, (size_t)n) : NULL;
}

static int resolve(struct resolve_ctx *c, const char *addr, size_t len, unsigned depth)
{
    if (depth > ALIAS_MAX_DEPTH) return -ELOOP;
    const char *atp = NULL;
    for (size_t i = len; i > 0; i--)
        if (addr[i - 1] == '@') {
            atp = addr + i - 1;
            break;
        }
    if (!atp || atp == addr || (size_t)(atp - addr) + 1 >= len) return -EINVAL;
    size_t at = (size_t)(atp - addr);
    const struct alias_entry *e = exact(c->a, addr, len);
    if (e) {
        c->applied = true;
        for (unsigned k = 0; k < e->n; k++) {
            const char *t = e->targets[k];
            size_t tl = strlen(t);
            int rc = key_eq(t, addr, len) ? add_final(c, addr, len) : resolve(c, t, tl, depth + 1);
            if (rc < 0) return rc;
        }
        return 1;
    }
    if (c->is_user && c->is_user(c->uctx, addr, len)) return add_final(c, addr, len);
    e = find(c->a, atp, len - at);
    if (!e) return add_final(c, addr, len);
    c->applied = true;
    for (unsigned k = 0; k < e->n; k++) {
        const char *t = e->targets[k];
        int rc;
        if (t[0] == '@') {
            /* Domain alias: the same local part in the other domain. */
            char buf[ALIAS_ADDR_MAX];
            size_t tl = strlen(t);
            if (at + tl >= sizeof buf) return -EINVAL;
            memcpy(buf, addr, at);
            memcpy(buf + at, t, tl);
            rc = resolve(c, buf, at + tl, depth + 1);
        } else {
            rc = resolve(c, t, strlen(t), depth + 1);
        }
        if (rc < 0) return rc;
    }
    return 1;
}

int aliases_resolve(const struct aliases *a, const char *addr, size_t len,
                    bool (*is_user)(void *ctx, const char *addr, size_t len), void *ctx,
                    struct alias_result *res)
{
    res->n = 0;
    if (!a || !a->used) return 0;
    struct resolve_ctx c = {a, is_user, ctx, res, false};
    int rc = resolve(&c, addr, len, 0);
    if (rc < 0) {
        res->n = 0;
        return rc;
    }
    if (!c.applied) {
        res->n = 0;
        return 0;
    }
    return 1;
}

int aliases_xtext(const char *s, size_t len, char *out, size_t cap)
{
    static const char hex[] = "0123456789ABCDEF";
    size_t o = 0;
    for (size_t i = 0; i < len; i++) {
        unsigned char ch = (unsigned char)s[i];
        if (ch < 0x21 || ch > 0x7e || ch == '+' || ch == '=') {
            if (o + 3 >= cap) return -1;
            out[o++] = '+';
            out[o++] = hex[ch >> 4];
            out[o++] = hex[ch & 15];
        } else {
            if (o + 1 >= cap) return -1;
            out[o++] = (char)ch;
        }
    }
    out[o] = 0;
    return (int)o;
}
