/* DNS wire format (see msg.h): queries per RFC 1035 §4.1 with EDNS0 (RFC
 * 6891), and responses checked as a stub resolver must before trusting
 * them: id and question (RFC 5452 §3, §9.1), bounds of every name and
 * record, loop-free name compression, CNAME chains (RFC 1034 §3.6.2),
 * negative TTL (RFC 2308). */
#include "dns/msg.h"

#include <string.h>

#define FLAG_QR 0x8000u
#define FLAG_AA 0x0400u
#define FLAG_TC 0x0200u
#define FLAG_RD 0x0100u
#define FLAG_RA 0x0080u
#define OPCODE(f) (((f) >> 11) & 0xfu)

#define RCODE_NOERROR  0
#define RCODE_SERVFAIL 2
#define RCODE_NXDOMAIN 3
#define RCODE_REFUSED  5

/* A name of at most 127 labels never needs more pointers than this; the
 * rule in name_read() already forbids loops, this bounds the work. */
#define MAX_JUMPS 127

#define RR_FIXED 10             /* type, class, TTL, RDLENGTH (RFC 1035 §4.1.3) */

static uint16_t get16(const uint8_t *p) { return (uint16_t)(p[0] << 8 | p[1]); }

static uint32_t get32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static void put16(uint8_t *p, uint16_t v) { p[0] = (uint8_t)(v >> 8); p[1] = (uint8_t)v; }

/* RFC 2181 §8: a TTL with the most significant bit set is read as zero. */
static uint32_t ttl_clamp(uint32_t t) { return (t & 0x80000000u) ? 0 : t; }

static uint8_t ascii_lower(uint8_t c)
{
    return (c >= 'A' && c <= 'Z') ? (uint8_t)(c | 0x20) : c;
}

/* Octets we accept in a label given or handed back as text. "." would be
 * read as a label break and "\" as the start of an escape (RFC 1035 §5.1),
 * which we do not do; controls, space and 8-bit octets have no place in a
 * host name, and refusing them keeps text and wire one-to-one. */
static int text_char(uint8_t c)
{
    return c > 0x20 && c < 0x7f && c != '.' && c != '\\';
}

/* Text name to wire labels (case kept). Returns the wire length, root
 * label included, or -1. */
static int name_from_text(const char *s, uint8_t wire[DNS_NAME_MAX])
{
    size_t out = 0, i = 0;

    if (!s || !s[0]) return -1;
    while (s[i]) {
        size_t start = i;
        while (s[i] && s[i] != '.') {
            if (!text_char((uint8_t)s[i]) || i - start == DNS_LABEL_MAX) return -1;
            i++;
        }
        size_t n = i - start;
        /* an empty label: ".", ".a", "a..b" */
        if (n == 0 || out + 1 + n + 1 > DNS_NAME_MAX) return -1;
        wire[out++] = (uint8_t)n;
        memcpy(wire + out, s + start, n);
        out += n;
        if (s[i] == '.') i++;       /* a single trailing dot ends the loop */
    }
    wire[out++] = 0;
    return (int)out;
}

/* Flat wire name (lower case already) to text without the trailing dot;
 * on failure out is "". */
static int name_to_text(const uint8_t *flat, char out[DNS_NAME_TEXT])
{
    size_t i = 0, o = 0;

    while (flat[i]) {
        size_t n = flat[i];
        if (o) out[o++] = '.';
        for (size_t k = 1; k <= n; k++) {
            if (!text_char(flat[i + k])) {
                out[0] = 0;
                return -1;
            }
            out[o++] = (char)flat[i + k];
        }
        i += 1 + n;
    }
    out[o] = 0;
    return 0;
}

/* Read the possibly compressed name at m[pos] into flat, lower-cased, as
 * uncompressed wire labels; *next is the offset after the name as it
 * appears at pos. Returns the flat length (root label included) or -1.
 *
 * RFC 1035 §4.1.4: a pointer refers to a prior occurrence of a name. We
 * require each pointer to land before the start of the labels being read
 * (the name's own start, then the previous pointer's target), so every
 * jump goes strictly backwards and no pointer arrangement can loop; the
 * jump count and the 255-octet limit bound the work besides. Pointers into
 * the header are refused: no name lives there. */
