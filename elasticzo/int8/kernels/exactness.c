/* Exactness driver for ezo_int8.c with no Python and no torch: builds for any target (aarch64 under
 * qemu, see scripts/aarch64_exactness.sh) and compares every kernel with naive int64 loops on random
 * and extreme operands (all +127, all -127, all -128, ReLU-range 0..127). Prints one line per
 * kernel and exits 1 on the first mismatch. Covers the forward kernels and the backward ones of
 * ezo_int8_backward.c (weight and input gradients, pool routing, ReLU mask, NITI update, ZO steps on
 * random words). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ezo_int8.c"

static uint64_t rng = 0x9E3779B97F4A7C15ull;

static int8_t draw(int fill) {
    rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17;  /* xorshift64 */
    switch (fill) {
        case 1: return 127;
        case 2: return -127;
        case 3: return -128;
        case 4: return (int8_t)(rng % 128);
        default: return (int8_t)(rng & 0xFF);
    }
}

static void fill_buf(int8_t *p, int64_t n, int fill) { for (int64_t i = 0; i < n; i++) p[i] = draw(fill); }

static int check_gemm(int64_t M, int64_t N, int64_t K, int fa, int fb) {
    int8_t *A = malloc(M * K + 1), *B = malloc(N * K + 1);
    int32_t *C = malloc(M * N * 4 + 4);
    void *work = malloc(ezo_gemm_workspace(M, N, K) + 64);
    fill_buf(A, M * K, fa); fill_buf(B, N * K, fb);
    ezo_gemm_nt(M, N, K, A, K, B, K, C, N, work);
    int bad = 0;
    for (int64_t m = 0; m < M && !bad; m++)
        for (int64_t n = 0; n < N; n++) {
            int64_t want = 0;
            for (int64_t k = 0; k < K; k++) want += (int64_t)A[m * K + k] * B[n * K + k];
            if (want != C[m * N + n]) { bad = 1; break; }
        }
    free(A); free(B); free(C); free(work);
    return bad;
}

static int64_t naive_conv(const ezo_conv_shape *s, const int8_t *x, const int8_t *w, int64_t b, int64_t o,
                          int64_t oh, int64_t ow) {
    int64_t acc = 0;
    for (int64_t c = 0; c < s->C; c++)
        for (int64_t i = 0; i < s->kh; i++)
            for (int64_t j = 0; j < s->kw; j++) {
                int64_t h = oh * s->sh + i - s->ph, v = ow * s->sw + j - s->pw;
                if (h < 0 || h >= s->H || v < 0 || v >= s->W) continue;
                acc += (int64_t)x[((b * s->C + c) * s->H + h) * s->W + v] * w[((o * s->C + c) * s->kh + i) * s->kw + j];
            }
    return acc;
}

static int8_t naive_narrow(int64_t acc, int64_t S) {
    int64_t b = S > 0, y = acc >> (S - b), r = (y >> b) + (y & b);
    return (int8_t)(r > 127 ? 127 : (r < -127 ? -127 : r));
}

/* An int32 bias [O] as int8.bias.int32_bias leaves it: within +-room = INT32_MAX - K * 128**2, here at
 * the edges (+room, -room, alternating) or random; NULL for fill 0 (the unbiased kernel). */
static int32_t *conv_bias(int64_t O, int64_t K, int fill) {
    if (fill == 0) return NULL;
    int32_t *bias = malloc(O * 4 + 4), room = (int32_t)(2147483647 - K * 16384);
    for (int64_t o = 0; o < O; o++) {
        int32_t r = (int32_t)((uint32_t)(uint8_t)draw(0) << 23 | (uint32_t)(uint8_t)draw(0) << 8) % room;
        bias[o] = fill == 1 ? room : (fill == 2 ? -room : (fill == 3 ? (o % 2 ? -room : room) : r));
    }
    return bias;
}

