/* Quantized decode attention on integer and bfloat16 dot-product instructions
 * (AVX512-VNNI, AVX512-BF16), for caches whose code bytes per vector are whole 64-byte
 * chunks and whose groups number at most 4 a vector: INT4 at head_dim 128 (groups of
 * 32, 64, 128) or 256 (64 and up), INT8 at 64, 128 or 256 (16 code bytes a group and
 * up, at most 4 groups). Included by decode_attention_quant.c, whose rows go here
 * (qx_rows) for those formats where the compiler targets those instructions; others
 * take its plain loops. Nothing is widened per element, nothing dequantized.
 *
 * Keys, exact in integers. The query becomes 16-bit fixed point, q = s_q * q16 with s_q
 * a power of two and |q16| <= 2^14 (every bfloat16 element within 2^6 of the largest
 * is exact, smaller ones are off by at most 2^-15 of the largest), split into signed
 * bytes q16 = 256 * hi + lo. Per key, with codes c as unsigned bytes (INT4 nibbles split
 * by a shift and a mask), vpdpbusd sums 4 byte products a lane:
 *     acc = ((c . hi) << 8) + c . lo = c . q16      (int32, exact)
 * so q_n . k_n = s_q * (scale_n * (c_n . q16_n) + min_n * sum(q16_n)). A 16-byte quarter
 * of a chunk lies in one group; four keys' accumulators fold into one vector of
 * (quarter, key) sums (6 shuffles), which one FMA scales by the keys' group scales (read
 * as float16 in place, and min * sum(q16) added on a group's first quarter); sixteen
 * keys end as one vector of scores: no horizontal sum per key.
 *
 * Values: decode_attention_qx_values.c, included below. */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    defined(__AVX512BF16__) && !defined(STRATA_NO_QX)
#include <immintrin.h>
#define HAVE_QX 1

enum { QX_KEYS = 16, QX_MAX_CW = 256, QX_MAX_NC = 4, QX_SPAN = 16384 /* INT8 tokens per int32 sum */ };

/* Software prefetch QX_PF_BYTES of codes ahead of the loads (0: none), as the bf16
 * kernel does 16 of its vectors (4 KB at head_dim 128) ahead: a row is one long stream
 * that the hardware prefetchers drop at every 4 KB page. In tokens, a multiple of 16. */
#ifndef QX_PF_BYTES
#define QX_PF_BYTES 4096
#endif
static inline int64_t qx_pf_tokens(int64_t st) {
    const int64_t n = QX_PF_BYTES / (st > 0 ? st : 1);
    return PF_TOKENS == 0 || QX_PF_BYTES == 0 ? 0 : (n < 16 ? 16 : n / 16 * 16);
}

/* The format: code bytes per vector CW in NC chunks of 64, NG groups of CG code bytes
 * (2^gshift elements); Tp: the token count rounded up to QX_KEYS. */
typedef struct {
    int64_t D, group, bits, NG, CG, CW, NC, T, Tp, gshift;
} qx_shape;

static inline int qx_supported(int64_t D, int64_t group, int64_t bits) {
    const int64_t CW = bits == 8 ? D : D / 2;
    return (bits == 4 || bits == 8) && (D == 64 || D == 128 || D == 256) && CW % 64 == 0 && group > 0 &&
           D % group == 0 && D / group <= 4 && (bits == 8 ? group : group / 2) % 16 == 0;
}

static inline qx_shape qx_shape_of(int64_t D, int64_t group, int64_t bits, int64_t T) {
    const int64_t CW = bits == 8 ? D : D / 2;
    return (qx_shape){D, group, bits, D / group, bits == 8 ? group : group / 2, CW, CW / 64, T,
                      (T + QX_KEYS - 1) / QX_KEYS * QX_KEYS, __builtin_ctzll((unsigned long long)group)};
}

/* the group of quarter L (16 code bytes) of chunk c */
static inline int64_t qx_group(const qx_shape *sh, int64_t c, int64_t L) { return (64 * c + 16 * L) / sh->CG; }

/* Scratch (floats) a thread needs for T tokens: scores, then the value weights (INT4:
 * bfloat16 pairs [Tp/2][NG]; INT8: three digit planes [Tp/4][NG]), then, where a row's
 * scales and mins are not contiguous [T][NG], contiguous copies of them; with slack. */
