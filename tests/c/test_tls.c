/* sources: csrc/tls/tls.c csrc/tls/cert.c */
/* libs: -lssl -lcrypto */
/* TLS over memory BIOs, with both ends in this process: a generated
 * certificate, handshakes pumped by hand, data both ways, close_notify,
 * verification by CA file and host name, and the failures a user will meet. */
#include "tls/tls.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/pem.h>
#include <openssl/x509v3.h>

#include "check.h"

static char dir[256];
static char cert_a[300], key_a[300], cert_b[300], key_b[300];

/* Move everything one side has queued to the other; bytes moved. Odd chunk
 * sizes so that records are split across feeds. */
static size_t pump(struct tls_conn *from, struct tls_conn *to)
{
    unsigned char buf[3001];
    size_t total = 0, n;
    while ((n = tls_conn_take_out(from, buf, sizeof buf)) > 0) {
        if (tls_conn_feed(to, buf, n) != 0) return total;
        total += n;
    }
    return total;
}

/* Run both handshakes until each reports done (1) or one fails (-1). */
static int handshake(struct tls_conn *client, struct tls_conn *server, int *crc, int *src)
{
    *crc = 0;
    *src = 0;
    for (int round = 0; round < 50; round++) {
        if (*crc == 0) *crc = tls_conn_handshake(client);
        pump(client, server);
        if (*src == 0) *src = tls_conn_handshake(server);
        pump(server, client);
        if (*crc == 1 && *src == 1) return 1;
        if (*crc < 0 || *src < 0) return -1;
    }
    return 0;
}

static struct tls_ctx *server_ctx(void)
{
    char err[512] = "";
    struct tls_ctx *s = tls_ctx_new_server(cert_a, key_a, err, sizeof err);
    if (s == NULL) fprintf(stderr, "server ctx: %s\n", err);
    return s;
}

static void test_generate(void)
{
    char err[512] = "";
    int r = tls_cert_generate(cert_a, key_a, "mail.example.test", err, sizeof err);
    CHECK(r == 0, "generate: %s", err);
    r = tls_cert_generate(cert_b, key_b, "other.example.test", err, sizeof err);
    CHECK(r == 0, "generate b: %s", err);

    struct stat st;
    CHECK(stat(key_a, &st) == 0 && (st.st_mode & 0777) == 0600, "key mode %o",
          (unsigned)(st.st_mode & 0777));

    FILE *f = fopen(cert_a, "r");
    X509 *x = f ? PEM_read_X509(f, NULL, NULL, NULL) : NULL;
    if (f) fclose(f);
    CHECK(x != NULL, "cert readable");
    if (x != NULL) {
        CHECK(X509_get_version(x) == X509_VERSION_3, "v3");
        CHECK(X509_check_host(x, "mail.example.test", 0, 0, NULL) == 1, "SAN host");
        CHECK(X509_check_host(x, "other.example.test", 0, 0, NULL) != 1, "SAN other");
        EVP_PKEY *pk = X509_get0_pubkey(x);
        CHECK(pk != NULL && EVP_PKEY_is_a(pk, "EC") && EVP_PKEY_get_bits(pk) == 256, "P-256");
        /* Ten years ahead, give or take a day. */
        int days = 0, secs = 0;
        ASN1_TIME_diff(&days, &secs, NULL, X509_get0_notAfter(x));
        CHECK(days >= 3650 && days <= 3654, "validity %d days", days);
        char cn[128] = "";
        X509_NAME_get_text_by_NID(X509_get_subject_name(x), NID_commonName, cn, sizeof cn);
        CHECK(strcmp(cn, "mail.example.test") == 0, "CN %s", cn);
        X509_free(x);
    }

    /* Names that cannot be a dNSName are refused with a message. */
    err[0] = '\0';
    char c2[300], k2[300];
    snprintf(c2, sizeof c2, "%s/bad.crt", dir);
    snprintf(k2, sizeof k2, "%s/bad.key", dir);
    CHECK(tls_cert_generate(c2, k2, "a,IP:1.2.3.4", err, sizeof err) == -1 && err[0],
          "bad cn");
    CHECK(access(c2, F_OK) != 0 && access(k2, F_OK) != 0, "nothing left behind");
    /* An unwritable place: an error naming the file, nothing half-written. */
    err[0] = '\0';
    CHECK(tls_cert_generate("/nonexistent-dir/x.crt", k2, "x.test", err, sizeof err) == -1 &&
              strstr(err, "/nonexistent-dir/x.crt") != NULL,
          "unwritable: %s", err);
    CHECK(access(k2, F_OK) != 0, "no key left behind");
}

