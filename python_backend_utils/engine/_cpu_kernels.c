/* CPU kernels for the engine: attention that reads the paged KV pool where it lies, and matrix
 * products with weights packed in panels, fp32 or int8.
 *
 * The torch path gathers every sequence's whole context out of the pool into a padded copy, for
 * every layer of every step, before attention reads it once more: at batch 8 with 1k tokens of
 * context that copy costs more than the step's matrix products. Here each sequence's query heads
 * read their K and V rows straight from the pool's blocks, once per KV head for the whole group
 * of query heads that share it (GQA). Scores and softmax are in fp32; the pool may be fp32 or
 * bf16. Attention is built with function multiversioning (AVX-512, AVX2, plain x86-64; the CPU
 * picks at load); the products pick AVX-512 or AVX2 at run time (see below).
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

/* Sum of the lanes as a tree of shuffles (4 dependent adds, not 16): a dot of head_dim 64 is only
 * 4 FMAs. The order of the additions is the same as halving the vector three times. */
INLINE float lane_sum(vec v)
{
    v += __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += __builtin_shufflevector(v, v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += __builtin_shufflevector(v, v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v += __builtin_shufflevector(v, v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
    return v[0];
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

/* Matrix products y = (x @ w^T) * scale + bias for the engine's linear layers, w packed in panels.
 *
 * A decode step multiplies a few rows of x by every weight once, so it is bound by how fast the
 * weights stream from memory, and MKL's sgemm, which re-packs the whole weight on every call,
 * streams them at a fraction of that for 2 to 32 rows. Here the weight is packed once, at load,
 * as panels of PANEL output channels: [ceil(n / PANEL)][k][PANEL], zero padded. Each panel is one
 * sequential stream; a tile of rows of x (packed as [k][block] so each step broadcasts one value a
 * row) keeps its accumulators in registers while the panel passes once, and the next tile of rows
 * reads the panel again from L2. x is packed in chunks of ROW_CHUNK rows, so that a prefill's rows
 * stay in L2 while every panel passes. int8 panels (one scale per output channel) are widened to
 * fp32 in registers for one tile, or once per panel into `widened` when more tiles share it.
 * AVX-512 where the CPU has it, AVX2 and FMA otherwise; the GIL is released.
 */
#define PANEL 32
#define ROW_CHUNK 256 /* a multiple of both tiles' rows */

typedef struct {
    const float *x;      /* [m, k] */
    const void *panels;  /* [ceil(n / PANEL), k, PANEL], fp32 or int8 */
    int is_int8;
    const float *scale;  /* [n] or NULL */
    const float *bias;   /* [n] or NULL */
    float *y;            /* [m, n] */
    int64_t m, n, k;
} PackedProduct;

/* x rows [0, rows) as [k][block]; rows past `rows` are zero so a short tile reads nothing stale. */
static void pack_rows(const float *x, int64_t rows, int64_t k, int block, float *packed)
{
    for (int64_t b = 0; b * block < rows; b++)
        for (int64_t i = 0; i < k; i++)
            for (int r = 0; r < block; r++) {
                int64_t row = b * block + r;
                packed[(b * k + i) * block + r] = row < rows ? x[row * k + i] : 0.0f;
            }
}

static void widen_panel(const int8_t *panel, int64_t k, float *out)
{
    for (int64_t i = 0; i < k * PANEL; i++)
        out[i] = (float)panel[i];
}

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define AVX2 __attribute__((target("avx2,fma")))
#define AVX512 __attribute__((target("avx512f")))
#define AVX512_ROWS 8 /* 16 accumulators of 16 floats */
#define AVX2_ROWS 2   /* 8 accumulators of 8 floats, next to the panel's 4 vectors */

/* The lines of the next panel one tile brings into L2 while it computes. The tiles of a panel
 * share them out, so the next panel streams in over the whole panel's compute: when the first
 * tile fetched it all, it ran at the memory's pace and the others at the core's, one after the
 * other (at 32 rows, 47 GFLOP/s streamed against 100 from L2). */
typedef struct {
    const char *lines; /* the first line of this tile's share, or NULL */
    int64_t count;     /* lines in the share */
} Prefetch;

#define PREFETCH_START(pf, k)                                                                                  \
    int64_t pf_every = (pf).count >= (k) ? 1 : (k) / ((pf).count ? (pf).count : 1);                           \
    int pf_per = (pf).count > (k) ? 2 : 1;                                                                     \
    int64_t pf_next = 0, pf_wait = 0;
#define PREFETCH_STEP(pf)                                                                                      \
    if (pf_next < (pf).count && pf_wait-- == 0) {                                                              \
        pf_wait = pf_every - 1;                                                                                \
        _mm_prefetch((pf).lines + 64 * pf_next, _MM_HINT_T1);                                                  \
        if (pf_per == 2 && pf_next + 1 < (pf).count)                                                           \
            _mm_prefetch((pf).lines + 64 * (pf_next + 1), _MM_HINT_T1);                                        \
        pf_next += pf_per;                                                                                     \
    }

/* One tile: `rows` rows of packed x against one panel (fp32, or int8 widened per step), then
 * scale, bias and a store of the panel's valid columns. `rows` and `int8` are constants at each
 * call, so the loops unroll and the accumulators stay in registers. */
AVX512 INLINE void tile_avx512(const float *xp, const float *wf, const int8_t *wq, int64_t k, int rows, int int8,
                               const float *scale, const float *bias, float *y, int64_t n, int64_t n0, Prefetch pf)
{
    __m512 acc[AVX512_ROWS][2];
    for (int r = 0; r < rows; r++)
        acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    PREFETCH_START(pf, k);
    for (int64_t i = 0; i < k; i++) {
        __m512 w0, w1;
        PREFETCH_STEP(pf);
        if (int8) {
            w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(wq + i * PANEL))));
            w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(wq + i * PANEL + 16))));
        } else {
            w0 = _mm512_loadu_ps(wf + i * PANEL);
            w1 = _mm512_loadu_ps(wf + i * PANEL + 16);
        }
        for (int r = 0; r < rows; r++) {
            __m512 xv = _mm512_set1_ps(xp[i * AVX512_ROWS + r]);
            acc[r][0] = _mm512_fmadd_ps(w0, xv, acc[r][0]);
            acc[r][1] = _mm512_fmadd_ps(w1, xv, acc[r][1]);
        }
    }
    int64_t valid = n - n0;
    __mmask16 m0 = valid >= 16 ? 0xFFFF : (__mmask16)((1u << valid) - 1);
    __mmask16 m1 = valid >= 32 ? 0xFFFF : valid > 16 ? (__mmask16)((1u << (valid - 16)) - 1) : 0;
    __m512 s0 = scale ? _mm512_maskz_loadu_ps(m0, scale + n0) : _mm512_set1_ps(1.0f);
    __m512 s1 = scale ? _mm512_maskz_loadu_ps(m1, scale + n0 + 16) : _mm512_set1_ps(1.0f);
    __m512 b0 = bias ? _mm512_maskz_loadu_ps(m0, bias + n0) : _mm512_setzero_ps();
    __m512 b1 = bias ? _mm512_maskz_loadu_ps(m1, bias + n0 + 16) : _mm512_setzero_ps();
    for (int r = 0; r < rows; r++) {
        _mm512_mask_storeu_ps(y + r * n + n0, m0, _mm512_fmadd_ps(acc[r][0], s0, b0));
        _mm512_mask_storeu_ps(y + r * n + n0 + 16, m1, _mm512_fmadd_ps(acc[r][1], s1, b1));
    }
}

