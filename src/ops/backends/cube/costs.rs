//! GSP's cost matrix and its backward: the φ-normalisation, the distances and their gradient's
//! element-wise parts as CubeCL kernels, the matrix products as Burn's (`CubeBackend`) matmuls.
//!
//! Forward, with φ(v) = v / max(1, ‖v‖₂) (`maths::costs`):
//! `normalize_kernel` writes φ(x_j) as the rows of `[B·N, C]` (from either layout) and
//! ‖φ(x_j)‖², and the same for the prototypes; the cross products φ(x)·φ(ω)ᵀ `[B·N, K]` are
//! one matmul; `distance_kernel` writes c_kj = sqrt(max(10⁻¹², ‖φx‖² + ‖φω‖² − 2 φx·φω))
//! straight into `[B, K, N]`.
//!
//! Backward: `weights_kernel` writes a_kj = (∂L/∂c_kj) / c_kj (0 where the distance was
//! clamped) as `[B·N, K]` and its sums over k; the products a·φ(ω) and aᵀ·φ(x) are matmuls;
//! `normalize_backward_kernel` finishes ∂L/∂v = (g − [‖v‖ > 1] ⟨φ(v), g⟩ φ(v)) / max(1, ‖v‖)
//! with g = φ(v) Σ a − (a·φ) for each row, writing the features' gradient in their layout.

use burn::backend::ops::FloatTensorOps;
use burn::tensor::Shape;
use burn_cubecl::CubeBackend;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

use super::tensors::{Launch, empty_like};
use crate::layout::Layout;
use crate::maths::costs::{MIN_ACTIVE_COST, MIN_SQUARED_DISTANCE};

/// The prototypes `[K, C]` as one channels-last sample `[1, K, C]`, so that one kernel
/// normalises both.
fn as_sample(prototypes: CubeTensor) -> CubeTensor {
    let dims = prototypes.meta.shape().clone();
    CubeBackend::float_reshape(prototypes, Shape::new([1, dims[0], dims[1]]))
}

/// φ of each position of `x` (`[B, ·, ·]` in `layout`) as the rows of `[B·N, C]`, each row's
/// ‖φ‖² and its max(1, ‖v‖) `[B·N]`.
fn normalize(x: CubeTensor, layout: Layout) -> (CubeTensor, CubeTensor, CubeTensor) {
    let x = into_contiguous(x);
    let dims = x.meta.shape().clone();
    let (batch, positions, channels) = layout.split([dims[0], dims[1], dims[2]]);
    let rows = batch * positions;
    let normalized = empty_like(&x, Shape::new([rows, channels]));
    let squared = empty_like(&x, Shape::new([rows]));
    let scale = empty_like(&x, Shape::new([rows]));
    let launch = Launch::per_element(&x, rows);
    normalize_kernel::launch(
        &launch.client,
        launch.count,
        launch.dim,
        x.into_tensor_arg(),
        normalized.clone().into_tensor_arg(),
        squared.clone().into_tensor_arg(),
        scale.clone().into_tensor_arg(),
        layout.position_axis(),
        layout.channel_axis(),
        launch.dtype,
    );
    (normalized, squared, scale)
}

/// The costs `[B, K, N]` of features in `layout` and prototypes `[K, C]`.
pub(super) fn launch_costs(
    features: CubeTensor,
    prototypes: CubeTensor,
    layout: Layout,
) -> CubeTensor {
    let batch = features.meta.shape()[0];
    let (flat, flat_squared, _) = normalize(features, layout);
    let (normalized, squared, _) = normalize(as_sample(prototypes), Layout::ChannelsLast);
    let cross = CubeBackend::float_matmul(flat, CubeBackend::float_transpose(normalized));
    let (rows, count) = (cross.meta.shape()[0], cross.meta.shape()[1]);
    let costs = empty_like(&cross, Shape::new([batch, count, rows / batch]));
    let launch = Launch::per_element(&cross, rows * count);
    let cross = into_contiguous(cross);
    distance_kernel::launch(
        &launch.client,
        launch.count,
        launch.dim,
        flat_squared.into_tensor_arg(),
        squared.into_tensor_arg(),
        cross.into_tensor_arg(),
        costs.clone().into_tensor_arg(),
        InputScalar::new(MIN_SQUARED_DISTANCE, launch.dtype),
        launch.dtype,
    );
    costs
}

