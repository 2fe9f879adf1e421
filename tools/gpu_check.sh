#!/bin/sh
# tools/gpu_check.py from the repository root of a plain checkout (no install): PYTHONPATH=., unbuffered.
#   tools/gpu_check.sh --nanogpt baselines/nanoGPT [--learning | --dry-run]     (outputs in $OUT, default ./gpu_check_out)
cd "$(dirname "$0")/.." || exit 1
PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 exec python tools/gpu_check.py "$@"
