/* The middleware's per-request path for cached keys, in C.

   Measured in a busy server, each Python-level operation this path took (a bytes method, a slice, a
   concatenation, a closure) cost several times its in-process price, because the code and data it touched
   were cold between requests. This module does the same work in compact functions: nothing here is new
   logic, and `_fastpath.py` holds the pure-Python twins that run wherever this module is not built.
   The answers must be the twin's; `tests/test_fastpath.py` runs the same cases on both, and the middleware
   and counter tests run on both.

   - FastPath(...)(scope, send): the middleware's whole path for a cached key, in one call (below).
   - find_cached(headers, entries, names, bearer, max_length): the cached target for the request's key, or
     None for anything else (no key, two keys, a miss, an expired or mismatched entry), which the general
     path then judges. `entries` is CachingResolver._entries: first hash -> (expiry, second hash, target).
   - KeyTable(): those entries, one cache line each, in a flat table (the twin uses a dict). The first
     FastPath over a table binds it to its tally, and the open window's units for cached keys are then
     counted in the entries' own slots.
   - CountingSend(send, target, units, add, statuses): the `send` wrapper that counts the response once
     its status is known: add(target, units) when an `http.response.start` carries a status in `statuses`.
   - Tally(max_targets, wake, overflow): the counter's buffer for the window being filled.
   - monotonic(): the clock the cache's expiries are written and read with (CLOCK_MONOTONIC).
  - group_by_shard(...) and encode_lines(...): the count window, split per shard and turned into each
    count write's script arguments (Counter._take_buffer, CountStore._keys_and_args).
  - bind_target(BillingTarget): the class whose slots the functions above read at fixed offsets.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <structmember.h>

static PyObject *str_type;
static PyObject *str_status;
static PyObject *str_response_start;
static PyObject *str_headers;
static PyObject *str_path;
static PyObject *str_http;
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

/* The request's single key (Bearer or a key header) into *found, *found_length: 1 when there is one, 0
   when there is none, or two, or one too long, or headers that are not a list of pairs of bytes (which the
   general path then judges). `names` must be a tuple. */
static int
find_key(PyObject *headers, PyObject *names, int bearer, Py_ssize_t max_length, const char **key_out,
         Py_ssize_t *length_out)
{
    /* ASGI servers give a list of (name, value) pairs of bytes; anything else is the general path's. */
    if (!PyList_Check(headers)) {
        return 0;
    }
    const char *found = NULL;
    Py_ssize_t found_length = 0;
    Py_ssize_t count = PyList_GET_SIZE(headers), name_count = PyTuple_GET_SIZE(names);
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *pair = PyList_GET_ITEM(headers, i);
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2) {
            return 0;
        }
        PyObject *name = PyTuple_GET_ITEM(pair, 0), *value = PyTuple_GET_ITEM(pair, 1);
        if (!PyBytes_Check(name) || !PyBytes_Check(value)) {
            return 0;
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
            return 0; /* two keys: the general path refuses them */
        }
        found = key;
        found_length = key_length;
    }
    if (found == NULL || found_length > max_length) {
        return 0;
    }
    *key_out = found;
    *length_out = found_length;
    return 1;
}

/* The cache entry's target for the key, as a borrowed reference; NULL when there is none (with an
   exception set only on a real error). `entries` must be a dict. */
static PyObject *
dict_lookup(PyObject *entries, const char *found, Py_ssize_t found_length)
{
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

static PyTypeObject KeyTableType;
static PyObject *entries_lookup(PyObject *entries, const char *key, Py_ssize_t length, int *admissible_known,
                                int *admissible, int32_t *index);

static PyObject *
find_cached(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "find_cached(headers, entries, names, bearer, max_length)");
        return NULL;
    }
    if (!(PyDict_Check(args[1]) || Py_IS_TYPE(args[1], &KeyTableType)) || !PyTuple_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "find_cached: entries must be a dict or KeyTable and names a tuple");
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
    const char *key;
    Py_ssize_t length;
    int known, admissible;
    int32_t index;
    PyObject *target = find_key(args[0], args[2], bearer, max_length, &key, &length)
                           ? entries_lookup(args[1], key, length, &known, &admissible, &index)
                           : NULL;
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
    PyObject *table; /* the KeyTable whose slots hold part of this window's units (FastPath binds it), or NULL */
} Tally;

static PyTypeObject TallyType;
static uint32_t crc32_of(const char *data, Py_ssize_t length);
static int table_take_into(PyObject *table);
static Py_ssize_t table_pending(PyObject *table);
static PyObject *str_target_id;
static PyObject *str_period_start;
static PyObject *str_period_end;


/* BillingTarget's slots, read straight from the object: a frozen slots dataclass keeps each field at a
   fixed offset, which `bind_target(BillingTarget)` (at import, `_fastpath.py`) reads off the class's member
   descriptors. Generic attribute lookup (type dict, descriptor, member get) was the largest part of the
   per-line encoding and of each counted request. Any other type (a subclass) takes PyObject_GetAttr. */
static PyTypeObject *target_type;
static Py_ssize_t offset_target_id, offset_period_start, offset_period_end, offset_admissible;

static inline PyObject * /* new reference */
target_attr(PyObject *target, Py_ssize_t offset, PyObject *name)
{
    if (offset > 0 && Py_TYPE(target) == target_type) {
        PyObject *value = *(PyObject **)((char *)target + offset);
        if (value != NULL) {
            return Py_NewRef(value);
        }
    }
    return PyObject_GetAttr(target, name);
}

static Py_ssize_t
slot_offset(PyObject *cls, const char *name)
{
    PyObject *descr = PyObject_GetAttrString(cls, name);
    if (descr == NULL) {
        return -1;
    }
    Py_ssize_t offset = 0;
    if (Py_IS_TYPE(descr, &PyMemberDescr_Type)) {
        PyMemberDef *member = ((PyMemberDescrObject *)descr)->d_member;
        if (member->type == T_OBJECT_EX && !(member->flags & READ_RESTRICTED)) {
            offset = member->offset;
        }
    }
    Py_DECREF(descr);
    return offset; /* 0: not a plain slot; read with PyObject_GetAttr */
}

static PyObject *
bind_target(PyObject *module, PyObject *cls)
{
    if (!PyType_Check(cls)) {
        PyErr_SetString(PyExc_TypeError, "bind_target(cls): a class");
        return NULL;
    }
    Py_ssize_t offsets[4];
    const char *names[4] = {"target_id", "period_start", "period_end", "admissible"};
    for (int i = 0; i < 4; i++) {
        if ((offsets[i] = slot_offset(cls, names[i])) < 0) {
            return NULL;
        }
    }
    Py_XSETREF(target_type, (PyTypeObject *)Py_NewRef(cls));
    offset_target_id = offsets[0];
    offset_period_start = offsets[1];
    offset_period_end = offsets[2];
    offset_admissible = offsets[3];
    Py_RETURN_NONE;
}

