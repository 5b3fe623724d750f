/* sources: csrc/queue/dsn.c csrc/core/buf.c */
/* libs: -luring */
/* DSN reports and parameters: NOTIFY/RET/ENVID/ORCPT parsing, the shape
 * of a built report (header, three parts, fields of RFC 3464), what is
 * returned of the original and when, boundary collisions, long and
 * multi-line diagnostics, CRLF and 998-octet lines throughout, the UTF-8
 * variant, and every -EINVAL case leaving the output as it was. */
#include "queue/dsn.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

#define NOW 1717243200   /* Sat, 1 Jun 2024 12:00:00 +0000 */
#define MS(t) ((uint64_t)(t) * 1000)

static const char ORIG[] =
    "From: Alice <alice@example.test>\r\n"
    "To: bob@dest.test\r\n"
    "Subject: Lunch\r\n"
    "Message-ID: <m1@example.test>\r\n"
    "\r\n"
    "See you at noon.\r\n"
    "-- \r\n"
    "Alice\r\n";
static const char ORIG_HDR[] =
    "From: Alice <alice@example.test>\r\n"
    "To: bob@dest.test\r\n"
    "Subject: Lunch\r\n"
    "Message-ID: <m1@example.test>\r\n";

/* ---- helpers -------------------------------------------------------------- */

static struct dsn_rcpt rcpt_failed(void)
{
    return (struct dsn_rcpt){
        .final_rcpt = "bob@dest.test", .orcpt = "rfc822;bob@dest.test", .action = DSN_FAILED,
        .status = "5.1.1", .remote_mta = "mx1.dest.test",
        .diagnostic = "550 5.1.1 <bob@dest.test>: user unknown",
        .last_attempt_ms = MS(NOW - 60)};
}

static struct dsn_msg msg_with(const struct dsn_rcpt *r, size_t n)
{
    return (struct dsn_msg){
        .reporting_mta = "mail.example.test", .to = "alice@example.test", .envid = "QQ+2B314159",
        .queue_id = "6b04822b0000000001", .arrival_ms = MS(NOW - 3600), .rcpts = r, .nrcpt = n,
        .orig = ORIG, .orig_len = sizeof ORIG - 1, .now = NOW, .message_id_seed = "q1.7"};
}

/* The built report as a NUL-terminated string (NULL on failure, rc kept). */
static int last_rc;
static unsigned last_flags;
static char *build(const struct dsn_msg *m)
{
    struct bytebuf b = {0};
    last_rc = dsn_build_flags(m, &b, &last_flags);
    if (last_rc < 0) {
        bytebuf_free(&b);
        return NULL;
    }
    char *s = malloc(bytebuf_used(&b) + 1);
    memcpy(s, bytebuf_head(&b), bytebuf_used(&b));
    s[bytebuf_used(&b)] = '\0';
    bytebuf_free(&b);
    return s;
}

static size_t count(const char *hay, const char *needle)
{
    size_t n = 0;
    for (const char *p = hay; (p = strstr(p, needle)) != NULL; p++) n++;
    return n;
}

/* A whole line, CRLF-terminated, somewhere in s. */
static int has_line(const char *s, const char *line)
{
    char buf[4096];
    snprintf(buf, sizeof buf, "\n%s\r\n", line);
    return strstr(s, buf) != NULL;
}

/* Every line ends in CRLF and is at most 998 octets; no NUL, bare CR or LF. */
static int lines_ok(const char *s, size_t n, size_t *longest)
{
    size_t col = 0, max = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '\r') {
            if (i + 1 >= n || s[i + 1] != '\n') return 0;
            i++;
            if (col > max) max = col;
            col = 0;
        } else if (s[i] == '\n' || s[i] == '\0') {
            return 0;
        } else {
            col++;
        }
    }
    if (longest) *longest = max;
    return col == 0 && max <= 998;
}

static void boundary_of(const char *s, char *b, size_t cap)
{
    b[0] = '\0';
    const char *p = strstr(s, "boundary=\"");
    if (!p) return;
    p += 10;
    const char *q = strchr(p, '"');
    if (!q || (size_t)(q - p) >= cap) return;
    memcpy(b, p, (size_t)(q - p));
    b[q - p] = '\0';
}

/* Part i (0-based) of the report: its header in *hdr, its body returned
 * (malloc'd), or NULL when there is no such part. */
struct part {
    char *hdr;
    char *body;
};

static int get_part(const char *s, int i, struct part *pt)
{
    char b[128], delim[140];
    boundary_of(s, b, sizeof b);
    snprintf(delim, sizeof delim, "\r\n--%s", b);
    const char *p = strstr(s, delim);
    for (int k = 0; p && k < i; k++) p = strstr(p + 1, delim);
    if (!p) return 0;
    p += strlen(delim);
    if (strncmp(p, "--", 2) == 0) return 0;   /* the close delimiter */
    p += 2;                                   /* CRLF after the delimiter */
    const char *blank = strstr(p, "\r\n\r\n");
    const char *end = strstr(p, delim);
    if (!blank || !end || blank > end) return 0;
    pt->hdr = strndup(p, (size_t)(blank + 2 - p));
    pt->body = strndup(blank + 4, (size_t)(end - blank - 4));
    return 1;
}

static void free_part(struct part *pt)
{
    free(pt->hdr);
    free(pt->body);
    pt->hdr = pt->body = NULL;
}

static int nparts(const char *s)
{
    struct part pt;
    int n = 0;
    while (get_part(s, n, &pt)) {
        free_part(&pt);
        n++;
    }
    return n;
}

/* The value of field name in s (first occurrence, at a line start), unfolded:
 * CRLF before a blank removed (RFC 5322 §2.2.3). */
static char *field(const char *s, const char *name)
{
    char key[128];
    snprintf(key, sizeof key, "\n%s: ", name);
    const char *p = strncmp(s, key + 1, strlen(key + 1)) == 0 ? s - 1 : strstr(s, key);
    if (!p) return NULL;
    p += strlen(key);
    size_t cap = strlen(p) + 1, n = 0;
    char *v = malloc(cap);
    while (*p) {
        if (p[0] == '\r' && p[1] == '\n') {
            if (p[2] == ' ' || p[2] == '\t') {
                p += 2;
                continue;
            }
            break;
        }
        v[n++] = *p++;
    }
    v[n] = '\0';
    return v;
}

static int field_is(const char *s, const char *name, const char *want)
{
    char *v = field(s, name);
    int ok = v && strcmp(v, want) == 0;
    if (!ok) fprintf(stderr, "  %s: got [%s] want [%s]\n", name, v ? check_show(v, strlen(v)) : "(none)", want);
    free(v);
    return ok;
}

