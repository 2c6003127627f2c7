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
//! its gradients stay finite for any p > 0. The gradients in closed form:
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
    let mut log_x = x.clamp_min(eps).log();
    if let Some(mask) = &mask {
        // Padding must not raise the maximum: give it the smallest value a valid position can
        // have. Its weight is zeroed below.
        log_x = log_x.mask_fill(mask.clone().lower_elem(0.5), eps.ln());
    }
    // y does not depend on the shift, so its derivative is exactly zero: detach it.
    let log_max = log_x.clone().max_dim(axis).detach();
    let mut scaled = (log_x - log_max.clone()).mul(p.clone()).exp();
    let mean = match mask {
        Some(mask) => {
            scaled = scaled * mask.clone();
            scaled.sum_dim(axis).div(mask.sum_dim(axis))
        }
        None => scaled.mean_dim(axis),
    };
    (mean.log().div(p) + log_max).exp().squeeze_dim(axis)
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
    let dp = (grad * y / p * (mean_log - log_y)).sum_dim(0); // [1, C, 1] or [1, 1, C]
    let [channels] = powers.dims();
    (dx, dp.reshape([channels]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Bool, Device, Distribution, TensorData, Tolerance};

    use crate::ops::routing::generalized_mean;

    /// The fused Flex kernel and its analytical backward against the composite form under
    /// autodiff and against the composite closed-form backward, both layouts, with a mask
    /// (one padded position holding an outlier), a clamped channel and powers from 1 to 200 (in f32, ∂y/∂x at p = 200 carries p times
    /// the rounding of ln, hence 1e-4).
    #[test]
    fn fused_kernel_matches_composite_paths() {
        let device = Device::flex().autodiff();
        device.seed(1);
        let (b, n, c) = (3, 7, 5);
        for layout in [Layout::ChannelsFirst, Layout::ChannelsLast] {
            let shape = layout.dims(b, n, c);
            let x = Tensor::<3>::random(shape, Distribution::Uniform(-0.5, 3.0), &device);
            // Channel 0 at the first position of each sample below the clamp.
            let x = x.slice_fill([0..b, 0..1, 0..1], -1.0);
            // A padded position (sample 0, position 3) far above every valid value: at p = 40
            // and 200 its power overflows f32, which must not reach any output or gradient.
            let x = if layout.is_channels_last() {
                x.slice_fill([0..1, 3..4, 0..c], 50.0)
            } else {
                x.slice_fill([0..1, 0..c, 3..4], 50.0)
            };
            let powers = Tensor::<1>::from_floats([1.0, 2.5, 3.0, 40.0, 200.0], &device);
            let keep: Vec<bool> = (0..b * n).map(|i| i % 4 != 3).collect();
            let mask = Tensor::<2, Bool>::from_bool(TensorData::new(keep, [b, n]), &device);
            let features = x.clone().require_grad();
            let p = powers.clone().require_grad();
            let fused = generalized_mean(
                features.clone(),
                p.clone(),
                Some(mask.clone().float()),
                1e-6,
                layout,
            );
            let weights = Tensor::<2>::random([b, c], Distribution::Uniform(-1.0, 1.0), &device);
            let grads = (fused.clone() * weights.clone()).sum().backward();
            let (fused_dx, fused_dp) = (features.grad(&grads).unwrap(), p.grad(&grads).unwrap());

            let xc = x.clone().require_grad();
            let pc = powers.clone().require_grad();
            let composite = composite_forward(
                xc.clone(),
                pc.clone(),
                Some(mask.clone().float()),
                1e-6,
                layout,
            );
            let grads = (composite.clone() * weights.clone()).sum().backward();
            let tolerance = Tolerance::rel_abs(1e-4, 1e-6);
            fused
                .clone()
                .into_data()
                .assert_approx_eq::<f32>(&composite.into_data(), tolerance);
            let composite_dx = xc.grad(&grads).unwrap();
            fused_dx
                .clone()
                .into_data()
                .assert_approx_eq::<f32>(&composite_dx.into_data(), tolerance);
            fused_dp.clone().into_data().assert_approx_eq::<f32>(
                &pc.grad(&grads).unwrap().into_data(),
                Tolerance::rel_abs(1e-4, 1e-5),
            );

            let (closed_dx, closed_dp) = composite_backward(
                x.inner(),
                powers.inner(),
                mask.float().inner(),
                fused.inner(),
                weights.inner(),
                1e-6,
                layout,
            );
            closed_dx
                .into_data()
                .assert_approx_eq::<f32>(&fused_dx.into_data(), tolerance);
            closed_dp
                .into_data()
                .assert_approx_eq::<f32>(&fused_dp.into_data(), Tolerance::rel_abs(1e-4, 1e-5));
        }
    }

    #[test]
    fn generalized_mean_backward_runs_the_analytical_node() {
        use crate::ops::BACKWARD_CALLS;
        use std::sync::atomic::Ordering;
        let device = Device::flex().autodiff();
        let x = Tensor::<3>::ones([2, 3, 4], &device).require_grad();
        let before = BACKWARD_CALLS::GENERALIZED_MEAN.load(Ordering::SeqCst);
        let powers = Tensor::ones([3], &device);
        let grads = generalized_mean(x.clone(), powers, None, 1e-6, Layout::ChannelsFirst)
            .sum()
            .backward();
        assert!(BACKWARD_CALLS::GENERALIZED_MEAN.load(Ordering::SeqCst) > before);
        assert!(x.grad(&grads).is_some());
    }
}
