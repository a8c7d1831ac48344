//! World model benchmarks (filled in with the coordinator's document).
fn main() {}
