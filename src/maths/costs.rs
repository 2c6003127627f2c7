//! Transport costs between features and prototypes, and their closed-form gradient.

use burn::tensor::Tensor;

use crate::layout::Layout;

/// Squared distances below this are treated as 0 (the norm's derivative is undefined there;
/// its gradient is taken as 0).
pub(crate) const MIN_SQUARED_DISTANCE: f64 = 1e-12;

/// Costs at or below this came from a clamped squared distance, so their gradient is 0: the
/// square root of [`MIN_SQUARED_DISTANCE`] with room for rounding.
pub(crate) const MIN_ACTIVE_COST: f64 = 1.0001e-6;

/// φ(v) = v / max(1, ‖v‖₂) along `axis`: shrinks vectors outside the unit ball onto it, keeps
/// the others, so every cost lies in [0, 2].
pub fn lipschitz_normalize<const D: usize>(v: Tensor<D>, axis: usize) -> Tensor<D> {
    let (normalized, _) = normalize_with_scale(v, axis);
    normalized
}

/// φ(v) and 1 / max(1, ‖v‖) along `axis`, for every finite v.
///
/// ‖v‖² overflows f32 once ‖v‖ ≳ 1.8e19 (f16 from 256), and v / ∞ = 0 would make φ forget
/// its input. So v is first divided by m = max(1, maxᵢ |vᵢ|), which leaves at most the width
/// under the square root: with u = v / m and q = sqrt(max(m⁻², ‖u‖²)),
/// max(1, ‖v‖) = m q and φ(v) = u / q. q is never the square root of 0 (‖u‖ = 1 when m > 1,
/// m⁻² = 1 otherwise), so no infinite gradient, and m is detached: φ does not depend on it.
fn normalize_with_scale<const D: usize>(v: Tensor<D>, axis: usize) -> (Tensor<D>, Tensor<D>) {
    let largest = v.clone().abs().max_dim(axis).clamp_min(1.0).detach();
    let unit = v / largest.clone();
    let floor = largest.clone().square().recip();
    let root = unit.clone().square().sum_dim(axis).max_pair(floor).sqrt();
    let inverse_scale = (largest * root.clone()).recip();
    (unit / root, inverse_scale)
}

/// Features as one `[B·N, C]` matrix of positions.
fn positions_as_rows(features: Tensor<3>, layout: Layout) -> Tensor<2> {
    let tokens = match layout {
        Layout::ChannelsLast => features,
        Layout::ChannelsFirst => features.swap_dims(1, 2),
    };
    let [batch, positions, channels] = tokens.dims();
    tokens.reshape([batch * positions, channels])
}

/// c_kj = ‖φ(ω_k) − φ(x_j)‖₂ (not squared) with tensor ops, differentiable by autodiff.
///
/// # Shapes
///
/// - features: `[B, C, N]` or `[B, N, C]` as `layout` says
/// - prototypes: `[K, C]`
/// - output: `[B, K, N]`
pub(crate) fn composite_costs(
    features: Tensor<3>,
    prototypes: Tensor<2>,
    layout: Layout,
) -> Tensor<3> {
    let [batch, _, _] = features.dims();
    let [count, _] = prototypes.dims();
    // One [B·N, C] matrix, so the cross products (and their gradients) are single 2-D matmuls
    // rather than a batched one broadcasting the prototypes.
    let flat = lipschitz_normalize(positions_as_rows(features, layout), 1);
    let prototypes = lipschitz_normalize(prototypes, 1);
    let positions = flat.dims()[0] / batch;
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

/// (∂L/∂features, ∂L/∂prototypes) of [`composite_costs`] from its output and ∂L/∂costs,
/// written with tensor ops. With a_kj = (∂L/∂c_kj) / c_kj (0 where the distance was clamped):
///
/// ```text
/// ∂L/∂φ(x_j) = φ(x_j) Σ_k a_kj − Σ_k a_kj φ(ω_k)
/// ∂L/∂φ(ω_k) = φ(ω_k) Σ_j a_kj − Σ_j a_kj φ(x_j)        (summed over the batch)
/// ∂L/∂v      = (g − [‖v‖ > 1] ⟨φ(v), g⟩ φ(v)) / max(1, ‖v‖)   for g = ∂L/∂φ(v)
/// ```
pub(crate) fn costs_gradient(
    features: Tensor<3>,
    prototypes: Tensor<2>,
    costs: Tensor<3>,
    grad: Tensor<3>,
    layout: Layout,
) -> (Tensor<3>, Tensor<2>) {
    let dims = features.dims();
    let [batch, count, positions] = costs.dims();
    let (flat, flat_scale) = normalize_with_scale(positions_as_rows(features, layout), 1);
    let (prototypes, prototype_scale) = normalize_with_scale(prototypes, 1);
    let clamped = costs.clone().lower_equal_elem(MIN_ACTIVE_COST);
    let a = (grad / costs)
        .mask_fill(clamped, 0.0)
        .swap_dims(1, 2)
        .reshape([batch * positions, count]); // [B·N, K]
    let flat_grad = flat.clone() * a.clone().sum_dim(1) - a.clone().matmul(prototypes.clone());
    let prototype_grad =
        prototypes.clone() * a.clone().sum_dim(0).transpose() - a.transpose().matmul(flat.clone());
    let flat_grad = normalize_backward(flat, flat_scale, flat_grad);
    let prototype_grad = normalize_backward(prototypes, prototype_scale, prototype_grad);
    let tokens = flat_grad.reshape([batch, positions, dims[layout.channel_axis()]]);
    let features_grad = match layout {
        Layout::ChannelsLast => tokens,
        Layout::ChannelsFirst => tokens.swap_dims(1, 2),
    };
    (features_grad, prototype_grad)
}

/// ∂L/∂v of φ along rows, from φ(v), 1 / max(1, ‖v‖) and g = ∂L/∂φ(v). Written with φ(v),
/// not v, so that nothing overflows for a huge v.
fn normalize_backward(
    normalized: Tensor<2>,
    inverse_scale: Tensor<2>,
    grad: Tensor<2>,
) -> Tensor<2> {
    let inside = inverse_scale.clone().greater_equal_elem(1.0);
    let projection = (normalized.clone() * grad.clone())
        .sum_dim(1)
        .mask_fill(inside, 0.0);
    (grad - normalized * projection) * inverse_scale
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Device, TensorData, Tolerance};

    /// Issue #20: φ of vectors whose squared norm overflows f32 is their direction (it was 0),
    /// and the small ones and 0 are kept, on the portable form's backends.
    #[test]
    fn huge_vectors_normalize_to_their_direction() {
        #[allow(unused_mut)]
        let mut devices = vec![Device::flex()];
        #[cfg(feature = "ndarray")]
        #[allow(deprecated)]
        devices.push(Device::ndarray());
        for device in devices {
            let v = Tensor::<2>::from_floats(
                [
                    [3e38, 0.0],
                    [-3e38, 3e38],
                    [3e19, 4e19],
                    [0.3, 0.4],
                    [0.0, 0.0],
                ],
                &device,
            );
            let expected = TensorData::from([
                [1.0f32, 0.0],
                [
                    -std::f32::consts::FRAC_1_SQRT_2,
                    std::f32::consts::FRAC_1_SQRT_2,
                ],
                [0.6, 0.8],
                [0.3, 0.4],
                [0.0, 0.0],
            ]);
            lipschitz_normalize(v, 1)
                .into_data()
                .assert_approx_eq::<f32>(&expected, Tolerance::rel_abs(1e-6, 1e-7));
        }
    }
}
