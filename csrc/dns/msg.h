/* DNS messages on the wire (RFC 1035 §4): the stub resolver's query, and
 * the checks and decoding of the answer to it. Pure code: bytes in, a
 * caller-provided struct out; no I/O, no allocation, every index bounded. */
#ifndef DNS_MSG_H
#define DNS_MSG_H

#include <stddef.h>
#include <stdint.h>

enum dns_type {
    DNS_TYPE_A = 1,
    DNS_TYPE_NS = 2,
    DNS_TYPE_CNAME = 5,
    DNS_TYPE_SOA = 6,
    DNS_TYPE_MX = 15,
    DNS_TYPE_TXT = 16,
    DNS_TYPE_AAAA = 28,
    DNS_TYPE_OPT = 41,          /* EDNS0 pseudo-record, never a question */
};

#define DNS_CLASS_IN     1
#define DNS_HEADER_LEN   12
#define DNS_LABEL_MAX    63     /* octets in a label (RFC 1035 §2.3.4) */
#define DNS_NAME_MAX     255    /* octets in a name on the wire, root label included */
#define DNS_NAME_TEXT    256    /* buffer for a name as text: at most 253 characters */
#define DNS_MAX_RR       32     /* answer records kept; past that, `more` is set */
#define DNS_MAX_CNAME    8      /* CNAMEs followed inside one answer */
/* UDP payload we advertise. RFC 6891 §6.2.5 leaves the size to us; 1232 is
 * 1280 (IPv6 minimum MTU) less IPv6 and UDP headers, so answers are not
 * fragmented (the value DNS Flag Day 2020 settled on). */
#define DNS_EDNS_PAYLOAD 1232
#define DNS_MSG_MAX      65535  /* longest message: TCP's 16-bit length (RFC 1035 §4.2.2) */
/* Longest query dns_query_build() writes: header, question, OPT record. */
#define DNS_QUERY_MAX    (DNS_HEADER_LEN + DNS_NAME_MAX + 4 + 11)

/* ---- query ------------------------------------------------------------ */

/* Write a query for `name` (text, "example.test" or "example.test.") of type
 * `qtype`, class IN, RD set, with an EDNS0 OPT record advertising
 * DNS_EDNS_PAYLOAD octets when want_edns is non-zero. The name keeps the
 * caller's case. Labels are 1..63 octets of printable ASCII other than "."
 * and "\" (no escapes), the name at most 255 octets on the wire; the root
 * alone is refused. Returns the message length, or -1 when the name or
 * type is invalid (0, OPT) or cap is too small; buf is then unspecified. */
int dns_query_build(uint8_t *buf, size_t cap, uint16_t id, const char *name,
                    uint16_t qtype, int want_edns);

/* ---- response --------------------------------------------------------- */

enum dns_status {
    DNS_OK = 0,         /* rr[] holds the records of the question's type */
    DNS_NODATA,         /* NOERROR, but no record of that type (RFC 2308 §2.2) */
    DNS_NXDOMAIN,       /* the (canonical) name does not exist (RFC 2308 §2.1) */
    DNS_SERVFAIL,
    DNS_REFUSED,
    DNS_RCODE,          /* another RCODE (FORMERR, NOTIMP, BADVERS...): see rcode */
    DNS_TRUNCATED,      /* TC set: ask again over TCP */
    DNS_MISMATCH,       /* not the answer to our query (RFC 5452 §3): ignore it */
    DNS_MALFORMED,      /* the answer to our query, but broken */
    DNS_CNAME_LOOP,     /* CNAME chain loops or is longer than DNS_MAX_CNAME */
};

struct dns_rr {
    uint16_t type;
    uint16_t pref;                  /* MX preference */
    uint32_t ttl;                   /* seconds; a TTL with the top bit set is 0 */
    uint16_t rdoff, rdlen;          /* the raw rdata: msg[rdoff, rdoff + rdlen) */
    uint8_t addr[16];               /* A: 4 octets, AAAA: 16, network order */
    /* MX exchange, CNAME or NS target: lower case, no trailing dot; ""
     * for the root (the null MX of RFC 7505). Empty for other types. */
    char target[DNS_NAME_TEXT];
};

struct dns_answer {
    enum dns_status status;
    uint16_t id;
    uint16_t rcode;                 /* 12 bits when an OPT record extends it */
    uint8_t aa, tc, ra;             /* header flags */
    uint8_t edns;                   /* the response carried an OPT record */
    uint8_t null_mx;                /* an MX record with exchange "." (RFC 7505) */
    uint8_t more;                   /* more than DNS_MAX_RR records matched */
    uint8_t has_neg_ttl;            /* NXDOMAIN/NODATA with a usable SOA */
    uint32_t neg_ttl;               /* min(SOA TTL, SOA MINIMUM), RFC 2308 §5 */
    /* The chain, with OK, NODATA and NXDOMAIN (ncname also with CNAME_LOOP);
     * zero and "" otherwise. */
    unsigned ncname;                /* CNAMEs followed from the question's name */
    uint32_t cname_ttl;             /* smallest TTL along that chain */
    char canonical[DNS_NAME_TEXT];  /* name at the end of the chain, as target */
    unsigned nrr;                   /* records in rr[]; 0 unless OK */
    struct dns_rr rr[DNS_MAX_RR];
};

/* Judge `msg` as the answer to the query (expect_id, expect_name,
 * expect_qtype) and fill *out, which is zeroed first. The id, the
 * question and QR are checked before anything else (MISMATCH), then TC
 * (TRUNCATED), then every record of every section must lie inside msg
 * (MALFORMED; bytes after the last record are ignored, a message longer
 * than DNS_MSG_MAX is refused). The CNAME chain is followed from the
 * question's name inside the answer section; rr[] then holds the records
 * of expect_qtype, class IN, owned by the chain's end, and only when the
 * status is OK. NXDOMAIN and NODATA carry canonical and, if the authority
 * section has the zone's SOA, the negative TTL. Returns the status (also
 * in out->status), or -1 when expect_name or expect_qtype would not have
 * made a query. No pointer into msg is kept: rdoff/rdlen are offsets. */
int dns_response_parse(const uint8_t *msg, size_t len, uint16_t expect_id,
                       const char *expect_name, uint16_t expect_qtype,
                       struct dns_answer *out);

/* "ok", "nxdomain", ... for logs; "?" for anything else. */
const char *dns_status_name(int status);

#endif
