/* elasticzo native int8 kernels, the backward half of a NITI step: conv weight and input gradients,
 * max-pool routing, ReLU mask, NITI weight update, and the ZO perturbation / update on random words. Included at the end of ezo_int8.c (one library, one
 * translation unit: it uses that file's conv shape, padding and patch helpers). Exact integer
 * arithmetic, equal bit for bit to elasticzo's portable PyTorch path. */

/* ------------------------------------------------------------------ conv weight gradient */

/* dW[O, K] = sum over images b and pixels p of g_b[o][p] * R_b[k][p], R_b the image's K-major im2col.
 * The sum runs along pixels, so both operands are rows of int16 (the int8 values sign-extended) over
 * the pixels of a chunk of images laid end to end: G[O][L] and R[K][L]. Each entry is a dot product of
 * two rows: no transposition, and every multiply-add does useful work whatever O and K are (LeNet's
 * O = 6 would waste most of a 16-wide GEMM block). With strides 1 an image's pixels are laid out Wp
 * (the padded width) per output row, as in conv.shifted_columns: R's row k is then ONE contiguous run
 * of the padded image, and the Wp - OW extra columns meet zeros in G. A chunk holds at most
 * MAX_INT32_TERMS pixels, so its int32 sums are exact; chunks are summed in int64. */
#define EZO_GW_PIXELS 1024  /* pixels per chunk: long rows, and a workspace of about 2 (K + O) KiB */

static int gw_wide(const ezo_conv_shape *s) { return s->sh == 1 && s->sw == 1; }
static int64_t gw_width(const ezo_conv_shape *s) { return gw_wide(s) ? s->W + 2 * s->pw : s->OW; }
static int64_t gw_pixels(const ezo_conv_shape *s) { return s->OH * gw_width(s); }  /* columns per image */

/* Images per chunk: about EZO_GW_PIXELS pixels, but never more than the call's B (a micro-batch of one
 * image must not hold a workspace sized for ten). */
static int64_t gw_images(const ezo_conv_shape *s, int64_t B) {
    int64_t c = EZO_GW_PIXELS / gw_pixels(s);
    if (c > B) c = B;
    return c < 1 ? 1 : c;  /* the caller keeps OH * Wp <= MAX_INT32_TERMS */
}

static int64_t gw_row(const ezo_conv_shape *s, int64_t B) { return (gw_images(s, B) * gw_pixels(s) + 15) / 16 * 16; }

EZO_API int64_t ezo_conv2d_grad_weight_workspace(int64_t B, const int64_t *shape) {
    ezo_conv_shape s = conv_shape(shape);
    return xp_bytes(&s) + 64 + align64((s.O + s.K) * gw_row(&s, B) * 2);  /* 64: the last run reads kw - 1 past xp */
}

/* Append one image's rows at column `off`: G[o][off + oh * V + ow] = g[o][oh][ow] (0 for ow >= OW) and
 * R[k][same] = patch entry k at pixel (oh, ow), V = gw_width. */
static void gw_append(const ezo_conv_shape *s, const int8_t *g, const int8_t *xp, int16_t *G, int16_t *R,
                      int64_t L, int64_t off) {
    int64_t V = gw_width(s), n = gw_pixels(s);
    for (int64_t o = 0; o < s->O; o++)
        for (int64_t oh = 0; oh < s->OH; oh++) {
            const int8_t *src = g + (o * s->OH + oh) * s->OW;
            int16_t *dst = G + o * L + off + oh * V;
            for (int64_t ow = 0; ow < s->OW; ow++) dst[ow] = src[ow];  /* the rest of the row stays 0 */
        }
    for (int64_t k = 0; k < s->K; k++) {
        int16_t *dst = R + k * L + off;
        if (gw_wide(s)) {  /* one run: patch entry k for every (oh, ow) of the Wp-wide grid */
            const int8_t *src = patch_row(s, xp, k, 0);
            for (int64_t p = 0; p < n; p++) dst[p] = src[p];
            continue;
        }
        for (int64_t oh = 0; oh < s->OH; oh++) {
            const int8_t *src = patch_row(s, xp, k, oh);
            for (int64_t ow = 0; ow < s->OW; ow++) dst[oh * V + ow] = src[ow * s->sw];
        }
    }
}

