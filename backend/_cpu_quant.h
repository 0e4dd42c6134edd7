/*
 * Weight-only quantized matrix products of the CPU engine (part of backend._cpu_ops, included
 * by _cpu_ops.c after its helpers).
 *
 * Weight formats (backend/quantization.py packs them):
 * - q4 (llama.cpp's Q4_1 arithmetic): per output row n, K / 32 blocks of 32 weights, K a
 *   multiple of 64. codes: uint8 [N, K / 2]; blocks 2p and 2p + 1 of row n share the 32 bytes
 *   at codes[n][32 p]: byte i holds element i of block 2p in its low nibble and element i of
 *   block 2p + 1 in its high nibble (so one AND and one shift unpack two blocks). dm: bfloat16
 *   [N, K / 32, 2], each block's (d, m); a weight is q d + m for its 4-bit code q.
 * - q8: values int8 [N, K] and one bfloat16 scale per row; a weight is v * scale.
 *
 * Activations: every row of x is quantized per block of 32 to int8 (as llama.cpp's Q8
 * activations): dx = max|x| / 127, x8 = round(x / dx), and the block's float sum sx is kept
 * (stored interleaved, dxsx[2 j] = dx_j and dxsx[2 j + 1] = sx_j).
 *   q4: y[n] = sum_j ( d_j dx_j sum_i q_i x8_i + m_j sx_j )
 *   q8: y[n] = scale_n sum_j dx_j sum_i v_i x8_i
 * The integer dot products are exact, so a result differs from the product with the
 * dequantized matrix only through the activations' rounding to int8 (relative error about
 * 1 / 254 per element) and float summation order.
 *
 * Kernels: q4 with AVX-512 VNNI or AVX-VNNI (dpbusd) or AVX2 (maddubs), q8 with AVX2, where
 * the CPU has them (and the build has runtime dispatch: HAVE_X86_DISPATCH in _cpu_ops.c),
 * else portable C; single-threaded; the weight bytes of one output row are read once per call
 * and reused for every activation row. Per pair of q4 blocks the AVX path is one load, an
 * AND, a shift and an AND for the weights, then per block a load, the integer dot, a
 * conversion and one FMA with the block's d dx (taken from a vector of four blocks' (d dx,
 * m sx) products). With AVX-512 VNNI, qmatrix_gemm (prefill: many activation rows) computes
 * the same from register tiles of 4 rows x 32 columns instead (see its section).
 */
#ifdef HAVE_X86_DISPATCH
#include <immintrin.h>
#define HAVE_AVX2_KERNELS 1
#define AVX2_TARGET __attribute__((target("avx2,fma")))
#endif

#define QBLOCK 32
#ifndef PREFETCH_ROWS
#define PREFETCH_ROWS 16
#endif

/* Quantize `rows` rows of x (k values each, k % QBLOCK == 0) to x8 [rows][k] and dxsx
 * [rows][k / QBLOCK][2]. row_buf: k floats of scratch. */
VECTORIZED static void quantize_activations(const void *x, int x_dt, Py_ssize_t x_stride,
                                            Py_ssize_t rows, Py_ssize_t k, int8_t *x8,
                                            float *dxsx, float *row_buf)
{
    Py_ssize_t nb = k / QBLOCK;
    for (Py_ssize_t r = 0; r < rows; r++) {
        load_row(row_buf, AT(x, x_dt, r * x_stride), x_dt, k);
        for (Py_ssize_t j = 0; j < nb; j++) {
            const float *v = row_buf + j * QBLOCK;
            float amax = 0.0f, sum = 0.0f;
            for (int i = 0; i < QBLOCK; i++) {
                float a = v[i] < 0 ? -v[i] : v[i];
                amax = a > amax ? a : amax;
                sum += v[i];
            }
            /* a NaN in the group makes its products NaN, as a float product would be */
            float d = sum != sum ? NAN : amax / 127.0f;
            float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            int8_t *q = x8 + r * k + j * QBLOCK;
            for (int i = 0; i < QBLOCK; i++)
                q[i] = (int8_t)lrintf(v[i] * inv);
            dxsx[2 * (r * nb + j)] = d;
            dxsx[2 * (r * nb + j) + 1] = sum;
        }
    }
}

/* ---- q4 ------------------------------------------------------------------------------- */

static float q4_dot_portable(const uint8_t *codes, const uint16_t *dm, const int8_t *x8,
                             const float *dxsx, Py_ssize_t nb)
{
    float total = 0.0f;
    for (Py_ssize_t j = 0; j < nb; j++) {
        const uint8_t *c = codes + 16 * (j & ~(Py_ssize_t)1);
        int shift = (j & 1) ? 4 : 0;
        const int8_t *x = x8 + QBLOCK * j;
        int32_t dot = 0;
        for (int i = 0; i < QBLOCK; i++)
            dot += ((c[i] >> shift) & 15) * x[i];
        float d = bf16_bits_to_f32(dm[2 * j]), m = bf16_bits_to_f32(dm[2 * j + 1]);
        total += d * dxsx[2 * j] * (float)dot + m * dxsx[2 * j + 1];
    }
    return total;
}

#ifdef HAVE_AVX2_KERNELS
AVX2_TARGET static inline float hsum_avx(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Four blocks' (d, m) from bfloat16 as floats [d0 m0 d1 m1 d2 m2 d3 m3]. */
AVX2_TARGET static inline __m256 dm4_avx2(const uint16_t *dm)
{
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)dm));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* Two blocks' (d, m) as floats [d0 m0 d1 m1 0 0 0 0]. */
AVX2_TARGET static inline __m256 dm2_avx2(const uint16_t *dm)
{
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)dm));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* The 8 int32 sums of four adjacent products of 32 unsigned codes w with 32 int8 x. */
#define DOT_MADDUBS(w, x) _mm256_madd_epi16(_mm256_maddubs_epi16((w), (x)), _mm256_set1_epi16(1))
#define DOT_VNNI(w, x) _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), (w), (x))

