/* The Python store backend (store/store.h): every operation calls a method
 * of mailengine.storage's adapter around the user's Store object, on the
 * offload thread that runs the store job, taking the GIL for the call. The
 * adapter turns exceptions into error codes and logs them, so this side
 * only unpacks plain tuples. The Engine object holds the reference to the
 * adapter; this struct borrows it. */
#define PY_SSIZE_T_CLEAN
#include "py/pystore.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

struct pystore {
    struct store st;
    PyObject *adapter;            /* borrowed: the Engine object owns it */
};

struct pystore_mbox {
    struct store_mbox mb;
    char *user, *folder;
    char *strings;                /* the snapshot's ids and flags */
};

/* rc from an int result; -EIO when the adapter broke its own contract. */
static int int_result(PyObject *res)
{
    if (!res) {
        PyErr_Print();
        return -EIO;
    }
    long rc = PyLong_Check(res) ? PyLong_AsLong(res) : -EIO;
    Py_DECREF(res);
    return rc > 0 ? -EIO : (int)rc;
}

static int py_deliver(struct store *st, const char *user, const char *folder, const struct store_quota *q,
                      const char *prefix, size_t plen, const char *msg, size_t len, char *id, size_t idcap)
{
    struct pystore *ps = (struct pystore *)st;
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = -EIO;
    PyObject *data = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(plen + len));
    if (data) {
        memcpy(PyBytes_AS_STRING(data), prefix, plen);
        memcpy(PyBytes_AS_STRING(data) + plen, msg, len);
        PyObject *res = PyObject_CallMethod(ps->adapter, "deliver", "ssOKK", user, folder, data,
                                            (unsigned long long)(q ? q->bytes : 0),
                                            (unsigned long long)(q ? q->messages : 0));
        int r;
        const char *s;
        if (res && PyArg_ParseTuple(res, "is", &r, &s)) {
            rc = r > 0 ? -EIO : r;
            if (id && idcap) snprintf(id, idcap, "%s", s);
        } else {
            PyErr_Print();
        }
        Py_XDECREF(res);
        Py_DECREF(data);
    } else {
        PyErr_Print();
    }
    PyGILState_Release(g);
    return rc;
}

static int py_quota_check(struct store *st, const char *user, const struct store_quota *q, uint64_t size)
{
    struct pystore *ps = (struct pystore *)st;
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = int_result(PyObject_CallMethod(ps->adapter, "quota_check", "sKKK", user,
                                            (unsigned long long)size,
                                            (unsigned long long)(q ? q->bytes : 0),
                                            (unsigned long long)(q ? q->messages : 0)));
    PyGILState_Release(g);
    return rc;
}

/* Fill the snapshot from the adapter's (rc, uidvalidity, uidnext,
 * highestmodseq, [(uid, modseq, size, date, flags, id), ...]). */
static int fill(struct pystore_mbox *m, PyObject *res)
{
    int rc;
    unsigned long long uidvalidity, uidnext, hms;
    PyObject *list;
    if (!PyArg_ParseTuple(res, "iKKKO", &rc, &uidvalidity, &uidnext, &hms, &list)) return -EIO;
    if (rc < 0) return rc;
    PyObject *seq = PySequence_Fast(list, "messages");
    if (!seq) return -EIO;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    struct store_msg *msgs = calloc(n ? (size_t)n : 1, sizeof *msgs);
    /* One block for every id and flags string: (70 + 1) + (31 + 1) each. */
    char *strings = malloc(n ? (size_t)n * 104 : 1);
    if (!msgs || !strings) {
        free(msgs);
        free(strings);
        Py_DECREF(seq);
        return -ENOMEM;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long uid;
        unsigned long long modseq, size;
        long long date;
        const char *flags, *id;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "kKKLss", &uid, &modseq, &size, &date,
                              &flags, &id)) {
            free(msgs);
            free(strings);
            Py_DECREF(seq);
            return -EIO;
        }
        char *fs = strings + (size_t)i * 104, *is = fs + 32;
        snprintf(fs, 32, "%s", flags);
        size_t il = strlen(id);
        if (il > 70) il = 70;
        if (il == 0) il = (size_t)snprintf(is, 71, "%lu", uid);
        else memcpy(is, id, il);
        msgs[i].uid = (uint32_t)uid;
        msgs[i].modseq = modseq;
        msgs[i].size = size;
        msgs[i].internal_date = date;
        msgs[i].flags = fs;
        msgs[i].id = is;
        msgs[i].id_len = (uint8_t)il;
    }
    Py_DECREF(seq);
    free(m->strings);
    m->strings = strings;
    free(m->mb.msgs);
    m->mb.msgs = msgs;
    m->mb.n = (size_t)n;
    m->mb.uidvalidity = (uint32_t)uidvalidity;
    m->mb.uidnext = (uint32_t)uidnext;
    m->mb.highestmodseq = hms;
    return 0;
}