static void test_server_ctx_errors(void)
{
    char err[512] = "";
    struct tls_ctx *s = tls_ctx_new_server(cert_a, key_b, err, sizeof err);
    CHECK(s == NULL, "mismatch accepted");
    CHECK(strstr(err, key_b) != NULL, "message names key file: %s", err);
    CHECK(strstr(err, "mismatch") != NULL, "message says mismatch: %s", err);
    tls_ctx_free(s);

    err[0] = '\0';
    char missing[300];
    snprintf(missing, sizeof missing, "%s/missing.pem", dir);
    s = tls_ctx_new_server(missing, key_a, err, sizeof err);
    CHECK(s == NULL && strstr(err, missing) != NULL, "missing cert: %s", err);
    tls_ctx_free(s);

    /* A key file given as the certificate. */
    err[0] = '\0';
    s = tls_ctx_new_server(key_a, key_a, err, sizeof err);
    CHECK(s == NULL && strstr(err, key_a) != NULL, "key as cert: %s", err);
    tls_ctx_free(s);

    err[0] = '\0';
    struct tls_ctx *c = tls_ctx_new_client(1, missing, err, sizeof err);
    CHECK(c == NULL && strstr(err, missing) != NULL, "missing CA: %s", err);
    tls_ctx_free(c);
}

static void test_handshake_and_data(void)
{
    char err[512] = "";
    struct tls_ctx *sctx = server_ctx();
    struct tls_ctx *cctx = tls_ctx_new_client(0, NULL, err, sizeof err);
    CHECK(sctx != NULL && cctx != NULL, "contexts: %s", err);
    if (sctx == NULL || cctx == NULL) goto out_ctx;

    CHECK(tls_conn_new(cctx, 1, NULL) == NULL, "client ctx used as server");
    struct tls_conn *s = tls_conn_new(sctx, 1, NULL);
    struct tls_conn *c = tls_conn_new(cctx, 0, "mail.example.test");
    CHECK(s != NULL && c != NULL, "conns");
    if (s == NULL || c == NULL) goto out_conn;

    CHECK(tls_conn_write(c, "early", 5) == -1 && tls_conn_error(c)[0], "write before handshake");

    int crc, src;
    int r = handshake(c, s, &crc, &src);
    CHECK(r == 1, "handshake c=%d s=%d: %s / %s", crc, src, tls_conn_error(c),
          tls_conn_error(s));
    if (r != 1) goto out_conn;
    CHECK(strcmp(tls_conn_version(s), "TLSv1.3") == 0, "version %s", tls_conn_version(s));
    CHECK(strcmp(tls_conn_version(c), "TLSv1.3") == 0, "version %s", tls_conn_version(c));
    CHECK(strcmp(tls_conn_cipher(s), tls_conn_cipher(c)) == 0 &&
              strcmp(tls_conn_cipher(s), "(NONE)") != 0,
          "cipher %s", tls_conn_cipher(s));
    CHECK(tls_conn_handshake(s) == 1 && tls_conn_handshake(c) == 1, "handshake idempotent");

    /* The session tickets went to the client with the last pump; reading
     * them yields no data, only "need more". */
    char buf[8192];
    CHECK(tls_conn_read(c, buf, sizeof buf) == 0, "tickets only");
    CHECK(tls_conn_read(s, buf, sizeof buf) == 0, "nothing for server yet");

    /* Small messages both ways. */
    CHECK(tls_conn_write(c, "EHLO client\r\n", 13) == 0, "client write");
    CHECK(tls_conn_pending_out(c) > 13, "ciphertext queued");
    pump(c, s);
    CHECK(tls_conn_pending_out(c) == 0, "drained");
    ssize_t n = tls_conn_read(s, buf, sizeof buf);
    CHECK(n == 13 && memcmp(buf, "EHLO client\r\n", 13) == 0, "server got %zd", n);
    CHECK(tls_conn_read(s, buf, sizeof buf) == 0, "then need more");
    CHECK(tls_conn_write(s, "250 ok\r\n", 8) == 0, "server write");
    pump(s, c);
    n = tls_conn_read(c, buf, sizeof buf);
    CHECK(n == 8 && memcmp(buf, "250 ok\r\n", 8) == 0, "client got %zd", n);

    /* take_out with a small cap leaves the rest queued. */
    CHECK(tls_conn_write(s, "x", 1) == 0, "write x");
    size_t pend = tls_conn_pending_out(s);
    unsigned char tiny[5];
    CHECK(tls_conn_take_out(s, tiny, sizeof tiny) == 5 && tls_conn_pending_out(s) == pend - 5,
          "partial take_out");
    CHECK(tls_conn_feed(c, tiny, 5) == 0, "feed 5");
    CHECK(tls_conn_read(c, buf, sizeof buf) == 0, "partial record: need more");
    pump(s, c);
    CHECK(tls_conn_read(c, buf, sizeof buf) == 1 && buf[0] == 'x', "rest of record");

    /* 1 MB each way, written in uneven pieces, read through a small buffer. */
    enum { BIG = 1 << 20 };
    unsigned char *src_buf = malloc(BIG), *dst = malloc(BIG);
    if (src_buf == NULL || dst == NULL) abort();
    for (size_t i = 0; i < BIG; i++) src_buf[i] = (unsigned char)(i * 131 + (i >> 11));
    for (int dir_ = 0; dir_ < 2; dir_++) {
        struct tls_conn *w = dir_ ? s : c, *rd = dir_ ? c : s;
        size_t off = 0, got = 0, piece = 777;
        int ok = 1;
        while (got < BIG && ok) {
            if (off < BIG) {
                size_t k = BIG - off < piece ? BIG - off : piece;
                ok = tls_conn_write(w, src_buf + off, k) == 0;
                off += k;
                piece = piece * 3 % 40000 + 1;
            }
            pump(w, rd);
            for (;;) {
                ssize_t m = tls_conn_read(rd, dst + got, BIG - got < 5000 ? BIG - got : 5000);
                if (m < 0) ok = 0;
                if (m <= 0) break;
                got += (size_t)m;
            }
            if (off >= BIG && got < BIG && tls_conn_pending_out(w) == 0) break;
        }
        CHECK(ok && got == BIG && memcmp(src_buf, dst, BIG) == 0, "1 MB dir %d got %zu: %s", dir_,
              got, tls_conn_error(rd));
        memset(dst, 0, BIG);
    }
    free(src_buf);
    free(dst);

    /* Server says goodbye with data before its close_notify. */
    CHECK(tls_conn_write(s, "221 bye\r\n", 9) == 0, "bye");
    CHECK(tls_conn_shutdown(s) == 0, "shutdown: %s", tls_conn_error(s));
    pump(s, c);
    n = tls_conn_read(c, buf, sizeof buf);
    CHECK(n == 9 && memcmp(buf, "221 bye\r\n", 9) == 0, "data before close %zd", n);
    CHECK(!tls_conn_closed(c), "not closed yet");
    n = tls_conn_read(c, buf, sizeof buf);
    CHECK(n == -1 && tls_conn_closed(c), "close_notify seen: %zd", n);
    CHECK(tls_conn_read(c, buf, sizeof buf) == -1, "stays closed");
    /* The client answered with its own close_notify. */
    CHECK(tls_conn_pending_out(c) > 0, "client answered");
    pump(c, s);
    n = tls_conn_read(s, buf, sizeof buf);
    CHECK(n == -1 && tls_conn_closed(s), "server saw answer: %zd %s", n, tls_conn_error(s));

out_conn:
    tls_conn_free(s);
    tls_conn_free(c);
out_ctx:
    tls_ctx_free(sctx);
    tls_ctx_free(cctx);
}

