/* The middleware's per-request path for cached keys, in C.

   Measured in a busy server, each Python-level operation this path took (a bytes method, a slice, a
   concatenation, a closure) cost several times its in-process price, because the code and data it touched
   were cold between requests. This module does the same work in two compact functions: nothing here is
   new logic, and `_fastpath.py` holds the pure-Python twin that runs wherever this module is not built.
   The answers must be the same as the general path's; `tests/test_fastpath.py` checks both against it.

   - find_cached(headers, entries, names, bearer, max_length): the cached target for the request's key, or
     None for anything else (no key, two keys, a miss, an expired or mismatched entry), which the general
     path then judges. `entries` is CachingResolver._entries: first hash -> (expiry, second hash, target).
   - CountingSend(send, target, units, add, statuses): the `send` wrapper that counts the response once
     its status is known: add(target, units) when an `http.response.start` carries a status in `statuses`.
   - monotonic(): the clock the cache's expiries are written and read with (CLOCK_MONOTONIC).
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <string.h>
#include <time.h>

static PyObject *str_type;
static PyObject *str_status;
static PyObject *str_response_start;

/* The general path prefixes the key with this byte for the fingerprint's second hash (_resolver.py). */
#define CHECK_PREFIX '\x01'

static double
monotonic_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static int
starts_with_bearer(const char *value, Py_ssize_t length)
{
    static const char bearer[] = "bearer ";
    if (length < 7) {
        return 0;
    }
    for (Py_ssize_t i = 0; i < 7; i++) {
        char c = value[i];
        if (c >= 'A' && c <= 'Z') {
            c = (char)(c + ('a' - 'A'));
        }
        if (c != bearer[i]) {
            return 0;
        }
    }
    return 1;
}

static PyObject *
find_cached(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "find_cached(headers, entries, names, bearer, max_length)");
        return NULL;
    }
    PyObject *headers = args[0], *entries = args[1], *names = args[2];
    if (!PyDict_Check(entries) || !PyTuple_Check(names)) {
        PyErr_SetString(PyExc_TypeError, "find_cached: entries must be a dict and names a tuple");
        return NULL;
    }
    int bearer = PyObject_IsTrue(args[3]);
    if (bearer < 0) {
        return NULL;
    }
    Py_ssize_t max_length = PyLong_AsSsize_t(args[4]);
    if (max_length == -1 && PyErr_Occurred()) {
        return NULL;
    }
    /* ASGI servers give a list of (name, value) pairs of bytes; anything else is the general path's. */
    if (!PyList_Check(headers)) {
        Py_RETURN_NONE;
    }
    const char *found = NULL;
    Py_ssize_t found_length = 0;
    Py_ssize_t count = PyList_GET_SIZE(headers), name_count = PyTuple_GET_SIZE(names);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *pair = PyList_GET_ITEM(headers, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            Py_RETURN_NONE;
        }
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        if (!PyBytes_Check(name) || !PyBytes_Check(value)) {
            Py_RETURN_NONE;
        }
        const char *name_bytes = PyBytes_AS_STRING(name);
        Py_ssize_t name_length = PyBytes_GET_SIZE(name);
        const char *key = PyBytes_AS_STRING(value);
        Py_ssize_t key_length = PyBytes_GET_SIZE(value);
        if (name_length == 13 && memcmp(name_bytes, "authorization", 13) == 0) {
            if (!bearer || !starts_with_bearer(key, key_length)) {
                continue;
            }
            key += 7;
            key_length -= 7;
        }
        else {
            int wanted = 0;
            for (Py_ssize_t j = 0; j < name_count; j++) {
                PyObject *candidate = PyTuple_GET_ITEM(names, j);
                if (PyBytes_Check(candidate) && PyBytes_GET_SIZE(candidate) == name_length &&
                    memcmp(PyBytes_AS_STRING(candidate), name_bytes, (size_t)name_length) == 0) {
                    wanted = 1;
                    break;
                }
            }
            if (!wanted) {
                continue;
            }
        }
        if (found != NULL) {
            Py_RETURN_NONE; /* two keys: the general path refuses them */
        }
        found = key;
        found_length = key_length;
    }
    if (found == NULL || found_length > max_length) {
        Py_RETURN_NONE;
    }
    /* Python's hash() of the key's bytes: the same function, and the same per-process secret. */
    PyObject *first = PyLong_FromSsize_t(_Py_HashBytes(found, found_length));
    if (first == NULL) {
        return NULL;
    }
    PyObject *entry = PyDict_GetItemWithError(entries, first); /* borrowed */
    Py_DECREF(first);
    if (entry == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 3) {
        Py_RETURN_NONE;
    }
    PyObject *expiry = PyTuple_GET_ITEM(entry, 0), *second = PyTuple_GET_ITEM(entry, 1);
    if (!PyFloat_Check(expiry) || !PyLong_Check(second)) {
        Py_RETURN_NONE;
    }
    char small[257];
    char *prefixed = small;
    if (found_length + 1 > (Py_ssize_t)sizeof(small)) {
        prefixed = PyMem_Malloc((size_t)found_length + 1);
        if (prefixed == NULL) {
            return PyErr_NoMemory();
        }
    }
    prefixed[0] = CHECK_PREFIX;
    memcpy(prefixed + 1, found, (size_t)found_length);
    Py_hash_t check = _Py_HashBytes(prefixed, found_length + 1);
    if (prefixed != small) {
        PyMem_Free(prefixed);
    }
    Py_ssize_t stored = PyLong_AsSsize_t(second);
    if (stored == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    if (stored != check || PyFloat_AS_DOUBLE(expiry) <= monotonic_now()) {
        Py_RETURN_NONE;
    }
    return Py_NewRef(PyTuple_GET_ITEM(entry, 2));
}

