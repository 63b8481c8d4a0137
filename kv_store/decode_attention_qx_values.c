/* The value half of decode_attention_qx.c (included by it, after the scores and the
 * softmax): out = inv * sum_t p_t V_t over a row's codes, weighted by the softmax's
 * p_t, with each group's min folded in at the end.
 *
 * INT4 values, two tokens at a time on vdpbf16ps: unpacking the 16-bit words of the two
 * tokens' codes puts the same 4 elements of both in one dword, and a shift and one
 * ternary logic op make nibble c the bfloat16 128 + c (bits 0x4300 | c) in each half.
 * One instruction adds w_t (128 + c_t) + w_t+1 (128 + c_t+1) for 16 elements; the 128 is
 * taken back per group at the end: out = sum_t w_t c_t + sum_t p_t min_t. The weight
 * w_t = p_t * scale_t is rounded to bfloat16 (relative 2^-9, the output's own
 * precision; the rounded weights are the ones summed for the correction, so it cancels
 * exactly); products are exact in float32.
 *
 * INT8 values, four tokens at a time on vpdpbusd: a byte transpose of the four tokens'
 * codes (8 unpacks) puts one element of the 4 tokens in a dword. The weights w_t =
 * p_t * scale_t become 22-bit fixed point per group (w = d_w * w22, d_w a power of two,
 * w22 < 2^22, off by at most 2^-23 of the group's largest weight), as three signed-byte
 * digits w22 = 65536 * a + 256 * b + c, each summed exactly in int32. */

/* amin[n] = sum_t p_t min_tn from lanes of [t][NG] order (lane l: group l % NG) */
static inline void qx_group_sums(__m512 v, int64_t NG, float *out) {
    float l[16];
    _mm512_storeu_ps(l, v);
    for (int64_t g = 0; g < NG; g++) out[g] = 0.f;
    for (int i = 0; i < 16; i++) out[i & (NG - 1)] += l[i];
}

/* INT4 value weights: wpair[t/2][n] = (bf16(p_t * vs_tn), bf16(p_t+1 * vs_t+1,n)); wsum[n]
 * the rounded weights' sum, amin[n] = sum_t p_t vm_tn */
static inline void qx_weights4(const qx_shape *sh, const qx_consts *k, const qx_row *row, const float *s,
                               uint32_t *wpair, float *wsum, float *amin) {
    const int64_t NG = sh->NG, n = sh->T * NG, end = sh->Tp * NG;
    const int ng_shift = __builtin_ctzll((unsigned long long)NG);
    __m512 ws = _mm512_setzero_ps(), ms = _mm512_setzero_ps();
    for (int64_t i = 0; i < end; i += 32) { /* 32 (token, group) entries: 32 / NG tokens from i / NG */
        const __m512 p0 = _mm512_permutexvar_ps(k->pidx, _mm512_loadu_ps(s + (i >> ng_shift)));
        const __m512 p1 = _mm512_permutexvar_ps(k->pidx, _mm512_loadu_ps(s + ((i + 16) >> ng_shift)));
        const __m512 w0 = _mm512_mul_ps(p0, qx_halves(row->vs, i, n)), w1 = _mm512_mul_ps(p1, qx_halves(row->vs, i + 16, n));
        ms = _mm512_fmadd_ps(p0, qx_halves(row->vm, i, n), ms);
        ms = _mm512_fmadd_ps(p1, qx_halves(row->vm, i + 16, n), ms);
        const __m512 a = _mm512_permutex2var_ps(w0, k->pair_a, w1), b = _mm512_permutex2var_ps(w0, k->pair_b, w1);
        const __m512i wb = (__m512i)_mm512_cvtne2ps_pbh(b, a); /* a in the low half */
        _mm512_storeu_si512(wpair + i / 2, wb);
        ws = _mm512_add_ps(ws, _mm512_castsi512_ps(_mm512_slli_epi32(wb, 16))); /* the rounded weights, each half */
        ws = _mm512_add_ps(ws, _mm512_castsi512_ps(_mm512_and_si512(wb, _mm512_set1_epi32((int)0xffff0000u))));
    }
    qx_group_sums(ws, NG, wsum); /* dword l: pair-ordered entries 2l, 2l+1, both of group l % NG */
    qx_group_sums(ms, NG, amin);
}

