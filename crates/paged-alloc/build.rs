//! Exists only because `links = "qlora_paged_alloc"` in Cargo.toml requires a build script. The
//! `links` key is what keeps two versions of this crate (and so two process-wide pools) out of one
//! binary; nothing is compiled or linked here.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
}