static int
tally_add(Tally *self, PyObject *target, PyObject *units)
{
    long long n = PyLong_AsLongLong(units);
    if (n == -1 && PyErr_Occurred()) {
        return -1;
    }
    PyObject *target_id = target_attr(target, offset_target_id, str_target_id);
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

/* Add n units under the target's id to the tally's dicts, with no limit and no counted-request statistics:
   units counted already (in a KeyTable's slot) moving in. `latest`: the target replaces the one kept for
   its id; otherwise it is kept only where the id has none yet. */
static int
tally_merge(Tally *self, PyObject *target, long long n, int latest)
{
    PyObject *target_id = target_attr(target, offset_target_id, str_target_id);
    if (target_id == NULL) {
        return -1;
    }
    int status = -1;
    PyObject *units = NULL, *total = NULL;
    PyObject *buffered = PyDict_GetItemWithError(self->buffer, target_id); /* borrowed */
    if (buffered == NULL && PyErr_Occurred()) {
        goto done;
    }
    if ((units = PyLong_FromLongLong(n)) == NULL) {
        goto done;
    }
    total = buffered != NULL ? PyNumber_Add(buffered, units) : Py_NewRef(units);
    if (total == NULL) {
        goto done;
    }
    if (!latest) {
        int known = PyDict_Contains(self->targets, target_id);
        if (known < 0) {
            goto done;
        }
        latest = !known;
    }
    /* The target first: should the second write fail, the units are still where they were. */
    if (latest && PyDict_SetItem(self->targets, target_id, target) < 0) {
        goto done;
    }
    if (PyDict_SetItem(self->buffer, target_id, total) < 0) {
        goto done;
    }
    status = 0;
done:
    Py_XDECREF(units);
    Py_XDECREF(total);
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

static PyObject *tally_take_lines(PyObject *op, PyObject *arg);

static PyObject *
tally_take(PyObject *op, PyObject *unused)
{
    Tally *self = (Tally *)op;
    if (self->table != NULL && table_take_into(self->table) < 0) {
        return NULL; /* what moved is in the dicts, the rest still in its slots: nothing lost */
    }
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
    /* Lines so far: an id both in the dicts and in a slot counts twice until the window is taken. */
    Tally *self = (Tally *)op;
    return PyDict_GET_SIZE(self->buffer) + (self->table != NULL ? table_pending(self->table) : 0);
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
    Py_VISIT(self->table);
    return 0;
}

static int
tally_clear(Tally *self)
{
    Py_CLEAR(self->buffer);
    Py_CLEAR(self->targets);
    Py_CLEAR(self->wake);
    Py_CLEAR(self->overflow);
    Py_CLEAR(self->table);
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
    {"take_lines", tally_take_lines, METH_O, "take_lines(shards) -> [(shard, [(target, units), ...]), ...]"},
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

/* KeyTable(): the resolver cache's entries (CachingResolver._entries) where this module is built. It maps
   a key's first hash to (expiry, second hash, target), like the dict the pure-Python twin uses, and keeps
   the dict's insertion order for eviction (`popoldest`). Each entry is one 64-byte slot of a flat
   open-addressed array, so a cached request reads one cache line for its entry (the dict read touched the
   dict's index and entry, the key's int, the value's tuple, a float and an int: six lines, scattered over
   the heap, and with 1,000 keys none of them stay in cache between a key's requests). */
enum { SLOT_EMPTY = 0, SLOT_USED = 1, SLOT_DELETED = 2 };
#define TABLE_MIN_CAPACITY 8
#define NO_SLOT ((int32_t)-1)

/* 64 bytes, on a 64-byte boundary: one cache line. What a cached request reads comes first. */
typedef struct {
    int64_t first;        /* the key's first hash: the entry's name */
    int64_t check;        /* its second hash */
    double expiry;        /* on the cache clock (monotonic_now) */
    PyObject *target;     /* strong; Py_None for a negative entry; NULL unless SLOT_USED */
    uint8_t state;
    uint8_t admissible;   /* the target's `admissible`, read once (BillingTarget is frozen) */
    uint8_t exact;        /* the target is a BillingTarget itself, so `admissible` above holds */
    uint8_t dirty;        /* listed in the table's `dirty` (until the window is taken or the table resized) */
    int32_t older, newer; /* insertion order, as slot indices (NO_SLOT at the ends) */
    int64_t units;        /* units counted through this entry in the open window, for the bound tally */
    uint32_t crc;         /* CRC-32 of the target's id (its shard, Layout.shard_of), when `crc_known` */
    uint8_t crc_known;
    char padding[3];
} Slot;

typedef struct {
    PyObject_HEAD
    Slot *slots;         /* inside `memory`, on a 64-byte boundary */
    void *memory;
    Py_ssize_t capacity; /* a power of two */
    Py_ssize_t used;     /* live entries */
    Py_ssize_t filled;   /* live and deleted slots: probes stop only at an empty one */
    int32_t oldest, newest;
    /* The open window's units live in the slots of the tally this table is bound to (FastPath binds the
       middleware's own): a counted request adds to its entry's line instead of the tally's two dicts.
       `dirty` lists the slots counted into since the window was last taken (each once), `pending` how
       many of them hold units. An entry replaced by another target, or removed, first moves its units
       into the tally's dicts, so nothing counted is lost with it. */
    int32_t *dirty;
    Py_ssize_t dirty_count;
    Py_ssize_t pending;
    PyObject *tally;     /* a Tally, or NULL */
} KeyTable;

static PyTypeObject KeyTableType;
_Static_assert(sizeof(Slot) == 64, "a slot is one cache line");

/* Spread the hash's bits: SipHash's are uniform already, but a caller may store any int. */
static inline size_t
table_home(int64_t first, Py_ssize_t capacity)
{
    uint64_t x = (uint64_t)first;
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    return (size_t)(x & (uint64_t)(capacity - 1));
}

/* The slot holding `first`, or NULL. */
static inline Slot *
table_find(KeyTable *self, int64_t first)
{
    if (self->slots == NULL) {
        return NULL;
    }
    size_t mask = (size_t)self->capacity - 1, i = table_home(first, self->capacity);
    for (;;) {
        Slot *slot = &self->slots[i];
        if (slot->state == SLOT_EMPTY) {
            return NULL;
        }
        if (slot->state == SLOT_USED && slot->first == first) {
            return slot;
        }
        i = (i + 1) & mask;
    }
}

static void
table_unlink(KeyTable *self, Slot *slot)
{
    if (slot->older != NO_SLOT) {
        self->slots[slot->older].newer = slot->newer;
    }
    else {
        self->oldest = slot->newer;
    }
    if (slot->newer != NO_SLOT) {
        self->slots[slot->newer].older = slot->older;
    }
    else {
        self->newest = slot->older;
    }
}

static void
table_link_newest(KeyTable *self, Slot *slot)
{
    int32_t index = (int32_t)(slot - self->slots);
    slot->older = self->newest;
    slot->newer = NO_SLOT;
    if (self->newest != NO_SLOT) {
        self->slots[self->newest].newer = index;
    }
    else {
        self->oldest = index;
    }
    self->newest = index;
}

/* Rebuild into `capacity` slots, in insertion order (which drops the deleted slots). */
static int
table_resize(KeyTable *self, Py_ssize_t capacity)
{
    if (capacity > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "KeyTable is full");
        return -1;
    }
    void *memory = PyMem_Calloc((size_t)capacity + 1, sizeof(Slot));
    if (memory == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    int32_t *dirty = PyMem_Malloc((size_t)capacity * sizeof(int32_t));
    if (dirty == NULL) {
        PyMem_Free(memory);
        PyErr_NoMemory();
        return -1;
    }
    Slot *slots = (Slot *)(((uintptr_t)memory + 63) & ~(uintptr_t)63);
    Slot *old = self->slots;
    void *old_memory = self->memory;
    PyMem_Free(self->dirty);
    self->memory = memory;
    self->dirty = dirty;
    self->dirty_count = 0;
    int32_t index = self->oldest;
    self->slots = slots;
    self->capacity = capacity;
    self->oldest = self->newest = NO_SLOT;
    self->filled = self->used;
    size_t mask = (size_t)capacity - 1;
    while (index != NO_SLOT) {
        Slot *from = &old[index];
        size_t i = table_home(from->first, capacity);
        while (slots[i].state != SLOT_EMPTY) {
            i = (i + 1) & mask;
        }
        slots[i] = *from;
        table_link_newest(self, &slots[i]);
        slots[i].dirty = slots[i].units != 0;
        if (slots[i].dirty) {
            dirty[self->dirty_count++] = (int32_t)i;
        }
        index = from->newer;
    }
    PyMem_Free(old_memory);
    return 0;
}

static int
table_first(PyObject *key, int64_t *first)
{
    if (!PyLong_Check(key)) {
        PyErr_SetString(PyExc_TypeError, "KeyTable keys are ints (a key's first hash)");
        return -1;
    }
    long long value = PyLong_AsLongLong(key);
    if (value == -1 && PyErr_Occurred()) {
        return -1;
    }
    *first = (int64_t)value;
    return 0;
}

static PyObject *
slot_entry(Slot *slot)
{
    return Py_BuildValue("(dLO)", slot->expiry, (long long)slot->check, slot->target);
}

/* Move a slot's units into the bound tally's dicts (before its target leaves the slot). */
static int
table_drain(KeyTable *self, Slot *slot)
{
    if (slot->units == 0) {
        return 0;
    }
    if (tally_merge((Tally *)self->tally, slot->target, slot->units, 0) < 0) {
        return -1;
    }
    slot->units = 0;
    self->pending -= 1;
    return 0;
}

/* Empty a live slot, its units moved to the tally first; its target's reference goes to *target, for the
   caller to release. -1 (the slot untouched) when the units could not be moved. */
static int
table_remove(KeyTable *self, Slot *slot, PyObject **target)
{
    if (table_drain(self, slot) < 0) {
        return -1;
    }
    *target = slot->target;
    table_unlink(self, slot);
    slot->target = NULL;
    slot->state = SLOT_DELETED;
    self->used -= 1;
    return 0;
}

static int
table_set(KeyTable *self, PyObject *key, PyObject *value)
{
    int64_t first;
    if (table_first(key, &first) < 0) {
        return -1;
    }
    Slot *slot = table_find(self, first);
    if (value == NULL) { /* del table[first] */
        if (slot == NULL) {
            PyErr_SetObject(PyExc_KeyError, key);
            return -1;
        }
        PyObject *target;
        if (table_remove(self, slot, &target) < 0) {
            return -1;
        }
        Py_DECREF(target);
        return 0;
    }
    if (!PyTuple_Check(value) || PyTuple_GET_SIZE(value) != 3 || !PyFloat_Check(PyTuple_GET_ITEM(value, 0)) ||
        !PyLong_Check(PyTuple_GET_ITEM(value, 1))) {
        PyErr_SetString(PyExc_TypeError, "KeyTable values are (expiry: float, second hash: int, target)");
        return -1;
    }
    long long check = PyLong_AsLongLong(PyTuple_GET_ITEM(value, 1));
    if (check == -1 && PyErr_Occurred()) {
        return -1;
    }
    PyObject *target = PyTuple_GET_ITEM(value, 2);
    int exact = target != Py_None && target_type != NULL && Py_TYPE(target) == target_type &&
                offset_admissible > 0;
    int admissible = 0;
    if (exact) {
        PyObject *flag = *(PyObject **)((char *)target + offset_admissible);
        admissible = flag == Py_True;
        exact = flag != NULL;
    }
    if (slot == NULL) {
        if ((self->filled + 1) * 4 > self->capacity * 3) {
            Py_ssize_t capacity = self->capacity ? self->capacity : TABLE_MIN_CAPACITY;
            while ((self->used + 1) * 2 > capacity) {
                capacity *= 2;
            }
            if (table_resize(self, capacity) < 0) {
                return -1;
            }
        }
        size_t mask = (size_t)self->capacity - 1, i = table_home(first, self->capacity);
        while (self->slots[i].state == SLOT_USED) {
            i = (i + 1) & mask;
        }
        slot = &self->slots[i];
        if (slot->state == SLOT_EMPTY) {
            self->filled += 1;
        }
        slot->state = SLOT_USED;
        slot->first = first;
        slot->target = NULL;
        slot->units = 0;
        self->used += 1;
        table_link_newest(self, slot); /* a replaced entry keeps its place, as a dict's does */
    }
    if (slot->target != target && table_drain(self, slot) < 0) {
        return -1; /* the entry stays as it was, units and all */
    }
    PyObject *previous = slot->target;
    slot->crc_known = 0;
    if (exact && offset_target_id > 0) {
        /* The shard a window's line for this entry goes to, worked out once per entry, not per window. */
        PyObject *target_id = *(PyObject **)((char *)target + offset_target_id);
        Py_ssize_t length;
        const char *utf8 = target_id != NULL && PyUnicode_Check(target_id)
                               ? PyUnicode_AsUTF8AndSize(target_id, &length)
                               : NULL;
        if (utf8 != NULL) {
            slot->crc = crc32_of(utf8, length);
            slot->crc_known = 1;
        }
        else {
            PyErr_Clear(); /* take_lines tries again, and says what is wrong */
        }
    }
    slot->check = (int64_t)check;
    slot->expiry = PyFloat_AS_DOUBLE(PyTuple_GET_ITEM(value, 0));
    slot->target = Py_NewRef(target);
    slot->admissible = (uint8_t)admissible;
    slot->exact = (uint8_t)exact;
    Py_XDECREF(previous);
    return 0;
}

static PyObject *
table_subscript(PyObject *op, PyObject *key)
{
    int64_t first;
    if (table_first(key, &first) < 0) {
        return NULL;
    }
    Slot *slot = table_find((KeyTable *)op, first);
    if (slot == NULL) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    return slot_entry(slot);
}

static int
table_ass_subscript(PyObject *op, PyObject *key, PyObject *value)
{
    return table_set((KeyTable *)op, key, value);
}

static Py_ssize_t
table_length(PyObject *op)
{
    return ((KeyTable *)op)->used;
}

static int
table_contains(PyObject *op, PyObject *key)
{
    if (!PyLong_Check(key)) {
        return 0;
    }
    int64_t first;
    if (table_first(key, &first) < 0) {
        PyErr_Clear(); /* an int out of range is simply not a first hash */
        return 0;
    }
    return table_find((KeyTable *)op, first) != NULL;
}

static PyObject *
table_get(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get(first, default=None)");
        return NULL;
    }
    PyObject *fallback = nargs == 2 ? args[1] : Py_None;
    if (!PyLong_Check(args[0])) {
        return Py_NewRef(fallback);
    }
    int64_t first;
    if (table_first(args[0], &first) < 0) {
        PyErr_Clear();
        return Py_NewRef(fallback);
    }
    Slot *slot = table_find((KeyTable *)op, first);
    return slot == NULL ? Py_NewRef(fallback) : slot_entry(slot);
}

static PyObject *
table_pop(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "pop(first[, default])");
        return NULL;
    }
    KeyTable *self = (KeyTable *)op;
    int64_t first;
    Slot *slot = NULL;
    if (PyLong_Check(args[0])) {
        if (table_first(args[0], &first) < 0) {
            PyErr_Clear();
        }
        else {
            slot = table_find(self, first);
        }
    }
    if (slot == NULL) {
        if (nargs == 2) {
            return Py_NewRef(args[1]);
        }
        PyErr_SetObject(PyExc_KeyError, args[0]);
        return NULL;
    }
    PyObject *entry = slot_entry(slot), *target;
    if (entry == NULL) {
        return NULL;
    }
    if (table_remove(self, slot, &target) < 0) {
        Py_DECREF(entry);
        return NULL;
    }
    Py_DECREF(target);
    return entry;
}

