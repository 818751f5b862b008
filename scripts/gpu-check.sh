#!/usr/bin/env bash
# One command for a GPU machine: build the CUDA paths, run every GPU test with
# QLORA_REQUIRE_GPU=1 (a missing driver, device or NVRTC fails instead of skipping), run them
# again under compute-sanitizer (memcheck, leak check), then print
# the bandwidth table (quantize, dequantize with and without double quantization, 8-bit AdamW)
# next to a device-to-device copy measured in the same run.
#
#   scripts/gpu-check.sh            # whole check, sized to finish well inside 8 minutes on an H200
#   QLORA_BENCH_ELEMS=67108864 scripts/gpu-check.sh   # smaller benchmark tensors
#
# Uses the machine's own NVRTC (the CUDA toolkit's, matching its driver); it never points
# LD_LIBRARY_PATH at the pip wheel that scripts/install-nvrtc.sh provides for GPU-less machines.
set -euo pipefail
cd "$(dirname "$0")/.."

export QLORA_REQUIRE_GPU=1
export QLORA_REQUIRE_NVRTC=1
start=$(date +%s)
phase() { echo "== [$(( $(date +%s) - start ))s] $*"; }

# Find the toolkit's libnvrtc when the dynamic loader does not already know it.
if ! ldconfig -p 2>/dev/null | grep -q 'libnvrtc\.so'; then
    for dir in "${CUDA_HOME:-/usr/local/cuda}/lib64" /usr/local/cuda/lib64 \
        /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda/targets/sbsa-linux/lib \
        /usr/lib/x86_64-linux-gnu /usr/lib64; do
        if compgen -G "$dir/libnvrtc.so*" >/dev/null; then
            export LD_LIBRARY_PATH="$dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
            break
        fi
    done
fi

phase "devices"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

phase "build (release, --features cuda)"
cargo build --release -p qlora-cuda -p qlora-paged-alloc --features cuda --tests --examples

phase "NVRTC compile of every kernel (sm_90)"
cargo test --release -p qlora-cuda --features cuda --test nvrtc

phase "GPU kernels == CPU oracles"
cargo test --release -p qlora-cuda --features cuda --test gpu --test paged

phase "CUDA managed-memory pool"
cargo test --release -p qlora-paged-alloc --features cuda --test cuda_backend

# The GPU tests again under compute-sanitizer's memcheck (out-of-bounds and misaligned device
# accesses, leaks): the test binaries cargo just built, run directly so that the sanitizer sees
# only the test process. Skipped with a note where the toolkit has no compute-sanitizer.
sanitizer="$(command -v compute-sanitizer || true)"
[[ -z "$sanitizer" && -x "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" ]] &&
    sanitizer="${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer"
if [[ -n "$sanitizer" ]]; then
    for t in gpu paged; do
        phase "compute-sanitizer memcheck: qlora-cuda --test $t"
        bin="$(cargo test --release -p qlora-cuda --features cuda --test "$t" --no-run \
            --message-format=json 2>/dev/null |
            sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)"
        "$sanitizer" --tool memcheck --leak-check full --error-exitcode 1 "$bin" --test-threads=1
    done
    phase "compute-sanitizer memcheck: qlora-paged-alloc --test cuda_backend"
    bin="$(cargo test --release -p qlora-paged-alloc --features cuda --test cuda_backend \
        --no-run --message-format=json 2>/dev/null |
        sed -n 's/.*"executable":"\([^"]*\)".*/\1/p' | tail -n 1)"
    "$sanitizer" --tool memcheck --leak-check full --error-exitcode 1 "$bin" --test-threads=1
else
    phase "compute-sanitizer not found: memcheck runs skipped"
fi

phase "bandwidth"
cargo run --release -p qlora-cuda --features cuda --example bandwidth

phase "done"
