/* mailengine._core: multi-phase init (PEP 489), heap types, module state.
 * The Engine type lives in engine.c; this file has the module and its
 * plain functions (queue files, password hashes, certificates). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <string.h>

#include "py/bridge.h"
#include "py/module.h"
#include "queue/queue.h"
#include "queue/spool.h"
#include "store/maildir.h"
#include "store/store.h"
#include "store/users.h"
#include "tls/tls.h"

/* ---- queue files ---- */

#define QUEUE_HEAD_MAX 65536

struct list_ctx {
    PyObject *list;
    int failed;
};

static int list_cb(const struct spool_entry *e, void *arg)
{
    struct list_ctx *lc = arg;
    /* The header section (bounded) comes along so callers can show the
     * Message-ID without reading every message again. */
    size_t head = e->msg_len < QUEUE_HEAD_MAX ? e->msg_len : QUEUE_HEAD_MAX;
    const char *end = memmem(e->msg, head, "\r\n\r\n", 4);
    if (end) head = (size_t)(end - e->msg) + 2;
    PyObject *t = Py_BuildValue("(sKy#ny#)", e->id, (unsigned long long)e->arrival_ms, e->env,
                                (Py_ssize_t)e->env_len, (Py_ssize_t)e->msg_len, e->msg,
                                (Py_ssize_t)head);
    if (!t || PyList_Append(lc->list, t) < 0) {
        Py_XDECREF(t);
        lc->failed = 1;
        return 1;
    }
    Py_DECREF(t);
    return 0;
}

static PyObject *py_queue_list(PyObject *mod, PyObject *args)
{
    (void)mod;
    const char *dir;
    if (!PyArg_ParseTuple(args, "s", &dir)) return NULL;
    struct list_ctx lc = {.list = PyList_New(0)};
    if (!lc.list) return NULL;
    long rc = spool_scan(dir, list_cb, &lc);
    if (lc.failed) {
        Py_DECREF(lc.list);
        return NULL;
    }
    if (rc < 0) {
        Py_DECREF(lc.list);
        errno = (int)-rc;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, dir);
    }
    return lc.list;
}

struct read_ctx {
    const char *id;
    PyObject *result;
    int failed;
};

static int read_cb(const struct spool_entry *e, void *arg)
{
    struct read_ctx *rc = arg;
    if (strcmp(e->id, rc->id) != 0) return 0;
    rc->result = Py_BuildValue("(sKy#y#)", e->id, (unsigned long long)e->arrival_ms, e->env,
                               (Py_ssize_t)e->env_len, e->msg, (Py_ssize_t)e->msg_len);
    if (!rc->result) rc->failed = 1;
    return 1;
}

static PyObject *py_queue_read(PyObject *mod, PyObject *args)
{
    (void)mod;
    const char *dir, *id;
    if (!PyArg_ParseTuple(args, "ss", &dir, &id)) return NULL;
    struct read_ctx rc = {.id = id};
    long r = spool_scan(dir, read_cb, &rc);
    if (rc.failed) return NULL;
    if (r < 0) {
        errno = (int)-r;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, dir);
    }
    if (!rc.result) Py_RETURN_NONE;
    return rc.result;
}

/* Append a state-log line for id: True, False when no live message has
 * that id, OSError otherwise. */
static PyObject *queue_mark_common(const char *dir, const char *id, char letter)
{
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = spool_mark(dir, id, letter);
    Py_END_ALLOW_THREADS
    if (rc == -ENOENT) Py_RETURN_FALSE;
    if (rc < 0) {
        errno = -rc;
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, dir);
    }
    Py_RETURN_TRUE;
}

static PyObject *py_queue_delete(PyObject *mod, PyObject *args)
{
    (void)mod;
    const char *dir, *id;
    if (!PyArg_ParseTuple(args, "ss", &dir, &id)) return NULL;
    return queue_mark_common(dir, id, 'D');
}

static PyObject *py_queue_mark(PyObject *mod, PyObject *args)
{
    (void)mod;
    const char *dir, *id;
    int letter;
    if (!PyArg_ParseTuple(args, "ssC", &dir, &id, &letter)) return NULL;
    if (letter != 'H' && letter != 'U') {
        PyErr_SetString(PyExc_ValueError, "letter must be 'H' or 'U'");
        return NULL;
    }
    return queue_mark_common(dir, id, (char)letter);
}