static PyObject *
monotonic(PyObject *module, PyObject *unused)
{
    return PyFloat_FromDouble(monotonic_now());
}

typedef struct {
    PyObject_HEAD
    PyObject *send;
    PyObject *target;
    PyObject *units;
    PyObject *add;
    PyObject *statuses;
    vectorcallfunc vectorcall;
} CountingSend;

static PyObject *
counting_send_call(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    CountingSend *self = (CountingSend *)op;
    if (PyVectorcall_NARGS(nargsf) != 1 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "send(message) takes one message");
        return NULL;
    }
    PyObject *message = args[0];
    if (PyDict_Check(message)) {
        PyObject *kind = PyDict_GetItemWithError(message, str_type);
        if (kind == NULL && PyErr_Occurred()) {
            return NULL;
        }
        if (kind != NULL && PyUnicode_Check(kind) &&
            (kind == str_response_start || PyUnicode_Compare(kind, str_response_start) == 0)) {
            PyObject *status = PyDict_GetItemWithError(message, str_status);
            if (status == NULL && PyErr_Occurred()) {
                return NULL;
            }
            if (status != NULL) {
                int counted = PySet_Contains(self->statuses, status);
                if (counted < 0) {
                    return NULL;
                }
                if (counted) {
                    PyObject *add_args[2] = {self->target, self->units};
                    PyObject *result = PyObject_Vectorcall(self->add, add_args, 2, NULL);
                    if (result == NULL) {
                        return NULL;
                    }
                    Py_DECREF(result);
                }
            }
        }
    }
    return PyObject_Vectorcall(self->send, args, 1, NULL);
}

static PyObject *
counting_send_new_vectorcall(PyObject *type, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (PyVectorcall_NARGS(nargsf) != 5 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "CountingSend(send, target, units, add, statuses)");
        return NULL;
    }
    if (!PyAnySet_Check(args[4])) {
        PyErr_SetString(PyExc_TypeError, "CountingSend: statuses must be a set or frozenset");
        return NULL;
    }
    CountingSend *self = PyObject_GC_New(CountingSend, (PyTypeObject *)type);
    if (self == NULL) {
        return NULL;
    }
    self->send = Py_NewRef(args[0]);
    self->target = Py_NewRef(args[1]);
    self->units = Py_NewRef(args[2]);
    self->add = Py_NewRef(args[3]);
    self->statuses = Py_NewRef(args[4]);
    self->vectorcall = counting_send_call;
    PyObject_GC_Track(self);
    return (PyObject *)self;
}

static PyObject *
counting_send_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    if (kwargs != NULL && PyDict_GET_SIZE(kwargs)) {
        PyErr_SetString(PyExc_TypeError, "CountingSend takes no keyword arguments");
        return NULL;
    }
    return counting_send_new_vectorcall(
        (PyObject *)type, &PyTuple_GET_ITEM(args, 0), (size_t)PyTuple_GET_SIZE(args), NULL);
}

static int
counting_send_traverse(CountingSend *self, visitproc visit, void *arg)
{
    Py_VISIT(self->send);
    Py_VISIT(self->target);
    Py_VISIT(self->units);
    Py_VISIT(self->add);
    Py_VISIT(self->statuses);
    return 0;
}

static int
counting_send_clear(CountingSend *self)
{
    Py_CLEAR(self->send);
    Py_CLEAR(self->target);
    Py_CLEAR(self->units);
    Py_CLEAR(self->add);
    Py_CLEAR(self->statuses);
    return 0;
}

static void
counting_send_dealloc(CountingSend *self)
{
    PyObject_GC_UnTrack(self);
    counting_send_clear(self);
    PyObject_GC_Del(self);
}

static PyTypeObject CountingSendType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "metered_middleware._speedups.CountingSend",
    .tp_doc = "CountingSend(send, target, units, add, statuses): send, counting a response once.",
    .tp_basicsize = sizeof(CountingSend),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = counting_send_new,
    .tp_dealloc = (destructor)counting_send_dealloc,
    .tp_traverse = (traverseproc)counting_send_traverse,
    .tp_clear = (inquiry)counting_send_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(CountingSend, vectorcall),
    .tp_vectorcall = counting_send_new_vectorcall,
};

static PyMethodDef methods[] = {
    {"find_cached", (PyCFunction)(void (*)(void))find_cached, METH_FASTCALL,
     "find_cached(headers, entries, names, bearer, max_length): the cached target, or None."},
    {"monotonic", monotonic, METH_NOARGS, "monotonic(): CLOCK_MONOTONIC seconds, the cache's clock."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "metered_middleware._speedups", NULL, -1, methods,
};

PyMODINIT_FUNC
PyInit__speedups(void)
{
    str_type = PyUnicode_InternFromString("type");
    str_status = PyUnicode_InternFromString("status");
    str_response_start = PyUnicode_InternFromString("http.response.start");
    if (str_type == NULL || str_status == NULL || str_response_start == NULL) {
        return NULL;
    }
    if (PyType_Ready(&CountingSendType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "CountingSend", (PyObject *)&CountingSendType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