AVX2 INLINE __m256 widen8(const int8_t *p)
{
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

AVX2 INLINE void tile_avx2(const float *xp, const float *wf, const int8_t *wq, int64_t k, int rows, int int8,
                           const float *scale, const float *bias, float *y, int64_t n, int64_t n0, Prefetch pf)
{
    __m256 acc[AVX2_ROWS][4];
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < 4; j++)
            acc[r][j] = _mm256_setzero_ps();
    PREFETCH_START(pf, k);
    for (int64_t i = 0; i < k; i++) {
        __m256 w[4];
        PREFETCH_STEP(pf);
        for (int j = 0; j < 4; j++)
            w[j] = int8 ? widen8(wq + i * PANEL + 8 * j) : _mm256_loadu_ps(wf + i * PANEL + 8 * j);
        for (int r = 0; r < rows; r++) {
            __m256 xv = _mm256_broadcast_ss(xp + i * AVX2_ROWS + r);
            for (int j = 0; j < 4; j++)
                acc[r][j] = _mm256_fmadd_ps(w[j], xv, acc[r][j]);
        }
    }
    int64_t valid = n - n0 < PANEL ? n - n0 : PANEL;
    for (int r = 0; r < rows; r++) {
        float sums[PANEL];
        for (int j = 0; j < 4; j++)
            _mm256_storeu_ps(sums + 8 * j, acc[r][j]);
        for (int64_t c = 0; c < valid; c++)
            y[r * n + n0 + c] = sums[c] * (scale ? scale[n0 + c] : 1.0f) + (bias ? bias[n0 + c] : 0.0f);
    }
}

