/* sources: csrc/smtp/parse.c */
/* libs: */
/* The SMTP grammar: line framing, command parsing, and the DATA scanner,
 * the latter checked against a byte-at-a-time model over every short input
 * and every split of the input into calls (SMTP smuggling lives there). */
#include "smtp/parse.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"
#include "fuzz/smtp_data_model.h"

#define S(lit) lit, sizeof(lit) - 1


static int mem_is(const char *p, size_t n, const char *lit)
{
    return p && n == strlen(lit) && memcmp(p, lit, n) == 0;
}

/* ---- line framing ---------------------------------------------------- */

static void line_case(const char *in, size_t n, size_t max,
                      enum smtp_line_result want, size_t want_len, size_t want_used)
{
    size_t len = 99, used = 99;
    enum smtp_line_result r = smtp_line_find(in, n, max, &len, &used);

    CHECK(r == want, "\"%s\" max %zu: result %d, want %d", check_show(in, n), max, r, want);
    if (r != SMTP_LINE_NEED_MORE && r != SMTP_LINE_TOO_LONG)
        CHECK(len == want_len, "\"%s\": line_len %zu, want %zu", check_show(in, n), len, want_len);
    if (r != SMTP_LINE_NEED_MORE)
        CHECK(used == want_used, "\"%s\": consumed %zu, want %zu", check_show(in, n), used, want_used);
}

static void test_line_find(void)
{
    line_case(S("QUIT\r\n"), 512, SMTP_LINE_OK, 4, 6);
    line_case(S("QUIT\r\nNOOP\r\n"), 512, SMTP_LINE_OK, 4, 6);
    line_case(S("\r\n"), 512, SMTP_LINE_OK, 0, 2);
    line_case(S(""), 512, SMTP_LINE_NEED_MORE, 0, 0);
    line_case(S("QUIT"), 512, SMTP_LINE_NEED_MORE, 0, 0);
    line_case(S("QUIT\r"), 512, SMTP_LINE_NEED_MORE, 0, 0);
    line_case(S("QUIT\n"), 512, SMTP_LINE_BARE_LF, 4, 5);
    line_case(S("\n"), 512, SMTP_LINE_BARE_LF, 0, 1);
    line_case(S("QU\rIT\r\n"), 512, SMTP_LINE_BARE_CR, 5, 7);
    line_case(S("\r\r\n"), 512, SMTP_LINE_BARE_CR, 1, 3);
    line_case(S("QU\rIT\n"), 512, SMTP_LINE_BARE_LF, 5, 6);
    /* max counts the CRLF: "abcd\r\n" is 6 octets. */
    line_case(S("abcd\r\n"), 6, SMTP_LINE_OK, 4, 6);
    line_case(S("abcde\r\n"), 6, SMTP_LINE_TOO_LONG, 0, 6);
    line_case(S("abcd\r"), 6, SMTP_LINE_NEED_MORE, 0, 0);
    line_case(S("abcdef"), 6, SMTP_LINE_TOO_LONG, 0, 6);
    /* Only the first max bytes may be dropped; the LF after them stays. */
    line_case(S("abcdefgh\r\nQUIT\r\n"), 6, SMTP_LINE_TOO_LONG, 0, 6);
    line_case(S("abcdefgh"), 6, SMTP_LINE_TOO_LONG, 0, 6);
}

/* ---- commands -------------------------------------------------------- */

static struct smtp_cmd cmd;

static enum smtp_parse_status parse(const char *s)
{
    return smtp_parse_command(s, strlen(s), &cmd);
}

static void status_case(const char *line, enum smtp_parse_status want,
                        enum smtp_verb want_verb)
{
    enum smtp_parse_status st = parse(line);

    CHECK(st == want, "\"%s\": status %d, want %d", check_show(line, strlen(line)), st, want);
    CHECK(cmd.verb == want_verb, "\"%s\": verb %d, want %d",
          check_show(line, strlen(line)), cmd.verb, want_verb);
    if (st != SMTP_PARSE_OK)
        CHECK(cmd.nparams == 0 && cmd.addr == NULL,
              "\"%s\": failed parse left addr/params behind", line);
}

