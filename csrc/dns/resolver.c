/* The stub resolver (see resolver.h): queries on the worker's io_uring, one
 * connected UDP socket per try, TCP when the answer is truncated, a bounded
 * TTL cache, coalesced identical queries, and MX selection per RFC 5321 §5.1. */
#include "dns/resolver.h"

#include <arpa/inet.h>
#include <errno.h>
#include <net/if.h>
#include <netinet/in.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <unistd.h>

#include "core/log.h"
#include "core/loop.h"
#include "core/timer.h"

#define container_of(p, type, member) ((type *)(void *)((char *)(p) - offsetof(type, member)))

#define CACHE_BUCKETS 8192          /* power of two */
#define QTAB_BUCKETS  1024          /* power of two */
/* A datagram buffer: larger than the payload we advertise, because a server
 * that ignores EDNS may still send up to 512 octets and some send more; a
 * datagram longer than this is treated as truncated (ask over TCP). */
#define UDP_BUF       4096
#define NO_EDNS_MS    (10 * 60 * 1000)  /* how long a server stays "no EDNS" */
#define TIMEOUT_MAX_MS 60000
#define ATTEMPTS_MAX  10

#define RCODE_FORMERR 1
#define RCODE_NOTIMP  4
#define RCODE_BADVERS 16

/* ---- types -------------------------------------------------------------- */

enum rr_kind { RR_OK, RR_NODATA, RR_NXDOMAIN, RR_ALIAS };

struct dns_rec {
    uint16_t pref;                  /* MX preference */
    uint8_t addr[16];               /* A: 4 octets, AAAA: 16 */
    const char *target;             /* MX exchange, ALIAS target; inside the block */
};

/* What one query produced: handed to the lookups that wanted it, then kept
 * in the cache. One allocation: the header, rec[], then the strings. */
struct dns_rrset {
    struct dns_rrset *hnext;        /* cache bucket chain */
    struct dns_rrset *lru_prev, *lru_next;
    uint64_t expires;               /* ms on timer_now_ms()'s clock */
    uint32_t hash;
    uint32_t ttl;                   /* seconds */
    uint16_t qtype;
    uint8_t kind;                   /* enum rr_kind */
    uint8_t null_mx;
    unsigned nrec;
    char *name;                     /* the key: lower case, no trailing dot */
    struct dns_rec rec[];
};

struct dns_server {
    struct sockaddr_storage sa;
    socklen_t salen;
    char text[INET6_ADDRSTRLEN + 24];   /* "127.0.0.1:53", "[::1]:53" */
    uint64_t no_edns_until;             /* it answered FORMERR/NOTIMP to EDNS */
};

struct dns_query;

/* A lookup's interest in one name and type; waits on a query or not at all. */
struct mx_sub {
    struct mx_lookup *lk;
    struct dns_query *q;
    struct mx_sub *qnext, **qprev;  /* in q->waiters */
    uint16_t qtype;
    int8_t host;                    /* index into hosts[]; -1 for the MX query */
    uint8_t hops;                   /* new queries at CNAME targets so far */
    uint8_t active;
};

enum lk_state { LK_ACTIVE, LK_DONE, LK_CALLING };
enum fam_state { FAM_WAIT, FAM_OK, FAM_NONE, FAM_TEMP };

struct mx_lookup {
    struct mx_lookup *prev, *next;  /* in r->active or r->done */
    struct dns_resolver *r;
    mx_done_fn fn;
    void *arg;
    uint8_t state;                  /* enum lk_state */
    uint8_t is_host;                /* host_lookup */
    uint8_t addr_phase;             /* hosts[] known, addresses asked */
    unsigned pending;               /* active subs, plus holds while starting them */
    char domain[DNS_NAME_TEXT];
    struct mx_sub subs[1 + 2 * MX_MAX_HOSTS];
    /* Per host and family (0: A, 1: AAAA): state and addresses, merged
     * into hosts[] when everything is in. */
    uint8_t fam[MX_MAX_HOSTS][2];
    uint8_t n4[MX_MAX_HOSTS], n6[MX_MAX_HOSTS];
    uint8_t a4[MX_MAX_HOSTS][MX_MAX_ADDRS][4];
    uint8_t a6[MX_MAX_HOSTS][MX_MAX_ADDRS][16];
    char temp_detail[sizeof ((struct mx_result *)0)->detail];
    struct mx_result res;
};

struct lk_list {
    struct mx_lookup *head, *tail;
};

struct dns_xfer;

/* One question on the wire, shared by every lookup that needs it. */
struct dns_query {
    struct dns_resolver *r;
    struct dns_query *hnext;        /* r->qtab chain */
    struct dns_query *wprev, *wnext;   /* r->wait list, until sent */
    struct mx_sub *waiters;
    struct dns_xfer *xfer;          /* the current try */
    struct timer timer;             /* per-try timeout */
    uint32_t hash;
    uint16_t qtype;
    uint8_t sent;                   /* holds one of the DNS_MAX_INFLIGHT slots */
    unsigned tries;
    char detail[sizeof ((struct mx_result *)0)->detail];  /* why the last try failed */
    char name[DNS_NAME_TEXT];
};

/* One try: a socket and the io_uring operations on it. Given up tries stay
 * allocated until the kernel has returned each of their operations. */
struct dns_xfer {
    struct dns_resolver *r;
    struct dns_query *q;            /* NULL once given up */
    int fd;
    uint8_t tcp, edns;
    uint8_t in_send, in_recv, in_conn;
    uint16_t id;
    unsigned server;
    unsigned ops;                   /* operations whose completion has not come */
    struct loop_op send_op, recv_op, conn_op;
    struct sockaddr_storage sa;
    socklen_t salen;
    size_t qoff, qlen, qsent;       /* the query: qbuf[qoff, qoff + qlen) */
    uint8_t qbuf[2 + DNS_QUERY_MAX];   /* TCP: 2-octet length first (RFC 1035 §4.2.2) */
    uint8_t lenbuf[2];
    size_t lengot;
    uint8_t *msg;                   /* TCP answer */
    size_t msglen, msggot;
    uint8_t ubuf[UDP_BUF];          /* UDP answer */
};

struct dns_resolver {
    struct loop *l;
    struct dns_server servers[DNS_MAX_SERVERS];
    unsigned nservers, timeout_ms, attempts;
    uint64_t rng;                   /* xorshift64* state: shuffles only */
    uint32_t seed;                  /* hash seed */
    uint8_t idpool[256];            /* getrandom() bytes for query ids */
    unsigned idpos;

    struct dns_rrset *cache[CACHE_BUCKETS];
    struct dns_rrset *lru_head, *lru_tail;   /* most recently used first */
    unsigned cache_count, cache_max;

    struct dns_query *qtab[QTAB_BUCKETS];
    struct dns_query *wait_head, *wait_tail; /* not sent yet, oldest first */
    unsigned nqueries, nsent, nxfers;

    struct lk_list active, done;
    unsigned nlookups;

    struct loop_task task;          /* sends waiting queries, runs callbacks */
    int in_task, dead;
    struct dns_resolver_stats st;
    struct dns_answer ans;          /* parse scratch; parsing never nests */
};

/* ---- small helpers ------------------------------------------------------ */

static void fmt(char *dst, size_t cap, const char *f, ...) __attribute__((format(printf, 3, 4)));
static void fmt(char *dst, size_t cap, const char *f, ...)
{
    va_list ap;
    if (!dst || cap == 0) return;
    va_start(ap, f);
    vsnprintf(dst, cap, f, ap);
    va_end(ap);
}