static int check_conv(const int64_t *shape, int64_t B, int fx, int fw, int fill_bias) {
    ezo_conv_shape s = conv_shape(shape);
    int64_t nx = B * s.C * s.H * s.W, n = s.O * s.N, top = 0, bad = 0;
    int8_t *x = malloc(nx + 1), *w = malloc(s.O * s.K + 1), *out = malloc(B * n + 1);
    int32_t *acc = malloc(B * n * 4 + 4), *scratch = malloc(n * 4 + 4), *bias = conv_bias(s.O, s.K, fill_bias);
    int64_t *want = malloc(B * n * 8 + 8), *shifts = malloc(B * 8);
    uint8_t *bits = malloc(ezo_requant_bits_bytes(B, n) + 1);
    void *work = malloc(ezo_conv2d_workspace(shape) + 64);
    fill_buf(x, nx, fx); fill_buf(w, s.O * s.K, fw);
    for (int64_t b = 0; b < B && b < 2; b++)  /* quieter images: their own shift is below the final one */
        for (int64_t i = 0; i < s.C * s.H * s.W; i++) x[b * s.C * s.H * s.W + i] >>= 3 * (b + 1);
    for (int64_t b = 0; b < B; b++)
        for (int64_t o = 0; o < s.O; o++)
            for (int64_t p = 0; p < s.N; p++) {
                int64_t v = naive_conv(&s, x, w, b, o, p / s.OW, p % s.OW) + (bias ? bias[o] : 0);
                want[(b * s.O + o) * s.N + p] = v;
                top = (v < 0 ? -v : v) > top ? (v < 0 ? -v : v) : top;
            }
    ezo_conv2d(B, shape, x, w, acc, work);
    for (int64_t i = 0; i < B * n; i++) bad |= acc[i] + (bias ? bias[(i / s.N) % s.O] : 0) != want[i];
    int64_t S = ezo_conv2d_requant(B, shape, x, w, bias, out, scratch, bits, shifts, work);
    bad |= top > 2147483647 || S != shift_for(top);
    for (int64_t i = 0; i < B * n; i++) bad |= out[i] != naive_narrow(want[i], S);
    free(x); free(w); free(out); free(acc); free(scratch); free(want); free(shifts); free(bits); free(work); free(bias);
    return (int)bad;
}

static int check_grad_weight(const int64_t *shape, int64_t B, int fx) {
    ezo_conv_shape s = conv_shape(shape);
    int64_t nx = B * s.C * s.H * s.W, ng = B * s.O * s.N, bad = 0;
    int8_t *x = malloc(nx + 1), *g = malloc(ng + 1);
    int64_t *dw = calloc(s.O * s.K, 8);
    void *work = malloc(ezo_conv2d_grad_weight_workspace(B, shape) + 64);
    fill_buf(x, nx, fx); fill_buf(g, ng, 0);
    ezo_conv2d_grad_weight(B, shape, g, x, dw, work);
    for (int64_t o = 0; o < s.O; o++)
        for (int64_t k = 0; k < s.K; k++) {
            int64_t c = k / (s.kh * s.kw), i = (k / s.kw) % s.kh, j = k % s.kw, want = 0;
            for (int64_t b = 0; b < B; b++)
                for (int64_t p = 0; p < s.N; p++) {
                    int64_t h = (p / s.OW) * s.sh + i - s.ph, v = (p % s.OW) * s.sw + j - s.pw;
                    if (h < 0 || h >= s.H || v < 0 || v >= s.W) continue;
                    want += (int64_t)g[(b * s.O + o) * s.N + p] * x[((b * s.C + c) * s.H + h) * s.W + v];
                }
            bad |= dw[o * s.K + k] != want;
        }
    free(x); free(g); free(dw); free(work);
    return (int)bad;
}

/* The requantised input gradient of a stride-1 conv against int64 loops over the adjoint. */
static int check_grad_input(const int64_t *shape, int64_t B, int fill) {
    ezo_conv_shape s = conv_shape(shape);
    int64_t n = s.C * s.H * s.W, top = 0, bad = 0;
    int8_t *g = malloc(B * s.O * s.N + 1), *w = malloc(s.O * s.K + 1), *out = malloc(B * n + 1);
    int32_t *scratch = malloc(n * 4 + 4);
    int64_t *want = calloc(B * n + 1, 8), *shifts = malloc(B * 8);
    uint8_t *bits = malloc(ezo_requant_bits_bytes(B, n) + 1);
    void *work = malloc(ezo_conv2d_grad_input_workspace(shape) + 64);
    fill_buf(g, B * s.O * s.N, fill); fill_buf(w, s.O * s.K, fill ? fill : 0);
    for (int64_t i = 0; i < s.O * s.N; i++) g[i] >>= 4;  /* a quieter first image */
    for (int64_t b = 0; b < B; b++)
        for (int64_t o = 0; o < s.O; o++)
            for (int64_t p = 0; p < s.N; p++)
                for (int64_t k = 0; k < s.K; k++) {
                    int64_t c = k / (s.kh * s.kw), h = p / s.OW + (k / s.kw) % s.kh - s.ph, v = p % s.OW + k % s.kw - s.pw;
                    if (h >= 0 && h < s.H && v >= 0 && v < s.W)
                        want[(b * s.C + c) * s.H * s.W + h * s.W + v] += (int64_t)g[(b * s.O + o) * s.N + p] * w[o * s.K + k];
                }
    for (int64_t i = 0; i < B * n; i++) top = (want[i] < 0 ? -want[i] : want[i]) > top ? (want[i] < 0 ? -want[i] : want[i]) : top;
    int64_t S = ezo_conv2d_grad_input_requant(B, shape, g, w, out, scratch, bits, shifts, work);
    bad |= S != shift_for(top);
    for (int64_t i = 0; i < B * n; i++) bad |= out[i] != naive_narrow(want[i], S);
    free(g); free(w); free(out); free(scratch); free(want); free(shifts); free(bits); free(work);
    return (int)bad;
}

