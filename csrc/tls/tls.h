/* TLS over OpenSSL memory BIOs: the connection layer feeds ciphertext in and
 * takes ciphertext out; no socket is ever handed to OpenSSL. Also server
 * contexts and the self-signed certificate made for the embedded default. */
#ifndef TLS_TLS_H
#define TLS_TLS_H

#include <stddef.h>
#include <sys/types.h>

struct tls_ctx;   /* a server (or client) SSL_CTX with our settings */
struct tls_conn;  /* one SSL with its two memory BIOs */

/* Server context from PEM files (chain and key). TLS 1.2 minimum, server
 * cipher preference, no compression, no renegotiation, session tickets on.
 * NULL on failure with a message in err. */
struct tls_ctx *tls_ctx_new_server(const char *cert_file, const char *key_file,
                                   char *err, size_t errlen);
/* Client context: verify_peer 0 or 1; ca_file NULL for the system store. */
/* Does ctx check the peer's certificate? */
int tls_ctx_verifies(const struct tls_ctx *ctx);
struct tls_ctx *tls_ctx_new_client(int verify_peer, const char *ca_file,
                                   char *err, size_t errlen);
void tls_ctx_free(struct tls_ctx *ctx);

/* Write a new self-signed certificate (EC P-256, 10 years, CN and
 * subjectAltName DNS:cn) and its key (mode 0600) to the two paths.
 * 0 on success, -1 with a message in err. */
int tls_cert_generate(const char *cert_path, const char *key_path,
                      const char *cn, char *err, size_t errlen);

struct tls_conn *tls_conn_new(struct tls_ctx *ctx, int is_server,
                              const char *sni_host /* client only, may be NULL */);
void tls_conn_free(struct tls_conn *t);

/* Hand ciphertext received from the peer to OpenSSL. 0 or -1. */
int tls_conn_feed(struct tls_conn *t, const void *p, size_t n);

/* Advance the handshake: 1 done, 0 needs more input (send what
 * tls_conn_take_out yields first), -1 failed (reason in tls_conn_error). */
int tls_conn_handshake(struct tls_conn *t);

/* Decrypt into buf: >0 bytes, 0 need more input, -1 error or peer closed
 * (TLS close_notify is -1 too, with tls_conn_closed() true). */
ssize_t tls_conn_read(struct tls_conn *t, void *buf, size_t cap);
int tls_conn_closed(const struct tls_conn *t);

/* Queue our close_notify (RFC 8446 §6.1) before closing the socket: send
 * what tls_conn_take_out yields, then close. 0 or -1. When the peer closes
 * first, tls_conn_read queues the answer by itself. */
int tls_conn_shutdown(struct tls_conn *t);

/* Encrypt plaintext; the ciphertext waits for tls_conn_take_out. 0 or -1. */
int tls_conn_write(struct tls_conn *t, const void *p, size_t n);

/* Ciphertext ready to send: its size, and a copy of up to cap bytes
 * (removed from the pending output). */
size_t tls_conn_pending_out(const struct tls_conn *t);
size_t tls_conn_take_out(struct tls_conn *t, void *buf, size_t cap);

/* After the handshake: "TLSv1.3", the cipher name; the last error text. */
const char *tls_conn_version(const struct tls_conn *t);
const char *tls_conn_cipher(const struct tls_conn *t);
const char *tls_conn_error(const struct tls_conn *t);

#endif
