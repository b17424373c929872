/*
 * weft.shm._atomics: 8-byte atomic operations on a writable buffer (the fast path of
 * weft.shm.atomics; see that module for the contract and the ctypes fallback).
 *
 * Theory of operation. An Atomics object takes a buffer-protocol export of a writable,
 * C-contiguous buffer (an mmap of a shared-memory segment) once, in its constructor, and keeps
 * it until release() or deallocation. Holding the export is what keeps the mapping alive: while
 * it exists, mmap.close() raises BufferError instead of unmapping memory we still point into.
 * Every operation checks the offset against the buffer (range, then 8-byte alignment of the
 * absolute address) and raises IndexError/ValueError; nothing here can be made to touch memory
 * outside the buffer from Python.
 *
 * Every access is a GCC __atomic builtin with __ATOMIC_SEQ_CST: one total order over all of
 * weft's shared words, which is what the seqlock, the owner-tagged slots and the keyed table's
 * claim protocol are reasoned about with. On x86-64 a seq-cst load is a plain MOV and a store an
 * XCHG, so the stronger ordering costs little next to the Python call around it.
 *
 * Values are signed 64-bit (int64_t) at the Python boundary; fetch_add is done on uint64_t so
 * that overflow wraps (two's complement) instead of being undefined behaviour.
 *
 * The GIL is held throughout: each operation is a few nanoseconds, far less than a GIL release.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>

typedef struct {
    PyObject_HEAD
    Py_buffer view;   /* valid while base != NULL */
    char *base;       /* NULL once released */
    Py_ssize_t len;
} AtomicsObject;

/* The address of the word at args[0], or NULL with an exception set. */
static int64_t *
word_at(AtomicsObject *self, PyObject *arg)
{
    if (self->base == NULL) {
        PyErr_SetString(PyExc_ValueError, "Atomics: the buffer has been released");
        return NULL;
    }
    /* __index__ conversion; an int too large for Py_ssize_t is out of range, hence IndexError. */
    Py_ssize_t off = PyNumber_AsSsize_t(arg, PyExc_IndexError);
    if (off == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (off < 0 || self->len < 8 || off > self->len - 8) {
        PyErr_Format(PyExc_IndexError,
                     "Atomics: offset %zd out of range for a buffer of %zd bytes", off,
                     self->len);
        return NULL;
    }
    char *p = self->base + off;
    if (((uintptr_t)p & 7u) != 0) {
        PyErr_Format(PyExc_ValueError, "Atomics: offset %zd is not 8-byte aligned", off);
        return NULL;
    }
    return (int64_t *)p;
}

/* A signed 64-bit value, or -1 with an exception set (OverflowError out of range). */
static int
value_of(PyObject *arg, int64_t *out)
{
    long long v = PyLong_AsLongLong(arg);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    *out = (int64_t)v;
    return 0;
}

static int
check_nargs(const char *name, Py_ssize_t nargs, Py_ssize_t want)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes exactly %zd arguments (%zd given)", name, want,
                     nargs);
        return -1;
    }
    return 0;
}

static PyObject *
Atomics_load(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (check_nargs("load", nargs, 1) < 0) {
        return NULL;
    }
    int64_t *p = word_at(self, args[0]);
    if (p == NULL) {
        return NULL;
    }
    return PyLong_FromLongLong(__atomic_load_n(p, __ATOMIC_SEQ_CST));
}

