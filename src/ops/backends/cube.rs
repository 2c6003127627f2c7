//! [`PoolingOps`] for the CubeCL backend (`Cube`: the wgpu device in this crate): the generalized
//! mean of GeM/GGeM (forward and backward) and the weighted sum of GAP and GSP (forward and its
//! weights' gradient) as CubeCL kernels. The portable bodies run these as a chain of
//! element-wise kernels and reductions with several `[B, C, N]` intermediates; a kernel here
//! reads the input once or twice and writes only its result. One unit per (b, c) (or per
//! (b, n) for the weights' gradient) loops over the other axis, which is short (the tokens or
//! the cells of a feature map; the channels), reading `x` through its strides, so both layouts
//! take the same kernel.
//!
//! The kernels are generic over the float type (the floor ε is raised to the dtype's smallest
//! normal value). The transport ops and the features' gradient of the weighted sum (already one
//! broadcast product) use the portable bodies, and so does every op when Burn's `fusion`
//! feature (a default of `burn-wgpu`) wraps the backend: `Cube` is then `Fusion<CubeBackend>`,
//! whose lazy tensors are not CubeCL buffers yet.

use std::any::{Any, TypeId};

use burn::backend::Cube;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::FloatTensor;
use burn::tensor::{DType, Shape};
use burn_cubecl::cubecl;
use burn_cubecl::cubecl::prelude::*;
use burn_cubecl::cubecl::{calculate_cube_count_elemwise, client::Client};
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;

use crate::ops::{PoolingOps, portable};

impl PoolingOps for Cube {
    portable_methods!(
        transport_costs,
        transport_costs_backward,
        partial_transport,
        partial_transport_backward,
        transport_marginals,
        transport_marginals_backward,
        weighted_sum_features_backward,
    );

    fn generalized_mean(
        x: FloatTensor<Self>,
        powers: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        eps: f64,
        channels_last: bool,
    ) -> FloatTensor<Self> {
        match cube_tensors([x, powers, mask]) {
            Ok([x, powers, mask]) => {
                from_cube(launch_generalized_mean(x, powers, mask, eps, channels_last))
            }
            Err([x, powers, mask]) => {
                portable::generalized_mean::<Self>(x, powers, mask, eps, channels_last)
            }
        }
    }

    fn generalized_mean_backward(
        x: FloatTensor<Self>,
        powers: FloatTensor<Self>,
        mask: FloatTensor<Self>,
        output: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        eps: f64,
        channels_last: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        match cube_tensors([x, powers, mask, output, grad]) {
            Ok([x, powers, mask, output, grad]) => {
                let channels = powers.meta.shape()[0];
                let (dx, dp_per_sample) = launch_generalized_mean_backward(
                    x,
                    powers,
                    mask,
                    output,
                    grad,
                    eps,
                    channels_last,
                );
                // ∂L/∂p sums the samples' terms: a `[B, C]` → `[C]` reduction.
                let dp = Self::float_sum_dim(from_cube(dp_per_sample), 0);
                (
                    from_cube(dx),
                    Self::float_reshape(dp, Shape::new([channels])),
                )
            }
            Err([x, powers, mask, output, grad]) => portable::generalized_mean_backward::<Self>(
                x,
                powers,
                mask,
                output,
                grad,
                eps,
                channels_last,
            ),
        }
    }

    fn weighted_sum(
        x: FloatTensor<Self>,
        weights: FloatTensor<Self>,
        channels_last: bool,
    ) -> FloatTensor<Self> {
        match cube_tensors([x, weights]) {
            Ok([x, weights]) => {
                let (positions, channels) = axes(channels_last);
                from_cube(launch_contraction(x, weights, channels, positions))
            }
            Err([x, weights]) => portable::weighted_sum::<Self>(x, weights, channels_last),
        }
    }

    fn weighted_sum_weights_backward(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        channels_last: bool,
    ) -> FloatTensor<Self> {
        match cube_tensors([x, grad]) {
            Ok([x, grad]) => {
                let (positions, channels) = axes(channels_last);
                from_cube(launch_contraction(x, grad, positions, channels))
            }
            Err([x, grad]) => {
                portable::weighted_sum_weights_backward::<Self>(x, grad, channels_last)
            }
        }
    }
}