static const char *qtype_name(uint16_t t)
{
    switch (t) {
    case DNS_TYPE_A: return "A";
    case DNS_TYPE_AAAA: return "AAAA";
    case DNS_TYPE_MX: return "MX";
    default: return "?";
    }
}

static int fill_random(void *buf, size_t n)
{
    size_t got = 0;
    while (got < n) {
        ssize_t k = getrandom((char *)buf + got, n - got, 0);
        if (k < 0) {
            if (errno == EINTR) continue;
            return -errno;
        }
        got += (size_t)k;
    }
    return 0;
}

/* RFC 5452 §9.2: query ids unpredictable, from the kernel's generator;
 * the source port is the kernel's random ephemeral port of a new socket. */
static int random_id(struct dns_resolver *r, uint16_t *id)
{
    if (r->idpos + 2 > sizeof r->idpool) {
        int rc = fill_random(r->idpool, sizeof r->idpool);
        if (rc < 0) return rc;
        r->idpos = 0;
    }
    *id = (uint16_t)(r->idpool[r->idpos] << 8 | r->idpool[r->idpos + 1]);
    r->idpos += 2;
    return 0;
}

/* Shuffling equal preferences needs no secrecy, only variety. */
static uint64_t rng_next(struct dns_resolver *r)
{
    uint64_t x = r->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    r->rng = x;
    return x * 0x2545F4914F6CDD1DULL;
}

static uint32_t key_hash(const struct dns_resolver *r, const char *name, uint16_t qtype)
{
    /* FNV-1a, seeded per resolver so answers cannot be chosen to collide */
    uint32_t h = 2166136261u ^ r->seed;
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) h = (h ^ *p) * 16777619u;
    h = (h ^ (qtype & 0xff)) * 16777619u;
    h = (h ^ (qtype >> 8)) * 16777619u;
    return h;
}

/* Lower case, no trailing dot, valid as a query name; 0 or -1. */
static int name_norm(const char *in, char out[DNS_NAME_TEXT])
{
    size_t n = strnlen(in, DNS_NAME_TEXT + 1);
    if (n > 0 && in[n - 1] == '.') n--;
    if (n == 0 || n >= DNS_NAME_TEXT || in[n - 1] == '.') return -1;
    for (size_t i = 0; i < n; i++) {
        char c = in[i];
        out[i] = (c >= 'A' && c <= 'Z') ? (char)(c | 0x20) : c;
    }
    out[n] = 0;
    uint8_t tmp[DNS_QUERY_MAX];
    return dns_query_build(tmp, sizeof tmp, 0, out, DNS_TYPE_A, 0) < 0 ? -1 : 0;
}

static void lk_push(struct lk_list *li, struct mx_lookup *lk)
{
    lk->next = NULL;
    lk->prev = li->tail;
    if (li->tail) li->tail->next = lk;
    else li->head = lk;
    li->tail = lk;
}

static void lk_remove(struct lk_list *li, struct mx_lookup *lk)
{
    if (lk->prev) lk->prev->next = lk->next;
    else li->head = lk->next;
    if (lk->next) lk->next->prev = lk->prev;
    else li->tail = lk->prev;
    lk->prev = lk->next = NULL;
}

/* ---- the cache ---------------------------------------------------------- */

static void lru_unlink(struct dns_resolver *r, struct dns_rrset *s)
{
    if (s->lru_prev) s->lru_prev->lru_next = s->lru_next;
    else r->lru_head = s->lru_next;
    if (s->lru_next) s->lru_next->lru_prev = s->lru_prev;
    else r->lru_tail = s->lru_prev;
    s->lru_prev = s->lru_next = NULL;
}

static void lru_push_front(struct dns_resolver *r, struct dns_rrset *s)
{
    s->lru_prev = NULL;
    s->lru_next = r->lru_head;
    if (r->lru_head) r->lru_head->lru_prev = s;
    else r->lru_tail = s;
    r->lru_head = s;
}

static void cache_remove(struct dns_resolver *r, struct dns_rrset *s)
{
    struct dns_rrset **pp = &r->cache[s->hash & (CACHE_BUCKETS - 1)];
    while (*pp && *pp != s) pp = &(*pp)->hnext;
    if (*pp) *pp = s->hnext;
    lru_unlink(r, s);
    r->cache_count--;
    free(s);
}

static struct dns_rrset *cache_find(struct dns_resolver *r, const char *name, uint16_t qtype,
                                    uint32_t h)
{
    for (struct dns_rrset *s = r->cache[h & (CACHE_BUCKETS - 1)]; s; s = s->hnext)
        if (s->hash == h && s->qtype == qtype && strcmp(s->name, name) == 0) return s;
    return NULL;
}

static struct dns_rrset *cache_get(struct dns_resolver *r, const char *name, uint16_t qtype)
{
    struct dns_rrset *s = cache_find(r, name, qtype, key_hash(r, name, qtype));
    if (!s) return NULL;
    if (s->expires <= timer_now_ms()) {
        cache_remove(r, s);
        return NULL;
    }
    lru_unlink(r, s);
    lru_push_front(r, s);
    return s;
}

/* Takes ownership of s. */
static void cache_put(struct dns_resolver *r, struct dns_rrset *s)
{
    if (r->cache_max == 0 || s->ttl == 0) {
        free(s);
        return;
    }
    s->expires = timer_now_ms() + (uint64_t)s->ttl * 1000u;
    struct dns_rrset *old = cache_find(r, s->name, s->qtype, s->hash);
    if (old) cache_remove(r, old);
    /* Bounded: the least recently used answer makes room. */
    while (r->cache_count >= r->cache_max && r->lru_tail) cache_remove(r, r->lru_tail);
    struct dns_rrset **head = &r->cache[s->hash & (CACHE_BUCKETS - 1)];
    s->hnext = *head;
    *head = s;
    lru_push_front(r, s);
    r->cache_count++;
}

static void cache_clear(struct dns_resolver *r)
{
    while (r->lru_head) cache_remove(r, r->lru_head);
}

/* The answer to our question as an rrset, or NULL when out of memory. */
static struct dns_rrset *rrset_from_answer(const struct dns_query *q, const struct dns_answer *a)
{
    uint8_t kind;
    uint32_t ttl;
    unsigned nrec = 0;
    size_t strings = strlen(q->name) + 1;

    if (a->status == DNS_OK) {
        kind = RR_OK;
        nrec = a->nrr;
        ttl = UINT32_MAX;
        for (unsigned i = 0; i < nrec; i++) {
            if (a->rr[i].ttl < ttl) ttl = a->rr[i].ttl;
            if (q->qtype == DNS_TYPE_MX) strings += strlen(a->rr[i].target) + 1;
        }
    } else if (a->status == DNS_NODATA && a->ncname > 0 && !a->has_neg_ttl) {
        /* The server gave the chain but stopped short of its end (a
         * forwarder or local data that does not chase CNAMEs): ask again
         * at the end of the chain. */
        kind = RR_ALIAS;
        nrec = 1;
        ttl = a->cname_ttl;
        strings += strlen(a->canonical) + 1;
    } else {
        kind = a->status == DNS_NXDOMAIN ? RR_NXDOMAIN : RR_NODATA;
        /* RFC 2308 §5: the SOA-derived TTL; without an SOA a short guess */
        ttl = a->has_neg_ttl ? a->neg_ttl : DNS_TTL_NEG_NO_SOA;
        if (ttl > DNS_TTL_MAX_NEG) ttl = DNS_TTL_MAX_NEG;
    }
    /* The answer is only as good as the CNAMEs that led to it. */
    if (a->ncname > 0 && a->cname_ttl < ttl) ttl = a->cname_ttl;
    if (ttl > DNS_TTL_MAX_POS) ttl = DNS_TTL_MAX_POS;

