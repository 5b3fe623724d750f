/* The asynchronous stub resolver on a worker's loop: MX, A and AAAA queries
 * over UDP (TCP when truncated) through io_uring, a bounded TTL cache, and the
 * MX selection of RFC 5321 §5.1 (preference order, implicit MX, null MX). */
#ifndef DNS_RESOLVER_H
#define DNS_RESOLVER_H

#include <stddef.h>
#include <stdint.h>

#include "dns/msg.h"

struct loop;

#define MX_MAX_HOSTS 16
#define MX_MAX_ADDRS 8           /* addresses kept per host */

/* Limits and defaults; each is a named bound, see docs/internals.md. */
#define DNS_MAX_SERVERS      8       /* name servers used (resolv.conf has 3) */
#define DNS_TIMEOUT_MS       2000    /* per try, unless `options timeout:` */
#define DNS_ATTEMPTS         2       /* tries per server, unless `options attempts:` */
#define DNS_CACHE_MAX        10000   /* cached answers per resolver */
#define DNS_TTL_MAX_POS      86400   /* positive answers: at most a day */
#define DNS_TTL_MAX_NEG      10800   /* negative answers: at most 3 hours (RFC 2308 §5) */
#define DNS_TTL_NEG_NO_SOA   60      /* negative answer without an SOA */
#define DNS_MAX_INFLIGHT     128     /* queries on the wire at once; others wait */
#define DNS_MAX_LOOKUPS      4096    /* lookups pending at once; more get -EAGAIN */
#define DNS_MAX_REQUERY      4       /* new queries at a CNAME target, per name */

struct mx_addr {
    uint8_t family;              /* AF_INET (4 bytes used) / AF_INET6 */
    uint8_t addr[16];
};

struct mx_host {
    char name[DNS_NAME_TEXT];    /* lower case, no trailing dot; for an implicit MX the domain */
    uint16_t pref;
    int status;                  /* 0: addresses found; MX_TEMP: its A/AAAA lookup failed
                                    temporarily; MX_NOHOST: it has none. Skip a host
                                    whose status is not 0. */
    unsigned naddr;
    /* IPv4 first, then IPv6. When a host has more than MX_MAX_ADDRS, each
     * family keeps at least half of the slots it can fill, so a host never
     * loses a whole family to the other. */
    struct mx_addr addr[MX_MAX_ADDRS];
};

enum mx_status {
    MX_OK = 0,       /* hosts[] usable (at least one host has an address) */
    MX_NULL,         /* RFC 7505 null MX: permanent, 5.1.10 */
    MX_NXDOMAIN,     /* domain does not exist: permanent (5.1.2) */
    MX_NOHOST,       /* no MX and no A/AAAA, or every MX host has no address: permanent
                        (5.1.2) -- but if any host was MX_TEMP the result is MX_TEMP */
    MX_TEMP,         /* SERVFAIL, REFUSED, timeout, malformed, CNAME loop...: temporary (4.4.3) */
};

struct mx_result {
    enum mx_status status;
    int implicit;                /* no MX: the domain itself (RFC 5321 §5.1) */
    unsigned nhosts;
    struct mx_host hosts[MX_MAX_HOSTS];  /* preference order; equal preferences shuffled per lookup */
    char detail[160];            /* e.g. "servfail from 127.0.0.1:5353 for MX example.test" */
};

struct dns_resolver;
struct mx_lookup;
typedef void (*mx_done_fn)(void *arg, const struct mx_result *r);

/* servers: NULL -> the name servers of /etc/resolv.conf (and its `options
 * timeout:` and `attempts:`), else "HOST:PORT[,HOST:PORT...]" with
 * "[v6]:port" for IPv6, port optional (53). HOST is an IP address. NULL with
 * a message in err on bad input or when out of memory. */
struct dns_resolver *dns_resolver_new(struct loop *l, const char *servers, char *err, size_t errlen);
/* The same from a resolv.conf-format file (missing file: 127.0.0.1:53). */
struct dns_resolver *dns_resolver_new_conf(struct loop *l, const char *path, char *err, size_t errlen);
/* Pending lookups are dropped without their callbacks. Queries still on the
 * wire are cancelled; their memory, and the resolver's, is released when the
 * kernel gives back their last operation (a later loop turn), so call it
 * while the loop still turns: what is in the kernel when the ring is torn
 * down is never touched again, but not freed either. May be called from a
 * lookup's callback. */
void dns_resolver_free(struct dns_resolver *r);

/* Per-try timeout (1..60000 ms) and tries per server (1..10); -EINVAL else. */
int dns_resolver_set_timeout(struct dns_resolver *r, unsigned timeout_ms, unsigned attempts);
/* Most answers cached (0: no cache); entries over the new bound are dropped. */
void dns_resolver_set_cache_max(struct dns_resolver *r, unsigned max_entries);

struct dns_resolver_stats {
    uint64_t lookups;        /* mx_lookup/host_lookup calls accepted */
    uint64_t queries;        /* query messages sent, UDP and TCP, every try */
    uint64_t tcp;            /* of which over TCP */
    uint64_t cache_hits;     /* answers taken from the cache */
    uint64_t coalesced;      /* needs met by a query already under way */
    uint64_t timeouts;       /* tries that timed out */
    uint64_t mismatched;     /* datagrams ignored: not the answer to our query */
    uint64_t edns_fallbacks; /* queries repeated without EDNS */
    unsigned cache_entries;
    unsigned queries_active; /* queries under way or waiting for a slot */
    unsigned lookups_active;
    unsigned servers, timeout_ms, attempts;   /* the configuration in force */
};
void dns_resolver_stats(const struct dns_resolver *r, struct dns_resolver_stats *out);

/* Resolve the MX set of a mail domain (also "[192.0.2.1]" / "[IPv6:2001:db8::1]"
 * address literals: one implicit host, no DNS). fn is always called later from
 * the loop, never inside this call. Returns 0 or -errno (EINVAL for a bad name,
 * EAGAIN past DNS_MAX_LOOKUPS, ENOMEM). */
int mx_lookup(struct dns_resolver *r, const char *domain, mx_done_fn fn, void *arg,
              struct mx_lookup **handle /* may be NULL */);
/* Addresses of one host name (A and AAAA, CNAMEs followed), for a smarthost:
 * the result has one host, implicit=1. An IP literal ("192.0.2.1", "::1") is
 * answered without DNS. */
int host_lookup(struct dns_resolver *r, const char *name, mx_done_fn fn, void *arg,
                struct mx_lookup **handle);
/* The callback will not run; safe until the callback has run (a no-op from
 * inside that callback). */
void mx_lookup_cancel(struct mx_lookup *h);

/* "ok", "null-mx", "nxdomain", "nohost", "temp"; "?" otherwise. */
const char *mx_status_name(int status);

#endif