/// Whether `Cube`'s float primitive is the CubeCL tensor the kernels take (it is not when Burn's
/// `fusion` feature is on).
fn kernels_apply() -> bool {
    TypeId::of::<FloatTensor<Cube>>() == TypeId::of::<CubeTensor>()
}

/// `value` as type `T` when it is one (a type-checked identity, no conversion).
fn same_type<S: 'static, T: 'static>(value: S) -> Result<T, S> {
    let mut slot = Some(value);
    match (&mut slot as &mut dyn Any).downcast_mut::<Option<T>>() {
        Some(same) => Ok(same.take().expect("filled above")),
        None => Err(slot.expect("not taken")),
    }
}

/// The CubeCL tensors behind `Cube` primitives of one float dtype, or the primitives back when a
/// kernel does not apply (a fused backend, or mixed dtypes).
fn cube_tensors<const K: usize>(
    tensors: [FloatTensor<Cube>; K],
) -> Result<[CubeTensor; K], [FloatTensor<Cube>; K]> {
    if !kernels_apply() {
        return Err(tensors);
    }
    let tensors = tensors.map(|tensor| {
        same_type::<_, CubeTensor>(tensor).unwrap_or_else(|_| unreachable!("kernels_apply"))
    });
    if tensors
        .iter()
        .all(|tensor| tensor.dtype == tensors[0].dtype)
    {
        Ok(tensors)
    } else {
        Err(tensors.map(from_cube))
    }
}

fn from_cube(tensor: CubeTensor) -> FloatTensor<Cube> {
    same_type(tensor).unwrap_or_else(|_| unreachable!("called only when kernels_apply"))
}

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

/// The axes of the positions and of the channels of `x`: `[B, C, N]` or `[B, N, C]`.
fn axes(channels_last: bool) -> (usize, usize) {
    if channels_last { (1, 2) } else { (2, 1) }
}

/// An uninitialised `[B, C]` output for `x` and the launch grid of one unit per element.
fn output_and_grid(x: &CubeTensor, channels_last: bool) -> (CubeTensor, CubeCount, CubeDim) {
    let dims = x.meta.shape();
    let (batch, channels) = (dims[0], dims[axes(channels_last).1]);
    let output = empty_like(x, Shape::new([batch, channels]));
    let (cube_count, cube_dim) = grid(&x.client, batch * channels);
    (output, cube_count, cube_dim)
}

/// An uninitialised tensor of `shape` on `like`'s device, in its dtype.
fn empty_like(like: &CubeTensor, shape: Shape) -> CubeTensor {
    empty_device_dtype(like.client.clone(), like.device.clone(), shape, like.dtype)
}

fn grid(client: &Client, units: usize) -> (CubeCount, CubeDim) {
    let cube_dim = CubeDim::new(client, units);
    (
        calculate_cube_count_elemwise(client, units, cube_dim),
        cube_dim,
    )
}

fn launch_generalized_mean(
    x: CubeTensor,
    powers: CubeTensor,
    mask: CubeTensor,
    eps: f64,
    channels_last: bool,
) -> CubeTensor {
    // A no-op for the usual tensors; un-tiles a storage-tiled one, which kernels cannot read.
    let [x, powers, mask] = [x, powers, mask].map(into_contiguous);
    let (output, cube_count, cube_dim) = output_and_grid(&x, channels_last);
    let (position_axis, channel_axis) = axes(channels_last);
    let dtype = dtype_to_storage_type(x.dtype);
    let floor = InputScalar::new(floor(eps, x.dtype), dtype);
    let client = x.client.clone();
    generalized_mean_kernel::launch(
        &client,
        cube_count,
        cube_dim,
        x.into_tensor_arg(),
        powers.into_tensor_arg(),
        mask.into_tensor_arg(),
        output.clone().into_tensor_arg(),
        floor,
        position_axis,
        channel_axis,
        dtype,
    );
    output
}

/// `out[b, i] = Σ_j v[b, j] x[b, ·, ·]` with i on `x`'s axis `kept` and j on its axis
/// `summed`: the weighted sum (kept = channels, summed = positions, v = the weights) and its
/// weights' gradient (kept = positions, summed = channels, v = ∂L/∂output).
fn launch_contraction(x: CubeTensor, vector: CubeTensor, kept: usize, summed: usize) -> CubeTensor {
    let [x, vector] = [x, vector].map(into_contiguous);
    let dims = x.meta.shape();
    let (batch, length) = (dims[0], dims[kept]);
    let output = empty_like(&x, Shape::new([batch, length]));
    let (cube_count, cube_dim) = grid(&x.client, batch * length);
    let dtype = dtype_to_storage_type(x.dtype);
    let client = x.client.clone();
    contraction_kernel::launch(
        &client,
        cube_count,
        cube_dim,
        x.into_tensor_arg(),
        vector.into_tensor_arg(),
        output.clone().into_tensor_arg(),
        kept,
        summed,
        dtype,
    );
    output
}

