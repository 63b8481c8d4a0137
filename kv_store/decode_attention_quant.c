/* The KV store's decode attention over quantized caches (INT8 / INT4, strata/model/kv_quant.py's
 * format) and the quantizer that writes them. Included by decode_attention.c (one
 * translation unit: the helpers there, exp and bf16 conversions, are shared). */

#define LANES 16 /* codes per group step: the caller checks group's code bytes are a multiple */

#if defined(__F16C__)
#include <immintrin.h>
static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }
#else
static inline float half_to_float(uint16_t h) { /* normals and subnormals (the scales and mins) */
    uint32_t u = (uint32_t)(h & 0x7fffu) << 13;
    float f;
    memcpy(&f, &u, sizeof f);
    f *= 0x1p112f;
    return (h & 0x8000u) ? -f : f;
}
#endif

/* The same attention over a cache quantized group-wise on head_dim (strata/model/kv_quant.py):
 * codes [B, Hkv, T, CW] uint8 (INT8: CW = D; INT4: CW = D/2, element 2j in the high
 * nibble of byte j, 2j+1 in the low), scale and min [B, Hkv, T, D/group] float16,
 * element = code * scale + min. K and V share strides (sc_*: codes, ss_*: scale/min).
 * Per key:   q.k = sum_n scale_n * (q_n . codes_n) + min_n * sum(q_n)
 * Per value: out += (p * scale_n) * codes_n, and sum_t p * min_n once per group at the
 * end; nothing is dequantized to memory. Query heads of a group go one at a time over
 * the row's tokens (the row's codes stay in L2 for the next one), so a query and an
 * accumulator live in registers across the token loop. scratch: the calling thread's,
 * strata_quant_scratch_floats(T, D, group, bits) floats. Where the compiler targets
 * AVX512-VNNI and -BF16, formats of whole 64-byte chunks of codes take the kernels of
 * decode_attention_qx.c instead; these loops are the portable path. */
typedef struct {
    const uint16_t *q; const uint8_t *kc; const uint16_t *ks, *km; const uint8_t *vc; const uint16_t *vs, *vm;
    const float *mask; uint16_t *out;
    int64_t H, Hkv, T, sq_b, sq_h, sc_b, sc_h, sc_t, ss_b, ss_h, ss_t, sm_b, sm_h, so_b, so_h;
    float scale;
} quant_args;

/* q . k for one quantized key: sum_n scale_n * (q_n . codes_n) + min_n * sum(q_n), with
 * one 16-lane partial sum per key (a horizontal add per key, not per group). With
 * AVX-512 written with intrinsics: the compiler's own version of the same loops ended
 * each key in scalar shuffles and adds (20 ns a key against 6 for a bf16 key). */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline __attribute__((always_inline)) float quant_dot(const float *qf, const float *qsum, const uint8_t *ct,
                                                             const float *sc, const float *mn, const int64_t NG,
                                                             const int64_t CG, const int64_t group, const int64_t bits) {
    __m512 lanes = _mm512_setzero_ps();
    float total = 0.f;
    for (int64_t n = 0; n < NG; n++) {
        const uint8_t *cn = ct + n * CG;
        const float *qn = qf + n * group;
        __m512 gl = _mm512_setzero_ps();
        for (int64_t j = 0; j < CG; j += LANES) {
            const __m512i c = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(cn + j)));
            if (bits == 8) {
                gl = _mm512_fmadd_ps(_mm512_loadu_ps(qn + j), _mm512_cvtepi32_ps(c), gl);
            } else {
                const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(c, 4));
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(c, _mm512_set1_epi32(15)));
                gl = _mm512_fmadd_ps(_mm512_loadu_ps(qn + j), hi, gl);
                gl = _mm512_fmadd_ps(_mm512_loadu_ps(qn + CG + j), lo, gl);
            }
        }
        lanes = _mm512_fmadd_ps(_mm512_set1_ps(sc[n]), gl, lanes);
        total += mn[n] * qsum[n];
    }
    return total + _mm512_reduce_add_ps(lanes);
}
#else
static inline __attribute__((always_inline)) float quant_dot(const float *qf, const float *qsum, const uint8_t *ct,
                                                             const float *sc, const float *mn, const int64_t NG,
                                                             const int64_t CG, const int64_t group, const int64_t bits) {
    float lanes[LANES] = {0}, total = 0.f;
    for (int64_t n = 0; n < NG; n++) {
        const uint8_t *cn = ct + n * CG;
        const float *qn = qf + n * group;
        float gl[LANES] = {0};
        for (int64_t j = 0; j < CG; j += LANES)
            for (int l = 0; l < LANES; l++) {
                if (bits == 8)
                    gl[l] += qn[j + l] * (float)cn[j + l];
                else
                    gl[l] += qn[j + l] * (float)(cn[j + l] >> 4) + qn[CG + j + l] * (float)(cn[j + l] & 15);
            }
        for (int l = 0; l < LANES; l++) lanes[l] += sc[n] * gl[l];
        total += mn[n] * qsum[n];
    }
    for (int l = 0; l < LANES; l++) total += lanes[l];
    return total;
}
#endif

