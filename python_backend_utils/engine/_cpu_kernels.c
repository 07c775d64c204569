/* CPU kernels for the decode step: attention that reads the paged KV pool where it lies, and
 * matrix products with int8 weights.
 *
 * The torch path gathers every sequence's whole context out of the pool into a padded copy, for
 * every layer of every step, before attention reads it once more: at batch 8 with 1k tokens of
 * context that copy costs more than the step's matrix products. Here each sequence's query heads
 * read their K and V rows straight from the pool's blocks, once per KV head for the whole group
 * of query heads that share it (GQA). Scores and softmax are in fp32; the pool may be fp32 or
 * bf16.
 *
 * int8 weights (one scale per output channel) with fp32 activations: a decode step streams each
 * weight once for a few rows, so a quarter of the bytes is most of a 4x; the activations stay
 * fp32 (quantizing them too, as fbgemm's dynamic linear does, loses this model's outlier
 * channels). The GIL is released. Built with function multiversioning: the loops are compiled for
 * AVX-512, AVX2 and plain x86-64, and the CPU picks at load.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MULTIVERSION __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MULTIVERSION
#endif

#define LANES 16 /* floats per vector: one AVX-512 register, two AVX2 ones, four SSE ones */
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

typedef struct {
    const float *query;      /* [batch, heads, head_dim] */
    const void *pool;        /* [blocks, layers, 2, block_size, kv_heads, head_dim] */
    int pool_is_bf16;
    const int32_t *tables;   /* [batch, table_width] block ids */
    const int32_t *lengths;  /* [batch] context tokens, the new one included */
    float *out;              /* [batch, heads, head_dim] */
    int64_t batch, heads, kv_heads, head_dim, block_size, layer, layers, table_width;
    float scale;
} DecodeAttention;

#define INLINE static inline __attribute__((always_inline))

/* A K or V row as fp32: in place for an fp32 pool, widened into `buffer` for a bf16 one. */
INLINE const float *row_at(const void *pool, int is_bf16, int64_t offset, int64_t n, float *buffer)
{
    if (!is_bf16)
        return (const float *)pool + offset;
    const uint16_t *src = (const uint16_t *)pool + offset;
    uint32_t *dst = (uint32_t *)buffer;
    for (int64_t i = 0; i < n; i++)
        dst[i] = (uint32_t)src[i] << 16;
    return buffer;
}

