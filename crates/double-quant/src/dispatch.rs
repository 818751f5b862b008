//! The one run-time choice of CPU implementation for every kernel of the workspace (memchr's
//! layout): the CPU's features detected once ([`CpuFeatures`]), the implementations a CPU can run
//! and the best of them ([`Implementation`]), and the `QLORA_FORCE_SCALAR` rule, read once.
//!
//! `qlora-codec` and `qlora-optim` re-export [`Implementation`] and say only which of their
//! kernels runs for each one (their SIMD kernels are compiled for subsets of the features an
//! implementation requires), so one process makes one choice for all of them.

use std::sync::OnceLock;

/// The instruction-set extensions the workspace's SIMD kernels use, detected once per process
/// ([`CpuFeatures::get`]). On other architectures than their own, the fields are `false`.
///
/// ```
/// use qlora_double_quant::{CpuFeatures, Implementation};
///
/// let cpu = CpuFeatures::get();
/// // An implementation is offered only where the CPU has every feature it requires.
/// if Implementation::Avx2.is_available() {
///     assert!(cpu.avx2 && cpu.fma && cpu.f16c);
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
#[non_exhaustive]
pub struct CpuFeatures {
    /// x86-64 AVX2.
    pub avx2: bool,
    /// x86-64 FMA (three-operand fused multiply-add).
    pub fma: bool,
    /// x86-64 F16C (f16 ↔ f32 conversions).
    pub f16c: bool,
    /// x86-64 AVX-512 Foundation.
    pub avx512f: bool,
    /// x86-64 AVX-512 Byte and Word instructions.
    pub avx512bw: bool,
    /// x86-64 AVX-512 Doubleword and Quadword instructions.
    pub avx512dq: bool,
    /// x86-64 AVX-512 Vector Length extensions (the 128- and 256-bit forms).
    pub avx512vl: bool,
    /// x86-64 AVX-512 Vector Byte Manipulation Instructions (`vpermb`, `vpermt2b`).
    pub avx512vbmi: bool,
    /// aarch64 NEON (Advanced SIMD).
    pub neon: bool,
}

impl CpuFeatures {
    /// This CPU's features, detected on first use and cached.
    #[inline]
    pub fn get() -> &'static CpuFeatures {
        static DETECTED: OnceLock<CpuFeatures> = OnceLock::new();
        DETECTED.get_or_init(CpuFeatures::detect)
    }

    fn detect() -> CpuFeatures {
        #[allow(unused_mut)]
        let mut cpu = CpuFeatures::default();
        #[cfg(target_arch = "x86_64")]
        {
            cpu.avx2 = std::is_x86_feature_detected!("avx2");
            cpu.fma = std::is_x86_feature_detected!("fma");
            cpu.f16c = std::is_x86_feature_detected!("f16c");
            cpu.avx512f = std::is_x86_feature_detected!("avx512f");
            cpu.avx512bw = std::is_x86_feature_detected!("avx512bw");
            cpu.avx512dq = std::is_x86_feature_detected!("avx512dq");
            cpu.avx512vl = std::is_x86_feature_detected!("avx512vl");
            cpu.avx512vbmi = std::is_x86_feature_detected!("avx512vbmi");
        }
        #[cfg(target_arch = "aarch64")]
        {
            cpu.neon = std::arch::is_aarch64_feature_detected!("neon");
        }
        cpu
    }
}

/// A CPU implementation of the workspace's kernels: the scalar code, or one instruction-set level
/// chosen at run time.
///
/// One choice serves every crate: `qlora-codec` and `qlora-optim` re-export this type and run
/// their own kernels for it (their `CodecKernels` and `AdamKernels` traits), and this crate's
/// slice kernels ([`Encoder::encode_slice`](crate::Encoder::encode_slice) and the other methods
/// below) are inherent methods. [`Implementation::active`] is what the crates' entry points use;
/// tests and benchmarks can run a specific one. Every implementation returns the same bytes.
///
/// ```
/// use qlora_double_quant::{Encoder, Implementation};
///
/// let x = [0.5f32, -0.25, 2.0, f32::NAN];
/// let mut reference = [0u8; 4];
/// Implementation::Scalar.encode_scaled(Encoder::signed(), &x, 0.5, &mut reference);
/// for imp in Implementation::available() {
///     let mut codes = [0u8; 4];
///     imp.encode_scaled(Encoder::signed(), &x, 0.5, &mut codes);
///     assert_eq!(codes, reference, "{imp}");
/// }
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Implementation {
    /// Portable code without SIMD intrinsics (the oracles and the target's baseline build).
    Scalar,
    /// x86-64 with AVX2, FMA and F16C (every AVX2 CPU has the other two).
    Avx2,
    /// x86-64 with AVX-512 F, BW, DQ and VL (every AVX-512 CPU since Skylake-SP and Zen 4 has the
    /// four; VBMI, where present, is used in addition: [`CpuFeatures::avx512vbmi`]).
    Avx512,
    /// aarch64 NEON.
    Neon,
}

/// Every implementation, best first.
const ALL: [Implementation; 4] = [
    Implementation::Avx512,
    Implementation::Avx2,
    Implementation::Neon,
    Implementation::Scalar,
];