static int refresh(struct pystore_mbox *m)
{
    struct pystore *ps = (struct pystore *)m->mb.st;
    PyObject *res = PyObject_CallMethod(ps->adapter, "open", "ss", m->user, m->folder);
    int rc = res ? fill(m, res) : -EIO;
    if (PyErr_Occurred()) PyErr_Print();
    Py_XDECREF(res);
    return rc;
}

static void py_close(struct store_mbox *mb)
{
    struct pystore_mbox *m = (struct pystore_mbox *)mb;
    if (!m) return;
    free(m->mb.msgs);
    free(m->strings);
    free(m->user);
    free(m->folder);
    free(m);
}

static int py_open(struct store *st, const char *user, const char *folder, struct store_mbox **out)
{
    struct pystore_mbox *m = calloc(1, sizeof *m);
    if (!m) return -ENOMEM;
    m->mb.st = st;
    m->user = strdup(user);
    m->folder = strdup(folder);
    if (!m->user || !m->folder) {
        py_close(&m->mb);
        return -ENOMEM;
    }
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = refresh(m);
    PyGILState_Release(g);
    if (rc < 0) {
        py_close(&m->mb);
        return rc;
    }
    *out = &m->mb;
    return 0;
}

static int py_read(struct store_mbox *mb, uint32_t uid, char **data, size_t *len)
{
    struct pystore_mbox *m = (struct pystore_mbox *)mb;
    struct pystore *ps = (struct pystore *)mb->st;
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = -EIO;
    PyObject *res = PyObject_CallMethod(ps->adapter, "read", "ssk", m->user, m->folder, (unsigned long)uid);
    int r;
    const char *b;
    Py_ssize_t bl;
    if (res && PyArg_ParseTuple(res, "iy#", &r, &b, &bl)) {
        rc = r > 0 ? -EIO : r;
        if (rc == 0) {
            *data = malloc((size_t)bl + 1);
            if (*data) {
                memcpy(*data, b, (size_t)bl);
                *len = (size_t)bl;
            } else {
                rc = -ENOMEM;
            }
        }
    }
    if (PyErr_Occurred()) PyErr_Print();
    Py_XDECREF(res);
    PyGILState_Release(g);
    return rc;
}

static int py_expunge(struct store_mbox *mb, const uint32_t *uids, size_t n)
{
    struct pystore_mbox *m = (struct pystore_mbox *)mb;
    struct pystore *ps = (struct pystore *)mb->st;
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = -ENOMEM;
    PyObject *list = PyList_New((Py_ssize_t)n);
    for (size_t i = 0; list && i < n; i++) PyList_SET_ITEM(list, (Py_ssize_t)i, PyLong_FromUnsignedLong(uids[i]));
    if (list) {
        rc = int_result(PyObject_CallMethod(ps->adapter, "expunge", "ssO", m->user, m->folder, list));
        Py_DECREF(list);
        if (rc == 0) rc = refresh(m);
    }
    if (PyErr_Occurred()) PyErr_Print();
    PyGILState_Release(g);
    return rc;
}

static int py_set_flags(struct store_mbox *mb, uint32_t uid, const char *flags)
{
    struct pystore_mbox *m = (struct pystore_mbox *)mb;
    struct pystore *ps = (struct pystore *)mb->st;
    PyGILState_STATE g = PyGILState_Ensure();
    int rc = int_result(PyObject_CallMethod(ps->adapter, "set_flags", "ssks", m->user, m->folder,
                                            (unsigned long)uid, flags));
    if (rc == 0) rc = refresh(m);
    PyGILState_Release(g);
    return rc;
}

static void py_destroy(struct store *st)
{
    free(st);
}

static const struct store_ops pystore_ops = {
    .name = "python",
    .deliver = py_deliver,
    .quota_check = py_quota_check,
    .open = py_open,
    .read = py_read,
    .expunge = py_expunge,
    .set_flags = py_set_flags,
    .close = py_close,
    .destroy = py_destroy,
};

struct store *pystore_new(PyObject *adapter)
{
    struct pystore *ps = calloc(1, sizeof *ps);
    if (!ps) return NULL;
    ps->st.ops = &pystore_ops;
    ps->adapter = adapter;
    return &ps->st;
}
