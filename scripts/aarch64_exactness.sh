#!/usr/bin/env bash
# Cross-compile the native int8 kernels for aarch64 with dot-product instructions and run their
# exactness driver under qemu (no ARM machine needed). Needs Debian's cross compiler and qemu:
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