static PyObject *
Atomics_store(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t v;
    if (check_nargs("store", nargs, 2) < 0) {
        return NULL;
    }
    int64_t *p = word_at(self, args[0]);
    if (p == NULL || value_of(args[1], &v) < 0) {
        return NULL;
    }
    __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *
Atomics_fetch_add(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t delta;
    if (check_nargs("fetch_add", nargs, 2) < 0) {
        return NULL;
    }
    int64_t *p = word_at(self, args[0]);
    if (p == NULL || value_of(args[1], &delta) < 0) {
        return NULL;
    }
    uint64_t old = __atomic_fetch_add((uint64_t *)p, (uint64_t)delta, __ATOMIC_SEQ_CST);
    return PyLong_FromLongLong((int64_t)old);
}

static PyObject *
Atomics_cas(AtomicsObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t expected, desired;
    if (check_nargs("cas", nargs, 3) < 0) {
        return NULL;
    }
    int64_t *p = word_at(self, args[0]);
    if (p == NULL || value_of(args[1], &expected) < 0 || value_of(args[2], &desired) < 0) {
        return NULL;
    }
    int ok = __atomic_compare_exchange_n(p, &expected, desired, 0 /* strong */, __ATOMIC_SEQ_CST,
                                         __ATOMIC_SEQ_CST);
    return PyBool_FromLong(ok);
}

static PyObject *
Atomics_fence(AtomicsObject *Py_UNUSED(self), PyObject *Py_UNUSED(ignored))
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static void
release_view(AtomicsObject *self)
{
    if (self->base != NULL) {
        self->base = NULL;
        self->len = 0;
        PyBuffer_Release(&self->view);
    }
}

static PyObject *
Atomics_release(AtomicsObject *self, PyObject *Py_UNUSED(ignored))
{
    release_view(self);
    Py_RETURN_NONE;
}

static PyObject *
Atomics_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"buf", NULL};
    PyObject *buf;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O:Atomics", kwlist, &buf)) {
        return NULL;
    }
    AtomicsObject *self = (AtomicsObject *)type->tp_alloc(type, 0);
    if (self == NULL) {
        return NULL;
    }
    if (PyObject_GetBuffer(buf, &self->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    self->base = (char *)self->view.buf;
    self->len = self->view.len;
    return (PyObject *)self;
}

static void
Atomics_dealloc(AtomicsObject *self)
{
    release_view(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Atomics_get_size(AtomicsObject *self, void *Py_UNUSED(closure))
{
    return PyLong_FromSsize_t(self->len);
}

static PyMethodDef Atomics_methods[] = {
    {"load", (PyCFunction)(void (*)(void))Atomics_load, METH_FASTCALL,
     "load(off) -> int: the signed 64-bit word at off."},
    {"store", (PyCFunction)(void (*)(void))Atomics_store, METH_FASTCALL,
     "store(off, value) -> None."},
    {"fetch_add", (PyCFunction)(void (*)(void))Atomics_fetch_add, METH_FASTCALL,
     "fetch_add(off, delta) -> int: add (wrapping), return the old value."},
    {"cas", (PyCFunction)(void (*)(void))Atomics_cas, METH_FASTCALL,
     "cas(off, expected, new) -> bool: store new if the word equals expected."},
    {"fence", (PyCFunction)Atomics_fence, METH_NOARGS, "fence() -> None: a seq-cst fence."},
    {"release", (PyCFunction)Atomics_release, METH_NOARGS,
     "release() -> None: drop the buffer export; later operations raise ValueError."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Atomics_getset[] = {
    {"size", (getter)Atomics_get_size, NULL, "bytes addressable (0 once released)", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject AtomicsType = {
    PyVarObject_HEAD_INIT(NULL, 0)  /* the macro ends with its own comma */
    .tp_name = "weft.shm._atomics.Atomics",
    .tp_doc = "Atomics(buf): seq-cst 8-byte atomics on a writable buffer (holds its export).",
    .tp_basicsize = sizeof(AtomicsObject),
    .tp_itemsize = 0,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = Atomics_new,
    .tp_dealloc = (destructor)Atomics_dealloc,
    .tp_methods = Atomics_methods,
    .tp_getset = Atomics_getset,
};

static struct PyModuleDef atomics_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "weft.shm._atomics",
    .m_doc = "Seq-cst 8-byte atomics on a writable buffer (GCC __atomic builtins).",
    .m_size = -1,
};

PyMODINIT_FUNC
PyInit__atomics(void)
{
    if (PyType_Ready(&AtomicsType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&atomics_module);
    if (m == NULL) {
        return NULL;
    }
    Py_INCREF(&AtomicsType);
    if (PyModule_AddObject(m, "Atomics", (PyObject *)&AtomicsType) < 0) {
        Py_DECREF(&AtomicsType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
