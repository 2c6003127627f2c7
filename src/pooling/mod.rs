//! Learnable global pooling layers: `[B, C, H, W]` maps or `[B, N, C]` token sets to `[B, C]`.
//!
//! | layer | pools with | parameters |
//! |---|---|---|
//! | [`Gap`] | the mean | none |
//! | [`Gem`] | the generalized (power) mean | one power `p` |
//! | [`GroupGem`] | the generalized mean, one `p` per channel group | `p: [groups]` |
//! | [`Gsp`] | weights from partial optimal transport onto prototypes | `prototypes: [K, C]` |
//!
//! Every layer has `forward(maps)`, `forward_tokens(tokens)` and `forward(input)` for a
//! [`PoolingInput`] (maps or tokens, with a mask, with prefix tokens).

mod gap;
mod gem;
mod group_gem;
mod gsp;
mod input;

pub use gap::{Gap, GapConfig};
pub use gem::{Gem, GemConfig};
pub use group_gem::{GroupGem, GroupGemConfig, GroupLayout};
pub use gsp::{Gsp, GspConfig, GspOutput};
pub use input::PoolingInput;
