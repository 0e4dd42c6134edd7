/*
 * TrieMasks: the token mask of a lazy-DFA state (a DfaRows state) over one token trie.
 *
 * It holds the trie arrays (see the header of _native.c), their subtree depths and token
 * length masks, and a cache of loop information per slice (LoopInfo(mask, covered, starts,
 * tokens) of fsm.token_trie, built by a Python callback on a miss; the `cache_size` most
 * recently used are kept). A slice (see Slice in _terms.h) is a byte set L of one-byte
 * characters, with or without every multi-byte UTF-8 character; its tokens ("L-tokens") are
 * the tokens that are prefixes of its strings, and a node is covered when every token of its
 * subtree is an L-token.
 *
 * The mask of state q is the plain walk's (fill_mask: the tokens whose bytes lead to a live
 * state), computed by a walk that may start with the L-tokens set and skip covered subtrees.
 * choose_loop picks the slice and how the walk uses it (a LoopPlan), reading only q's and its
 * main successor's entries for ASCII bytes:
 *   - q loops on the ASCII bytes L (enough of the trie below them, `min_nodes`): every
 *     L-token leads back to q; or its successor s reached by most ASCII bytes loops on L, or
 *     else L is the set of bytes leading to s;
 *   - proved: t_safe(q's term, slice) shows that every string of the slice of at most
 *     `depth` characters leads to a live state (the UTF-8 slice of L is tried first, since it
 *     also covers tokens with other characters; then L itself). The mask starts with the
 *     L-tokens of at most `depth` bytes, and the walk skips a covered subtree whose tokens
 *     are that short without reading the table. When q loops on L, that needs no proof;
 *   - verify: unproved, but s loops on L and few of L's root subtrees are dead from q. The
 *     mask starts with every L-token; the walk clears the L-tokens of every subtree it finds
 *     dead (tokens[starts[i] .. starts[skip[i]] - 1], in preorder), and skips a covered
 *     subtree where the state reached loops on L (every token below stays there, live);
 *   - otherwise the plain walk.
 * In each case an L-token ends up set exactly when the plain walk sets it. The end-of-sequence
 * ids are added where q's term is nullable.
 *
 * Included once by _native.c, after the walk helpers (Trie, set_tokens, reserve).
 */

#define LOOP_ARRAYS 4 /* mask, covered, starts, tokens */
#define LEN_MASKS 64  /* token-length masks kept: a proved length above is used as 64 */
#define DEAD_SHARE 16 /* at most 1/16 of L's root subtrees (in nodes) may be dead from q */
#define MIN_DEPTH 2   /* a proved length below this skips too little to be worth a walk plan */

typedef struct {
    Slice key;
    PyObject *info; /* the LoopInfo; NULL = free slot */
    Py_buffer views[LOOP_ARRAYS];
    uint64_t used;
} LoopSlot;

typedef struct {
    PyObject_HEAD
    Py_buffer views[5]; /* node_byte, node_depth, node_skip, node_token, token_alias */
    Trie trie;          /* pointers into views; `mask` is set per call */
    int64_t root_sizes[256];
    int32_t *subtree_depth; /* per node: the largest depth in its subtree (a token length) */
    int32_t max_depth;      /* of the whole trie: the longest token */
    uint32_t *len_masks;    /* LEN_MASKS + 1 masks: [n] holds the tokens of <= n bytes */
    PyObject *build; /* build(key: bytes) -> LoopInfo, key: 32 bytes, bit b = byte b */
    LoopSlot *slots;
    Py_ssize_t n_slots;
    uint64_t clock;
    Py_ssize_t min_nodes;
} TrieMasksObject;

static void slot_clear(LoopSlot *slot) {
    for (int k = 0; k < LOOP_ARRAYS; k++) PyBuffer_Release(&slot->views[k]);
    Py_CLEAR(slot->info);
}

static int64_t root_nodes(const TrieMasksObject *T, const Bits256 *L) {
    int64_t n = 0;
    for (int b = 0; b < 256; b++) {
        if (bits_get(L, b)) n += T->root_sizes[b];
    }
    return n;
}

/* The cached slot of L, built on a miss (NULL with an exception set). The slot stays valid
 * until the next call that may run Python code (a later lookup). */
