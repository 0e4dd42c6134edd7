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
 * Kernels: q4 with AVX-VNNI (dpbusd) or AVX2 (maddubs), q8 with AVX2, where the CPU has
 * them (and the build has runtime dispatch: HAVE_X86_DISPATCH in _cpu_ops.c), else portable C;
 * single-threaded; the weight bytes of one output row are read once per call and reused for
 * every activation row. Per pair of q4 blocks the AVX path is one load, an AND, a shift and
 * an AND for the weights, then per block a load, the integer dot, a conversion and one FMA
 * with the block's d dx (taken from a vector of four blocks' (d dx, m sx) products).
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

enum { KERNELS_PORTABLE, KERNELS_AVX2, KERNELS_VNNI };
static const char *const kernel_names[] = {"portable", "avx2", "avx-vnni"};
static int chosen_kernels = -1; /* -1: the best available */

static int best_kernels(void)
{
#ifdef HAVE_AVX2_KERNELS
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return __builtin_cpu_supports("avxvnni") ? KERNELS_VNNI : KERNELS_AVX2;
#endif
    return KERNELS_PORTABLE;
}

static int active_kernels(void) { return chosen_kernels >= 0 ? chosen_kernels : best_kernels(); }

static Q4Rows4 q4_kernel(void)
{
#ifdef HAVE_AVX2_KERNELS
    int level = active_kernels();
    if (level == KERNELS_VNNI)
        return q4_rows4_vnni;
    if (level == KERNELS_AVX2)
        return q4_rows4_avx2;
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
    int best = best_kernels();
    if (nargs > 1)
        return PyErr_Format(PyExc_TypeError, "quant_kernels(name=None)");
    if (nargs == 1 && args[0] != Py_None) {
        const char *name = PyUnicode_AsUTF8(args[0]);
        if (!name)
            return NULL;
        int found = strcmp(name, "best") == 0 ? -1 : -2;
        for (int level = 0; level <= best && found == -2; level++)
            if (strcmp(name, kernel_names[level]) == 0)
                found = level;
        if (found == -2)
            return PyErr_Format(PyExc_ValueError, "no %s kernels on this CPU", name);
        chosen_kernels = found;
    }
    PyObject *available = PyTuple_New(best + 1);
    if (!available)
        return NULL;
    for (int level = 0; level <= best; level++)
        PyTuple_SET_ITEM(available, level, PyUnicode_FromString(kernel_names[level]));
    return Py_BuildValue("(sN)", kernel_names[active_kernels()], available);
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

static PyObject *qmatmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    QMatrix w = {0};
    void *x, *out;
    int x_dt, out_dt;
    Py_ssize_t x_stride, rows, out_stride;
    if (!parse_args(args, nargs, "qmatmul", "ippnnpinnpin", &w.kind, (void **)&w.weights,
                    (void **)&w.scales, &w.n, &w.k, &x, &x_dt, &x_stride, &rows, &out, &out_dt,
                    &out_stride))
        return NULL;
    if ((w.kind != Q4 && w.kind != Q8) || w.k % (w.kind == Q4 ? 2 * QBLOCK : QBLOCK))
        return PyErr_Format(PyExc_ValueError, "no q%d kernel for k = %zd", w.kind, w.k);
    Activations a;
    if (!activations_alloc(&a, rows, w.k))
        return PyErr_NoMemory();
    Py_BEGIN_ALLOW_THREADS
    qmatrix_apply(&w, x, x_dt, x_stride, rows, out, out_dt, out_stride, &a);
    Py_END_ALLOW_THREADS
    free(a.block);
    Py_RETURN_NONE;
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