static inline int64_t qx_scratch_floats(int64_t D, int64_t group, int64_t bits, int64_t T) {
    const qx_shape sh = qx_shape_of(D, group, bits, T);
    return sh.Tp + 32 + sh.Tp * sh.NG + 64 + 4 * (sh.Tp * sh.NG / 2 + 32);
}

/* Per shape: index vectors of the permutes below */
typedef struct {
    __m512i kidx[QX_MAX_NC]; /* 4 keys' [4][NG] scales -> lane 4L + i: key i, quarter L's group */
    __m512i widx[QX_MAX_NC]; /* NG per-group values -> lane 4L + i: quarter L's group */
    __m512 first[QX_MAX_NC]; /* 1 on the first quarter of a group, else 0 */
    __m512i pidx;            /* 16 (token, group) entries -> their token */
    __m512i pair_a, pair_b;  /* INT4: 32 (token, group) entries -> (pair, group, token & 1) */
    __m512i quad;            /* INT8: 16 (token, group) entries -> (4 tokens, group, token & 3) */
} qx_consts;

static inline void qx_consts_of(const qx_shape *sh, qx_consts *k) {
    const int NG = (int)sh->NG;
    for (int64_t c = 0; c < sh->NC; c++) {
        int32_t ki[16], wi[16];
        float f[16];
        for (int L = 0; L < 4; L++)
            for (int i = 0; i < 4; i++) {
                ki[4 * L + i] = (int32_t)(i * NG + qx_group(sh, c, L));
                wi[4 * L + i] = (int32_t)qx_group(sh, c, L);
                f[4 * L + i] = (64 * c + 16 * L) % sh->CG == 0 ? 1.f : 0.f;
            }
        k->kidx[c] = _mm512_loadu_si512(ki);
        k->widx[c] = _mm512_loadu_si512(wi);
        k->first[c] = _mm512_loadu_ps(f);
    }
    int32_t p[16], a[16], b[16], q[16];
    for (int l = 0; l < 16; l++) {
        p[l] = l / NG;
        const int blk = l / (4 * NG), g = (l / 4) % NG, t = 4 * blk + l % 4;
        q[l] = t * NG + g;
    }
    for (int o = 0; o < 32; o++) {
        const int pair = o / (2 * NG), g = (o / 2) % NG, t = 2 * pair + (o & 1);
        (o < 16 ? a : b)[o & 15] = t * NG + g;
    }
    k->pidx = _mm512_loadu_si512(p);
    k->pair_a = _mm512_loadu_si512(a);
    k->pair_b = _mm512_loadu_si512(b);
    k->quad = _mm512_loadu_si512(q);
}

/* 16 float16 at p[i..] as float32, zero from n on */
static inline __m512 qx_halves(const uint16_t *p, int64_t i, int64_t n) {
    if (i + 16 <= n) return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + i)));
    const __mmask16 m = i >= n ? 0 : (__mmask16)((1u << (n - i)) - 1);
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p + i));
}

/* A row's scales and mins [T][NG], contiguous (as stored, or copied into `spare`) */
typedef struct {
    const uint16_t *ks, *km, *vs, *vm;
} qx_row;

static inline qx_row qx_row_of(const quant_args *a, int64_t os, const qx_shape *sh, uint16_t *spare) {
    const uint16_t *src[4] = {a->ks + os, a->km + os, a->vs + os, a->vm + os};
    if (a->ss_t != sh->NG) {
        for (int j = 0; j < 4; j++) {
            uint16_t *dst = spare + j * (sh->Tp * sh->NG + 64);
            for (int64_t t = 0; t < sh->T; t++)
                for (int64_t g = 0; g < sh->NG; g++) dst[t * sh->NG + g] = src[j][t * a->ss_t + g];
            src[j] = dst;
        }
    }
    return (qx_row){src[0], src[1], src[2], src[3]};
}

/* The query as planes of signed bytes in code-byte order: plane[c][p] for chunk c, p =
 * 0, 1 the high bytes of (INT4) even and odd elements, 2, 3 their low bytes; INT8: 0
 * high, 1 low. qsv[c]: lane 4L + i the group's sum(q16) on its first quarter, else 0.
 * Returns s_q. */
