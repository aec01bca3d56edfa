/* The int8 product with AVX512-VNNI (vpdpbusd: 64 multiply-adds of u8 x s8 quads into int32 per
 * instruction, against 16 for AVX2's vpmaddwd). Included by ezo_int8.c where the compiler targets
 * AVX512-VNNI and AVX512BW; every other target keeps the AVX2 or the portable product.
 *
 * vpdpbusd multiplies an UNSIGNED byte by a signed one, and int8 operands are signed on both sides.
 * The vector operand (B: patches or the linear weights) is therefore offset by 128, b + 128 in 0..255
 * (an xor with 0x80 while packing), and the result corrected per row of A:
 *     sum_k A[m][k] * (B[n][k] + 128) - 128 * sum_k A[m][k] = sum_k A[m][k] * B[n][k].
 * Each vpdpbusd adds the four products of a quad (each |.| <= 128 * 255) into an int32 lane without
 * saturation, and the correction is subtracted in the same wrapping int32 arithmetic, so the result
 * is exact modulo 2**32; the true sum fits int32 (K <= 131071, the callers' rule), so it IS the sum.
 * -128 is exact too. A is zero past K, so whatever B holds there multiplies zero.
 *
 * Layouts: A's rows are read as s8 quads (A[m][4q], .., A[m][4q+3]) in place, or from a zero-padded
 * copy where K is not a multiple of 4; corr[m] = 128 * sum_k A[m][k]; Bq[q][n] = the u8 quad
 * (B[n][4q] + 128, ..), np = N rounded up to 16 words per panel row. A block of up to 8 rows x 32
 * columns keeps 16 zmm accumulators; each B load serves every row.
 */
static int64_t a_bytes(int64_t M, int64_t K) { return align64(M * quads(K) * 4) + align64(M * 4); }
static int64_t b_bytes(int64_t N, int64_t K) { return align64(quads(K) * padded16(N) * 4); }

/* A plain product packs B one 32-column panel at a time, and A only when K is not a multiple of 4
 * (else its rows ARE quads): the row sums, A's quads if needed, one panel. */
static int64_t gemm_bytes(int64_t M, int64_t N, int64_t K) {
    (void)N;
    return align64(M * 4) + (K % 4 ? align64(M * quads(K) * 4) : 0) + b_bytes(32, K);
}

/* corr[m] = 128 * sum_k A[m][k], wrapping like the accumulators. */
static void row_corrections(int64_t M, int64_t K, const int8_t *A, int64_t lda, int32_t *corr) {
    for (int64_t m = 0; m < M; m++) {
        uint32_t sum = 0;
        for (int64_t k = 0; k < K; k++) sum += (uint32_t)(int32_t)A[m * lda + k];
        corr[m] = (int32_t)(sum << 7);
    }
}

/* Bq of B[N, K] (row stride ldb), offset by 128; bytes past K (A is zero there) and columns past N zero. */
static void pack_b_quads(int64_t N, int64_t K, const int8_t *B, int64_t ldb, int32_t *Bq) {
    int64_t kq = quads(K), np = padded16(N);
    memset(Bq, 0, (size_t)(kq * np) * sizeof(int32_t));
    for (int64_t n = 0; n < N; n++) {
        const int8_t *b = B + n * ldb;
        for (int64_t q = 0; q < kq; q++) {
            uint8_t quad[4] = {0, 0, 0, 0};
            for (int64_t t = 0; t < 4 && 4 * q + t < K; t++) quad[t] = (uint8_t)b[4 * q + t] ^ 0x80;
            memcpy(Bq + q * np + n, quad, 4);
        }
    }
}

static inline void store_cols(int32_t *c, __m512i v, int64_t cols) {
    if (cols >= 16)
        _mm512_storeu_si512((void *)c, v);
    else if (cols > 0)
        _mm512_mask_storeu_epi32(c, (__mmask16)((1u << cols) - 1), v);
}

/* R rows (R <= 8) of A from `a` (row stride lda bytes, quads read in place) times `cols` columns
 * (<= 16 V, V = 1 or 2 vectors) of the panel `b` (row stride np words) into `c`; R and V constants. */
