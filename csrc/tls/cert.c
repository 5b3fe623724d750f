/* The self-signed certificate behind the embedded default: an EC P-256 key
 * and an X.509 v3 certificate valid for ten years, naming one host in both
 * CN and subjectAltName. Both files appear whole or not at all. */
#include "tls/tls.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <openssl/bn.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>

/* RFC 5280 ub-common-name: a longer CN cannot be encoded. */
#define CERT_CN_MAX 64
/* Ten years, leap days included. */
#define CERT_VALID_DAYS 3653
/* Backdated so that a peer whose clock is a little behind does not see a
 * certificate that is not valid yet. */
#define CERT_BACKDATE_SECS 3600

static void cert_err(char *err, size_t errlen, const char *what)
{
    unsigned long e = ERR_get_error();
    ERR_clear_error();
    if (err == NULL || errlen == 0) return;
    if (e != 0) {
        char buf[256];
        ERR_error_string_n(e, buf, sizeof buf);
        snprintf(err, errlen, "%s: %s", what, buf);
    } else {
        snprintf(err, errlen, "%s", what);
    }
}

/* The name goes into a dNSName, so only host name characters are allowed. */
static int cert_cn_ok(const char *cn)
{
    size_t n = strlen(cn);
    if (n == 0 || n > CERT_CN_MAX || cn[0] == '.' || cn[0] == '-') return 0;
    for (size_t i = 0; i < n; i++) {
        char c = cn[i];
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                 c == '-' || c == '.' || c == '_';
        if (!ok) return 0;
    }
    return 1;
}

static int cert_add_san(X509 *x, const char *cn)
{
    int ok = 0;
    GENERAL_NAMES *gens = GENERAL_NAMES_new();
    GENERAL_NAME *gn = GENERAL_NAME_new();
    ASN1_IA5STRING *ia5 = ASN1_IA5STRING_new();
    if (gens == NULL || gn == NULL || ia5 == NULL) goto out;
    /* Built directly rather than from a "DNS:%s" config string, so no
     * character of cn can be read as a separator. */
    if (!ASN1_STRING_set(ia5, cn, (int)strlen(cn))) goto out;
    GENERAL_NAME_set0_value(gn, GEN_DNS, ia5);
    ia5 = NULL;
    if (!sk_GENERAL_NAME_push(gens, gn)) goto out;
    gn = NULL;
    ok = X509_add1_ext_i2d(x, NID_subject_alt_name, gens, 0, X509V3_ADD_DEFAULT) == 1;
out:
    ASN1_IA5STRING_free(ia5);
    GENERAL_NAME_free(gn);
    GENERAL_NAMES_free(gens);
    return ok ? 0 : -1;
}

static int cert_add_ext(X509 *x, int nid, const char *value)
{
    X509V3_CTX v3;
    X509V3_set_ctx(&v3, x, x, NULL, NULL, 0);
    X509_EXTENSION *ext = X509V3_EXT_conf_nid(NULL, &v3, nid, value);
    if (ext == NULL) return -1;
    int ok = X509_add_ext(x, ext, -1);
    X509_EXTENSION_free(ext);
    return ok ? 0 : -1;
}

static X509 *cert_build(EVP_PKEY *key, const char *cn)
{
    X509 *x = X509_new();
    BIGNUM *serial = NULL;
    if (x == NULL) return NULL;

    /* RFC 5280 §4.1.2.2: positive, at most 20 octets, unique per issuer;
     * random, as there is no issuer database to count in. */
    unsigned char sb[16];
    if (RAND_bytes(sb, sizeof sb) != 1) goto fail;
    sb[0] = (unsigned char)((sb[0] & 0x7f) | 0x40);
    serial = BN_bin2bn(sb, sizeof sb, NULL);
    if (serial == NULL || BN_to_ASN1_INTEGER(serial, X509_get_serialNumber(x)) == NULL)
        goto fail;

    X509_NAME *name = X509_get_subject_name(x);
    if (!X509_set_version(x, X509_VERSION_3) ||
        X509_gmtime_adj(X509_getm_notBefore(x), -CERT_BACKDATE_SECS) == NULL ||
        X509_time_adj_ex(X509_getm_notAfter(x), CERT_VALID_DAYS, 0, NULL) == NULL ||
        !X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_ASC, (const unsigned char *)cn, -1,
                                    -1, 0) ||
        !X509_set_issuer_name(x, name) || !X509_set_pubkey(x, key))
        goto fail;

    /* A leaf, not a CA, even though it signs itself; no keyUsage, because a
     * self-signed certificate without keyCertSign is not taken as its own
     * issuer by verifiers that use it as a trust anchor. */
    if (cert_add_ext(x, NID_basic_constraints, "critical,CA:FALSE") < 0 ||
        cert_add_ext(x, NID_subject_key_identifier, "hash") < 0 || cert_add_san(x, cn) < 0)
        goto fail;

    if (X509_sign(x, key, EVP_sha256()) <= 0) goto fail;
    BN_free(serial);
    return x;

