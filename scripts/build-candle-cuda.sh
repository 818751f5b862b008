#!/usr/bin/env bash
# Build qlora-candle with its `cuda` feature (candle's CUDA backend + ours) against the CUDA 13.0
# toolkit's pip wheels, without a system CUDA install and without a GPU.
#
#   bash scripts/build-candle-cuda.sh [cargo subcommand and args…]
#       default: build -p qlora-candle --features cuda --tests
#   e.g. bash scripts/build-candle-cuda.sh test -p qlora-candle --features cuda --test cuda
#
# Every cargo command gets the same environment (PATH with nvcc, CUDA_ROOT/CUDA_PATH/CUDA_HOME,
# CUDA_COMPUTE_CAP, LIBRARY_PATH and LD_LIBRARY_PATH with the wheels' libraries), so that the
# build scripts of candle-kernels and cudarc see the same toolkit each time (a change reruns
# them).
#
# CUDA_VENV (default /work/cuda13) is a Python venv, created and filled with the wheels when
# missing (about 1.5 GB with cuBLAS). CUDA_COMPUTE_CAP (default 90, the H200) is the architecture candle's
# kernels are compiled for.
set -euo pipefail
venv="${CUDA_VENV:-/work/cuda13}"
if [[ ! -x "$venv/bin/pip" ]]; then
    python3 -m venv "$venv"
fi
root="$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)"
if [[ ! -x "$root/bin/nvcc" || ! -d "$root/include/thrust" ]]; then
    "$venv/bin/pip" install -q "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" \
        "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-nvvm==13.0.*"
    root="$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)"
fi
if [[ ! -e "$root/lib/libcublas.so.13" || ! -e "$root/lib/libcurand.so.10" \
    || ! -e "$root/lib/libnvrtc.so.13" ]]; then
    # cudarc's `dynamic-linking` (candle's choice) links cuBLAS(Lt), cuRAND and NVRTC.
    "$venv/bin/pip" install -q "nvidia-cuda-nvrtc==13.0.*" "nvidia-cublas==13.0.*" \
        "nvidia-curand==10.4.0.*"
fi
# The wheels ship versioned libraries only; the linker looks for the unversioned names.
for lib in cudart.so.13 nvrtc.so.13 cublas.so.13 cublasLt.so.13 curand.so.10; do
    [[ -e "$root/lib/lib${lib%.so.*}.so" ]] || ln -s "lib$lib" "$root/lib/lib${lib%.so.*}.so"
done
# libcuda belongs to the driver, not to any wheel: link against a stub (what the toolkit's
# lib/stubs/libcuda.so is), soname libcuda.so.1, so the binaries load the driver's library at
# run time. Every entry point of cudarc's driver bindings returns CUDA_ERROR_NO_DEVICE (100).
# Never put lib/stubs on LD_LIBRARY_PATH of a GPU machine.
stub="$root/lib/stubs/libcuda.so"
if [[ ! -e "$stub" ]]; then
    mkdir -p "$root/lib/stubs"
    sys_rs="$(cargo metadata --format-version 1 --manifest-path "$(dirname "$0")/../Cargo.toml" \
        | python3 -c 'import json,sys; m=json.load(sys.stdin); print(next(p["manifest_path"] for p in m["packages"] if p["name"]=="cudarc"))' \
        | xargs dirname)/src/driver/sys/mod.rs"
    grep -oE "fn cu[A-Za-z0-9_]+\(" "$sys_rs" | sort -u | sed -E 's/fn (cu[A-Za-z0-9_]+)\(/int \1(void) { return 100; }/' \
        > "$root/lib/stubs/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$root/lib/stubs/libcuda_stub.c"
fi
export PATH="$root/bin:$PATH"
export NVCC="$root/bin/nvcc"
export CUDA_ROOT="$root" CUDA_PATH="$root" CUDA_HOME="$root"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
# The linker finds the stub through LIBRARY_PATH too (cudarc's build script lists only the
# library folders that existed when it first ran).
export LIBRARY_PATH="$root/lib:$root/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
export LD_LIBRARY_PATH="$root/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
cd "$(dirname "$0")/.."
if [[ $# -eq 0 ]]; then
    set -- build -p qlora-candle --features cuda --tests
fi
exec cargo "$@"
