/* The middleware's per-request path for cached keys, in C.

   Measured in a busy server, each Python-level operation this path took (a bytes method, a slice, a
   concatenation, a closure) cost several times its in-process price, because the code and data it touched
   were cold between requests. This module does the same work in two compact functions: nothing here is
   new logic, and `_fastpath.py` holds the pure-Python twin that runs wherever this module is not built.
   The answers must be the twin's; `tests/test_fastpath.py` runs the same cases on both, and the middleware
   and counter tests run on both.

   - FastPath(...)(scope, send): the middleware's whole path for a cached key, in one call (below).
   - find_cached(headers, entries, names, bearer, max_length): the cached target for the request's key, or
     None for anything else (no key, two keys, a miss, an expired or mismatched entry), which the general
     path then judges. `entries` is CachingResolver._entries: first hash -> (expiry, second hash, target).
   - CountingSend(send, target, units, add, statuses): the `send` wrapper that counts the response once
     its status is known: add(target, units) when an `http.response.start` carries a status in `statuses`.
   - Tally(max_targets, wake, overflow): the counter's buffer for the window being filled.
   - monotonic(): the clock the cache's expiries are written and read with (CLOCK_MONOTONIC).
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stddef.h>
#include <string.h>
#include <time.h>
#include <structmember.h>

static PyObject *str_type;
static PyObject *str_status;
static PyObject *str_response_start;
static PyObject *str_headers;
static PyObject *str_path;
static PyObject *str_state;
static PyObject *str_billing_target;
static PyObject *str_admissible;
static PyObject *str_healthy;

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

/* The cache entry's target for the request's single key, as a borrowed reference; NULL when there is
   none (with an exception set only on a real error). `entries` must be a dict and `names` a tuple. */
static PyObject *
lookup(PyObject *headers, PyObject *entries, PyObject *names, int bearer, Py_ssize_t max_length)
{
    /* ASGI servers give a list of (name, value) pairs of bytes; anything else is the general path's. */
    if (!PyList_Check(headers)) {
        return NULL;
    }
    const char *found = NULL;
    Py_ssize_t found_length = 0;
    Py_ssize_t count = PyList_GET_SIZE(headers), name_count = PyTuple_GET_SIZE(names);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *pair = PyList_GET_ITEM(headers, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            return NULL;
        }
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        if (!PyBytes_Check(name) || !PyBytes_Check(value)) {
            return NULL;
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
            return NULL; /* two keys: the general path refuses them */
        }
        found = key;
        found_length = key_length;
    }
    if (found == NULL || found_length > max_length) {
        return NULL;
    }
    /* Python's hash() of the key's bytes: the same function, and the same per-process secret. */
    PyObject *first = PyLong_FromSsize_t(_Py_HashBytes(found, found_length));
    if (first == NULL) {
        return NULL;
    }
    PyObject *entry = PyDict_GetItemWithError(entries, first); /* borrowed */
    Py_DECREF(first);
    if (entry == NULL) {
        return NULL;
    }
    if (!PyTuple_Check(entry) || PyTuple_GET_SIZE(entry) != 3) {
        return NULL;
    }
    PyObject *expiry = PyTuple_GET_ITEM(entry, 0), *second = PyTuple_GET_ITEM(entry, 1);
    if (!PyFloat_Check(expiry) || !PyLong_Check(second)) {
        return NULL;
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
        return NULL;
    }
    if (stored != check || PyFloat_AS_DOUBLE(expiry) <= monotonic_now()) {
        return NULL;
    }
    PyObject *target = PyTuple_GET_ITEM(entry, 2);
    return target == Py_None ? NULL : target;
}

