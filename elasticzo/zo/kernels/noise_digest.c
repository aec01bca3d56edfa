/* Digests of ezo_noise_axpy on fixed cases, one line each: "kind key offset n a digest".
 * tests/test_counter.py checks them against the portable twin; scripts/aarch64_exactness.sh
 * runs this file cross-compiled under qemu and diffs its lines with a host build's. No torch.
 * The last offset ends the 515-entry case at 2^32, the top counter. x[j] = (float)(j % 97) * 0.01f - 0.5f; digest = FNV-1a 64 over the bytes of y (little-endian). */
#include <inttypes.h>
#include <stdio.h>
#include <string.h>

#include "ezo_noise.c"

static uint64_t fnv1a(const float *y, int64_t n) {
    uint64_t h = 0xCBF29CE484222325ull;
    for (int64_t j = 0; j < n; j++) {
        uint32_t bits;
        memcpy(&bits, &y[j], sizeof bits);
        for (int b = 0; b < 4; b++) h = (h ^ ((bits >> (8 * b)) & 255u)) * 0x100000001B3ull;
    }
    return h;
}

int main(void) {
    static const uint64_t keys[] = {0, 0x7FFFFFFFFFFFFFFFull, 0x123456789ABCDEF0ull, 42};
    static const int64_t offsets[] = {0, 1, 37, 4294966781ll}, sizes[] = {0, 1, 100, 515};
    static const float scales[] = {1e-3f, -0.37f};
    static float x[515], y[515];
    for (int j = 0; j < 515; j++) x[j] = (float)(j % 97) * 0.01f - 0.5f;
    for (int kind = 0; kind < 2; kind++)
        for (int k = 0; k < 4; k++)
            for (int o = 0; o < 4; o++)
                for (int s = 0; s < 4; s++)
                    for (int a = 0; a < 2; a++) {
                        ezo_noise_axpy(sizes[s], keys[k], offsets[o], kind, x, scales[a], y);
                        printf("%d %" PRIu64 " %" PRId64 " %" PRId64 " %.9g %016" PRIx64 "\n", kind, keys[k], offsets[o],
                               sizes[s], (double)scales[a], fnv1a(y, sizes[s]));
                    }
    return 0;
}
