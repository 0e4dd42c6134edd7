/*
 * fsm._native: the native core of fsm, one translation unit:
 *   - _terms.h: TermStore, the hash-consed terms with derivatives (fsm.terms);
 *   - _dfa_rows.h: DfaRows, a lazy DFA over those terms (fsm.dfa);
 *   - this file: token-trie walks over a caller's DFA table (fill_mask, walk_bytes; the
 *     reference walk, described below), the shared walk helpers, and the buffer pool that
 *     masks and DFA rows take their large buffers from (MaskBlock);
 *   - _trie_masks.h: TrieMasks, the token masks of DfaRows states (fsm.token_trie), which
 *     reach the plain walk's result with skips.
 *
 * The caller's DFA table for fill_mask and walk_bytes is a C-contiguous int32[cap][256]: table[q][b] is the state reached from q on
 * byte b, or -1 when that transition is dead. Row q may be read only once row_ready[q] != 0;
 * otherwise the Python callback expand(q) fills it (and returns True), or returns False when
 * the table must first grow to a larger capacity. A state q >= cap also asks for growth. In
 * both cases the functions here stop at once and report it; the caller grows and calls again.
 *
 * The token trie is given as flat arrays over its nodes in DFS preorder, root excluded:
 * node i consumes byte node_byte[i] at depth node_depth[i] (1 = child of the root), its subtree
 * ends just before node node_skip[i], node_token[i] is a token whose bytes end at node i (or
 * -1), and token_alias[t] chains tokens with identical bytes (increasing ids, -1 ends).
 *
 * fill_mask walks the nodes in order with a stack of DFA states indexed by depth: states[0]
 * is the start state and states[d] the state after the d bytes of the current path. For node
 * i at depth d the next state is table[states[d - 1]][node_byte[i]]:
 *   - dead (-1): no token below node i can match, so the walk jumps to node_skip[i];
 *   - live: it becomes states[d], the tokens ending at node i (and their aliases) are set in
 *     the mask, and the walk goes on with node i + 1 (the first child of i, if any).
 * A row is looked up (and expanded when not ready) only when a node reads it as its parent
 * state, so the states of leaves never cost an expansion. row_ready is checked at every node:
 * that branch is almost always taken the same way, which measured cheaper than remembering
 * which rows of the path are known ready (a branch on "first child or sibling" mispredicts).
 * The GIL is held throughout, since expand is Python code.
 *
 * Self-loop skip. Let L be a set of bytes b with table[start][b] == start (all such bytes, or
 * only some). A token whose bytes all lie in L never leaves the start state, which is live, so
 * it is allowed. The caller may pass loop_mask, the mask of exactly those tokens, and
 * loop_covered, where loop_covered[i] != 0 iff the bytes on the path to node i and in its
 * subtree (node i included) all lie in L, i.e. every token of the subtree is in loop_mask. The
 * mask then starts as a copy of loop_mask, and the walk jumps over a covered node's subtree as
 * if its transition were dead: its tokens are set already. (Only paths that stay in L qualify:
 * a path that leaves L and comes back to the start state reaches tokens that loop_mask does not
 * hold.) Without loop information the mask starts zeroed and nothing is skipped that way.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>

#define ALPHABET 256
#define ROW_OK 1
#define ROW_GROW 0
#define ROW_ERROR (-1)
#define TOKEN_BATCH 256

/* The lazily filled DFA table and the callback that fills it. */
typedef struct {
    const int32_t *table;
    const uint8_t *ready;
    Py_ssize_t cap;
    PyObject *expand;
} Dfa;

/* Acquire a C-contiguous buffer of integers of the given item size; 0 on success, -1 with
 * an exception set. On failure after acquisition, the view is still held (released by the
 * caller's cleanup, which releases every view whose obj is set). */
static int get_buffer(PyObject *obj, Py_buffer *view, const char *name, Py_ssize_t itemsize,
                      int writable) {
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, view, flags) < 0) {
        return -1;
    }
    const char *fmt = view->format ? view->format : "B";
    size_t len = strlen(fmt);
    char code = len ? fmt[len - 1] : '?';
    if (view->itemsize != itemsize || strchr("bBhHiIlLqQ", code) == NULL) {
        PyErr_Format(PyExc_ValueError, "%s: expected a contiguous buffer of %zd-byte integers",
                     name, itemsize);
        return -1;
    }
    return 0;
}

static Py_ssize_t items(const Py_buffer *view) { return view->len / view->itemsize; }

