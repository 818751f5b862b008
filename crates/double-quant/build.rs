//! Enables the SIMD kernels (`cfg(qlora_simd)`) when the compiler has stable AVX-512 intrinsics
//! and safe calls of intrinsics inside `#[target_feature]` functions (Rust 1.89 and later); older
//! compilers within the workspace MSRV build the scalar oracle only.

use std::{env, process::Command};

fn main() {
    println!("cargo:rustc-check-cfg=cfg(qlora_simd)");
    println!("cargo:rerun-if-env-changed=RUSTC");
    let rustc = env::var("RUSTC").unwrap_or_else(|_| "rustc".to_string());
    let minor = Command::new(rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|v| {
            v.split_whitespace()
                .nth(1)
                .and_then(|ver| ver.split('.').nth(1))
                .and_then(|m| m.parse::<u32>().ok())
        });
    if minor.is_some_and(|m| m >= 89) {
        println!("cargo:rustc-cfg=qlora_simd");
    }
}
