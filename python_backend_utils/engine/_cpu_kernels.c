/* CPU kernels for the engine: attention that reads the paged KV pool where it lies, and matrix
 * products with weights packed in panels, fp32 or int8.
 *
 * The torch path gathers every sequence's whole context out of the pool into a padded copy, for
 * every layer of every step, before attention reads it once more: at batch 8 with 1k tokens of
 * context that copy costs more than the step's matrix products. Here each sequence's query heads
 * read their K and V rows straight from the pool's blocks, once per KV head for the whole group
 * of query heads that share it (GQA). Scores and softmax are in fp32; the pool may be fp32 or
 * bf16. Attention is built with function multiversioning (AVX-512, AVX2, plain x86-64; the CPU
 * picks at load); the products pick AMX, AVX512-BF16, AVX-512 or AVX2 at run time (see below).
 *
 * Threads: every call takes the engine's thread count. With more than one, a product splits its
 * panels and attention its (sequence, KV head) pairs over an OpenMP team; with one, no team is
 * made and the code is the single-threaded one.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

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

/* One sequence, the query heads of one KV head: each token's K row of that head is read once for
 * every query head of the group, then each V row likewise. `scores` holds group*length floats,
 * `row` a widened row of a bf16 pool. Compiled once per instruction set, with the helpers inlined. */
MULTIVERSION
static void attend_group(const DecodeAttention *a, int64_t seq, int64_t kv_head, float *scores, float *row)
{
    const int64_t d = a->head_dim, group = a->heads / a->kv_heads, length = a->lengths[seq];
    const int64_t token_stride = a->kv_heads * d;
    const int64_t block_stride = a->layers * 2 * a->block_size * token_stride;
    const int64_t key_offset = a->layer * 2 * a->block_size * token_stride + kv_head * d;
    const int64_t value_offset = key_offset + a->block_size * token_stride;
    const int32_t *table = a->tables + seq * a->table_width;
    const float *query = a->query + (seq * a->heads + kv_head * group) * d;
    float *out = a->out + (seq * a->heads + kv_head * group) * d;

    for (int64_t t = 0; t < length; t++) {
        int64_t at = table[t / a->block_size] * block_stride + (t % a->block_size) * token_stride;
        const float *k = row_at(a->pool, a->pool_is_bf16, at + key_offset, d, row);
        for (int64_t h = 0; h < group; h++)
            scores[h * length + t] = dot(query + h * d, k, d) * a->scale;
    }
    for (int64_t h = 0; h < group; h++) {
        float *s = scores + h * length, peak = -INFINITY, total = 0.0f;
        for (int64_t t = 0; t < length; t++)
            peak = s[t] > peak ? s[t] : peak;
        for (int64_t t = 0; t < length; t++)
            total += (s[t] = expf(s[t] - peak));
        for (int64_t t = 0; t < length; t++)
            s[t] /= total;
    }
    memset(out, 0, group * d * sizeof(float));
    for (int64_t t = 0; t < length; t++) {
        int64_t at = table[t / a->block_size] * block_stride + (t % a->block_size) * token_stride;
        const float *v = row_at(a->pool, a->pool_is_bf16, at + value_offset, d, row);
        for (int64_t h = 0; h < group; h++)
            add_scaled(out + h * d, v, scores[h * length + t], d);
    }
}

/* Every (sequence, KV head) pair, shared out over `threads` (dynamically: contexts differ). */
static int decode_attention(const DecodeAttention *a, int threads)
{
    int64_t longest = 0, pairs = a->batch * a->kv_heads;
    for (int64_t s = 0; s < a->batch; s++)
        longest = a->lengths[s] > longest ? a->lengths[s] : longest;
    threads = threads < pairs ? threads : (int)pairs;
    const int64_t per_thread = a->heads / a->kv_heads * longest + a->head_dim;
    float *scratch = malloc(threads * per_thread * sizeof(float));
    if (!scratch)
        return -1;
    if (threads <= 1) {
        for (int64_t i = 0; i < pairs; i++)
            attend_group(a, i / a->kv_heads, i % a->kv_heads, scratch, scratch + per_thread - a->head_dim);
    } else {
#ifdef _OPENMP
#pragma omp parallel for num_threads(threads) schedule(dynamic)
#endif
        for (int64_t i = 0; i < pairs; i++) {
#ifdef _OPENMP
            float *mine = scratch + omp_get_thread_num() * per_thread;
#else
            float *mine = scratch;
#endif
            attend_group(a, i / a->kv_heads, i % a->kv_heads, mine, mine + per_thread - a->head_dim);
        }
    }
    free(scratch);
    return 0;
}

