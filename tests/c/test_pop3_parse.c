/* sources: csrc/pop3/parse.c */
/* libs: */
/* The POP3 command parser and line framer: every command, arity, case,
 * numbers, limits, control bytes. */
#include "pop3/parse.h"

#include <string.h>

#include "check.h"

static struct pop3_command cmd;

/* Parse a NUL-terminated literal (so no embedded NUL here; see parse_n). */
static enum pop3_parse_status parse(const char *s)
{
    return pop3_parse(s, strlen(s), &cmd);
}

static enum pop3_parse_status parse_n(const char *s, size_t n)
{
    return pop3_parse(s, n, &cmd);
}

static int arg_is(unsigned i, const char *want)
{
    return i < cmd.nargs && cmd.arg_len[i] == strlen(want) &&
           memcmp(cmd.arg[i], want, cmd.arg_len[i]) == 0;
}

static int rest_is(const char *want)
{
    return cmd.rest && cmd.rest_len == strlen(want) && memcmp(cmd.rest, want, cmd.rest_len) == 0;
}

#define OK(line, c, n)                                                          \
    do {                                                                        \
        enum pop3_parse_status st_ = parse(line);                               \
        CHECK(st_ == POP3_OK && cmd.cmd == (c) && cmd.nargs == (n),             \
              "%s: st=%d cmd=%d nargs=%u", check_show(line, strlen(line)),      \
              st_, cmd.cmd, cmd.nargs);                                         \
    } while (0)

#define ERR(line, want, c)                                                      \
    do {                                                                        \
        enum pop3_parse_status st_ = parse(line);                               \
        CHECK(st_ == (want) && cmd.cmd == (c) && cmd.nargs == 0 &&              \
              cmd.rest == NULL && cmd.arg[0] == NULL,                           \
              "%s: st=%d cmd=%d nargs=%u", check_show(line, strlen(line)),      \
              st_, cmd.cmd, cmd.nargs);                                         \
    } while (0)

static void test_every_command(void)
{
    OK("USER alice", POP3_USER, 1);
    CHECK(arg_is(0, "alice") && cmd.rest == NULL, "%s", check_show(cmd.arg[0], cmd.arg_len[0]));
    OK("PASS secret", POP3_PASS, 1);
    CHECK(rest_is("secret") && arg_is(0, "secret"), "%s", check_show(cmd.rest, cmd.rest_len));
    OK("APOP mrose c4c9334bac560ecc979e58001b3e22fb", POP3_APOP, 2);
    CHECK(arg_is(0, "mrose") && arg_is(1, "c4c9334bac560ecc979e58001b3e22fb"), "%u", cmd.nargs);
    OK("AUTH PLAIN", POP3_AUTH, 1);
    CHECK(arg_is(0, "PLAIN") && rest_is("PLAIN"), "%s", check_show(cmd.rest, cmd.rest_len));
    OK("AUTH PLAIN AGFsaWNlAHNlY3JldA==", POP3_AUTH, 2);
    CHECK(arg_is(1, "AGFsaWNlAHNlY3JldA==") && rest_is("PLAIN AGFsaWNlAHNlY3JldA=="), "%s",
          check_show(cmd.rest, cmd.rest_len));
    OK("STLS", POP3_STLS, 0);
    OK("CAPA", POP3_CAPA, 0);
    OK("STAT", POP3_STAT, 0);
    OK("LIST", POP3_LIST, 0);
    OK("LIST 2", POP3_LIST, 1);
    CHECK(pop3_number(cmd.arg[0], cmd.arg_len[0]) == 2, "%lu", pop3_number(cmd.arg[0], cmd.arg_len[0]));
    OK("RETR 1", POP3_RETR, 1);
    OK("DELE 17", POP3_DELE, 1);
    CHECK(pop3_number(cmd.arg[0], cmd.arg_len[0]) == 17, "%lu", pop3_number(cmd.arg[0], cmd.arg_len[0]));
    OK("NOOP", POP3_NOOP, 0);
    OK("RSET", POP3_RSET, 0);
    OK("TOP 1 10", POP3_TOP, 2);
    CHECK(pop3_number(cmd.arg[0], cmd.arg_len[0]) == 1 && pop3_number(cmd.arg[1], cmd.arg_len[1]) == 10,
          "%lu", pop3_number(cmd.arg[1], cmd.arg_len[1]));
    OK("TOP 3 0", POP3_TOP, 2);
    OK("UIDL", POP3_UIDL, 0);
    OK("UIDL 5", POP3_UIDL, 1);
    OK("QUIT", POP3_QUIT, 0);
    /* Args point into the line itself. */
    const char *line = "RETR 42";
    CHECK(pop3_parse(line, 7, &cmd) == POP3_OK && cmd.arg[0] == line + 5, "%p", (const void *)cmd.arg[0]);
}