/* ---- parameters ----------------------------------------------------------- */

static void test_notify(void)
{
    CHECK(dsn_notify_of(NULL) == (DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY), "NULL: default");
    CHECK(dsn_notify_of("") == (DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY), "empty: default");
    CHECK(dsn_notify_of("ORCPT=rfc822;a@b") == (DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY), "absent");
    CHECK(dsn_notify_of("NOTIFY=NEVER") == DSN_NOTIFY_NEVER, "never");
    CHECK(dsn_notify_of("notify=never") == DSN_NOTIFY_NEVER, "never, lower case");
    CHECK(dsn_notify_of("NOTIFY=SUCCESS") == DSN_NOTIFY_SUCCESS, "success");
    CHECK(dsn_notify_of("NOTIFY=FAILURE") == DSN_NOTIFY_FAILURE, "failure alone: no delay");
    CHECK(dsn_notify_of("NOTIFY=DELAY") == DSN_NOTIFY_DELAY, "delay");
    CHECK(dsn_notify_of("NOTIFY=SUCCESS,FAILURE,DELAY") ==
              (DSN_NOTIFY_SUCCESS | DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY), "all three");
    CHECK(dsn_notify_of("NoTiFy=delay,Success") == (DSN_NOTIFY_SUCCESS | DSN_NOTIFY_DELAY), "mixed case");
    CHECK(dsn_notify_of("ORCPT=rfc822;bob@x NOTIFY=FAILURE") == DSN_NOTIFY_FAILURE, "second parameter");
    CHECK(dsn_notify_of("  NOTIFY=FAILURE\tORCPT=rfc822;x@y ") == DSN_NOTIFY_FAILURE, "blanks around");
    CHECK(dsn_notify_of("NOTIFY=FAILURE NOTIFY=SUCCESS") == DSN_NOTIFY_FAILURE, "first one wins");
    CHECK(dsn_notify_of("NOTIFY=NEVER,FAILURE") == DSN_NOTIFY_FAILURE, "NEVER in a list is ignored");
    CHECK(dsn_notify_of("NOTIFY=BOGUS") == (DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY), "nothing known: default");
    CHECK(dsn_notify_of("NOTIFY=") == (DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY), "empty value: default");
    CHECK(dsn_notify_of("NOTIFY") == (DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY), "no value: default");
    CHECK(dsn_notify_of("XNOTIFY=NEVER") == (DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY), "other keyword");
    CHECK(dsn_notify_of("NOTIFYX=NEVER") == (DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY), "longer keyword");
    CHECK(dsn_notify_of("NOTIFY=FAILURE,,DELAY") == (DSN_NOTIFY_FAILURE | DSN_NOTIFY_DELAY), "empty item");
}

static void test_ret(void)
{
    CHECK(dsn_ret_hdrs_of(NULL) == 0, "NULL");
    CHECK(dsn_ret_hdrs_of("") == 0, "empty");
    CHECK(dsn_ret_hdrs_of("RET=HDRS") == 1, "HDRS");
    CHECK(dsn_ret_hdrs_of("ret=hdrs") == 1, "lower case");
    CHECK(dsn_ret_hdrs_of("SIZE=1000 BODY=8BITMIME RET=Hdrs ENVID=x") == 1, "among others");
    CHECK(dsn_ret_hdrs_of("RET=FULL") == 0, "FULL");
    CHECK(dsn_ret_hdrs_of("RET=HDRSX") == 0, "not HDRS");
    CHECK(dsn_ret_hdrs_of("RET") == 0, "no value");
    CHECK(dsn_ret_hdrs_of("XRET=HDRS") == 0, "other keyword");
    CHECK(dsn_ret_hdrs_of("ENVID=RET=HDRS") == 0, "inside another value");
}

static void test_param(void)
{
    char buf[64];
    CHECK(dsn_param("RET=FULL ENVID=QQ+2B314159", "ENVID", buf, sizeof buf) == 0 &&
              strcmp(buf, "QQ+2B314159") == 0, "ENVID, still xtext: %s", buf);
    CHECK(dsn_param("envid=abc", "ENVID", buf, sizeof buf) == 0 && strcmp(buf, "abc") == 0, "case");
    CHECK(dsn_param("NOTIFY=NEVER ORCPT=rfc822;bob@x", "orcpt", buf, sizeof buf) == 0 &&
              strcmp(buf, "rfc822;bob@x") == 0, "ORCPT: %s", buf);
    CHECK(dsn_param("NOTIFY=NEVER", "ORCPT", buf, sizeof buf) == -1 && buf[0] == '\0', "absent");
    CHECK(dsn_param(NULL, "ORCPT", buf, sizeof buf) == -1, "NULL params");
    CHECK(dsn_param("ENVID", "ENVID", buf, sizeof buf) == -1, "keyword without value");
    CHECK(dsn_param("ENVID= RET=HDRS", "ENVID", buf, sizeof buf) == 0 && buf[0] == '\0', "empty value");
    CHECK(dsn_param("ENVIDX=1 ENVID=2", "ENVID", buf, sizeof buf) == 0 && strcmp(buf, "2") == 0, "prefix");
    CHECK(dsn_param("ENVID=1 ENVID=2", "ENVID", buf, sizeof buf) == 0 && strcmp(buf, "1") == 0, "first");
    /* the boundary of cap: 9 octets fit in 10, 10 do not */
    CHECK(dsn_param("ENVID=123456789", "ENVID", buf, 10) == 0 && strcmp(buf, "123456789") == 0, "fits");
    strcpy(buf, "junk");
    CHECK(dsn_param("ENVID=1234567890", "ENVID", buf, 10) == -1 && buf[0] == '\0', "too long");
    CHECK(dsn_param("ENVID=1", "ENVID", buf, 0) == -1, "cap 0");
    CHECK(dsn_param("ENVID=1", "ENVID", NULL, 8) == -1, "NULL buf");
    /* ENVID's own limit (RFC 3461 §4.4) through the sizes the header names */
    char envid[DSN_ENVID_MAX + 1], params[200];
    memset(envid, 'e', DSN_ENVID_MAX);
    envid[DSN_ENVID_MAX] = '\0';
    snprintf(params, sizeof params, "ENVID=%s", envid);
    CHECK(dsn_param(params, "ENVID", envid, sizeof envid) == 0 && strlen(envid) == DSN_ENVID_MAX, "100 fit");
    snprintf(params, sizeof params, "ENVID=%sx", envid);
    CHECK(dsn_param(params, "ENVID", envid, sizeof envid) == -1, "101 do not");
}