    size_t size = sizeof(struct dns_rrset) + nrec * sizeof(struct dns_rec) + strings;
    struct dns_rrset *s = calloc(1, size);
    if (!s) return NULL;
    char *p = (char *)&s->rec[nrec];
    s->qtype = q->qtype;
    s->kind = kind;
    s->ttl = ttl;
    s->hash = q->hash;
    s->nrec = nrec;
    s->null_mx = kind == RR_OK && a->null_mx;
    size_t n = strlen(q->name) + 1;
    memcpy(p, q->name, n);
    s->name = p;
    p += n;
    if (kind == RR_ALIAS) {
        n = strlen(a->canonical) + 1;
        memcpy(p, a->canonical, n);
        s->rec[0].target = p;
        return s;
    }
    for (unsigned i = 0; i < nrec; i++) {
        s->rec[i].pref = a->rr[i].pref;
        memcpy(s->rec[i].addr, a->rr[i].addr, sizeof s->rec[i].addr);
        if (q->qtype == DNS_TYPE_MX) {
            n = strlen(a->rr[i].target) + 1;
            memcpy(p, a->rr[i].target, n);
            s->rec[i].target = p;
            p += n;
        }
    }
    return s;
}

/* ---- lookups: what to ask and what the answers mean ---------------------- */

static void sub_query(struct mx_sub *s, const char *name);
static struct dns_query *query_new(struct dns_resolver *r, const char *name, uint16_t qtype,
                                   uint32_t h);
static void query_drop(struct dns_query *q);

static const char *sub_name(const struct mx_sub *s)
{
    return s->host < 0 ? s->lk->domain : s->lk->res.hosts[s->host].name;
}

static void resolver_kick(struct dns_resolver *r) { loop_defer(r->l, &r->task); }

/* Everything is in: merge the per-family answers and queue the callback. */
static void lookup_finish(struct mx_lookup *lk)
{
    struct dns_resolver *r = lk->r;
    struct mx_result *res = &lk->res;

    if (lk->addr_phase) {
        int any_ok = 0, any_temp = 0;
        for (unsigned i = 0; i < res->nhosts; i++) {
            struct mx_host *h = &res->hosts[i];
            /* Each family keeps at least half the slots it can fill. */
            unsigned half = MX_MAX_ADDRS / 2;
            unsigned k4 = lk->n4[i], k6 = lk->n6[i];
            unsigned cap4 = MX_MAX_ADDRS - (k6 < half ? k6 : half);
            if (k4 > cap4) k4 = cap4;
            if (k6 > MX_MAX_ADDRS - k4) k6 = MX_MAX_ADDRS - k4;
            h->naddr = 0;
            for (unsigned k = 0; k < k4; k++) {
                h->addr[h->naddr].family = AF_INET;
                memcpy(h->addr[h->naddr++].addr, lk->a4[i][k], 4);
            }
            for (unsigned k = 0; k < k6; k++) {
                h->addr[h->naddr].family = AF_INET6;
                memcpy(h->addr[h->naddr++].addr, lk->a6[i][k], 16);
            }
            if (h->naddr > 0) h->status = 0;
            else if (lk->fam[i][0] == FAM_TEMP || lk->fam[i][1] == FAM_TEMP) h->status = MX_TEMP;
            else h->status = MX_NOHOST;
            any_ok |= h->status == 0;
            any_temp |= h->status == MX_TEMP;
        }
        if (any_ok) {
            res->status = MX_OK;
            res->detail[0] = 0;
        } else if (any_temp) {
            /* RFC 5321 §5.1: a host that may have an address later keeps
             * the domain deliverable later. */
            res->status = MX_TEMP;
            memcpy(res->detail, lk->temp_detail, sizeof res->detail);
        } else {
            res->status = MX_NOHOST;
            if (lk->is_host)
                fmt(res->detail, sizeof res->detail, "%s has no address (A/AAAA)", lk->domain);
            else if (res->implicit)
                fmt(res->detail, sizeof res->detail, "%s has no MX and no address (A/AAAA)",
                    lk->domain);
            else
                fmt(res->detail, sizeof res->detail, "no MX host of %s has an address",
                    lk->domain);
        }
    }
    lk->state = LK_DONE;
    lk_remove(&r->active, lk);
    lk_push(&r->done, lk);
    resolver_kick(r);
}

static void sub_start(struct mx_lookup *lk, unsigned idx, int host, uint16_t qtype,
                      const char *name)
{
    struct mx_sub *s = &lk->subs[idx];
    s->lk = lk;
    s->q = NULL;
    s->host = (int8_t)host;
    s->qtype = qtype;
    s->hops = 0;
    s->active = 1;
    lk->pending++;
    sub_query(s, name);
}

/* Drop a hold on the lookup; the last one finishes it. */
static void lookup_release(struct mx_lookup *lk)
{
    if (--lk->pending == 0 && lk->state == LK_ACTIVE) lookup_finish(lk);
}

/* Ask A and AAAA of every host at once. */
static void lookup_addresses(struct mx_lookup *lk)
{
    lk->addr_phase = 1;
    lk->pending++;                  /* answers from the cache must not finish us early */
    for (unsigned i = 0; i < lk->res.nhosts; i++) {
        sub_start(lk, 1 + 2 * i, (int)i, DNS_TYPE_A, lk->res.hosts[i].name);
        sub_start(lk, 2 + 2 * i, (int)i, DNS_TYPE_AAAA, lk->res.hosts[i].name);
    }
    lookup_release(lk);
}

/* RFC 5321 §5.1: sort by preference, randomize among equals, keep the
 * best MX_MAX_HOSTS; RFC 7505: a null MX means no mail at all. */
static void mx_answer(struct mx_lookup *lk, const struct dns_rrset *set, const char *detail)
{
    struct dns_resolver *r = lk->r;
    struct mx_result *res = &lk->res;

    if (!set) {
        res->status = MX_TEMP;
        fmt(res->detail, sizeof res->detail, "%s", detail);
        return;
    }
    switch (set->kind) {
    case RR_NXDOMAIN:
        res->status = MX_NXDOMAIN;
        fmt(res->detail, sizeof res->detail, "%s does not exist (nxdomain)", lk->domain);
        return;
    case RR_NODATA:
        /* RFC 5321 §5.1: no MX, so the domain is its own implicit MX of
         * preference 0. */
        res->implicit = 1;
        res->nhosts = 1;
        memcpy(res->hosts[0].name, lk->domain, sizeof res->hosts[0].name);
        lookup_addresses(lk);
        return;
    default:
        break;
    }
    if (set->null_mx) {
        res->status = MX_NULL;
        fmt(res->detail, sizeof res->detail, "%s accepts no mail (null MX, RFC 7505)",
            lk->domain);
        return;
    }
    unsigned order[DNS_MAX_RR], n = set->nrec < DNS_MAX_RR ? set->nrec : DNS_MAX_RR;
    for (unsigned i = 0; i < n; i++) order[i] = i;
    /* Fisher-Yates, then a stable insertion sort by preference: records of
     * equal preference stay in their random order. */
    for (unsigned i = n; i > 1; i--) {
        unsigned j = (unsigned)(rng_next(r) % i);
        unsigned t = order[i - 1];
        order[i - 1] = order[j];
        order[j] = t;
    }
    for (unsigned i = 1; i < n; i++) {
        unsigned v = order[i], j = i;
        while (j > 0 && set->rec[order[j - 1]].pref > set->rec[v].pref) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = v;
    }
    res->nhosts = 0;
    for (unsigned i = 0; i < n && res->nhosts < MX_MAX_HOSTS; i++) {
        const struct dns_rec *rec = &set->rec[order[i]];
        int dup = 0;
        /* A host listed twice is tried once, at its best preference. */
        for (unsigned k = 0; k < res->nhosts && !dup; k++)
            dup = strcmp(res->hosts[k].name, rec->target) == 0;
        if (dup) continue;
        struct mx_host *h = &res->hosts[res->nhosts++];
        fmt(h->name, sizeof h->name, "%s", rec->target);
        h->pref = rec->pref;
    }
    lookup_addresses(lk);
}