static LoopSlot *loop_lookup(TrieMasksObject *T, const Slice *L) {
    for (Py_ssize_t k = 0; k < T->n_slots; k++) {
        if (T->slots[k].info != NULL && same_slice(&T->slots[k].key, L)) {
            T->slots[k].used = ++T->clock;
            return &T->slots[k];
        }
    }
    uint8_t raw[32];
    for (int k = 0; k < 32; k++) raw[k] = (uint8_t)(L->bytes.w[k >> 3] >> (8 * (k & 7)));
    PyObject *info = PyObject_CallFunction(T->build, "y#O", (const char *)raw, (Py_ssize_t)32,
                                           L->utf8 ? Py_True : Py_False);
    if (info == NULL) return NULL;
    LoopSlot fresh = {.key = *L, .info = info};
    static const char *names[LOOP_ARRAYS] = {"loop mask", "loop covered", "loop starts",
                                             "loop tokens"};
    static const Py_ssize_t sizes[LOOP_ARRAYS] = {4, 1, 4, 4};
    if (!PyTuple_Check(info) || PyTuple_GET_SIZE(info) != LOOP_ARRAYS) {
        PyErr_SetString(PyExc_TypeError, "loop info builder must return a LoopInfo");
        goto fail;
    }
    for (int k = 0; k < LOOP_ARRAYS; k++) {
        if (get_buffer(PyTuple_GET_ITEM(info, k), &fresh.views[k], names[k], sizes[k], 0) < 0) {
            goto fail;
        }
    }
    const Trie *t = &T->trie;
    Py_ssize_t n_tokens = items(&fresh.views[3]);
    const int32_t *starts = (const int32_t *)fresh.views[2].buf;
    if (items(&fresh.views[0]) != (t->size + 31) / 32 || items(&fresh.views[1]) != t->nodes ||
        items(&fresh.views[2]) != t->nodes + 1 || starts[0] != 0 || starts[t->nodes] != n_tokens) {
        PyErr_SetString(PyExc_ValueError, "loop info does not fit the trie");
        goto fail;
    }
    for (Py_ssize_t k = 0; k < n_tokens; k++) {
        int32_t token = ((const int32_t *)fresh.views[3].buf)[k];
        if (token < 0 || token >= t->size) {
            PyErr_SetString(PyExc_ValueError, "loop info: token id out of range");
            goto fail;
        }
    }
    for (Py_ssize_t i = 0; i < t->nodes; i++) {
        if (starts[i] > starts[i + 1]) {
            PyErr_SetString(PyExc_ValueError, "loop info: starts must not decrease");
            goto fail;
        }
    }
    /* The callback ran Python code: another thread may have filled L's slot meanwhile. */
    LoopSlot *victim = &T->slots[0];
    for (Py_ssize_t k = 0; k < T->n_slots; k++) {
        LoopSlot *slot = &T->slots[k];
        if (slot->info != NULL && same_slice(&slot->key, L)) {
            slot_clear(&fresh);
            slot->used = ++T->clock;
            return slot;
        }
        if (slot->info == NULL || (victim->info != NULL && slot->used < victim->used)) {
            victim = slot;
        }
    }
    slot_clear(victim);
    *victim = fresh;
    victim->used = ++T->clock;
    return victim;
fail:
    slot_clear(&fresh);
    return NULL;
}

/* The live successor of `q` reached by the most bytes (ties: the first one), other than q
 * itself; STATE_DEAD when there is none. */
static int32_t main_successor(const int32_t *row, Py_ssize_t q) {
    int32_t seen[256], count[256];
    int n = 0, best = -1;
    for (int b = 0; b < 256; b++) {
        int32_t s = row[b];
        if (s < 0 || s == q) continue;
        int k = 0;
        while (k < n && seen[k] != s) k++;
        if (k == n) {
            seen[n] = s;
            count[n++] = 0;
        }
        if (++count[k] > (best < 0 ? 0 : count[best])) best = k;
    }
    return best < 0 ? STATE_DEAD : seen[best];
}

static void loops_of(const int32_t *row, int32_t q, Bits256 *L) {
    memset(L, 0, sizeof(*L));
    for (int b = 0; b < 256; b++) {
        if (row[b] == q) L->w[b >> 6] |= 1ULL << (b & 63);
    }
}

/* How the walk uses a byte set L (see the header). */
typedef struct {
    LoopSlot *slot; /* L's loop information; NULL: a plain walk */
    int depth;      /* every string over L this long or shorter is live from the start state:
                     * -1 (not known), 0 .. SAFE_ALL - 1, or SAFE_ALL (any length) */
    int verify;     /* skip covered subtrees where the state reached loops on L */
} LoopPlan;

