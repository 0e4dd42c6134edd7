/*
 * Float32 matrix products for decode steps of float32 models (part of backend._cpu_ops,
 * included by _cpu_ops.c after _cpu_quant.h, whose kernel levels choose the variant).
 *
 * out[r] = W x[r] (+ bias) for a few rows x[r]: a decode step of a float32 model is bound by
 * reading W once (4 bytes per weight). torch's single-threaded float32 GEMV reads ~14 GB/s
 * on the EPYC cores we measure on; this kernel streams each weight row once per call at the
 * core's load bandwidth. Tiles of 4 weight rows x 2 activation rows keep 8 vector
 * accumulators, so every weight load feeds two FMAs; a 4-row weight tile (16 KB for
 * k = 1024) stays in L1 while the activation-row pairs pass over it.
 *
 * Variants: 8-float GCC vectors (target_clones AVX2 / baseline) and, at the "avx512-vnni"
 * kernel level, 16-float AVX-512 vectors over tiles of 8 weight rows (about a third more
 * bandwidth on Zen 5).
 * Numerics: each output is the sum over lanes of 8- (16-) float partial sums taken in k
 * order (the k % 8 tail added in order after them; AVX-512: masked into the last vector),
 * then the bias: the same operations whatever the number of rows and wherever a row sits
 * in the batch (a request's logits do not depend on its batch). They differ from torch's
 * GEMV only in summation order.
 */

/* Dot products of 4 weight rows w[c] with activation row xa, and with xb when `pair`:
 * ya[c] = w[c] . xa, yb[c] = w[c] . xb; per output the same operations whether or not the
 * row is paired (`pair` is a constant where this is inlined). */
HELPER void fdot_4x2(const float *const w[4], const float *xa, const float *xb, Py_ssize_t k,
                     int pair, float ya[4], float yb[4])
{
    Py_ssize_t kv = k - k % 8;
    v8f a[4] = {{0}}, b[4] = {{0}};
    for (Py_ssize_t j = 0; j < kv; j += 8) {
        v8f xav = load8(xa + j), xbv = pair ? load8(xb + j) : xav;
        for (int c = 0; c < 4; c++) {
            v8f wv = load8(w[c] + j);
            a[c] += wv * xav;
            if (pair)
                b[c] += wv * xbv;
        }
    }
    for (int c = 0; c < 4; c++) {
        ya[c] = hsum8(a[c]);
        yb[c] = pair ? hsum8(b[c]) : 0.0f;
        for (Py_ssize_t j = kv; j < k; j++) {
            ya[c] += w[c][j] * xa[j];
            if (pair)
                yb[c] += w[c][j] * xb[j];
        }
    }
}

/* out rows r (out_stride apart, out_dt) = W [n, k] (float32, contiguous) x rows r (float32,
 * contiguous, k apart) + bias (float32 [n] or NULL), for `rows` rows. */
VECTORIZED static void fmatrix_rows(const float *weights, Py_ssize_t n, Py_ssize_t k,
                                    const float *bias, const float *x, Py_ssize_t rows,
                                    void *out, int out_dt, Py_ssize_t out_stride)
{
    for (Py_ssize_t i = 0; i < n; i += 4) {
        Py_ssize_t count = n - i < 4 ? n - i : 4;
        const float *w[4];
        for (Py_ssize_t c = 0; c < 4; c++) /* a short last tile repeats its last row */
            w[c] = weights + (i + (c < count ? c : count - 1)) * k;
        for (Py_ssize_t r = 0; r < rows; r += 2) {
            const float *xa = x + r * k;
            int pair = r + 1 < rows;
            float ya[4], yb[4];
            if (pair)
                fdot_4x2(w, xa, xa + k, k, 1, ya, yb);
            else
                fdot_4x2(w, xa, xa, k, 0, ya, yb);
            for (int j = 0; j <= pair; j++) {
                float *y = j ? yb : ya;
                if (bias)
                    for (Py_ssize_t c = 0; c < count; c++)
                        y[c] += bias[i + c];
                store_row(AT(out, out_dt, (r + j) * out_stride + i), out_dt, y, count);
            }
        }
    }
}

#ifdef HAVE_AVX2_KERNELS
#define FTILE512 8 /* weight rows per AVX-512 tile: 8 streams read ~7% faster than 4 */

/* Dot products of FTILE512 weight rows with xa (and xb when `pair`) in 16-float AVX-512
 * vectors, the k % 16 tail through masked loads: per output the same operations whether or
 * not the row is paired (`pair` is a constant where this is inlined). */