static inline __attribute__((always_inline)) void vnni_block(const int8_t *a, int64_t lda, const int32_t *corr,
                                                           int64_t kq, const int32_t *b, int64_t np, const int R,
                                                           const int V, int64_t cols, int32_t *c, int64_t ldc) {
    __m512i acc[8][2];
    for (int r = 0; r < R; r++) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
    for (int64_t q = 0; q < kq; q++, b += np) {
        __m512i b0 = _mm512_loadu_si512((const void *)b);
        __m512i b1 = V > 1 ? _mm512_loadu_si512((const void *)(b + 16)) : b0;
        for (int r = 0; r < R; r++) {
            int32_t quad;
            memcpy(&quad, a + r * lda + 4 * q, 4);
            __m512i av = _mm512_set1_epi32(quad);
            acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], b0, av);
            if (V > 1) acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], b1, av);
        }
    }
    for (int r = 0; r < R; r++) {
        __m512i fix = _mm512_set1_epi32(corr[r]);
        store_cols(c + r * ldc, _mm512_sub_epi32(acc[r][0], fix), cols);
        if (V > 1) store_cols(c + r * ldc + 16, _mm512_sub_epi32(acc[r][1], fix), cols - 16);
    }
}

#define VNNI_ROWS(V)                                                                                   \
    switch (rows) {                                                                                    \
        case 8: vnni_block(a, lda, cr, kq, b, np, 8, V, cols, c, ldc); break;                          \
        case 7: vnni_block(a, lda, cr, kq, b, np, 7, V, cols, c, ldc); break;                          \
        case 6: vnni_block(a, lda, cr, kq, b, np, 6, V, cols, c, ldc); break;                          \
        case 5: vnni_block(a, lda, cr, kq, b, np, 5, V, cols, c, ldc); break;                          \
        case 4: vnni_block(a, lda, cr, kq, b, np, 4, V, cols, c, ldc); break;                          \
        case 3: vnni_block(a, lda, cr, kq, b, np, 3, V, cols, c, ldc); break;                          \
        case 2: vnni_block(a, lda, cr, kq, b, np, 2, V, cols, c, ldc); break;                          \
        default: vnni_block(a, lda, cr, kq, b, np, 1, V, cols, c, ldc); break;                         \
    }

/* C[M, N] = A * B^T - corr, A as quads (row stride lda bytes), B packed (np = padded16(N)):
 * 32-column panels, 8-row blocks within each. */
static void gemm_blocks(int64_t M, int64_t N, int64_t kq, const int8_t *A, int64_t lda, const int32_t *corr,
                        const int32_t *Bq, int32_t *C, int64_t ldc) {
    int64_t np = padded16(N);
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
        int64_t cols = N - n0 < 32 ? N - n0 : 32;
        for (int64_t m0 = 0; m0 < M; m0 += 8) {
            int rows = M - m0 < 8 ? (int)(M - m0) : 8;
            const int8_t *a = A + m0 * lda;
            const int32_t *cr = corr + m0, *b = Bq + n0;
            int32_t *c = C + m0 * ldc + n0;
            if (cols > 16) {
                VNNI_ROWS(2)
            } else {
                VNNI_ROWS(1)
            }
        }
    }
}

/* A plain product: B packed a 32-row panel at a time (the workspace stays small). */
static void gemm_nt(int64_t M, int64_t N, int64_t K, const int8_t *A, int64_t lda, const int8_t *B, int64_t ldb,
                    int32_t *C, int64_t ldc, void *work) {
    int64_t kq = quads(K);
    int32_t *corr = (int32_t *)work;
    int8_t *Aq = (int8_t *)work + align64(M * 4);
    int32_t *Bq = (int32_t *)(Aq + (K % 4 ? align64(M * kq * 4) : 0));
    row_corrections(M, K, A, lda, corr);
    if (K % 4) pack_a_quads(M, K, A, lda, Aq);
    const int8_t *a = K % 4 ? Aq : A;
    int64_t row = K % 4 ? 4 * kq : lda;
    for (int64_t n0 = 0; n0 < N; n0 += 32) {
        int64_t cols = N - n0 < 32 ? N - n0 : 32;
        pack_b_quads(cols, K, B + n0 * ldb, ldb, Bq);
        gemm_blocks(M, cols, kq, a, row, corr, Bq, C + n0, ldc);
    }
}

/* The conv's weights, once per call: their quads, then their row sums (a_bytes(O, K) in all). */
static void prepare_a(int64_t M, int64_t K, const int8_t *A, void *work) {
    pack_a_quads(M, K, A, K, (int8_t *)work);
    row_corrections(M, K, A, K, (int32_t *)((char *)work + align64(M * quads(K) * 4)));
}

/* One image's product: the prepared weights times its packed patches. */
static void conv_product(int64_t M, int64_t N, int64_t K, const void *a, const int32_t *Bq, int32_t *C) {
    const int32_t *corr = (const int32_t *)((const char *)a + align64(M * quads(K) * 4));
    gemm_blocks(M, N, quads(K), (const int8_t *)a, 4 * quads(K), corr, Bq, C, N);
}