/* The byte set to walk with and how (see the header): 0, or -1 with an exception set. */
/* Whether every string of the UTF-8 slice of the ASCII bytes L, as long as a token, is live
 * from q (then the plan walks with that slice: it covers tokens with other characters too).
 * 1 yes, 0 no, -1 on error. */
static int try_utf8(TrieMasksObject *T, DfaRowsObject *d, int32_t q, const Bits256 *L,
                    LoopPlan *plan) {
    Slice utf8 = {*L, 1};
    int safe = t_safe(d->store, d->terms[q], &utf8);
    if (safe < 0) return -1;
    if (safe == SAFE_NONE || (safe & 0xFF) < T->max_depth) return 0; /* tokens: <= max_depth */
    *plan = (LoopPlan){loop_lookup(T, &utf8), SAFE_ALL, 0};
    return plan->slot == NULL ? -1 : 1;
}

/* The ASCII bytes on which state x loops, into *L (computing x's entries for ASCII). */
static int ascii_loops(DfaRowsObject *d, int32_t x, Bits256 *L) {
    Bits256 ascii = byte_range_bits(0, 0x7F);
    if (rows_fill(d, x, &ascii) < 0) return -1;
    loops_of(rows_row(d, x), x, L);
    *L = bits_and(L, &ascii);
    return 0;
}

/* The slice to walk with and how (see the header): 0, or -1 with an exception set. Only the
 * entries of q and of its main successor for ASCII bytes are computed here. */
static int choose_loop(TrieMasksObject *T, DfaRowsObject *d, int32_t q, LoopPlan *plan) {
    *plan = (LoopPlan){NULL, SAFE_ALL, 0};
    Slice L = {.utf8 = 0};
    if (ascii_loops(d, q, &L.bytes) < 0) return -1;
    if (root_nodes(T, &L.bytes) >= T->min_nodes) { /* q loops on L */
        int utf8 = try_utf8(T, d, q, &L.bytes, plan);
        if (utf8 != 0) return utf8 < 0 ? -1 : 0;
        return (plan->slot = loop_lookup(T, &L)) == NULL ? -1 : 0;
    }
    int32_t s = main_successor(rows_row(d, q), q); /* among the ASCII entries, computed */
    if (s == STATE_DEAD) return 0;
    if (ascii_loops(d, s, &L.bytes) < 0) return -1;
    const int32_t *row = rows_row(d, q);
    int64_t live = 0, dead = 0;
    for (int b = 0; b < 0x80; b++) {
        if (bits_get(&L.bytes, b)) *(row[b] >= 0 ? &live : &dead) += T->root_sizes[b];
    }
    int successor_loops = live >= T->min_nodes && dead * DEAD_SHARE <= live;
    if (!successor_loops) { /* L: the bytes leading to s, if the proof says enough */
        loops_of(row, s, &L.bytes);
        if (root_nodes(T, &L.bytes) < T->min_nodes) return 0;
    }
    int utf8 = try_utf8(T, d, q, &L.bytes, plan);
    if (utf8 != 0) return utf8 < 0 ? -1 : 0;
    int safe = t_safe(d->store, d->terms[q], &L);
    if (safe < 0) return -1;
    plan->depth = safe == SAFE_NONE ? -1 : safe & 0xFF;
    if (plan->depth >= T->max_depth) plan->depth = SAFE_ALL;
    plan->verify = successor_loops && plan->depth != SAFE_ALL;
    if (plan->verify) {
        plan->depth = -1; /* verifying needs every L-token preset, not only short ones */
    } else if (plan->depth < MIN_DEPTH) {
        return 0;
    }
    return (plan->slot = loop_lookup(T, &L)) == NULL ? -1 : 0;
}

/* A LoopPlan's arrays and byte set, with the trie's subtree depths. */
typedef struct {
    Bits256 bytes;
    const uint8_t *covered;
    const int32_t *starts, *tokens, *subtree_depth;
    int depth, verify;
} LoopView;

/* Clear in `mask` the L-tokens of the nodes i .. end - 1. */
static inline void clear_loop_tokens(uint32_t *mask, const LoopView *lv, Py_ssize_t i,
                                     Py_ssize_t end) {
    for (int32_t k = lv->starts[i]; k < lv->starts[end]; k++) {
        int32_t t = lv->tokens[k];
        mask[t >> 5] &= ~((uint32_t)1 << (t & 31));
    }
}

