/* POP3 grammar: command lines (RFC 1939 §3, RFC 2449, RFC 2595, RFC 5034)
 * and line framing. Pure code: bytes in, results out; no I/O, no
 * allocation. Every pointer handed back points into the caller's bytes. */
#ifndef POP3_PARSE_H
#define POP3_PARSE_H

#include <stddef.h>

#define POP3_LINE_MAX 255      /* RFC 2449 §4: a command line is at most 255 octets, CRLF included */
#define POP3_ARG_MAX 2         /* arguments kept */
#define POP3_ARG_LEN_MAX 40    /* RFC 1939 §3: an argument is at most 40 octets */
#define POP3_NUMBER_DIGITS 9   /* numeric arguments: 1..9 decimal digits, so they fit any unsigned long */

enum pop3_cmd { POP3_UNKNOWN = 0, POP3_USER, POP3_PASS, POP3_APOP, POP3_AUTH, POP3_STLS, POP3_CAPA,
                POP3_STAT, POP3_LIST, POP3_RETR, POP3_DELE, POP3_NOOP, POP3_RSET, POP3_TOP,
                POP3_UIDL, POP3_QUIT };

struct pop3_command {
    enum pop3_cmd cmd;
    unsigned nargs;                 /* arguments found (at most POP3_ARG_MAX; more is an error) */
    const char *arg[POP3_ARG_MAX];  /* pointers into the line given to pop3_parse (not NUL-terminated) */
    size_t arg_len[POP3_ARG_MAX];
    const char *rest; size_t rest_len;  /* PASS and AUTH: everything after the keyword and one space, as is (passwords may contain spaces, RFC 1939 §7 notes) */
};

enum pop3_parse_status { POP3_OK = 0, POP3_ERR_EMPTY, POP3_ERR_UNKNOWN, POP3_ERR_SYNTAX, POP3_ERR_TOO_LONG };

/* Parse one command line without its CRLF (line[0..len)). Keywords are
 * case-insensitive (RFC 1939 §3), 3-4 letters; arguments are separated by
 * single spaces, but runs of spaces between arguments and one or more
 * trailing spaces are tolerated; a leading space is SYNTAX. An argument is at
 * most 40 octets (RFC 1939 §3), except the PASS and AUTH rest.
 *
 * Arity: USER 1; PASS rest non-empty; APOP 2; AUTH mechanism
 * [initial-response]; STLS/CAPA/STAT/NOOP/RSET/QUIT 0; LIST/UIDL 0 or 1;
 * RETR/DELE 1; TOP 2. Numeric arguments (LIST, RETR, DELE, TOP, UIDL) are 1..9
 * decimal digits, no sign; pop3_number() gives their value.
 *
 * PASS: rest is the password, as is (spaces and TAB kept); nargs is 1 and
 * arg[0] is the rest too. AUTH: rest is as is; arg[0] is the mechanism and
 * arg[1] the initial response if any (RFC 5034 §4), with no 40-octet limit.
 * Other commands: rest is NULL and rest_len 0.
 *
 * A NUL byte or any control character (< 0x20 or 0x7f; other than TAB inside
 * the PASS rest) is SYNTAX; so is a CR left in the line. len > POP3_LINE_MAX-2
 * is TOO_LONG, len == 0 EMPTY, a keyword we do not know UNKNOWN.
 *
 * *out is always filled. On any error nargs is 0, every arg and rest NULL, and
 * cmd is the command if its keyword was recognised (so a reply can name it),
 * else POP3_UNKNOWN. */
enum pop3_parse_status pop3_parse(const char *line, size_t len, struct pop3_command *out);

/* The value of a numeric argument checked by pop3_parse (0 for none: n == 0,
 * more than 9 octets, or anything but digits). */
unsigned long pop3_number(const char *p, size_t n);

/* "USER", ... "QUIT"; "?" for POP3_UNKNOWN or any other value. */
const char *pop3_cmd_name(enum pop3_cmd c);

/* Frame the next line of p[0..n): returns the offset just past its end (0 if
 * no complete line yet) and sets *line_len to its length without the ending
 * (0 when returning 0). A line ends at CRLF (RFC 1939 §3) or, leniently, at a
 * bare LF, since many clients send those; a CR not followed by LF stays in
 * the line, where pop3_parse refuses it. No length limit is applied here: the
 * caller bounds its buffer, and pop3_parse says TOO_LONG. */
size_t pop3_line_end(const char *p, size_t n, size_t *line_len);

#endif
