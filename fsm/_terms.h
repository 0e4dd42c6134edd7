/*
 * The term store of fsm.terms in C: hash-consed byte-level regular terms (byte sets,
 * concatenation, union, intersection, complement, bounded repetition) with nullability,
 * derivative classes, Brzozowski derivatives and emptiness, all cached per term. The Python
 * class fsm.terms.TermStore subclasses the type defined here (`_native.TermStore`); the
 * semantics are those documented there.
 *
 * Included once by _native.c (the extension is one translation unit).
 *
 * Layout: a term is an index into `terms` (EMPTY = 0, EPS = 1). Byte sets are 256-bit masks
 * kept in `masks`; union and intersection members (sorted ids) in `members`. Derivative
 * classes (a partition of the 256 bytes) are interned in `parts`, each with its masks (in
 * `class_masks`) and a byte -> class map, in a table shared by the stores (see Partitions);
 * a term with classes computed has one derivative slot per class in `derivs` (T_ERROR until
 * computed), so a cached derivative costs two loads. These arrays grow, so no pointer into
 * them is held across a call that may add terms or partitions: code keeps indices and copies
 * fields into locals. The recursion (derivatives, classes, emptiness) is bounded by
 * `max_depth` (RecursionError).
 *
 * Normal forms, beyond the Python constructors' (which the ids then no longer mirror):
 * concatenations associate to the right, and a union built by `alt` (not a derivative's)
 * left-factors members with a common head. A derivative along a literal, such as a declared
 * key followed by the rest of a document, is then an existing term, not a new one per byte.
 */
#include <stdint.h>
#include <string.h>

#define K_EMPTY 0
#define K_EPS 1
#define K_BYTES 2
#define K_CONCAT 3
#define K_ALT 4
#define K_AND 5
#define K_NOT 6
#define K_REPEAT 7

#define EMPTY_BUDGET 20000 /* fsm.terms.TermStore.is_empty's default search budget */

#define T_EMPTY 0
#define T_EPS 1
#define T_ERROR (-1)
#define NO_HI (-1) /* REPEAT without an upper bound */

typedef struct {
    uint64_t w[4];
} Bits256;

#define SAFE_SLOTS 4        /* slices whose t_safe results a store caches per term */
#define SAFE_UNKNOWN 0xFFFF /* a t_safe cache entry not computed yet */

static const Bits256 ALL_BITS = {{~0ULL, ~0ULL, ~0ULL, ~0ULL}};

static inline int bits_get(const Bits256 *m, int b) { return (int)((m->w[b >> 6] >> (b & 63)) & 1); }
static inline int bits_zero(const Bits256 *m) { return !(m->w[0] | m->w[1] | m->w[2] | m->w[3]); }
static inline int bits_eq(const Bits256 *a, const Bits256 *b) { return !memcmp(a, b, sizeof(*a)); }
static inline Bits256 bits_and(const Bits256 *a, const Bits256 *b) {
    Bits256 r;
    for (int k = 0; k < 4; k++) r.w[k] = a->w[k] & b->w[k];
    return r;
}
static inline int bits_lowest(const Bits256 *m) {
    for (int k = 0; k < 4; k++) {
        if (m->w[k]) return k * 64 + __builtin_ctzll(m->w[k]);
    }
    return -1;
}

/* A slice: the strings made of the bytes of `bytes` (as characters of one byte) and, with
 * `utf8`, of every well-formed UTF-8 character of two to four bytes as well (`bytes` then
 * holds only ASCII). Lengths (t_safe) count these characters. */
typedef struct {
    Bits256 bytes;
    int utf8;
} Slice;

typedef struct {
    uint8_t kind, nullable, boolean;
    int8_t empty;    /* empty_state cache: -1 unknown, or EMPTY_NO, EMPTY_YES, EMPTY_GUESS */
    int8_t infinite; /* for terms without intersection/complement: -1 unknown, 0, 1 */
    int32_t a;       /* BYTES: mask index; CONCAT: head; ALT/AND: members offset; NOT, REPEAT: inner */
    int32_t b;       /* CONCAT: tail; ALT/AND: member count */
    int64_t lo, hi;  /* REPEAT bounds (hi = NO_HI when unbounded) */
    uint64_t hash;
    int32_t first;  /* a byte set term holding the first bytes of t's strings, -1 until known */
    int32_t part;   /* derivative classes: index in `parts`, -1 until computed */
    int32_t derivs; /* offset of the term's derivative slots (one per class) in `derivs` */
    uint16_t safe[SAFE_SLOTS]; /* t_safe results per slice slot, SAFE_UNKNOWN until known */
    uint16_t safe_epoch;       /* `safe` holds results only while this is the store's epoch */
    uint8_t completes;         /* completes_on results per slot: bit 2j known, 2j + 1 yes */
} Term;

_Static_assert(sizeof(Term) <= 64, "a term fits in a cache line");

/* A growable array of term ids with inline storage for short lists. */
typedef struct {
    int32_t *v;
    Py_ssize_t n, cap;
    int32_t small[8];
} IdVec;

