//! L2 normalisation along one axis, `y = v / max(‖v‖, eps)`, and its closed-form gradient: the
//! input, intra- and output normalisations of NetVLAD and the cluster aggregators.
//!
//! ```text
//! d = max(‖v‖, eps)         y = v / d
//! ∂L/∂v = (g − y ⟨y, g⟩) / d    where ‖v‖ ≥ eps
//! ∂L/∂v = g / eps               where ‖v‖ < eps (the clamp: y = v / eps is linear)
//! ```
//!
//! ‖v‖ is computed on v / s with s = max(1, max_i |v_i|) (a scale the result does not depend
//! on), so that ‖v‖² cannot overflow even at the float's largest values. The backward reads the
//! output and the denominators d `[.., 1, ..]` (the axis kept with size 1): the clamp is where
//! d ≤ eps (to the rounding of its square root). The composites are the portable bodies of the op and the reference its kernels are
//! tested against.

use burn::tensor::{DType, Shape, Tensor};

/// The eps of every L2 normalisation in the crate (NetVLAD's, SALAD's and PyTorch's
/// `F.normalize` default): 1e-12.
pub(crate) const L2_EPS: f64 = 1e-12;

/// The clamp of ‖v‖ for `dtype`: [`L2_EPS`], except in f16, where eps² = 1e-24 rounds to 0:
/// there it is the square root of the smallest subnormal, 2.4e-4, so that a zero vector gives
/// 0, not 0/0.
pub(crate) fn eps_for(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 6.0e-8f64.sqrt(),
        _ => L2_EPS,
    }
}

/// `dims` seen around `axis` as `[outer, len, inner]` (the axis in the middle), and `dims` with
/// `axis` at size 1 (the denominators' shape): how the op's bodies and kernels view any rank.
pub(crate) fn around_axis(dims: &Shape, axis: usize) -> ([usize; 3], Shape) {
    let outer = dims[..axis].iter().product();
    let inner = dims[axis + 1..].iter().product();
    let mut kept = dims.clone();
    kept[axis] = 1;
    ([outer, dims[axis], inner], kept)
}

/// (y, d): `v / max(‖v‖, eps)` along `axis` and its denominators (the axis kept with size 1),
/// as tensor ops (differentiable by ordinary autodiff).
pub(crate) fn composite_forward<const D: usize>(
    v: Tensor<D>,
    axis: usize,
) -> (Tensor<D>, Tensor<D>) {
    let eps = eps_for(v.dtype());
    let scale = v.clone().abs().max_dim(axis).clamp_min(1.0).detach();
    let scaled = v / scale.clone();
    let norm = scaled
        .clone()
        .square()
        .sum_dim(axis)
        .clamp_min(eps * eps)
        .sqrt();
    let denominator = norm.clone() * scale;
    (scaled / norm, denominator)
}

/// ∂L/∂v from the output y, the denominators d and ∂L/∂y `grad`.
pub(crate) fn closed_form_backward<const D: usize>(
    output: Tensor<D>,
    denominator: Tensor<D>,
    grad: Tensor<D>,
    axis: usize,
) -> Tensor<D> {
    let eps = eps_for(output.dtype());
    let projection = (output.clone() * grad.clone()).sum_dim(axis);
    // Unclamped, d = ‖v‖ ≥ eps; clamped, d = eps up to the rounding of the square root.
    let clamped = denominator.clone().lower_equal_elem(eps * (1.0 + 1e-3));
    let projection = projection.mask_fill(clamped, 0.0);
    (grad - output * projection) / denominator
}