/* Client closes first; the server has nothing queued but the answer. */
static void test_client_close(void)
{
    char err[512] = "";
    struct tls_ctx *sctx = server_ctx();
    struct tls_ctx *cctx = tls_ctx_new_client(0, NULL, err, sizeof err);
    struct tls_conn *s = sctx ? tls_conn_new(sctx, 1, NULL) : NULL;
    struct tls_conn *c = cctx ? tls_conn_new(cctx, 0, NULL) : NULL;
    /* Contexts may go before their connections. */
    tls_ctx_free(sctx);
    tls_ctx_free(cctx);
    int crc, src;
    CHECK(s && c && handshake(c, s, &crc, &src) == 1, "handshake without SNI");
    if (s && c) {
        char buf[64];
        tls_conn_read(c, buf, sizeof buf);
        pump(c, s);
        CHECK(tls_conn_shutdown(c) == 0, "client shutdown");
        pump(c, s);
        CHECK(tls_conn_read(s, buf, sizeof buf) == -1 && tls_conn_closed(s), "server closed");
        CHECK(strstr(tls_conn_error(s), "close_notify") != NULL, "reason %s",
              tls_conn_error(s));
        CHECK(tls_conn_pending_out(s) > 0, "server answered");
    }
    tls_conn_free(s);
    tls_conn_free(c);
}

