/* Byte quads: the operand layout of the 4-term dot products (AVX512-VNNI's vpdpbusd, and AVX2's
 * vpmaddubsw + vpmaddwd where the activations are non-negative). Included by ezo_int8.c on x86-64
 * with AVX2.
 *
 * A (s8) rows are read as quads (A[m][4q], .., A[m][4q+3]), zero-padded past K; B is packed as
 * Bq[q][n] = (B[n][4q], .., B[n][4q+3]) ^ flip, np = N rounded up to 16 words per panel row.
 */

static int64_t quads(int64_t K) { return (K + 3) / 4; }
static int64_t padded16(int64_t N) { return (N + 15) / 16 * 16; }

/* Aq[m] = A's row m zero-padded to 4 kq bytes. */
static void pack_a_quads(int64_t M, int64_t K, const int8_t *A, int64_t lda, int8_t *Aq) {
    int64_t row = 4 * quads(K);
    for (int64_t m = 0; m < M; m++) {
        memcpy(Aq + m * row, A + m * lda, (size_t)K);
        memset(Aq + m * row + K, 0, (size_t)(row - K));
    }
}

/* dst[n] = (r0[n], r1[n], r2[n], r3[n]) ^ flip as byte quads, n < len (len >= 8): 16 at a time, then 8
 * at a time with the last 8 overlapping instead of a scalar tail. Reads only r[t][0 .. len). */
static void interleave4_row(const int8_t *const r[4], int32_t *dst, int64_t len, uint8_t flip_byte) {
    const __m128i flip = _mm_set1_epi8((char)flip_byte);
    int64_t o = 0;
    for (; o + 16 <= len; o += 16) {
        __m128i a = _mm_loadu_si128((const __m128i *)(r[0] + o)), b = _mm_loadu_si128((const __m128i *)(r[1] + o));
        __m128i c = _mm_loadu_si128((const __m128i *)(r[2] + o)), d = _mm_loadu_si128((const __m128i *)(r[3] + o));
        __m128i ab0 = _mm_unpacklo_epi8(a, b), ab1 = _mm_unpackhi_epi8(a, b);
        __m128i cd0 = _mm_unpacklo_epi8(c, d), cd1 = _mm_unpackhi_epi8(c, d);
        _mm_storeu_si128((__m128i *)(dst + o), _mm_xor_si128(_mm_unpacklo_epi16(ab0, cd0), flip));
        _mm_storeu_si128((__m128i *)(dst + o + 4), _mm_xor_si128(_mm_unpackhi_epi16(ab0, cd0), flip));
        _mm_storeu_si128((__m128i *)(dst + o + 8), _mm_xor_si128(_mm_unpacklo_epi16(ab1, cd1), flip));
        _mm_storeu_si128((__m128i *)(dst + o + 12), _mm_xor_si128(_mm_unpackhi_epi16(ab1, cd1), flip));
    }
    for (; o < len; o += 8) {
        if (o + 8 > len) o = len - 8;
        __m128i ab = _mm_unpacklo_epi8(_mm_loadl_epi64((const __m128i *)(r[0] + o)), _mm_loadl_epi64((const __m128i *)(r[1] + o)));
        __m128i cd = _mm_unpacklo_epi8(_mm_loadl_epi64((const __m128i *)(r[2] + o)), _mm_loadl_epi64((const __m128i *)(r[3] + o)));
        _mm_storeu_si128((__m128i *)(dst + o), _mm_xor_si128(_mm_unpacklo_epi16(ab, cd), flip));
        _mm_storeu_si128((__m128i *)(dst + o + 4), _mm_xor_si128(_mm_unpackhi_epi16(ab, cd), flip));
    }
}

/* Bq of one image's patches from its padded image xp: word (q, n) = patch entries 4q .. 4q+3 of pixel n,
 * each xor-ed with flip (0x80: + 128). Entries past K read entry 0 (any byte: A is zero there). */
static void pack_patches_quads(const ezo_conv_shape *s, const int8_t *xp, int32_t *Bq, uint8_t flip) {
    int64_t kq = quads(s->K), np = padded16(s->N), step = s->sh * (s->W + 2 * s->pw);
    patch_cursor e = {0, 0, 0};
    for (int64_t q = 0; q < kq; q++) {
        const int8_t *r[4];
        int32_t *dst = Bq + q * np;
        for (int t = 0; t < 4; t++) r[t] = 4 * q + t < s->K ? next_patch_row(s, xp, &e) : xp;
        for (int64_t oh = 0; oh < s->OH; oh++, dst += s->OW) {
            if (s->sw == 1 && s->OW >= 8)
                interleave4_row(r, dst, s->OW, flip);
            else
                for (int64_t ow = 0; ow < s->OW; ow++) {
                    uint8_t quad[4];
                    for (int t = 0; t < 4; t++) quad[t] = (uint8_t)r[t][ow * s->sw] ^ flip;
                    memcpy(dst + ow, quad, 4);
                }
            for (int t = 0; t < 4; t++) r[t] += step;
        }
        memset(Bq + q * np + s->N, 0, (size_t)(np - s->N) * sizeof(int32_t));
    }
}