#ifdef __AVX2__
static inline int64_t hsum8(__m256i v) {
    __m128i h = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0x4E));
    h = _mm_add_epi32(h, _mm_shuffle_epi32(h, 0xB1));
    return _mm_cvtsi128_si32(h);  /* exact int32: the chunk's whole sum fits */
}

/* dw[o0 .. o0+RO][k0 .. k0+RK] += row dot products, 16 pixels per step; RO, RK are constants at each call. */
static inline __attribute__((always_inline)) void gw_block(const int16_t *G, const int16_t *R, int64_t L, int64_t K,
                                                           int64_t o0, int64_t k0, int64_t *dw, const int RO, const int RK) {
    __m256i acc[4][4];
    for (int r = 0; r < RO; r++)
        for (int c = 0; c < RK; c++) acc[r][c] = _mm256_setzero_si256();
    for (int64_t p = 0; p < L; p += 16) {
        __m256i b[4];
        for (int c = 0; c < RK; c++) b[c] = _mm256_loadu_si256((const __m256i *)(R + (k0 + c) * L + p));
        for (int r = 0; r < RO; r++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(G + (o0 + r) * L + p));
            for (int c = 0; c < RK; c++) acc[r][c] = _mm256_add_epi32(acc[r][c], _mm256_madd_epi16(a, b[c]));
        }
    }
    for (int r = 0; r < RO; r++)
        for (int c = 0; c < RK; c++) dw[(o0 + r) * K + k0 + c] += hsum8(acc[r][c]);
}

/* dw[O, K] += G[O][L] . R[K][L]^T: 4 x 2 blocks, then 4 x 1, 1 x 4 and 1 x 1 at the edges. */
static void gw_products(const ezo_conv_shape *s, const int16_t *G, const int16_t *R, int64_t L, int64_t *dw) {
    int64_t o0 = 0, K = s->K;
    for (; o0 + 4 <= s->O; o0 += 4) {
        int64_t k0 = 0;
        for (; k0 + 2 <= K; k0 += 2) gw_block(G, R, L, K, o0, k0, dw, 4, 2);
        for (; k0 < K; k0++) gw_block(G, R, L, K, o0, k0, dw, 4, 1);
    }
    for (; o0 < s->O; o0++) {
        int64_t k0 = 0;
        for (; k0 + 4 <= K; k0 += 4) gw_block(G, R, L, K, o0, k0, dw, 1, 4);
        for (; k0 < K; k0++) gw_block(G, R, L, K, o0, k0, dw, 1, 1);
    }
}
#else
/* dw[O, K] += G[O][L] . R[K][L]^T; gcc vectorises the dot product (smlal on aarch64, pmaddwd on x86). */
static void gw_products(const ezo_conv_shape *s, const int16_t *G, const int16_t *R, int64_t L, int64_t *dw) {
    for (int64_t o = 0; o < s->O; o++)
        for (int64_t k = 0; k < s->K; k++) {
            const int16_t *a = G + o * L, *b = R + k * L;
            int32_t acc = 0;
            for (int64_t p = 0; p < L; p++) acc += (int32_t)a[p] * (int32_t)b[p];
            dw[o * s->K + k] += acc;
        }
}
#endif

/* dw[O, C, kh, kw] (int64) = the conv weight gradient summed over B images of g[B, O, OH, OW] and
 * x[B, C, H, W] (as conv.int8_conv2d_grad_weight). */
EZO_API void ezo_conv2d_grad_weight(int64_t B, const int64_t *shape, const int8_t *g, const int8_t *x, int64_t *dw,
                                    void *work) {
    ezo_conv_shape s = conv_shape(shape);
    int64_t L = gw_row(&s, B), per = gw_images(&s, B), in = s.C * s.H * s.W;
    int8_t *xp = (int8_t *)work;
    int16_t *G = (int16_t *)((char *)work + xp_bytes(&s) + 64), *R = G + s.O * L;
    memset(dw, 0, (size_t)(s.O * s.K) * sizeof(int64_t));
    memset(xp + xp_bytes(&s), 0, 64);  /* what the last run reads past the image: met by zeros in G */
    for (int64_t b0 = 0; b0 < B; b0 += per) {
        int64_t n = B - b0 < per ? B - b0 : per;
        memset(G, 0, (size_t)((s.O + s.K) * L) * sizeof(int16_t));  /* zeros past each row's OW and the chunk */
        for (int64_t b = 0; b < n; b++) {
            pad_image(&s, x + (b0 + b) * in, xp);
            gw_append(&s, g + (b0 + b) * s.O * s.N, xp, G, R, L, b * gw_pixels(&s));
        }
        gw_products(&s, G, R, L, dw);
    }
}

