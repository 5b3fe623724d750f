/* sources: csrc/dns/msg.c */
/* libs: */
/* DNS wire format: query bytes, and responses built by hand here (with and
 * without compression) for every verdict the resolver acts on, the hostile
 * shapes (pointer loops, forward pointers, CNAME loops, long names), every
 * prefix of every message, and single-byte damage to each of them. */
#include "dns/msg.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

#define ID 0x1234
#define F_QR 0x8000u
#define F_AA 0x0400u
#define F_TC 0x0200u
#define F_RD 0x0100u
#define F_RA 0x0080u
#define RESP (F_QR | F_RD | F_RA)           /* an ordinary recursive answer */

/* ---- a test-only response builder ---------------------------------------- */

struct bld {
    uint8_t b[70000];
    size_t n;
    size_t rd;                  /* where the open record's RDLENGTH goes */
};

static void b8(struct bld *b, unsigned v) { b->b[b->n++] = (uint8_t)v; }
static void b16(struct bld *b, unsigned v) { b8(b, v >> 8); b8(b, v); }
static void b32(struct bld *b, uint32_t v) { b16(b, v >> 16); b16(b, v & 0xffff); }

static void b_raw(struct bld *b, const void *p, size_t n)
{
    memcpy(b->b + b->n, p, n);
    b->n += n;
}

/* The labels of a text name, without the root label ("" writes nothing). */
static void b_labels(struct bld *b, const char *s)
{
    while (*s) {
        const char *dot = strchr(s, '.');
        size_t n = dot ? (size_t)(dot - s) : strlen(s);
        b8(b, (unsigned)n);
        b_raw(b, s, n);
        s += n + (dot ? 1 : 0);
    }
}

static void b_name(struct bld *b, const char *s) { b_labels(b, s); b8(b, 0); }
static void b_ptr(struct bld *b, unsigned off) { b16(b, 0xc000u | off); }

static void b_hdr(struct bld *b, unsigned id, unsigned flags,
                  unsigned qd, unsigned an, unsigned ns, unsigned ar)
{
    b->n = 0;
    b16(b, id); b16(b, flags); b16(b, qd); b16(b, an); b16(b, ns); b16(b, ar);
}

static void b_question(struct bld *b, const char *name, unsigned type)
{
    b_name(b, name);
    b16(b, type);
    b16(b, DNS_CLASS_IN);
}

/* Type, class, TTL and a placeholder RDLENGTH after an owner the caller
 * wrote; b_end() fills in the length. */
static void b_rr(struct bld *b, unsigned type, unsigned class, uint32_t ttl)
{
    b16(b, type); b16(b, class); b32(b, ttl);
    b->rd = b->n;
    b16(b, 0);
}

static void b_end(struct bld *b)
{
    size_t len = b->n - b->rd - 2;
    b->b[b->rd] = (uint8_t)(len >> 8);
    b->b[b->rd + 1] = (uint8_t)len;
}

/* Whole records with a text owner. */
static void rr_a(struct bld *b, const char *owner, uint32_t ttl, const uint8_t ip[4])
{
    b_name(b, owner); b_rr(b, DNS_TYPE_A, DNS_CLASS_IN, ttl); b_raw(b, ip, 4); b_end(b);
}

static void rr_cname(struct bld *b, const char *owner, uint32_t ttl, const char *target)
{
    b_name(b, owner); b_rr(b, DNS_TYPE_CNAME, DNS_CLASS_IN, ttl); b_name(b, target); b_end(b);
}

static void rr_mx(struct bld *b, const char *owner, uint32_t ttl, unsigned pref, const char *ex)
{
    b_name(b, owner); b_rr(b, DNS_TYPE_MX, DNS_CLASS_IN, ttl); b16(b, pref); b_name(b, ex); b_end(b);
}

static void rr_soa(struct bld *b, const char *owner, uint32_t ttl, uint32_t minimum)
{
    b_name(b, owner);
    b_rr(b, DNS_TYPE_SOA, DNS_CLASS_IN, ttl);
    b_name(b, "ns1.example.test");
    b_name(b, "hostmaster.example.test");
    b32(b, 2026112301); b32(b, 7200); b32(b, 900); b32(b, 1209600); b32(b, minimum);
    b_end(b);
}

static void rr_opt(struct bld *b, uint32_t ttl)
{
    b8(b, 0); b_rr(b, DNS_TYPE_OPT, 1232, ttl); b_end(b);
}

static struct dns_answer ans;

static int parse(const struct bld *b, const char *name, unsigned type)
{
    return dns_response_parse(b->b, b->n, ID, name, (uint16_t)type, &ans);
}

static const char *st(int s) { return dns_status_name(s); }

/* What must hold of any answer, whatever the input. */
static int answer_sane(const struct dns_answer *a, int ret, size_t len, unsigned qtype)
{
    if (ret < 0 || ret != (int)a->status || a->status > DNS_CNAME_LOOP) return 0;
    if (a->nrr > DNS_MAX_RR) return 0;
    if (a->status != DNS_OK && (a->nrr || a->more || a->null_mx)) return 0;
    if (a->status == DNS_OK && a->nrr == 0) return 0;
    if (!memchr(a->canonical, 0, sizeof a->canonical)) return 0;
    if (a->neg_ttl > 0x7fffffffu || a->cname_ttl > 0x7fffffffu) return 0;
    if (a->ncname > DNS_MAX_CNAME) return 0;
    if (a->status != DNS_OK && a->status != DNS_NODATA && a->status != DNS_NXDOMAIN &&
        a->status != DNS_CNAME_LOOP && (a->canonical[0] || a->ncname || a->cname_ttl))
        return 0;
    if (a->has_neg_ttl && a->status != DNS_NODATA && a->status != DNS_NXDOMAIN) return 0;
    for (unsigned i = 0; i < a->nrr; i++) {
        const struct dns_rr *r = &a->rr[i];
        if (r->type != qtype || r->ttl > 0x7fffffffu) return 0;
        if ((size_t)r->rdoff + r->rdlen > len) return 0;
        if (!memchr(r->target, 0, sizeof r->target)) return 0;
        if (r->type == DNS_TYPE_A && r->rdlen != 4) return 0;
        if (r->type == DNS_TYPE_AAAA && r->rdlen != 16) return 0;
        for (const char *p = r->target; *p; p++)
            if (*p <= ' ' || *p >= 0x7f || (*p >= 'A' && *p <= 'Z')) return 0;
    }
    return 1;
}

/* Every strict prefix of a message must be refused, never OK. A verdict
 * taken from the header and question alone (TRUNCATED, MISMATCH) may come
 * as soon as those are whole. */