static void test_xtext(void)
{
    char buf[32];
    CHECK(dsn_xtext_decode("QQ+2B314159", buf, sizeof buf) == 9 && strcmp(buf, "QQ+314159") == 0, "%s", buf);
    CHECK(dsn_xtext_decode("a+3Db+2bc", buf, sizeof buf) == 5 && strcmp(buf, "a=b+c") == 0, "lower hex read");
    CHECK(dsn_xtext_decode("plain", buf, sizeof buf) == 5 && strcmp(buf, "plain") == 0, "plain");
    CHECK(dsn_xtext_decode("", buf, sizeof buf) == 0 && buf[0] == '\0', "empty");
    CHECK(dsn_xtext_decode("a+2", buf, sizeof buf) == -1, "short escape");
    CHECK(dsn_xtext_decode("a+ZZ", buf, sizeof buf) == -1, "bad escape");
    CHECK(dsn_xtext_decode("a+", buf, sizeof buf) == -1, "escape at the end");
    CHECK(dsn_xtext_decode("abcd", buf, 5) == 4, "fits exactly");
    CHECK(dsn_xtext_decode("abcde", buf, 5) == -1, "too long");
}

/* ---- the report ----------------------------------------------------------- */

static void test_structure(void)
{
    struct dsn_rcpt r[2] = {rcpt_failed(),
                            {.final_rcpt = "carol@nowhere.test", .action = DSN_FAILED, .status = "5.4.4",
                             .diagnostic = "no mail server for nowhere.test", .diag_type = "X-mailengine"}};
    struct dsn_msg m = msg_with(r, 2);
    char *s = build(&m);
    CHECK(s != NULL, "built: %d", last_rc);
    if (!s) return;
    size_t len = strlen(s), longest = 0;
    CHECK(lines_ok(s, len, &longest), "CRLF lines of at most 998 octets (longest %zu)", longest);
    CHECK(last_flags == 0, "ASCII report, 7-bit original: flags %u", last_flags);

    /* header */
    CHECK(strncmp(s, "From: \"Mail Delivery System\" <MAILER-DAEMON@mail.example.test>\r\n", 64) == 0,
          "From first: %s", check_show(s, 80));
    CHECK(field_is(s, "To", "<alice@example.test>"), "To");
    CHECK(field_is(s, "Subject", "Undelivered Mail Returned to Sender"), "Subject");
    CHECK(field_is(s, "Date", "Sat, 1 Jun 2024 12:00:00 +0000"), "Date");
    CHECK(field_is(s, "Message-ID", "<q1.7@mail.example.test>"), "Message-ID");
    CHECK(field_is(s, "MIME-Version", "1.0"), "MIME-Version");
    CHECK(field_is(s, "Auto-Submitted", "auto-replied"), "Auto-Submitted");
    CHECK(field_is(s, "Content-Type",
                   "multipart/report; report-type=delivery-status;\tboundary=\"=_q1.7\""), "Content-Type");
    const char *body = strstr(s, "\r\n\r\n");
    CHECK(body && !strstr(s, "Content-Transfer-Encoding") , "7-bit: no CTE anywhere");
    char b[128];
    boundary_of(s, b, sizeof b);
    char close[160];
    snprintf(close, sizeof close, "\r\n--%s--\r\n", b);
    CHECK(len > strlen(close) && strcmp(s + len - strlen(close), close) == 0, "ends with the close delimiter");
    CHECK(nparts(s) == 3, "three parts: %d", nparts(s));

    struct part p1, p2, p3;
    CHECK(get_part(s, 0, &p1) && get_part(s, 1, &p2) && get_part(s, 2, &p3), "parts");
    CHECK(strstr(p1.hdr, "Content-Type: text/plain; charset=us-ascii\r\n") != NULL, "%s", p1.hdr);
    CHECK(strstr(p1.body, "<bob@dest.test>: delivery failed (status 5.1.1)") != NULL, "text names bob");
    CHECK(strstr(p1.body, "The server mx1.dest.test answered:") != NULL, "text names the server");
    CHECK(strstr(p1.body, "        550 5.1.1 <bob@dest.test>: user unknown\r\n") != NULL, "quotes the reply");
    CHECK(strstr(p1.body, "<carol@nowhere.test>: delivery failed (status 5.4.4)") != NULL, "names carol");
    CHECK(strstr(p1.body, "Reason:") != NULL, "our own reason");
    CHECK(strstr(p1.body, "Queue id: 6b04822b0000000001") != NULL, "queue id");
    CHECK(strstr(p1.body, "mail.example.test") != NULL, "reporting host");
    CHECK(strstr(p1.body, "A copy of your message is attached.") != NULL, "return note");
    size_t l1 = 0;
    lines_ok(p1.body, strlen(p1.body), &l1);
    CHECK(l1 <= 78, "human lines at most 78 here: %zu", l1);

    CHECK(strcmp(p2.hdr, "Content-Type: message/delivery-status\r\nContent-Description: Delivery report\r\n") == 0,
          "%s", p2.hdr);
    /* RFC 3464 §2.1: per-message fields, then a blank line before each recipient */
    CHECK(strncmp(p2.body,
                  "Original-Envelope-Id: QQ+314159\r\n"
                  "Reporting-MTA: dns; mail.example.test\r\n"
                  "Arrival-Date: Sat, 1 Jun 2024 11:00:00 +0000\r\n"
                  "X-Mailengine-Queue-ID: 6b04822b0000000001\r\n"
                  "\r\n"
                  "Original-Recipient: rfc822; bob@dest.test\r\n"
                  "Final-Recipient: rfc822; bob@dest.test\r\n"
                  "Action: failed\r\n"
                  "Status: 5.1.1\r\n"
                  "Remote-MTA: dns; mx1.dest.test\r\n"
                  "Diagnostic-Code: smtp; 550 5.1.1 <bob@dest.test>: user unknown\r\n"
                  "Last-Attempt-Date: Sat, 1 Jun 2024 11:59:00 +0000\r\n"
                  "\r\n"
                  "Final-Recipient: rfc822; carol@nowhere.test\r\n"
                  "Action: failed\r\n"
                  "Status: 5.4.4\r\n"
                  "Diagnostic-Code: X-mailengine; no mail server for nowhere.test\r\n",
                  strlen(p2.body)) == 0 && strlen(p2.body) > 500,
          "delivery-status:\n%s", p2.body);
    CHECK(!strstr(p2.body, "Will-Retry-Until"), "no Will-Retry-Until for failures");

    CHECK(strstr(p3.hdr, "Content-Type: message/rfc822\r\n") != NULL, "%s", p3.hdr);
    CHECK(strcmp(p3.body, ORIG) == 0, "original returned byte for byte");
    free_part(&p1);
    free_part(&p2);
    free_part(&p3);
    free(s);
}

