/*
 * One decode step of a quantized or float32 Llama-family model in one call (part of
 * backend._cpu_ops, included by _cpu_ops.c after _cpu_quant.h and _cpu_float.h).
 *
 * Why: with the layer ops native and the matrices packed, what remains of a small model's
 * decode step in Python is ~10 calls per layer (wrappers, allocations, dispatch), about a
 * third of the step. Here the whole step runs the same kernels in the same order as the
 * per-op path (backend/models/llama.py with backend/cpu_ops.py), so it computes the same
 * float32 values, without returning to Python between them.
 *
 * A Decoder describes a model (backend/native_decoder.py builds it and keeps the tensors it
 * points into alive): float32 embeddings, norms and RoPE tables; per layer the qkv, o,
 * gate_up and down matrices, packed (q4 / q8) or float32 (kind QF32, scales unused), with
 * optional float32 biases, and the layer's KV pool buffers. Per step: one new token per
 * request; the residual stream and every activation are float32.
 */

#define QF32 32 /* a plain float32 [n, k] matrix (backend/_cpu_float.h) */

typedef struct {
    QMatrix qkv, o, gate_up, down;
    const float *input_norm, *post_norm;
    void *k_buf, *v_buf;
} DecoderLayer;

typedef struct {
    Py_ssize_t num_layers, hidden, heads, kv_heads, head_dim, inter, vocab, num_slots;
    Py_ssize_t table_rows, table_stride;
    float eps;
    int kv_dt;
    const float *embed, *final_norm, *cos_table, *sin_table;
    QMatrix lm_head;
    DecoderLayer *layers;
} Decoder;

static PyObject *const *tuple_items(PyObject *t) { return ((PyTupleObject *)t)->ob_item; }

static void decoder_free(PyObject *capsule)
{
    Decoder *d = PyCapsule_GetPointer(capsule, "backend._cpu_ops.Decoder");
    if (d) {
        free(d->layers);
        free(d);
    }
}

/* Parse (kind, weights, scales, n, k, bias) into m; 0 with an exception on a bad tuple. */
static int parse_qmatrix(PyObject *t, QMatrix *m, Py_ssize_t n, Py_ssize_t k, const char *name)
{
    if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 6) {
        PyErr_Format(PyExc_TypeError, "%s: a (kind, weights, scales, n, k, bias) tuple", name);
        return 0;
    }
    if (!parse_args(tuple_items(t), 6, name, "ippnnp", &m->kind, (void **)&m->weights,
                    (void **)&m->scales, &m->n, &m->k, (void **)&m->bias))
        return 0;
    if ((m->kind != Q4 && m->kind != Q8 && m->kind != QF32) || m->n != n || m->k != k ||
        (m->kind != QF32 && m->k % (m->kind == Q4 ? 2 * QBLOCK : QBLOCK))) {
        PyErr_Format(PyExc_ValueError, "%s: a q%d matrix of %zd x %zd where %zd x %zd is needed",
                     name, m->kind, m->n, m->k, n, k);
        return 0;
    }
    return 1;
}

PyDoc_STRVAR(decoder_new_doc,
"decoder_new(dims, tensors, lm_head, layers) -> capsule\n"
"dims: (num_layers, hidden, heads, kv_heads, head_dim, inter, vocab, num_slots, table_rows,\n"
"table_stride, eps, kv_dt); tensors: addresses of (embed, final_norm, cos, sin); lm_head: a\n"
"(kind, weights, scales, n, k, bias) tuple; layers: one (qkv, o, gate_up, down, input_norm,\n"
"post_norm, k_buf, v_buf) tuple per layer, matrices as lm_head. The tensors must outlive\n"
"the capsule. Raises ValueError or TypeError on inconsistent shapes.");