/*
 * The buffer pool: the large buffers a first visit writes (token masks, DFA rows and
 * successor blocks, a store's term arrays, partitions) come from memory that is already
 * mapped and touched, and go back to the pool when freed.
 *
 * A page fault costs a few microseconds on a loaded machine, and a first visit used to take
 * several: malloc returns the buffers of a dropped guide to the system (it trims its heap or
 * unmaps them), so the next guide faulted every page of its masks and rows in again.
 * Here a buffer is a whole number of POOL_PAGE pages carved from a POOL_CHUNK chunk, or a
 * whole number of chunks (up to POOL_BIG). Chunks are mapped at a chunk boundary and advised
 * as transparent huge pages where the kernel offers them (touching one then faults once); a
 * chunk to carve is touched when mapped, a buffer of several chunks (mostly a store's arrays,
 * grown while compiling) as it is used. A freed buffer goes on the free list of its size
 * (linked through its first word) and is reused before new memory is mapped. Page-sized
 * buffers are never returned: the pool holds the most of them ever in use at once; of each
 * chunk-sized size at most POOL_BIG_KEEP free buffers are kept. Larger buffers are plain
 * allocations. The GIL guards the pool.
 */

#define POOL_PAGE ((size_t)4096)
#define POOL_CHUNK ((size_t)2 << 20)
#define POOL_BIG 32     /* buffers of up to this many chunks are pooled */
#define POOL_BIG_KEEP 4 /* free buffers kept per chunk-sized size */

static struct {
    void *free[POOL_CHUNK / POOL_PAGE + 1]; /* by size in pages: freed buffers */
    void *big[POOL_BIG + 1];                /* by size in chunks: freed buffers */
    int big_kept[POOL_BIG + 1];             /* the length of each `big` list */
    char *carve;                            /* the rest of the newest chunk */
    size_t carve_left;
} pool;

static size_t pool_size(size_t n) { return (n + POOL_PAGE - 1) & ~(POOL_PAGE - 1); }

static size_t pool_chunks(size_t n) { return (n + POOL_CHUNK - 1) / POOL_CHUNK; }

/* Push buf on the free list `*list` (linked through its first word). */
static void pool_push(void **list, void *buf) {
    *(void **)buf = *list;
    *list = buf;
}

/* Pop a buffer from the free list `*list`, or NULL when it is empty. */
static void *pool_pop(void **list) {
    void *buf = *list;
    if (buf != NULL) *list = *(void **)buf;
    return buf;
}

/* `chunks` new chunks in a row, touched if `touch`; NULL with MemoryError. */
static char *pool_map(size_t chunks, int touch) {
    size_t len = chunks * POOL_CHUNK, span = len + POOL_CHUNK;
    char *raw = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) {
        PyErr_NoMemory();
        return NULL;
    }
    char *start = (char *)(((uintptr_t)raw + POOL_CHUNK - 1) & ~(uintptr_t)(POOL_CHUNK - 1));
    if (start > raw) munmap(raw, (size_t)(start - raw));
    if (raw + span > start + len) munmap(start + len, (size_t)(raw + span - (start + len)));
#ifdef MADV_HUGEPAGE
    madvise(start, len, MADV_HUGEPAGE); /* a hint: without it, 4 KB pages */
#endif
    for (size_t k = 0; touch && k < len; k += POOL_PAGE) ((volatile char *)start)[k] = 0;
    return start;
}

/* A buffer of at least n bytes (n > 0), to be given back with pool_free(buf, n); NULL with
 * MemoryError. Its content is unspecified. */
static void *pool_alloc(size_t n) {
    size_t size = pool_size(n), chunks = pool_chunks(n);
    if (chunks > POOL_BIG) {
        void *buf = PyMem_RawMalloc(n);
        if (buf == NULL) PyErr_NoMemory();
        return buf;
    }
    if (size > POOL_CHUNK) {
        void *buf = pool_pop(&pool.big[chunks]);
        if (buf == NULL) return pool_map(chunks, 0);
        pool.big_kept[chunks]--;
        return buf;
    }
    void *buf = pool_pop(&pool.free[size / POOL_PAGE]);
    if (buf != NULL) return buf;
    if (pool.carve_left < size) {
        char *chunk = pool_map(1, 1);
        if (chunk == NULL) return NULL;
        if (pool.carve_left > 0) pool_push(&pool.free[pool.carve_left / POOL_PAGE], pool.carve);
        pool.carve = chunk;
        pool.carve_left = POOL_CHUNK;
    }
    buf = pool.carve;
    pool.carve += size;
    pool.carve_left -= size;
    return buf;
}

