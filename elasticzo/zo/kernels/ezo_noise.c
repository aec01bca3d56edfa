/* elasticzo counter-based SPSA directions, fused with their one use: y = x + a * z.
 *
 * z[i] is a pure function of (key, i): no generator state, so a pass over a layer never
 * materialises z, any slice can be made alone, and the portable PyTorch twin
 * (elasticzo/zo/counter.py) gives the same bits on any device. The hash is murmur3's fmix32
 * over a keyed Weyl sequence (uint32 arithmetic; one fmix32, not two: 0.41 -> 0.34 ns per entry,
 * and the statistics measured in tests/test_counter.py and docs/results.md do not change):
 *     h(c) = fmix32((c * 0x9E3779B9 + key_lo) ^ key_hi)
 *   gaussian:   z[i] = (b0 + b1 + b2 + b3 - 510) * GAUSS_SCALE, b0..b3 the bytes of h(i): a sum of
 *               four uniforms (Irwin-Hall), mean 0, variance 1; no table lookup, which costs 3x
 *               the rest on x86 (gathers)
 *   rademacher: z[i] = bit (i % 32) of h(i / 32) ? +1 : -1
 * Every float operation is rounded alone, in the order torch's twin does it ((float)s * scale,
 * a * z, x + that): build with -ffp-contract=off so that no fused multiply-add changes the bits.
 * Where a byte-sum instruction exists (AVX-512 VNNI, else AVX2) the gaussian loop is written in
 * GCC vector types with that one intrinsic: 0.30 -> 0.20 and 0.36 -> 0.23-0.30 ns per entry, 1M
 * entries, one thread. Elsewhere (aarch64, plain x86-64) the compiler vectorises the C loop. All
 * give the same bits.
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512VNNI__)
#define EZO_VNNI 1
#define EZO_LANES 16
#include <immintrin.h>
#elif defined(__AVX2__)
#define EZO_LANES 8
#include <immintrin.h>
#endif

#define EZO_API __attribute__((visibility("default")))
#define EZO_NOISE_ABI 2
#define WEYL 0x9E3779B9u /* the Weyl sequence's step: the golden ratio times 2^32 */
#define GAUSS_SCALE 0.006765875f /* 1 / sqrt(4 * (256^2 - 1) / 12), as float32 (counter.py: GAUSS_SCALE) */

EZO_API int ezo_noise_abi_version(void) { return EZO_NOISE_ABI; }

static inline uint32_t fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    h ^= h >> 16;
    return h;
}

static inline uint32_t counter_hash(uint32_t klo, uint32_t khi, uint32_t c) {
    return fmix32((c * WEYL + klo) ^ khi);
}

/* The Weyl term c * 0x9E3779B9 + key_lo advances by the constant per entry (mod 2^32), so it is
 * carried as an induction variable: one 32-bit multiply per entry fewer than the definition.
 * The four bytes are summed as two 16-bit pairs. */
#ifdef EZO_LANES
/* EZO_LANES entries a step in GCC vector types (one loop for both widths): the same integers and
 * the same float operations in the same order as the C loop, but the four bytes of each hash
 * summed by one vpdpbusd (VNNI) or vpmaddubsw + vpmaddwd (AVX2: u8 x 1 into int16 pairs, then
 * int16 x 1 into int32, no saturation) instead of seven integer ops. Returns the first entry it
 * did not make. */
typedef uint32_t ezo_u32v __attribute__((vector_size(4 * EZO_LANES)));
typedef int32_t ezo_i32v __attribute__((vector_size(4 * EZO_LANES)));
typedef float ezo_f32v __attribute__((vector_size(4 * EZO_LANES)));

static inline ezo_i32v byte_sum_minus_510(ezo_u32v h) {
#if EZO_VNNI
    return (ezo_i32v)_mm512_dpbusd_epi32(_mm512_set1_epi32(-510), (__m512i)h, _mm512_set1_epi32(0x01010101));
#else
    return (ezo_i32v)_mm256_madd_epi16(_mm256_maddubs_epi16((__m256i)h, _mm256_set1_epi8(1)), _mm256_set1_epi16(1)) - 510;
#endif
}