static PyObject *decoder_new(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4 || !PyTuple_Check(args[0]) || !PyTuple_Check(args[1]) ||
        !PyTuple_Check(args[3]) || PyTuple_GET_SIZE(args[0]) != 12 ||
        PyTuple_GET_SIZE(args[1]) != 4)
        return PyErr_Format(PyExc_TypeError, "decoder_new(dims, tensors, lm_head, layers)");
    Decoder *d = calloc(1, sizeof *d);
    if (!d)
        return PyErr_NoMemory();
    PyObject *capsule = PyCapsule_New(d, "backend._cpu_ops.Decoder", decoder_free);
    if (!capsule) {
        free(d);
        return NULL;
    }
    if (!parse_args(tuple_items(args[0]), 12, "dims", "nnnnnnnnnnfi", &d->num_layers,
                    &d->hidden, &d->heads, &d->kv_heads, &d->head_dim, &d->inter, &d->vocab,
                    &d->num_slots, &d->table_rows, &d->table_stride, &d->eps, &d->kv_dt) ||
        !parse_args(tuple_items(args[1]), 4, "tensors", "pppp", (void **)&d->embed,
                    (void **)&d->final_norm, (void **)&d->cos_table, (void **)&d->sin_table))
        goto fail;
    if (d->num_layers < 1 || d->kv_heads < 1 || d->heads % d->kv_heads || d->head_dim % 2 ||
        PyTuple_GET_SIZE(args[3]) != d->num_layers) {
        PyErr_SetString(PyExc_ValueError, "inconsistent decoder dims");
        goto fail;
    }
    if (!parse_qmatrix(args[2], &d->lm_head, d->vocab, d->hidden, "lm_head"))
        goto fail;
    d->layers = calloc((size_t)d->num_layers, sizeof *d->layers);
    if (!d->layers) {
        PyErr_NoMemory();
        goto fail;
    }
    Py_ssize_t q_size = d->heads * d->head_dim, kv_size = d->kv_heads * d->head_dim;
    for (Py_ssize_t l = 0; l < d->num_layers; l++) {
        PyObject *t = PyTuple_GET_ITEM(args[3], l);
        DecoderLayer *layer = &d->layers[l];
        if (!PyTuple_Check(t) || PyTuple_GET_SIZE(t) != 8) {
            PyErr_SetString(PyExc_TypeError, "a layer is an 8-tuple");
            goto fail;
        }
        if (!parse_qmatrix(PyTuple_GET_ITEM(t, 0), &layer->qkv, q_size + 2 * kv_size, d->hidden,
                           "qkv") ||
            !parse_qmatrix(PyTuple_GET_ITEM(t, 1), &layer->o, d->hidden, q_size, "o") ||
            !parse_qmatrix(PyTuple_GET_ITEM(t, 2), &layer->gate_up, 2 * d->inter, d->hidden,
                           "gate_up") ||
            !parse_qmatrix(PyTuple_GET_ITEM(t, 3), &layer->down, d->hidden, d->inter, "down") ||
            !parse_args(tuple_items(t) + 4, 4, "layer tensors", "pppp",
                        (void **)&layer->input_norm, (void **)&layer->post_norm, &layer->k_buf,
                        &layer->v_buf))
            goto fail;
    }
    return capsule;
fail:
    Py_DECREF(capsule);
    return NULL;
}

/* Float32 scratch of one step for `batch` requests attending over at most max_len slots. */
typedef struct {
    float *hidden, *x, *qkv, *rotated, *attn, *delta, *gate_up, *act, *attn_scratch, *op_scratch;
    Activations quant;
    void *block;
} StepBuffers;

static int step_buffers_alloc(StepBuffers *b, const Decoder *d, Py_ssize_t batch,
                              Py_ssize_t max_len)
{
    Py_ssize_t h = d->hidden, dim = d->head_dim, rep = d->heads / d->kv_heads;
    Py_ssize_t qkv_width = (d->heads + 2 * d->kv_heads) * dim;
    Py_ssize_t widest = h > d->inter ? h : d->inter;
    widest = widest > d->heads * dim ? widest : d->heads * dim;
    Py_ssize_t sizes[] = {
        batch * h,                                   /* hidden */
        batch * h,                                   /* x */
        batch * qkv_width,                           /* qkv */
        batch * (d->heads + d->kv_heads) * dim,      /* rotated */
        batch * d->heads * dim,                      /* attn */
        batch * h,                                   /* delta */
        batch * 2 * d->inter,                        /* gate_up */
        batch * d->inter,                            /* act */
        d->heads * dim + rep * max_len + dim + rep * dim + d->kv_heads * dim, /* attention */
        3 * widest,                                  /* norm / silu / rope rows */
    };
    float **slots[] = {&b->hidden, &b->x, &b->qkv, &b->rotated, &b->attn, &b->delta,
                       &b->gate_up, &b->act, &b->attn_scratch, &b->op_scratch};
    size_t total = 0;
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++)
        total += (size_t)sizes[i];
    b->block = malloc(total * sizeof(float));
    if (!b->block)
        return 0;
    float *at = b->block;
    for (size_t i = 0; i < sizeof sizes / sizeof *sizes; i++) {
        *slots[i] = at;
        at += sizes[i];
    }
    if (!activations_alloc(&b->quant, batch, widest)) {
        free(b->block);
        return 0;
    }
    return 1;
}

/* out rows (out_stride apart) = m x rows (float32, m->k apart) for `batch` rows. */
static void decoder_matrix(const QMatrix *m, const float *x, Py_ssize_t batch, float *out,
                           Py_ssize_t out_stride, Activations *quant)
{
    if (m->kind == QF32)
        fmatrix_kernel()(m->weights, m->n, m->k, m->bias, x, batch, out, DT_F32, out_stride);
    else
        qmatrix_apply(m, x, DT_F32, m->k, batch, out, DT_F32, out_stride, quant);
}

