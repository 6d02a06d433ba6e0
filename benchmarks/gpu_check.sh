#!/usr/bin/env bash
# The project's standing GPU check (docs/performance.md): one command, under 8 minutes on one GPU.
#   bash benchmarks/gpu_check.sh OUT_DIR            # on a CUDA machine: paper sizes, AMP, both bundles
#   bash benchmarks/gpu_check.sh --dry-run OUT_DIR  # CPU, tiny sizes: checks the script (CI runs this)
# Writes OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md and prints the table.
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 MPLBACKEND=Agg
exec python -m benchmarks.gpu_check "$@"