static void test_names(void)
{
    static const char *names[] = {"?", "USER", "PASS", "APOP", "AUTH", "STLS", "CAPA", "STAT",
                                  "LIST", "RETR", "DELE", "NOOP", "RSET", "TOP", "UIDL", "QUIT"};
    for (int c = POP3_UNKNOWN; c <= POP3_QUIT; c++) {
        const char *n = pop3_cmd_name((enum pop3_cmd)c);
        CHECK(strcmp(n, names[c]) == 0, "%d: %s", c, n);
        if (c != POP3_UNKNOWN) {
            /* The name parses back to the command (with its arity filled). */
            char buf[32];
            const char *args = c == POP3_USER || c == POP3_PASS || c == POP3_RETR || c == POP3_DELE
                                   ? " 1"
                               : c == POP3_APOP || c == POP3_TOP ? " 1 2"
                               : c == POP3_AUTH ? " X" : "";
            strcpy(buf, n);
            strcat(buf, args);
            OK(buf, (enum pop3_cmd)c, c == POP3_APOP || c == POP3_TOP ? 2u : *args ? 1u : 0u);
        }
    }
    CHECK(strcmp(pop3_cmd_name((enum pop3_cmd)99), "?") == 0, "%s", pop3_cmd_name((enum pop3_cmd)99));
}

static void test_case_and_unknown(void)
{
    OK("quit", POP3_QUIT, 0);
    OK("QuIt", POP3_QUIT, 0);
    OK("user Alice", POP3_USER, 1);
    CHECK(arg_is(0, "Alice"), "%s", check_show(cmd.arg[0], cmd.arg_len[0]));
    OK("top 1 2", POP3_TOP, 2);
    ERR("QUITX", POP3_ERR_UNKNOWN, POP3_UNKNOWN);
    ERR("QUI", POP3_ERR_UNKNOWN, POP3_UNKNOWN);
    ERR("TO 1 2", POP3_ERR_UNKNOWN, POP3_UNKNOWN);
    ERR("TOPS 1 2", POP3_ERR_UNKNOWN, POP3_UNKNOWN);
    ERR("HELO x", POP3_ERR_UNKNOWN, POP3_UNKNOWN);
    ERR("XTND XMIT", POP3_ERR_UNKNOWN, POP3_UNKNOWN);
    ERR("Q", POP3_ERR_UNKNOWN, POP3_UNKNOWN);
    ERR("\xc3\x9cSER x", POP3_ERR_UNKNOWN, POP3_UNKNOWN);
    ERR("", POP3_ERR_EMPTY, POP3_UNKNOWN);
    ERR(" QUIT", POP3_ERR_SYNTAX, POP3_UNKNOWN);
    ERR(" ", POP3_ERR_SYNTAX, POP3_UNKNOWN);
}

static void test_spaces(void)
{
    OK("QUIT ", POP3_QUIT, 0);
    OK("STAT   ", POP3_STAT, 0);
    OK("LIST ", POP3_LIST, 0);
    OK("TOP  1   2", POP3_TOP, 2);
    CHECK(arg_is(0, "1") && arg_is(1, "2"), "%u", cmd.nargs);
    OK("TOP 1 2 ", POP3_TOP, 2);
    OK("USER  bob ", POP3_USER, 1);
    CHECK(arg_is(0, "bob"), "%s", check_show(cmd.arg[0], cmd.arg_len[0]));
    OK("AUTH  PLAIN", POP3_AUTH, 1);
    CHECK(arg_is(0, "PLAIN") && rest_is(" PLAIN"), "%s", check_show(cmd.rest, cmd.rest_len));
    OK("AUTH PLAIN ", POP3_AUTH, 1);
    CHECK(rest_is("PLAIN "), "%s", check_show(cmd.rest, cmd.rest_len));
    /* PASS keeps the rest exactly: spaces, leading, inner and trailing. */
    OK("PASS my secret pass", POP3_PASS, 1);
    CHECK(rest_is("my secret pass"), "%s", check_show(cmd.rest, cmd.rest_len));
    OK("PASS  lead", POP3_PASS, 1);
    CHECK(rest_is(" lead"), "%s", check_show(cmd.rest, cmd.rest_len));
    OK("PASS trail ", POP3_PASS, 1);
    CHECK(rest_is("trail "), "%s", check_show(cmd.rest, cmd.rest_len));
    OK("PASS  ", POP3_PASS, 1);
    CHECK(rest_is(" "), "%s", check_show(cmd.rest, cmd.rest_len));
}