/* y[0..3]: the q4 dot products of four weight rows (codes + r * k / 2, dm + r * 2 nb) with
 * one activation row; DOT is one of the above. The activation loads are shared by the four
 * rows. Per step of four blocks (two at the end of a row when nb % 4 == 2), prod[r] holds
 * row r's (d dx, m sx) products: its m sx lanes are summed in pairs[r] and each block's d dx
 * is broadcast from it to scale that block's integer dot. */
#define Q4_ROWS4_BODY(DOT)                                                                   \
    const __m256i low4 = _mm256_set1_epi8(0x0f);                                             \
    __m256 acc[4], pairs[4], prod[4];                                                        \
    for (int r = 0; r < 4; r++)                                                              \
        acc[r] = pairs[r] = _mm256_setzero_ps();                                             \
    for (Py_ssize_t j = 0; j < nb; j += 4) {                                                 \
        int full = j + 4 <= nb;                                                              \
        __m256 scales = full ? _mm256_loadu_ps(dxsx + 2 * j)                                 \
                             : _mm256_insertf128_ps(_mm256_setzero_ps(),                     \
                                                    _mm_loadu_ps(dxsx + 2 * j), 0);          \
        for (int r = 0; r < 4; r++) {                                                        \
            const uint16_t *dm_r = dm + r * 2 * nb + 2 * j;                                  \
            prod[r] = _mm256_mul_ps(full ? dm4_avx2(dm_r) : dm2_avx2(dm_r), scales);         \
            pairs[r] = _mm256_add_ps(pairs[r], prod[r]);                                     \
        }                                                                                    \
        for (int p = 0; p < 1 + full; p++) {                                                 \
            Py_ssize_t b = j + 2 * p;                                                        \
            __m256i x0 = _mm256_loadu_si256((const __m256i *)(x8 + QBLOCK * b));             \
            __m256i x1 = _mm256_loadu_si256((const __m256i *)(x8 + QBLOCK * (b + 1)));       \
            __m256i lane0 = _mm256_set1_epi32(4 * p), lane1 = _mm256_set1_epi32(4 * p + 2);  \
            for (int r = 0; r < 4; r++) {                                                    \
                const uint8_t *c = codes + r * (nb * 16) + 16 * b;                           \
                _mm_prefetch((const char *)(c + PREFETCH_ROWS * nb * 16), _MM_HINT_T0);      \
                __m256i v = _mm256_loadu_si256((const __m256i *)c);                          \
                __m256i w0 = _mm256_and_si256(v, low4);                                      \
                __m256i w1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);                \
                __m256 s0 = _mm256_permutevar8x32_ps(prod[r], lane0);                        \
                __m256 s1 = _mm256_permutevar8x32_ps(prod[r], lane1);                        \
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(w0, x0)), s0, acc[r]);       \
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(DOT(w1, x1)), s1, acc[r]);       \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
    const __m256 odd = _mm256_castsi256_ps(_mm256_setr_epi32(0, -1, 0, -1, 0, -1, 0, -1));   \
    for (int r = 0; r < 4; r++)                                                              \
        acc[r] = _mm256_add_ps(acc[r], _mm256_and_ps(pairs[r], odd));                        \
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3])); \
    _mm_storeu_ps(y, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));

AVX2_TARGET static void q4_rows4_avx2(const uint8_t *codes, const uint16_t *dm,
                                      const int8_t *x8, const float *dxsx, Py_ssize_t nb,
                                      float *y)
{
    Q4_ROWS4_BODY(DOT_MADDUBS)
}

__attribute__((target("avx2,fma,avxvnni"))) static void
q4_rows4_vnni(const uint8_t *codes, const uint16_t *dm, const int8_t *x8, const float *dxsx,
              Py_ssize_t nb, float *y)
{
    Q4_ROWS4_BODY(DOT_VNNI)
}

/* The same instruction in its AVX-512 VL encoding (CPUs with AVX-512 VNNI, not AVX-VNNI). */
#define AVX512_TARGET __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
#define DOT_VNNI512(w, x) _mm256_dpbusd_epi32(_mm256_setzero_si256(), (w), (x))

AVX512_TARGET static void q4_rows4_vnni512(const uint8_t *codes, const uint16_t *dm,
                                           const int8_t *x8, const float *dxsx, Py_ssize_t nb,
                                           float *y)
{
    Q4_ROWS4_BODY(DOT_VNNI512)
}
#endif

static void q4_rows4_portable(const uint8_t *codes, const uint16_t *dm, const int8_t *x8,
                              const float *dxsx, Py_ssize_t nb, float *y)
{
    for (int r = 0; r < 4; r++)
        y[r] = q4_dot_portable(codes + r * nb * 16, dm + r * 2 * nb, x8, dxsx, nb);
}

/* ---- q8 ------------------------------------------------------------------------------- */

static float q8_dot_portable(const int8_t *values, const int8_t *x8, const float *dxsx,
                             Py_ssize_t nb)
{
    float total = 0.0f;
    for (Py_ssize_t j = 0; j < nb; j++) {
        int32_t dot = 0;
        for (int i = 0; i < QBLOCK; i++)
            dot += values[QBLOCK * j + i] * x8[QBLOCK * j + i];
        total += dxsx[2 * j] * (float)dot;
    }
    return total;
}

