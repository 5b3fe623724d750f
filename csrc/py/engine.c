/* The Engine and Request types. Engine turns the validated configuration
 * dict from mailengine/config.py into struct me_config, starts and stops
 * the C engine with the GIL released, and hands hook requests to Python as
 * Request objects whose reply() goes back to the waiting session. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <string.h>
#include <sys/socket.h>

#include "core/log.h"
#include "core/worker.h"
#include "py/bridge.h"
#include "py/module.h"
#include "queue/queue.h"
#include "core/buf.h"
#include "py/pystore.h"
#include "store/aliases.h"
#include "store/users.h"
#include "tls/tls.h"

typedef struct {
    PyObject_HEAD
    struct engine eng;
    struct me_config cfg;
    struct bridge bridge;
    int state;               /* 0 new, 1 running, 2 stopped */
    PyObject *request_type;
    PyObject *store_adapter; /* a Python store (mailengine.storage), or NULL */
} EngineObject;

typedef struct {
    PyObject_HEAD
    struct hook_req *req;    /* NULL once replied */
    PyObject *engine;        /* keeps the workers' memory alive until we reply */
} RequestObject;

/* ---- Request ---- */

static PyObject *arg_str(const struct hook_req *r, int i)
{
    if (!r->args[i]) Py_RETURN_NONE;
    return PyUnicode_DecodeUTF8(r->args[i], (Py_ssize_t)r->arg_lens[i], "surrogateescape");
}

static PyObject *request_get_kind(RequestObject *self, void *c)
{
    (void)c;
    if (!self->req) Py_RETURN_NONE;
    return PyLong_FromLong(self->req->kind);
}

static PyObject *request_get_session(RequestObject *self, void *c)
{
    (void)c;
    struct hook_req *r = self->req;
    if (!r) Py_RETURN_NONE;
    return Py_BuildValue("(NNiNNNO)", arg_str(r, HARG_SESSION_ID), arg_str(r, HARG_PEER_IP),
                         r->peer_port, arg_str(r, HARG_LISTENER), arg_str(r, HARG_HELO),
                         arg_str(r, HARG_AUTH_USER), r->tls ? Py_True : Py_False);
}

static PyObject *request_get_args(RequestObject *self, void *c)
{
    (void)c;
    struct hook_req *r = self->req;
    if (!r) Py_RETURN_NONE;
    return Py_BuildValue("(NNN)", arg_str(r, HARG_1), arg_str(r, HARG_2), arg_str(r, HARG_3));
}

static PyObject *request_get_data(RequestObject *self, void *c)
{
    (void)c;
    struct hook_req *r = self->req;
    if (!r || !r->data) Py_RETURN_NONE;
    return PyBytes_FromStringAndSize(r->data, (Py_ssize_t)r->data_len);
}

static PyObject *request_reply(RequestObject *self, PyObject *args)
{
    int action = HOOK_ACCEPT, code = 0;
    const char *text = "";
    if (!PyArg_ParseTuple(args, "i|is", &action, &code, &text)) return NULL;
    if (!self->req) {
        PyErr_SetString(PyExc_RuntimeError, "request already answered");
        return NULL;
    }
    if (action < HOOK_ACCEPT || action > HOOK_AUTHENTICATED) {
        PyErr_SetString(PyExc_ValueError, "unknown hook action");
        return NULL;
    }
    struct hook_req *r = self->req;
    self->req = NULL;
    r->action = action;
    r->code = code;
    /* Replies are single lines: drop anything that could end one. */
    size_t n = 0;
    for (const char *p = text; *p && n < sizeof r->text - 1; p++)
        r->text[n++] = (*p == '\r' || *p == '\n') ? ' ' : *p;
    r->text[n] = 0;
    bridge_reply(r);
    Py_RETURN_NONE;
}