/* One chunk's INT4 values weighted by pairs: acc[h][j] for the words unpacked lo / hi
 * (h) and their nibbles at shift 0, 4, 8, 12 (j) */
static inline __attribute__((always_inline)) void qx_chunk4(const uint8_t *vc, int64_t st, int64_t T, const uint32_t *wpair,
                                                             int64_t NG, __m512i widx, __m512 acc[2][4]) {
    const __mmask16 gm = (__mmask16)((1u << NG) - 1);
    const __m512i nib = _mm512_set1_epi32(0x000f000f), bias = _mm512_set1_epi32(0x43004300);
    __m512 a00 = _mm512_setzero_ps(), a01 = a00, a02 = a00, a03 = a00, a10 = a00, a11 = a00, a12 = a00, a13 = a00;
    const int64_t pairs = (T + 1) / 2, ahead = qx_pf_tokens(st);
    for (int64_t pr = 0; pr < pairs; pr++) {
        const uint8_t *c0 = vc + 2 * pr * st, *c1 = 2 * pr + 1 < T ? c0 + st : c0; /* past the end: weight 0 */
        if (ahead > 0 && 2 * pr + ahead + 1 < T) {
            __builtin_prefetch(c0 + ahead * st, 0, PF_HINT);
            __builtin_prefetch(c0 + (ahead + 1) * st, 0, PF_HINT);
        }
        const __m512bh w = (__m512bh)_mm512_permutexvar_epi32(widx, _mm512_maskz_loadu_epi32(gm, wpair + pr * NG));
        const __m512i x0 = _mm512_loadu_si512(c0), x1 = _mm512_loadu_si512(c1);
        const __m512i lo = _mm512_unpacklo_epi16(x0, x1), hi = _mm512_unpackhi_epi16(x0, x1);
#define QX_NIB(y, n) (__m512bh) _mm512_ternarylogic_epi32(_mm512_srli_epi16(y, n), nib, bias, 0xea) /* (y & nib) | bias */
        a00 = _mm512_dpbf16_ps(a00, (__m512bh)_mm512_ternarylogic_epi32(lo, nib, bias, 0xea), w);
        a01 = _mm512_dpbf16_ps(a01, QX_NIB(lo, 4), w);
        a02 = _mm512_dpbf16_ps(a02, QX_NIB(lo, 8), w);
        a03 = _mm512_dpbf16_ps(a03, QX_NIB(lo, 12), w);
        a10 = _mm512_dpbf16_ps(a10, (__m512bh)_mm512_ternarylogic_epi32(hi, nib, bias, 0xea), w);
        a11 = _mm512_dpbf16_ps(a11, QX_NIB(hi, 4), w);
        a12 = _mm512_dpbf16_ps(a12, QX_NIB(hi, 8), w);
        a13 = _mm512_dpbf16_ps(a13, QX_NIB(hi, 12), w);
#undef QX_NIB
    }
    acc[0][0] = a00, acc[0][1] = a01, acc[0][2] = a02, acc[0][3] = a03;
    acc[1][0] = a10, acc[1][1] = a11, acc[1][2] = a12, acc[1][3] = a13;
}

/* out = inv * sum_t p_t V_t over INT4 codes (vc), a chunk at a time (a chunk is its own
 * cache line of each token: nothing is read twice) */
static inline __attribute__((always_inline)) void qx_values4(const quant_args *a, const qx_shape *sh, const qx_consts *k,
                                                              const qx_row *row, const uint8_t *vc, const float *s,
                                                              uint32_t *wpair, float inv, uint16_t *o, const int64_t NC) {
    float wsum[16], amin[16], base[16] = {0.f};
    qx_weights4(sh, k, row, s, wpair, wsum, amin);
    for (int64_t g = 0; g < sh->NG; g++) base[g] = amin[g] - 128.f * wsum[g];
    static const int nib_elem[4] = {1, 0, 3, 2}; /* shift 0, 4, 8, 12 of word w: element 4w + these */
    const __m512 bv = _mm512_loadu_ps(base), iv = _mm512_set1_ps(inv);
    for (int64_t c = 0; c < NC; c++) {
        __m512 acc[2][4];
        qx_chunk4(vc + 64 * c, a->sc_t, a->T, wpair, sh->NG, k->widx[c], acc);
        const __m512 bc = _mm512_permutexvar_ps(k->widx[c], bv); /* lane 4L + i: quarter L's group (32 elements) */
        for (int h = 0; h < 2; h++)
            for (int j = 0; j < 4; j++) {
                uint16_t part[16];
                _mm256_storeu_si256((__m256i *)part, (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_add_ps(acc[h][j], bc), iv)));
                for (int L = 0; L < 4; L++)
                    for (int i = 0; i < 4; i++) o[128 * c + 4 * (8 * L + 4 * h + i) + nib_elem[j]] = part[4 * L + i];
            }
    }
}