#ifdef HAVE_AVX2_KERNELS
/* maddubs multiplies unsigned by signed bytes: |v| times x carrying v's sign. */
AVX2_TARGET static inline __m256i q8_block_avx2(const int8_t *values, const int8_t *x)
{
    __m256i v = _mm256_loadu_si256((const __m256i *)values);
    __m256i xv = _mm256_loadu_si256((const __m256i *)x);
    __m256i products = _mm256_maddubs_epi16(_mm256_sign_epi8(v, v), _mm256_sign_epi8(xv, v));
    return _mm256_madd_epi16(products, _mm256_set1_epi16(1));
}

AVX2_TARGET static float q8_dot_avx2(const int8_t *values, const int8_t *x8,
                                     const float *dxsx, Py_ssize_t nb)
{
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    Py_ssize_t j = 0;
    for (; j + 2 <= nb; j += 2) {
        __m256i dot0 = q8_block_avx2(values + QBLOCK * j, x8 + QBLOCK * j);
        __m256i dot1 = q8_block_avx2(values + QBLOCK * (j + 1), x8 + QBLOCK * (j + 1));
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot0), _mm256_set1_ps(dxsx[2 * j]), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot1), _mm256_set1_ps(dxsx[2 * j + 2]), acc1);
    }
    if (j < nb) {
        __m256i dot0 = q8_block_avx2(values + QBLOCK * j, x8 + QBLOCK * j);
        acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot0), _mm256_set1_ps(dxsx[2 * j]), acc0);
    }
    return hsum_avx(_mm256_add_ps(acc0, acc1));
}
#endif

/* The q4 / q8 kernels: the best this CPU runs, unless quant_kernels() chose another. */
typedef void (*Q4Rows4)(const uint8_t *, const uint16_t *, const int8_t *, const float *,
                        Py_ssize_t, float *);
typedef float (*Q8Dot)(const int8_t *, const int8_t *, const float *, Py_ssize_t);

enum { KERNELS_PORTABLE, KERNELS_AVX2, KERNELS_VNNI, KERNELS_AVX512, KERNEL_LEVELS };
static const char *const kernel_names[] = {"portable", "avx2", "avx-vnni", "avx512-vnni"};
static int chosen_kernels = -1; /* -1: the best available */

/* Whether this CPU (and build) runs the kernels of `level`. avx512-vnni adds the many-row
 * GEMM (qmatrix_gemm) and needs neither AVX-VNNI nor the avx-vnni level. */
static int kernels_available(int level)
{
#ifdef HAVE_AVX2_KERNELS
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    switch (level) {
    case KERNELS_AVX2:
        return avx2;
    case KERNELS_VNNI:
        return avx2 && __builtin_cpu_supports("avxvnni");
    case KERNELS_AVX512:
        return avx2 && __builtin_cpu_supports("avx512f") &&
               __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
               __builtin_cpu_supports("avx512vnni");
    }
#endif
    return level == KERNELS_PORTABLE;
}

static int best_kernels(void)
{
    int level = KERNEL_LEVELS - 1;
    while (!kernels_available(level))
        level--;
    return level;
}

static int active_kernels(void) { return chosen_kernels >= 0 ? chosen_kernels : best_kernels(); }

static Q4Rows4 q4_kernel(void)
{
#ifdef HAVE_AVX2_KERNELS
    switch (active_kernels()) {
    case KERNELS_AVX512:
        return q4_rows4_vnni512;
    case KERNELS_VNNI:
        return q4_rows4_vnni;
    case KERNELS_AVX2:
        return q4_rows4_avx2;
    }
#endif
    return q4_rows4_portable;
}

static Q8Dot q8_kernel(void)
{
#ifdef HAVE_AVX2_KERNELS
    if (active_kernels() != KERNELS_PORTABLE)
        return q8_dot_avx2;
#endif
    return q8_dot_portable;
}

PyDoc_STRVAR(quant_kernels_doc,
"quant_kernels(name=None) -> (active, available)\n"
"The active q4/q8 kernels' name and the names this CPU runs, best last; with name, make\n"
"that one active first (\"best\" restores the default). Raises ValueError for a name the\n"
"CPU cannot run. For tests and benchmarks.");

static PyObject *quant_kernels(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs > 1)
        return PyErr_Format(PyExc_TypeError, "quant_kernels(name=None)");
    if (nargs == 1 && args[0] != Py_None) {
        const char *name = PyUnicode_AsUTF8(args[0]);
        if (!name)
            return NULL;
        int found = strcmp(name, "best") == 0 ? -1 : -2;
        for (int level = 0; level < KERNEL_LEVELS && found == -2; level++)
            if (kernels_available(level) && strcmp(name, kernel_names[level]) == 0)
                found = level;
        if (found == -2)
            return PyErr_Format(PyExc_ValueError, "no %s kernels on this CPU", name);
        chosen_kernels = found;
    }
    PyObject *available = PyList_New(0);
    if (!available)
        return NULL;
    for (int level = 0; level < KERNEL_LEVELS; level++) {
        if (!kernels_available(level))
            continue;
        PyObject *name = PyUnicode_FromString(kernel_names[level]);
        int failed = !name || PyList_Append(available, name) < 0;
        Py_XDECREF(name);
        if (failed) {
            Py_DECREF(available);
            return NULL;
        }
    }
    PyObject *names = PyList_AsTuple(available);
    Py_DECREF(available);
    return names ? Py_BuildValue("(sN)", kernel_names[active_kernels()], names) : NULL;
}

/* ---- quantized matrices -------------------------------------------------------------- */

enum { Q4 = 4, Q8 = 8 };

/* A packed matrix [n, k]: q4 (weights = codes, scales = dm) or q8 (weights = values, scales =
 * one bfloat16 per row); bias: float32 [n] or NULL. */
