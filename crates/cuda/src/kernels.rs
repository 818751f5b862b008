//! The kernel sources: one NVRTC program per file of the top-level `cuda/` folder, each made
//! self-contained by splicing in `qlora_kernels.h` and `common.cuh` where it includes them.

const HEADER: &str = include_str!("../cuda/qlora_kernels.h");
const COMMON: &str = include_str!("../cuda/common.cuh");

/// One kernel source file (one NVRTC program).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Program {
    /// `cuda/quantize_4bit.cu`: blockwise NF4/FP4 quantization.
    Quantize4bit,
    /// `cuda/dequantize_4bit.cu`: NF4/FP4 dequantization, plain or double-quantized scales.
    Dequantize4bit,
    /// `cuda/blockwise_8bit.cu`: 8-bit blockwise quantization with a dynamic map, and back.
    Blockwise8bit,
    /// `cuda/adam_8bit.cu`: fused Adam/AdamW step with blockwise 8-bit states.
    Adam8bit,
    /// `cuda/adam_32bit.cu`: Adam/AdamW step with f32 states.
    Adam32bit,
    /// `cuda/gemv_4bit.cu`: fused 4-bit dequantize + small-batch matrix-vector product.
    Gemv4bit,
}

impl Program {
    /// Every program, in a fixed order.
    pub const ALL: [Program; 6] = [
        Program::Quantize4bit,
        Program::Dequantize4bit,
        Program::Blockwise8bit,
        Program::Adam8bit,
        Program::Adam32bit,
        Program::Gemv4bit,
    ];

    /// The file name under `cuda/`.
    pub fn file_name(self) -> &'static str {
        match self {
            Program::Quantize4bit => "quantize_4bit.cu",
            Program::Dequantize4bit => "dequantize_4bit.cu",
            Program::Blockwise8bit => "blockwise_8bit.cu",
            Program::Adam8bit => "adam_8bit.cu",
            Program::Adam32bit => "adam_32bit.cu",
            Program::Gemv4bit => "gemv_4bit.cu",
        }
    }

    /// The file's text as written (launch contract comment first).
    pub fn raw_source(self) -> &'static str {
        match self {
            Program::Quantize4bit => include_str!("../cuda/quantize_4bit.cu"),
            Program::Dequantize4bit => include_str!("../cuda/dequantize_4bit.cu"),
            Program::Blockwise8bit => include_str!("../cuda/blockwise_8bit.cu"),
            Program::Adam8bit => include_str!("../cuda/adam_8bit.cu"),
            Program::Adam32bit => include_str!("../cuda/adam_32bit.cu"),
            Program::Gemv4bit => include_str!("../cuda/gemv_4bit.cu"),
        }
    }

    /// The self-contained source handed to NVRTC: the file with its two `#include "…"` lines
    /// replaced by the header and the common helpers (NVRTC then needs no include path).
    pub fn source(self) -> String {
        self.raw_source()
            .replace("#include \"qlora_kernels.h\"", HEADER)
            .replace("#include \"common.cuh\"", COMMON)
    }

    /// The `extern "C"` kernel entry points the program defines.
    pub fn kernels(self) -> &'static [&'static str] {
        match self {
            Program::Quantize4bit => &[
                "quantize_4bit_f32",
                "quantize_4bit_f16",
                "quantize_4bit_bf16",
            ],
            Program::Dequantize4bit => &[
                "dequantize_4bit_f32",
                "dequantize_4bit_f16",
                "dequantize_4bit_bf16",
            ],
            Program::Blockwise8bit => &[
                "quantize_8bit_f32",
                "quantize_8bit_f16",
                "quantize_8bit_bf16",
                "dequantize_8bit_f32",
                "dequantize_8bit_f16",
                "dequantize_8bit_bf16",
            ],
            Program::Adam8bit => &[
                "adam8bit_step_f32",
                "adam8bit_step_f16",
                "adam8bit_step_bf16",
            ],
            Program::Adam32bit => &[
                "adam32bit_step_f32",
                "adam32bit_step_f16",
                "adam32bit_step_bf16",
            ],
            Program::Gemv4bit => &["gemv_4bit_f32", "gemv_4bit_f16", "gemv_4bit_bf16"],
        }
    }
}

/// The shared header `cuda/qlora_kernels.h`, as compiled into the kernels.
pub fn header_source() -> &'static str {
    HEADER
}

/// NVRTC options used for every program besides the architecture: IEEE division, square root
/// and reciprocal, no flush to zero, no FMA contraction. Never fast math.
pub const NVRTC_OPTIONS: [&str; 4] = [
    "--fmad=false",
    "--prec-div=true",
    "--prec-sqrt=true",
    "--ftz=false",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_states_its_launch_contract_first() {
        for program in Program::ALL {
            let raw = program.raw_source();
            let opening = &raw[..raw.find("*/").expect("opening comment is closed")];
            assert!(raw.starts_with("/*"), "{}", program.file_name());
            assert!(
                opening.contains(program.file_name()),
                "{}",
                program.file_name()
            );
            assert!(
                opening.contains("Launch contract"),
                "{}",
                program.file_name()
            );
            assert!(opening.contains("grid"), "{}", program.file_name());
        }
    }

    #[test]
    fn spliced_sources_are_self_contained() {
        for program in Program::ALL {
            let src = program.source();
            assert!(
                !src.contains("#include"),
                "{} still includes a file",
                program.file_name()
            );
            assert!(src.contains("#define QLORA_KERNELS_H"));
            assert!(src.contains("#define QLORA_COMMON_CUH"));
            // Each entry point is defined: directly, or through the file's instantiation macro.
            for kernel in program.kernels() {
                let suffix = kernel.rsplit('_').next().unwrap();
                let prefix = &kernel[..kernel.len() - suffix.len() - 1];
                assert!(
                    src.contains(kernel) || src.contains(&format!("{prefix}_##SUFFIX")),
                    "{}: no definition of {kernel}",
                    program.file_name()
                );
            }
        }
    }

    #[test]
    fn no_fast_math_option() {
        let approximate = [
            "--use_fast_math",
            "--ftz=true",
            "--fmad=true",
            "--prec-div=false",
            "--prec-sqrt=false",
        ];
        for opt in NVRTC_OPTIONS {
            assert!(!approximate.contains(&opt), "{opt}");
        }
        assert!(NVRTC_OPTIONS.contains(&"--fmad=false"));
        assert!(NVRTC_OPTIONS.contains(&"--ftz=false"));
    }
}