/* The tiles of one panel for `rows` rows of packed x; `tile` is one of the two above. `next` is
 * the next panel as stored (NULL after the last) and `next_bytes` its size. */
#define PANEL_TILES(tile, block, xp, rows, wf, wq, int8, p, y, n0, next, next_bytes)                             \
    {                                                                                                          \
        int64_t tiles = ((rows) + (block) - 1) / (block), lines = (next) ? ((next_bytes) + 63) / 64 : 0;       \
        int64_t share = (lines + tiles - 1) / tiles;                                                           \
        for (int64_t b = 0; b < tiles; b++) {                                                                  \
            const float *xb = (xp) + b * (block) * (p)->k;                                                     \
            float *yb = (y) + b * (block) * (p)->n;                                                            \
            int64_t first = b * share < lines ? b * share : lines;                                             \
            Prefetch pf = {(const char *)(next) + 64 * first, (first + share < lines ? share : lines - first)}; \
            int left = (rows) - b * (block) < (block) ? (int)((rows) - b * (block)) : (block);                 \
            switch (left < (block) ? left : 0) {                                                               \
            case 1: tile(xb, wf, wq, (p)->k, 1 < (block) ? 1 : (block), int8, (p)->scale, (p)->bias, yb, (p)->n, n0, pf); break; \
            case 2: tile(xb, wf, wq, (p)->k, 2 < (block) ? 2 : (block), int8, (p)->scale, (p)->bias, yb, (p)->n, n0, pf); break; \
            case 3: tile(xb, wf, wq, (p)->k, 3 < (block) ? 3 : (block), int8, (p)->scale, (p)->bias, yb, (p)->n, n0, pf); break; \
            case 4: tile(xb, wf, wq, (p)->k, 4 < (block) ? 4 : (block), int8, (p)->scale, (p)->bias, yb, (p)->n, n0, pf); break; \
            case 5: tile(xb, wf, wq, (p)->k, 5 < (block) ? 5 : (block), int8, (p)->scale, (p)->bias, yb, (p)->n, n0, pf); break; \
            case 6: tile(xb, wf, wq, (p)->k, 6 < (block) ? 6 : (block), int8, (p)->scale, (p)->bias, yb, (p)->n, n0, pf); break; \
            case 7: tile(xb, wf, wq, (p)->k, 7 < (block) ? 7 : (block), int8, (p)->scale, (p)->bias, yb, (p)->n, n0, pf); break; \
            default: tile(xb, wf, wq, (p)->k, block, int8, (p)->scale, (p)->bias, yb, (p)->n, n0, pf); break;  \
            }                                                                                                  \
        }                                                                                                      \
    }