static void addr_answer(struct mx_lookup *lk, const struct mx_sub *s, const struct dns_rrset *set,
                        const char *detail)
{
    unsigned h = (unsigned)s->host, f = s->qtype == DNS_TYPE_A ? 0 : 1;

    if (!set) {
        lk->fam[h][f] = FAM_TEMP;
        if (!lk->temp_detail[0]) fmt(lk->temp_detail, sizeof lk->temp_detail, "%s", detail);
        return;
    }
    if (set->kind != RR_OK || set->nrec == 0) {
        lk->fam[h][f] = FAM_NONE;
        return;
    }
    lk->fam[h][f] = FAM_OK;
    unsigned n = set->nrec < MX_MAX_ADDRS ? set->nrec : MX_MAX_ADDRS;
    for (unsigned i = 0; i < n; i++) {
        if (f == 0) memcpy(lk->a4[h][i], set->rec[i].addr, 4);
        else memcpy(lk->a6[h][i], set->rec[i].addr, 16);
    }
    if (f == 0) lk->n4[h] = (uint8_t)n;
    else lk->n6[h] = (uint8_t)n;
}

/* One sub's outcome: an rrset, or NULL and why it failed for now. */
static void sub_apply(struct mx_sub *s, const struct dns_rrset *set, const char *detail)
{
    struct mx_lookup *lk = s->lk;
    char why[sizeof lk->res.detail];

    if (set && set->kind == RR_ALIAS) {
        if (s->hops < DNS_MAX_REQUERY) {
            char target[DNS_NAME_TEXT];
            s->hops++;
            fmt(target, sizeof target, "%s", set->rec[0].target);
            sub_query(s, target);
            return;
        }
        fmt(why, sizeof why, "CNAME chain too long for %s %s", qtype_name(s->qtype), sub_name(s));
        set = NULL;
        detail = why;
    }
    s->active = 0;
    if (s->host < 0) mx_answer(lk, set, detail);
    else addr_answer(lk, s, set, detail);
    lookup_release(lk);
}

static void sub_detach(struct mx_sub *s)
{
    struct dns_query *q = s->q;
    if (!q) return;
    *s->qprev = s->qnext;
    if (s->qnext) s->qnext->qprev = s->qprev;
    s->q = NULL;
    s->qnext = NULL;
    s->qprev = NULL;
    /* Nobody wants an unsent query any more; one on the wire goes on and
     * fills the cache. */
    if (!q->waiters && !q->sent) query_drop(q);
}

static struct dns_query *query_find(struct dns_resolver *r, const char *name, uint16_t qtype,
                                    uint32_t h)
{
    for (struct dns_query *q = r->qtab[h & (QTAB_BUCKETS - 1)]; q; q = q->hnext)
        if (q->hash == h && q->qtype == qtype && strcmp(q->name, name) == 0) return q;
    return NULL;
}

/* From the cache at once, or by joining the query for the same question, or
 * by a new query (sent at the end of the loop turn). */
static void sub_query(struct mx_sub *s, const char *name)
{
    struct dns_resolver *r = s->lk->r;
    const struct dns_rrset *set = cache_get(r, name, s->qtype);

    if (set) {
        r->st.cache_hits++;
        sub_apply(s, set, NULL);
        return;
    }
    uint32_t h = key_hash(r, name, s->qtype);
    struct dns_query *q = query_find(r, name, s->qtype, h);
    if (q) {
        r->st.coalesced++;
    } else {
        q = query_new(r, name, s->qtype, h);
        if (!q) {
            char why[sizeof s->lk->res.detail];
            fmt(why, sizeof why, "out of memory for %s %s", qtype_name(s->qtype), name);
            sub_apply(s, NULL, why);
            return;
        }
    }
    s->q = q;
    s->qnext = q->waiters;
    s->qprev = &q->waiters;
    if (q->waiters) q->waiters->qprev = &s->qnext;
    q->waiters = s;
}

/* ---- queries and tries on the wire ---------------------------------------- */

static void xfer_abandon(struct dns_xfer *x);
static void query_try(struct dns_query *q);
static void on_query_timeout(struct timer *t);

static void resolver_maybe_release(struct dns_resolver *r)
{
    if (r->dead && r->nxfers == 0 && !r->task.queued && !r->in_task) free(r);
}

static struct dns_query *query_new(struct dns_resolver *r, const char *name, uint16_t qtype,
                                   uint32_t h)
{
    struct dns_query *q = calloc(1, sizeof *q);
    if (!q) return NULL;
    q->r = r;
    q->hash = h;
    q->qtype = qtype;
    q->timer.fn = on_query_timeout;
    fmt(q->name, sizeof q->name, "%s", name);
    struct dns_query **head = &r->qtab[h & (QTAB_BUCKETS - 1)];
    q->hnext = *head;
    *head = q;
    q->wprev = r->wait_tail;
    if (r->wait_tail) r->wait_tail->wnext = q;
    else r->wait_head = q;
    r->wait_tail = q;
    r->nqueries++;
    resolver_kick(r);
    return q;
}

/* Out of the table (no new waiters), out of the wait list, its slot freed. */
static void query_unlink(struct dns_query *q)
{
    struct dns_resolver *r = q->r;
    struct dns_query **pp = &r->qtab[q->hash & (QTAB_BUCKETS - 1)];
    while (*pp && *pp != q) pp = &(*pp)->hnext;
    if (*pp) *pp = q->hnext;
    if (q->sent) {
        r->nsent--;
        if (r->wait_head) resolver_kick(r);
    } else if (!r->dead) {
        if (q->wprev) q->wprev->wnext = q->wnext;
        else r->wait_head = q->wnext;
        if (q->wnext) q->wnext->wprev = q->wprev;
        else r->wait_tail = q->wprev;
        q->wprev = q->wnext = NULL;
    }
    timer_cancel(&r->l->timers, &q->timer);
    if (q->xfer) xfer_abandon(q->xfer);
    q->xfer = NULL;
    r->nqueries--;
}

static void query_drop(struct dns_query *q)
{
    query_unlink(q);
    free(q);
}

/* The query is over: every waiter gets the outcome (set, or NULL and
 * q->detail), then the cache keeps the set. */