static int name_read(const uint8_t *m, size_t len, size_t pos,
                     uint8_t flat[DNS_NAME_MAX], size_t *next)
{
    size_t out = 0, run = pos, jumps = 0;
    int jumped = 0;

    for (;;) {
        if (pos >= len) return -1;
        uint8_t c = m[pos];
        if ((c & 0xc0) == 0xc0) {
            if (pos + 1 >= len) return -1;
            size_t target = (size_t)(c & 0x3f) << 8 | m[pos + 1];
            if (!jumped) *next = pos + 2;
            jumped = 1;
            if (target < DNS_HEADER_LEN || target >= run || ++jumps > MAX_JUMPS)
                return -1;
            pos = run = target;
            continue;
        }
        /* 01 and 10: extended label types, unused (RFC 6891 §5) */
        if (c & 0xc0) return -1;
        if (c == 0) {
            flat[out++] = 0;
            if (!jumped) *next = pos + 1;
            return (int)out;
        }
        /* room for this label and the root label after it */
        if (out + 1 + c + 1 > DNS_NAME_MAX || c >= len - pos) return -1;
        flat[out++] = c;
        for (size_t k = 1; k <= c; k++) flat[out++] = ascii_lower(m[pos + k]);
        pos += 1 + (size_t)c;
    }
}

static int name_eq(const uint8_t *a, int alen, const uint8_t *b, int blen)
{
    return alen == blen && memcmp(a, b, (size_t)alen) == 0;
}

/* `zone` equals `name` or is one of its ancestors, on label boundaries. */
static int name_under(const uint8_t *name, int nlen, const uint8_t *zone, int zlen)
{
    for (int i = 0; i < nlen; i += 1 + name[i]) {
        if (nlen - i == zlen && memcmp(name + i, zone, (size_t)zlen) == 0) return 1;
        if (name[i] == 0) break;
    }
    return 0;
}

/* One resource record (RFC 1035 §4.1.3) with its owner decompressed. */
struct rr_view {
    uint8_t owner[DNS_NAME_MAX];
    int owner_len;
    uint16_t type, class;
    uint32_t ttl;               /* as sent; clamp before use */
    size_t rdoff, rdlen;
    size_t next;                /* offset of the following record */
};

static int rr_read(const uint8_t *m, size_t len, size_t pos, struct rr_view *rr)
{
    size_t p;

    rr->owner_len = name_read(m, len, pos, rr->owner, &p);
    if (rr->owner_len < 0 || len - p < RR_FIXED) return -1;
    rr->type = get16(m + p);
    rr->class = get16(m + p + 2);
    rr->ttl = get32(m + p + 4);
    rr->rdlen = get16(m + p + 8);
    rr->rdoff = p + RR_FIXED;
    if (rr->rdlen > len - rr->rdoff) return -1;
    rr->next = rr->rdoff + rr->rdlen;
    return 0;
}

/* A name that must fill the rest of an rdata exactly. */
static int rdata_name(const uint8_t *m, size_t len, size_t pos, size_t end,
                      uint8_t flat[DNS_NAME_MAX], size_t *next)
{
    int n = name_read(m, len, pos, flat, next);
    return (n < 0 || *next > end) ? -1 : n;
}

struct sections {
    size_t an, ns, ar;          /* offsets of the three record sections */
    unsigned ancount, nscount, arcount;
};

/* Walk every record of every section so that nothing the later passes
 * read can be out of bounds, and pick up the OPT record. Bytes after the
 * last record are ignored. Returns 0 or -1. */
static int walk(const uint8_t *m, size_t len, struct sections *s, struct dns_answer *out)
{
    struct rr_view rr;
    size_t pos = s->an;
    unsigned total = s->ancount + s->nscount + s->arcount;

    for (unsigned i = 0; i < total; i++) {
        if (i == s->ancount) s->ns = pos;
        if (i == s->ancount + s->nscount) s->ar = pos;
        if (rr_read(m, len, pos, &rr) < 0) return -1;
        if (rr.type == DNS_TYPE_OPT) {
            /* RFC 6891 §6.1.1: one OPT, in the additional section, owned
             * by the root; its TTL carries the upper RCODE bits. */
            if (i < s->ancount + s->nscount || out->edns || rr.owner_len != 1) return -1;
            out->edns = 1;
            out->rcode = (uint16_t)((rr.ttl >> 24) << 4 | out->rcode);
        }
        pos = rr.next;
    }
    if (s->nscount == 0) s->ns = pos;
    if (s->arcount == 0) s->ar = pos;
    return 0;
}