/* Max-pool forward (first arg max) and the routing of an error back to it, against plain loops. */
static int check_pool(int64_t P, int64_t H, int64_t W, int64_t kh, int64_t kw, int64_t sh, int64_t sw, int fill) {
    int64_t OH = (H - kh) / sh + 1, OW = (W - kw) / sw + 1, bad = 0;
    int8_t *x = malloc(P * H * W), *out = malloc(P * OH * OW), *arg = malloc(P * OH * OW), *g = malloc(P * OH * OW);
    int8_t *back = malloc(P * H * W);
    fill_buf(x, P * H * W, fill); fill_buf(g, P * OH * OW, 0);
    if (fill == 4) for (int64_t i = 0; i < P * H * W; i++) x[i] %= 3;  /* ties */
    ezo_maxpool2d(P, H, W, kh, kw, sh, sw, x, out, arg);
    ezo_maxpool2d_backward(P, H, W, kh, kw, sh, sw, g, arg, back);
    for (int64_t p = 0; p < P; p++)
        for (int64_t oh = 0; oh < OH; oh++)
            for (int64_t ow = 0; ow < OW; ow++) {
                int64_t at = 0, i = (p * OH + oh) * OW + ow;
                for (int64_t o = 1; o < kh * kw; o++)
                    if (x[(p * H + oh * sh + o / kw) * W + ow * sw + o % kw] > x[(p * H + oh * sh + at / kw) * W + ow * sw + at % kw]) at = o;
                bad |= arg[i] != at || out[i] != x[(p * H + oh * sh + at / kw) * W + ow * sw + at % kw];
            }
    for (int64_t p = 0; p < P; p++)  /* each input: its window's error if it is that window's arg max, else 0 */
        for (int64_t h = 0; h < H; h++)
            for (int64_t w = 0; w < W; w++) {
                int64_t oh = h / sh, ow = w / sw, want = 0;
                if (oh < OH && ow < OW && h - oh * sh < kh && w - ow * sw < kw &&
                    arg[(p * OH + oh) * OW + ow] == (h - oh * sh) * kw + (w - ow * sw))
                    want = g[(p * OH + oh) * OW + ow];
                bad |= back[(p * H + h) * W + w] != want;
            }
    free(x); free(out); free(arg); free(g); free(back);
    return (int)bad;
}

/* ReLU forward and backward and the NITI update (pseudo-stochastic rounding, spelled out again) against plain loops. */
static int check_update(int64_t n, int64_t mu, int fill) {
    int8_t *w = malloc(n), *g8 = malloc(n), *out = malloc(n), *out64 = malloc(n);
    uint8_t *mask = malloc(n);
    int32_t *grad = malloc(n * 4);
    int64_t *grad64 = malloc(n * 8), top = 0, bad = 0;
    fill_buf(w, n, fill); fill_buf(g8, n, 0);
    for (int64_t i = 0; i < n; i++) {
        w[i] = w[i] == -128 ? -127 : w[i];
        mask[i] = (uint8_t)(g8[i] & 1);
        grad[i] = (int32_t)((int64_t)draw(0) * 16777216 + (int64_t)(uint8_t)draw(0) * 65536 + draw(0));
        grad64[i] = (int64_t)grad[i] * 4099;
    }
    ezo_relu_backward(n, w, mask, out);
    for (int64_t i = 0; i < n; i++) bad |= out[i] != (mask[i] ? w[i] : 0);
    ezo_relu_forward(n, g8, out, mask);
    for (int64_t i = 0; i < n; i++) bad |= out[i] != (g8[i] > 0 ? g8[i] : 0) || mask[i] != (g8[i] > 0);
    for (int wide = 0; wide < 2; wide++) {
        top = 0;
        for (int64_t i = 0; i < n; i++) {
            int64_t v = wide ? grad64[i] : grad[i];
            top = (v < 0 ? -v : v) > top ? (v < 0 ? -v : v) : top;
        }
        int64_t bits = 0, s;
        while ((top >> bits) != 0) bits++;
        s = bits > mu ? bits - mu : 0;
        if (wide) ezo_niti_update64(n, w, grad64, mu, out64); else ezo_niti_update32(n, w, grad, mu, out64);
        for (int64_t i = 0; i < n; i++) {
            int64_t v = wide ? grad64[i] : grad[i], mag = v < 0 ? -v : v, low = mag % ((int64_t)1 << s);
            int64_t prob = low / ((int64_t)1 << (s / 2)), rnd = (low % ((int64_t)1 << (s / 2))) * (s % 2 ? 2 : 1);
            int64_t step = mag / ((int64_t)1 << s) + (prob > rnd), r = w[i] - (v < 0 ? -step : step);
            bad |= out64[i] != (r > 127 ? 127 : (r < -127 ? -127 : r));
        }
    }
    free(w); free(g8); free(out); free(out64); free(mask); free(grad); free(grad64);
    return (int)bad;
}

