/* kernel=cpu: decode attention read straight from the paged KV pool through the block tables (float32).
 *
 * Built on first use by pagedlab/kernels/cpu_kernel.py (cc -O3 -march=native -fopenmp) and called
 * through ctypes with raw pointers; it knows nothing of Python or torch. One work item is one
 * (sequence, KV head): the query heads of its GQA group attend to the sequence's keys TILE at a time,
 * read in place through the block table (no key or value is copied), with an online softmax. Items are
 * shared among OpenMP threads, as many as the caller passes (torch's count).
 *
 * Vectors are GCC/Clang vector extensions of 16 floats (one AVX-512 register, two AVX2 ones, four SSE
 * or NEON ones): head_dim must be a multiple of 16. Sequences whose query is not exactly one token
 * (prefills) are skipped: the caller attends to those.
 */
#include <stdint.h>
#include <string.h>

#define LANES 16
#define TILE LANES /* keys per step of the online softmax: one vector of scores */
#define MAX_W 16  /* head_dim up to MAX_W * LANES = 256 */
#define MAX_G 8   /* query heads per KV head attended together (more, or an odd count: in turns) */

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(LANES * sizeof(int32_t))));
typedef float vec_unaligned __attribute__((vector_size(LANES * sizeof(float)), aligned(4)));
typedef float half __attribute__((vector_size(LANES / 2 * sizeof(float))));
typedef float quarter __attribute__((vector_size(LANES / 4 * sizeof(float))));

static inline vec load(const float *p) { return *(const vec_unaligned *)p; }
static inline void store(float *p, vec v) { *(vec_unaligned *)p = v; }
static inline vec splat(float x) { return (vec){0} + x; }
static inline vec where(ivec mask, vec a, vec b) { /* mask lanes: -1 (a) or 0 (b) */
    return (vec)(((ivec)a & mask) | ((ivec)b & ~mask));
}

static inline float sum_lanes(vec v) { /* a tree, not a chain of 15 dependent adds */
    union { vec v; half h[2]; } a = { v };
    union { half h; quarter q[2]; } b = { a.h[0] + a.h[1] };
    const quarter c = b.q[0] + b.q[1];
    return (c[0] + c[2]) + (c[1] + c[3]);
}

/* The sums of 16 vectors' lanes, as one vector (lane i: the sum of d[i]): a transposing tree of 15 adds
 * and 30 shuffles, instead of 16 separate trees. */
