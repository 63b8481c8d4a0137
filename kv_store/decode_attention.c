/* Decode attention over a bfloat16 KV cache on the CPU: one query per head, every
 * cached key read once, in cache order.
 *
 * For each (sequence b, key/value head h), a row, and each of its G query
 * heads (grouped-query attention; G = 1 for OPT):
 *     s[t] = scale * q[b, h*G+g] . K[b, h, t] + mask[b, h*G+g or 0, t]
 *     p = softmax(s)   (float32)
 *     out[b, h*G+g] = sum_t p[t] * V[b, h, t]      (float32 accumulation, bf16 out)
 * The caller runs the same call on several threads, which claim rows from a shared
 * counter (no lock; each row is written by the thread that claimed it); `scratch` is
 * the calling thread's own, T floats.
 *
 * Memory-bound by design: per key row D bf16 values are loaded, widened to float32 and
 * multiplied into the dot product; the loops over D vectorize (-O3 -march=native), and
 * -fassociative-math lets each dot product end in a tree of vector adds instead of
 * 16 dependent scalar adds (which measured 3x slower per key). Where the compiler
 * targets AVX512_BF16 the scores are bfloat16 dot products instead (bf16dot_scores).
 * Quantized caches: decode_attention_quant.c. */

#include <math.h>
#include <stdint.h>
#include <stddef.h>
#include <string.h>

/* Software prefetch of the bfloat16 rows, PF_TOKENS cached vectors ahead of the loads
 * (0: none, the hardware prefetchers alone), with PF_NEXT_ROW also the next row's first
 * keys. Why: a key or value row is one long stream, and the hardware prefetchers stop
 * at every 4 KB page boundary of it; 16 vectors (4 KB at head_dim 128) ahead into L1
 * keeps the loads fed, raising the kernel's read rate 15-20% on the T1 call shape.
 * Non-temporal prefetch (PF_HINT 0) is slower than none; more vectors ahead, or into
 * L2, gain nothing (BENCHMARKS.md, "The KV store's bf16 kernel with software
 * prefetch"). These macros come from the run plan's kv_kernel_defines (kv_store/native.py):
 * PF_TOKENS 0 there builds it without, for comparison. */
#ifndef PF_TOKENS
#define PF_TOKENS 16
#endif
#ifndef PF_NEXT_ROW /* also the next row's first keys, while this row's values are read */
#define PF_NEXT_ROW 1
#endif
#ifndef PF_HINT /* __builtin_prefetch's locality: 3 prefetcht0, 2 t1, 1 t2, 0 nta */
#define PF_HINT 3
#endif
static inline void prefetch_vectors(const uint16_t *p, int64_t n_bytes) {
#if PF_TOKENS > 0
    for (int64_t o = 0; o < n_bytes; o += 64) __builtin_prefetch((const char *)p + o, 0, PF_HINT);
#else
    (void)p; (void)n_bytes;
#endif
}

/* Rows are claimed `chunk` at a time from a counter the calling threads share, so a
 * thread slowed by a busy sibling hyperthread takes fewer rows instead of holding up
 * the call (with one fixed range per thread, a call waits on its slowest thread). */
#define FOR_EACH_CHUNK(next, rows, chunk, r0, r1)                                                 \
    for (int64_t r0, r1; (r0 = __atomic_fetch_add(next, chunk, __ATOMIC_RELAXED)) < (rows) &&    \
                         ((r1 = r0 + (chunk) < (rows) ? r0 + (chunk) : (rows)), 1);)

/* exp(x) for x <= 0 (scores minus their maximum): Cephes' expf polynomial on the
 * reduced argument, vectorizable (libm's expf is a call per element); 0 below -87
 * (and for -inf, a masked key). Relative error ~1e-7. */
static inline float exp_nonpositive(float x) {
    const float xc = x < -87.f ? -87.f : x;
    const float n = floorf(xc * 1.44269504088896341f + 0.5f);
    const float f = xc - n * 0.693359375f - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * f + 1.3981999507e-3f;
    p = p * f + 8.3334519073e-3f;
    p = p * f + 4.1665795894e-2f;
    p = p * f + 1.6666665459e-1f;
    p = p * f + 5.0000001201e-1f;
    p = p * f * f + f + 1.f;
    const int32_t e = ((int32_t)n + 127) << 23;
    float two_n;
    memcpy(&two_n, &e, sizeof two_n);
    return x < -87.f ? 0.f : p * two_n;
}

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as PyTorch */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* s[t] += m[t] (when m), then s[t] = exp(s[t] - max): the softmax numerators in
 * place; returns 1 / their sum, which the caller applies to its weighted sum. */
