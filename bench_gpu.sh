#!/usr/bin/env bash
# The GPU check on one GPU (gpu_check.py, described in docs/gpu.md): tests/test_cuda.py, then GPT-2 124M's step
# time, tokens/s, MFU and each variant's ratio and peak memory for every sink option and attention gate, then
# KV-cache generation; prints a summary and writes gpu_check.json.
#   bash bench_gpu.sh [--out=FILE.json] [--batch_size=N]
set -euo pipefail
cd "$(dirname "$0")"
exec python gpu_check.py "$@"