/* The walk of the header: like walk_trie (its comments apply) from state `start` of `d`,
 * with the L-tokens preset in trie->mask when lv is not NULL. ROW_OK, or ROW_ERROR. */
static int walk_loop(DfaRowsObject *d, const Trie *trie, const LoopView *lv, Py_ssize_t start) {
    const uint8_t *node_byte = trie->byte;
    const int32_t *node_depth = trie->depth, *node_skip = trie->skip, *node_token = trie->token;
    const Py_ssize_t n = trie->nodes;
    Py_ssize_t stack_cap = 64;
    Py_ssize_t *states = PyMem_Malloc((size_t)stack_cap * sizeof(*states));
    if (states == NULL) {
        PyErr_NoMemory();
        return ROW_ERROR;
    }
    states[0] = start;
    Py_ssize_t top = 0;
    TokenBuffer found = {.count = 0};
    int status = ROW_OK;
    Py_ssize_t i = 0;
    while (i < n) {
        Py_ssize_t depth = node_depth[i];
        if (depth < 1 || depth > top + 1) {
            bad_trie("depth out of order", i);
            status = ROW_ERROR;
            break;
        }
        Py_ssize_t end = node_skip[i];
        if (end <= i || end > n) {
            bad_trie("skip out of order", i);
            status = ROW_ERROR;
            break;
        }
        /* A covered subtree the plan proves live is skipped without reading the table. */
        int skip = lv != NULL && lv->covered[i] &&
                   (lv->depth == SAFE_ALL || lv->subtree_depth[i] <= lv->depth);
        int32_t next = skip ? STATE_DEAD : rows_next(d, states[depth - 1], node_byte[i]);
        if (next == -2) {
            status = ROW_ERROR;
            break;
        }
        if (!skip && next < 0) {
            skip = 1;
            if (lv != NULL && lv->verify) clear_loop_tokens(trie->mask, lv, i, end);
        } else if (!skip && lv != NULL && lv->verify && lv->covered[i]) {
            skip = end == i + 1; /* a covered leaf: its token is set, and live */
            if (!skip) {
                int loops = rows_loops_on(d, next, &lv->bytes);
                if (loops < 0) {
                    status = ROW_ERROR;
                    break;
                }
                skip = loops;
            }
        }
        if (skip) {
            top = depth - 1;
            i = end;
            continue;
        }
        if (depth >= stack_cap && reserve(&states, &stack_cap, depth) < 0) {
            status = ROW_ERROR;
            break;
        }
        states[depth] = next;
        top = depth;
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

static PyObject *masks_state_mask(PyObject *self, PyObject *args) {
    TrieMasksObject *T = (TrieMasksObject *)self;
    PyObject *rows_obj, *mask_obj, *eos_obj;
    Py_ssize_t q;
    if (!PyArg_ParseTuple(args, "O!nOO:state_mask", &DfaRowsType, &rows_obj, &q, &mask_obj,
                          &eos_obj)) {
        return NULL;
    }
    DfaRowsObject *d = (DfaRowsObject *)rows_obj;
    if (q < 0 || q >= d->n_states) {
        PyErr_Format(PyExc_IndexError, "no state %zd", q);
        return NULL;
    }
    Py_buffer mask = {0}, eos = {0};
    int status = ROW_ERROR;
    if (get_buffer(mask_obj, &mask, "mask_out", 4, 1) < 0 ||
        get_buffer(eos_obj, &eos, "eos", 8, 0) < 0) {
        goto done;
    }
    if (items(&mask) != (T->trie.size + 31) / 32) {
        PyErr_Format(PyExc_ValueError, "mask_out: expected %zd uint32 words, got %zd",
                     (T->trie.size + 31) / 32, items(&mask));
        goto done;
    }
    LoopPlan plan;
    if (choose_loop(T, d, (int32_t)q, &plan) < 0) goto done;
    Trie trie = T->trie;
    trie.mask = (uint32_t *)mask.buf;
    LoopView view, *lv = NULL;
    if (plan.slot != NULL) {
        LoopSlot *slot = plan.slot;
        if (plan.depth != SAFE_ALL && plan.depth > LEN_MASKS) plan.depth = LEN_MASKS;
        view = (LoopView){slot->key.bytes,    slot->views[1].buf, slot->views[2].buf,
                          slot->views[3].buf, T->subtree_depth,   plan.depth,
                          plan.verify};
        lv = &view;
        const uint32_t *base = slot->views[0].buf;
        if (plan.depth >= 0 && plan.depth != SAFE_ALL) { /* only the L-tokens proved live */
            const uint32_t *shorter = T->len_masks + (Py_ssize_t)plan.depth * items(&mask);
            for (Py_ssize_t k = 0; k < items(&mask); k++) trie.mask[k] = base[k] & shorter[k];
        } else {
            memcpy(trie.mask, base, (size_t)mask.len);
        }
    } else {
        memset(trie.mask, 0, (size_t)mask.len);
    }
    status = walk_loop(d, &trie, lv, q);
    if (status == ROW_OK && d->store->terms[d->terms[q]].nullable) {
        const int64_t *ids = (const int64_t *)eos.buf;
        for (Py_ssize_t k = 0; k < items(&eos); k++) {
            if (ids[k] < 0 || ids[k] >= T->trie.size) {
                PyErr_SetString(PyExc_ValueError, "eos id out of range");
                status = ROW_ERROR;
                break;
            }
            trie.mask[ids[k] >> 5] |= (uint32_t)1 << (ids[k] & 31);
        }
    }
done:
    PyBuffer_Release(&mask);
    PyBuffer_Release(&eos);
    if (status == ROW_ERROR) return NULL;
    Py_RETURN_NONE;
}

static PyObject *masks_loop_info(PyObject *self, PyObject *args) {
    Py_buffer key;
    int utf8;
    if (!PyArg_ParseTuple(args, "y*p:loop_info", &key, &utf8)) return NULL;
    if (key.len != 32) {
        PyBuffer_Release(&key);
        PyErr_SetString(PyExc_ValueError, "loop_info: key must be 32 bytes");
        return NULL;
    }
    Slice L = {{{0, 0, 0, 0}}, utf8};
    const uint8_t *raw = (const uint8_t *)key.buf;
    for (int k = 0; k < 32; k++) L.bytes.w[k >> 3] |= (uint64_t)raw[k] << (8 * (k & 7));
    PyBuffer_Release(&key);
    LoopSlot *slot = loop_lookup((TrieMasksObject *)self, &L);
    if (slot == NULL) return NULL;
    return Py_NewRef(slot->info);
}

/* root_sizes, subtree_depth, max_depth and len_masks of a new TrieMasks whose trie arrays are
 * set (and checked here: depths from 1, subtrees nested, token ids and aliases in range). */
static int trie_depths(TrieMasksObject *T) {
    const Trie *t = &T->trie;
    Py_ssize_t n = t->nodes, words = (t->size + 31) / 32;
    T->subtree_depth = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(int32_t));
    T->len_masks = PyMem_Calloc((size_t)(LEN_MASKS + 1) * (size_t)(words ? words : 1),
                                sizeof(uint32_t));
    if (T->subtree_depth == NULL || T->len_masks == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        int32_t depth = t->depth[i];
        if (depth < 1 || t->skip[i] <= i || t->skip[i] > n || (i == 0 && depth != 1)) {
            return bad_trie("depth or skip out of order", i);
        }
        int32_t deepest = depth;
        for (Py_ssize_t c = i + 1; c < t->skip[i]; c = t->skip[c]) {
            if (t->depth[c] != depth + 1) return bad_trie("depth out of order", c);
            if (T->subtree_depth[c] > deepest) deepest = T->subtree_depth[c];
        }
        T->subtree_depth[i] = deepest;
        if (deepest > T->max_depth) T->max_depth = deepest;
        if (depth == 1) T->root_sizes[t->byte[i]] = t->skip[i] - i;
        for (Py_ssize_t tok = t->token[i], next; tok >= 0; tok = next) {
            if (tok >= t->size) return bad_trie("token id out of range", i);
            if (depth <= LEN_MASKS) {
                T->len_masks[depth * words + (tok >> 5)] |= (uint32_t)1 << (tok & 31);
            }
            next = t->alias[tok];
            if (next >= 0 && (next <= tok || next >= t->size)) {
                return bad_trie("alias chain not increasing or out of range", tok);
            }
        }
    }
    for (Py_ssize_t len = 1; len <= LEN_MASKS; len++) {
        for (Py_ssize_t k = 0; k < words; k++) {
            T->len_masks[len * words + k] |= T->len_masks[(len - 1) * words + k];
        }
    }
    return 0;
}

static PyObject *masks_new(PyTypeObject *type, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"node_byte", "node_depth", "node_skip", "node_token", "token_alias",
                             "build", "cache_size", "min_nodes", NULL};
    PyObject *objs[5], *build;
    Py_ssize_t cache_size, min_nodes;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOnn:TrieMasks", kwlist, &objs[0],
                                     &objs[1], &objs[2], &objs[3], &objs[4], &build, &cache_size,
                                     &min_nodes)) {
        return NULL;
    }
    if (!PyCallable_Check(build) || cache_size < 1) {
        PyErr_SetString(PyExc_ValueError, "TrieMasks: build must be callable, cache_size >= 1");
        return NULL;
    }
    TrieMasksObject *T = (TrieMasksObject *)type->tp_alloc(type, 0);
    if (T == NULL) return NULL;
    static const char *names[5] = {"node_byte", "node_depth", "node_skip", "node_token",
                                   "token_alias"};
    static const Py_ssize_t sizes[5] = {1, 4, 4, 4, 4};
    for (int k = 0; k < 5; k++) {
        if (get_buffer(objs[k], &T->views[k], names[k], sizes[k], 0) < 0) goto fail;
    }
    T->trie.nodes = items(&T->views[0]);
    if (items(&T->views[1]) != T->trie.nodes || items(&T->views[2]) != T->trie.nodes ||
        items(&T->views[3]) != T->trie.nodes) {
        PyErr_SetString(PyExc_ValueError, "node arrays must all have the same length");
        goto fail;
    }
    T->trie.size = items(&T->views[4]);
    T->trie.byte = (const uint8_t *)T->views[0].buf;
    T->trie.depth = (const int32_t *)T->views[1].buf;
    T->trie.skip = (const int32_t *)T->views[2].buf;
    T->trie.token = (const int32_t *)T->views[3].buf;
    T->trie.alias = (const int32_t *)T->views[4].buf;
    if (trie_depths(T) < 0) goto fail;
    T->slots = PyMem_Calloc((size_t)cache_size, sizeof(LoopSlot));
    if (T->slots == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    T->n_slots = cache_size;
    T->min_nodes = min_nodes > 1 ? min_nodes : 1;
    T->build = Py_NewRef(build);
    return (PyObject *)T;
fail:
    Py_DECREF(T);
    return NULL;
}

