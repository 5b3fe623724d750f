/* sources: csrc/dns/resolver.c csrc/dns/msg.c csrc/core/loop.c csrc/core/timer.c csrc/core/buf.c csrc/core/log.c */
/* libs: -luring */
/* The MX resolver on a real io_uring loop. Without MAILENGINE_TEST_DNS only
 * what needs no server runs (server lists, resolv.conf, address literals, bad
 * names, cancel and free). tests/test_dns.py sets MAILENGINE_TEST_DNS to an
 * unbound serving the zone written there (the names below must match it),
 * MAILENGINE_TEST_DNS_DEAD to a UDP socket that never answers, and
 * MAILENGINE_TEST_DNS_ODD to a server that answers EDNS with FORMERR and
 * sends a forged answer before the real one. */
#include "dns/resolver.h"

#include <arpa/inet.h>
#include <errno.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "check.h"
#include "core/loop.h"
#include "core/timer.h"

static struct loop L;
static int outstanding;         /* callbacks still expected */
static int timed_out;

static void guard_fire(struct timer *t)
{
    (void)t;
    timed_out = 1;
    loop_stop(&L);
}

/* Run the loop until `outstanding` reaches 0 (the callbacks stop it) or
 * max_ms pass. Returns 1 if it timed out. */
static int run_loop(unsigned max_ms)
{
    struct timer guard = {.fn = guard_fire};
    timed_out = 0;
    timer_arm(&L.timers, &guard, max_ms);
    atomic_store(&L.stop, false);
    loop_run(&L);
    timer_cancel(&L.timers, &guard);
    return timed_out;
}

/* Let the loop turn for ms, whatever happens. */
static void run_for(unsigned ms)
{
    int keep = outstanding;
    outstanding = 1 << 20;      /* no callback stops it */
    run_loop(ms);
    outstanding = keep;
}

struct box {
    int calls;
    uint64_t at;                /* when the callback ran */
    struct mx_result r;
    struct dns_resolver *free_me;   /* free this resolver from the callback */
};

static void on_done(void *arg, const struct mx_result *r)
{
    struct box *b = arg;
    b->calls++;
    b->at = timer_now_ms();
    b->r = *r;
    if (b->free_me) dns_resolver_free(b->free_me);
    if (--outstanding == 0) loop_stop(&L);
}

static void never(void *arg, const struct mx_result *r)
{
    (void)r;
    int *calls = arg;
    (*calls)++;
}

static const char *addr_text(const struct mx_addr *a)
{
    static char buf[4][INET6_ADDRSTRLEN];
    static int which;
    char *b = buf[which++ & 3];
    inet_ntop(a->family, a->addr, b, INET6_ADDRSTRLEN);
    return b;
}

static struct dns_resolver *resolver(const char *servers)
{
    char err[200] = "";
    struct dns_resolver *r = dns_resolver_new(&L, servers, err, sizeof err);
    CHECK(r != NULL, "dns_resolver_new(%s): %s", servers, err);
    return r;
}

/* One lookup, waited for. */
static void mx_wait(struct dns_resolver *r, const char *domain, struct box *b)
{
    memset(b, 0, sizeof *b);
    outstanding = 1;
    int rc = mx_lookup(r, domain, on_done, b, NULL);
    CHECK(rc == 0, "mx_lookup(%s) = %d", domain, rc);
    CHECK(b->calls == 0, "callback ran inside mx_lookup(%s)", domain);
    if (rc == 0) CHECK(!run_loop(10000), "mx_lookup(%s) never finished", domain);
    CHECK(b->calls == 1, "%s: %d callbacks", domain, b->calls);
}

static void host_wait(struct dns_resolver *r, const char *name, struct box *b)
{
    memset(b, 0, sizeof *b);
    outstanding = 1;
    int rc = host_lookup(r, name, on_done, b, NULL);
    CHECK(rc == 0, "host_lookup(%s) = %d", name, rc);
    CHECK(b->calls == 0, "callback ran inside host_lookup(%s)", name);
    if (rc == 0) CHECK(!run_loop(10000), "host_lookup(%s) never finished", name);
    CHECK(b->calls == 1, "%s: %d callbacks", name, b->calls);
}

static uint64_t queries(struct dns_resolver *r)
{
    struct dns_resolver_stats st;
    dns_resolver_stats(r, &st);
    return st.queries;
}

static int has_addr(const struct mx_host *h, const char *text)
{
    for (unsigned i = 0; i < h->naddr; i++)
        if (strcmp(addr_text(&h->addr[i]), text) == 0) return 1;
    return 0;
}

/* ---- without a server ----------------------------------------------------- */