static void test_optional_fields(void)
{
    struct dsn_rcpt r = {.final_rcpt = "bob@dest.test", .action = DSN_FAILED, .status = "5.0.0"};
    struct dsn_msg m = msg_with(&r, 1);
    m.envid = NULL;
    m.queue_id = NULL;
    m.arrival_ms = 0;
    m.postmaster = "postmaster@example.test";
    m.message_id_seed = ".a b<c>..d.";
    char *s = build(&m);
    CHECK(s != NULL, "built: %d", last_rc);
    if (!s) return;
    CHECK(field_is(s, "From", "\"Mail Delivery System\" <postmaster@example.test>"), "postmaster");
    CHECK(field_is(s, "Message-ID", "<_a_b_c_._d_@mail.example.test>"), "seed made an id-left");
    CHECK(!strstr(s, "Original-Envelope-Id") && !strstr(s, "Arrival-Date") && !strstr(s, "Queue"),
          "absent inputs, absent fields");
    CHECK(!strstr(s, "Original-Recipient") && !strstr(s, "Remote-MTA") && !strstr(s, "Diagnostic-Code") &&
              !strstr(s, "Last-Attempt-Date"), "no ORCPT, server, reply or attempt");
    CHECK(has_line(s, "Final-Recipient: rfc822; bob@dest.test"), "final recipient");
    size_t longest;
    CHECK(lines_ok(s, strlen(s), &longest), "lines");
    free(s);

    /* ENVID and ORCPT are decoded (RFC 3461 §6.3); a value that decodes
     * to control characters is kept as received. */
    r.orcpt = "rfc822;bob+2Bext@dest.test";
    m = msg_with(&r, 1);
    s = build(&m);
    CHECK(s && has_line(s, "Original-Recipient: rfc822; bob+ext@dest.test"), "ORCPT decoded");
    CHECK(s && strstr(s, "Originally addressed to: bob+ext@dest.test"), "text names the ORCPT");
    free(s);
    r.orcpt = "rfc822;bob+0D+0Aevil@dest.test";
    m.envid = "a+0D+0AX-Evil:+201";
    s = build(&m);
    CHECK(s && has_line(s, "Original-Recipient: rfc822; bob+0D+0Aevil@dest.test"), "ORCPT kept");
    CHECK(s && has_line(s, "Original-Envelope-Id: a+0D+0AX-Evil:+201"), "ENVID kept");
    CHECK(s && !has_line(s, "X-Evil: 1"), "no injected field");
    free(s);
    r.orcpt = "x400;/G=bob/S=dest/";
    s = build(&m);
    CHECK(s && has_line(s, "Original-Recipient: x400; /G=bob/S=dest/"), "other address types kept");
    free(s);
}

static void test_subjects_and_delays(void)
{
    struct dsn_rcpt r = {.final_rcpt = "bob@dest.test", .action = DSN_DELAYED, .status = "4.4.1",
                         .remote_mta = "mx1.dest.test", .diagnostic = "421 4.4.1 timed out",
                         .last_attempt_ms = MS(NOW - 60), .will_retry_until_ms = MS(NOW + 86400)};
    struct dsn_msg m = msg_with(&r, 1);
    char *s = build(&m);
    CHECK(s && field_is(s, "Subject", "Delayed Mail (still being retried)"), "delay subject");
    CHECK(s && has_line(s, "Action: delayed"), "delayed");
    CHECK(s && has_line(s, "Will-Retry-Until: Sun, 2 Jun 2024 12:00:00 +0000"), "Will-Retry-Until");
    CHECK(s && strstr(s, "Will keep trying until: Sun, 2 Jun 2024 12:00:00 +0000"), "text says until when");
    /* a delay report returns the header only */
    struct part p3 = {0};
    CHECK(s && get_part(s, 2, &p3) && strstr(p3.hdr, "Content-Type: text/rfc822-headers\r\n") &&
              strcmp(p3.body, ORIG_HDR) == 0, "delay: header only");
    free_part(&p3);
    free(s);

    r.will_retry_until_ms = 0;
    s = build(&m);
    CHECK(s && !strstr(s, "Will-Retry-Until"), "0: omitted");
    free(s);

    r = (struct dsn_rcpt){.final_rcpt = "bob@dest.test", .action = DSN_DELIVERED, .status = "2.0.0",
                          .remote_mta = "mx1.dest.test", .diagnostic = "250 2.0.0 Ok",
                          .will_retry_until_ms = MS(NOW)};
    s = build(&m);
    CHECK(s && field_is(s, "Subject", "Successful Mail Delivery Report"), "success subject");
    CHECK(s && has_line(s, "Action: delivered") && has_line(s, "Status: 2.0.0"), "delivered");
    CHECK(s && !strstr(s, "Will-Retry-Until"), "only delays carry Will-Retry-Until");
    CHECK(s && get_part(s, 2, &p3) && strstr(p3.hdr, "text/rfc822-headers"), "success: header only");
    free_part(&p3);
    free(s);

    /* mixed actions: the gravest names the report */
    struct dsn_rcpt mix[3] = {
        {.final_rcpt = "a@x.test", .action = DSN_RELAYED, .status = "2.0.0"},
        {.final_rcpt = "b@x.test", .action = DSN_DELAYED, .status = "4.2.2"},
        {.final_rcpt = "c@x.test", .action = DSN_EXPANDED, .status = "2.0.0"},
    };
    m = msg_with(mix, 3);
    s = build(&m);
    CHECK(s && field_is(s, "Subject", "Delayed Mail (still being retried)"), "delayed beats relayed");
    CHECK(s && has_line(s, "Action: relayed") && has_line(s, "Action: expanded"), "actions");
    free(s);
    mix[2] = (struct dsn_rcpt){.final_rcpt = "c@x.test", .action = DSN_FAILED, .status = "4.4.7"};
    s = build(&m);
    CHECK(s && field_is(s, "Subject", "Undelivered Mail Returned to Sender"), "failed beats all");
    CHECK(s && has_line(s, "Status: 4.4.7"), "an expiry fails with a 4.x.x status");
    CHECK(s && get_part(s, 2, &p3) && strstr(p3.hdr, "message/rfc822") && strcmp(p3.body, ORIG) == 0,
          "a failure among them returns the message");
    free_part(&p3);
    free(s);
}

