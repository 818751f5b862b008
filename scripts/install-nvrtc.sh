#!/usr/bin/env bash
# Installs NVRTC (the CUDA run-time compiler, no driver or GPU needed) from the
# `nvidia-cuda-nvrtc` Python wheel into a virtual environment outside the repository, and prints
# the directory holding libnvrtc.so.* on stdout (everything else goes to stderr). Idempotent.
#
#   export LD_LIBRARY_PATH="$(scripts/install-nvrtc.sh):${LD_LIBRARY_PATH:-}"
#   QLORA_REQUIRE_NVRTC=1 cargo test -p qlora-cuda --features cuda nvrtc
#
# Override the location with QLORA_NVRTC_VENV. Not for GPU machines: there, use the toolkit's
# own NVRTC so it matches the driver.
set -euo pipefail

venv="${QLORA_NVRTC_VENV:-${HOME}/.cache/qlora-nvrtc}"
python="${PYTHON:-python3}"

find_lib_dir() {
    find "$venv" -name 'libnvrtc.so.[0-9]*' ! -name '*builtins*' -printf '%h\n' 2>/dev/null | sort -u | head -n 1
}

dir="$(find_lib_dir || true)"
if [[ -z "$dir" ]]; then
    if [[ ! -x "$venv/bin/python" ]]; then
        "$python" -m venv "$venv" >&2
    fi
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check nvidia-cuda-nvrtc >&2
    dir="$(find_lib_dir || true)"
fi
if [[ -z "$dir" ]]; then
    echo "install-nvrtc.sh: libnvrtc.so not found under $venv after installing nvidia-cuda-nvrtc" >&2
    exit 1
fi
echo "$dir"
