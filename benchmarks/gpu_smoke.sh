#!/usr/bin/env bash
# Usage: bash benchmarks/gpu_smoke.sh /path/to/stable-diffusion-v1-5 [extra options for gpu_smoke.py]
set -euo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 1 ] || { echo "usage: $0 SD_FOLDER [options]" >&2; exit 2; }
model="$1"; shift
.venv/bin/python benchmarks/gpu_smoke.py --model "$model" "$@"
