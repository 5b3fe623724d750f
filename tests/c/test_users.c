/* sources: csrc/store/users.c csrc/store/maildir.c csrc/core/fsutil.c */
/* libs: -lcrypto -lcrypt */
/* Password hashes (our PBKDF2 output, passlib's, crypt(3) SHA-512 as Dovecot
 * stores it, {PLAIN}) and the user table. */
#include "store/users.h"

#include <crypt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "check.h"

/* passlib 1.7: pbkdf2_sha256.using(rounds=1000, salt=b'0123456789abcdef').hash('pw') */
static const char PASSLIB_PW[] =
    "$pbkdf2-sha256$1000$MDEyMzQ1Njc4OWFiY2RlZg$g4BiOBrcHGnGTAdCcoA.WrLOFA69L2c9HA5vVpt2o7A";
/* passlib 1.7: rounds=29000, salt=b'\xff\xfe\xfd\x00\x01abcdefghijk', password
 * "p\u00e4ss w0rd" (UTF-8); its salt has '/' in the encoding. */
static const char PASSLIB_UTF8[] =
    "$pbkdf2-sha256$29000$//79AAFhYmNkZWZnaGlqaw$Rb1nob6oAY.t82ETUaN50p6vR0fDz2qUtjv.XGjxEmo";
/* Python's crypt.crypt('secret', '$6$saltsalt$') */
static const char SHA512_SECRET[] =
    "$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq."
    "H91p5hVO1";
/* Python's crypt.crypt('secret', '$6$rounds=10000$saltsalt$') */
static const char SHA512_ROUNDS[] =
    "$6$rounds=10000$saltsalt$WowrPBpEDVlCoruBosYlrZycTCx3//"
    "TyDHYqEhX9DUHHt0XTztUqzQDDUuvUGRA8aUe9p55hcAxeGcu58sm3u.";

static int ab64_chars(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!strchr("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789./", s[i]) ||
            s[i] == '\0')
            return 0;
    return 1;
}

static void test_pbkdf2_roundtrip(void)
{
    char h[200];
    CHECK(users_hash_password("correct horse", 1000, h, sizeof h) == 0, "hash");
    /* $pbkdf2-sha256$1000$<22>$<43> */
    const char *pre = "$pbkdf2-sha256$1000$";
    CHECK(strncmp(h, pre, strlen(pre)) == 0, "prefix %s", h);
    const char *salt = h + strlen(pre);
    const char *d = strchr(salt, '$');
    CHECK(d != NULL && d - salt == 22 && ab64_chars(salt, 22), "salt %s", h);
    CHECK(d != NULL && strlen(d + 1) == 43 && ab64_chars(d + 1, 43), "hash %s", h);
    CHECK(users_hash_is_known(h) == 1, "known");
    CHECK(users_verify_password(h, "correct horse") == 1, "match");
    CHECK(users_verify_password(h, "correct horsf") == 0, "wrong");
    CHECK(users_verify_password(h, "") == 0, "empty");
    CHECK(users_verify_password(h, "correct horse ") == 0, "longer");

    char h2[200];
    CHECK(users_hash_password("correct horse", 1000, h2, sizeof h2) == 0 && strcmp(h, h2) != 0,
          "salted: two hashes differ");

    /* Default rounds. */
    CHECK(users_hash_password("pw", 0, h, sizeof h) == 0 &&
              strncmp(h, "$pbkdf2-sha256$210000$", 22) == 0,
          "default rounds %s", h);
    CHECK(users_verify_password(h, "pw") == 1, "default verify");

    /* Too small a buffer: -1 and the buffer untouched. */
    char small[40];
    memset(small, 'Z', sizeof small);
    CHECK(users_hash_password("pw", 1000, small, sizeof small) == -1, "small buffer");
    CHECK(small[0] == 'Z' && small[39] == 'Z', "untouched");
    /* Exactly enough: 20 + 22 + 1 + 43 characters and a NUL. */
    char exact[87];
    CHECK(users_hash_password("pw", 1000, exact, sizeof exact) == 0, "exact buffer");
    CHECK(users_hash_password("pw", 1000, exact, sizeof exact - 1) == -1, "one short");

    /* The Dovecot-style scheme prefix. */
    char pref[220];
    snprintf(pref, sizeof pref, "{PBKDF2-SHA256}%s", exact);
    CHECK(users_hash_is_known(pref) == 1 && users_verify_password(pref, "pw") == 1, "prefixed");
}