/* ------------------------------------------------------------------ conv input gradient */

/* dX, the adjoint of a stride-1 conv, requantised: dXp[c][(oh + i) * Wp + ow + j] += W[o][c][i][j] g[o][oh][ow]
 * on the padded input grid, then cropped to [H, W]. With g laid out Wp wide (zeros for ow >= OW), each
 * (c, i, j) adds ONE contiguous run T[q] = sum_o W[o][c][i][j] G[o][q], q < OH * Wp, at offset i * Wp + j:
 * no flipped kernel, no zero border of width k - 1 multiplied through, no column matrix. The sum over o
 * runs on int16 pairs of output channels, word (G[2p][q], G[2p+1][q]) (vpmaddwd on AVX2). Each dX entry
 * sums O * kh * kw products: the caller keeps that <= MAX_INT32_TERMS. */
typedef struct { int64_t Wp, Q, Qv, plane, op; } gi_dims;

static gi_dims gi_dims_of(const ezo_conv_shape *s) {
    gi_dims d;
    d.Wp = s->W + 2 * s->pw;
    d.Q = s->OH * d.Wp;  /* the Wp-wide output grid */
    d.Qv = (d.Q + 7) / 8 * 8;
    d.plane = (s->H + 2 * s->ph) * d.Wp + s->kw + 8;  /* the last run ends kw - 1 + Qv - Q past the grid */
    d.op = (s->O + 1) / 2;
    return d;
}

EZO_API int64_t ezo_conv2d_grad_input_workspace(const int64_t *shape) {
    ezo_conv_shape s = conv_shape(shape);
    gi_dims d = gi_dims_of(&s);
    return align64(d.op * d.Qv * 4) + align64(s.K * d.op * 4) + align64(s.C * d.plane * 4) + align64(s.OW);
}

static inline int32_t pair16(int8_t lo, int8_t hi) {
    return (int32_t)((uint32_t)(uint16_t)(int16_t)lo | ((uint32_t)(uint16_t)(int16_t)hi << 16));
}

/* Gp[p][oh * Wp + ow] = (g[2p][oh][ow], g[2p+1][oh][ow]); the entries for ow >= OW stay as the caller zeroed them. */
static void gi_pack_errors(const ezo_conv_shape *s, const gi_dims *d, const int8_t *g, const int8_t *zeros, int32_t *Gp) {
    for (int64_t p = 0; p < d->op; p++)
        for (int64_t oh = 0; oh < s->OH; oh++) {
            const int8_t *r0 = g + (2 * p * s->OH + oh) * s->OW;
            const int8_t *r1 = 2 * p + 1 < s->O ? r0 + s->OH * s->OW : zeros;
            int32_t *dst = Gp + p * d->Qv + oh * d->Wp;
#ifdef __AVX2__
            if (s->OW >= 8) { interleave_row(r0, r1, dst, s->OW); continue; }
#endif
            for (int64_t ow = 0; ow < s->OW; ow++) dst[ow] = pair16(r0[ow], r1[ow]);
        }
}

