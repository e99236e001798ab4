#!/usr/bin/env bash
# Thin wrapper around benchmarks/gpu_check.py: results go to $OUT (the device tool's output
# folder) when set, else bench_out/gpu_check; the console log is kept next to them.
#   bash benchmarks/gpu_check.sh --quick          # on a GPU machine, < 3 min
#   bash benchmarks/gpu_check.sh                  # full, < 8 min on one H200
#   bash benchmarks/gpu_check.sh --dry-run --quick --no-build   # no GPU: fake driver + CPU
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench_out/gpu_check}"
mkdir -p "$out"
python benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee "$out/gpu_check.log"
exit "${PIPESTATUS[0]}"