static inline float softmax_unnormalized(float *s, int64_t T, const float *m) {
    if (m)
        for (int64_t t = 0; t < T; t++) s[t] += m[t];
    float mx = -INFINITY;
    for (int64_t t = 0; t < T; t++) mx = s[t] > mx ? s[t] : mx;
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t t = 0; t < T; t++) {
        s[t] = exp_nonpositive(s[t] - mx);
        sum += s[t];
    }
    return 1.f / sum;
}

/* The decode step's new key and value, stored by the kernel (each row by the thread that
 * claimed it, just before it reads the row) instead of by the caller on one thread ahead
 * of the call: k_new, v_new [B, Hkv, 1, D] with strides sn_b, sn_h (the same for both);
 * cols[b] the column sequence b's vectors go to (negative: none, an idle row). NULL
 * k_new: nothing to store. */
typedef struct {
    const uint16_t *k_new, *v_new; const int64_t *cols;
    int64_t sn_b, sn_h;
} bf16_new;

typedef struct {
    const uint16_t *q; uint16_t *k, *v; const float *mask; uint16_t *out;
    int64_t H, Hkv, T, sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t, sm_b, sm_h, so_b, so_h;
    float scale;
    bf16_new nw;
} bf16_args;

#if defined(__AVX512BF16__) && !defined(STRATA_NO_BF16DOT) /* -D...: the plain paths, for comparison */
#include <immintrin.h>
#define HAVE_BF16DOT 1
/* Scores of one bfloat16 query against T bfloat16 keys, D a multiple of 32, on
 * vdpbf16ps: 32 products a call, each exact in float32, no widening of the keys (dev
 * machine, one thread: 6.4 -> 4.6 ns per cached vector). Four keys at a time: their
 * sums are independent chains. */
static inline __attribute__((always_inline)) void bf16dot_scores(const uint16_t *qh, const uint16_t *kb,
                                                                 int64_t sk_t, int64_t T, const int64_t D,
                                                                 float scale, float *s) {
    __m512bh q[8];
    for (int64_t c = 0; c < D / 32; c++) q[c] = (__m512bh)_mm512_loadu_si512(qh + 32 * c);
    int64_t t = 0;
    for (; t + 4 <= T; t += 4) {
        __m512 x[4];
        if (PF_TOKENS > 0 && t + PF_TOKENS + 4 <= T) prefetch_vectors(kb + (t + PF_TOKENS) * sk_t, 4 * sk_t * 2);
        for (int u = 0; u < 4; u++) {
            const uint16_t *kt = kb + (t + u) * sk_t;
            x[u] = _mm512_setzero_ps();
            for (int64_t c = 0; c < D / 32; c++)
                x[u] = _mm512_dpbf16_ps(x[u], q[c], (__m512bh)_mm512_loadu_si512(kt + 32 * c));
        }
        for (int u = 0; u < 4; u++) s[t + u] = scale * _mm512_reduce_add_ps(x[u]);
    }
    for (; t < T; t++) {
        __m512 x = _mm512_setzero_ps();
        for (int64_t c = 0; c < D / 32; c++)
            x = _mm512_dpbf16_ps(x, q[c], (__m512bh)_mm512_loadu_si512(kb + t * sk_t + 32 * c));
        s[t] = scale * _mm512_reduce_add_ps(x);
    }
}
#endif

/* One query head at a time over its row's tokens (a grouped head's keys come from L2
 * the second time), so the query and the accumulator stay in registers across the
 * token loop when D is a constant. s: T floats. */