typedef struct {
    int kind;
    const void *weights;
    const uint16_t *scales;
    Py_ssize_t n, k;
    const float *bias;
} QMatrix;

/* Scratch for the quantized activations of up to `rows` rows of up to k values. */
typedef struct {
    int8_t *x8;
    float *dxsx, *row_buf;
    void *block;
} Activations;

static int activations_alloc(Activations *a, Py_ssize_t rows, Py_ssize_t k)
{
    size_t floats = (size_t)(2 * rows * (k / QBLOCK) + k);
    a->block = malloc(floats * sizeof(float) + (size_t)(rows * k));
    if (!a->block)
        return 0;
    a->dxsx = a->block;
    a->row_buf = a->dxsx + 2 * rows * (k / QBLOCK);
    a->x8 = (int8_t *)(a->row_buf + k);
    return 1;
}

/* out[r][i] = (x[r] . row i of w) + bias[i], for `rows` rows of x (w->k values, x_dt, rows
 * x_stride apart); out rows out_stride apart, in out_dt. */
static void qmatrix_apply(const QMatrix *w, const void *x, int x_dt, Py_ssize_t x_stride,
                          Py_ssize_t rows, void *out, int out_dt, Py_ssize_t out_stride,
                          Activations *a)
{
    Py_ssize_t k = w->k, nb = k / QBLOCK;
    quantize_activations(x, x_dt, x_stride, rows, k, a->x8, a->dxsx, a->row_buf);
    Q4Rows4 rows4 = q4_kernel();
    Q8Dot dot8 = q8_kernel();
    for (Py_ssize_t i = 0; i < w->n; i += 4) {
        Py_ssize_t count = w->n - i < 4 ? w->n - i : 4;
        for (Py_ssize_t r = 0; r < rows; r++) {
            const int8_t *xr = a->x8 + r * k;
            const float *dxsx_r = a->dxsx + 2 * r * nb;
            float y[4];
            if (w->kind == Q4) {
                const uint8_t *codes = (const uint8_t *)w->weights + i * (k / 2);
                const uint16_t *dm = w->scales + i * 2 * nb;
                if (count == 4)
                    rows4(codes, dm, xr, dxsx_r, nb, y);
                else
                    for (Py_ssize_t c = 0; c < count; c++)
                        y[c] = q4_dot_portable(codes + c * (k / 2), dm + c * 2 * nb, xr, dxsx_r,
                                               nb);
            } else {
                for (Py_ssize_t c = 0; c < count; c++) {
                    const int8_t *values = (const int8_t *)w->weights + (i + c) * k;
                    y[c] = bf16_bits_to_f32(w->scales[i + c]) * dot8(values, xr, dxsx_r, nb);
                }
            }
            if (w->bias)
                for (Py_ssize_t c = 0; c < count; c++)
                    y[c] += w->bias[i + c];
            store_row(AT(out, out_dt, r * out_stride + i), out_dt, y, count);
        }
    }
}

/* ---- many rows: the register-tiled AVX-512 VNNI GEMM ---------------------------------- */

/* qmatrix_gemm computes what qmatrix_apply does, from the same int8 activations, for many
 * activation rows at once (prefill). Per panel of 16 or 32 output columns it first unpacks
 * the weights once into a buffer in vpdpbusd's layout (GemmPanel), then runs tiles of up to
 * GEMM_ROWS activation rows by the whole panel with the accumulators in registers: per block
 * of 32 and step of 4 bytes, one 64-byte weight load per 16 columns and one broadcast dword
 * per row feed 16-lane integer dot products (one lane per column); per block they are
 * converted and scaled in float (d dx, plus m sx for q4). The integer dots are exact, so
 * only float summation order separates the result from qmatrix_apply's.
 * q8 values are signed, but vpdpbusd multiplies unsigned by signed bytes: the activations
 * take the unsigned side as x8 + 128 and each dot starts at -128 times the block's sum of
 * values, which is exact. */
#ifdef HAVE_AVX2_KERNELS
#define GEMM_ROWS 4
#define GEMM_STRIPS 2 /* 16-column strips per panel */

/* quantize_activations for the GEMM (the same x8 and dx; sx summed in another order), each
 * x8 byte XORed with `flip` (0x80 turns x8 into the unsigned x8 + 128 that q8 takes). */
AVX512_TARGET static void gemm_quantize_activations(const void *x, int x_dt,
                                                    Py_ssize_t x_stride, Py_ssize_t rows,
                                                    Py_ssize_t k, int flip, int8_t *x8,
                                                    float *dxsx, float *row_buf)
{
    Py_ssize_t nb = k / QBLOCK;
    const __m128i flips = _mm_set1_epi8((char)flip);
    for (Py_ssize_t r = 0; r < rows; r++) {
        load_row(row_buf, AT(x, x_dt, r * x_stride), x_dt, k);
        for (Py_ssize_t j = 0; j < nb; j++) {
            __m512 v0 = _mm512_loadu_ps(row_buf + QBLOCK * j);
            __m512 v1 = _mm512_loadu_ps(row_buf + QBLOCK * j + 16);
            /* max(a, b) is a > b ? a : b, so a NaN is skipped as in quantize_activations */
            __m512 a0 = _mm512_abs_ps(v0), a1 = _mm512_abs_ps(v1);
            __m512 amax16 = _mm512_max_ps(a1, _mm512_max_ps(a0, _mm512_setzero_ps()));
            float amax = _mm512_reduce_max_ps(amax16);
            float sum = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
            __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
            /* rounded to nearest even, then truncated to bytes, as (int8_t)lrintf */
            __m128i q0 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v0, inv)));
            __m128i q1 = _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v1, inv)));
            int8_t *q = x8 + r * k + QBLOCK * j;
            _mm_storeu_si128((__m128i *)q, _mm_xor_si128(q0, flips));
            _mm_storeu_si128((__m128i *)(q + 16), _mm_xor_si128(q1, flips));
            dxsx[2 * (r * nb + j)] = sum != sum ? NAN : amax / 127.0f;
            dxsx[2 * (r * nb + j) + 1] = sum;
        }
    }
}