static PyObject *
table_popoldest(PyObject *op, PyObject *unused)
{
    KeyTable *self = (KeyTable *)op;
    if (self->oldest == NO_SLOT) {
        PyErr_SetString(PyExc_KeyError, "popoldest(): the table is empty");
        return NULL;
    }
    Slot *slot = &self->slots[self->oldest];
    PyObject *pair = Py_BuildValue("(LN)", (long long)slot->first, slot_entry(slot)), *target;
    if (pair == NULL) {
        return NULL;
    }
    if (table_remove(self, slot, &target) < 0) {
        Py_DECREF(pair);
        return NULL;
    }
    Py_DECREF(target);
    return pair;
}

static void
table_release(KeyTable *self)
{
    Slot *slots = self->slots;
    void *memory = self->memory;
    Py_ssize_t capacity = self->capacity;
    self->slots = NULL;
    self->memory = NULL;
    PyMem_Free(self->dirty);
    self->dirty = NULL;
    self->dirty_count = self->pending = 0;
    self->capacity = self->used = self->filled = 0;
    self->oldest = self->newest = NO_SLOT;
    for (Py_ssize_t i = 0; i < capacity; i++) {
        if (slots[i].state == SLOT_USED) {
            Py_CLEAR(slots[i].target);
        }
    }
    PyMem_Free(memory);
}

