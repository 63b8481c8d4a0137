/* INT4 decode attention on bfloat16 dot-product instructions (AVX512_BF16), for the
 * common format: head_dim 128, groups of 64: one query head's scores (q4_scores) and
 * output (q4_output). Included by decode_attention_quant.c, whose quant_rows calls them
 * for that format where the compiler targets those instructions; the same result as its
 * own loops to float32 rounding of the sums and bfloat16 rounding of each value weight
 * (below). Scratch: the row's scales and mins as quant_rows lays them out, then
 * NG * ceil(T/2) words of weight pairs (T * (2 + 4 * D/group) + 16 floats in all).
 *
 * Why: the plain path widens every nibble to int32, then float, then multiplies: it is
 * bound by those conversions on the device's hosts (INT4 18 ns a cached vector on one
 * thread, against 15 for bfloat16). Here a nibble becomes a bfloat16 by one OR: the
 * bits 0x4300 | c are the number 128 + c, exact; vdpbf16ps then multiplies 32 pairs a
 * call into float32 sums. The +128 per element is taken back once per group:
 *     keys:   q_n . (c + 128) = q_n . c + 128 * sum(q_n)
 *     values: sum_t w_t (c_t + 128) = sum_t w_t c_t + 128 * sum_t w_t
 * Products are exact in float32 (8-bit by 8-bit significands). Queries stay as the
 * bfloat16 they arrive in (the softmax scale is applied to the score). A value's
 * weight w_t = p_t * scale_t is rounded to bfloat16 (relative 2^-9, the output's own
 * precision), and the rounded weights are the ones summed for the correction, so it
 * cancels exactly. Values go two tokens at a time: the codes of t and t+1 are
 * interleaved per element, so one instruction adds both tokens' weighted codes. */

#if defined(HAVE_BF16DOT) && defined(__AVX512BW__)
#define HAVE_Q4_BF16DOT 1

enum { Q4_D = 128, Q4_GROUP = 64, Q4_NG = 2, Q4_CG = 32 };

/* 32 codes (bytes) as 64 elements: even elements (high nibbles) and odd ones (low), each
 * as 32 bfloat16 of 128 + code */
static inline void q4_widen(const uint8_t *c, __m512i *even, __m512i *odd) {
    const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)c));
    const __m512i bias = _mm512_set1_epi16(0x4300);
    *even = _mm512_or_si512(_mm512_srli_epi16(w, 4), bias);
    *odd = _mm512_or_si512(_mm512_and_si512(w, _mm512_set1_epi16(15)), bias);
}

static inline float q4_key(const __m512i *qe, const __m512i *qo, const uint8_t *ct, const float *sc, float base) {
    __m512 lanes = _mm512_setzero_ps();
    for (int n = 0; n < Q4_NG; n++) {
        __m512i e, o;
        q4_widen(ct + n * Q4_CG, &e, &o);
        __m512 g = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)qe[n], (__m512bh)e);
        g = _mm512_dpbf16_ps(g, (__m512bh)qo[n], (__m512bh)o);
        lanes = _mm512_fmadd_ps(_mm512_set1_ps(sc[n]), g, lanes);
    }
    return _mm512_reduce_add_ps(lanes) + base;
}

/* acc[n][0..3]: group n's even elements from unpacklo / unpackhi, then its odd ones;
 * dword lane 4k+i of a lo accumulator holds element 8k+i of the 32, of a hi one 8k+4+i */
static inline void q4_values(const uint8_t *vc, int64_t sc_t, const uint32_t *wpair, int64_t T, __m512 acc[Q4_NG][4]) {
    for (int n = 0; n < Q4_NG; n++)
        for (int j = 0; j < 4; j++) acc[n][j] = _mm512_setzero_ps();
    for (int64_t t = 0; t < T; t += 2) {
        const uint8_t *c0 = vc + t * sc_t, *c1 = t + 1 < T ? c0 + sc_t : c0; /* past the end: weight 0 */
        for (int n = 0; n < Q4_NG; n++) {
            __m512i e0, o0, e1, o1;
            q4_widen(c0 + n * Q4_CG, &e0, &o0);
            q4_widen(c1 + n * Q4_CG, &e1, &o1);
            const __m512bh w = (__m512bh)_mm512_set1_epi32((int)wpair[n * ((T + 1) / 2) + t / 2]);
            acc[n][0] = _mm512_dpbf16_ps(acc[n][0], (__m512bh)_mm512_unpacklo_epi16(e0, e1), w);
            acc[n][1] = _mm512_dpbf16_ps(acc[n][1], (__m512bh)_mm512_unpackhi_epi16(e0, e1), w);
            acc[n][2] = _mm512_dpbf16_ps(acc[n][2], (__m512bh)_mm512_unpacklo_epi16(o0, o1), w);
            acc[n][3] = _mm512_dpbf16_ps(acc[n][3], (__m512bh)_mm512_unpackhi_epi16(o0, o1), w);
        }
    }
}

