#!/usr/bin/env bash
# The whole test suite: every crate's unit, integration, property and doc tests, plus the NVRTC
# compile test of the CUDA kernels when NVRTC can be loaded (see scripts/install-nvrtc.sh; with
# QLORA_REQUIRE_NVRTC=1 a missing NVRTC fails instead of skipping). GPU tests skip without a GPU
# (QLORA_REQUIRE_GPU=1 makes them fail instead).
set -euo pipefail
cd "$(dirname "$0")/.."
# Every feature but candle's CUDA backend (which needs nvcc to build): see scripts/features.sh.
cargo test --workspace --features "$(bash scripts/features.sh)" "$@"