static void test_return(void)
{
    struct dsn_rcpt r = rcpt_failed();
    struct dsn_msg m = msg_with(&r, 1);
    struct part p1 = {0}, p3 = {0};

    m.ret_hdrs = 1;
    char *s = build(&m);
    CHECK(s && get_part(s, 2, &p3) && strcmp(p3.hdr,
          "Content-Type: text/rfc822-headers\r\nContent-Description: Message header\r\n") == 0 &&
              strcmp(p3.body, ORIG_HDR) == 0, "RET=HDRS: header only");
    CHECK(s && get_part(s, 0, &p1) && strstr(p1.body, "you asked for the header only"), "text says why");
    free_part(&p1);
    free_part(&p3);
    free(s);

    m.ret_hdrs = 0;
    m.max_return = sizeof ORIG - 1;   /* exactly the size: returned */
    s = build(&m);
    CHECK(s && get_part(s, 2, &p3) && strcmp(p3.body, ORIG) == 0, "at max_return: whole");
    free_part(&p3);
    free(s);
    m.max_return = sizeof ORIG - 2;   /* one over */
    s = build(&m);
    CHECK(s && get_part(s, 2, &p3) && strstr(p3.hdr, "text/rfc822-headers") && strcmp(p3.body, ORIG_HDR) == 0,
          "over max_return: header only");
    CHECK(s && get_part(s, 0, &p1) && strstr(p1.body, "larger than the") &&
              strstr(p1.body, "bytes returned at most"), "text says why:\n%s", p1.body);
    free_part(&p1);
    free_part(&p3);
    free(s);
    m.max_return = 10;                /* even the header is too big */
    s = build(&m);
    CHECK(s && nparts(s) == 2, "no third part: %d", s ? nparts(s) : -1);
    CHECK(s && get_part(s, 0, &p1) && strstr(p1.body, "even its header is larger"), "text says why");
    free_part(&p1);
    free(s);

    /* no original at all */
    m = msg_with(&r, 1);
    m.orig = NULL;
    m.orig_len = 0;
    s = build(&m);
    CHECK(s && nparts(s) == 2 && strstr(s, "no longer available"), "no original: two parts");
    free(s);

    /* a body line over 998 octets: header only */
    size_t n = 40 + 1200 + 2;
    char *big = malloc(n + 1);
    n = (size_t)sprintf(big, "Subject: x\r\n\r\n");
    memset(big + n, 'y', 1200);
    n += 1200;
    memcpy(big + n, "\r\n", 3);
    n += 2;
    m.orig = big;
    m.orig_len = n;
    s = build(&m);
    CHECK(s && get_part(s, 2, &p3) && strstr(p3.hdr, "text/rfc822-headers") &&
              strcmp(p3.body, "Subject: x\r\n") == 0, "long body line: header only");
    CHECK(s && lines_ok(s, strlen(s), NULL), "and every line is short");
    CHECK(s && strstr(s, "over 998 bytes"), "text says why");
    free_part(&p3);
    free(s);
    /* exactly 998 is fine */
    big[14 + 998] = '\r';
    big[14 + 999] = '\n';
    m.orig_len = 14 + 1000;
    s = build(&m);
    CHECK(s && get_part(s, 2, &p3) && strstr(p3.hdr, "message/rfc822"), "998 octets: returned");
    free_part(&p3);
    free(s);
    /* a bare LF in the body; then in the header */
    static const char bare_body[] = "Subject: x\r\n\r\nline\nmore\r\n";
    m.orig = bare_body;
    m.orig_len = sizeof bare_body - 1;
    s = build(&m);
    CHECK(s && get_part(s, 2, &p3) && strstr(p3.hdr, "text/rfc822-headers") && lines_ok(s, strlen(s), NULL),
          "bare LF in body: header only");
    free_part(&p3);
    free(s);
    static const char bare_hdr[] = "Subject: x\nTo: y\r\n\r\nbody\r\n";
    m.orig = bare_hdr;
    m.orig_len = sizeof bare_hdr - 1;
    s = build(&m);
    CHECK(s && nparts(s) == 2 && strstr(s, "its header has lines") && lines_ok(s, strlen(s), NULL),
          "bare LF in header: nothing returned");
    free(s);
    static const char nul_body[] = "Subject: x\r\n\r\nan\0NUL\r\n";
    m.orig = nul_body;
    m.orig_len = sizeof nul_body - 1;
    s = build(&m);
    CHECK(s && get_part(s, 2, &p3) && strstr(p3.hdr, "text/rfc822-headers"), "NUL in body: header only");
    free_part(&p3);
    free(s);
    /* no header at all: nothing to return in a delay notice */
    static const char no_hdr[] = "\r\njust a body\r\n";
    m.orig = no_hdr;
    m.orig_len = sizeof no_hdr - 1;
    m.ret_hdrs = 1;
    s = build(&m);
    CHECK(s && nparts(s) == 2 && strstr(s, "it has no header to return"), "no header, RET=HDRS");
    free(s);
    m.ret_hdrs = 0;
    s = build(&m);
    CHECK(s && get_part(s, 2, &p3) && strcmp(p3.body, no_hdr) == 0, "no header, whole message: returned");
    free_part(&p3);
    free(s);
    /* no blank line: all header; no final CRLF still ends with CRLF */
    static const char no_body[] = "Subject: x\r\nTo: y";
    m.orig = no_body;
    m.orig_len = sizeof no_body - 1;
    s = build(&m);
    CHECK(s && get_part(s, 2, &p3) && strcmp(p3.body, no_body) == 0 && lines_ok(s, strlen(s), NULL),
          "no final CRLF: returned as is, delimiter on its own line");
    free_part(&p3);
    free(s);
    free(big);
}

static void test_eightbit(void)
{
    struct dsn_rcpt r = rcpt_failed();
    struct dsn_msg m = msg_with(&r, 1);
    struct part p3 = {0};
    static const char body8[] = "Subject: x\r\n\r\nGr\xc3\xbc\xc3\x9f""e\r\n";
    m.orig = body8;
    m.orig_len = sizeof body8 - 1;
    char *s = build(&m);
    CHECK(s && get_part(s, 2, &p3) && strstr(p3.hdr, "Content-Type: message/rfc822\r\n") &&
              strstr(p3.hdr, "Content-Transfer-Encoding: 8bit\r\n") && strcmp(p3.body, body8) == 0,
          "8-bit body: message/rfc822, 8bit");
    CHECK(s && strstr(s, "\r\nContent-Transfer-Encoding: 8bit\r\n\r\nThis is a MIME"), "top level says 8bit");
    CHECK(last_flags == DSN_OUT_8BIT, "flags %u", last_flags);
    free_part(&p3);
    free(s);

    static const char hdr8[] = "Subject: Gr\xc3\xbc\xc3\x9f""e\r\n\r\nbody\r\n";
    m.orig = hdr8;
    m.orig_len = sizeof hdr8 - 1;
    s = build(&m);
    CHECK(s && get_part(s, 2, &p3) && strstr(p3.hdr, "Content-Type: message/global\r\n") &&
              strcmp(p3.body, hdr8) == 0, "UTF-8 header: message/global (RFC 6532)");
    free_part(&p3);
    free(s);
    m.ret_hdrs = 1;
    s = build(&m);
    CHECK(s && get_part(s, 2, &p3) && strstr(p3.hdr, "Content-Type: message/global-headers\r\n") &&
              strcmp(p3.body, "Subject: Gr\xc3\xbc\xc3\x9f""e\r\n") == 0, "and message/global-headers");
    free_part(&p3);
    free(s);
    /* the report itself stays ASCII: text part and status are 7-bit */
    m.ret_hdrs = 0;
    s = build(&m);
    struct part p1 = {0};
    CHECK(s && get_part(s, 0, &p1) && strstr(p1.hdr, "us-ascii") && !strstr(p1.hdr, "Transfer"), "text 7-bit");
    free_part(&p1);
    free(s);
}