/* ---- the Maildir store ---- */

static PyObject *py_maildir_path(PyObject *mod, PyObject *args)
{
    (void)mod;
    const char *root, *addr;
    if (!PyArg_ParseTuple(args, "ss", &root, &addr)) return NULL;
    char buf[4200];
    if (maildir_path(root, addr, buf, sizeof buf) < 0) {
        PyErr_Format(PyExc_ValueError, "%s cannot name a mailbox", addr);
        return NULL;
    }
    return PyUnicode_FromString(buf);
}

/* store_deliver(root, host, address, folder, prefix, message, quota_bytes=0,
 * quota_messages=0) -> id: one delivery through the Maildir store (quota,
 * folders), as the queue does it. OSError with the errno (EDQUOT: full). */
static PyObject *py_store_deliver(PyObject *mod, PyObject *args)
{
    (void)mod;
    const char *root, *host, *addr, *folder, *prefix, *msg;
    Py_ssize_t plen, mlen;
    unsigned long long qb = 0, qm = 0;
    if (!PyArg_ParseTuple(args, "ssssy#y#|KK", &root, &host, &addr, &folder, &prefix, &plen, &msg, &mlen,
                          &qb, &qm))
        return NULL;
    char user[320], id[STORE_ID_MAX];
    if (mailbox_of(addr, strlen(addr), user, sizeof user) < 0) {
        PyErr_Format(PyExc_ValueError, "%s cannot name a mailbox", addr);
        return NULL;
    }
    struct store *st = mailstore_new(root, host);
    if (!st) return PyErr_NoMemory();
    struct store_quota q = {qb, qm};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = st->ops->deliver(st, user, folder, &q, prefix, (size_t)plen, msg, (size_t)mlen, id, sizeof id);
    Py_END_ALLOW_THREADS
    st->ops->destroy(st);
    if (rc == -EINVAL) {
        PyErr_Format(PyExc_ValueError, "%s (folder %s) cannot name a mailbox", addr, folder);
        return NULL;
    }
    if (rc < 0) {
        errno = -rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyUnicode_FromString(id);
}

/* ---- passwords and certificates ---- */

static PyObject *py_hash_password(PyObject *mod, PyObject *args)
{
    (void)mod;
    const char *pw;
    unsigned rounds = 0;
    if (!PyArg_ParseTuple(args, "s|I", &pw, &rounds)) return NULL;
    char out[256];
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = users_hash_password(pw, rounds, out, sizeof out);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_SetString(PyExc_ValueError, "password hashing failed");
        return NULL;
    }
    return PyUnicode_FromString(out);
}

static PyObject *py_verify_password(PyObject *mod, PyObject *args)
{
    (void)mod;
    const char *stored, *pw;
    if (!PyArg_ParseTuple(args, "ss", &stored, &pw)) return NULL;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = users_verify_password(stored, pw);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_SetString(PyExc_ValueError, "unknown password hash format");
        return NULL;
    }
    return PyBool_FromLong(rc == 1);
}

static PyObject *py_hash_is_known(PyObject *mod, PyObject *args)
{
    (void)mod;
    const char *stored;
    if (!PyArg_ParseTuple(args, "s", &stored)) return NULL;
    return PyBool_FromLong(users_hash_is_known(stored) == 1);
}

static PyObject *py_generate_cert(PyObject *mod, PyObject *args)
{
    (void)mod;
    const char *cert, *key, *cn;
    if (!PyArg_ParseTuple(args, "sss", &cert, &key, &cn)) return NULL;
    char err[512] = "";
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = tls_cert_generate(cert, key, cn, err, sizeof err);
    Py_END_ALLOW_THREADS
    if (rc < 0) {
        PyErr_SetString(PyExc_OSError, err);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"queue_list", py_queue_list, METH_VARARGS,
     "queue_list(data_dir) -> [(id, arrival_ms, envelope, size, header_bytes)] of live queued messages"},
    {"queue_read", py_queue_read, METH_VARARGS,
     "queue_read(data_dir, id) -> (id, arrival_ms, envelope, message) or None"},
    {"queue_delete", py_queue_delete, METH_VARARGS,
     "queue_delete(data_dir, id) -> True if deleted, False if no such message"},
    {"queue_mark", py_queue_mark, METH_VARARGS,
     "queue_mark(data_dir, id, 'H'|'U') -> True if marked (hold/release for the next start)"},
    {"maildir_path", py_maildir_path, METH_VARARGS,
     "maildir_path(root, address) -> the address's Maildir directory"},
    {"store_deliver", py_store_deliver, METH_VARARGS,
     "store_deliver(root, host, address, folder, prefix, message, quota_bytes=0, quota_messages=0) -> id"},
    {"hash_password", py_hash_password, METH_VARARGS, "hash_password(password, rounds=0) -> str"},
    {"verify_password", py_verify_password, METH_VARARGS, "verify_password(stored, password) -> bool"},
    {"hash_is_known", py_hash_is_known, METH_VARARGS, "hash_is_known(stored) -> bool"},
    {"generate_cert", py_generate_cert, METH_VARARGS,
     "generate_cert(cert_path, key_path, common_name): self-signed certificate and key"},
    {NULL, NULL, 0, NULL},
};

