#!/usr/bin/env bash
# The feature set CI builds, tests, lints and documents: every feature of every workspace crate
# except `qlora-candle/cuda`, whose candle CUDA backend compiles candle's kernels with nvcc at
# build time (CI has no CUDA toolkit; see crates/candle/README.md for that build), and the
# `dynamic-linking` features of qlora-cuda and qlora-paged-alloc that it turns on (cudarc then
# links libcuda / libnvrtc / cuBLAS at build time). qlora-cuda's own `cuda` feature stays in: it
# loads the driver and NVRTC at run time and builds anywhere.
# Printed comma-separated for `cargo … --features "$(bash scripts/features.sh)"`. When a crate
# gains a feature, add it here (`cargo metadata --no-deps` lists them).
features=(
    qlora-double-quant/testing
    qlora-codec/testing
    qlora-lora/testing
    qlora-paged-alloc/cuda
    qlora-optim/cuda
    qlora-cuda/cuda
    qlora-cuda/regenerate-bindings
    qlora-nf4/atomic-write
    qlora-nf4/codec
    qlora-nf4/double-quant
    qlora-nf4/checkpoint
    qlora-nf4/lora
    qlora-nf4/optim
    qlora-nf4/paged-alloc
    qlora-nf4/cuda
    qlora-nf4/candle
    qlora-nf4/testing
)
(IFS=,; echo "${features[*]}")