/* Decode the rdata of a record that answers the question. */
static int decode_rr(const uint8_t *m, size_t len, const struct rr_view *rr,
                     struct dns_rr *d, struct dns_answer *out)
{
    uint8_t flat[DNS_NAME_MAX];
    size_t end = rr->rdoff + rr->rdlen, next;
    int n;

    memset(d, 0, sizeof *d);
    d->type = rr->type;
    d->ttl = ttl_clamp(rr->ttl);
    d->rdoff = (uint16_t)rr->rdoff;
    d->rdlen = (uint16_t)rr->rdlen;
    switch (rr->type) {
    case DNS_TYPE_A:                    /* RFC 1035 §3.4.1 */
        if (rr->rdlen != 4) return -1;
        memcpy(d->addr, m + rr->rdoff, 4);
        return 0;
    case DNS_TYPE_AAAA:                 /* RFC 3596 §2.2 */
        if (rr->rdlen != 16) return -1;
        memcpy(d->addr, m + rr->rdoff, 16);
        return 0;
    case DNS_TYPE_MX:                   /* RFC 1035 §3.3.9 */
        if (rr->rdlen < 3) return -1;
        d->pref = get16(m + rr->rdoff);
        n = rdata_name(m, len, rr->rdoff + 2, end, flat, &next);
        if (n < 0 || next != end || name_to_text(flat, d->target) < 0) return -1;
        if (n == 1) out->null_mx = 1;   /* RFC 7505 §3 */
        return 0;
    case DNS_TYPE_CNAME:
    case DNS_TYPE_NS:
        n = rdata_name(m, len, rr->rdoff, end, flat, &next);
        if (n < 0 || next != end || name_to_text(flat, d->target) < 0) return -1;
        return 0;
    default:
        return 0;                       /* raw rdata only */
    }
}

/* The single CNAME owned by cur in the answer section: 1 found (target in
 * flat, *tlen), 0 none, -1 broken or more than one (RFC 2181 §10.1). */
static int find_cname(const uint8_t *m, size_t len, const struct sections *s,
                      const uint8_t *cur, int curlen,
                      uint8_t flat[DNS_NAME_MAX], int *tlen, uint32_t *ttl)
{
    struct rr_view rr;
    size_t pos = s->an, next;
    int found = 0;

    for (unsigned i = 0; i < s->ancount; i++, pos = rr.next) {
        if (rr_read(m, len, pos, &rr) < 0) return -1;
        if (rr.type != DNS_TYPE_CNAME || rr.class != DNS_CLASS_IN ||
            !name_eq(rr.owner, rr.owner_len, cur, curlen))
            continue;
        if (found) return -1;
        found = 1;
        *tlen = rdata_name(m, len, rr.rdoff, rr.next, flat, &next);
        if (*tlen < 0 || next != rr.next) return -1;
        *ttl = ttl_clamp(rr.ttl);
    }
    return found;
}

/* RFC 2308 §5: the negative TTL is min(SOA TTL, SOA MINIMUM) of the SOA in
 * the authority section. Only an SOA of the name's own zone counts: its
 * owner must be the name or an ancestor of it. */
static int find_soa(const uint8_t *m, size_t len, const struct sections *s,
                    const uint8_t *cur, int curlen, struct dns_answer *out)
{
    uint8_t flat[DNS_NAME_MAX];
    struct rr_view rr;
    size_t pos = s->ns, p;

    for (unsigned i = 0; i < s->nscount; i++, pos = rr.next) {
        if (rr_read(m, len, pos, &rr) < 0) return -1;
        if (rr.type != DNS_TYPE_SOA || rr.class != DNS_CLASS_IN ||
            !name_under(cur, curlen, rr.owner, rr.owner_len))
            continue;
        /* RFC 1035 §3.3.13: MNAME, RNAME, then five 32-bit fields */
        if (rdata_name(m, len, rr.rdoff, rr.next, flat, &p) < 0 ||
            rdata_name(m, len, p, rr.next, flat, &p) < 0 || rr.next - p != 20)
            return -1;
        uint32_t ttl = ttl_clamp(rr.ttl), minimum = ttl_clamp(get32(m + p + 16));
        out->neg_ttl = ttl < minimum ? ttl : minimum;
        out->has_neg_ttl = 1;
        return 0;
    }
    return 0;
}