static void query_complete(struct dns_query *q, struct dns_rrset *set)
{
    struct dns_resolver *r = q->r;
    query_unlink(q);
    if (!set) log_debug("dns", "%s", q->detail);
    struct mx_sub *w = q->waiters;
    q->waiters = NULL;
    while (w) {
        struct mx_sub *next = w->qnext;
        w->q = NULL;
        w->qnext = NULL;
        w->qprev = NULL;
        sub_apply(w, set, q->detail);
        w = next;
    }
    if (set) cache_put(r, set);
    free(q);
}

static void xfer_free(struct dns_xfer *x)
{
    struct dns_resolver *r = x->r;
    if (x->fd >= 0) close(x->fd);
    free(x->msg);
    free(x);
    r->nxfers--;
    resolver_maybe_release(r);
}

static void op_cancel(struct dns_resolver *r, struct loop_op *op)
{
    struct io_uring_sqe *sqe = loop_sqe(r->l);
    io_uring_prep_cancel(sqe, op, 0);
    loop_sqe_set_op(sqe, NULL);
}

/* Give up a try. Its operations still point at it, so it lives on until
 * the kernel has returned the last of them. */
static void xfer_abandon(struct dns_xfer *x)
{
    struct dns_resolver *r = x->r;
    if (x->q && x->q->xfer == x) x->q->xfer = NULL;
    x->q = NULL;
    if (x->in_conn) op_cancel(r, &x->conn_op);
    if (x->in_send) op_cancel(r, &x->send_op);
    if (x->in_recv) op_cancel(r, &x->recv_op);
    if (x->ops == 0) xfer_free(x);
}

/* A completion came back: 1 if the try still matters, else 0 (and the try
 * may be gone). */
static int xfer_op_back(struct dns_xfer *x)
{
    x->ops--;
    if (x->q) return 1;
    if (x->ops == 0) xfer_free(x);
    return 0;
}

static void submit_send(struct dns_xfer *x)
{
    struct io_uring_sqe *sqe = loop_sqe(x->r->l);
    io_uring_prep_send(sqe, x->fd, x->qbuf + x->qoff + x->qsent, x->qlen - x->qsent, MSG_NOSIGNAL);
    loop_sqe_set_op(sqe, &x->send_op);
    x->in_send = 1;
    x->ops++;
}

static void submit_recv(struct dns_xfer *x)
{
    struct io_uring_sqe *sqe = loop_sqe(x->r->l);
    if (!x->tcp)
        /* MSG_TRUNC: the result is the datagram's real length */
        io_uring_prep_recv(sqe, x->fd, x->ubuf, sizeof x->ubuf, MSG_TRUNC);
    else if (x->lengot < 2)
        io_uring_prep_recv(sqe, x->fd, x->lenbuf + x->lengot, 2 - x->lengot, 0);
    else
        io_uring_prep_recv(sqe, x->fd, x->msg + x->msggot, x->msglen - x->msggot, 0);
    loop_sqe_set_op(sqe, &x->recv_op);
    x->in_recv = 1;
    x->ops++;
}

/* This try failed: note why, move on to the next. */
static void xfer_fail(struct dns_xfer *x, const char *why)
{
    struct dns_query *q = x->q;
    const struct dns_server *srv = &x->r->servers[x->server];
    fmt(q->detail, sizeof q->detail, "%s from %s for %s %s%s", why, srv->text,
        qtype_name(q->qtype), q->name, x->tcp ? " (tcp)" : "");
    query_try(q);
}

static void on_send(struct loop_op *op, struct io_uring_cqe *cqe);
static void on_recv(struct loop_op *op, struct io_uring_cqe *cqe);
static void on_connect(struct loop_op *op, struct io_uring_cqe *cqe);

/* Start a try of q at server si: 0 or -errno (nothing left behind). */
static int xfer_start(struct dns_query *q, unsigned si, int tcp)
{
    struct dns_resolver *r = q->r;
    struct dns_server *srv = &r->servers[si];
    uint16_t id;
    int rc = random_id(r, &id);
    if (rc < 0) return rc;
    struct dns_xfer *x = malloc(sizeof *x);
    if (!x) return -ENOMEM;
    memset(x, 0, offsetof(struct dns_xfer, ubuf));
    x->r = r;
    x->tcp = (uint8_t)tcp;
    /* RFC 6891 §7: a server that refused EDNS is asked without it for a while */
    x->edns = srv->no_edns_until <= timer_now_ms();
    x->id = id;
    x->server = si;
    x->send_op.fn = on_send;
    x->recv_op.fn = on_recv;
    x->conn_op.fn = on_connect;
    int n = dns_query_build(x->qbuf + 2, DNS_QUERY_MAX, id, q->name, q->qtype, x->edns);
    if (n < 0) {
        free(x);
        return -EINVAL;
    }
    x->qbuf[0] = (uint8_t)(n >> 8);
    x->qbuf[1] = (uint8_t)n;
    x->qoff = tcp ? 0 : 2;
    x->qlen = tcp ? (size_t)n + 2 : (size_t)n;
    memcpy(&x->sa, &srv->sa, sizeof x->sa);
    x->salen = srv->salen;
    x->fd = socket(srv->sa.ss_family, (tcp ? SOCK_STREAM : SOCK_DGRAM) | SOCK_CLOEXEC, 0);
    if (x->fd < 0) {
        rc = -errno;
        free(x);
        return rc;
    }
    if (!tcp) {
        /* A connected socket: the kernel drops datagrams from any other
         * address and port, and reports ICMP errors (a server that is not
         * there fails the try at once instead of timing out). */
        if (connect(x->fd, (struct sockaddr *)&x->sa, x->salen) < 0) {
            rc = -errno;
            close(x->fd);
            free(x);
            return rc;
        }
        submit_recv(x);
        submit_send(x);
    } else {
        struct io_uring_sqe *sqe = loop_sqe(r->l);
        io_uring_prep_connect(sqe, x->fd, (struct sockaddr *)&x->sa, x->salen);
        loop_sqe_set_op(sqe, &x->conn_op);
        x->in_conn = 1;
        x->ops++;
        r->st.tcp++;
    }
    r->st.queries++;
    r->nxfers++;
    x->q = q;
    q->xfer = x;
    timer_arm(&r->l->timers, &q->timer, r->timeout_ms);
    return 0;
}

/* The next try: servers in turn, `attempts` rounds (RFC 1035 §4.2.1 leaves
 * the schedule to us; this is resolv.conf's). Every try is a new socket and
 * a new id. */
static void query_try(struct dns_query *q)
{
    struct dns_resolver *r = q->r;
    unsigned total = r->nservers * r->attempts;

    if (q->xfer) xfer_abandon(q->xfer);
    while (q->tries < total) {
        unsigned si = q->tries % r->nservers;
        q->tries++;
        int rc = xfer_start(q, si, 0);
        if (rc == 0) return;
        fmt(q->detail, sizeof q->detail, "%s to %s for %s %s", strerror(-rc),
            r->servers[si].text, qtype_name(q->qtype), q->name);
    }
    query_complete(q, NULL);
}

/* Same server, other transport or without EDNS; not a new try. */
static void query_retry_same(struct dns_xfer *x, int tcp)
{
    struct dns_query *q = x->q;
    unsigned si = x->server;
    xfer_abandon(x);
    int rc = xfer_start(q, si, tcp);
    if (rc == 0) return;
    fmt(q->detail, sizeof q->detail, "%s to %s for %s %s", strerror(-rc),
        q->r->servers[si].text, qtype_name(q->qtype), q->name);
    query_try(q);
}

