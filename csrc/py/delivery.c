/* The "delivery" part of the configuration dict (mailengine/config.py
 * validates it and names bad keys) turned into struct delivery_cfg: TLS
 * client contexts are made and DKIM keys loaded here, before any port
 * opens, so a bad file fails the start with its name. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <string.h>
#include <sys/socket.h>

#include "py/module.h"
#include "queue/queue.h"
#include "smtp/client.h"
#include "smtp/dkim.h"
#include "tls/tls.h"

static PyObject *get(PyObject *d, const char *key)
{
    PyObject *v = d ? PyDict_GetItemString(d, key) : NULL;
    return v == Py_None ? NULL : v;
}

static int get_str(PyObject *d, const char *key, char **out)
{
    PyObject *v = get(d, key);
    *out = NULL;
    if (!v) return 0;
    const char *s = PyUnicode_AsUTF8(v);
    if (!s) return -1;
    *out = strdup(s);
    if (!*out) {
        PyErr_NoMemory();
        return -1;
    }
    return 0;
}

static int get_double(PyObject *d, const char *key, double dflt, double *out)
{
    PyObject *v = get(d, key);
    *out = dflt;
    if (!v) return 0;
    *out = PyFloat_AsDouble(v);
    return *out == -1.0 && PyErr_Occurred() ? -1 : 0;
}

static int get_ms(PyObject *d, const char *key, double dflt_s, uint64_t *out)
{
    double s;
    if (get_double(d, key, dflt_s, &s) < 0) return -1;
    *out = s <= 0 ? 0 : (uint64_t)(s * 1000.0 + 0.5);
    return 0;
}

static int get_bool(PyObject *d, const char *key, bool dflt)
{
    PyObject *v = get(d, key);
    return v ? PyObject_IsTrue(v) == 1 : dflt;
}

static int tls_mode(const char *s, int dflt)
{
    if (!s) return dflt;
    if (strcmp(s, "none") == 0) return CLIENT_TLS_NONE;
    if (strcmp(s, "may") == 0) return CLIENT_TLS_MAY;
    if (strcmp(s, "required") == 0 || strcmp(s, "starttls") == 0) return CLIENT_TLS_REQUIRED;
    if (strcmp(s, "implicit") == 0) return CLIENT_TLS_IMPLICIT;
    return -1;
}

static struct tls_ctx *client_ctx(bool verify, const char *ca, const char *what)
{
    char err[256];
    struct tls_ctx *c = tls_ctx_new_client(verify, ca, err, sizeof err);
    if (!c) PyErr_Format(PyExc_ValueError, "%s: %s", what, err);
    return c;
}

static int policy_from(PyObject *d, struct dest_policy *p, const struct dest_policy *dflt,
                       const char *what)
{
    if (dflt) *p = *dflt;
    else memset(p, 0, sizeof *p);
    p->domain = NULL;
    p->tls_ca_file = NULL;
    p->tls_ctx = NULL;
    p->pool = NULL;
    if (get_str(d, "pool", &p->pool) < 0) return -1;
    if (!p->pool && dflt && dflt->pool && !(p->pool = strdup(dflt->pool))) {
        PyErr_NoMemory();
        return -1;
    }
    if (!dflt) {
        p->max_connections = 20;
        p->max_messages_per_connection = 1000;
        p->max_recipients = 50;
        p->tls = CLIENT_TLS_MAY;
    }
    double v;
    if (get_double(d, "max_connections", p->max_connections, &v) < 0) return -1;
    p->max_connections = (unsigned)v;
    if (get_double(d, "max_messages_per_connection", p->max_messages_per_connection, &v) < 0) return -1;
    p->max_messages_per_connection = (unsigned)v;
    if (get_double(d, "max_recipients", p->max_recipients, &v) < 0) return -1;
    p->max_recipients = (unsigned)v;
    if (get_double(d, "rate_per_second", p->rate_per_second, &p->rate_per_second) < 0 ||
        get_double(d, "rate_per_minute", p->rate_per_minute, &p->rate_per_minute) < 0 ||
        get_double(d, "rate_per_hour", p->rate_per_hour, &p->rate_per_hour) < 0)
        return -1;
    char *t = NULL;
    if (get_str(d, "tls", &t) < 0) return -1;
    int mode = tls_mode(t, p->tls);
    free(t);
    if (mode < 0 || mode == CLIENT_TLS_IMPLICIT) {
        PyErr_Format(PyExc_ValueError, "%s.tls: must be none, may or required", what);
        return -1;
    }
    p->tls = mode;
    p->tls_verify = get_bool(d, "tls_verify", dflt ? dflt->tls_verify : false);
    if (get_str(d, "tls_ca_file", &p->tls_ca_file) < 0) return -1;
    if (!p->tls_ca_file && dflt && dflt->tls_ca_file) p->tls_ca_file = strdup(dflt->tls_ca_file);
    if (p->tls != CLIENT_TLS_NONE && (p->tls_verify || p->tls_ca_file)) {
        p->tls_ctx = client_ctx(p->tls_verify, p->tls_ca_file, what);
        if (!p->tls_ctx) return -1;
    }
    return 0;
}

static int parse_addr(const char *s, struct conn_addr *a)
{
    memset(a, 0, sizeof *a);
    if (inet_pton(AF_INET, s, a->addr) == 1) a->family = AF_INET;
    else if (inet_pton(AF_INET6, s, a->addr) == 1) a->family = AF_INET6;
    else return -1;
    return 0;
}

struct delivery_cfg *delivery_cfg_from_dict(PyObject *d)
{
    struct delivery_cfg *dc = calloc(1, sizeof *dc);
    if (!dc) {
        PyErr_NoMemory();
        return NULL;
    }
    dc->enabled = get_bool(d, "enabled", true);
    dc->events_to_python = get_bool(d, "events_to_python", false);
    dc->policy_hook = get_bool(d, "policy_hook", false);
    double v;
    if (get_str(d, "dns", &dc->dns_servers) < 0) goto fail;
    if (get_str(d, "mail_dir", &dc->mail_dir) < 0) goto fail;
    if (get_str(d, "store_dir", &dc->store_dir) < 0) goto fail;
    if (get_double(d, "remote_port", 25, &v) < 0) goto fail;
    dc->remote_port = (int)v;
    if (get_ms(d, "retry_min", 300, &dc->retry_min_ms) < 0 ||
        get_ms(d, "retry_max", 4000, &dc->retry_max_ms) < 0 ||
        get_ms(d, "lifetime", 5 * 86400, &dc->lifetime_ms) < 0 ||
        get_ms(d, "delay_warning", 0, &dc->delay_warning_ms) < 0 ||
        get_ms(d, "connect_timeout", 30, &dc->connect_timeout_ms) < 0 ||
        get_ms(d, "reply_timeout", 300, &dc->reply_timeout_ms) < 0 ||
        get_ms(d, "idle_time", 2, &dc->idle_ms) < 0)
        goto fail;
    if (dc->retry_min_ms == 0) dc->retry_min_ms = 1;
    if (dc->retry_max_ms < dc->retry_min_ms) dc->retry_max_ms = dc->retry_min_ms;
    if (get_double(d, "bounce_max_return", 1 << 20, &v) < 0) goto fail;
    dc->bounce_max_return = (size_t)v;

    PyObject *relay = get(d, "relay");
    if (relay) {
        if (get_str(relay, "host", &dc->relay_host) < 0) goto fail;
        if (get_double(relay, "port", 25, &v) < 0) goto fail;
        dc->relay_port = (int)v;
        if (get_str(relay, "user", &dc->relay_user) < 0 || get_str(relay, "password", &dc->relay_pass) < 0)
            goto fail;
        char *t = NULL;
        if (get_str(relay, "tls", &t) < 0) goto fail;
        dc->relay_tls = tls_mode(t, CLIENT_TLS_MAY);
        free(t);
        if (dc->relay_tls < 0) {
            PyErr_SetString(PyExc_ValueError, "relay.tls: must be none, may, starttls or implicit");
            goto fail;
        }
        dc->relay_tls_verify = get_bool(relay, "tls_verify", false);
        if (get_str(relay, "tls_ca_file", &dc->relay_ca_file) < 0) goto fail;
        if (dc->relay_tls != CLIENT_TLS_NONE) {
            dc->relay_tls_ctx = client_ctx(dc->relay_tls_verify, dc->relay_ca_file, "relay");
            if (!dc->relay_tls_ctx) goto fail;
        }
    }
    if (policy_from(get(d, "default_policy"), &dc->def, NULL, "default_policy") < 0) goto fail;

    PyObject *dests = get(d, "destinations");
    if (dests) {
        Py_ssize_t n = PySequence_Length(dests);
        if (n < 0) goto fail;
        dc->dests = calloc((size_t)n + 1, sizeof *dc->dests);
        if (!dc->dests) goto nomem;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *it = PySequence_GetItem(dests, i);
            if (!it) goto fail;
            char what[64];
            snprintf(what, sizeof what, "destinations[%zd]", i);
            struct dest_policy *p = &dc->dests[dc->ndests];
            int rc = policy_from(it, p, &dc->def, what);
            if (rc == 0) {
                dc->ndests++;
                rc = get_str(it, "domain", &p->domain);
                if (rc == 0 && !p->domain) {
                    PyErr_Format(PyExc_ValueError, "%s.domain: required", what);
                    rc = -1;
                }
            }
            Py_DECREF(it);
            if (rc < 0) goto fail;
        }
    }
    PyObject *pools = get(d, "pools");
    if (pools) {
        Py_ssize_t n = PySequence_Length(pools);
        if (n < 0) goto fail;
        dc->pools = calloc((size_t)n + 1, sizeof *dc->pools);
        if (!dc->pools) goto nomem;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *it = PySequence_GetItem(pools, i);
            if (!it) goto fail;
            struct source_pool *sp = &dc->pools[dc->npools++];
            int rc = get_str(it, "name", &sp->name);
            PyObject *addrs = rc == 0 ? get(it, "addresses") : NULL;
            Py_ssize_t na = addrs ? PySequence_Length(addrs) : 0;
            if (rc == 0 && na > 0) {
                sp->addrs = calloc((size_t)na, sizeof *sp->addrs);
                for (Py_ssize_t k = 0; sp->addrs && k < na; k++) {
                    PyObject *a = PySequence_GetItem(addrs, k);
                    const char *s = a ? PyUnicode_AsUTF8(a) : NULL;
                    if (!s || parse_addr(s, &sp->addrs[sp->naddrs]) < 0) {
                        if (s) PyErr_Format(PyExc_ValueError, "pools[%zd].addresses: %s is not an IP address", i, s);
                        Py_XDECREF(a);
                        rc = -1;
                        break;
                    }
                    sp->naddrs++;
                    Py_DECREF(a);
                }
            }
            Py_DECREF(it);
            if (rc < 0) goto fail;
        }
    }
    PyObject *dk = get(d, "dkim");
    if (dk) {
        Py_ssize_t n = PySequence_Length(dk);
        if (n < 0) goto fail;
        dc->dkim = calloc((size_t)n + 1, sizeof *dc->dkim);
        if (!dc->dkim) goto nomem;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *it = PySequence_GetItem(dk, i);
            if (!it) goto fail;
            struct dkim_domain *k = &dc->dkim[dc->ndkim++];
            char *keyfile = NULL;
            int rc = get_str(it, "domain", &k->domain);
            if (rc == 0) rc = get_str(it, "selector", &k->selector);
            if (rc == 0) rc = get_str(it, "key_file", &keyfile);
            if (rc == 0) {
                char err[256];
                k->key = keyfile ? dkim_key_load(keyfile, err, sizeof err) : NULL;
                if (!k->key) {
                    PyErr_Format(PyExc_ValueError, "dkim[%zd].key_file: %s", i, keyfile ? err : "required");
                    rc = -1;
                }
            }
            free(keyfile);
            PyObject *hs = rc == 0 ? get(it, "headers") : NULL;
            if (hs) {
                Py_ssize_t nh = PySequence_Length(hs);
                k->headers = nh >= 0 ? calloc((size_t)nh + 1, sizeof *k->headers) : NULL;
                for (Py_ssize_t h = 0; k->headers && h < nh; h++) {
                    PyObject *x = PySequence_GetItem(hs, h);
                    const char *s = x ? PyUnicode_AsUTF8(x) : NULL;
                    k->headers[h] = s ? strdup(s) : NULL;
                    Py_XDECREF(x);
                    if (!k->headers[h]) {
                        rc = -1;
                        break;
                    }
                }
                if (!k->headers) rc = -1;
            }
            if (rc == 0 && k->domain && k->selector) {
                struct dkim_signer s = {.domain = k->domain, .selector = k->selector, .key = k->key,
                                        .headers = (const char *const *)k->headers};
                char err[256];
                if (dkim_signer_check(&s, err, sizeof err) < 0) {
                    PyErr_Format(PyExc_ValueError, "dkim[%zd]: %s", i, err);
                    rc = -1;
                }
            }
            Py_DECREF(it);
            if (rc < 0) {
                if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "dkim[%zd]: incomplete", i);
                goto fail;
            }
        }
    }
    return dc;
nomem:
    PyErr_NoMemory();
fail:
    delivery_cfg_free(dc);
    return NULL;
}
