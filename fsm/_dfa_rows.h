/*
 * DfaRows: a lazy byte DFA over the terms of a TermStore, with its transition table
 * (fsm.dfa.LazyDFA is the Python side).
 *
 * States are dense ids 0, 1, ... standing for distinct non-empty terms; STATE_DEAD (-1) is
 * every empty term. The row of state q (a StateRow) maps a byte to the derivative class of q's
 * term that holds it (the partition's byte -> class map, shared, not copied) and holds one
 * successor per class, filled when an entry of the class is first read (rows_next): the
 * derivative of q's term by the class, mapped to its state (new states are numbered in order
 * of discovery). Entries not computed yet hold ROW_UNKNOWN. So a token walk that skips most
 * bytes of a state (see _trie_masks.h) never derives by them, and a new state costs a few
 * words (one per class), not 256. The successors are kept in blocks of SUCC_BLOCK entries
 * allocated as states appear (from the buffer pool of _native.c), so they never move or are
 * copied.
 *
 * Included once by _native.c, after _terms.h.
 */

#define STATE_DEAD (-1)
#define ROW_UNKNOWN (-3) /* a table entry not computed yet */
#define SUCC_BLOCK 16384 /* successor entries per block (a row has at most 256) */

/* The row of a state: its successor on byte b is succ[index[b]]. */
typedef struct {
    const uint8_t *index; /* the byte -> class map of the state's term (see Partitions) */
    int32_t *succ;        /* one entry per class; NULL until the row is set up (rows_init) */
} StateRow;

typedef struct {
    PyObject_HEAD
    TermStoreObject *store;
    int32_t *terms;  /* state -> term */
    StateRow *rows;  /* state -> its row */
    Py_ssize_t n_states, cap_states, cap_rows;
    int32_t **blocks; /* the blocks the rows' successors are taken from, the last one in use */
    Py_ssize_t n_blocks, cap_blocks, block_used;
    int32_t *map_keys, *map_vals; /* term -> state, open addressing, key -1 = free */
    Py_ssize_t map_cap;
    Bits256 loop_key;    /* the byte set `loop_flags` is about */
    uint8_t *loop_flags; /* per state: LOOPS_UNKNOWN, LOOPS_YES or LOOPS_NO (see rows_loops_on) */
    Py_ssize_t loop_flags_cap;
} DfaRowsObject;

#define LOOPS_UNKNOWN 0
#define LOOPS_YES 1
#define LOOPS_NO 2

static void map_insert(int32_t *keys, int32_t *vals, Py_ssize_t cap, int32_t key, int32_t val) {
    Py_ssize_t j = (Py_ssize_t)(mix(0, (uint64_t)key) & (uint64_t)(cap - 1));
    while (keys[j] >= 0) j = (j + 1) & (cap - 1);
    keys[j] = key;
    vals[j] = val;
}

static int map_grow(DfaRowsObject *d) {
    Py_ssize_t cap = d->map_cap ? 2 * d->map_cap : 256;
    int32_t *keys = pool_alloc((size_t)cap * sizeof(int32_t));
    int32_t *vals = keys == NULL ? NULL : pool_alloc((size_t)cap * sizeof(int32_t));
    if (vals == NULL) {
        pool_free(keys, (size_t)cap * sizeof(int32_t));
        return -1;
    }
    memset(keys, 0xFF, (size_t)cap * sizeof(int32_t));
    for (Py_ssize_t q = 0; q < d->n_states; q++) map_insert(keys, vals, cap, d->terms[q], (int32_t)q);
    pool_free(d->map_keys, (size_t)d->map_cap * sizeof(int32_t));
    pool_free(d->map_vals, (size_t)d->map_cap * sizeof(int32_t));
    d->map_keys = keys;
    d->map_vals = vals;
    d->map_cap = cap;
    return 0;
}

/* Room for one more state: its term and (not set up) row. 0, or -1 with MemoryError. */
static int rows_reserve(DfaRowsObject *d) {
    Py_ssize_t n = d->n_states + 1;
    Py_ssize_t old_rows = d->cap_rows;
    if (reserve_items((void **)&d->terms, &d->cap_states, n, sizeof(int32_t)) < 0 ||
        reserve_items((void **)&d->rows, &d->cap_rows, n, sizeof(StateRow)) < 0) {
        return -1;
    }
    memset(d->rows + old_rows, 0, (size_t)(d->cap_rows - old_rows) * sizeof(StateRow));
    if (2 * n > d->map_cap && map_grow(d) < 0) return -1;
    return 0;
}

/* n successor entries that never move (n <= 256), or NULL with MemoryError. */
static int32_t *rows_take(DfaRowsObject *d, int32_t n) {
    if (d->n_blocks == 0 || d->block_used + n > SUCC_BLOCK) {
        if (reserve_items((void **)&d->blocks, &d->cap_blocks, d->n_blocks + 1,
                          sizeof(int32_t *)) < 0) {
            return NULL;
        }
        int32_t *block = pool_alloc(SUCC_BLOCK * sizeof(int32_t));
        if (block == NULL) return NULL;
        d->blocks[d->n_blocks++] = block;
        d->block_used = 0;
    }
    int32_t *out = d->blocks[d->n_blocks - 1] + d->block_used;
    d->block_used += n;
    return out;
}