AVX512_TARGET static inline __attribute__((always_inline)) void
fdot_tile_avx512(const float *const w[FTILE512], const float *xa, const float *xb,
                 Py_ssize_t k, int pair, float ya[FTILE512], float yb[FTILE512])
{
    __m512 a[FTILE512], b[FTILE512];
    for (int c = 0; c < FTILE512; c++)
        a[c] = b[c] = _mm512_setzero_ps();
    Py_ssize_t kv = k - k % 16;
    for (Py_ssize_t j = 0; j < kv; j += 16) { /* unmasked: masked loads halve the bandwidth */
        __m512 xav = _mm512_loadu_ps(xa + j), xbv = pair ? _mm512_loadu_ps(xb + j) : xav;
        for (int c = 0; c < FTILE512; c++) {
            __m512 wv = _mm512_loadu_ps(w[c] + j);
            a[c] = _mm512_fmadd_ps(wv, xav, a[c]);
            if (pair)
                b[c] = _mm512_fmadd_ps(wv, xbv, b[c]);
        }
    }
    if (kv < k) {
        __mmask16 m = (__mmask16)((1u << (k - kv)) - 1);
        __m512 xav = _mm512_maskz_loadu_ps(m, xa + kv);
        __m512 xbv = pair ? _mm512_maskz_loadu_ps(m, xb + kv) : xav;
        for (int c = 0; c < FTILE512; c++) {
            __m512 wv = _mm512_maskz_loadu_ps(m, w[c] + kv);
            a[c] = _mm512_fmadd_ps(wv, xav, a[c]);
            if (pair)
                b[c] = _mm512_fmadd_ps(wv, xbv, b[c]);
        }
    }
    for (int c = 0; c < FTILE512; c++) {
        ya[c] = _mm512_reduce_add_ps(a[c]);
        if (pair)
            yb[c] = _mm512_reduce_add_ps(b[c]);
    }
}

/* fmatrix_rows with AVX-512 (the "avx512-vnni" kernel level). */
AVX512_TARGET static void fmatrix_rows_avx512(const float *weights, Py_ssize_t n, Py_ssize_t k,
                                              const float *bias, const float *x,
                                              Py_ssize_t rows, void *out, int out_dt,
                                              Py_ssize_t out_stride)
{
    for (Py_ssize_t i = 0; i < n; i += FTILE512) {
        Py_ssize_t count = n - i < FTILE512 ? n - i : FTILE512;
        const float *w[FTILE512];
        for (Py_ssize_t c = 0; c < FTILE512; c++) /* a short last tile repeats its last row */
            w[c] = weights + (i + (c < count ? c : count - 1)) * k;
        for (Py_ssize_t r = 0; r < rows; r += 2) {
            const float *xa = x + r * k;
            int pair = r + 1 < rows;
            float y[2][FTILE512];
            if (pair)
                fdot_tile_avx512(w, xa, xa + k, k, 1, y[0], y[1]);
            else
                fdot_tile_avx512(w, xa, xa, k, 0, y[0], y[1]);
            for (int p = 0; p <= pair; p++) {
                if (bias)
                    for (Py_ssize_t c = 0; c < count; c++)
                        y[p][c] += bias[i + c];
                store_row(AT(out, out_dt, (r + p) * out_stride + i), out_dt, y[p], count);
            }
        }
    }
}
#endif

typedef void (*FMatrixRows)(const float *, Py_ssize_t, Py_ssize_t, const float *, const float *,
                            Py_ssize_t, void *, int, Py_ssize_t);

/* The float32 kernel of the active kernel level (quant_kernels selects it for tests). */
static FMatrixRows fmatrix_kernel(void)
{
#ifdef HAVE_AVX2_KERNELS
    if (active_kernels() == KERNELS_AVX512)
        return fmatrix_rows_avx512;
#endif
    return fmatrix_rows;
}

/* fmatrix_rows for x rows of any dtype and stride (converted to float32 once; a float32
 * x with stride k is read in place). Returns 0, having written nothing, when the conversion
 * buffer cannot be allocated (no Python exception: this may run without the GIL). */
static int fmatrix_apply(const float *weights, Py_ssize_t n, Py_ssize_t k, const float *bias,
                         const void *x, int x_dt, Py_ssize_t x_stride, Py_ssize_t rows,
                         void *out, int out_dt, Py_ssize_t out_stride)
{
    float *converted = NULL;
    const float *xf = x;
    if (x_dt != DT_F32 || x_stride != k) {
        converted = malloc((size_t)(rows * k) * sizeof(float));
        if (!converted)
            return 0;
        for (Py_ssize_t r = 0; r < rows; r++)
            load_row(converted + r * k, AT(x, x_dt, r * x_stride), x_dt, k);
        xf = converted;
    }
    fmatrix_kernel()(weights, n, k, bias, xf, rows, out, out_dt, out_stride);
    free(converted);
    return 1;
}

PyDoc_STRVAR(fmatmul_doc,
"fmatmul(weights, n, k, bias, x, x_dt, x_stride, rows, out, out_dt, out_stride)\n"
"out[r] = weights @ x[r] + bias for rows r < rows: weights float32 [n, k] contiguous, bias\n"
"float32 [n] or 0, x rows x_stride apart (x_dt), out rows out_stride apart (out_dt).");

static PyObject *fmatmul(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    void *weights, *bias, *x, *out;
    int x_dt, out_dt;
    Py_ssize_t n, k, x_stride, rows, out_stride;
    if (!parse_args(args, nargs, "fmatmul", "pnnppinnpin", &weights, &n, &k, &bias, &x, &x_dt,
                    &x_stride, &rows, &out, &out_dt, &out_stride))
        return NULL;
    int ok;
    Py_BEGIN_ALLOW_THREADS
    ok = fmatrix_apply(weights, n, k, bias, x, x_dt, x_stride, rows, out, out_dt, out_stride);
    Py_END_ALLOW_THREADS
    if (!ok)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}