/* One panel of `strips` 16-column strips of the matrix, for every block j of K:
 * - codes[((j * 8 + s) * strips + v) * 64 + 4 c + i]: byte 4 s + i of block j of column
 *   16 v + c (a q4 code, or a q8 value);
 * - q4: d and m [(j * strips + v) * 16 + c] as floats;
 * - q8: start[(j * strips + v) * 16 + c] = -128 * the block's sum of values, scale [16 v + c]
 *   (the column's scale as a float). */
typedef struct {
    uint8_t *codes;
    float *d, *m, *scale;
    int32_t *start;
    void *block;
} GemmPanel;

static int gemm_panel_alloc(GemmPanel *p, Py_ssize_t nb)
{
    size_t lanes = (size_t)nb * GEMM_STRIPS * 16, codes = lanes * QBLOCK;
    size_t bytes = codes + 3 * lanes * sizeof(float) + GEMM_STRIPS * 16 * sizeof(float);
    p->block = aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (!p->block)
        return 0;
    p->codes = p->block;
    p->d = (float *)(p->codes + codes);
    p->m = p->d + lanes;
    p->start = (int32_t *)(p->m + lanes);
    p->scale = (float *)(p->start + lanes);
    return 1;
}

/* out[s] for s < 8: dword c holds bytes 4 s .. 4 s + 3 of src + c * stride, c < 16 (a 16 x 8
 * dword transpose: rows c and c + 8 share a vector, then an 8 x 8 transpose per half). */
