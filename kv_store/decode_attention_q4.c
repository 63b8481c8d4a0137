/* INT4 decode attention on bfloat16 dot-product instructions (AVX512_BF16), for the
 * common format: head_dim 128, groups of 64. Included by decode_attention_quant.c, which
 * calls it where the compiler targets those instructions; same result contract as
 * quant_rows (same cache layout, same arguments), to float32 rounding of the sums and
 * bfloat16 rounding of each value weight (below).
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

/* scratch: T * (2 + 4 * Q4_NG) + 16 floats */
static void q4_rows_bf16dot(const quant_args *a, int64_t r0, int64_t r1, float *s) {
    const int64_t G = a->H / a->Hkv, T = a->T, NG = Q4_NG;
    float *ks = s + T, *km = ks + T * NG, *vs = km + T * NG, *vm = vs + T * NG;
    uint32_t *wpair = (uint32_t *)(vm + T * NG); /* NG * ceil(T/2) bfloat16 weight pairs */
    /* even / odd positions of a group's 64 query elements (the nibble order) */
    __m512i idx_even, idx_odd;
    {
        uint16_t ie[32], io[32];
        for (int j = 0; j < 32; j++) ie[j] = (uint16_t)(2 * j), io[j] = (uint16_t)(2 * j + 1);
        idx_even = _mm512_loadu_si512(ie);
        idx_odd = _mm512_loadu_si512(io);
    }
    for (int64_t r = r0; r < r1; r++) {
        const int64_t b = r / a->Hkv, h = r % a->Hkv;
        const uint8_t *kc = a->kc + b * a->sc_b + h * a->sc_h, *vc = a->vc + b * a->sc_b + h * a->sc_h;
        row_scales(a, b * a->ss_b + h * a->ss_h, NG, ks);
        for (int64_t g = 0; g < G; g++) {
            const int64_t head = h * G + g;
            const uint16_t *qh = a->q + b * a->sq_b + head * a->sq_h;
            __m512i qe[Q4_NG], qo[Q4_NG];
            float qsum[Q4_NG];
            for (int n = 0; n < Q4_NG; n++) {
                const __m512i lo = _mm512_loadu_si512(qh + n * Q4_GROUP), hi = _mm512_loadu_si512(qh + n * Q4_GROUP + 32);
                qe[n] = _mm512_permutex2var_epi16(lo, idx_even, hi);
                qo[n] = _mm512_permutex2var_epi16(lo, idx_odd, hi);
                float sum = 0.f;
                for (int d = 0; d < Q4_GROUP; d++) sum += bf16_to_f32(qh[n * Q4_GROUP + d]);
                qsum[n] = sum;
            }
            for (int64_t t = 0; t < T; t++) { /* scale * (sum_n s_n (A_n - 128 qsum_n) + m_n qsum_n) */
                const float *sc = ks + t * NG, *mn = km + t * NG;
                float base = 0.f;
                for (int n = 0; n < Q4_NG; n++) base += qsum[n] * (mn[n] - 128.f * sc[n]);
                s[t] = a->scale * q4_key(qe, qo, kc + t * a->sc_t, sc, base);
            }
            const float inv = softmax_unnormalized(
                s, T, a->mask ? a->mask + b * a->sm_b + (a->sm_h ? head * a->sm_h : 0) : NULL);
            float wsum[Q4_NG] = {0.f}, accmin[Q4_NG] = {0.f};
            const int64_t pairs = (T + 1) / 2;
            for (int n = 0; n < Q4_NG; n++) {
                uint16_t *w16 = (uint16_t *)(wpair + n * pairs);
                for (int64_t t = 0; t < T; t++) {
                    const uint16_t w = f32_to_bf16(s[t] * vs[t * NG + n]);
                    w16[t] = w;
                    wsum[n] += bf16_to_f32(w);
                    accmin[n] += s[t] * vm[t * NG + n];
                }
                if (T & 1) w16[T] = 0;
            }
            __m512 acc[Q4_NG][4];
            q4_values(vc, a->sc_t, wpair, T, acc);
            uint16_t *o = a->out + b * a->so_b + head * a->so_h;
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
    }
}
#endif