#define PACKED_PRODUCT(name, target, tile, block)                                                               \
    target static void name(const PackedProduct *p, float *xp, float *widened)                                  \
    {                                                                                                          \
        for (int64_t m0 = 0; m0 < p->m; m0 += ROW_CHUNK) {                                                     \
            int64_t rows = p->m - m0 < ROW_CHUNK ? p->m - m0 : ROW_CHUNK;                                      \
            float *y = p->y + m0 * p->n;                                                                       \
            pack_rows(p->x + m0 * p->k, rows, p->k, block, xp);                                                \
            for (int64_t n0 = 0; n0 < p->n; n0 += PANEL) {                                                     \
                int64_t panel = n0 / PANEL * p->k * PANEL, bytes = p->k * PANEL * (p->is_int8 ? 1 : 4);       \
                const char *next = n0 + PANEL < p->n                                                           \
                    ? (const char *)p->panels + (panel + p->k * PANEL) * (p->is_int8 ? 1 : 4) : NULL;         \
                if (!p->is_int8) {                                                                             \
                    const float *wf = (const float *)p->panels + panel;                                        \
                    PANEL_TILES(tile, block, xp, rows, wf, (const int8_t *)NULL, 0, p, y, n0, next, bytes)     \
                } else if (rows > (block)) {                                                                   \
                    widen_panel((const int8_t *)p->panels + panel, p->k, widened);                             \
                    PANEL_TILES(tile, block, xp, rows, widened, (const int8_t *)NULL, 0, p, y, n0, next, bytes) \
                } else {                                                                                       \
                    const int8_t *wq = (const int8_t *)p->panels + panel;                                      \
                    PANEL_TILES(tile, block, xp, rows, (const float *)NULL, wq, 1, p, y, n0, next, bytes)      \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
    }

PACKED_PRODUCT(packed_product_avx512, AVX512, tile_avx512, AVX512_ROWS)
PACKED_PRODUCT(packed_product_avx2, AVX2, tile_avx2, AVX2_ROWS)

enum { ISA_NONE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

static int best_isa(void)
{
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f"))
        return ISA_AVX512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))
        return ISA_AVX2;
    return ISA_NONE;
}

/* 0, or -1 when out of memory. `isa` is one the CPU has (checked by the caller). */
static int packed_product(const PackedProduct *p, int isa)
{
    int block = isa == ISA_AVX512 ? AVX512_ROWS : AVX2_ROWS;
    int64_t chunk = p->m < ROW_CHUNK ? (p->m + block - 1) / block * block : ROW_CHUNK;
    float *xp = malloc(chunk * p->k * sizeof(float));
    float *widened = p->is_int8 ? malloc(p->k * PANEL * sizeof(float)) : NULL;
    if (!xp || (p->is_int8 && !widened)) {
        free(xp);
        free(widened);
        return -1;
    }
    if (isa == ISA_AVX512)
        packed_product_avx512(p, xp, widened);
    else
        packed_product_avx2(p, xp, widened);
    free(xp);
    free(widened);
    return 0;
}
#else
enum { ISA_NONE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
static int best_isa(void) { return ISA_NONE; }
static int packed_product(const PackedProduct *p, int isa) { return -1; }
#endif

/* packed_linear(x, panels, is_int8, scale or 0, bias or 0, y, m, n, k, isa): addresses of
 * contiguous tensors; isa 2 is AVX-512, 1 AVX2 (tests run both where the CPU has them). */
static PyObject *py_packed_linear(PyObject *self, PyObject *args)
{
    unsigned long long x, panels, scale, bias, y;
    int is_int8, isa;
    long long m, n, k;
    if (!PyArg_ParseTuple(args, "KKpKKKLLLi:packed_linear", &x, &panels, &is_int8, &scale, &bias, &y, &m, &n, &k,
                          &isa))
        return NULL;
    if (m <= 0 || n <= 0 || k <= 0 || isa < ISA_AVX2 || isa > best_isa()) {
        PyErr_SetString(PyExc_ValueError, "m, n and k must be positive and isa one this CPU has (see best_isa())");
        return NULL;
    }
    PackedProduct p = {
        (const float *)(uintptr_t)x, (const void *)(uintptr_t)panels, is_int8,
        scale ? (const float *)(uintptr_t)scale : NULL, bias ? (const float *)(uintptr_t)bias : NULL,
        (float *)(uintptr_t)y, m, n, k,
    };
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = packed_product(&p, isa);
    Py_END_ALLOW_THREADS
    if (failed)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_best_isa(PyObject *self, PyObject *unused)
{
    return PyLong_FromLong(best_isa());
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

/* One decode step's transformer layers in one call, for steps where every sequence brings one
 * new token: per layer, RMSNorm, the QKV product, (per-head RMSNorm,) rotary embedding, the new
 * K and V written into the pool, attention over the pool in place, the output product and
 * residual, RMSNorm, the gate/up product, SiLU(gate) * up, the down product and residual. The
 * same arithmetic as the model's torch path (paged_causal_lm.py), without the ~20 operator calls
 * a layer costs there, which at a few rows take as long as streaming the weights. */
typedef struct {
    const float *input_norm, *post_norm, *q_norm, *k_norm; /* q_norm, k_norm: NULL unless the model has them */
    PackedProduct qkv, o, gate_up, down;                   /* x, y and m are filled in per step */
} DecodeLayer;

typedef struct {
    int64_t tokens, hidden, heads, kv_heads, head_dim, intermediate, layers, block_size, table_width;
    float eps;
    float *state;            /* [tokens, hidden]: the embeddings in, the last layer's output out */
    const float *cos, *sin;  /* [tokens, head_dim] at each token's position */
    const int64_t *rows;     /* [tokens] pool row of layer 0's K for each new token */
    void *pool;              /* [blocks, layers, 2, block_size, kv_heads, head_dim] fp32 or bf16 */
    int pool_is_bf16;
    const int32_t *tables, *lengths;
} DecodeStep;

static void rms_norm(const float *x, const float *weight, float eps, int64_t n, float *out)
{
    float squares = 0.0f;
    for (int64_t i = 0; i < n; i++)
        squares += x[i] * x[i];
    float inverse = 1.0f / sqrtf(squares / n + eps);
    for (int64_t i = 0; i < n; i++)
        out[i] = x[i] * inverse * weight[i];
}

/* x * cos + rotate_half(x) * sin, rotate_half(x) = (-x[half:], x[:half]), in place. */
static void rotate(float *x, const float *cos, const float *sin, int64_t d)
{
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* fp32 to bf16 as torch rounds it: to nearest, ties to even (NaN stays NaN). */
static uint16_t to_bf16(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffff) > 0x7f800000)
        return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

static void store_row(void *pool, int is_bf16, int64_t offset, const float *row, int64_t n)
{
    if (!is_bf16) {
        memcpy((float *)pool + offset, row, n * sizeof(float));
        return;
    }
    uint16_t *dst = (uint16_t *)pool + offset;
    for (int64_t i = 0; i < n; i++)
        dst[i] = to_bf16(row[i]);
}

static int run_product(PackedProduct p, const float *x, float *y, int64_t m, int isa)
{
    p.x = x;
    p.y = y;
    p.m = m;
    return packed_product(&p, isa);
}

static int decode_step(const DecodeStep *s, const DecodeLayer *layers, int isa)
{
    const int64_t t_count = s->tokens, h = s->hidden, d = s->head_dim;
    const int64_t q_width = s->heads * d, kv_width = s->kv_heads * d, qkv_width = q_width + 2 * kv_width;
    const int64_t inter = s->intermediate;
    float *normed = malloc(t_count * h * sizeof(float));
    float *qkv = malloc(t_count * qkv_width * sizeof(float));
    float *query = malloc(t_count * q_width * sizeof(float));
    float *attended = malloc(t_count * q_width * sizeof(float));
    float *projected = malloc(t_count * h * sizeof(float));
    float *gate_up = malloc(t_count * 2 * inter * sizeof(float));
    float *activated = malloc(t_count * inter * sizeof(float));
    int failed = !normed || !qkv || !query || !attended || !projected || !gate_up || !activated;
    const int64_t token_stride = kv_width, layer_rows = 2 * s->block_size;
    for (int64_t l = 0; l < s->layers && !failed; l++) {
        const DecodeLayer *layer = &layers[l];
        for (int64_t t = 0; t < t_count; t++)
            rms_norm(s->state + t * h, layer->input_norm, s->eps, h, normed + t * h);
        failed |= run_product(layer->qkv, normed, qkv, t_count, isa);
        for (int64_t t = 0; t < t_count && !failed; t++) {
            float *row = qkv + t * qkv_width;
            for (int64_t head = 0; head < s->heads + s->kv_heads; head++) {
                float *x = row + head * d;
                const float *norm = head < s->heads ? layer->q_norm : layer->k_norm;
                if (norm)
                    rms_norm(x, norm, s->eps, d, x);
                rotate(x, s->cos + t * d, s->sin + t * d, d);
            }
            memcpy(query + t * q_width, row, q_width * sizeof(float));
            int64_t key_row = s->rows[t] + l * layer_rows;
            store_row(s->pool, s->pool_is_bf16, key_row * token_stride, row + q_width, kv_width);
            store_row(s->pool, s->pool_is_bf16, (key_row + s->block_size) * token_stride, row + q_width + kv_width,
                      kv_width);
        }
        if (failed)
            break;
        DecodeAttention attention = {
            query, s->pool, s->pool_is_bf16, s->tables, s->lengths, attended,
            t_count, s->heads, s->kv_heads, d, s->block_size, l, s->layers, s->table_width, 1.0f / sqrtf((float)d),
        };
        failed |= decode_attention(&attention);
        failed |= run_product(layer->o, attended, projected, t_count, isa);
        for (int64_t i = 0; i < t_count * h; i++)
            s->state[i] += projected[i];
        for (int64_t t = 0; t < t_count; t++)
            rms_norm(s->state + t * h, layer->post_norm, s->eps, h, normed + t * h);
        failed |= run_product(layer->gate_up, normed, gate_up, t_count, isa);
        for (int64_t t = 0; t < t_count; t++)
            for (int64_t i = 0; i < inter; i++) {
                float gate = gate_up[t * 2 * inter + i];
                activated[t * inter + i] = gate / (1.0f + expf(-gate)) * gate_up[t * 2 * inter + inter + i];
            }
        failed |= run_product(layer->down, activated, projected, t_count, isa);
        for (int64_t i = 0; i < t_count * h; i++)
            s->state[i] += projected[i];
    }
    free(normed);
    free(qkv);
    free(query);
    free(attended);
    free(projected);
    free(gate_up);
    free(activated);
    return failed ? -1 : 0;
}

/* Fields of one layer in decode_layers' table of int64 words: addresses, 0 for none. */
enum { L_INPUT_NORM, L_POST_NORM, L_Q_NORM, L_K_NORM, L_QKV, L_QKV_SCALE, L_QKV_BIAS, L_O, L_O_SCALE, L_GATE_UP,
       L_GATE_UP_SCALE, L_DOWN, L_DOWN_SCALE, LAYER_FIELDS };

static PackedProduct product_of(const int64_t *fields, int panels, int scale, int bias, int is_int8, int64_t n,
                                int64_t k)
{
    PackedProduct p = {NULL, (const void *)(uintptr_t)fields[panels], is_int8,
                       fields[scale] ? (const float *)(uintptr_t)fields[scale] : NULL,
                       bias >= 0 && fields[bias] ? (const float *)(uintptr_t)fields[bias] : NULL, NULL, 0, n, k};
    return p;
}

/* decode_layers(table, is_int8, state, cos, sin, rows, pool, pool_is_bf16, tables, lengths, tokens, hidden,
 *               heads, kv_heads, head_dim, intermediate, layers, block_size, table_width, eps, isa) */
static PyObject *py_decode_layers(PyObject *self, PyObject *args)
{
    unsigned long long table, state, cos, sin, rows, pool, tables, lengths;
    int is_int8, is_bf16, isa;
    long long tokens, hidden, heads, kv_heads, head_dim, intermediate, layers, block_size, width;
    float eps;
    if (!PyArg_ParseTuple(args, "KpKKKKKpKKLLLLLLLLLfi:decode_layers", &table, &is_int8, &state, &cos, &sin, &rows,
                          &pool, &is_bf16, &tables, &lengths, &tokens, &hidden, &heads, &kv_heads, &head_dim,
                          &intermediate, &layers, &block_size, &width, &eps, &isa))
        return NULL;
    if (tokens <= 0 || layers <= 0 || kv_heads <= 0 || heads % kv_heads || head_dim % LANES || head_dim % 2 ||
        isa < ISA_AVX2 || isa > best_isa()) {
        PyErr_SetString(PyExc_ValueError, "heads must be a multiple of kv_heads, head_dim of 16, and isa one this "
                        "CPU has");
        return NULL;
    }
    DecodeLayer *decode = malloc(layers * sizeof(DecodeLayer));
    if (!decode)
        return PyErr_NoMemory();
    const int64_t qkv_width = (heads + 2 * kv_heads) * head_dim;
    for (long long l = 0; l < layers; l++) {
        const int64_t *f = (const int64_t *)(uintptr_t)table + l * LAYER_FIELDS;
        DecodeLayer layer = {
            (const float *)(uintptr_t)f[L_INPUT_NORM], (const float *)(uintptr_t)f[L_POST_NORM],
            f[L_Q_NORM] ? (const float *)(uintptr_t)f[L_Q_NORM] : NULL,
            f[L_K_NORM] ? (const float *)(uintptr_t)f[L_K_NORM] : NULL,
            product_of(f, L_QKV, L_QKV_SCALE, L_QKV_BIAS, is_int8, qkv_width, hidden),
            product_of(f, L_O, L_O_SCALE, -1, is_int8, hidden, heads * head_dim),
            product_of(f, L_GATE_UP, L_GATE_UP_SCALE, -1, is_int8, 2 * intermediate, hidden),
            product_of(f, L_DOWN, L_DOWN_SCALE, -1, is_int8, hidden, intermediate),
        };
        decode[l] = layer;
    }
    DecodeStep step = {
        tokens, hidden, heads, kv_heads, head_dim, intermediate, layers, block_size, width, eps,
        (float *)(uintptr_t)state, (const float *)(uintptr_t)cos, (const float *)(uintptr_t)sin,
        (const int64_t *)(uintptr_t)rows, (void *)(uintptr_t)pool, is_bf16,
        (const int32_t *)(uintptr_t)tables, (const int32_t *)(uintptr_t)lengths,
    };
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = decode_step(&step, decode, isa);
    Py_END_ALLOW_THREADS
    free(decode);
    if (failed)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"best_isa", py_best_isa, METH_NOARGS, "2 with AVX-512, 1 with AVX2 and FMA, 0 without (no packed_linear)."},
    {"decode_layers", py_decode_layers, METH_VARARGS,
     "Every transformer layer of a decode-only step (one new token per sequence), weights packed."},
    {"decode_attention", py_decode_attention, METH_VARARGS,
     "Attention of one new token per sequence over its paged KV, read in place."},
    {"packed_linear", py_packed_linear, METH_VARARGS,
     "y = (x @ w^T) * scale + bias with w packed in panels of 32 output channels, fp32 or int8."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpu_kernels(void)
{
    return PyModule_Create(&module);
}