static void check_prefixes(const struct bld *b, const char *name, unsigned type,
                           int early, const char *what)
{
    int bad = 0;
    for (size_t k = 0; k < b->n; k++) {
        /* a copy of exactly k bytes, so that ASan sees any read past it */
        uint8_t *m = malloc(k ? k : 1);
        memcpy(m, b->b, k);
        int r = dns_response_parse(m, k, ID, name, (uint16_t)type, &ans);
        free(m);
        if (!(r == DNS_MALFORMED || (early >= 0 && r == early)) ||
            !answer_sane(&ans, r, k, type)) {
            if (bad++ < 3) fprintf(stderr, "  %s: prefix %zu of %zu: %s\n", what, k, b->n, st(r));
        }
    }
    CHECK(bad == 0, "%s: %d bad prefixes", what, bad);
}

/* Each byte replaced by a few values: no crash (ASan) and a sane answer. */
static void check_damage(const struct bld *b, const char *name, unsigned type, const char *what)
{
    static const uint8_t vals[] = { 0x00, 0x01, 0x3f, 0x40, 0x80, 0xc0, 0xc0 | 0x0c, 0xff };
    uint8_t *m = malloc(b->n);      /* exact size, as in check_prefixes() */
    int bad = 0;

    for (size_t i = 0; i < b->n; i++) {
        for (size_t v = 0; v < sizeof vals; v++) {
            memcpy(m, b->b, b->n);
            m[i] = vals[v];
            int r = dns_response_parse(m, b->n, ID, name, (uint16_t)type, &ans);
            if (!answer_sane(&ans, r, b->n, type)) bad++;
            m[i] ^= 0x20;           /* case flips too */
            r = dns_response_parse(m, b->n, ID, name, (uint16_t)type, &ans);
            if (!answer_sane(&ans, r, b->n, type)) bad++;
        }
    }
    free(m);
    CHECK(bad == 0, "%s: %d insane answers after damage", what, bad);
}

/* A message must parse to `want`, and be sound under cuts and damage. */
static void expect(const struct bld *b, const char *name, unsigned type, int want, const char *what)
{
    int r = parse(b, name, type);
    CHECK(r == want, "%s: %s, want %s", what, st(r), st(want));
    CHECK(answer_sane(&ans, r, b->n, type), "%s: insane answer", what);
    struct dns_answer keep = ans;
    check_prefixes(b, name, type,
                   want == DNS_TRUNCATED || want == DNS_MISMATCH ? want : -1, what);
    check_damage(b, name, type, what);
    ans = keep;
}

static struct bld B, C;

/* ---- queries ------------------------------------------------------------- */

static void test_query_bytes(void)
{
    uint8_t q[DNS_QUERY_MAX];
    static const uint8_t a[] = {
        0xbe, 0xef, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
        7, 'e', 'x', 'a', 'm', 'p', 'l', 'e', 4, 't', 'e', 's', 't', 0,
        0x00, 0x01, 0x00, 0x01,
    };
    static const uint8_t mx[] = {
        0x00, 0x07, 0x01, 0x00, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00, 0x01,
        4, 'M', 'a', 'i', 'l', 7, 'E', 'x', 'a', 'm', 'p', 'l', 'e', 4, 't', 'e', 's', 't', 0,
        0x00, 0x0f, 0x00, 0x01,
        0x00, 0x00, 0x29, 0x04, 0xd0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00,
    };

    int n = dns_query_build(q, sizeof q, 0xbeef, "example.test", DNS_TYPE_A, 0);
    CHECK(n == (int)sizeof a && memcmp(q, a, sizeof a) == 0, "A query: %d bytes", n);
    n = dns_query_build(q, sizeof q, 0xbeef, "example.test.", DNS_TYPE_A, 0);
    CHECK(n == (int)sizeof a && memcmp(q, a, sizeof a) == 0, "trailing dot: %d bytes", n);
    /* case kept, EDNS0 OPT: root, type 41, class 1232, TTL 0, RDLENGTH 0 */
    n = dns_query_build(q, sizeof q, 7, "Mail.Example.test", DNS_TYPE_MX, 1);
    CHECK(n == (int)sizeof mx && memcmp(q, mx, sizeof mx) == 0, "MX+EDNS query: %d bytes", n);

    static const uint16_t types[] = { DNS_TYPE_A, DNS_TYPE_NS, DNS_TYPE_CNAME, DNS_TYPE_SOA,
                                      DNS_TYPE_MX, DNS_TYPE_TXT, DNS_TYPE_AAAA };
    for (size_t i = 0; i < sizeof types / sizeof types[0]; i++) {
        n = dns_query_build(q, sizeof q, 1, "a.test", types[i], 0);
        CHECK(n == 12 + 8 + 4 && q[n - 4] == 0 && q[n - 3] == types[i], "type %u", types[i]);
    }
}