/* Give back a buffer of pool_alloc(n) (NULL: nothing). */
static void pool_free(void *buf, size_t n) {
    size_t size = pool_size(n), chunks = pool_chunks(n);
    if (buf == NULL) return;
    if (chunks > POOL_BIG) {
        PyMem_RawFree(buf);
    } else if (size <= POOL_CHUNK) {
        pool_push(&pool.free[size / POOL_PAGE], buf);
    } else if (pool.big_kept[chunks] >= POOL_BIG_KEEP) {
        munmap(buf, chunks * POOL_CHUNK);
    } else {
        pool_push(&pool.big[chunks], buf);
        pool.big_kept[chunks]++;
    }
}

/* MaskBlock(nbytes): a writable buffer of nbytes bytes (unspecified content) from the pool,
 * given back when the block and every view of it are gone. */
typedef struct {
    PyObject_HEAD
    void *buf;
    Py_ssize_t len;
} MaskBlockObject;

static PyObject *block_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"nbytes", NULL};
    Py_ssize_t len;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "n:MaskBlock", kwlist, &len)) return NULL;
    if (len < 1) {
        PyErr_SetString(PyExc_ValueError, "MaskBlock: nbytes must be >= 1");
        return NULL;
    }
    MaskBlockObject *m = (MaskBlockObject *)type->tp_alloc(type, 0);
    if (m == NULL) return NULL;
    if ((m->buf = pool_alloc((size_t)len)) == NULL) {
        Py_DECREF(m);
        return NULL;
    }
    m->len = len;
    return (PyObject *)m;
}

static void block_dealloc(PyObject *self) {
    MaskBlockObject *m = (MaskBlockObject *)self;
    pool_free(m->buf, (size_t)m->len);
    Py_TYPE(self)->tp_free(self);
}

static int block_getbuffer(PyObject *self, Py_buffer *view, int flags) {
    MaskBlockObject *m = (MaskBlockObject *)self;
    return PyBuffer_FillInfo(view, self, m->buf, m->len, 0, flags);
}

static PyBufferProcs block_as_buffer = {.bf_getbuffer = block_getbuffer};

static PyTypeObject MaskBlockType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fsm._native.MaskBlock",
    .tp_basicsize = sizeof(MaskBlockObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "MaskBlock(nbytes): a writable buffer from fsm's pool of pre-faulted memory "
              "(see fsm/_native.c), returned to the pool when the block and its views are gone.",
    .tp_new = block_new,
    .tp_dealloc = block_dealloc,
    .tp_as_buffer = &block_as_buffer,
};

#include "_terms.h"
#include "_dfa_rows.h"

static inline int row_ready(const Dfa *dfa, Py_ssize_t q) {
    return q < dfa->cap && dfa->ready[q];
}

/* Make row q ready by calling expand(q). Returns ROW_OK, ROW_GROW (expand returned False or
 * q >= cap) or ROW_ERROR (exception set). */
static int expand_row(const Dfa *dfa, Py_ssize_t q) {
    if (q >= dfa->cap) {
        return ROW_GROW;
    }
    PyObject *res = PyObject_CallFunction(dfa->expand, "n", q);
    if (res == NULL) {
        return ROW_ERROR;
    }
    int ok = PyObject_IsTrue(res);
    Py_DECREF(res);
    if (ok <= 0) {
        return ok < 0 ? ROW_ERROR : ROW_GROW;
    }
    if (!dfa->ready[q]) {
        PyErr_Format(PyExc_RuntimeError, "expand(%zd) returned True but row_ready[%zd] is 0", q,
                     q);
        return ROW_ERROR;
    }
    return ROW_OK;
}

/* Set up the DFA from its buffers and callback; 0 on success, -1 with an exception set. */
static int init_dfa(Dfa *dfa, const Py_buffer *table, const Py_buffer *ready, PyObject *expand,
                    Py_ssize_t start_state) {
    if (table->ndim != 2 || table->shape[1] != ALPHABET) {
        PyErr_SetString(PyExc_ValueError, "table: expected shape [cap, 256]");
        return -1;
    }
    dfa->table = (const int32_t *)table->buf;
    dfa->ready = (const uint8_t *)ready->buf;
    dfa->cap = items(table) / ALPHABET;
    dfa->expand = expand;
    if (items(ready) != dfa->cap) {
        PyErr_Format(PyExc_ValueError, "row_ready: expected %zd items (the table's rows), got %zd",
                     dfa->cap, items(ready));
        return -1;
    }
    if (!PyCallable_Check(expand)) {
        PyErr_SetString(PyExc_TypeError, "expand must be callable");
        return -1;
    }
    if (start_state < 0) {
        PyErr_SetString(PyExc_ValueError, "start_state must be >= 0");
        return -1;
    }
    return 0;
}