static void test_verbs(void)
{
    static const struct { const char *line; enum smtp_verb verb; } ok[] = {
        { "HELO mail.example.org", SMTP_VERB_HELO },
        { "helo x", SMTP_VERB_HELO },
        { "EHLO [192.0.2.1]", SMTP_VERB_EHLO },
        { "eHlO client", SMTP_VERB_EHLO },
        { "MAIL FROM:<a@b>", SMTP_VERB_MAIL },
        { "mail from:<a@b>", SMTP_VERB_MAIL },
        { "RCPT TO:<a@b>", SMTP_VERB_RCPT },
        { "Rcpt To:<a@b>", SMTP_VERB_RCPT },
        { "DATA", SMTP_VERB_DATA },
        { "data", SMTP_VERB_DATA },
        { "DATA ", SMTP_VERB_DATA },
        { "BDAT 100", SMTP_VERB_BDAT },
        { "BDAT 0 LAST", SMTP_VERB_BDAT },
        { "RSET", SMTP_VERB_RSET },
        { "NOOP", SMTP_VERB_NOOP },
        { "NOOP anything at all", SMTP_VERB_NOOP },
        { "QUIT", SMTP_VERB_QUIT },
        { "quit", SMTP_VERB_QUIT },
        { "VRFY postmaster", SMTP_VERB_VRFY },
        { "EXPN list", SMTP_VERB_EXPN },
        { "HELP", SMTP_VERB_HELP },
        { "HELP MAIL", SMTP_VERB_HELP },
        { "STARTTLS", SMTP_VERB_STARTTLS },
        { "StartTLS", SMTP_VERB_STARTTLS },
        { "AUTH PLAIN", SMTP_VERB_AUTH },
        { "AUTH PLAIN AGFsaWNlAHNlY3JldA==", SMTP_VERB_AUTH },
        { "AUTH LOGIN =", SMTP_VERB_AUTH },
        { "auth cram-md5", SMTP_VERB_AUTH },
        { "AUTH SCRAM-SHA-256  biwsbj11c2VyLHI9ZnlrbytkMmxiYkZnT05Sdjlxa3hkYXdM", SMTP_VERB_AUTH },
    };
    for (size_t i = 0; i < sizeof ok / sizeof ok[0]; i++)
        status_case(ok[i].line, SMTP_PARSE_OK, ok[i].verb);

    status_case("", SMTP_PARSE_UNKNOWN, SMTP_VERB_UNKNOWN);
    status_case("FOO", SMTP_PARSE_UNKNOWN, SMTP_VERB_UNKNOWN);
    status_case("QUITX", SMTP_PARSE_UNKNOWN, SMTP_VERB_UNKNOWN);
    status_case("QUI", SMTP_PARSE_UNKNOWN, SMTP_VERB_UNKNOWN);
    status_case(" QUIT", SMTP_PARSE_UNKNOWN, SMTP_VERB_UNKNOWN);
    status_case("MAIL:FROM:<a@b>", SMTP_PARSE_UNKNOWN, SMTP_VERB_UNKNOWN);
    status_case("STARTTL", SMTP_PARSE_UNKNOWN, SMTP_VERB_UNKNOWN);
    status_case("STARTTLSS", SMTP_PARSE_UNKNOWN, SMTP_VERB_UNKNOWN);
    status_case("GET / HTTP/1.1", SMTP_PARSE_UNKNOWN, SMTP_VERB_UNKNOWN);
    /* Lower-casing by OR 0x20 must not turn non-letters into letters. */
    status_case("QU\x09T", SMTP_PARSE_UNKNOWN, SMTP_VERB_UNKNOWN);
    status_case("Q\xd5IT", SMTP_PARSE_UNKNOWN, SMTP_VERB_UNKNOWN);

    /* No-argument verbs with something after them. */
    status_case("DATA x", SMTP_PARSE_SYNTAX, SMTP_VERB_DATA);
    status_case("RSET now", SMTP_PARSE_SYNTAX, SMTP_VERB_RSET);
    status_case("QUIT bye", SMTP_PARSE_SYNTAX, SMTP_VERB_QUIT);
    status_case("STARTTLS please", SMTP_PARSE_SYNTAX, SMTP_VERB_STARTTLS);
    /* Verbs that need one, without it. */
    status_case("HELO", SMTP_PARSE_SYNTAX, SMTP_VERB_HELO);
    status_case("EHLO", SMTP_PARSE_SYNTAX, SMTP_VERB_EHLO);
    status_case("EHLO   ", SMTP_PARSE_SYNTAX, SMTP_VERB_EHLO);
    status_case("MAIL", SMTP_PARSE_SYNTAX, SMTP_VERB_MAIL);
    status_case("RCPT", SMTP_PARSE_SYNTAX, SMTP_VERB_RCPT);
    status_case("BDAT", SMTP_PARSE_SYNTAX, SMTP_VERB_BDAT);
    status_case("VRFY", SMTP_PARSE_SYNTAX, SMTP_VERB_VRFY);
    status_case("EXPN", SMTP_PARSE_SYNTAX, SMTP_VERB_EXPN);
    status_case("AUTH", SMTP_PARSE_SYNTAX, SMTP_VERB_AUTH);
    /* AUTH shape. */
    status_case("AUTH PLAIN abc def", SMTP_PARSE_SYNTAX, SMTP_VERB_AUTH);
    status_case("AUTH PL*AIN", SMTP_PARSE_SYNTAX, SMTP_VERB_AUTH);
    status_case("AUTH ABCDEFGHIJKLMNOPQRSTU", SMTP_PARSE_SYNTAX, SMTP_VERB_AUTH);
    status_case("AUTH PLAIN ab\x01", SMTP_PARSE_SYNTAX, SMTP_VERB_AUTH);
    /* Control characters in free text. */
    status_case("EHLO a\x01", SMTP_PARSE_SYNTAX, SMTP_VERB_EHLO);
    status_case("HELO a\tb", SMTP_PARSE_SYNTAX, SMTP_VERB_HELO);
    status_case("NOOP \x7f", SMTP_PARSE_SYNTAX, SMTP_VERB_NOOP);
    {
        static const char nul[] = "EHLO a\0b";
        CHECK(smtp_parse_command(nul, sizeof nul - 1, &cmd) == SMTP_PARSE_SYNTAX,
              "NUL in EHLO argument accepted");
        static const char nulverb[] = "QU\0T";
        CHECK(smtp_parse_command(nulverb, sizeof nulverb - 1, &cmd) == SMTP_PARSE_UNKNOWN,
              "NUL in verb accepted");
    }

    /* The argument is trimmed of spaces on both sides. */
    CHECK(parse("EHLO   client.example   ") == SMTP_PARSE_OK &&
          mem_is(cmd.arg, cmd.arg_len, "client.example"),
          "arg \"%s\"", check_show(cmd.arg, cmd.arg_len));
    CHECK(parse("BDAT 512 LAST") == SMTP_PARSE_OK && mem_is(cmd.arg, cmd.arg_len, "512 LAST"),
          "arg \"%s\"", check_show(cmd.arg, cmd.arg_len));
    CHECK(parse("AUTH PLAIN AGFsaWNlAHNlY3JldA==") == SMTP_PARSE_OK &&
          mem_is(cmd.arg, cmd.arg_len, "PLAIN AGFsaWNlAHNlY3JldA=="),
          "arg \"%s\"", check_show(cmd.arg, cmd.arg_len));
    CHECK(parse("QUIT") == SMTP_PARSE_OK && cmd.arg_len == 0 && cmd.addr == NULL &&
          cmd.nparams == 0, "QUIT fields");
    CHECK(parse("EHLO x") == SMTP_PARSE_OK && cmd.addr == NULL && cmd.nparams == 0,
          "EHLO must not set addr or params");
    /* The verb is known even when the arguments are wrong. */
    CHECK(parse("RCPT TO:<>") == SMTP_PARSE_BAD_ADDR && cmd.verb == SMTP_VERB_RCPT, "verb");
}

