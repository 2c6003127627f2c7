//! The generalized mean of GeM/GGeM and its backward as CubeCL kernels: one unit per (b, c)
//! loops over the positions of its row, reading `x` through its strides.

use burn::tensor::DType;
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;

use super::strided::{Strided, unit_position};
use super::tensors::{empty_like, output_and_launch};
use crate::layout::Layout;

/// The clamp floor of the generalized mean: `eps`, at least the dtype's smallest normal value
/// (so `ln` of it is finite).
fn floor(eps: f64, dtype: DType) -> f64 {
    let min_positive = match dtype {
        DType::F64 => f64::MIN_POSITIVE,
        DType::F32 | DType::Flex32 | DType::BF16 => f32::MIN_POSITIVE as f64,
        DType::F16 => 6.103_515_625e-5, // 2⁻¹⁴
        dtype => panic!("generalized mean: unsupported float dtype {dtype:?}"),
    };
    eps.max(min_positive)
}

pub(super) fn launch_generalized_mean(
    x: CubeTensor,
    powers: CubeTensor,
    mask: CubeTensor,
    eps: f64,
    layout: Layout,
) -> CubeTensor {
    // A no-op for the usual tensors; un-tiles a storage-tiled one, which kernels cannot read.
    let [x, powers, mask] = [x, powers, mask].map(into_contiguous);
    let (output, launch) = output_and_launch(&x, layout);
    let (position_axis, channel_axis) = (layout.position_axis(), layout.channel_axis());
    let floor = InputScalar::new(floor(eps, x.dtype), launch.dtype);
    generalized_mean_kernel::launch(
        &launch.client,
        launch.count,
        launch.dim,
        x.into_tensor_arg(),
        powers.into_tensor_arg(),
        mask.into_tensor_arg(),
        output.clone().into_tensor_arg(),
        floor,
        position_axis,
        channel_axis,
        launch.dtype,
    );
    output
}

/// (∂L/∂x in `x`'s layout, each sample's term of ∂L/∂p `[B, C]`).
pub(super) fn launch_generalized_mean_backward(
    x: CubeTensor,
    powers: CubeTensor,
    mask: CubeTensor,
    output: CubeTensor,
    grad: CubeTensor,
    eps: f64,
    layout: Layout,
) -> (CubeTensor, CubeTensor) {
    let [x, powers, mask, output, grad] = [x, powers, mask, output, grad].map(into_contiguous);
    let dx = empty_like(&x, x.meta.shape().clone());
    let (dp, launch) = output_and_launch(&x, layout);
    let (position_axis, channel_axis) = (layout.position_axis(), layout.channel_axis());
    let floor = InputScalar::new(floor(eps, x.dtype), launch.dtype);
    generalized_mean_backward_kernel::launch(
        &launch.client,
        launch.count,
        launch.dim,
        x.into_tensor_arg(),
        powers.into_tensor_arg(),
        mask.into_tensor_arg(),
        output.into_tensor_arg(),
        grad.into_tensor_arg(),
        dx.clone().into_tensor_arg(),
        dp.clone().into_tensor_arg(),
        floor,
        position_axis,
        channel_axis,
        launch.dtype,
    );
    (dx, dp)
}

/// One (b, c) row of the generalized mean as both kernels begin it: where its `x` and mask
/// elements are, the clamp floor, the channel's power p_c, and the first pass over the row:
/// the log of the largest `max(x_n, ε)` over the valid positions and their number Σ_n m_n.
#[derive(CubeType, Clone, Copy)]
struct MeanRow<F: Float> {
    b: usize,
    c: usize,
    x_line: Strided,
    mask_line: Strided,
    floor: F,
    p: F,
    largest: F,
    log_max: F,
    count: F,
}

#[cube]
impl<F: Float> MeanRow<F> {
    /// This unit's row, one unit per (b, c) of a `[B, channels]` output.
    fn first_pass(
        x: &Tensor<F>,
        powers: &Tensor<F>,
        mask: &Tensor<F>,
        channels: usize,
        floor: InputScalar,
        #[comptime] position_axis: usize,
        #[comptime] channel_axis: usize,
    ) -> MeanRow<F> {
        let (b, c) = unit_position(channels);
        let x_line = Strided::through::<F>(x, b, c, channel_axis, position_axis);
        let mask_line = Strided::row::<F>(mask, b);
        let floor = floor.get::<F>();
        let zero = F::new(0.0);
        let mut largest = floor;
        let mut count = zero;
        for n in 0..mask.shape(1) {
            let valid = mask[mask_line.at(n)];
            let value = x[x_line.at(n)];
            if valid > zero && value > largest {
                largest = value;
            }
            count += valid;
        }
        MeanRow::<F> {
            b,
            c,
            x_line,
            mask_line,
            floor,
            p: powers[c * powers.stride(0)],
            largest,
            log_max: largest.ln(),
            count,
        }
    }