/* INT8 value weights as digit planes: wq[d][t/4][n] = the 4 tokens' digit d (0: units,
 * 1: 256s, 2: 65536s) of w22 = w / step[n]; amin[n] = sum_t p_t vm_tn */
static inline void qx_weights8(const qx_shape *sh, const qx_consts *k, const qx_row *row, const float *s, uint8_t *wq[3],
                               float *step, float *amin) {
    const int64_t NG = sh->NG, n = sh->T * NG, end = sh->Tp * NG;
    const int ng_shift = __builtin_ctzll((unsigned long long)NG);
    __m512 mx = _mm512_setzero_ps(), ms = _mm512_setzero_ps();
    for (int64_t i = 0; i < end; i += 16) {
        const __m512 p = _mm512_permutexvar_ps(k->pidx, _mm512_loadu_ps(s + (i >> ng_shift)));
        mx = _mm512_max_ps(mx, _mm512_mul_ps(p, qx_halves(row->vs, i, n)));
        ms = _mm512_fmadd_ps(p, qx_halves(row->vm, i, n), ms);
    }
    qx_group_sums(ms, NG, amin);
    float top[16], inv[16];
    _mm512_storeu_ps(top, mx);
    for (int64_t g = 0; g < NG; g++)
        for (int i = (int)g + (int)NG; i < 16; i += (int)NG) top[g] = top[i] > top[g] ? top[i] : top[g];
    for (int64_t g = 0; g < NG; g++) { /* top < 2^e: step 2^(e - 22), w22 < 2^22 */
        uint32_t b;
        memcpy(&b, &top[g], sizeof b);
        int32_t e = (int32_t)((b >> 23) & 0xff) - 126;
        e = e < -100 ? -100 : (e > 120 ? 120 : e);
        const uint32_t sb = (uint32_t)(e - 22 + 127) << 23, ib = (uint32_t)(22 - e + 127) << 23;
        memcpy(&step[g], &sb, sizeof sb);
        memcpy(&inv[g], &ib, sizeof ib);
    }
    for (int i = (int)NG; i < 16; i++) inv[i] = inv[i & (NG - 1)];
    const __m512 iv = _mm512_loadu_ps(inv);
    const __m512i b128 = _mm512_set1_epi32(128), m255 = _mm512_set1_epi32(255);
    for (int64_t i = 0; i < end; i += 16) { /* 16 entries: 4 / NG blocks of 4 tokens, in (block, group, t & 3) order */
        const __m512 p = _mm512_permutexvar_ps(k->pidx, _mm512_loadu_ps(s + (i >> ng_shift)));
        const __m512i w = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_mul_ps(p, qx_halves(row->vs, i, n)), iv));
        const __m512i v = _mm512_permutexvar_epi32(k->quad, w);
        const __m512i d0 = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(v, b128), m255), b128);
        const __m512i r = _mm512_srai_epi32(_mm512_sub_epi32(v, d0), 8);
        const __m512i d1 = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(r, b128), m255), b128);
        const __m512i d2 = _mm512_srai_epi32(_mm512_sub_epi32(r, d1), 8);
        _mm_storeu_si128((__m128i *)(wq[0] + i), _mm512_cvtepi32_epi8(d0));
        _mm_storeu_si128((__m128i *)(wq[1] + i), _mm512_cvtepi32_epi8(d1));
        _mm_storeu_si128((__m128i *)(wq[2] + i), _mm512_cvtepi32_epi8(d2));
    }
}

/* out = inv * sum_t p_t V_t over INT8 codes, a chunk at a time: 4 tokens' codes
 * transposed to one element's 4 tokens a dword, times the three digits' bytes */
