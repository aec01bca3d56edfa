/* The int8 product with AVX2 and no VNNI. Included by ezo_int8.c where the compiler targets AVX2
 * but not AVX512-VNNI (ezo_int8_vnni.c).
 *
 * Two forms, chosen per convolution call:
 *   - int16 pairs and vpmaddwd (16 multiply-adds per instruction), exact for every int8 value;
 *   - where every input byte is in 0..127 (NITI's activations after ReLU, and pixels), byte quads
 *     and vpmaddubsw + vpmaddwd (ezo_int8_quads.c's layout), half the packed bytes and 3 instead
 *     of 4 instructions per 32 multiply-adds.
 * Plain products (linear layers) take the pair form.
 */

static int64_t pairs(int64_t K) { return (K + 1) / 2; }

/* Ap: M rows of kp int32 words, each the int16 pair (A[m][2p], A[m][2p+1]) (0 past K). */
static void pack_a_pairs(int64_t M, int64_t K, const int8_t *A, int64_t lda, int32_t *Ap) {
    int64_t kp = pairs(K);
    for (int64_t m = 0; m < M; m++) {
        const int8_t *a = A + m * lda;
        for (int64_t p = 0; p < kp; p++) {
            int16_t lo = a[2 * p], hi = (2 * p + 1 < K) ? a[2 * p + 1] : 0;
            Ap[m * kp + p] = (int32_t)((uint32_t)(uint16_t)lo | ((uint32_t)(uint16_t)hi << 16));
        }
    }
}

/* Bp: kp panels of np int32 words, word (p, n) the int16 pair (B[n][2p], B[n][2p+1]); 0 for n >= N. */
static void pack_b_pairs(int64_t N, int64_t K, const int8_t *B, int64_t ldb, int32_t *Bp) {
    int64_t kp = pairs(K), np = padded16(N);
    memset(Bp, 0, (size_t)(kp * np) * sizeof(int32_t));
    for (int64_t n = 0; n < N; n++) {
        const int8_t *b = B + n * ldb;
        for (int64_t p = 0; p < kp; p++) {
            int16_t lo = b[2 * p], hi = (2 * p + 1 < K) ? b[2 * p + 1] : 0;
            Bp[p * np + n] = (int32_t)((uint32_t)(uint16_t)lo | ((uint32_t)(uint16_t)hi << 16));
        }
    }
}

static inline void store_row(int32_t *c, __m256i lo, __m256i hi, int64_t cols) {
    if (cols >= 16) {
        _mm256_storeu_si256((__m256i *)c, lo);
        _mm256_storeu_si256((__m256i *)(c + 8), hi);
        return;
    }
    int32_t tmp[16];
    _mm256_storeu_si256((__m256i *)tmp, lo);
    _mm256_storeu_si256((__m256i *)(tmp + 8), hi);
    memcpy(c, tmp, (size_t)cols * sizeof(int32_t));
}

/* C[m0 .. m0+rows, n0 .. n0+cols), rows <= 4, cols <= 16: 8 accumulators, vpmaddwd per pair. */
static void block_4x16(const int32_t *Ap, const int32_t *Bp, int64_t kp, int64_t np, int64_t m0, int64_t rows,
                       int64_t n0, int64_t cols, int32_t *C, int64_t ldc) {
    __m256i acc[4][2];
    const int32_t *a[4];
    for (int r = 0; r < 4; r++) {
        acc[r][0] = acc[r][1] = _mm256_setzero_si256();
        a[r] = Ap + (m0 + (r < rows ? r : 0)) * kp;
    }
    for (int64_t p = 0; p < kp; p++) {
        const int32_t *b = Bp + p * np + n0;
        __m256i b0 = _mm256_loadu_si256((const __m256i *)b), b1 = _mm256_loadu_si256((const __m256i *)(b + 8));
        for (int r = 0; r < 4; r++) {
            __m256i av = _mm256_set1_epi32(a[r][p]);
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(av, b0));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(av, b1));
        }
    }
    for (int r = 0; r < rows; r++) store_row(C + (m0 + r) * ldc + n0, acc[r][0], acc[r][1], cols);
}