/* One row's key and value scales and mins as float32, [T, NG] each, one after the other
 * from `out` (ks, km, vs, vm): `os` is the row's offset in the scale/min tensors. */
static inline void row_scales(const quant_args *a, int64_t os, int64_t NG, float *out) {
    const int64_t T = a->T;
    float *ks = out, *km = ks + T * NG, *vs = km + T * NG, *vm = vs + T * NG;
    for (int64_t t = 0; t < T; t++)
        for (int64_t n = 0; n < NG; n++) {
            const int64_t i = os + t * a->ss_t + n;
            ks[t * NG + n] = half_to_float(a->ks[i]);
            km[t * NG + n] = half_to_float(a->km[i]);
            vs[t * NG + n] = half_to_float(a->vs[i]);
            vm[t * NG + n] = half_to_float(a->vm[i]);
        }
}

#include "decode_attention_qx.c" /* the whole-chunk formats on VNNI and bfloat16 dot products, where targeted */

static inline __attribute__((always_inline)) void quant_rows(const quant_args *a, const int64_t D, const int64_t group,
                                                             const int64_t bits, int64_t r0, int64_t r1, float *s) {
    const int64_t G = a->H / a->Hkv, NG = D / group, CG = bits == 8 ? group : group / 2, T = a->T;
    float qf[256], qsum[256], acc[256], accmin[256];
    /* the row's scales and mins as float32, converted in one vectorized pass each */
    float *ks = s + T, *km = ks + T * NG, *vs = km + T * NG, *vm = vs + T * NG;
    for (int64_t r = r0; r < r1; r++) {
        const int64_t b = r / a->Hkv, h = r % a->Hkv;
        const uint8_t *kc = a->kc + b * a->sc_b + h * a->sc_h, *vc = a->vc + b * a->sc_b + h * a->sc_h;
        row_scales(a, b * a->ss_b + h * a->ss_h, NG, ks);
        for (int64_t g = 0; g < G; g++) {
            const int64_t head = h * G + g;
            const uint16_t *qh = a->q + b * a->sq_b + head * a->sq_h;
            const float *mask = a->mask ? a->mask + b * a->sm_b + (a->sm_h ? head * a->sm_h : 0) : NULL;
            uint16_t *o = a->out + b * a->so_b + head * a->so_h;
            if (bits == 8) {
                for (int64_t d = 0; d < D; d++) qf[d] = bf16_to_f32(qh[d]) * a->scale;
            } else { /* per group: its even elements, then its odd ones (the nibble order) */
                for (int64_t n = 0; n < NG; n++)
                    for (int64_t j = 0; j < CG; j++) {
                        qf[n * group + j] = bf16_to_f32(qh[n * group + 2 * j]) * a->scale;
                        qf[n * group + CG + j] = bf16_to_f32(qh[n * group + 2 * j + 1]) * a->scale;
                    }
            }
            for (int64_t n = 0; n < NG; n++) {
                float sum = 0.f;
                for (int64_t d = 0; d < group; d++) sum += qf[n * group + d];
                qsum[n] = sum;
            }
            /* scores, 4 keys at a time: their dot products are independent chains the
             * core overlaps (one key at a time was bound by the chain's latency) */
            int64_t t = 0;
            for (; t + 4 <= T; t += 4)
                for (int u = 0; u < 4; u++)
                    s[t + u] = quant_dot(qf, qsum, kc + (t + u) * a->sc_t, ks + (t + u) * NG, km + (t + u) * NG, NG,
                                         CG, group, bits);
            for (; t < T; t++) s[t] = quant_dot(qf, qsum, kc + t * a->sc_t, ks + t * NG, km + t * NG, NG, CG, group, bits);
            const float inv = softmax_unnormalized(s, T, mask);
            for (int64_t d = 0; d < D; d++) acc[d] = 0.f;
            for (int64_t n = 0; n < NG; n++) accmin[n] = 0.f;
            for (int64_t t = 0; t < T; t++) { /* values, weighted by the probabilities */
                const uint8_t *ct = vc + t * a->sc_t;
                const float p = s[t];
                for (int64_t n = 0; n < NG; n++) {
                    const uint8_t *cn = ct + n * CG;
                    float *an = acc + n * group;
                    const float ps = p * vs[t * NG + n];
                    accmin[n] += p * vm[t * NG + n];
                    for (int64_t j = 0; j < CG; j++) {
                        if (bits == 8) {
                            an[j] += ps * (float)cn[j];
                        } else { /* acc keeps the group's even elements, then its odd ones */
                            an[j] += ps * (float)(cn[j] >> 4);
                            an[CG + j] += ps * (float)(cn[j] & 15);
                        }
                    }
                }
            }
            for (int64_t n = 0; n < NG; n++) {
                const float *an = acc + n * group;
                const float base = accmin[n];
                for (int64_t j = 0; j < CG; j++) {
                    if (bits == 8) {
                        o[n * group + j] = f32_to_bf16((an[j] + base) * inv);
                    } else {
                        o[n * group + 2 * j] = f32_to_bf16((an[j] + base) * inv);
                        o[n * group + 2 * j + 1] = f32_to_bf16((an[CG + j] + base) * inv);
                    }
                }
            }
        }
    }
}