static void test_utf8(void)
{
    struct dsn_rcpt r = rcpt_failed();
    r.final_rcpt = "j\xc3\xb6rg@d\xc3\xa9st.test";
    r.orcpt = "rfc822;j+C3+B6rg@d+C3+A9st.test";
    r.diagnostic = "550 5.1.1 <j\xc3\xb6rg@d\xc3\xa9st.test> unbekannt \xff\xfe";
    struct dsn_msg m = msg_with(&r, 1);
    char *s = build(&m);
    CHECK(s != NULL, "built: %d", last_rc);
    if (!s) return;
    CHECK(last_flags == (DSN_OUT_UTF8 | DSN_OUT_8BIT), "flags %u", last_flags);
    CHECK(strstr(s, "report-type=global-delivery-status;"), "report-type (RFC 6533)");
    struct part p1 = {0}, p2 = {0};
    CHECK(get_part(s, 0, &p1) && strstr(p1.hdr, "text/plain; charset=utf-8\r\n") &&
              strstr(p1.hdr, "Content-Transfer-Encoding: 8bit\r\n"), "utf-8 text:\n%s", p1.hdr);
    CHECK(p1.body && strstr(p1.body, "<j\xc3\xb6rg@d\xc3\xa9st.test>: delivery failed"), "names the address");
    CHECK(get_part(s, 1, &p2) && strstr(p2.hdr, "Content-Type: message/global-delivery-status\r\n"), "global");
    CHECK(p2.body && strstr(p2.body, "Final-Recipient: utf-8; j\xc3\xb6rg@d\xc3\xa9st.test\r\n"), "utf-8 type");
    CHECK(p2.body && strstr(p2.body, "Original-Recipient: utf-8; j\xc3\xb6rg@d\xc3\xa9st.test\r\n"),
          "decoded ORCPT is UTF-8 too");
    CHECK(p2.body && strstr(p2.body, "unbekannt ??\r\n"), "invalid UTF-8 in the reply replaced");
    CHECK(lines_ok(s, strlen(s), NULL), "lines");
    free_part(&p1);
    free_part(&p2);
    free(s);

    /* unitext escapes the ASCII xtext reserves */
    r.final_rcpt = "\"a b+c\"@\xc3\xa9.test";
    r.orcpt = NULL;
    s = build(&m);
    CHECK(s && has_line(s, "Final-Recipient: utf-8; \"a\\x{20}b\\x{2B}c\"@\xc3\xa9.test"), "unitext");
    free(s);

    /* ASCII report, non-ASCII reply text: '?' per character */
    r = rcpt_failed();
    r.diagnostic = "550 5.1.1 Benutzer unbekannt: J\xc3\xb6rg \xe2\x82\xac \xff";
    s = build(&m);
    CHECK(s && has_line(s, "Diagnostic-Code: smtp; 550 5.1.1 Benutzer unbekannt: J?rg ? ?"),
          "ASCII report: %s", s ? strstr(s, "Diagnostic-Code") : "");
    CHECK(s && last_flags == 0, "flags %u", last_flags);
    free(s);
    /* a UTF-8 sender alone makes it a UTF-8 report */
    m.to = "\xc3\xa5sa@example.test";
    s = build(&m);
    CHECK(s && last_flags == (DSN_OUT_UTF8 | DSN_OUT_8BIT) && field_is(s, "To", "<\xc3\xa5sa@example.test>"),
          "UTF-8 To");
    free(s);
}

static void test_diagnostics(void)
{
    struct dsn_rcpt r = rcpt_failed();
    struct dsn_msg m = msg_with(&r, 1);

    /* multi-line reply, every kind of line break and control in it */
    r.diagnostic = "550-5.1.1 first line\n550-5.1.1 second\r\n550-5.1.1 third\rline\x01with\x7f"
                   "ctl\tand tab\n\n   \n550 5.1.1 last   ";
    char *s = build(&m);
    CHECK(s && lines_ok(s, strlen(s), NULL), "CRLF only");
    char *v = s ? field(s, "Diagnostic-Code") : NULL;
    CHECK(v && strcmp(v, "smtp; 550-5.1.1 first line 550-5.1.1 second 550-5.1.1 third line?with?ctl "
                         "and tab 550 5.1.1 last") == 0, "unfolded: [%s]", v ? v : "");
    CHECK(s && strstr(s, "Diagnostic-Code: smtp; 550-5.1.1 first line\r\n 550-5.1.1 second\r\n"),
          "one reply line per folded line");
    CHECK(s && strstr(s, "        550-5.1.1 third\r\n        line?with?ctl and tab\r\n"), "in the text too");
    free(v);
    free(s);

    /* long words and long lines: folded under 78 where blanks allow, cut under 998 */
    static char longd[12000];
    size_t n = (size_t)sprintf(longd, "550 5.7.1 ");
    for (int i = 0; i < 3000; i++) longd[n++] = (char)('a' + i % 26);
    longd[n++] = ' ';
    for (int i = 0; i < 300; i++) n += (size_t)sprintf(longd + n, "w%d ", i);
    longd[n] = '\0';
    r.diagnostic = longd;
    s = build(&m);
    size_t longest = 0;
    CHECK(s && lines_ok(s, strlen(s), &longest) && longest < 998, "longest %zu", longest);
    v = s ? field(s, "Diagnostic-Code") : NULL;
    /* unfolding gives "smtp; " and the text without its trailing blank,
     * plus one blank at each of the 3 cuts of the 3000-octet word */
    CHECK(v && strncmp(v, "smtp; 550 5.7.1 abc", 19) == 0 && strstr(v, "w0 w1 w2") &&
              strstr(v, "w298 w299") && strlen(v) == 6 + strlen(longd) - 1 + 3,
          "content kept: %zu vs %zu", v ? strlen(v) : 0, strlen(longd));
    const char *dc = s ? strstr(s, "w10 ") : NULL;
    const char *eol = dc ? strstr(dc, "\r\n") : NULL;
    const char *sol = dc;
    while (sol && sol > s && sol[-1] != '\n') sol--;
    CHECK(eol && sol && eol - sol <= 78, "word lines fold at 78: %ld", eol && sol ? (long)(eol - sol) : -1L);
    free(v);
    free(s);

    /* over DSN_DIAG_MAX: cut and marked */
    static char huge[DSN_DIAG_MAX * 2];
    for (size_t i = 0; i < sizeof huge - 1; i++) huge[i] = (i % 50 == 49) ? ' ' : 'x';
    huge[sizeof huge - 1] = '\0';
    r.diagnostic = huge;
    s = build(&m);
    v = s ? field(s, "Diagnostic-Code") : NULL;
    CHECK(v && strlen(v) < DSN_DIAG_MAX + 20 && strstr(v, "[...]"), "cut: %zu", v ? strlen(v) : 0);
    free(v);
    free(s);

    /* blanks only: no Diagnostic-Code at all */
    r.diagnostic = " \n\t\r\n ";
    s = build(&m);
    CHECK(s && !strstr(s, "Diagnostic-Code") && strstr(s, "Remote server: mx1.dest.test"), "blank reply");
    free(s);
}