/// (∂L/∂features in their layout, ∂L/∂prototypes `[K, C]`) from the costs and ∂L/∂costs.
pub(super) fn launch_costs_backward(
    features: CubeTensor,
    prototypes: CubeTensor,
    costs: CubeTensor,
    grad: CubeTensor,
    layout: Layout,
) -> (CubeTensor, CubeTensor) {
    let features_shape = features.meta.shape().clone();
    let prototypes_shape = prototypes.meta.shape().clone();
    let [costs, grad] = [costs, grad].map(into_contiguous);
    let (flat, _, flat_scale) = normalize(features, layout);
    let (normalized, _, scale) = normalize(as_sample(prototypes), Layout::ChannelsLast);
    let dims = costs.meta.shape().clone();
    let (batch, count, positions) = (dims[0], dims[1], dims[2]);
    let rows = batch * positions;
    let weights = empty_like(&costs, Shape::new([rows, count]));
    let row_sums = empty_like(&costs, Shape::new([rows]));
    let launch = Launch::per_element(&costs, rows);
    weights_kernel::launch(
        &launch.client,
        launch.count,
        launch.dim,
        costs.into_tensor_arg(),
        grad.into_tensor_arg(),
        weights.clone().into_tensor_arg(),
        row_sums.clone().into_tensor_arg(),
        InputScalar::new(MIN_ACTIVE_COST, launch.dtype),
        launch.dtype,
    );
    // Σ_j a_kj over the batch's positions `[K]`, a·φ(ω) `[B·N, C]`, aᵀ·φ(x) `[K, C]`.
    let column_sums = CubeBackend::float_reshape(
        CubeBackend::float_sum_dim(weights.clone(), 0),
        Shape::new([count]),
    );
    let toward_prototypes = CubeBackend::float_matmul(weights.clone(), normalized.clone());
    let toward_features =
        CubeBackend::float_matmul(CubeBackend::float_transpose(weights), flat.clone());
    // ∂L/∂v for the rows of `normalized`, into a `[B, ·, ·]` output of `shape` in `layout`.
    let finish = |normalized: CubeTensor,
                  sums: CubeTensor,
                  products: CubeTensor,
                  scale: CubeTensor,
                  shape: Shape,
                  layout: Layout| {
        let rows = normalized.meta.shape()[0];
        let out = empty_like(&normalized, shape);
        let launch = Launch::per_element(&normalized, rows);
        normalize_backward_kernel::launch(
            &launch.client,
            launch.count,
            launch.dim,
            normalized.into_tensor_arg(),
            sums.into_tensor_arg(),
            into_contiguous(products).into_tensor_arg(),
            scale.into_tensor_arg(),
            out.clone().into_tensor_arg(),
            layout.position_axis(),
            layout.channel_axis(),
            launch.dtype,
        );
        out
    };
    let features_grad = finish(
        flat,
        row_sums,
        toward_prototypes,
        flat_scale,
        features_shape,
        layout,
    );
    let (count, channels) = (prototypes_shape[0], prototypes_shape[1]);
    let prototypes_grad = finish(
        normalized,
        column_sums,
        toward_features,
        scale,
        Shape::new([1, count, channels]),
        Layout::ChannelsLast,
    );
    (
        features_grad,
        CubeBackend::float_reshape(prototypes_grad, prototypes_shape),
    )
}

/// One unit per position (b, j) of `x`: φ(x_j) into row b·N + j of `normalized`, ‖φ(x_j)‖²
/// and max(1, ‖x_j‖).
#[cube(launch)]
fn normalize_kernel<F: Float>(
    x: &Tensor<F>,
    normalized: &mut Tensor<F>,
    squared: &mut Tensor<F>,
    scale: &mut Tensor<F>,
    #[comptime] position_axis: usize,
    #[comptime] channel_axis: usize,
    #[define(F)] _dtype: ElemType,
) {
    let rows = squared.shape(0);
    if ABSOLUTE_POS >= rows {
        terminate!();
    }
    let positions = x.shape(position_axis);
    let channels = x.shape(channel_axis);
    let b = ABSOLUTE_POS / positions;
    let j = ABSOLUTE_POS % positions;
    let start = b * x.stride(0) + j * x.stride(position_axis);
    let step = x.stride(channel_axis);
    let one = F::new(1.0);
    let mut sum = F::new(0.0);
    for c in 0..channels {
        let v = x[start + c * step];
        sum += v * v;
    }
    // ‖v‖² overflowed (‖v‖ ≳ 1.8e19 in f32): divide by the largest |v_c| first, as the
    // portable φ does, so that φ(v) does not become v / ∞ = 0. The usual row skips it.
    let mut largest = one;
    if sum > F::max_value() {
        for c in 0..channels {
            largest = largest.max(x[start + c * step].abs());
        }
        sum = F::new(0.0);
        for c in 0..channels {
            let v = x[start + c * step] / largest;
            sum += v * v;
        }
    }
    // max(1, ‖v‖) = largest · root, with ‖v‖ = largest · sqrt(sum).
    let root = sum.max(one / (largest * largest)).sqrt();
    let row = ABSOLUTE_POS * normalized.stride(0);
    let out_step = normalized.stride(1);
    for c in 0..channels {
        normalized[row + c * out_step] = x[start + c * step] / largest / root;
    }
    squared[ABSOLUTE_POS] = sum / (root * root);
    scale[ABSOLUTE_POS] = largest * root;
}