static void test_server_lists(void)
{
    static const char *good[] = {
        "127.0.0.1", "127.0.0.1:5353", "[::1]:53", "[::1]", "::1", "1.2.3.4, 5.6.7.8:54",
        "[2001:db8::1]:65535,127.0.0.1",
    };
    static const char *bad[] = {
        "", "127.0.0.1:", "127.0.0.1:0", "127.0.0.1:65536", "localhost", "[::1", "[::1]x",
        "1.2.3.4,", "1.2.3.4:53x", "256.0.0.1", "1,2,3,4,5,6,7,8,9",
        "1.1.1.1,1.1.1.2,1.1.1.3,1.1.1.4,1.1.1.5,1.1.1.6,1.1.1.7,1.1.1.8,1.1.1.9",
    };
    char err[200];
    for (size_t i = 0; i < sizeof good / sizeof good[0]; i++) {
        err[0] = 0;
        struct dns_resolver *r = dns_resolver_new(&L, good[i], err, sizeof err);
        CHECK(r != NULL, "servers \"%s\" refused: %s", good[i], err);
        dns_resolver_free(r);
    }
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        err[0] = 0;
        struct dns_resolver *r = dns_resolver_new(&L, bad[i], err, sizeof err);
        CHECK(r == NULL && err[0], "servers \"%s\" accepted (err \"%s\")", bad[i], err);
        dns_resolver_free(r);
    }
    struct dns_resolver *r = resolver("[::1]:5353,10.0.0.1");
    struct dns_resolver_stats st;
    dns_resolver_stats(r, &st);
    CHECK(st.servers == 2 && st.timeout_ms == DNS_TIMEOUT_MS && st.attempts == DNS_ATTEMPTS,
          "servers %u timeout %u attempts %u", st.servers, st.timeout_ms, st.attempts);
    CHECK(dns_resolver_set_timeout(r, 0, 1) == -EINVAL, "timeout 0 accepted");
    CHECK(dns_resolver_set_timeout(r, 100, 0) == -EINVAL, "attempts 0 accepted");
    CHECK(dns_resolver_set_timeout(r, 150, 3) == 0, "timeout refused");
    dns_resolver_stats(r, &st);
    CHECK(st.timeout_ms == 150 && st.attempts == 3, "timeout %u attempts %u", st.timeout_ms,
          st.attempts);
    dns_resolver_free(r);
}

static void test_resolv_conf(void)
{
    char path[] = "/tmp/mailengine-resolv-XXXXXX";
    int fd = mkstemp(path);
    CHECK(fd >= 0, "mkstemp");
    if (fd < 0) return;
    static const char text[] =
        "# comment\n"
        "domain example.test\n"
        "nameserver 192.0.2.1\n"
        "nameserver   2001:db8::53   # trailing comment\n"
        "nameserver not-an-address\n"
        "options ndots:2 timeout:3 attempts:4 rotate\n"
        "nameserver 192.0.2.2\n";
    CHECK(write(fd, text, sizeof text - 1) == (ssize_t)(sizeof text - 1), "write");
    close(fd);
    char err[200] = "";
    struct dns_resolver *r = dns_resolver_new_conf(&L, path, err, sizeof err);
    CHECK(r != NULL, "resolv.conf refused: %s", err);
    if (r) {
        struct dns_resolver_stats st;
        dns_resolver_stats(r, &st);
        CHECK(st.servers == 3 && st.timeout_ms == 3000 && st.attempts == 4,
              "servers %u timeout %u attempts %u", st.servers, st.timeout_ms, st.attempts);
        dns_resolver_free(r);
    }
    /* glibc's bounds: timeout at most 30 s, attempts at most 5 */
    FILE *f = fopen(path, "w");
    fputs("options timeout:999 attempts:99\n", f);
    fclose(f);
    r = dns_resolver_new_conf(&L, path, err, sizeof err);
    CHECK(r != NULL, "resolv.conf refused: %s", err);
    if (r) {
        struct dns_resolver_stats st;
        dns_resolver_stats(r, &st);
        /* no nameserver: the local machine */
        CHECK(st.servers == 1 && st.timeout_ms == 30000 && st.attempts == 5,
              "servers %u timeout %u attempts %u", st.servers, st.timeout_ms, st.attempts);
        dns_resolver_free(r);
    }
    unlink(path);
    r = dns_resolver_new_conf(&L, path, err, sizeof err);
    CHECK(r != NULL, "a missing resolv.conf must mean 127.0.0.1: %s", err);
    dns_resolver_free(r);
    /* NULL: the system's own file, whatever it says */
    r = dns_resolver_new(&L, NULL, err, sizeof err);
    CHECK(r != NULL, "/etc/resolv.conf: %s", err);
    dns_resolver_free(r);
}

