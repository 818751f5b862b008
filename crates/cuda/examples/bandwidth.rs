//! Bandwidth table (being written).
fn main() {}
