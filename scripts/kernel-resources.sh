#!/usr/bin/env bash
# Offline kernel inspection, no GPU needed: compiles every kernel in cuda/ for one architecture
# with ptxas (from the CUDA 13.0 toolkit's pip wheels, installed into a virtual environment outside
# the repository) and prints registers, spills, stack frame and shared memory per entry point.
# A stack frame with no spills means a per-thread array that lives in local memory (SASS=1
# counts the LDL/STL instructions that touch it).
#
#   scripts/kernel-resources.sh            # sm_90 (H100/H200)
#   scripts/kernel-resources.sh sm_80      # another architecture
#   SASS=1 scripts/kernel-resources.sh     # also write the SASS of each file to target/sass/
#
# The flags are the NVRTC options of `qlora_cuda::kernels::NVRTC_OPTIONS`; override the
# environment's location with QLORA_CUDATK_VENV.
set -euo pipefail
cd "$(dirname "$0")/.."
arch="${1:-sm_90}"
venv="${QLORA_CUDATK_VENV:-${HOME}/.cache/qlora-cudatk-13.0}"
if [[ ! -x "$venv/bin/python" ]]; then python3 -m venv "$venv" >&2; fi
tk="$(find "$venv" -path '*nvidia/cu13/bin/nvcc' -printf '%h\n' 2>/dev/null | head -n 1 | xargs -r dirname)"
if [[ -z "$tk" ]]; then
    # Pin every piece to 13.0: a newer nvvm emits PTX that the 13.0 ptxas rejects.
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" "nvidia-cuda-crt==13.0.*" \
        "nvidia-cuda-runtime==13.0.*" nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm >&2
    tk="$(find "$venv" -path '*nvidia/cu13/bin/nvcc' -printf '%h\n' | head -n 1 | xargs dirname)"
fi
export PATH="$tk/bin:$PATH"
flags=(--fmad=false --prec-div=true --prec-sqrt=true --ftz=false)
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
printf '%-28s %5s %7s %7s %6s\n' kernel regs stack spill smem
for f in cuda/*.cu; do
    name="$(basename "$f" .cu)"
    nvcc -arch="$arch" "${flags[@]}" -cubin -o "$out/$name.cubin" -Xptxas -v -Icuda "$f" 2>&1 |
        awk '
            /Compiling entry function/ { match($0, /'\''[^'\'']+'\''/); k = substr($0, RSTART + 1, RLENGTH - 2) }
            /bytes stack frame/ { stack = $1; spill = $5 + $9 }
            /Used [0-9]+ registers/ {
                regs = $5; smem = 0
                if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH) + 0
                printf "%-28s %5d %7d %7d %6d\n", k, regs, stack, spill, smem
            }'
    if [[ "${SASS:-0}" == 1 ]]; then
        mkdir -p target/sass
        "$tk/bin/cuobjdump" -sass "$out/$name.cubin" > "target/sass/$name.$arch.sass" 2>/dev/null ||
            echo "cuobjdump failed; SASS skipped for $name" >&2
        printf '%-28s local loads/stores in SASS: %s\n' "$name.cu" \
            "$(grep -cE '\b(LDL|STL)\b' "target/sass/$name.$arch.sass" || true)"
    fi
done