static void test_literals(void)
{
    /* a server that is never asked: literals need no DNS */
    struct dns_resolver *r = resolver("127.0.0.1:1");
    struct box b;

    mx_wait(r, "[192.0.2.1]", &b);
    CHECK(b.r.status == MX_OK && b.r.implicit && b.r.nhosts == 1, "[192.0.2.1]: %s n=%u",
          mx_status_name(b.r.status), b.r.nhosts);
    CHECK(b.r.hosts[0].naddr == 1 && b.r.hosts[0].addr[0].family == AF_INET &&
          strcmp(addr_text(&b.r.hosts[0].addr[0]), "192.0.2.1") == 0, "[192.0.2.1] address");
    CHECK(strcmp(b.r.hosts[0].name, "[192.0.2.1]") == 0, "name %s", b.r.hosts[0].name);

    mx_wait(r, "[IPv6:2001:DB8::1]", &b);
    CHECK(b.r.status == MX_OK && b.r.nhosts == 1 && b.r.hosts[0].naddr == 1 &&
          b.r.hosts[0].addr[0].family == AF_INET6 &&
          strcmp(addr_text(&b.r.hosts[0].addr[0]), "2001:db8::1") == 0, "[IPv6:...] literal");

    host_wait(r, "192.0.2.7", &b);
    CHECK(b.r.status == MX_OK && b.r.implicit && b.r.nhosts == 1 &&
          strcmp(addr_text(&b.r.hosts[0].addr[0]), "192.0.2.7") == 0, "host 192.0.2.7");
    host_wait(r, "::1", &b);
    CHECK(b.r.status == MX_OK && b.r.hosts[0].addr[0].family == AF_INET6 &&
          strcmp(addr_text(&b.r.hosts[0].addr[0]), "::1") == 0, "host ::1");

    CHECK(queries(r) == 0, "a literal sent %llu queries", (unsigned long long)queries(r));

    static const char *bad[] = {
        "", ".", "..", "a..b", ".a", "a b.test", "back\\slash.test", "[192.0.2.1", "[1.2.3]",
        "[IPv6:zz::1]", "[IPv6:192.0.2.1]", "[]", "[192.0.2.1]x",
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.test",
    };
    int calls = 0;
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        struct mx_lookup *h = (struct mx_lookup *)&calls;
        int rc = mx_lookup(r, bad[i], never, &calls, &h);
        CHECK(rc == -EINVAL && h == NULL, "mx_lookup(\"%s\") = %d", bad[i], rc);
        rc = host_lookup(r, bad[i], never, &calls, NULL);
        CHECK(rc == -EINVAL, "host_lookup(\"%s\") = %d", bad[i], rc);
    }
    char longname[300];
    memset(longname, 0, sizeof longname);
    for (int i = 0; i < 64; i++) memcpy(longname + 4 * i, "abc.", 4);   /* 256 octets */
    CHECK(mx_lookup(r, longname, never, &calls, NULL) == -EINVAL, "256-octet name accepted");
    longname[4 * 62] = 0;           /* 248 characters with the dot: fine */
    struct mx_lookup *h = NULL;
    CHECK(mx_lookup(r, longname, never, &calls, &h) == 0 && h, "248-character name refused");
    mx_lookup_cancel(h);

    /* Cancelled before the loop ran: the callback never comes. */
    h = NULL;
    CHECK(mx_lookup(r, "[192.0.2.9]", never, &calls, &h) == 0 && h, "literal lookup");
    mx_lookup_cancel(h);
    run_for(30);
    CHECK(calls == 0, "a cancelled or refused lookup called back %d times", calls);

    /* Freed with lookups pending: no callback either. */
    CHECK(mx_lookup(r, "[192.0.2.10]", never, &calls, NULL) == 0, "literal lookup");
    CHECK(host_lookup(r, "example.test", never, &calls, NULL) == 0, "host lookup");
    dns_resolver_free(r);
    run_for(30);
    CHECK(calls == 0, "a freed resolver called back %d times", calls);
}

/* ---- against unbound -------------------------------------------------------- */

static void test_mx_order(struct dns_resolver *r)
{
    struct box b;
    char first[4][3 * DNS_NAME_TEXT];
    int distinct = 0;

    for (int round = 0; round < 50; round++) {
        mx_wait(r, round % 2 ? "MULTI.mx.test." : "multi.mx.test", &b);
        CHECK(b.r.status == MX_OK && !b.r.implicit && b.r.nhosts == 5, "multi: %s n=%u %s",
              mx_status_name(b.r.status), b.r.nhosts, b.r.detail);
        if (b.r.nhosts != 5) return;
        static const uint16_t prefs[5] = {10, 20, 20, 20, 30};
        for (int i = 0; i < 5; i++)
            CHECK(b.r.hosts[i].pref == prefs[i] && b.r.hosts[i].status == 0 &&
                  b.r.hosts[i].naddr == 1, "multi host %d: %s pref %u status %d naddr %u", i,
                  b.r.hosts[i].name, b.r.hosts[i].pref, b.r.hosts[i].status,
                  b.r.hosts[i].naddr);
        CHECK(strcmp(b.r.hosts[0].name, "a.multi.mx.test") == 0 &&
              strcmp(b.r.hosts[4].name, "c.multi.mx.test") == 0 &&
              has_addr(&b.r.hosts[0], "127.0.0.2") && has_addr(&b.r.hosts[4], "127.0.0.6"),
              "multi ends: %s %s", b.r.hosts[0].name, b.r.hosts[4].name);
        for (int i = 1; i < 4; i++)
            CHECK(strncmp(b.r.hosts[i].name, "b", 1) == 0, "multi middle: %s", b.r.hosts[i].name);
        /* which of b1, b2, b3 came first among the equals */
        char order[3 * DNS_NAME_TEXT];
        snprintf(order, sizeof order, "%s %s %s", b.r.hosts[1].name, b.r.hosts[2].name,
                 b.r.hosts[3].name);
        int seen = 0;
        for (int k = 0; k < distinct; k++) seen |= strcmp(first[k], order) == 0;
        if (!seen && distinct < 4) memcpy(first[distinct++], order, sizeof order);
    }
    /* six orders, each 1/6: the same one 50 times is a broken shuffle */
    CHECK(distinct >= 2, "equal preferences were never shuffled: always %s", first[0]);
}