static enum dns_status judge(const uint8_t *m, size_t len, uint16_t id,
                             const uint8_t *qname, int qlen, uint16_t qtype,
                             struct dns_answer *out)
{
    struct sections s;
    uint8_t cur[DNS_NAME_MAX], flat[DNS_NAME_MAX];
    int curlen;
    size_t pos = DNS_HEADER_LEN;

    if (!m || len < DNS_HEADER_LEN || len > DNS_MSG_MAX) return DNS_MALFORMED;
    uint16_t flags = get16(m + 2);
    unsigned qdcount = get16(m + 4);
    out->id = get16(m);
    out->aa = (flags & FLAG_AA) != 0;
    out->tc = (flags & FLAG_TC) != 0;
    out->ra = (flags & FLAG_RA) != 0;
    out->rcode = flags & 0xfu;
    s.ancount = get16(m + 6);
    s.nscount = get16(m + 8);
    s.arcount = get16(m + 10);

    /* RFC 5452 §3, §9.1: only a response with our id and question is ours;
     * anything else may be forged and must not end the wait. */
    if (out->id != id || !(flags & FLAG_QR) || OPCODE(flags) != 0 || qdcount > 1)
        return DNS_MISMATCH;
    if (qdcount == 1) {
        int n = name_read(m, len, pos, flat, &pos);
        if (n < 0 || len - pos < 4) return DNS_MALFORMED;
        if (!name_eq(flat, n, qname, qlen) || get16(m + pos) != qtype ||
            get16(m + pos + 2) != DNS_CLASS_IN)
            return DNS_MISMATCH;
        pos += 4;
    } else if (out->rcode == RCODE_NOERROR || out->rcode == RCODE_NXDOMAIN) {
        /* Some servers drop the question from an error (a FORMERR to
         * EDNS, say), but an answer without it proves nothing. */
        return DNS_MISMATCH;
    }
    if (out->tc) return DNS_TRUNCATED;      /* the rest may be cut anywhere */

    s.an = s.ns = s.ar = pos;
    if (walk(m, len, &s, out) < 0) return DNS_MALFORMED;

    switch (out->rcode) {
    case RCODE_NOERROR:
    case RCODE_NXDOMAIN:
        break;
    case RCODE_SERVFAIL: return DNS_SERVFAIL;
    case RCODE_REFUSED:  return DNS_REFUSED;
    default:             return DNS_RCODE;
    }

    /* RFC 1034 §3.6.2 and §4.3.2: the answer to a name with a CNAME is
     * the data at its target; RFC 6604 §2: so is an NXDOMAIN. */
    memcpy(cur, qname, (size_t)qlen);
    curlen = qlen;
    if (qtype != DNS_TYPE_CNAME) {
        for (;;) {
            uint32_t ttl = 0;
            int tlen = 0, r = find_cname(m, len, &s, cur, curlen, flat, &tlen, &ttl);
            if (r < 0) return DNS_MALFORMED;
            if (r == 0) break;
            /* A loop never ends, so the bound catches every loop too. */
            if (out->ncname == DNS_MAX_CNAME) return DNS_CNAME_LOOP;
            out->cname_ttl = (out->ncname == 0 || ttl < out->cname_ttl) ? ttl : out->cname_ttl;
            out->ncname++;
            memcpy(cur, flat, (size_t)tlen);
            curlen = tlen;
        }
    }
    if (name_to_text(cur, out->canonical) < 0) return DNS_MALFORMED;

