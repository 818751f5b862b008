#!/usr/bin/env bash
# Run every fuzz target of fuzz/ for a few seconds each (default 10; FUZZ_SECONDS overrides).
#
# With a nightly toolchain and cargo-fuzz installed, uses libFuzzer (`cargo +nightly fuzz run`);
# otherwise, or with FUZZ_STABLE=1, runs each target as a plain stable binary that mutates its
# seed inputs (`cargo run --release --bin <target> -- <iterations> <seconds>`). Either way a
# panic fails the script and leaves the input under fuzz/artifacts/<target>/.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds="${FUZZ_SECONDS:-10}"
targets=(safetensors_checkpoint model_file quant_state_json index_json config_json dequantize_bytes optim_state)

use_libfuzzer=0
if [[ "${FUZZ_STABLE:-0}" != 1 ]] && cargo fuzz --help >/dev/null 2>&1 \
    && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    use_libfuzzer=1
fi

if [[ $use_libfuzzer == 1 ]]; then
    for t in "${targets[@]}"; do
        echo "== $t (libFuzzer, ${seconds}s)"
        cargo +nightly fuzz run "$t" -- -max_total_time="$seconds" -rss_limit_mb=4096
    done
else
    cargo build --release --bins
    for t in "${targets[@]}"; do
        echo "== $t (stable smoke driver, ${seconds}s)"
        "target/release/$t" 100000000 "$seconds"
    done
fi