static int module_exec(PyObject *mod)
{
    struct module_state *st = PyModule_GetState(mod);
    if (engine_type_add(mod, st) < 0) return -1;
    if (PyModule_AddIntConstant(mod, "HOOK_CONNECT", HOOK_CONNECT) < 0 ||
        PyModule_AddIntConstant(mod, "HOOK_HELO", HOOK_HELO) < 0 ||
        PyModule_AddIntConstant(mod, "HOOK_MAIL", HOOK_MAIL) < 0 ||
        PyModule_AddIntConstant(mod, "HOOK_RCPT", HOOK_RCPT) < 0 ||
        PyModule_AddIntConstant(mod, "HOOK_DATA", HOOK_DATA) < 0 ||
        PyModule_AddIntConstant(mod, "HOOK_AUTH", HOOK_AUTH) < 0 ||
        PyModule_AddIntConstant(mod, "EVENT_RECEIVED", EVENT_RECEIVED) < 0 ||
        PyModule_AddIntConstant(mod, "EVENT_DELIVERY", EVENT_DELIVERY) < 0 ||
        PyModule_AddIntConstant(mod, "HOOK_POLICY", HOOK_POLICY) < 0 ||
        PyModule_AddIntConstant(mod, "HOOK_DELIVER", HOOK_DELIVER) < 0 ||
        PyModule_AddIntConstant(mod, "QOP_HOLD", QOP_HOLD) < 0 ||
        PyModule_AddIntConstant(mod, "QOP_RELEASE", QOP_RELEASE) < 0 ||
        PyModule_AddIntConstant(mod, "QOP_RETRY", QOP_RETRY) < 0 ||
        PyModule_AddIntConstant(mod, "QOP_DELETE", QOP_DELETE) < 0 ||
        PyModule_AddIntConstant(mod, "QOP_FLUSH", QOP_FLUSH) < 0 ||
        PyModule_AddIntConstant(mod, "ACCEPT", HOOK_ACCEPT) < 0 ||
        PyModule_AddIntConstant(mod, "REJECT", HOOK_REJECT) < 0 ||
        PyModule_AddIntConstant(mod, "TEMPFAIL", HOOK_TEMPFAIL) < 0 ||
        PyModule_AddIntConstant(mod, "AUTHENTICATED", HOOK_AUTHENTICATED) < 0)
        return -1;
    return 0;
}

static int module_traverse(PyObject *mod, visitproc visit, void *arg)
{
    struct module_state *st = PyModule_GetState(mod);
    Py_VISIT(st->engine_type);
    Py_VISIT(st->request_type);
    return 0;
}

static int module_clear(PyObject *mod)
{
    struct module_state *st = PyModule_GetState(mod);
    Py_CLEAR(st->engine_type);
    Py_CLEAR(st->request_type);
    return 0;
}

static void module_free(void *mod) { module_clear((PyObject *)mod); }

static PyModuleDef_Slot module_slots[] = {
    {Py_mod_exec, module_exec},
    {0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT,
    .m_name = "mailengine._core",
    .m_doc = "The C core of mailengine: io_uring workers, SMTP, the spool.",
    .m_size = sizeof(struct module_state),
    .m_methods = module_methods,
    .m_slots = module_slots,
    .m_traverse = module_traverse,
    .m_clear = module_clear,
    .m_free = module_free,
};

PyMODINIT_FUNC PyInit__core(void) { return PyModuleDef_Init(&module_def); }