    if (out->rcode == RCODE_NOERROR) {
        struct rr_view rr;
        struct dns_rr one;
        pos = s.an;
        for (unsigned i = 0; i < s.ancount; i++, pos = rr.next) {
            if (rr_read(m, len, pos, &rr) < 0) return DNS_MALFORMED;
            if (rr.type != qtype || rr.class != DNS_CLASS_IN ||
                !name_eq(rr.owner, rr.owner_len, cur, curlen))
                continue;
            /* Records past the limit are still checked: the verdict on a
             * message must not depend on where the limit cuts it. */
            struct dns_rr *d = out->nrr < DNS_MAX_RR ? &out->rr[out->nrr] : &one;
            if (decode_rr(m, len, &rr, d, out) < 0) return DNS_MALFORMED;
            if (out->nrr < DNS_MAX_RR) out->nrr++;
            else out->more = 1;
        }
        if (out->nrr > 0) return DNS_OK;
    }
    if (find_soa(m, len, &s, cur, curlen, out) < 0) return DNS_MALFORMED;
    return out->rcode == RCODE_NXDOMAIN ? DNS_NXDOMAIN : DNS_NODATA;
}

int dns_response_parse(const uint8_t *msg, size_t len, uint16_t expect_id,
                       const char *expect_name, uint16_t expect_qtype,
                       struct dns_answer *out)
{
    uint8_t qname[DNS_NAME_MAX];
    int qlen = name_from_text(expect_name, qname);

    if (qlen < 0 || expect_qtype == 0 || expect_qtype == DNS_TYPE_OPT) return -1;
    for (int i = 0; i < qlen; i++) qname[i] = ascii_lower(qname[i]);
    memset(out, 0, sizeof *out);
    out->status = judge(msg, len, expect_id, qname, qlen, expect_qtype, out);
    /* Nothing half-read is handed out: records only with a positive
     * answer, the chain and negative TTL only with a verdict on the name. */
    if (out->status != DNS_OK) {
        out->nrr = 0;
        out->more = 0;
        out->null_mx = 0;
    }
    if (out->status != DNS_OK && out->status != DNS_NODATA &&
        out->status != DNS_NXDOMAIN && out->status != DNS_CNAME_LOOP) {
        out->ncname = 0;
        out->cname_ttl = 0;
        out->canonical[0] = 0;
    }
    if (out->status != DNS_NODATA && out->status != DNS_NXDOMAIN) {
        out->has_neg_ttl = 0;
        out->neg_ttl = 0;
    }
    return (int)out->status;
}

int dns_query_build(uint8_t *buf, size_t cap, uint16_t id, const char *name,
                    uint16_t qtype, int want_edns)
{
    uint8_t wire[DNS_NAME_MAX];
    int n = name_from_text(name, wire);

    if (n < 0 || qtype == 0 || qtype == DNS_TYPE_OPT) return -1;
    size_t total = DNS_HEADER_LEN + (size_t)n + 4 + (want_edns ? 11 : 0);
    if (!buf || cap < total) return -1;

    /* RFC 1035 §4.1.1: one question, recursion desired, nothing else. */
    memset(buf, 0, DNS_HEADER_LEN);
    put16(buf, id);
    put16(buf + 2, FLAG_RD);
    put16(buf + 4, 1);
    put16(buf + 10, want_edns ? 1 : 0);
    uint8_t *p = buf + DNS_HEADER_LEN;
    memcpy(p, wire, (size_t)n);
    p += n;
    put16(p, qtype);
    put16(p + 2, DNS_CLASS_IN);
    p += 4;
    if (want_edns) {
        /* RFC 6891 §6.1.2: root owner, type OPT, CLASS = payload size,
         * TTL = extended RCODE 0, version 0, no flags (DO clear), no options. */
        p[0] = 0;
        put16(p + 1, DNS_TYPE_OPT);
        put16(p + 3, DNS_EDNS_PAYLOAD);
        memset(p + 5, 0, 6);
    }
    return (int)total;
}

const char *dns_status_name(int status)
{
    static const char *const names[] = {
        [DNS_OK] = "ok", [DNS_NODATA] = "nodata", [DNS_NXDOMAIN] = "nxdomain",
        [DNS_SERVFAIL] = "servfail", [DNS_REFUSED] = "refused",
        [DNS_RCODE] = "rcode", [DNS_TRUNCATED] = "truncated",
        [DNS_MISMATCH] = "mismatch", [DNS_MALFORMED] = "malformed",
        [DNS_CNAME_LOOP] = "cname-loop",
    };
    if (status < 0 || (size_t)status >= sizeof names / sizeof names[0]) return "?";
    return names[status];
}