static void request_dealloc(RequestObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    if (self->req) {
        /* Never leave a session waiting: an unanswered hook is a 451. */
        struct hook_req *r = self->req;
        self->req = NULL;
        r->action = HOOK_TEMPFAIL;
        r->code = 451;
        snprintf(r->text, sizeof r->text, "4.3.0 Error: policy hook gave no answer");
        bridge_reply(r);
    }
    Py_CLEAR(self->engine);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static PyGetSetDef request_getset[] = {
    {"kind", (getter)request_get_kind, NULL, "hook kind (HOOK_* / EVENT_*)", NULL},
    {"session", (getter)request_get_session, NULL,
     "(session_id, peer_ip, peer_port, listener, helo, auth_user, tls)", NULL},
    {"args", (getter)request_get_args, NULL, "the hook's arguments (three strings or None)", NULL},
    {"data", (getter)request_get_data, NULL, "message bytes (DATA hook) or None", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMethodDef request_methods[] = {
    {"reply", (PyCFunction)request_reply, METH_VARARGS, "reply(action, code=0, text='')"},
    {NULL, NULL, 0, NULL},
};

static PyType_Slot request_slots[] = {
    {Py_tp_dealloc, request_dealloc},
    {Py_tp_getset, request_getset},
    {Py_tp_methods, request_methods},
    {Py_tp_doc, "A pending hook call or event from a worker."},
    {0, NULL},
};

static PyType_Spec request_spec = {
    .name = "mailengine._core.Request",
    .basicsize = sizeof(RequestObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_DISALLOW_INSTANTIATION,
    .slots = request_slots,
};

/* ---- configuration ---- */

static char *dict_str(PyObject *d, const char *key, const char *dflt)
{
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v || v == Py_None) return dflt ? strdup(dflt) : NULL;
    const char *s = PyUnicode_AsUTF8(v);
    if (!s) return NULL;
    return strdup(s);
}

static int dict_long(PyObject *d, const char *key, long long dflt, long long *out)
{
    PyObject *v = PyDict_GetItemString(d, key);
    if (!v || v == Py_None) {
        *out = dflt;
        return 0;
    }
    if (PyFloat_Check(v)) {
        *out = (long long)PyFloat_AsDouble(v);
        return 0;
    }
    *out = PyLong_AsLongLong(v);
    if (*out == -1 && PyErr_Occurred()) return -1;
    return 0;
}

static int parse_cidr(const char *s, struct cidr *c)
{
    char buf[128];
    snprintf(buf, sizeof buf, "%s", s);
    char *slash = strchr(buf, '/');
    int prefix = -1;
    if (slash) {
        *slash = 0;
        prefix = atoi(slash + 1);
    }
    memset(c, 0, sizeof *c);
    if (inet_pton(AF_INET, buf, c->addr) == 1) {
        c->family = AF_INET;
        if (prefix < 0) prefix = 32;
        if (prefix > 32) return -1;
    } else if (inet_pton(AF_INET6, buf, c->addr) == 1) {
        c->family = AF_INET6;
        if (prefix < 0) prefix = 128;
        if (prefix > 128) return -1;
    } else {
        return -1;
    }
    c->prefix = (uint8_t)prefix;
    return 0;
}

static void config_free(struct me_config *cfg)
{
    free(cfg->data_dir);
    free(cfg->hostname);
    for (size_t i = 0; i < cfg->nlisteners; i++) {
        free(cfg->listeners[i].name);
        free(cfg->listeners[i].host);
    }
    free(cfg->listeners);
    for (size_t i = 0; i < cfg->ndomains; i++) free(cfg->domains[i]);
    free(cfg->domains);
    free(cfg->trusted);
    if (cfg->users) users_free(cfg->users);
    aliases_free(cfg->aliases);
    if (cfg->tls) tls_ctx_free(cfg->tls);
    delivery_cfg_free(cfg->delivery);
    memset(cfg, 0, sizeof *cfg);
}

#define FAIL(...) do { PyErr_Format(PyExc_ValueError, __VA_ARGS__); goto fail; } while (0)

static int config_from_dict(struct me_config *cfg, PyObject *d)
{
    memset(cfg, 0, sizeof *cfg);
    long long v;
    cfg->data_dir = dict_str(d, "data_dir", NULL);
    if (!cfg->data_dir) FAIL("data_dir: required");
    cfg->hostname = dict_str(d, "hostname", "localhost");
    if (dict_long(d, "workers", 2, &v) < 0) goto fail;
    if (v < 1 || v > 256) FAIL("workers: must be between 1 and 256");
    cfg->workers = (int)v;
    if (dict_long(d, "log_level", LOG_WARN, &v) < 0) goto fail;
    cfg->log_level = (int)v;

    PyObject *ls = PyDict_GetItemString(d, "listeners");
    if (ls && ls != Py_None) {
        Py_ssize_t n = PySequence_Length(ls);
        if (n < 0) goto fail;
        cfg->listeners = calloc((size_t)n + 1, sizeof *cfg->listeners);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = PySequence_GetItem(ls, i);
            if (!item) goto fail;
            struct listener_cfg *lc = &cfg->listeners[cfg->nlisteners++];
            lc->name = dict_str(item, "name", "smtp");
            lc->host = dict_str(item, "host", "127.0.0.1");
            char *kind = dict_str(item, "kind", "mx");
            long long port;
            int rc = dict_long(item, "port", 25, &port);
            Py_DECREF(item);
            if (rc < 0) {
                free(kind);
                goto fail;
            }
            lc->port = (int)port;
            if (strcmp(kind, "mx") == 0) lc->kind = LISTENER_MX;
            else if (strcmp(kind, "submission") == 0) lc->kind = LISTENER_SUBMISSION;
            else if (strcmp(kind, "smtps") == 0) lc->kind = LISTENER_SMTPS;
            else if (strcmp(kind, "pop3") == 0) lc->kind = LISTENER_POP3;
            else if (strcmp(kind, "pop3s") == 0) lc->kind = LISTENER_POP3S;
            else {
                PyErr_Format(PyExc_ValueError, "listeners[%zd].kind: unknown kind %s", i, kind);
                free(kind);
                goto fail;
            }
            free(kind);
        }
    }
    PyObject *doms = PyDict_GetItemString(d, "domains");
    if (doms && doms != Py_None) {
        Py_ssize_t n = PySequence_Length(doms);
        if (n < 0) goto fail;
        cfg->domains = calloc((size_t)n + 1, sizeof *cfg->domains);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = PySequence_GetItem(doms, i);
            const char *s = item ? PyUnicode_AsUTF8(item) : NULL;
            if (!s) {
                Py_XDECREF(item);
                goto fail;
            }
            cfg->domains[cfg->ndomains++] = strdup(s);
            Py_DECREF(item);
        }
    }
    PyObject *tn = PyDict_GetItemString(d, "trusted_networks");
    if (tn && tn != Py_None) {
        Py_ssize_t n = PySequence_Length(tn);
        if (n < 0) goto fail;
        cfg->trusted = calloc((size_t)n + 1, sizeof *cfg->trusted);
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = PySequence_GetItem(tn, i);
            const char *s = item ? PyUnicode_AsUTF8(item) : NULL;
            if (!s) {
                Py_XDECREF(item);
                goto fail;
            }
            int rc = parse_cidr(s, &cfg->trusted[cfg->ntrusted]);
            Py_DECREF(item);
            if (rc < 0) FAIL("trusted_networks[%zd]: not an address or network", i);
            cfg->ntrusted++;
        }
    }
    cfg->users = users_new();
    PyObject *us = PyDict_GetItemString(d, "users");
    if (us && us != Py_None) {
        Py_ssize_t n = PySequence_Length(us);
        if (n < 0) goto fail;
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = PySequence_GetItem(us, i);
            const char *name, *hash;
            unsigned long long qb = 0, qm = 0;
            if (!item || !PyArg_ParseTuple(item, "ss|KK", &name, &hash, &qb, &qm)) {
                Py_XDECREF(item);
                goto fail;
            }
            if (!users_hash_is_known(hash)) {
                Py_DECREF(item);
                FAIL("users[%zd]: password hash for %s is not in a known format", i, name);
            }
            users_add(cfg->users, name, hash);
            users_set_quota(cfg->users, name, qb, qm);
            Py_DECREF(item);
        }
    }
    PyObject *al = PyDict_GetItemString(d, "aliases");
    if (al && al != Py_None) {
        Py_ssize_t n = PySequence_Length(al);
        if (n < 0) goto fail;
        cfg->aliases = aliases_new();
        if (!cfg->aliases) FAIL("aliases: out of memory");
        for (Py_ssize_t i = 0; i < n; i++) {
            PyObject *item = PySequence_GetItem(al, i);
            const char *key, *target;
            if (!item || !PyArg_ParseTuple(item, "ss", &key, &target)) {
                Py_XDECREF(item);
                goto fail;
            }
            int rc = aliases_add(cfg->aliases, key, target);
            Py_DECREF(item);
            if (rc < 0) FAIL("aliases[%zd]: %s -> %s is not an alias", i, key, target);
        }
    }
    char *cert = dict_str(d, "tls_cert", NULL), *key = dict_str(d, "tls_key", NULL);
    if (cert && key) {
        char err[512];
        cfg->tls = tls_ctx_new_server(cert, key, err, sizeof err);
        if (!cfg->tls) {
            free(cert);
            free(key);
            FAIL("tls_cert: %s", err);
        }
    }
    free(cert);
    free(key);
    PyObject *b = PyDict_GetItemString(d, "allow_plain_auth");
    cfg->allow_plain_auth = b && PyObject_IsTrue(b) == 1;
    b = PyDict_GetItemString(d, "reject_unknown_local");
    cfg->reject_unknown_local = !b || PyObject_IsTrue(b) == 1;
    if (dict_long(d, "hooks", 0, &v) < 0) goto fail;
    cfg->hooks = (unsigned)v;

    PyObject *lim = PyDict_GetItemString(d, "limits");
    PyObject *empty = NULL;
    if (!lim || lim == Py_None) lim = empty = PyDict_New();
    struct smtp_limits *L = &cfg->limits;
    struct {
        const char *key;
        long long dflt;
        int is_seconds;
        void *dst;
        int size;
    } fields[] = {
        {"max_command_line", 2048, 0, &L->max_command_line, 8},
        {"max_text_line", 65536, 0, &L->max_text_line, 8},
        {"max_message_size", 26214400, 0, &L->max_message_size, 8},
        {"max_recipients", 1000, 0, &L->max_recipients, 4},
        {"max_errors", 20, 0, &L->max_errors, 4},
        {"max_auth_failures", 3, 0, &L->max_auth_failures, 4},
        {"max_connections", 10000, 0, &L->max_connections, 4},
        {"max_connections_per_ip", 50, 0, &L->max_connections_per_ip, 4},
    };
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        if (dict_long(lim, fields[i].key, fields[i].dflt, &v) < 0) {
            Py_XDECREF(empty);
            goto fail;
        }
        if (v < 0) {
            Py_XDECREF(empty);
            FAIL("limits.%s: must not be negative", fields[i].key);
        }
        if (fields[i].size == 8) *(size_t *)fields[i].dst = (size_t)v;
        else *(unsigned *)fields[i].dst = (unsigned)v;
    }
    struct {
        const char *key;
        double dflt;
        uint64_t *dst;
    } times[] = {
        {"auth_fail_delay", 1.0, &L->auth_fail_delay_ms},
        {"command_timeout", 300.0, &L->command_timeout_ms},
        {"data_timeout", 600.0, &L->data_timeout_ms},
        {"session_timeout", 3600.0, &L->session_timeout_ms},
        {"pop3_idle_timeout", 600.0, &L->pop3_idle_timeout_ms},
    };
    for (size_t i = 0; i < sizeof times / sizeof times[0]; i++) {
        PyObject *t = PyDict_GetItemString(lim, times[i].key);
        double secs = times[i].dflt;
        if (t && t != Py_None) {
            secs = PyFloat_AsDouble(t);
            if (secs == -1.0 && PyErr_Occurred()) {
                Py_XDECREF(empty);
                goto fail;
            }
        }
        if (!(secs >= 0 && secs < 1e12)) {          /* also NaN and infinity */
            Py_XDECREF(empty);
            FAIL("limits.%s: must be a non-negative number of seconds", times[i].key);
        }
        *times[i].dst = (uint64_t)(secs * 1000.0);
    }
    Py_XDECREF(empty);
    if (L->max_command_line < 512) FAIL("limits.max_command_line: at least 512 (RFC 5321 4.5.3.1.4)");
    if (L->max_text_line < 1000) FAIL("limits.max_text_line: at least 1000 (RFC 5321 4.5.3.1.6)");
    if (L->max_errors == 0) L->max_errors = 1;
    if (L->max_auth_failures == 0) L->max_auth_failures = 1;
    if (L->command_timeout_ms == 0 || L->data_timeout_ms == 0 || L->pop3_idle_timeout_ms == 0)
        FAIL("limits: timeouts must be positive");
    PyObject *dl = PyDict_GetItemString(d, "delivery");
    if (dl && dl != Py_None) {
        cfg->delivery = delivery_cfg_from_dict(dl);
        if (!cfg->delivery) goto fail;
    }
    return 0;
