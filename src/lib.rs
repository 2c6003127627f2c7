#![doc = include_str!("../README.md")]
#![warn(missing_docs)]

pub mod loss;
pub mod ops;
pub mod pooling;
pub mod retrieval;
pub mod transport;

pub use pooling::*;