static void test_cases(struct dns_resolver *r)
{
    struct box b;

    mx_wait(r, "a-only.mx.test", &b);
    CHECK(b.r.status == MX_OK && b.r.implicit && b.r.nhosts == 1 &&
          strcmp(b.r.hosts[0].name, "a-only.mx.test") == 0 && b.r.hosts[0].pref == 0 &&
          b.r.hosts[0].naddr == 1 && has_addr(&b.r.hosts[0], "127.0.0.10"),
          "a-only: %s implicit=%d n=%u %s", mx_status_name(b.r.status), b.r.implicit,
          b.r.nhosts, b.r.detail);

    mx_wait(r, "aaaa-only.mx.test", &b);
    CHECK(b.r.status == MX_OK && b.r.implicit && b.r.hosts[0].naddr == 1 &&
          b.r.hosts[0].addr[0].family == AF_INET6 && has_addr(&b.r.hosts[0], "::1"),
          "aaaa-only: %s %s", mx_status_name(b.r.status), b.r.detail);

    mx_wait(r, "both.mx.test", &b);
    CHECK(b.r.status == MX_OK && b.r.implicit && b.r.hosts[0].naddr == 2 &&
          b.r.hosts[0].addr[0].family == AF_INET && b.r.hosts[0].addr[1].family == AF_INET6 &&
          has_addr(&b.r.hosts[0], "127.0.0.11") && has_addr(&b.r.hosts[0], "::1"),
          "both: %s naddr=%u", mx_status_name(b.r.status), b.r.hosts[0].naddr);

    mx_wait(r, "null.mx.test", &b);
    CHECK(b.r.status == MX_NULL && b.r.nhosts == 0 && strstr(b.r.detail, "null MX"),
          "null MX: %s %s", mx_status_name(b.r.status), b.r.detail);
    mx_wait(r, "nullmix.mx.test", &b);
    CHECK(b.r.status == MX_NULL, "an MX set with a root target: %s", mx_status_name(b.r.status));

    mx_wait(r, "nope.mx.test", &b);
    CHECK(b.r.status == MX_NXDOMAIN && strstr(b.r.detail, "nope.mx.test"), "nxdomain: %s %s",
          mx_status_name(b.r.status), b.r.detail);

    mx_wait(r, "txt-only.mx.test", &b);
    CHECK(b.r.status == MX_NOHOST && b.r.implicit && b.r.nhosts == 1 &&
          b.r.hosts[0].status == MX_NOHOST && b.r.hosts[0].naddr == 0,
          "name with only TXT: %s %s", mx_status_name(b.r.status), b.r.detail);

    /* unbound's local data gives the CNAME without chasing it: the resolver
     * asks again at the target, for the MX and for the addresses. */
    mx_wait(r, "cname.mx.test", &b);
    CHECK(b.r.status == MX_OK && b.r.implicit && strcmp(b.r.hosts[0].name, "cname.mx.test") == 0 &&
          has_addr(&b.r.hosts[0], "127.0.0.12"), "CNAME to a host with A: %s %s",
          mx_status_name(b.r.status), b.r.detail);
    host_wait(r, "cname.mx.test", &b);
    CHECK(b.r.status == MX_OK && b.r.implicit && b.r.nhosts == 1 &&
          has_addr(&b.r.hosts[0], "127.0.0.12"), "host_lookup through a CNAME: %s",
          mx_status_name(b.r.status));

    mx_wait(r, "mxcname.mx.test", &b);
    CHECK(b.r.status == MX_OK && b.r.nhosts == 1 && strcmp(b.r.hosts[0].name, "alias.mx.test") == 0 &&
          has_addr(&b.r.hosts[0], "127.0.0.13"), "MX host that is a CNAME: %s %s",
          mx_status_name(b.r.status), b.r.detail);

    mx_wait(r, "loop.mx.test", &b);
    CHECK(b.r.status == MX_TEMP, "CNAME loop: %s %s", mx_status_name(b.r.status), b.r.detail);

    mx_wait(r, "partial.mx.test", &b);
    CHECK(b.r.status == MX_OK && b.r.nhosts == 2 && b.r.hosts[0].status == MX_NOHOST &&
          b.r.hosts[0].naddr == 0 && strcmp(b.r.hosts[0].name, "noaddr.mx.test") == 0 &&
          b.r.hosts[1].status == 0 && has_addr(&b.r.hosts[1], "127.0.0.14"),
          "one MX host without address: %s n=%u", mx_status_name(b.r.status), b.r.nhosts);

    mx_wait(r, "nohost.mx.test", &b);
    CHECK(b.r.status == MX_NOHOST && b.r.nhosts == 1 && !b.r.implicit &&
          strstr(b.r.detail, "nohost.mx.test"), "only MX host has no address: %s %s",
          mx_status_name(b.r.status), b.r.detail);

    mx_wait(r, "x.broken.test", &b);
    CHECK(b.r.status == MX_TEMP && strstr(b.r.detail, "servfail") &&
          strstr(b.r.detail, "x.broken.test"), "servfail: %s \"%s\"",
          mx_status_name(b.r.status), b.r.detail);

    mx_wait(r, "halftemp.mx.test", &b);
    CHECK(b.r.status == MX_TEMP && b.r.nhosts == 2 && b.r.hosts[0].status == MX_TEMP &&
          b.r.hosts[1].status == MX_NOHOST, "temp + no address: %s %s",
          mx_status_name(b.r.status), b.r.detail);
    mx_wait(r, "halfok.mx.test", &b);
    CHECK(b.r.status == MX_OK && b.r.nhosts == 2 && b.r.hosts[0].status == MX_TEMP &&
          b.r.hosts[1].status == 0, "temp + good: %s", mx_status_name(b.r.status));

    host_wait(r, "v6.mx.test", &b);
    CHECK(b.r.status == MX_OK && b.r.hosts[0].naddr == 2 &&
          b.r.hosts[0].addr[0].family == AF_INET6 && b.r.hosts[0].addr[1].family == AF_INET6,
          "two AAAA: %s n=%u", mx_status_name(b.r.status), b.r.hosts[0].naddr);
    host_wait(r, "nothing-here.mx.test", &b);
    CHECK(b.r.status == MX_NOHOST && strstr(b.r.detail, "nothing-here.mx.test"),
          "host_lookup of a missing name: %s %s", mx_status_name(b.r.status), b.r.detail);

    /* Many addresses: each family keeps some of the MX_MAX_ADDRS slots. */
    host_wait(r, "many.mx.test", &b);
    unsigned n4 = 0, n6 = 0;
    for (unsigned i = 0; i < b.r.hosts[0].naddr; i++) {
        if (b.r.hosts[0].addr[i].family == AF_INET) CHECK(n6 == 0, "IPv4 after IPv6");
        n4 += b.r.hosts[0].addr[i].family == AF_INET;
        n6 += b.r.hosts[0].addr[i].family == AF_INET6;
    }
    CHECK(b.r.status == MX_OK && b.r.hosts[0].naddr == MX_MAX_ADDRS && n4 == 4 && n6 == 4,
          "many addresses: %s v4=%u v6=%u", mx_status_name(b.r.status), n4, n6);
}