static PyObject *
table_clear_method(PyObject *op, PyObject *unused)
{
    KeyTable *self = (KeyTable *)op;
    for (Py_ssize_t k = 0; k < self->dirty_count; k++) {
        Slot *slot = &self->slots[self->dirty[k]];
        if (slot->state == SLOT_USED && table_drain(self, slot) < 0) {
            return NULL; /* what was drained is in the tally, the rest still in its slots */
        }
    }
    table_release(self);
    Py_RETURN_NONE;
}

static PyObject *
table_items(PyObject *op, PyObject *unused)
{
    KeyTable *self = (KeyTable *)op;
    PyObject *items = PyList_New(0);
    if (items == NULL) {
        return NULL;
    }
    for (int32_t i = self->oldest; i != NO_SLOT; i = self->slots[i].newer) {
        PyObject *pair = Py_BuildValue("(LN)", (long long)self->slots[i].first, slot_entry(&self->slots[i]));
        if (pair == NULL || PyList_Append(items, pair) < 0) {
            Py_XDECREF(pair);
            Py_DECREF(items);
            return NULL;
        }
        Py_DECREF(pair);
    }
    return items;
}

static PyObject *
table_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    if (PyTuple_GET_SIZE(args) || (kwargs != NULL && PyDict_GET_SIZE(kwargs))) {
        PyErr_SetString(PyExc_TypeError, "KeyTable() takes no arguments");
        return NULL;
    }
    KeyTable *self = (KeyTable *)type->tp_alloc(type, 0);
    if (self != NULL) {
        self->oldest = self->newest = NO_SLOT;
    }
    return (PyObject *)self;
}

static int
table_traverse(KeyTable *self, visitproc visit, void *arg)
{
    Py_VISIT(self->tally);
    for (Py_ssize_t i = 0; i < self->capacity; i++) {
        if (self->slots[i].state == SLOT_USED) {
            Py_VISIT(self->slots[i].target);
        }
    }
    return 0;
}

static int
table_gc_clear(KeyTable *self)
{
    Py_CLEAR(self->tally);
    table_release(self);
    return 0;
}