static void test_boundary(void)
{
    struct dsn_rcpt r = rcpt_failed();
    struct dsn_msg m = msg_with(&r, 1);
    char b[128];

    /* the seed's boundary in the original: another one is chosen */
    static const char coll[] = "Subject: x\r\n\r\n--=_q1.7\r\n--=_q1.7.00000000\r\n--=_q1.7.00000001x\r\n";
    m.orig = coll;
    m.orig_len = sizeof coll - 1;
    char *s = build(&m);
    CHECK(s != NULL, "built");
    if (!s) return;
    boundary_of(s, b, sizeof b);
    CHECK(strcmp(b, "=_q1.7.00000002") == 0, "next free counter: %s", b);
    char delim[160];
    snprintf(delim, sizeof delim, "--%s", b);
    CHECK(count(s, delim) == 4, "only the delimiters carry it: %zu", count(s, delim));
    struct part p3 = {0};
    CHECK(get_part(s, 2, &p3) && strcmp(p3.body, coll) == 0, "original intact");
    free_part(&p3);
    free(s);

    /* a reply quoting the boundary counts too */
    m = msg_with(&r, 1);
    r.diagnostic = "550 see --=_q1.7 here";
    s = build(&m);
    boundary_of(s, b, sizeof b);
    CHECK(s && strcmp(b, "=_q1.7.00000000") == 0, "diagnostic collision: %s", b);
    free(s);

    /* a seed with characters a boundary cannot hold */
    r = rcpt_failed();
    m.message_id_seed = "id with spaces\"and quotes";
    s = build(&m);
    boundary_of(s, b, sizeof b);
    CHECK(s && strcmp(b, "=_id_with_spaces_and_quotes") == 0, "%s", b);
    free(s);
    /* a long seed: the boundary stays within 70 (RFC 2046 §5.1.1) */
    char seed[DSN_ENVID_MAX + 20];
    memset(seed, 's', sizeof seed - 1);
    seed[sizeof seed - 1] = '\0';
    m.message_id_seed = seed;
    static char many[4000];
    size_t n = (size_t)sprintf(many, "Subject: x\r\n\r\n");
    for (int i = 0; i < 20; i++) {
        n += (size_t)sprintf(many + n, "--=_");
        memset(many + n, 's', 56);
        n += 56;
        n += (size_t)sprintf(many + n, ".%08x\r\n", (unsigned)i);
    }
    m.orig = many;
    m.orig_len = n;
    s = build(&m);
    boundary_of(s, b, sizeof b);
    CHECK(s && strlen(b) <= 70 && strstr(b, ".00000014"), "20 taken: %s (%zu)", b, strlen(b));
    free(s);
}

static void test_einval(void)
{
    struct dsn_rcpt r = rcpt_failed();
    struct dsn_msg m;
    struct bytebuf b = {0};
    bytebuf_append(&b, "keep", 4);
    bytebuf_consume(&b, 1);   /* offset > 0: compaction must not lose it */

#define EINVAL_CASE(what, stmt)                                                             \
    do {                                                                                    \
        r = rcpt_failed();                                                                  \
        m = msg_with(&r, 1);                                                                \
        stmt;                                                                               \
        int rc_ = dsn_build(&m, &b);                                                        \
        CHECK(rc_ == -EINVAL && bytebuf_used(&b) == 3 && memcmp(bytebuf_head(&b), "eep", 3) == 0, \
              "%s: rc %d, out %zu", what, rc_, bytebuf_used(&b));                          \
    } while (0)

    CHECK(dsn_build(NULL, &b) == -EINVAL, "NULL msg");
    m = msg_with(&r, 1);
    CHECK(dsn_build(&m, NULL) == -EINVAL, "NULL out");
    EINVAL_CASE("no recipients", m.nrcpt = 0);
    EINVAL_CASE("NULL rcpts", m.rcpts = NULL);
    EINVAL_CASE("null sender", m.to = "");
    EINVAL_CASE("NULL to", m.to = NULL);
    EINVAL_CASE("NULL host", m.reporting_mta = NULL);
    EINVAL_CASE("bad host", m.reporting_mta = "mail example");
    EINVAL_CASE("CRLF in host", m.reporting_mta = "a\r\nb");
    EINVAL_CASE("NULL seed", m.message_id_seed = NULL);
    EINVAL_CASE("CRLF in to", m.to = "a@b\r\nBcc: x@y");
    EINVAL_CASE("CRLF in postmaster", m.postmaster = "a@b\r\n");
    EINVAL_CASE("bad UTF-8 address", m.to = "a\xff@b");
    EINVAL_CASE("NULL final recipient", r.final_rcpt = NULL);
    EINVAL_CASE("LF in recipient", r.final_rcpt = "bob\n@x");
    EINVAL_CASE("NULL status", r.status = NULL);
    EINVAL_CASE("action out of range", r.action = (enum dsn_action)7);
    EINVAL_CASE("bad diag type", r.diag_type = "smtp; x");
    EINVAL_CASE("orig NULL with a length", (m.orig = NULL, m.orig_len = 5));
    EINVAL_CASE("empty queue id", m.queue_id = "");
    EINVAL_CASE("CR in queue id", m.queue_id = "q\r1");
    EINVAL_CASE("date before 1900", m.now = -2208988801LL);
    /* a generated line that would pass 998 octets */
    static char addr[DSN_ADDR_MAX + 1];
    memset(addr, ' ', DSN_ADDR_MAX);
    addr[0] = 'a';
    addr[DSN_ADDR_MAX - 2] = '@';
    addr[DSN_ADDR_MAX - 1] = '\xc3';
    addr[DSN_ADDR_MAX] = '\0';
    EINVAL_CASE("bad UTF-8 at the end", r.final_rcpt = addr);
    addr[DSN_ADDR_MAX - 1] = 'x';
    addr[DSN_ADDR_MAX - 3] = '\xc3';
    addr[DSN_ADDR_MAX - 2] = '\xa9';   /* UTF-8: unitext, spaces become \x{20} */
    EINVAL_CASE("unitext past 998", r.final_rcpt = addr);
    static char longaddr[DSN_ADDR_MAX + 2];
    memset(longaddr, 'a', DSN_ADDR_MAX + 1);
    longaddr[5] = '@';
    EINVAL_CASE("address over its limit", r.final_rcpt = longaddr);
#undef EINVAL_CASE

    /* and a good one appends after what was there */
    r = rcpt_failed();
    m = msg_with(&r, 1);
    CHECK(dsn_build(&m, &b) == 0 && memcmp(bytebuf_head(&b), "eepFrom: ", 9) == 0, "appended");
    bytebuf_free(&b);
}