static PyObject *
find_cached(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "find_cached(headers, entries, names, bearer, max_length)");
        return NULL;
    }
    if (!PyDict_Check(args[1]) || !PyTuple_Check(args[2])) {
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
    PyObject *target = lookup(args[0], args[1], args[2], bearer, max_length);
    if (target == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    return Py_NewRef(target);
}


static PyObject *
monotonic(PyObject *module, PyObject *unused)
{
    return PyFloat_FromDouble(monotonic_now());
}


/* Tally(max_targets, wake, overflow): the counter's buffer for the window being filled (Counter.add).
   add(target, units) adds to units per target id and keeps the latest target object per id; past
   max_targets distinct ids, units for new ids are dropped and counted, and overflow() is called; while
   `armed` is false, wake() is called (the counter starts its writer). take() hands over the two dicts
   and starts empty ones. */
typedef struct {
    PyObject_HEAD
    PyObject *buffer;
    PyObject *targets;
    PyObject *wake;
    PyObject *overflow;
    Py_ssize_t max_targets;
    long long counted_units;
    long long counted_requests;
    long long overflow_units;
    int armed;
} Tally;

static PyTypeObject TallyType;
static PyObject *str_target_id;

static int
tally_add(Tally *self, PyObject *target, PyObject *units)
{
    long long n = PyLong_AsLongLong(units);
    if (n == -1 && PyErr_Occurred()) {
        return -1;
    }
    PyObject *target_id = PyObject_GetAttr(target, str_target_id);
    if (target_id == NULL) {
        return -1;
    }
    int status = -1;
    self->counted_units += n;
    self->counted_requests += 1;
    PyObject *buffered = PyDict_GetItemWithError(self->buffer, target_id); /* borrowed */
    if (buffered == NULL && PyErr_Occurred()) {
        goto done;
    }
    if (buffered != NULL || PyDict_GET_SIZE(self->buffer) < self->max_targets) {
        PyObject *total = buffered != NULL ? PyNumber_Add(buffered, units) : Py_NewRef(units);
        if (total == NULL) {
            goto done;
        }
        int failed = PyDict_SetItem(self->buffer, target_id, total) < 0;
        Py_DECREF(total);
        /* The latest target object wins: it carries the latest period bounds. */
        if (failed || PyDict_SetItem(self->targets, target_id, target) < 0) {
            goto done;
        }
    }
    else {
        self->overflow_units += n;
        PyObject *result = PyObject_CallNoArgs(self->overflow);
        if (result == NULL) {
            goto done;
        }
        Py_DECREF(result);
    }
    if (!self->armed) {
        PyObject *result = PyObject_CallNoArgs(self->wake);
        if (result == NULL) {
            goto done;
        }
        Py_DECREF(result);
    }
    status = 0;
done:
    Py_DECREF(target_id);
    return status;
}

static PyObject *
tally_add_method(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "add(target, units)");
        return NULL;
    }
    if (tally_add((Tally *)op, args[0], args[1]) < 0) {
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
tally_take(PyObject *op, PyObject *unused)
{
    Tally *self = (Tally *)op;
    PyObject *buffer = PyDict_New(), *targets = PyDict_New();
    if (buffer == NULL || targets == NULL) {
        Py_XDECREF(buffer);
        Py_XDECREF(targets);
        return NULL;
    }
    PyObject *taken = PyTuple_Pack(2, self->buffer, self->targets);
    if (taken == NULL) {
        Py_DECREF(buffer);
        Py_DECREF(targets);
        return NULL;
    }
    Py_SETREF(self->buffer, buffer);
    Py_SETREF(self->targets, targets);
    return taken;
}

static Py_ssize_t
tally_length(PyObject *op)
{
    return PyDict_GET_SIZE(((Tally *)op)->buffer);
}

static PyObject *
tally_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {"max_targets", "wake", "overflow", NULL};
    Py_ssize_t max_targets;
    PyObject *wake, *overflow;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "nOO:Tally", keywords, &max_targets, &wake, &overflow)) {
        return NULL;
    }
    Tally *self = (Tally *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->buffer = PyDict_New();
    self->targets = PyDict_New();
    if (self->buffer == NULL || self->targets == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->wake = Py_NewRef(wake);
    self->overflow = Py_NewRef(overflow);
    self->max_targets = max_targets;
    return (PyObject *)self;
}

static int
tally_traverse(Tally *self, visitproc visit, void *arg)
{
    Py_VISIT(self->buffer);
    Py_VISIT(self->targets);
    Py_VISIT(self->wake);
    Py_VISIT(self->overflow);
    return 0;
}

static int
tally_clear(Tally *self)
{
    Py_CLEAR(self->buffer);
    Py_CLEAR(self->targets);
    Py_CLEAR(self->wake);
    Py_CLEAR(self->overflow);
    return 0;
}

static void
tally_dealloc(Tally *self)
{
    PyObject_GC_UnTrack(self);
    tally_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef tally_methods[] = {
    {"add", (PyCFunction)(void (*)(void))tally_add_method, METH_FASTCALL, "add(target, units)"},
    {"take", tally_take, METH_NOARGS, "take() -> (units per target id, target per id)"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef tally_members[] = {
    {"counted_units", T_LONGLONG, offsetof(Tally, counted_units), READONLY, NULL},
    {"counted_requests", T_LONGLONG, offsetof(Tally, counted_requests), READONLY, NULL},
    {"overflow_units", T_LONGLONG, offsetof(Tally, overflow_units), READONLY, NULL},
    {"armed", T_BOOL, offsetof(Tally, armed), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PySequenceMethods tally_as_sequence = {
    .sq_length = tally_length,
};

static PyTypeObject TallyType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "metered_middleware._speedups.Tally",
    .tp_doc = "Tally(max_targets, wake, overflow): units per target for the window being filled.",
    .tp_basicsize = sizeof(Tally),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = tally_new,
    .tp_dealloc = (destructor)tally_dealloc,
    .tp_traverse = (traverseproc)tally_traverse,
    .tp_clear = (inquiry)tally_clear,
    .tp_methods = tally_methods,
    .tp_members = tally_members,
    .tp_as_sequence = &tally_as_sequence,
};

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
                if (counted && Py_IS_TYPE(self->add, &TallyType)) {
                    if (tally_add((Tally *)self->add, self->target, self->units) < 0) {
                        return NULL;
                    }
                }
                else if (counted) {
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

/* FastPath(entries, names, bearer, max_length, add, statuses, counter, closed, weigh, excluded): the
   whole request path for a cached key, as one call: path(scope, send) puts the target in scope["state"]
   and returns the `send` to give the app (a CountingSend, or `send` itself for a route weighing 0 or an
   excluded path), or None when the general path must judge the request (no key, a miss, a refusal, Redis
   down in closed mode, a path not yet judged for exclusion). */
typedef struct {
    PyObject_HEAD
    PyObject *entries;
    PyObject *names;
    PyObject *add;
    PyObject *statuses;
    PyObject *counter;
    PyObject *weigh;
    PyObject *excluded;
    PyObject *one;
    Py_ssize_t max_length;
    int bearer;
    int closed;
    vectorcallfunc vectorcall;
} FastPath;


static PyObject *
fast_path_call(PyObject *op, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    FastPath *self = (FastPath *)op;
    if (PyVectorcall_NARGS(nargsf) != 2 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames))) {
        PyErr_SetString(PyExc_TypeError, "path(scope, send)");
        return NULL;
    }
    PyObject *scope = args[0], *send = args[1];
    if (!PyDict_Check(scope)) {
        Py_RETURN_NONE;
    }
    if (self->excluded != Py_None) {
        /* Excluded paths pass through unmetered; a path not judged yet goes to the general path, which
           judges it once and remembers the answer in this dict. */
        PyObject *path = PyDict_GetItemWithError(scope, str_path);
        PyObject *excluded = path == NULL ? NULL : PyDict_GetItemWithError(self->excluded, path);
        if (excluded == NULL) {
            if (PyErr_Occurred()) {
                return NULL;
            }
            Py_RETURN_NONE;
        }
        if (excluded == Py_True) {
            return Py_NewRef(send);
        }
    }
    PyObject *headers = PyDict_GetItemWithError(scope, str_headers);
    if (headers == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    PyObject *target = lookup(headers, self->entries, self->names, self->bearer, self->max_length);
    if (target == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    Py_INCREF(target); /* the entry may be replaced while the weigher runs */
    PyObject *result = NULL, *units = NULL;
    PyObject *admissible = PyObject_GetAttr(target, str_admissible);
    if (admissible == NULL) {
        goto done;
    }
    int admitted = PyObject_IsTrue(admissible);
    Py_DECREF(admissible);
    if (admitted < 0) {
        goto done;
    }
    if (admitted && self->closed) {
        PyObject *healthy = PyObject_GetAttr(self->counter, str_healthy);
        if (healthy == NULL) {
            goto done;
        }
        admitted = PyObject_IsTrue(healthy);
        Py_DECREF(healthy);
        if (admitted < 0) {
            goto done;
        }
    }
    if (!admitted) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    PyObject *state = PyDict_GetItemWithError(scope, str_state);
    if (state == NULL) {
        if (PyErr_Occurred()) {
            goto done;
        }
        state = PyDict_New();
        if (state == NULL || PyDict_SetItem(scope, str_state, state) < 0) {
            Py_XDECREF(state);
            goto done;
        }
        Py_DECREF(state); /* the scope holds it */
    }
    if (PyObject_SetItem(state, str_billing_target, target) < 0) {
        goto done;
    }
    if (self->weigh == Py_None) {
        units = Py_NewRef(self->one);
    }
    else {
        units = PyObject_CallOneArg(self->weigh, scope);
        if (units == NULL) {
            goto done;
        }
        int weightless = PyObject_Not(units);
        if (weightless < 0) {
            goto done;
        }
        if (weightless) {
            result = Py_NewRef(send);
            goto done;
        }
    }
    CountingSend *counting = PyObject_GC_New(CountingSend, &CountingSendType);
    if (counting == NULL) {
        goto done;
    }
    counting->send = Py_NewRef(send);
    counting->target = Py_NewRef(target);
    counting->units = Py_NewRef(units);
    counting->add = Py_NewRef(self->add);
    counting->statuses = Py_NewRef(self->statuses);
    counting->vectorcall = counting_send_call;
    PyObject_GC_Track(counting);
    result = (PyObject *)counting;
done:
    Py_XDECREF(units);
    Py_DECREF(target);
    return result;
}

static PyObject *
fast_path_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *keywords[] = {
        "entries", "names", "bearer", "max_length", "add", "statuses", "counter", "closed", "weigh",
        "excluded", NULL,
    };
    PyObject *entries, *names, *add, *statuses, *counter, *weigh, *excluded;
    int bearer, closed;
    Py_ssize_t max_length;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!pnOOOpOO:FastPath", keywords, &PyDict_Type, &entries,
                                     &PyTuple_Type, &names, &bearer, &max_length, &add, &statuses, &counter,
                                     &closed, &weigh, &excluded)) {
        return NULL;
    }
    if (excluded != Py_None && !PyDict_Check(excluded)) {
        PyErr_SetString(PyExc_TypeError, "FastPath: excluded must be a dict or None");
        return NULL;
    }
    if (!PyAnySet_Check(statuses)) {
        PyErr_SetString(PyExc_TypeError, "FastPath: statuses must be a set or frozenset");
        return NULL;
    }
    /* A tally's own bound add is called without a Python call at all (CountingSend checks the type). */
    if (PyCFunction_Check(add) && PyCFunction_GET_SELF(add) != NULL &&
        Py_IS_TYPE(PyCFunction_GET_SELF(add), &TallyType) &&
        PyCFunction_GET_FUNCTION(add) == (PyCFunction)(void (*)(void))tally_add_method) {
        add = PyCFunction_GET_SELF(add);
    }
    FastPath *self = (FastPath *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    self->one = PyLong_FromLong(1);
    if (self->one == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    self->entries = Py_NewRef(entries);
    self->names = Py_NewRef(names);
    self->add = Py_NewRef(add);
    self->statuses = Py_NewRef(statuses);
    self->counter = Py_NewRef(counter);
    self->weigh = Py_NewRef(weigh);
    self->excluded = Py_NewRef(excluded);
    self->bearer = bearer;
    self->closed = closed;
    self->max_length = max_length;
    self->vectorcall = fast_path_call;
    return (PyObject *)self;
}

static int
fast_path_traverse(FastPath *self, visitproc visit, void *arg)
{
    Py_VISIT(self->entries);
    Py_VISIT(self->names);
    Py_VISIT(self->add);
    Py_VISIT(self->statuses);
    Py_VISIT(self->counter);
    Py_VISIT(self->weigh);
    Py_VISIT(self->excluded);
    return 0;
}

static int
fast_path_clear(FastPath *self)
{
    Py_CLEAR(self->entries);
    Py_CLEAR(self->names);
    Py_CLEAR(self->add);
    Py_CLEAR(self->statuses);
    Py_CLEAR(self->counter);
    Py_CLEAR(self->weigh);
    Py_CLEAR(self->excluded);
    Py_CLEAR(self->one);
    return 0;
}

static void
fast_path_dealloc(FastPath *self)
{
    PyObject_GC_UnTrack(self);
    fast_path_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject FastPathType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "metered_middleware._speedups.FastPath",
    .tp_doc = "FastPath(...)(scope, send): the send to give the app for a cached key, or None.",
    .tp_basicsize = sizeof(FastPath),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = fast_path_new,
    .tp_dealloc = (destructor)fast_path_dealloc,
    .tp_traverse = (traverseproc)fast_path_traverse,
    .tp_clear = (inquiry)fast_path_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(FastPath, vectorcall),
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
    str_headers = PyUnicode_InternFromString("headers");
    str_state = PyUnicode_InternFromString("state");
    str_billing_target = PyUnicode_InternFromString("billing_target");
    str_admissible = PyUnicode_InternFromString("admissible");
    str_healthy = PyUnicode_InternFromString("healthy");
    str_path = PyUnicode_InternFromString("path");
    if (str_path == NULL) {
        return NULL;
    }
    str_target_id = PyUnicode_InternFromString("target_id");
    if (str_target_id == NULL) {
        return NULL;
    }
    if (str_headers == NULL || str_state == NULL || str_billing_target == NULL || str_admissible == NULL ||
        str_healthy == NULL) {
        return NULL;
    }
    if (PyType_Ready(&TallyType) < 0 || PyType_Ready(&CountingSendType) < 0 || PyType_Ready(&FastPathType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "CountingSend", (PyObject *)&CountingSendType) < 0 ||
        PyModule_AddObjectRef(module, "FastPath", (PyObject *)&FastPathType) < 0 ||
        PyModule_AddObjectRef(module, "Tally", (PyObject *)&TallyType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
