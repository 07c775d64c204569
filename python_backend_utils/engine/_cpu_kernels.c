/* CPU kernels for the decode step: attention that reads the paged KV pool where it lies.
 *
 * The torch path gathers every sequence's whole context out of the pool into a padded copy, for
 * every layer of every step, before attention reads it once more: at batch 8 with 1k tokens of
 * context that copy costs more than the step's matrix products. Here each sequence's query heads
 * read their K and V rows straight from the pool's blocks, once per KV head for the whole group
 * of query heads that share it (GQA). Scores and softmax are in fp32; the pool may be fp32 or
 * bf16. The GIL is released. Built with function multiversioning: the loops are compiled for
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
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_cpu_kernels", NULL, -1, methods};

PyMODINIT_FUNC PyInit__cpu_kernels(void)
{
    return PyModule_Create(&module);
}