/* dXp[c][off + q] += sum_p Wk[p] . Gp[p][q] over q < Qv (Wk: the weight pairs of one (c, i, j)). */
static void gi_run(const gi_dims *d, const int32_t *Gp, const int32_t *Wk, int32_t *dst) {
    int64_t q = 0;
#ifdef __AVX2__
    for (; q + 32 <= d->Qv; q += 32) {
        __m256i acc[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
        for (int64_t p = 0; p < d->op; p++) {
            __m256i wv = _mm256_set1_epi32(Wk[p]);
            for (int r = 0; r < 4; r++)
                acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(wv, _mm256_loadu_si256((const __m256i *)(Gp + p * d->Qv + q + 8 * r))));
        }
        for (int r = 0; r < 4; r++) {
            __m256i *out = (__m256i *)(dst + q + 8 * r);
            _mm256_storeu_si256(out, _mm256_add_epi32(_mm256_loadu_si256(out), acc[r]));
        }
    }
    for (; q < d->Qv; q += 8) {
        __m256i acc = _mm256_setzero_si256();
        for (int64_t p = 0; p < d->op; p++)
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_set1_epi32(Wk[p]), _mm256_loadu_si256((const __m256i *)(Gp + p * d->Qv + q))));
        __m256i *out = (__m256i *)(dst + q);
        _mm256_storeu_si256(out, _mm256_add_epi32(_mm256_loadu_si256(out), acc));
    }
#else
    for (int64_t p = 0; p < d->op; p++) {
        int32_t wl = (int16_t)(Wk[p] & 0xFFFF), wh = (int16_t)((uint32_t)Wk[p] >> 16);
        const int32_t *G = Gp + p * d->Qv;
        for (q = 0; q < d->Qv; q++) dst[q] += wl * (int16_t)(G[q] & 0xFFFF) + wh * (int16_t)((uint32_t)G[q] >> 16);
    }
#endif
}

/* One image: dX [C, H, W] int32 into `acc`. */
static void gi_image(const ezo_conv_shape *s, const gi_dims *d, const int8_t *g, const int8_t *zeros, int32_t *Gp,
                     const int32_t *Wpairs, int32_t *dXp, int32_t *acc) {
    gi_pack_errors(s, d, g, zeros, Gp);
    memset(dXp, 0, (size_t)(s->C * d->plane) * sizeof(int32_t));
    for (int64_t k = 0; k < s->K; k++) {  /* k = (c, i, j) */
        int64_t c = k / (s->kh * s->kw), i = (k / s->kw) % s->kh, j = k % s->kw;
        gi_run(d, Gp, Wpairs + k * d->op, dXp + c * d->plane + i * d->Wp + j);
    }
    for (int64_t c = 0; c < s->C; c++)
        for (int64_t h = 0; h < s->H; h++)
            memcpy(acc + (c * s->H + h) * s->W, dXp + c * d->plane + (h + s->ph) * d->Wp + s->pw, (size_t)s->W * sizeof(int32_t));
}

/* out[B, C, H, W] int8 = requantize(dX) for g[B, O, OH, OW] and w[O, C, kh, kw] of a stride-1 conv with
 * shape {C, H, W, O, kh, kw, 1, 1, ph, pw}: one image's int32 dX at a time (`scratch`, C*H*W), narrowed
 * at once by its own shift and brought to the common one at the end, as ezo_conv2d_requant. Returns the shift. */
EZO_API int64_t ezo_conv2d_grad_input_requant(int64_t B, const int64_t *shape, const int8_t *g, const int8_t *w,
                                              int8_t *out, int32_t *scratch, uint8_t *bits, int64_t *shifts, void *work) {
    ezo_conv_shape s = conv_shape(shape);
    gi_dims d = gi_dims_of(&s);
    int32_t *Gp = (int32_t *)work, *Wpairs = (int32_t *)((char *)work + align64(d.op * d.Qv * 4));
    int32_t *dXp = (int32_t *)((char *)Wpairs + align64(s.K * d.op * 4));
    int8_t *zeros = (int8_t *)((char *)dXp + align64(s.C * d.plane * 4));
    int64_t n = s.C * s.H * s.W, nb = (n + 7) / 8, S = 0;
    memset(zeros, 0, (size_t)s.OW);
    memset(Gp, 0, (size_t)(d.op * d.Qv) * sizeof(int32_t));  /* the columns ow >= OW stay 0 for every image */
    for (int64_t k = 0; k < s.K; k++)  /* Wpairs[k][p] = (w[2p][k], w[2p+1][k]) */
        for (int64_t p = 0; p < d.op; p++)
            Wpairs[k * d.op + p] = pair16(w[2 * p * s.K + k], 2 * p + 1 < s.O ? w[(2 * p + 1) * s.K + k] : 0);
    for (int64_t b = 0; b < B; b++) {
        gi_image(&s, &d, g + b * s.O * s.N, zeros, Gp, Wpairs, dXp, scratch);
        shifts[b] = shift_for(absmax32(n, scratch));
        narrow_provisional(n, scratch, shifts[b], out + b * n, bits + b * nb);
        S = shifts[b] > S ? shifts[b] : S;
    }
    for (int64_t b = 0; b < B; b++) narrow_final(n, out + b * n, bits + b * nb, shifts[b], S);
    return S;
}