/// One unit per cost (b, k, j): sqrt(max(floor, ‖φx_j‖² + ‖φω_k‖² − 2 φx_j·φω_k)).
#[cube(launch)]
fn distance_kernel<F: Float>(
    feature_squared: &Tensor<F>,
    prototype_squared: &Tensor<F>,
    cross: &Tensor<F>,
    costs: &mut Tensor<F>,
    floor: InputScalar,
    #[define(F)] _dtype: ElemType,
) {
    let count = costs.shape(1);
    let positions = costs.shape(2);
    if ABSOLUTE_POS >= costs.shape(0) * count * positions {
        terminate!();
    }
    let b = ABSOLUTE_POS / (count * positions);
    let k = ABSOLUTE_POS / positions % count;
    let j = ABSOLUTE_POS % positions;
    let row = b * positions + j;
    let squared = feature_squared[row] + prototype_squared[k]
        - F::new(2.0) * cross[row * cross.stride(0) + k * cross.stride(1)];
    // Not `max`, which may drop a NaN: a NaN feature keeps NaN costs, so the solve sees it.
    let floor = floor.get::<F>();
    let mut clamped = squared;
    if squared < floor {
        clamped = floor;
    }
    costs[ABSOLUTE_POS] = clamped.sqrt();
}

/// One unit per position (b, j): a_kj = g_kj / c_kj (0 at a clamped distance) into row
/// b·N + j of `weights` `[B·N, K]`, and Σ_k a_kj.
#[cube(launch)]
fn weights_kernel<F: Float>(
    costs: &Tensor<F>,
    grad: &Tensor<F>,
    weights: &mut Tensor<F>,
    row_sums: &mut Tensor<F>,
    min_active: InputScalar,
    #[define(F)] _dtype: ElemType,
) {
    let count = costs.shape(1);
    let positions = costs.shape(2);
    if ABSOLUTE_POS >= row_sums.shape(0) {
        terminate!();
    }
    let b = ABSOLUTE_POS / positions;
    let j = ABSOLUTE_POS % positions;
    let min_active = min_active.get::<F>();
    let (row, step) = (ABSOLUTE_POS * weights.stride(0), weights.stride(1));
    let mut sum = F::new(0.0);
    for k in 0..count {
        let at = b * costs.stride(0) + k * costs.stride(1) + j * costs.stride(2);
        let cost = costs[at];
        let mut a = F::new(0.0);
        if cost > min_active {
            a = grad[b * grad.stride(0) + k * grad.stride(1) + j * grad.stride(2)] / cost;
        }
        weights[row + k * step] = a;
        sum += a;
    }
    row_sums[ABSOLUTE_POS] = sum;
}

/// One unit per row r = b·N + j: with g = φ_r Σ a − (a·φ)_r,
/// out_r = (g − [scale > 1] ⟨φ_r, g⟩ φ_r) / scale, written at position (b, j) of `out`.
#[cube(launch)]
fn normalize_backward_kernel<F: Float>(
    normalized: &Tensor<F>,
    sums: &Tensor<F>,
    products: &Tensor<F>,
    scale: &Tensor<F>,
    out: &mut Tensor<F>,
    #[comptime] position_axis: usize,
    #[comptime] channel_axis: usize,
    #[define(F)] _dtype: ElemType,
) {
    if ABSOLUTE_POS >= sums.shape(0) {
        terminate!();
    }
    let positions = out.shape(position_axis);
    let channels = out.shape(channel_axis);
    let b = ABSOLUTE_POS / positions;
    let j = ABSOLUTE_POS % positions;
    let row = ABSOLUTE_POS * normalized.stride(0);
    let product_row = ABSOLUTE_POS * products.stride(0);
    let sum = sums[ABSOLUTE_POS];
    let factor = scale[ABSOLUTE_POS];
    let mut projection = F::new(0.0);
    if factor > F::new(1.0) {
        for c in 0..channels {
            let phi = normalized[row + c * normalized.stride(1)];
            let g = phi * sum - products[product_row + c * products.stride(1)];
            projection += phi * g;
        }
    }
    let start = b * out.stride(0) + j * out.stride(position_axis);
    let out_step = out.stride(channel_axis);
    for c in 0..channels {
        let phi = normalized[row + c * normalized.stride(1)];
        let g = phi * sum - products[product_row + c * products.stride(1)];
        out[start + c * out_step] = (g - projection * phi) / factor;
    }
}
