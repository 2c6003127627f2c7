//! Reductions: each output channel is a (possibly learnable) reduction of that channel over the
//! positions, with no cross-channel interaction: the mean, the maximum, the generalized mean,
//! the log-sum-exp and the token modes.

mod gap;
mod gap_gmp;
mod gem;
mod gmp;
mod group_gem;
mod lse;
mod token;

pub use gap::{Gap, GapConfig};
pub use gap_gmp::{GapGmp, GapGmpCombine, GapGmpConfig};
pub(crate) use gem::floored_power;
pub use gem::{Gem, GemConfig, MIN_EPS, MIN_POWER};
pub use gmp::{Gmp, GmpConfig};
pub use group_gem::{GroupGem, GroupGemConfig, GroupLayout};
pub use lse::{Lse, LseConfig, LseOutput};
pub use token::{TokenMode, TokenPooling, TokenPoolingConfig};