static void on_query_timeout(struct timer *t)
{
    struct dns_query *q = container_of(t, struct dns_query, timer);
    struct dns_resolver *r = q->r;
    r->st.timeouts++;
    if (q->xfer) {
        xfer_fail(q->xfer, "timeout");
        return;
    }
    query_try(q);
}

static void xfer_answer(struct dns_xfer *x, const uint8_t *m, size_t n)
{
    struct dns_query *q = x->q;
    struct dns_resolver *r = x->r;
    struct dns_answer *a = &r->ans;
    char why[48];

    int st = dns_response_parse(m, n, x->id, q->name, q->qtype, a);
    switch (st) {
    case DNS_MISMATCH:
        /* RFC 5452 §9.1: not ours (forged, or late from an old id); keep
         * waiting for the real one until the try times out. */
        r->st.mismatched++;
        if (!x->tcp) {
            submit_recv(x);
            return;
        }
        xfer_fail(x, "mismatched answer");
        return;
    case DNS_TRUNCATED:
        /* RFC 1035 §4.2.1, RFC 7766 §5: the whole answer over TCP */
        if (!x->tcp) {
            query_retry_same(x, 1);
            return;
        }
        xfer_fail(x, "truncated answer");
        return;
    case DNS_OK:
    case DNS_NODATA:
    case DNS_NXDOMAIN: {
        struct dns_rrset *set = rrset_from_answer(q, a);
        if (!set) fmt(q->detail, sizeof q->detail, "out of memory for %s %s",
                      qtype_name(q->qtype), q->name);
        query_complete(q, set);
        return;
    }
    case DNS_SERVFAIL:
        xfer_fail(x, "servfail");
        return;
    case DNS_REFUSED:
        xfer_fail(x, "refused");
        return;
    case DNS_RCODE:
        /* RFC 6891 §7: FORMERR, NOTIMP or BADVERS to a query with EDNS
         * may mean the server does not know EDNS: ask it again without. */
        if (x->edns && (a->rcode == RCODE_FORMERR || a->rcode == RCODE_NOTIMP ||
                        a->rcode == RCODE_BADVERS)) {
            r->servers[x->server].no_edns_until = timer_now_ms() + NO_EDNS_MS;
            r->st.edns_fallbacks++;
            query_retry_same(x, x->tcp);
            return;
        }
        fmt(why, sizeof why, "rcode %u", (unsigned)a->rcode);
        xfer_fail(x, why);
        return;
    case DNS_CNAME_LOOP:
        /* Another server would give the same chain: stop here. */
        fmt(q->detail, sizeof q->detail, "CNAME loop from %s for %s %s",
            r->servers[x->server].text, qtype_name(q->qtype), q->name);
        query_complete(q, NULL);
        return;
    default:
        xfer_fail(x, "malformed answer");
        return;
    }
}

static void on_connect(struct loop_op *op, struct io_uring_cqe *cqe)
{
    struct dns_xfer *x = container_of(op, struct dns_xfer, conn_op);
    x->in_conn = 0;
    if (!xfer_op_back(x)) return;
    if (cqe->res < 0) {
        char why[96];
        fmt(why, sizeof why, "connect: %s", strerror(-cqe->res));
        xfer_fail(x, why);
        return;
    }
    submit_send(x);
}

static void on_send(struct loop_op *op, struct io_uring_cqe *cqe)
{
    struct dns_xfer *x = container_of(op, struct dns_xfer, send_op);
    x->in_send = 0;
    if (!xfer_op_back(x)) return;
    if (cqe->res < 0) {
        char why[96];
        fmt(why, sizeof why, "send: %s", strerror(-cqe->res));
        xfer_fail(x, why);
        return;
    }
    x->qsent += (size_t)cqe->res;
    if (x->qsent < x->qlen) {
        /* a datagram goes whole or not at all; a stream may take part */
        if (!x->tcp || cqe->res == 0) {
            xfer_fail(x, "short send");
            return;
        }
        submit_send(x);
        return;
    }
    if (x->tcp) submit_recv(x);
}

static void on_recv(struct loop_op *op, struct io_uring_cqe *cqe)
{
    struct dns_xfer *x = container_of(op, struct dns_xfer, recv_op);
    int res = cqe->res;
    char why[96];

    x->in_recv = 0;
    if (!xfer_op_back(x)) return;
    if (res < 0) {
        /* ECONNREFUSED: the ICMP port unreachable of a server that is not there */
        fmt(why, sizeof why, "recv: %s", strerror(-res));
        xfer_fail(x, why);
        return;
    }
    if (!x->tcp) {
        if ((size_t)res > sizeof x->ubuf) {
            /* longer than we can hold: the same as TC */
            query_retry_same(x, 1);
            return;
        }
        xfer_answer(x, x->ubuf, (size_t)res);
        return;
    }
    if (res == 0) {
        xfer_fail(x, "connection closed");
        return;
    }
    if (x->lengot < 2) {
        x->lengot += (size_t)res;
        if (x->lengot == 2) {
            x->msglen = (size_t)x->lenbuf[0] << 8 | x->lenbuf[1];
            if (x->msglen < DNS_HEADER_LEN) {
                xfer_fail(x, "malformed answer");
                return;
            }
            x->msg = malloc(x->msglen);
            if (!x->msg) {
                xfer_fail(x, "out of memory");
                return;
            }
        }
    } else {
        x->msggot += (size_t)res;
        if (x->msggot == x->msglen) {
            xfer_answer(x, x->msg, x->msglen);
            return;
        }
    }
    submit_recv(x);
}

/* Send what waits, as slots allow. */
static void pump(struct dns_resolver *r)
{
    while (r->wait_head && r->nsent < DNS_MAX_INFLIGHT) {
        struct dns_query *q = r->wait_head;
        r->wait_head = q->wnext;
        if (r->wait_head) r->wait_head->wprev = NULL;
        else r->wait_tail = NULL;
        q->wnext = NULL;
        q->sent = 1;
        r->nsent++;
        query_try(q);
    }
}

/* End of the loop turn: new queries leave, finished lookups are told. */
static void resolver_task(struct loop_task *t)
{
    struct dns_resolver *r = container_of(t, struct dns_resolver, task);
    if (r->dead) {
        resolver_maybe_release(r);
        return;
    }
    r->in_task = 1;
    pump(r);
    while (!r->dead && r->done.head) {
        struct mx_lookup *lk = r->done.head;
        lk_remove(&r->done, lk);
        lk->state = LK_CALLING;
        lk->fn(lk->arg, &lk->res);
        if (!r->dead) r->nlookups--;
        free(lk);
    }
    r->in_task = 0;
    resolver_maybe_release(r);
}

/* ---- servers and configuration ---------------------------------------------- */

static int parse_port(const char *s, size_t n, unsigned *port)
{
    unsigned v = 0;
    if (n == 0 || n > 5) return -1;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (unsigned)(s[i] - '0');
    }
    if (v == 0 || v > 65535) return -1;
    *port = v;
    return 0;
}