/* What a remote server, DNS or the sender handed us is made safe or left
 * out: the report still goes. */
static void test_remote_data(void)
{
    static const struct {
        enum dsn_action action;
        const char *status, *want;
    } st[] = {
        {DSN_FAILED, "5.1", "5.0.0"},          {DSN_FAILED, "3.1.1", "5.0.0"},
        {DSN_FAILED, "5.1.1000", "5.0.0"},     {DSN_FAILED, "5.1.1 ", "5.0.0"},
        {DSN_FAILED, "2.0.0", "5.0.0"},        {DSN_FAILED, "", "5.0.0"},
        {DSN_DELAYED, "2.1.5", "4.0.0"},       {DSN_DELIVERED, "5.0.0", "2.0.0"},
        {DSN_RELAYED, "4.4.1", "2.0.0"},       {DSN_FAILED, "4.4.7", "4.4.7"},
        {DSN_DELAYED, "5.2.2", "5.2.2"},       {DSN_EXPANDED, "2.1.5", "2.1.5"},
        {DSN_FAILED, "5.123.456", "5.123.456"},
    };
    for (size_t i = 0; i < sizeof st / sizeof st[0]; i++) {
        struct dsn_rcpt r = rcpt_failed();
        r.action = st[i].action;
        r.status = st[i].status;
        struct dsn_msg m = msg_with(&r, 1);
        char *s = build(&m);
        char line[64];
        snprintf(line, sizeof line, "Status: %s", st[i].want);
        CHECK(s && has_line(s, line), "action %d, status \"%s\": want %s", (int)st[i].action, st[i].status,
              st[i].want);
        free(s);
    }

    static const char *const bad_orcpt[] = {"bob@dest.test", "rfc 822;bob@dest.test", "rfc822;",
                                            "rfc822(x);bob@dest.test", "rfc822;bob\r\n@x", ";bob@x"};
    for (size_t i = 0; i < sizeof bad_orcpt / sizeof bad_orcpt[0]; i++) {
        struct dsn_rcpt r = rcpt_failed();
        r.orcpt = bad_orcpt[i];
        struct dsn_msg m = msg_with(&r, 1);
        char *s = build(&m);
        CHECK(s && !strstr(s, "Original-Recipient") && has_line(s, "Final-Recipient: rfc822; bob@dest.test"),
              "ORCPT %zu left out", i);
        CHECK(s && lines_ok(s, strlen(s), NULL), "lines");
        free(s);
    }

    struct dsn_rcpt r = rcpt_failed();
    r.remote_mta = "mx;evil\r\nX-Evil: 1";
    struct dsn_msg m = msg_with(&r, 1);
    char *s = build(&m);
    CHECK(s && !strstr(s, "Remote-MTA") && !strstr(s, "evil") && strstr(s, "The remote server answered:"),
          "odd MX name left out");
    free(s);

    r = rcpt_failed();
    m.envid = "0123456789012345678901234567890123456789012345678901234567890"
              "12345678901234567890123456789012345678901";   /* 101 */
    s = build(&m);
    CHECK(s && !strstr(s, "Original-Envelope-Id"), "ENVID over 100 left out");
    free(s);
    m.envid = "\xc3\xa9";
    s = build(&m);
    CHECK(s && !strstr(s, "Original-Envelope-Id"), "8-bit ENVID left out");
    free(s);
    m.envid = "a b\tc";
    s = build(&m);
    CHECK(s && !strstr(s, "Original-Envelope-Id"), "TAB in ENVID: left out");
    free(s);
}

/* Every line we generate stays CRLF and short whatever the action mix and
 * return mode; the returned original is the one exception, and only when
 * it was clean itself. */
static void test_grid(void)
{
    static const char *const diags[] = {NULL, "250 ok", "550-a\n550 b", "x\r\ny\rz\n", ""};
    int bad = 0, built = 0;
    for (int a = 0; a <= DSN_EXPANDED; a++)
        for (int d = 0; d < 5; d++)
            for (int ret = 0; ret < 2; ret++)
                for (int mr = 0; mr < 3; mr++) {
                    struct dsn_rcpt r = rcpt_failed();
                    r.action = (enum dsn_action)a;
                    r.status = a == DSN_FAILED ? "5.1.1" : a == DSN_DELAYED ? "4.4.1" : "2.0.0";
                    r.diagnostic = diags[d];
                    r.will_retry_until_ms = MS(NOW);
                    struct dsn_msg m = msg_with(&r, 1);
                    m.ret_hdrs = ret;
                    m.max_return = mr == 0 ? 0 : mr == 1 ? 50 : 5;
                    char *s = build(&m);
                    if (!s) {
                        bad++;
                        continue;
                    }
                    built++;
                    if (!lines_ok(s, strlen(s), NULL)) bad++;
                    if (nparts(s) < 2) bad++;
                    free(s);
                }
    CHECK(bad == 0 && built == 5 * 5 * 2 * 3, "%d bad of %d", bad, built);
}

int main(void)
{
    test_notify();
    test_ret();
    test_param();
    test_xtext();
    test_structure();
    test_optional_fields();
    test_subjects_and_delays();
    test_return();
    test_eightbit();
    test_utf8();
    test_diagnostics();
    test_boundary();
    test_einval();
    test_remote_data();
    test_grid();
    return check_summary();
}