/* Scores s[0..T) of one query head (bfloat16, qh) against its row's keys; ks, km: the
 * row's key scales and mins as float32 [T, NG] (row_scales). */
static inline void q4_scores(const quant_args *a, const uint16_t *qh, const uint8_t *kc, const float *ks,
                             const float *km, float *s) {
    static const uint16_t even[32] = {0,  2,  4,  6,  8,  10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30,
                                      32, 34, 36, 38, 40, 42, 44, 46, 48, 50, 52, 54, 56, 58, 60, 62};
    const __m512i idx_even = _mm512_loadu_si512(even), idx_odd = _mm512_add_epi16(idx_even, _mm512_set1_epi16(1));
    __m512i qe[Q4_NG], qo[Q4_NG]; /* a group's even elements, then its odd ones (the nibble order) */
    float qsum[Q4_NG];
    for (int n = 0; n < Q4_NG; n++) {
        const __m512i lo = _mm512_loadu_si512(qh + n * Q4_GROUP), hi = _mm512_loadu_si512(qh + n * Q4_GROUP + 32);
        qe[n] = _mm512_permutex2var_epi16(lo, idx_even, hi);
        qo[n] = _mm512_permutex2var_epi16(lo, idx_odd, hi);
        float sum = 0.f;
        for (int d = 0; d < Q4_GROUP; d++) sum += bf16_to_f32(qh[n * Q4_GROUP + d]);
        qsum[n] = sum;
    }
    for (int64_t t = 0; t < a->T; t++) { /* scale * (sum_n s_n (A_n - 128 qsum_n) + m_n qsum_n) */
        const float *sc = ks + t * Q4_NG, *mn = km + t * Q4_NG;
        float base = 0.f;
        for (int n = 0; n < Q4_NG; n++) base += qsum[n] * (mn[n] - 128.f * sc[n]);
        s[t] = a->scale * q4_key(qe, qo, kc + t * a->sc_t, sc, base);
    }
}

/* out[0..D) = inv * sum_t p_t V_t for probabilities p = s (unnormalized); vs, vm: the
 * row's value scales and mins [T, NG]; wpair: NG * ceil(T/2) scratch words. */
static inline void q4_output(const quant_args *a, const uint8_t *vc, const float *s, float inv, const float *vs,
                             const float *vm, uint32_t *wpair, uint16_t *o) {
    const int64_t T = a->T, pairs = (T + 1) / 2;
    float wsum[Q4_NG] = {0.f}, accmin[Q4_NG] = {0.f};
    for (int n = 0; n < Q4_NG; n++) {
        uint16_t *w16 = (uint16_t *)(wpair + n * pairs);
        for (int64_t t = 0; t < T; t++) {
            const uint16_t w = f32_to_bf16(s[t] * vs[t * Q4_NG + n]);
            w16[t] = w;
            wsum[n] += bf16_to_f32(w);
            accmin[n] += s[t] * vm[t * Q4_NG + n];
        }
        if (T & 1) w16[T] = 0;
    }
    __m512 acc[Q4_NG][4];
    q4_values(vc, a->sc_t, wpair, T, acc);
    for (int n = 0; n < Q4_NG; n++) {
        float part[4][16];
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(part[j], acc[n][j]);
        const float base = accmin[n] - 128.f * wsum[n];
        for (int k = 0; k < 4; k++)
            for (int i = 0; i < 4; i++)
                for (int j = 0; j < 4; j++) { /* j: even lo, even hi, odd lo, odd hi */
                    const int e = 8 * k + i + (j & 1) * 4, d = n * Q4_GROUP + 2 * e + (j >> 1);
                    o[d] = f32_to_bf16((part[j][4 * k + i] + base) * inv);
                }
    }
}
#endif