static void
table_dealloc(KeyTable *self)
{
    PyObject_GC_UnTrack(self);
    Py_CLEAR(self->tally);
    table_release(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The entry's target for a key with these two hashes, fresh and admissible, as a borrowed reference. */
static inline PyObject *
table_lookup(KeyTable *self, const char *key, Py_ssize_t length, int *admissible_known, int *admissible,
             int32_t *index)
{
    Slot *slot = table_find(self, (int64_t)_Py_HashBytes(key, length));
    if (slot == NULL || slot->target == Py_None) {
        return NULL;
    }
    char small[257];
    char *prefixed = small;
    if (length + 1 > (Py_ssize_t)sizeof(small)) {
        prefixed = PyMem_Malloc((size_t)length + 1);
        if (prefixed == NULL) {
            return PyErr_NoMemory();
        }
    }
    prefixed[0] = CHECK_PREFIX;
    memcpy(prefixed + 1, key, (size_t)length);
    int64_t check = (int64_t)_Py_HashBytes(prefixed, length + 1);
    if (prefixed != small) {
        PyMem_Free(prefixed);
    }
    if (slot->check != check || slot->expiry <= monotonic_now()) {
        return NULL;
    }
    *admissible_known = slot->exact;
    *admissible = slot->admissible;
    *index = (int32_t)(slot - self->slots);
    return slot->target;
}

/* The cached target for a key, from the resolver cache's entries (a KeyTable, or the twin's dict). */
static PyObject *
entries_lookup(PyObject *entries, const char *key, Py_ssize_t length, int *admissible_known, int *admissible,
               int32_t *index)
{
    if (Py_IS_TYPE(entries, &KeyTableType)) {
        return table_lookup((KeyTable *)entries, key, length, admissible_known, admissible, index);
    }
    *admissible_known = 0;
    *index = NO_SLOT;
    return dict_lookup(entries, key, length);
}

/* Count n units through slot `index` if it still holds `target` (CountingSend, at the response's start):
   1 when counted there, 0 when the caller must count through the tally's dicts, -1 on an error. */
static int
table_count(KeyTable *self, int32_t index, PyObject *target, long long n)
{
    if (self->tally == NULL || index < 0 || index >= self->capacity || n <= 0) {
        return 0;
    }
    Slot *slot = &self->slots[index];
    if (slot->state != SLOT_USED || slot->target != target || !slot->exact || slot->units > INT64_MAX - n) {
        return 0; /* the entry was replaced or moved since the lookup */
    }
    if (slot->units == 0) {
        self->pending += 1;
        if (!slot->dirty) {
            slot->dirty = 1;
            self->dirty[self->dirty_count++] = index;
        }
    }
    slot->units += n;
    Tally *tally = (Tally *)self->tally;
    tally->counted_units += n;
    tally->counted_requests += 1;
    if (!tally->armed) {
        PyObject *result = PyObject_CallNoArgs(tally->wake);
        if (result == NULL) {
            return -1;
        }
        Py_DECREF(result);
    }
    return 1;
}

static Py_ssize_t
table_pending(PyObject *op)
{
    return ((KeyTable *)op)->pending;
}

/* Move every slot's units into the tally's dicts (Tally.take, before it hands them over). */
static int
table_take_into(PyObject *op)
{
    KeyTable *self = (KeyTable *)op;
    Py_ssize_t count = self->dirty_count, k = 0;
    for (; k < count; k++) {
        Slot *slot = &self->slots[self->dirty[k]];
        if (slot->state == SLOT_USED && slot->units != 0) {
            /* The entry's target is the key's current one: it carries the latest period bounds. */
            if (tally_merge((Tally *)self->tally, slot->target, slot->units, 1) < 0) {
                memmove(self->dirty, self->dirty + k, (size_t)(count - k) * sizeof(int32_t));
                self->dirty_count = count - k;
                return -1;
            }
            slot->units = 0;
            self->pending -= 1;
        }
        slot->dirty = 0;
    }
    self->dirty_count = 0;
    return 0;
}

static PyMethodDef table_methods[] = {
    {"get", (PyCFunction)(void (*)(void))table_get, METH_FASTCALL, "get(first, default=None)"},
    {"pop", (PyCFunction)(void (*)(void))table_pop, METH_FASTCALL, "pop(first[, default])"},
    {"popoldest", table_popoldest, METH_NOARGS, "popoldest() -> (first, entry): the oldest entry, removed"},
    {"clear", table_clear_method, METH_NOARGS, "clear(): forget every entry"},
    {"items", table_items, METH_NOARGS, "items() -> [(first, entry)], oldest first"},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods table_as_mapping = {
    .mp_length = table_length,
    .mp_subscript = table_subscript,
    .mp_ass_subscript = table_ass_subscript,
};

static PySequenceMethods table_as_sequence = {
    .sq_contains = table_contains,
};

static PyTypeObject KeyTableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "metered_middleware._speedups.KeyTable",
    .tp_doc = "KeyTable(): first hash -> (expiry, second hash, target), the resolver cache's entries.",
    .tp_basicsize = sizeof(KeyTable),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = table_new,
    .tp_dealloc = (destructor)table_dealloc,
    .tp_traverse = (traverseproc)table_traverse,
    .tp_clear = (inquiry)table_gc_clear,
    .tp_methods = table_methods,
    .tp_as_mapping = &table_as_mapping,
    .tp_as_sequence = &table_as_sequence,
};

typedef struct {
    PyObject_HEAD
    PyObject *send;
    PyObject *target;
    PyObject *units;
    PyObject *add;
    PyObject *statuses;
    vectorcallfunc vectorcall;
    PyObject *table; /* the KeyTable whose slot `slot` the target was found in (FastPath), or NULL */
    long long n;     /* `units` as a C integer, for the slot */
    int32_t slot;
} CountingSend;

/* Count the response: in its key's slot when that still holds the target, else through the tally's dicts,
   else through whatever `add` is. */
static int
counting_send_count(CountingSend *self)
{
    if (self->table != NULL) {
        int in_slot = table_count((KeyTable *)self->table, self->slot, self->target, self->n);
        if (in_slot != 0) {
            return in_slot < 0 ? -1 : 0;
        }
    }
    if (Py_IS_TYPE(self->add, &TallyType)) {
        return tally_add((Tally *)self->add, self->target, self->units);
    }
    PyObject *add_args[2] = {self->target, self->units};
    PyObject *result = PyObject_Vectorcall(self->add, add_args, 2, NULL);
    if (result == NULL) {
        return -1;
    }
    Py_DECREF(result);
    return 0;
}

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
                if (counted && counting_send_count(self) < 0) {
                    return NULL;
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
    self->table = NULL;
    self->n = 0;
    self->slot = NO_SLOT;
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
    Py_VISIT(self->table);
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
    Py_CLEAR(self->table);
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
   excluded path), or None when the general path must judge the request (not HTTP, no key, a miss, a
   refusal, Redis down in closed mode, a path not yet judged for exclusion). */
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
    /* HTTP only: websockets and lifespan are the general path's. */
    PyObject *kind = PyDict_GetItemWithError(scope, str_type);
    if (kind == NULL || !PyUnicode_Check(kind) ||
        (kind != str_http && PyUnicode_Compare(kind, str_http) != 0)) {
        if (PyErr_Occurred()) {
            return NULL;
        }
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
    const char *key;
    Py_ssize_t length;
    int known = 0, admitted = 0;
    int32_t index = NO_SLOT;
    PyObject *target = find_key(headers, self->names, self->bearer, self->max_length, &key, &length)
                           ? entries_lookup(self->entries, key, length, &known, &admitted, &index)
                           : NULL;
    if (target == NULL) {
        if (PyErr_Occurred()) {
            return NULL;
        }
        Py_RETURN_NONE;
    }
    Py_INCREF(target); /* the entry may be replaced while the weigher runs */
    PyObject *result = NULL, *units = NULL;
    if (!known) {
        PyObject *admissible = target_attr(target, offset_admissible, str_admissible);
        if (admissible == NULL) {
            goto done;
        }
        admitted = PyObject_IsTrue(admissible);
        Py_DECREF(admissible);
        if (admitted < 0) {
            goto done;
        }
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
    counting->table = NULL;
    counting->slot = index;
    counting->n = 0;
    if (index != NO_SLOT && ((KeyTable *)self->entries)->tally == self->add) {
        counting->n = PyLong_AsLongLong(units);
        if (counting->n == -1 && PyErr_Occurred()) {
            PyErr_Clear(); /* too large for a slot: the tally's dicts take it */
            counting->n = 0;
        }
        counting->table = Py_NewRef(self->entries);
    }
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
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OO!pnOOOpOO:FastPath", keywords, &entries,
                                     &PyTuple_Type, &names, &bearer, &max_length, &add, &statuses, &counter,
                                     &closed, &weigh, &excluded)) {
        return NULL;
    }
    if (!PyDict_Check(entries) && !Py_IS_TYPE(entries, &KeyTableType)) {
        PyErr_SetString(PyExc_TypeError, "FastPath: entries must be a dict or KeyTable");
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
    if (Py_IS_TYPE(entries, &KeyTableType) && Py_IS_TYPE(add, &TallyType) && ((KeyTable *)entries)->tally == NULL &&
        ((Tally *)add)->table == NULL) {
        /* The first middleware on this cache counts in its slots; any other sharing it uses its dicts. */
        ((KeyTable *)entries)->tally = Py_NewRef(add);
        ((Tally *)add)->table = Py_NewRef(entries);
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

/* The count window's grouping and encoding (Counter and CountStore; `_fastpath.py` holds the twins).
   In Python they cost 1-2 us a line, and a busy server's window carries about one line per request. */

/* zlib.crc32, slicing by 8 (eight 256-entry tables; a byte at a time was most of the grouping's time).
   Layout.shard_of hashes target ids with it, so every process agrees on a target's shard. */
static uint32_t crc_tables[8][256];

static void
crc_init(void)
{
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) {
            c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        }
        crc_tables[0][n] = c;
    }
    for (uint32_t n = 0; n < 256; n++) {
        for (int t = 1; t < 8; t++) {
            uint32_t c = crc_tables[t - 1][n];
            crc_tables[t][n] = crc_tables[0][c & 0xFFu] ^ (c >> 8);
        }
    }
}

static uint32_t
crc32_of(const char *data, Py_ssize_t length)
{
    const unsigned char *p = (const unsigned char *)data;
    uint32_t c = 0xFFFFFFFFu;
    while (length >= 8) {
        uint32_t low = c ^ ((uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24);
        uint32_t high = (uint32_t)p[4] | (uint32_t)p[5] << 8 | (uint32_t)p[6] << 16 | (uint32_t)p[7] << 24;
        c = crc_tables[7][low & 0xFFu] ^ crc_tables[6][(low >> 8) & 0xFFu] ^ crc_tables[5][(low >> 16) & 0xFFu] ^
            crc_tables[4][low >> 24] ^ crc_tables[3][high & 0xFFu] ^ crc_tables[2][(high >> 8) & 0xFFu] ^
            crc_tables[1][(high >> 16) & 0xFFu] ^ crc_tables[0][high >> 24];
        p += 8;
        length -= 8;
    }
    while (length-- > 0) {
        c = crc_tables[0][(c ^ *p++) & 0xFFu] ^ (c >> 8);
    }
    return c ^ 0xFFFFFFFFu;
}

/* Append the line (target, units) to its shard's list, creating the list on its first line. */
static int
append_line(PyObject **lists, Py_ssize_t shards, uint32_t crc, PyObject *target, PyObject *units)
{
    Py_ssize_t shard = (Py_ssize_t)(crc % (uint32_t)shards);
    if (lists[shard] == NULL && (lists[shard] = PyList_New(0)) == NULL) {
        return -1;
    }
    PyObject *line = PyTuple_Pack(2, target, units);
    if (line == NULL) {
        return -1;
    }
    int failed = PyList_Append(lists[shard], line);
    Py_DECREF(line);
    return failed;
}

/* The lines of a buffer (units per target id) and its targets (target per id) into their shards' lists. */
static int
group_dict_into(PyObject **lists, Py_ssize_t shards, PyObject *buffer, PyObject *targets)
{
    PyObject *key, *units;
    Py_ssize_t pos = 0;
    while (PyDict_Next(buffer, &pos, &key, &units)) {
        if (!PyUnicode_Check(key)) {
            PyErr_SetString(PyExc_TypeError, "group_by_shard: target ids must be str");
            return -1;
        }
        Py_ssize_t length;
        const char *utf8 = PyUnicode_AsUTF8AndSize(key, &length);
        if (utf8 == NULL) {
            return -1;
        }
        PyObject *target = PyDict_GetItemWithError(targets, key);
        if (target == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetObject(PyExc_KeyError, key);
            }
            return -1;
        }
        if (append_line(lists, shards, crc32_of(utf8, length), target, units) < 0) {
            return -1;
        }
    }
    return 0;
}

/* [(shard, lines), ...] for the shards that have lines, in shard order. */
static PyObject *
grouped_result(PyObject **lists, Py_ssize_t shards)
{
    PyObject *result = PyList_New(0);
    for (Py_ssize_t shard = 0; result != NULL && shard < shards; shard++) {
        if (lists[shard] == NULL) {
            continue;
        }
        PyObject *pair = Py_BuildValue("(nO)", shard, lists[shard]);
        if (pair == NULL || PyList_Append(result, pair) < 0) {
            Py_XDECREF(pair);
            Py_CLEAR(result);
        }
        else {
            Py_DECREF(pair);
        }
    }
    return result;
}

static void
free_lists(PyObject **lists, Py_ssize_t shards)
{
    for (Py_ssize_t shard = 0; shard < shards; shard++) {
        Py_XDECREF(lists[shard]);
    }
    PyMem_Free(lists);
}

static Py_ssize_t
shard_count(PyObject *value)
{
    Py_ssize_t shards = PyLong_AsSsize_t(value);
    if (shards == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (shards <= 0) {
        PyErr_SetString(PyExc_ValueError, "group_by_shard: shards must be positive");
        return -1;
    }
    return shards;
}

/* group_by_shard(buffer, targets, shards): [(shard, [(target, units), ...]), ...] by shard, each shard's
   lines in the buffer's order. `buffer` is units per target id, `targets` the target per id (Tally.take). */
static PyObject *
group_by_shard(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3 || !PyDict_Check(args[0]) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "group_by_shard(buffer: dict, targets: dict, shards: int)");
        return NULL;
    }
    Py_ssize_t shards = shard_count(args[2]);
    if (shards < 0) {
        return NULL;
    }
    PyObject **lists = PyMem_Calloc((size_t)shards, sizeof(PyObject *));
    if (lists == NULL) {
        return PyErr_NoMemory();
    }
    PyObject *result = group_dict_into(lists, shards, args[0], args[1]) < 0 ? NULL : grouped_result(lists, shards);
    free_lists(lists, shards);
    return result;
}

/* The shard hash of a slot's target: kept in the slot, or (should storing it have failed) read from the
   target id. Only a BillingTarget itself counts into a slot, so this reads its field and runs no Python. */
static int
slot_crc(Slot *slot, uint32_t *crc)
{
    if (slot->crc_known) {
        *crc = slot->crc;
        return 0;
    }
    PyObject *target_id = slot->exact && offset_target_id > 0
                              ? *(PyObject **)((char *)slot->target + offset_target_id)
                              : NULL;
    Py_ssize_t length;
    const char *utf8 = target_id != NULL && PyUnicode_Check(target_id)
                           ? PyUnicode_AsUTF8AndSize(target_id, &length)
                           : NULL;
    if (utf8 == NULL) {
        if (!PyErr_Occurred()) {
            PyErr_SetString(PyExc_TypeError, "take_lines: target_id must be str");
        }
        return -1;
    }
    *crc = crc32_of(utf8, length);
    return 0;
}

/* Tally.take_lines(shards): the window taken and grouped in one pass, as group_by_shard(*take(), shards)
   would give it, without moving the slots' units through the tally's dicts first (with 1,000 keys that
   move was the largest part of a window's CPU: three dict writes a line, in dicts that grow as they
   fill). The dicts' lines come first, then the slots', each with its entry's target; an id counted both
   ways has a line in each (the count script adds both).

   The lines are built, and the window handed over, with the collector paused: no finalizer (no Python code
   at all) runs in between to count into, or change, what is being taken. An error while building leaves
   the window where it was. */
static PyObject *
tally_take_lines(PyObject *op, PyObject *arg)
{
    Tally *self = (Tally *)op;
    Py_ssize_t shards = shard_count(arg);
    if (shards < 0) {
        return NULL;
    }
    PyObject **lists = PyMem_Calloc((size_t)shards, sizeof(PyObject *));
    if (lists == NULL) {
        return PyErr_NoMemory();
    }
    int collecting = PyGC_Disable();
    PyObject *result = NULL, *buffer = NULL, *targets = NULL;
    if (group_dict_into(lists, shards, self->buffer, self->targets) < 0) {
        goto done;
    }
    KeyTable *table = (KeyTable *)self->table;
    Py_ssize_t count = table != NULL ? table->dirty_count : 0;
    for (Py_ssize_t k = 0; k < count; k++) {
        Slot *slot = &table->slots[table->dirty[k]];
        if (slot->state != SLOT_USED || slot->units == 0) {
            continue;
        }
        uint32_t crc;
        if (slot_crc(slot, &crc) < 0) {
            goto done;
        }
        PyObject *units = PyLong_FromLongLong(slot->units);
        if (units == NULL) {
            goto done;
        }
        int failed = append_line(lists, shards, crc, slot->target, units);
        Py_DECREF(units);
        if (failed) {
            goto done;
        }
    }
    if ((result = grouped_result(lists, shards)) == NULL || (buffer = PyDict_New()) == NULL ||
        (targets = PyDict_New()) == NULL) {
        Py_CLEAR(result);
        goto done;
    }
    /* Every line is built: the window is handed over. */
    for (Py_ssize_t k = 0; k < count; k++) {
        Slot *slot = &table->slots[table->dirty[k]];
        if (slot->state == SLOT_USED && slot->units != 0) {
            slot->units = 0;
            table->pending -= 1;
        }
        slot->dirty = 0;
    }
    if (table != NULL) {
        table->dirty_count = 0;
    }
    Py_SETREF(self->buffer, buffer);
    Py_SETREF(self->targets, targets);
    buffer = targets = NULL;
done:
    if (collecting) {
        PyGC_Enable();
    }
    Py_XDECREF(buffer);
    Py_XDECREF(targets);
    free_lists(lists, shards);
    return result;
}

typedef struct {
    char *data;
    Py_ssize_t length;
    Py_ssize_t capacity;
} Text;

static int
text_append(Text *text, const char *data, Py_ssize_t length)
{
    if (text->length + length > text->capacity) {
        Py_ssize_t capacity = text->capacity ? text->capacity : 256;
        while (capacity < text->length + length) {
            capacity *= 2;
        }
        char *grown = PyMem_Realloc(text->data, (size_t)capacity);
        if (grown == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        text->data = grown;
        text->capacity = capacity;
    }
    memcpy(text->data + text->length, data, (size_t)length);
    text->length += length;
    return 0;
}

/* One "target_id\tunits\n" line. */
static int
text_append_line(Text *text, PyObject *target_id, PyObject *units)
{
    Py_ssize_t length;
    const char *utf8 = PyUnicode_AsUTF8AndSize(target_id, &length);
    if (utf8 == NULL || text_append(text, utf8, length) < 0) {
        return -1;
    }
    int overflow;
    long long n = PyLong_AsLongLongAndOverflow(units, &overflow);
    if (n == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (overflow) {
        PyErr_SetString(PyExc_OverflowError, "encode_lines: units out of range");
        return -1;
    }
    /* Digits written backwards from the end of the buffer: "\t" [-] digits "\n" (snprintf was a third of
       the encoding's time). */
    char digits[24];
    char *end = digits + sizeof(digits), *at = end;
    *--at = '\n';
    unsigned long long magnitude = n < 0 ? 0ULL - (unsigned long long)n : (unsigned long long)n;
    do {
        *--at = (char)('0' + (int)(magnitude % 10));
        magnitude /= 10;
    } while (magnitude);
    if (n < 0) {
        *--at = '-';
    }
    *--at = '\t';
    return text_append(text, at, end - at);
}

/* encode_lines(lines, retention, sent, decide) -> (starts, expire_at, blobs, meta_args): one
   count write's script arguments (CountStore._keys_and_args). `lines` is [(target, units)]; lines whose
   target has both period bounds go to their period's blob (blobs[i + 1] for starts[i], first seen
   first; each period's expiry is the latest end + retention), the others to blobs[0]. A target whose
   `sent` entry is the very same object needs no metadata (the caller keeps there only what it sent
   recently); for any other, decide(target) returns its metadata JSON (appended to meta_args after its
   id) or None. */
static PyObject *
encode_lines(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyList_Check(args[0]) || !PyDict_Check(args[2])) {
        PyErr_SetString(PyExc_TypeError, "encode_lines(lines: list, retention: int, sent: dict, decide)");
        return NULL;
    }
    PyObject *lines = args[0], *sent = args[2], *decide = args[3];
    long long retention = PyLong_AsLongLong(args[1]);
    if (retention == -1 && PyErr_Occurred()) {
        return NULL;
    }
    PyObject *result = NULL, *index_of = PyDict_New(), *starts = PyList_New(0), *meta_args = PyList_New(0);
    long long *expire_at = NULL;
    Text *texts = NULL;
    Py_ssize_t periods = 0, capacity = 0;
    if (index_of == NULL || starts == NULL || meta_args == NULL) {
        goto done;
    }
    texts = PyMem_Calloc(1, sizeof(Text));
    if (texts == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(lines); i++) {
        PyObject *line = PyList_GET_ITEM(lines, i);
        if (!PyTuple_Check(line) || PyTuple_GET_SIZE(line) != 2) {
            PyErr_SetString(PyExc_TypeError, "encode_lines: each line is (target, units)");
            goto done;
        }
        Py_INCREF(line); /* decide() runs Python code */
        PyObject *target = PyTuple_GET_ITEM(line, 0), *units = PyTuple_GET_ITEM(line, 1);
        PyObject *target_id = target_attr(target, offset_target_id, str_target_id);
        PyObject *start = target_id ? target_attr(target, offset_period_start, str_period_start) : NULL;
        PyObject *end = start ? target_attr(target, offset_period_end, str_period_end) : NULL;
        int status = -1;
        if (end == NULL) {
            goto next;
        }
        if (!PyUnicode_Check(target_id)) {
            PyErr_SetString(PyExc_TypeError, "encode_lines: target_id must be str");
            goto next;
        }
        Py_ssize_t slot = 0;
        if (start != Py_None && end != Py_None) {
            int overflow;
            long long end_value = PyLong_AsLongLongAndOverflow(end, &overflow);
            if ((end_value == -1 && PyErr_Occurred()) || overflow ||
                (retention > 0 && end_value > LLONG_MAX - retention)) {
                if (!PyErr_Occurred()) {
                    PyErr_SetString(PyExc_OverflowError, "encode_lines: period_end out of range");
                }
                goto next;
            }
            long long expiry = end_value + retention;
            PyObject *known = PyDict_GetItemWithError(index_of, start);
            if (known != NULL) {
                slot = PyLong_AsSsize_t(known);
                if (expiry > expire_at[slot - 1]) {
                    expire_at[slot - 1] = expiry;
                }
            }
            else if (PyErr_Occurred()) {
                goto next;
            }
            else {
                if (periods + 1 >= capacity) {
                    Py_ssize_t grown_capacity = capacity ? capacity * 2 : 8;
                    long long *grown_expiry = PyMem_Realloc(expire_at, (size_t)grown_capacity * sizeof(long long));
                    if (grown_expiry == NULL) {
                        PyErr_NoMemory();
                        goto next;
                    }
                    expire_at = grown_expiry;
                    Text *grown_texts = PyMem_Realloc(texts, (size_t)(grown_capacity + 1) * sizeof(Text));
                    if (grown_texts == NULL) {
                        PyErr_NoMemory();
                        goto next;
                    }
                    texts = grown_texts;
                    capacity = grown_capacity;
                }
                slot = ++periods;
                expire_at[slot - 1] = expiry;
                texts[slot] = (Text){NULL, 0, 0};
                PyObject *number = PyLong_FromSsize_t(slot);
                if (number == NULL || PyDict_SetItem(index_of, start, number) < 0 ||
                    PyList_Append(starts, start) < 0) {
                    Py_XDECREF(number);
                    goto next;
                }
                Py_DECREF(number);
            }
        }
        if (text_append_line(&texts[slot], target_id, units) < 0) {
            goto next;
        }
        /* The entry is the very target whose metadata was sent, recently: a pointer compare, no read of
           the entry (each read there was a cache miss a line, with the caches cold as in a busy server). */
        PyObject *last = PyDict_GetItemWithError(sent, target_id); /* borrowed */
        if (last == NULL && PyErr_Occurred()) {
            goto next;
        }
        if (last != target) {
            PyObject *meta = PyObject_CallOneArg(decide, target);
            if (meta == NULL) {
                goto next;
            }
            int failed = meta != Py_None &&
                         (PyList_Append(meta_args, target_id) < 0 || PyList_Append(meta_args, meta) < 0);
            Py_DECREF(meta);
            if (failed) {
                goto next;
            }
        }
        status = 0;
    next:
        Py_XDECREF(target_id);
        Py_XDECREF(start);
        Py_XDECREF(end);
        Py_DECREF(line);
        if (status < 0) {
            goto done;
        }
    }
    PyObject *expiries = PyList_New(periods), *blobs = PyList_New(periods + 1);
    if (expiries == NULL || blobs == NULL) {
        Py_XDECREF(expiries);
        Py_XDECREF(blobs);
        goto done;
    }
    for (Py_ssize_t slot = 0; slot <= periods; slot++) {
        PyObject *blob = PyBytes_FromStringAndSize(texts[slot].data ? texts[slot].data : "", texts[slot].length);
        PyObject *expiry = slot < periods ? PyLong_FromLongLong(expire_at[slot]) : NULL;
        if (blob == NULL || (slot < periods && expiry == NULL)) {
            Py_XDECREF(blob);
            Py_XDECREF(expiry);
            Py_DECREF(expiries);
            Py_DECREF(blobs);
            goto done;
        }
        PyList_SET_ITEM(blobs, slot, blob);
        if (slot < periods) {
            PyList_SET_ITEM(expiries, slot, expiry);
        }
    }
    result = Py_BuildValue("(ONNO)", starts, expiries, blobs, meta_args);
done:
    if (texts != NULL) {
        for (Py_ssize_t slot = 0; slot <= periods; slot++) {
            PyMem_Free(texts[slot].data);
        }
        PyMem_Free(texts);
    }
    PyMem_Free(expire_at);
    Py_XDECREF(index_of);
    Py_XDECREF(starts);
    Py_XDECREF(meta_args);
    return result;
}

static PyMethodDef methods[] = {
    {"find_cached", (PyCFunction)(void (*)(void))find_cached, METH_FASTCALL,
     "find_cached(headers, entries, names, bearer, max_length): the cached target, or None."},
    {"group_by_shard", (PyCFunction)(void (*)(void))group_by_shard, METH_FASTCALL,
     "group_by_shard(buffer, targets, shards): the window's lines per shard, in shard order."},
    {"encode_lines", (PyCFunction)(void (*)(void))encode_lines, METH_FASTCALL,
     "encode_lines(lines, retention, sent, decide): one count write's script arguments."},
    {"bind_target", bind_target, METH_O,
     "bind_target(cls): read these fields of cls's instances from their slots (BillingTarget)."},
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
    str_http = PyUnicode_InternFromString("http");
    if (str_path == NULL || str_http == NULL) {
        return NULL;
    }
    str_target_id = PyUnicode_InternFromString("target_id");
    str_period_start = PyUnicode_InternFromString("period_start");
    str_period_end = PyUnicode_InternFromString("period_end");
    crc_init();
    if (str_target_id == NULL || str_period_start == NULL || str_period_end == NULL) {
        return NULL;
    }
    if (str_headers == NULL || str_state == NULL || str_billing_target == NULL || str_admissible == NULL ||
        str_healthy == NULL) {
        return NULL;
    }
    if (PyType_Ready(&KeyTableType) < 0 || PyType_Ready(&TallyType) < 0 || PyType_Ready(&CountingSendType) < 0 || PyType_Ready(&FastPathType) < 0) {
        return NULL;
    }
    PyObject *module = PyModule_Create(&module_def);
    if (module == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(module, "CountingSend", (PyObject *)&CountingSendType) < 0 ||
        PyModule_AddObjectRef(module, "FastPath", (PyObject *)&FastPathType) < 0 ||
        PyModule_AddObjectRef(module, "KeyTable", (PyObject *)&KeyTableType) < 0 ||
        PyModule_AddObjectRef(module, "Tally", (PyObject *)&TallyType) < 0) {
        Py_DECREF(module);
        return NULL;
    }
    return module;
}