/* Matrix products y = (x @ w^T) * scale + bias for the engine's linear layers, w packed in panels.
 *
 * A decode step multiplies a few rows of x by every weight once, so it is bound by how fast the
 * weights stream from memory, and MKL's sgemm, which re-packs the whole weight on every call,
 * streams them at a fraction of that for 2 to 32 rows. Here the weight is packed once, at load,
 * as panels of PANEL output channels, zero padded. Each panel is one sequential stream; a tile of
 * rows of x keeps its accumulators in registers while the panel passes once, and the next tile of
 * rows reads the panel again from L2. x is packed in chunks of ROW_CHUNK rows, so that a prefill's
 * rows stay in L2 while every panel passes.
 *
 * fp32 and int8 panels are [ceil(n / PANEL)][k][PANEL], x packed as [k][block] so each step
 * broadcasts one value a row; int8 panels (one scale per output channel) are widened to fp32 in
 * registers for one tile, or once per panel into `widened` when more tiles share it. AVX-512 where
 * the CPU has it, AVX2 and FMA otherwise.
 *
 * bf16 panels are [ceil(n / PANEL)][k2 / 2][PANEL][2], k2 = k rounded up to BF16_K: each pair of
 * k next to each other, which is both what VDPBF16PS multiplies (a pair a lane) and AMX's layout
 * of a B tile (16 pairs of rows by 16 columns, 64 bytes a row). x is rounded to bf16 into
 * row-major [rows][k2]. Up to a few dozen rows, AVX512-BF16 tiles of 8 rows (the weight stream
 * at half the bytes of fp32); for more, AMX tiles: 32 rows by one panel in four 16x16 fp32
 * accumulator tiles, k 32 at a time. The GIL is released.
 */
#define PANEL 32
#define ROW_CHUNK 256 /* a multiple of both tiles' rows, and of AMX's 32 */
#define BF16_K 32     /* k of one AMX tile step: bf16 panels are padded to it */

enum { KIND_FP32 = 0, KIND_INT8 = 1, KIND_BF16 = 2 };