static void test_passlib(void)
{
    CHECK(users_hash_is_known(PASSLIB_PW) == 1, "passlib known");
    CHECK(users_verify_password(PASSLIB_PW, "pw") == 1, "passlib pw");
    CHECK(users_verify_password(PASSLIB_PW, "pW") == 0, "passlib wrong");
    CHECK(users_verify_password(PASSLIB_UTF8, "p\xc3\xa4ss w0rd") == 1, "passlib utf8");
    CHECK(users_verify_password(PASSLIB_UTF8, "pass w0rd") == 0, "passlib utf8 wrong");
    /* A changed checksum character (not the last: its low bits are unused
     * padding, so 'A' and 'B' there decode alike). */
    char bad[sizeof PASSLIB_PW];
    memcpy(bad, PASSLIB_PW, sizeof bad);
    bad[sizeof bad - 10] = bad[sizeof bad - 10] == 'A' ? 'B' : 'A';
    CHECK(users_verify_password(bad, "pw") == 0, "tampered");
}

static void test_sha512_crypt(void)
{
    CHECK(users_hash_is_known(SHA512_SECRET) == 1, "vector known");
    CHECK(users_verify_password(SHA512_SECRET, "secret") == 1, "vector match");
    CHECK(users_verify_password(SHA512_SECRET, "Secret") == 0, "vector wrong");
    CHECK(users_verify_password(SHA512_ROUNDS, "secret") == 1, "rounds vector");
    CHECK(users_verify_password(SHA512_ROUNDS, "secreT") == 0, "rounds wrong");

    char pref[200];
    snprintf(pref, sizeof pref, "{SHA512-CRYPT}%s", SHA512_SECRET);
    CHECK(users_verify_password(pref, "secret") == 1, "prefixed");
    snprintf(pref, sizeof pref, "{sha512-crypt}%s", SHA512_ROUNDS);
    CHECK(users_verify_password(pref, "secret") == 1, "prefix any case");

    /* Hashes made here with crypt_r, as Dovecot's doveadm pw would. */
    static const char *settings[] = {"$6$Xy7./abcDEF0123$", "$6$rounds=1000$s$",
                                     "$6$rounds=2500$0123456789abcdef$"};
    for (size_t i = 0; i < sizeof settings / sizeof *settings; i++) {
        struct crypt_data *cd = calloc(1, sizeof *cd);
        if (cd == NULL) abort();
        const char *h = crypt_r("d0vec0t pa$$", settings[i], cd);
        CHECK(h != NULL && h[0] == '$', "crypt_r %s", settings[i]);
        if (h != NULL && h[0] == '$') {
            CHECK(users_hash_is_known(h) == 1, "known %s", h);
            CHECK(users_verify_password(h, "d0vec0t pa$$") == 1, "match %s", h);
            CHECK(users_verify_password(h, "d0vec0t pa$") == 0, "wrong %s", h);
        }
        free(cd);
    }
}

static void test_plain(void)
{
    CHECK(users_hash_is_known("{PLAIN}hunter2") == 1, "known");
    CHECK(users_verify_password("{PLAIN}hunter2", "hunter2") == 1, "match");
    CHECK(users_verify_password("{PLAIN}hunter2", "hunter") == 0, "prefix of it");
    CHECK(users_verify_password("{PLAIN}hunter2", "hunter22") == 0, "longer");
    CHECK(users_verify_password("{plain}x", "x") == 1, "scheme any case");
    CHECK(users_verify_password("{PLAIN}", "") == 1, "empty password");
    CHECK(users_verify_password("{PLAIN}", "a") == 0, "empty vs a");
}