#define PAIR(a, b, ...) (__builtin_shufflevector(a, b, __VA_ARGS__))
static inline vec sum_lanes_16(const vec d[LANES]) {
    vec x[8], y[4], z[2];
    for (int i = 0; i < 8; i++) /* [sums of 8 lanes of d[2i], of d[2i+1]] */
        x[i] = PAIR(d[2 * i], d[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
               + PAIR(d[2 * i], d[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
    for (int i = 0; i < 4; i++) /* 4 lanes each of d[4i..4i+3] */
        y[i] = PAIR(x[2 * i], x[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
               + PAIR(x[2 * i], x[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
    for (int i = 0; i < 2; i++) /* 2 lanes each of d[8i..8i+7] */
        z[i] = PAIR(y[2 * i], y[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29)
               + PAIR(y[2 * i], y[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
    return PAIR(z[0], z[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
           + PAIR(z[0], z[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}
#undef PAIR

static inline float max_lanes(vec v) {
    float m = v[0];
    for (int i = 1; i < LANES; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/* exp(x) lane by lane for x <= 0 (scores minus their running maximum), within a few ulp of expf, and 0
 * below -87 (padding scores): Cody-Waite range reduction and Cephes' degree-6 polynomial on
 * [-ln2/2, ln2/2]; 2^n is built in the exponent bits. */
static inline vec exp_nonpositive(vec x) {
    const ivec tiny = x < -87.0f;
    const vec xc = where(tiny, splat(-87.0f), x);
    const vec y = xc * 1.44269504088896341f + 0.5f;
    vec n = __builtin_convertvector(__builtin_convertvector(y, ivec), vec); /* toward zero ... */
    n += __builtin_convertvector(n > y, vec);                                /* ... then floor (true: -1) */
    const vec r = xc - n * 0.693359375f + n * 2.12194440e-4f;
    vec p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const ivec two_n = (__builtin_convertvector(n, ivec) + 127) << 23;
    return where(tiny, splat(0.0f), p * (vec)two_n);
}

/* Query heads `heads` (at most MAX_G, all reading KV head `h`) of one sequence attend to keys lo..len-1,
 * TILE keys at a time, with an online softmax: running maximum `top`, running sum `total`, output `acc`
 * rescaled when the maximum grows. Each key and value row is loaded once for all the heads. `w` =
 * head_dim / LANES; inlined with common (heads, w) as constants, so that the loops unroll and the
 * accumulators stay in registers. The next tile's rows are located and prefetched while one is computed. */
static inline __attribute__((always_inline)) void attend_heads(
        const float *query, float *out, const float *k_pool, const float *v_pool, const int32_t *table, int lo,
        int len, int h, int heads, int w, int block_size, int64_t token_stride, float scale) {
    const int head_dim = w * LANES;
    float top[MAX_G], total[MAX_G];
    vec q[MAX_G][MAX_W], acc[MAX_G][MAX_W];
    for (int j = 0; j < heads; j++) {
        top[j] = -3.0e38f, total[j] = 0.0f;
        for (int k = 0; k < w; k++) q[j][k] = load(query + j * head_dim + k * LANES) * scale, acc[j][k] = splat(0.0f);
    }
    int64_t next[TILE], here[TILE]; /* offsets in the pools of the next tile's rows and of this tile's */
    int block = lo / block_size, slot = lo % block_size, t = lo; /* the next key to locate */
#define LOCATE_TILE()                                                                                        \
    for (int i = 0; i < TILE && t < len; i++, t++) {                                                           \
        next[i] = ((int64_t)table[block] * block_size + slot) * token_stride + (int64_t)h * head_dim;        \
        for (int k = 0; k < head_dim; k += 64 / (int)sizeof(float)) {                                         \
            __builtin_prefetch(k_pool + next[i] + k);                                                          \
            __builtin_prefetch(v_pool + next[i] + k);                                                          \
        }                                                                                                      \
        if (++slot == block_size) slot = 0, block++;                                                           \
    }
    LOCATE_TILE();
    for (int t0 = lo; t0 < len; t0 += TILE) {
        const int count = len - t0 < TILE ? len - t0 : TILE;
        memcpy(here, next, sizeof(here));
        LOCATE_TILE();
        vec s[MAX_G];
        for (int j = 0; j < heads; j++) {
            vec dots[TILE]; /* lane by lane products of query j with each key; their lane sums are the scores */
            for (int i = 0; i < count; i++) {
                const float *key = k_pool + here[i];
                dots[i] = q[j][0] * load(key);
                for (int k = 1; k < w; k++) dots[i] += q[j][k] * load(key + k * LANES);
            }
            for (int i = count; i < TILE; i++) dots[i] = splat(0.0f);
            s[j] = sum_lanes_16(dots);
            if (count < TILE) /* padding lanes: exp gives 0 */
                for (int i = count; i < TILE; i++) s[j][i] = -3.0e38f;
        }
        for (int j = 0; j < heads; j++) {
            const float tile_top = max_lanes(s[j]), new_top = tile_top > top[j] ? tile_top : top[j];
            const float shrink = exp_nonpositive(splat(top[j] - new_top))[0];
            s[j] = exp_nonpositive(s[j] - new_top);
            top[j] = new_top, total[j] = total[j] * shrink + sum_lanes(s[j]);
            for (int k = 0; k < w; k++) acc[j][k] *= shrink;
        }
        for (int i = 0; i < count; i++) {
            const float *value = v_pool + here[i];
            vec vr[MAX_W];
            for (int k = 0; k < w; k++) vr[k] = load(value + k * LANES);
            for (int j = 0; j < heads; j++) {
                const vec e = splat(s[j][i]);
                for (int k = 0; k < w; k++) acc[j][k] += e * vr[k];
            }
        }
    }
#undef LOCATE_TILE
    for (int j = 0; j < heads; j++)
        for (int k = 0; k < w; k++) store(out + j * head_dim + k * LANES, acc[j][k] / total[j]);
}

/* Decode attention of every sequence whose query is one token. query [T, H, D] and out [T, H, D] with
 * rows `*_row_stride` floats apart (heads D apart); k_pool, v_pool [blocks, block_size, kv_heads, D];
 * tables [S, *] (rows `table_stride` apart); context_lens [S]; query_start [S + 1]; window <= 0: no
 * sliding window. D a multiple of LANES, at most MAX_W * LANES. */
void pagedlab_decode_f32(const float *query, int64_t query_row_stride, const float *k_pool, const float *v_pool,
                         const int32_t *tables, int64_t table_stride, const int32_t *context_lens,
                         const int32_t *query_start, int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                         int block_size, int window, float scale, float *out, int64_t out_row_stride,
                         int num_threads) {
    const int group = num_heads / num_kv_heads, w = head_dim / LANES;
    const int64_t token_stride = (int64_t)num_kv_heads * head_dim;
    const int64_t items = (int64_t)num_seqs * num_kv_heads;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int64_t item = 0; item < items; item++) {
        const int s = (int)(item / num_kv_heads), h = (int)(item % num_kv_heads);
        if (query_start[s + 1] - query_start[s] != 1) continue;
        const int len = context_lens[s];
        const int lo = window > 0 && len > window ? len - window : 0;
        const int32_t *table = tables + (int64_t)s * table_stride;
        for (int j0 = 0; j0 < group;) { /* query heads of KV head h, in turns of 8, 4, 2 or 1 */
            const int left = group - j0, heads = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
            const int64_t head = ((int64_t)h * group + j0) * head_dim;
            const float *q = query + query_start[s] * query_row_stride + head;
            float *o = out + query_start[s] * out_row_stride + head;
            j0 += heads;
#define ATTEND(G, W) attend_heads(q, o, k_pool, v_pool, table, lo, len, h, G, W, block_size, token_stride, scale)
#define BY_HEADS(W)                                                                                          \
    switch (heads) {                                                                                         \
        case 1: ATTEND(1, W); break;                                                                         \
        case 2: ATTEND(2, W); break;                                                                         \
        case 4: ATTEND(4, W); break;                                                                         \
        default: ATTEND(8, W);                                                                               \
    }
            switch (w) { /* constants: the heads always, and the common head sizes (64, 128, 32) */
                case 4: BY_HEADS(4); break;
                case 8: BY_HEADS(8); break;
                case 2: BY_HEADS(2); break;
                default: BY_HEADS(w);
            }
#undef BY_HEADS
#undef ATTEND
        }
    }
}
