//! Losses that train the pooling layers' own parameters.

mod cholesky;
mod zero_shot;

pub use zero_shot::{ZeroShotLoss, ZeroShotLossConfig, ZeroShotSplit};