/* Parse a MAIL/RCPT line and check its address (NULL: want a failure). */
static void addr_case(const char *line, enum smtp_parse_status want, const char *want_addr)
{
    enum smtp_parse_status st = parse(line);

    CHECK(st == want, "\"%s\": status %d, want %d", check_show(line, strlen(line)), st, want);
    if (st == SMTP_PARSE_OK && want_addr)
        CHECK(mem_is(cmd.addr, cmd.addr_len, want_addr), "\"%s\": addr \"%s\", want \"%s\"",
              check_show(line, strlen(line)), check_show(cmd.addr, cmd.addr_len), want_addr);
}

static void test_paths(void)
{
    addr_case("MAIL FROM:<user@example.org>", SMTP_PARSE_OK, "user@example.org");
    addr_case("MAIL FROM: <user@example.org>", SMTP_PARSE_OK, "user@example.org");
    addr_case("MAIL FROM:   <user@example.org>", SMTP_PARSE_OK, "user@example.org");
    addr_case("MAIL FROM:<user@example.org>   ", SMTP_PARSE_OK, "user@example.org");
    addr_case("RCPT TO:<first.last+tag@sub.example.org>", SMTP_PARSE_OK,
              "first.last+tag@sub.example.org");
    addr_case("RCPT TO:<a!#$%&'*+-/=?^_`{|}~@x>", SMTP_PARSE_OK, "a!#$%&'*+-/=?^_`{|}~@x");
    addr_case("RCPT TO:<user@[192.0.2.1]>", SMTP_PARSE_OK, "user@[192.0.2.1]");
    addr_case("RCPT TO:<user@[IPv6:2001:db8::1]>", SMTP_PARSE_OK, "user@[IPv6:2001:db8::1]");
    addr_case("RCPT TO:<Postmaster>", SMTP_PARSE_OK, "Postmaster");
    addr_case("RCPT TO:<host_name@under_score.example>", SMTP_PARSE_OK,
              "host_name@under_score.example");

    /* Null reverse-path. */
    CHECK(parse("MAIL FROM:<>") == SMTP_PARSE_OK && cmd.addr_len == 0 && cmd.addr != NULL &&
          cmd.nparams == 0, "null path");
    CHECK(parse("MAIL FROM:<> SIZE=0") == SMTP_PARSE_OK && cmd.addr_len == 0 &&
          cmd.nparams == 1, "null path with a parameter");
    addr_case("MAIL FROM: <>", SMTP_PARSE_OK, "");
    /* A forward-path is never null (RFC 5321 §4.1.1.3). */
    addr_case("RCPT TO:<>", SMTP_PARSE_BAD_ADDR, NULL);

    /* Source routes are accepted and dropped (RFC 5321 §4.1.2, appendix C). */
    addr_case("RCPT TO:<@a,@b:user@d>", SMTP_PARSE_OK, "user@d");
    addr_case("RCPT TO:<@relay.example:user@d>", SMTP_PARSE_OK, "user@d");
    addr_case("MAIL FROM:<@[192.0.2.1],@b.example:user@d>", SMTP_PARSE_OK, "user@d");
    addr_case("MAIL FROM:<@[IPv6:::1]:user@d>", SMTP_PARSE_OK, "user@d");
    addr_case("RCPT TO:<@a,@b:\"john doe\"@d>", SMTP_PARSE_OK, "\"john doe\"@d");
    addr_case("RCPT TO:<@a:>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("RCPT TO:<@a>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("RCPT TO:<@a,b:user@d>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("RCPT TO:<@:user@d>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("RCPT TO:<@a,:user@d>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("RCPT TO:<@a @b:user@d>", SMTP_PARSE_BAD_ADDR, NULL);

    /* Quoted local parts, kept as written. */
    addr_case("RCPT TO:<\"john doe\"@x>", SMTP_PARSE_OK, "\"john doe\"@x");
    addr_case("RCPT TO:<\"a>b\"@x>", SMTP_PARSE_OK, "\"a>b\"@x");
    addr_case("RCPT TO:<\"a@b\"@x>", SMTP_PARSE_OK, "\"a@b\"@x");
    addr_case("RCPT TO:<\"a\\\"b\"@x>", SMTP_PARSE_OK, "\"a\\\"b\"@x");
    addr_case("RCPT TO:<\"a\\\\\"@x>", SMTP_PARSE_OK, "\"a\\\\\"@x");
    addr_case("RCPT TO:<\"\"@x>", SMTP_PARSE_OK, "\"\"@x");
    addr_case("RCPT TO:<\"jo\xc3\xabl\"@x>", SMTP_PARSE_OK, "\"jo\xc3\xabl\"@x");
    addr_case("RCPT TO:<\"unterminated@x>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("RCPT TO:<\"a\tb\"@x>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("RCPT TO:<\"a\\\x01\"@x>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("RCPT TO:<a\"b\"@x>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("RCPT TO:<\"a\"b@x>", SMTP_PARSE_BAD_ADDR, NULL);

    /* UTF-8 (RFC 6531) in both halves. */
    addr_case("RCPT TO:<j\xc3\xb8rn@b\xc3\xa6r.example>", SMTP_PARSE_OK,
              "j\xc3\xb8rn@b\xc3\xa6r.example");
    addr_case("MAIL FROM:<\xe7\x94\xa8\xe6\x88\xb7@\xe4\xbe\x8b\xe5\xad\x90.\xe5\xb9\xbf\xe5\x91\x8a> SMTPUTF8",
              SMTP_PARSE_OK, NULL);
    CHECK(cmd.nparams == 1 && smtp_param_is(&cmd.params[0], "SMTPUTF8"), "SMTPUTF8 param");

    /* Refused paths. */
    addr_case("MAIL FROM:a@b", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM: ", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a@b", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:a@b>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<<a@b>>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a@b>>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a<b@c>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a@b>x", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a@b>SIZE=1", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a b@c>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:< a@b>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a@b >", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a@b c>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a\x01@b>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a@b\x7f>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a\t@b>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a@b@c>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a@>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<@b>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a@b:c>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a@[1.2.3.4>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a@[]>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a@[1.2]x>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a@[1.2.3.4 ]>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a@[x>y]>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a@[x<y]>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a@[x\"y]>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<@[x>y]:a@b>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a@[tag-x:abc]>", SMTP_PARSE_OK, "a@[tag-x:abc]");
    addr_case("MAIL FROM:<a@[1[2]>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a@[1\\2]>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a@[1.2\x80]>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a(comment)@b>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a\\b@c>", SMTP_PARSE_BAD_ADDR, NULL);
    addr_case("MAIL FROM:<a,b@c>", SMTP_PARSE_BAD_ADDR, NULL);
    {
        static const char nul[] = "MAIL FROM:<a\0b@c>";
        CHECK(smtp_parse_command(nul, sizeof nul - 1, &cmd) == SMTP_PARSE_BAD_ADDR,
              "NUL in address accepted");
    }
    /* Keyword errors are syntax, not address errors. */
    addr_case("MAIL TO:<a@b>", SMTP_PARSE_SYNTAX, NULL);
    addr_case("MAIL FROM <a@b>", SMTP_PARSE_SYNTAX, NULL);
    addr_case("MAIL FROM :<a@b>", SMTP_PARSE_SYNTAX, NULL);
    addr_case("MAIL FRO", SMTP_PARSE_SYNTAX, NULL);
    addr_case("RCPT FROM:<a@b>", SMTP_PARSE_SYNTAX, NULL);
    addr_case("RCPT <a@b>", SMTP_PARSE_SYNTAX, NULL);
}

static void test_params(void)
{
    CHECK(parse("MAIL FROM:<a@b> SIZE=123 BODY=8BITMIME") == SMTP_PARSE_OK, "size/body");
    CHECK(mem_is(cmd.addr, cmd.addr_len, "a@b"), "addr");
    CHECK(cmd.nparams == 2, "nparams %u", cmd.nparams);
    CHECK(smtp_param_is(&cmd.params[0], "SIZE") && smtp_param_is(&cmd.params[0], "size") &&
          !smtp_param_is(&cmd.params[0], "SIZ") && !smtp_param_is(&cmd.params[0], "SIZES"),
          "param_is SIZE");
    CHECK(mem_is(cmd.params[0].val, cmd.params[0].val_len, "123"), "SIZE value");
    CHECK(smtp_param_is(&cmd.params[1], "BODY") &&
          mem_is(cmd.params[1].val, cmd.params[1].val_len, "8BITMIME"), "BODY value");

    CHECK(parse("RCPT TO:<a@b> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;a@b") == SMTP_PARSE_OK,
          "notify/orcpt");
    CHECK(cmd.nparams == 2 && smtp_param_is(&cmd.params[0], "notify") &&
          mem_is(cmd.params[0].val, cmd.params[0].val_len, "SUCCESS,FAILURE") &&
          smtp_param_is(&cmd.params[1], "ORCPT") &&
          mem_is(cmd.params[1].val, cmd.params[1].val_len, "rfc822;a@b"), "notify/orcpt values");

    /* Several spaces between, none-valued keys. */
    CHECK(parse("MAIL FROM:<a@b>   SMTPUTF8    BODY=8BITMIME  ") == SMTP_PARSE_OK &&
          cmd.nparams == 2 && smtp_param_is(&cmd.params[0], "SMTPUTF8") &&
          cmd.params[0].val == NULL && cmd.params[0].val_len == 0, "SMTPUTF8 no value");
    CHECK(parse("MAIL FROM:<a@b> AUTH=<>") == SMTP_PARSE_OK &&
          mem_is(cmd.params[0].val, cmd.params[0].val_len, "<>"), "AUTH=<>");
    CHECK(parse("MAIL FROM:<a@b> ENVID=QQ314159+2B2") == SMTP_PARSE_OK &&
          cmd.nparams == 1 && mem_is(cmd.params[0].key, cmd.params[0].key_len, "ENVID"), "ENVID");
    CHECK(parse("MAIL FROM:<a@b> X-UTF8=\xc3\xa9t\xc3\xa9") == SMTP_PARSE_OK, "UTF-8 value");

    static const char *bad[] = {
        "MAIL FROM:<a@b> SIZE=",
        "MAIL FROM:<a@b> =1",
        "MAIL FROM:<a@b> -SIZE=1",
        "MAIL FROM:<a@b> SI_ZE=1",
        "MAIL FROM:<a@b> SIZE=1=2",
        "MAIL FROM:<a@b> SIZE==1",
        "MAIL FROM:<a@b> SIZE=1\x01",
        "MAIL FROM:<a@b> SIZE=\x7f",
        "MAIL FROM:<a@b> SIZE=1\t",
        "RCPT TO:<a@b> NOTIFY=SUCCESS ,FAILURE",
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++)
        status_case(bad[i], SMTP_PARSE_SYNTAX, bad[i][0] == 'M' ? SMTP_VERB_MAIL : SMTP_VERB_RCPT);

    /* The limit: SMTP_MAX_PARAMS fit, one more does not. */
    char line[1024];
    size_t o = (size_t)sprintf(line, "MAIL FROM:<a@b>");
    for (int i = 0; i < SMTP_MAX_PARAMS; i++) o += (size_t)sprintf(line + o, " P%d=%d", i, i);
    CHECK(parse(line) == SMTP_PARSE_OK && cmd.nparams == SMTP_MAX_PARAMS, "%u params", cmd.nparams);
    CHECK(mem_is(cmd.params[SMTP_MAX_PARAMS - 1].key, cmd.params[SMTP_MAX_PARAMS - 1].key_len, "P15"),
          "last param key");
    sprintf(line + o, " X");
    status_case(line, SMTP_PARSE_TOO_MANY_PARAMS, SMTP_VERB_MAIL);
}

static void test_addr_helpers(void)
{
    CHECK(smtp_addr_at(S("user@example.org")) == 4, "at");
    CHECK(smtp_addr_at(S("postmaster")) == -1, "no at");
    CHECK(smtp_addr_at(S("\"a@b\"@x")) == 5, "quoted at");
    CHECK(smtp_addr_at(S("\"a\\\"@b\"@x")) == 7, "quoted escaped at");
    CHECK(smtp_addr_at(S("\"a@b\"")) == -1, "quoted only");
    CHECK(smtp_addr_at(S("\"a@b")) == -1, "unterminated");
    CHECK(smtp_addr_at(S("\"a\\")) == -1, "trailing backslash");
    CHECK(smtp_addr_at(S("")) == -1, "empty");
    CHECK(smtp_addr_at(S("@x")) == 0, "leading at");
    CHECK(!smtp_addr_is_utf8(S("user@example.org")), "ascii");
    CHECK(smtp_addr_is_utf8(S("j\xc3\xb8rn@x")), "utf8");
    CHECK(smtp_addr_is_utf8(S("a@\x80")), "high byte");
    CHECK(!smtp_addr_is_utf8(S("")), "empty");

    /* On what the parser returns. */
    CHECK(parse("RCPT TO:<\"a@b\"@x.example>") == SMTP_PARSE_OK &&
          smtp_addr_at(cmd.addr, cmd.addr_len) == 5, "at on parsed address");
}

/* ---- DATA stream ------------------------------------------------------ */

/* The model: the rules of parse.h written out a byte at a time over the
 * whole input, with look-ahead instead of saved state. The scanner must
 * agree with it however the input is split. */
struct data_result {
    char out[4096];
    size_t out_n, used;
    uint32_t flags;
    int done;
};

static void model_scan(const char *in, size_t n, size_t max, struct data_result *r)
{
    memset(r, 0, sizeof *r);
    struct smtp_data_model m = {.out = r->out};
    smtp_data_model_scan(in, n, max, &m);
    r->out_n = m.out_n;
    r->used = m.used;
    r->flags = m.flags;
    r->done = m.done;
}

/* Feed in[0..n) to a fresh scanner in pieces cut at cuts[0..ncuts). */
static int feed(const char *in, size_t n, size_t max, const size_t *cuts, size_t ncuts,
                struct data_result *r)
{
    struct smtp_data_scan s;
    size_t pos = 0;
    char tmp[4096];

    memset(r, 0, sizeof *r);
    smtp_data_init(&s, max);
    for (size_t k = 0; k <= ncuts && !r->done; k++) {
        size_t end = k < ncuts ? cuts[k] : n;
        size_t len = end - pos, out_n = (size_t)-1;
        /* Exact-size copies so ASan sees any read or write past them. */
        char *piece = malloc(len ? len : 1), *out = malloc(len ? len : 1);
        memcpy(piece, in + pos, len);
        size_t used = smtp_data_scan(&s, piece, len, out, &out_n, &r->done);
        if (used > len || out_n > len || out_n > used || (!r->done && used != len)) {
            fprintf(stderr, "  piece [%zu,%zu): used %zu out_n %zu done %d\n",
                    pos, end, used, out_n, r->done);
            free(piece);
            free(out);
            return -1;
        }
        memcpy(tmp + r->out_n, out, out_n);
        r->out_n += out_n;
        r->used += used;
        free(piece);
        free(out);
        pos = end;
    }
    memcpy(r->out, tmp, r->out_n);
    r->flags = s.flags;
    return 0;
}

static int same(const struct data_result *a, const struct data_result *b)
{
    return a->out_n == b->out_n && memcmp(a->out, b->out, a->out_n) == 0 &&
           a->used == b->used && a->flags == b->flags && a->done == b->done;
}

static void report(const char *what, const char *in, size_t n, size_t max,
                   const struct data_result *got, const struct data_result *want)
{
    fprintf(stderr, "  %s: in \"%s\" max %zu\n", what, check_show(in, n), max);
    fprintf(stderr, "    got  out \"%s\" used %zu flags %u done %d\n",
            check_show(got->out, got->out_n), got->used, got->flags, got->done);
    fprintf(stderr, "    want out \"%s\" used %zu flags %u done %d\n",
            check_show(want->out, want->out_n), want->used, want->flags, want->done);
}

/* Whole, at every single cut, at every pair of cuts (short inputs), and a
 * byte at a time; all must give the model's answer. Returns mismatches. */
static int check_all_splits(const char *in, size_t n, size_t max, int pairs)
{
    struct data_result want, got;
    size_t cuts[4096];
    int bad = 0;

    model_scan(in, n, max, &want);
    if (feed(in, n, max, NULL, 0, &got) < 0 || !same(&got, &want)) {
        report("whole", in, n, max, &got, &want);
        bad++;
    }
    for (size_t c = 0; c <= n && bad < 3; c++) {
        cuts[0] = c;
        if (feed(in, n, max, cuts, 1, &got) < 0 || !same(&got, &want)) {
            fprintf(stderr, "  cut at %zu\n", c);
            report("split", in, n, max, &got, &want);
            bad++;
        }
    }
    for (size_t c = 0; pairs && c <= n && bad < 3; c++) {
        for (size_t d = c; d <= n && bad < 3; d++) {
            cuts[0] = c;
            cuts[1] = d;
            if (feed(in, n, max, cuts, 2, &got) < 0 || !same(&got, &want)) {
                fprintf(stderr, "  cuts at %zu, %zu\n", c, d);
                report("split2", in, n, max, &got, &want);
                bad++;
            }
        }
    }
    for (size_t c = 0; c < n; c++) cuts[c] = c + 1;
    if (bad < 3 && (feed(in, n, max, cuts, n ? n - 1 : 0, &got) < 0 || !same(&got, &want))) {
        report("bytewise", in, n, max, &got, &want);
        bad++;
    }
    return bad;
}

/* One DATA case: scanning `in` must give `out`, `flags`, end or not, and
 * consume `used` bytes (0: all of it); then the same at every split. */
static void data_case(const char *in, size_t n, size_t max, const char *want_out,
                      uint32_t want_flags, int want_done, size_t want_used)
{
    struct data_result got;

    if (want_used == 0) want_used = n;
    CHECK(feed(in, n, max, NULL, 0, &got) == 0, "\"%s\": bounds", check_show(in, n));
    CHECK(mem_is(got.out, got.out_n, want_out), "\"%s\": out \"%s\", want \"%s\"",
          check_show(in, n), check_show(got.out, got.out_n), check_show(want_out, strlen(want_out)));
    CHECK(got.flags == want_flags, "\"%s\": flags %u, want %u", check_show(in, n), got.flags, want_flags);
    CHECK(got.done == want_done, "\"%s\": done %d, want %d", check_show(in, n), got.done, want_done);
    CHECK(got.used == want_used, "\"%s\": used %zu, want %zu", check_show(in, n), got.used, want_used);
    CHECK(check_all_splits(in, n, max, n <= 64) == 0, "\"%s\": splits disagree", check_show(in, n));
}

#define LF SMTP_DATA_BARE_LF
#define CR SMTP_DATA_BARE_CR
#define LONG SMTP_DATA_LONG_LINE

static void test_data_basic(void)
{
    data_case(S("Subject: x\r\n\r\nbody\r\n.\r\n"), 998,
              "Subject: x\r\n\r\nbody\r\n", 0, 1, 0);
    data_case(S(".\r\n"), 998, "", 0, 1, 0);
    data_case(S("\r\n.\r\n"), 998, "\r\n", 0, 1, 0);
    data_case(S("a\r\n"), 998, "a\r\n", 0, 0, 0);
    data_case(S(""), 998, "", 0, 0, 0);
    /* Dot-unstuffing (RFC 5321 §4.5.2). */
    data_case(S("..\r\n.\r\n"), 998, ".\r\n", 0, 1, 0);
    data_case(S("a\r\n..b\r\n...\r\n.x\r\n.\r\n"), 998, "a\r\n.b\r\n..\r\nx\r\n", 0, 1, 0);
    data_case(S("a.\r\nb..\r\n.\r\n"), 998, "a.\r\nb..\r\n", 0, 1, 0);
    data_case(S(". \r\n.\r\n"), 998, " \r\n", 0, 1, 0);
    /* Pipelined commands after the end are not consumed. */
    data_case(S("a\r\n.\r\nQUIT\r\n"), 998, "a\r\n", 0, 1, 6);
    data_case(S(".\r\n.\r\n"), 998, "", 0, 1, 3);
    /* Binary and NUL bytes pass through. */
    data_case(S("\x01\xff\x80\x7f\r\n.\r\n"), 998, "\x01\xff\x80\x7f\r\n", 0, 1, 0);
    {
        static const char in[] = "a\0b\r\n.\r\n";
        struct data_result got;
        feed(in, sizeof in - 1, 998, NULL, 0, &got);
        CHECK(got.done && got.out_n == 5 && memcmp(got.out, "a\0b\r\n", 5) == 0, "NUL kept");
    }
}

static void test_data_smuggling(void)
{
    /* Everything that some MTA has been seen to take as an end of data and
     * that is not CRLF "." CRLF must end nothing and be flagged. */
    data_case(S("a\n.\r\nb\r\n"), 998, "a\n.\r\nb\r\n", LF, 0, 0);
    data_case(S("a\r.\r\nb\r\n"), 998, "a\r.\r\nb\r\n", CR, 0, 0);
    data_case(S("a\n.\nb\r\n"), 998, "a\n.\nb\r\n", LF, 0, 0);
    data_case(S("a\r.\rb\r\n"), 998, "a\r.\rb\r\n", CR, 0, 0);
    data_case(S("a\r\n.\nb\r\n"), 998, "a\r\n\nb\r\n", LF, 0, 0);
    data_case(S("a\r\n.\rb\r\n"), 998, "a\r\nb\r\n", CR, 0, 0);
    data_case(S("a\r\n.\r.\r\n"), 998, "a\r\n.\r\n", CR, 0, 0);
    data_case(S("a\r\n.\r\r\n"), 998, "a\r\n\r\n", CR, 0, 0);
    data_case(S("\n.\r\n"), 998, "\n.\r\n", LF, 0, 0);
    data_case(S("\r.\r\n"), 998, "\r.\r\n", CR, 0, 0);
    data_case(S("\n.\n"), 998, "\n.\n", LF, 0, 0);
    data_case(S(".\n"), 998, "\n", LF, 0, 0);
    data_case(S(".\r"), 998, "", 0, 0, 0);
    data_case(S("a\r\n.\n\r\n"), 998, "a\r\n\n\r\n", LF, 0, 0);
    data_case(S("a\n\n.\n\n"), 998, "a\n\n.\n\n", LF, 0, 0);
    data_case(S("a\r\r\n"), 998, "a\r\r\n", CR, 0, 0);
    data_case(S("a\r\n\r.\r\n\n.\n"), 998, "a\r\n\r.\r\n\n.\n", CR | LF, 0, 0);
    /* A bare LF is not a line end, so no unstuffing after it either. */
    data_case(S("a\n..\r\n"), 998, "a\n..\r\n", LF, 0, 0);
    /* Flags stay once set, and a real end later still ends. */
    data_case(S("a\nb\r\n.\r\n"), 998, "a\nb\r\n", LF, 1, 0);
    data_case(S("a\rb\r\n.\r\n"), 998, "a\rb\r\n", CR, 1, 0);
    data_case(S("a\n\r\n.\r\n"), 998, "a\n\r\n", LF, 1, 0);
    data_case(S("a\r\r\n.\r\n"), 998, "a\r\r\n", CR, 1, 0);
    data_case(S("x\r\n.\r\r\n.\r\nQUIT\r\n"), 998, "x\r\n\r\n", CR, 1, 10);
}

static void test_data_long_lines(void)
{
    /* max_line excludes CRLF; the stuffing dot counts (it is on the wire). */
    data_case(S("0123456789\r\n.\r\n"), 10, "0123456789\r\n", 0, 1, 0);
    data_case(S("0123456789A\r\n.\r\n"), 10, "0123456789A\r\n", LONG, 1, 0);
    data_case(S("..23456789\r\n.\r\n"), 10, ".23456789\r\n", 0, 1, 0);
    data_case(S("..234567890\r\n.\r\n"), 10, ".234567890\r\n", LONG, 1, 0);
    /* The count restarts on every line. */
    data_case(S("0123456789\r\n0123456789\r\n0123456789\r\n.\r\n"), 10,
              "0123456789\r\n0123456789\r\n0123456789\r\n", 0, 1, 0);
    /* Bare line ends do not restart it. */
    data_case(S("01234\n56789\r\n.\r\n"), 10, "01234\n56789\r\n", LF | LONG, 1, 0);
    data_case(S("0123\r456789\r\n.\r\n"), 10, "0123\r456789\r\n", CR | LONG, 1, 0);
    /* Scanning goes on after a long line. */
    data_case(S("0123456789ABCDEF\r\nx\r\n..y\r\n.\r\nQUIT\r\n"), 10,
              "0123456789ABCDEF\r\nx\r\n.y\r\n", LONG, 1, 29);
    /* Unterminated long line. */
    data_case(S("0123456789ABCDEF"), 10, "0123456789ABCDEF", LONG, 0, 0);
    /* 0: no limit. */
    data_case(S("0123456789ABCDEF\r\n.\r\n"), 0, "0123456789ABCDEF\r\n", 0, 1, 0);

    /* RFC 5321 §4.5.3.1.6: 998 octets and CRLF pass, 999 do not. */
    static char big[3000];
    struct data_result got;
    for (size_t len = 998; len <= 999; len++) {
        size_t o = 0;
        memcpy(big, "Subject: long\r\n\r\n", 17);
        o = 17;
        memset(big + o, 'x', len);
        o += len;
        memcpy(big + o, "\r\n.\r\n", 5);
        CHECK(feed(big, o + 5, 998, NULL, 0, &got) == 0 && got.done && got.out_n == o + 2 &&
              got.flags == (len > 998 ? (uint32_t)LONG : 0u),
              "%zu octets: flags %u", len, got.flags);
    }
}

static void test_data_after_done(void)
{
    struct smtp_data_scan s;
    char out[16];
    size_t out_n = 99;
    int done = 0;

    smtp_data_init(&s, 998);
    CHECK(smtp_data_scan(&s, S(".\r\nMAIL"), out, &out_n, &done) == 3 && done && out_n == 0,
          "end first");
    out_n = 99;
    done = 0;
    CHECK(smtp_data_scan(&s, S("MAIL"), out, &out_n, &done) == 0 && done && out_n == 0,
          "nothing after end");
    smtp_data_init(&s, 998);
    CHECK(s.flags == 0 && s.max_line == 998, "init");
    CHECK(smtp_data_scan(&s, NULL, 0, NULL, &out_n, &done) == 0 && !done && out_n == 0,
          "empty call");
}

/* Scanning into the input buffer itself must work (no overlap trouble). */
static void test_data_in_place(void)
{
    char buf[] = "a\r\n..b\r\n..\r\nc\r\n.\r\nQUIT\r\n";
    struct smtp_data_scan s;
    size_t out_n;
    int done;

    smtp_data_init(&s, 998);
    size_t used = smtp_data_scan(&s, buf, sizeof buf - 1, buf, &out_n, &done);
    CHECK(done && used == 18 && mem_is(buf, out_n, "a\r\n.b\r\n.\r\nc\r\n"),
          "in place: \"%s\" used %zu", check_show(buf, out_n), used);
}

/* Every string up to length 8 over the bytes that matter, every split;
 * then longer pseudo-random strings. */
static void test_data_exhaustive(void)
{
    static const char alpha[] = { '.', '\r', '\n', 'a' };
    char in[64];
    int bad = 0;
    long count = 0;

    for (size_t len = 0; len <= 8 && bad < 3; len++) {
        size_t total = 1;
        for (size_t k = 0; k < len; k++) total *= 4;
        for (size_t v = 0; v < total && bad < 3; v++) {
            size_t x = v;
            for (size_t k = 0; k < len; k++, x /= 4) in[k] = alpha[x & 3];
            /* pairs of cuts only for the shorter ones: the cost is n^2 */
            bad += check_all_splits(in, len, 3, len <= 6);
            count++;
        }
    }
    CHECK(bad == 0, "%d mismatches in %ld exhaustive inputs", bad, count);

    uint64_t seed = 0x9e3779b97f4a7c15u;
    static char big[2048];
    bad = 0;
    for (int round = 0; round < 400 && bad < 3; round++) {
        size_t n = 0, target = (size_t)(round * 5 % 2048);
        while (n < target) {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            unsigned r = (unsigned)(seed >> 32);
            /* mostly CRLF-terminated text, with the odd dangerous byte */
            if (r % 9 == 0) big[n++] = '\r';
            else if (r % 9 == 1) big[n++] = '\n';
            else if (r % 9 == 2 && n + 2 <= target) { big[n++] = '\r'; big[n++] = '\n'; }
            else if (r % 9 == 3) big[n++] = '.';
            else if (r % 37 == 4 && n + 5 <= target) memcpy(big + n, "\r\n.\r\n", 5), n += 5;
            else big[n++] = (char)('a' + r % 26);
        }
        bad += check_all_splits(big, n, 7 + round % 20, 0);
    }
    CHECK(bad == 0, "%d mismatches in random inputs", bad);
}

int main(void)
{
    test_line_find();
    test_verbs();
    test_paths();
    test_params();
    test_addr_helpers();
    test_data_basic();
    test_data_smuggling();
    test_data_long_lines();
    test_data_after_done();
    test_data_in_place();
    test_data_exhaustive();

    return check_summary();
}
