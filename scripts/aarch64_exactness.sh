#!/usr/bin/env bash
# Cross-compile the native int8 kernels for aarch64 with dot-product instructions and run their
# exactness driver under qemu (no ARM machine needed); then the FP32 direction kernel's digests. Needs Debian's cross compiler and qemu:
#   apt-get install -y gcc-aarch64-linux-gnu qemu-user
# Usage: scripts/aarch64_exactness.sh [-march flags]   (default: -march=armv8.2-a+dotprod)
# Prints the number of sdot instructions in the kernels and the driver's verdict; exits non-zero
# on a mismatch (or a missing tool).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
src="$here/elasticzo/int8/kernels"
march="${1:--march=armv8.2-a+dotprod}"
cc="${AARCH64_CC:-aarch64-linux-gnu-gcc}"
qemu="${QEMU_AARCH64:-qemu-aarch64}"
for tool in "$cc" "$qemu"; do
  command -v "$tool" >/dev/null || { echo "missing $tool: apt-get install -y gcc-aarch64-linux-gnu qemu-user" >&2; exit 2; }
done
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
"$cc" -O3 $march -std=c11 -Wall -Wextra -c "$src/ezo_int8.c" -o "$out/kernels.o"
echo "aarch64 ($march): $(aarch64-linux-gnu-objdump -d "$out/kernels.o" | grep -cw sdot) sdot instructions in ezo_int8.o"
"$cc" -O3 $march -static -Wall "$src/exactness.c" -o "$out/exactness"
"$qemu" -cpu max "$out/exactness"
# The FP32 direction kernel (elasticzo/zo/kernels): its digests under qemu must equal a host build's
# (tests/test_counter.py proves the host build equal to the portable PyTorch twin).
zo="$here/elasticzo/zo/kernels"
"$cc" -O3 $march -static -std=c11 -ffp-contract=off -Wall "$zo/noise_digest.c" -o "$out/noise_digest"
"${HOST_CC:-cc}" -O3 -std=c11 -ffp-contract=off "$zo/noise_digest.c" -o "$out/noise_digest_host"
if diff <("$qemu" -cpu max "$out/noise_digest") <("$out/noise_digest_host") >/dev/null; then
  echo "direction kernel: 256 of 256 digests equal the host build's"
else
  echo "direction kernel: digests differ from the host build's" >&2; exit 1
fi
