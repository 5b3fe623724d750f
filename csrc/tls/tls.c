/* TLS contexts and connections over OpenSSL memory BIOs (see tls.h). The
 * connection layer owns the socket; here ciphertext only moves between the
 * caller's buffers and the two BIOs. */
#include "tls/tls.h"

#include <arpa/inet.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/bio.h>
#include <openssl/buffer.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>

/* A BIO whose buffer grew past this during a burst (a large DATA, a FETCH
 * of a big message) is replaced by a fresh one once it is empty, so an idle
 * connection does not keep the burst's memory; one full record still fits. */
#define TLS_BIO_KEEP_MAX (32 * 1024)

/* Room for one OpenSSL error line plus a verification reason. */
#define TLS_ERR_MAX 256

struct tls_ctx {
    SSL_CTX *ssl_ctx;
    int is_server;
    int verify_peer;
};

struct tls_conn {
    SSL *ssl;
    BIO *rbio;      /* ciphertext from the peer; owned by ssl */
    BIO *wbio;      /* ciphertext for the peer; owned by ssl */
    int closed;     /* the peer's close_notify arrived */
    int failed;     /* a fatal error: the SSL must not be driven again */
    char err[TLS_ERR_MAX];
};

/* The first queued error is the root cause (e.g. "no start line"); the later
 * ones only say which layer gave up. The queue is drained either way so it
 * cannot leak into the next call on this thread. */
static void tls_err_format(char *out, size_t outlen, const char *what)
{
    unsigned long e = ERR_get_error();
    char buf[TLS_ERR_MAX];
    if (e != 0)
        ERR_error_string_n(e, buf, sizeof buf);
    else
        snprintf(buf, sizeof buf, "TLS error without OpenSSL detail");
    ERR_clear_error();
    if (out == NULL || outlen == 0) return;
    if (what != NULL)
        snprintf(out, outlen, "%s: %s", what, buf);
    else
        snprintf(out, outlen, "%s", buf);
}

static void tls_conn_set_error(struct tls_conn *t, int ssl_err)
{
    if (ssl_err == SSL_ERROR_SSL || ERR_peek_error() != 0) {
        tls_err_format(t->err, sizeof t->err, NULL);
    } else if (ssl_err == SSL_ERROR_SYSCALL) {
        /* Memory BIOs never fail with errno; reaching this is a bug or OOM. */
        snprintf(t->err, sizeof t->err, "TLS I/O error on a memory BIO");
    } else {
        snprintf(t->err, sizeof t->err, "TLS error (SSL_get_error %d)", ssl_err);
    }
    /* "certificate verify failed" alone does not say why: add the reason. */
    long vr = SSL_get_verify_result(t->ssl);
    if (vr != X509_V_OK) {
        size_t used = strlen(t->err);
        snprintf(t->err + used, sizeof t->err - used, " (%s)",
                 X509_verify_cert_error_string(vr));
    }
}

/* Settings shared by both sides. */
static int tls_ctx_common(SSL_CTX *c)
{
    /* RFC 8996 retires TLS 1.0 and 1.1. */
    if (!SSL_CTX_set_min_proto_version(c, TLS1_2_VERSION)) return -1;
    /* Compression invites CRIME; renegotiation is a DoS lever and nothing in
     * mail needs it. */
    SSL_CTX_set_options(c, SSL_OP_NO_COMPRESSION | SSL_OP_NO_RENEGOTIATION);
    /* Idle connections give their 33 KiB record buffers back. */
    SSL_CTX_set_mode(c, SSL_MODE_RELEASE_BUFFERS);
    return 0;
}