/* The state of `term`, numbered now if new; STATE_DEAD for an empty term; -2 on error. */
static int32_t rows_state_of(DfaRowsObject *d, int32_t term) {
    if (d->map_cap) {
        Py_ssize_t j = (Py_ssize_t)(mix(0, (uint64_t)term) & (uint64_t)(d->map_cap - 1));
        for (int32_t k; (k = d->map_keys[j]) >= 0; j = (j + 1) & (d->map_cap - 1)) {
            if (k == term) return d->map_vals[j];
        }
    }
    int empty = t_is_empty(d->store, term, EMPTY_BUDGET);
    if (empty) return empty < 0 ? -2 : STATE_DEAD;
    if (rows_reserve(d) < 0) return -2;
    int32_t q = (int32_t)d->n_states++;
    d->terms[q] = term;
    map_insert(d->map_keys, d->map_vals, d->map_cap, term, q);
    return q;
}

/* Set up row q if needed (its term's classes computed, entries ROW_UNKNOWN): 0, or -1 with
 * an exception set. */
static int rows_init(DfaRowsObject *d, Py_ssize_t q) {
    if (d->rows[q].succ != NULL) return 0;
    if (ensure_classes(d->store, d->terms[q]) < 0) return -1;
    const Partition *p = partition_of(d->store, d->terms[q]);
    int32_t *succ = rows_take(d, p->n);
    if (succ == NULL) return -1;
    for (int32_t k = 0; k < p->n; k++) succ[k] = ROW_UNKNOWN;
    d->rows[q] = (StateRow){p->index, succ};
    return 0;
}

/* Compute the entry of row q (set up) for the derivative class of `byte`: the state it leads
 * to, or -2 on error. */
static int32_t rows_fill_class(DfaRowsObject *d, Py_ssize_t q, int byte) {
    TermStoreObject *s = d->store;
    int32_t term = d->terms[q];
    int32_t k = partition_of(s, term)->index[byte];
    /* A byte no string of the term starts with has an empty derivative, and so has its whole
     * class (the derivative is the same on a class): no need to derive. */
    int starts = may_start(s, term, byte);
    if (starts < 0) return -2;
    int32_t target = STATE_DEAD;
    if (starts) {
        int32_t succ = t_derive(s, term, bits_lowest(class_mask(s, term, k)));
        target = succ < 0 ? -2 : rows_state_of(d, succ);
        if (target == -2) return -2;
    }
    d->rows[q].succ[k] = target; /* `rows` may have moved meanwhile, the entries not */
    return target;
}

/* The state reached from q by `byte` (STATE_DEAD if none), computed if needed; -2 on error. */
static inline int32_t rows_next(DfaRowsObject *d, Py_ssize_t q, int byte) {
    const StateRow *row = &d->rows[q];
    if (row->succ == NULL && rows_init(d, q) < 0) return -2;
    int32_t next = row->succ[row->index[byte]];
    return next != ROW_UNKNOWN ? next : rows_fill_class(d, q, byte);
}

/* Compute the entries of row q for the bytes of L: 0, or -1 with an exception set. */
static int rows_fill(DfaRowsObject *d, Py_ssize_t q, const Bits256 *L) {
    for (int w = 0; w < 4; w++) {
        for (uint64_t bits = L->w[w]; bits; bits &= bits - 1) {
            if (rows_next(d, q, w * 64 + __builtin_ctzll(bits)) == -2) return -1;
        }
    }
    return 0;
}

/* Whether state s loops on every byte of L (its entries for L are s): 1 yes, 0 no, -1 on
 * error. Cached per state for the last byte set asked about. */
static int rows_loops_on(DfaRowsObject *d, int32_t s, const Bits256 *L) {
    if (!bits_eq(&d->loop_key, L)) {
        memset(d->loop_flags, LOOPS_UNKNOWN, (size_t)d->loop_flags_cap);
        d->loop_key = *L;
    }
    if (s >= d->loop_flags_cap) {
        Py_ssize_t old = d->loop_flags_cap;
        if (reserve_items((void **)&d->loop_flags, &d->loop_flags_cap, d->n_states, 1) < 0) {
            return -1;
        }
        memset(d->loop_flags + old, LOOPS_UNKNOWN, (size_t)(d->loop_flags_cap - old));
    }
    uint8_t flag = d->loop_flags[s];
    if (flag == LOOPS_UNKNOWN) {
        flag = LOOPS_YES;
        for (int w = 0; w < 4 && flag == LOOPS_YES; w++) {
            for (uint64_t bits = L->w[w]; bits; bits &= bits - 1) {
                int32_t next = rows_next(d, s, w * 64 + __builtin_ctzll(bits));
                if (next == -2) return -1;
                if (next != s) {
                    flag = LOOPS_NO;
                    break;
                }
            }
        }
        d->loop_flags[s] = flag;
    }
    return flag == LOOPS_YES;
}