static inline float qx_query(const uint16_t *qh, const qx_shape *sh, const qx_consts *k, __m512i plane[QX_MAX_NC][4],
                             __m512 qsv[QX_MAX_NC]) {
    const int64_t D = sh->D, group = sh->group;
    float qf[256], mx = 0.f;
#pragma omp simd reduction(max : mx)
    for (int64_t d = 0; d < D; d++) {
        qf[d] = bf16_to_f32(qh[d]);
        const float m = fabsf(qf[d]);
        mx = m > mx ? m : mx;
    }
    /* mx < 2^e; s_q = 2^(e - 14) (e at least -112: s_q stays a normal float) */
    uint32_t bits;
    memcpy(&bits, &mx, sizeof bits);
    int32_t e = (int32_t)((bits >> 23) & 0xff) - 126;
    e = e < -112 ? -112 : (e > 127 ? 127 : e);
    const uint32_t sq_bits = (uint32_t)(e - 14 + 127) << 23, inv_bits = (uint32_t)(14 - e + 127) << 23;
    float sq, inv;
    memcpy(&sq, &sq_bits, sizeof sq);
    memcpy(&inv, &inv_bits, sizeof inv);
    int32_t q16[256];
    float gsum[16] = {0.f};
#pragma omp simd
    for (int64_t d = 0; d < D; d++) q16[d] = (int32_t)nearbyintf(qf[d] * inv); /* |q16| <= 2^14 */
    for (int64_t n = 0; n < sh->NG; n++) {
        int32_t sum = 0;
#pragma omp simd reduction(+ : sum)
        for (int64_t d = 0; d < group; d++) sum += q16[n * group + d];
        gsum[n] = (float)sum;
    }
    int8_t b[QX_MAX_NC][4][64];
    for (int64_t c = 0; c < sh->NC; c++) {
        if (sh->bits == 4) {
            for (int j = 0; j < 64; j++)
                for (int odd = 0; odd < 2; odd++) {
                    const int32_t v = q16[128 * c + 2 * j + odd], hi = (v + 128) >> 8;
                    b[c][odd][j] = (int8_t)hi;
                    b[c][2 + odd][j] = (int8_t)(v - 256 * hi);
                }
        } else {
            for (int j = 0; j < 64; j++) {
                const int32_t v = q16[64 * c + j], hi = (v + 128) >> 8;
                b[c][0][j] = (int8_t)hi;
                b[c][1][j] = (int8_t)(v - 256 * hi);
            }
        }
    }
    const __m512 gs = _mm512_loadu_ps(gsum);
    for (int64_t c = 0; c < sh->NC; c++) {
        for (int p = 0; p < 4; p++) plane[c][p] = _mm512_loadu_si512(b[c][p]);
        qsv[c] = _mm512_mul_ps(_mm512_permutexvar_ps(k->widx[c], gs), k->first[c]);
    }
    return sq;
}

/* c . q16 for one key's chunk (64 code bytes), 16 int32 lanes, lane l over code bytes 4l..4l+3 */
static inline __attribute__((always_inline)) __m512i qx_dot(const uint8_t *ck, const __m512i *pl, const int64_t bits) {
    const __m512i c = _mm512_loadu_si512(ck);
    __m512i acc;
    if (bits == 4) {
        const __m512i lo4 = _mm512_set1_epi8(15);
        const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(c, 4), lo4), lo = _mm512_and_si512(c, lo4);
        acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), hi, pl[0]);
        acc = _mm512_dpbusd_epi32(acc, lo, pl[1]);
        acc = _mm512_slli_epi32(acc, 8);
        acc = _mm512_dpbusd_epi32(acc, hi, pl[2]);
        acc = _mm512_dpbusd_epi32(acc, lo, pl[3]);
    } else {
        acc = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), c, pl[0]), 8);
        acc = _mm512_dpbusd_epi32(acc, c, pl[1]);
    }
    return acc;
}

/* 4 keys' lanes -> lane 4L + i = key i's sum over quarter L */
static inline __m512i qx_fold4(__m512i a0, __m512i a1, __m512i a2, __m512i a3) {
    const __m512i t0 = _mm512_add_epi32(_mm512_unpacklo_epi32(a0, a1), _mm512_unpackhi_epi32(a0, a1));
    const __m512i t1 = _mm512_add_epi32(_mm512_unpacklo_epi32(a2, a3), _mm512_unpackhi_epi32(a2, a3));
    return _mm512_add_epi32(_mm512_unpacklo_epi64(t0, t1), _mm512_unpackhi_epi64(t0, t1));
}

/* Scores of QX_KEYS keys (key k's codes at kc + k * stride, the first `valid` real)
 * before s_q and the softmax scale: sum_n scale_n (c_n . q16_n) + min_n sum(q16_n); ks,
 * km: their scales and mins [16][NG] */