AVX512_TARGET static inline void transpose16x8(const uint8_t *src, Py_ssize_t stride,
                                               __m512i out[8])
{
    __m512i r[8], t[8], u[8];
    for (int i = 0; i < 8; i++) {
        __m256i lo = _mm256_loadu_si256((const __m256i *)(src + i * stride));
        __m256i hi = _mm256_loadu_si256((const __m256i *)(src + (i + 8) * stride));
        r[i] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    }
    for (int i = 0; i < 8; i += 2) { /* t[i]: dwords 0 1 (4 5) of rows i, i + 1 interleaved */
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) { /* u[i + s]: dword s (and s + 4) of rows i .. i + 3 */
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    const __m512i first = _mm512_set_epi64(13, 12, 5, 4, 9, 8, 1, 0);
    const __m512i second = _mm512_set_epi64(15, 14, 7, 6, 11, 10, 3, 2);
    for (int s = 0; s < 4; s++) {
        out[s] = _mm512_permutex2var_epi64(u[s], first, u[s + 4]);
        out[s + 4] = _mm512_permutex2var_epi64(u[s], second, u[s + 4]);
    }
}

/* Fill p with the `strips` strips of w from column n0 (n0 + 16 strips <= w->n). */
AVX512_TARGET static void gemm_panel_fill(const QMatrix *w, Py_ssize_t n0, int strips,
                                          GemmPanel *p)
{
    Py_ssize_t k = w->k, nb = k / QBLOCK;
    __m512i t[8];
    for (int v = 0; v < strips; v++) {
        Py_ssize_t col = n0 + 16 * v;
        if (w->kind == Q4) {
            const uint8_t *codes = (const uint8_t *)w->weights + col * (k / 2);
            const __m512i low4 = _mm512_set1_epi8(0x0f);
            for (Py_ssize_t j = 0; j < nb; j += 2) {
                transpose16x8(codes + 16 * j, k / 2, t);
                for (int s = 0; s < 8; s++) {
                    uint8_t *even = p->codes + ((j * 8 + s) * strips + v) * 64;
                    uint8_t *odd = p->codes + (((j + 1) * 8 + s) * strips + v) * 64;
                    _mm512_store_si512(even, _mm512_and_si512(t[s], low4));
                    _mm512_store_si512(odd, _mm512_and_si512(_mm512_srli_epi32(t[s], 4), low4));
                }
            }
            /* each column's (d, m) bfloat16 pairs as dwords, nb apart */
            const char *dm = (const char *)(w->scales + col * 2 * nb);
            const __m512i index = _mm512_mullo_epi32(
                _mm512_set1_epi32((int)nb),
                _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
            const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
            for (Py_ssize_t j = 0; j < nb; j++) {
                __m512i pairs = _mm512_i32gather_epi32(index, dm + 4 * j, 4);
                Py_ssize_t at = (j * strips + v) * 16;
                _mm512_store_si512(p->d + at, _mm512_slli_epi32(pairs, 16));
                _mm512_store_si512(p->m + at, _mm512_and_si512(pairs, high));
            }
        } else {
            const uint8_t *values = (const uint8_t *)w->weights + col * k;
            const __m512i ones = _mm512_set1_epi8(1);
            for (Py_ssize_t j = 0; j < nb; j++) {
                transpose16x8(values + QBLOCK * j, k, t);
                __m512i sum = _mm512_setzero_si512();
                for (int s = 0; s < 8; s++) {
                    _mm512_store_si512(p->codes + ((j * 8 + s) * strips + v) * 64, t[s]);
                    sum = _mm512_dpbusd_epi32(sum, ones, t[s]);
                }
                _mm512_store_si512(p->start + (j * strips + v) * 16,
                                   _mm512_sub_epi32(_mm512_setzero_si512(),
                                                    _mm512_slli_epi32(sum, 7)));
            }
            __m256i scales = _mm256_loadu_si256((const __m256i *)(w->scales + col));
            _mm512_store_si512(p->scale + 16 * v,
                               _mm512_slli_epi32(_mm512_cvtepu16_epi32(scales), 16));
        }
    }
}

/* y[r][16 v + c] (rows r < `rows`, 16 strips columns a row) = the products of activation
 * rows x8 + r k (k bytes apart; q8: offset by 128) with the panel's columns. Inlined with
 * constant kind, strips and rows, so that the tile's accumulators stay in registers. */
AVX512_TARGET static inline __attribute__((always_inline)) void
gemm_tile(int kind, int strips, int rows, const GemmPanel *p, const int8_t *x8, Py_ssize_t k,
          const float *dxsx, float *y)
{
    Py_ssize_t nb = k / QBLOCK;
    __m512 acc[GEMM_ROWS][GEMM_STRIPS];
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < strips; v++)
            acc[r][v] = _mm512_setzero_ps();
    for (Py_ssize_t j = 0; j < nb; j++) {
        __m512i dot[GEMM_ROWS][GEMM_STRIPS];
        for (int v = 0; v < strips; v++) {
            __m512i start = kind == Q4 ? _mm512_setzero_si512()
                                       : _mm512_load_si512(p->start + (j * strips + v) * 16);
            for (int r = 0; r < rows; r++)
                dot[r][v] = start;
        }
        const uint8_t *codes = p->codes + j * 8 * strips * 64;
        for (int s = 0; s < 8; s++) {
            __m512i wv[GEMM_STRIPS];
            for (int v = 0; v < strips; v++)
                wv[v] = _mm512_load_si512(codes + (s * strips + v) * 64);
            for (int r = 0; r < rows; r++) {
                int32_t xs;
                memcpy(&xs, x8 + r * k + QBLOCK * j + 4 * s, sizeof xs);
                __m512i xv = _mm512_set1_epi32(xs);
                for (int v = 0; v < strips; v++)
                    dot[r][v] = kind == Q4 ? _mm512_dpbusd_epi32(dot[r][v], wv[v], xv)
                                           : _mm512_dpbusd_epi32(dot[r][v], xv, wv[v]);
            }
        }
        for (int r = 0; r < rows; r++) {
            __m512 dx = _mm512_set1_ps(dxsx[2 * (r * nb + j)]);
            __m512 sx = _mm512_set1_ps(dxsx[2 * (r * nb + j) + 1]);
            for (int v = 0; v < strips; v++) {
                __m512 dots = _mm512_cvtepi32_ps(dot[r][v]);
                if (kind == Q4) {
                    Py_ssize_t at = (j * strips + v) * 16;
                    __m512 scale = _mm512_mul_ps(_mm512_load_ps(p->d + at), dx);
                    acc[r][v] = _mm512_fmadd_ps(dots, scale, acc[r][v]);
                    acc[r][v] = _mm512_fmadd_ps(_mm512_load_ps(p->m + at), sx, acc[r][v]);
                } else {
                    acc[r][v] = _mm512_fmadd_ps(dots, dx, acc[r][v]);
                }
            }
        }
    }
    for (int r = 0; r < rows; r++)
        for (int v = 0; v < strips; v++) {
            __m512 out = kind == Q4 ? acc[r][v]
                                    : _mm512_mul_ps(acc[r][v], _mm512_load_ps(p->scale + 16 * v));
            _mm512_storeu_ps(y + (r * strips + v) * 16, out);
        }
}

/* gemm_tile for every tile of activation rows (GEMM_ROWS at a time, then the rest), each
 * tile's products (plus bias from column n0) stored to out from column n0. */
AVX512_TARGET static inline __attribute__((always_inline)) void
gemm_panel_rows(int kind, int strips, const GemmPanel *p, const Activations *a, Py_ssize_t rows,
                Py_ssize_t k, const float *bias, void *out, int out_dt, Py_ssize_t out_stride)
{
    Py_ssize_t nb = k / QBLOCK, width = 16 * strips;
    float y[GEMM_ROWS * GEMM_STRIPS * 16];
    for (Py_ssize_t r0 = 0; r0 < rows; r0 += GEMM_ROWS) {
        const int8_t *x8 = a->x8 + r0 * k;
        const float *dxsx = a->dxsx + 2 * r0 * nb;
        Py_ssize_t count = rows - r0 < GEMM_ROWS ? rows - r0 : GEMM_ROWS;
        switch (count) {
        case 1:
            gemm_tile(kind, strips, 1, p, x8, k, dxsx, y);
            break;
        case 2:
            gemm_tile(kind, strips, 2, p, x8, k, dxsx, y);
            break;
        case 3:
            gemm_tile(kind, strips, 3, p, x8, k, dxsx, y);
            break;
        default:
            gemm_tile(kind, strips, GEMM_ROWS, p, x8, k, dxsx, y);
        }
        for (Py_ssize_t r = 0; r < count; r++) {
            float *yr = y + r * width;
            if (bias)
                for (Py_ssize_t c = 0; c < width; c++)
                    yr[c] += bias[c];
            store_row(AT(out, out_dt, (r0 + r) * out_stride), out_dt, yr, width);
        }
    }
}

/* qmatrix_apply's contract, for many rows: panels of 32 columns (then one of 16 where 16
 * remain) through the tiles above, the last n % 16 columns through qmatrix_apply.
 * p: a panel buffer for w->k (gemm_panel_alloc). */
AVX512_TARGET static void qmatrix_gemm(const QMatrix *w, const void *x, int x_dt,
                                       Py_ssize_t x_stride, Py_ssize_t rows, void *out,
                                       int out_dt, Py_ssize_t out_stride, Activations *a,
                                       GemmPanel *p)
{
    Py_ssize_t k = w->k, nb = k / QBLOCK, n16 = w->n / 16 * 16;
    if (n16 < w->n) {
        QMatrix tail = *w;
        tail.n = w->n - n16;
        tail.weights = (const uint8_t *)w->weights + n16 * (w->kind == Q4 ? k / 2 : k);
        tail.scales = w->scales + n16 * (w->kind == Q4 ? 2 * nb : 1);
        tail.bias = w->bias ? w->bias + n16 : NULL;
        qmatrix_apply(&tail, x, x_dt, x_stride, rows, AT(out, out_dt, n16), out_dt, out_stride,
                      a);
    }
    gemm_quantize_activations(x, x_dt, x_stride, rows, k, w->kind == Q8 ? 0x80 : 0, a->x8,
                              a->dxsx, a->row_buf);
    for (Py_ssize_t n0 = 0; n0 < n16; n0 += 16 * GEMM_STRIPS) {
        int strips = n16 - n0 >= 16 * GEMM_STRIPS ? GEMM_STRIPS : 1;
        gemm_panel_fill(w, n0, strips, p);
        const float *bias = w->bias ? w->bias + n0 : NULL;
        void *dst = AT(out, out_dt, n0);
        if (w->kind == Q4 && strips == GEMM_STRIPS)
            gemm_panel_rows(Q4, GEMM_STRIPS, p, a, rows, k, bias, dst, out_dt, out_stride);
        else if (w->kind == Q4)
            gemm_panel_rows(Q4, 1, p, a, rows, k, bias, dst, out_dt, out_stride);
        else if (strips == GEMM_STRIPS)
            gemm_panel_rows(Q8, GEMM_STRIPS, p, a, rows, k, bias, dst, out_dt, out_stride);
        else
            gemm_panel_rows(Q8, 1, p, a, rows, k, bias, dst, out_dt, out_stride);
    }
}
#endif

#ifdef HAVE_AVX2_KERNELS
/* 16 finite floats rounded to bfloat16 (nearest even) and stored. */
AVX2_TARGET static inline void store16_bf16_avx2(uint16_t *out, __m256 a, __m256 b)
{
    const __m256i bias = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
    __m256i x = _mm256_castps_si256(a), y = _mm256_castps_si256(b);
    x = _mm256_add_epi32(x, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(x, 16), one)));
    y = _mm256_add_epi32(y, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(y, 16), one)));
    __m256i packed = _mm256_packus_epi32(_mm256_srli_epi32(x, 16), _mm256_srli_epi32(y, 16));
    _mm256_storeu_si256((__m256i *)out, _mm256_permute4x64_epi64(packed, 0xd8));
}