/* Answers too big for 1232 octets: unbound sets TC, we ask over TCP. */
static void test_tcp(struct dns_resolver *r)
{
    struct dns_resolver_stats st0, st1;
    struct box b;

    dns_resolver_stats(r, &st0);
    mx_wait(r, "big.mx.test", &b);
    dns_resolver_stats(r, &st1);
    CHECK(st1.tcp > st0.tcp, "no TCP query for a truncated answer");
    CHECK(b.r.status == MX_OK && b.r.nhosts == MX_MAX_HOSTS, "big: %s n=%u %s",
          mx_status_name(b.r.status), b.r.nhosts, b.r.detail);
    for (unsigned i = 0; i < b.r.nhosts; i++)
        CHECK(b.r.hosts[i].pref == i + 1 && b.r.hosts[i].status == 0 &&
              has_addr(&b.r.hosts[i], "127.0.0.20"), "big host %u: pref %u %s", i,
              b.r.hosts[i].pref, b.r.hosts[i].name);

    dns_resolver_stats(r, &st0);
    host_wait(r, "manya.mx.test", &b);
    dns_resolver_stats(r, &st1);
    CHECK(st1.tcp > st0.tcp && b.r.status == MX_OK && b.r.hosts[0].naddr == MX_MAX_ADDRS,
          "many A records over TCP: %s naddr=%u", mx_status_name(b.r.status),
          b.r.hosts[0].naddr);
}

