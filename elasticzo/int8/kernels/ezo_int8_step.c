/* The rest of an int8 step beside the products: max-pool (with its arg max), the ZO perturbation
 * and carried update, and the integer cross-entropy. Included by ezo_int8.c, after its headers;
 * the backward kernels are in ezo_int8_backward.c.
 */

/* Max-pool without padding over P = B*C planes [H, W]: out[P, OH, OW]; arg (optional) = offset of the
 * first maximum in row-major window order (a later equal entry does not win), as int8_maxpool2d. */
#ifdef __AVX2__
/* out[ow] = max of the 2x2 window at column 2 ow of rows r0, r1; 8 outputs at a time, the last 8 overlapping. */
static void pool2x2_row(const int8_t *r0, const int8_t *r1, int8_t *out, int64_t OW) {
    const __m128i low = _mm_set1_epi16(0x00FF);
    for (int64_t o = 0; OW < 8 && o < OW; o++) {  /* short rows (LeNet's second pool): one window at a time */
        int8_t a = r0[2 * o] > r0[2 * o + 1] ? r0[2 * o] : r0[2 * o + 1], b = r1[2 * o] > r1[2 * o + 1] ? r1[2 * o] : r1[2 * o + 1];
        out[o] = a > b ? a : b;
    }
    for (int64_t o = 0; OW >= 8; o += 8) {
        if (o + 8 > OW) o = OW - 8;
        __m128i v = _mm_max_epi8(_mm_loadu_si128((const __m128i *)(r0 + 2 * o)), _mm_loadu_si128((const __m128i *)(r1 + 2 * o)));
        v = _mm_and_si128(_mm_max_epi8(v, _mm_srli_epi16(v, 8)), low);  /* pair max in each low byte */
        _mm_storel_epi64((__m128i *)(out + o), _mm_packus_epi16(v, v));
        if (o + 8 >= OW) return;
    }
}

/* pool2x2_row with the arg max offset (0..3, the first maximum in row-major order wins): 8 windows at a
 * time on int16 lanes, the even byte of a pair by a shift up and back, the odd one by a shift down. */
static void pool2x2_arg_row(const int8_t *r0, const int8_t *r1, int8_t *out, int8_t *arg, int64_t OW) {
    for (int64_t o = 0; OW < 8 && o < OW; o++) {  /* short rows (LeNet's second pool): one window at a time */
        int8_t v[4] = {r0[2 * o], r0[2 * o + 1], r1[2 * o], r1[2 * o + 1]}, best = v[0], at = 0;
        for (int8_t k = 1; k < 4; k++) {
            at = v[k] > best ? k : at;
            best = v[k] > best ? v[k] : best;
        }
        out[o] = best, arg[o] = at;
    }
    for (int64_t o = 0; OW >= 8; o += 8) {
        if (o + 8 > OW) o = OW - 8;
        __m128i a = _mm_loadu_si128((const __m128i *)(r0 + 2 * o)), b = _mm_loadu_si128((const __m128i *)(r1 + 2 * o));
        __m128i v[4] = {_mm_srai_epi16(_mm_slli_epi16(a, 8), 8), _mm_srai_epi16(a, 8),
                        _mm_srai_epi16(_mm_slli_epi16(b, 8), 8), _mm_srai_epi16(b, 8)};
        __m128i best = v[0], at = _mm_setzero_si128();
        for (int k = 1; k < 4; k++) {
            __m128i gt = _mm_cmpgt_epi16(v[k], best);  /* strict: an equal later entry does not win */
            best = _mm_max_epi16(best, v[k]);
            at = _mm_or_si128(_mm_andnot_si128(gt, at), _mm_and_si128(gt, _mm_set1_epi16((short)k)));
        }
        _mm_storel_epi64((__m128i *)(out + o), _mm_packs_epi16(best, best));
        _mm_storel_epi64((__m128i *)(arg + o), _mm_packs_epi16(at, at));
        if (o + 8 >= OW) return;
    }
}
#endif

EZO_API void ezo_maxpool2d(int64_t P, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                           const int8_t *x, int8_t *out, int8_t *arg) {
    int64_t OH = (H - kh) / sh + 1, OW = (W - kw) / sw + 1;
    for (int64_t p = 0; p < P; p++)
        for (int64_t oh = 0; oh < OH; oh++) {
            int8_t *best = out + (p * OH + oh) * OW, *at = arg ? arg + (p * OH + oh) * OW : 0;
            const int8_t *top = x + (p * H + oh * sh) * W;
#ifdef __AVX2__
            if (kh == 2 && kw == 2 && sh == 2 && sw == 2) {  /* LeNet's pools */
                if (at)
                    pool2x2_arg_row(top, top + W, best, at, OW);
                else
                    pool2x2_row(top, top + W, best, OW);
                continue;
            }
#endif
            for (int64_t ow = 0; ow < OW; ow++) best[ow] = top[ow * sw];
            if (at) memset(at, 0, (size_t)OW);
            for (int64_t o = 1; o < kh * kw; o++) {  /* window offsets in row-major order, a row at a time */
                const int8_t *src = top + (o / kw) * W + o % kw;
                if (at)
                    for (int64_t ow = 0; ow < OW; ow++) {
                        int8_t v = src[ow * sw], gt = v > best[ow];
                        best[ow] = gt ? v : best[ow];
                        at[ow] = gt ? (int8_t)o : at[ow];
                    }
                else
                    for (int64_t ow = 0; ow < OW; ow++) best[ow] = src[ow * sw] > best[ow] ? src[ow * sw] : best[ow];
            }
        }
}

