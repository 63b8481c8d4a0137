#!/usr/bin/env bash
# Installs Strata into the active Python environment.
#   scripts/setup.sh          runtime only
#   scripts/setup.sh --test   plus test tools and DeepSpeed (for the quantizer cross-check)
set -euo pipefail
cd "$(dirname "$0")/.."
# CPU torch: the pinned release that this machine type keeps on local disk; a plain
# `torch` would download a CUDA build of several GB.
python -m pip install -q "torch==2.13.0"
if [[ "${1:-}" != "--test" ]]; then
  python -m pip install -q -e .
else
  python -m pip install -q -e ".[test]"
  # DeepSpeed builds no ops here (CPU); without build isolation it uses the torch above.
  DS_BUILD_OPS=0 DS_SKIP_CUDA_CHECK=1 python -m pip install -q --no-build-isolation "deepspeed==0.19.8"
fi
