//! Device-free compile check: every kernel source compiles with NVRTC for sm_90 and defines every
//! entry point the launchers look up. Needs only libnvrtc (`scripts/install-nvrtc.sh` installs
//! it from the `nvidia-cuda-nvrtc` wheel). Skips with a message when NVRTC cannot be loaded;
//! fails instead when `QLORA_REQUIRE_NVRTC=1`.
#![cfg(feature = "cuda")]

use qlora_cuda::{compile_program, nvrtc_available, CudaError, Program};

fn nvrtc_or_skip() -> bool {
    if nvrtc_available() {
        return true;
    }
    if std::env::var("QLORA_REQUIRE_NVRTC").as_deref() == Ok("1") {
        panic!("QLORA_REQUIRE_NVRTC=1 but libnvrtc could not be loaded (LD_LIBRARY_PATH?)");
    }
    eprintln!("skipping NVRTC compile test: libnvrtc not found (run scripts/install-nvrtc.sh)");
    false
}

#[test]
fn nvrtc_compiles_every_kernel_for_sm_90() {
    if !nvrtc_or_skip() {
        return;
    }
    for program in Program::ALL {
        let ptx = compile_program(program, "sm_90")
            .unwrap_or_else(|e| panic!("{} failed to compile: {e}", program.file_name()));
        let text = ptx.to_src();
        assert!(
            text.contains(".target sm_90"),
            "{}: wrong target",
            program.file_name()
        );
        for kernel in program.kernels() {
            assert!(
                text.contains(&format!(".entry {kernel}(")),
                "{}: entry point {kernel} missing from the PTX",
                program.file_name()
            );
        }
        // No fast-math approximations may sneak in: no approximate division/sqrt, and the
        // approximate reciprocal and flush-to-zero only where the kernels reproduce
        // bitsandbytes' --use_fast_math build on purpose (the 4-bit and 8-bit blockwise
        // quantize/dequantize paths: `rcp.approx.ftz.f32`, `mul.rn.ftz.f32`, `abs.ftz.f32`).
        let name = program.file_name();
        for forbidden in ["div.approx", "div.full", "sqrt.approx"] {
            assert!(
                !text.contains(forbidden),
                "{name}: PTX contains {forbidden}"
            );
        }
        let fast_math_allowed = [
            "quantize_4bit.cu",
            "blockwise_8bit.cu",
            "dequantize_4bit.cu",
            "gemv_4bit.cu",
        ]
        .contains(&name);
        for line in text
            .lines()
            .filter(|l| l.contains(".ftz.") || l.contains("rcp."))
        {
            let instr = line.split_whitespace().next().unwrap_or("");
            let allowed = match instr {
                "rcp.approx.ftz.f32" => name == "quantize_4bit.cu" || name == "blockwise_8bit.cu",
                "mul.rn.ftz.f32" | "abs.ftz.f32" => fast_math_allowed,
                _ => false,
            };
            assert!(allowed, "{name}: unexpected fast-math PTX: {}", line.trim());
        }
        if name == "quantize_4bit.cu" || name == "blockwise_8bit.cu" {
            assert!(
                text.contains("rcp.approx.ftz.f32"),
                "{name}: bitsandbytes' reciprocal missing"
            );
        }
    }
}

#[test]
fn nvrtc_reports_its_log_on_error() {
    if !nvrtc_or_skip() {
        return;
    }
    match compile_program(Program::Quantize4bit, "sm_9x") {
        Err(CudaError::InvalidArgument { .. }) => {}
        other => panic!("expected InvalidArgument for a malformed arch, got {other:?}"),
    }
    // An architecture NVRTC does not know: the error carries NVRTC's own log.
    match compile_program(Program::Quantize4bit, "sm_1") {
        Err(CudaError::Compile { program, arch, log }) => {
            assert_eq!(program, "quantize_4bit.cu");
            assert_eq!(arch, "sm_1");
            assert!(!log.is_empty());
        }
        other => panic!("expected a Compile error, got {other:?}"),
    }
}