fail:
    BN_free(serial);
    X509_free(x);
    return NULL;
}

/* A temporary file next to path, renamed over it once complete, so a crash
 * or a full disk never leaves a truncated key or certificate behind. */
static FILE *cert_tmp_open(const char *path, mode_t mode, char *tmp, size_t tmplen)
{
    int n = snprintf(tmp, tmplen, "%s.XXXXXX", path);
    if (n < 0 || (size_t)n >= tmplen) {
        errno = ENAMETOOLONG;
        return NULL;
    }
    int fd = mkostemp(tmp, O_CLOEXEC); /* created 0600 */
    if (fd < 0) return NULL;
    FILE *f = NULL;
    if (fchmod(fd, mode) == 0) f = fdopen(fd, "w");
    if (f == NULL) {
        int saved = errno;
        close(fd);
        unlink(tmp);
        errno = saved;
    }
    return f;
}

/* Flush, sync and close; on any failure the temporary file is removed. */
static int cert_tmp_finish(FILE *f, const char *tmp, int write_ok)
{
    int ok = write_ok && fflush(f) == 0 && fsync(fileno(f)) == 0;
    if (fclose(f) != 0) ok = 0;
    if (!ok) unlink(tmp);
    return ok ? 0 : -1;
}

int tls_cert_generate(const char *cert_path, const char *key_path, const char *cn,
                      char *err, size_t errlen)
{
    char key_tmp[4096], cert_tmp[4096];
    char what[4200];
    EVP_PKEY *key = NULL;
    X509 *x = NULL;
    int rc = -1;
    int key_tmp_made = 0;

    if (cert_path == NULL || key_path == NULL || cn == NULL || !cert_cn_ok(cn)) {
        snprintf(err, errlen, "certificate name must be a host name of 1 to %d characters",
                 CERT_CN_MAX);
        return -1;
    }
    ERR_clear_error();
    key = EVP_EC_gen("P-256");
    if (key == NULL) {
        cert_err(err, errlen, "cannot generate an EC P-256 key");
        goto out;
    }
    x = cert_build(key, cn);
    if (x == NULL) {
        cert_err(err, errlen, "cannot build the self-signed certificate");
        goto out;
    }

    FILE *f = cert_tmp_open(key_path, 0600, key_tmp, sizeof key_tmp);
    if (f == NULL) {
        snprintf(err, errlen, "cannot create key file %s: %s", key_path, strerror(errno));
        goto out;
    }
    int wrote = PEM_write_PrivateKey(f, key, NULL, NULL, 0, NULL, NULL) == 1;
    if (cert_tmp_finish(f, key_tmp, wrote) < 0) {
        snprintf(what, sizeof what, "cannot write key file %s", key_path);
        cert_err(err, errlen, what);
        goto out;
    }
    key_tmp_made = 1;

    f = cert_tmp_open(cert_path, 0644, cert_tmp, sizeof cert_tmp);
    if (f == NULL) {
        snprintf(err, errlen, "cannot create certificate file %s: %s", cert_path,
                 strerror(errno));
        goto out;
    }
    wrote = PEM_write_X509(f, x) == 1;
    if (cert_tmp_finish(f, cert_tmp, wrote) < 0) {
        snprintf(what, sizeof what, "cannot write certificate file %s", cert_path);
        cert_err(err, errlen, what);
        goto out;
    }

    if (rename(key_tmp, key_path) != 0) {
        snprintf(err, errlen, "cannot move key into %s: %s", key_path, strerror(errno));
        unlink(cert_tmp);
        goto out;
    }
    key_tmp_made = 0;
    if (rename(cert_tmp, cert_path) != 0) {
        snprintf(err, errlen, "cannot move certificate into %s: %s", cert_path,
                 strerror(errno));
        unlink(cert_tmp);
        /* A new key beside an old certificate would be a pair that fails to
         * load with a confusing message; leave neither. */
        unlink(key_path);
        goto out;
    }
    rc = 0;

out:
    if (key_tmp_made) unlink(key_tmp);
    X509_free(x);
    EVP_PKEY_free(key);
    ERR_clear_error();
    return rc;
}
