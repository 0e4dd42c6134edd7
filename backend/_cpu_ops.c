/*
 * backend._cpu_ops: the CPU engine's native kernels, one translation unit:
 *   - this file: the decoder layer's element-wise ops (add + RMSNorm, RoPE, SiLU-and-mul)
 *     and decode attention over the token-granular KV pool;
 *   - _cpu_float.h: float32 matrix products for decode steps;
 *   - _cpu_quant.h: int4 / int8 weight-only matrix products (and their dequantization);
 *   - _cpu_decoder.h: a whole decode step of a quantized model in one call.
 *
 * Why native: on one core, a decode step of a small model is bound by per-op overhead more
 * than by arithmetic. In torch, an RMSNorm of a 576-vector is ~6 dispatched ops (~15 us),
 * RoPE 5, and each layer's attention copies the K/V it reads (index_copy_ + index_select).
 * Each function here is one call that reads its inputs once and writes its outputs once.
 *
 * Contract (every function):
 * - tensors arrive as addresses (Tensor.data_ptr()) with a dtype code (DT_F32 or DT_BF16) and
 *   the strides, in elements, that the caller (backend/cpu_ops.py) checked: the last dim is
 *   always contiguous; index tensors are int64;
 * - arithmetic is float32; every stored value is rounded once to its tensor's dtype (round to
 *   nearest even, as torch rounds); values a torch reference rounds in between (the residual
 *   after the add, the normalized row before the weight, silu before the product) are rounded
 *   at the same points;
 * - the GIL is released while the arithmetic runs; indices that address memory (slots,
 *   positions, token ids) are range-checked here, before anything is written, and raise
 *   ValueError; shapes, dtypes and strides are the Python wrappers' to validate.
 *
 * Vectorization: the kernels (not the helpers) are compiled twice with target_clones on
 * x86-64 Linux (AVX2+FMA and the baseline) and the helpers are always inlined into them;
 * reductions and exp run on 8-float GCC/clang vector types, so they vectorize without the
 * compiler having to reassociate float math on its own.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DT_F32 0
#define DT_BF16 1

#if defined(__GNUC__) && !defined(__clang__)
/* v8f values never cross a call boundary (every helper is inlined): no ABI concern. */
#pragma GCC diagnostic ignored "-Wpsabi"
#endif
/* Runtime dispatch to AVX2 / AVX-VNNI code (target_clones, the AVX kernels of _cpu_quant.h)
 * needs GCC 12+ and glibc (ifunc) on x86-64 Linux; elsewhere everything is portable C,
 * vectorized for the compiler's baseline target. */
#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && \
    defined(__linux__) && defined(__GLIBC__)
#define HAVE_X86_DISPATCH 1
#define VECTORIZED __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define VECTORIZED
#endif
/* Helpers are inlined into each clone, so that they are compiled for its target too. */
#if defined(__GNUC__)
#define HELPER static inline __attribute__((always_inline))
#else
#define HELPER static inline
#endif

/* ---- scalar helpers ------------------------------------------------------------------- */

HELPER float bf16_bits_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

HELPER uint16_t f32_to_bf16_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it a (quiet) NaN */
        return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* f rounded to bfloat16 and back, or f itself for float32. */
HELPER float round_to(int dt, float f)
{
    return dt == DT_BF16 ? bf16_bits_to_f32(f32_to_bf16_bits(f)) : f;
}

/* Eight floats as GCC/clang vector extensions: one register in the AVX2 clone, two in the
 * baseline one. Lane-wise arithmetic; comparisons give int32 lanes of -1 (true) or 0. */
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));

HELPER v8f load8(const float *p)
{
    v8f v;
    memcpy(&v, p, sizeof v);
    return v;
}

HELPER void store8(float *p, v8f v) { memcpy(p, &v, sizeof v); }

HELPER v8f splat8(float f)
{
    v8f zero = {0};
    return zero + f; /* a broadcast; a lane-by-lane initializer is not always hoisted */
}