static void test_unknown(void)
{
    static const char *bad[] = {
        "",
        "hunter2",
        "$1$saltsalt$abcdefghijklmnopqrstuv",            /* MD5-crypt */
        "$5$saltsalt$abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG", /* SHA256-crypt */
        "{SSHA}abcdef",
        "{CRYPT}$6$saltsalt$x",
        /* pbkdf2: zero-padded rounds, no rounds, zero rounds, huge rounds */
        "$pbkdf2-sha256$01000$MDEyMzQ1Njc4OWFiY2RlZg$g4BiOBrcHGnGTAdCcoA.WrLOFA69L2c9HA5vVpt2o7A",
        "$pbkdf2-sha256$$MDEyMzQ1Njc4OWFiY2RlZg$g4BiOBrcHGnGTAdCcoA.WrLOFA69L2c9HA5vVpt2o7A",
        "$pbkdf2-sha256$0$MDEyMzQ1Njc4OWFiY2RlZg$g4BiOBrcHGnGTAdCcoA.WrLOFA69L2c9HA5vVpt2o7A",
        "$pbkdf2-sha256$99999999999999999999$MDEyMzQ1Njc4OWFiY2RlZg$"
        "g4BiOBrcHGnGTAdCcoA.WrLOFA69L2c9HA5vVpt2o7A",
        "$pbkdf2-sha256$-5$MDEyMzQ1Njc4OWFiY2RlZg$g4BiOBrcHGnGTAdCcoA.WrLOFA69L2c9HA5vVpt2o7A",
        /* pbkdf2: '+' is not adapted base64, salt of impossible length,
         * short, long, and missing checksum, an extra field */
        "$pbkdf2-sha256$1000$MDEyMzQ1Njc4OWFiY2RlZg$g4BiOBrcHGnGTAdCcoA+WrLOFA69L2c9HA5vVpt2o7A",
        "$pbkdf2-sha256$1000$MDEyM$g4BiOBrcHGnGTAdCcoA.WrLOFA69L2c9HA5vVpt2o7A",
        "$pbkdf2-sha256$1000$MDEyMzQ1Njc4OWFiY2RlZg$g4BiOBrcHGnGTAdCcoA.WrLOFA69L2c9HA5vVpt2o7",
        "$pbkdf2-sha256$1000$MDEyMzQ1Njc4OWFiY2RlZg$g4BiOBrcHGnGTAdCcoA.WrLOFA69L2c9HA5vVpt2o7AA",
        "$pbkdf2-sha256$1000$MDEyMzQ1Njc4OWFiY2RlZg$",
        "$pbkdf2-sha256$1000$MDEyMzQ1Njc4OWFiY2RlZg",
        "$pbkdf2-sha256$1000$MDEy$MzQ1$g4BiOBrcHGnGTAdCcoA.WrLOFA69L2c9HA5vVpt2o7A",
        "$pbkdf2-sha256$1000$MDEyMzQ1Njc4OWFiY2RlZg$g4BiOBrcHGnGTAdCcoA.WrLOFA69L2c9HA5vVpt2o7A\n",
        "$pbkdf2-sha1$1000$MDEyMzQ1Njc4OWFiY2RlZg$g4BiOBrcHGnGTAdCcoA.WrLOFA69L2c9HA5vVpt2o7A",
        /* sha512-crypt: short hash, salt too long, bad rounds, rounds below
         * the minimum, bad character, missing salt separator */
        "$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.",
        "$6$saltsaltsaltsaltX$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y7"
        "7vwPZN.Pq.H91p5hVO1",
        "$6$rounds=abc$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0"
        "Y77vwPZN.Pq.H91p5hVO1",
        "$6$rounds=999$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0"
        "Y77vwPZN.Pq.H91p5hVO1",
        "$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq."
        "H91p5hVO+",
        "$6$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO1",
        /* a scheme that disagrees with the body */
        "{SHA512-CRYPT}$pbkdf2-sha256$1000$MDEyMzQ1Njc4OWFiY2RlZg$"
        "g4BiOBrcHGnGTAdCcoA.WrLOFA69L2c9HA5vVpt2o7A",
        "{PBKDF2-SHA256}$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc1E5n0U0aDehy0S5knV8wiOQ"
        "SpT0Y77vwPZN.Pq.H91p5hVO1",
    };
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        CHECK(users_hash_is_known(bad[i]) == 0, "#%zu known: %s", i, bad[i]);
        CHECK(users_verify_password(bad[i], "pw") == -1, "#%zu verify: %s", i, bad[i]);
        CHECK(users_verify_password(bad[i], "secret") == -1, "#%zu verify: %s", i, bad[i]);
    }
    CHECK(users_hash_is_known(NULL) == 0, "NULL");
    CHECK(users_verify_password(NULL, "x") == -1, "NULL stored");

    /* Absurd passwords are refused, not hashed. */
    char *huge = malloc(100001);
    if (huge == NULL) abort();
    memset(huge, 'a', 100000);
    huge[100000] = '\0';
    char h[200];
    CHECK(users_hash_password(huge, 1000, h, sizeof h) == -1, "huge password hash");
    CHECK(users_verify_password(SHA512_SECRET, huge) == 0, "huge password verify");
    free(huge);
}