/* ------------------------------------------------------------------ max-pool routing and ReLU mask */

/* One output row of a 2x2, stride-2 pool's backward: the two input rows r0, r1 get each error at its
 * window's arg max offset (0, 1 on r0; 2, 3 on r1) and zeros elsewhere. */
static void route2x2_row(const int8_t *g, const int8_t *arg, int8_t *r0, int8_t *r1, int64_t OW) {
    int64_t ow = 0;
#ifdef __AVX2__
    for (; ow + 8 <= OW; ow += 8) {  /* 8 windows: four selects, interleaved into the two 16-byte rows */
        __m128i v = _mm_loadl_epi64((const __m128i *)(g + ow)), a = _mm_loadl_epi64((const __m128i *)(arg + ow));
        __m128i m[4];
        for (int o = 0; o < 4; o++) m[o] = _mm_and_si128(_mm_cmpeq_epi8(a, _mm_set1_epi8((char)o)), v);
        _mm_storeu_si128((__m128i *)(r0 + 2 * ow), _mm_unpacklo_epi8(m[0], m[1]));
        _mm_storeu_si128((__m128i *)(r1 + 2 * ow), _mm_unpacklo_epi8(m[2], m[3]));
    }
#endif
    for (; ow < OW; ow++) {
        int8_t v = g[ow], a = arg[ow];
        r0[2 * ow] = a == 0 ? v : 0;
        r0[2 * ow + 1] = a == 1 ? v : 0;
        r1[2 * ow] = a == 2 ? v : 0;
        r1[2 * ow + 1] = a == 3 ? v : 0;
    }
}

/* Max-pool backward for windows that do not overlap (kh <= sh, kw <= sw) over P planes: out[P, H, W]
 * int8 is zero except at each window's arg max offset, which receives its error g[P, OH, OW]. */
EZO_API void ezo_maxpool2d_backward(int64_t P, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t sh, int64_t sw,
                                    const int8_t *g, const int8_t *arg, int8_t *out) {
    int64_t OH = (H - kh) / sh + 1, OW = (W - kw) / sw + 1;
    int pool2 = kh == 2 && kw == 2 && sh == 2 && sw == 2;
    if (!pool2 || H != 2 * OH || W != 2 * OW) memset(out, 0, (size_t)(P * H * W));  /* else every entry is written */
    for (int64_t p = 0; p < P; p++)
        for (int64_t oh = 0; oh < OH; oh++) {
            const int8_t *gr = g + (p * OH + oh) * OW, *ar = arg + (p * OH + oh) * OW;
            int8_t *top = out + (p * H + oh * sh) * W;
            if (pool2)  /* LeNet's pools */
                route2x2_row(gr, ar, top, top + W, OW);
            else
                for (int64_t ow = 0; ow < OW; ow++) top[(ar[ow] / kw) * W + ow * sw + ar[ow] % kw] = gr[ow];
        }
}

/* ReLU forward that keeps its mask for the backward, one pass: out = max(x, 0), mask = x > 0 (bool bytes). */
EZO_API void ezo_relu_forward(int64_t n, const int8_t *x, int8_t *out, uint8_t *mask) {
    for (int64_t i = 0; i < n; i++) {
        int8_t v = x[i];
        mask[i] = v > 0;
        out[i] = v > 0 ? v : 0;
    }
}

/* out = mask ? g : 0 (ReLU backward; mask holds 0 or 1 per entry, a bool tensor's bytes). */
EZO_API void ezo_relu_backward(int64_t n, const int8_t *g, const uint8_t *mask, int8_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = (int8_t)(g[i] & -(int8_t)mask[i]);
}