typedef struct {
    const void *x;       /* [m, k], fp32, or bf16 for bf16 panels when x_is_bf16 */
    const void *panels;  /* see above */
    int kind;
    const float *scale;  /* [n] or NULL */
    const float *bias;   /* [n] or NULL */
    void *y;             /* [m, n], fp32, or bf16 when y_is_bf16 (bf16 panels only) */
    int64_t m, n, k;
    int x_is_bf16, y_is_bf16;
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

/* fp32 to bf16 as torch rounds it: to nearest, ties to even (NaN stays NaN). */
static uint16_t to_bf16(float value)
{
    uint32_t bits;
    memcpy(&bits, &value, sizeof bits);
    if ((bits & 0x7fffffff) > 0x7f800000)
        return (uint16_t)((bits >> 16) | 0x40);
    return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

static int64_t bf16_k(int64_t k)
{
    return (k + BF16_K - 1) / BF16_K * BF16_K;
}

/* Splits `count` panels over `threads`, each running the body on [first, last) with its index `thread`. */
#ifdef _OPENMP
#define FOR_PANEL_RANGES(threads, count, ...)                                                                  \
    if ((threads) <= 1) {                                                                                      \
        int64_t first = 0, last = (count);                                                                     \
        int thread = 0;                                                                                        \
        (void)thread;                                                                                          \
        __VA_ARGS__;                                                                                           \
    } else {                                                                                                   \
        _Pragma("omp parallel num_threads(threads)")                                                           \
        {                                                                                                      \
            int thread = omp_get_thread_num(), team = omp_get_num_threads();                                   \
            int64_t first = (count) * thread / team, last = (count) * (thread + 1) / team;                     \
            __VA_ARGS__;                                                                                       \
        }                                                                                                      \
    }
#else
#define FOR_PANEL_RANGES(threads, count, ...)                                                                  \
    {                                                                                                          \
        int64_t first = 0, last = (count);                                                                     \
        int thread = 0;                                                                                        \
        (void)thread;                                                                                          \
        __VA_ARGS__;                                                                                           \
    }
#endif

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

#define PACKED_PANELS(name, target, tile, block)                                                                \
    target static void name(const PackedProduct *p, const float *xp, int64_t rows, float *y, int64_t first,      \
                            int64_t last, float *widened)                                                      \
    {                                                                                                          \
        int size = p->kind == KIND_INT8 ? 1 : 4;                                                               \
        for (int64_t index = first; index < last; index++) {                                                   \
            int64_t n0 = index * PANEL, panel = index * p->k * PANEL, bytes = p->k * PANEL * size;             \
            const char *next = index + 1 < last ? (const char *)p->panels + (panel + p->k * PANEL) * size : NULL; \
            if (p->kind == KIND_FP32) {                                                                        \
                const float *wf = (const float *)p->panels + panel;                                            \
                PANEL_TILES(tile, block, xp, rows, wf, (const int8_t *)NULL, 0, p, y, n0, next, bytes)         \
            } else if (rows > (block)) {                                                                       \
                widen_panel((const int8_t *)p->panels + panel, p->k, widened);                                 \
                PANEL_TILES(tile, block, xp, rows, widened, (const int8_t *)NULL, 0, p, y, n0, next, bytes)    \
            } else {                                                                                           \
                const int8_t *wq = (const int8_t *)p->panels + panel;                                          \
                PANEL_TILES(tile, block, xp, rows, (const float *)NULL, wq, 1, p, y, n0, next, bytes)          \
            }                                                                                                  \
        }                                                                                                      \
    }

PACKED_PANELS(packed_panels_avx512, AVX512, tile_avx512, AVX512_ROWS)
PACKED_PANELS(packed_panels_avx2, AVX2, tile_avx2, AVX2_ROWS)

#define BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))
#define AMX __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")))
#define BF16_ROWS 8 /* 16 accumulators of 16 floats, as for fp32 */

/* x rows [0, rows) rounded to bf16 into [padded_rows][k2], zeros past k and past `rows`. */
BF16 static void pack_bf16_rows(const PackedProduct *p, int64_t m0, int64_t rows, int64_t padded_rows, int64_t k2,
                                uint16_t *out)
{
    const int64_t k = p->k;
    for (int64_t r = 0; r < padded_rows; r++) {
        uint16_t *dst = out + r * k2;
        int64_t done = 0;
        if (r < rows && p->x_is_bf16) {
            memcpy(dst, (const uint16_t *)p->x + (m0 + r) * k, k * sizeof(uint16_t));
            done = k;
        } else if (r < rows) {
            const float *src = (const float *)p->x + (m0 + r) * k;
            for (; done + 16 <= k; done += 16)
                _mm256_storeu_si256((__m256i *)(dst + done), (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(src + done)));
            for (; done < k; done++)
                dst[done] = to_bf16(src[done]);
        }
        memset(dst + done, 0, (k2 - done) * sizeof(uint16_t));
    }
}

/* One row of a panel's accumulators: scale, bias, and a store of its valid columns, fp32 or bf16. */
BF16 INLINE void store_bf16_panel_row(const PackedProduct *p, __m512 a0, __m512 a1, int64_t row, int64_t n0)
{
    int64_t valid = p->n - n0;
    __mmask16 m0 = valid >= 16 ? 0xFFFF : (__mmask16)((1u << valid) - 1);
    __mmask16 m1 = valid >= 32 ? 0xFFFF : valid > 16 ? (__mmask16)((1u << (valid - 16)) - 1) : 0;
    if (p->scale) {
        a0 = _mm512_mul_ps(a0, _mm512_maskz_loadu_ps(m0, p->scale + n0));
        a1 = _mm512_mul_ps(a1, _mm512_maskz_loadu_ps(m1, p->scale + n0 + 16));
    }
    if (p->bias) {
        a0 = _mm512_add_ps(a0, _mm512_maskz_loadu_ps(m0, p->bias + n0));
        a1 = _mm512_add_ps(a1, _mm512_maskz_loadu_ps(m1, p->bias + n0 + 16));
    }
    if (p->y_is_bf16) {
        uint16_t *y = (uint16_t *)p->y + row * p->n + n0;
        _mm256_mask_storeu_epi16(y, m0, (__m256i)_mm512_cvtneps_pbh(a0));
        _mm256_mask_storeu_epi16(y + 16, m1, (__m256i)_mm512_cvtneps_pbh(a1));
    } else {
        float *y = (float *)p->y + row * p->n + n0;
        _mm512_mask_storeu_ps(y, m0, a0);
        _mm512_mask_storeu_ps(y + 16, m1, a1);
    }
}

/* One AVX512-BF16 tile: `rows` rows of bf16 x ([rows][k2]) against one bf16 panel, a pair of k a step. */
BF16 INLINE void tile_bf16(const PackedProduct *p, const uint16_t *xa, int64_t k2, const uint16_t *w, int rows,
                           int64_t row0, int64_t n0, Prefetch pf)
{
    __m512 acc[BF16_ROWS][2];
    for (int r = 0; r < rows; r++)
        acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    const int64_t pairs = k2 / 2;
    PREFETCH_START(pf, pairs);
    for (int64_t i = 0; i < pairs; i++) {
        PREFETCH_STEP(pf);
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + i * 2 * PANEL);
        __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + i * 2 * PANEL + PANEL);
        for (int r = 0; r < rows; r++) {
            int32_t pair;
            memcpy(&pair, xa + r * k2 + 2 * i, sizeof pair);
            __m512bh xv = (__m512bh)_mm512_set1_epi32(pair);
            acc[r][0] = _mm512_dpbf16_ps(acc[r][0], w0, xv);
            acc[r][1] = _mm512_dpbf16_ps(acc[r][1], w1, xv);
        }
    }
    for (int r = 0; r < rows; r++)
        store_bf16_panel_row(p, acc[r][0], acc[r][1], row0 + r, n0);
}

