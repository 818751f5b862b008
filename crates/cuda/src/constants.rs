//! The constants shared with the kernels, taken from `cuda/qlora_kernels.h` through the
//! bindgen-generated bindings (so Rust and CUDA cannot drift apart) and rounded to f32 exactly as
//! the kernels' `f`-suffixed literals are.

use crate::bindings as ffi;

/// The 16 NF4 values, by code (§1.1).
pub const NF4_CODEBOOK: [f32; 16] = [
    ffi::QLORA_NF4_CODE_0 as f32,
    ffi::QLORA_NF4_CODE_1 as f32,
    ffi::QLORA_NF4_CODE_2 as f32,
    ffi::QLORA_NF4_CODE_3 as f32,
    ffi::QLORA_NF4_CODE_4 as f32,
    ffi::QLORA_NF4_CODE_5 as f32,
    ffi::QLORA_NF4_CODE_6 as f32,
    ffi::QLORA_NF4_CODE_7 as f32,
    ffi::QLORA_NF4_CODE_8 as f32,
    ffi::QLORA_NF4_CODE_9 as f32,
    ffi::QLORA_NF4_CODE_10 as f32,
    ffi::QLORA_NF4_CODE_11 as f32,
    ffi::QLORA_NF4_CODE_12 as f32,
    ffi::QLORA_NF4_CODE_13 as f32,
    ffi::QLORA_NF4_CODE_14 as f32,
    ffi::QLORA_NF4_CODE_15 as f32,
];

/// NF4 decision thresholds: `NF4_THRESHOLDS[i - 1]` separates code `i - 1` from code `i`; a
/// normalised value gets code `#{ i : xn > NF4_THRESHOLDS[i - 1] }` (strict, §2.3).
pub const NF4_THRESHOLDS: [f32; 15] = [
    ffi::QLORA_NF4_T1 as f32,
    ffi::QLORA_NF4_T2 as f32,
    ffi::QLORA_NF4_T3 as f32,
    ffi::QLORA_NF4_T4 as f32,
    ffi::QLORA_NF4_T5 as f32,
    ffi::QLORA_NF4_T6 as f32,
    ffi::QLORA_NF4_T7 as f32,
    ffi::QLORA_NF4_T8 as f32,
    ffi::QLORA_NF4_T9 as f32,
    ffi::QLORA_NF4_T10 as f32,
    ffi::QLORA_NF4_T11 as f32,
    ffi::QLORA_NF4_T12 as f32,
    ffi::QLORA_NF4_T13 as f32,
    ffi::QLORA_NF4_T14 as f32,
    ffi::QLORA_NF4_T15 as f32,
];

/// FP4 magnitudes by the low three bits of a code; bit 3 is the sign (§1.3).
pub const FP4_LUT: [f32; 8] = [
    ffi::QLORA_FP4_LUT_0 as f32,
    ffi::QLORA_FP4_LUT_1 as f32,
    ffi::QLORA_FP4_LUT_2 as f32,
    ffi::QLORA_FP4_LUT_3 as f32,
    ffi::QLORA_FP4_LUT_4 as f32,
    ffi::QLORA_FP4_LUT_5 as f32,
    ffi::QLORA_FP4_LUT_6 as f32,
    ffi::QLORA_FP4_LUT_7 as f32,
];

/// FP4 tree thresholds on |xn| (§2.4): root, high, high-high, high-low, low, low-high, low-low.
pub const FP4_THRESHOLDS: [f32; 7] = [
    ffi::QLORA_FP4_T_ROOT as f32,
    ffi::QLORA_FP4_T_HIGH as f32,
    ffi::QLORA_FP4_T_HIGH_HIGH as f32,
    ffi::QLORA_FP4_T_HIGH_LOW as f32,
    ffi::QLORA_FP4_T_LOW as f32,
    ffi::QLORA_FP4_T_LOW_HIGH as f32,
    ffi::QLORA_FP4_T_LOW_LOW as f32,
];

/// Smallest 4-bit block size the kernels accept.
pub const MIN_BLOCKSIZE: usize = ffi::QLORA_MIN_BLOCKSIZE as usize;
/// Largest block size the kernels accept.
pub const MAX_BLOCKSIZE: usize = ffi::QLORA_MAX_BLOCKSIZE as usize;
/// Smallest 8-bit block size the kernels accept.
pub const MIN_BLOCKSIZE_8BIT: usize = ffi::QLORA_MIN_BLOCKSIZE_8BIT as usize;
/// Block size of the nested quantization of absmax.
pub const NESTED_BLOCKSIZE: usize = ffi::QLORA_NESTED_BLOCKSIZE as usize;
/// Block size of the 8-bit optimizer states.
pub const OPTIMIZER_BLOCKSIZE: usize = ffi::QLORA_OPT8_BLOCKSIZE as usize;
/// Most rows the fused GEMV kernel handles in one launch.
pub const GEMV_MAX_ROWS: usize = ffi::QLORA_GEMV_MAX_ROWS as usize;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_codebook_matches_reference_bits() {
        let bits: [u32; 16] = [
            0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f, 0xbdba7871,
            0x00000000, 0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a, 0x3ee1a4b8, 0x3f1007ab,
            0x3f3913b3, 0x3f800000,
        ];
        assert_eq!(NF4_CODEBOOK.map(f32::to_bits), bits);
    }

    #[test]
    fn nf4_thresholds_match_reference_bits() {
        let bits: [u32; 15] = [
            0xbf591cd8, 0xbf1c5270, 0xbeeb8480, 0xbeadea76, 0xbe703cec, 0xbe0d38bc, 0xbd3a7871,
            0x3d22faff, 0x3df64862, 0x3e5067e0, 0x3e9582d4, 0x3ec753f9, 0x3f006d04, 0x3f248daf,
            0x3f5c89da,
        ];
        assert_eq!(NF4_THRESHOLDS.map(f32::to_bits), bits);
        // Each threshold lies strictly between the two codes it separates.
        for i in 0..15 {
            assert!(NF4_CODEBOOK[i] < NF4_THRESHOLDS[i] && NF4_THRESHOLDS[i] < NF4_CODEBOOK[i + 1]);
        }
    }

    #[test]
    fn fp4_tables_match_reference_bits() {
        let lut: [u32; 8] = [
            0x00000000, 0x3baaaaab, 0x3f2aaaab, 0x3f800000, 0x3eaaaaab, 0x3f000000, 0x3e2aaaab,
            0x3e800000,
        ];
        assert_eq!(FP4_LUT.map(f32::to_bits), lut);
        // Reference §2.4, in tree order root, high, high-high, high-low, low, low-high, low-low.
        let thresholds: [u32; 7] = [
            0x3e955555, 0x3f155550, 0x3f555555, 0x3ed55556, 0x3db00000, 0x3e555555, 0x3b2aaab9,
        ];
        assert_eq!(FP4_THRESHOLDS.map(f32::to_bits), thresholds);
    }
}