/* ------------------------------------------------------------------ NITI weight update */

static int64_t bitlength64(uint64_t top) { int64_t b = 0; while (b < 63 && (top >> b) != 0) b++; return b; }

/* NITI's pseudo-stochastic rounding of x / 2**s (rounding.shift_round_pseudo_stochastic) on |x|: the
 * upper ceil(s/2) discarded bits against the lower floor(s/2) (doubled when s is odd); sign restored. */
static inline int64_t pseudo_stochastic(int64_t x, int64_t s) {
    int64_t mag = x < 0 ? -x : x, low = mag & (((int64_t)1 << s) - 1), half = s >> 1;
    int64_t r = (mag >> s) + ((low >> half) > ((low & (((int64_t)1 << half) - 1)) << (s & 1)));
    return x < 0 ? -r : r;
}

static inline int8_t sat8(int64_t v) { return (int8_t)(v > 127 ? 127 : (v < -127 ? -127 : v)); }

/* update.niti_update: s = max(bitlength(max|grad|) - mu, 0), out = sat(w - round_ps(grad / 2**s)).
 * int32 gradients are first clamped to -INT32_MAX, as the portable path does. */
EZO_API void ezo_niti_update32(int64_t n, const int8_t *w, const int32_t *grad, int64_t mu, int8_t *out) {
    int64_t lo = 0, hi = 0;
    for (int64_t i = 0; i < n; i++) { lo = grad[i] < lo ? grad[i] : lo; hi = grad[i] > hi ? grad[i] : hi; }
    int64_t bits = bitlength64((uint64_t)(-lo > hi ? -lo : hi)), s = bits > mu ? bits - mu : 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t x = grad[i] < -2147483647 ? -2147483647 : grad[i];
        out[i] = sat8((int64_t)w[i] - pseudo_stochastic(x, s));
    }
}

EZO_API void ezo_niti_update64(int64_t n, const int8_t *w, const int64_t *grad, int64_t mu, int8_t *out) {
    int64_t lo = 0, hi = 0;
    for (int64_t i = 0; i < n; i++) { lo = grad[i] < lo ? grad[i] : lo; hi = grad[i] > hi ? grad[i] : hi; }
    int64_t bits = bitlength64((uint64_t)(-lo > hi ? -lo : hi)), s = bits > mu ? bits - mu : 0;
    for (int64_t i = 0; i < n; i++) out[i] = sat8((int64_t)w[i] - pseudo_stochastic(grad[i], s));
}

/* ------------------------------------------------------------------ ZO steps on random words */

/* z_i = 2 bit_i - 1, bit_i = bit i % 32 of words[i / 32] (zo.noise.random_bits' order), `len` entries from `lo`. */
static void rademacher_words(const int32_t *words, int64_t lo, int64_t len, int8_t *z) {
    for (int64_t i = 0; i < len; i++) z[i] = (int8_t)(((((uint32_t)words[(lo + i) >> 5]) >> ((lo + i) & 31)) & 1) * 2 - 1);
}

/* out = sat(W + eps z) for one round of words (update.perturbed_weight without expanding z in torch). */
EZO_API void ezo_perturb_words(int64_t n, const int8_t *w, const int32_t *words, int64_t eps, int8_t *out) {
    int8_t z[256];
    for (int64_t lo = 0; lo < n; lo += 256) {
        int64_t len = n - lo < 256 ? n - lo : 256;
        rademacher_words(words, lo, len, z);
        ezo_perturb(len, w + lo, z, eps, out + lo);
    }
}

/* The carried ZO step (ezo_zo_update_carry) in place on W for one round of words (update.zo_update_). */
EZO_API void ezo_zo_update_words(int64_t n, int8_t *w, const int32_t *words, int64_t d, int64_t s, uint8_t *carry) {
    int8_t z[256];
    for (int64_t lo = 0; lo < n; lo += 256) {
        int64_t len = n - lo < 256 ? n - lo : 256;
        rademacher_words(words, lo, len, z);
        ezo_zo_update_carry(len, w + lo, z, d, s, carry + lo, w + lo);  /* reads w[i] before writing it */
    }
}

