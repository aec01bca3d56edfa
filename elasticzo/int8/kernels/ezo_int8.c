/* elasticzo native int8 kernels: plain C over int8 / int32 pointers, no torch dependency.
 *
 * Everything is exact integer arithmetic and equals elasticzo's portable PyTorch path bit for
 * bit. One product is the core: ezo_gemm_nt, C[M, N] = A[M, K] * B[N, K]^T, int8 operands whose
 * rows are K-contiguous, int32 result. Callers keep K <= 131071 so the int32 sum cannot wrap.
 *   - x86-64 with AVX512-VNNI: vpdpbusd on byte quads, one operand offset by 128 and the offset
 *     subtracted per row (ezo_int8_vnni.c: 64 multiply-adds per instruction, exact, -128 included).
 *   - x86-64 with AVX2 only: int16 pairs and vpmaddwd (16 multiply-adds per instruction, exact for
 *     every int8 value), or byte quads and vpmaddubsw where a convolution's inputs are all in
 *     0..127 (ezo_int8_avx2.c).
 *   - elsewhere: a dot-product loop that gcc vectorises (sdot with -march=armv8.2-a+dotprod).
 * Convolutions pack one image's patches at a time into a small workspace (no batch-sized column
 * copy; an unpadded image is read in place) and call the same product; the requantisation epilogue
 * (bit length of max|acc|, shift with round half up, saturation to [-127, 127]) runs on one image's
 * accumulator at a time. Max-pool, the ZO steps and the loss are in ezo_int8_step.c; the backward
 * kernels (weight gradient, routing, NITI update) in ezo_int8_backward.c, included last.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && !defined(EZO_NO_VNNI)
#define EZO_VNNI 1  /* the u8 x s8 quad product of ezo_int8_vnni.c */
#endif

#define EZO_API __attribute__((visibility("default")))

/* ------------------------------------------------------------------ shapes */

static int64_t align64(int64_t n) { return (n + 63) / 64 * 64; }

typedef struct {
    int64_t C, H, W, O, kh, kw, sh, sw, ph, pw, OH, OW, K, N;
} ezo_conv_shape;

static ezo_conv_shape conv_shape(const int64_t *s) {
    ezo_conv_shape c = {s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7], s[8], s[9], 0, 0, 0, 0};
    c.OH = (c.H + 2 * c.ph - c.kh) / c.sh + 1;
    c.OW = (c.W + 2 * c.pw - c.kw) / c.sw + 1;
    c.K = c.C * c.kh * c.kw;
    c.N = c.OH * c.OW;
    return c;
}

static int64_t xp_bytes(const ezo_conv_shape *s) { return align64(s->C * (s->H + 2 * s->ph) * (s->W + 2 * s->pw)); }
/* The pixel-major patch copy of the portable product (the SIMD products pack their own operand). */
static int64_t r_bytes(const ezo_conv_shape *s) {
#ifdef __AVX2__
    (void)s;
    return 0;
#else
    return align64(s->K * s->N);
#endif
}

/* One image with its zero border: xp[C][H + 2ph][W + 2pw], so patch reads need no bounds checks. */
static void pad_image(const ezo_conv_shape *s, const int8_t *x, int8_t *xp) {
    int64_t hp = s->H + 2 * s->ph, wp = s->W + 2 * s->pw;
    if (s->ph == 0 && s->pw == 0) { memcpy(xp, x, (size_t)(s->C * s->H * s->W)); return; }
    memset(xp, 0, (size_t)(s->C * hp * wp));
    for (int64_t c = 0; c < s->C; c++)
        for (int64_t h = 0; h < s->H; h++)
            memcpy(xp + (c * hp + h + s->ph) * wp + s->pw, x + (c * s->H + h) * s->W, (size_t)s->W);
}

/* The image the patches are read from: x itself without padding (patch reads stay inside each
 * row's run), else its padded copy in xp. */
