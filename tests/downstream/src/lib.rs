//! Property tests against the `qlora-nf4` facade, written as a downstream crate would write them:
//! only public APIs, the strategies and oracles of the layers' `testing` features. The tests live
//! in `tests/`; this library is empty.
#![forbid(unsafe_code)]

/// The README's library example, compiled and run as a doctest (as safetensors and regex do).
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeDoctests;