static inline __attribute__((always_inline)) __m512 qx_block(const uint8_t *kc, int64_t stride, const uint16_t *ks,
                                                              const uint16_t *km, int64_t valid, const qx_consts *k,
                                                              const __m512i plane[QX_MAX_NC][4], const __m512 *qsv,
                                                              const int64_t NG, const int64_t NC, const int64_t bits) {
    __m512 f[4];
    for (int j = 0; j < 4; j++) {
        const int64_t nk = valid - 4 * j < 0 ? 0 : (valid - 4 * j > 4 ? 4 : valid - 4 * j);
        const __mmask16 m = (__mmask16)((1u << (nk * NG)) - 1);
        const __m512 s4 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, ks + 4 * j * NG));
        const __m512 m4 = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, km + 4 * j * NG));
        f[j] = _mm512_setzero_ps();
        for (int64_t c = 0; c < NC; c++) {
            const uint8_t *k0 = kc + 4 * j * stride + 64 * c;
            const __m512i u = qx_fold4(qx_dot(k0, plane[c], bits), qx_dot(k0 + stride, plane[c], bits),
                                       qx_dot(k0 + 2 * stride, plane[c], bits), qx_dot(k0 + 3 * stride, plane[c], bits));
            const __m512 sc = _mm512_permutexvar_ps(k->kidx[c], s4), mn = _mm512_permutexvar_ps(k->kidx[c], m4);
            f[j] = _mm512_add_ps(f[j], _mm512_fmadd_ps(_mm512_cvtepi32_ps(u), sc, _mm512_mul_ps(mn, qsv[c])));
        }
    }
    const __m512 y01 = _mm512_add_ps(_mm512_shuffle_f32x4(f[0], f[1], 0x88), _mm512_shuffle_f32x4(f[0], f[1], 0xdd));
    const __m512 y23 = _mm512_add_ps(_mm512_shuffle_f32x4(f[2], f[3], 0x88), _mm512_shuffle_f32x4(f[2], f[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y01, y23, 0x88), _mm512_shuffle_f32x4(y01, y23, 0xdd));
}

static inline void qx_prefetch(const uint8_t *p, int64_t n_bytes) {
    for (int64_t o = 0; o < n_bytes; o += 64) __builtin_prefetch(p + o, 0, PF_HINT);
}

/* s[0..Tp): scores of one query head (qh) against its row's keys (kc) */
static inline __attribute__((always_inline)) void qx_scores(const quant_args *a, const qx_shape *sh, const qx_consts *k,
                                                             const uint16_t *qh, const uint8_t *kc, const qx_row *row,
                                                             float *s, const int64_t NG, const int64_t NC,
                                                             const int64_t bits) {
    __m512i plane[QX_MAX_NC][4];
    __m512 qsv[QX_MAX_NC];
    const __m512 mul = _mm512_set1_ps(qx_query(qh, sh, k, plane, qsv) * a->scale);
    const int64_t T = a->T, st = a->sc_t, CW = 64 * NC, ahead = qx_pf_tokens(st);
    int64_t t = 0;
    for (; t + QX_KEYS <= T; t += QX_KEYS) {
        if (ahead > 0 && t + ahead + QX_KEYS <= T) {
            if (st == CW)
                qx_prefetch(kc + (t + ahead) * st, QX_KEYS * CW);
            else
                for (int j = 0; j < QX_KEYS; j++) qx_prefetch(kc + (t + ahead + j) * st, CW);
            __builtin_prefetch(row->ks + (t + ahead) * NG, 0, PF_HINT);
            __builtin_prefetch(row->km + (t + ahead) * NG, 0, PF_HINT);
        }
        const __m512 z = qx_block(kc + t * st, st, row->ks + t * NG, row->km + t * NG, QX_KEYS, k, plane, qsv, NG, NC, bits);
        _mm512_storeu_ps(s + t, _mm512_mul_ps(z, mul));
    }
    if (t < T) { /* the last keys, copied before zeros */
        uint8_t tail[QX_KEYS * QX_MAX_CW];
        memset(tail, 0, (size_t)(QX_KEYS * CW));
        for (int64_t j = t; j < T; j++) memcpy(tail + (j - t) * CW, kc + j * st, (size_t)CW);
        const __m512 z = qx_block(tail, CW, row->ks + t * NG, row->km + t * NG, T - t, k, plane, qsv, NG, NC, bits);
        _mm512_storeu_ps(s + t, _mm512_mul_ps(z, mul));
    }
}