fail:
    config_free(cfg);
    return -1;
}

/* ---- Engine ---- */

static int engine_init(EngineObject *self, PyObject *args, PyObject *kw)
{
    (void)kw;
    PyObject *d;
    if (!PyArg_ParseTuple(args, "O!", &PyDict_Type, &d)) return -1;
    if (self->state == 1) {
        PyErr_SetString(PyExc_RuntimeError, "engine is running");
        return -1;
    }
    config_free(&self->cfg);
    if (config_from_dict(&self->cfg, d) < 0) return -1;
    if (self->bridge.efd <= 0 && bridge_init(&self->bridge) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

static PyObject *engine_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    (void)args;
    (void)kw;
    EngineObject *self = (EngineObject *)type->tp_alloc(type, 0);
    if (!self) return NULL;
    self->bridge.efd = -1;
    return (PyObject *)self;
}

static PyObject *engine_start_py(EngineObject *self, PyObject *unused)
{
    (void)unused;
    if (self->state != 0) {
        PyErr_SetString(PyExc_RuntimeError, self->state == 1 ? "engine already running"
                                                             : "engine was stopped; make a new one");
        return NULL;
    }
    log_set_level(self->cfg.log_level);
    memset(&self->eng, 0, sizeof self->eng);
    self->eng.cfg = &self->cfg;
    self->eng.bridge = &self->bridge;
    if (self->store_adapter && !(self->eng.store = pystore_new(self->store_adapter))) return PyErr_NoMemory();
    char err[512] = "";
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = engine_start(&self->eng, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_SetString(PyExc_OSError, err);
        return NULL;
    }
    self->state = 1;
    Py_RETURN_NONE;
}

/* set_store(adapter or None): the Python store replaces the Maildir one. */
static PyObject *engine_set_store(EngineObject *self, PyObject *adapter)
{
    if (self->state != 0) {
        PyErr_SetString(PyExc_RuntimeError, "the store is set before the engine starts");
        return NULL;
    }
    Py_XSETREF(self->store_adapter, adapter == Py_None ? NULL : Py_NewRef(adapter));
    Py_RETURN_NONE;
}

static PyObject *engine_fileno(EngineObject *self, PyObject *unused)
{
    (void)unused;
    return PyLong_FromLong(self->bridge.efd);
}

static PyObject *engine_drain(EngineObject *self, PyObject *unused)
{
    (void)unused;
    PyObject *list = PyList_New(0);
    if (!list) return NULL;
    PyTypeObject *rt = (PyTypeObject *)self->request_type;
    struct hook_req *r = bridge_take_all(&self->bridge);
    while (r) {
        struct hook_req *next = hook_req_next(r);
        RequestObject *ro = (RequestObject *)rt->tp_alloc(rt, 0);
        if (!ro) {
            /* Answer what we cannot hand over so no session waits forever. */
            for (; r; r = next) {
                next = hook_req_next(r);
                r->action = HOOK_TEMPFAIL;
                r->code = 451;
                snprintf(r->text, sizeof r->text, "4.3.0 Error: out of memory");
                bridge_reply(r);
            }
            Py_DECREF(list);
            return NULL;
        }
        ro->req = r;
        ro->engine = Py_NewRef((PyObject *)self);
        PyList_Append(list, (PyObject *)ro);
        Py_DECREF(ro);
        r = next;
    }
    return list;
}

static PyObject *engine_stop_py(EngineObject *self, PyObject *args)
{
    double timeout = 30.0;
    if (!PyArg_ParseTuple(args, "|d", &timeout)) return NULL;
    if (self->state != 1) Py_RETURN_NONE;
    engine_request_stop(&self->eng, (uint64_t)(timeout * 1000.0));
    Py_RETURN_NONE;
}

static PyObject *engine_join_py(EngineObject *self, PyObject *unused)
{
    (void)unused;
    if (self->state != 1) Py_RETURN_NONE;
    Py_BEGIN_ALLOW_THREADS
    engine_join(&self->eng);
    Py_END_ALLOW_THREADS
    self->state = 2;
    Py_RETURN_NONE;
}

static int queue_usable(EngineObject *self)
{
    if (self->state != 1 || !self->eng.queue || atomic_load(&self->eng.stop_posted)) {
        PyErr_SetString(PyExc_RuntimeError, "the engine is not running (or has no queue)");
        return 0;
    }
    return 1;
}

/* Envelope lines with every local recipient put through the aliases, as
 * the SMTP server does at RCPT: a new malloc'd envelope, or NULL when
 * nothing changed (or on allocation failure: the envelope stays as is).
 * An alias loop or one with too many targets sets *bad (-ELOOP, -E2BIG)
 * and names the recipient in badaddr. */
static char *expand_aliases(const struct me_config *cfg, const char *env, size_t len, size_t *out_len,
                            int *bad, char *badaddr, size_t badcap)
{
    struct bytebuf out = {0};
    struct alias_result *res = malloc(sizeof *res);
    bool changed = false;
    const char *p = env, *end = env + len;
    while (res && p < end) {
        const char *nl = memchr(p, '\n', (size_t)(end - p));
        const char *le = nl ? nl : end;
        const char *tab = memchr(p, '\t', (size_t)(le - p));
        const char *ae = tab ? tab : le;
        const char *at = p + 2 < ae ? memrchr(p + 2, '@', (size_t)(ae - p - 2)) : NULL;
        int rc = le - p > 2 && p[0] == 'R' && p[1] == ' ' && at &&
                         config_is_local_domain(cfg, at + 1, (size_t)(ae - at - 1))
                     ? aliases_resolve(cfg->aliases, p + 2, (size_t)(ae - p - 2), users_is_mailbox, cfg->users, res)
                     : 0;
        if (rc == -ELOOP || rc == -E2BIG) {
            *bad = rc;
            snprintf(badaddr, badcap, "%.*s", (int)(ae - p - 2), p + 2);
            changed = false;
            break;
        }
        if (rc == 1) {
            char x[700];
            int xl = aliases_xtext(p + 2, (size_t)(ae - p - 2), x, sizeof x);
            for (unsigned i = 0; i < res->n; i++) {
                bytebuf_append(&out, "R ", 2);
                bytebuf_append(&out, res->addr[i], strlen(res->addr[i]));
                if (xl >= 0) {
                    bytebuf_append(&out, "\tORCPT=rfc822;", 14);
                    bytebuf_append(&out, x, (size_t)xl);
                }
                bytebuf_append(&out, "\n", 1);
            }
            changed = true;
        } else {
            bytebuf_append(&out, p, (size_t)(le - p));
            bytebuf_append(&out, "\n", 1);
        }
        p = nl ? nl + 1 : end;
    }
    free(res);
    if (!changed || !out.data) {
        free(out.data);
        return NULL;
    }
    *out_len = bytebuf_used(&out);
    char *r = malloc(*out_len + 1);
    if (r) memcpy(r, bytebuf_head(&out), *out_len);
    free(out.data);
    return r;
}

/* submit([(envelope_bytes, message_bytes), ...]) -> [queue id or None, ...]:
 * durable when it returns. */
static PyObject *engine_submit(EngineObject *self, PyObject *arg)
{
    if (!queue_usable(self)) return NULL;
    PyObject *seq = PySequence_Fast(arg, "submit() takes a list of (envelope, message) pairs");
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    struct queue_item *items = calloc(n ? (size_t)n : 1, sizeof *items);
    if (!items) {
        Py_DECREF(seq);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *t = PySequence_Fast_GET_ITEM(seq, i);
        const char *env, *msg;
        Py_ssize_t el, ml;
        if (!PyArg_ParseTuple(t, "y#y#", &env, &el, &msg, &ml)) goto fail;
        items[i].env = malloc((size_t)el + 1);
        items[i].msg = malloc((size_t)ml + 1);
        if (!items[i].env || !items[i].msg) {
            PyErr_NoMemory();
            goto fail;
        }
        memcpy(items[i].env, env, (size_t)el);
        items[i].env_len = (size_t)el;
        if (self->eng.cfg->aliases) {
            size_t nl = 0;
            int bad = 0;
            char badaddr[320];
            char *x = expand_aliases(self->eng.cfg, env, (size_t)el, &nl, &bad, badaddr, sizeof badaddr);
            if (bad) {
                PyErr_Format(PyExc_ValueError, "recipients: the alias %s %s", badaddr,
                             bad == -ELOOP ? "loops" : "expands to too many recipients");
                goto fail;
            }
            if (x) {
                free(items[i].env);
                items[i].env = x;
                items[i].env_len = nl;
            }
        }
        memcpy(items[i].msg, msg, (size_t)ml);
        items[i].msg_len = (size_t)ml;
    }
    Py_DECREF(seq);
    Py_BEGIN_ALLOW_THREADS
    queue_submit(self->eng.queue, items, (size_t)n);
    Py_END_ALLOW_THREADS
    PyObject *out = PyList_New(n);
    for (Py_ssize_t i = 0; out && i < n; i++) {
        PyObject *v = items[i].err ? Py_NewRef(Py_None) : PyUnicode_FromString(items[i].id);
        free(items[i].env);
        free(items[i].msg);
        if (!v) {
            Py_CLEAR(out);
            break;
        }
        PyList_SET_ITEM(out, i, v);
    }
    free(items);
    return out;
fail:
    for (Py_ssize_t i = 0; i < n; i++) {
        free(items[i].env);
        free(items[i].msg);
    }
    free(items);
    Py_DECREF(seq);
    return NULL;
}

static PyObject *engine_queue_control(EngineObject *self, PyObject *args)
{
    int op;
    const char *id = NULL;
    if (!PyArg_ParseTuple(args, "i|z", &op, &id)) return NULL;
    if (op < QOP_HOLD || op > QOP_FLUSH) {
        PyErr_SetString(PyExc_ValueError, "unknown queue operation");
        return NULL;
    }
    if (!queue_usable(self)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = queue_control(self->eng.queue, (enum queue_op)op, id);
    Py_END_ALLOW_THREADS
    return PyLong_FromLong(rc);
}

static PyObject *engine_queue_stats(EngineObject *self, PyObject *unused)
{
    (void)unused;
    if (!queue_usable(self)) return NULL;
    struct queue_stats st;
    queue_get_stats(self->eng.queue, &st);
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K}", "messages", (unsigned long long)st.messages,
                         "connections", (unsigned long long)st.active_connections,
                         "delivered", (unsigned long long)st.delivered,
                         "deferred", (unsigned long long)st.deferred,
                         "bounced", (unsigned long long)st.bounced,
                         "expired", (unsigned long long)st.expired);
}