static void test_cache(struct dns_resolver *r)
{
    struct box b;
    struct dns_resolver_stats st;

    mx_wait(r, "cached.mx.test", &b);
    uint64_t q0 = queries(r);
    CHECK(b.r.status == MX_OK && q0 > 0, "cached: %s", mx_status_name(b.r.status));
    mx_wait(r, "cached.mx.test", &b);
    CHECK(b.r.status == MX_OK && queries(r) == q0, "second lookup sent %llu queries",
          (unsigned long long)(queries(r) - q0));
    dns_resolver_stats(r, &st);
    CHECK(st.cache_hits >= 3 && st.cache_entries > 0, "cache hits %llu entries %u",
          (unsigned long long)st.cache_hits, st.cache_entries);

    /* RFC 2308: gone.neg.test's NXDOMAIN lives min(SOA TTL, MINIMUM) = 1 s */
    mx_wait(r, "gone.neg.test", &b);
    q0 = queries(r);
    CHECK(b.r.status == MX_NXDOMAIN, "gone.neg.test: %s", mx_status_name(b.r.status));
    mx_wait(r, "gone.neg.test", &b);
    CHECK(b.r.status == MX_NXDOMAIN && queries(r) == q0, "negative answer not cached");
    run_for(1300);
    mx_wait(r, "gone.neg.test", &b);
    CHECK(b.r.status == MX_NXDOMAIN && queries(r) == q0 + 1,
          "expired negative answer: %llu queries", (unsigned long long)(queries(r) - q0));

    /* positive TTL of 1 s (A), negative of 1 s (AAAA) */
    host_wait(r, "short.neg.test", &b);
    q0 = queries(r);
    CHECK(b.r.status == MX_OK, "short.neg.test: %s", mx_status_name(b.r.status));
    host_wait(r, "short.neg.test", &b);
    CHECK(queries(r) == q0, "1-second answer not cached");
    run_for(1300);
    host_wait(r, "short.neg.test", &b);
    CHECK(b.r.status == MX_OK && queries(r) == q0 + 2, "expired answers: %llu queries",
          (unsigned long long)(queries(r) - q0));

    /* Not cached: SERVFAIL */
    mx_wait(r, "y.broken.test", &b);
    q0 = queries(r);
    mx_wait(r, "y.broken.test", &b);
    CHECK(b.r.status == MX_TEMP && queries(r) > q0, "servfail was cached");

    /* A bounded cache: the least recently used answer goes. */
    dns_resolver_set_cache_max(r, 2);
    dns_resolver_stats(r, &st);
    CHECK(st.cache_entries <= 2, "cache holds %u > 2", st.cache_entries);
    mx_wait(r, "a-only.mx.test", &b);
    dns_resolver_stats(r, &st);
    CHECK(st.cache_entries == 2 && b.r.status == MX_OK, "bounded cache holds %u",
          st.cache_entries);
    dns_resolver_set_cache_max(r, 0);
    q0 = queries(r);
    mx_wait(r, "a-only.mx.test", &b);
    dns_resolver_stats(r, &st);
    CHECK(st.cache_entries == 0 && queries(r) == q0 + 3, "no cache: %u entries, %llu queries",
          st.cache_entries, (unsigned long long)(queries(r) - q0));
    dns_resolver_set_cache_max(r, DNS_CACHE_MAX);
}

static void test_coalesce(struct dns_resolver *r)
{
    struct box b[5];
    struct dns_resolver_stats st0, st1;

    dns_resolver_stats(r, &st0);
    memset(b, 0, sizeof b);
    outstanding = 5;
    for (int i = 0; i < 5; i++)
        CHECK(mx_lookup(r, "coal.mx.test", on_done, &b[i], NULL) == 0, "mx_lookup");
    CHECK(!run_loop(10000), "coalesced lookups never finished");
    dns_resolver_stats(r, &st1);
    for (int i = 0; i < 5; i++)
        CHECK(b[i].calls == 1 && b[i].r.status == MX_OK && has_addr(&b[i].r.hosts[0], "127.0.0.15"),
              "coalesced lookup %d: %d calls %s", i, b[i].calls, mx_status_name(b[i].r.status));
    /* one MX, then one A and one AAAA: three packets for five lookups */
    CHECK(st1.queries - st0.queries == 3 && st1.coalesced - st0.coalesced >= 4,
          "coalescing: %llu queries, %llu joined",
          (unsigned long long)(st1.queries - st0.queries),
          (unsigned long long)(st1.coalesced - st0.coalesced));
}

static void test_cancel(struct dns_resolver *r, const char *dead)
{
    int calls = 0;
    struct box b;
    struct mx_lookup *h1 = NULL, *h2 = NULL;

    /* Two lookups share a query; one is cancelled, the other answered. */
    memset(&b, 0, sizeof b);
    outstanding = 1;
    CHECK(mx_lookup(r, "cancel1.mx.test", never, &calls, &h1) == 0 && h1, "mx_lookup");
    CHECK(mx_lookup(r, "cancel1.mx.test", on_done, &b, &h2) == 0 && h2, "mx_lookup");
    mx_lookup_cancel(h1);
    CHECK(!run_loop(10000) && b.calls == 1 && b.r.status == MX_OK, "the other lookup: %d %s",
          b.calls, mx_status_name(b.r.status));

    /* Cancelled before anything was sent: nothing is sent. */
    uint64_t q0 = queries(r);
    CHECK(mx_lookup(r, "cancel2.mx.test", never, &calls, &h1) == 0, "mx_lookup");
    mx_lookup_cancel(h1);
    run_for(100);
    CHECK(queries(r) == q0, "a cancelled lookup sent %llu queries",
          (unsigned long long)(queries(r) - q0));

    /* Cancelled while its query is on the wire, to a server that never answers. */
    char err[200];
    struct dns_resolver *rd = dns_resolver_new(&L, dead, err, sizeof err);
    CHECK(rd != NULL, "%s", err);
    if (!rd) return;
    dns_resolver_set_timeout(rd, 150, 1);
    CHECK(mx_lookup(rd, "cancel3.mx.test", never, &calls, &h1) == 0, "mx_lookup");
    run_for(50);
    CHECK(queries(rd) == 1, "query not sent");
    mx_lookup_cancel(h1);
    run_for(300);
    CHECK(calls == 0, "cancelled lookups called back %d times", calls);

    /* Freed with queries on the wire: no callback, nothing left (ASan). */
    CHECK(mx_lookup(rd, "free1.mx.test", never, &calls, NULL) == 0, "mx_lookup");
    CHECK(host_lookup(rd, "free2.mx.test", never, &calls, NULL) == 0, "host_lookup");
    run_for(50);
    dns_resolver_free(rd);
    run_for(300);
    CHECK(calls == 0, "a freed resolver called back %d times", calls);
}