/// (∂L/∂x in `x`'s layout, each sample's term of ∂L/∂p `[B, C]`).
fn launch_generalized_mean_backward(
    x: CubeTensor,
    powers: CubeTensor,
    mask: CubeTensor,
    output: CubeTensor,
    grad: CubeTensor,
    eps: f64,
    channels_last: bool,
) -> (CubeTensor, CubeTensor) {
    let [x, powers, mask, output, grad] = [x, powers, mask, output, grad].map(into_contiguous);
    let dx = empty_like(&x, x.meta.shape().clone());
    let (dp, cube_count, cube_dim) = output_and_grid(&x, channels_last);
    let (position_axis, channel_axis) = axes(channels_last);
    let dtype = dtype_to_storage_type(x.dtype);
    let floor = InputScalar::new(floor(eps, x.dtype), dtype);
    let client = x.client.clone();
    generalized_mean_backward_kernel::launch(
        &client,
        cube_count,
        cube_dim,
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
        dtype,
    );
    (dx, dp)
}

/// The largest `max(x_n, ε)` over the valid positions of one (b, c) row, and the number of
/// valid positions Σ_n m_n: the first pass of the generalized mean, forward and backward.
#[cube]
fn masked_max_and_count<F: Float>(
    x: &Tensor<F>,
    mask: &Tensor<F>,
    x_row: usize,
    x_step: usize,
    mask_row: usize,
    mask_step: usize,
    floor: F,
) -> (F, F) {
    let zero = F::new(0.0);
    let mut largest = floor;
    let mut count = zero;
    for n in 0..mask.shape(1) {
        let valid = mask[mask_row + n * mask_step];
        let value = x[x_row + n * x_step];
        if valid > zero && value > largest {
            largest = value;
        }
        count += valid;
    }
    (largest, count)
}

/// One position's term of the generalized mean's power sum, `m_n exp(p (ln max(x_n, ε) − ln max))`,
/// and `ln max(x_n, ε)`, shared by the forward and the backward. A branch, not `m_n · term`:
/// a padded value above the maximum gives an infinite term, and 0·∞ would poison the sums.
#[cube]
fn power_weight<F: Float>(valid: F, raw: F, floor: F, p: F, log_max: F) -> (F, F) {
    let log_value = raw.max(floor).ln();
    let mut weight = F::new(0.0);
    if valid > F::new(0.0) {
        weight = valid * (p * (log_value - log_max)).exp();
    }
    (weight, log_value)
}

/// `y[b, c] = exp(ln max + ln(Σ_n m_n exp(p_c (ln max(x_n, ε) − ln max)) / Σ_n m_n) / p_c)`,
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
    let channels = output.shape(1);
    if ABSOLUTE_POS >= output.shape(0) * channels {
        terminate!();
    }
    let b = ABSOLUTE_POS / channels;
    let c = ABSOLUTE_POS % channels;
    let positions = mask.shape(1);
    let x_row = b * x.stride(0) + c * x.stride(channel_axis);
    let x_step = x.stride(position_axis);
    let mask_row = b * mask.stride(0);
    let mask_step = mask.stride(1);
    let floor = floor.get::<F>();
    let zero = F::new(0.0);

    let (largest, count) =
        masked_max_and_count::<F>(x, mask, x_row, x_step, mask_row, mask_step, floor);

    let log_max = largest.ln();
    let p = powers[c * powers.stride(0)];
    let mut sum = zero;
    for n in 0..positions {
        let valid = mask[mask_row + n * mask_step];
        let (weight, _) = power_weight::<F>(valid, x[x_row + n * x_step], floor, p, log_max);
        sum += weight;
    }

    let at = b * output.stride(0) + c * output.stride(1);
    output[at] = (log_max + (sum / count).ln() / p).exp();
}

