/*
 * TrieMasks: the token mask of a lazy-DFA state (a DfaRows state) over one token trie.
 *
 * It holds the trie arrays (see the header of _native.c), packed per node with their subtree
 * depths (TrieNode), the root's children by byte and every node's children as a short list,
 * token length masks, and a cache of loop information per slice (LoopInfo(mask, covered,
 * starts, tokens) of fsm.token_trie, built by a Python callback on a miss; the `cache_size`
 * most recently used are kept). A slice (see Slice in _terms.h) is a byte set L of one-byte
 * characters, with or without every multi-byte UTF-8 character; its tokens ("L-tokens") are
 * the tokens that are prefixes of its strings, and a node is covered when every token of its
 * subtree is an L-token.
 *
 * The mask of state q is the plain walk's (fill_mask: the tokens whose bytes lead to a live
 * state), computed by a walk that may start with the L-tokens set and skip covered subtrees.
 * choose_loop picks the slice and how the walk uses it (a LoopPlan). It first tries L = the
 * unescaped ASCII characters of a JSON string when each of them can start a string of q (as
 * inside a string or key): if t_safe proves their UTF-8 slice for every token length (see
 * "proved"), that is the plan, and q is not derived at all. Otherwise it derives q by one
 * wide ASCII class (one with many bytes and at least `min_nodes` root nodes), whose successor
 * is s, and s by one byte of that class:
 *   - q loops on the class L (s == q): every L-token leads back to q; or s loops on its own
 *     class of that byte, which is then L; or else L is the class of q (the bytes leading to s);
 *   - proved: t_safe(q's term, slice) shows that every string of the slice of at most
 *     `depth` characters leads to a live state (the UTF-8 slice of L is tried first, since it
 *     also covers tokens with other characters; then L itself). The mask starts with the
 *     L-tokens of at most `depth` bytes, and the walk skips a covered subtree whose tokens
 *     are that short without reading the table. When q loops on L, that needs no proof.
 *     Exact: when t_run also bounds every string over L that stays live by `depth`, every
 *     longer L-token is dead, and the walk skips every covered subtree;
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
#define CLASS_TRIES 2 /* the widest ASCII classes of a state tried for a live successor */

typedef struct {
    Slice key;
    PyObject *info; /* the LoopInfo; NULL = free slot */
    Py_buffer views[LOOP_ARRAYS];
    Bits256 root_covered; /* the bytes whose child of the root is covered */
    uint8_t *child_covered; /* per child list entry (see TrieMasksObject): covered[child] */
    uint64_t used;
} LoopSlot;

/* One trie node, packed so that a walk reads one cache line per node. */
typedef struct {
    int32_t skip, token;    /* as node_skip and node_token */
    uint16_t depth, deepest; /* node_depth; the largest depth in its subtree (a token length) */
    uint8_t byte;
} TrieNode;