/* More distinct questions than DNS_MAX_INFLIGHT: the rest wait their turn. */
static void test_many(struct dns_resolver *r)
{
    enum { N = 3 * DNS_MAX_INFLIGHT };
    static struct box b[N];
    char name[64];

    memset(b, 0, sizeof b);
    outstanding = N;
    for (int i = 0; i < N; i++) {
        snprintf(name, sizeof name, "nx%d.mx.test", i);
        CHECK(mx_lookup(r, name, on_done, &b[i], NULL) == 0, "mx_lookup(%s)", name);
    }
    struct dns_resolver_stats st;
    dns_resolver_stats(r, &st);
    CHECK(st.queries_active == N && st.lookups_active == N, "active: %u queries %u lookups",
          st.queries_active, st.lookups_active);
    CHECK(!run_loop(20000), "%d lookups never finished (%d left)", N, outstanding);
    int bad = 0;
    for (int i = 0; i < N; i++) bad += b[i].calls != 1 || b[i].r.status != MX_NXDOMAIN;
    dns_resolver_stats(r, &st);
    CHECK(bad == 0 && st.queries_active == 0 && st.lookups_active == 0,
          "%d wrong; active: %u queries %u lookups", bad, st.queries_active, st.lookups_active);
}

/* DNS_MAX_LOOKUPS pending at once, then -EAGAIN; freed with all of them. */
static void test_bounds(const char *dead)
{
    struct dns_resolver *r = resolver(dead);
    if (!r) return;
    int calls = 0, rc = 0;
    char name[64];
    for (int i = 0; i < DNS_MAX_LOOKUPS && rc == 0; i++) {
        snprintf(name, sizeof name, "bound%d.mx.test", i);
        rc = mx_lookup(r, name, never, &calls, NULL);
    }
    CHECK(rc == 0, "lookup below the bound: %d", rc);
    CHECK(mx_lookup(r, "one-more.mx.test", never, &calls, NULL) == -EAGAIN, "no -EAGAIN");
    CHECK(host_lookup(r, "one-more.mx.test", never, &calls, NULL) == -EAGAIN, "no -EAGAIN");
    run_for(50);
    struct dns_resolver_stats st;
    dns_resolver_stats(r, &st);
    CHECK(st.queries == DNS_MAX_INFLIGHT, "%llu queries on the wire, bound %d",
          (unsigned long long)st.queries, DNS_MAX_INFLIGHT);
    dns_resolver_free(r);
    run_for(100);
    CHECK(calls == 0, "%d callbacks after free", calls);
}

/* The callback frees the resolver while other lookups are under way. */
static void test_free_from_callback(const char *servers)
{
    struct dns_resolver *r2 = resolver(servers);
    if (!r2) return;
    int calls = 0;
    struct box b;
    memset(&b, 0, sizeof b);
    b.free_me = r2;
    outstanding = 1;
    CHECK(mx_lookup(r2, "[192.0.2.1]", on_done, &b, NULL) == 0, "literal");
    CHECK(mx_lookup(r2, "multi.mx.test", never, &calls, NULL) == 0, "mx_lookup");
    CHECK(mx_lookup(r2, "[192.0.2.2]", never, &calls, NULL) == 0, "literal");
    CHECK(!run_loop(5000) && b.calls == 1, "first callback");
    run_for(200);
    CHECK(calls == 0, "callbacks after the resolver was freed: %d", calls);
}