/// The generalized mean's backward for one (b, c), with w_n = m_n exp(p (ln max(x_n, ε) − ln max))
/// as in the forward:
/// `∂L/∂x_n = g/count · (x_n/y)^(p−1)` where x_n > ε (else 0), computed as
/// `g/count · exp(p (ln max − ln y)) · y · w_n / x_n`; and this sample's
/// `∂L/∂p = g · (y/p) · (Σ w ln x / Σ w − ln y)`.
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
    let channels = dp.shape(1);
    if ABSOLUTE_POS >= dp.shape(0) * channels {
        terminate!();
    }
    let b = ABSOLUTE_POS / channels;
    let c = ABSOLUTE_POS % channels;
    let positions = mask.shape(1);
    let x_row = b * x.stride(0) + c * x.stride(channel_axis);
    let x_step = x.stride(position_axis);
    let dx_row = b * dx.stride(0) + c * dx.stride(channel_axis);
    let dx_step = dx.stride(position_axis);
    let mask_row = b * mask.stride(0);
    let mask_step = mask.stride(1);
    let floor = floor.get::<F>();
    let zero = F::new(0.0);

    let (largest, count) =
        masked_max_and_count::<F>(x, mask, x_row, x_step, mask_row, mask_step, floor);

    let log_max = largest.ln();
    let p = powers[c * powers.stride(0)];
    let y = output[b * output.stride(0) + c * output.stride(1)];
    let g = grad[b * grad.stride(0) + c * grad.stride(1)];
    let log_y = y.ln();
    let factor = g / count * (p * (log_max - log_y)).exp() * y;
    let mut sum = zero;
    let mut weighted_log = zero;
    for n in 0..positions {
        let valid = mask[mask_row + n * mask_step];
        let raw = x[x_row + n * x_step];
        let (weight, log_value) = power_weight::<F>(valid, raw, floor, p, log_max);
        sum += weight;
        weighted_log += weight * log_value;
        // 0 on padding (weight 0) and at the clamp.
        let mut derivative = zero;
        if raw > floor {
            derivative = factor * weight / raw;
        }
        dx[dx_row + n * dx_step] = derivative;
    }

    let at = b * dp.stride(0) + c * dp.stride(1);
    dp[at] = g * y / p * (weighted_log / sum - log_y);
}

/// `out[b, i] = Σ_j v[b, j] x[b, ·, ·]`, i on `x`'s axis `kept`, j on its axis `summed`
/// (see [`launch_contraction`]).
#[cube(launch)]
fn contraction_kernel<F: Float>(
    x: &Tensor<F>,
    vector: &Tensor<F>,
    output: &mut Tensor<F>,
    #[comptime] kept: usize,
    #[comptime] summed: usize,
    #[define(F)] _dtype: ElemType,
) {
    let length = output.shape(1);
    if ABSOLUTE_POS >= output.shape(0) * length {
        terminate!();
    }
    let b = ABSOLUTE_POS / length;
    let i = ABSOLUTE_POS % length;
    let x_start = b * x.stride(0) + i * x.stride(kept);
    let x_step = x.stride(summed);
    let vector_row = b * vector.stride(0);
    let vector_step = vector.stride(1);

    let mut sum = F::new(0.0);
    for j in 0..vector.shape(1) {
        sum += vector[vector_row + j * vector_step] * x[x_start + j * x_step];
    }

    let at = b * output.stride(0) + i * output.stride(1);
    output[at] = sum;
}

#[cfg(test)]
mod tests {
    use burn::backend::Cube;
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::{Device, DeviceKind, Tensor, TensorData};

    use super::kernels_apply;
    use crate::ops::{PoolingOps, portable};

    const EPS: f64 = 1e-6;
    const TOLERANCE: f64 = 1e-5;

    fn device() -> Device {
        Device::wgpu(DeviceKind::DefaultDevice)
    }

    fn primitive<const D: usize>(values: &[f32], shape: [usize; D]) -> FloatTensor<Cube> {
        Tensor::<D>::from_data(TensorData::new(values.to_vec(), shape), &device())
            .try_into_primitive::<Cube>()
            .expect("a wgpu tensor")
    }

    fn read<const D: usize>(tensor: FloatTensor<Cube>) -> Vec<f32> {
        Tensor::<D>::from_primitive::<Cube>(tensor)
            .into_data()
            .to_vec::<f32>()
            .expect("f32 values")
    }

