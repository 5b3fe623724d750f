/* The store backend that calls a Python object (see pystore.c). */
#ifndef PY_PYSTORE_H
#define PY_PYSTORE_H

#ifndef PY_SSIZE_T_CLEAN
#define PY_SSIZE_T_CLEAN
#endif
#include <Python.h>

#include "store/store.h"

/* A store whose operations call adapter's methods (mailengine.storage
 * adapter protocol) with the GIL taken. adapter is borrowed: keep it alive
 * for as long as the store is. NULL on allocation failure. */
struct store *pystore_new(PyObject *adapter);

#endif