HELPER float hsum8(v8f v)
{
    return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

/* Lanes where mask is true take a, the others b. */
HELPER v8f select8(v8i mask, v8f a, v8f b) { return (v8f)((mask & (v8i)a) | (~mask & (v8i)b)); }

/* exp(x) within ~2 ulp, x clamped to [-87, 88] (Cephes' expf). The rounding of x / ln 2 to
 * an integer n adds 1.5 * 2^23, so that n is also the low bits of that sum. */
HELPER v8f exp8(v8f x)
{
    const v8f magic = splat8(12582912.0f);
    x = select8(x < splat8(-87.0f), splat8(-87.0f), x);
    x = select8(x > splat8(88.0f), splat8(88.0f), x);
    v8f t = x * splat8(1.44269504088896341f) + magic;
    v8f n = t - magic;
    v8f r = x - n * splat8(0.693359375f) + n * splat8(2.12194440e-4f);
    v8f p = splat8(1.9875691500e-4f);
    p = p * r + splat8(1.3981999507e-3f);
    p = p * r + splat8(8.3334519073e-3f);
    p = p * r + splat8(4.1665795894e-2f);
    p = p * r + splat8(1.6666665459e-1f);
    p = p * r + splat8(5.0000001201e-1f);
    p = p * r * r + r + splat8(1.0f);
    v8u scale = ((v8u)t - (v8u)magic + 127u) << 23; /* 2^n, n in [-126, 127] */
    return p * (v8f)scale;
}

HELPER float exp_f32(float x) { return exp8(splat8(x))[0]; }

/* Each lane rounded to bfloat16 (nearest even) and back; NaN lanes stay as they are. */
HELPER v8f round8_bf16(v8f x)
{
    v8u bits = (v8u)x;
    v8u rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) & 0xffff0000u;
    return select8(x != x, x, (v8f)rounded);
}

/* ---- row kernels ---------------------------------------------------------------------- */

HELPER void load_row(float *dst, const void *src, int dt, Py_ssize_t n)
{
    if (dt == DT_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    const uint16_t *s = src;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t u = (uint32_t)s[i] << 16;
        memcpy(&dst[i], &u, sizeof u);
    }
}

HELPER void store_row(void *dst, int dt, const float *src, Py_ssize_t n)
{
    if (dt == DT_F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
        return;
    }
    uint16_t *d = dst;
    for (Py_ssize_t i = 0; i < n; i++)
        d[i] = f32_to_bf16_bits(src[i]);
}

HELPER float dot(const float *a, const float *b, Py_ssize_t n)
{
    v8f acc0 = {0}, acc1 = {0};
    Py_ssize_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 += load8(a + i) * load8(b + i);
        acc1 += load8(a + i + 8) * load8(b + i + 8);
    }
    for (; i + 8 <= n; i += 8)
        acc0 += load8(a + i) * load8(b + i);
    float s = hsum8(acc0 + acc1);
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* x[i] = exp(x[i] - shift); returns the sum. */
HELPER float exp_shifted(float *x, float shift, Py_ssize_t n)
{
    v8f sum = {0};
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f e = exp8(load8(x + i) - splat8(shift));
        store8(x + i, e);
        sum += e;
    }
    float s = hsum8(sum);
    for (; i < n; i++) {
        x[i] = exp_f32(x[i] - shift);
        s += x[i];
    }
    return s;
}

/* x += delta, each sum rounded to dt (torch's in-place add on a dt tensor). */
HELPER void add_rounded(float *x, const float *delta, int dt, Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        x[i] = round_to(dt, x[i] + delta[i]);
}

/* x = round(x * inv, res_dt) * w: the normalized row, rounded, times the weight. */
HELPER void scale_by_weight(float *x, float inv, const float *w, int res_dt,
                                   Py_ssize_t n)
{
    for (Py_ssize_t i = 0; i < n; i++)
        x[i] = round_to(res_dt, x[i] * inv) * w[i];
}

