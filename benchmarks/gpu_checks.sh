#!/usr/bin/env bash
# Every GPU check in one command, for a borrowed GPU machine without a network (benchmarks/gpu_checks.py
# says what each step does and what lands in $OUT). Results: $OUT/summary.json (every step ok, failed
# with its error, or not run with the reason), $OUT/log.txt, one JSON file per measurement.
#
# Prepare here, once per change of code or dependencies (fills .whl/, prints the carried size, < 64 MiB):
#   python benchmarks/gpu_prepare.py
# Run there (the device tool: carry [".whl"], timeout_s 540; the steps fit 480 s by construction):
#   bash benchmarks/gpu_checks.sh
# Dry run here (fresh venv of the GPU machine's software with CPU torch; CUDA steps `not run: no CUDA`):
#   . .venv/bin/activate && bash benchmarks/gpu_checks.sh --dry-run
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_checks.py "$@"
