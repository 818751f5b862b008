#!/usr/bin/env bash
# One command for a GPU machine: build the CUDA paths, run every GPU test with
# QLORA_REQUIRE_GPU=1 (a missing driver, device or NVRTC fails instead of skipping), run them
# again under compute-sanitizer (memcheck, leak check), then print
# the bandwidth table (quantize, dequantize with and without double quantization, 8-bit AdamW)
# next to a device-to-device copy measured in the same run.
#
# Then qlora-candle's CUDA side (`--features cuda`): its GPU tests (CUDA layers and optimizers ==
# CPU ones) and its benchmark (crates/candle/examples/cuda_bench.rs: the issue #14 targets). That
# build compiles candle's own kernels with nvcc: with the machine's toolkit when nvcc is found
# (PATH or $CUDA_HOME), else through scripts/build-candle-cuda.sh when the CUDA 13.0 pip wheels
# are already installed in $CUDA_VENV (default /work/cuda13); with neither, the phase is skipped
# with a note. A first build of candle's kernels takes minutes.
#
#   scripts/gpu-check.sh            # whole check, sized to finish well inside 8 minutes on an H200
#                                   # (plus the qlora-candle CUDA build when not cached)
#   QLORA_BENCH_ELEMS=67108864 scripts/gpu-check.sh   # smaller benchmark tensors
#   QLORA_CANDLE_CUDA=0 scripts/gpu-check.sh          # without the qlora-candle CUDA phases
#   QLORA_CANDLE_BENCH_ARGS=--quick scripts/gpu-check.sh  # the candle benchmark's smoke shapes
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

# qlora-candle --features cuda: candle's CUDA backend needs nvcc at build time.
if [[ "${QLORA_CANDLE_CUDA:-1}" != "0" ]]; then
    cap="$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 |
        tr -d '. ' || true)"
    export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-${cap:-90}}"
    nvcc_bin="$(command -v nvcc || true)"
    [[ -z "$nvcc_bin" && -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]] &&
        nvcc_bin="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
    candle_cargo=()
    if [[ -n "$nvcc_bin" ]]; then
        toolkit="$(cd "$(dirname "$nvcc_bin")/.." && pwd)"
        export PATH="$toolkit/bin:$PATH" CUDA_HOME="$toolkit" CUDA_ROOT="$toolkit"
        export CUDA_PATH="$toolkit"
        # cuBLAS, cuRAND and NVRTC are link-time dependencies of this build (cudarc's
        # `dynamic-linking`, candle's choice): the linker and the loader must find them.
        export LIBRARY_PATH="$toolkit/lib64:$toolkit/lib${LIBRARY_PATH:+:$LIBRARY_PATH}"
        export LD_LIBRARY_PATH="$toolkit/lib64:$toolkit/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        candle_cargo=(cargo)
        phase "qlora-candle CUDA: system toolkit $toolkit, compute capability $CUDA_COMPUTE_CAP"
    elif compgen -G "${CUDA_VENV:-/work/cuda13}/lib/python3*/site-packages/nvidia/cu13/bin/nvcc" \
        >/dev/null; then
        candle_cargo=(bash scripts/build-candle-cuda.sh)
        phase "qlora-candle CUDA: pip-wheel toolkit (scripts/build-candle-cuda.sh)"
    fi
    if [[ ${#candle_cargo[@]} -gt 0 ]]; then
        phase "qlora-candle --features cuda: build (release: tests, cuda_bench)"
        "${candle_cargo[@]}" build --release -p qlora-candle --features cuda --tests \
            --example cuda_bench
        phase "qlora-candle CUDA layers and optimizers == CPU"
        "${candle_cargo[@]}" test --release -p qlora-candle --features cuda --test cuda
        phase "qlora-candle CUDA benchmark (issue #14 targets)"
        # shellcheck disable=SC2086
        "${candle_cargo[@]}" run --release -p qlora-candle --features cuda --example cuda_bench \
            -- ${QLORA_CANDLE_BENCH_ARGS:-}
    else
        phase "no CUDA toolkit (nvcc, or the wheels in \$CUDA_VENV): qlora-candle's CUDA side" \
            "not built or tested"
    fi
fi

phase "done"
