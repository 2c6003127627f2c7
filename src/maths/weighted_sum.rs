//! The weighted sum over positions, y_bc = Σ_n w_bn x_bnc: GAP's masked mean (w = 1/N_valid on
//! valid positions, 0 on padding) and GSP's pooling (w = transported mass / μ), with its two
//! closed-form gradient halves.

use burn::tensor::Tensor;

use crate::layout::Layout;

/// y `[B, C]` from features `[B, C, N]` or `[B, N, C]` (as `layout` says) and weights `[B, N]`.
pub(crate) fn weighted_sum(x: Tensor<3>, weights: Tensor<2>, layout: Layout) -> Tensor<2> {
    let axis = layout.position_axis();
    let weights = weights.unsqueeze_dim::<3>(layout.channel_axis());
    (x * weights).sum_dim(axis).squeeze_dim(axis)
}

/// ∂L/∂x_bnc = w_bn ∂L/∂y_bc, in `layout`.
pub(crate) fn weighted_sum_features_backward(
    weights: Tensor<2>,
    grad: Tensor<2>,
    layout: Layout,
) -> Tensor<3> {
    let weights = weights.unsqueeze_dim::<3>(layout.channel_axis());
    grad.unsqueeze_dim::<3>(layout.position_axis()) * weights
}

/// ∂L/∂w_bn = Σ_c x_bnc ∂L/∂y_bc: `[B, N]`.
pub(crate) fn weighted_sum_weights_backward(
    x: Tensor<3>,
    grad: Tensor<2>,
    layout: Layout,
) -> Tensor<2> {
    let channel_axis = layout.channel_axis();
    let grad = grad.unsqueeze_dim::<3>(layout.position_axis());
    (x * grad).sum_dim(channel_axis).squeeze_dim(channel_axis)
}