BF16 static void bf16_panels_avx512(const PackedProduct *p, const uint16_t *xa, int64_t m0, int64_t rows,
                                    int64_t first, int64_t last)
{
    const int64_t k2 = bf16_k(p->k), panel_elements = k2 * PANEL;
    const int64_t tiles = (rows + BF16_ROWS - 1) / BF16_ROWS, lines = panel_elements * 2 / 64;
    const int64_t share = (lines + tiles - 1) / tiles;
    for (int64_t index = first; index < last; index++) {
        const uint16_t *w = (const uint16_t *)p->panels + index * panel_elements;
        const char *next = index + 1 < last ? (const char *)(w + panel_elements) : NULL;
        for (int64_t b = 0; b < tiles; b++) {
            int64_t first_line = b * share < lines ? b * share : lines;
            Prefetch pf = {next ? next + 64 * first_line : NULL,
                           next ? (first_line + share < lines ? share : lines - first_line) : 0};
            const uint16_t *xb = xa + b * BF16_ROWS * k2;
            int64_t row0 = m0 + b * BF16_ROWS, n0 = index * PANEL;
            switch (rows - b * BF16_ROWS < BF16_ROWS ? rows - b * BF16_ROWS : 0) {
            case 1: tile_bf16(p, xb, k2, w, 1, row0, n0, pf); break;
            case 2: tile_bf16(p, xb, k2, w, 2, row0, n0, pf); break;
            case 3: tile_bf16(p, xb, k2, w, 3, row0, n0, pf); break;
            case 4: tile_bf16(p, xb, k2, w, 4, row0, n0, pf); break;
            case 5: tile_bf16(p, xb, k2, w, 5, row0, n0, pf); break;
            case 6: tile_bf16(p, xb, k2, w, 6, row0, n0, pf); break;
            case 7: tile_bf16(p, xb, k2, w, 7, row0, n0, pf); break;
            default: tile_bf16(p, xb, k2, w, BF16_ROWS, row0, n0, pf); break;
            }
        }
    }
}