/* gate = round(silu(gate), dt) * up */
HELPER void silu_mul_row(float *gate, const float *up, int dt, Py_ssize_t n)
{
    Py_ssize_t i = 0;
    for (; i + 8 <= n; i += 8) {
        v8f g = load8(gate + i);
        v8f act = g / (splat8(1.0f) + exp8(-g));
        store8(gate + i, (dt == DT_BF16 ? round8_bf16(act) : act) * load8(up + i));
    }
    for (; i < n; i++)
        gate[i] = round_to(dt, gate[i] / (1.0f + exp_f32(-gate[i]))) * up[i];
}

/* out[j] = x[j] cos[j] + x[(j + half) mod dim] sin_signed[j], for one head. */
HELPER void rope_head(float *out, const float *x, const float *c, const float *s,
                             Py_ssize_t half)
{
    for (Py_ssize_t j = 0; j < half; j++) {
        out[j] = x[j] * c[j] + x[j + half] * s[j];
        out[j + half] = x[j + half] * c[j + half] + x[j] * s[j + half];
    }
}

/* ---- argument parsing ----------------------------------------------------------------- */

/* Parse positional args by format: 'p' address (void **), 'n' Py_ssize_t, 'i' int,
 * 'f' float. Returns 0 with an exception set on a bad count or type. */
static int parse_args(PyObject *const *args, Py_ssize_t nargs, const char *name,
                      const char *fmt, ...)
{
    Py_ssize_t want = (Py_ssize_t)strlen(fmt);
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s takes %zd arguments (%zd given)", name, want, nargs);
        return 0;
    }
    va_list ap;
    va_start(ap, fmt);
    for (Py_ssize_t i = 0; i < want; i++) {
        PyObject *a = args[i];
        switch (fmt[i]) {
        case 'p':
            *va_arg(ap, void **) = PyLong_AsVoidPtr(a);
            break;
        case 'n':
            *va_arg(ap, Py_ssize_t *) = PyLong_AsSsize_t(a);
            break;
        case 'i':
            *va_arg(ap, int *) = (int)PyLong_AsLong(a);
            break;
        case 'f':
            *va_arg(ap, float *) = (float)PyFloat_AsDouble(a);
            break;
        }
        if (PyErr_Occurred()) {
            va_end(ap);
            return 0;
        }
    }
    va_end(ap);
    return 1;
}

/* Whether all n indices lie in [0, bound). */
static int in_range(const int64_t *index, Py_ssize_t n, Py_ssize_t bound)
{
    for (Py_ssize_t i = 0; i < n; i++)
        if (index[i] < 0 || index[i] >= bound)
            return 0;
    return 1;
}

HELPER size_t dt_size(int dt) { return dt == DT_BF16 ? 2 : 4; }

#define AT(ptr, dt, offset) ((void *)((char *)(ptr) + (size_t)(offset) * dt_size(dt)))

/* ---- kernels (one per entry point; the scratch buffers come from the caller) ---------- */

VECTORIZED static void norm_rows(void *res, int res_dt, Py_ssize_t res_stride, const void *delta,
                                 int delta_dt, Py_ssize_t delta_stride, const void *weight,
                                 int w_dt, void *out, int out_dt, Py_ssize_t out_stride,
                                 Py_ssize_t rows, Py_ssize_t dim, float eps, float *buf)
{
    float *x = buf, *d = buf + dim, *w = buf + 2 * dim;
    load_row(w, weight, w_dt, dim);
    for (Py_ssize_t r = 0; r < rows; r++) {
        void *res_row = AT(res, res_dt, r * res_stride);
        load_row(x, res_row, res_dt, dim);
        if (delta) {
            load_row(d, AT(delta, delta_dt, r * delta_stride), delta_dt, dim);
            add_rounded(x, d, res_dt, dim);
            store_row(res_row, res_dt, x, dim);
        }
        float inv = 1.0f / sqrtf(dot(x, x, dim) / (float)dim + eps);
        scale_by_weight(x, inv, w, res_dt, dim);
        store_row(AT(out, out_dt, r * out_stride), out_dt, x, dim);
    }
}