/* The ZO perturbation and update on random words against the same kernels on z expanded here. */
static int check_words(int64_t n, int fill) {
    int8_t *w = malloc(n), *z = malloc(n), *a = malloc(n), *b = malloc(n);
    int32_t *words = malloc((n + 31) / 32 * 4);
    uint8_t *ca = malloc(n), *cb = malloc(n);
    int64_t bad = 0;
    fill_buf(w, n, fill);
    for (int64_t i = 0; i < (n + 31) / 32; i++) words[i] = (int32_t)((uint32_t)(uint8_t)draw(0) << 24 | (uint32_t)(uint8_t)draw(0) << 8 | (uint8_t)draw(0));
    for (int64_t i = 0; i < n; i++) {
        w[i] = w[i] == -128 ? -127 : w[i];
        z[i] = ((uint32_t)words[i / 32] >> (i % 32)) & 1 ? 1 : -1;
        ca[i] = cb[i] = (uint8_t)draw(0);
    }
    for (int64_t eps = -3; eps <= 3; eps += 2) {
        ezo_perturb_words(n, w, words, eps, a);
        ezo_perturb(n, w, z, eps, b);
        bad |= memcmp(a, b, n) != 0;
    }
    memcpy(a, w, n);
    ezo_zo_update_words(n, a, words, -12345, 11, ca);
    ezo_zo_update_carry(n, w, z, -12345, 11, cb, b);
    bad |= memcmp(a, b, n) != 0 || memcmp(ca, cb, n) != 0;
    free(w); free(z); free(a); free(b); free(words); free(ca); free(cb);
    return (int)bad;
}

int main(void) {
    static const int64_t gemms[][3] = {{1, 1, 1}, {5, 3, 7}, {64, 120, 400}, {17, 33, 151}, {4, 16, 2}, {9, 10, 84}};
    static const int64_t convs[][10] = {  /* C, H, W, O, kh, kw, sh, sw, ph, pw */
        {1, 28, 28, 6, 5, 5, 1, 1, 2, 2}, {6, 14, 14, 16, 5, 5, 1, 1, 0, 0}, {2, 9, 11, 5, 3, 4, 2, 1, 1, 2},
        {3, 7, 7, 4, 3, 3, 2, 3, 1, 0}, {1, 5, 5, 1, 1, 1, 1, 1, 0, 0}, {16, 5, 9, 6, 5, 5, 1, 1, 4, 4}};
    int failures = 0, cases = 0;
    for (int fa = 0; fa < 5; fa++)
        for (int fb = 0; fb < 5; fb++) {
            for (size_t i = 0; i < sizeof gemms / sizeof gemms[0]; i++, cases++)
                failures += check_gemm(gemms[i][0], gemms[i][1], gemms[i][2], fa, fb);
            for (size_t i = 0; i < sizeof convs / sizeof convs[0]; i++, cases++)
                failures += check_conv(convs[i], 3, fa, fb, (fa + fb + (int)i) % 5);  /* every bias fill on each shape */
        }
    for (int fx = 0; fx < 5; fx++)
        for (size_t i = 0; i < sizeof convs / sizeof convs[0]; i++, cases++)
            failures += check_grad_weight(convs[i], 2, fx);
    static const int64_t pools[][7] = {  /* P, H, W, kh, kw, sh, sw: disjoint windows */
        {6, 28, 28, 2, 2, 2, 2}, {16, 10, 10, 2, 2, 2, 2}, {3, 9, 19, 2, 2, 2, 2}, {2, 11, 13, 3, 2, 3, 3}, {2, 7, 8, 1, 3, 2, 3}};
    for (int fill = 0; fill < 5; fill++) {
        for (size_t i = 0; i < sizeof convs / sizeof convs[0]; i++)
            if (convs[i][6] == 1 && convs[i][7] == 1) cases++, failures += check_grad_input(convs[i], 3, fill);
        for (size_t i = 0; i < sizeof pools / sizeof pools[0]; i++, cases++)
            failures += check_pool(pools[i][0], pools[i][1], pools[i][2], pools[i][3], pools[i][4], pools[i][5], pools[i][6], fill);
        for (int64_t mu = 1; mu <= 8; mu += 7, cases++) failures += check_update(1000, mu, fill);
        for (int64_t n = 1; n <= 1000; n += 333, cases++) failures += check_words(n, fill);
    }
    printf("ezo_int8 exactness: %d of %d cases differ from int64 loops\n", failures, cases);
    return failures != 0;
}