typedef struct {
    PyObject_HEAD
    Py_buffer views[5]; /* node_byte, node_depth, node_skip, node_token, token_alias */
    Trie trie;          /* pointers into views; `mask` is set per call */
    int64_t root_sizes[256];
    TrieNode *nodes;        /* the trie arrays, packed (see TrieNode) */
    int32_t root_node[256]; /* the root's child on each byte, or -1 */
    Bits256 root_bytes;     /* the bytes b with root_node[b] >= 0 */
    /* The children of node i, by byte: child_byte[k] and child_node[k] for k in
     * child_start[i] .. child_start[i + 1] - 1. A walk reads the children of a node from
     * these short runs instead of from the nodes, which lie a subtree apart. */
    int32_t *child_start, *child_node;
    uint8_t *child_byte;
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
    PyMem_Free(slot->child_covered);
    slot->child_covered = NULL;
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
    const uint8_t *covered = (const uint8_t *)fresh.views[1].buf;
    for (int b = 0; b < 256; b++) {
        if (T->root_node[b] >= 0 && covered[T->root_node[b]]) {
            fresh.root_covered.w[b >> 6] |= 1ULL << (b & 63);
        }
    }
    Py_ssize_t n_children = T->child_start[t->nodes];
    fresh.child_covered = PyMem_Malloc((size_t)(n_children ? n_children : 1));
    if (fresh.child_covered == NULL) {
        PyErr_NoMemory();
        goto fail;
    }
    for (Py_ssize_t k = 0; k < n_children; k++) {
        fresh.child_covered[k] = covered[T->child_node[k]];
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

/* How the walk uses a byte set L (see the header). */
typedef struct {
    LoopSlot *slot; /* L's loop information; NULL: a plain walk */
    int depth;      /* every string over L this long or shorter is live from the start state:
                     * -1 (not known), 0 .. SAFE_ALL - 1, or SAFE_ALL (any length) */
    int verify;     /* skip covered subtrees where the state reached loops on L */
    int exact;      /* the strings over L longer than `depth` are all dead from the start
                     * state: a covered subtree needs no walk whatever its tokens' lengths */
} LoopPlan;

/* Whether every string of the UTF-8 slice of the ASCII bytes L, as long as a token, is live
 * from q (then the plan walks with that slice: it covers tokens with other characters too).
 * 1 yes, 0 no, -1 on error. */
static int try_utf8(TrieMasksObject *T, DfaRowsObject *d, int32_t q, const Bits256 *L,
                    LoopPlan *plan) {
    Slice utf8 = {*L, 1};
    int safe = t_safe(d->store, d->terms[q], &utf8);
    if (safe < 0) return -1;
    if (safe == SAFE_NONE || (safe & 0xFF) < T->max_depth) return 0; /* tokens: <= max_depth */
    *plan = (LoopPlan){loop_lookup(T, &utf8), SAFE_ALL, 0, 0};
    return plan->slot == NULL ? -1 : 1;
}

/* The ASCII bytes of derivative class k of state x (set up: its row ready). */
static Bits256 ascii_class(const DfaRowsObject *d, int32_t x, int32_t k) {
    Bits256 ascii = byte_range_bits(0, 0x7F);
    return bits_and(class_mask(d->store, d->terms[x], k), &ascii);
}

/* The ASCII bytes of the class of x holding `byte` (x set up). */
static Bits256 ascii_class_of(const DfaRowsObject *d, int32_t x, int byte) {
    return ascii_class(d, x, partition_of(d->store, d->terms[x])->index[byte]);
}

/* A wide ASCII class of q with a live successor: of the CLASS_TRIES classes of q with the
 * most ASCII bytes (ties: the most root nodes) among those holding at least `min_nodes` root
 * nodes, the first whose successor is live, into *L, with that successor in *s; *s =
 * STATE_DEAD when there is none. Only those classes' entries of q are computed. 0, or -1 with
 * an exception set. */
static int live_class(TrieMasksObject *T, DfaRowsObject *d, int32_t q, Bits256 *L, int32_t *s) {
    *s = STATE_DEAD;
    if (rows_init(d, q) < 0) return -1;
    int64_t weight[256] = {0}, bytes[256] = {0};
    const Partition *p = partition_of(d->store, d->terms[q]);
    int32_t n = p->n;
    for (int b = 0; b < 0x80; b++) {
        weight[p->index[b]] += T->root_sizes[b];
        bytes[p->index[b]]++;
    }
    for (int32_t k = 0; k < n; k++) {
        if (weight[k] < T->min_nodes) bytes[k] = 0;
    }
    for (int tries = 0; tries < CLASS_TRIES; tries++) {
        int32_t best = 0;
        for (int32_t k = 1; k < n; k++) {
            if (bytes[k] > bytes[best] || (bytes[k] == bytes[best] && weight[k] > weight[best])) {
                best = k;
            }
        }
        if (bytes[best] == 0) return 0;
        bytes[best] = 0;
        *L = ascii_class(d, q, best); /* the partition may have moved: read it again */
        if ((*s = rows_next(d, q, bits_lowest(L))) == -2) return -1;
        if (*s != STATE_DEAD) return 0;
    }
    return 0;
}

/* Whether few of the root subtrees on L (at most 1/DEAD_SHARE of their nodes) are dead from
 * q and at least `min_nodes` are live, computing q's entries for L: 1, 0, or -1 on error. */
static int few_dead(TrieMasksObject *T, DfaRowsObject *d, int32_t q, const Bits256 *L) {
    if (rows_fill(d, q, L) < 0) return -1;
    const StateRow *row = &d->rows[q];
    int64_t live = 0, dead = 0;
    for (int b = 0; b < 0x80; b++) {
        if (bits_get(L, b)) *(row->succ[row->index[b]] >= 0 ? &live : &dead) += T->root_sizes[b];
    }
    return live >= T->min_nodes && dead * DEAD_SHARE <= live;
}

/* A plan for the slice of the ASCII bytes L from q's proofs alone (see the header): the UTF-8
 * slice if proved for every token length, else L up to its proved length (depth -1 when not
 * proved). 0, or -1 with an exception set; plan->slot stays NULL without a proof. */
static int proved_plan(TrieMasksObject *T, DfaRowsObject *d, int32_t q, const Bits256 *L,
                       LoopPlan *plan) {
    int utf8 = try_utf8(T, d, q, L, plan);
    if (utf8 != 0) return utf8 < 0 ? -1 : 0;
    Slice slice = {*L, 0};
    int safe = t_safe(d->store, d->terms[q], &slice);
    if (safe < 0) return -1;
    plan->depth = safe == SAFE_NONE ? -1 : safe & 0xFF;
    if (plan->depth >= T->max_depth) plan->depth = SAFE_ALL;
    if (plan->depth >= 0 && plan->depth <= LEN_MASKS) {
        int64_t run = t_run(d->store, d->terms[q], L, RUN_BUDGET_DEFAULT);
        if (run < 0) return -1;
        plan->exact = run <= plan->depth;
    }
    if (plan->depth < MIN_DEPTH && !plan->exact) return 0;
    return (plan->slot = loop_lookup(T, &slice)) == NULL ? -1 : 0;
}

/* Into *out, the bytes that may start a string of state q's term (first_of): every other
 * byte leads from q to STATE_DEAD. 0, or -1 with an exception set. */
static int state_first(DfaRowsObject *d, int32_t q, Bits256 *out) {
    const TermStoreObject *s = d->store;
    int32_t f = first_of(d->store, d->terms[q]);
    if (f < 0) return -1;
    *out = f == T_EMPTY ? (Bits256){{0, 0, 0, 0}} : s->masks[s->terms[f].a];
    return 0;
}

/* The ASCII characters a JSON string holds unescaped (0x20-0x7E but the quote and the
 * backslash): the slice choose_loop tries first. */
static Bits256 json_string_chars(void) {
    Bits256 chars = byte_range_bits(0x20, 0x7E);
    chars.w[0] &= ~(1ULL << '"');
    chars.w[1] &= ~(1ULL << ('\\' - 64));
    return chars;
}

/* The slice to walk with and how (see the header): 0, or -1 with an exception set. Inside a
 * JSON string or key (where every unescaped character can come next), the UTF-8 slice of
 * json_string_chars is often proved outright: it is tried first, without deriving q at all.
 * Otherwise only the entries of q for a wide class and of its successor for one byte are
 * computed here (and q's for the successor's loops when the walk must verify them). */
static int choose_loop(TrieMasksObject *T, DfaRowsObject *d, int32_t q, LoopPlan *plan) {
    *plan = (LoopPlan){NULL, SAFE_ALL, 0, 0};
    Bits256 L = json_string_chars(), first;
    if (state_first(d, q, &first) < 0) return -1;
    Bits256 both = bits_and(&L, &first);
    if (bits_eq(&both, &L) && root_nodes(T, &L) >= T->min_nodes) {
        int utf8 = try_utf8(T, d, q, &L, plan);
        if (utf8 != 0) return utf8 < 0 ? -1 : 0;
    }
    int32_t s;
    if (live_class(T, d, q, &L, &s) < 0) return -1;
    if (s == STATE_DEAD) return 0;
    if (s == q) { /* q loops on L */
        int utf8 = try_utf8(T, d, q, &L, plan);
        if (utf8 != 0) return utf8 < 0 ? -1 : 0;
        Slice slice = {L, 0};
        return (plan->slot = loop_lookup(T, &slice)) == NULL ? -1 : 0;
    }
    int b = bits_lowest(&L);
    int32_t next = rows_next(d, s, b);
    if (next == -2) return -1;
    if (next == s) { /* s loops on its class of b (s is set up now) */
        Bits256 loops = ascii_class_of(d, s, b);
        if (root_nodes(T, &loops) >= T->min_nodes) {
            if (proved_plan(T, d, q, &loops, plan) < 0) return -1;
            if (plan->slot != NULL && (plan->depth == SAFE_ALL || plan->exact)) return 0;
            int few = few_dead(T, d, q, &loops);
            if (few < 0) return -1;
            if (few) { /* verifying needs every L-token preset, not only short ones */
                Slice slice = {loops, 0};
                *plan = (LoopPlan){loop_lookup(T, &slice), -1, 1, 0};
                return plan->slot == NULL ? -1 : 0;
            }
            *plan = (LoopPlan){NULL, SAFE_ALL, 0, 0};
        }
    }
    return proved_plan(T, d, q, &L, plan); /* L: bytes leading to s, if the proof says enough */
}

/* A LoopPlan's arrays and byte sets. */
typedef struct {
    Bits256 bytes, root_covered;
    const uint8_t *covered, *child_covered;
    const int32_t *starts, *tokens;
    int depth, verify, exact;
} LoopView;

/* Clear in `mask` the L-tokens of the nodes i .. end - 1. */
static inline void clear_loop_tokens(uint32_t *mask, const LoopView *lv, Py_ssize_t i,
                                     Py_ssize_t end) {
    for (int32_t k = lv->starts[i]; k < lv->starts[end]; k++) {
        int32_t t = lv->tokens[k];
        mask[t >> 5] &= ~((uint32_t)1 << (t & 31));
    }
}

/* Whether the plan skips the covered node `node` without reading the table (see the header). */
static inline int proved_skip(const LoopView *lv, const TrieNode *node) {
    return lv->depth == SAFE_ALL || lv->exact || node->deepest <= lv->depth;
}

/* What the walk does with node i, reached by `next` (STATE_DEAD: a dead transition), where
 * `covered` says whether i is a covered node of the plan: 1 descend (its token is live),
 * 0 skip its subtree, -1 on error. A dead subtree's L-tokens are cleared when verifying. */
static inline int visit(TrieMasksObject *T, DfaRowsObject *d, const LoopView *lv, uint32_t *mask,
                        int32_t i, int32_t next, int covered) {
    if (next < 0) {
        if (lv != NULL && lv->verify) clear_loop_tokens(mask, lv, i, T->nodes[i].skip);
        return 0;
    }
    if (covered && lv->verify) { /* a covered leaf: its token is set, and live */
        if (T->child_start[i] == T->child_start[i + 1]) return 0;
        int loops = rows_loops_on(d, next, &lv->bytes);
        return loops < 0 ? -1 : !loops;
    }
    return 1;
}

/* The preorder walk of the nodes i0 .. end - 1 below a node at depth `base` that the walk
 * entered, reaching `state` (see walk_loop). ROW_OK, or ROW_ERROR. */
static int walk_below(TrieMasksObject *T, DfaRowsObject *d, const LoopView *lv, const Trie *trie,
                      int32_t i0, int32_t end, int base, int32_t state, int32_t *states,
                      TokenBuffer *found) {
    const TrieNode *nodes = T->nodes;
    states[base] = state;
    int top = base;
    for (int32_t i = i0; i < end;) {
        const TrieNode *node = &nodes[i];
        int depth = node->depth;
        if (depth <= base || depth > top + 1) return bad_trie("depth out of order", i);
        int covered = lv != NULL && lv->covered[i];
        if (covered && proved_skip(lv, node)) {
            top = depth - 1;
            i = node->skip;
            continue;
        }
        int32_t next = rows_next(d, states[depth - 1], node->byte);
        int go = next == -2 ? -1 : visit(T, d, lv, trie->mask, i, next, covered);
        if (go < 0) return ROW_ERROR;
        if (go == 0) {
            top = depth - 1;
            i = node->skip;
            continue;
        }
        states[depth] = next;
        top = depth;
        if (buffer_token(trie, found, node->token) < 0) return ROW_ERROR;
        i++;
    }
    return ROW_OK;
}

/* The children of root child i (reached by state `next`) in the walk of walk_loop, then their
 * subtrees. Only the children on a first byte of `next` are read, unless the plan verifies
 * (a dead child may hold L-tokens to clear). ROW_OK, or ROW_ERROR. */
static int walk_children(TrieMasksObject *T, DfaRowsObject *d, const Trie *trie,
                         const LoopView *lv, int32_t i, int32_t next, int32_t *states,
                         TokenBuffer *found) {
    Bits256 first = ALL_BITS;
    if ((lv == NULL || !lv->verify) && state_first(d, next, &first) < 0) return ROW_ERROR;
    for (int32_t k = T->child_start[i]; k < T->child_start[i + 1]; k++) {
        if (!bits_get(&first, T->child_byte[k])) continue;
        int32_t c = T->child_node[k];
        int covered = lv != NULL && lv->child_covered[k];
        if (covered && proved_skip(lv, &T->nodes[c])) continue;
        int32_t to = rows_next(d, next, T->child_byte[k]);
        int go = to == -2 ? -1 : visit(T, d, lv, trie->mask, c, to, covered);
        if (go == 0) continue;
        if (go < 0 || buffer_token(trie, found, T->nodes[c].token) < 0 ||
            walk_below(T, d, lv, trie, c + 1, T->nodes[c].skip, 2, to, states, found) < 0) {
            return ROW_ERROR;
        }
    }
    return ROW_OK;
}

/* The walk of the header: like walk_trie (its comments apply) from state `start` of `d`,
 * with the L-tokens preset in trie->mask when lv is not NULL. The root's children come from
 * T's table and theirs from the child lists (see TrieMasksObject), so that a dead or covered
 * node of the first two levels, where they lie a subtree apart, costs no read of the nodes;
 * below, the walk reads the nodes in preorder. A child of the root or of a root child on a
 * byte that cannot start a string of its parent state is dead without reading the table:
 * only the others are visited (all of them when the plan verifies: a dead one may hold
 * L-tokens to clear).
 * ROW_OK, or ROW_ERROR. */
static int walk_loop(TrieMasksObject *T, DfaRowsObject *d, const Trie *trie, const LoopView *lv,
                     Py_ssize_t start) {
    Bits256 todo = ALL_BITS;
    if ((lv == NULL || !lv->verify) && state_first(d, (int32_t)start, &todo) < 0) {
        return ROW_ERROR;
    }
    todo = bits_and(&todo, &T->root_bytes);
    int32_t *states = PyMem_Malloc((size_t)(T->max_depth + 1) * sizeof(int32_t));
    if (states == NULL) {
        PyErr_NoMemory();
        return ROW_ERROR;
    }
    TokenBuffer found = {.count = 0};
    int status = ROW_OK;
    for (int w = 0; w < 4 && status == ROW_OK; w++) {
        for (uint64_t bits = todo.w[w]; bits && status == ROW_OK; bits &= bits - 1) {
            int b = w * 64 + __builtin_ctzll(bits);
            int32_t i = T->root_node[b];
            int covered = lv != NULL && bits_get(&lv->root_covered, b);
            if (covered && proved_skip(lv, &T->nodes[i])) continue;
            int32_t next = rows_next(d, start, b);
            int go = next == -2 ? -1 : visit(T, d, lv, trie->mask, i, next, covered);
            if (go == 0) continue;
            if (go < 0 || buffer_token(trie, &found, T->nodes[i].token) < 0) {
                status = ROW_ERROR;
            } else {
                status = walk_children(T, d, trie, lv, i, next, states, &found);
            }
        }
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
        view = (LoopView){slot->key.bytes,      slot->root_covered, slot->views[1].buf,
                          slot->child_covered,  slot->views[2].buf, slot->views[3].buf,
                          plan.depth,           plan.verify,        plan.exact};
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
    status = walk_loop(T, d, &trie, lv, q);
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

/* child_start, child_node and child_byte of a new TrieMasks whose nodes are set (checked). */
static int child_lists(TrieMasksObject *T) {
    Py_ssize_t n = T->trie.nodes;
    T->child_start = PyMem_Calloc((size_t)n + 1, sizeof(int32_t));
    T->child_node = PyMem_Malloc((size_t)(n ? n : 1) * sizeof(int32_t));
    T->child_byte = PyMem_Malloc((size_t)(n ? n : 1));
    if (T->child_start == NULL || T->child_node == NULL || T->child_byte == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    /* In preorder, node i's children are i + 1, then each one's skip, up to i's skip. */
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        T->child_start[i] = (int32_t)k;
        for (Py_ssize_t c = i + 1; c < T->nodes[i].skip; c = T->nodes[c].skip) {
            T->child_node[k] = (int32_t)c;
            T->child_byte[k++] = T->nodes[c].byte;
        }
    }
    T->child_start[n] = (int32_t)k;
    return 0;
}

/* nodes, root_node, root_sizes, max_depth and len_masks of a new TrieMasks whose trie arrays
 * are set (and checked here: depths from 1 and below 2^16, subtrees nested, the root's
 * children in increasing byte order, token ids and aliases in range). */
static int trie_depths(TrieMasksObject *T) {
    const Trie *t = &T->trie;
    Py_ssize_t n = t->nodes, words = (t->size + 31) / 32;
    T->nodes = PyMem_Calloc((size_t)(n ? n : 1), sizeof(TrieNode));
    T->len_masks = PyMem_Calloc((size_t)(LEN_MASKS + 1) * (size_t)(words ? words : 1),
                                sizeof(uint32_t));
    if (T->nodes == NULL || T->len_masks == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (int b = 0; b < 256; b++) T->root_node[b] = -1;
    int last_root = -1;
    for (Py_ssize_t i = 0; i < n; i = t->skip[i]) { /* the root's children, in order */
        if (t->depth[i] != 1 || t->skip[i] <= i || t->skip[i] > n || t->byte[i] <= last_root) {
            return bad_trie("root children out of order", i);
        }
        last_root = t->byte[i];
        T->root_node[last_root] = (int32_t)i;
        T->root_bytes.w[last_root >> 6] |= 1ULL << (last_root & 63);
        T->root_sizes[last_root] = t->skip[i] - i;
    }
    for (Py_ssize_t i = n - 1; i >= 0; i--) {
        int32_t depth = t->depth[i];
        if (depth < 1 || depth > UINT16_MAX || t->skip[i] <= i || t->skip[i] > n) {
            return bad_trie("depth or skip out of order", i);
        }
        int32_t deepest = depth;
        for (Py_ssize_t c = i + 1; c < t->skip[i]; c = t->skip[c]) {
            if (t->depth[c] != depth + 1) return bad_trie("depth out of order", c);
            if (T->nodes[c].deepest > deepest) deepest = T->nodes[c].deepest;
        }
        T->nodes[i] = (TrieNode){t->skip[i], t->token[i], (uint16_t)depth, (uint16_t)deepest,
                                 t->byte[i]};
        if (deepest > T->max_depth) T->max_depth = deepest;
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
    return child_lists(T);
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
    PyMem_Free(T->nodes);
    PyMem_Free(T->child_start);
    PyMem_Free(T->child_node);
    PyMem_Free(T->child_byte);
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