static void test_dead_server(const char *good, const char *dead)
{
    char list[200];
    struct box b;
    struct dns_resolver_stats st;

    struct dns_resolver *r = resolver(dead);
    if (!r) return;
    CHECK(dns_resolver_set_timeout(r, 200, 2) == 0, "set_timeout");
    uint64_t t0 = timer_now_ms();
    mx_wait(r, "dead.mx.test", &b);
    uint64_t took = b.at - t0;
    dns_resolver_stats(r, &st);
    CHECK(b.r.status == MX_TEMP && strstr(b.r.detail, "timeout"), "dead server: %s %s",
          mx_status_name(b.r.status), b.r.detail);
    CHECK(st.timeouts == 2 && st.queries == 2, "timeouts %llu queries %llu",
          (unsigned long long)st.timeouts, (unsigned long long)st.queries);
    CHECK(took >= 350 && took < 2000, "two 200 ms tries took %llu ms", (unsigned long long)took);
    dns_resolver_free(r);

    /* The next server answers. */
    snprintf(list, sizeof list, "%s,%s", dead, good);
    r = resolver(list);
    if (!r) return;
    dns_resolver_set_timeout(r, 200, 1);
    t0 = timer_now_ms();
    mx_wait(r, "a-only.mx.test", &b);
    CHECK(b.r.status == MX_OK && b.at - t0 >= 150, "rotation: %s after %llu ms",
          mx_status_name(b.r.status), (unsigned long long)(b.at - t0));
    dns_resolver_free(r);

    /* resolv.conf with its options */
    char path[] = "/tmp/mailengine-resolv-XXXXXX";
    int fd = mkstemp(path);
    if (fd < 0) return;
    char text[300];
    int n = snprintf(text, sizeof text, "nameserver %s\nnameserver %s\noptions timeout:1 attempts:1\n",
                     dead, good);
    CHECK(write(fd, text, (size_t)n) == n, "write");
    close(fd);
    char err[200];
    r = dns_resolver_new_conf(&L, path, err, sizeof err);
    unlink(path);
    CHECK(r != NULL, "%s", err);
    if (!r) return;
    t0 = timer_now_ms();
    mx_wait(r, "a-only.mx.test", &b);
    CHECK(b.r.status == MX_OK && b.at - t0 >= 900 && b.at - t0 < 3000,
          "resolv.conf timeout:1: %s after %llu ms", mx_status_name(b.r.status),
          (unsigned long long)(b.at - t0));
    dns_resolver_free(r);

    /* Nobody on the port: ICMP says so, no need to wait for the timeout. */
    r = resolver("127.0.0.1:1");
    if (!r) return;
    dns_resolver_set_timeout(r, 5000, 1);
    t0 = timer_now_ms();
    mx_wait(r, "closed.mx.test", &b);
    CHECK(b.r.status == MX_TEMP && b.at - t0 < 2000 && strstr(b.r.detail, "127.0.0.1:1"),
          "closed port: %s \"%s\" after %llu ms", mx_status_name(b.r.status), b.r.detail,
          (unsigned long long)(b.at - t0));
    dns_resolver_free(r);
}

/* A server that answers EDNS with FORMERR and forges an answer first. */
static void test_odd_server(const char *odd)
{
    struct box b;
    struct dns_resolver_stats st;
    struct dns_resolver *r = resolver(odd);
    if (!r) return;
    host_wait(r, "anything.odd.test", &b);
    dns_resolver_stats(r, &st);
    CHECK(b.r.status == MX_OK && has_addr(&b.r.hosts[0], "127.0.0.99"), "odd server: %s %s",
          mx_status_name(b.r.status), b.r.detail);
    CHECK(st.edns_fallbacks >= 1 && st.mismatched >= 1, "edns fallbacks %llu mismatched %llu",
          (unsigned long long)st.edns_fallbacks, (unsigned long long)st.mismatched);
    /* the server is remembered: no EDNS the next time */
    uint64_t fb = st.edns_fallbacks;
    host_wait(r, "other.odd.test", &b);
    dns_resolver_stats(r, &st);
    CHECK(b.r.status == MX_OK && st.edns_fallbacks == fb, "EDNS tried again: %llu",
          (unsigned long long)(st.edns_fallbacks - fb));
    dns_resolver_free(r);
}

int main(void)
{
    int rc = loop_init(&L, 0, 256, 16, 4096);
    CHECK(rc == 0, "loop_init: %d", rc);
    if (rc != 0) return check_summary();

    test_server_lists();
    test_resolv_conf();
    test_literals();

    const char *good = getenv("MAILENGINE_TEST_DNS");
    const char *dead = getenv("MAILENGINE_TEST_DNS_DEAD");
    const char *odd = getenv("MAILENGINE_TEST_DNS_ODD");
    if (good && *good) {
        struct dns_resolver *r = resolver(good);
        if (r) {
            test_mx_order(r);
            test_cases(r);
            test_tcp(r);
            test_cache(r);
            test_coalesce(r);
            test_many(r);
            if (dead && *dead) test_cancel(r, dead);
            dns_resolver_free(r);
        }
        test_free_from_callback(good);
        if (dead && *dead) test_dead_server(good, dead);
        if (dead && *dead) test_bounds(dead);
        if (odd && *odd) test_odd_server(odd);
    } else {
        printf("MAILENGINE_TEST_DNS not set: only the tests without a server ran\n");
    }
    run_for(50);                /* let cancelled operations come back */
    loop_destroy(&L);
    loop_close_inbox(&L);
    return check_summary();
}