/* AMX's tile configuration (palette 1): tiles 0-3 accumulate fp32 16x16, 4-5 hold 16 rows of x by
 * 32 bf16, 6-7 16 pairs of k by 16 columns of a panel. Set per thread, before its first tile op. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
} TileConfig;

AMX static void amx_panels(const PackedProduct *p, const uint16_t *xa, int64_t m0, int64_t rows, int64_t first,
                           int64_t last)
{
    TileConfig config = {.palette = 1};
    for (int t = 0; t < 8; t++) {
        config.rows[t] = 16;
        config.bytes_per_row[t] = 64;
    }
    _tile_loadconfig(&config);
    const int64_t k2 = bf16_k(p->k), panel_elements = k2 * PANEL, x_stride = k2 * sizeof(uint16_t);
    float sums[32 * PANEL];
    for (int64_t index = first; index < last; index++) {
        const uint16_t *w = (const uint16_t *)p->panels + index * panel_elements;
        for (int64_t r0 = 0; r0 < rows; r0 += 32) {
            const uint16_t *xb = xa + r0 * k2;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t kk = 0; kk < k2; kk += BF16_K) {
                _tile_loadd(4, xb + kk, x_stride);
                _tile_loadd(5, xb + 16 * k2 + kk, x_stride);
                _tile_loadd(6, w + kk * PANEL, 2 * PANEL * sizeof(uint16_t));
                _tile_loadd(7, w + kk * PANEL + PANEL, 2 * PANEL * sizeof(uint16_t));
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, sums, PANEL * sizeof(float));
            _tile_stored(1, sums + 16, PANEL * sizeof(float));
            _tile_stored(2, sums + 16 * PANEL, PANEL * sizeof(float));
            _tile_stored(3, sums + 16 * PANEL + 16, PANEL * sizeof(float));
            for (int64_t r = 0; r < 32 && r0 + r < rows; r++)
                store_bf16_panel_row(p, _mm512_loadu_ps(sums + r * PANEL), _mm512_loadu_ps(sums + r * PANEL + 16),
                                     m0 + r0 + r, index * PANEL);
        }
    }
    _tile_release();
}

enum { ISA_NONE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512_BF16 = 3, ISA_AMX = 4 };

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* The best ISA the CPU and the OS allow. AMX also needs the kernel's leave to use tile data,
 * asked once per process; refused, the products run on AVX512-BF16. */
static int detect_isa(void)
{
    unsigned a, b, c, d;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx512f"))
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? ISA_AVX2 : ISA_NONE;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d) || !(a & (1u << 5)))
        return ISA_AVX512;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24)))
        return ISA_AVX512_BF16;
    unsigned low, high;
    __asm__("xgetbv" : "=a"(low), "=d"(high) : "c"(0));
    if ((low & (3u << 17)) != (3u << 17) || syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA))
        return ISA_AVX512_BF16;
    return ISA_AMX;
}

static int detected_isa = -1;

static int best_isa(void)
{
    if (detected_isa < 0)
        detected_isa = detect_isa();
    return detected_isa;
}

/* 0, or -1 when out of memory. `isa` is one the CPU has and fits the panels (checked by the
 * caller): for bf16 panels AMX or AVX512-BF16, for the others AVX-512 (any above AVX2) or AVX2. */
