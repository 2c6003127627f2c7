#![doc = include_str!("../README.md")]
#![warn(missing_docs)]
// docs.rs (`--cfg docsrs`, nightly): mark each item with the features it needs.
#![cfg_attr(docsrs, feature(doc_cfg))]

// The floor plan, bottom-up: `layout` and `maths` (the reference maths, a leaf), `ops` (the
// backend-extension trait whose default bodies are those maths, one folder per backend, and
// the routing between kernels and composites), then the public layers, transport API and
// losses.
mod checks;
mod display;
mod layout;
mod maths;
pub mod ops;
#[cfg(test)]
mod test_support;

pub mod loss;
pub mod pooling;
pub mod transport;

pub use layout::Layout;
pub use pooling::*;