/* The trie arrays and the output mask. */
typedef struct {
    const uint8_t *byte;
    const int32_t *depth;
    const int32_t *skip;
    const int32_t *token;
    const int32_t *alias;
    Py_ssize_t nodes;
    Py_ssize_t size;
    uint32_t *mask;
} Trie;

static int bad_trie(const char *what, Py_ssize_t i) {
    PyErr_Format(PyExc_ValueError, "malformed token trie: %s at node/token %zd", what, i);
    return -1;
}

/* Set tokens ids[0 .. count - 1] and their aliases in the mask; 0 on success, -1 on a bad id
 * or alias chain. */
static int set_tokens(const Trie *trie, const int32_t *ids, int count) {
    uint32_t *mask = trie->mask;
    for (int k = 0; k < count; k++) {
        Py_ssize_t t = ids[k];
        if (t >= trie->size) {
            return bad_trie("token id out of range", t);
        }
        mask[t >> 5] |= (uint32_t)1 << (t & 31);
        for (Py_ssize_t next = trie->alias[t]; next >= 0; t = next, next = trie->alias[t]) {
            if (next <= t || next >= trie->size) {
                return bad_trie("alias chain not increasing or out of range", t);
            }
            mask[next >> 5] |= (uint32_t)1 << (next & 31);
        }
    }
    return 0;
}

/* Tokens reached by a walk, buffered and set in the mask a batch at a time: a walk only
 * appends to `ids`, with no branch on whether a node ends a token and no stores into the mask
 * (this nearly halves a walk of the whole trie against setting bits in place). */
typedef struct {
    int32_t ids[TOKEN_BATCH];
    int count;
} TokenBuffer;

/* Keep `token` (a node's token id, negative where the node ends none); a full buffer is
 * flushed into the mask. 0, or -1 on a bad id (see set_tokens). */
static inline int buffer_token(const Trie *trie, TokenBuffer *buf, int32_t token) {
    buf->ids[buf->count] = token;
    buf->count += token >= 0;
    if (buf->count < TOKEN_BATCH) return 0;
    buf->count = 0;
    return set_tokens(trie, buf->ids, TOKEN_BATCH);
}

/* Grow the state stack (need >= *cap) so that index `need` is valid; 0 on success, -1 with
 * MemoryError. */