/* The step itself (GIL released): see decode_step's docstring. */
static void decoder_run(const Decoder *d, const int64_t *ids, const int64_t *positions,
                        const int64_t *out_cache_loc, const int64_t *slots,
                        Py_ssize_t slots_stride, const int64_t *lens, Py_ssize_t batch,
                        Py_ssize_t max_len, float *logits, StepBuffers *b)
{
    Py_ssize_t h = d->hidden, dim = d->head_dim, heads = d->heads, kv_heads = d->kv_heads;
    Py_ssize_t qk_width = (heads + kv_heads) * dim, qkv_width = qk_width + kv_heads * dim;
    float scale = 1.0f / sqrtf((float)dim);
    for (Py_ssize_t r = 0; r < batch; r++)
        memcpy(b->hidden + r * h, d->embed + ids[r] * h, (size_t)h * sizeof(float));
    norm_rows(b->hidden, DT_F32, h, NULL, DT_F32, 0, d->layers[0].input_norm, DT_F32, b->x,
              DT_F32, h, batch, h, d->eps, b->op_scratch);
    for (Py_ssize_t l = 0; l < d->num_layers; l++) {
        const DecoderLayer *layer = &d->layers[l];
        const float *next_norm = l + 1 < d->num_layers ? d->layers[l + 1].input_norm
                                                       : d->final_norm;
        decoder_matrix(&layer->qkv, b->x, batch, b->qkv, qkv_width, &b->quant);
        rope_rows(b->qkv, DT_F32, qkv_width, dim, batch, heads + kv_heads, dim, positions,
                  d->cos_table, d->sin_table, d->table_stride, b->rotated, DT_F32,
                  b->op_scratch);
        attention_rows(b->rotated, DT_F32, qk_width, b->rotated + heads * dim,
                       b->qkv + qk_width, DT_F32, qk_width, qkv_width, layer->k_buf,
                       layer->v_buf, d->kv_dt, out_cache_loc, slots, slots_stride, lens, batch,
                       heads, kv_heads, dim, scale, b->attn, DT_F32, max_len, b->attn_scratch);
        decoder_matrix(&layer->o, b->attn, batch, b->delta, h, &b->quant);
        norm_rows(b->hidden, DT_F32, h, b->delta, DT_F32, h, layer->post_norm, DT_F32, b->x,
                  DT_F32, h, batch, h, d->eps, b->op_scratch);
        decoder_matrix(&layer->gate_up, b->x, batch, b->gate_up, 2 * d->inter, &b->quant);
        silu_rows(b->gate_up, DT_F32, 2 * d->inter, b->act, DT_F32, d->inter, batch, d->inter,
                  b->op_scratch);
        decoder_matrix(&layer->down, b->act, batch, b->delta, h, &b->quant);
        norm_rows(b->hidden, DT_F32, h, b->delta, DT_F32, h, next_norm, DT_F32, b->x, DT_F32, h,
                  batch, h, d->eps, b->op_scratch);
    }
    decoder_matrix(&d->lm_head, b->x, batch, logits, d->vocab, &b->quant);
}

PyDoc_STRVAR(decode_step_doc,
"decode_step(decoder, ids, positions, out_cache_loc, slots, slots_stride, lens, batch,\n"
"            logits)\n"
"One decode step: request b feeds token ids[b] at position positions[b], stores its K/V at\n"
"pool slot out_cache_loc[b] and attends over slots[b * slots_stride :][: lens[b]] (which\n"
"include that slot); logits: float32 [batch, vocab] out. int64 index arrays. Raises\n"
"ValueError (before anything is written) on an id, position, length or slot out of range.");

static PyObject *decode_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs < 1 || !PyCapsule_IsValid(args[0], "backend._cpu_ops.Decoder"))
        return PyErr_Format(PyExc_TypeError, "decode_step needs a decoder capsule first");
    const Decoder *d = PyCapsule_GetPointer(args[0], "backend._cpu_ops.Decoder");
    const int64_t *ids, *positions, *out_cache_loc, *slots, *lens;
    Py_ssize_t slots_stride, batch;
    float *logits;
    if (!parse_args(args + 1, nargs - 1, "decode_step", "ppppnpnp", (void **)&ids,
                    (void **)&positions, (void **)&out_cache_loc, (void **)&slots, &slots_stride,
                    (void **)&lens, &batch, (void **)&logits))
        return NULL;
    Py_ssize_t max_len = 1;
    if (!in_range(ids, batch, d->vocab) || !in_range(positions, batch, d->table_rows) ||
        !in_range(out_cache_loc, batch, d->num_slots))
        return PyErr_Format(PyExc_ValueError, "a token id, position or slot out of range");
    for (Py_ssize_t r = 0; r < batch; r++) {
        if (lens[r] < 1 || lens[r] > slots_stride ||
            !in_range(slots + r * slots_stride, lens[r], d->num_slots))
            return PyErr_Format(PyExc_ValueError, "request %zd: bad length or slot", r);
        max_len = lens[r] > max_len ? lens[r] : max_len;
    }
    StepBuffers buffers;
    if (!step_buffers_alloc(&buffers, d, batch, max_len))
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    decoder_run(d, ids, positions, out_cache_loc, slots, slots_stride, lens, batch, max_len,
                logits, &buffers);
    Py_END_ALLOW_THREADS
    free(buffers.quant.block);
    free(buffers.block);
    Py_RETURN_NONE;
}