    /// Position n's term of the power sum, `m_n exp(p (ln max(x_n, ε) − ln max))`, and
    /// `ln max(x_n, ε)`, shared by the forward and the backward. A branch, not `m_n · term`:
    /// a padded value above the maximum gives an infinite term, and 0·∞ would poison the sums.
    fn weight(&self, raw: F, mask: &Tensor<F>, n: usize) -> (F, F) {
        let valid = mask[self.mask_line.at(n)];
        // Padding: weight 0 and ln ε, whatever it holds (NaN, ∞), so that the backward's
        // Σ w ln x stays finite.
        let mut log_value = self.floor.ln();
        let mut weight = F::new(0.0);
        if valid > F::new(0.0) {
            // A select, not `max`: a NaN input must stay NaN (and make its channel's output
            // NaN, as on the other backends), where a GPU's `max` may return the floor.
            let mut clamped = raw;
            if raw < self.floor {
                clamped = self.floor;
            }
            log_value = clamped.ln();
            weight = valid * (self.p * (log_value - self.log_max)).exp();
        }
        (weight, log_value)
    }

    /// Where this row's element is in a `[B, C]` input.
    fn at(&self, tensor: &Tensor<F>) -> usize {
        self.b * tensor.stride(0) + self.c * tensor.stride(1)
    }
}

/// `y[b, c] = max · exp(ln(Σ_n m_n exp(p_c (ln max(x_n, ε) − ln max)) / Σ_n m_n) / p_c)`,
/// with `max` the largest `max(x_n, ε)` over the valid positions: every term is at most 1, so
/// the sum stays finite for any p. Two passes over the row: the maximum, then the sum.
#[cube(launch)]
fn generalized_mean_kernel<F: Float>(
    x: &Tensor<F>,
    powers: &Tensor<F>,
    mask: &Tensor<F>,
    output: &mut Tensor<F>,
    floor: InputScalar,
    #[comptime] position_axis: usize,
    #[comptime] channel_axis: usize,
    #[define(F)] _dtype: ElemType,
) {
    if ABSOLUTE_POS >= output.shape(0) * output.shape(1) {
        terminate!();
    }
    let row = MeanRow::<F>::first_pass(
        x,
        powers,
        mask,
        output.shape(1),
        floor,
        position_axis,
        channel_axis,
    );
    let mut sum = F::new(0.0);
    for n in 0..mask.shape(1) {
        let (weight, _) = row.weight(x[row.x_line.at(n)], mask, n);
        sum += weight;
    }
    let at = row.b * output.stride(0) + row.c * output.stride(1);
    // max · mean^(1/p): the exponent is ≤ 0, so y is exact up to the largest float.
    output[at] = row.largest * ((sum / row.count).ln() / row.p).exp();
}

/// The generalized mean's backward for one (b, c), with w_n = m_n exp(p (ln max(x_n, ε) − ln max))
/// as in the forward:
/// `∂L/∂x_n = g/count · (x_n/y)^(p−1)` where x_n > ε (else 0), computed as
/// `g/count · exp(p (ln max − ln y)) · (w_n / x_n · y)`; and this sample's
/// `∂L/∂p = g · (Σ w ln x / Σ w − ln y) / p · y`.
#[cube(launch)]
fn generalized_mean_backward_kernel<F: Float>(
    x: &Tensor<F>,
    powers: &Tensor<F>,
    mask: &Tensor<F>,
    output: &Tensor<F>,
    grad: &Tensor<F>,
    dx: &mut Tensor<F>,
    dp: &mut Tensor<F>,
    floor: InputScalar,
    #[comptime] position_axis: usize,
    #[comptime] channel_axis: usize,
    #[define(F)] _dtype: ElemType,
) {
    if ABSOLUTE_POS >= dp.shape(0) * dp.shape(1) {
        terminate!();
    }
    let row = MeanRow::<F>::first_pass(
        x,
        powers,
        mask,
        dp.shape(1),
        floor,
        position_axis,
        channel_axis,
    );
    let dx_line = Strided::new(
        row.b * dx.stride(0) + row.c * dx.stride(channel_axis),
        dx.stride(position_axis),
    );
    let (y, g, p) = (output[row.at(output)], grad[row.at(grad)], row.p);
    let log_y = y.ln();
    // y enters last (w / x · y, then the factor; g (…)/p, then y): it may be near the largest
    // float, where multiplying it first overflows.
    let factor = g / row.count * (p * (row.log_max - log_y)).exp();
    let zero = F::new(0.0);
    let mut sum = zero;
    let mut weighted_log = zero;
    for n in 0..mask.shape(1) {
        let raw = x[row.x_line.at(n)];
        let (weight, log_value) = row.weight(raw, mask, n);
        sum += weight;
        weighted_log += weight * log_value;
        // 0 on padding (weight 0) and at the clamp.
        let mut derivative = zero;
        if raw > row.floor {
            derivative = factor * (weight / raw * y);
        }
        dx[dx_line.at(n)] = derivative;
    }

    let at = row.b * dp.stride(0) + row.c * dp.stride(1);
    dp[at] = g * ((weighted_log / sum - log_y) / p) * y;
}