static inline __attribute__((always_inline)) void qx_values8(const quant_args *a, const qx_shape *sh, const qx_consts *k,
                                                              const qx_row *row, const uint8_t *vc, const float *s,
                                                              uint32_t *scratch, float inv, uint16_t *o,
                                                              const int64_t NC) {
    const int64_t NG = sh->NG, T = a->T, st = a->sc_t, quads = (T + 3) / 4, ahead = qx_pf_tokens(st);
    float step[16], amin[16];
    uint8_t *wq[3];
    for (int d = 0; d < 3; d++) wq[d] = (uint8_t *)(scratch + d * (sh->Tp * NG / 4 + 16));
    qx_weights8(sh, k, row, s, wq, step, amin);
    const __mmask16 gm = (__mmask16)((1u << NG) - 1);
    static const uint8_t zeros[64];
    for (int64_t c = 0; c < NC; c++) {
        float total[64] = {0.f};
        for (int64_t t0 = 0; t0 < quads; t0 += QX_SPAN / 4) { /* int32 sums below 2^31 */
            const int64_t t1 = t0 + QX_SPAN / 4 < quads ? t0 + QX_SPAN / 4 : quads;
            __m512i acc[4][3];
            for (int m = 0; m < 4; m++)
                for (int d = 0; d < 3; d++) acc[m][d] = _mm512_setzero_si512();
            for (int64_t q = t0; q < t1; q++) {
                const uint8_t *r[4], *r0 = vc + 4 * q * st + 64 * c;
                if (4 * q + 4 <= T)
                    for (int j = 0; j < 4; j++) r[j] = r0 + j * st;
                else /* the last tokens, then zeros */
                    for (int j = 0; j < 4; j++) r[j] = 4 * q + j < T ? r0 + j * st : zeros;
                if (ahead > 0 && 4 * q + ahead + 4 <= T)
                    for (int j = 0; j < 4; j++) __builtin_prefetch(r[j] + ahead * st, 0, PF_HINT);
                const __m512i x0 = _mm512_loadu_si512(r[0]), x1 = _mm512_loadu_si512(r[1]);
                const __m512i x2 = _mm512_loadu_si512(r[2]), x3 = _mm512_loadu_si512(r[3]);
                const __m512i u0 = _mm512_unpacklo_epi8(x0, x1), u1 = _mm512_unpackhi_epi8(x0, x1);
                const __m512i u2 = _mm512_unpacklo_epi8(x2, x3), u3 = _mm512_unpackhi_epi8(x2, x3);
                const __m512i e[4] = {_mm512_unpacklo_epi16(u0, u2), _mm512_unpackhi_epi16(u0, u2),
                                      _mm512_unpacklo_epi16(u1, u3), _mm512_unpackhi_epi16(u1, u3)};
                for (int d = 0; d < 3; d++) {
                    const __m512i w = _mm512_permutexvar_epi32(
                        k->widx[c], _mm512_maskz_loadu_epi32(gm, (const uint32_t *)wq[d] + q * NG));
                    for (int m = 0; m < 4; m++) acc[m][d] = _mm512_dpbusd_epi32(acc[m][d], e[m], w);
                }
            }
            for (int m = 0; m < 4; m++) { /* e[m] lane 4L + i: byte 16L + 4m + i of the chunk */
                const __m512 v = _mm512_fmadd_ps(
                    _mm512_cvtepi32_ps(acc[m][2]), _mm512_set1_ps(65536.f),
                    _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[m][1]), _mm512_set1_ps(256.f), _mm512_cvtepi32_ps(acc[m][0])));
                float part[16];
                _mm512_storeu_ps(part, v);
                for (int L = 0; L < 4; L++)
                    for (int i = 0; i < 4; i++) total[16 * L + 4 * m + i] += part[4 * L + i];
            }
        }
        for (int L = 0; L < 4; L++) { /* bytes 16L.. of the chunk: one group */
            const int64_t g = (64 * c + 16 * L) >> sh->gshift;
            const __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(total + 16 * L), _mm512_set1_ps(step[g]), _mm512_set1_ps(amin[g]));
            _mm256_storeu_si256((__m256i *)(o + 64 * c + 16 * L), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(v, _mm512_set1_ps(inv))));
        }
    }
}