/* The scratch floats a thread needs for strata_decode_attention_quant over T tokens */
int64_t strata_quant_scratch_floats(int64_t T, int64_t D, int64_t group, int64_t bits) {
    int64_t n = T * (2 + 4 * D / group) + 16;
#ifdef HAVE_QX
    if (qx_supported(D, group, bits)) {
        const int64_t m = qx_scratch_floats(D, group, bits, T);
        n = m > n ? m : n;
    }
#else
    (void)bits;
#endif
    return n;
}

void strata_decode_attention_quant(
    const uint16_t *q, const uint8_t *kc, const uint16_t *ks, const uint16_t *km,
    const uint8_t *vc, const uint16_t *vs, const uint16_t *vm, const float *mask, uint16_t *out,
    int64_t H, int64_t Hkv, int64_t T, int64_t D, int64_t group, int64_t bits,
    int64_t sq_b, int64_t sq_h, int64_t sc_b, int64_t sc_h, int64_t sc_t, int64_t ss_b, int64_t ss_h,
    int64_t ss_t, int64_t sm_b, int64_t sm_h, int64_t so_b, int64_t so_h,
    float scale, int64_t *next, int64_t rows, int64_t chunk, float *scratch) {
    const quant_args a = {q, kc, ks, km, vc, vs, vm, mask, out, H, Hkv, T, sq_b, sq_h, sc_b, sc_h, sc_t,
                          ss_b, ss_h, ss_t, sm_b, sm_h, so_b, so_h, scale};
    /* the common shape with constants, so the compiler unrolls the group loops */
    FOR_EACH_CHUNK(next, rows, chunk, r0, r1) {
#ifdef HAVE_QX
        if (qx_supported(D, group, bits)) {
            qx_rows(&a, D, group, bits, r0, r1, scratch);
            continue;
        }
#endif
        if (D == 128 && group == 64 && bits == 8)
            quant_rows(&a, 128, 64, 8, r0, r1, scratch);
        else if (D == 128 && group == 64 && bits == 4)
            quant_rows(&a, 128, 64, 4, r0, r1, scratch);
        else
            quant_rows(&a, D, group, bits, r0, r1, scratch);
    }
}