struct tls_ctx *tls_ctx_new_server(const char *cert_file, const char *key_file,
                                   char *err, size_t errlen)
{
    char what[512];
    if (cert_file == NULL || key_file == NULL) {
        snprintf(err, errlen, "TLS server needs both a certificate and a key file");
        return NULL;
    }
    ERR_clear_error();
    struct tls_ctx *ctx = calloc(1, sizeof *ctx);
    if (ctx == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    ctx->is_server = 1;
    ctx->ssl_ctx = SSL_CTX_new(TLS_server_method());
    if (ctx->ssl_ctx == NULL || tls_ctx_common(ctx->ssl_ctx) < 0) {
        tls_err_format(err, errlen, "cannot create TLS server context");
        goto fail;
    }
    /* We pick from the client's list in our order; session tickets stay on
     * (OpenSSL's default) so returning clients skip the full handshake. The
     * default cipher list is kept: mail peers are often old, and for
     * opportunistic STARTTLS a weaker cipher still beats plaintext (RFC 7435). */
    SSL_CTX_set_options(ctx->ssl_ctx, SSL_OP_CIPHER_SERVER_PREFERENCE);
    SSL_CTX_clear_options(ctx->ssl_ctx, SSL_OP_NO_TICKET);
    static const unsigned char sid_ctx[] = "mailengine";
    SSL_CTX_set_session_id_context(ctx->ssl_ctx, sid_ctx, sizeof sid_ctx - 1);

    if (SSL_CTX_use_certificate_chain_file(ctx->ssl_ctx, cert_file) != 1) {
        snprintf(what, sizeof what, "cannot load certificate chain from %s", cert_file);
        tls_err_format(err, errlen, what);
        goto fail;
    }
    if (SSL_CTX_use_PrivateKey_file(ctx->ssl_ctx, key_file, SSL_FILETYPE_PEM) != 1) {
        /* OpenSSL also lands here when the key does not fit the certificate
         * ("key values mismatch"); name both files so the fix is obvious. */
        snprintf(what, sizeof what, "cannot use private key from %s with certificate %s",
                 key_file, cert_file);
        tls_err_format(err, errlen, what);
        goto fail;
    }
    /* Catches a key of another type than the certificate, which the call
     * above accepts into a different slot. */
    if (SSL_CTX_check_private_key(ctx->ssl_ctx) != 1) {
        snprintf(what, sizeof what, "private key in %s does not match certificate in %s",
                 key_file, cert_file);
        tls_err_format(err, errlen, what);
        goto fail;
    }
    return ctx;

fail:
    SSL_CTX_free(ctx->ssl_ctx);
    free(ctx);
    ERR_clear_error();
    return NULL;
}

int tls_ctx_verifies(const struct tls_ctx *ctx)
{
    return ctx->verify_peer;
}

struct tls_ctx *tls_ctx_new_client(int verify_peer, const char *ca_file,
                                   char *err, size_t errlen)
{
    ERR_clear_error();
    struct tls_ctx *ctx = calloc(1, sizeof *ctx);
    if (ctx == NULL) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    ctx->is_server = 0;
    ctx->verify_peer = verify_peer ? 1 : 0;
    ctx->ssl_ctx = SSL_CTX_new(TLS_client_method());
    if (ctx->ssl_ctx == NULL || tls_ctx_common(ctx->ssl_ctx) < 0) {
        tls_err_format(err, errlen, "cannot create TLS client context");
        goto fail;
    }
    if (ca_file != NULL) {
        if (SSL_CTX_load_verify_locations(ctx->ssl_ctx, ca_file, NULL) != 1) {
            char what[512];
            snprintf(what, sizeof what, "cannot load CA certificates from %s", ca_file);
            tls_err_format(err, errlen, what);
            goto fail;
        }
    } else if (ctx->verify_peer) {
        if (SSL_CTX_set_default_verify_paths(ctx->ssl_ctx) != 1) {
            tls_err_format(err, errlen, "cannot load the system CA store");
            goto fail;
        }
    }
    SSL_CTX_set_verify(ctx->ssl_ctx, ctx->verify_peer ? SSL_VERIFY_PEER : SSL_VERIFY_NONE,
                       NULL);
    return ctx;

fail:
    SSL_CTX_free(ctx->ssl_ctx);
    free(ctx);
    ERR_clear_error();
    return NULL;
}

void tls_ctx_free(struct tls_ctx *ctx)
{
    if (ctx == NULL) return;
    /* Live connections hold their own reference to the SSL_CTX. */
    SSL_CTX_free(ctx->ssl_ctx);
    free(ctx);
}

static BIO *tls_bio_new(void)
{
    BIO *b = BIO_new(BIO_s_mem());
    /* An empty BIO means "no data yet" (retry), never end of file. */
    if (b != NULL) BIO_set_mem_eof_return(b, -1);
    return b;
}

/* RFC 6066 §3: a literal IP address is not a HostName for SNI, and it is
 * checked against iPAddress entries, not dNSName. */
static int tls_host_is_ip(const char *host)
{
    unsigned char addr[16];
    return inet_pton(AF_INET, host, addr) == 1 || inet_pton(AF_INET6, host, addr) == 1;
}

static int tls_conn_setup_client(struct tls_conn *t, const struct tls_ctx *ctx,
                                 const char *host)
{
    int is_ip = tls_host_is_ip(host);
    if (!is_ip && SSL_set_tlsext_host_name(t->ssl, host) != 1) return -1;
    if (!ctx->verify_peer) return 0;
    if (is_ip) {
        X509_VERIFY_PARAM *param = SSL_get0_param(t->ssl);
        if (X509_VERIFY_PARAM_set1_ip_asc(param, host) != 1) return -1;
        return 0;
    }
    SSL_set_hostflags(t->ssl, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
    if (SSL_set1_host(t->ssl, host) != 1) return -1;
    return 0;
}

struct tls_conn *tls_conn_new(struct tls_ctx *ctx, int is_server, const char *sni_host)
{
    if (ctx == NULL || (is_server != 0) != ctx->is_server) return NULL;
    struct tls_conn *t = calloc(1, sizeof *t);
    if (t == NULL) return NULL;
    t->ssl = SSL_new(ctx->ssl_ctx);
    BIO *rbio = tls_bio_new();
    BIO *wbio = tls_bio_new();
    if (t->ssl == NULL || rbio == NULL || wbio == NULL) {
        BIO_free(rbio);
        BIO_free(wbio);
        goto fail;
    }
    SSL_set_bio(t->ssl, rbio, wbio); /* ssl owns both from here */
    t->rbio = rbio;
    t->wbio = wbio;
    if (is_server) {
        SSL_set_accept_state(t->ssl);
    } else {
        if (sni_host != NULL && sni_host[0] != '\0' &&
            tls_conn_setup_client(t, ctx, sni_host) < 0)
            goto fail;
        SSL_set_connect_state(t->ssl);
    }
    return t;

fail:
    SSL_free(t->ssl);
    free(t);
    ERR_clear_error();
    return NULL;
}

void tls_conn_free(struct tls_conn *t)
{
    if (t == NULL) return;
    SSL_free(t->ssl);
    free(t);
}

/* Give a burst's memory back once a BIO is empty (see TLS_BIO_KEEP_MAX).
 * Only after the handshake: during it OpenSSL stacks a buffering BIO on the
 * write side. Failing to allocate the replacement just keeps the old one. */
static void tls_conn_trim(struct tls_conn *t, int write_side)
{
    BIO *b = write_side ? t->wbio : t->rbio;
    BUF_MEM *bm = NULL;
    if (!SSL_is_init_finished(t->ssl) || BIO_ctrl_pending(b) != 0) return;
    if (BIO_get_mem_ptr(b, &bm) != 1 || bm == NULL || bm->max <= TLS_BIO_KEEP_MAX) return;
    BIO *fresh = tls_bio_new();
    if (fresh == NULL) return;
    if (write_side) {
        SSL_set0_wbio(t->ssl, fresh); /* frees the old one */
        t->wbio = fresh;
    } else {
        SSL_set0_rbio(t->ssl, fresh);
        t->rbio = fresh;
    }
}

int tls_conn_feed(struct tls_conn *t, const void *p, size_t n)
{
    const unsigned char *s = p;
    while (n > 0) {
        int chunk = n > INT_MAX ? INT_MAX : (int)n;
        int w = BIO_write(t->rbio, s, chunk);
        if (w <= 0) {
            tls_err_format(t->err, sizeof t->err, "cannot buffer TLS input");
            return -1;
        }
        s += w;
        n -= (size_t)w;
    }
    return 0;
}

int tls_conn_handshake(struct tls_conn *t)
{
    if (t->failed) return -1;
    ERR_clear_error();
    int r = SSL_do_handshake(t->ssl);
    if (r == 1) return 1;
    int e = SSL_get_error(t->ssl, r);
    /* WANT_WRITE cannot really happen with a growable memory BIO. */
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) return 0;
    tls_conn_set_error(t, e);
    t->failed = 1;
    return -1;
}

ssize_t tls_conn_read(struct tls_conn *t, void *buf, size_t cap)
{
    if (t->closed || t->failed) return -1;
    if (cap == 0) return 0;
    if (cap > INT_MAX) cap = INT_MAX;
    ERR_clear_error();
    int r = SSL_read(t->ssl, buf, (int)cap);
    if (r > 0) return r;
    int e = SSL_get_error(t->ssl, r);
    switch (e) {
    case SSL_ERROR_WANT_READ:
    case SSL_ERROR_WANT_WRITE:
        /* Also the case after a post-handshake message (TLS 1.3 session
         * ticket, key update) that held no application data. */
        tls_conn_trim(t, 0);
        return 0;
    case SSL_ERROR_ZERO_RETURN:
        t->closed = 1;
        snprintf(t->err, sizeof t->err, "peer sent close_notify");
        /* Answer with our own close_notify (RFC 8446 §6.1; required by
         * RFC 5246 §7.2.1) so the caller only has to flush and close. */
        ERR_clear_error();
        if (SSL_shutdown(t->ssl) < 0) ERR_clear_error();
        return -1;
    default:
        tls_conn_set_error(t, e);
        t->failed = 1;
        return -1;
    }
}

int tls_conn_closed(const struct tls_conn *t)
{
    return t->closed;
}

int tls_conn_shutdown(struct tls_conn *t)
{
    if (t->failed) return -1;
    ERR_clear_error();
    int r = SSL_shutdown(t->ssl);
    /* 0 means ours is queued and the peer's is still to come: that is all
     * we wait for, the caller closes the socket after flushing. */
    if (r >= 0) return 0;
    tls_conn_set_error(t, SSL_get_error(t->ssl, r));
    return -1;
}

int tls_conn_write(struct tls_conn *t, const void *p, size_t n)
{
    if (t->failed) return -1;
    if (!SSL_is_init_finished(t->ssl)) {
        /* SSL_write would start the handshake itself and drop to WANT_READ
         * with nothing written; the caller drives the handshake. */
        snprintf(t->err, sizeof t->err, "TLS write before the handshake completed");
        return -1;
    }
    if (n == 0) return 0;
    ERR_clear_error();
    size_t written = 0;
    /* Without SSL_MODE_ENABLE_PARTIAL_WRITE this writes all or nothing; the
     * memory BIO never pushes back. */
    int r = SSL_write_ex(t->ssl, p, n, &written);
    if (r == 1 && written == n) return 0;
    tls_conn_set_error(t, SSL_get_error(t->ssl, r));
    t->failed = 1;
    return -1;
}

size_t tls_conn_pending_out(const struct tls_conn *t)
{
    return BIO_ctrl_pending(t->wbio);
}

size_t tls_conn_take_out(struct tls_conn *t, void *buf, size_t cap)
{
    if (cap == 0) return 0;
    if (cap > INT_MAX) cap = INT_MAX;
    int n = BIO_read(t->wbio, buf, (int)cap);
    if (n <= 0) return 0;
    tls_conn_trim(t, 1);
    return (size_t)n;
}

const char *tls_conn_version(const struct tls_conn *t)
{
    return SSL_get_version(t->ssl);
}

const char *tls_conn_cipher(const struct tls_conn *t)
{
    const char *c = SSL_get_cipher_name(t->ssl);
    return c != NULL ? c : "(NONE)";
}

const char *tls_conn_error(const struct tls_conn *t)
{
    return t->err;
}
