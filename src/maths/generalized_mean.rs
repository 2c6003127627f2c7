//! The numerically stable generalized (power) mean shared by [`Gem`](super::Gem) and
//! [`GroupGem`](super::GroupGem).
//!
//! GeM is `y = ((1/N) Σ_n max(x_n, ε)^p)^(1/p)`. Evaluated as written it overflows for large
//! `p` (f64 at p = 1000) and underflows to `0^(1/p)` for channels at the clamp (f32 from p ≈ 8),
//! whose gradient is then NaN. We use the max-normalised log form instead:
//!
//! ```text
//! l_n = ln max(x_n, ε),   m = max_n l_n
//! y = e^m · ( (1/N) Σ_n exp(p · (l_n − m)) )^(1/p)
//! ```
//!
//! Every exponent is ≤ 0 and the sum is ≥ 1 (the maximum contributes exp(0)), so the result and
//! its gradients stay finite for any p > 0. e^m is the largest clamped value itself, not an
//! `exp`: y stays exact up to the largest float. The gradients in closed form:
//!
//! ```text
//! ∂y/∂x_n = (1/N) (x_n / y)^(p−1)                  where x_n > ε, else 0
//! ∂y/∂p   = (y/p) (Σ_n w_n l_n / Σ_n w_n − ln y),  w_n = exp(p (l_n − m))
//! ```
//!
//! with (x_n / y)^(p−1) ≤ N, so they are finite too.

use burn::tensor::Tensor;

use crate::layout::Layout;

/// `[C]` powers shaped to broadcast against features of `layout`.
fn broadcast_powers(powers: Tensor<1>, layout: Layout) -> Tensor<3> {
    let [channels] = powers.dims();
    powers.reshape(layout.dims(1, 1, channels))
}

/// The stable form with tensor ops (differentiable by autodiff). `x` is `[B, C, N]` or
/// `[B, N, C]` as `layout` says; `mask` `[B, N]` holds 1 for valid positions.
pub(crate) fn composite_forward(
    x: Tensor<3>,
    powers: Tensor<1>,
    mask: Option<Tensor<2>>,
    eps: f64,
    layout: Layout,
) -> Tensor<2> {
    let axis = layout.position_axis();
    let p = broadcast_powers(powers, layout);
    let mask = mask.map(|mask| mask.unsqueeze_dim::<3>(layout.channel_axis()));
    let mut clamped = x.clamp_min(eps);
    if let Some(mask) = &mask {
        // Padding must not raise the maximum: give it the smallest value a valid position can
        // have. Its weight is zeroed below.
        clamped = clamped.mask_fill(mask.clone().lower_elem(0.5), eps);
    }
    // y does not depend on the shift, so its derivative is exactly zero: detach it.
    let largest = clamped.clone().max_dim(axis).detach();
    let log_max = largest.clone().log();
    let mut scaled = (clamped.log() - log_max).mul(p.clone()).exp();
    let mean = match mask {
        Some(mask) => {
            scaled = scaled * mask.clone();
            scaled.sum_dim(axis).div(mask.sum_dim(axis))
        }
        None => scaled.mean_dim(axis),
    };
    // y = max · mean^(1/p), the exponent ≤ 0: exact up to the largest float, where
    // exp(ln max + ln(mean)/p) would round ln max.
    (mean.log().div(p).exp() * largest).squeeze_dim(axis)
}

/// The closed-form gradients (∂L/∂x, ∂L/∂powers) with tensor ops (the portable backward of the
/// backends without a fused kernel), given the output `y` and
/// ∂L/∂y (`[B, C]`), for the same arguments as [`composite_forward`].
pub(crate) fn composite_backward(
    x: Tensor<3>,
    powers: Tensor<1>,
    mask: Tensor<2>,
    output: Tensor<2>,
    grad: Tensor<2>,
    eps: f64,
    layout: Layout,
) -> (Tensor<3>, Tensor<1>) {
    let (axis, channel_axis) = (layout.position_axis(), layout.channel_axis());
    let p = broadcast_powers(powers.clone(), layout);
    let mask = mask.unsqueeze_dim::<3>(channel_axis);
    let count = mask.clone().sum_dim(axis);
    let log_y = output.clone().log().unsqueeze_dim::<3>(axis);
    let grad = grad.unsqueeze_dim::<3>(axis);
    let active = x.clone().greater_elem(eps).float() * mask.clone();
    // Padding gets ln ε, as in the forward: a padded value above every valid one would
    // overflow the `exp`s below, and the mask's 0 times ∞ is NaN.
    let log_x = x
        .clamp_min(eps)
        .log()
        .mask_fill(mask.clone().lower_elem(0.5), eps.ln());
    let dx = (log_x.clone() - log_y.clone())
        .mul(p.clone().sub_scalar(1.0))
        .exp()
        * active
        * grad.clone()
        / count;
    let log_max = log_x.clone().max_dim(axis);
    let weights = (log_x.clone() - log_max).mul(p.clone()).exp() * mask;
    let mean_log = (weights.clone() * log_x).sum_dim(axis) / weights.sum_dim(axis);
    let y = output.unsqueeze_dim::<3>(axis);
    // y last: it may be near the largest float, where g · y would overflow.
    let dp = (grad * ((mean_log - log_y) / p) * y).sum_dim(0); // [1, C, 1] or [1, 1, C]
    let [channels] = powers.dims();
    (dx, dp.reshape([channels]))
}