static void test_verify(const char *host, int expect_ok)
{
    char err[512] = "";
    struct tls_ctx *sctx = server_ctx();
    struct tls_ctx *cctx = tls_ctx_new_client(1, cert_a, err, sizeof err);
    CHECK(sctx != NULL && cctx != NULL, "contexts: %s", err);
    if (sctx == NULL || cctx == NULL) {
        tls_ctx_free(sctx);
        tls_ctx_free(cctx);
        return;
    }
    struct tls_conn *s = tls_conn_new(sctx, 1, NULL);
    struct tls_conn *c = tls_conn_new(cctx, 0, host);
    int crc = 0, src = 0;
    int r = (s && c) ? handshake(c, s, &crc, &src) : -2;
    if (expect_ok) {
        CHECK(r == 1, "verify %s: %s", host, c ? tls_conn_error(c) : "no conn");
    } else {
        CHECK(r == -1 && crc == -1, "verify %s should fail (c=%d s=%d)", host, crc, src);
        CHECK(c && strstr(tls_conn_error(c), "verify failed") != NULL, "reason: %s",
              c ? tls_conn_error(c) : "");
        if (c) fprintf(stderr, "verify %s: %s\n", host, tls_conn_error(c));
        /* The client's alert tells the server why. */
        if (s && c) {
            pump(c, s);
            CHECK(tls_conn_handshake(s) == -1 && tls_conn_error(s)[0], "server sees alert: %s",
                  tls_conn_error(s));
        }
    }
    tls_conn_free(s);
    tls_conn_free(c);
    tls_ctx_free(sctx);
    tls_ctx_free(cctx);
}

/* A server certificate the client does not trust at all. */
static void test_verify_untrusted(void)
{
    char err[512] = "";
    struct tls_ctx *sctx = server_ctx();
    struct tls_ctx *cctx = tls_ctx_new_client(1, cert_b, err, sizeof err);
    struct tls_conn *s = sctx ? tls_conn_new(sctx, 1, NULL) : NULL;
    struct tls_conn *c = cctx ? tls_conn_new(cctx, 0, "mail.example.test") : NULL;
    int crc = 0, src = 0;
    CHECK(s && c && handshake(c, s, &crc, &src) == -1 && crc == -1, "untrusted refused");
    CHECK(c && strstr(tls_conn_error(c), "verify failed") != NULL, "reason: %s",
          c ? tls_conn_error(c) : "");
    tls_conn_free(s);
    tls_conn_free(c);
    tls_ctx_free(sctx);
    tls_ctx_free(cctx);
}

static void test_garbage(void)
{
    struct tls_ctx *sctx = server_ctx();
    struct tls_conn *s = sctx ? tls_conn_new(sctx, 1, NULL) : NULL;
    CHECK(s != NULL, "server conn");
    if (s != NULL) {
        CHECK(tls_conn_handshake(s) == 0, "server waits for hello");
        const char junk[] = "EHLO plaintext.example\r\nMAIL FROM:<a@b>\r\n";
        CHECK(tls_conn_feed(s, junk, sizeof junk - 1) == 0, "feed");
        CHECK(tls_conn_handshake(s) == -1, "garbage refused");
        CHECK(tls_conn_error(s)[0] != '\0', "error text");
        fprintf(stderr, "garbage error: %s\n", tls_conn_error(s));
        char buf[16];
        CHECK(tls_conn_read(s, buf, sizeof buf) == -1, "dead after failure");
        CHECK(tls_conn_write(s, "x", 1) == -1, "no write after failure");
        CHECK(tls_conn_handshake(s) == -1, "stays failed");
    }
    tls_conn_free(s);

    /* A truncated but well-formed-looking record header with a bad length. */
    s = sctx ? tls_conn_new(sctx, 1, NULL) : NULL;
    if (s != NULL) {
        static const unsigned char bad[] = {0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00};
        tls_conn_feed(s, bad, sizeof bad);
        CHECK(tls_conn_handshake(s) == -1 && tls_conn_error(s)[0], "oversized record: %s",
              tls_conn_error(s));
    }
    tls_conn_free(s);
    tls_ctx_free(sctx);
}

static void rm_dir(void)
{
    const char *names[] = {cert_a, key_a, cert_b, key_b};
    for (size_t i = 0; i < 4; i++) unlink(names[i]);
    rmdir(dir);
}

int main(void)
{
    const char *tmp = getenv("TMPDIR");
    snprintf(dir, sizeof dir, "%s/test_tls.XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (mkdtemp(dir) == NULL) {
        perror("mkdtemp");
        printf("0 passed, 1 failed\n");
        return 1;
    }
    snprintf(cert_a, sizeof cert_a, "%s/a.crt", dir);
    snprintf(key_a, sizeof key_a, "%s/a.key", dir);
    snprintf(cert_b, sizeof cert_b, "%s/b.crt", dir);
    snprintf(key_b, sizeof key_b, "%s/b.key", dir);

    test_generate();
    test_server_ctx_errors();
    test_handshake_and_data();
    test_client_close();
    test_verify("mail.example.test", 1);
    test_verify("MAIL.Example.TEST", 1);
    test_verify("wrong.example.test", 0);
    test_verify("example.test", 0);
    test_verify_untrusted();
    test_garbage();

    rm_dir();
    return check_summary();
}
