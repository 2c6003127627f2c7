//! Learnable global pooling layers: `[B, C, H, W]` maps or `[B, N, C]` token sets to `[B, C]`.
//!
//! | layer | pools with | parameters |
//! |---|---|---|
//! | [`Gap`] | the mean | none |
//! | [`Gmp`] | the maximum (MAC) | none |
//! | [`GapGmp`] | the mean and the maximum, summed or concatenated | none |
//! | [`Gem`] | the generalized (power) mean | one power `p` |
//! | [`GroupGem`] | the generalized mean, one `p` per channel group | `p: [groups]` |
//! | [`Gsp`] | weights from partial optimal transport onto prototypes | `prototypes: [K, C]` |
//! | [`Lse`] | the log-sum-exp (smooth max) or its softmax-weighted mean | temperature `r` |
//! | [`TokenPooling`] | token modes: cls, last, mean, max, mean·√L, SGPT weights | none |
//!
//! Every layer has `forward(maps)`, `forward_tokens(tokens)` and `forward(input)` for a
//! [`PoolingInput`] (maps or tokens, with a mask, with prefix tokens). [`PoolingConfig`] and
//! [`Pooling`] are one config and one module for all of them, to choose the pooling at run
//! time.

mod choice;
mod gap;
mod gap_gmp;
mod gem;
mod gmp;
mod group_gem;
mod gsp;
mod input;
mod lse;
mod token;

pub use choice::{Pooling, PoolingConfig};
pub use gap::{Gap, GapConfig};
pub use gap_gmp::{GapGmp, GapGmpCombine, GapGmpConfig};
pub use gem::{Gem, GemConfig, MIN_EPS, MIN_POWER};
pub use gmp::{Gmp, GmpConfig};
pub use group_gem::{GroupGem, GroupGemConfig, GroupLayout};
pub use gsp::{Gsp, GspConfig, GspOutput};
pub use input::PoolingInput;
pub use lse::{Lse, LseConfig, LseOutput};
pub use token::{TokenMode, TokenPooling, TokenPoolingConfig};