static int reserve(Py_ssize_t **states, Py_ssize_t *cap, Py_ssize_t need) {
    Py_ssize_t new_cap = *cap * 2 > need ? *cap * 2 : need + 1;
    Py_ssize_t *grown = PyMem_Realloc(*states, (size_t)new_cap * sizeof(**states));
    if (grown == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    *states = grown;
    *cap = new_cap;
    return 0;
}

/* The walk described in the header; loop_covered is NULL without self-loop information.
 * Returns ROW_OK, ROW_GROW or ROW_ERROR. */
static int walk_trie(const Dfa *dfa, const Trie *trie, const uint8_t *loop_covered,
                     Py_ssize_t start) {
    /* Locals for the arrays read at every node. */
    const uint8_t *node_byte = trie->byte;
    const int32_t *node_depth = trie->depth, *node_skip = trie->skip, *node_token = trie->token;
    const int32_t *table = dfa->table;
    const Py_ssize_t n = trie->nodes;
    Py_ssize_t stack_cap = 64;
    Py_ssize_t *states = PyMem_Malloc((size_t)stack_cap * sizeof(*states));
    if (states == NULL) {
        PyErr_NoMemory();
        return ROW_ERROR;
    }
    states[0] = start;
    Py_ssize_t top = 0; /* states[0 .. top] hold the current path */
    TokenBuffer found = {.count = 0};
    int status = ROW_OK;
    Py_ssize_t i = 0;
    while (i < n) {
        Py_ssize_t d = node_depth[i];
        if (d < 1 || d > top + 1) {
            bad_trie("depth out of order", i);
            status = ROW_ERROR;
            break;
        }
        Py_ssize_t q = states[d - 1];
        if (!row_ready(dfa, q) && (status = expand_row(dfa, q)) != ROW_OK) {
            break;
        }
        int32_t next = table[q * ALPHABET + node_byte[i]];
        /* Skip the subtree when the transition is dead, or when all its tokens are in the
         * mask already (covered by the start state's self-loops, see the header). */
        if (next < 0 || (loop_covered != NULL && loop_covered[i])) {
            Py_ssize_t end = node_skip[i];
            if (end <= i || end > n) {
                bad_trie("skip out of order", i);
                status = ROW_ERROR;
                break;
            }
            top = d - 1;
            i = end;
            continue;
        }
        if (d >= stack_cap && reserve(&states, &stack_cap, d) < 0) {
            status = ROW_ERROR;
            break;
        }
        states[d] = next;
        top = d;
        if (buffer_token(trie, &found, node_token[i]) < 0) {
            status = ROW_ERROR;
            break;
        }
        i++;
    }
    if (status == ROW_OK && set_tokens(trie, found.ids, found.count) < 0) {
        status = ROW_ERROR;
    }
    PyMem_Free(states);
    return status;
}

#define N_BUFFERS 10

static void release_all(Py_buffer *views) {
    for (int k = 0; k < N_BUFFERS; k++) {
        PyBuffer_Release(&views[k]);
    }
}

static int init_trie(Trie *trie, Py_buffer *v) {
    /* v: node_byte, node_depth, node_skip, node_token, token_alias, mask_out */
    trie->nodes = items(&v[0]);
    if (items(&v[1]) != trie->nodes || items(&v[2]) != trie->nodes ||
        items(&v[3]) != trie->nodes) {
        PyErr_SetString(PyExc_ValueError, "node arrays must all have the same length");
        return -1;
    }
    trie->size = items(&v[4]);
    if (items(&v[5]) != (trie->size + 31) / 32) {
        PyErr_Format(PyExc_ValueError, "mask_out: expected %zd uint32 words, got %zd",
                     (trie->size + 31) / 32, items(&v[5]));
        return -1;
    }
    trie->byte = (const uint8_t *)v[0].buf;
    trie->depth = (const int32_t *)v[1].buf;
    trie->skip = (const int32_t *)v[2].buf;
    trie->token = (const int32_t *)v[3].buf;
    trie->alias = (const int32_t *)v[4].buf;
    trie->mask = (uint32_t *)v[5].buf;
    return 0;
}

/* Check the self-loop buffers v[0] (loop_mask) and v[1] (loop_covered) against the trie. */
static int check_loop(const Trie *trie, const Py_buffer *v) {
    if (items(&v[0]) != (trie->size + 31) / 32) {
        PyErr_Format(PyExc_ValueError, "loop_mask: expected %zd uint32 words, got %zd",
                     (trie->size + 31) / 32, items(&v[0]));
        return -1;
    }
    if (items(&v[1]) != trie->nodes) {
        PyErr_Format(PyExc_ValueError, "loop_covered: expected %zd items (the nodes), got %zd",
                     trie->nodes, items(&v[1]));
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(fill_mask_doc,
             "fill_mask(table, row_ready, node_byte, node_depth, node_skip, node_token, "
             "token_alias, start_state, expand, mask_out, loop_mask, loop_covered) -> bool\n\n"
             "Set in mask_out exactly the tokens whose bytes lead from start_state through live "
             "transitions. loop_mask (uint32 words) and loop_covered (uint8 per node) describe the "
             "start state's self-loops (see the module source), or are both None. Return False "
             "(mask unspecified) when the table must grow first.");

static PyObject *fill_mask(PyObject *Py_UNUSED(module), PyObject *args) {
    PyObject *table_obj, *ready_obj, *expand, *objs[8];
    Py_ssize_t start_state;
    if (!PyArg_ParseTuple(args, "OOOOOOOnOOOO:fill_mask", &table_obj, &ready_obj, &objs[0],
                          &objs[1], &objs[2], &objs[3], &objs[4], &start_state, &expand,
                          &objs[5], &objs[6], &objs[7])) {
        return NULL;
    }
    static const char *names[8] = {"node_byte",   "node_depth", "node_skip", "node_token",
                                   "token_alias", "mask_out",   "loop_mask", "loop_covered"};
    static const Py_ssize_t sizes[8] = {1, 4, 4, 4, 4, 4, 4, 1};
    Py_buffer views[N_BUFFERS] = {{0}}; /* table, row_ready, then objs */
    Dfa dfa;
    Trie trie;
    int status = ROW_ERROR;
    int has_loop = objs[6] != Py_None;
    if (has_loop != (objs[7] != Py_None)) {
        PyErr_SetString(PyExc_TypeError, "loop_mask and loop_covered must both be None or not");
        goto done;
    }
    if (get_buffer(table_obj, &views[0], "table", 4, 0) < 0 ||
        get_buffer(ready_obj, &views[1], "row_ready", 1, 0) < 0) {
        goto done;
    }
    for (int k = 0; k < (has_loop ? 8 : 6); k++) {
        if (get_buffer(objs[k], &views[2 + k], names[k], sizes[k], k == 5) < 0) {
            goto done;
        }
    }
    if (init_dfa(&dfa, &views[0], &views[1], expand, start_state) < 0 ||
        init_trie(&trie, &views[2]) < 0 || (has_loop && check_loop(&trie, &views[8]) < 0)) {
        goto done;
    }
    if (has_loop) {
        memcpy(trie.mask, views[8].buf, (size_t)views[7].len);
    } else {
        memset(trie.mask, 0, (size_t)views[7].len);
    }
    status = walk_trie(&dfa, &trie, has_loop ? (const uint8_t *)views[9].buf : NULL, start_state);
done:
    release_all(views);
    if (status == ROW_ERROR) {
        return NULL;
    }
    return PyBool_FromLong(status == ROW_OK);
}

PyDoc_STRVAR(walk_bytes_doc,
             "walk_bytes(table, row_ready, start_state, data, expand) -> int\n\n"
             "The state reached from start_state by the bytes of data; -1 if a transition is "
             "dead, -2 when the table must grow first.");

static PyObject *walk_bytes(PyObject *Py_UNUSED(module), PyObject *args) {
    PyObject *table_obj, *ready_obj, *data_obj, *expand;
    Py_ssize_t state;
    if (!PyArg_ParseTuple(args, "OOnOO:walk_bytes", &table_obj, &ready_obj, &state, &data_obj,
                          &expand)) {
        return NULL;
    }
    Py_buffer views[3] = {{0}};
    Dfa dfa;
    int status = ROW_ERROR;
    if (get_buffer(table_obj, &views[0], "table", 4, 0) < 0 ||
        get_buffer(ready_obj, &views[1], "row_ready", 1, 0) < 0 ||
        get_buffer(data_obj, &views[2], "data", 1, 0) < 0 ||
        init_dfa(&dfa, &views[0], &views[1], expand, state) < 0) {
        goto done;
    }
    const uint8_t *data = (const uint8_t *)views[2].buf;
    status = ROW_OK;
    for (Py_ssize_t k = 0; k < views[2].len && state >= 0; k++) {
        if (!row_ready(&dfa, state) && (status = expand_row(&dfa, state)) != ROW_OK) {
            break;
        }
        int32_t next = dfa.table[state * ALPHABET + data[k]];
        state = next < 0 ? -1 : next;
    }
done:
    for (int k = 0; k < 3; k++) {
        PyBuffer_Release(&views[k]);
    }
    if (status == ROW_ERROR) {
        return NULL;
    }
    return PyLong_FromSsize_t(status == ROW_OK ? state : -2);
}

#include "_trie_masks.h"

static PyMethodDef methods[] = {
    {"fill_mask", fill_mask, METH_VARARGS, fill_mask_doc},
    {"walk_bytes", walk_bytes, METH_VARARGS, walk_bytes_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "fsm._native",
    .m_doc = "Token-trie walks over lazily filled DFA tables.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&TermStoreType) < 0 || PyType_Ready(&DfaRowsType) < 0 ||
        PyType_Ready(&TrieMasksType) < 0 || PyType_Ready(&MaskBlockType) < 0) {
        return NULL;
    }
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) {
        return NULL;
    }
    if (PyModule_AddObjectRef(m, "TermStore", (PyObject *)&TermStoreType) < 0 ||
        PyModule_AddObjectRef(m, "DfaRows", (PyObject *)&DfaRowsType) < 0 ||
        PyModule_AddObjectRef(m, "TrieMasks", (PyObject *)&TrieMasksType) < 0 ||
        PyModule_AddObjectRef(m, "MaskBlock", (PyObject *)&MaskBlockType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