/* round(x / 2**s) half up, as rounding.shift_round_nearest: y = x >> (s - b), (y >> b) + (y & b), b = s > 0. */
static inline int64_t round_shift64(int64_t x, int64_t s) {
    int64_t b = s > 0, y = x >> (s - b);
    return (y >> b) + (y & b);
}

/* ZO step with carry (update.zo_update): T = carry + d z * 2**(F - s), F = 8: rounded to nearest for
 * s > F, an exact left shift saturated at +-2**62 for s < F; W' = sat(W - (T >> F)), carry = T mod 2**F.
 * Out of place for W, in place for the carry. d z wraps like torch's int64 product (never, for |z| <= 1). */
EZO_API void ezo_zo_update_carry(int64_t n, const int8_t *w, const int8_t *z, int64_t d, int64_t s, uint8_t *carry,
                                 int8_t *out) {
    int64_t up = 8 - s < 0 ? 0 : (8 - s > 8 ? 8 : 8 - s), down = s - 8 > 0 ? s - 8 : 0;
    int64_t bound = ((int64_t)1 << 62) >> up;
    for (int64_t i = 0; i < n; i++) {
        int64_t dz = (int64_t)((uint64_t)d * (uint64_t)(int64_t)z[i]);
        int64_t scaled = up > 0 ? (dz > bound ? bound : (dz < -bound ? -bound : dz)) * ((int64_t)1 << up)
                                : round_shift64(dz, down);
        int64_t t = (int64_t)carry[i] + scaled;
        int64_t v = (int64_t)w[i] - (t >> 8);
        carry[i] = (uint8_t)(t & 255);
        out[i] = (int8_t)(v > 127 ? 127 : (v < -127 ? -127 : v));
    }
}

/* sat(W + eps z) (update.perturb). */
EZO_API void ezo_perturb(int64_t n, const int8_t *w, const int8_t *z, int64_t eps, int8_t *out) {
    for (int64_t i = 0; i < n; i++) {
        int32_t v = (int32_t)w[i] + (int32_t)z[i] * (int32_t)eps;
        out[i] = (int8_t)(v > 127 ? 127 : (v < -127 ? -127 : v));
    }
}

/* Integer cross-entropy (loss.py, the same fixed-point steps and the same tables, passed in): per
 * example the loss in 2**-16 bits, saturated at 2**62 (the batch sum is loss.saturating_sum's); with `grad`, NITI's int8 error 128 * (softmax - onehot). */
#define CE_LOG2E 1549082005LL
#define CE_LOSS_MAX ((int64_t)1 << 62)
static int64_t ce_bitlength(int64_t x) { int64_t b = 0; while (b < 63 && x >= ((int64_t)1 << b)) b++; return b; }

static int64_t ce_log2(int64_t s, const int64_t *log_frac) {
    int64_t top = ce_bitlength(s) - 1, m = s >> (top - 30), frac = m - ((int64_t)1 << 30);
    int64_t idx = frac >> 20, rem = frac & ((1 << 20) - 1), base = (idx << 20) + ((int64_t)1 << 30);
    int64_t ratio = (rem << 30) / base;  /* both >= 0: C division is the floor */
    int64_t frac_log = log_frac[idx] + round_shift64(ratio * CE_LOG2E, 30);
    return (top - 30) * ((int64_t)1 << 20) + round_shift64(frac_log, 10);
}

EZO_API void ezo_cross_entropy(int64_t B, int64_t C, const int8_t *q, int64_t exponent, const int64_t *target,
                               const int64_t *pow_hi, const int64_t *pow_lo, const int64_t *log_frac,
                               int64_t *loss, int8_t *grad) {
    int64_t sh = exponent - 30 + 20, left = sh < 0 ? 0 : (sh > 62 ? 62 : sh), right = -sh < 0 ? 0 : (-sh > 62 ? 62 : -sh);
    int64_t floor_ = -(((int64_t)1 << 62) >> left);
    int64_t u[256], e[256];
    for (int64_t b = 0; b < B; b++) {
        const int8_t *row = q + b * C;
        int64_t top = row[0], total = 0;
        for (int64_t j = 1; j < C; j++) top = row[j] > top ? row[j] : top;
        for (int64_t j = 0; j < C; j++) {
            int64_t prod = (row[j] - top) * CE_LOG2E;
            u[j] = sh >= 0 ? (prod < floor_ ? floor_ : prod) * ((int64_t)1 << left) : round_shift64(prod, right);
            int64_t v = -u[j], k = (v >> 20) > 62 ? 62 : (v >> 20), r = v & ((1 << 20) - 1);
            e[j] = round_shift64(round_shift64(pow_hi[r >> 10] * pow_lo[r & 1023], 30), k);
            total += e[j];
        }
        int64_t lse = ce_log2(total, log_frac), up = exponent - 30 + 16;
        if (up >= 0) {  /* the target's gap in whole loss units, shifted left with saturation */
            int64_t k = up > 62 ? 62 : up, gap = (top - row[target[b]]) * CE_LOG2E;
            int64_t big = gap > (CE_LOSS_MAX >> k) ? CE_LOSS_MAX : gap * ((int64_t)1 << k);
            int64_t a = round_shift64(lse, 20 - 16);
            loss[b] = a > CE_LOSS_MAX - big ? CE_LOSS_MAX : a + big;
        } else {
            int64_t small = round_shift64(lse - u[target[b]], 20 - 16);
            loss[b] = small > CE_LOSS_MAX ? CE_LOSS_MAX : small;
        }
        if (!grad) continue;
        for (int64_t j = 0; j < C; j++) {
            int64_t p = ((e[j] << 8) + total) / (total << 1) - (j == target[b] ? 128 : 0);
            grad[b * C + j] = (int8_t)(p > 127 ? 127 : (p < -127 ? -127 : p));
        }
    }
}