static void test_query_names(void)
{
    uint8_t q[DNS_QUERY_MAX + 10];
    char name[300];

    static const char *const bad[] = {
        "", ".", "..", ".a", "a..b", "a.test..", "a b.test", "a\tb", "a\\.b",
        "caf\xc3\xa9.test", "a\x7f.test",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        CHECK(dns_query_build(q, sizeof q, 1, bad[i], DNS_TYPE_A, 1) == -1, "\"%s\" accepted", bad[i]);
    CHECK(dns_query_build(q, sizeof q, 1, NULL, DNS_TYPE_A, 1) == -1, "NULL name");
    CHECK(dns_query_build(q, sizeof q, 1, "a.test", 0, 1) == -1, "qtype 0");
    CHECK(dns_query_build(q, sizeof q, 1, "a.test", DNS_TYPE_OPT, 1) == -1, "qtype OPT");
    CHECK(dns_query_build(q, sizeof q, 1, "_25._tcp.mx.test", DNS_TYPE_TXT, 1) > 0, "underscore");

    /* labels of 63 and 64 octets */
    memset(name, 'a', 63);
    strcpy(name + 63, ".test");
    CHECK(dns_query_build(q, sizeof q, 1, name, DNS_TYPE_A, 0) == 12 + 70 + 4, "63-octet label");
    memset(name, 'a', 64);
    strcpy(name + 64, ".test");
    CHECK(dns_query_build(q, sizeof q, 1, name, DNS_TYPE_A, 0) == -1, "64-octet label");

    /* 63.63.63.61 is 255 octets on the wire (253 characters); one more is not */
    size_t o = 0;
    const size_t labels[] = { 63, 63, 63, 61 };
    for (size_t i = 0; i < 4; i++) {
        memset(name + o, (int)('b' + i), labels[i]);
        o += labels[i];
        name[o++] = '.';
    }
    name[o - 1] = 0;
    CHECK(strlen(name) == 253, "setup");
    int n = dns_query_build(q, sizeof q, 1, name, DNS_TYPE_MX, 1);
    CHECK(n == DNS_QUERY_MAX, "255-octet name: %d, want %d", n, DNS_QUERY_MAX);
    name[253] = '.';
    name[254] = 0;
    CHECK(dns_query_build(q, sizeof q, 1, name, DNS_TYPE_MX, 1) == DNS_QUERY_MAX, "with dot");
    name[253] = 'x';
    CHECK(dns_query_build(q, sizeof q, 1, name, DNS_TYPE_MX, 1) == -1, "256-octet name");
    name[252] = '.';                   /* 63.63.63.60.1 */
    CHECK(dns_query_build(q, sizeof q, 1, name, DNS_TYPE_MX, 1) == -1, "256 octets in 5 labels");

    /* capacity: every size below the need fails, the exact size works */
    int need = dns_query_build(q, sizeof q, 1, "example.test", DNS_TYPE_AAAA, 1);
    CHECK(need == 41, "need %d", need);
    int bad_cap = 0;
    for (int cap = 0; cap < need; cap++)
        if (dns_query_build(q, (size_t)cap, 1, "example.test", DNS_TYPE_AAAA, 1) != -1) bad_cap++;
    CHECK(bad_cap == 0, "%d short capacities accepted", bad_cap);
    CHECK(dns_query_build(q, (size_t)need, 1, "example.test", DNS_TYPE_AAAA, 1) == need, "exact cap");
    CHECK(dns_query_build(NULL, 100, 1, "example.test", DNS_TYPE_AAAA, 1) == -1, "NULL buf");
}

/* Our own query with QR set is a well-formed empty answer. */
static void test_query_roundtrip(void)
{
    int n = dns_query_build(B.b, sizeof B.b, ID, "Round.Trip.TEST.", DNS_TYPE_MX, 1);
    B.n = (size_t)n;
    B.b[2] |= 0x80;
    int r = parse(&B, "round.trip.test", DNS_TYPE_MX);
    CHECK(r == DNS_NODATA && ans.edns && !ans.has_neg_ttl && ans.ncname == 0,
          "round trip: %s edns %d", st(r), ans.edns);
    CHECK(strcmp(ans.canonical, "round.trip.test") == 0, "canonical %s", ans.canonical);
    B.b[2] &= 0x7f;
    CHECK(parse(&B, "round.trip.test", DNS_TYPE_MX) == DNS_MISMATCH, "a query is no answer");
}

/* ---- positive answers ------------------------------------------------------ */

static const uint8_t ip1[4] = { 192, 0, 2, 1 }, ip2[4] = { 198, 51, 100, 7 };

static void test_a(void)
{
    b_hdr(&B, ID, RESP | F_AA, 1, 2, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_A);
    b_ptr(&B, 12); b_rr(&B, DNS_TYPE_A, DNS_CLASS_IN, 300); b_raw(&B, ip1, 4); b_end(&B);
    rr_a(&B, "EXAMPLE.test", 60, ip2);
    expect(&B, "example.test", DNS_TYPE_A, DNS_OK, "A");
    CHECK(ans.nrr == 2 && ans.id == ID && ans.aa && ans.ra && !ans.tc && ans.rcode == 0,
          "A: nrr %u aa %d", ans.nrr, ans.aa);
    CHECK(memcmp(ans.rr[0].addr, ip1, 4) == 0 && ans.rr[0].ttl == 300 && ans.rr[0].type == DNS_TYPE_A,
          "A[0]");
    CHECK(memcmp(ans.rr[1].addr, ip2, 4) == 0 && ans.rr[1].ttl == 60, "A[1]");
    CHECK(memcmp(B.b + ans.rr[1].rdoff, ip2, 4) == 0 && ans.rr[1].rdlen == 4, "rdoff");
    CHECK(strcmp(ans.canonical, "example.test") == 0 && ans.ncname == 0, "canonical %s", ans.canonical);
    CHECK(ans.rr[0].target[0] == 0, "no target for A");

    /* the question as the query had it (0x20 case mixing), the trailing dot */
    CHECK(parse(&B, "Example.TEST.", DNS_TYPE_A) == DNS_OK, "case-insensitive question");

    /* records of another class or owner, and bytes after the last record */
    b_hdr(&B, ID, RESP, 1, 3, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_A);
    b_ptr(&B, 12); b_rr(&B, DNS_TYPE_A, 3, 300); b_raw(&B, ip2, 4); b_end(&B);    /* CH */
    rr_a(&B, "other.test", 300, ip2);
    rr_a(&B, "example.test", 300, ip1);
    b_raw(&B, "junk", 4);
    CHECK(parse(&B, "example.test", DNS_TYPE_A) == DNS_OK && ans.nrr == 1 &&
          memcmp(ans.rr[0].addr, ip1, 4) == 0, "other class/owner skipped: %u", ans.nrr);

    /* A with the wrong RDLENGTH is broken */
    b_hdr(&B, ID, RESP, 1, 1, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_A);
    b_ptr(&B, 12); b_rr(&B, DNS_TYPE_A, DNS_CLASS_IN, 300); b_raw(&B, ip1, 4); b8(&B, 0); b_end(&B);
    expect(&B, "example.test", DNS_TYPE_A, DNS_MALFORMED, "A rdlen 5");
}

static void test_aaaa(void)
{
    static const uint8_t v6[16] = { 0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x25 };
    b_hdr(&B, ID, RESP, 1, 1, 0, 1);
    b_question(&B, "mx.example.test", DNS_TYPE_AAAA);
    b_ptr(&B, 12); b_rr(&B, DNS_TYPE_AAAA, DNS_CLASS_IN, 3600); b_raw(&B, v6, 16); b_end(&B);
    rr_opt(&B, 0);
    expect(&B, "mx.example.test", DNS_TYPE_AAAA, DNS_OK, "AAAA");
    CHECK(ans.nrr == 1 && memcmp(ans.rr[0].addr, v6, 16) == 0 && ans.rr[0].ttl == 3600 && ans.edns,
          "AAAA record");

    b_hdr(&B, ID, RESP, 1, 1, 0, 0);
    b_question(&B, "mx.example.test", DNS_TYPE_AAAA);
    b_ptr(&B, 12); b_rr(&B, DNS_TYPE_AAAA, DNS_CLASS_IN, 3600); b_raw(&B, v6, 4); b_end(&B);
    expect(&B, "mx.example.test", DNS_TYPE_AAAA, DNS_MALFORMED, "AAAA rdlen 4");
}

static void test_mx(void)
{
    size_t mx1;

    b_hdr(&B, ID, RESP, 1, 3, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_MX);
    b_ptr(&B, 12); b_rr(&B, DNS_TYPE_MX, DNS_CLASS_IN, 300);
    b16(&B, 10); mx1 = B.n; b_labels(&B, "mx1"); b_ptr(&B, 12); b_end(&B);
    b_ptr(&B, 12); b_rr(&B, DNS_TYPE_MX, DNS_CLASS_IN, 300);
    b16(&B, 20); b_labels(&B, "BackUp"); b_ptr(&B, 12); b_end(&B);
    /* a pointer to a name that ends in a pointer */
    b_ptr(&B, 12); b_rr(&B, DNS_TYPE_MX, DNS_CLASS_IN, 600);
    b16(&B, 30); b_ptr(&B, (unsigned)mx1); b_end(&B);
    expect(&B, "example.test", DNS_TYPE_MX, DNS_OK, "MX");
    CHECK(ans.nrr == 3 && !ans.null_mx, "MX: nrr %u", ans.nrr);
    CHECK(ans.rr[0].pref == 10 && strcmp(ans.rr[0].target, "mx1.example.test") == 0,
          "MX[0] %u %s", ans.rr[0].pref, ans.rr[0].target);
    CHECK(ans.rr[1].pref == 20 && strcmp(ans.rr[1].target, "backup.example.test") == 0,
          "MX[1] %u %s", ans.rr[1].pref, ans.rr[1].target);
    CHECK(ans.rr[2].pref == 30 && strcmp(ans.rr[2].target, "mx1.example.test") == 0 &&
          ans.rr[2].ttl == 600, "MX[2] %u %s", ans.rr[2].pref, ans.rr[2].target);

    /* the exchange must fill the rdata exactly */
    b_hdr(&B, ID, RESP, 1, 1, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_MX);
    b_ptr(&B, 12); b_rr(&B, DNS_TYPE_MX, DNS_CLASS_IN, 300);
    b16(&B, 10); b_name(&B, "mx"); b8(&B, 0); b_end(&B);
    expect(&B, "example.test", DNS_TYPE_MX, DNS_MALFORMED, "MX rdata longer than its name");

    /* an exchange running past its RDLENGTH into the next record */
    b_hdr(&B, ID, RESP, 1, 2, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_MX);
    b_ptr(&B, 12); b_rr(&B, DNS_TYPE_MX, DNS_CLASS_IN, 300);
    b16(&B, 10); b8(&B, 1); b8(&B, 'm'); b_end(&B);
    b8(&B, 0); b_rr(&B, DNS_TYPE_TXT, DNS_CLASS_IN, 1); b_end(&B);   /* "m" ends here */
    expect(&B, "example.test", DNS_TYPE_MX, DNS_MALFORMED, "MX name past rdata");

    b_hdr(&B, ID, RESP, 1, 1, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_MX);
    b_ptr(&B, 12); b_rr(&B, DNS_TYPE_MX, DNS_CLASS_IN, 300); b16(&B, 10); b_end(&B);
    expect(&B, "example.test", DNS_TYPE_MX, DNS_MALFORMED, "MX without exchange");
    for (unsigned rdlen = 0; rdlen < 2; rdlen++) {  /* the message ends inside the rdata */
        B.b[B.rd + 1] = (uint8_t)rdlen;
        B.n = B.rd + 2 + rdlen;
        expect(&B, "example.test", DNS_TYPE_MX, DNS_MALFORMED, "MX cut in the preference");
    }

    /* an exchange that no host name can be: a "." or a space inside a label */
    static const char *const odd[] = { "a.b", "a b", "a\\b", "\x01" };
    for (size_t i = 0; i < sizeof odd / sizeof odd[0]; i++) {
        b_hdr(&B, ID, RESP, 1, 1, 0, 0);
        b_question(&B, "example.test", DNS_TYPE_MX);
        b_ptr(&B, 12); b_rr(&B, DNS_TYPE_MX, DNS_CLASS_IN, 300);
        b16(&B, 10); b8(&B, (unsigned)strlen(odd[i])); b_raw(&B, odd[i], strlen(odd[i]));
        b_ptr(&B, 12); b_end(&B);
        CHECK(parse(&B, "example.test", DNS_TYPE_MX) == DNS_MALFORMED, "odd exchange %zu", i);
    }
}

static void test_null_mx(void)
{
    b_hdr(&B, ID, RESP | F_AA, 1, 1, 0, 0);
    b_question(&B, "nomail.test", DNS_TYPE_MX);
    rr_mx(&B, "nomail.test", 86400, 0, "");
    expect(&B, "nomail.test", DNS_TYPE_MX, DNS_OK, "null MX");
    CHECK(ans.nrr == 1 && ans.null_mx && ans.rr[0].pref == 0 && ans.rr[0].target[0] == 0,
          "null MX: nrr %u flag %d pref %u '%s'", ans.nrr, ans.null_mx, ans.rr[0].pref, ans.rr[0].target);

    /* "." among real exchanges is flagged too; mx.c decides */
    b_hdr(&B, ID, RESP, 1, 2, 0, 0);
    b_question(&B, "nomail.test", DNS_TYPE_MX);
    rr_mx(&B, "nomail.test", 60, 10, "mx.nomail.test");
    rr_mx(&B, "nomail.test", 60, 0, "");
    CHECK(parse(&B, "nomail.test", DNS_TYPE_MX) == DNS_OK && ans.nrr == 2 && ans.null_mx, "mixed");
}

static void test_many(void)
{
    b_hdr(&B, ID, RESP, 1, 40, 0, 0);
    b_question(&B, "big.test", DNS_TYPE_A);
    for (unsigned i = 0; i < 40; i++) {
        uint8_t ip[4] = { 10, 0, 0, (uint8_t)i };
        b_ptr(&B, 12); b_rr(&B, DNS_TYPE_A, DNS_CLASS_IN, 100 + i); b_raw(&B, ip, 4); b_end(&B);
    }
    CHECK(parse(&B, "big.test", DNS_TYPE_A) == DNS_OK && ans.nrr == DNS_MAX_RR && ans.more,
          "40 records: nrr %u more %d", ans.nrr, ans.more);
    CHECK(ans.rr[31].addr[3] == 31 && ans.rr[31].ttl == 131, "the first 32 are kept");
    /* a broken record past the limit still breaks the message */
    B.b[B.n - 5] = 5;
    B.b[B.n - 6] = 0;
    b8(&B, 0);
    CHECK(parse(&B, "big.test", DNS_TYPE_A) == DNS_MALFORMED, "broken 40th record: %s", st(ans.status));
}

static void test_ttl(void)
{
    b_hdr(&B, ID, RESP, 1, 3, 0, 0);
    b_question(&B, "t.test", DNS_TYPE_A);
    rr_a(&B, "t.test", 0x80000000u, ip1);
    rr_a(&B, "t.test", 0xffffffffu, ip1);
    rr_a(&B, "t.test", 0x7fffffffu, ip2);
    expect(&B, "t.test", DNS_TYPE_A, DNS_OK, "TTL top bit");
    CHECK(ans.nrr == 3 && ans.rr[0].ttl == 0 && ans.rr[1].ttl == 0 && ans.rr[2].ttl == 0x7fffffffu,
          "TTLs %u %u %u", ans.rr[0].ttl, ans.rr[1].ttl, ans.rr[2].ttl);
}

/* ---- CNAME chains -------------------------------------------------------- */

static void test_cname(void)
{
    /* listed out of order, as servers may */
    b_hdr(&B, ID, RESP, 1, 4, 0, 0);
    b_question(&B, "www.a.test", DNS_TYPE_MX);
    rr_mx(&B, "C.test", 500, 5, "mx.c.test");
    rr_cname(&B, "b.test", 120, "c.test");
    b_ptr(&B, 12); b_rr(&B, DNS_TYPE_CNAME, DNS_CLASS_IN, 900); b_name(&B, "B.TEST"); b_end(&B);
    rr_mx(&B, "b.test", 500, 1, "wrong.test");          /* not at the chain's end */
    expect(&B, "www.a.test", DNS_TYPE_MX, DNS_OK, "CNAME -> MX");
    CHECK(ans.ncname == 2 && ans.cname_ttl == 120 && strcmp(ans.canonical, "c.test") == 0,
          "chain: %u ttl %u canonical %s", ans.ncname, ans.cname_ttl, ans.canonical);
    CHECK(ans.nrr == 1 && strcmp(ans.rr[0].target, "mx.c.test") == 0 && ans.rr[0].ttl == 500,
          "MX at the end: %u %s", ans.nrr, ans.rr[0].target);

    /* asking for the CNAME itself does not follow it */
    CHECK(parse(&B, "www.a.test", DNS_TYPE_CNAME) == DNS_MISMATCH, "qtype differs");
    b_hdr(&B, ID, RESP, 1, 1, 0, 0);
    b_question(&B, "www.a.test", DNS_TYPE_CNAME);
    rr_cname(&B, "www.a.test", 120, "b.test");
    CHECK(parse(&B, "www.a.test", DNS_TYPE_CNAME) == DNS_OK && ans.nrr == 1 && ans.ncname == 0 &&
          strcmp(ans.rr[0].target, "b.test") == 0, "CNAME query: %s", ans.rr[0].target);

    /* a chain whose end has no data and no SOA: NODATA, canonical set, so
     * the resolver may ask again at the canonical name */
    b_hdr(&B, ID, RESP, 1, 1, 0, 0);
    b_question(&B, "www.a.test", DNS_TYPE_MX);
    rr_cname(&B, "www.a.test", 120, "elsewhere.test");
    expect(&B, "www.a.test", DNS_TYPE_MX, DNS_NODATA, "chain without data");
    CHECK(ans.ncname == 1 && !ans.has_neg_ttl && strcmp(ans.canonical, "elsewhere.test") == 0,
          "canonical %s", ans.canonical);

    /* RFC 6604: NXDOMAIN is about the chain's end */
    b_hdr(&B, ID, RESP | 3, 1, 1, 1, 0);
    b_question(&B, "www.a.test", DNS_TYPE_A);
    rr_cname(&B, "www.a.test", 120, "gone.b.test");
    rr_soa(&B, "b.test", 3600, 30);
    expect(&B, "www.a.test", DNS_TYPE_A, DNS_NXDOMAIN, "CNAME to NXDOMAIN");
    CHECK(strcmp(ans.canonical, "gone.b.test") == 0 && ans.has_neg_ttl && ans.neg_ttl == 30,
          "canonical %s neg %u", ans.canonical, ans.neg_ttl);

    /* a chain ending at a name no host can have: nothing half-written */
    b_hdr(&B, ID, RESP, 1, 2, 0, 0);
    b_question(&B, "www.a.test", DNS_TYPE_MX);
    rr_cname(&B, "www.a.test", 120, "c.t+st");
    b_name(&B, "c.t+st"); b_rr(&B, DNS_TYPE_CNAME, DNS_CLASS_IN, 120);
    b_labels(&B, "c"); b8(&B, 2); b8(&B, 't'); b8(&B, 0); b8(&B, 0); b_end(&B);
    expect(&B, "www.a.test", DNS_TYPE_MX, DNS_MALFORMED, "bad octet at the chain's end");
    CHECK(ans.canonical[0] == 0 && ans.ncname == 0, "canonical after MALFORMED: '%s'", ans.canonical);

    /* two CNAMEs for one name (RFC 2181 §10.1) */
    b_hdr(&B, ID, RESP, 1, 2, 0, 0);
    b_question(&B, "www.a.test", DNS_TYPE_A);
    rr_cname(&B, "www.a.test", 120, "b.test");
    rr_cname(&B, "www.a.test", 120, "c.test");
    expect(&B, "www.a.test", DNS_TYPE_A, DNS_MALFORMED, "two CNAMEs");
}

static void chain(unsigned links, int loop_back)
{
    char from[32], to[32];

    b_hdr(&B, ID, RESP, 1, links + 1, 0, 0);
    b_question(&B, "n0.test", DNS_TYPE_A);
    for (unsigned i = 0; i < links; i++) {
        snprintf(from, sizeof from, "n%u.test", i);
        snprintf(to, sizeof to, "n%u.test", loop_back && i + 1 == links ? 0 : i + 1);
        rr_cname(&B, from, 1000 - i, to);
    }
    snprintf(to, sizeof to, "n%u.test", links);
    rr_a(&B, to, 50, ip1);
}

static void test_cname_loops(void)
{
    chain(DNS_MAX_CNAME, 0);
    expect(&B, "n0.test", DNS_TYPE_A, DNS_OK, "chain of 8");
    CHECK(ans.ncname == DNS_MAX_CNAME && ans.cname_ttl == 1000 - (DNS_MAX_CNAME - 1) &&
          strcmp(ans.canonical, "n8.test") == 0, "chain of 8: %u %s", ans.ncname, ans.canonical);
    chain(DNS_MAX_CNAME + 1, 0);
    CHECK(parse(&B, "n0.test", DNS_TYPE_A) == DNS_CNAME_LOOP, "chain of 9: %s", st(ans.status));
    chain(2, 1);
    expect(&B, "n0.test", DNS_TYPE_A, DNS_CNAME_LOOP, "a -> b -> a");
    chain(1, 1);
    expect(&B, "n0.test", DNS_TYPE_A, DNS_CNAME_LOOP, "a -> a");
    chain(5, 1);
    CHECK(parse(&B, "n0.test", DNS_TYPE_A) == DNS_CNAME_LOOP, "loop of 5");
}

/* ---- negative answers and errors ------------------------------------------- */

static void test_negative(void)
{
    b_hdr(&B, ID, RESP | F_AA | 3, 1, 0, 1, 0);
    b_question(&B, "nope.example.test", DNS_TYPE_MX);
    rr_soa(&B, "example.test", 3600, 300);
    expect(&B, "nope.example.test", DNS_TYPE_MX, DNS_NXDOMAIN, "NXDOMAIN");
    CHECK(ans.has_neg_ttl && ans.neg_ttl == 300 && ans.rcode == 3 && ans.aa && ans.nrr == 0,
          "NXDOMAIN: neg %u", ans.neg_ttl);

    b_hdr(&B, ID, RESP | 3, 1, 0, 1, 0);
    b_question(&B, "nope.example.test", DNS_TYPE_MX);
    rr_soa(&B, "example.test", 60, 300);
    CHECK(parse(&B, "nope.example.test", DNS_TYPE_MX) == DNS_NXDOMAIN && ans.neg_ttl == 60,
          "SOA TTL below MINIMUM: %u", ans.neg_ttl);

    /* compressed SOA: owner and names by pointer */
    b_hdr(&B, ID, RESP, 1, 0, 1, 0);
    b_question(&B, "a.example.test", DNS_TYPE_AAAA);
    b_ptr(&B, 14);
    b_rr(&B, DNS_TYPE_SOA, DNS_CLASS_IN, 900);
    b_labels(&B, "ns"); b_ptr(&B, 14);
    b_labels(&B, "root"); b_ptr(&B, 14);
    b32(&B, 1); b32(&B, 2); b32(&B, 3); b32(&B, 4); b32(&B, 0x80000123u);
    b_end(&B);
    expect(&B, "a.example.test", DNS_TYPE_AAAA, DNS_NODATA, "NODATA");
    CHECK(ans.has_neg_ttl && ans.neg_ttl == 0 && ans.nrr == 0 && ans.rcode == 0,
          "NODATA: MINIMUM with the top bit is 0: %u", ans.neg_ttl);

    /* an SOA of an unrelated zone gives no negative TTL; NS records ignored */
    b_hdr(&B, ID, RESP | 3, 1, 0, 2, 0);
    b_question(&B, "a.example.test", DNS_TYPE_A);
    b_name(&B, "example.test"); b_rr(&B, DNS_TYPE_NS, DNS_CLASS_IN, 100); b_name(&B, "ns.test"); b_end(&B);
    rr_soa(&B, "other.test", 3600, 300);
    CHECK(parse(&B, "a.example.test", DNS_TYPE_A) == DNS_NXDOMAIN && !ans.has_neg_ttl,
          "unrelated SOA");
    b_hdr(&B, ID, RESP | 3, 1, 0, 1, 0);
    b_question(&B, "a.example.test", DNS_TYPE_A);
    rr_soa(&B, "ample.test", 3600, 300);            /* a suffix, but not on a label */
    CHECK(parse(&B, "a.example.test", DNS_TYPE_A) == DNS_NXDOMAIN && !ans.has_neg_ttl,
          "SOA of a non-ancestor");
    b_hdr(&B, ID, RESP, 1, 0, 1, 0);
    b_question(&B, "example.test", DNS_TYPE_A);
    rr_soa(&B, "", 3600, 7);                        /* the root zone */
    CHECK(parse(&B, "example.test", DNS_TYPE_A) == DNS_NODATA && ans.neg_ttl == 7, "root SOA");

    /* a zone's own SOA with broken rdata */
    b_hdr(&B, ID, RESP | 3, 1, 0, 1, 0);
    b_question(&B, "a.example.test", DNS_TYPE_A);
    b_name(&B, "example.test"); b_rr(&B, DNS_TYPE_SOA, DNS_CLASS_IN, 3600);
    b_name(&B, "ns"); b_name(&B, "h"); b32(&B, 1); b32(&B, 2); b32(&B, 3); b32(&B, 4);
    b_end(&B);
    expect(&B, "a.example.test", DNS_TYPE_A, DNS_MALFORMED, "short SOA");
}

static void test_rcodes(void)
{
    static const struct { unsigned rcode; int want; } cases[] = {
        { 1, DNS_RCODE }, { 2, DNS_SERVFAIL }, { 4, DNS_RCODE }, { 5, DNS_REFUSED }, { 9, DNS_RCODE },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        b_hdr(&B, ID, RESP | cases[i].rcode, 1, 0, 0, 0);
        b_question(&B, "example.test", DNS_TYPE_MX);
        int r = parse(&B, "example.test", DNS_TYPE_MX);
        CHECK(r == cases[i].want && ans.rcode == cases[i].rcode, "rcode %u: %s", cases[i].rcode, st(r));
    }
    b_hdr(&B, ID, RESP | 2, 1, 0, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_MX);
    expect(&B, "example.test", DNS_TYPE_MX, DNS_SERVFAIL, "SERVFAIL");
    b_hdr(&B, ID, RESP | 5, 1, 0, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_MX);
    expect(&B, "example.test", DNS_TYPE_MX, DNS_REFUSED, "REFUSED");

    /* an error without the question (old servers' FORMERR to EDNS) */
    b_hdr(&B, ID, RESP | 1, 0, 0, 0, 0);
    CHECK(parse(&B, "example.test", DNS_TYPE_MX) == DNS_RCODE && ans.rcode == 1, "FORMERR, no question");
    b_hdr(&B, ID, RESP, 0, 0, 0, 0);
    CHECK(parse(&B, "example.test", DNS_TYPE_MX) == DNS_MISMATCH, "NOERROR, no question");
    b_hdr(&B, ID, RESP | 3, 0, 0, 0, 0);
    CHECK(parse(&B, "example.test", DNS_TYPE_MX) == DNS_MISMATCH, "NXDOMAIN, no question");

    /* the OPT record's upper RCODE bits: BADVERS is 16 (RFC 6891 §6.1.3) */
    b_hdr(&B, ID, RESP, 1, 0, 0, 1);
    b_question(&B, "example.test", DNS_TYPE_MX);
    rr_opt(&B, 1u << 24);
    expect(&B, "example.test", DNS_TYPE_MX, DNS_RCODE, "BADVERS");
    CHECK(ans.rcode == 16 && ans.edns, "extended rcode %u", ans.rcode);
}

static void test_edns_shape(void)
{
    b_hdr(&B, ID, RESP, 1, 0, 0, 2);
    b_question(&B, "example.test", DNS_TYPE_MX);
    rr_opt(&B, 0);
    rr_opt(&B, 0);
    expect(&B, "example.test", DNS_TYPE_MX, DNS_MALFORMED, "two OPT records");

    b_hdr(&B, ID, RESP, 1, 1, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_MX);
    rr_opt(&B, 0);
    CHECK(parse(&B, "example.test", DNS_TYPE_MX) == DNS_MALFORMED, "OPT in the answer section");

    b_hdr(&B, ID, RESP, 1, 0, 0, 1);
    b_question(&B, "example.test", DNS_TYPE_MX);
    b_name(&B, "x"); b_rr(&B, DNS_TYPE_OPT, 1232, 0); b_end(&B);
    CHECK(parse(&B, "example.test", DNS_TYPE_MX) == DNS_MALFORMED, "OPT not at the root");
}

static void test_truncated(void)
{
    /* TC with the records cut away, as servers send it */
    b_hdr(&B, ID, RESP | F_TC, 1, 5, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_MX);
    rr_mx(&B, "example.test", 300, 10, "mx1.example.test");
    B.n -= 3;
    expect(&B, "example.test", DNS_TYPE_MX, DNS_TRUNCATED, "TC");
    CHECK(ans.tc && ans.nrr == 0, "TC flag");

    /* but a TC for someone else's question is still a mismatch */
    CHECK(parse(&B, "other.test", DNS_TYPE_MX) == DNS_MISMATCH, "TC, other question");
}

/* ---- is it ours? ----------------------------------------------------------- */

static void test_mismatch(void)
{
    b_hdr(&B, ID + 1, RESP, 1, 1, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_A);
    rr_a(&B, "example.test", 300, ip1);
    expect(&B, "example.test", DNS_TYPE_A, DNS_MISMATCH, "wrong id");
    CHECK(ans.id == ID + 1 && ans.nrr == 0, "id reported");

    b_hdr(&B, ID, RESP, 1, 1, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_A);
    rr_a(&B, "example.test", 300, ip1);
    CHECK(parse(&B, "example.test", DNS_TYPE_A) == DNS_OK, "setup");
    CHECK(parse(&B, "example.tes", DNS_TYPE_A) == DNS_MISMATCH, "other name");
    CHECK(parse(&B, "www.example.test", DNS_TYPE_A) == DNS_MISMATCH, "longer name");
    CHECK(parse(&B, "xample.test", DNS_TYPE_A) == DNS_MISMATCH, "shorter name");
    CHECK(parse(&B, "example.test", DNS_TYPE_AAAA) == DNS_MISMATCH, "other type");
    CHECK(dns_response_parse(B.b, B.n, ID ^ 0x8000, "example.test", DNS_TYPE_A, &ans) == DNS_MISMATCH,
          "other id");

    C = B;
    C.b[12 + 14 + 3] = 3;               /* class CH in the question */
    CHECK(parse(&C, "example.test", DNS_TYPE_A) == DNS_MISMATCH, "other class");
    C = B;
    C.b[2] &= 0x7f;                     /* QR clear: a query */
    CHECK(parse(&C, "example.test", DNS_TYPE_A) == DNS_MISMATCH, "QR clear");
    C = B;
    C.b[2] |= 0x10;                     /* opcode 2, STATUS */
    CHECK(parse(&C, "example.test", DNS_TYPE_A) == DNS_MISMATCH, "opcode");
    C = B;
    C.b[5] = 2;                         /* two questions */
    CHECK(parse(&C, "example.test", DNS_TYPE_A) == DNS_MISMATCH, "QDCOUNT 2");

    /* a name that differs only past a compression pointer */
    b_hdr(&B, ID, RESP, 1, 0, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_A);
    CHECK(parse(&B, "example.test.", DNS_TYPE_A) == DNS_NODATA, "trailing dot in expectation");

    CHECK(parse(&B, "", DNS_TYPE_A) == -1, "empty expected name");
    CHECK(parse(&B, "a..b", DNS_TYPE_A) == -1, "bad expected name");
    CHECK(parse(&B, "example.test", 0) == -1, "qtype 0");
    CHECK(parse(&B, "example.test", DNS_TYPE_OPT) == -1, "qtype OPT");
    CHECK(dns_response_parse(NULL, 0, ID, "a.test", DNS_TYPE_A, &ans) == DNS_MALFORMED, "NULL msg");
}

/* ---- hostile compression ---------------------------------------------------- */

static void test_pointers(void)
{
    size_t at;

    /* an owner pointing at itself */
    b_hdr(&B, ID, RESP, 1, 1, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_A);
    at = B.n;
    b_ptr(&B, (unsigned)at); b_rr(&B, DNS_TYPE_A, DNS_CLASS_IN, 1); b_raw(&B, ip1, 4); b_end(&B);
    expect(&B, "example.test", DNS_TYPE_A, DNS_MALFORMED, "pointer to itself");

    /* forward: to the second record's owner */
    b_hdr(&B, ID, RESP, 1, 2, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_A);
    at = B.n;
    b_ptr(&B, (unsigned)at + 16); b_rr(&B, DNS_TYPE_A, DNS_CLASS_IN, 1); b_raw(&B, ip1, 4); b_end(&B);
    CHECK(B.n == at + 16, "layout");
    rr_a(&B, "example.test", 1, ip2);
    expect(&B, "example.test", DNS_TYPE_A, DNS_MALFORMED, "forward pointer");

    /* labels, then a pointer back into those labels: each jump goes
     * backwards, yet the name never ends */
    b_hdr(&B, ID, RESP, 1, 1, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_A);
    at = B.n;
    b_labels(&B, "x"); b_ptr(&B, (unsigned)at);
    b_rr(&B, DNS_TYPE_A, DNS_CLASS_IN, 1); b_raw(&B, ip1, 4); b_end(&B);
    expect(&B, "example.test", DNS_TYPE_A, DNS_MALFORMED, "pointer into its own labels");

    /* two names pointing into each other */
    b_hdr(&B, ID, RESP, 1, 2, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_A);
    at = B.n;
    b_labels(&B, "a"); b_ptr(&B, (unsigned)at + 4 + 14);       /* -> "b" below */
    b_rr(&B, DNS_TYPE_A, DNS_CLASS_IN, 1); b_raw(&B, ip1, 4); b_end(&B);
    CHECK(B.n == at + 4 + 14, "layout");
    b_labels(&B, "b"); b_ptr(&B, (unsigned)at);
    b_rr(&B, DNS_TYPE_A, DNS_CLASS_IN, 1); b_raw(&B, ip1, 4); b_end(&B);
    expect(&B, "example.test", DNS_TYPE_A, DNS_MALFORMED, "mutual pointers");

    /* into the header */
    for (unsigned off = 0; off < 12; off++) {
        b_hdr(&B, ID, RESP, 1, 1, 0, 0);
        b_question(&B, "example.test", DNS_TYPE_A);
        b_ptr(&B, off); b_rr(&B, DNS_TYPE_A, DNS_CLASS_IN, 1); b_raw(&B, ip1, 4); b_end(&B);
        CHECK(parse(&B, "example.test", DNS_TYPE_A) == DNS_MALFORMED, "pointer to %u", off);
    }

    /* past the end, and a pointer cut in half */
    b_hdr(&B, ID, RESP, 1, 1, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_A);
    b_ptr(&B, 0x3fff); b_rr(&B, DNS_TYPE_A, DNS_CLASS_IN, 1); b_raw(&B, ip1, 4); b_end(&B);
    CHECK(parse(&B, "example.test", DNS_TYPE_A) == DNS_MALFORMED, "pointer past the end");

    /* a compressed question cannot point anywhere earlier */
    b_hdr(&B, ID, RESP, 1, 0, 0, 0);
    b_ptr(&B, 12); b16(&B, DNS_TYPE_A); b16(&B, 1);
    CHECK(parse(&B, "example.test", DNS_TYPE_A) == DNS_MALFORMED, "pointer in the question");

    /* the reserved label types 01 and 10 */
    for (unsigned t = 0x40; t <= 0x80; t += 0x40) {
        b_hdr(&B, ID, RESP, 1, 1, 0, 0);
        b_question(&B, "example.test", DNS_TYPE_A);
        b8(&B, t | 1); b8(&B, 0); b_rr(&B, DNS_TYPE_A, DNS_CLASS_IN, 1); b_raw(&B, ip1, 4); b_end(&B);
        CHECK(parse(&B, "example.test", DNS_TYPE_A) == DNS_MALFORMED, "label type 0x%x", t);
    }

    /* a chain of pointers to pointers is fine while it goes backwards */
    b_hdr(&B, ID, RESP, 1, 3, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_A);
    at = B.n;
    b_ptr(&B, 12); b_rr(&B, DNS_TYPE_A, DNS_CLASS_IN, 1); b_raw(&B, ip1, 4); b_end(&B);
    size_t at2 = B.n;
    b_ptr(&B, (unsigned)at); b_rr(&B, DNS_TYPE_A, DNS_CLASS_IN, 2); b_raw(&B, ip1, 4); b_end(&B);
    b_ptr(&B, (unsigned)at2); b_rr(&B, DNS_TYPE_A, DNS_CLASS_IN, 3); b_raw(&B, ip2, 4); b_end(&B);
    expect(&B, "example.test", DNS_TYPE_A, DNS_OK, "pointer to pointer");
    CHECK(ans.nrr == 3 && ans.rr[2].ttl == 3, "three records: %u", ans.nrr);
}

static void test_long_names(void)
{
    char name[300];
    size_t o = 0;
    const size_t labels[] = { 63, 63, 63, 61 };
    for (size_t i = 0; i < 4; i++) {
        memset(name + o, (int)('b' + i), labels[i]);
        o += labels[i];
        name[o++] = '.';
    }
    name[o - 1] = 0;

    /* a 255-octet question, an exchange that is all of it: fine */
    b_hdr(&B, ID, RESP, 1, 1, 0, 0);
    b_question(&B, name, DNS_TYPE_MX);
    b_ptr(&B, 12); b_rr(&B, DNS_TYPE_MX, DNS_CLASS_IN, 5); b16(&B, 1); b_ptr(&B, 12); b_end(&B);
    expect(&B, name, DNS_TYPE_MX, DNS_OK, "255-octet names");
    CHECK(ans.nrr == 1 && strcmp(ans.rr[0].target, name) == 0 && strlen(ans.rr[0].target) == 253,
          "253-character exchange");

    /* one label more through a pointer: 258 octets */
    b_hdr(&B, ID, RESP, 1, 1, 0, 0);
    b_question(&B, name, DNS_TYPE_MX);
    b_ptr(&B, 12); b_rr(&B, DNS_TYPE_MX, DNS_CLASS_IN, 5); b16(&B, 1);
    b_labels(&B, "ab"); b_ptr(&B, 12); b_end(&B);
    expect(&B, name, DNS_TYPE_MX, DNS_MALFORMED, "name over 255 octets by pointer");

    /* and without compression */
    b_hdr(&B, ID, RESP, 1, 1, 0, 0);
    b_question(&B, name, DNS_TYPE_MX);
    b_ptr(&B, 12); b_rr(&B, DNS_TYPE_MX, DNS_CLASS_IN, 5); b16(&B, 1);
    b_labels(&B, "a"); b_name(&B, name); b_end(&B);
    CHECK(parse(&B, name, DNS_TYPE_MX) == DNS_MALFORMED, "name over 255 octets");

    /* longer than any DNS message can be */
    b_hdr(&B, ID, RESP, 1, 0, 0, 0);
    b_question(&B, "example.test", DNS_TYPE_A);
    CHECK(dns_response_parse(B.b, DNS_MSG_MAX + 1, ID, "example.test", DNS_TYPE_A, &ans) == DNS_MALFORMED,
          "over 65535 octets");
    CHECK(dns_response_parse(B.b, DNS_MSG_MAX, ID, "example.test", DNS_TYPE_A, &ans) == DNS_NODATA,
          "65535 octets, trailing bytes ignored");
}

static void test_status_names(void)
{
    CHECK(strcmp(dns_status_name(DNS_OK), "ok") == 0, "ok");
    CHECK(strcmp(dns_status_name(DNS_CNAME_LOOP), "cname-loop") == 0, "cname-loop");
    CHECK(strcmp(dns_status_name(-1), "?") == 0 && strcmp(dns_status_name(99), "?") == 0, "?");
}

int main(void)
{
    test_query_bytes();
    test_query_names();
    test_query_roundtrip();
    test_a();
    test_aaaa();
    test_mx();
    test_null_mx();
    test_many();
    test_ttl();
    test_cname();
    test_cname_loops();
    test_negative();
    test_rcodes();
    test_edns_shape();
    test_truncated();
    test_mismatch();
    test_pointers();
    test_long_names();
    test_status_names();

    return check_summary();
}
