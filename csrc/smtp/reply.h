/* SMTP replies as the client reads them (RFC 5321 §4.2): a resumable reader
 * that turns bytes into whole replies, and the EHLO capability list.
 * Pure code: no I/O, no allocation, every limit chosen by the caller. */
#ifndef SMTP_REPLY_H
#define SMTP_REPLY_H

#include <stddef.h>
#include <stdint.h>

/* RFC 5321 §4.5.3.1.5 allows 512 octets per reply line; real servers send
 * longer ones (long EHLO greetings, policy texts with URLs). */
#define SMTP_REPLY_DEFAULT_MAX_LINE  4096
#define SMTP_REPLY_DEFAULT_MAX_LINES 100
/* Room for the text of one reply, all lines together. */
#define SMTP_REPLY_TEXT_MAX          4096

/* smtp_reply.flags */
enum {
    SMTP_REPLY_BARE_LF   = 1u << 0,  /* a line ended in LF without CR (tolerated) */
    SMTP_REPLY_BARE_CR   = 1u << 1,  /* a CR not followed by LF inside a line's text (kept) */
    SMTP_REPLY_TRUNCATED = 1u << 2,  /* the text did not fit: text[] holds its start */
};

/* Enhanced status code, RFC 3463 §2: class "." subject "." detail. */
struct smtp_enhanced {
    unsigned cls;                /* 2, 4 or 5; 0 when the reply has none */
    unsigned subject, detail;    /* 0..999 each; 0 when cls is 0 */
};

struct smtp_reply {
    unsigned code;               /* 200..599 */
    struct smtp_enhanced enhanced;
    unsigned nlines;             /* 1..max_lines */
    uint32_t flags;              /* SMTP_REPLY_* */
    /* The text of every line (what follows "DDD" and its SP or "-"),
     * lines joined by "\n", without CR/LF. Bytes are kept as sent: the
     * only "\n" in it are the separators. NUL-terminated for convenience;
     * text_len is what counts (the text may hold NUL bytes). */
    size_t text_len;
    char text[SMTP_REPLY_TEXT_MAX + 1];
};

enum smtp_reply_status {
    SMTP_REPLY_OK = 0,
    SMTP_REPLY_ERR_SYNTAX,         /* a line not "DDD" then SP, "-" or its line end */
    SMTP_REPLY_ERR_CODE_MISMATCH,  /* a line of a multi-line reply changed the code */
    SMTP_REPLY_ERR_LINE_TOO_LONG,  /* a line longer than max_line octets */
    SMTP_REPLY_ERR_TOO_MANY_LINES, /* a reply of more than max_lines lines */
};

struct smtp_reply_parser {
    enum smtp_reply_status status; /* once not OK it stays so: drop the connection */
    size_t max_line;               /* octets per line, code and CRLF included */
    unsigned max_lines;            /* lines per reply */
    /* private */
    unsigned state, lines, final;
    size_t line_len;
};

/* Start a reader; 0 for either limit means its default above. */
void smtp_reply_init(struct smtp_reply_parser *p, size_t max_line, unsigned max_lines);

/* Read in[0..n) until one reply is complete. Returns the number of bytes
 * consumed. *complete is set to 1 when `out` holds a whole reply; the
 * bytes after it (pipelined replies, RFC 2920) were not consumed and are
 * fed in the next call. Otherwise every byte was consumed, or p->status
 * says why not (the offending byte is the last one consumed; later calls
 * consume nothing).
 *
 * A reply being read lives in `out`: pass the same struct on every call
 * until *complete is 1, and read it only then. The first byte of the next
 * reply starts it afresh. */
size_t smtp_reply_feed(struct smtp_reply_parser *p, const char *in, size_t n,
                       struct smtp_reply *out, int *complete);

/* A fixed English name for a status, for logs. */
const char *smtp_reply_status_str(enum smtp_reply_status st);

/* ---- EHLO ------------------------------------------------------------- */

/* smtp_ehlo_caps.ext */
enum {
    SMTP_EXT_PIPELINING          = 1u << 0,  /* RFC 2920 */
    SMTP_EXT_SIZE                = 1u << 1,  /* RFC 1870 */
    SMTP_EXT_8BITMIME            = 1u << 2,  /* RFC 6152 */
    SMTP_EXT_SMTPUTF8            = 1u << 3,  /* RFC 6531 */
    SMTP_EXT_STARTTLS            = 1u << 4,  /* RFC 3207 */
    SMTP_EXT_CHUNKING            = 1u << 5,  /* RFC 3030 */
    SMTP_EXT_DSN                 = 1u << 6,  /* RFC 3461 */
    SMTP_EXT_ENHANCEDSTATUSCODES = 1u << 7,  /* RFC 2034 */
    SMTP_EXT_AUTH                = 1u << 8,  /* RFC 4954, or the old "AUTH=" line */
};

/* smtp_ehlo_caps.auth */
enum {
    SMTP_AUTH_PLAIN = 1u << 0,
    SMTP_AUTH_LOGIN = 1u << 1,
    SMTP_AUTH_OTHER = 1u << 2,   /* some mechanism not named above */
};

struct smtp_ehlo_caps {
    uint32_t ext;                /* SMTP_EXT_* */
    uint32_t auth;               /* SMTP_AUTH_*, from every AUTH line */
    uint64_t size;               /* SIZE value; 0: no limit given (RFC 1870 §4) */
};

/* Capabilities from a reply to EHLO: the lines after the first (RFC 5321
 * §4.1.1.1), keywords and mechanisms matched ignoring ASCII case. Returns
 * 0, or -EINVAL (caps all zero) when the reply is not a 250. If the text
 * was truncated, its last, perhaps cut, line is not read. */
int smtp_reply_ehlo_parse(const struct smtp_reply *r, struct smtp_ehlo_caps *caps);

#endif
