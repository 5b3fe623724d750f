/* sources: csrc/dns/msg.c */
/* libs: */
/* DNS response parsing on arbitrary bytes. The expectations come from the
 * input: its own id and question (read here without the code under test),
 * and a fixed name with a type the last byte picks. Whatever the verdict,
 * every count, string, offset and TTL handed back must be in range, and the
 * query builder must agree with the parser on which names are valid. */
#include "dns/msg.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define REQUIRE(c) do { if (!(c)) abort(); } while (0)

static const uint16_t types[] = {
    DNS_TYPE_A, DNS_TYPE_NS, DNS_TYPE_CNAME, DNS_TYPE_SOA,
    DNS_TYPE_MX, DNS_TYPE_TXT, DNS_TYPE_AAAA,
};

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static int text_char(unsigned char c)
{
    return c > 0x20 && c < 0x7f && c != '.' && c != '\\';
}

static int lower(int c) { return c >= 'A' && c <= 'Z' ? c | 0x20 : c; }

/* A name as the parser hands it out: text characters, lower case, no
 * empty label, no trailing dot, NUL inside the buffer. */
static void check_text(const char *s, size_t cap)
{
    const char *end = memchr(s, 0, cap);
    REQUIRE(end != NULL);
    size_t n = (size_t)(end - s);
    REQUIRE(n <= 253);
    if (n == 0) return;
    REQUIRE(s[0] != '.' && s[n - 1] != '.' && !strstr(s, ".."));
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        REQUIRE(c == '.' || text_char(c));
        REQUIRE(lower(c) == c);
    }
}

/* Does `got` (parser output) name the same thing as `want` (our text)? */
static int same_name(const char *got, const char *want)
{
    size_t n = strlen(want);
    if (n && want[n - 1] == '.') n--;
    if (strlen(got) != n) return 0;
    for (size_t i = 0; i < n; i++)
        if (got[i] != lower((unsigned char)want[i])) return 0;
    return 1;
}

static void check(const uint8_t *d, size_t n, uint16_t id, const char *name, uint16_t qtype)
{
    struct dns_answer a;
    uint8_t q[DNS_QUERY_MAX];

    memset(&a, 0xa5, sizeof a);
    int r = dns_response_parse(d, n, id, name, qtype, &a);
    int qn = dns_query_build(q, sizeof q, id, name, qtype, 1);
    REQUIRE((r < 0) == (qn < 0));
    if (r < 0) return;
    REQUIRE(qn >= DNS_HEADER_LEN + 6 && qn <= DNS_QUERY_MAX);
    REQUIRE(r == (int)a.status && r <= DNS_CNAME_LOOP);
    if (n < DNS_HEADER_LEN) REQUIRE(r == DNS_MALFORMED);
    if (n >= DNS_HEADER_LEN && n <= DNS_MSG_MAX) {
        REQUIRE(a.id == get16(d));
        if (a.id != id) REQUIRE(r == DNS_MISMATCH);
    }

    REQUIRE(a.nrr <= DNS_MAX_RR);
    REQUIRE(a.ncname <= DNS_MAX_CNAME);
    REQUIRE(a.aa <= 1 && a.tc <= 1 && a.ra <= 1 && a.edns <= 1);
    REQUIRE(a.null_mx <= 1 && a.more <= 1 && a.has_neg_ttl <= 1);
    REQUIRE(a.neg_ttl <= 0x7fffffffu && a.cname_ttl <= 0x7fffffffu);
    REQUIRE(a.has_neg_ttl || a.neg_ttl == 0);
    REQUIRE(a.rcode < 4096);
    check_text(a.canonical, sizeof a.canonical);

    if (r == DNS_TRUNCATED) REQUIRE(a.tc);
    /* a verdict on the name, or nothing about the name at all */
    if (r != DNS_OK && r != DNS_NODATA && r != DNS_NXDOMAIN && r != DNS_CNAME_LOOP)
        REQUIRE(a.canonical[0] == 0 && a.ncname == 0 && a.cname_ttl == 0);
    if (r != DNS_NODATA && r != DNS_NXDOMAIN) REQUIRE(!a.has_neg_ttl);
    if (r == DNS_CNAME_LOOP) REQUIRE(a.ncname == DNS_MAX_CNAME);
    if (r == DNS_OK || r == DNS_NODATA || r == DNS_NXDOMAIN) {
        REQUIRE(!a.tc && a.id == id && (d[2] & 0x80));
        REQUIRE(a.rcode == (r == DNS_NXDOMAIN ? 3 : 0));
        if (a.ncname == 0) REQUIRE(same_name(a.canonical, name));
        else REQUIRE(qtype != DNS_TYPE_CNAME);
    }
    if (r != DNS_OK) {
        REQUIRE(a.nrr == 0 && !a.more && !a.null_mx);
        return;
    }

    REQUIRE(a.nrr >= 1);
    int saw_root_mx = 0;
    for (unsigned i = 0; i < a.nrr; i++) {
        const struct dns_rr *rr = &a.rr[i];
        REQUIRE(rr->type == qtype && rr->ttl <= 0x7fffffffu);
        REQUIRE(rr->rdoff >= DNS_HEADER_LEN && (size_t)rr->rdoff + rr->rdlen <= n);
        check_text(rr->target, sizeof rr->target);
        switch (rr->type) {
        case DNS_TYPE_A:
            REQUIRE(rr->rdlen == 4 && memcmp(rr->addr, d + rr->rdoff, 4) == 0);
            break;
        case DNS_TYPE_AAAA:
            REQUIRE(rr->rdlen == 16 && memcmp(rr->addr, d + rr->rdoff, 16) == 0);
            break;
        case DNS_TYPE_MX:
            REQUIRE(rr->rdlen >= 3 && rr->pref == get16(d + rr->rdoff));
            if (!rr->target[0]) saw_root_mx = 1;
            break;
        case DNS_TYPE_CNAME:
        case DNS_TYPE_NS:
            REQUIRE(rr->rdlen >= 1 && rr->pref == 0);
            break;
        default:
            REQUIRE(!rr->target[0] && rr->pref == 0);
        }
    }
    /* a root exchange beyond the kept records may set the flag too */
    if (!a.more) REQUIRE(a.null_mx == saw_root_mx);
    else if (saw_root_mx) REQUIRE(a.null_mx);

    /* the same bytes, the same verdict */
    struct dns_answer b;
    REQUIRE(dns_response_parse(d, n, id, name, qtype, &b) == r);
    REQUIRE(b.nrr == a.nrr && strcmp(b.canonical, a.canonical) == 0);
    REQUIRE(a.nrr == 0 || memcmp(&a.rr[0], &b.rr[0], sizeof a.rr[0]) == 0);
}