static const int8_t *padded_source(const ezo_conv_shape *s, const int8_t *x, int8_t *xp) {
    if (s->ph == 0 && s->pw == 0) return x;
    pad_image(s, x, xp);
    return xp;
}

/* Start of patch entry k = (c, i, j) for output row oh in the padded image (columns step sw). */
static inline const int8_t *patch_row(const ezo_conv_shape *s, const int8_t *xp, int64_t k, int64_t oh) {
    int64_t c = k / (s->kh * s->kw), i = (k / s->kw) % s->kh, j = k % s->kw;
    int64_t hp = s->H + 2 * s->ph, wp = s->W + 2 * s->pw;
    return xp + (c * hp + oh * s->sh + i) * wp + j;
}

/* patch_row(s, xp, k, 0) for k = 0, 1, 2, ... in turn, without a division per entry (packing loops). */
typedef struct { int64_t c, i, j; } patch_cursor;

static inline const int8_t *next_patch_row(const ezo_conv_shape *s, const int8_t *xp, patch_cursor *e) {
    const int8_t *row = xp + (e->c * (s->H + 2 * s->ph) + e->i) * (s->W + 2 * s->pw) + e->j;
    e->j = e->j + 1 < s->kw ? e->j + 1 : 0;
    e->i = e->j ? e->i : (e->i + 1 < s->kh ? e->i + 1 : 0);
    e->c = e->j || e->i ? e->c : e->c + 1;
    return row;
}

/* ------------------------------------------------------------------ the product */


#ifdef __AVX2__
#include "ezo_int8_quads.c"
#endif
#if defined(EZO_VNNI)
#include "ezo_int8_vnni.c"
#elif defined(__AVX2__)
#include "ezo_int8_avx2.c"
#else
static int64_t a_bytes(int64_t M, int64_t K) { (void)M; (void)K; return 0; }
static int64_t b_bytes(int64_t N, int64_t K) { (void)N; (void)K; return 0; }
static int64_t gemm_bytes(int64_t M, int64_t N, int64_t K) { (void)M; (void)N; (void)K; return 0; }

/* Dot-product form: gcc turns the k loop into sdot (aarch64 +dotprod) or pmaddwd (x86). */
static void gemm_nt(int64_t M, int64_t N, int64_t K, const int8_t *A, int64_t lda, const int8_t *B, int64_t ldb,
                    int32_t *C, int64_t ldc, void *work) {
    (void)work;
    for (int64_t m = 0; m < M; m++) {
        const int8_t *a = A + m * lda;
        for (int64_t n = 0; n < N; n++) {
            const int8_t *b = B + n * ldb;
            int32_t acc = 0;
            for (int64_t k = 0; k < K; k++) acc += (int32_t)a[k] * (int32_t)b[k];
            C[m * ldc + n] = acc;
        }
    }
}
#endif

EZO_API int64_t ezo_gemm_workspace(int64_t M, int64_t N, int64_t K) { return gemm_bytes(M, N, K); }

/* C[M, N] (row stride ldc) = A[M, K] * B[N, K]^T; work holds ezo_gemm_workspace(M, N, K) bytes. */
EZO_API void ezo_gemm_nt(int64_t M, int64_t N, int64_t K, const int8_t *A, int64_t lda, const int8_t *B,
                         int64_t ldb, int32_t *C, int64_t ldc, void *work) {
    if (K == 0) {
        for (int64_t m = 0; m < M; m++) memset(C + m * ldc, 0, (size_t)N * sizeof(int32_t));
        return;
    }
    gemm_nt(M, N, K, A, lda, B, ldb, C, ldc, work);
}

/* ------------------------------------------------------------------ convolution */