static int packed_product(const PackedProduct *p, int isa, int threads)
{
    const int64_t panels = (p->n + PANEL - 1) / PANEL;
    threads = threads < panels ? threads : (int)panels;
    if (p->kind == KIND_BF16) {
        const int64_t k2 = bf16_k(p->k), chunk = p->m < ROW_CHUNK ? (p->m + 31) / 32 * 32 : ROW_CHUNK;
        uint16_t *xa = malloc(chunk * k2 * sizeof(uint16_t));
        if (!xa)
            return -1;
        for (int64_t m0 = 0; m0 < p->m; m0 += ROW_CHUNK) {
            int64_t rows = p->m - m0 < ROW_CHUNK ? p->m - m0 : ROW_CHUNK;
            pack_bf16_rows(p, m0, rows, isa == ISA_AMX ? (rows + 31) / 32 * 32 : rows, k2, xa);
            if (isa == ISA_AMX)
                FOR_PANEL_RANGES(threads, panels, amx_panels(p, xa, m0, rows, first, last))
            else
                FOR_PANEL_RANGES(threads, panels, bf16_panels_avx512(p, xa, m0, rows, first, last))
        }
        free(xa);
        return 0;
    }
    int block = isa >= ISA_AVX512 ? AVX512_ROWS : AVX2_ROWS;
    int64_t chunk = p->m < ROW_CHUNK ? (p->m + block - 1) / block * block : ROW_CHUNK;
    float *xp = malloc(chunk * p->k * sizeof(float));
    float *widened = p->kind == KIND_INT8 ? malloc(threads * p->k * PANEL * sizeof(float)) : NULL;
    if (!xp || (p->kind == KIND_INT8 && !widened)) {
        free(xp);
        free(widened);
        return -1;
    }
    for (int64_t m0 = 0; m0 < p->m; m0 += ROW_CHUNK) {
        int64_t rows = p->m - m0 < ROW_CHUNK ? p->m - m0 : ROW_CHUNK;
        float *y = (float *)p->y + m0 * p->n;
        pack_rows((const float *)p->x + m0 * p->k, rows, p->k, block, xp);
        if (isa >= ISA_AVX512)
            FOR_PANEL_RANGES(threads, panels, packed_panels_avx512(p, xp, rows, y, first, last,
                                                                   widened ? widened + thread * p->k * PANEL : NULL))
        else
            FOR_PANEL_RANGES(threads, panels, packed_panels_avx2(p, xp, rows, y, first, last,
                                                                 widened ? widened + thread * p->k * PANEL : NULL))
    }
    free(xp);
    free(widened);
    return 0;
}
#else
enum { ISA_NONE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2, ISA_AVX512_BF16 = 3, ISA_AMX = 4 };
static int best_isa(void) { return ISA_NONE; }
static int packed_product(const PackedProduct *p, int isa, int threads) { return -1; }
#endif

/* Whether `isa` is one this CPU has and one that multiplies panels of `kind`. */
static int isa_fits(int isa, int kind)
{
    return isa <= best_isa() && (kind == KIND_BF16 ? isa >= ISA_AVX512_BF16 : isa >= ISA_AVX2);
}

/* packed_linear(x, panels, kind, scale or 0, bias or 0, y, m, n, k, isa, threads, x_is_bf16, y_is_bf16):
 * addresses of contiguous tensors; kind 0 fp32, 1 int8, 2 bf16 panels; isa 4 AMX, 3 AVX512-BF16
 * (bf16 panels), 2 AVX-512, 1 AVX2 (the others): tests run each the CPU has. */
static PyObject *py_packed_linear(PyObject *self, PyObject *args)
{
    unsigned long long x, panels, scale, bias, y;
    int kind, isa, threads, x_is_bf16, y_is_bf16;
    long long m, n, k;
    if (!PyArg_ParseTuple(args, "KKiKKKLLLiipp:packed_linear", &x, &panels, &kind, &scale, &bias, &y, &m, &n, &k,
                          &isa, &threads, &x_is_bf16, &y_is_bf16))
        return NULL;
    if (m <= 0 || n <= 0 || k <= 0 || threads <= 0 || kind < KIND_FP32 || kind > KIND_BF16 || !isa_fits(isa, kind) ||
        (kind != KIND_BF16 && (x_is_bf16 || y_is_bf16))) {
        PyErr_SetString(PyExc_ValueError, "m, n, k and threads must be positive, isa one this CPU has (see "
                        "best_isa()) that multiplies this kind of panel, and x and y fp32 unless the panels are bf16");
        return NULL;
    }
    PackedProduct p = {
        (const void *)(uintptr_t)x, (const void *)(uintptr_t)panels, kind,
        scale ? (const float *)(uintptr_t)scale : NULL, bias ? (const float *)(uintptr_t)bias : NULL,
        (void *)(uintptr_t)y, m, n, k, x_is_bf16, y_is_bf16,
    };
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = packed_product(&p, isa, threads);
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
 *                  block_size, layer, layers, table_width, scale, threads): addresses of contiguous tensors. */
