/* Delivery Status Notifications: the bounce, delay and success reports the
 * queue mails to an envelope sender (RFC 3464 inside a multipart/report,
 * RFC 6522), and the DSN parameters of MAIL and RCPT (RFC 3461) they obey.
 * Pure code: bytes in, one RFC 5322 message out; no I/O. */
#ifndef QUEUE_DSN_H
#define QUEUE_DSN_H

#include <stddef.h>
#include <stdint.h>
#include <time.h>

#include "core/buf.h"

/* RFC 3461 §4.4: ENVID is at most 100 characters. */
#define DSN_ENVID_MAX 100
/* RFC 3461 §4.2: the whole ORCPT value is at most 500 characters. */
#define DSN_ORCPT_MAX 500
/* Longest address accepted (RFC 5321 §4.5.3.1.3 allows a 256-octet path;
 * the slack is for SMTPUTF8 addresses, whose octets outnumber characters). */
#define DSN_ADDR_MAX 512
/* Reply text quoted from a remote server; the rest is cut and marked. */
#define DSN_DIAG_MAX 8192

enum dsn_action { DSN_FAILED = 0, DSN_DELAYED, DSN_DELIVERED, DSN_RELAYED, DSN_EXPANDED };

struct dsn_rcpt {
    const char *final_rcpt;      /* the address we tried, e.g. "bob@dest.test" */
    const char *orcpt;           /* ORCPT= value as received ("rfc822;bob@dest.test",
                                    xtext, RFC 3461 §4.2), or NULL */
    enum dsn_action action;
    const char *status;          /* "5.1.1", "4.4.7", "2.0.0" (RFC 3463) */
    const char *remote_mta;      /* MX host name, or NULL (e.g. DNS failure) */
    const char *diagnostic;      /* remote reply text, lines joined by "\n", or our
                                    own reason; NULL: none */
    const char *diag_type;       /* "smtp" (when NULL) or "X-mailengine" */
    uint64_t last_attempt_ms;    /* 0: no attempt to report */
    uint64_t will_retry_until_ms;/* delayed only: when we give up; 0: omit */
};

struct dsn_msg {
    const char *reporting_mta;   /* our host name */
    const char *postmaster;      /* From: address; NULL: MAILER-DAEMON@reporting_mta */
    const char *to;              /* the original envelope sender (never "") */
    const char *envid;           /* ENVID= value of MAIL FROM (xtext), or NULL */
    const char *queue_id;        /* or NULL */
    uint64_t arrival_ms;         /* 0: omit Arrival-Date */
    const struct dsn_rcpt *rcpts;
    size_t nrcpt;
    const char *orig;            /* the original message (header + body, CRLF), or NULL */
    size_t orig_len;
    int ret_hdrs;                /* RET=HDRS: return the header only */
    size_t max_return;           /* return at most this many bytes of the original
                                    (0: no limit); above it, the header only */
    time_t now;                  /* for Date: */
    const char *message_id_seed; /* unique per report: Message-ID and boundary */
};

/* dsn_build_flags() reports what the message needs from the transport. */
enum {
    DSN_OUT_8BIT = 1,   /* 8-bit octets: send with BODY=8BITMIME (RFC 6152) */
    DSN_OUT_UTF8 = 2,   /* UTF-8 addresses or header fields: needs SMTPUTF8 (RFC 6531) */
};

/* Append the whole report to out: header, then the parts text/plain,
 * message/delivery-status and the returned message (or its header).
 *
 * Recipients may mix actions; the Subject follows the gravest one present
 * (failed, then delayed, then the successes). The original is returned
 * whole only when some recipient failed and neither RET=HDRS, max_return
 * nor its shape (a line over 998 octets, NUL, bare CR or LF) forbids it;
 * otherwise its header alone, and when even that cannot go, nothing; the
 * text part says which and why.
 *
 * What came from elsewhere is made safe rather than refused, so a remote
 * server's odd reply cannot cost the sender its bounce: a status that is
 * not class.subject.detail (RFC 3463 §2) or whose class disagrees with
 * the action (2 for delivered, relayed and expanded; 4 or 5 otherwise)
 * becomes the action's X.0.0; a remote_mta that is not a host name, an
 * ORCPT that is not "type;address" and an ENVID that is not printable
 * ASCII of at most 100 characters are left out; the diagnostic is
 * cleaned (controls become '?', non-ASCII too in an ASCII report).
 *
 * Returns 0; -ENOMEM; or -EINVAL, leaving out as it was, for what the
 * caller vouches for: d, out, rcpts, reporting_mta, to, message_id_seed
 * or a status is NULL; nrcpt is 0; to is "" (the null sender, which is
 * never sent a report: RFC 5321 §4.5.5); orig is NULL with orig_len > 0;
 * reporting_mta is not a host name; an address, the queue id or the seed
 * has control characters, invalid UTF-8 or is over its limit; a diagnostic
 * type is not an atom; an action is out of range; a date falls outside
 * the years 1900..9999; or a generated line would pass 998 octets. */
int dsn_build(const struct dsn_msg *d, struct bytebuf *out);
/* The same, and *flags (if not NULL) gets DSN_OUT_* for the message. */
int dsn_build_flags(const struct dsn_msg *d, struct bytebuf *out, unsigned *flags);

/* DSN parameters out of an envelope parameter string such as
 * "NOTIFY=FAILURE,DELAY ORCPT=rfc822;bob@x" (space-separated, keywords
 * case-insensitive, unknown parameters ignored, the first of a repeated
 * keyword wins; NULL is an empty string). */
enum { DSN_NOTIFY_SUCCESS = 1, DSN_NOTIFY_FAILURE = 2, DSN_NOTIFY_DELAY = 4, DSN_NOTIFY_NEVER = 8 };
/* NOTIFY as flags. Absent, or naming nothing we know: FAILURE|DELAY (RFC
 * 3461 §4.1). NEVER counts only alone (§4.1 forbids it in a list; a list
 * that has it anyway keeps its other items, so the sender still hears). */
unsigned dsn_notify_of(const char *rcpt_params);
/* 1 for RET=HDRS, else 0 (RET=FULL or absent). */
int dsn_ret_hdrs_of(const char *mail_params);
/* Copy the value of keyword (e.g. "ENVID", "ORCPT"), still xtext, into buf
 * NUL-terminated: 0 if present; -1 if absent, without a value or longer
 * than cap - 1 (buf is then "" when cap > 0). */
int dsn_param(const char *params, const char *keyword, char *buf, size_t cap);
/* Decode xtext (RFC 3461 §4: "+XX" is the octet 0xXX) into buf,
 * NUL-terminated. Returns the decoded length, or -1 for a malformed
 * escape or a result that does not fit in cap - 1 octets. */
long dsn_xtext_decode(const char *in, char *buf, size_t cap);

#endif