VECTORIZED static void silu_rows(const void *x, int x_dt, Py_ssize_t x_stride, void *out,
                                 int out_dt, Py_ssize_t out_stride, Py_ssize_t rows,
                                 Py_ssize_t inter, float *buf)
{
    for (Py_ssize_t r = 0; r < rows; r++) {
        load_row(buf, AT(x, x_dt, r * x_stride), x_dt, inter);
        load_row(buf + inter, AT(x, x_dt, r * x_stride + inter), x_dt, inter);
        silu_mul_row(buf, buf + inter, x_dt, inter);
        store_row(AT(out, out_dt, r * out_stride), out_dt, buf, inter);
    }
}

VECTORIZED static void rope_rows(const void *x, int x_dt, Py_ssize_t stride_t,
                                 Py_ssize_t stride_h, Py_ssize_t tokens, Py_ssize_t heads,
                                 Py_ssize_t dim, const int64_t *positions, const float *cos_table,
                                 const float *sin_table, Py_ssize_t table_stride, void *out,
                                 int out_dt, float *buf)
{
    for (Py_ssize_t t = 0; t < tokens; t++) {
        const float *c = cos_table + positions[t] * table_stride;
        const float *s = sin_table + positions[t] * table_stride;
        for (Py_ssize_t h = 0; h < heads; h++) {
            load_row(buf, AT(x, x_dt, t * stride_t + h * stride_h), x_dt, dim);
            rope_head(buf + dim, buf, c, s, dim / 2);
            store_row(AT(out, out_dt, (t * heads + h) * dim), out_dt, buf + dim, dim);
        }
    }
}

/* Eight values of a float32 or bfloat16 row, as float32. */
HELPER v8f load8_dt(const void *p, int dt)
{
    if (dt == DT_F32)
        return load8(p);
    uint16_t h[8];
    memcpy(h, p, sizeof h);
    v8u u = {h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]};
    return (v8f)(u << 16);
}

HELPER float load1_dt(const void *p, int dt)
{
    if (dt == DT_F32)
        return *(const float *)p;
    return bf16_bits_to_f32(*(const uint16_t *)p);
}

/* Attention of the query heads [g * rep, (g + 1) * rep) of one request over its len slots of
 * KV head g (head_offset = g * dim within a slot). q: rep rows of dim (float32); scores:
 * rep * len scratch; kv_row: dim scratch; acc: the rep output rows (float32). */
HELPER void attend_kv_head(const float *q, const int64_t *slots, Py_ssize_t len,
                           const void *k_buf, const void *v_buf, int kv_dt,
                           Py_ssize_t slot_stride, Py_ssize_t head_offset, Py_ssize_t rep,
                           Py_ssize_t dim, float scale, float *scores, float *kv_row,
                           float *acc)
{
    for (Py_ssize_t l = 0; l < len; l++) {
        const void *k = AT(k_buf, kv_dt, slots[l] * slot_stride + head_offset);
        const float *kf = k;
        if (kv_dt != DT_F32) {
            load_row(kv_row, k, kv_dt, dim);
            kf = kv_row;
        }
        for (Py_ssize_t r = 0; r < rep; r++)
            scores[r * len + l] = dot(q + r * dim, kf, dim) * scale;
    }
    for (Py_ssize_t r = 0; r < rep; r++) {
        float *s = scores + r * len;
        float max = s[0];
        for (Py_ssize_t l = 1; l < len; l++)
            max = s[l] > max ? s[l] : max;
        float inv = 1.0f / exp_shifted(s, max, len);
        for (Py_ssize_t l = 0; l < len; l++)
            s[l] *= inv;
    }
    /* out = sum_l p[l] V[l], 16 columns at a time with the sums in registers */
    for (Py_ssize_t r = 0; r < rep; r++) {
        const float *p = scores + r * len;
        float *out = acc + r * dim;
        Py_ssize_t c = 0;
        for (; c + 16 <= dim; c += 16) {
            v8f a0 = {0}, a1 = {0};
            for (Py_ssize_t l = 0; l < len; l++) {
                Py_ssize_t at = slots[l] * slot_stride + head_offset + c;
                v8f pl = splat8(p[l]);
                a0 += pl * load8_dt(AT(v_buf, kv_dt, at), kv_dt);
                a1 += pl * load8_dt(AT(v_buf, kv_dt, at + 8), kv_dt);
            }
            store8(out + c, a0);
            store8(out + c + 8, a1);
        }
        for (; c < dim; c++) {
            float a = 0.0f;
            for (Py_ssize_t l = 0; l < len; l++)
                a += p[l] * load1_dt(AT(v_buf, kv_dt, slots[l] * slot_stride + head_offset + c),
                                     kv_dt);
            out[c] = a;
        }
    }
}