/* "1.2.3.4", "1.2.3.4:53", "[::1]:53", "[::1]", "::1", "fe80::1%eth0". */
static int server_parse(const char *s, size_t n, struct dns_server *out)
{
    char host[INET6_ADDRSTRLEN + IF_NAMESIZE + 2];
    const char *hp = s, *pp = NULL;
    size_t hn = n, pn = 0;
    unsigned port = 53;

    if (n == 0) return -1;
    if (s[0] == '[') {
        const char *rb = memchr(s, ']', n);
        if (!rb) return -1;
        hp = s + 1;
        hn = (size_t)(rb - hp);
        if (rb + 1 < s + n) {
            if (rb[1] != ':') return -1;
            pp = rb + 2;
            pn = (size_t)(s + n - pp);
        }
    } else {
        const char *c = memchr(s, ':', n);
        /* a single colon separates the port; more make an IPv6 address */
        if (c && !memchr(c + 1, ':', (size_t)(s + n - c - 1))) {
            hn = (size_t)(c - s);
            pp = c + 1;
            pn = (size_t)(s + n - pp);
        }
    }
    if (hn == 0 || hn >= sizeof host) return -1;
    if (pp && parse_port(pp, pn, &port) < 0) return -1;
    memcpy(host, hp, hn);
    host[hn] = 0;

    memset(out, 0, sizeof *out);
    struct sockaddr_in *in4 = (struct sockaddr_in *)&out->sa;
    struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&out->sa;
    char text[INET6_ADDRSTRLEN];
    if (inet_pton(AF_INET, host, &in4->sin_addr) == 1) {
        in4->sin_family = AF_INET;
        in4->sin_port = htons((uint16_t)port);
        out->salen = sizeof *in4;
        inet_ntop(AF_INET, &in4->sin_addr, text, sizeof text);
        fmt(out->text, sizeof out->text, "%s:%u", text, port);
        return 0;
    }
    char *pct = strchr(host, '%');
    unsigned scope = 0;
    if (pct) {
        *pct++ = 0;
        scope = if_nametoindex(pct);
        if (scope == 0) {
            unsigned v = 0;
            if (!*pct || parse_port(pct, strlen(pct), &v) < 0) return -1;
            scope = v;
        }
    }
    if (inet_pton(AF_INET6, host, &in6->sin6_addr) != 1) return -1;
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons((uint16_t)port);
    in6->sin6_scope_id = scope;
    out->salen = sizeof *in6;
    inet_ntop(AF_INET6, &in6->sin6_addr, text, sizeof text);
    fmt(out->text, sizeof out->text, "[%s]:%u", text, port);
    return 0;
}

static int servers_from_list(struct dns_resolver *r, const char *list, char *err, size_t errlen)
{
    const char *p = list;
    for (;;) {
        while (*p == ' ' || *p == '\t') p++;
        const char *e = p;
        while (*e && *e != ',') e++;
        const char *t = e;
        while (t > p && (t[-1] == ' ' || t[-1] == '\t')) t--;
        if (r->nservers == DNS_MAX_SERVERS) {
            fmt(err, errlen, "more than %d DNS servers", DNS_MAX_SERVERS);
            return -1;
        }
        if (server_parse(p, (size_t)(t - p), &r->servers[r->nservers]) < 0) {
            fmt(err, errlen, "bad DNS server \"%.*s\": expected HOST[:PORT] or [IPV6][:PORT]"
                " with HOST an IP address", (int)((t - p) > 64 ? 64 : (t - p)), p);
            return -1;
        }
        r->nservers++;
        if (!*e) return 0;
        p = e + 1;
    }
}

static int option_value(const char *tok, size_t n, const char *name, unsigned max, unsigned *out)
{
    size_t k = strlen(name);
    unsigned v = 0;
    if (n <= k || memcmp(tok, name, k) != 0) return 0;
    for (size_t i = k; i < n; i++) {
        if (tok[i] < '0' || tok[i] > '9') return 0;
        if (v < 100000) v = v * 10 + (unsigned)(tok[i] - '0');
    }
    /* glibc's resolv.conf clamps likewise (RES_MAXRETRANS, RES_MAXRETRY) */
    if (v == 0) v = 1;
    *out = v > max ? max : v;
    return 1;
}