#ifdef __AVX2__
/* dst[n] = (r0[n], r1[n]) as int16 pairs, 8 at a time; the last 8 overlap instead of a scalar tail. */
static inline void interleave_row(const int8_t *r0, const int8_t *r1, int32_t *dst, int64_t n) {
    for (int64_t o = 0;; o += 8) {
        if (o + 8 > n) o = n - 8;
        __m128i a = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(r0 + o)));
        __m128i b = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)(r1 + o)));
        _mm_storeu_si128((__m128i *)(dst + o), _mm_unpacklo_epi16(a, b));
        _mm_storeu_si128((__m128i *)(dst + o + 4), _mm_unpackhi_epi16(a, b));
        if (o + 8 >= n) return;
    }
}
#endif

#if defined(__AVX2__) && !defined(EZO_VNNI)
/* The packed operand of the product straight from the padded image: word (p, n) = (R[2p][n], R[2p+1][n]). */
static void pack_patches_pairs(const ezo_conv_shape *s, const int8_t *xp, int32_t *Bp) {
    int64_t kp = pairs(s->K), np = padded16(s->N);
    patch_cursor e = {0, 0, 0};
    for (int64_t p = 0; p < kp; p++) {
        int32_t *dst = Bp + p * np;
        int64_t step = s->sh * (s->W + 2 * s->pw);  /* input rows between two output rows */
        const int8_t *r0 = next_patch_row(s, xp, &e);
        const int8_t *r1 = 2 * p + 1 < s->K ? next_patch_row(s, xp, &e) : 0;
        for (int64_t oh = 0; oh < s->OH; oh++, dst += s->OW, r0 += step, r1 = r1 ? r1 + step : 0) {
            if (s->sw == 1 && r1 && s->OW >= 8)
                interleave_row(r0, r1, dst, s->OW);
            else
                for (int64_t ow = 0; ow < s->OW; ow++) {
                    int16_t hi = r1 ? r1[ow * s->sw] : 0;
                    dst[ow] = (int32_t)((uint32_t)(uint16_t)(int16_t)r0[ow * s->sw] | ((uint32_t)(uint16_t)hi << 16));
                }
        }
        memset(Bp + p * np + s->N, 0, (size_t)(np - s->N) * sizeof(int32_t));
    }
}
#endif

/* shape = {C, H, W, O, kh, kw, sh, sw, ph, pw}: bytes of workspace a conv call needs. */
EZO_API int64_t ezo_conv2d_workspace(const int64_t *shape) {
    ezo_conv_shape s = conv_shape(shape);
    return a_bytes(s.O, s.K) + xp_bytes(&s) + r_bytes(&s) + b_bytes(s.N, s.K);
}

typedef struct { void *a, *xp, *r, *b; int u8; } conv_work;  /* u8: every input byte in 0..127 */

static conv_work conv_split(const ezo_conv_shape *s, void *work) {
    char *w = (char *)work;
    conv_work cw;
    cw.a = w;
    cw.xp = w + a_bytes(s->O, s->K);
    cw.r = (char *)cw.xp + xp_bytes(s);
    cw.b = (char *)cw.r + r_bytes(s);
    return cw;
}

#if defined(__AVX2__) && !defined(EZO_VNNI)
/* Whether all n bytes are in 0..127 (no sign bit set). */
static int all_nonnegative(int64_t n, const int8_t *x) {
    uint8_t any = 0;
    for (int64_t i = 0; i < n; i++) any |= (uint8_t)x[i];
    return !(any & 0x80);
}
#endif

/* Once per call, not per image: the weights packed for the product the batch takes. */
static void conv_prepare(const ezo_conv_shape *s, int64_t B, const int8_t *x, const int8_t *w, conv_work *cw) {
    cw->u8 = 0;
#if defined(EZO_VNNI)
    (void)B; (void)x;
    prepare_a(s->O, s->K, w, cw->a);
#elif defined(__AVX2__)
    cw->u8 = all_nonnegative(B * s->C * s->H * s->W, x);
    if (cw->u8)
        pack_a_quads(s->O, s->K, w, s->K, (int8_t *)cw->a);
    else
        pack_a_pairs(s->O, s->K, w, s->K, (int32_t *)cw->a);
#else
    (void)s; (void)B; (void)x; (void)w; (void)cw;
#endif
}

