//! Learnable global pooling layers: `[B, C, H, W]` maps or `[B, N, C]` token sets to `[B, C]`.
//!
//! | layer | pools with | parameters |
//! |---|---|---|
//! | [`Gap`] | the mean | none |
//! | [`Gem`] | the generalized (power) mean | one power `p` |
//! | [`GroupGem`] | the generalized mean, one `p` per channel group | `p: [groups]` |
//! | [`Gsp`] | weights from partial optimal transport onto prototypes | `prototypes: [K, C]` |

mod gap;
mod gem;
pub(crate) mod generalized_mean;
mod group_gem;
mod gsp;
mod positions;

pub use gap::{Gap, GapConfig};
pub use gem::{Gem, GemConfig};
pub use group_gem::{GroupGem, GroupGemConfig, GroupLayout};
pub use gsp::{Gsp, GspConfig, GspOutput};
