//! The tests that need f64 floats: Flex is configured for f64 once in this process (a
//! device's float dtype is process-wide), and the independent f64 oracle (`tests/reference`)
//! is compiled once for all of them.

#[path = "../common/mod.rs"]
mod common;
#[path = "../reference/mod.rs"]
mod reference;

mod attention;
mod balanced;
mod gem;
mod gmp;
mod gsp;
mod gsp_authors;
mod lse_tokens;
mod netvlad;
mod ot_aggregation;
mod otk;
mod properties;
mod reference_selfcheck;
mod zero_shot;