/* The state reached from q by `data`, or STATE_DEAD; -2 on error. */
static Py_ssize_t rows_walk(DfaRowsObject *d, Py_ssize_t q, const uint8_t *data, Py_ssize_t n) {
    for (Py_ssize_t k = 0; k < n && q >= 0; k++) q = rows_next(d, q, data[k]);
    return q;
}

static PyObject *rows_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"store", NULL};
    PyObject *store;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!:DfaRows", kwlist, &TermStoreType, &store)) {
        return NULL;
    }
    DfaRowsObject *d = (DfaRowsObject *)type->tp_alloc(type, 0);
    if (d == NULL) return NULL;
    d->store = (TermStoreObject *)Py_NewRef(store);
    return (PyObject *)d;
}

static void rows_dealloc(PyObject *self) {
    DfaRowsObject *d = (DfaRowsObject *)self;
    Py_XDECREF(d->store);
    for (Py_ssize_t k = 0; k < d->n_blocks; k++) {
        pool_free(d->blocks[k], SUCC_BLOCK * sizeof(int32_t));
    }
    release_items(d->blocks, d->cap_blocks, sizeof(int32_t *));
    release_items(d->terms, d->cap_states, sizeof(int32_t));
    release_items(d->rows, d->cap_rows, sizeof(StateRow));
    pool_free(d->map_keys, (size_t)d->map_cap * sizeof(int32_t));
    pool_free(d->map_vals, (size_t)d->map_cap * sizeof(int32_t));
    release_items(d->loop_flags, d->loop_flags_cap, 1);
    Py_TYPE(self)->tp_free(self);
}

/* A state id argument (< n_states), or -1 with an exception set. */
static Py_ssize_t state_arg(const DfaRowsObject *d, PyObject *arg) {
    Py_ssize_t q = PyLong_AsSsize_t(arg);
    if (q == -1 && PyErr_Occurred()) return -1;
    if (q < 0 || q >= d->n_states) {
        PyErr_Format(PyExc_IndexError, "no state %zd", q);
        return -1;
    }
    return q;
}

static PyObject *rows_state_of_py(PyObject *self, PyObject *arg) {
    DfaRowsObject *d = (DfaRowsObject *)self;
    int32_t term;
    if (term_arg(d->store, arg, &term) < 0) return NULL;
    int32_t q = rows_state_of(d, term);
    return q == -2 ? NULL : PyLong_FromLong(q);
}

static PyObject *rows_term_of(PyObject *self, PyObject *arg) {
    DfaRowsObject *d = (DfaRowsObject *)self;
    Py_ssize_t q = state_arg(d, arg);
    return q < 0 ? NULL : PyLong_FromLong(d->terms[q]);
}

static PyObject *rows_row_py(PyObject *self, PyObject *arg) {
    DfaRowsObject *d = (DfaRowsObject *)self;
    Py_ssize_t q = state_arg(d, arg);
    if (q < 0 || rows_fill(d, q, &ALL_BITS) < 0) return NULL;
    int32_t row[256];
    for (int b = 0; b < 256; b++) row[b] = d->rows[q].succ[d->rows[q].index[b]];
    return PyBytes_FromStringAndSize((const char *)row, sizeof(row));
}

static PyObject *rows_walk_py(PyObject *self, PyObject *args) {
    DfaRowsObject *d = (DfaRowsObject *)self;
    PyObject *state;
    Py_buffer data;
    if (!PyArg_ParseTuple(args, "Oy*:walk", &state, &data)) return NULL;
    Py_ssize_t q = state_arg(d, state);
    if (q >= 0) q = rows_walk(d, q, (const uint8_t *)data.buf, data.len);
    PyBuffer_Release(&data);
    return q < -1 ? NULL : PyLong_FromSsize_t(q);
}

static PyObject *rows_get_num_states(PyObject *self, void *Py_UNUSED(closure)) {
    return PyLong_FromSsize_t(((DfaRowsObject *)self)->n_states);
}

static PyMethodDef rows_methods[] = {
    {"state_of", rows_state_of_py, METH_O, "state_of(term) -> state id, or -1 (empty term)"},
    {"term_of", rows_term_of, METH_O, "term_of(state) -> term"},
    {"row", rows_row_py, METH_O,
     "row(state) -> bytes: the state's 256 successors as int32 (native order), -1 = dead"},
    {"walk", rows_walk_py, METH_VARARGS,
     "walk(state, data) -> the state reached by the bytes of data, or -1"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef rows_getset[] = {
    {"num_states", rows_get_num_states, NULL, "states numbered so far", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject DfaRowsType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fsm._native.DfaRows",
    .tp_basicsize = sizeof(DfaRowsObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "DfaRows(store): a lazy byte DFA over the terms of store (see fsm.dfa).",
    .tp_new = rows_new,
    .tp_dealloc = rows_dealloc,
    .tp_methods = rows_methods,
    .tp_getset = rows_getset,
};
