//! Transport costs between features and prototypes (gsp.md §3).

use burn::tensor::Tensor;

/// Squared distances below this are treated as 0 (the norm's derivative is undefined there;
/// its gradient is taken as 0).
const MIN_SQUARED_DISTANCE: f64 = 1e-12;

/// φ(v) = v / max(1, ‖v‖₂) along `axis`: shrinks vectors outside the unit ball onto it, keeps
/// the others, so every cost lies in [0, 2].
pub fn lipschitz_normalize<const D: usize>(v: Tensor<D>, axis: usize) -> Tensor<D> {
    // max(1, ‖v‖) = sqrt(max(1, ‖v‖²)): no square root of 0, so no infinite gradient.
    let norm = v.clone().square().sum_dim(axis).clamp_min(1.0).sqrt();
    v / norm
}

/// c_kj = ‖φ(ω_k) − φ(x_j)‖₂ (not squared) for features in either layout.
///
/// # Shapes
///
/// - features: `[B, C, N]` when `channel_axis == 1`, `[B, N, C]` when `channel_axis == 2`
/// - prototypes: `[K, C]`
/// - output: `[B, K, N]`
pub fn transport_costs(
    features: Tensor<3>,
    prototypes: Tensor<2>,
    channel_axis: usize,
) -> Tensor<3> {
    let features = lipschitz_normalize(features, channel_axis);
    let prototypes = lipschitz_normalize(prototypes, 1);
    // Features as one [B·N, C] matrix, so the cross products (and their gradients) are single
    // 2-D matmuls rather than a batched one broadcasting the prototypes.
    let tokens = if channel_axis == 2 {
        features
    } else {
        features.swap_dims(1, 2)
    };
    let [batch, positions, channels] = tokens.dims();
    let [count, _] = prototypes.dims();
    let flat = tokens.reshape([batch * positions, channels]);
    let feature_norms = flat.clone().square().sum_dim(1); // [B·N, 1]
    let prototype_norms = prototypes.clone().square().sum_dim(1).transpose(); // [1, K]
    let cross = flat.matmul(prototypes.transpose()); // [B·N, K]
    let squared = feature_norms + prototype_norms - cross.mul_scalar(2.0);
    squared
        .clamp_min(MIN_SQUARED_DISTANCE)
        .sqrt()
        .reshape([batch, positions, count])
        .swap_dims(1, 2)
}