/* 32 codes (bytes, one block) times d plus m, as bfloat16. */
AVX2_TARGET static inline void dequantize_block_avx2(uint16_t *out, __m256i codes, __m256 d,
                                                     __m256 m)
{
    __m128i halves[2] = {_mm256_castsi256_si128(codes), _mm256_extracti128_si256(codes, 1)};
    for (int h = 0; h < 2; h++) {
        __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(halves[h]));
        __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(halves[h], 8)));
        store16_bf16_avx2(out + 16 * h, _mm256_fmadd_ps(lo, d, m), _mm256_fmadd_ps(hi, d, m));
    }
}

/* qmatrix_dequantize for weights with finite values, 3-4x faster (prefill calls it per
 * matrix per pass). */
AVX2_TARGET static void qmatrix_dequantize_avx2(const QMatrix *w, uint16_t *out)
{
    Py_ssize_t k = w->k, nb = k / QBLOCK;
    const __m256i low4 = _mm256_set1_epi8(0x0f);
    for (Py_ssize_t i = 0; i < w->n; i++) {
        uint16_t *row = out + i * k;
        if (w->kind == Q4) {
            const uint8_t *codes = (const uint8_t *)w->weights + i * (k / 2);
            const uint16_t *dm = w->scales + i * 2 * nb;
            for (Py_ssize_t j = 0; j < nb; j += 2) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(codes + 16 * j));
                for (int b = 0; b < 2; b++) {
                    __m256i q = _mm256_and_si256(b ? _mm256_srli_epi16(v, 4) : v, low4);
                    __m256 d = _mm256_set1_ps(bf16_bits_to_f32(dm[2 * (j + b)]));
                    __m256 m = _mm256_set1_ps(bf16_bits_to_f32(dm[2 * (j + b) + 1]));
                    dequantize_block_avx2(row + QBLOCK * (j + b), q, d, m);
                }
            }
        } else {
            const int8_t *values = (const int8_t *)w->weights + i * k;
            __m256 scale = _mm256_set1_ps(bf16_bits_to_f32(w->scales[i]));
            for (Py_ssize_t e = 0; e < k; e += 16) {
                __m128i v = _mm_loadu_si128((const __m128i *)(values + e));
                __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
                __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
                store16_bf16_avx2(row + e, _mm256_mul_ps(lo, scale), _mm256_mul_ps(hi, scale));
            }
        }
    }
}
#endif