/* The question exactly as written at offset 12, uncompressed, as text.
 * Returns 1 when it is one a query of ours could have carried. */
static int question_of(const uint8_t *d, size_t n, char *name, size_t cap, uint16_t *type)
{
    size_t pos = DNS_HEADER_LEN, o = 0, wire = 1;
    int plain = 1;

    name[0] = 0;
    if (n <= pos) return 0;
    while (pos < n && d[pos] != 0) {
        size_t len = d[pos];
        if (len > DNS_LABEL_MAX || pos + 1 + len > n || o + len + 2 > cap) return 0;
        if (o) name[o++] = '.';
        for (size_t k = 1; k <= len; k++) {
            unsigned char c = d[pos + k];
            plain &= text_char(c);
            name[o++] = c ? (char)c : '?';
        }
        wire += 1 + len;
        pos += 1 + len;
    }
    name[o] = 0;
    if (pos + 5 > n || o == 0) return 0;
    *type = get16(d + pos + 1);
    return plain && wire <= DNS_NAME_MAX && get16(d + pos + 3) == DNS_CLASS_IN &&
           *type != 0 && *type != DNS_TYPE_OPT;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char name[512];
    uint16_t qtype = 0;

    if (size < 2) {
        check(data, size, 0, "example.test", DNS_TYPE_MX);
        return 0;
    }
    uint16_t id = get16(data);
    uint16_t pick = types[data[size - 1] % (sizeof types / sizeof types[0])];

    check(data, size, id, "example.test", pick);
    check(data, size, (uint16_t)(id ^ 1), "example.test", pick);

    int plain = question_of(data, size, name, sizeof name, &qtype);
    if (name[0]) {
        struct dns_answer a;
        check(data, size, id, name, qtype);
        int r = dns_response_parse(data, size, id, name, qtype, &a);
        /* Our own question, id, QR and opcode: never a mismatch. */
        if (plain && (data[2] & 0xf8) == 0x80 && get16(data + 4) == 1)
            REQUIRE(r != DNS_MISMATCH && r >= 0);

        /* A query of ours, answered by itself with QR set: no data. */
        uint8_t q[DNS_QUERY_MAX];
        int qn = dns_query_build(q, sizeof q, id, name, qtype, data[size - 1] & 1);
        REQUIRE(plain ? qn > 0 : 1);
        if (qn > 0) {
            q[2] |= 0x80;
            REQUIRE(dns_response_parse(q, (size_t)qn, id, name, qtype, &a) == DNS_NODATA);
            REQUIRE(same_name(a.canonical, name) && !a.has_neg_ttl);
        }
    }
    return 0;
}
