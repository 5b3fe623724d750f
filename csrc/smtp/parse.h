/* SMTP grammar: command lines (RFC 5321 §4.1) and the DATA stream scanner.
 * Pure code: bytes in, results out. No I/O, no allocation, resumable at any
 * byte, every limit checked where the byte arrives. */
#ifndef SMTP_PARSE_H
#define SMTP_PARSE_H

#include <stddef.h>
#include <stdint.h>

/* ---- line framing ---------------------------------------------------- */

enum smtp_line_result {
    SMTP_LINE_NEED_MORE = 0, /* no complete line yet; keep the bytes */
    SMTP_LINE_OK,            /* *line_len bytes of text, *consumed includes CRLF */
    SMTP_LINE_BARE_LF,       /* a LF not preceded by CR ends this line: refuse it */
    SMTP_LINE_BARE_CR,       /* a CR not followed by LF inside the line */
    SMTP_LINE_TOO_LONG,      /* no CRLF within max bytes: caller discards to next LF */
};

/* Find the first line in p[0..n). On OK, BARE_LF and BARE_CR, *consumed is
 * the number of bytes through the terminating LF and *line_len the text
 * length without CR/LF. On TOO_LONG (no LF within `max` bytes), *consumed is
 * the number of bytes scanned so far that may be dropped. */
enum smtp_line_result smtp_line_find(const char *p, size_t n, size_t max,
                                     size_t *line_len, size_t *consumed);

/* ---- commands -------------------------------------------------------- */

enum smtp_verb {
    SMTP_VERB_UNKNOWN = 0,
    SMTP_VERB_HELO, SMTP_VERB_EHLO, SMTP_VERB_MAIL, SMTP_VERB_RCPT,
    SMTP_VERB_DATA, SMTP_VERB_BDAT, SMTP_VERB_RSET, SMTP_VERB_NOOP,
    SMTP_VERB_QUIT, SMTP_VERB_VRFY, SMTP_VERB_EXPN, SMTP_VERB_HELP,
    SMTP_VERB_STARTTLS, SMTP_VERB_AUTH,
};

#define SMTP_MAX_PARAMS 16

struct smtp_param {            /* ESMTP parameter: KEY[=VALUE] */
    const char *key; size_t key_len;
    const char *val; size_t val_len;   /* val == NULL when there is no '=' */
};

struct smtp_cmd {
    enum smtp_verb verb;
    const char *arg; size_t arg_len;   /* text after the verb, spaces trimmed */
    /* MAIL FROM:<addr> / RCPT TO:<addr>: path without the angle brackets
     * (addr_len 0 for the null path <>), then its parameters. */
    const char *addr; size_t addr_len;
    struct smtp_param params[SMTP_MAX_PARAMS];
    unsigned nparams;
};

enum smtp_parse_status {
    SMTP_PARSE_OK = 0,
    SMTP_PARSE_UNKNOWN,        /* 500 5.5.1 command unrecognized */
    SMTP_PARSE_SYNTAX,         /* 501 5.5.4 syntax error in parameters */
    SMTP_PARSE_BAD_ADDR,       /* 501 5.1.7 / 5.1.3 bad address syntax */
    SMTP_PARSE_TOO_MANY_PARAMS,/* 501 5.5.4 */
};

/* Parse one command line (no CRLF). Verbs are case-insensitive. MAIL needs
 * "FROM:" and RCPT needs "TO:" (a space after the colon is tolerated, as
 * most servers do). The path must be in angle brackets; a source route
 * (@a,@b:user@d) is accepted and dropped (RFC 5321 §4.1.2). Quoted local
 * parts are kept as written. Addresses may contain UTF-8 (SMTPUTF8); the
 * caller decides whether that is allowed. Pointers in *cmd point into line. */
enum smtp_parse_status smtp_parse_command(const char *line, size_t len,
                                          struct smtp_cmd *cmd);

/* Case-insensitive match of a parameter key, e.g. smtp_param_is(p, "SIZE"). */
int smtp_param_is(const struct smtp_param *p, const char *key);

/* Address checks on a path as returned in cmd->addr. */
int smtp_addr_is_utf8(const char *addr, size_t len);     /* any byte >= 0x80 */
/* Offset of the '@' separating local part and domain, or -1. */
long smtp_addr_at(const char *addr, size_t len);

/* ---- DATA stream ------------------------------------------------------ */

/* Scanner for the DATA phase (RFC 5321 §4.5.2): removes dot-stuffing, finds
 * the end-of-data line, and flags what must make us refuse the message.
 * The only end of data is CRLF "." CRLF (data begins at the start of a line).
 * A bare LF or a bare CR anywhere is flagged and is never a line end, so
 * "\n.\r\n", "\r.\r\n" and "\n.\n" end nothing (SMTP smuggling). */
enum {
    SMTP_DATA_BARE_LF  = 1u << 0,
    SMTP_DATA_BARE_CR  = 1u << 1,
    SMTP_DATA_LONG_LINE = 1u << 2,    /* a line exceeded max_line octets */
};

struct smtp_data_scan {
    uint32_t state;       /* private */
    uint32_t flags;       /* SMTP_DATA_* seen so far */
    size_t line_len;      /* private: octets in the current line */
    size_t max_line;      /* set by the caller: longest line accepted */
};

void smtp_data_init(struct smtp_data_scan *s, size_t max_line);

/* Scan in[0..n). Unstuffed message bytes (CRLF line ends kept, the final
 * ".\r\n" not included) are written to out, which must have room for n
 * bytes; *out_n receives how many. Returns the number of input bytes
 * consumed. *done is set to 1 when the end-of-data line was consumed; the
 * bytes after it (pipelined commands) are not consumed. */
size_t smtp_data_scan(struct smtp_data_scan *s, const char *in, size_t n,
                      char *out, size_t *out_n, int *done);

#endif