    /// A deterministic spread of values in [-0.5, 3), a fifth of them at or below ε.
    fn features(len: usize) -> Vec<f32> {
        let mut state = 0x2545_f491_u32;
        (0..len)
            .map(|i| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                match i % 5 {
                    0 => [-0.3, 0.0, 1e-9, EPS as f32][i / 5 % 4],
                    _ => (state >> 8) as f32 / (1 << 24) as f32 * 3.5 - 0.5,
                }
            })
            .collect()
    }

    /// Three samples of 49 positions: all valid; padded positions, one of them holding the
    /// largest value of its sample; and only positions whose values are all below ε valid.
    fn mask_and_features(
        channels: usize,
        channels_last: bool,
    ) -> (Vec<f32>, Vec<f32>, [usize; 3], [usize; 2]) {
        let (batch, positions) = (3, 49);
        let mut x = features(batch * channels * positions);
        let index = |b: usize, c: usize, n: usize| {
            if channels_last {
                (b * positions + n) * channels + c
            } else {
                (b * channels + c) * positions + n
            }
        };
        let mut mask = vec![1.0f32; batch * positions];
        for n in (0..positions).step_by(3) {
            mask[positions + n] = 0.0;
        }
        for c in 0..channels {
            x[index(1, c, 0)] = 50.0; // padded: must not raise the maximum
        }
        for n in 0..positions {
            let valid = n % 7 == 0;
            mask[2 * positions + n] = if valid { 1.0 } else { 0.0 };
            for c in 0..channels {
                if valid {
                    x[index(2, c, n)] = [-1.0, 0.0, 1e-8, 5e-7][(n + c) % 4];
                }
            }
        }
        let shape = if channels_last {
            [batch, positions, channels]
        } else {
            [batch, channels, positions]
        };
        (x, mask, shape, [batch, positions])
    }

    /// The largest absolute and relative differences; panics past the tolerance or on a
    /// non-finite value.
    fn compare(label: &str, kernel: &[f32], reference: &[f32]) -> (f64, f64) {
        assert_eq!(kernel.len(), reference.len(), "{label}");
        let (mut worst_abs, mut worst_rel) = (0.0f64, 0.0f64);
        for (i, (&k, &r)) in kernel.iter().zip(reference).enumerate() {
            let (k, r) = (k as f64, r as f64);
            assert!(k.is_finite() && r.is_finite(), "{label}[{i}]: {k} vs {r}");
            let abs = (k - r).abs();
            let rel = abs / r.abs().max(f64::MIN_POSITIVE);
            assert!(
                abs <= TOLERANCE * r.abs().max(1.0),
                "{label}[{i}]: kernel {k}, portable {r}"
            );
            worst_abs = worst_abs.max(abs);
            worst_rel = worst_rel.max(rel);
        }
        eprintln!("{label}: max |Δ| = {worst_abs:e}, max |Δ|/|y| = {worst_rel:e}");
        (worst_abs, worst_rel)
    }

    #[test]
    fn generalized_mean_kernel_matches_portable() {
        assert!(kernels_apply(), "Cube's primitive is not a CubeTensor");
        let powers = [1.0f32, 3.0, 0.5, 1000.0, 7.5, 2.0];
        for channels_last in [false, true] {
            let (x, mask, shape, mask_shape) = mask_and_features(powers.len(), channels_last);
            let inputs = || {
                (
                    primitive(&x, shape),
                    primitive(&powers, [powers.len()]),
                    primitive(&mask, mask_shape),
                )
            };
            let (xs, ps, ms) = inputs();
            let kernel = read::<2>(<Cube as PoolingOps>::generalized_mean(
                xs,
                ps,
                ms,
                EPS,
                channels_last,
            ));
            let (xs, ps, ms) = inputs();
            let reference = read::<2>(portable::generalized_mean::<Cube>(
                xs,
                ps,
                ms,
                EPS,
                channels_last,
            ));
            // The all-below-ε sample pools to ε; the padded 50 is not its sample's maximum.
            let near_eps = |y: f32| (y as f64 - EPS).abs() <= TOLERANCE * EPS;
            assert!(kernel[2 * powers.len()..].iter().all(|&y| near_eps(y)));
            assert!(
                kernel[powers.len()..2 * powers.len()]
                    .iter()
                    .all(|&y| y < 3.0)
            );
            let label = format!("generalized mean (channels_last = {channels_last})");
            compare(&label, &kernel, &reference);
        }
    }

    #[test]
    fn weighted_sum_kernel_matches_portable() {
        assert!(kernels_apply(), "Cube's primitive is not a CubeTensor");
        for channels_last in [false, true] {
            let (x, mask, shape, mask_shape) = mask_and_features(6, channels_last);
            // Uneven weights, 0 on the padded positions.
            let weights: Vec<f32> = mask
                .iter()
                .enumerate()
                .map(|(i, &m)| m * (1.0 + (i % 7) as f32 / 10.0))
                .collect();
            let kernel = read::<2>(<Cube as PoolingOps>::weighted_sum(
                primitive(&x, shape),
                primitive(&weights, mask_shape),
                channels_last,
            ));
            let reference = read::<2>(portable::weighted_sum::<Cube>(
                primitive(&x, shape),
                primitive(&weights, mask_shape),
                channels_last,
            ));
            let label = format!("weighted sum (channels_last = {channels_last})");
            compare(&label, &kernel, &reference);
        }
    }
    /// A deterministic upstream gradient in [-1, 1).
    fn upstream(len: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 37 % 101) as f32 / 50.5) - 1.0)
            .collect()
    }

    #[test]
    fn generalized_mean_backward_kernel_matches_portable() {
        assert!(kernels_apply(), "Cube's primitive is not a CubeTensor");
        let powers = [1.0f32, 3.0, 0.5, 1000.0, 7.5, 2.0];
        let channels = powers.len();
        for channels_last in [false, true] {
            let (x, mask, shape, mask_shape) = mask_and_features(channels, channels_last);
            let grad = upstream(shape[0] * channels);
            let output = read::<2>(portable::generalized_mean::<Cube>(
                primitive(&x, shape),
                primitive(&powers, [channels]),
                primitive(&mask, mask_shape),
                EPS,
                channels_last,
            ));
            let inputs = || {
                (
                    primitive(&x, shape),
                    primitive(&powers, [channels]),
                    primitive(&mask, mask_shape),
                    primitive(&output, [shape[0], channels]),
                    primitive(&grad, [shape[0], channels]),
                )
            };
            let (xs, ps, ms, ys, gs) = inputs();
            let (kernel_dx, kernel_dp) = <Cube as PoolingOps>::generalized_mean_backward(
                xs,
                ps,
                ms,
                ys,
                gs,
                EPS,
                channels_last,
            );
            let (xs, ps, ms, ys, gs) = inputs();
            let (reference_dx, reference_dp) =
                portable::generalized_mean_backward::<Cube>(xs, ps, ms, ys, gs, EPS, channels_last);
            let kernel_dx = read::<3>(kernel_dx);
            // Padded positions and values at or below ε get no gradient.
            for (i, (&dx, &v)) in kernel_dx.iter().zip(&x).enumerate() {
                let n = if channels_last {
                    i / channels % shape[1]
                } else {
                    i % shape[2]
                };
                let b = i / (shape[1] * shape[2]);
                if mask[b * mask_shape[1] + n] == 0.0 || v as f64 <= EPS {
                    assert_eq!(dx, 0.0, "dx[{i}] of a padded or clamped value");
                }
            }
            let label = format!("generalized mean backward (channels_last = {channels_last})");
            compare(
                &format!("{label}: dx"),
                &kernel_dx,
                &read::<3>(reference_dx),
            );
            compare(
                &format!("{label}: dp"),
                &read::<1>(kernel_dp),
                &read::<1>(reference_dp),
            );
        }
    }

    #[test]
    fn weighted_sum_weights_backward_kernel_matches_portable() {
        assert!(kernels_apply(), "Cube's primitive is not a CubeTensor");
        let channels = 6;
        for channels_last in [false, true] {
            let (x, _, shape, _) = mask_and_features(channels, channels_last);
            let grad = upstream(shape[0] * channels);
            let run = |kernel: bool| {
                let (xs, gs) = (primitive(&x, shape), primitive(&grad, [shape[0], channels]));
                read::<2>(if kernel {
                    <Cube as PoolingOps>::weighted_sum_weights_backward(xs, gs, channels_last)
                } else {
                    portable::weighted_sum_weights_backward::<Cube>(xs, gs, channels_last)
                })
            };
            let label = format!("weighted sum backward: weights (channels_last = {channels_last})");
            compare(&label, &run(true), &run(false));
        }
    }
}