impl Implementation {
    /// A short name: `scalar`, `avx2`, `avx512`, `neon`.
    pub fn name(self) -> &'static str {
        match self {
            Implementation::Scalar => "scalar",
            Implementation::Avx2 => "avx2",
            Implementation::Avx512 => "avx512",
            Implementation::Neon => "neon",
        }
    }

    /// True when a CPU with the features `cpu` has every feature this implementation requires.
    pub(crate) fn runs_on(self, cpu: &CpuFeatures) -> bool {
        match self {
            Implementation::Scalar => true,
            Implementation::Avx2 => cpu.avx2 && cpu.fma && cpu.f16c,
            Implementation::Avx512 => cpu.avx512f && cpu.avx512bw && cpu.avx512dq && cpu.avx512vl,
            Implementation::Neon => cpu.neon,
        }
    }

    /// True when this implementation can run on this machine: the CPU has every feature it
    /// requires, and the SIMD kernels were compiled in (they need Rust 1.89 or later).
    #[inline]
    pub fn is_available(self) -> bool {
        self == Implementation::Scalar || (cfg!(qlora_simd) && self.runs_on(CpuFeatures::get()))
    }

    /// The implementations this machine can run, best first (the scalar code is always last).
    pub fn available() -> Vec<Implementation> {
        ALL.into_iter().filter(|i| i.is_available()).collect()
    }

    /// The fastest implementation this machine can run (ignores `QLORA_FORCE_SCALAR`).
    pub fn best() -> Implementation {
        ALL.into_iter()
            .find(|i| i.is_available())
            .unwrap_or(Implementation::Scalar)
    }

    /// The implementation every crate's entry points use: [`best`](Self::best), or the scalar
    /// code when the environment variable `QLORA_FORCE_SCALAR` is `1` (read once, on first use).
    #[inline]
    pub fn active() -> Implementation {
        static ACTIVE: OnceLock<Implementation> = OnceLock::new();
        *ACTIVE.get_or_init(|| {
            if std::env::var_os("QLORA_FORCE_SCALAR").is_some_and(|v| v == "1") {
                Implementation::Scalar
            } else {
                Implementation::best()
            }
        })
    }
}

impl std::fmt::Display for Implementation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_level_requires_all_of_its_features() {
        let all = CpuFeatures {
            avx2: true,
            fma: true,
            f16c: true,
            avx512f: true,
            avx512bw: true,
            avx512dq: true,
            avx512vl: true,
            avx512vbmi: true,
            neon: true,
        };
        for imp in ALL {
            assert!(imp.runs_on(&all), "{imp}");
        }
        let without = |f: fn(&mut CpuFeatures)| {
            let mut cpu = all;
            f(&mut cpu);
            cpu
        };
        for cpu in [
            without(|c| c.avx2 = false),
            without(|c| c.fma = false),
            without(|c| c.f16c = false),
        ] {
            assert!(!Implementation::Avx2.runs_on(&cpu), "{cpu:?}");
            assert!(Implementation::Avx512.runs_on(&cpu), "{cpu:?}");
        }
        for cpu in [
            without(|c| c.avx512f = false),
            without(|c| c.avx512bw = false),
            without(|c| c.avx512dq = false),
            without(|c| c.avx512vl = false),
        ] {
            assert!(!Implementation::Avx512.runs_on(&cpu), "{cpu:?}");
            assert!(Implementation::Avx2.runs_on(&cpu), "{cpu:?}");
        }
        // VBMI is optional, NEON is aarch64's.
        assert!(Implementation::Avx512.runs_on(&without(|c| c.avx512vbmi = false)));
        assert!(!Implementation::Neon.runs_on(&without(|c| c.neon = false)));
        assert!(Implementation::Scalar.runs_on(&CpuFeatures::default()));
    }

    #[test]
    fn detection_matches_the_standard_library() {
        let cpu = CpuFeatures::get();
        #[cfg(target_arch = "x86_64")]
        {
            assert_eq!(cpu.avx2, std::is_x86_feature_detected!("avx2"));
            assert_eq!(cpu.fma, std::is_x86_feature_detected!("fma"));
            assert_eq!(cpu.f16c, std::is_x86_feature_detected!("f16c"));
            assert_eq!(cpu.avx512f, std::is_x86_feature_detected!("avx512f"));
            assert_eq!(cpu.avx512bw, std::is_x86_feature_detected!("avx512bw"));
            assert_eq!(cpu.avx512dq, std::is_x86_feature_detected!("avx512dq"));
            assert_eq!(cpu.avx512vl, std::is_x86_feature_detected!("avx512vl"));
            assert_eq!(cpu.avx512vbmi, std::is_x86_feature_detected!("avx512vbmi"));
            assert!(!cpu.neon);
        }
        #[cfg(target_arch = "aarch64")]
        assert_eq!(cpu.neon, std::arch::is_aarch64_feature_detected!("neon"));
    }

    #[test]
    fn implementations_are_offered_exactly_where_the_cpu_has_their_features() {
        assert!(Implementation::Scalar.is_available());
        let simd = cfg!(qlora_simd);
        #[cfg(target_arch = "x86_64")]
        {
            let has = |f: &[bool]| simd && f.iter().all(|&b| b);
            use std::is_x86_feature_detected as d;
            assert_eq!(
                Implementation::Avx2.is_available(),
                has(&[d!("avx2"), d!("fma"), d!("f16c")])
            );
            assert_eq!(
                Implementation::Avx512.is_available(),
                has(&[
                    d!("avx512f"),
                    d!("avx512bw"),
                    d!("avx512dq"),
                    d!("avx512vl")
                ])
            );
            assert!(!Implementation::Neon.is_available());
        }
        #[cfg(target_arch = "aarch64")]
        {
            assert_eq!(
                Implementation::Neon.is_available(),
                simd && std::arch::is_aarch64_feature_detected!("neon")
            );
            assert!(!Implementation::Avx2.is_available() && !Implementation::Avx512.is_available());
        }
        let _ = simd;
    }
}