static PyObject *py_decode_attention(PyObject *self, PyObject *args)
{
    unsigned long long query, pool, tables, lengths, out;
    int is_bf16;
    long long batch, heads, kv_heads, head_dim, block_size, layer, layers, width;
    float scale;
    int threads;
    if (!PyArg_ParseTuple(args, "KKpKKKLLLLLLLLfi:decode_attention", &query, &pool, &is_bf16, &tables, &lengths,
                          &out, &batch, &heads, &kv_heads, &head_dim, &block_size, &layer, &layers, &width,
                          &scale, &threads))
        return NULL;
    if (batch <= 0 || kv_heads <= 0 || heads % kv_heads || head_dim % LANES || threads <= 0) {
        PyErr_SetString(PyExc_ValueError, "heads must be a multiple of kv_heads, head_dim of 16, threads positive");
        return NULL;
    }
    DecodeAttention a = {
        (const float *)(uintptr_t)query, (const void *)(uintptr_t)pool, is_bf16,
        (const int32_t *)(uintptr_t)tables, (const int32_t *)(uintptr_t)lengths, (float *)(uintptr_t)out,
        batch, heads, kv_heads, head_dim, block_size, layer, layers, width, scale,
    };
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = decode_attention(&a, threads);
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
    int isa, threads;        /* for every product and attention */
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

static int run_product(PackedProduct p, const float *x, float *y, int64_t m, const DecodeStep *s)
{
    p.x = x;
    p.y = y;
    p.m = m;
    return packed_product(&p, s->isa, s->threads);
}

static int decode_step(const DecodeStep *s, const DecodeLayer *layers)
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
        failed |= run_product(layer->qkv, normed, qkv, t_count, s);
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
        failed |= decode_attention(&attention, s->threads);
        failed |= run_product(layer->o, attended, projected, t_count, s);
        for (int64_t i = 0; i < t_count * h; i++)
            s->state[i] += projected[i];
        for (int64_t t = 0; t < t_count; t++)
            rms_norm(s->state + t * h, layer->post_norm, s->eps, h, normed + t * h);
        failed |= run_product(layer->gate_up, normed, gate_up, t_count, s);
        for (int64_t t = 0; t < t_count; t++)
            for (int64_t i = 0; i < inter; i++) {
                float gate = gate_up[t * 2 * inter + i];
                activated[t * inter + i] = gate / (1.0f + expf(-gate)) * gate_up[t * 2 * inter + inter + i];
            }
        failed |= run_product(layer->down, activated, projected, t_count, s);
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

static PackedProduct product_of(const int64_t *fields, int panels, int scale, int bias, int kind, int64_t n,
                                int64_t k)
{
    PackedProduct p = {NULL, (const void *)(uintptr_t)fields[panels], kind,
                       fields[scale] ? (const float *)(uintptr_t)fields[scale] : NULL,
                       bias >= 0 && fields[bias] ? (const float *)(uintptr_t)fields[bias] : NULL, NULL, 0, n, k, 0, 0};
    return p;
}

/* decode_layers(table, kind, state, cos, sin, rows, pool, pool_is_bf16, tables, lengths, tokens, hidden,
 *               heads, kv_heads, head_dim, intermediate, layers, block_size, table_width, eps, isa, threads):
 * kind and isa as for packed_linear; state, cos and sin fp32 whatever the panels. */
static PyObject *py_decode_layers(PyObject *self, PyObject *args)
{
    unsigned long long table, state, cos, sin, rows, pool, tables, lengths;
    int kind, is_bf16, isa, threads;
    long long tokens, hidden, heads, kv_heads, head_dim, intermediate, layers, block_size, width;
    float eps;
    if (!PyArg_ParseTuple(args, "KiKKKKKpKKLLLLLLLLLfii:decode_layers", &table, &kind, &state, &cos, &sin, &rows,
                          &pool, &is_bf16, &tables, &lengths, &tokens, &hidden, &heads, &kv_heads, &head_dim,
                          &intermediate, &layers, &block_size, &width, &eps, &isa, &threads))
        return NULL;
    if (tokens <= 0 || layers <= 0 || kv_heads <= 0 || heads % kv_heads || head_dim % LANES || head_dim % 2 ||
        threads <= 0 || kind < KIND_FP32 || kind > KIND_BF16 || !isa_fits(isa, kind)) {
        PyErr_SetString(PyExc_ValueError, "heads must be a multiple of kv_heads, head_dim of 16, threads positive, "
                        "and isa one this CPU has that multiplies this kind of panel");
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
            product_of(f, L_QKV, L_QKV_SCALE, L_QKV_BIAS, kind, qkv_width, hidden),
            product_of(f, L_O, L_O_SCALE, -1, kind, hidden, heads * head_dim),
            product_of(f, L_GATE_UP, L_GATE_UP_SCALE, -1, kind, 2 * intermediate, hidden),
            product_of(f, L_DOWN, L_DOWN_SCALE, -1, kind, hidden, intermediate),
        };
        decode[l] = layer;
    }
    DecodeStep step = {
        tokens, hidden, heads, kv_heads, head_dim, intermediate, layers, block_size, width, eps,
        (float *)(uintptr_t)state, (const float *)(uintptr_t)cos, (const float *)(uintptr_t)sin,
        (const int64_t *)(uintptr_t)rows, (void *)(uintptr_t)pool, is_bf16,
        (const int32_t *)(uintptr_t)tables, (const int32_t *)(uintptr_t)lengths, isa, threads,
    };
    int failed;
    Py_BEGIN_ALLOW_THREADS
    failed = decode_step(&step, decode);
    Py_END_ALLOW_THREADS
    free(decode);
    if (failed)
        return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* The two halves of a shared-memory all-reduce's synchronisation (engine/shm_all_reduce.py).
 * shm_publish(slot, src, nbytes, flag, value): copy this rank's tensor into its slot, then store the
 * call's number in its flag, once the copy is visible to the other processes (memcpy may use
 * non-temporal stores, which the release store alone would not order). */
