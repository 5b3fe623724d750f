/* Shared between the module and its types. */
#ifndef PY_MODULE_H
#define PY_MODULE_H

#include <Python.h>

struct module_state {
    PyObject *engine_type;
    PyObject *request_type;
};

int engine_type_add(PyObject *mod, struct module_state *st);
struct delivery_cfg;
/* NULL with a Python exception set. */
struct delivery_cfg *delivery_cfg_from_dict(PyObject *d);

#endif