/* softmax_unnormalized over s[0..T) with whole vectors (the max too); s[T..Tp + 16) = 0 */
static inline float qx_softmax(float *s, int64_t T, int64_t Tp, const float *m) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    int64_t t = 0;
    for (; t + 16 <= T; t += 16) {
        __m512 v = _mm512_loadu_ps(s + t);
        if (m) v = _mm512_add_ps(v, _mm512_loadu_ps(m + t));
        _mm512_storeu_ps(s + t, v);
        mx = _mm512_max_ps(mx, v);
    }
    if (t < T) {
        const __mmask16 k = (__mmask16)((1u << (T - t)) - 1);
        __m512 v = _mm512_maskz_loadu_ps(k, s + t);
        if (m) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, m + t));
        _mm512_mask_storeu_ps(s + t, k, v);
        mx = _mm512_mask_max_ps(mx, k, mx, v);
    }
    const float top = _mm512_reduce_max_ps(mx);
    float sum = 0.f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < T; i++) {
        s[i] = exp_nonpositive(s[i] - top);
        sum += s[i];
    }
    for (int64_t i = T; i < Tp + 16; i++) s[i] = 0.f;
    return 1.f / sum;
}

#include "decode_attention_qx_values.c" /* out = sum_t p_t V_t over INT4 / INT8 codes */

static inline __attribute__((always_inline)) void qx_rows_shape(const quant_args *a, const int64_t D, const int64_t group,
                                                                 const int64_t bits, int64_t r0, int64_t r1, float *scratch) {
    const qx_shape sh = qx_shape_of(D, group, bits, a->T);
    const int64_t G = a->H / a->Hkv, NG = sh.NG, NC = sh.NC, ahead = qx_pf_tokens(a->sc_t);
    qx_consts k;
    qx_consts_of(&sh, &k);
    float *s = scratch;
    uint32_t *weights = (uint32_t *)(s + sh.Tp + 32);
    uint16_t *spare = (uint16_t *)(weights + sh.Tp * NG + 64);
    for (int64_t r = r0; r < r1; r++) {
        const int64_t b = r / a->Hkv, h = r % a->Hkv;
        const uint8_t *kc = a->kc + b * a->sc_b + h * a->sc_h, *vc = a->vc + b * a->sc_b + h * a->sc_h;
        const qx_row row = qx_row_of(a, b * a->ss_b + h * a->ss_h, &sh, spare);
        for (int64_t g = 0; g < G; g++) {
            const int64_t head = h * G + g;
            const uint16_t *qh = a->q + b * a->sq_b + head * a->sq_h;
            const float *mask = a->mask ? a->mask + b * a->sm_b + (a->sm_h ? head * a->sm_h : 0) : NULL;
            uint16_t *o = a->out + b * a->so_b + head * a->so_h;
            qx_scores(a, &sh, &k, qh, kc, &row, s, NG, NC, bits);
            const int64_t first = a->T < ahead ? a->T : ahead;
            qx_prefetch(vc, first * a->sc_t); /* V's first codes, during the softmax */
#if PF_NEXT_ROW
            if (g == G - 1 && r + 1 < r1) { /* the next row's first keys, during this row's values */
                const int64_t b1 = (r + 1) / a->Hkv, h1 = (r + 1) % a->Hkv;
                qx_prefetch(a->kc + b1 * a->sc_b + h1 * a->sc_h, first * a->sc_t);
            }
#endif
            const float inv = qx_softmax(s, a->T, sh.Tp, mask);
            if (bits == 4)
                qx_values4(a, &sh, &k, &row, vc, s, weights, inv, o, NC);
            else
                qx_values8(a, &sh, &k, &row, vc, s, weights, inv, o, NC);
        }
    }
}

/* The rows r0..r1, with this format's constants where they are common (loops unroll) */
static void qx_rows(const quant_args *a, int64_t D, int64_t group, int64_t bits, int64_t r0, int64_t r1, float *s) {
    if (bits == 4 && D == 128 && group == 64)
        qx_rows_shape(a, 128, 64, 4, r0, r1, s);
    else if (bits == 8 && D == 128 && group == 64)
        qx_rows_shape(a, 128, 64, 8, r0, r1, s);
    else
        qx_rows_shape(a, D, group, bits, r0, r1, s);
}
#endif