static void gemm_packed(int64_t M, int64_t N, int64_t K, const int32_t *Ap, const int32_t *Bp, int32_t *C, int64_t ldc) {
    int64_t kp = pairs(K), np = padded16(N);
    for (int64_t n0 = 0; n0 < N; n0 += 16)
        for (int64_t m0 = 0; m0 < M; m0 += 4)
            block_4x16(Ap, Bp, kp, np, m0, M - m0 < 4 ? M - m0 : 4, n0, N - n0 < 16 ? N - n0 : 16, C, ldc);
}

/* AVX2 without VNNI, activations all in 0..127 (NITI's after ReLU, and pixels): vpmaddubsw multiplies
 * u8 patch bytes by s8 weight bytes into int16 pair sums, |.| <= 2 * 127 * 128 = 32512 < 2**15, so
 * nothing saturates; vpmaddwd by ones adds the pairs into int32. 32 multiply-adds in 3 instructions
 * (4 on int16 pairs), from byte quads half the size of the pairs. */
static void block_4x16_u8(const int8_t *Aq, const int32_t *Bq, int64_t kq, int64_t np, int64_t m0, int64_t rows,
                          int64_t n0, int64_t cols, int32_t *C, int64_t ldc) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i acc[4][2];
    const int8_t *a[4];
    for (int r = 0; r < 4; r++) {
        acc[r][0] = acc[r][1] = _mm256_setzero_si256();
        a[r] = Aq + (m0 + (r < rows ? r : 0)) * 4 * kq;
    }
    for (int64_t q = 0; q < kq; q++) {
        const int32_t *b = Bq + q * np + n0;
        __m256i b0 = _mm256_loadu_si256((const __m256i *)b), b1 = _mm256_loadu_si256((const __m256i *)(b + 8));
        for (int r = 0; r < 4; r++) {
            int32_t quad;
            memcpy(&quad, a[r] + 4 * q, 4);
            __m256i av = _mm256_set1_epi32(quad);
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(_mm256_maddubs_epi16(b0, av), ones));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(_mm256_maddubs_epi16(b1, av), ones));
        }
    }
    for (int r = 0; r < rows; r++) store_row(C + (m0 + r) * ldc + n0, acc[r][0], acc[r][1], cols);
}

static void gemm_quads_u8(int64_t M, int64_t N, int64_t K, const int8_t *Aq, const int32_t *Bq, int32_t *C, int64_t ldc) {
    int64_t kq = quads(K), np = padded16(N);
    for (int64_t n0 = 0; n0 < N; n0 += 16)
        for (int64_t m0 = 0; m0 < M; m0 += 4)
            block_4x16_u8(Aq, Bq, kq, np, m0, M - m0 < 4 ? M - m0 : 4, n0, N - n0 < 16 ? N - n0 : 16, C, ldc);
}

/* The pair layouts are the larger ones: the quad operands of the u8 path fit in the same workspace. */
static int64_t a_bytes(int64_t M, int64_t K) { return align64(M * pairs(K) * 4); }
static int64_t b_bytes(int64_t N, int64_t K) { return align64(pairs(K) * padded16(N) * 4); }
static int64_t gemm_bytes(int64_t M, int64_t N, int64_t K) { return a_bytes(M, K) + b_bytes(N, K); }

static void gemm_nt(int64_t M, int64_t N, int64_t K, const int8_t *A, int64_t lda, const int8_t *B, int64_t ldb,
                    int32_t *C, int64_t ldc, void *work) {
    int32_t *Ap = (int32_t *)work, *Bp = (int32_t *)((char *)work + a_bytes(M, K));
    pack_a_pairs(M, K, A, lda, Ap);
    pack_b_pairs(N, K, B, ldb, Bp);
    gemm_packed(M, N, K, Ap, Bp, C, ldc);
}