static void test_table(void)
{
    struct users *u = users_new();
    CHECK(u != NULL, "new");
    if (u == NULL) return;
    CHECK(users_count(u) == 0 && users_find(u, "a", 1) == NULL, "empty");

    CHECK(users_add(u, "Alice@Example.COM", "{PLAIN}one") == 0, "add");
    CHECK(users_add(u, "bob@example.com", "{PLAIN}two") == 0, "add bob");
    CHECK(users_count(u) == 2, "count 2");
    const char *h = users_find(u, "alice@example.com", 17);
    CHECK(h != NULL && strcmp(h, "{PLAIN}one") == 0, "find lower");
    h = users_find(u, "ALICE@EXAMPLE.COM", 17);
    CHECK(h != NULL && strcmp(h, "{PLAIN}one") == 0, "find upper");

    /* Not NUL-terminated: a name inside a protocol line. */
    const char line[] = "AUTH PLAIN bob@example.com\r\n";
    h = users_find(u, line + 11, 15);
    CHECK(h != NULL && strcmp(h, "{PLAIN}two") == 0, "find in buffer");
    CHECK(users_find(u, line + 11, 14) == NULL, "prefix is not a match");
    CHECK(users_find(u, line + 11, 16) == NULL, "longer is not a match");
    CHECK(users_find(u, "", 0) == NULL, "empty name");

    /* Replace, in another case: still one entry. The table owns copies. */
    char hash[32];
    snprintf(hash, sizeof hash, "{PLAIN}three");
    CHECK(users_add(u, "ALICE@example.com", hash) == 0, "replace");
    memset(hash, 0, sizeof hash);
    CHECK(users_count(u) == 2, "count after replace");
    h = users_find(u, "alice@example.com", 17);
    CHECK(h != NULL && strcmp(h, "{PLAIN}three") == 0, "replaced: %s", h ? h : "(null)");

    /* Only ASCII letters fold: a UTF-8 name must match byte for byte. */
    CHECK(users_add(u, "j\xc3\xb6rg@example.com", "{PLAIN}4") == 0, "utf8 add");
    CHECK(users_find(u, "J\xc3\xb6RG@example.com", 17) != NULL, "utf8 ascii fold");
    CHECK(users_find(u, "j\xc3\x96rg@example.com", 17) == NULL, "no unicode fold");

    /* Grow to 10000 names, checking that nothing gets lost on the way. */
    char name[64], want[64];
    int missing = 0;
    for (int i = 0; i < 10000; i++) {
        snprintf(name, sizeof name, "User%d@Example.Org", i);
        snprintf(want, sizeof want, "{PLAIN}p%d", i);
        if (users_add(u, name, want) != 0) missing++;
    }
    CHECK(missing == 0, "adds failed: %d", missing);
    CHECK(users_count(u) == 10003, "count %zu", users_count(u));
    missing = 0;
    for (int i = 0; i < 10000; i++) {
        int n = snprintf(name, sizeof name, "user%d@example.org", i);
        snprintf(want, sizeof want, "{PLAIN}p%d", i);
        h = users_find(u, name, (size_t)n);
        if (h == NULL || strcmp(h, want) != 0) missing++;
    }
    CHECK(missing == 0, "lost after growth: %d", missing);
    CHECK(users_find(u, "user10000@example.org", 21) == NULL, "absent");
    h = users_find(u, "bob@example.com", 15);
    CHECK(h != NULL && strcmp(h, "{PLAIN}two") == 0, "early entry survives growth");
    CHECK(users_verify_password(users_find(u, "user42@example.org", 18), "p42") == 1,
          "lookup then verify");

    users_free(u);
    users_free(NULL);
    CHECK(users_count(NULL) == 0 && users_find(NULL, "a", 1) == NULL, "NULL table");
}

int main(void)
{
    test_pbkdf2_roundtrip();
    test_passlib();
    test_sha512_crypt();
    test_plain();
    test_unknown();
    test_table();
    return check_summary();
}