static void conv_image(const ezo_conv_shape *s, const int8_t *x, const int8_t *w, int32_t *acc, conv_work *cw) {
    const int8_t *xp = padded_source(s, x, (int8_t *)cw->xp);
#if defined(EZO_VNNI)
    (void)w;
    pack_patches_quads(s, xp, (int32_t *)cw->b, 0x80);
    conv_product(s->O, s->N, s->K, cw->a, (const int32_t *)cw->b, acc);
#elif defined(__AVX2__)
    (void)w;
    if (cw->u8) {
        pack_patches_quads(s, xp, (int32_t *)cw->b, 0);
        gemm_quads_u8(s->O, s->N, s->K, (const int8_t *)cw->a, (const int32_t *)cw->b, acc, s->N);
        return;
    }
    pack_patches_pairs(s, xp, (int32_t *)cw->b);
    gemm_packed(s->O, s->N, s->K, (const int32_t *)cw->a, (const int32_t *)cw->b, acc, s->N);
#else
    int8_t *P = (int8_t *)cw->r;  /* pixel-major patches P[n][k] for the dot-product form */
    for (int64_t k = 0; k < s->K; k++)
        for (int64_t oh = 0; oh < s->OH; oh++) {
            const int8_t *src = patch_row(s, xp, k, oh);
            for (int64_t ow = 0; ow < s->OW; ow++) P[(oh * s->OW + ow) * s->K + k] = src[ow * s->sw];
        }
    gemm_nt(s->O, s->N, s->K, w, s->K, P, s->K, acc, s->N, cw->b);
#endif
}

/* acc[B, O, OH, OW] int32 = cross-correlation of x[B, C, H, W] with w[O, C, kh, kw] (as F.conv2d). */
EZO_API void ezo_conv2d(int64_t B, const int64_t *shape, const int8_t *x, const int8_t *w, int32_t *acc, void *work) {
    ezo_conv_shape s = conv_shape(shape);
    conv_work cw = conv_split(&s, work);
    conv_prepare(&s, B, x, w, &cw);
    for (int64_t b = 0; b < B; b++) conv_image(&s, x + b * s.C * s.H * s.W, w, acc + b * s.O * s.N, &cw);
}

/* ------------------------------------------------------------------ requantisation epilogue */

static int64_t absmax32(int64_t n, const int32_t *v) {
    int32_t lo = 0, hi = 0;
    for (int64_t i = 0; i < n; i++) {
        lo = v[i] < lo ? v[i] : lo;
        hi = v[i] > hi ? v[i] : hi;
    }
    int64_t a = -(int64_t)lo;
    return a > hi ? a : hi;
}

/* s = max(bitlength(top) - 7, 0): the shift that brings the largest magnitude to 7 bits. */
static int64_t shift_for(int64_t top) {
    int64_t bits = 0;
    while (bits < 63 && (top >> bits) != 0) bits++;
    return bits > 7 ? bits - 7 : 0;
}

/* out = saturate(round_half_up(acc / 2**s)): y = acc >> (s - b), (y >> b) + (y & b), b = s > 0. */
static void narrow32(int64_t n, const int32_t *acc, int64_t s, int8_t *out) {
    int b = s > 0, t = (int)s - b;
    for (int64_t i = 0; i < n; i++) {
        int32_t y = acc[i] >> t;
        int32_t r = (y >> b) + (y & b);
        out[i] = (int8_t)(r > 127 ? 127 : (r < -127 ? -127 : r));
    }
}

EZO_API int64_t ezo_requant_shift(int64_t n, const int32_t *acc) { return shift_for(absmax32(n, acc)); }

EZO_API void ezo_requant(int64_t n, const int32_t *acc, int64_t s, int8_t *out) { narrow32(n, acc, s, out); }