static PyObject *engine_get_running(EngineObject *self, void *c)
{
    (void)c;
    return PyBool_FromLong(self->state == 1 && atomic_load(&self->eng.running_workers) > 0);
}

static PyObject *engine_get_connections(EngineObject *self, void *c)
{
    (void)c;
    return PyLong_FromUnsignedLong(atomic_load(&self->eng.conns_total));
}

static void engine_dealloc(EngineObject *self)
{
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    if (self->state == 1) {
        engine_request_stop(&self->eng, 0);
        Py_BEGIN_ALLOW_THREADS
        engine_join(&self->eng);
        Py_END_ALLOW_THREADS
    }
    if (self->eng.workers) engine_free(&self->eng);
    if (self->bridge.efd >= 0) bridge_destroy(&self->bridge);
    config_free(&self->cfg);
    Py_CLEAR(self->request_type);
    Py_CLEAR(self->store_adapter);
    tp->tp_free(self);
    Py_DECREF(tp);
}

static int engine_traverse(EngineObject *self, visitproc visit, void *arg)
{
    Py_VISIT(self->request_type);
    Py_VISIT(self->store_adapter);
    Py_VISIT(Py_TYPE(self));
    return 0;
}

static PyMethodDef engine_methods[] = {
    {"start", (PyCFunction)engine_start_py, METH_NOARGS,
     "Open every listener and start the workers; raises OSError naming what failed."},
    {"fileno", (PyCFunction)engine_fileno, METH_NOARGS, "The eventfd that signals pending requests."},
    {"set_store", (PyCFunction)engine_set_store, METH_O,
     "set_store(adapter): mailboxes kept by a Python store (before start)."},
    {"drain", (PyCFunction)engine_drain, METH_NOARGS, "Take every pending Request."},
    {"stop", (PyCFunction)engine_stop_py, METH_VARARGS,
     "stop(timeout=30.0): stop accepting, let transactions finish for up to timeout seconds."},
    {"join", (PyCFunction)engine_join_py, METH_NOARGS, "Wait for the workers to end (GIL released)."},
    {"submit", (PyCFunction)engine_submit, METH_O,
     "submit([(envelope, message), ...]) -> [queue id or None]: durable on return."},
    {"queue_control", (PyCFunction)engine_queue_control, METH_VARARGS,
     "queue_control(op, id=None) -> count of messages affected, or -errno."},
    {"queue_stats", (PyCFunction)engine_queue_stats, METH_NOARGS, "Counters of the delivery queue."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef engine_getset[] = {
    {"running", (getter)engine_get_running, NULL, "True while workers run", NULL},
    {"connections", (getter)engine_get_connections, NULL, "open connections", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyObject *engine_new_with_state(PyTypeObject *type, PyObject *args, PyObject *kw);

static PyType_Slot engine_slots[] = {
    {Py_tp_new, engine_new_with_state},
    {Py_tp_init, engine_init},
    {Py_tp_dealloc, engine_dealloc},
    {Py_tp_traverse, engine_traverse},
    {Py_tp_methods, engine_methods},
    {Py_tp_getset, engine_getset},
    {Py_tp_doc, "Engine(config: dict): the C engine. Use mailengine.Engine instead."},
    {0, NULL},
};

static PyType_Spec engine_spec = {
    .name = "mailengine._core.Engine",
    .basicsize = sizeof(EngineObject),
    .flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .slots = engine_slots,
};

int engine_type_add(PyObject *mod, struct module_state *st)
{
    st->request_type = PyType_FromModuleAndSpec(mod, &request_spec, NULL);
    if (!st->request_type) return -1;
    st->engine_type = PyType_FromModuleAndSpec(mod, &engine_spec, NULL);
    if (!st->engine_type) return -1;
    if (PyModule_AddObjectRef(mod, "Engine", st->engine_type) < 0) return -1;
    if (PyModule_AddObjectRef(mod, "Request", st->request_type) < 0) return -1;
    return 0;
}

static PyObject *engine_new_with_state(PyTypeObject *type, PyObject *args, PyObject *kw)
{
    EngineObject *self = (EngineObject *)engine_new(type, args, kw);
    if (!self) return NULL;
    PyObject *mod = PyType_GetModule(type);
    if (!mod) {
        /* A subclass: find the module through the base type. */
        PyErr_Clear();
        mod = PyType_GetModule(type->tp_base);
    }
    if (!mod) {
        Py_DECREF(self);
        return NULL;
    }
    struct module_state *st = PyModule_GetState(mod);
    self->request_type = Py_NewRef(st->request_type);
    return (PyObject *)self;
}
