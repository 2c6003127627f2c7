//! Attention pooling: a query (learned latents, or the mean of the set) attends over the
//! positions, and the output is the attention-weighted sum of their values (docs/maths.md §11).
//! MAP, the multi-head attention pooling head of SigLIP (timm's `AttentionPoolLatent`), and
//! SimPool (Psomas et al., ICCV 2023).
//!
//! Both use that their query does not depend on the positions: the key projection folds into
//! the query (`q·(W_k x + b) = (W_kᵀ q)·x + q·b`) and the value projection moves after the
//! weighted sum (`Σ_n a_n (W_v x_n + b) = W_v (Σ_n a_n x_n) + b`, since `Σ_n a_n = 1`), so no
//! `[B, N, C]` key or value tensor is formed: the per-position work is O(N·C·heads) instead
//! of O(N·C²) (docs/maths.md §11).

mod map;
mod simpool;

pub use map::{AttentionPool, AttentionPoolConfig, AttentionPoolOutput};
pub use simpool::{SIMPOOL_MIN_EXPONENT, SimPool, SimPoolConfig};

use burn::tensor::{Bool, Tensor};

use crate::layout::Layout;

/// `[B, N, C]` features from either layout (a transpose for maps).
pub(crate) fn channels_last(features: Tensor<3>, layout: Layout) -> Tensor<3> {
    match layout {
        Layout::ChannelsLast => features,
        Layout::ChannelsFirst => features.swap_dims(1, 2),
    }
}

/// Attention logits `[B, Q, N]` with the padded positions of `mask` `[B, N]` set to −∞ (an
/// exact 0 weight after the softmax in every float dtype, f16 and bf16 included, with no
/// finite stand-in such as −10⁹ to overflow or to leak weight). Every mask row has a valid
/// position (checked by `PoolingInput`), so the softmax's maximum is finite.
pub(crate) fn mask_logits(logits: Tensor<3>, mask: Option<&Tensor<2, Bool>>) -> Tensor<3> {
    match mask {
        Some(mask) => {
            let [batch, queries, positions] = logits.dims();
            let padding = mask
                .clone()
                .bool_not()
                .reshape([batch, 1, positions])
                .expand([batch, queries, positions]);
            logits.mask_fill(padding, f64::NEG_INFINITY)
        }
        None => logits,
    }
}