INLINE vec load(const float *p)
{
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* Sum of the lanes as a tree (4 dependent adds, not 16): a dot of head_dim 64 is only 4 FMAs. */
INLINE float lane_sum(vec v)
{
    float half[LANES / 2], quarter[LANES / 4];
    for (int j = 0; j < LANES / 2; j++)
        half[j] = v[j] + v[j + LANES / 2];
    for (int j = 0; j < LANES / 4; j++)
        quarter[j] = half[j] + half[j + LANES / 4];
    return (quarter[0] + quarter[2]) + (quarter[1] + quarter[3]);
}

INLINE float dot(const float *a, const float *b, int64_t n)
{
    vec partial = {0};
    for (int64_t i = 0; i < n; i += LANES)
        partial += load(a + i) * load(b + i);
    return lane_sum(partial);
}

INLINE void add_scaled(float *acc, const float *row, float weight, int64_t n)
{
    for (int64_t i = 0; i < n; i += LANES) {
        vec sum = load(acc + i) + weight * load(row + i);
        memcpy(acc + i, &sum, sizeof sum);
    }
}

/* One sequence, every head: each token's K row (all KV heads, contiguous) is read once, for
 * every query head, then each V row likewise. `scores` holds heads*length floats, `row` a widened
 * row of a bf16 pool. Compiled once per instruction set, with the helpers inlined. */
MULTIVERSION
static void attend_sequence(const DecodeAttention *a, int64_t seq, float *scores, float *row)
{
    const int64_t d = a->head_dim, heads = a->heads, group = heads / a->kv_heads, length = a->lengths[seq];
    const int64_t token_stride = a->kv_heads * d;
    const int64_t block_stride = a->layers * 2 * a->block_size * token_stride;
    const int64_t key_offset = a->layer * 2 * a->block_size * token_stride;
    const int64_t value_offset = key_offset + a->block_size * token_stride;
    const int32_t *table = a->tables + seq * a->table_width;
    const float *query = a->query + seq * heads * d;
    float *out = a->out + seq * heads * d;

    for (int64_t t = 0; t < length; t++) {
        int64_t at = table[t / a->block_size] * block_stride + (t % a->block_size) * token_stride;
        const float *k = row_at(a->pool, a->pool_is_bf16, at + key_offset, token_stride, row);
        for (int64_t h = 0; h < heads; h++)
            scores[h * length + t] = dot(query + h * d, k + (h / group) * d, d) * a->scale;
    }
    for (int64_t h = 0; h < heads; h++) {
        float *s = scores + h * length, peak = -INFINITY, total = 0.0f;
        for (int64_t t = 0; t < length; t++)
            peak = s[t] > peak ? s[t] : peak;
        for (int64_t t = 0; t < length; t++)
            total += (s[t] = expf(s[t] - peak));
        for (int64_t t = 0; t < length; t++)
            s[t] /= total;
    }
    memset(out, 0, heads * d * sizeof(float));
    for (int64_t t = 0; t < length; t++) {
        int64_t at = table[t / a->block_size] * block_stride + (t % a->block_size) * token_stride;
        const float *v = row_at(a->pool, a->pool_is_bf16, at + value_offset, token_stride, row);
        for (int64_t h = 0; h < heads; h++)
            add_scaled(out + h * d, v + (h / group) * d, scores[h * length + t], d);
    }
}

static int decode_attention(const DecodeAttention *a)
{
    int64_t longest = 0;
    for (int64_t s = 0; s < a->batch; s++)
        longest = a->lengths[s] > longest ? a->lengths[s] : longest;
    float *scratch = malloc((a->heads * longest + a->kv_heads * a->head_dim) * sizeof(float));
    if (!scratch)
        return -1;
    for (int64_t s = 0; s < a->batch; s++)
        attend_sequence(a, s, scratch, scratch + a->heads * longest);
    free(scratch);
    return 0;
}

#define ROWS_AT_ONCE 4 /* rows of x that share each pass over two weight rows */

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma")))

AVX2 INLINE __m256 widen8(const int8_t *p)
{
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

AVX2 INLINE float sum8(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* Weight rows n0 and n0 + 1, as int8 (widened on the fly) or as floats widened once for many rows of x. */
typedef struct {
    const int8_t *w0, *w1;
    const float *f0, *f1;
} WeightPair;

/* y[m, n] = scale[n] * (x[m, :] . w[n, :]) + bias[n] for n in [n0, n0 + 2), m in [m0, m0 + rows). */
AVX2 INLINE void int8_tile_avx2(const float *x, WeightPair pair, const float *scale, const float *bias, float *y,
                                int64_t n, int64_t k, int64_t n0, int64_t m0, int rows)
{
    __m256 acc0[ROWS_AT_ONCE], acc1[ROWS_AT_ONCE];
    for (int r = 0; r < rows; r++)
        acc0[r] = acc1[r] = _mm256_setzero_ps();
    for (int64_t i = 0; i < k; i += 8) {
        __m256 a = pair.f0 ? _mm256_loadu_ps(pair.f0 + i) : widen8(pair.w0 + i);
        __m256 b = pair.f1 ? _mm256_loadu_ps(pair.f1 + i) : widen8(pair.w1 + i);
        for (int r = 0; r < rows; r++) {
            __m256 xv = _mm256_loadu_ps(x + (m0 + r) * k + i);
            acc0[r] = _mm256_fmadd_ps(a, xv, acc0[r]);
            acc1[r] = _mm256_fmadd_ps(b, xv, acc1[r]);
        }
    }
    for (int r = 0; r < rows; r++) {
        y[(m0 + r) * n + n0] = sum8(acc0[r]) * (scale ? scale[n0] : 1.0f) + (bias ? bias[n0] : 0.0f);
        y[(m0 + r) * n + n0 + 1] = sum8(acc1[r]) * (scale ? scale[n0 + 1] : 1.0f) + (bias ? bias[n0 + 1] : 0.0f);
    }
}

/* One row of x (decode at batch 1): four weight rows at once, each with two accumulators, so
 * that eight independent FMA chains keep the loads streaming. */
AVX2 static void int8_gemv_avx2(const float *x, const int8_t *w, const float *scale, const float *bias, float *y,
                                int64_t n, int64_t k)
{
    int64_t n0 = 0;
    for (; n0 + 4 <= n; n0 += 4) {
        __m256 acc[8];
        for (int j = 0; j < 8; j++)
            acc[j] = _mm256_setzero_ps();
        const int8_t *row = w + n0 * k;
        for (int64_t i = 0; i + 16 <= k; i += 16) {
            __m256 x0 = _mm256_loadu_ps(x + i), x1 = _mm256_loadu_ps(x + i + 8);
            for (int j = 0; j < 4; j++) {
                acc[2 * j] = _mm256_fmadd_ps(widen8(row + j * k + i), x0, acc[2 * j]);
                acc[2 * j + 1] = _mm256_fmadd_ps(widen8(row + j * k + i + 8), x1, acc[2 * j + 1]);
            }
        }
        if (k % 16)
            for (int j = 0; j < 4; j++)
                acc[2 * j] = _mm256_fmadd_ps(widen8(row + j * k + k - 8), _mm256_loadu_ps(x + k - 8), acc[2 * j]);
        for (int j = 0; j < 4; j++)
            y[n0 + j] = sum8(_mm256_add_ps(acc[2 * j], acc[2 * j + 1])) * scale[n0 + j] + (bias ? bias[n0 + j] : 0.0f);
    }
    for (; n0 < n; n0 += 2) {
        WeightPair pair = {w + n0 * k, w + (n0 + 1) * k, NULL, NULL};
        int8_tile_avx2(x, pair, scale, bias, y, n, k, n0, 0, 1);
    }
}

/* fp32 weights, row-major [n, k] as torch keeps them: pairs of weight rows against tiles of
 * ROWS_AT_ONCE rows of x, the pair staying in L1 between tiles. MKL's sgemm packs the whole weight
 * on every call, which costs more than the product itself at a few rows (linear.SKINNY_FP32_ROWS;
 * at one row MKL streams the weight as fast as a gemv here did, so the model never asks for it). */
AVX2 static void fp32_linear_avx2(const float *x, const float *w, const float *bias, float *y,
                                  int64_t m, int64_t n, int64_t k)
{
    for (int64_t n0 = 0; n0 < n; n0 += 2) {
        WeightPair pair = {NULL, NULL, w + n0 * k, w + (n0 + 1) * k};
        for (int64_t m0 = 0; m0 < m; m0 += ROWS_AT_ONCE) {
            switch (m - m0 < ROWS_AT_ONCE ? m - m0 : ROWS_AT_ONCE) {
            case 1: int8_tile_avx2(x, pair, NULL, bias, y, n, k, n0, m0, 1); break;
            case 2: int8_tile_avx2(x, pair, NULL, bias, y, n, k, n0, m0, 2); break;
            case 3: int8_tile_avx2(x, pair, NULL, bias, y, n, k, n0, m0, 3); break;
            default: int8_tile_avx2(x, pair, NULL, bias, y, n, k, n0, m0, 4); break;
            }
        }
    }
}

/* `widened` holds 2k floats: with more rows of x than one tile, each weight pair is widened once. */
AVX2 static void int8_linear_avx2(const float *x, const int8_t *w, const float *scale, const float *bias, float *y,
                                  int64_t m, int64_t n, int64_t k, float *widened)
{
    for (int64_t n0 = 0; n0 < n; n0 += 2) {
        WeightPair pair = {w + n0 * k, w + (n0 + 1) * k, NULL, NULL};
        if (m > ROWS_AT_ONCE) {
            for (int64_t i = 0; i < k; i += 8) {
                _mm256_storeu_ps(widened + i, widen8(pair.w0 + i));
                _mm256_storeu_ps(widened + k + i, widen8(pair.w1 + i));
            }
            pair.f0 = widened;
            pair.f1 = widened + k;
        }
        /* `rows` is a constant in each call below, so the accumulators live in registers. */
        for (int64_t m0 = 0; m0 < m; m0 += ROWS_AT_ONCE) {
            switch (m - m0 < ROWS_AT_ONCE ? m - m0 : ROWS_AT_ONCE) {
            case 1: int8_tile_avx2(x, pair, scale, bias, y, n, k, n0, m0, 1); break;
            case 2: int8_tile_avx2(x, pair, scale, bias, y, n, k, n0, m0, 2); break;
            case 3: int8_tile_avx2(x, pair, scale, bias, y, n, k, n0, m0, 3); break;
            default: int8_tile_avx2(x, pair, scale, bias, y, n, k, n0, m0, 4); break;
            }
        }
    }
}

static int have_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#else
static int have_avx2(void) { return 0; }
#endif

static void int8_linear_portable(const float *x, const int8_t *w, const float *scale, const float *bias, float *y,
                                 int64_t m, int64_t n, int64_t k)
{
    for (int64_t r = 0; r < m; r++)
        for (int64_t c = 0; c < n; c++) {
            float sum = 0.0f;
            for (int64_t i = 0; i < k; i++)
                sum += x[r * k + i] * (float)w[c * k + i];
            y[r * n + c] = sum * scale[c] + (bias ? bias[c] : 0.0f);
        }
}

static int int8_linear(const float *x, const int8_t *w, const float *scale, const float *bias, float *y,
                       int64_t m, int64_t n, int64_t k)
{
#if defined(__x86_64__) && defined(__GNUC__)
    if (have_avx2() && m == 1) {
        int8_gemv_avx2(x, w, scale, bias, y, n, k);
        return 0;
    }
    if (have_avx2()) {
        float *widened = malloc(2 * k * sizeof(float));
        if (!widened)
            return -1;
        int8_linear_avx2(x, w, scale, bias, y, m, n, k, widened);
        free(widened);
        return 0;
    }
#endif
    int8_linear_portable(x, w, scale, bias, y, m, n, k);
    return 0;
}

/* fp32_linear(x, w, bias or 0, y, m, n, k): x [m, k], w [n, k], bias [n], y [m, n], all fp32. */
static PyObject *py_fp32_linear(PyObject *self, PyObject *args)
{
    unsigned long long x, w, bias, y;
    long long m, n, k;
    if (!PyArg_ParseTuple(args, "KKKKLLL:fp32_linear", &x, &w, &bias, &y, &m, &n, &k))
        return NULL;
    if (m <= 0 || n <= 0 || n % 2 || k % 8 || !have_avx2()) {
        PyErr_SetString(PyExc_ValueError, "n must be even, k a multiple of 8, and the CPU must have AVX2 and FMA");
        return NULL;
    }
#if defined(__x86_64__) && defined(__GNUC__)
    Py_BEGIN_ALLOW_THREADS
    fp32_linear_avx2((const float *)(uintptr_t)x, (const float *)(uintptr_t)w,
                     bias ? (const float *)(uintptr_t)bias : NULL, (float *)(uintptr_t)y, m, n, k);
    Py_END_ALLOW_THREADS
#endif
    Py_RETURN_NONE;
}

static PyObject *py_has_avx2(PyObject *self, PyObject *unused)
{
    return PyBool_FromLong(have_avx2());
}

/* int8_linear(x, w, scale, bias or 0, y, m, n, k): x fp32 [m, k], w int8 [n, k], scale/bias fp32 [n]. */
static PyObject *py_int8_linear(PyObject *self, PyObject *args)
{
    unsigned long long x, w, scale, bias, y;
    long long m, n, k;
    if (!PyArg_ParseTuple(args, "KKKKKLLL:int8_linear", &x, &w, &scale, &bias, &y, &m, &n, &k))
        return NULL;
    if (m <= 0 || n <= 0 || n % 2 || k % 8) {
        PyErr_SetString(PyExc_ValueError, "n must be even and k a multiple of 8");
        return NULL;
    }
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = int8_linear((const float *)(uintptr_t)x, (const int8_t *)(uintptr_t)w, (const float *)(uintptr_t)scale,
                         bias ? (const float *)(uintptr_t)bias : NULL, (float *)(uintptr_t)y, m, n, k);
    Py_END_ALLOW_THREADS
    if (failed)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* decode_attention(query, pool, pool_is_bf16, tables, lengths, out, batch, heads, kv_heads, head_dim,
 *                  block_size, layer, layers, table_width, scale): addresses of contiguous tensors. */
static PyObject *py_decode_attention(PyObject *self, PyObject *args)
{
    unsigned long long query, pool, tables, lengths, out;
    int is_bf16;
    long long batch, heads, kv_heads, head_dim, block_size, layer, layers, width;
    float scale;
    if (!PyArg_ParseTuple(args, "KKpKKKLLLLLLLLf:decode_attention", &query, &pool, &is_bf16, &tables, &lengths,
                          &out, &batch, &heads, &kv_heads, &head_dim, &block_size, &layer, &layers, &width,
                          &scale))
        return NULL;
    if (batch <= 0 || kv_heads <= 0 || heads % kv_heads || head_dim % LANES) {
        PyErr_SetString(PyExc_ValueError, "heads must be a multiple of kv_heads and head_dim of 16");
        return NULL;
    }
    DecodeAttention a = {
        (const float *)(uintptr_t)query, (const void *)(uintptr_t)pool, is_bf16,
        (const int32_t *)(uintptr_t)tables, (const int32_t *)(uintptr_t)lengths, (float *)(uintptr_t)out,
        batch, heads, kv_heads, head_dim, block_size, layer, layers, width, scale,
    };
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = decode_attention(&a);
    Py_END_ALLOW_THREADS
    if (failed)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"decode_attention", py_decode_attention, METH_VARARGS,
     "Attention of one new token per sequence over its paged KV, read in place."},
    {"fp32_linear", py_fp32_linear, METH_VARARGS, "y = x @ w^T + bias for a few rows of x (AVX2 and FMA)."},
    {"has_avx2", py_has_avx2, METH_NOARGS, "Whether this CPU has AVX2 and FMA (fp32_linear needs them)."},
    {"int8_linear", py_int8_linear, METH_VARARGS, "y = (x @ w^T) * scale + bias with int8 w, fp32 x and y."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpu_kernels(void)
{
    return PyModule_Create(&module);
}