static void test_arity(void)
{
    ERR("USER", POP3_ERR_SYNTAX, POP3_USER);
    ERR("USER ", POP3_ERR_SYNTAX, POP3_USER);
    ERR("USER a b", POP3_ERR_SYNTAX, POP3_USER);
    ERR("PASS", POP3_ERR_SYNTAX, POP3_PASS);
    ERR("PASS ", POP3_ERR_SYNTAX, POP3_PASS);
    ERR("APOP", POP3_ERR_SYNTAX, POP3_APOP);
    ERR("APOP mrose", POP3_ERR_SYNTAX, POP3_APOP);
    ERR("APOP a b c", POP3_ERR_SYNTAX, POP3_APOP);
    ERR("AUTH", POP3_ERR_SYNTAX, POP3_AUTH);
    ERR("AUTH ", POP3_ERR_SYNTAX, POP3_AUTH);
    ERR("AUTH   ", POP3_ERR_SYNTAX, POP3_AUTH);
    ERR("AUTH PLAIN abc def", POP3_ERR_SYNTAX, POP3_AUTH);
    ERR("STLS now", POP3_ERR_SYNTAX, POP3_STLS);
    ERR("CAPA x", POP3_ERR_SYNTAX, POP3_CAPA);
    ERR("STAT 1", POP3_ERR_SYNTAX, POP3_STAT);
    ERR("NOOP x", POP3_ERR_SYNTAX, POP3_NOOP);
    ERR("RSET x", POP3_ERR_SYNTAX, POP3_RSET);
    ERR("QUIT now", POP3_ERR_SYNTAX, POP3_QUIT);
    ERR("LIST 1 2", POP3_ERR_SYNTAX, POP3_LIST);
    ERR("UIDL 1 2", POP3_ERR_SYNTAX, POP3_UIDL);
    ERR("RETR", POP3_ERR_SYNTAX, POP3_RETR);
    ERR("RETR 1 2", POP3_ERR_SYNTAX, POP3_RETR);
    ERR("DELE", POP3_ERR_SYNTAX, POP3_DELE);
    ERR("DELE 1 2", POP3_ERR_SYNTAX, POP3_DELE);
    ERR("TOP", POP3_ERR_SYNTAX, POP3_TOP);
    ERR("TOP 1", POP3_ERR_SYNTAX, POP3_TOP);
    ERR("TOP 1 2 3", POP3_ERR_SYNTAX, POP3_TOP);
}

static void test_numbers(void)
{
    OK("RETR 999999999", POP3_RETR, 1);
    CHECK(pop3_number(cmd.arg[0], cmd.arg_len[0]) == 999999999UL, "%lu",
          pop3_number(cmd.arg[0], cmd.arg_len[0]));
    OK("RETR 007", POP3_RETR, 1);
    CHECK(pop3_number(cmd.arg[0], cmd.arg_len[0]) == 7, "%lu", pop3_number(cmd.arg[0], cmd.arg_len[0]));
    OK("DELE 0", POP3_DELE, 1);   /* range is the session's business */
    ERR("RETR 1234567890", POP3_ERR_SYNTAX, POP3_RETR);
    ERR("RETR -1", POP3_ERR_SYNTAX, POP3_RETR);
    ERR("RETR +1", POP3_ERR_SYNTAX, POP3_RETR);
    ERR("RETR 1a", POP3_ERR_SYNTAX, POP3_RETR);
    ERR("RETR 0x10", POP3_ERR_SYNTAX, POP3_RETR);
    ERR("DELE one", POP3_ERR_SYNTAX, POP3_DELE);
    ERR("LIST x", POP3_ERR_SYNTAX, POP3_LIST);
    ERR("UIDL 1.0", POP3_ERR_SYNTAX, POP3_UIDL);
    ERR("TOP 1 -5", POP3_ERR_SYNTAX, POP3_TOP);
    ERR("TOP a 5", POP3_ERR_SYNTAX, POP3_TOP);
    /* USER and APOP arguments are not numbers: digits are just text there. */
    OK("USER 12345", POP3_USER, 1);

    CHECK(pop3_number("", 0) == 0, "%lu", pop3_number("", 0));
    CHECK(pop3_number(NULL, 0) == 0, "%lu", pop3_number(NULL, 0));
    CHECK(pop3_number("12x", 3) == 0, "%lu", pop3_number("12x", 3));
    CHECK(pop3_number("1234567890", 10) == 0, "%lu", pop3_number("1234567890", 10));
    CHECK(pop3_number("123456789", 9) == 123456789UL, "%lu", pop3_number("123456789", 9));
    CHECK(pop3_number("42xyz", 2) == 42, "%lu", pop3_number("42xyz", 2));
}