static PyObject *py_shm_publish(PyObject *self, PyObject *args)
{
    unsigned long long slot, src, flag;
    long long nbytes, value;
    if (!PyArg_ParseTuple(args, "KKLKL:shm_publish", &slot, &src, &nbytes, &flag, &value))
        return NULL;
    Py_BEGIN_ALLOW_THREADS
    memcpy((void *)(uintptr_t)slot, (const void *)(uintptr_t)src, (size_t)nbytes);
    _mm_sfence();
    __atomic_store_n((int64_t *)(uintptr_t)flag, (int64_t)value, __ATOMIC_RELEASE);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* shm_wait(flags, stride, count, value, spins): True once each of the `count` flags (int64, `stride`
 * int64s apart) holds `value` or more, False after `spins` checks (the caller then yields the core and
 * checks its peers' health). The GIL is released while it spins. */
static PyObject *py_shm_wait(PyObject *self, PyObject *args)
{
    unsigned long long flags;
    long long stride, count, value, spins;
    if (!PyArg_ParseTuple(args, "KLLLL:shm_wait", &flags, &stride, &count, &value, &spins))
        return NULL;
    const int64_t *f = (const int64_t *)(uintptr_t)flags;
    int done = 0;
    Py_BEGIN_ALLOW_THREADS
    for (long long i = 0; i < spins && !done; i++) {
        done = 1;
        for (long long c = 0; c < count; c++)
            if (__atomic_load_n(f + c * stride, __ATOMIC_ACQUIRE) < value) {
                done = 0;
                _mm_pause();
                break;
            }
    }
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(done);
}

static PyMethodDef methods[] = {
    {"best_isa", py_best_isa, METH_NOARGS,
     "4 with AMX (bf16), 3 with AVX512-BF16, 2 with AVX-512, 1 with AVX2 and FMA, 0 without (no packed_linear)."},
    {"decode_layers", py_decode_layers, METH_VARARGS,
     "Every transformer layer of a decode-only step (one new token per sequence), weights packed."},
    {"decode_attention", py_decode_attention, METH_VARARGS,
     "Attention of one new token per sequence over its paged KV, read in place."},
    {"shm_publish", py_shm_publish, METH_VARARGS,
     "Copy a rank's all-reduce input into its shared slot, then publish the call's number in its flag."},
    {"shm_wait", py_shm_wait, METH_VARARGS,
     "Spin until every rank's flag holds the call's number (True), or give up after a number of checks."},
    {"packed_linear", py_packed_linear, METH_VARARGS,
     "y = (x @ w^T) * scale + bias with w packed in panels of 32 output channels, fp32, int8 or bf16."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpu_kernels(void)
{
    return PyModule_Create(&module);
}