VECTORIZED static void attention_rows(const void *q, int q_dt, Py_ssize_t q_stride,
                                      const void *k, const void *v, int new_dt,
                                      Py_ssize_t k_stride, Py_ssize_t v_stride, void *k_buf,
                                      void *v_buf, int kv_dt, const int64_t *out_cache_loc,
                                      const int64_t *slots, Py_ssize_t slots_stride,
                                      const int64_t *lens, Py_ssize_t batch, Py_ssize_t heads,
                                      Py_ssize_t kv_heads, Py_ssize_t dim, float scale,
                                      void *out, int out_dt, Py_ssize_t max_len, float *buf)
{
    Py_ssize_t rep = heads / kv_heads, slot_stride = kv_heads * dim;
    float *q_rows = buf, *scores = q_rows + heads * dim, *kv_row = scores + rep * max_len;
    float *acc = kv_row + dim, *new_row = acc + rep * dim;
    for (Py_ssize_t b = 0; b < batch; b++) {
        Py_ssize_t slot = out_cache_loc[b] * slot_stride;
        load_row(new_row, AT(k, new_dt, b * k_stride), new_dt, slot_stride);
        store_row(AT(k_buf, kv_dt, slot), kv_dt, new_row, slot_stride);
        load_row(new_row, AT(v, new_dt, b * v_stride), new_dt, slot_stride);
        store_row(AT(v_buf, kv_dt, slot), kv_dt, new_row, slot_stride);
    }
    for (Py_ssize_t b = 0; b < batch; b++) {
        load_row(q_rows, AT(q, q_dt, b * q_stride), q_dt, heads * dim);
        for (Py_ssize_t g = 0; g < kv_heads; g++) {
            attend_kv_head(q_rows + g * rep * dim, slots + b * slots_stride, lens[b], k_buf,
                           v_buf, kv_dt, slot_stride, g * dim, rep, dim, scale, scores, kv_row,
                           acc);
            store_row(AT(out, out_dt, (b * heads + g * rep) * dim), out_dt, acc, rep * dim);
        }
    }
}

/* ---- entry points --------------------------------------------------------------------- */

PyDoc_STRVAR(add_rms_norm_doc,
"add_rms_norm(residual, res_dt, res_stride, delta, delta_dt, delta_stride, weight, w_dt,\n"
"             out, out_dt, out_stride, rows, dim, eps)\n"
"For each row: residual += delta (skipped when delta is 0), rounded to res_dt and stored\n"
"back; out = weight * round(residual / rms(residual), res_dt), rms over dim, plus eps.");