static void test_limits(void)
{
    char buf[POP3_LINE_MAX + 16];
    char arg41[42];
    memset(arg41, 'a', 41);
    arg41[41] = 0;

    /* RFC 1939 §3: 40 octets per argument. */
    strcpy(buf, "USER ");
    strncat(buf, arg41, 40);
    OK(buf, POP3_USER, 1);
    CHECK(cmd.arg_len[0] == 40, "%zu", cmd.arg_len[0]);
    strcpy(buf, "USER ");
    strcat(buf, arg41);
    ERR(buf, POP3_ERR_SYNTAX, POP3_USER);
    strcpy(buf, "APOP x ");
    strcat(buf, arg41);
    ERR(buf, POP3_ERR_SYNTAX, POP3_APOP);

    /* PASS and AUTH rest are exempt. */
    strcpy(buf, "PASS ");
    strcat(buf, arg41);
    strcat(buf, arg41);
    OK(buf, POP3_PASS, 1);
    CHECK(cmd.rest_len == 82, "%zu", cmd.rest_len);
    strcpy(buf, "AUTH PLAIN ");
    strcat(buf, arg41);
    strcat(buf, arg41);
    OK(buf, POP3_AUTH, 2);
    CHECK(cmd.arg_len[1] == 82, "%zu", cmd.arg_len[1]);

    /* RFC 2449 §4: 255 octets with CRLF, so 253 without. */
    memset(buf, 0, sizeof buf);
    memcpy(buf, "PASS ", 5);
    memset(buf + 5, 'p', sizeof buf - 6);
    CHECK(parse_n(buf, POP3_LINE_MAX - 2) == POP3_OK && cmd.rest_len == POP3_LINE_MAX - 7, "%zu",
          cmd.rest_len);
    CHECK(parse_n(buf, POP3_LINE_MAX - 1) == POP3_ERR_TOO_LONG && cmd.cmd == POP3_UNKNOWN && cmd.rest == NULL,
          "%d", cmd.cmd);
    CHECK(parse_n(buf, POP3_LINE_MAX) == POP3_ERR_TOO_LONG, "%d", cmd.cmd);
    CHECK(parse_n(buf, sizeof buf - 1) == POP3_ERR_TOO_LONG, "%d", cmd.cmd);
    /* TOO_LONG wins over everything else, even a NUL. */
    buf[7] = 0;
    CHECK(parse_n(buf, POP3_LINE_MAX - 1) == POP3_ERR_TOO_LONG, "%d", cmd.cmd);
    CHECK(parse_n(buf, POP3_LINE_MAX - 2) == POP3_ERR_SYNTAX && cmd.cmd == POP3_PASS, "%d", cmd.cmd);
    /* A long run of spaces is fine as long as the line fits. */
    memset(buf, ' ', sizeof buf);
    memcpy(buf, "QUIT", 4);
    CHECK(parse_n(buf, POP3_LINE_MAX - 2) == POP3_OK && cmd.cmd == POP3_QUIT, "%d", cmd.cmd);
}

