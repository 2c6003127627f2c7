//! The numerically stable generalized (power) mean shared by [`Gem`](super::Gem) and
//! [`GroupGem`](super::GroupGem).
//!
//! GeM is `y = ((1/N) Σ_n max(x_n, ε)^p)^(1/p)`. Evaluated as written it overflows for large
//! `p` (f64 at p = 1000) and underflows to `0^(1/p)` for channels at the clamp (f32 from p ≈ 8),
//! whose gradient is then NaN. We use the max-normalised log form instead:
//!
//! ```text
//! l_n = ln max(x_n, ε),   m = max_n l_n
//! ln y = m + (1/p) · ln( (1/N) Σ_n exp(p · (l_n − m)) )
//! ```
//!
//! Every exponent is ≤ 0 and the sum is ≥ 1 (the maximum contributes exp(0)), so the result and
//! its gradients stay finite for any p > 0. `y` does not depend on `m`, so `m` is detached: its
//! derivative is exactly zero and this keeps the max out of the autodiff graph.

use burn::tensor::Tensor;

use super::positions::PositionSet;

/// Generalized mean over the positions of `set`.
///
/// `p` broadcasts against `set.features` (`[1, 1, 1]` for one p, or one p per channel laid out
/// along the channel axis). Returns `[B, C]`.
pub(crate) fn generalized_mean(set: PositionSet, p: Tensor<3>, eps: f64) -> Tensor<2> {
    let axis = set.axis;
    let float_mask = set.float_mask();
    let counts = set.valid_counts();
    let mut log_x = set.features.clamp_min(eps).log();
    if let Some(mask) = &set.mask {
        // Padding must not raise the maximum: give it the smallest value a valid position can
        // have. Its weight is zeroed below.
        let padding = mask.clone().bool_not().unsqueeze_dim(3 - axis);
        log_x = log_x.mask_fill(padding, eps.ln());
    }
    let log_max = log_x.clone().max_dim(axis).detach();
    let mut scaled = (log_x - log_max.clone()).mul(p.clone()).exp();
    if let Some(mask) = float_mask {
        scaled = scaled * mask;
    }
    let mean = match counts {
        Some(counts) => scaled.sum_dim(axis).div(counts),
        None => scaled.mean_dim(axis),
    };
    (mean.log().div(p) + log_max).exp().squeeze_dim(axis)
}