/* out (bfloat16 [n][k]) = the matrix w stands for, each value rounded once. */
VECTORIZED static void qmatrix_dequantize(const QMatrix *w, uint16_t *out)
{
    Py_ssize_t k = w->k, nb = k / QBLOCK;
    for (Py_ssize_t i = 0; i < w->n; i++) {
        uint16_t *row = out + i * k;
        if (w->kind == Q4) {
            const uint8_t *codes = (const uint8_t *)w->weights + i * (k / 2);
            const uint16_t *dm = w->scales + i * 2 * nb;
            for (Py_ssize_t j = 0; j < nb; j++) {
                const uint8_t *c = codes + 16 * (j & ~(Py_ssize_t)1);
                int shift = (j & 1) ? 4 : 0;
                float d = bf16_bits_to_f32(dm[2 * j]), m = bf16_bits_to_f32(dm[2 * j + 1]);
                for (int e = 0; e < QBLOCK; e++)
                    row[QBLOCK * j + e] = f32_to_bf16_bits((float)((c[e] >> shift) & 15) * d + m);
            }
        } else {
            const int8_t *values = (const int8_t *)w->weights + i * k;
            float scale = bf16_bits_to_f32(w->scales[i]);
            for (Py_ssize_t e = 0; e < k; e++)
                row[e] = f32_to_bf16_bits((float)values[e] * scale);
        }
    }
}

/* ---- entry points --------------------------------------------------------------------- */

PyDoc_STRVAR(qmatmul_doc,
"qmatmul(kind, weights, scales, n, k, x, x_dt, x_stride, rows, out, out_dt, out_stride)\n"
"out[r][i] = x[r] . row i of the packed matrix (kind 4: q4 codes uint8 [n, k / 2] and dm\n"
"bfloat16 [n, k / 32, 2], k % 64 == 0; kind 8: q8 values int8 [n, k] and bfloat16 scales\n"
"[n], k % 32 == 0), x quantized per block of 32 (see _cpu_quant.h).\n"
"Raises ValueError for another kind or a k the kind cannot take.");

/* Parse qmatmul's arguments (shared by qgemm) into w and the rest; 0 with an exception set
 * on bad ones. */
static int parse_qmatmul(PyObject *const *args, Py_ssize_t nargs, const char *name, QMatrix *w,
                         void **x, int *x_dt, Py_ssize_t *x_stride, Py_ssize_t *rows, void **out,
                         int *out_dt, Py_ssize_t *out_stride)
{
    if (!parse_args(args, nargs, name, "ippnnpinnpin", &w->kind, (void **)&w->weights,
                    (void **)&w->scales, &w->n, &w->k, x, x_dt, x_stride, rows, out, out_dt,
                    out_stride))
        return 0;
    if ((w->kind != Q4 && w->kind != Q8) || w->k % (w->kind == Q4 ? 2 * QBLOCK : QBLOCK)) {
        PyErr_Format(PyExc_ValueError, "no q%d kernel for k = %zd", w->kind, w->k);
        return 0;
    }
    return 1;
}

static PyObject *qmatmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    QMatrix w = {0};
    void *x, *out;
    int x_dt, out_dt;
    Py_ssize_t x_stride, rows, out_stride;
    if (!parse_qmatmul(args, nargs, "qmatmul", &w, &x, &x_dt, &x_stride, &rows, &out, &out_dt,
                       &out_stride))
        return NULL;
    Activations a;
    if (!activations_alloc(&a, rows, w.k))
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    qmatrix_apply(&w, x, x_dt, x_stride, rows, out, out_dt, out_stride, &a);
    Py_END_ALLOW_THREADS
    free(a.block);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(qgemm_doc,
"qgemm(kind, weights, scales, n, k, x, x_dt, x_stride, rows, out, out_dt, out_stride) -> bool\n"
"qmatmul's product by the register-tiled GEMM for many rows, where the active kernels have\n"
"it (avx512-vnni): the same int8 activations and exact integer dots, another float\n"
"summation order. Returns False, having written nothing, where they do not.");

static PyObject *qgemm(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    QMatrix w = {0};
    void *x, *out;
    int x_dt, out_dt;
    Py_ssize_t x_stride, rows, out_stride;
    if (!parse_qmatmul(args, nargs, "qgemm", &w, &x, &x_dt, &x_stride, &rows, &out, &out_dt,
                       &out_stride))
        return NULL;
#ifdef HAVE_AVX2_KERNELS
    if (active_kernels() == KERNELS_AVX512) {
        Activations a;
        GemmPanel p;
        if (!activations_alloc(&a, rows, w.k))
            return PyErr_NoMemory();
        if (!gemm_panel_alloc(&p, w.k / QBLOCK)) {
            free(a.block);
            return PyErr_NoMemory();
        }
        Py_BEGIN_ALLOW_THREADS
        qmatrix_gemm(&w, x, x_dt, x_stride, rows, out, out_dt, out_stride, &a, &p);
        Py_END_ALLOW_THREADS
        free(p.block);
        free(a.block);
        Py_RETURN_TRUE;
    }
#endif
    Py_RETURN_FALSE;
}

PyDoc_STRVAR(dequantize_doc,
"dequantize(kind, weights, scales, n, k, out)\n"
"out (bfloat16 [n, k]) = the packed matrix as qmatmul describes it, each value rounded once\n"
"to bfloat16. Raises ValueError as qmatmul does.");

static PyObject *dequantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    QMatrix w = {0};
    uint16_t *out;
    if (!parse_args(args, nargs, "dequantize", "ippnnp", &w.kind, (void **)&w.weights,
                    (void **)&w.scales, &w.n, &w.k, (void **)&out))
        return NULL;
    if ((w.kind != Q4 && w.kind != Q8) || w.k % (w.kind == Q4 ? 2 * QBLOCK : QBLOCK))
        return PyErr_Format(PyExc_ValueError, "no q%d kernel for k = %zd", w.kind, w.k);
    Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_AVX2_KERNELS
    if (active_kernels() != KERNELS_PORTABLE)
        qmatrix_dequantize_avx2(&w, out);
    else
#endif
        qmatrix_dequantize(&w, out);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}