static void test_control_bytes(void)
{
    /* The keyword runs to the first space, so these bytes are part of it. */
    CHECK(parse_n("QUIT\0", 5) == POP3_ERR_SYNTAX && cmd.cmd == POP3_UNKNOWN, "%d", cmd.cmd);
    CHECK(parse_n("QUIT \0", 6) == POP3_ERR_SYNTAX && cmd.cmd == POP3_QUIT, "%d", cmd.cmd);
    CHECK(parse_n("QU\0T", 4) == POP3_ERR_SYNTAX && cmd.cmd == POP3_UNKNOWN, "%d", cmd.cmd);
    CHECK(parse_n("\0", 1) == POP3_ERR_SYNTAX, "%d", cmd.cmd);
    CHECK(parse_n("USER a\0b", 8) == POP3_ERR_SYNTAX && cmd.nargs == 0, "%u", cmd.nargs);
    CHECK(parse_n("PASS a\0b", 8) == POP3_ERR_SYNTAX && cmd.rest == NULL, "%d", cmd.cmd);
    ERR("QUIT\r", POP3_ERR_SYNTAX, POP3_UNKNOWN);
    ERR("QUIT \r", POP3_ERR_SYNTAX, POP3_QUIT);
    ERR("USER a\rb", POP3_ERR_SYNTAX, POP3_USER);
    ERR("USER\ta", POP3_ERR_SYNTAX, POP3_UNKNOWN);
    ERR("USER a\tb", POP3_ERR_SYNTAX, POP3_USER);
    ERR("RETR 1\x7f", POP3_ERR_SYNTAX, POP3_RETR);
    ERR("NOOP \x1b[0m", POP3_ERR_SYNTAX, POP3_NOOP);
    ERR("AUTH PLAIN\tx", POP3_ERR_SYNTAX, POP3_AUTH);
    ERR("XYZW \x01", POP3_ERR_SYNTAX, POP3_UNKNOWN);
    ERR("PASS\tx", POP3_ERR_SYNTAX, POP3_UNKNOWN);
    /* TAB is allowed inside the PASS rest, nothing else is. */
    OK("PASS a\tb", POP3_PASS, 1);
    CHECK(rest_is("a\tb"), "%s", check_show(cmd.rest, cmd.rest_len));
    OK("PASS \t", POP3_PASS, 1);
    ERR("PASS a\nb", POP3_ERR_SYNTAX, POP3_PASS);
    ERR("PASS a\x7f", POP3_ERR_SYNTAX, POP3_PASS);
    /* Octets above 0x7f are not control characters: UTF-8 names pass. */
    OK("USER j\xc3\xbcrgen", POP3_USER, 1);
    OK("PASS p\xc3\xa4ss", POP3_PASS, 1);
}

static void test_framer(void)
{
    size_t ll = 99;
    CHECK(pop3_line_end("", 0, &ll) == 0 && ll == 0, "%zu", ll);
    ll = 99;
    CHECK(pop3_line_end("QUIT", 4, &ll) == 0 && ll == 0, "%zu", ll);
    CHECK(pop3_line_end("QUIT\r", 5, &ll) == 0, "%zu", ll);
    CHECK(pop3_line_end("QUIT\r\n", 6, &ll) == 6 && ll == 4, "%zu", ll);
    CHECK(pop3_line_end("QUIT\n", 5, &ll) == 5 && ll == 4, "%zu", ll);   /* bare LF */
    CHECK(pop3_line_end("\r\n", 2, &ll) == 2 && ll == 0, "%zu", ll);
    CHECK(pop3_line_end("\n", 1, &ll) == 1 && ll == 0, "%zu", ll);
    CHECK(pop3_line_end("A\rB\r\n", 5, &ll) == 5 && ll == 3, "%zu", ll);   /* inner CR stays */
    CHECK(pop3_line_end("A\r\r\n", 4, &ll) == 4 && ll == 2, "%zu", ll);
    /* Only the first line; the framer looks no further than n. */
    const char *two = "STAT\r\nLIST 1\r\nRETR";
    size_t n = strlen(two), off = 0, k;
    k = pop3_line_end(two, n, &ll);
    CHECK(k == 6 && ll == 4 && parse_n(two, ll) == POP3_OK && cmd.cmd == POP3_STAT, "%zu %zu", k, ll);
    off += k;
    k = pop3_line_end(two + off, n - off, &ll);
    CHECK(k == 8 && ll == 6 && parse_n(two + off, ll) == POP3_OK && cmd.cmd == POP3_LIST, "%zu %zu", k, ll);
    off += k;
    k = pop3_line_end(two + off, n - off, &ll);
    CHECK(k == 0 && ll == 0, "%zu %zu", k, ll);
    CHECK(pop3_line_end("QUIT\r\n", 3, &ll) == 0, "%zu", ll);
}

int main(void)
{
    test_every_command();
    test_names();
    test_case_and_unknown();
    test_spaces();
    test_arity();
    test_numbers();
    test_limits();
    test_control_bytes();
    test_framer();
    return check_summary();
}