/* resolv.conf(5): `nameserver ADDR` lines and `options timeout:N attempts:N`. */
static int servers_from_conf(struct dns_resolver *r, const char *path, char *err, size_t errlen)
{
    FILE *f = fopen(path, "re");
    if (!f) {
        if (errno != ENOENT) {
            fmt(err, errlen, "%s: %s", path, strerror(errno));
            return -1;
        }
    } else {
        char line[1024];
        unsigned lines = 0;
        /* bounded: a resolv.conf is a few lines */
        while (lines++ < 10000 && fgets(line, sizeof line, f)) {
            char *tok[16];
            unsigned nt = 0;
            for (char *s = line; nt < 16;) {
                while (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r') s++;
                if (!*s || *s == '#' || *s == ';') break;
                tok[nt++] = s;
                while (*s && *s != ' ' && *s != '\t' && *s != '\n' && *s != '\r') s++;
                if (*s) *s++ = 0;
            }
            if (nt >= 2 && strcmp(tok[0], "nameserver") == 0) {
                if (r->nservers < DNS_MAX_SERVERS &&
                    server_parse(tok[1], strlen(tok[1]), &r->servers[r->nservers]) == 0)
                    r->nservers++;
            } else if (nt >= 2 && strcmp(tok[0], "options") == 0) {
                for (unsigned i = 1; i < nt; i++) {
                    unsigned v;
                    size_t n = strlen(tok[i]);
                    if (option_value(tok[i], n, "timeout:", 30, &v)) r->timeout_ms = v * 1000;
                    else if (option_value(tok[i], n, "attempts:", 5, &v)) r->attempts = v;
                }
            }
        }
        fclose(f);
    }
    if (r->nservers == 0) {
        /* resolv.conf(5): no nameserver line means the local machine */
        server_parse("127.0.0.1", 9, &r->servers[0]);
        r->nservers = 1;
    }
    return 0;
}

static struct dns_resolver *resolver_alloc(struct loop *l, char *err, size_t errlen)
{
    struct dns_resolver *r = calloc(1, sizeof *r);
    if (!r) {
        fmt(err, errlen, "out of memory");
        return NULL;
    }
    r->l = l;
    r->timeout_ms = DNS_TIMEOUT_MS;
    r->attempts = DNS_ATTEMPTS;
    r->cache_max = DNS_CACHE_MAX;
    r->task.fn = resolver_task;
    r->idpos = sizeof r->idpool;
    uint64_t seed[2];
    int rc = fill_random(seed, sizeof seed);
    if (rc < 0) {
        fmt(err, errlen, "getrandom: %s", strerror(-rc));
        free(r);
        return NULL;
    }
    r->rng = seed[0] | 1;
    r->seed = (uint32_t)seed[1];
    return r;
}

struct dns_resolver *dns_resolver_new(struct loop *l, const char *servers, char *err,
                                      size_t errlen)
{
    if (!servers) return dns_resolver_new_conf(l, "/etc/resolv.conf", err, errlen);
    struct dns_resolver *r = resolver_alloc(l, err, errlen);
    if (!r) return NULL;
    if (servers_from_list(r, servers, err, errlen) < 0) {
        free(r);
        return NULL;
    }
    return r;
}

struct dns_resolver *dns_resolver_new_conf(struct loop *l, const char *path, char *err,
                                           size_t errlen)
{
    struct dns_resolver *r = resolver_alloc(l, err, errlen);
    if (!r) return NULL;
    if (servers_from_conf(r, path, err, errlen) < 0) {
        free(r);
        return NULL;
    }
    return r;
}

int dns_resolver_set_timeout(struct dns_resolver *r, unsigned timeout_ms, unsigned attempts)
{
    if (timeout_ms < 1 || timeout_ms > TIMEOUT_MAX_MS || attempts < 1 || attempts > ATTEMPTS_MAX)
        return -EINVAL;
    r->timeout_ms = timeout_ms;
    r->attempts = attempts;
    return 0;
}

void dns_resolver_set_cache_max(struct dns_resolver *r, unsigned max_entries)
{
    r->cache_max = max_entries;
    while (r->cache_count > r->cache_max && r->lru_tail) cache_remove(r, r->lru_tail);
}

void dns_resolver_stats(const struct dns_resolver *r, struct dns_resolver_stats *out)
{
    *out = r->st;
    out->cache_entries = r->cache_count;
    out->queries_active = r->nqueries;
    out->lookups_active = r->nlookups;
    out->servers = r->nservers;
    out->timeout_ms = r->timeout_ms;
    out->attempts = r->attempts;
}

void dns_resolver_free(struct dns_resolver *r)
{
    if (!r || r->dead) return;
    r->dead = 1;
    /* Giving up tries may free the last of them: not the resolver yet. */
    int busy = r->in_task;
    r->in_task = 1;
    /* Queries first, without touching their waiters: the lookups go next. */
    r->wait_head = r->wait_tail = NULL;
    for (unsigned b = 0; b < QTAB_BUCKETS; b++) {
        while (r->qtab[b]) {
            struct dns_query *q = r->qtab[b];
            q->waiters = NULL;
            query_unlink(q);
            free(q);
        }
    }
    struct lk_list *lists[2] = {&r->active, &r->done};
    for (int i = 0; i < 2; i++) {
        while (lists[i]->head) {
            struct mx_lookup *lk = lists[i]->head;
            lk_remove(lists[i], lk);
            free(lk);
        }
    }
    cache_clear(r);
    r->in_task = busy;
    resolver_maybe_release(r);
}

/* ---- lookups: the public face ---------------------------------------------- */

/* "[192.0.2.1]" or "[IPv6:2001:db8::1]" (RFC 5321 §4.1.3): 1 and *a, 0 when
 * not bracketed, -1 when bracketed but wrong. */
static int address_literal(const char *s, struct mx_addr *a)
{
    size_t n = strnlen(s, DNS_NAME_TEXT);
    char buf[INET6_ADDRSTRLEN + 8];
    if (n == 0 || s[0] != '[') return 0;
    if (n < 3 || s[n - 1] != ']' || n - 2 >= sizeof buf) return -1;
    memcpy(buf, s + 1, n - 2);
    buf[n - 2] = 0;
    memset(a, 0, sizeof *a);
    if (strncasecmp(buf, "IPv6:", 5) == 0) {
        if (inet_pton(AF_INET6, buf + 5, a->addr) != 1) return -1;
        a->family = AF_INET6;
        return 1;
    }
    if (inet_pton(AF_INET, buf, a->addr) != 1) return -1;
    a->family = AF_INET;
    return 1;
}

static struct mx_lookup *lookup_new(struct dns_resolver *r, mx_done_fn fn, void *arg, int *rc)
{
    if (r->nlookups >= DNS_MAX_LOOKUPS) {
        *rc = -EAGAIN;
        return NULL;
    }
    struct mx_lookup *lk = calloc(1, sizeof *lk);
    if (!lk) {
        *rc = -ENOMEM;
        return NULL;
    }
    lk->r = r;
    lk->fn = fn;
    lk->arg = arg;
    lk->state = LK_ACTIVE;
    lk_push(&r->active, lk);
    r->nlookups++;
    r->st.lookups++;
    return lk;
}

/* An answer without DNS: one implicit host with one address. */
static void lookup_literal(struct mx_lookup *lk, const char *text, const struct mx_addr *a)
{
    struct mx_result *res = &lk->res;
    res->status = MX_OK;
    res->implicit = 1;
    res->nhosts = 1;
    size_t n = strnlen(text, DNS_NAME_TEXT - 1);
    for (size_t i = 0; i < n; i++)
        res->hosts[0].name[i] = (text[i] >= 'A' && text[i] <= 'Z') ? (char)(text[i] | 0x20) : text[i];
    res->hosts[0].name[n] = 0;
    res->hosts[0].naddr = 1;
    res->hosts[0].addr[0] = *a;
    lookup_finish(lk);
}

int mx_lookup(struct dns_resolver *r, const char *domain, mx_done_fn fn, void *arg,
              struct mx_lookup **handle)
{
    char name[DNS_NAME_TEXT];
    struct mx_addr a;
    int rc = 0;

    if (handle) *handle = NULL;
    if (!r || r->dead || !domain || !fn) return -EINVAL;
    int lit = address_literal(domain, &a);
    if (lit < 0 || (lit == 0 && name_norm(domain, name) < 0)) return -EINVAL;
    struct mx_lookup *lk = lookup_new(r, fn, arg, &rc);
    if (!lk) return rc;
    if (handle) *handle = lk;
    if (lit) {
        lookup_literal(lk, domain, &a);
        return 0;
    }
    memcpy(lk->domain, name, sizeof name);
    lk->pending = 1;                /* held while the first answer may come from the cache */
    sub_start(lk, 0, -1, DNS_TYPE_MX, name);
    lookup_release(lk);
    return 0;
}

int host_lookup(struct dns_resolver *r, const char *name, mx_done_fn fn, void *arg,
                struct mx_lookup **handle)
{
    char norm[DNS_NAME_TEXT];
    struct mx_addr a;
    int rc = 0, lit;

    if (handle) *handle = NULL;
    if (!r || r->dead || !name || !fn) return -EINVAL;
    memset(&a, 0, sizeof a);
    if (inet_pton(AF_INET, name, a.addr) == 1) {
        a.family = AF_INET;
        lit = 1;
    } else if (inet_pton(AF_INET6, name, a.addr) == 1) {
        a.family = AF_INET6;
        lit = 1;
    } else {
        lit = address_literal(name, &a);
    }
    if (lit < 0 || (lit == 0 && name_norm(name, norm) < 0)) return -EINVAL;
    struct mx_lookup *lk = lookup_new(r, fn, arg, &rc);
    if (!lk) return rc;
    if (handle) *handle = lk;
    lk->is_host = 1;
    if (lit) {
        lookup_literal(lk, name, &a);
        return 0;
    }
    memcpy(lk->domain, norm, sizeof norm);
    lk->res.implicit = 1;
    lk->res.nhosts = 1;
    memcpy(lk->res.hosts[0].name, norm, sizeof norm);
    lk->pending = 1;
    lookup_addresses(lk);
    lookup_release(lk);
    return 0;
}

void mx_lookup_cancel(struct mx_lookup *lk)
{
    if (!lk || lk->state == LK_CALLING) return;
    struct dns_resolver *r = lk->r;
    if (lk->state == LK_DONE) {
        lk_remove(&r->done, lk);
    } else {
        for (unsigned i = 0; i < sizeof lk->subs / sizeof lk->subs[0]; i++)
            if (lk->subs[i].active) sub_detach(&lk->subs[i]);
        lk_remove(&r->active, lk);
    }
    r->nlookups--;
    free(lk);
}

const char *mx_status_name(int status)
{
    static const char *const names[] = {
        [MX_OK] = "ok", [MX_NULL] = "null-mx", [MX_NXDOMAIN] = "nxdomain",
        [MX_NOHOST] = "nohost", [MX_TEMP] = "temp",
    };
    if (status < 0 || (size_t)status >= sizeof names / sizeof names[0]) return "?";
    return names[status];
}