static inline __attribute__((always_inline)) void bf16_rows(const bf16_args *a, const int64_t D, int64_t r0,
                                                            int64_t r1, float *s) {
    const int64_t G = a->H / a->Hkv, T = a->T;
    float qf[256], acc[256];
    for (int64_t r = r0; r < r1; r++) {
        const int64_t b = r / a->Hkv, h = r % a->Hkv;
        uint16_t *kb = a->k + b * a->sk_b + h * a->sk_h;
        uint16_t *vb = a->v + b * a->sv_b + h * a->sv_h;
        if (a->nw.k_new && a->nw.cols[b] >= 0) {
            const int64_t c = a->nw.cols[b], n = b * a->nw.sn_b + h * a->nw.sn_h;
            memcpy(kb + c * a->sk_t, a->nw.k_new + n, (size_t)D * 2);
            memcpy(vb + c * a->sv_t, a->nw.v_new + n, (size_t)D * 2);
        }
        for (int64_t g = 0; g < G; g++) {
            const int64_t head = h * G + g;
            const uint16_t *qh = a->q + b * a->sq_b + head * a->sq_h;
#ifdef HAVE_BF16DOT
            if (D % 32 == 0 && D <= 256) {
                bf16dot_scores(qh, kb, a->sk_t, T, D, a->scale, s);
            } else
#endif
            {
                for (int64_t d = 0; d < D; d++) qf[d] = bf16_to_f32(qh[d]) * a->scale;
                for (int64_t t = 0; t < T; t++) {
                    const uint16_t *kt = kb + t * a->sk_t;
                    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < D; d++) dot += qf[d] * bf16_to_f32(kt[d]);
                    s[t] = dot;
                }
            }
            prefetch_vectors(vb, (T < PF_TOKENS ? T : PF_TOKENS) * a->sv_t * 2); /* V's first rows, during softmax */
#if PF_NEXT_ROW
            if (g == G - 1 && r + 1 < r1) { /* the next row's first keys, during this row's values */
                const int64_t b1 = (r + 1) / a->Hkv, h1 = (r + 1) % a->Hkv;
                prefetch_vectors(a->k + b1 * a->sk_b + h1 * a->sk_h, (T < PF_TOKENS ? T : PF_TOKENS) * a->sk_t * 2);
            }
#endif
            const float inv = softmax_unnormalized(
                s, T, a->mask ? a->mask + b * a->sm_b + (a->sm_h ? head * a->sm_h : 0) : NULL);
            for (int64_t d = 0; d < D; d++) acc[d] = 0.f;
            for (int64_t t = 0; t < T; t++) {
                const uint16_t *vt = vb + t * a->sv_t;
                const float p = s[t];
                if (PF_TOKENS > 0 && t + PF_TOKENS < T) prefetch_vectors(vt + PF_TOKENS * a->sv_t, D * 2);
#pragma omp simd
                for (int64_t d = 0; d < D; d++) acc[d] += p * bf16_to_f32(vt[d]);
            }
            uint16_t *o = a->out + b * a->so_b + head * a->so_h;
            for (int64_t d = 0; d < D; d++) o[d] = f32_to_bf16(acc[d] * inv);
        }
    }
}

void strata_decode_attention_bf16(
    const uint16_t *q, uint16_t *k, uint16_t *v, const float *mask, uint16_t *out,
    int64_t H, int64_t Hkv, int64_t T, int64_t D,
    int64_t sq_b, int64_t sq_h, int64_t sk_b, int64_t sk_h, int64_t sk_t,
    int64_t sv_b, int64_t sv_h, int64_t sv_t, int64_t sm_b, int64_t sm_h,
    int64_t so_b, int64_t so_h, float scale, bf16_new nw, int64_t *next, int64_t rows, int64_t chunk,
    float *scratch) {
    const bf16_args a = {q, k, v, mask, out, H, Hkv, T, sq_b, sq_h, sk_b, sk_h, sk_t, sv_b, sv_h, sv_t,
                         sm_b, sm_h, so_b, so_h, scale, nw};
    FOR_EACH_CHUNK(next, rows, chunk, r0, r1) {
        if (D == 128)
            bf16_rows(&a, 128, r0, r1, scratch);
        else
            bf16_rows(&a, D, r0, r1, scratch);
    }
}

#include "decode_attention_quant.c" /* INT8 / INT4 caches, and their quantizer */
#include "decode_attention_pool.c"  /* the threads a call runs on */
