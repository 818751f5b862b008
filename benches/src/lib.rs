//! Criterion benchmarks of the workspace live under `benches/`; this library is empty on purpose.