static int masks_traverse(PyObject *self, visitproc visit, void *arg) {
    TrieMasksObject *T = (TrieMasksObject *)self;
    Py_VISIT(T->build);
    for (Py_ssize_t k = 0; k < T->n_slots; k++) Py_VISIT(T->slots[k].info);
    return 0;
}

static int masks_clear(PyObject *self) {
    TrieMasksObject *T = (TrieMasksObject *)self;
    Py_CLEAR(T->build);
    for (Py_ssize_t k = 0; k < T->n_slots; k++) slot_clear(&T->slots[k]);
    return 0;
}

static void masks_dealloc(PyObject *self) {
    TrieMasksObject *T = (TrieMasksObject *)self;
    PyObject_GC_UnTrack(self);
    masks_clear(self);
    PyMem_Free(T->slots);
    PyMem_Free(T->subtree_depth);
    PyMem_Free(T->len_masks);
    for (int k = 0; k < 5; k++) PyBuffer_Release(&T->views[k]);
    Py_TYPE(self)->tp_free(self);
}

static PyMethodDef masks_methods[] = {
    {"state_mask", masks_state_mask, METH_VARARGS,
     "state_mask(rows, state, mask_out, eos) -> bool: the token mask of a DfaRows state (see "
     "fsm/_trie_masks.h); False when the table must grow first. eos: int64 token ids."},
    {"loop_info", masks_loop_info, METH_VARARGS,
     "loop_info(key, utf8) -> LoopInfo of the slice of the byte set key (32 bytes, bit b = "
     "byte b) and, with utf8, of the multi-byte UTF-8 characters; cached"},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject TrieMasksType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fsm._native.TrieMasks",
    .tp_basicsize = sizeof(TrieMasksObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "TrieMasks(node_byte, node_depth, node_skip, node_token, token_alias, build, "
              "cache_size, min_nodes): token masks of DfaRows states over one trie.",
    .tp_new = masks_new,
    .tp_dealloc = masks_dealloc,
    .tp_traverse = masks_traverse,
    .tp_clear = masks_clear,
    .tp_methods = masks_methods,
};