/* Pass 1 of the one-pass requantisation, for one image with shift sb = max(bitlength - 7, 0) of its
 * own: hi = acc >> sb (fits int8 because |acc| < 2**(sb + 7)) goes to out, and the next lower bit
 * (acc >> (sb - 1)) & 1, the rounding bit, to a bit plane. */
static void narrow_provisional(int64_t n, const int32_t *acc, int64_t sb, int8_t *out, uint8_t *bits) {
    int64_t t = sb > 0 ? sb - 1 : 0, i = 0;
#ifdef __AVX512BW__
    const __m128i high = _mm_cvtsi64_si128(sb), low = _mm_cvtsi64_si128(t);
    const __m512i one = _mm512_set1_epi32(1);
    for (; i + 16 <= n; i += 16) {  /* the values and two bit-plane bytes, in one pass */
        __m512i v = _mm512_loadu_si512((const void *)(acc + i));
        _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtepi32_epi8(_mm512_sra_epi32(v, high)));
        uint16_t m = sb > 0 ? (uint16_t)_mm512_test_epi32_mask(_mm512_sra_epi32(v, low), one) : 0;
        memcpy(bits + (i >> 3), &m, 2);
    }
#endif
    for (int64_t j = i; j < n; j++) out[j] = (int8_t)(acc[j] >> sb);
#ifdef __AVX2__
    for (; i + 8 <= n; i += 8) {  /* bit k of the byte = lowest bit of acc >> t, via the sign-bit mask */
        __m256i v = _mm256_sll_epi32(_mm256_sra_epi32(_mm256_loadu_si256((const __m256i *)(acc + i)),
                                                      _mm_cvtsi64_si128(t)), _mm_cvtsi32_si128(31));
        bits[i >> 3] = sb > 0 ? (uint8_t)_mm256_movemask_ps(_mm256_castsi256_ps(v)) : 0;
    }
#endif
    for (; i < n; i += 8) {
        uint32_t byte = 0;
        for (int64_t k = i; k < i + 8 && k < n; k++) byte |= (uint32_t)((acc[k] >> t) & 1) << (k - i);
        bits[i >> 3] = sb > 0 ? (uint8_t)byte : 0;
    }
}

static inline int8_t round_saturate(int32_t z, int64_t shift) {
    int32_t y = z >> shift;
    int32_t r = (y >> 1) + (y & 1);
    return (int8_t)(r > 127 ? 127 : (r < -127 ? -127 : r));
}

/* Pass 2: the final shift S >= sb. Floor shifts compose, floor(acc / 2**(S-1)) = z >> (S - sb) with
 * z = floor(acc / 2**(sb-1)) = 2 hi + bit, so the result equals narrow32(acc, S) bit for bit
 * (sb = 0: z = 2 acc and 2 acc >> S = acc >> (S - 1)). */
static void narrow_final(int64_t n, int8_t *out, const uint8_t *bits, int64_t sb, int64_t S) {
    if (S == 0) return;  /* every image had sb = 0: out already holds acc, |acc| <= 127 */
    int64_t i = 0, shift = S - sb;
#ifdef __AVX512BW__
    const __m512i one16 = _mm512_set1_epi16(1), hi16 = _mm512_set1_epi16(127), lo16 = _mm512_set1_epi16(-127);
    const __m128i count = _mm_cvtsi64_si128(shift);
    for (; i + 32 <= n; i += 32) {  /* int16 lanes: z = 2 out + bit is in -256..255; four bit-plane bytes a mask */
        uint32_t m = 0;
        if (sb > 0) memcpy(&m, bits + (i >> 3), 4);
        __m512i z = _mm512_slli_epi16(_mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i *)(out + i))), 1);
        __m512i y = _mm512_sra_epi16(_mm512_mask_add_epi16(z, (__mmask32)m, z, one16), count);
        __m512i r = _mm512_add_epi16(_mm512_srai_epi16(y, 1), _mm512_and_si512(y, one16));
        _mm256_storeu_si256((__m256i *)(out + i), _mm512_cvtepi16_epi8(_mm512_min_epi16(_mm512_max_epi16(r, lo16), hi16)));
    }