static int64_t gaussian_simd(uint32_t klo, uint32_t khi, int64_t i0, int64_t i1, const float *x, float a, float *y) {
    ezo_u32v weyl;
    for (int lane = 0; lane < EZO_LANES; lane++)
        weyl[lane] = ((uint32_t)i0 + (uint32_t)lane) * WEYL + klo;
    int64_t i = i0;
    for (; i + EZO_LANES <= i1; i += EZO_LANES, weyl += (uint32_t)EZO_LANES * WEYL) {
        ezo_u32v h = weyl ^ khi;
        h = (h ^ (h >> 16)) * 0x85EBCA6Bu;
        h = (h ^ (h >> 13)) * 0xC2B2AE35u;
        h ^= h >> 16;
        ezo_f32v z = __builtin_convertvector(byte_sum_minus_510(h), ezo_f32v) * GAUSS_SCALE, xs, ys;
        memcpy(&xs, x + i, sizeof xs);
        ys = xs + a * z;
        memcpy(y + i, &ys, sizeof ys);
    }
    return i;
}
#endif

static void gaussian(uint32_t klo, uint32_t khi, int64_t i0, int64_t i1, const float *x, float a, float *y) {
#ifdef EZO_LANES
    i0 = gaussian_simd(klo, khi, i0, i1, x, a, y);
#endif
    uint32_t weyl = (uint32_t)i0 * WEYL + klo;
    for (int64_t i = i0; i < i1; i++, weyl += WEYL) {
        uint32_t h = fmix32(weyl ^ khi);
        uint32_t pairs = (h & 0x00FF00FFu) + ((h >> 8) & 0x00FF00FFu);
        int32_t s = (int32_t)((pairs & 0xFFFFu) + (pairs >> 16)) - 510;
        float z = (float)s * GAUSS_SCALE;
        float t = a * z;
        y[i] = x[i] + t;
    }
}

/* One word per 32 entries: the word is hashed once and its bits taken in turn. */
static void rademacher(uint32_t klo, uint32_t khi, int64_t i0, int64_t i1, const float *x, float a, float *y) {
    for (int64_t i = i0; i < i1;) {
        uint32_t word = counter_hash(klo, khi, (uint32_t)(i >> 5));
        int64_t end = (i | 31) + 1 < i1 ? (i | 31) + 1 : i1;
        for (; i < end; i++) {
            float t = a * (((word >> (i & 31)) & 1u) ? 1.0f : -1.0f);
            y[i] = x[i] + t;
        }
    }
}

/* y[j] = x[j] + a * z[offset + j] for j < n (x == y updates in place); kind 0 gaussian, 1 rademacher.
 * The caller keeps offset + n <= 2^32 (the counter is 32 bits). */
EZO_API void ezo_noise_axpy(int64_t n, uint64_t key, int64_t offset, int32_t kind, const float *x, float a, float *y) {
    uint32_t klo = (uint32_t)key, khi = (uint32_t)(key >> 32);
    x -= offset, y -= offset; /* index by element number */
    if (kind == 1)
        rademacher(klo, khi, offset, offset + n, x, a, y);
    else
        gaussian(klo, khi, offset, offset + n, x, a, y);
}

/* One layer in one call: tensor t holds entries [o_t, o_t + ns[t]) of the layer's direction, o_t
 * the sum of the sizes before it (the layer's flat parameter vector), and gets ys[t] = xs[t] +
 * as[t] * z. Saves a foreign call and its Python per tensor (a layer's weight and bias). */
EZO_API void ezo_noise_axpy_layer(int32_t count, const int64_t *ns, uint64_t key, int32_t kind,
                                  const float *const *xs, const float *as, float *const *ys) {
    int64_t offset = 0;
    for (int32_t t = 0; t < count; t++) {
        ezo_noise_axpy(ns[t], key, offset, kind, xs[t], as[t], ys[t]);
        offset += ns[t];
    }
}