/* Quantize bfloat16 vectors into the cache's format (strata/model/quant.py's scheme, per
 * group of `group` on head_dim): min and max in float32, scale = max((max - min) /
 * (2^bits - 1), float16's smallest normal), code = round-half-even((x - min) / scale)
 * clamped, scale and min stored as float16. x [B, H, n, D] -> codes [B, H, n, CW],
 * scale and min [B, H, n, D/group] (strided), rows r = b * H + h claimed from `next`. Returns
 * -1 where the compiler has no _Float16 (the caller quantizes with PyTorch), else 0. */
int strata_quantize_bf16(const uint16_t *x, uint8_t *codes, uint16_t *scale, uint16_t *mn,
                         int64_t H, int64_t n, int64_t D, int64_t group, int64_t bits,
                         int64_t sx_b, int64_t sx_h, int64_t sx_t, int64_t sc_b, int64_t sc_h, int64_t sc_t,
                         int64_t ss_b, int64_t ss_h, int64_t ss_t, int64_t *next, int64_t rows, int64_t chunk) {
#if defined(__FLT16_MANT_DIG__)
    const float q_max = (float)((1 << bits) - 1), tiny = 6.103515625e-05f; /* float16 smallest normal */
    const int64_t NG = D / group;
    float v[256];
    FOR_EACH_CHUNK(next, rows, chunk, r0, r1) for (int64_t r = r0; r < r1; r++) {
        const int64_t b = r / H, h = r % H;
        for (int64_t t = 0; t < n; t++) {
            const uint16_t *xt = x + b * sx_b + h * sx_h + t * sx_t;
            uint8_t *ct = codes + b * sc_b + h * sc_h + t * sc_t;
            uint16_t *st = scale + b * ss_b + h * ss_h + t * ss_t, *mt = mn + b * ss_b + h * ss_h + t * ss_t;
            for (int64_t d = 0; d < D; d++) v[d] = bf16_to_f32(xt[d]);
            for (int64_t g = 0; g < NG; g++) {
                float *vg = v + g * group, lo = vg[0], hi = vg[0];
#pragma omp simd reduction(min : lo) reduction(max : hi)
                for (int64_t d = 0; d < group; d++) {
                    lo = vg[d] < lo ? vg[d] : lo;
                    hi = vg[d] > hi ? vg[d] : hi;
                }
                float sc = (hi - lo) / q_max;
                sc = sc < tiny ? tiny : sc;
                for (int64_t d = 0; d < group; d++) {
                    float c = nearbyintf((vg[d] - lo) / sc);
                    vg[d] = c < 0.f ? 0.f : (c > q_max ? q_max : c);
                }
                if (bits == 8) {
                    for (int64_t d = 0; d < group; d++) ct[g * group + d] = (uint8_t)vg[d];
                } else {
                    for (int64_t d = 0; d < group / 2; d++)
                        ct[g * group / 2 + d] = (uint8_t)(((uint8_t)vg[2 * d] << 4) | (uint8_t)vg[2 * d + 1]);
                }
                const _Float16 s16 = (_Float16)sc, m16 = (_Float16)lo;
                memcpy(st + g, &s16, sizeof s16);
                memcpy(mt + g, &m16, sizeof m16);
            }
        }
    }
    return 0;
#else
    (void)x; (void)codes; (void)scale; (void)mn; (void)H; (void)n; (void)D; (void)group; (void)bits;
    (void)sx_b; (void)sx_h; (void)sx_t; (void)sc_b; (void)sc_h; (void)sc_t; (void)ss_b; (void)ss_h; (void)ss_t;
    (void)next; (void)rows; (void)chunk;
    return -1;
#endif
}
