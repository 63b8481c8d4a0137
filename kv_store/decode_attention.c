/* Decode attention over a bfloat16 KV cache on the CPU: one query per head, every
 * cached key read once, in cache order.
 *
 * For each (sequence b, key/value head h) of rows [r0, r1):
 *     s[g][t] = scale * q[b, h*G+g] . K[b, h, t] + mask[b, h*G+g or 0, t]
 *     p = softmax(s[g])   (float32)
 *     out[b, h*G+g] = sum_t p[g][t] * V[b, h, t]      (float32 accumulation, bf16 out)
 * G = query heads per key/value head (grouped-query attention; 1 for OPT): a key row
 * is read once for all G queries. The caller runs disjoint row ranges on several
 * threads (the call holds no lock and touches only its rows); `scratch` is the
 * calling thread's own, G * (T + D) floats.
 *
 * Memory-bound by design: per key row D bf16 values are loaded, widened to float32 and
 * multiplied into G dot products; the loops over D vectorize (-O3 -march=native). */

#include <math.h>
#include <stdint.h>
#include <string.h>

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

void strata_decode_attention_bf16(
    const uint16_t *q, const uint16_t *k, const uint16_t *v, const float *mask, uint16_t *out,
    int64_t H, int64_t Hkv, int64_t T, int64_t D,
    int64_t sq_b, int64_t sq_h, int64_t sk_b, int64_t sk_h, int64_t sk_t,
    int64_t sv_b, int64_t sv_h, int64_t sv_t, int64_t sm_b, int64_t sm_h,
    int64_t so_b, int64_t so_h, float scale, int64_t r0, int64_t r1, float *scratch) {
    const int64_t G = H / Hkv;
    float *s = scratch;          /* [G][T] scores, then probabilities */
    float *acc = scratch + G * T; /* [G][D] */
    float qf[8 * 256];           /* G * D <= 2048: checked by the caller */
    for (int64_t r = r0; r < r1; r++) {
        const int64_t b = r / Hkv, h = r % Hkv;
        const uint16_t *kb = k + b * sk_b + h * sk_h;
        const uint16_t *vb = v + b * sv_b + h * sv_h;
        for (int64_t g = 0; g < G; g++) {
            const uint16_t *qh = q + b * sq_b + (h * G + g) * sq_h;
            for (int64_t d = 0; d < D; d++) qf[g * D + d] = bf16_to_f32(qh[d]) * scale;
        }
        for (int64_t t = 0; t < T; t++) {
            const uint16_t *kt = kb + t * sk_t;
            for (int64_t g = 0; g < G; g++) {
                const float *qg = qf + g * D;
                float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                for (int64_t d = 0; d < D; d++) dot += qg[d] * bf16_to_f32(kt[d]);
                s[g * T + t] = dot;
            }
        }
        for (int64_t g = 0; g < G; g++) {
            float *sg = s + g * T;
            if (mask) {
                const float *m = mask + b * sm_b + (sm_h ? (h * G + g) * sm_h : 0);
                for (int64_t t = 0; t < T; t++) sg[t] += m[t];
            }
            float mx = -INFINITY;
            for (int64_t t = 0; t < T; t++) mx = sg[t] > mx ? sg[t] : mx;
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int64_t t = 0; t < T; t++) {
                sg[t] = exp_nonpositive(sg[t] - mx);
                sum += sg[t];
            }
            const float inv = 1.f / sum;
            for (int64_t t = 0; t < T; t++) sg[t] *= inv;
            memset(acc + g * D, 0, (size_t)D * sizeof(float));
        }
        for (int64_t t = 0; t < T; t++) {
            const uint16_t *vt = vb + t * sv_t;
            for (int64_t g = 0; g < G; g++) {
                const float p = s[g * T + t];
                float *ag = acc + g * D;
#pragma omp simd
                for (int64_t d = 0; d < D; d++) ag[d] += p * bf16_to_f32(vt[d]);
            }
        }
        for (int64_t g = 0; g < G; g++) {
            uint16_t *o = out + b * so_b + (h * G + g) * so_h;
            for (int64_t d = 0; d < D; d++) o[d] = f32_to_bf16(acc[g * D + d]);
        }
    }
}