#endif
#ifdef __AVX2__
    const __m256i lanes = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128), one = _mm256_set1_epi32(1);
    const __m256i hi = _mm256_set1_epi32(127), lo = _mm256_set1_epi32(-127);
    const __m128i sh = _mm_cvtsi64_si128(shift);
    for (; i + 8 <= n; i += 8) {
        __m256i bit = _mm256_and_si256(_mm256_set1_epi32(sb > 0 ? bits[i >> 3] : 0), lanes);
        bit = _mm256_and_si256(_mm256_cmpeq_epi32(bit, lanes), one);
        __m256i z = _mm256_add_epi32(_mm256_slli_epi32(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(out + i))), 1), bit);
        __m256i y = _mm256_sra_epi32(z, sh);
        __m256i r = _mm256_min_epi32(_mm256_max_epi32(_mm256_add_epi32(_mm256_srai_epi32(y, 1), _mm256_and_si256(y, one)), lo), hi);
        __m128i r16 = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
        _mm_storel_epi64((__m128i *)(out + i), _mm_packs_epi16(r16, r16));
    }
#endif
    for (; i < n; i++) {
        int32_t bit = sb > 0 ? (bits[i >> 3] >> (i & 7)) & 1 : 0;
        out[i] = round_saturate(2 * (int32_t)out[i] + bit, shift);
    }
}

EZO_API int64_t ezo_requant_bits_bytes(int64_t B, int64_t n) { return B * ((n + 7) / 8); }

/* acc[O, N] += bias[o] per output channel. The caller aligned the bias to the accumulator's exponent and
 * clamped it to the room the accumulator leaves in int32 (int8.bias.add_bias), so no sum wraps. */
static void add_channel_bias(int64_t O, int64_t N, int32_t *acc, const int32_t *bias) {
    for (int64_t o = 0; o < O; o++)
        for (int64_t p = 0; p < N; p++) acc[o * N + p] += bias[o];
}

/* Fused conv (+ optional int32 bias, NULL: none) + requantisation in ONE pass over the images, holding
 * one image's int32 accumulator (`scratch`, O*OH*OW int32) and a bit plane (`bits`, ezo_requant_bits_bytes):
 * each image is narrowed by its own shift at once, then all are brought to the common shift. Returns the shift. */
EZO_API int64_t ezo_conv2d_requant(int64_t B, const int64_t *shape, const int8_t *x, const int8_t *w, const int32_t *bias,
                                   int8_t *out, int32_t *scratch, uint8_t *bits, int64_t *shifts, void *work) {
    ezo_conv_shape s = conv_shape(shape);
    conv_work cw = conv_split(&s, work);
    int64_t in = s.C * s.H * s.W, n = s.O * s.N, nb = (n + 7) / 8, S = 0;
    conv_prepare(&s, B, x, w, &cw);
    for (int64_t b = 0; b < B; b++) {
        conv_image(&s, x + b * in, w, scratch, &cw);
        if (bias) add_channel_bias(s.O, s.N, scratch, bias);
        shifts[b] = shift_for(absmax32(n, scratch));
        narrow_provisional(n, scratch, shifts[b], out + b * n, bits + b * nb);
        S = shifts[b] > S ? shifts[b] : S;
    }
    for (int64_t b = 0; b < B; b++) narrow_final(n, out + b * n, bits + b * nb, shifts[b], S);
    return S;
}

#include "ezo_int8_step.c"  /* max-pool, ZO perturbation and update, integer cross-entropy */

EZO_API int ezo_abi_version(void) { return 6; }

#include "ezo_int8_backward.c"  /* conv weight gradient, pool routing, ReLU mask, NITI update */