static PyObject *add_rms_norm(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *res, *delta, *weight, *out;
    int res_dt, delta_dt, w_dt, out_dt;
    Py_ssize_t res_stride, delta_stride, out_stride, rows, dim;
    float eps;
    if (!parse_args(args, nargs, "add_rms_norm", "pinpinpipinnnf", &res, &res_dt, &res_stride,
                    &delta, &delta_dt, &delta_stride, &weight, &w_dt, &out, &out_dt,
                    &out_stride, &rows, &dim, &eps))
        return NULL;
    float *buf = malloc(3 * (size_t)dim * sizeof(float));
    if (!buf)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    norm_rows(res, res_dt, res_stride, delta, delta_dt, delta_stride, weight, w_dt, out, out_dt,
              out_stride, rows, dim, eps, buf);
    Py_END_ALLOW_THREADS
    free(buf);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(silu_and_mul_doc,
"silu_and_mul(x, x_dt, x_stride, out, out_dt, out_stride, rows, inter)\n"
"out[r] = round(silu(gate), x_dt) * up for x[r] = cat(gate, up), each of inter values.");

static PyObject *silu_and_mul(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *x, *out;
    int x_dt, out_dt;
    Py_ssize_t x_stride, out_stride, rows, inter;
    if (!parse_args(args, nargs, "silu_and_mul", "pinpinnn", &x, &x_dt, &x_stride, &out,
                    &out_dt, &out_stride, &rows, &inter))
        return NULL;
    float *buf = malloc(2 * (size_t)inter * sizeof(float));
    if (!buf)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    silu_rows(x, x_dt, x_stride, out, out_dt, out_stride, rows, inter, buf);
    Py_END_ALLOW_THREADS
    free(buf);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(rope_doc,
"rope(x, x_dt, stride_t, stride_h, tokens, heads, dim, positions, cos, sin_signed,\n"
"     table_stride, table_rows, out, out_dt)\n"
"Rotate-half RoPE of x [tokens, heads, dim] into out, contiguous [tokens, heads, dim]:\n"
"out = x * cos[p] + roll(x, dim / 2) * sin_signed[p] at p = positions[t] (float32 tables).\n"
"Raises ValueError (before writing anything) when a position is outside [0, table_rows).");

static PyObject *rope(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *x, *out;
    const int64_t *positions;
    const float *cos_table, *sin_table;
    int x_dt, out_dt;
    Py_ssize_t stride_t, stride_h, tokens, heads, dim, table_stride, table_rows;
    if (!parse_args(args, nargs, "rope", "pinnnnnpppnnpi", &x, &x_dt, &stride_t, &stride_h,
                    &tokens, &heads, &dim, (void **)&positions, (void **)&cos_table,
                    (void **)&sin_table, &table_stride, &table_rows, &out, &out_dt))
        return NULL;
    if (!in_range(positions, tokens, table_rows))
        return PyErr_Format(PyExc_ValueError, "a position outside the RoPE tables' %zd rows",
                            table_rows);
    float *buf = malloc(2 * (size_t)dim * sizeof(float));
    if (!buf)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    rope_rows(x, x_dt, stride_t, stride_h, tokens, heads, dim, positions, cos_table, sin_table,
              table_stride, out, out_dt, buf);
    Py_END_ALLOW_THREADS
    free(buf);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(decode_attention_doc,
"decode_attention(q, q_dt, q_stride, k, v, new_dt, k_stride, v_stride, k_buf, v_buf, kv_dt,\n"
"                 num_slots, out_cache_loc, slots, slots_stride, lens, batch, heads,\n"
"                 kv_heads, dim, scale, out, out_dt)\n"
"One query token per request b: first stores its new key and value (rows of kv_heads * dim\n"
"at k + b * k_stride, v + b * v_stride) at pool slot out_cache_loc[b] of k_buf / v_buf\n"
"([slots, kv_heads, dim]), then attends with q[b] ([heads, dim] at q + b * q_stride) over\n"
"the pool slots slots[b * slots_stride : + lens[b]] (which include out_cache_loc[b]);\n"
"query head h reads KV head h / (heads / kv_heads). out: contiguous [batch, heads, dim].\n"
"Raises ValueError (before writing anything) when a length is outside [1, slots_stride] or\n"
"a slot outside [0, num_slots).");

static PyObject *decode_attention(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *q, *k, *v, *k_buf, *v_buf, *out;
    const int64_t *out_cache_loc, *slots, *lens;
    int q_dt, new_dt, kv_dt, out_dt;
    Py_ssize_t q_stride, k_stride, v_stride, num_slots, slots_stride, batch, heads, kv_heads;
    Py_ssize_t dim;
    float scale;
    if (!parse_args(args, nargs, "decode_attention", "pinppinnppinppnpnnnnfpi", &q, &q_dt,
                    &q_stride, &k, &v, &new_dt, &k_stride, &v_stride, &k_buf, &v_buf, &kv_dt,
                    &num_slots,
                    (void **)&out_cache_loc, (void **)&slots, &slots_stride, (void **)&lens,
                    &batch, &heads, &kv_heads, &dim, &scale, &out, &out_dt))
        return NULL;
    Py_ssize_t rep = heads / kv_heads, slot_stride = kv_heads * dim, max_len = 1;
    for (Py_ssize_t b = 0; b < batch; b++) {
        if (lens[b] < 1 || lens[b] > slots_stride)
            return PyErr_Format(PyExc_ValueError, "request %zd: length %lld outside [1, %zd]",
                                b, (long long)lens[b], slots_stride);
        if (!in_range(out_cache_loc + b, 1, num_slots) ||
            !in_range(slots + b * slots_stride, lens[b], num_slots))
            return PyErr_Format(PyExc_ValueError, "request %zd: a slot outside the pool's %zd",
                                b, num_slots);
        max_len = lens[b] > max_len ? lens[b] : max_len;
    }
    size_t floats = (size_t)(heads * dim + rep * max_len + dim + rep * dim + slot_stride);
    float *buf = malloc(floats * sizeof(float));
    if (!buf)
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    attention_rows(q, q_dt, q_stride, k, v, new_dt, k_stride, v_stride, k_buf, v_buf, kv_dt,
                   out_cache_loc, slots, slots_stride, lens, batch, heads, kv_heads, dim, scale,
                   out, out_dt, max_len, buf);
    Py_END_ALLOW_THREADS
    free(buf);
    Py_RETURN_NONE;
}

#include "_cpu_quant.h"
#include "_cpu_float.h"
#include "_cpu_decoder.h"

static PyMethodDef methods[] = {
    {"add_rms_norm", (PyCFunction)(void (*)(void))add_rms_norm, METH_FASTCALL, add_rms_norm_doc},
    {"silu_and_mul", (PyCFunction)(void (*)(void))silu_and_mul, METH_FASTCALL, silu_and_mul_doc},
    {"rope", (PyCFunction)(void (*)(void))rope, METH_FASTCALL, rope_doc},
    {"decode_attention", (PyCFunction)(void (*)(void))decode_attention, METH_FASTCALL,
     decode_attention_doc},
    {"fmatmul", (PyCFunction)(void (*)(void))fmatmul, METH_FASTCALL, fmatmul_doc},
    {"qmatmul", (PyCFunction)(void (*)(void))qmatmul, METH_FASTCALL, qmatmul_doc},
    {"qgemm", (PyCFunction)(void (*)(void))qgemm, METH_FASTCALL, qgemm_doc},
    {"dequantize", (PyCFunction)(void (*)(void))dequantize, METH_FASTCALL, dequantize_doc},
    {"quant_kernels", (PyCFunction)(void (*)(void))quant_kernels, METH_FASTCALL,
     quant_kernels_doc},
    {"decoder_new", (PyCFunction)(void (*)(void))decoder_new, METH_FASTCALL, decoder_new_doc},
    {"decode_step", (PyCFunction)(void (*)(void))decode_step, METH_FASTCALL, decode_step_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "backend._cpu_ops",
    "Fused decoder-layer ops and decode attention for the CPU engine (see the C source).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__cpu_ops(void) { return PyModule_Create(&module); }