static void idvec_init(IdVec *x) {
    x->v = x->small;
    x->n = 0;
    x->cap = 8;
}
static void idvec_free(IdVec *x) {
    if (x->v != x->small) PyMem_Free(x->v);
    idvec_init(x);
}
static int idvec_push(IdVec *x, int32_t id) {
    if (x->n == x->cap) {
        Py_ssize_t cap = 2 * x->cap;
        int32_t *v = PyMem_Malloc((size_t)cap * sizeof(int32_t));
        if (v == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memcpy(v, x->v, (size_t)x->n * sizeof(int32_t));
        if (x->v != x->small) PyMem_Free(x->v);
        x->v = v;
        x->cap = cap;
    }
    x->v[x->n++] = id;
    return 0;
}

/* Grow `*buf` (of `*cap` items of `size` bytes, from the buffer pool; NULL when *cap is 0) to
 * hold at least `need` items: 0, or -1 with MemoryError. Free it with release_items. */
static int reserve_items(void **buf, Py_ssize_t *cap, Py_ssize_t need, size_t size) {
    if (need <= *cap) return 0;
    Py_ssize_t new_cap = *cap ? *cap : 64;
    while (new_cap < need) new_cap *= 2;
    void *grown = pool_alloc((size_t)new_cap * size);
    if (grown == NULL) return -1;
    if (*cap) memcpy(grown, *buf, (size_t)*cap * size);
    pool_free(*buf, (size_t)*cap * size);
    *buf = grown;
    *cap = new_cap;
    return 0;
}

/* Free a buffer of reserve_items (NULL: nothing). */
static void release_items(void *buf, Py_ssize_t cap, size_t size) {
    if (buf != NULL) pool_free(buf, (size_t)cap * size);
}

/* A partition of the 256 bytes into derivative classes. */
typedef struct {
    int32_t n;           /* classes */
    int32_t masks;       /* offset of their masks in `class_masks` */
    uint64_t hash;
    uint8_t index[256];  /* byte -> class */
} Partition;

#define PART_CHUNK_BITS 8
#define PARTS_PER_CHUNK (1 << PART_CHUNK_BITS)

/* The interned partitions and the refine_pair memo. They depend on byte sets only, so stores
 * share them: most partitions of a schema (strings, numbers, punctuation) are met again in the
 * next one. New stores take the current table (`shared_partitions`) until it holds
 * PARTITIONS_CAP_BYTES, then a fresh one; a table lives as long as a store refers to it.
 * Partitions are kept in chunks of PARTS_PER_CHUNK that never move, so a pointer to one stays
 * valid as long as the table (DfaRows keeps the byte -> class maps of its states). */
typedef struct {
    Py_ssize_t refs; /* the stores using it, plus one while it is the current table */
    Partition **part_chunks; /* partition id -> part_chunks[id >> PART_CHUNK_BITS][id & ...] */
    Py_ssize_t n_parts, n_part_chunks, cap_part_chunks;
    Bits256 *class_masks;
    Py_ssize_t n_class_masks, cap_class_masks;
    int32_t *part_intern; /* open addressing over partition ids, -1 = free slot */
    Py_ssize_t part_intern_cap;
    uint64_t *pair_keys; /* refine_pair memo: ((a << 32) | b) + 1, 0 = free slot */
    int32_t *pair_vals;
    Py_ssize_t pair_cap, pair_n;
    Bits256 *scratch; /* refine_pair's classes (never used across a recursive call) */
    Py_ssize_t scratch_cap;
} Partitions;

#define PARTITIONS_CAP_BYTES (64 << 20)

static Partitions *current_partitions; /* the table new stores share (NULL: none yet) */

static void partitions_release(Partitions *p) {
    if (p == NULL || --p->refs > 0) return;
    for (Py_ssize_t k = 0; k < p->n_part_chunks; k++) {
        pool_free(p->part_chunks[k], PARTS_PER_CHUNK * sizeof(Partition));
    }
    release_items(p->part_chunks, p->cap_part_chunks, sizeof(Partition *));
    release_items(p->class_masks, p->cap_class_masks, sizeof(Bits256));
    PyMem_Free(p->part_intern);
    PyMem_Free(p->pair_keys);
    PyMem_Free(p->pair_vals);
    release_items(p->scratch, p->scratch_cap, sizeof(Bits256));
    PyMem_Free(p);
}

/* The table for a new store, with a reference taken for it; NULL with MemoryError. */
static Partitions *shared_partitions(void) {
    Partitions *p = current_partitions;
    if (p != NULL && p->n_parts * (Py_ssize_t)sizeof(Partition) +
                             p->n_class_masks * (Py_ssize_t)sizeof(Bits256) +
                             p->pair_cap * (Py_ssize_t)(sizeof(uint64_t) + sizeof(int32_t)) >
                         PARTITIONS_CAP_BYTES) {
        current_partitions = NULL;
        partitions_release(p); /* the stores using it keep it */
        p = NULL;
    }
    if (p == NULL) {
        p = PyMem_Calloc(1, sizeof(Partitions));
        if (p == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        p->refs = 1;
        current_partitions = p;
    }
    p->refs++;
    return p;
}

typedef struct {
    PyObject_HEAD
    Partitions *pt; /* the partitions, shared with other stores */
    Term *terms;
    Py_ssize_t n_terms, cap_terms;
    Bits256 *masks;
    Py_ssize_t n_masks, cap_masks;
    int32_t *members;
    Py_ssize_t n_members, cap_members;
    int32_t *derivs;
    Py_ssize_t n_derivs, cap_derivs;
    int32_t *intern; /* open addressing over term ids, -1 = free slot */
    Py_ssize_t intern_cap;
    int32_t anything;
    int depth, max_depth;
    uint64_t rows; /* derivative rows computed (see `row`) */
    Slice safe_sets[SAFE_SLOTS]; /* the slices of the t_safe result slots */
    int n_safe_sets;
    uint16_t safe_epoch; /* advanced to forget every term's t_safe results at once */
} TermStoreObject;

/* ------------------------------------------------------------------ hashing and interning */

static inline uint64_t mix(uint64_t h, uint64_t x) {
    h ^= x + 0x9E3779B97F4A7C15ULL + (h << 6) + (h >> 2);
    h ^= h >> 31;
    h *= 0xBF58476D1CE4E5B9ULL;
    return h ^ (h >> 29);
}

static uint64_t term_hash(uint8_t kind, int32_t a, int32_t b, int64_t lo, int64_t hi,
                          const int32_t *members, const Bits256 *mask) {
    uint64_t h = mix(0x1234567ULL, kind);
    switch (kind) {
    case K_BYTES:
        for (int k = 0; k < 4; k++) h = mix(h, mask->w[k]);
        break;
    case K_ALT:
    case K_AND:
        for (int32_t k = 0; k < b; k++) h = mix(h, (uint64_t)(uint32_t)members[k]);
        break;
    case K_REPEAT:
        h = mix(mix(mix(h, (uint64_t)a), (uint64_t)lo), (uint64_t)hi);
        break;
    default:
        h = mix(mix(h, (uint64_t)(uint32_t)a), (uint64_t)(uint32_t)b);
    }
    return h;
}

static int term_equals(const TermStoreObject *s, int32_t id, uint8_t kind, int32_t a, int32_t b,
                       int64_t lo, int64_t hi, const int32_t *members, const Bits256 *mask) {
    const Term *t = &s->terms[id];
    if (t->kind != kind) return 0;
    switch (kind) {
    case K_BYTES:
        return bits_eq(&s->masks[t->a], mask);
    case K_ALT:
    case K_AND:
        return t->b == b && !memcmp(&s->members[t->a], members, (size_t)b * sizeof(int32_t));
    case K_REPEAT:
        return t->a == a && t->lo == lo && t->hi == hi;
    default:
        return t->a == a && t->b == b;
    }
}

static int intern_rehash(TermStoreObject *s, Py_ssize_t cap) {
    int32_t *table = pool_alloc((size_t)cap * sizeof(int32_t));
    if (table == NULL) return -1;
    memset(table, 0xFF, (size_t)cap * sizeof(int32_t));
    for (Py_ssize_t id = 0; id < s->n_terms; id++) {
        Py_ssize_t k = (Py_ssize_t)(s->terms[id].hash & (uint64_t)(cap - 1));
        while (table[k] >= 0) k = (k + 1) & (cap - 1);
        table[k] = (int32_t)id;
    }
    if (s->intern != NULL) pool_free(s->intern, (size_t)s->intern_cap * sizeof(int32_t));
    s->intern = table;
    s->intern_cap = cap;
    return 0;
}

/* The id of the term with these fields, created (nullable/boolean as given) if new. `members`
 * (ALT/AND: `b` sorted ids) and `mask` (BYTES) are copied. T_ERROR on memory errors. */
static int32_t make_term(TermStoreObject *s, uint8_t kind, int32_t a, int32_t b, int64_t lo,
                         int64_t hi, const int32_t *members, const Bits256 *mask, int nullable,
                         int boolean) {
    uint64_t h = term_hash(kind, a, b, lo, hi, members, mask);
    Py_ssize_t k = (Py_ssize_t)(h & (uint64_t)(s->intern_cap - 1));
    for (int32_t id; (id = s->intern[k]) >= 0; k = (k + 1) & (s->intern_cap - 1)) {
        if (s->terms[id].hash == h && term_equals(s, id, kind, a, b, lo, hi, members, mask)) {
            return id;
        }
    }
    if (s->n_terms >= INT32_MAX - 1) {
        PyErr_SetString(PyExc_MemoryError, "too many terms");
        return T_ERROR;
    }
    if (reserve_items((void **)&s->terms, &s->cap_terms, s->n_terms + 1, sizeof(Term)) < 0) {
        return T_ERROR;
    }
    Term t = {.kind = kind,
              .nullable = (uint8_t)nullable,
              .boolean = (uint8_t)boolean,
              .empty = -1,
              .infinite = -1,
              .a = a,
              .b = b,
              .lo = lo,
              .hi = hi,
              .hash = h,
              .first = -1,
              .part = -1,
              .safe = {SAFE_UNKNOWN, SAFE_UNKNOWN, SAFE_UNKNOWN, SAFE_UNKNOWN},
              .safe_epoch = s->safe_epoch};
    if (kind == K_BYTES) {
        if (reserve_items((void **)&s->masks, &s->cap_masks, s->n_masks + 1, sizeof(Bits256)) < 0) {
            return T_ERROR;
        }
        s->masks[s->n_masks] = *mask;
        t.a = (int32_t)s->n_masks++;
    } else if (kind == K_ALT || kind == K_AND) {
        if (reserve_items((void **)&s->members, &s->cap_members, s->n_members + b,
                          sizeof(int32_t)) < 0) {
            return T_ERROR;
        }
        memcpy(&s->members[s->n_members], members, (size_t)b * sizeof(int32_t));
        t.a = (int32_t)s->n_members;
        s->n_members += b;
    }
    int32_t id = (int32_t)s->n_terms++;
    s->terms[id] = t;
    s->intern[k] = id;
    if (2 * s->n_terms > s->intern_cap && intern_rehash(s, 2 * s->intern_cap) < 0) {
        return T_ERROR;
    }
    return id;
}

/* ------------------------------------------------------------------ smart constructors */

static int32_t t_byteset(TermStoreObject *s, const Bits256 *mask) {
    if (bits_zero(mask)) return T_EMPTY;
    return make_term(s, K_BYTES, 0, 0, 0, 0, NULL, mask, 0, 0);
}

/* The concatenation of a head that is not a concatenation and any b. */
static int32_t concat_cell(TermStoreObject *s, int32_t a, int32_t b) {
    const Term *x = &s->terms[a], *y = &s->terms[b];
    return make_term(s, K_CONCAT, a, b, 0, 0, NULL, NULL, x->nullable && y->nullable,
                     x->boolean || y->boolean);
}

/* Concatenation, kept associated to the right: a concatenation's head is never itself a
 * concatenation, so the derivative of a chain by its first byte is the chain's existing tail
 * (a literal followed by the rest of a document derives without building new terms). */
static int32_t t_concat(TermStoreObject *s, int32_t a, int32_t b) {
    if (a == T_EMPTY || b == T_EMPTY) return T_EMPTY;
    if (a == T_EPS) return b;
    if (b == T_EPS) return a;
    if (s->terms[a].kind != K_CONCAT) return concat_cell(s, a, b);
    IdVec heads; /* a's chain: heads[0] heads[1] ... then b */
    idvec_init(&heads);
    int32_t out = b;
    for (int32_t t = a; out >= 0; t = s->terms[t].b) {
        if (s->terms[t].kind != K_CONCAT) {
            if (idvec_push(&heads, t) < 0) out = T_ERROR;
            break;
        }
        if (idvec_push(&heads, s->terms[t].a) < 0) out = T_ERROR;
    }
    for (Py_ssize_t k = heads.n - 1; k >= 0 && out >= 0; k--) {
        out = concat_cell(s, heads.v[k], out);
    }
    idvec_free(&heads);
    return out;
}

static int cmp_id(const void *p, const void *q) {
    int32_t a = *(const int32_t *)p, b = *(const int32_t *)q;
    return (a > b) - (a < b);
}

/* Sort and deduplicate in place. */
static void sort_unique(IdVec *x) {
    if (x->n < 2) return;
    qsort(x->v, (size_t)x->n, sizeof(int32_t), cmp_id);
    Py_ssize_t out = 1;
    for (Py_ssize_t k = 1; k < x->n; k++) {
        if (x->v[k] != x->v[out - 1]) x->v[out++] = x->v[k];
    }
    x->n = out;
}

static int idvec_has(const IdVec *x, int32_t id) {
    for (Py_ssize_t k = 0; k < x->n; k++) {
        if (x->v[k] == id) return 1;
    }
    return 0;
}

static int cmp_u64(const void *p, const void *q) {
    uint64_t a = *(const uint64_t *)p, b = *(const uint64_t *)q;
    return (a > b) - (a < b);
}

static int enter(TermStoreObject *s);
static inline void leave(TermStoreObject *s);
static int32_t t_alt(TermStoreObject *s, const int32_t *items, Py_ssize_t n, int factor);

/* Left-factor the concatenations among the members m of a union that share a head:
 * h x | h y | ... becomes h (x | y | ...), so that a derivative by h's bytes is one existing
 * tail instead of one new term per member (the keys of an object become a trie of terms).
 * m stays sorted and unique. 0, or -1 with an exception set. */
static int factor_heads(TermStoreObject *s, IdVec *m) {
    uint64_t *pairs = PyMem_Malloc((size_t)(m->n ? m->n : 1) * sizeof(uint64_t));
    if (pairs == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    Py_ssize_t n = 0, shared = 0; /* pairs[k]: (head << 32) | member, for the concatenations */
    for (Py_ssize_t k = 0; k < m->n; k++) {
        const Term *x = &s->terms[m->v[k]];
        if (x->kind == K_CONCAT) pairs[n++] = ((uint64_t)(uint32_t)x->a << 32) | (uint32_t)m->v[k];
    }
    qsort(pairs, (size_t)n, sizeof(uint64_t), cmp_u64);
    for (Py_ssize_t k = 1; k < n; k++) shared += pairs[k] >> 32 == pairs[k - 1] >> 32;
    int status = 0;
    if (shared == 0 || enter(s) < 0) {
        PyMem_Free(pairs);
        return shared == 0 ? 0 : -1;
    }
    IdVec out, tails;
    idvec_init(&out);
    idvec_init(&tails);
    for (Py_ssize_t k = 0; k < m->n && status == 0; k++) { /* the other members stay */
        if (s->terms[m->v[k]].kind != K_CONCAT) status = idvec_push(&out, m->v[k]);
    }
    for (Py_ssize_t k = 0, end; k < n && status == 0; k = end) {
        int32_t head = (int32_t)(pairs[k] >> 32);
        tails.n = 0;
        for (end = k; end < n && (int32_t)(pairs[end] >> 32) == head && status == 0; end++) {
            status = idvec_push(&tails, s->terms[(int32_t)(uint32_t)pairs[end]].b);
        }
        int32_t rest = status < 0 ? T_ERROR : t_alt(s, tails.v, tails.n, 1);
        int32_t merged = rest < 0 ? T_ERROR : t_concat(s, head, rest);
        status = merged < 0 ? -1 : idvec_push(&out, merged);
    }
    leave(s);
    if (status == 0) {
        idvec_free(m);
        *m = out;
        if (m->v == out.small) m->v = m->small; /* the inline storage moved with the struct */
        sort_unique(m);
    } else {
        idvec_free(&out);
    }
    idvec_free(&tails);
    PyMem_Free(pairs);
    return status;
}

/* Union of items[0 .. n-1]: flattens, drops EMPTY, merges byte sets, absorbs EPS into
 * nullable peers (fsm.terms.TermStore.alt). */
static int32_t t_alt(TermStoreObject *s, const int32_t *items, Py_ssize_t n, int factor) {
    IdVec m;
    idvec_init(&m);
    Bits256 mask = {{0, 0, 0, 0}};
    int32_t out = T_ERROR;
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t t = items[i];
        const Term *x = &s->terms[t];
        if (x->kind == K_ALT) {
            for (int32_t k = 0; k < x->b; k++) {
                int32_t u = s->members[x->a + k];
                const Term *y = &s->terms[u];
                if (y->kind == K_BYTES) {
                    for (int w = 0; w < 4; w++) mask.w[w] |= s->masks[y->a].w[w];
                } else if (idvec_push(&m, u) < 0) {
                    goto done;
                }
            }
        } else if (x->kind == K_BYTES) {
            for (int w = 0; w < 4; w++) mask.w[w] |= s->masks[x->a].w[w];
        } else if (t != T_EMPTY && idvec_push(&m, t) < 0) {
            goto done;
        }
    }
    sort_unique(&m);
    if (idvec_has(&m, s->anything)) {
        out = s->anything;
        goto done;
    }
    if (!bits_zero(&mask)) {
        int32_t bytes = t_byteset(s, &mask);
        if (bytes < 0 || idvec_push(&m, bytes) < 0) goto done;
        sort_unique(&m);
    }
    if (factor && m.n > 1 && factor_heads(s, &m) < 0) goto done;
    if (idvec_has(&m, T_EPS)) {
        int other_nullable = 0;
        for (Py_ssize_t k = 0; k < m.n; k++) {
            if (m.v[k] != T_EPS && s->terms[m.v[k]].nullable) other_nullable = 1;
        }
        if (other_nullable) {
            Py_ssize_t w = 0;
            for (Py_ssize_t k = 0; k < m.n; k++) {
                if (m.v[k] != T_EPS) m.v[w++] = m.v[k];
            }
            m.n = w;
        }
    }
    if (m.n == 0) {
        out = T_EMPTY;
    } else if (m.n == 1) {
        out = m.v[0];
    } else {
        int nullable = 0, boolean = 0;
        for (Py_ssize_t k = 0; k < m.n; k++) {
            nullable |= s->terms[m.v[k]].nullable;
            boolean |= s->terms[m.v[k]].boolean;
        }
        out = make_term(s, K_ALT, 0, (int32_t)m.n, 0, 0, m.v, NULL, nullable, boolean);
    }
done:
    idvec_free(&m);
    return out;
}

/* Intersection of items[0 .. n-1]: flattens, drops the universal term, intersects byte sets
 * (fsm.terms.TermStore.and_). */
static int32_t t_and(TermStoreObject *s, const int32_t *items, Py_ssize_t n) {
    IdVec m;
    idvec_init(&m);
    Bits256 mask = ALL_BITS;
    int has_bytes = 0;
    int32_t out = T_ERROR;
    for (Py_ssize_t i = 0; i < n; i++) {
        int32_t t = items[i];
        const Term *x = &s->terms[t];
        int32_t count = x->kind == K_AND ? x->b : 1;
        for (int32_t k = 0; k < count; k++) {
            int32_t u = x->kind == K_AND ? s->members[x->a + k] : t;
            const Term *y = &s->terms[u];
            if (u == T_EMPTY) {
                out = T_EMPTY;
                goto done;
            }
            if (y->kind == K_BYTES) {
                mask = bits_and(&mask, &s->masks[y->a]);
                has_bytes = 1;
            } else if (u != s->anything && idvec_push(&m, u) < 0) {
                goto done;
            }
        }
    }
    if (has_bytes) {
        if (bits_zero(&mask)) {
            out = T_EMPTY;
            goto done;
        }
        int32_t bytes = t_byteset(s, &mask);
        if (bytes < 0 || idvec_push(&m, bytes) < 0) goto done;
    }
    sort_unique(&m);
    if (idvec_has(&m, T_EPS)) {
        int all_nullable = 1;
        for (Py_ssize_t k = 0; k < m.n; k++) all_nullable &= s->terms[m.v[k]].nullable;
        out = all_nullable ? T_EPS : T_EMPTY;
    } else if (m.n == 0) {
        out = s->anything;
    } else if (m.n == 1) {
        out = m.v[0];
    } else {
        int nullable = 1;
        for (Py_ssize_t k = 0; k < m.n; k++) nullable &= s->terms[m.v[k]].nullable;
        out = make_term(s, K_AND, 0, (int32_t)m.n, 0, 0, m.v, NULL, nullable, 1);
    }
done:
    idvec_free(&m);
    return out;
}

static int32_t t_not(TermStoreObject *s, int32_t a) {
    if (s->terms[a].kind == K_NOT) return s->terms[a].a;
    return make_term(s, K_NOT, a, 0, 0, 0, NULL, NULL, !s->terms[a].nullable, 1);
}

/* a{lo,hi}, hi = NO_HI for unbounded (fsm.terms.TermStore.repeat). */
static int32_t t_repeat(TermStoreObject *s, int32_t a, int64_t lo, int64_t hi) {
    if (hi != NO_HI && hi < lo) return T_EMPTY;
    if (hi == 0 || a == T_EPS) return T_EPS;
    if (a == T_EMPTY) return lo == 0 ? T_EPS : T_EMPTY;
    if (s->terms[a].nullable) lo = 0;
    if (lo == 1 && hi == 1) return a;
    return make_term(s, K_REPEAT, a, 0, lo, hi, NULL, NULL, lo == 0 || s->terms[a].nullable,
                     s->terms[a].boolean);
}

/* ------------------------------------------------------------------ recursion guard */

static int enter(TermStoreObject *s) {
    if (++s->depth > s->max_depth) {
        s->depth--;
        PyErr_SetString(PyExc_RecursionError, "term nesting too deep for derivatives");
        return -1;
    }
    return 0;
}
static inline void leave(TermStoreObject *s) { s->depth--; }

/* ------------------------------------------------------------------ derivative classes */

static inline Partition *part_at(const Partitions *pt, Py_ssize_t id) {
    return &pt->part_chunks[id >> PART_CHUNK_BITS][id & (PARTS_PER_CHUNK - 1)];
}

static const Partition *partition_of(const TermStoreObject *s, int32_t t) {
    return part_at(s->pt, s->terms[t].part);
}

static const Bits256 *class_mask(const TermStoreObject *s, int32_t t, int32_t k) {
    return &s->pt->class_masks[partition_of(s, t)->masks + k];
}

static int part_rehash(TermStoreObject *s, Py_ssize_t cap) {
    Partitions *pt = s->pt;
    int32_t *table = PyMem_Malloc((size_t)cap * sizeof(int32_t));
    if (table == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(table, 0xFF, (size_t)cap * sizeof(int32_t));
    for (Py_ssize_t id = 0; id < pt->n_parts; id++) {
        Py_ssize_t k = (Py_ssize_t)(part_at(pt, id)->hash & (uint64_t)(cap - 1));
        while (table[k] >= 0) k = (k + 1) & (cap - 1);
        table[k] = (int32_t)id;
    }
    PyMem_Free(pt->part_intern);
    pt->part_intern = table;
    pt->part_intern_cap = cap;
    return 0;
}

/* One more chunk of partitions: 0, or -1 with MemoryError. */
static int part_chunk_add(Partitions *pt) {
    if (reserve_items((void **)&pt->part_chunks, &pt->cap_part_chunks, pt->n_part_chunks + 1,
                      sizeof(Partition *)) < 0) {
        return -1;
    }
    Partition *chunk = pool_alloc(PARTS_PER_CHUNK * sizeof(Partition));
    if (chunk == NULL) return -1;
    pt->part_chunks[pt->n_part_chunks++] = chunk;
    return 0;
}

/* The id of the partition cls[0 .. n-1] (interned), or -1 on memory errors. */
static int32_t intern_partition(TermStoreObject *s, const Bits256 *cls, int32_t n) {
    Partitions *pt = s->pt;
    uint64_t h = mix(0x9876ULL, (uint64_t)n);
    for (int32_t k = 0; k < n; k++) {
        for (int w = 0; w < 4; w++) h = mix(h, cls[k].w[w]);
    }
    if (!pt->part_intern_cap && part_rehash(s, 256) < 0) return -1;
    Py_ssize_t j = (Py_ssize_t)(h & (uint64_t)(pt->part_intern_cap - 1));
    for (int32_t id; (id = pt->part_intern[j]) >= 0; j = (j + 1) & (pt->part_intern_cap - 1)) {
        const Partition *p = part_at(pt, id);
        if (p->hash == h && p->n == n &&
            !memcmp(&pt->class_masks[p->masks], cls, (size_t)n * sizeof(Bits256))) {
            return id;
        }
    }
    if (reserve_items((void **)&pt->class_masks, &pt->cap_class_masks, pt->n_class_masks + n,
                      sizeof(Bits256)) < 0 ||
        (pt->n_parts >> PART_CHUNK_BITS == pt->n_part_chunks && part_chunk_add(pt) < 0)) {
        return -1;
    }
    Partition *p = part_at(pt, pt->n_parts);
    p->n = n;
    p->masks = (int32_t)pt->n_class_masks;
    p->hash = h;
    memcpy(&pt->class_masks[pt->n_class_masks], cls, (size_t)n * sizeof(Bits256));
    pt->n_class_masks += n;
    for (int32_t k = 0; k < n; k++) {
        for (int w = 0; w < 4; w++) {
            for (uint64_t bits = cls[k].w[w]; bits; bits &= bits - 1) {
                p->index[w * 64 + __builtin_ctzll(bits)] = (uint8_t)k;
            }
        }
    }
    int32_t id = (int32_t)pt->n_parts++;
    pt->part_intern[j] = id;
    if (2 * pt->n_parts > pt->part_intern_cap && part_rehash(s, 2 * pt->part_intern_cap) < 0) {
        return -1;
    }
    return id;
}

/* Give t the partition `part` and one empty derivative slot per class. */
static int put_classes(TermStoreObject *s, int32_t t, int32_t part) {
    int32_t n = part_at(s->pt, part)->n;
    if (reserve_items((void **)&s->derivs, &s->cap_derivs, s->n_derivs + n, sizeof(int32_t)) < 0) {
        return -1;
    }
    for (int32_t k = 0; k < n; k++) s->derivs[s->n_derivs + k] = T_ERROR;
    s->terms[t].part = part;
    s->terms[t].derivs = (int32_t)s->n_derivs;
    s->n_derivs += n;
    return 0;
}

static int pair_grow(TermStoreObject *s) {
    Partitions *pt = s->pt;
    Py_ssize_t cap = pt->pair_cap ? 2 * pt->pair_cap : 1024;
    uint64_t *keys = PyMem_Calloc((size_t)cap, sizeof(uint64_t));
    int32_t *vals = PyMem_Malloc((size_t)cap * sizeof(int32_t));
    if (keys == NULL || vals == NULL) {
        PyMem_Free(keys);
        PyMem_Free(vals);
        PyErr_NoMemory();
        return -1;
    }
    for (Py_ssize_t k = 0; k < pt->pair_cap; k++) {
        if (!pt->pair_keys[k]) continue;
        Py_ssize_t j = (Py_ssize_t)(mix(0, pt->pair_keys[k]) & (uint64_t)(cap - 1));
        while (keys[j]) j = (j + 1) & (cap - 1);
        keys[j] = pt->pair_keys[k];
        vals[j] = pt->pair_vals[k];
    }
    PyMem_Free(pt->pair_keys);
    PyMem_Free(pt->pair_vals);
    pt->pair_keys = keys;
    pt->pair_vals = vals;
    pt->pair_cap = cap;
    return 0;
}

/* The partition refining `a` by `b` (classes: the non-empty intersections, in order; a
 * partition with one class refines to the other), memoized per pair. -1 on memory errors. */
static int32_t refine_pair(TermStoreObject *s, int32_t a, int32_t b) {
    Partitions *pt = s->pt;
    if (a == b || part_at(pt, b)->n == 1) return a;
    if (part_at(pt, a)->n == 1) return b;
    uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
    Py_ssize_t j = pt->pair_cap ? (Py_ssize_t)(mix(0, key) & (uint64_t)(pt->pair_cap - 1)) : 0;
    for (uint64_t k; pt->pair_cap && (k = pt->pair_keys[j]); j = (j + 1) & (pt->pair_cap - 1)) {
        if (k == key) return pt->pair_vals[j];
    }
    if (reserve_items((void **)&pt->scratch, &pt->scratch_cap, 256, sizeof(Bits256)) < 0) return -1;
    int32_t n = 0;
    const Partition *pa = part_at(pt, a), *pb = part_at(pt, b);
    for (int32_t i = 0; i < pa->n; i++) {
        for (int32_t k = 0; k < pb->n; k++) {
            Bits256 x = bits_and(&pt->class_masks[pa->masks + i], &pt->class_masks[pb->masks + k]);
            if (!bits_zero(&x)) pt->scratch[n++] = x; /* a partition: at most 256 classes */
        }
    }
    int32_t out = intern_partition(s, pt->scratch, n);
    if (out < 0) return -1;
    if (2 * (pt->pair_n + 1) > pt->pair_cap && pair_grow(s) < 0) return -1;
    j = (Py_ssize_t)(mix(0, key) & (uint64_t)(pt->pair_cap - 1));
    while (pt->pair_keys[j]) j = (j + 1) & (pt->pair_cap - 1);
    pt->pair_keys[j] = key;
    pt->pair_vals[j] = out;
    pt->pair_n++;
    return out;
}

/* Compute (and cache) the derivative classes of t: a partition of the bytes on which t's
 * derivative is constant, refined from its parts' (see refine_pair). 0, or -1 with an
 * exception set. */
static int ensure_classes(TermStoreObject *s, int32_t t) {
    if (s->terms[t].part >= 0) return 0;
    if (enter(s) < 0) return -1;
    int32_t part = -1;
    Term x = s->terms[t];
    if (x.kind == K_BYTES) {
        const Bits256 *m = &s->masks[x.a];
        Bits256 cls[2] = {*m, {{~m->w[0], ~m->w[1], ~m->w[2], ~m->w[3]}}};
        part = bits_eq(m, &ALL_BITS) ? intern_partition(s, &ALL_BITS, 1)
                                     : intern_partition(s, cls, 2);
    } else if (x.kind == K_CONCAT) {
        if (ensure_classes(s, x.a) == 0) part = s->terms[x.a].part;
        if (part >= 0 && s->terms[x.a].nullable) {
            part = ensure_classes(s, x.b) < 0 ? -1 : refine_pair(s, part, s->terms[x.b].part);
        }
    } else if (x.kind == K_ALT || x.kind == K_AND) {
        for (int32_t k = 0; k < x.b; k++) {
            int32_t u = s->members[x.a + k];
            if (ensure_classes(s, u) < 0) {
                part = -1;
                break;
            }
            part = k == 0 ? s->terms[u].part : refine_pair(s, part, s->terms[u].part);
            if (part < 0) break;
        }
    } else if (x.kind == K_NOT || x.kind == K_REPEAT) {
        if (ensure_classes(s, x.a) == 0) part = s->terms[x.a].part;
    } else {
        part = intern_partition(s, &ALL_BITS, 1);
    }
    int status = part < 0 ? -1 : put_classes(s, t, part);
    leave(s);
    return status;
}

/* ------------------------------------------------------------------ derivatives */

/* A byte set term (EMPTY for none) holding every byte b with a non-EMPTY derivative
 * t_derive(t, b), maybe more (intersections: the common first bytes of the members;
 * complements: all bytes); T_ERROR on error. Lets a union or intersection skip its members
 * that cannot start with a byte. */
static int32_t first_of(TermStoreObject *s, int32_t t) {
    if (s->terms[t].first >= 0) return s->terms[t].first;
    Term x = s->terms[t];
    if (x.kind == K_BYTES) return s->terms[t].first = t;
    if (enter(s) < 0) return T_ERROR;
    Bits256 m = {{0, 0, 0, 0}};
    int ok = 1;
    if (x.kind == K_CONCAT || x.kind == K_REPEAT || x.kind == K_ALT || x.kind == K_AND) {
        int32_t n = x.kind == K_ALT || x.kind == K_AND ? x.b : 1;
        int32_t first_part = x.kind == K_ALT || x.kind == K_AND ? s->members[x.a] : x.a;
        if (x.kind == K_AND) m = ALL_BITS;
        for (int32_t k = 0; k < n && ok; k++) {
            int32_t u = k == 0 ? first_part : s->members[x.a + k];
            int32_t f = first_of(s, u);
            if (f < 0) {
                ok = 0;
                break;
            }
            const Bits256 *fm = f == T_EMPTY ? NULL : &s->masks[s->terms[f].a];
            for (int w = 0; w < 4; w++) {
                uint64_t bits = fm == NULL ? 0 : fm->w[w];
                m.w[w] = x.kind == K_AND ? m.w[w] & bits : m.w[w] | bits;
            }
        }
        if (ok && x.kind == K_CONCAT && s->terms[x.a].nullable) {
            int32_t f = first_of(s, x.b);
            if (f < 0) ok = 0;
            for (int w = 0; ok && f != T_EMPTY && w < 4; w++) m.w[w] |= s->masks[s->terms[f].a].w[w];
        }
    } else if (x.kind == K_NOT) {
        m = ALL_BITS;
    }
    leave(s);
    int32_t f = ok ? t_byteset(s, &m) : T_ERROR;
    if (f >= 0) s->terms[t].first = f;
    return f;
}

/* Whether byte is in first_of(t): 1, 0, or -1 on error. */
static int may_start(TermStoreObject *s, int32_t t, int byte) {
    int32_t f = first_of(s, t);
    if (f < 0) return -1;
    return f != T_EMPTY && bits_get(&s->masks[s->terms[f].a], byte);
}

/* The derivative of t by byte (T_ERROR with an exception set). */
static int32_t t_derive(TermStoreObject *s, int32_t t, int byte) {
    uint8_t kind = s->terms[t].kind;
    if (kind == K_BYTES) return bits_get(&s->masks[s->terms[t].a], byte) ? T_EPS : T_EMPTY;
    if (kind == K_EMPTY || kind == K_EPS) return T_EMPTY;
    if (ensure_classes(s, t) < 0) return T_ERROR;
    Py_ssize_t slot = s->terms[t].derivs + partition_of(s, t)->index[byte];
    int32_t out = s->derivs[slot];
    if (out != T_ERROR) return out;
    if (enter(s) < 0) return T_ERROR;
    Term x = s->terms[t];
    out = T_EMPTY;
    switch (x.kind) {
    case K_CONCAT: {
        int32_t d = t_derive(s, x.a, byte);
        out = d < 0 ? T_ERROR : t_concat(s, d, x.b);
        if (out >= 0 && s->terms[x.a].nullable) {
            int32_t e = t_derive(s, x.b, byte);
            int32_t pair[2] = {out, e};
            out = e < 0 ? T_ERROR : t_alt(s, pair, 2, 0);
        }
        break;
    }
    case K_ALT:
    case K_AND: {
        IdVec ds;
        idvec_init(&ds);
        for (int32_t k = 0; k < x.b && out >= 0; k++) {
            int32_t u = s->members[x.a + k];
            int starts = may_start(s, u, byte); /* else the derivative is EMPTY */
            int32_t d = starts <= 0 ? starts : t_derive(s, u, byte);
            if (d < 0 || (d == T_EMPTY && x.kind == K_ALT)) {
                out = d < 0 ? T_ERROR : out; /* the union drops EMPTY members anyway */
            } else if (idvec_push(&ds, d) < 0) {
                out = T_ERROR;
            }
            if (d == T_EMPTY && x.kind == K_AND) break; /* so is the intersection */
        }
        if (out >= 0) out = x.kind == K_ALT ? t_alt(s, ds.v, ds.n, 0) : t_and(s, ds.v, ds.n);
        idvec_free(&ds);
        break;
    }
    case K_NOT: {
        int32_t d = t_derive(s, x.a, byte);
        out = d < 0 ? T_ERROR : t_not(s, d);
        break;
    }
    case K_REPEAT: {
        int32_t rest = t_repeat(s, x.a, x.lo > 0 ? x.lo - 1 : 0, x.hi == NO_HI ? NO_HI : x.hi - 1);
        int32_t d = rest < 0 ? T_ERROR : t_derive(s, x.a, byte);
        out = d < 0 ? T_ERROR : t_concat(s, d, rest);
        break;
    }
    default:
        break;
    }
    leave(s);
    if (out >= 0) s->derivs[slot] = out; /* the slot's index is stable, `derivs` may have moved */
    return out;
}

/* The successors of t, one per derivative class: succ[k] for class k (classes of t, see
 * ensure_classes); returns the class count, or -1 with an exception set. */
static int32_t t_row(TermStoreObject *s, int32_t t, int32_t *succ) {
    if (ensure_classes(s, t) < 0) return -1;
    int32_t n = partition_of(s, t)->n;
    for (int32_t k = 0; k < n; k++) {
        int byte = bits_lowest(class_mask(s, t, k));
        if ((succ[k] = t_derive(s, t, byte)) < 0) return -1;
    }
    s->rows++;
    return n;
}

/* ------------------------------------------------------------------ emptiness */

static int is_infinite(TermStoreObject *s, int32_t t) {
    Term x = s->terms[t];
    if (x.infinite >= 0) return x.infinite;
    if (enter(s) < 0) return -1;
    int out = 0;
    if (x.kind == K_CONCAT) {
        out = is_infinite(s, x.a);
        if (out == 0) out = is_infinite(s, x.b);
    } else if (x.kind == K_ALT) {
        for (int32_t k = 0; k < x.b && out == 0; k++) out = is_infinite(s, s->members[x.a + k]);
    } else if (x.kind == K_REPEAT) {
        out = x.hi == NO_HI ? 1 : is_infinite(s, x.a);
    }
    leave(s);
    if (out >= 0) s->terms[t].infinite = (int8_t)out;
    return out;
}

/* Whether an intersection or complement is an infinite language minus finitely many strings:
 * `X & ~Y1 & ~Y2...` or `~Y`, X infinite and the Yi finite, none boolean. -1 on error. */
static int infinite_minus_finite(TermStoreObject *s, int32_t t) {
    Term x = s->terms[t];
    if (x.kind == K_NOT) {
        const Term *y = &s->terms[x.a];
        if (y->boolean) return 0;
        int inf = is_infinite(s, x.a);
        return inf < 0 ? -1 : !inf;
    }
    if (x.kind != K_AND) return 0;
    int32_t positive = -1, n_positive = 0;
    for (int32_t k = 0; k < x.b; k++) {
        int32_t u = s->members[x.a + k];
        if (s->terms[u].kind != K_NOT) {
            positive = u;
            n_positive++;
        }
    }
    if (n_positive != 1 || s->terms[positive].boolean) return 0;
    int inf = is_infinite(s, positive);
    if (inf <= 0) return inf;
    for (int32_t k = 0; k < x.b; k++) {
        int32_t u = s->members[x.a + k];
        if (s->terms[u].kind != K_NOT) continue;
        int32_t y = s->terms[u].a;
        if (s->terms[y].boolean) return 0;
        if ((inf = is_infinite(s, y)) != 0) return inf < 0 ? -1 : 0;
    }
    return 1;
}

/* A set of term ids (open addressing) for the emptiness search. */
typedef struct {
    int32_t *slots;
    Py_ssize_t cap, n;
    IdVec order;
} IdSet;

static int idset_init(IdSet *x) {
    x->cap = 64;
    x->n = 0;
    idvec_init(&x->order);
    x->slots = PyMem_Malloc((size_t)x->cap * sizeof(int32_t));
    if (x->slots == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    memset(x->slots, 0xFF, (size_t)x->cap * sizeof(int32_t));
    return 0;
}
static void idset_free(IdSet *x) {
    PyMem_Free(x->slots);
    idvec_free(&x->order);
}
static int idset_has(const IdSet *x, int32_t id) {
    Py_ssize_t j = (Py_ssize_t)(mix(0, (uint64_t)id) & (uint64_t)(x->cap - 1));
    for (int32_t v; (v = x->slots[j]) >= 0; j = (j + 1) & (x->cap - 1)) {
        if (v == id) return 1;
    }
    return 0;
}
static int idset_add(IdSet *x, int32_t id) {
    if (2 * (x->n + 1) > x->cap) {
        Py_ssize_t cap = 2 * x->cap;
        int32_t *slots = PyMem_Malloc((size_t)cap * sizeof(int32_t));
        if (slots == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        memset(slots, 0xFF, (size_t)cap * sizeof(int32_t));
        for (Py_ssize_t k = 0; k < x->order.n; k++) {
            int32_t v = x->order.v[k];
            Py_ssize_t j = (Py_ssize_t)(mix(0, (uint64_t)v) & (uint64_t)(cap - 1));
            while (slots[j] >= 0) j = (j + 1) & (cap - 1);
            slots[j] = v;
        }
        PyMem_Free(x->slots);
        x->slots = slots;
        x->cap = cap;
    }
    Py_ssize_t j = (Py_ssize_t)(mix(0, (uint64_t)id) & (uint64_t)(x->cap - 1));
    while (x->slots[j] >= 0) j = (j + 1) & (x->cap - 1);
    x->slots[j] = id;
    x->n++;
    return idvec_push(&x->order, id);
}

/* What is known of a term's emptiness (see empty_state). */
#define EMPTY_NO 0    /* not empty, proved */
#define EMPTY_YES 1   /* empty, proved */
#define EMPTY_GUESS 2 /* taken as not empty: a search ran out of budget on the way */

/* Search the derivatives of an intersection or complement for an accepting term
 * (fsm.terms.TermStore._search_empty): EMPTY_*, -1 on error. */
static int search_empty(TermStoreObject *s, int32_t t, Py_ssize_t budget) {
    IdSet seen;
    IdVec frontier;
    int32_t succ[256];
    if (idset_init(&seen) < 0) return -1;
    idvec_init(&frontier);
    int empty = EMPTY_YES;
    if (idset_add(&seen, t) < 0 || idvec_push(&frontier, t) < 0) empty = -1;
    while (empty == EMPTY_YES && frontier.n) {
        int32_t u = frontier.v[--frontier.n];
        int32_t n = t_row(s, u, succ);
        if (n < 0) {
            empty = -1;
            break;
        }
        for (int32_t k = 0; k < n; k++) {
            int32_t v = succ[k];
            if (v == T_EMPTY || idset_has(&seen, v)) continue;
            const Term *y = &s->terms[v];
            if (y->nullable || !y->boolean || y->empty == EMPTY_NO || y->empty == EMPTY_GUESS) {
                empty = y->empty == EMPTY_GUESS ? EMPTY_GUESS : EMPTY_NO;
                break;
            }
            if (y->empty < 0 && (idset_add(&seen, v) < 0 || idvec_push(&frontier, v) < 0)) {
                empty = -1;
                break;
            }
        }
        if (empty == EMPTY_YES && seen.n > budget) empty = EMPTY_GUESS;
    }
    if (empty == EMPTY_YES) {
        for (Py_ssize_t k = 0; k < seen.order.n; k++) s->terms[seen.order.v[k]].empty = EMPTY_YES;
    }
    idvec_free(&frontier);
    idset_free(&seen);
    return empty;
}

/* Whether t denotes the empty language (fsm.terms.TermStore.is_empty), with how it is known:
 * EMPTY_NO, EMPTY_YES or EMPTY_GUESS (see is_empty's budget); -1 on error. */
static int empty_state(TermStoreObject *s, int32_t t, Py_ssize_t budget) {
    if (t == T_EMPTY) return EMPTY_YES;
    Term x = s->terms[t];
    if (!x.boolean || x.nullable) return EMPTY_NO;
    if (x.empty >= 0) return x.empty;
    if (enter(s) < 0) return -1;
    int empty;
    if (x.kind == K_CONCAT) { /* empty iff a part is; a guess if a part is one */
        empty = empty_state(s, x.a, budget);
        int rest = empty < 0 || empty == EMPTY_YES ? empty : empty_state(s, x.b, budget);
        if (rest < 0 || rest == EMPTY_YES || empty == EMPTY_NO) empty = rest;
    } else if ((empty = infinite_minus_finite(s, t)) != 0) {
        empty = empty < 0 ? -1 : EMPTY_NO;
    } else if (x.kind == K_ALT) {
        empty = EMPTY_YES;
        for (int32_t k = 0; k < x.b && empty == EMPTY_YES; k++) {
            empty = empty_state(s, s->members[x.a + k], budget);
        }
    } else if (x.kind == K_REPEAT) {
        empty = x.lo > 0 ? empty_state(s, x.a, budget) : EMPTY_NO;
    } else {
        empty = search_empty(s, t, budget);
    }
    leave(s);
    if (empty >= 0) s->terms[t].empty = (int8_t)empty;
    return empty;
}

/* Whether t denotes the empty language (fsm.terms.TermStore.is_empty); -1 on error. */
static int t_is_empty(TermStoreObject *s, int32_t t, Py_ssize_t budget) {
    int empty = empty_state(s, t, budget);
    return empty < 0 ? -1 : empty == EMPTY_YES;
}

/* ------------------------------------------------------------------ safety over a slice */

/* t_safe(t, L) is a proved lower bound on the lengths n such that every string of the slice L
 * of length <= n leads from t to a non-empty derivative: SAFE_NONE when nothing is proved
 * (not even that t is non-empty), a length 0 .. SAFE_ALL - 1, or SAFE_ALL for every length;
 * SAFE_ALL may carry SAFE_INFINITE: every such derivative is an infinite language. -1 on
 * error. */
#define SAFE_NONE 0x200
#define SAFE_ALL 0xFF
#define SAFE_INFINITE 0x100
#define PAIR_MEMBERS 16 /* safe_alt looks for complementary pairs in unions this small */

/* The larger of two t_safe results (SAFE_NONE below every length). */
static int safe_max(int a, int b) {
    if (a == SAFE_NONE) return b;
    if (b == SAFE_NONE) return a;
    return (a & 0xFF) != (b & 0xFF) ? ((a & 0xFF) > (b & 0xFF) ? a : b) : (a | b);
}

/* The well-formed UTF-8 characters of two to four bytes: a lead byte range, then the range of
 * each following byte. */
typedef struct {
    uint8_t n, lo[4], hi[4];
} Utf8Form;

static const Utf8Form UTF8_FORMS[] = {
    {2, {0xC2, 0x80}, {0xDF, 0xBF}},
    {3, {0xE0, 0xA0, 0x80}, {0xE0, 0xBF, 0xBF}},
    {3, {0xE1, 0x80, 0x80}, {0xEC, 0xBF, 0xBF}},
    {3, {0xED, 0x80, 0x80}, {0xED, 0x9F, 0xBF}},
    {3, {0xEE, 0x80, 0x80}, {0xEF, 0xBF, 0xBF}},
    {4, {0xF0, 0x90, 0x80, 0x80}, {0xF0, 0xBF, 0xBF, 0xBF}},
    {4, {0xF1, 0x80, 0x80, 0x80}, {0xF3, 0xBF, 0xBF, 0xBF}},
    {4, {0xF4, 0x80, 0x80, 0x80}, {0xF4, 0x8F, 0xBF, 0xBF}},
};

static Bits256 byte_range_bits(int lo, int hi) {
    Bits256 r = {{0, 0, 0, 0}};
    for (int b = lo; b <= hi; b++) r.w[b >> 6] |= 1ULL << (b & 63);
    return r;
}

/* Whether every string from byte `k` on of the form f leads from x to a nullable term. */
static int completes_form(TermStoreObject *s, int32_t x, const Utf8Form *f, int k) {
    if (k == f->n) return s->terms[x].nullable;
    if (x == T_EMPTY) return 0;
    if (ensure_classes(s, x) < 0) return -1;
    Bits256 range = byte_range_bits(f->lo[k], f->hi[k]);
    for (int32_t c = 0; c < partition_of(s, x)->n; c++) {
        Bits256 part = bits_and(class_mask(s, x, c), &range);
        if (bits_zero(&part)) continue;
        int32_t d = t_derive(s, x, bits_lowest(&part));
        int ok = d < 0 ? -1 : completes_form(s, d, f, k + 1);
        if (ok <= 0) return ok;
    }
    return 1;
}

/* Term t's t_safe caches (`safe`, `completes`), cleared first if they hold the results of a
 * forgotten epoch. */
static Term *safe_cache(TermStoreObject *s, int32_t t) {
    Term *y = &s->terms[t];
    if (y->safe_epoch != s->safe_epoch) {
        for (int j = 0; j < SAFE_SLOTS; j++) y->safe[j] = SAFE_UNKNOWN;
        y->completes = 0;
        y->safe_epoch = s->safe_epoch;
    }
    return y;
}

static int completes_on_slice(TermStoreObject *s, int32_t x, const Slice *L);

/* Whether every character of the slice L (of t_safe's slot `slot`), alone, is a whole string
 * of x: 1, 0, or -1 on error. Cached per term and slot: x is typically the character term of
 * a string, met again in every state of that string. */
static int completes_on(TermStoreObject *s, int32_t x, int slot, const Slice *L) {
    const Term *known = &s->terms[x];
    if (known->safe_epoch == s->safe_epoch && (known->completes >> (2 * slot) & 1)) {
        return known->completes >> (2 * slot + 1) & 1;
    }
    int r = completes_on_slice(s, x, L);
    if (r >= 0) safe_cache(s, x)->completes |= (uint8_t)((1 | r << 1) << (2 * slot));
    return r;
}

/* completes_on, computed. */
static int completes_on_slice(TermStoreObject *s, int32_t x, const Slice *L) {
    if (ensure_classes(s, x) < 0) return -1;
    for (int32_t k = 0; k < partition_of(s, x)->n; k++) {
        Bits256 part = bits_and(class_mask(s, x, k), &L->bytes);
        if (bits_zero(&part)) continue;
        int32_t d = t_derive(s, x, bits_lowest(&part));
        if (d < 0) return -1;
        if (!s->terms[d].nullable) return 0;
    }
    for (size_t k = 0; L->utf8 && k < sizeof(UTF8_FORMS) / sizeof(UTF8_FORMS[0]); k++) {
        int ok = completes_form(s, x, &UTF8_FORMS[k], 0);
        if (ok <= 0) return ok;
    }
    return 1;
}

/* Whether a term without intersection or complement is finite (0 for the others). */
static int finite_plain(TermStoreObject *s, int32_t t) {
    if (s->terms[t].boolean) return 0;
    int inf = is_infinite(s, t);
    return inf < 0 ? -1 : !inf;
}

/* Whether t holds every string over L whose length is in [*lo, *hi] and t's derivative by
 * a shorter one holds one of those lengths' rest (so is non-empty): t is a byte set holding L
 * ([1, 1]), a repetition X{lo,hi} whose X takes each byte of L as a whole string (a string
 * over L of length j then lies in X^j), a concatenation A B with B nullable and A of such a
 * range (A B holds A), a union with a member of such a range (the widest), or an
 * intersection of terms of such ranges with max(lo) <= min(hi). *hi = NO_HI when unbounded.
 * 1 yes, 0 no, -1 on error. */
static int complete_range(TermStoreObject *s, int32_t t, int slot, const Slice *L, int64_t *lo,
                          int64_t *hi) {
    Term x = s->terms[t];
    if (x.kind == K_BYTES) { /* [1, 1] if it holds every character of L */
        Bits256 in = bits_and(&s->masks[x.a], &L->bytes);
        *lo = *hi = 1;
        return !L->utf8 && bits_eq(&in, &L->bytes);
    }
    if (x.kind == K_REPEAT) {
        int complete = completes_on(s, x.a, slot, L);
        *lo = x.lo;
        *hi = x.hi;
        return complete;
    }
    if (x.kind == K_CONCAT) {
        return s->terms[x.b].nullable ? complete_range(s, x.a, slot, L, lo, hi) : 0;
    }
    if (x.kind != K_AND && x.kind != K_ALT) return 0;
    if (enter(s) < 0) return -1;
    int found = x.kind == K_AND, status = 1;
    *lo = 0;
    *hi = NO_HI;
    for (int32_t k = 0; k < x.b && status > 0; k++) {
        int64_t ulo, uhi;
        int complete = complete_range(s, s->members[x.a + k], slot, L, &ulo, &uhi);
        if (complete < 0) {
            status = -1;
        } else if (x.kind == K_AND) { /* every member, on the common lengths */
            status = complete;
            if (ulo > *lo) *lo = ulo;
            if (uhi != NO_HI && (*hi == NO_HI || uhi < *hi)) *hi = uhi;
        } else if (complete && (!found || (*hi != NO_HI && (uhi == NO_HI || uhi > *hi)))) {
            found = 1; /* a union: its member of the longest range */
            *lo = ulo;
            *hi = uhi;
        }
    }
    leave(s);
    if (status <= 0 || !found) return status < 0 ? -1 : 0;
    return *hi == NO_HI || *lo <= *hi;
}

/* A length as a t_safe result: capped below SAFE_ALL (a smaller bound is still proved). */
static int safe_length(int64_t n) { return (int)(n < SAFE_ALL ? n : SAFE_ALL - 1); }

static int t_safe_slot(TermStoreObject *s, int32_t t, int slot, const Slice *L);

static int proved_nonempty(TermStoreObject *s, int32_t t);

/* The member of intersection a that intersection b lacks, if there is exactly one (else -1);
 * both hold sorted member ids. */
static int32_t sole_extra_member(const TermStoreObject *s, const Term *a, const Term *b) {
    int32_t extra = -1, i = 0, j = 0;
    while (i < a->b) {
        int32_t u = s->members[a->a + i], v = j < b->b ? s->members[b->a + j] : INT32_MAX;
        if (u == v) {
            i++, j++;
        } else if (u < v) {
            if (extra >= 0) return -1;
            extra = u, i++;
        } else {
            j++;
        }
    }
    return extra;
}

/* A lower bound for the union of m1 = (X & P) T1 and m2 = (X & ~P) T2 (intersections equal
 * but for one member and its complement, tails proved non-empty), as in the keys of an object
 * with patternProperties, split by whether each pattern matches: a string w whose derivative
 * of X is not empty continues into X & P or X & ~P, so t_safe(X) bounds the union (without
 * SAFE_INFINITE). SAFE_NONE when the members are not of that form; -1 on error. */
static int safe_complement_pair(TermStoreObject *s, int32_t m1, int32_t m2, int slot,
                                const Slice *L) {
    Term c1 = s->terms[m1], c2 = s->terms[m2];
    if (c1.kind != K_CONCAT || c2.kind != K_CONCAT) return SAFE_NONE;
    Term a1 = s->terms[c1.a], a2 = s->terms[c2.a];
    if (a1.kind != K_AND || a2.kind != K_AND || a1.b != a2.b) return SAFE_NONE;
    int32_t p = sole_extra_member(s, &a1, &a2), q = sole_extra_member(s, &a2, &a1);
    if (p < 0 || q < 0 || !((s->terms[q].kind == K_NOT && s->terms[q].a == p) ||
                            (s->terms[p].kind == K_NOT && s->terms[p].a == q))) {
        return SAFE_NONE;
    }
    IdVec common;
    idvec_init(&common);
    int status = 0;
    for (int32_t k = 0; k < a1.b && status == 0; k++) {
        if (s->members[a1.a + k] != p) status = idvec_push(&common, s->members[a1.a + k]);
    }
    int32_t x = status < 0 ? T_ERROR : t_and(s, common.v, common.n);
    idvec_free(&common);
    if (x < 0) return -1;
    int tails = proved_nonempty(s, c1.b);
    if (tails > 0) tails = proved_nonempty(s, c2.b);
    if (tails <= 0) return tails < 0 ? -1 : SAFE_NONE;
    int r = t_safe_slot(s, x, slot, L);
    return r < 0 || r == SAFE_NONE ? r : r & 0xFF;
}

static int safe_alt(TermStoreObject *s, const Term *x, int slot, const Slice *L) {
    /* D_w of a union contains D_w of each member. */
    int best = SAFE_NONE;
    for (int32_t k = 0; k < x->b && best != (SAFE_ALL | SAFE_INFINITE); k++) {
        int r = t_safe_slot(s, s->members[x->a + k], slot, L);
        if (r < 0) return -1;
        best = safe_max(best, r);
    }
    /* Pairs of members that together cover what neither does alone (few members: pairs). */
    for (int32_t i = 0; i < x->b && x->b <= PAIR_MEMBERS && (best & 0xFF) != SAFE_ALL; i++) {
        for (int32_t j = i + 1; j < x->b; j++) {
            int r = safe_complement_pair(s, s->members[x->a + i], s->members[x->a + j], slot, L);
            if (r < 0) return -1;
            best = safe_max(best, r);
        }
    }
    return best;
}

/* An intersection (A1 B) & (A2 B) & ... with one tail B contains (A1 & A2 & ...) B: when the
 * Ai have complete ranges (see complete_range), t_safe as for a concatenation (safe_concat).
 * SAFE_NONE when t is not of that form. */
static int safe_and_shared_tail(TermStoreObject *s, const Term *x, int slot, const Slice *L) {
    int32_t tail = -1;
    int64_t lo = 0, hi = NO_HI;
    for (int32_t k = 0; k < x->b; k++) {
        const Term *u = &s->terms[s->members[x->a + k]];
        if (u->kind != K_CONCAT || (tail >= 0 && u->b != tail)) return SAFE_NONE;
        tail = u->b;
        int32_t head = u->a; /* u may move: complete_range can add terms */
        int64_t ulo, uhi;
        int complete = complete_range(s, head, slot, L, &ulo, &uhi);
        if (complete <= 0) return complete < 0 ? -1 : SAFE_NONE;
        if (ulo > lo) lo = ulo;
        if (uhi != NO_HI && (hi == NO_HI || uhi < hi)) hi = uhi;
    }
    if (hi != NO_HI && lo > hi) return SAFE_NONE;
    int rest = t_safe_slot(s, tail, slot, L);
    if (rest < 0 || rest == SAFE_NONE) return rest;
    if (hi == NO_HI) return SAFE_ALL | SAFE_INFINITE;
    return (rest & 0xFF) == SAFE_ALL ? rest : safe_length(hi + (rest & 0xFF));
}

static int safe_and(TermStoreObject *s, const Term *x, int32_t t, int slot, const Slice *L) {
    int64_t lo, hi;
    int complete = complete_range(s, t, slot, L, &lo, &hi);
    if (complete != 0) {
        return complete < 0 ? -1 : hi == NO_HI ? SAFE_ALL | SAFE_INFINITE : safe_length(hi);
    }
    int shared = safe_and_shared_tail(s, x, slot, L);
    if (shared != SAFE_NONE) return shared;
    /* P & ~N1 & ~N2 ... with the Ni finite and not boolean: D_w(P) minus the finite D_w(Ni)
     * is infinite when D_w(P) is; without P it is the complement of a finite set. */
    int32_t positive = -1;
    for (int32_t k = 0; k < x->b; k++) {
        int32_t u = s->members[x->a + k];
        if (s->terms[u].kind != K_NOT) {
            if (positive >= 0) return SAFE_NONE;
            positive = u;
            continue;
        }
        int fin = finite_plain(s, s->terms[u].a);
        if (fin <= 0) return fin < 0 ? -1 : SAFE_NONE;
    }
    if (positive < 0) return SAFE_ALL | SAFE_INFINITE;
    int r = t_safe_slot(s, positive, slot, L);
    return r < 0 ? -1 : r == (SAFE_ALL | SAFE_INFINITE) ? r : SAFE_NONE;
}

/* Whether t is non-empty, as far as proved (no search beyond empty_state's). */
static int proved_nonempty(TermStoreObject *s, int32_t t) {
    const Term *x = &s->terms[t];
    if (!x->boolean || x->nullable) return t != T_EMPTY;
    int empty = empty_state(s, t, EMPTY_BUDGET);
    return empty < 0 ? -1 : empty == EMPTY_NO;
}

static int safe_concat(TermStoreObject *s, const Term *x, int slot, const Slice *L) {
    /* D_w(A B) contains D_w(A) B: non-empty when B is, and infinite if either part is. The
     * tail is looked into only as far as needed (it is often the rest of a whole document). */
    int head = t_safe_slot(s, x->a, slot, L);
    if (head < 0) return -1;
    int r = SAFE_NONE;
    if (head != SAFE_NONE) {
        int nonempty = proved_nonempty(s, x->b);
        if (nonempty < 0) return -1;
        if (nonempty) r = head;
        if (r == SAFE_ALL && !s->terms[x->b].boolean) {
            int inf = is_infinite(s, x->b);
            if (inf < 0) return -1;
            if (inf) r |= SAFE_INFINITE;
        }
        if ((r & 0xFF) == SAFE_ALL) return r;
    }
    int64_t lo, hi;
    int complete = complete_range(s, x->a, slot, L, &lo, &hi);
    if (complete < 0) return -1;
    int nullable = s->terms[x->a].nullable;
    if (!(complete && hi != NO_HI) && !nullable) return r;
    int tail = t_safe_slot(s, x->b, slot, L);
    if (tail < 0) return -1;
    if (complete && hi != NO_HI && tail != SAFE_NONE) {
        /* A string over L longer than hi splits into hi characters in A and a rest, so
         * D_w(A B) contains D_rest(B); a shorter one has D_w(A) non-empty. */
        r = safe_max(r, (tail & 0xFF) == SAFE_ALL ? tail : safe_length(hi + (tail & 0xFF)));
    }
    if (nullable) r = safe_max(r, tail); /* D_w(A B) contains D_w(B) */
    return r;
}

static int safe_repeat(TermStoreObject *s, const Term *x, int slot, const Slice *L) {
    int complete = completes_on(s, x->a, slot, L);
    if (complete != 0) {
        return complete < 0 ? -1 : x->hi == NO_HI ? SAFE_ALL | SAFE_INFINITE : safe_length(x->hi);
    }
    /* D_w(X{lo,hi}) contains D_w(X) X{lo-1,hi-1}, infinite only if D_w(X) is. */
    return t_safe_slot(s, x->a, slot, L);
}

static int t_safe_slot(TermStoreObject *s, int32_t t, int slot, const Slice *L) {
    const Term *known = &s->terms[t];
    uint16_t cached = known->safe_epoch == s->safe_epoch ? known->safe[slot] : SAFE_UNKNOWN;
    if (cached != SAFE_UNKNOWN) return cached;
    if (enter(s) < 0) return -1;
    Term x = s->terms[t];
    int r = SAFE_NONE;
    switch (x.kind) {
    case K_EPS:
        r = 0;
        break;
    case K_BYTES: {
        Bits256 in = bits_and(&s->masks[x.a], &L->bytes);
        r = !L->utf8 && bits_eq(&in, &L->bytes) ? 1 : 0;
        break;
    }
    case K_CONCAT:
        r = safe_concat(s, &x, slot, L);
        break;
    case K_ALT:
        r = safe_alt(s, &x, slot, L);
        break;
    case K_AND:
        r = safe_and(s, &x, t, slot, L);
        break;
    case K_NOT: {
        int fin = finite_plain(s, x.a);
        r = fin < 0 ? -1 : fin ? SAFE_ALL | SAFE_INFINITE : SAFE_NONE;
        break;
    }
    case K_REPEAT:
        r = safe_repeat(s, &x, slot, L);
        break;
    default: /* EMPTY */
        break;
    }
    leave(s);
    if (r == SAFE_NONE) { /* at least the empty string, if t is not empty */
        int nonempty = proved_nonempty(s, t);
        r = nonempty < 0 ? -1 : nonempty ? 0 : SAFE_NONE;
    }
    if (r < 0) return -1;
    safe_cache(s, t)->safe[slot] = (uint16_t)r;
    return r;
}

static int same_slice(const Slice *a, const Slice *b) {
    return a->utf8 == b->utf8 && bits_eq(&a->bytes, &b->bytes);
}

/* See SAFE_NONE; results are cached per term for the last SAFE_SLOTS slices. */
static int t_safe(TermStoreObject *s, int32_t t, const Slice *L) {
    int slot = 0;
    while (slot < s->n_safe_sets && !same_slice(&s->safe_sets[slot], L)) slot++;
    if (slot == SAFE_SLOTS) { /* forget every cached result (a new epoch) and start over */
        if (++s->safe_epoch == 0) { /* the epochs wrapped: clear the results for real */
            for (Py_ssize_t k = 0; k < s->n_terms; k++) {
                for (int j = 0; j < SAFE_SLOTS; j++) s->terms[k].safe[j] = SAFE_UNKNOWN;
                s->terms[k].completes = 0;
                s->terms[k].safe_epoch = 0;
            }
        }
        s->n_safe_sets = 0;
        slot = 0;
    }
    if (slot == s->n_safe_sets) s->safe_sets[s->n_safe_sets++] = *L;
    return t_safe_slot(s, t, slot, L);
}

/* ------------------------------------------------------------------ runs over a byte set */

#define RUN_UNBOUNDED INT64_MAX /* t_run: no bound known */
#define RUN_BUDGET_DEFAULT 256  /* terms t_run visits for TermStore.run */

static int64_t run_add(int64_t a, int64_t b) {
    return a == RUN_UNBOUNDED || b == RUN_UNBOUNDED || a > RUN_UNBOUNDED - b ? RUN_UNBOUNDED
                                                                               : a + b;
}

/* The recursion of t_run; *budget counts down the terms it may still visit. */
static int64_t run_bound(TermStoreObject *s, int32_t t, const Bits256 *L, int *budget) {
    if (--*budget < 0) return RUN_UNBOUNDED;
    if (enter(s) < 0) return -1;
    Term x = s->terms[t];
    int64_t r = 0;
    switch (x.kind) {
    case K_BYTES: {
        Bits256 in = bits_and(&s->masks[x.a], L);
        r = !bits_zero(&in);
        break;
    }
    case K_CONCAT: { /* a prefix over L: one of A, or a string of A over L then one of B */
        r = run_bound(s, x.a, L, budget);
        if (r > 0 || (r == 0 && s->terms[x.a].nullable)) {
            int64_t tail = run_bound(s, x.b, L, budget);
            r = tail < 0 ? -1 : run_add(r, tail);
        }
        break;
    }
    case K_ALT:
    case K_AND:
        r = x.kind == K_AND ? RUN_UNBOUNDED : 0;
        for (int32_t k = 0; k < x.b && r >= 0; k++) {
            int64_t u = run_bound(s, s->members[x.a + k], L, budget);
            if (u < 0) r = -1;
            else r = x.kind == K_ALT ? (u > r ? u : r) : (u < r ? u : r);
        }
        break;
    case K_NOT:
        r = RUN_UNBOUNDED;
        break;
    case K_REPEAT: { /* at most hi strings of X, each over L but maybe the last */
        r = run_bound(s, x.a, L, budget);
        if (r > 0 && r != RUN_UNBOUNDED) {
            r = x.hi == NO_HI || x.hi > RUN_UNBOUNDED / r ? RUN_UNBOUNDED : r * x.hi;
        }
        break;
    }
    default: /* EMPTY, EPS */
        break;
    }
    leave(s);
    return r;
}

/* An upper bound on the length of the strings over the bytes of L that lead from t to a
 * non-empty derivative (the prefixes of t's strings whose bytes all lie in L): every longer
 * string over L leads to EMPTY. RUN_UNBOUNDED when none is proved within `budget` terms
 * visited; -1 on error. By structure: a byte set bounds its runs by 1, a concatenation by
 * its head's bound plus, if the head may hold a string over L (it is nullable or has a
 * positive bound), its tail's; a union by the largest member bound, an intersection by the
 * smallest, X{lo,hi} by hi times X's, a complement not at all. */
static int64_t t_run(TermStoreObject *s, int32_t t, const Bits256 *L, int budget) {
    return run_bound(s, t, L, &budget);
}

/* ------------------------------------------------------------------ Python type */

static int term_arg(const TermStoreObject *s, PyObject *obj, int32_t *out) {
    Py_ssize_t t = PyLong_AsSsize_t(obj);
    if (t == -1 && PyErr_Occurred()) return -1;
    if (t < 0 || t >= s->n_terms) {
        PyErr_Format(PyExc_IndexError, "no term %zd in this store", t);
        return -1;
    }
    *out = (int32_t)t;
    return 0;
}

static int bits_from_int(PyObject *obj, Bits256 *out) {
    if (!PyLong_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "byte mask must be an int");
        return -1;
    }
    PyObject *raw = PyObject_CallMethod(obj, "to_bytes", "is", 32, "little");
    if (raw == NULL) return -1;
    const uint8_t *p = (const uint8_t *)PyBytes_AS_STRING(raw);
    for (int k = 0; k < 4; k++) {
        uint64_t w = 0;
        for (int j = 7; j >= 0; j--) w = (w << 8) | p[8 * k + j];
        out->w[k] = w;
    }
    Py_DECREF(raw);
    return 0;
}

static PyObject *bits_to_int(const Bits256 *m) {
    uint8_t p[32];
    for (int k = 0; k < 32; k++) p[k] = (uint8_t)(m->w[k >> 3] >> (8 * (k & 7)));
    PyObject *raw = PyBytes_FromStringAndSize((const char *)p, 32);
    if (raw == NULL) return NULL;
    PyObject *out = PyObject_CallMethod((PyObject *)&PyLong_Type, "from_bytes", "Os", raw, "little");
    Py_DECREF(raw);
    return out;
}

static PyObject *id_result(int32_t id) { return id < 0 ? NULL : PyLong_FromLong(id); }

static int store_init_terms(TermStoreObject *s) {
    if (intern_rehash(s, 1024) < 0) return -1;
    if (make_term(s, K_EMPTY, 0, 0, 0, 0, NULL, NULL, 0, 0) != T_EMPTY ||
        make_term(s, K_EPS, 0, 1, 0, 0, NULL, NULL, 1, 0) != T_EPS) {
        return -1;
    }
    s->anything = t_not(s, T_EMPTY);
    return s->anything < 0 ? -1 : 0;
}

static PyObject *store_new(PyTypeObject *type, PyObject *Py_UNUSED(args),
                           PyObject *Py_UNUSED(kwargs)) {
    TermStoreObject *s = (TermStoreObject *)type->tp_alloc(type, 0);
    if (s == NULL) return NULL;
    s->max_depth = 10000;
    if ((s->pt = shared_partitions()) == NULL || store_init_terms(s) < 0) {
        Py_DECREF(s);
        return NULL;
    }
    return (PyObject *)s;
}

static int store_init(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"max_depth", NULL};
    int max_depth = ((TermStoreObject *)self)->max_depth;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|i:TermStore", kwlist, &max_depth)) return -1;
    ((TermStoreObject *)self)->max_depth = max_depth;
    return 0;
}

static void store_dealloc(PyObject *self) {
    TermStoreObject *s = (TermStoreObject *)self;
    release_items(s->terms, s->cap_terms, sizeof(Term));
    release_items(s->masks, s->cap_masks, sizeof(Bits256));
    release_items(s->members, s->cap_members, sizeof(int32_t));
    release_items(s->derivs, s->cap_derivs, sizeof(int32_t));
    if (s->intern != NULL) pool_free(s->intern, (size_t)s->intern_cap * sizeof(int32_t));
    partitions_release(s->pt);
    Py_TYPE(self)->tp_free(self);
}

static Py_ssize_t store_len(PyObject *self) { return ((TermStoreObject *)self)->n_terms; }

static PyObject *store_byteset(PyObject *self, PyObject *mask) {
    Bits256 m;
    if (bits_from_int(mask, &m) < 0) return NULL;
    return id_result(t_byteset((TermStoreObject *)self, &m));
}

static PyObject *store_concat(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    TermStoreObject *s = (TermStoreObject *)self;
    int32_t a, b;
    if (n != 2) {
        PyErr_SetString(PyExc_TypeError, "concat(a, b) takes 2 terms");
        return NULL;
    }
    if (term_arg(s, args[0], &a) < 0 || term_arg(s, args[1], &b) < 0) return NULL;
    return id_result(t_concat(s, a, b));
}

/* alt(*items) and and_(*items). */
static PyObject *store_nary(PyObject *self, PyObject *const *args, Py_ssize_t n, int is_and) {
    TermStoreObject *s = (TermStoreObject *)self;
    IdVec items;
    idvec_init(&items);
    int32_t out = T_ERROR;
    for (Py_ssize_t k = 0; k < n; k++) {
        int32_t t;
        if (term_arg(s, args[k], &t) < 0 || idvec_push(&items, t) < 0) goto done;
    }
    out = is_and ? t_and(s, items.v, items.n) : t_alt(s, items.v, items.n, 1);
done:
    idvec_free(&items);
    return id_result(out);
}
static PyObject *store_alt(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    return store_nary(self, args, n, 0);
}
static PyObject *store_and(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    return store_nary(self, args, n, 1);
}

static PyObject *store_not(PyObject *self, PyObject *arg) {
    int32_t a;
    if (term_arg((TermStoreObject *)self, arg, &a) < 0) return NULL;
    return id_result(t_not((TermStoreObject *)self, a));
}

static PyObject *store_repeat(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    TermStoreObject *s = (TermStoreObject *)self;
    int32_t a;
    if (n < 2 || n > 3) {
        PyErr_SetString(PyExc_TypeError, "repeat(a, lo, hi=None)");
        return NULL;
    }
    if (term_arg(s, args[0], &a) < 0) return NULL;
    long long lo = PyLong_AsLongLong(args[1]), hi = NO_HI;
    if (lo == -1 && PyErr_Occurred()) return NULL;
    if (n == 3 && args[2] != Py_None) {
        hi = PyLong_AsLongLong(args[2]);
        if (hi == -1 && PyErr_Occurred()) return NULL;
        if (hi < 0) return id_result(T_EMPTY); /* hi < lo (lo >= 0) */
    }
    if (lo < 0) {
        PyErr_SetString(PyExc_ValueError, "repeat: lo must be >= 0");
        return NULL;
    }
    return id_result(t_repeat(s, a, lo, hi));
}

static PyObject *store_nullable(PyObject *self, PyObject *arg) {
    int32_t t;
    if (term_arg((TermStoreObject *)self, arg, &t) < 0) return NULL;
    return PyBool_FromLong(((TermStoreObject *)self)->terms[t].nullable);
}

static PyObject *store_classes(PyObject *self, PyObject *arg) {
    TermStoreObject *s = (TermStoreObject *)self;
    int32_t t;
    if (term_arg(s, arg, &t) < 0 || ensure_classes(s, t) < 0) return NULL;
    int32_t n = partition_of(s, t)->n;
    PyObject *out = PyTuple_New(n);
    for (int32_t k = 0; out != NULL && k < n; k++) {
        PyObject *m = bits_to_int(class_mask(s, t, k));
        if (m == NULL) Py_CLEAR(out);
        else PyTuple_SET_ITEM(out, k, m);
    }
    return out;
}

static PyObject *store_derive(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    TermStoreObject *s = (TermStoreObject *)self;
    int32_t t;
    if (n != 2) {
        PyErr_SetString(PyExc_TypeError, "derive(t, byte)");
        return NULL;
    }
    if (term_arg(s, args[0], &t) < 0) return NULL;
    long b = PyLong_AsLong(args[1]);
    if (b == -1 && PyErr_Occurred()) return NULL;
    if (b < 0 || b > 255) {
        PyErr_SetString(PyExc_ValueError, "derive: byte must be in 0..255");
        return NULL;
    }
    return id_result(t_derive(s, t, (int)b));
}

static PyObject *store_row(PyObject *self, PyObject *arg) {
    TermStoreObject *s = (TermStoreObject *)self;
    int32_t t, succ[256];
    if (term_arg(s, arg, &t) < 0) return NULL;
    int32_t n = t_row(s, t, succ);
    if (n < 0) return NULL;
    PyObject *out = PyList_New(n);
    for (int32_t k = 0; out != NULL && k < n; k++) {
        PyObject *m = bits_to_int(class_mask(s, t, k));
        PyObject *pair = m == NULL ? NULL : Py_BuildValue("(Ni)", m, succ[k]);
        if (pair == NULL) Py_CLEAR(out);
        else PyList_SET_ITEM(out, k, pair);
    }
    return out;
}

static PyObject *store_is_empty(PyObject *self, PyObject *args, PyObject *kwargs) {
    static char *kwlist[] = {"t", "budget", NULL};
    TermStoreObject *s = (TermStoreObject *)self;
    PyObject *obj;
    Py_ssize_t budget = EMPTY_BUDGET;
    int32_t t;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O|n:is_empty", kwlist, &obj, &budget) ||
        term_arg(s, obj, &t) < 0) {
        return NULL;
    }
    int empty = t_is_empty(s, t, budget);
    return empty < 0 ? NULL : PyBool_FromLong(empty);
}

static PyObject *store_kind(PyObject *self, PyObject *arg) {
    int32_t t;
    if (term_arg((TermStoreObject *)self, arg, &t) < 0) return NULL;
    return PyLong_FromLong(((TermStoreObject *)self)->terms[t].kind);
}

static PyObject *store_args(PyObject *self, PyObject *arg) {
    TermStoreObject *s = (TermStoreObject *)self;
    int32_t t;
    if (term_arg(s, arg, &t) < 0) return NULL;
    Term x = s->terms[t];
    switch (x.kind) {
    case K_BYTES: {
        PyObject *m = bits_to_int(&s->masks[x.a]);
        return m == NULL ? NULL : Py_BuildValue("(N)", m);
    }
    case K_CONCAT:
        return Py_BuildValue("(ii)", x.a, x.b);
    case K_ALT:
    case K_AND: {
        PyObject *out = PyTuple_New(x.b);
        for (int32_t k = 0; out != NULL && k < x.b; k++) {
            PyObject *u = PyLong_FromLong(s->members[x.a + k]);
            if (u == NULL) Py_CLEAR(out);
            else PyTuple_SET_ITEM(out, k, u);
        }
        return out;
    }
    case K_NOT:
        return Py_BuildValue("(i)", x.a);
    case K_REPEAT:
        if (x.hi == NO_HI) return Py_BuildValue("(iLO)", x.a, (long long)x.lo, Py_None);
        return Py_BuildValue("(iLL)", x.a, (long long)x.lo, (long long)x.hi);
    default:
        return PyTuple_New(0);
    }
}

static PyObject *store_safe(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    TermStoreObject *s = (TermStoreObject *)self;
    int32_t t;
    Bits256 L;
    if (n != 3) {
        PyErr_SetString(PyExc_TypeError, "safe(t, mask, utf8)");
        return NULL;
    }
    if (term_arg(s, args[0], &t) < 0 || bits_from_int(args[1], &L) < 0) return NULL;
    int utf8 = PyObject_IsTrue(args[2]);
    if (utf8 < 0) return NULL;
    Bits256 ascii = byte_range_bits(0, 0x7F), in = bits_and(&L, &ascii);
    if (utf8 && !bits_eq(&in, &L)) {
        PyErr_SetString(PyExc_ValueError, "safe: a UTF-8 slice takes ASCII bytes only");
        return NULL;
    }
    Slice slice = {L, utf8};
    int r = t_safe(s, t, &slice);
    if (r < 0) return NULL;
    if (r == SAFE_NONE) return PyLong_FromLong(-1);
    if ((r & 0xFF) == SAFE_ALL) Py_RETURN_NONE;
    return PyLong_FromLong(r);
}

static PyObject *store_run(PyObject *self, PyObject *const *args, Py_ssize_t n) {
    TermStoreObject *s = (TermStoreObject *)self;
    int32_t t;
    Bits256 L;
    if (n != 2) {
        PyErr_SetString(PyExc_TypeError, "run(t, mask)");
        return NULL;
    }
    if (term_arg(s, args[0], &t) < 0 || bits_from_int(args[1], &L) < 0) return NULL;
    int64_t r = t_run(s, t, &L, RUN_BUDGET_DEFAULT);
    if (r < 0) return NULL;
    if (r == RUN_UNBOUNDED) Py_RETURN_NONE;
    return PyLong_FromLongLong(r);
}

static PyObject *store_get_anything(PyObject *self, void *Py_UNUSED(closure)) {
    return PyLong_FromLong(((TermStoreObject *)self)->anything);
}
static PyObject *store_get_rows(PyObject *self, void *Py_UNUSED(closure)) {
    return PyLong_FromUnsignedLongLong(((TermStoreObject *)self)->rows);
}

static PyMethodDef store_methods[] = {
    {"byteset", store_byteset, METH_O, "byteset(mask) -> term: the bytes b with bit b set."},
    {"concat", (PyCFunction)(void (*)(void))store_concat, METH_FASTCALL, "concat(a, b) -> term"},
    {"alt", (PyCFunction)(void (*)(void))store_alt, METH_FASTCALL, "alt(*items) -> term (union)"},
    {"and_", (PyCFunction)(void (*)(void))store_and, METH_FASTCALL,
     "and_(*items) -> term (intersection)"},
    {"not_", store_not, METH_O, "not_(a) -> term (complement)"},
    {"repeat", (PyCFunction)(void (*)(void))store_repeat, METH_FASTCALL,
     "repeat(a, lo, hi=None) -> term: a{lo,hi}, hi=None unbounded"},
    {"nullable", store_nullable, METH_O, "nullable(t) -> bool: whether t accepts \"\""},
    {"classes", store_classes, METH_O,
     "classes(t) -> tuple of byte masks partitioning the bytes by derivative"},
    {"derive", (PyCFunction)(void (*)(void))store_derive, METH_FASTCALL,
     "derive(t, byte) -> term"},
    {"row", store_row, METH_O, "row(t) -> [(mask, successor)], one pair per derivative class"},
    {"is_empty", (PyCFunction)(void (*)(void))store_is_empty, METH_VARARGS | METH_KEYWORDS,
     "is_empty(t, budget=20000) -> bool"},
    {"safe", (PyCFunction)(void (*)(void))store_safe, METH_FASTCALL,
     "safe(t, mask, utf8) -> n, None or -1: every string of the slice (the bytes of mask, and "
     "with utf8 every multi-byte UTF-8 character) of at most n characters (None: any number) "
     "provably leads from t to a non-empty derivative; -1: not proved"},
    {"run", (PyCFunction)(void (*)(void))store_run, METH_FASTCALL,
     "run(t, mask) -> n or None: every string of the bytes of mask longer than n leads from t "
     "to the empty derivative (None: no bound proved)"},
    {"kind", store_kind, METH_O, "kind(t) -> int (the K_* constants of fsm.terms)"},
    {"args", store_args, METH_O, "args(t) -> tuple: the fields of t (see fsm.terms)"},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef store_getset[] = {
    {"anything", store_get_anything, NULL, "the term of every byte string", NULL},
    {"rows_computed", store_get_rows, NULL, "derivative rows computed so far", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods store_as_sequence = {.sq_length = store_len};

static PyTypeObject TermStoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "fsm._native.TermStore",
    .tp_basicsize = sizeof(TermStoreObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "Hash-consed byte-level regular terms with derivatives (see fsm.terms).",
    .tp_new = store_new,
    .tp_init = store_init,
    .tp_dealloc = store_dealloc,
    .tp_methods = store_methods,
    .tp_getset = store_getset,
    .tp_as_sequence = &store_as_sequence,
};
